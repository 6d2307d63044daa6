"""A plain-Python reference of the windowing semantics, written independently of the engine.

One reading at a time, per device in arrival order: the watermark before a reading is the
device's max event time so far minus the out-of-orderness; a reading is dropped when that
watermark has passed its window's end plus the allowed lateness. This is the specification the
vectorised engine is checked against.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class RefWindow:
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    values: list[float] = field(default_factory=list)
    first: tuple[int, float] | None = None
    last: tuple[int, float] | None = None


@dataclass
class RefResult:
    windows: dict[tuple[str, str, int], RefWindow]
    dropped: list[tuple[str, str, int]]  # (device, metric, ts) of readings beyond lateness
    revised: int


def reference_windows(readings: Iterable[tuple[str, str, int, float]], *, size_ms: int,
                      ooo_ms: int, lateness_ms: int) -> RefResult:
    """``readings``: (device, metric, event ts ms, value) in arrival order."""
    max_ts: dict[str, int] = {}
    windows: dict[tuple[str, str, int], RefWindow] = defaultdict(RefWindow)
    dropped = []
    revised = 0
    for device, metric, ts, value in readings:
        start = ts - ts % size_ms
        end = start + size_ms
        seen = max_ts.get(device)
        wm = None if seen is None else seen - ooo_ms
        max_ts[device] = ts if seen is None else max(seen, ts)
        if wm is not None and wm >= end + lateness_ms:
            dropped.append((device, metric, ts))
            continue
        if wm is not None and wm >= end:
            revised += 1
        w = windows[(device, metric, start)]
        w.count += 1
        w.sum += value
        w.min = min(w.min, value)
        w.max = max(w.max, value)
        w.values.append(value)
        if w.first is None or (ts, value) < w.first:
            w.first = (ts, value)
        if w.last is None or (ts, value) > w.last:
            w.last = (ts, value)
    return RefResult(dict(windows), dropped, revised)
