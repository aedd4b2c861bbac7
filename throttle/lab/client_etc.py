"""The client namespace's /etc: `/etc/netns/NAME-client/`, which `ip netns exec NAME-client` mounts
over `/etc`. resolv.conf names the lab's DNS, hosts holds only localhost (every other name goes
to the lab DNS, where the censor can see it), and ssl/ is a copy of the host's /etc/ssl whose CA
bundle also holds the lab CA, so curl and the QUIC probe trust the lab server as installed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from throttle.files import atomic_write
from throttle.lab.layout import DNS_V4, ETC_NETNS, ROLES, namespace

HOSTS_FILE = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def client_etc(lab: str) -> Path:
    return ETC_NETNS / namespace(lab, "client")


def write_client_etc(lab: str, ca_cert: Path) -> None:
    """resolv.conf, hosts and a CA bundle with the lab CA, for `ip netns exec NAME-client`."""
    etc = client_etc(lab)
    etc.mkdir(mode=0o755, parents=True, exist_ok=True)
    atomic_write(etc / "resolv.conf", f"# throttle lab {lab}\nnameserver {DNS_V4}\n".encode())
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
    lab_ca = ca_cert.read_bytes()
    atomic_write(bundle, system + f"# throttle lab CA ({lab})\n".encode() + lab_ca)
    atomic_write(ssl_dir / "certs" / f"throttle-lab-{lab}.pem", lab_ca)


def remove_etc(lab: str) -> None:
    """Every /etc/netns folder of the lab's namespaces (only the client's has files today)."""
    for role in ROLES:
        shutil.rmtree(ETC_NETNS / namespace(lab, role), ignore_errors=True)
