"""Dropping duplicate uplink batches, identified by (gateway, sequence number).

QoS 1 delivers at least once and the edge re-sends what was not acknowledged, so the same batch
can arrive twice. Per gateway the highest sequence seen and the set of sequences within
``horizon`` below it are kept; anything older than the horizon counts as a duplicate (it was
either seen already or is so old that the edge would have long replayed it).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _GatewaySeqs:
    high: int = -1
    recent: set[int] = field(default_factory=set)


class BatchDedup:
    def __init__(self, horizon: int = 100_000) -> None:
        self.horizon = horizon
        self._gw: dict[str, _GatewaySeqs] = {}
        self.duplicates = 0

    def is_duplicate(self, gateway: str, seq: int) -> bool:
        g = self._gw.get(gateway)
        if g is None:
            return False
        return seq in g.recent or seq <= g.high - self.horizon

    def record(self, gateway: str, seq: int) -> None:
        g = self._gw.setdefault(gateway, _GatewaySeqs())
        g.recent.add(seq)
        if seq > g.high:
            g.high = seq
            if len(g.recent) > 2 * self.horizon:
                floor = g.high - self.horizon
                g.recent = {s for s in g.recent if s > floor}

    def check_and_record(self, gateway: str, seq: int) -> bool:
        """True (and counted) if the batch was seen before; otherwise record it."""
        if self.is_duplicate(gateway, seq):
            self.duplicates += 1
            return True
        self.record(gateway, seq)
        return False

    def snapshot(self) -> dict[str, list[int]]:
        return {gw: [g.high, *sorted(g.recent)] for gw, g in self._gw.items()}

    def restore(self, snap: dict[str, list[int]]) -> None:
        self._gw = {gw: _GatewaySeqs(high=v[0], recent=set(v[1:])) for gw, v in snap.items() if v}
