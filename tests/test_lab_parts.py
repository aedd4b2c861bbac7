"""The lab's parts that need no root: names and commands of the facade, the layout's names where
other code imports them, the client's /etc files, and the /proc scans of absent namespaces."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from throttle.lab import client_etc, layout, procs, topology
from throttle.lab.topology import Lab


def test_exec_argv_runs_ip_by_its_full_path() -> None:
    argv = Lab("t").exec_argv("client", ["curl", "-sS", "https://pbs.twimg.com/"])
    assert os.path.isabs(argv[0]) and Path(argv[0]).name == "ip"
    assert argv[1:] == ["netns", "exec", "t-client", "curl", "-sS", "https://pbs.twimg.com/"]


def test_names_and_their_checks() -> None:
    lab = Lab("t")
    assert [lab.ns(role) for role in layout.ROLES] == ["t-client", "t-censor", "t-router", "t-server"]
    assert lab.state_dir == Path("/run/throttle/t") and lab.ca_cert == Path("/run/throttle/t/ca.pem")
    with pytest.raises(ValueError):
        lab.ns("isp")
    with pytest.raises(Exception, match="up to 24"):
        Lab("no spaces")


def test_the_layout_is_importable_from_topology_as_before() -> None:
    for name in ("SERVER_V4", "SERVER_V6", "CLIENT_V4", "CENSOR_CLIENT_IF", "CENSOR_SERVER_IF", "BRIDGE",
                 "ROUTER_CLIENT_V4", "INTERFACES", "ROLES", "ETC_NETNS"):
        assert getattr(topology, name) is getattr(layout, name)
    assert set(topology.__all__) <= set(dir(topology))


def test_the_clients_etc_names_the_lab_dns_and_trusts_the_lab_ca(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_etc, "ETC_NETNS", tmp_path / "netns")
    system = tmp_path / "system.crt"
    system.write_text("SYSTEM CERTS")  # no final newline: the lab's bundle adds one
    monkeypatch.setattr(client_etc, "SYSTEM_CA_BUNDLE", system)
    ca = tmp_path / "ca.pem"
    ca.write_text("LAB CA\n")
    client_etc.write_client_etc("t", ca)
    etc = tmp_path / "netns" / "t-client"
    assert client_etc.client_etc("t") == etc
    assert f"nameserver {layout.DNS_V4}" in (etc / "resolv.conf").read_text()
    assert (etc / "hosts").read_text() == client_etc.HOSTS_FILE
    assert (etc / "ssl/certs/ca-certificates.crt").read_text() == "SYSTEM CERTS\n# throttle lab CA (t)\nLAB CA\n"
    assert (etc / "ssl/certs/throttle-lab-t.pem").read_text() == "LAB CA\n"
    client_etc.remove_etc("t")
    assert not etc.exists()


def test_absent_namespaces_hold_no_processes() -> None:
    assert procs.pids_in({"client": "no-such-lab-client"}) == {"client": []}
    assert procs.running_in(None, "no-such-lab-server") is None
    assert procs.running_in(os.getpid(), "no-such-lab-server") is None
    assert procs.cmdline(os.getpid()) and procs.cmdline(2**22 + 12345) == []
