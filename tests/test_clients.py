"""The probe clients' shared lines, the browser client, the port table, the pure judge, and the
runner's process loop on real local processes (no lab, no root: the fake lab runs argv as is)."""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from tests import pace
from throttle.errors import ScenarioError
from throttle.lab import lines
from throttle.lab.ca import CAFiles, ensure_ca, leaf_spki, spki_sha256
from throttle.lab.server import browser_page
from throttle.measure.clients import Exit, ProbeClient, Setup
from throttle.measure.commands import CHROMIUM_FLAGS, CHROMIUM_TCP, BrowserClient
from throttle.measure.judge import Figures, judge
from throttle.measure.ports import PORT_BASE, PORTS, ProbePorts
from throttle.measure.report import ProbeRun
from throttle.measure.runner import CLIENTS, Runner, client_class, ss_counts
from throttle.scenario import PROTOCOLS, Probe, parse_scenario


class LocalLab:
    """Runs a client's argv as it is, on this machine (loopback only in these tests)."""

    state_dir = Path("/nonexistent/lab")  # no CA: nothing here loads a browser over HTTP/3

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        return argv


def scenario(probes: str) -> str:
    return f'[scenario]\nname = "s"\n[[rule]]\nname = "r"\nmatch = ["a.example"]\nrate = "130kbit"\n{probes}'


# ---- the lines -----------------------------------------------------------------------------------
def test_what_a_client_prints_is_what_the_runner_reads() -> None:
    assert lines.parse_progress(lines.progress_line(1234).encode()) == 1234
    assert lines.error_message(lines.error_line("it broke").encode() + b"\n") == "it broke"
    result = lines.parse_result(lines.result_line(200, 7, 9, 1.5, 0.25) + "\n")
    assert result == lines.ClientResult("200", 7, 9, 1.5, 0.25)
    curl = "RESULT 200 1 2 3.0 0.5 0.1 0.3".join(lines.CURL_WRITE_OUT.split(lines.CURL_WRITE_OUT.strip()))
    assert lines.parse_result(curl) == lines.ClientResult("200", 1, 2, 3.0, 0.5, 0.1, 0.3)
    event = lines.parse_event(lines.event_line(lines.progress_event(5, 0.51234)).encode())
    assert event == {"event": lines.PROGRESS_EVENT, "bytes": 5, "seconds": 0.512}
    assert lines.parse_event(b"[1]") is None and lines.parse_event(b"not json") is None
    assert lines.parse_port_range(lines.port_range((31000, 31009))) == (31000, 31009)
    assert lines.parse_port_range("40000") == (40000, 40000)
    assert set(lines.EXIT_CODES) == {lines.EXIT_REFUSED, lines.EXIT_HTTP, lines.EXIT_TIMEOUT, lines.EXIT_HANDSHAKE,
                                     lines.EXIT_LOST}


def test_every_probe_kind_has_a_client() -> None:
    assert set(CLIENTS) == set(PROTOCOLS)
    assert [p for p in PROTOCOLS if client_class(p).takes_ports] == ["https", "http", "tls", "quic"]
    assert [p for p in PROTOCOLS if client_class(p).crowds] == ["command", "browser"]
    assert [p for p in PROTOCOLS if client_class(p).udp] == ["quic"]


# ---- ports ---------------------------------------------------------------------------------------
def test_one_port_table() -> None:
    assert PORTS.client(0) == (PORT_BASE, PORT_BASE + 9) and PORTS.client(3) == (PORT_BASE + 30, PORT_BASE + 39)
    assert PORTS.owner(PORT_BASE + 39) == 3 and PORTS.owner(PORT_BASE - 1) is None
    assert PORTS.owner(PORTS.span[1]) == 99 and PORTS.owner(PORTS.span[1] + 1) is None
    assert ProbePorts(1000).client(1) == (1010, 1019) and PORTS.wrap(2) == 41002


def test_ss_output_by_local_port() -> None:
    out = ("ESTAB 0 0 198.18.0.2:31000 198.18.1.2:443\n"
           "\t cubic wscale:7,7 rto:204 bytes_sent:3000 bytes_acked:2001 bytes_received:517 segs_out:5\n"
           "ESTAB 0 0 [2001:2:0:1::2]:31012 [2001:2:0:2::2]:443\n"
           "\t cubic bytes_received:17000\n")
    assert ss_counts(out) == {31000: (2001, 517), 31012: (None, 17000)}


# ---- the browser ---------------------------------------------------------------------------------
def browser(tmp_path: Path, ca_dir: Path | None = None, **probe: object) -> BrowserClient:
    fields: dict[str, object] = {"name": "b", "host": "pbs.twimg.com", "size": 1000, "protocol": "browser", **probe}
    return BrowserClient(Probe(**fields),  # type: ignore[arg-type]
                         Setup(lambda argv: ["ns", *argv], tmp_path, 20.0, ca_dir=ca_dir))


def test_the_browser_loads_the_upload_page_with_the_labs_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("throttle.kernel.tools.find_tool", lambda name: f"/usr/bin/{name}")
    client = browser(tmp_path, address="198.18.1.3")
    with client.prepared() as problem:
        assert problem == "" and Path(client.profile).is_dir()
        argv = client.argv()
    assert not Path(client.profile).exists()  # a fresh profile each run, removed after
    assert argv[:2] == ["ns", "/usr/bin/chromium"] and list(CHROMIUM_FLAGS) == argv[2:2 + len(CHROMIUM_FLAGS)]
    assert argv[2 + len(CHROMIUM_FLAGS):4 + len(CHROMIUM_FLAGS)] == list(CHROMIUM_TCP) == ["--disable-quic",
                                                                                      "--ignore-certificate-errors"]
    assert f"--user-data-dir={client.profile}" in argv and "--host-resolver-rules=MAP * 198.18.1.3" in argv
    assert argv[-2:] == ["--dump-dom", "https://pbs.twimg.com/upload-page/1000"]
    assert client.session and client.crowds and not client.takes_ports
    assert browser(tmp_path, direction="download").page == "https://pbs.twimg.com/download-page/1000"
    v6 = browser(tmp_path, address="2001:2:0:2::3")
    with v6.prepared():
        assert "--host-resolver-rules=MAP * [2001:2:0:2::3]" in v6.argv()


# A key and its SPKI pin as openssl computes it (`openssl pkey -pubout -outform der | openssl dgst
# -sha256 -binary | base64`), so the pin is checked against a computation that is not ours.
KNOWN_KEY = b"""-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgxTWtdugNFF5F9A6v
dbq9Ptxmk+wlStJD7yWtxSuZHhehRANCAATwHaOREUOUcNiX5gTZ600LJTfql4C2
evirisZ2L6qI4u2qh0jeHSkQc/JtPupMHwORsjobOF0NkhjRcKvt2dpq
-----END PRIVATE KEY-----
"""
KNOWN_SPKI = "N4JFcmmuPZeafWfptimlMdh0UHpdmXYwMfVXzyl+k6g="


def test_the_leaf_spki_is_openssls_pin_of_the_key_every_lab_certificate_carries(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path)
    files.leaf_key.write_bytes(KNOWN_KEY)
    assert leaf_spki(CAFiles.in_dir(tmp_path)) == KNOWN_SPKI
    # The key Chromium sees: the HTTP/3 server's certificate for the name it is asked for, and the
    # HTTPS server's, both signed by the lab CA with the lab's one leaf key.
    from cryptography import x509

    from throttle.lab.h3 import Certificates as H3Certificates
    from throttle.lab.server import Certificates

    h3_cert = H3Certificates(tmp_path, ["server.lab"]).for_name("rr1---sn-xxx.googlevideo.com")
    assert spki_sha256(h3_cert.public_key()) == KNOWN_SPKI
    context = Certificates(files, tmp_path / "certs", ["server.lab"]).context_for("pbs.twimg.com")
    assert context is not None  # loaded with the leaf key: a certificate of another key would not load
    ca = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert spki_sha256(ca.public_key()) != KNOWN_SPKI  # the pin is the leaf's, not the CA's


def test_the_browser_over_http3_forces_quic_and_pins_the_labs_leaf_key(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("throttle.kernel.tools.find_tool", lambda name: f"/usr/bin/{name}")
    ensure_ca(tmp_path / "lab").leaf_key.write_bytes(KNOWN_KEY)
    client = browser(tmp_path, tmp_path / "lab", host="rr1---sn-xxx.googlevideo.com", direction="download",
                     http3=True)
    with client.prepared() as problem:
        assert problem == ""
        argv = client.argv()
    assert list(CHROMIUM_FLAGS) == argv[2:2 + len(CHROMIUM_FLAGS)]
    assert "--origin-to-force-quic-on=rr1---sn-xxx.googlevideo.com:443" in argv
    assert f"--ignore-certificate-errors-spki-list={KNOWN_SPKI}" in argv
    assert not set(CHROMIUM_TCP) & set(argv)  # QUIC on; no blanket certificate override
    assert argv[-2:] == ["--dump-dom", "https://rr1---sn-xxx.googlevideo.com/download-page/1000"]
    # No CA to read the key from: the lab's failure, said before Chromium starts.
    for ca_dir, says in [(None, "CA directory is not known"), (tmp_path / "none", "leaf key could not be read")]:
        with browser(tmp_path, ca_dir, http3=True).prepared() as problem:
            assert says in problem


@pytest.mark.parametrize(
    "out,code,killed,cause,detail",
    [
        ('<pre id="result">{"received": 1000, "seconds": 0.25}\n</pre>', 0, False, "completed", ""),
        ('<pre id="result">{"received": 400, "seconds": 0.25}</pre>', 0, False, "lab", "received 400 of 1000"),
        ('<pre id="result">upload failed: NetworkError</pre>', 0, False, "lab",
         "the page shows no server reply: upload failed: NetworkError"),
        ("", 1, False, "lab", "the page shows no server reply: no page (chromium exited with 1"),
        ("", -9, True, "timeout", "the browser did not finish before its timeout (killed)"),
    ],
)
def test_the_browser_is_judged_by_the_servers_reply(tmp_path: Path, out: str, code: int, killed: bool, cause: str,
                                                     detail: str) -> None:
    outcome = browser(tmp_path).outcome(Exit(out, "[0101/000000:ERROR] crashed\n", code, 2.0, killed))
    assert outcome.cause == cause and detail in outcome.detail
    if cause == "completed":
        assert (outcome.bytes, outcome.seconds) == (1000, 0.25)


@pytest.mark.parametrize(
    "out,cause,detail",
    [
        ('<pre id="result">{"received":1000,"seconds":0.5}</pre>', "completed", ""),  # JSON.stringify's form
        ('<pre id="result">{"received":400,"seconds":0.5}</pre>', "lab", "the page received 400 of 1000 bytes"),
        ('<pre id="result">download failed: NetworkError</pre>', "lab",
         "the page shows no result: download failed: NetworkError"),
        ("", "lab", "the page shows no result: no page"),
    ],
)
def test_a_browser_download_is_judged_by_what_the_page_received(tmp_path: Path, out: str, cause: str,
                                                                  detail: str) -> None:
    outcome = browser(tmp_path, direction="download", http3=True).outcome(Exit(out, "", 0, 2.0))
    assert outcome.cause == cause and detail in outcome.detail
    if cause == "completed":
        assert (outcome.bytes, outcome.seconds) == (1000, 0.5)


def test_the_browser_pages_move_their_size_synchronously() -> None:
    for direction, request in [("upload", "xhr.open('POST', '/upload', false)"),
                               ("download", "xhr.open('GET', '/bytes/' + size, false)")]:
        status, body = browser_page(f"/{direction}-page/64KB") or (0, b"")
        assert status == 200 and "const size = 65536;" in body.decode() and request in body.decode()
    assert "x-user-defined" in (browser_page("/download-page/1") or (0, b""))[1].decode()  # a byte a character
    assert (browser_page("/download-page/junk") or (0, b""))[0] == 400
    assert (browser_page(f"/upload-page/{2 << 30}") or (0, b""))[0] == 400
    assert browser_page("/bytes/10") is None and browser_page("/") is None


def test_browser_probes_load_by_name_and_http3_only_for_the_browser() -> None:
    ok = parse_scenario(scenario('[[probe]]\nhost = "a.example"\nprotocol = "browser"\nexpect = "normal"\n'
                                 '[[probe]]\nhost = "a.example"\nprotocol = "browser"\nhttp3 = true\n'
                                 'direction = "download"\nexpect = "normal"'))
    assert [(p.protocol, p.direction, p.http3, p.transport) for p in ok.probes] == [
        ("browser", "upload", False, "tcp"), ("browser", "download", True, "udp")]
    for bad, says in [("sni = false", "SNI"), ('command = "x"', "command")]:
        with pytest.raises(ScenarioError, match=says):
            parse_scenario(scenario(f'[[probe]]\nhost = "a.example"\nprotocol = "browser"\n{bad}'))
    for protocol in ("https", "quic"):
        with pytest.raises(ScenarioError, match="http3.*needs protocol = \"browser\""):
            parse_scenario(scenario(f'[[probe]]\nhost = "a.example"\nprotocol = "{protocol}"\nhttp3 = true'))


# ---- the judge -----------------------------------------------------------------------------------
def test_the_judge_changes_nothing_it_is_given() -> None:
    probe = Probe(name="p", host="h", expect="blocked", expect_handshake="slow", freeze_bytes=(10, 20))
    run = ProbeRun(probe, bytes=15, seconds=9.0, cause="timeout", handshake=None)
    before = dataclasses.asdict(run)
    verdict = judge(run, probe, Figures(16250.0, 1e8, 0.01))
    assert dataclasses.asdict(run) == before
    assert (verdict.verdict, verdict.handshake, verdict.failures) == ("blocked", "slow", ())
    plain = judge(run, dataclasses.replace(probe, expect_handshake=""), Figures(16250.0))
    assert plain.handshake == ""  # judged only when expected


# ---- the runner's process loop -------------------------------------------------------------------
class Script(ProbeClient):
    """A Python one-liner as a client: progress lines `N` on stderr."""

    progress_stream = "stderr"

    def __init__(self, code: str, timeout: float, session: bool) -> None:
        super().__init__(Probe(name="x", host="h", control=True), Setup(lambda argv: argv, Path("."), timeout))
        self.code = code
        self.session = session  # type: ignore[misc]

    def argv(self) -> list[str]:
        return [sys.executable, "-c", self.code]

    def read(self, line: bytes) -> int | None:
        return int(line) if line.strip().isdigit() else None


def runner(tmp_path: Path) -> Runner:
    return Runner(parse_scenario(scenario('[[probe]]\nhost = "h"\ncontrol = true\nexpect = "normal"')), LocalLab(),
                  tmp_path)


def test_a_client_is_read_while_it_runs(tmp_path: Path) -> None:
    r = runner(tmp_path)
    run = r.runs[0]
    run.started = time.monotonic()
    client = Script("import sys, time\nfor n in (10, 20, 30):\n    print(n, file=sys.stderr, flush=True)\n"
                    "    time.sleep(0.05)\nprint('RESULT')", 10, session=False)
    exit = r._execute(run, client)
    assert (exit.out, exit.err, exit.code, exit.killed) == ("RESULT\n", "", 0, False)
    assert run.bytes == 30 and [b for _, b in run.samples] == [10, 20, 30]


def test_a_client_in_a_session_is_killed_with_its_children_at_its_deadline(tmp_path: Path) -> None:
    r = runner(tmp_path)
    run = r.runs[0]
    run.started = time.monotonic()
    # The child keeps the pipes open: only killing the whole group ends the read.
    code = "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n" \
           "print('started', flush=True)\ntime.sleep(60)"
    exit = r._execute(run, Script(code, pace.seconds(0.5), session=True))
    # killed at its deadline, not after its 60 s (the bound is loose: a busy machine is slow to start it)
    assert exit.killed and exit.code < 0 and exit.out == "started\n" and exit.elapsed < pace.seconds(30)


def test_a_command_probe_runs_end_to_end(tmp_path: Path) -> None:
    text = scenario('[[probe]]\nname = "c"\nhost = "a.example"\nsize = 1000\nprotocol = "command"\ncontrol = true\n'
                    "expect = \"normal\"\ncommand = \"cat {file} >/dev/null; echo '{{\\\"received\\\": 1000, "
                    "\\\"seconds\\\": 0.5}}'\"\n"
                    '[[probe]]\nname = "slow"\nhost = "a.example"\nprotocol = "command"\ntimeout = "0.5s"\n'
                    'command = "sleep 60"')
    r = Runner(parse_scenario(text), LocalLab(), tmp_path)  # type: ignore[arg-type]
    ok, slow = r.runs
    r.run_probe(ok)
    assert (ok.cause, ok.bytes, ok.seconds, ok.completed) == ("completed", 1000, 0.5, True)
    r.run_probe(slow)
    assert slow.cause == "timeout" and "killed" in slow.error and slow.seconds < pace.seconds(30)  # not its 60 s sleep
