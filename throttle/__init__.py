"""throttle: a lab simulator of selective throttling censorship.

The censor engine (`throttle.engine`) is sans-I/O: packet bytes and `now` in, verdicts out.
Everything that touches the kernel, the network or the disk is an adapter around it.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
