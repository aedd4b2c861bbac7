"""One capture's inferences, fitted as its connections end: memory for the connections open at once
and the flows with losses, not for every packet of the capture.

`infer_capture(path)` returns exactly what `fit.infer(reader.read_traces([path]).traces)` does, in
the same order, but fits each connection's traces when the reader closes it (`Capture.settle`) and
then releases their per-packet lists (`FlowTrace.release`); the rest of a trace (addresses, times,
counts) stays for the report and for `Capture.finish`, which names it from a DNS answer read later.
A trace with losses may share a policer's bucket with any other lossy flow of its client or name
anywhere in the capture (`fit.join_shared`), so of it the packets a joint fit reads (`PacketSeq`:
time, size, passed) are kept to the end, unless its own fit already rules a joint one out.

Two captures of one connection are matched packet by packet (`match`) and a plot draws the
packets: those callers keep `read_traces`.
"""

from __future__ import annotations

import os
from array import array

from throttle.infer.fit import join_shared, single
from throttle.infer.fit_bucket import PacketSeq
from throttle.infer.match import Keyed
from throttle.infer.reader import Capture, read_capture
from throttle.infer.trace import Inference

__all__ = ["infer_capture"]


class _Fitting(Capture):
    """A capture whose connections' traces are fitted alone as they close, then released."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.singles: dict[int, tuple[Inference, PacketSeq | None]] = {}  # id(trace) -> its own fit

    def settle(self, found: list[Keyed]) -> list[Keyed]:
        kept = []
        for item in found:
            trace = item.trace
            inf, seq = single(trace)
            # a joint fit reads only flows with losses (`fit._groups`)
            self.singles[id(trace)] = (inf, seq if trace.losses else None)
            trace.release()
            kept.append(Keyed(trace, array("q")))  # the keys match two captures: not done for one
        return kept


def infer_capture(path: str | os.PathLike[str]) -> tuple[list[Inference], str | None]:
    """The capture's inferences in `read_traces`' order, and the problem that stopped the reading
    early (the inferences of what was read before it are there all the same)."""
    captures: list[_Fitting] = []

    def make(name: str) -> Capture:
        captures.append(_Fitting(name))
        return captures[-1]

    keyed, problem = read_capture(path, make)
    traces = [item.trace for item in keyed]
    return join_shared(traces, [captures[0].singles[id(trace)] for trace in traces]), problem
