"""The windowing engine of one gateway: clock policy, duplicates, event time, window operators.

Per micro-batch (all vectorised):

1. ``adjust_time``: estimate each device's clock offset and apply the clock policy
   (``trust`` device time, ``correct`` devices whose offset exceeds the tolerance, or use
   ``receive_time``). Runs before validation so a corrected reading is judged by its corrected
   time.
2. ``fold``: drop duplicates (counted), compute each reading's watermark-before, and fold the
   readings into every configured window spec (several per metric: ``10s`` and ``1m`` and a
   session, say). The first spec is the *primary* one: its late drops are the ``late_dropped``
   of the gateway's accounting; the others are reported per spec.
3. ``emit``: idle transitions, then every operator's fired windows, with percentiles from the
   sketches, plus the superseded session identities.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from devices.contract import ResultColumns, SupersededRows
from devices.readings import I64, ReadingColumns
from edge.aggregates import AggArrays
from edge.duplicates import DuplicateFilter
from edge.eventtime import NEVER, PURGED, UNKNOWN_SKEW, DeviceTime, EventTimeSpec
from edge.sketch import SketchParams
from edge.windows import (
    EPOCH_BASE_MS,
    MAX_DEVICES,
    MAX_METRICS,
    Operator,
    WindowResults,
    WindowSpec,
    make_operator,
)

CLOCK_POLICIES = ("trust", "correct", "receive_time")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    windows: tuple[WindowSpec, ...] = (WindowSpec(size_ms=10_000),)
    time: EventTimeSpec = field(default_factory=EventTimeSpec)
    percentiles: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)
    sketch_alpha: float = 0.01
    clock_policy: str = "trust"
    skew_tolerance_ms: int = 2_000
    skew_period_ms: int = 60_000
    dedup: bool = True
    dedup_memory: int = 32  # readings remembered per device
    dense: bool = True  # dense layout for tumbling/hopping windows (edge.dense)

    def __post_init__(self) -> None:
        if not self.windows:
            raise ValueError("at least one window spec is needed")
        labels = [w.label for w in self.windows]
        if len(set(labels)) != len(labels):
            raise ValueError(f"window specs must differ, got {labels}")
        if self.clock_policy not in CLOCK_POLICIES:
            raise ValueError(f"clock policy must be one of {', '.join(CLOCK_POLICIES)}")
        if not all(0.0 <= q <= 1.0 for q in self.percentiles):
            raise ValueError("percentiles are fractions within [0, 1], e.g. 0.99")
        SketchParams(self.sketch_alpha)

    @property
    def labels(self) -> list[str]:
        return [w.label for w in self.windows]


@dataclass
class EngineFold:
    accepted: int = 0  # not duplicate; folded into the primary spec or dropped there as late
    duplicates: int = 0
    late_dropped: Counter[str] = field(default_factory=Counter)  # by spec label
    late_revised: Counter[str] = field(default_factory=Counter)
    late_rows: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    dup_rows: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


class WindowEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        reach = max(w.reach_ms for w in config.windows)
        self.time = DeviceTime(config.time, reach_ms=reach + 1,
                               skew_period_ms=config.skew_period_ms)
        # how far behind a device's newest reading one can still change a window
        t = config.time
        self.horizon_ms = t.out_of_orderness_ms + t.allowed_lateness_ms + reach
        self.dedup = DuplicateFilter(memory=config.dedup_memory, horizon_ms=self.horizon_ms)
        sketch = SketchParams(config.sketch_alpha)
        self.operators: list[Operator] = [
            make_operator(w, allowed_lateness_ms=config.time.allowed_lateness_ms,
                          out_of_orderness_ms=config.time.out_of_orderness_ms, sketch=sketch,
                          percentiles=config.percentiles, dense=config.dense)
            for w in config.windows]
        # open windows of specs a restored checkpoint had and the configuration no longer has
        self.retired_windows: dict[str, int] = {}
        self.corrected = 0

    # ---- time ----------------------------------------------------------------------------

    def adjust_time(self, batch: ReadingColumns, now_mono_ms: int) -> ReadingColumns:
        """Learn clock offsets from the batch and apply the clock policy."""
        if len(batch) == 0:
            return batch
        dev = batch.device.astype(np.int64)
        self.time.ensure(int(dev.max()) + 1)
        self.time.observe_skew(dev, batch.ts, batch.recv, now_mono_ms)
        policy = self.config.clock_policy
        if policy == "trust":
            return batch
        if policy == "receive_time":
            ts = batch.recv.copy()
        else:
            skew = self.time.skew()[dev]
            fix = (skew != UNKNOWN_SKEW) & (np.abs(skew) > self.config.skew_tolerance_ms)
            self.corrected += int(fix.sum())
            ts = np.where(fix, batch.ts + skew, batch.ts)
        return ReadingColumns(batch.device, batch.metric, ts, batch.value, batch.seq,
                              batch.recv)

    # ---- folding ---------------------------------------------------------------------------

    def fold(self, batch: ReadingColumns, now_mono_ms: int) -> EngineFold:
        """Fold validated readings (event times >= EPOCH_BASE_MS) into every window spec."""
        out = EngineFold()
        if len(batch) == 0:
            return out
        dev = batch.device.astype(np.int64)
        met = batch.metric.astype(np.int64)
        dmax = dev.max()
        if dmax >= MAX_DEVICES or met.max() >= MAX_METRICS:
            raise ValueError("device or metric id beyond the engine's key space")
        if batch.ts.min() < EPOCH_BASE_MS:
            raise ValueError("event time before EPOCH_BASE_MS reached the engine; validate first")
        self.time.ensure(int(dmax) + 1)
        rows = np.arange(len(batch))
        ts, value, seq = batch.ts, batch.value, batch.seq
        if self.config.dedup:
            # a reading every operator drops as late changes nothing: it is counted late, not
            # remembered (a replay of old data must not wash recent readings out of the memory)
            judge = ~self._beyond(ts, self.time.watermarks()[dev])
            # where event times are the devices' own, a seq seen before with a time newer
            # than all its device sent is a rebooted counter, not a re-send
            newest = self.time.max_ts if self.config.clock_policy == "trust" else None
            if judge.all():  # the common case: no copies
                dup = self.dedup.check(dev, ts, value, seq, met, newest)
            else:
                dup = np.zeros(len(rows), bool)
                j = np.flatnonzero(judge)
                dup[j] = self.dedup.check(dev[j], ts[j], value[j], seq[j], met[j], newest)
            out.duplicates = int(dup.sum())
            if out.duplicates:
                out.dup_rows = np.flatnonzero(dup)
                rows = rows[~dup]
                dev, met = dev[~dup], met[~dup]
                ts, value, seq = ts[rows], value[rows], seq[rows]
        wm_before = self.time.advance(dev, ts, now_mono_ms, self._first_late(ts))
        out.accepted = len(rows)
        for i, op in enumerate(self.operators):
            res = op.fold(dev, met, ts, value, seq, wm_before)
            label = op.spec.label
            out.late_dropped[label] += res.late_dropped
            out.late_revised[label] += res.late_revised
            if i == 0 and res.late_dropped:
                out.late_rows = rows[res.dropped_mask]
        return out

    def _beyond(self, ts: I64, wm: I64) -> npt.NDArray[np.bool_]:
        """Readings that every operator will drop as late against watermark ``wm`` (or
        later): past the end of the last window that could hold them, plus the lateness."""
        last: I64 | None = None
        for w in self.config.windows:
            if w.kind in ("tumbling", "hopping"):
                end = (ts // w.step) * w.step + w.size_ms
            elif w.kind == "session":
                end = ts
            else:  # count windows never drop a reading as late
                return np.zeros(len(ts), bool)
            last = end if last is None else np.maximum(last, end)
        assert last is not None
        return wm >= last + self.config.time.allowed_lateness_ms

    def _first_late(self, ts: I64) -> I64:
        """The earliest watermark at which any operator could treat a reading as late."""
        first: I64 | None = None
        for w in self.config.windows:
            if w.kind in ("tumbling", "hopping"):  # the end of the earliest window of a reading
                end = (ts // w.step + 1) * w.step
            elif w.kind == "session":
                end = ts
            else:
                continue
            first = end if first is None else np.minimum(first, end)
        return np.full(len(ts), np.iinfo(np.int64).max, np.int64) if first is None else first

    # ---- emitting --------------------------------------------------------------------------

    def emit(self, now_mono_ms: int) -> ResultColumns:
        self.time.idle_step(now_mono_ms)
        silent = self.time.state != 0
        wm = self.time.watermarks()
        purged = self.time.state == PURGED
        parts = []
        for k, op in enumerate(self.operators):
            parts.append((k, op.emit(wm, silent)))
            if purged.any():
                op.forget(purged)
        return self._combine(parts)

    def releasable(self, older_than_ms: int) -> I64:
        """Devices whose state no longer matters: silent past lateness (their windows all
        emitted and purged), their newest reading older than ``older_than_ms`` (the oldest
        the agent still accepts: nothing they could send again is taken, so what they sent
        need not be remembered), and holding no window."""
        t = self.time
        n = len(t.state)
        cand = (t.state == PURGED) & (t.max_ts != NEVER) & (t.max_ts < older_than_ms)
        if not cand.any():
            return np.zeros(0, np.int64)
        for op in self.operators:
            cand &= ~op.holding(n)
        return np.flatnonzero(cand)

    def never_folded(self, n: int) -> npt.NDArray[np.bool_]:
        """Which of the devices ``0..n-1`` never had a reading folded (every one refused, or
        none sent yet)."""
        out = np.ones(n, bool)
        m = min(n, len(self.time.max_ts))
        out[:m] = self.time.max_ts[:m] == NEVER
        return out

    def release(self, ids: I64) -> None:
        """Give ``ids`` to other devices: their time, duplicate memory and per-series state
        as if never seen (they hold no window: ``releasable``)."""
        if not len(ids):
            return
        self.time.reset(ids)
        self.dedup.reset(ids)
        mask = np.zeros(len(self.time.state), bool)
        mask[ids] = True
        for op in self.operators:
            op.release(mask)

    def flush_all(self) -> ResultColumns:
        """Every dirty window now, fired or not (partial results; for a final shutdown)."""
        return self._combine([(k, op.flush_all()) for k, op in enumerate(self.operators)])

    def _combine(self, parts: list[tuple[int, WindowResults]]) -> ResultColumns:
        nq = len(self.config.percentiles)
        rows = [p for _, p in parts]
        n = sum(len(p) for p in rows)
        sk_keys, sk_counts, offsets = [], [], [np.zeros(1, np.int64)]
        base = 0
        for p in rows:
            sk_keys.append(p.sk_keys)
            sk_counts.append(p.sk_counts)
            offsets.append(p.sk_offsets[1:] + base)
            base += int(p.sk_offsets[-1]) if len(p.sk_offsets) else 0
        sup = SupersededRows.empty()
        for k, op in enumerate(self.operators):
            s = op.superseded
            if s.device:
                sup = sup.extend(np.array(s.device, np.int64), np.array(s.metric, np.int64),
                                 np.full(len(s.device), k, np.int64),
                                 np.array(s.start, np.int64))
                s.device.clear()
                s.metric.clear()
                s.start.clear()
        cat = np.concatenate
        agg = AggArrays.concat([p.agg for p in rows]) if n else AggArrays.empty()
        return ResultColumns(
            device=cat([p.device for p in rows]) if n else np.empty(0, np.int64),
            metric=cat([p.metric for p in rows]) if n else np.empty(0, np.int64),
            start=cat([p.start for p in rows]) if n else np.empty(0, np.int64),
            width=cat([p.width for p in rows]) if n else np.empty(0, np.int64),
            rev=cat([p.rev for p in rows]) if n else np.empty(0, np.int64),
            spec=cat([np.full(len(p), k, np.int64) for k, p in parts]) if n
            else np.empty(0, np.int64),
            count=agg.count, sum=agg.sum, min=agg.min, max=agg.max, mean=agg.mean, m2=agg.m2,
            first_ts=agg.first_ts, first=agg.first, last_ts=agg.last_ts, last=agg.last,
            seq_min=agg.seq_min, seq_max=agg.seq_max, seq_sum=agg.seq_sum,
            pct=cat([p.pct for p in rows]) if n else np.empty((0, nq)),
            sk_keys=cat(sk_keys) if n else np.empty(0, np.int64),
            sk_counts=cat(sk_counts) if n else np.empty(0, np.int64),
            sk_offsets=cat(offsets),
            superseded=sup,
        )

    # ---- introspection ----------------------------------------------------------------------

    def watermarks(self) -> I64:
        return self.time.watermarks()

    def gateway_watermark(self) -> int | None:
        return self.time.gateway_watermark()

    @property
    def active_devices(self) -> int:
        return self.time.active_devices

    def silent_devices(self, now_mono_ms: int) -> I64:
        return self.time.silent_devices(now_mono_ms)

    @property
    def open_windows(self) -> int:
        return sum(op.open_windows for op in self.operators)

    def state_bytes(self) -> int:
        """Memory held by window state (arrays, sketches, duplicate memory), in bytes."""
        return sum(op.nbytes() for op in self.operators) + self.dedup.nbytes()

    # ---- durability ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        """The window state as named arrays, for a checkpoint file or ``restore``.

        The arrays are views of the live state, not copies (a checkpoint of 10,000 devices
        would otherwise double the state's memory for a moment): write or restore them before
        the next ``fold`` or ``emit``. ``restore`` copies what it takes.
        """
        snap = self.time.snapshot()
        snap.update(self.dedup.snapshot())
        snap["labels"] = np.array(self.config.labels)
        snap["sketch_alpha"] = np.array([self.config.sketch_alpha])
        for k, op in enumerate(self.operators):
            snap.update(op.snapshot(f"op{k}_"))
        return snap

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], now_mono_ms: int) -> None:
        """Windows resume by spec: a spec configured since the checkpoint starts empty, the
        open windows of one no longer configured are dropped (``retired_windows``; logged),
        and a changed out_of_orderness or allowed_lateness applies to the resumed windows."""
        labels = [str(x) for x in snap["labels"].tolist()]
        self.time.restore(snap, now_mono_ms)
        self.dedup.restore(snap)
        for op in self.operators:
            if op.spec.label in labels:
                op.restore(snap, f"op{labels.index(op.spec.label)}_")
        self.retired_windows = {
            label: int(len(snap[f"op{j}_keys"]) if f"op{j}_W" not in snap else
                       int((snap[f"op{j}_widx"] != -1).sum()) + len(snap[f"op{j}_over_keys"]))
            for j, label in enumerate(labels) if label not in self.config.labels}
