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
    seqs: list[int] = field(default_factory=list)


@dataclass
class RefResult:
    windows: dict[tuple[str, str, int], RefWindow]
    dropped: list[tuple[str, str, int]]  # (device, metric, ts) of readings beyond lateness
    revised: int


def reference_windows(readings: Iterable[tuple[str, str, int, float]]
                      | Iterable[tuple[str, str, int, float, int]], *, size_ms: int,
                      ooo_ms: int, lateness_ms: int) -> RefResult:
    """``readings``: (device, metric, event ts ms, value[, seq]) in arrival order."""
    max_ts: dict[str, int] = {}
    windows: dict[tuple[str, str, int], RefWindow] = defaultdict(RefWindow)
    dropped = []
    revised = 0
    for r in readings:
        device, metric, ts, value = r[0], r[1], r[2], r[3]
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
        if len(r) > 4:
            w.seqs.append(r[4])  # type: ignore[misc]
        if w.first is None or (ts, value) < w.first:
            w.first = (ts, value)
        if w.last is None or (ts, value) > w.last:
            w.last = (ts, value)
    return RefResult(dict(windows), dropped, revised)


# ---- the full engine: duplicates, then every window kind -------------------------------------

Reading = tuple[int, int, int, float, int]  # device, metric, ts, value, seq (-1: none)
Identity = tuple[str, int, int, int]  # spec label, device, metric, start


def _bits(v: float) -> bytes:
    import struct

    return struct.pack("<d", v)


def reference_engine(readings: list[Reading], specs: list[object], *, ooo_ms: int,
                     lateness_ms: int) -> tuple[dict[Identity, RefWindow], int, dict[str, int]]:
    """Final windows by identity, the number of duplicates, and late drops per spec label.

    ``specs`` are ``edge.windows.WindowSpec`` objects (typed loosely to keep this module free
    of engine imports).
    """
    # a reading is identified by (device, seq), or (device, metric, event time, value bits)
    # without seq;
    # the engine remembers a device's last N readings; N is large enough here to hold them all
    seen: set[tuple[int, object]] = set()
    accepted: list[Reading] = []
    dups = 0
    for r in readings:
        dev, met, ts, v, seq = r
        ident: object = seq if seq >= 0 else (met, ts, _bits(v))
        if (dev, ident) in seen:
            dups += 1
            continue
        seen.add((dev, ident))
        accepted.append(r)
    # watermark before each accepted reading
    max_ts: dict[int, int] = {}
    wm_before = []
    for dev, _, ts, _, _ in accepted:
        seen = max_ts.get(dev)
        wm_before.append(None if seen is None else seen - ooo_ms)
        max_ts[dev] = ts if seen is None else max(seen, ts)

    out: dict[Identity, RefWindow] = {}
    late: dict[str, int] = {}

    def add(key: Identity, ts: int, v: float, q: int) -> None:
        w = out.setdefault(key, RefWindow())
        w.seqs.append(q)
        w.count += 1
        w.sum += v
        w.min = min(w.min, v)
        w.max = max(w.max, v)
        w.values.append(v)
        if w.first is None or (ts, v) < w.first:
            w.first = (ts, v)
        if w.last is None or (ts, v) > w.last:
            w.last = (ts, v)

    for spec in specs:
        label = spec.label  # type: ignore[attr-defined]
        kind = spec.kind  # type: ignore[attr-defined]
        late[label] = 0
        if kind in ("tumbling", "hopping"):
            size, step = spec.size_ms, spec.step  # type: ignore[attr-defined]
            for (dev, met, ts, v, q), wm in zip(accepted, wm_before, strict=True):
                starts = [ts - ts % step - j * step for j in range(size // step)]
                kept = [s for s in starts if wm is None or wm < s + size + lateness_ms]
                if not kept:
                    late[label] += 1
                for s in kept:
                    add((label, dev, met, s), ts, v, q)
        elif kind == "count":
            n = spec.count  # type: ignore[attr-defined]
            seen_n: dict[tuple[int, int], int] = defaultdict(int)
            anchors: dict[tuple[int, int, int], int] = {}
            last_anchor: dict[tuple[int, int], int] = {}
            for dev, met, ts, v, q in accepted:
                idx = seen_n[(dev, met)] // n
                seen_n[(dev, met)] += 1
                if (dev, met, idx) not in anchors:  # identities strictly increase per series
                    prev = last_anchor.get((dev, met))
                    a = ts if prev is None else max(ts, prev + 1)
                    anchors[(dev, met, idx)] = a
                    last_anchor[(dev, met)] = a
                add((label, dev, met, anchors[(dev, met, idx)]), ts, v, q)
        else:  # session
            gap = spec.gap_ms  # type: ignore[attr-defined]
            by_series: dict[tuple[int, int], list[tuple[int, float, int]]] = defaultdict(list)
            for (dev, met, ts, v, q), wm in zip(accepted, wm_before, strict=True):
                if wm is not None and wm >= ts + lateness_ms:
                    late[label] += 1
                    continue
                by_series[(dev, met)].append((ts, v, q))
            for (dev, met), pts in by_series.items():
                pts.sort()
                start = None
                prev = None
                for ts, v, q in pts:
                    if prev is None or ts > prev + gap:
                        start = ts
                    prev = ts if prev is None else max(prev, ts)
                    assert start is not None
                    add((label, dev, met, start), ts, v, q)
    return out, dups, late
