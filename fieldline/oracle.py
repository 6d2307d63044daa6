"""The oracle: what InfluxDB must contain, given what the devices published.

A seeded fleet publishes readings ``(gateway, device, seq, event time, value)`` with ``seq``
contiguous per device, in order, on time (so no reading can legitimately be late or rejected).
For every tumbling window the expected result is the count, smallest, largest and sum of the
sequence numbers of its readings. ``check`` compares that with an export of InfluxDB:

* ``lost``: readings of expected windows that are missing (window absent, or fewer readings);
* ``unexpected``: windows or readings InfluxDB has that nothing published;
* ``mismatched``: windows whose count matches but whose sequence numbers do not (a reading
  swapped for another, or a doubled one hiding a lost one).

All three must be 0. Readings a gateway shed by its outbox policy are reported by its ledger:
``check`` accepts a window as lost-by-policy only when told how many readings were shed, and then
the conservation law ``published = in InfluxDB + shed`` must hold exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from devices.schema import seq_checks

Window = tuple[str, str, int]  # device, metric, window start


@dataclass
class WindowFacts:
    count: int = 0
    seq_min: int = 1 << 62
    seq_max: int = -1
    seq_sum: int = 0

    def add(self, seq: int) -> None:
        self.count += 1
        self.seq_min = min(self.seq_min, seq)
        self.seq_max = max(self.seq_max, seq)
        self.seq_sum += seq

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.count, self.seq_min, self.seq_max, self.seq_sum)


@dataclass
class OracleReport:
    expected_windows: int
    expected_readings: int
    found_readings: int
    lost: int = 0
    unexpected: int = 0
    mismatched: int = 0
    examples: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.lost == self.unexpected == self.mismatched == 0

    def __str__(self) -> str:
        return (f"expected {self.expected_readings} readings in {self.expected_windows} windows, "
                f"found {self.found_readings}: lost={self.lost} unexpected={self.unexpected} "
                f"mismatched={self.mismatched} {self.examples[:5]}")


def expected_windows(published: list[Any], size_ms: int) -> dict[Window, WindowFacts]:
    """``published``: records with ``device``, ``metric``, ``ts``, ``seq`` attributes."""
    out: dict[Window, WindowFacts] = defaultdict(WindowFacts)
    for p in published:
        out[(p.device, p.metric, p.ts - p.ts % size_ms)].add(p.seq)
    return dict(out)


def export_windows(influx: Any, window_label: str) -> dict[Window, tuple[int, int, int, int]]:
    """``influx``: an ``InfluxV1Client``. Latest revision of every window of the spec."""
    doc = influx.query('SELECT "count", "seq_min", "seq_max", "seq_sum" FROM "aggregates" '
                       f"WHERE \"window\" = '{window_label}' GROUP BY \"device\", \"metric\"")
    out: dict[Window, tuple[int, int, int, int]] = {}
    for res in doc.get("results", []):
        for s in res.get("series", []):
            tags = s.get("tags", {})
            for t, n, qmin, qmax, qsum in s["values"]:
                seqs = seq_checks(int(n), qmin, qmax, qsum) or (-1, -1, 0)
                out[(tags["device"], tags["metric"], int(t))] = (int(n), *seqs)
    return out


def check(expected: dict[Window, WindowFacts], found: dict[Window, tuple[int, int, int, int]]
          ) -> OracleReport:
    rep = OracleReport(expected_windows=len(expected),
                       expected_readings=sum(f.count for f in expected.values()),
                       found_readings=sum(v[0] for v in found.values()))
    for w, facts in expected.items():
        got = found.get(w)
        if got is None:
            rep.lost += facts.count
            rep.examples.append(f"missing {w}")
        elif got[0] < facts.count:
            rep.lost += facts.count - got[0]
            rep.examples.append(f"short {w}: {got[0]} of {facts.count}")
        elif got[0] > facts.count:
            rep.unexpected += got[0] - facts.count
            rep.examples.append(f"extra {w}: {got[0]} for {facts.count}")
        elif got != facts.as_tuple():
            rep.mismatched += 1
            rep.examples.append(f"mismatch {w}: {got} vs {facts.as_tuple()}")
    for w, got in found.items():
        if w not in expected:
            rep.unexpected += got[0]
            rep.examples.append(f"unexpected {w}")
    return rep
