"""Finding the system tools throttle runs (`ip`, `iptables`, `ethtool`, `dnsmasq` ...), and root.

A tool is looked up on PATH and then in the sbin folders, which a non-login root shell (sudo, a
systemd unit, CI) may not have on its PATH. A missing one is a ThrottleError naming the Debian
package that provides it.
"""

from __future__ import annotations

import os
import shutil

from throttle.errors import ThrottleError

SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"


def find_tool(name: str) -> str | None:
    """The full path of a command, or None."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def require_tool(name: str, package: str, hint: str = "") -> str:
    """The full path of a command, or a ThrottleError saying which package to install."""
    path = find_tool(name)
    if path is None:
        raise ThrottleError(f"{name} is missing: apt-get install {package}{hint}")
    return path


def is_root() -> bool:
    return os.geteuid() == 0


def require_root(why: str) -> None:
    """A ThrottleError unless this process is root; `why` finishes "... needs root ...". """
    if not is_root():
        raise ThrottleError(f"{why}: run it with sudo")
