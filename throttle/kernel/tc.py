"""The fast path's program on an interface: a clsact qdisc and, on its ingress, a cls_bpf filter
in direct-action mode (`tc qdisc add ... clsact`, `tc filter add ... ingress bpf da`), made and
removed with pyroute2. Functions of an IPRoute, run on the netlink worker.

A FastPath that was killed leaves its filters behind (fail-open: its flows keep being forwarded,
and limited until its lease runs out); the next `attach` to the interface deletes them and adopts
the clsact qdisc, which `detach` then deletes unless another filter uses it.
"""

from __future__ import annotations

from typing import Any, Optional

from throttle.errors import ThrottleError
from throttle.kernel.neighbours import ifindex

__all__ = ["attach", "detach"]

TC_H_CLSACT_INGRESS = 0xFFFFFFF2  # parent "ffff:fff2"
TC_H_CLSACT_EGRESS = 0xFFFFFFF3
FILTER_NAME = "throttle-fastpath"
FILTER_PRIO = 1  # evaluated before any other ingress filter
FILTER_HANDLE = 0x7A57
ETH_P_ALL = 0x0003
GONE = (2, 19, 22)  # ENOENT, ENODEV, EINVAL: what is to be deleted is gone already


def attach(ipr: Any, name: str, prog: int) -> tuple[int, bool]:
    """The program `prog` (an fd) on interface `name`'s ingress: (its ifindex, whether the clsact
    qdisc is ours to delete)."""
    from pyroute2 import NetlinkError

    index = ifindex(ipr, name)
    ours = True
    try:
        ipr.tc("add", "clsact", index=index)
    except NetlinkError as exc:
        if exc.code != 17:  # EEXIST: someone's clsact, or one a killed FastPath left
            raise ThrottleError(f"cannot add a clsact qdisc to {name}: {exc} (no clsact in this kernel?)") from None
        ours = _adopt_leftover(ipr, index)
    try:
        ipr.tc("add-filter", "bpf", index=index, handle=FILTER_HANDLE, parent=TC_H_CLSACT_INGRESS,
               prio=FILTER_PRIO, protocol=ETH_P_ALL, fd=prog, name=FILTER_NAME, direct_action=True)
    except NetlinkError as exc:
        if ours:
            _delete_clsact(ipr, index)
        raise ThrottleError(f"cannot attach the fast-path BPF filter to {name}: {exc}") from None
    return index, ours


def detach(ipr: Any, index: int, ours: bool) -> None:
    """Our filter off the interface, and the clsact qdisc too if it is ours."""
    _delete_filter(ipr, index, FILTER_PRIO, FILTER_HANDLE)
    if ours:
        _delete_clsact(ipr, index)


def _filters(ipr: Any, index: int, parent: int) -> list[Any]:
    return list(ipr.get_filters(index=index, parent=parent))


def _bpf_name(msg: Any) -> Optional[str]:
    if msg.get("kind") != "bpf":
        return None
    options = msg.get("options")
    return options.get("TCA_BPF_NAME") if options is not None else None


def _filter_ids(msgs: list[Any]) -> set[tuple[int, int]]:
    """(prio, handle) of real filters: a dump also lists each priority's chain head (handle 0)."""
    return {(m["info"] >> 16, m["handle"]) for m in msgs if m["handle"]}


def _adopt_leftover(ipr: Any, index: int) -> bool:
    """On an existing clsact: delete fast-path filters a killed process left. Returns True when
    nothing else uses the qdisc (so detach may delete it), False when it is someone else's."""
    ingress = _filters(ipr, index, TC_H_CLSACT_INGRESS)
    for prio, handle in _filter_ids([m for m in ingress if _bpf_name(m) == FILTER_NAME]):
        _delete_filter(ipr, index, prio, handle)
    others = _filter_ids(_filters(ipr, index, TC_H_CLSACT_INGRESS)) | _filter_ids(_filters(ipr, index, TC_H_CLSACT_EGRESS))
    return not others


def _delete_filter(ipr: Any, index: int, prio: int, handle: int) -> None:
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del-filter", index=index, parent=TC_H_CLSACT_INGRESS, handle=handle,
               info=(prio << 16) | (ETH_P_ALL << 8 & 0xFF00) | (ETH_P_ALL >> 8 & 0xFF))
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise ThrottleError(f"cannot remove the fast-path filter from interface {index}: {exc}") from None


def _delete_clsact(ipr: Any, index: int) -> None:
    from pyroute2 import NetlinkError

    try:
        ipr.tc("del", "clsact", index=index)
    except NetlinkError as exc:
        if exc.code not in GONE:
            raise ThrottleError(f"cannot remove the clsact qdisc from interface {index}: {exc}") from None
