"""The namespace lab end to end: names, certificates, uploads and downloads through the censor.

No censor runs here: the censor namespace only forwards, so these numbers are the lab's ceiling.
The last test takes the lab down itself (after killing its server) and checks nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.netns.conftest import LAB_NAME, require_lab_prerequisites
from throttle.errors import ThrottleError
from throttle.lab.topology import ETC_NETNS, INTERFACES, NETNS_DIR, ROLES, ROUTER_CLIENT_V4, SERVER_V4, SERVER_V6, Lab

pytestmark = pytest.mark.netns

UPLOAD_SIZE = 8 * 1024 * 1024


def run_in(lab: Lab, role: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(lab.exec_argv(role, argv), capture_output=True, text=True, timeout=timeout)


def curl(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    """curl in the client namespace, never with -k: the lab CA must be trusted as installed."""
    proc = run_in(lab, "client", ["curl", "-sS", "--fail", "--max-time", "20", *args])
    assert proc.returncode == 0, f"curl {' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}"
    return proc


def censor_tx_bytes(lab: Lab) -> dict[str, int]:
    from pyroute2 import IPRoute

    out = {}
    with IPRoute(netns=lab.ns("censor"), flags=0) as ipr:
        for link in ipr.get_links():
            name = link.get("ifname")
            if name != "lo":
                out[name] = link.get("stats64")["tx_bytes"]
    return out


@pytest.mark.parametrize("family", ["-4", "-6"])
@pytest.mark.parametrize("host", ["pbs.twimg.com", "example.org"])
def test_https_for_any_name_is_trusted(lab: Lab, host: str, family: str) -> None:
    info = json.loads(curl(lab, family, f"https://{host}/info").stdout)
    assert info["sni"] == host
    assert info["host"] == host
    assert info["server"] == (SERVER_V4 if family == "-4" else SERVER_V6)
    assert info["tls"] in ("TLSv1.2", "TLSv1.3")


def test_plain_http_and_the_front_page(lab: Lab) -> None:
    info = json.loads(curl(lab, "-4", "http://upload.twitter.com/info").stdout)
    assert info == {**info, "sni": None, "host": "upload.twitter.com", "port": 80, "tls": None}
    assert "throttle lab" in curl(lab, "https://pbs.twimg.com/").stdout


def test_every_name_resolves_to_the_lab_server(lab: Lab) -> None:
    proc = run_in(lab, "client", ["getent", "ahosts", "no-such-name.invalid"])
    assert proc.returncode == 0, proc.stderr
    addresses = {line.split()[0] for line in proc.stdout.splitlines()}
    assert addresses == {SERVER_V4, SERVER_V6}


def test_upload_8mb_is_received_whole(lab: Lab, tmp_path: Path) -> None:
    body = tmp_path / "upload.bin"
    body.write_bytes(os.urandom(UPLOAD_SIZE))
    proc = curl(lab, "-4", "-T", str(body), "-w", "\n%{http_code} %{speed_upload}", "https://pbs.twimg.com/upload")
    reply, status = proc.stdout.rstrip().rsplit("\n", 1)
    code, speed = status.split()
    assert code == "200"
    assert json.loads(reply)["received"] == UPLOAD_SIZE
    print(f"8 MB upload through the censor namespace: {float(speed) * 8 / 1e6:.0f} Mbit/s")


def test_chunked_upload_is_counted(lab: Lab, tmp_path: Path) -> None:
    body = tmp_path / "chunked.bin"
    body.write_bytes(os.urandom(300_001))
    proc = curl(lab, "-H", "Transfer-Encoding: chunked", "--data-binary", f"@{body}", "https://pbs.twimg.com/x")
    assert json.loads(proc.stdout)["received"] == 300_001


def test_download_is_exact(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "download.bin"
    curl(lab, "-o", str(out), "https://pbs.twimg.com/bytes/1000000")
    assert out.stat().st_size == 1_000_000
    out.unlink()
    curl(lab, "-6", "-o", str(out), "https://video.twimg.com/download?size=65537")
    assert out.stat().st_size == 65537


def test_packets_cross_the_censor(lab: Lab) -> None:
    route = run_in(lab, "client", ["ip", "route", "get", SERVER_V4]).stdout
    assert f"via {ROUTER_CLIENT_V4}" in route
    before = censor_tx_bytes(lab)
    curl(lab, "-4", "-o", "/dev/null", "https://pbs.twimg.com/bytes/200000")
    after = censor_tx_bytes(lab)
    assert after["to-client"] - before["to-client"] >= 200_000  # the download, towards the client
    assert after["to-server"] > before["to-server"]  # the request, towards the server


def test_offloads_are_off_and_mtu_is_1500(lab: Lab) -> None:
    for iface in INTERFACES:
        features = run_in(lab, iface.role, ["ethtool", "-k", iface.name]).stdout
        for feature in ("generic-receive-offload", "generic-segmentation-offload", "tcp-segmentation-offload"):
            assert f"{feature}: off" in features, f"{lab.ns(iface.role)} {iface.name}: {feature} is on"
        mtu = run_in(lab, iface.role, ["cat", f"/sys/class/net/{iface.name}/mtu"]).stdout.strip()
        assert mtu == "1500", f"{lab.ns(iface.role)} {iface.name}: mtu {mtu}"


def test_up_twice_is_harmless(lab: Lab) -> None:
    before = lab.status()
    again = lab.up(["pbs.twimg.com", "example.org"])
    assert again.up
    assert again.labserver == before.labserver
    assert again.dnsmasq == before.dnsmasq
    json.loads(curl(lab, "https://pbs.twimg.com/info").stdout)


def test_up_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("throttle.lab.topology.os.geteuid", lambda: 1000)
    with pytest.raises(ThrottleError, match="needs root"):
        Lab(LAB_NAME).up()


def test_down_after_sigkill_leaves_nothing(lab: Lab) -> None:
    """Runs last: takes the module's lab down itself (the fixture's down() then finds nothing)."""
    pid = lab.status().labserver
    assert pid
    os.kill(pid, signal.SIGKILL)
    lab.down()
    assert not [role for role in ROLES if os.path.lexists(NETNS_DIR / lab.ns(role))]
    assert not list(ETC_NETNS.glob(f"{LAB_NAME}-*"))
    assert not lab.state_dir.exists()
    assert not _live_processes_mentioning(str(lab.state_dir))
    lab.down()  # and again, with nothing there
    assert not lab.status().up


def _live_processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:  # a zombie has an empty command line
            found.append(int(entry))
    return found


def test_prerequisites_are_met() -> None:
    require_lab_prerequisites()  # fails (never skips) with the fix when root or a tool is missing
