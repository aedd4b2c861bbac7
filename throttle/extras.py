"""The optional parts of the install, and one message when a command needs one that is missing.

The base install (`pip install throttle-lab`) needs no root or compiler: the engine, the parsers, the
scenarios, `classify`, `demo --offline`. `[live]` adds what the lab and the live censor need
(netfilterqueue, pyroute2, cryptography, aioquic for HTTP/3, prometheus-client); `[plots]` adds matplotlib.
"""

from __future__ import annotations

import importlib.util

from throttle.errors import MissingExtra

DISTRIBUTION = "throttle-lab"

# extra -> the importable modules it provides
EXTRAS: dict[str, tuple[str, ...]] = {
    "live": ("netfilterqueue", "pyroute2", "cryptography", "aioquic", "prometheus_client"),
    "plots": ("matplotlib",),
}


def missing(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of `extra` (or the given subset of them) that cannot be imported here."""
    wanted = EXTRAS[extra] if modules is None else modules
    return [m for m in wanted if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """Raise MissingExtra, one line naming the extra and the install command, if any is missing."""
    gone = missing(extra, modules)
    if gone:
        raise MissingExtra(f"{what} needs the [{extra}] extra, which is not installed (missing: {', '.join(gone)}): "
                           f"pip install '{DISTRIBUTION}[{extra}]' (in a clone: pip install -e '.[{extra}]', "
                           f"or scripts/setup)")
