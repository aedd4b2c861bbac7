"""The one error tree of throttle.

Library code raises these; only the command line turns them into messages and exit codes.
`ThrottleError` is "your mistake or your machine's" (a broken scenario file, a missing tool);
`ParseError` is "the peer's mistake" (bytes on the wire that are not what they claim to be) and is
never allowed to escape the engine: a malformed packet is counted and passed, never raised.
"""

from __future__ import annotations


class ThrottleError(Exception):
    """Something the user can fix: the message names the thing and the fix."""


class MissingExtra(ThrottleError):
    """A command needs an optional part of the install (`[live]`, `[plots]`) that is not there."""


class ScenarioError(ThrottleError):
    """A scenario file that cannot be loaded; names the file, the key and what is wrong."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


class CaptureError(ThrottleError):
    """A capture file that is not a pcap/pcapng file, or is truncated or unreadable."""


class ParseError(ValueError):
    """Bytes from the network that are malformed for the protocol a parser expects."""
