"""The event-time windowing engine: per-device watermarks, allowed lateness, revisions.

Readings are folded a micro-batch at a time with numpy (sort, segment, reduce); the engine never
builds a Python object per reading. Semantics, per device ``d``:

* ``watermark(d) = max(event time seen from d) - out_of_orderness`` (raised further by idle
  handling). A device's clock only ever affects its own windows: a device running ten minutes fast
  cannot make another device's readings late.
* The watermark a reading is judged against is the one *before* that reading, in arrival order
  per device, so results do not depend on how the stream was cut into micro-batches.
* A tumbling window ``[s, s + size)`` fires when ``watermark >= s + size``. A reading whose window
  has fired but with ``watermark < end + allowed_lateness`` is *late but accepted*: the window is
  updated and re-emitted with revision n+1. A reading with ``watermark >= end + allowed_lateness``
  is dropped and counted as late; its window's state may already be gone.
* A device silent for ``idle_timeout`` (processing time) has its open windows closed (emitted) and
  no longer holds back the gateway watermark; after a further ``allowed_lateness`` of silence its
  retained state is purged.

``fold`` and ``emit`` are pure state transitions driven by an injected clock; the agent's event
loop calls them. ``snapshot``/``restore`` make the state durable across restarts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from devices.contract import ResultColumns
from devices.readings import I64, ReadingColumns
from edge.aggregates import FIELDS, AggArrays, fold_sorted, merge_into

# Composite window key: device (20 bits) | metric (8 bits) | window index since EPOCH_BASE (35 bits)
DEVICE_BITS = 20
METRIC_BITS = 8
WINDOW_BITS = 35
MAX_DEVICES = 1 << DEVICE_BITS
MAX_METRICS = 1 << METRIC_BITS
EPOCH_BASE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z; earlier event times are implausible
MIN_WINDOW_MS = 100
NEVER = np.iinfo(np.int64).min // 4  # "no event time seen yet" (far below any real time)


@dataclass(frozen=True, kw_only=True)
class WindowSpec:
    """A tumbling event-time window and its lateness policy (all durations in ms)."""

    size_ms: int
    out_of_orderness_ms: int = 2_000
    allowed_lateness_ms: int = 30_000
    idle_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.size_ms < MIN_WINDOW_MS:
            raise ValueError(f"window size must be >= {MIN_WINDOW_MS} ms, got {self.size_ms}")
        if self.out_of_orderness_ms < 0 or self.allowed_lateness_ms < 0:
            raise ValueError("out_of_orderness and allowed_lateness must be >= 0")
        if self.idle_timeout_ms <= 0:
            raise ValueError("idle_timeout must be > 0")

    @property
    def label(self) -> str:
        s = self.size_ms
        for unit, ms in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
            if s % ms == 0:
                return f"{s // ms}{unit}"
        return f"{s}ms"


@dataclass
class FoldOutcome:
    """What happened to one micro-batch."""

    accepted: int = 0
    late_revised: int = 0  # accepted into a window that had already fired
    late_dropped: int = 0  # beyond allowed lateness
    dropped_mask: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))


def _grow(arr: I64, n: int, fill: int) -> I64:
    if len(arr) >= n:
        return arr
    out = np.full(max(n, 2 * len(arr), 64), fill, dtype=np.int64)
    out[: len(arr)] = arr
    return out


class WindowEngine:
    """Open windows of every (device, metric), as sorted parallel arrays keyed by window key."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self.keys: I64 = np.empty(0, np.int64)
        self.agg = AggArrays.empty()
        self.rev: I64 = np.empty(0, np.int64)  # emissions so far (next revision number)
        self.dirty = np.empty(0, bool)
        # per device (indexed by interned device id)
        self.max_ts: I64 = np.empty(0, np.int64)
        self.wm_floor: I64 = np.empty(0, np.int64)
        self.last_seen: I64 = np.empty(0, np.int64)  # monotonic ms of the last reading
        self.idle_state: I64 = np.empty(0, np.int64)  # 0 active, 1 closed, 2 purged
        self.late_dropped_by_device: I64 = np.empty(0, np.int64)
        self.accepted_by_device: I64 = np.empty(0, np.int64)

    # ---- keys ---------------------------------------------------------------------------

    def window_start(self, ts: I64) -> I64:
        size = self.spec.size_ms
        return (ts // size) * size

    def _key(self, device: I64, metric: I64, start: I64) -> I64:
        widx = (start - EPOCH_BASE_MS) // self.spec.size_ms
        return (device << (METRIC_BITS + WINDOW_BITS)) | (metric << WINDOW_BITS) | widx

    def _unkey(self, keys: I64) -> tuple[I64, I64, I64]:
        device = keys >> (METRIC_BITS + WINDOW_BITS)
        metric = (keys >> WINDOW_BITS) & (MAX_METRICS - 1)
        widx = keys & ((1 << WINDOW_BITS) - 1)
        return device, metric, widx * self.spec.size_ms + EPOCH_BASE_MS

    def _ensure_devices(self, n: int) -> None:
        self.max_ts = _grow(self.max_ts, n, NEVER)
        self.wm_floor = _grow(self.wm_floor, n, NEVER)
        self.last_seen = _grow(self.last_seen, n, 0)
        self.idle_state = _grow(self.idle_state, n, 0)
        self.late_dropped_by_device = _grow(self.late_dropped_by_device, n, 0)
        self.accepted_by_device = _grow(self.accepted_by_device, n, 0)

    def watermarks(self) -> I64:
        """Per-device watermark (NEVER for devices with no event time yet)."""
        raw = np.where(self.max_ts == NEVER, NEVER, self.max_ts - self.spec.out_of_orderness_ms)
        return np.maximum(raw, self.wm_floor)

    def gateway_watermark(self) -> int | None:
        """Minimum watermark over devices that are not idle; None if there are none."""
        wm = self.watermarks()
        active = (self.idle_state == 0) & (wm != NEVER)
        if not active.any():
            return None
        return int(wm[active].min())

    # ---- folding ------------------------------------------------------------------------

    def fold(self, batch: ReadingColumns, now_mono_ms: int) -> FoldOutcome:
        """Fold validated readings (event times >= EPOCH_BASE_MS) into their windows."""
        n = len(batch)
        if n == 0:
            return FoldOutcome()
        dev = batch.device.astype(np.int64)
        met = batch.metric.astype(np.int64)
        ts = batch.ts
        if dev.max() >= MAX_DEVICES or met.max() >= MAX_METRICS:
            raise ValueError("device or metric id beyond the engine's key space")
        if ts.min() < EPOCH_BASE_MS:
            raise ValueError("event time before EPOCH_BASE_MS reached the engine; validate first")
        self._ensure_devices(int(dev.max()) + 1)

        # Watermark before each reading: running max of event time per device, in arrival order.
        order = np.argsort(dev, kind="stable")
        d_s = dev[order]
        t_s = ts[order]
        new_seg = np.empty(n, bool)
        new_seg[0] = True
        np.not_equal(d_s[1:], d_s[:-1], out=new_seg[1:])
        seg = np.cumsum(new_seg) - 1
        tmin = int(t_s.min())
        span = int(t_s.max()) - tmin + 1
        lifted = (t_s - tmin) + seg * span
        inclusive = np.maximum.accumulate(lifted) - seg * span + tmin
        exclusive = np.empty(n, np.int64)
        exclusive[0] = NEVER
        exclusive[1:] = inclusive[:-1]
        exclusive[new_seg] = NEVER
        seen = np.maximum(self.max_ts[d_s], exclusive)
        wm_s = np.where(seen == NEVER, NEVER, seen - self.spec.out_of_orderness_ms)
        wm_s = np.maximum(wm_s, self.wm_floor[d_s])
        wm_before = np.empty(n, np.int64)
        wm_before[order] = wm_s

        start = self.window_start(ts)
        end = start + self.spec.size_ms
        dropped = wm_before >= end + self.spec.allowed_lateness_ms
        revised = (~dropped) & (wm_before >= end)

        # Device bookkeeping (all readings count as a sign of life and advance event time).
        np.maximum.at(self.max_ts, dev, ts)
        self.last_seen[dev] = now_mono_ms
        self.idle_state[dev] = 0
        if dropped.any():
            np.add.at(self.late_dropped_by_device, dev[dropped], 1)
        keep = ~dropped
        if keep.any():
            np.add.at(self.accepted_by_device, dev[keep], 1)
            self._fold_accepted(
                self._key(dev[keep], met[keep], start[keep]), ts[keep], batch.value[keep]
            )
        return FoldOutcome(
            accepted=int(keep.sum()),
            late_revised=int(revised.sum()),
            late_dropped=int(dropped.sum()),
            dropped_mask=dropped,
        )

    def _fold_accepted(self, keys: I64, ts: I64, value: npt.NDArray[np.float64]) -> None:
        order = np.lexsort((value, ts, keys))
        k = keys[order]
        first = np.empty(len(k), bool)
        first[0] = True
        np.not_equal(k[1:], k[:-1], out=first[1:])
        starts = np.flatnonzero(first).astype(np.int64)
        groups = fold_sorted(starts, ts[order], value[order])
        gkeys = k[starts]

        pos = np.searchsorted(self.keys, gkeys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == gkeys[found]
        if found.any():
            hit = np.flatnonzero(found)
            merge_into(self.agg, pos[hit], groups.take(hit))
            self.dirty[pos[hit]] = True
        if not found.all():
            miss = np.flatnonzero(~found)
            at = pos[miss]
            new = groups.take(miss)
            self.keys = np.insert(self.keys, at, gkeys[miss])
            self.agg = AggArrays(
                *(np.insert(getattr(self.agg, f), at, getattr(new, f)) for f in FIELDS)
            )
            self.rev = np.insert(self.rev, at, 0)
            self.dirty = np.insert(self.dirty, at, True)

    # ---- emitting -----------------------------------------------------------------------

    def emit(self, now_mono_ms: int) -> ResultColumns:
        """Results of windows that fired (or were revised) since the last call; purge old state."""
        self._handle_idle(now_mono_ms)
        if len(self.keys) == 0:
            return _empty_results()
        dev, _, start = self._unkey(self.keys)
        end = start + self.spec.size_ms
        wm = self.watermarks()[dev]
        ready = self.dirty & (wm >= end)
        out = self._results(np.flatnonzero(ready))
        self.rev[ready] += 1
        self.dirty[ready] = False
        purge = (~self.dirty) & (wm >= end + self.spec.allowed_lateness_ms)
        if purge.any():
            self._drop_rows(~purge)
        return out

    def flush_all(self) -> ResultColumns:
        """Emit every dirty window now, fired or not (partial results; used on final shutdown)."""
        idx = np.flatnonzero(self.dirty)
        out = self._results(idx)
        self.rev[idx] += 1
        self.dirty[idx] = False
        return out

    def _results(self, idx: I64) -> ResultColumns:
        dev, met, start = self._unkey(self.keys[idx])
        a = self.agg.take(idx)
        return ResultColumns(
            device=dev, metric=met, start=start,
            width=np.full(len(idx), self.spec.size_ms, np.int64), rev=self.rev[idx].copy(),
            count=a.count, sum=a.sum, min=a.min, max=a.max, mean=a.mean, m2=a.m2,
            first_ts=a.first_ts, first=a.first, last_ts=a.last_ts, last=a.last,
        )

    def _drop_rows(self, keep: npt.NDArray[np.bool_]) -> None:
        self.keys = self.keys[keep]
        self.agg = self.agg.take(np.flatnonzero(keep))
        self.rev = self.rev[keep]
        self.dirty = self.dirty[keep]

    def _handle_idle(self, now_mono_ms: int) -> None:
        """Close the windows of devices gone silent; purge them after the lateness has passed."""
        if len(self.last_seen) == 0:
            return
        silent_for = now_mono_ms - self.last_seen
        seen = self.max_ts != NEVER
        to_close = seen & (self.idle_state == 0) & (silent_for >= self.spec.idle_timeout_ms)
        to_purge = seen & (self.idle_state == 1) & (
            silent_for >= self.spec.idle_timeout_ms + self.spec.allowed_lateness_ms
        )
        if not (to_close.any() or to_purge.any()):
            return
        dev, _, start = self._unkey(self.keys)
        end = start + self.spec.size_ms
        max_end = np.full(len(self.max_ts), NEVER, np.int64)
        np.maximum.at(max_end, dev, end)
        # also cover the window of the latest event time seen, in case it was dropped
        latest_end = self.window_start(np.where(seen, self.max_ts, EPOCH_BASE_MS)) + (
            self.spec.size_ms
        )
        close_to = np.maximum(max_end, latest_end)
        self.wm_floor = np.where(to_close, np.maximum(self.wm_floor, close_to), self.wm_floor)
        self.wm_floor = np.where(
            to_purge,
            np.maximum(self.wm_floor, close_to + self.spec.allowed_lateness_ms),
            self.wm_floor,
        )
        self.idle_state[to_close] = 1
        self.idle_state[to_purge] = 2

    # ---- introspection and durability ----------------------------------------------------

    @property
    def open_windows(self) -> int:
        return len(self.keys)

    @property
    def active_devices(self) -> int:
        """Devices that sent event time and have not gone idle."""
        return int(((self.idle_state == 0) & (self.max_ts != NEVER)).sum())

    def idle_devices(self) -> I64:
        return np.flatnonzero(self.idle_state > 0)

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        """All state as named arrays (np.savez-able)."""
        snap: dict[str, npt.NDArray[np.generic]] = {
            "keys": self.keys, "rev": self.rev, "dirty": self.dirty,
            "max_ts": self.max_ts, "wm_floor": self.wm_floor, "idle_state": self.idle_state,
            "late_dropped_by_device": self.late_dropped_by_device,
            "accepted_by_device": self.accepted_by_device,
            "spec": np.array([self.spec.size_ms, self.spec.out_of_orderness_ms,
                              self.spec.allowed_lateness_ms], np.int64),
        }
        for f in FIELDS:
            snap["agg_" + f] = getattr(self.agg, f)
        return {k: v.copy() for k, v in snap.items()}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], now_mono_ms: int) -> None:
        """Continue from a snapshot; devices count as just seen (their idle timers restart)."""
        spec = snap["spec"].astype(np.int64)
        if int(spec[0]) != self.spec.size_ms:
            raise ValueError(
                f"snapshot has {int(spec[0])} ms windows, engine has {self.spec.size_ms} ms"
            )
        self.keys = snap["keys"].astype(np.int64)
        self.rev = snap["rev"].astype(np.int64)
        self.dirty = snap["dirty"].astype(bool)
        self.max_ts = snap["max_ts"].astype(np.int64)
        self.wm_floor = snap["wm_floor"].astype(np.int64)
        self.idle_state = snap["idle_state"].astype(np.int64)
        self.late_dropped_by_device = snap["late_dropped_by_device"].astype(np.int64)
        self.accepted_by_device = snap["accepted_by_device"].astype(np.int64)
        self.last_seen = np.full(len(self.max_ts), now_mono_ms, np.int64)
        self.agg = AggArrays(*(snap["agg_" + f].copy() for f in FIELDS))  # type: ignore[arg-type]


def _empty_results() -> ResultColumns:
    i = np.empty(0, np.int64)
    f = np.empty(0, np.float64)
    return ResultColumns(device=i, metric=i, start=i, width=i, rev=i, count=i, sum=f, min=f,
                         max=f, mean=f, m2=f, first_ts=i, first=f, last_ts=i, last=f)
