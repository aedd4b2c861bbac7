"""The namespace lab: a client, an ISP's in-path middlebox (the censor), a router and a server.

    NAME-client              NAME-censor (a bridge)          NAME-router                  NAME-server
    to-censor 198.18.0.2 --- to-client [bridge inpath] to-server --- to-censor 198.18.0.1
              2001:2:0:1::2                                                2001:2:0:1::1
                                                                 to-server 198.18.1.1 --- to-router 198.18.1.2 (.3, .4)
                                                                           2001:2:0:2::1          2001:2:0:2::2 (::3, ::4)

The censor is in-path and does not route, as the TSPU devices of docs/incidents.md §4.30 are: its
namespace bridges its two ports and has no address, and the bridge hands every IPv4 and IPv6
packet it forwards to netfilter (br_netfilter's `bridge-nf-call-iptables`), where the censor's
NFQUEUE rules see it. It spends no TTL, so a packet from the client whose TTL runs out at the
first hop reaches the censor and then dies at the router, which answers with ICMP time exceeded
(§1.15-16: TTL-limited packets reach the device; that is how fake-packet evasions and locating the
device work). The router forwards between the client's and the server's subnets; the client and
the server route everything through it. Every lab interface has MTU 1500 and GRO/GSO/TSO off, so
the censor sees wire-sized segments, as on a real link. The server namespace runs
`throttle.lab.server` (HTTPS for any name, signed by the lab CA; HTTP), `throttle.lab.h3` (HTTP/3
on UDP 443, the same names and routes) and dnsmasq (every name resolves to 198.18.1.2 and
2001:2:0:2::2). The client namespace resolves names with that dnsmasq and trusts the lab CA through
`/etc/netns/NAME-client/`, which `ip netns exec` mounts over `/etc`, so
`ip netns exec NAME-client curl https://pbs.twimg.com/` just works.

This module owns the kernel state (through pyroute2; `ethtool -K`, `modprobe br_netfilter` when
the kernel has it as a module, and process starts are the only commands it runs, as argument
lists) and the files under `/run/throttle/NAME/` and `/etc/netns/NAME-*`. `up()` is idempotent
and repairs what is missing; `down()` removes all of it and succeeds whatever is left, including
nothing.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Iterable, Optional

from throttle.errors import ThrottleError
from throttle.files import atomic_write
from throttle.kernel import netns
from throttle.kernel.netns import NETNS_DIR
from throttle.kernel.tools import find_tool, require_root, require_tool

ROLES = ("client", "censor", "router", "server")
ETC_NETNS = Path("/etc/netns")
STATE_ROOT = Path("/run/throttle")
MTU = 1500
IFA_F_NODAD = 0x02  # an IPv6 address usable at once, without duplicate address detection

# Interface names as seen inside each namespace.
CLIENT_IF = "to-censor"
CENSOR_CLIENT_IF = "to-client"  # the censor's two bridge ports
CENSOR_SERVER_IF = "to-server"  # (towards the server, through the router)
BRIDGE = "inpath"
ROUTER_CLIENT_IF = "to-censor"
ROUTER_SERVER_IF = "to-server"
SERVER_IF = "to-router"

CLIENT_V4 = "198.18.0.2"
CLIENT_V6 = "2001:2:0:1::2"
ROUTER_CLIENT_V4 = "198.18.0.1"  # the client's gateway
ROUTER_CLIENT_V6 = "2001:2:0:1::1"
ROUTER_SERVER_V4 = "198.18.1.1"  # the server's gateway
ROUTER_SERVER_V6 = "2001:2:0:2::1"
SERVER_V4 = "198.18.1.2"
SERVER_V6 = "2001:2:0:2::2"
SERVER_EXTRA_V4 = ("198.18.1.3", "198.18.1.4")  # other servers, for names sent elsewhere
SERVER_EXTRA_V6 = ("2001:2:0:2::3", "2001:2:0:2::4")
DNS_V4 = SERVER_V4
DNS_V6 = SERVER_V6


@dataclass(frozen=True, slots=True)
class Iface:
    role: str
    name: str
    addresses: tuple[str, ...]  # "address/prefixlen"


INTERFACES = (
    Iface("client", CLIENT_IF, (f"{CLIENT_V4}/24", f"{CLIENT_V6}/64")),
    Iface("censor", CENSOR_CLIENT_IF, ()),  # bridge ports: no addresses
    Iface("censor", CENSOR_SERVER_IF, ()),
    Iface("router", ROUTER_CLIENT_IF, (f"{ROUTER_CLIENT_V4}/24", f"{ROUTER_CLIENT_V6}/64")),
    Iface("router", ROUTER_SERVER_IF, (f"{ROUTER_SERVER_V4}/24", f"{ROUTER_SERVER_V6}/64")),
    Iface(
        "server", SERVER_IF,
        tuple(f"{a}/24" for a in (SERVER_V4, *SERVER_EXTRA_V4))
        + tuple(f"{a}/64" for a in (SERVER_V6, *SERVER_EXTRA_V6)),
    ),
)
# Veth pairs, (role, interface) at each end; the first end's namespace creates the pair.
VETHS = (
    (("censor", CENSOR_CLIENT_IF), ("client", CLIENT_IF)),
    (("censor", CENSOR_SERVER_IF), ("router", ROUTER_CLIENT_IF)),
    (("router", ROUTER_SERVER_IF), ("server", SERVER_IF)),
)
BRIDGE_PORTS = (CENSOR_CLIENT_IF, CENSOR_SERVER_IF)
GATEWAYS = {
    "client": (ROUTER_CLIENT_V4, ROUTER_CLIENT_V6),
    "server": (ROUTER_SERVER_V4, ROUTER_SERVER_V6),
}
SYSCTLS_ALL = (
    # No DAD (addresses usable at once), no router advertisements or solicitations on the wire.
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv6.conf.all.accept_ra", "0"),
    ("net.ipv6.conf.default.accept_ra", "0"),
    ("net.ipv6.conf.default.router_solicitations", "0"),
)
# The lab's TCP is pinned, not inherited from the host: a namespace starts with the host's default
# congestion control (bbr on some machines), and BBR's model of the path misreads a policer (it
# paces a policed flow at the bandwidth it sampled during drops, often far below the rate), so the
# same scenario would measure differently on two machines. CUBIC is Linux's default and what the
# clients of the 2021 measurements ran; set on the client's and server's default routes, when this
# kernel has it.
CONGESTION_CONTROL = "cubic"
SYSCTLS_ROLE = {
    "router": (("net.ipv4.ip_forward", "1"), ("net.ipv6.conf.all.forwarding", "1")),
    # The censor has no IP of its own: no IPv6 link-local addresses, no forwarding; the bridge's
    # packets go through iptables and ip6tables (written once the bridge exists, see _bridge).
    "censor": (("net.ipv4.ip_forward", "0"), ("net.ipv6.conf.all.disable_ipv6", "1"),
               ("net.ipv6.conf.default.disable_ipv6", "1")),
}
SYSCTLS_BRIDGE = (
    ("net.bridge.bridge-nf-call-iptables", "1"),
    ("net.bridge.bridge-nf-call-ip6tables", "1"),
    ("net.bridge.bridge-nf-call-arptables", "0"),
)
OFFLOADS = ("gro", "gso", "tso")
HOSTS_FILE = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
STATE_FILES = (  # what the lab writes in its state directory, besides certs/
    "ca.pem", "ca-key.pem", "leaf-key.pem", "lab.json", "labserver.pid", "labserver.log",
    "h3server.pid", "h3server.log", "dnsmasq.pid", "dnsmasq.log", "*.tmp", ".*.tmp",
)
START_TIMEOUT = 15.0
STOP_TIMEOUT = 3.0

# Popen objects of servers this process started, so their exit can be reaped (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


def _require_root() -> None:
    require_root("the lab needs root")


def _require_pyroute2() -> None:
    import importlib.util

    for module in ("pyroute2", "aioquic"):  # aioquic: the lab's HTTP/3 server
        if importlib.util.find_spec(module) is None:
            raise ThrottleError(f"the Python package {module} is missing: .venv/bin/pip install {module} "
                                "(both come with the [live] extra; scripts/setup installs them)")


def _ns_id(path: Path | str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> None:
    """Collect the exit of a lab server this process started. Other processes are left alone:
    reaping a child behind its own Popen's back would make it report exit status 0."""
    child = _children.get(pid)
    if child is not None and child.poll() is not None:
        del _children[pid]


def _route_metrics() -> dict[str, Any]:
    """The lab's default routes carry the congestion control (a namespace may not set a default
    that the host restricts, but a route may name it); nothing when this kernel lacks it."""
    try:
        available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return {}
    return {"metrics": {"RTAX_CC_ALGO": CONGESTION_CONTROL}} if CONGESTION_CONTROL in available else {}


_BR_NETFILTER_MISSING = (
    "this kernel does not hand bridged packets to netfilter (no br_netfilter), so the lab's in-path "
    "censor would see nothing: load it with `modprobe br_netfilter` (CONFIG_BRIDGE_NETFILTER)")


def _write_sysctls(ns: str, values: Iterable[tuple[str, str]], missing: str | None = None) -> None:
    """Write sysctls inside a namespace (files under /proc/sys/net belong to the namespace of the
    thread that opens them: `netns.run_in` writes them from a thread inside it). `missing`: the
    message when a key does not exist (its kernel feature is absent)."""
    values = list(values)

    def work() -> None:
        for key, value in values:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    try:
        netns.run_in(ns, work)
    except FileNotFoundError as exc:
        if missing is not None:
            raise ThrottleError(missing) from None
        raise ThrottleError(f"cannot set sysctls in namespace {ns}: {exc}") from None
    except OSError as exc:
        raise ThrottleError(f"cannot set sysctls in namespace {ns}: {exc}") from None


def _load_br_netfilter() -> None:
    """br_netfilter, when this kernel has it as a module that is not loaded (Debian's and Ubuntu's
    kernels do; it is built in on others). Loading it makes every namespace's bridges, the host's
    included, hand their packets to iptables by default; this process sets the host's three
    switches back to 0 at once, as they behaved before, so that only the lab's bridge is affected."""
    if Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        return  # built in or loaded already (by us or by whoever runs bridges here)
    modprobe = find_tool("modprobe")
    if modprobe is None:
        raise ThrottleError(_BR_NETFILTER_MISSING)
    proc = subprocess.run([modprobe, "br_netfilter"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0 or not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
        raise ThrottleError(f"{_BR_NETFILTER_MISSING} ({(proc.stderr or proc.stdout).strip() or 'modprobe failed'})")
    for key in ("iptables", "ip6tables", "arptables"):
        try:
            Path(f"/proc/sys/net/bridge/bridge-nf-call-{key}").write_text("0")
        except OSError:
            pass


class Lab:
    """Three namespaces and what runs in them; see the module docstring for the layout."""

    def __init__(self, name: str = "throttle", state_dir: Optional[Path] = None) -> None:
        if not name or len(name) > 24 or not all(c.isalnum() or c in "-_" for c in name):
            raise ThrottleError(f"lab name {name!r}: use up to 24 letters, digits, - or _")
        self.name = name
        self.state_dir = Path(state_dir) if state_dir is not None else STATE_ROOT / name

    # -- names and paths ------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """The namespace name of a role: `ns("client")` is "NAME-client"."""
        if role not in ROLES:
            raise ValueError(f"{role!r} is not one of {', '.join(ROLES)}")
        return f"{self.name}-{role}"

    def exec_argv(self, role: str, argv: list[str]) -> list[str]:
        """`argv` run inside a role's namespace (with its /etc/netns files), as an argument list."""
        return ["ip", "netns", "exec", self.ns(role), *argv]

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "ca.pem"

    @property
    def _labserver_pid(self) -> Path:
        return self.state_dir / "labserver.pid"

    @property
    def _h3server_pid(self) -> Path:
        return self.state_dir / "h3server.pid"

    @property
    def _dnsmasq_pid(self) -> Path:
        return self.state_dir / "dnsmasq.pid"

    def __enter__(self) -> Lab:
        try:
            self.up()
        except BaseException:
            try:
                self.down()
            except ThrottleError:
                pass  # the error from up() is the one worth reporting
            raise
        return self

    def __exit__(self, t: Optional[type[BaseException]], e: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.down()

    # -- up -------------------------------------------------------------------------------------

    def up(self, hostnames: Iterable[str] = ()) -> LabStatus:
        """Create or repair the lab; returns `status()`. Hostnames get certificates at start."""
        _require_root()
        _require_pyroute2()
        from throttle.lab.ca import ensure_ca  # cryptography: only where certificates are made
        ip = require_tool("ip", "iproute2")
        ethtool = require_tool("ethtool", "ethtool")
        dnsmasq = require_tool("dnsmasq", "dnsmasq-base")
        hostnames = [h for h in hostnames if h]

        STATE_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        _load_br_netfilter()
        for role in ROLES:
            self._ensure_namespace(self.ns(role))
        for role in ROLES:
            _write_sysctls(self.ns(role), SYSCTLS_ALL + SYSCTLS_ROLE.get(role, ()))
        self._ensure_links()
        self._wait_links_up()
        for iface in INTERFACES:
            self._run([ip, "netns", "exec", self.ns(iface.role), ethtool, "-K", iface.name,
                       *(w for o in OFFLOADS for w in (o, "off"))], f"ethtool -K {iface.name}")
        ca_before = self._read_ca()
        ensure_ca(self.state_dir, self.name)
        self._write_client_etc()
        self._start_dnsmasq(ip, dnsmasq)
        restart = self._read_ca() != ca_before
        self._start_labserver(ip, hostnames, restart=restart)
        self._start_h3server(ip, hostnames, restart=restart)
        atomic_write(self.state_dir / "lab.json", json.dumps({"name": self.name, "hostnames": hostnames}).encode(), 0o600)
        return self.status()

    def _read_ca(self) -> Optional[bytes]:
        try:
            return self.ca_cert.read_bytes()
        except OSError:
            return None

    def _ensure_namespace(self, ns: str) -> None:
        from pyroute2 import netns as pyroute2_netns

        path = NETNS_DIR / ns
        if path.exists() and not os.path.ismount(path):
            path.unlink()  # a leftover mount point with no namespace behind it
        if not path.exists():
            try:
                pyroute2_netns.create(ns)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise ThrottleError(f"cannot create namespace {ns}: {exc}") from None

    def _ipr(self, role: str) -> Any:
        from pyroute2 import IPRoute

        return IPRoute(netns=self.ns(role), flags=0)  # flags=0: never create a namespace by accident

    def _ensure_links(self) -> None:
        from pyroute2 import NetlinkError

        try:
            for (role, ifname), (peer_role, peer_if) in VETHS:
                with self._ipr(role) as ipr, self._ipr(peer_role) as other:
                    mine, theirs = ipr.link_lookup(ifname=ifname), other.link_lookup(ifname=peer_if)
                    if mine and theirs:
                        continue
                    # Half of a pair whose peer is gone, or a pair of an older layout of the lab.
                    for stale in mine:
                        ipr.link("del", index=stale)
                    for stale in other.link_lookup(ifname=peer_if):
                        other.link("del", index=stale)
                    fd = os.open(NETNS_DIR / self.ns(peer_role), os.O_RDONLY)
                    try:
                        ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer_if, "net_ns_fd": fd})
                    finally:
                        os.close(fd)
            self._bridge()
            for role in ROLES:
                with self._ipr(role) as ipr:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                    for iface in (i for i in INTERFACES if i.role == role):
                        index = ipr.link_lookup(ifname=iface.name)[0]
                        ipr.link("set", index=index, mtu=MTU)
                        if not iface.addresses:
                            ipr.flush_addr(index=index)  # a bridge port (an older lab gave them some)
                        for spec in iface.addresses:
                            address, prefix = spec.split("/")
                            v6 = ":" in address
                            ipr.addr("replace", index=index, address=address, prefixlen=int(prefix),
                                     **({"flags": IFA_F_NODAD} if v6 else {}))
                        ipr.link("set", index=index, state="up")
                    if role in GATEWAYS:
                        gw4, gw6 = GATEWAYS[role]
                        ipr.route("replace", dst="0.0.0.0/0", gateway=gw4, **_route_metrics())
                        ipr.route("replace", dst="::/0", gateway=gw6, family=socket.AF_INET6, **_route_metrics())
        except NetlinkError as exc:
            raise ThrottleError(f"cannot configure the lab's links: {exc}") from None

    def _bridge(self) -> None:
        """The censor's bridge: both ports in it, no STP (ports forward at once), no address, and
        its IP packets handed to iptables and ip6tables."""
        with self._ipr("censor") as ipr:
            if not ipr.link_lookup(ifname=BRIDGE):
                ipr.link("add", ifname=BRIDGE, kind="bridge", br_stp_state=0, br_forward_delay=0,
                         br_mcast_snooping=0)
            bridge = ipr.link_lookup(ifname=BRIDGE)[0]
            for port in BRIDGE_PORTS:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge)
            ipr.link("set", index=bridge, mtu=MTU, state="up")
        _write_sysctls(self.ns("censor"), SYSCTLS_BRIDGE, missing=_BR_NETFILTER_MISSING)

    def _wait_links_up(self) -> None:
        """Wait for the kernel to finish bringing the veths up. Until linkwatch has run (up to a
        second after `state up`) a device has no qdisc and drops what is sent: the first SYN of
        a lab used at once would be lost and the first connection would take a second longer."""
        deadline = time.monotonic() + START_TIMEOUT
        sockets = {role: self._ipr(role) for role in ROLES}
        try:
            pending = list(INTERFACES)
            while pending:
                pending = [
                    i for i in pending
                    if [link.get("operstate") for link in sockets[i.role].get_links(ifname=i.name)] != ["UP"]
                ]
                if pending and time.monotonic() > deadline:
                    names = ", ".join(f"{self.ns(i.role)}/{i.name}" for i in pending)
                    raise ThrottleError(f"lab interfaces did not come up: {names}")
                if pending:
                    time.sleep(0.02)
        finally:
            for ipr in sockets.values():
                ipr.close()

    def _run(self, argv: list[str], what: str) -> None:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).strip()
            raise ThrottleError(f"{what} failed (exit {proc.returncode}): {err}")

    def _write_client_etc(self) -> None:
        """resolv.conf, hosts and a CA bundle with the lab CA, for `ip netns exec NAME-client`."""
        etc = ETC_NETNS / self.ns("client")
        etc.mkdir(mode=0o755, parents=True, exist_ok=True)
        atomic_write(etc / "resolv.conf", f"# throttle lab {self.name}\nnameserver {DNS_V4}\n".encode())
        # Only localhost: every other name goes to the lab DNS, where the censor can see it.
        atomic_write(etc / "hosts", HOSTS_FILE.encode())
        # `ip netns exec` mounts etc/ssl over all of /etc/ssl, so the copy holds the whole tree
        # (openssl.cnf, the hashed certs directory); only the bundle file differs.
        ssl_dir = etc / "ssl"
        if not (ssl_dir / "certs").is_dir():
            shutil.rmtree(ssl_dir, ignore_errors=True)
            if Path("/etc/ssl").is_dir():
                shutil.copytree("/etc/ssl", ssl_dir, symlinks=True, ignore=shutil.ignore_patterns("private"))
            (ssl_dir / "certs").mkdir(parents=True, exist_ok=True)
        try:
            system = SYSTEM_CA_BUNDLE.read_bytes()
        except OSError:
            system = b""
        if system and not system.endswith(b"\n"):
            system += b"\n"
        bundle = ssl_dir / "certs" / "ca-certificates.crt"
        if bundle.is_symlink():
            bundle.unlink()
        lab_ca = self.ca_cert.read_bytes()
        atomic_write(bundle, system + f"# throttle lab CA ({self.name})\n".encode() + lab_ca)
        atomic_write(ssl_dir / "certs" / f"throttle-lab-{self.name}.pem", lab_ca)

    def _start_dnsmasq(self, ip: str, dnsmasq: str) -> None:
        if self._running(self._dnsmasq_pid, "server") is not None:
            return
        self._dnsmasq_pid.unlink(missing_ok=True)
        self._stop_strays(lambda argv: bool(argv) and Path(argv[0]).name == "dnsmasq")
        listen = [SERVER_V4, *SERVER_EXTRA_V4, SERVER_V6, *SERVER_EXTRA_V6]
        argv = [
            ip, "netns", "exec", self.ns("server"), dnsmasq,
            "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--bind-interfaces",
            *(f"--listen-address={a}" for a in listen),
            f"--address=/#/{SERVER_V4}", f"--address=/#/{SERVER_V6}",
            f"--pid-file={self._dnsmasq_pid}",
            f"--log-facility={self.state_dir / 'dnsmasq.log'}", "--log-queries",
        ]
        # dnsmasq reports bind errors and only then forks: exit 0 means it is answering.
        self._run(argv, "dnsmasq")
        deadline = time.monotonic() + START_TIMEOUT
        while self._running(self._dnsmasq_pid, "server") is None:
            if time.monotonic() > deadline:
                raise ThrottleError(f"dnsmasq did not start; see {self.state_dir / 'dnsmasq.log'}")
            time.sleep(0.02)

    def _start_labserver(self, ip: str, hostnames: list[str], restart: bool = False) -> None:
        self._start_server(ip, "throttle.lab.server", self._labserver_pid, "labserver.log", "the lab server",
                           hostnames, restart)

    def _start_h3server(self, ip: str, hostnames: list[str], restart: bool = False) -> None:
        """The HTTP/3 server: a process of its own, so its pure-Python QUIC work never takes the
        GIL from the TCP servers' threads (a QUIC probe beside a curl control would slow both)."""
        self._start_server(ip, "throttle.lab.h3", self._h3server_pid, "h3server.log", "the HTTP/3 server",
                           hostnames, restart)

    def _start_server(self, ip: str, module: str, pid_file: Path, log_name: str, what: str,
                      hostnames: list[str], restart: bool) -> None:
        if not restart and self._running(pid_file, "server") is not None:
            return
        pid_file.unlink(missing_ok=True)
        # One whose pid file is gone, or that signs with a CA that no longer exists, holds the ports.
        self._stop_strays(lambda argv: module in argv)
        log_path = self.state_dir / log_name
        argv = [
            ip, "netns", "exec", self.ns("server"), sys.executable, "-m", module,
            "--ca-dir", str(self.state_dir), "--state-dir", str(self.state_dir),
            "--pid-file", str(pid_file),
            *(w for a in (SERVER_V4, *SERVER_EXTRA_V4, SERVER_V6, *SERVER_EXTRA_V6) for w in ("--address", a)),
            *(w for h in hostnames for w in ("--name", h)),
        ]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        with open(log_path, "ab") as log:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd="/", start_new_session=True,  # not killed with the terminal that started it
            )
        _children[child.pid] = child
        deadline = time.monotonic() + START_TIMEOUT
        while _read_pid(pid_file) != child.pid:  # written once its sockets are bound
            if child.poll() is not None or time.monotonic() > deadline:
                if child.returncode is None:
                    child.kill()
                    child.wait()
                _children.pop(child.pid, None)
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                raise ThrottleError(f"{what} did not start: " + (" / ".join(tail) or f"see {log_path}"))
            time.sleep(0.02)

    def _stop_strays(self, match: Callable[[list[str]], bool]) -> None:
        """Stop servers in the server namespace that up() would start again but cannot track."""
        strays = {p for p in self._pids_in_namespaces()["server"] if match(_cmdline(p))}
        strays.discard(os.getpid())
        self._stop(strays)

    def _running(self, pid_file: Path, role: str) -> Optional[int]:
        """The pid in a pid file if that process is alive inside the role's namespace."""
        pid = _read_pid(pid_file)
        if pid is None or not _alive(pid):
            return None
        ns = _ns_id(NETNS_DIR / self.ns(role))
        if ns is None or _ns_id(f"/proc/{pid}/ns/net") != ns:
            return None
        return pid

    # -- down -----------------------------------------------------------------------------------

    def down(self) -> None:
        """Remove everything the lab made. No error when parts, or all of it, are already gone."""
        _require_root()
        pids = set(p for pids in self._pids_in_namespaces().values() for p in pids)
        # A server whose namespace was unmounted behind our back is found through its pid file,
        # and only killed if its command line names this lab's state directory.
        for pid_file in (self._labserver_pid, self._h3server_pid, self._dnsmasq_pid):
            pid = _read_pid(pid_file)
            if pid and _alive(pid) and any(str(self.state_dir) in a for a in _cmdline(pid)):
                pids.add(pid)
        pids.discard(os.getpid())
        pids.discard(1)
        self._stop(pids)
        from pyroute2 import netns as pyroute2_netns

        for role in ROLES:
            path = NETNS_DIR / self.ns(role)
            if os.path.lexists(path):
                try:
                    pyroute2_netns.remove(self.ns(role))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    raise ThrottleError(f"cannot remove namespace {self.ns(role)}: {exc}") from None
            shutil.rmtree(ETC_NETNS / self.ns(role), ignore_errors=True)
        self._remove_state()

    def _remove_state(self) -> None:
        """Delete the files the lab writes, then the directory if that leaves it empty: a state
        directory given by the caller may hold other things, and those are not ours to delete."""
        d = self.state_dir
        for sub, patterns in (("certs", ("*.pem", "*.tmp")), ("", STATE_FILES)):
            where = d / sub if sub else d
            for pattern in patterns:
                for path in where.glob(pattern):
                    if path.is_file() or path.is_symlink():
                        path.unlink(missing_ok=True)
            try:
                where.rmdir()
            except OSError:
                pass  # missing, or not empty

    @staticmethod
    def _stop(pids: set[int]) -> None:
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while True:
                for pid in pids:
                    _reap(pid)
                pids = {p for p in pids if _alive(p)}
                if not pids or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
            if not pids:
                return
        if pids:
            raise ThrottleError(f"processes {sorted(pids)} did not exit after SIGKILL")

    def _pids_in_namespaces(self) -> dict[str, list[int]]:
        """Every process whose network namespace is one of the lab's, by role."""
        ids = {}
        for role in ROLES:
            ns = _ns_id(NETNS_DIR / self.ns(role))
            if ns is not None:
                ids[ns] = role
        found: dict[str, list[int]] = {role: [] for role in ROLES}
        if not ids:
            return found
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                ns_id = _ns_id(f"/proc/{entry}/ns/net")
                owner = ids.get(ns_id) if ns_id is not None else None
                if owner is not None:
                    found[owner].append(int(entry))
        return found

    # -- status ---------------------------------------------------------------------------------

    def status(self) -> LabStatus:
        _require_root()
        labserver = self._running(self._labserver_pid, "server")
        h3server = self._running(self._h3server_pid, "server")
        dnsmasq = self._running(self._dnsmasq_pid, "server")
        try:
            hostnames = json.loads((self.state_dir / "lab.json").read_text()).get("hostnames", [])
        except (OSError, ValueError):
            hostnames = []
        roles = {role: _role_status(self.ns(role), role) for role in ROLES}
        return LabStatus(
            name=self.name,
            up=(all(r.exists for r in roles.values()) and labserver is not None and h3server is not None
                and dnsmasq is not None),
            roles=roles,
            dns=DNS_V4,
            dns6=DNS_V6,
            ca=str(self.ca_cert) if self.ca_cert.exists() else None,
            state_dir=str(self.state_dir),
            etc=str(ETC_NETNS / self.ns("client")),
            hostnames=tuple(str(h) for h in hostnames),
            labserver=labserver,
            dnsmasq=dnsmasq,
            in_namespaces=self._pids_in_namespaces(),
            h3server=h3server,
        )


@dataclass(frozen=True, slots=True)
class RoleStatus:
    """One namespace of the lab: whether it exists, its interfaces and addresses."""

    namespace: str
    exists: bool
    interfaces: tuple[str, ...]
    ipv4: str  # the address a peer uses
    ipv6: str
    ipv4_all: tuple[str, ...]
    ipv6_all: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LabStatus:
    name: str
    up: bool  # every namespace exists and the servers (web, HTTP/3, DNS) run
    roles: dict[str, RoleStatus]
    dns: str
    dns6: str
    ca: str | None  # the CA certificate's path, once made
    state_dir: str
    etc: str  # the client's /etc/netns folder (resolv.conf, the CA bundle)
    hostnames: tuple[str, ...]
    labserver: int | None  # pids, when running
    dnsmasq: int | None
    in_namespaces: dict[str, list[int]]  # every process in each namespace, by role
    h3server: int | None = None  # the HTTP/3 server's pid, when running

    def to_json(self) -> dict[str, Any]:
        """The shape `throttle lab status --json` prints."""
        return {
            "name": self.name,
            "up": self.up,
            "namespaces": {role: {"name": r.namespace, "exists": r.exists} for role, r in self.roles.items()},
            "interfaces": {role: list(r.interfaces) for role, r in self.roles.items()},
            "addresses": {role: {"ipv4": r.ipv4, "ipv6": r.ipv6, "ipv4_all": list(r.ipv4_all),
                                 "ipv6_all": list(r.ipv6_all)} for role, r in self.roles.items()},
            "dns": self.dns,
            "dns6": self.dns6,
            "ca": self.ca,
            "state_dir": self.state_dir,
            "etc": self.etc,
            "hostnames": list(self.hostnames),
            "processes": {"labserver": self.labserver, "h3server": self.h3server, "dnsmasq": self.dnsmasq,
                          "in_namespaces": self.in_namespaces},
        }


def _role_status(namespace: str, role: str) -> RoleStatus:
    specs = [a.split("/")[0] for i in INTERFACES if i.role == role for a in i.addresses]
    v4 = tuple(a for a in specs if ipaddress.ip_address(a).version == 4)
    v6 = tuple(a for a in specs if ipaddress.ip_address(a).version == 6)
    return RoleStatus(namespace, os.path.ismount(NETNS_DIR / namespace),
                      tuple(i.name for i in INTERFACES if i.role == role), v4[0] if v4 else "", v6[0] if v6 else "", v4, v6)
