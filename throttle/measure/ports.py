"""The ports a run's probes use in the client namespace: the one table the runner and bench share.

Probe i (its place in the scenario's probe list) takes its client port from PORT_BASE + 10 i ...
+ 9 (a client tries them in turn, as curl's --local-port does, since a port's last connection may
still be in TIME_WAIT), so that `ss` in the runner and the captures in `throttle bench` can tell
whose packets they see. A command probe's wrap helper listens on WRAP_PORT_BASE + i. The ranges
lie below the kernel's ephemeral ports (32768 up), which the controls' repeat and baseline runs use.
"""

from __future__ import annotations

from dataclasses import dataclass

PORT_BASE = 31000
PORTS_PER_PROBE = 10
MAX_PROBES = 100  # PORT_BASE + 1,000 ports: `ss` is asked about that span
WRAP_PORT_BASE = 41000


@dataclass(frozen=True, slots=True)
class ProbePorts:
    """Client port ranges by probe index; `base` other than PORT_BASE only in tests."""

    base: int = PORT_BASE

    def client(self, index: int) -> tuple[int, int]:
        """Probe `index`'s client port range (lo, hi), both included."""
        lo = self.base + PORTS_PER_PROBE * index
        return lo, lo + PORTS_PER_PROBE - 1

    def owner(self, port: int) -> int | None:
        """The index of the probe whose range holds `port`, else None."""
        index, _ = divmod(port - self.base, PORTS_PER_PROBE)
        return index if self.base <= port < self.base + PORTS_PER_PROBE * MAX_PROBES else None

    @property
    def span(self) -> tuple[int, int]:
        """Every probe's ports, lowest to highest."""
        return self.base, self.base + PORTS_PER_PROBE * MAX_PROBES - 1

    @staticmethod
    def wrap(index: int) -> int:
        """The port probe `index`'s wrap helper listens on."""
        return WRAP_PORT_BASE + index


PORTS = ProbePorts()
