"""The kernel's shaper: an HTB qdisc at the root of each censor interface's egress, whose
unclassified traffic goes out at once (its direct queue), and a class per shaped bucket, with a
packet FIFO as its queue. The eBPF program puts a shaped direction's packets in their class by
setting skb->priority to the class id (major:minor).

HTB gives every class at least a full packet of burst (`MIN_BURST`), so a bucket with less stays
in the engine's shaper. `Qdiscs` remembers what it made; its methods take an IPRoute and run on
the netlink worker, one at a time.
"""

from __future__ import annotations

from typing import Any

from throttle.errors import ThrottleError
from throttle.kernel.tc import GONE

__all__ = ["HTB_CLASSES", "HTB_MAJOR", "MIN_BURST", "Qdiscs", "class_id"]

HTB_MAJOR = 0x7A57  # the shaper's HTB qdisc handle (7a57:), its classes 7a57:minor
HTB_CLASSES = HTB_MAJOR  # class minors 1 .. 0x7a56; minor m's queue is qdisc m: (never the HTB's own)
MIN_BURST = 1600  # an HTB class's smallest burst: a full-size packet and its framing
MTU_PACKET = 1500  # the queue bound is counted in packets of this size
QUANTUM = 1514


def class_id(minor: int) -> int:
    """The class id of shaping class `minor`: the skb->priority that puts a packet in it."""
    return (HTB_MAJOR << 16) | minor


class Qdiscs:
    """The shaper's root qdiscs and classes, as made; used on the netlink worker only."""

    def __init__(self) -> None:
        self.roots: list[int] = []  # ifindexes whose root qdisc is our HTB
        self._made: set[tuple[int, int]] = set()  # (ifindex, minor)

    def enable(self, ipr: Any, index: int) -> None:
        """Make the interface's root qdisc the shaper's HTB (replacing what was there)."""
        ipr.tc("replace", "htb", index=index, handle=HTB_MAJOR << 16, default=0)
        if index not in self.roots:
            self.roots.append(index)

    def add(self, ipr: Any, index: int, minor: int, rate: float, burst: int, limit: int) -> int:
        """Class `minor` on the interface: `rate` bytes/s with a `burst` of bytes, and a queue of
        about `limit` bytes, counted in full-sized packets (a packet beyond it is dropped, as the
        engine's Shaper drops what would wait too long). Made again if it exists. Returns its id."""
        if not 0 < minor < HTB_CLASSES:
            raise ThrottleError(f"shaping class {minor} is outside 1-{HTB_CLASSES - 1}")
        classid = class_id(minor)
        bits = f"{max(8, int(rate * 8))}bit"
        ipr.tc("replace-class", "htb", index=index, handle=classid, parent=HTB_MAJOR << 16, rate=bits,
               ceil=bits, burst=max(burst, MIN_BURST), cburst=max(burst, MIN_BURST), quantum=QUANTUM)
        ipr.tc("replace", "pfifo", index=index, handle=minor << 16, parent=classid,
               limit=max(2, -(-limit // MTU_PACKET)))
        self._made.add((index, minor))
        return classid

    def ensure(self, ipr: Any, index: int, minor: int, rate: float, burst: int, limit: int) -> int:
        """`add`, unless this class was made already (by an earlier request for the same bucket:
        making it again would refill its credit)."""
        if (index, minor) in self._made:
            return class_id(minor)
        return self.add(ipr, index, minor, rate, burst, limit)

    def remove(self, ipr: Any, index: int, minor: int) -> None:
        """Delete a class (and its queue); no error if it is gone."""
        from pyroute2 import NetlinkError

        self._made.discard((index, minor))
        try:
            ipr.tc("del-class", "htb", index=index, handle=class_id(minor), parent=HTB_MAJOR << 16)
        except NetlinkError as exc:
            if exc.code not in GONE:
                raise

    def disable(self, ipr: Any) -> list[str]:
        """Every interface back to its default root qdisc (noqueue on a veth), classes and all;
        returns the errors (interfaces already gone are none)."""
        from pyroute2 import NetlinkError

        errors = []
        for index in self.roots:
            try:
                ipr.tc("del", "htb", index=index, handle=HTB_MAJOR << 16)
            except NetlinkError as exc:
                if exc.code not in GONE:
                    errors.append(f"cannot remove the shaper's qdisc from interface {index}: {exc}")
        self.roots.clear()
        self._made.clear()
        return errors
