"""Window operators: tumbling, hopping, session and count windows over columnar micro-batches.

Every operator keeps the state of its open windows as parallel numpy arrays sorted by a 63-bit
key ``device (20 bits) | metric (8) | window number (35)``, with mergeable aggregates
(``edge.aggregates``) and a quantile sketch per window (``edge.sketch``). Folding a batch is
sort + reduce + ``searchsorted`` merge; no Python object is made per reading.

Semantics (``wm`` is the reading's device watermark *before* it, see ``edge.eventtime``):

* **tumbling** ``[s, s + size)`` and **hopping** (``size``, ``step``; a reading belongs to
  ``size / step`` windows): a window fires when ``wm >= end``; a reading is added to each of its
  windows unless ``wm >= end + allowed_lateness`` (it is then dropped from that window). A reading
  dropped from all its windows counts as ``late_dropped``; a window updated after it fired is
  re-emitted with revision n+1.
* **session** (``gap``, optional ``max_length``): readings of a device and metric closer than
  ``gap`` in event time form one session; a late reading can extend or bridge sessions. A session
  fires when ``wm >= last + gap``; a reading is dropped when ``wm >= ts + allowed_lateness``. A
  session is identified by its first event time: when a late reading moves that start, the result
  under the old start is reported as *superseded* so the cloud can delete it (only a start a
  result was emitted under: a session moved again before it closed withdraws nothing more).
  ``max_length`` caps a session's span; the cap is applied to what was merged so far, so under
  disorder a capped session may be cut differently than a recomputation over the whole stream
  would.
* **count** (``n``): every ``n`` accepted readings of a device and metric, in arrival order, form
  a window; it fires when full (or partially when the device goes silent, then is revised).
  Count windows never drop late readings. A count window is identified by the event time of its
  first-arriving reading, moved forward by the fewest milliseconds that keep the identities of a
  series' count windows strictly increasing (readings may share a timestamp).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64
from devices.settings import duration_label
from edge.aggregates import FIELDS, AggArrays, fold_sorted, merge_groups, merge_into, singletons
from edge.eventtime import NEVER, running_max_before
from edge.sketch import SketchParams, SketchStore, quantiles_from_counts

DEVICE_BITS = 20
METRIC_BITS = 8
NUMBER_BITS = 35
MAX_DEVICES = 1 << DEVICE_BITS
MAX_METRICS = 1 << METRIC_BITS
EPOCH_BASE_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z; earlier event times are implausible
MIN_WINDOW_MS = 100
# tumbling/hopping windows of one series that can be open at once, at most (out_of_orderness and
# allowed_lateness beyond this are a typo or a gateway's memory spent many times over)
MAX_OPEN_WINDOWS = 4_096
# beyond this many cells per series the dense ring holds mostly empty cells: the sparse layout
DENSE_MAX_CELLS = 64
KINDS = ("tumbling", "hopping", "session", "count")

_DUR = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _dur(text: str) -> int:
    m = _DUR.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    return round(float(m.group(1)) * _UNIT[m.group(2)])


@dataclass(frozen=True, kw_only=True)
class WindowSpec:
    """One kind of window. Parse the config form with ``WindowSpec.parse``:
    ``"10s"`` or ``"tumbling:10s"``, ``"hopping:1m/10s"``, ``"session:30s"`` or
    ``"session:30s/10m"`` (gap / max length), ``"count:100"``."""

    kind: str = "tumbling"
    size_ms: int = 0  # tumbling, hopping
    step_ms: int = 0  # hopping (tumbling: = size)
    gap_ms: int = 0  # session
    max_length_ms: int = 0  # session (0: unbounded)
    count: int = 0  # count

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"window kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("tumbling", "hopping"):
            if self.size_ms < MIN_WINDOW_MS:
                raise ValueError(f"window size must be >= {MIN_WINDOW_MS} ms, got {self.size_ms}")
            step = self.step
            if (self.kind == "hopping" and self.step_ms < MIN_WINDOW_MS) or \
                    step < MIN_WINDOW_MS or self.size_ms % step:
                raise ValueError(f"hopping step must be >= {MIN_WINDOW_MS} ms and divide the "
                                 f"size ({self.size_ms} ms), got {step}")
        if self.kind == "session" and (self.gap_ms < 1 or self.max_length_ms < 0):
            raise ValueError("a session window needs a gap > 0 (and max_length >= 0)")
        if self.kind == "count" and self.count < 1:
            raise ValueError("a count window needs count >= 1")

    @property
    def step(self) -> int:
        return self.step_ms or self.size_ms

    @property
    def label(self) -> str:
        """Stable name, used as the ``window`` tag in InfluxDB."""
        if self.kind == "tumbling":
            return duration_label(self.size_ms)
        if self.kind == "hopping":
            return f"{duration_label(self.size_ms)}/{duration_label(self.step)}"
        if self.kind == "session":
            cap = f"/{duration_label(self.max_length_ms)}" if self.max_length_ms else ""
            return f"session:{duration_label(self.gap_ms)}{cap}"
        return f"count:{self.count}"

    def ring_cells(self, out_of_orderness_ms: int, allowed_lateness_ms: int) -> int:
        """Tumbling and hopping: the windows of one series that can be open at once (not yet
        past allowed lateness, up to the newest) plus the next one; 0 for other kinds."""
        if self.kind not in ("tumbling", "hopping"):
            return 0
        span = out_of_orderness_ms + allowed_lateness_ms + self.size_ms
        return -(-span // self.step) + 1

    @property
    def reach_ms(self) -> int:
        """How far beyond a device's newest reading one of its windows can end."""
        if self.kind in ("tumbling", "hopping"):
            return self.size_ms
        if self.kind == "session":
            return self.gap_ms
        return 0

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        kind, _, arg = text.partition(":")
        if not arg:
            kind, arg = "tumbling", kind
        kind = kind.strip()
        if kind == "tumbling":
            return cls(kind=kind, size_ms=_dur(arg))
        if kind == "hopping":
            size, _, step = arg.partition("/")
            if not step:
                raise ValueError(f"hopping windows need size/step, got {text!r}")
            return cls(kind=kind, size_ms=_dur(size), step_ms=_dur(step))
        if kind == "session":
            gap, _, cap = arg.partition("/")
            return cls(kind=kind, gap_ms=_dur(gap), max_length_ms=_dur(cap) if cap else 0)
        if kind == "count":
            return cls(kind=kind, count=int(arg))
        raise ValueError(f"unknown window kind {kind!r} in {text!r}")


@dataclass
class WindowResults:
    """Rows emitted by one operator."""

    device: I64
    metric: I64
    start: I64
    width: I64
    rev: I64
    agg: AggArrays
    pct: F64  # (rows, len(percentiles))
    sk_keys: I64
    sk_counts: I64
    sk_offsets: I64

    def __len__(self) -> int:
        return len(self.device)


@dataclass
class Superseded:
    """Results withdrawn because their identity changed (sessions)."""

    device: list[int] = field(default_factory=list)
    metric: list[int] = field(default_factory=list)
    start: list[int] = field(default_factory=list)


@dataclass
class OperatorFold:
    accepted: int = 0  # readings in at least one window
    late_dropped: int = 0  # readings in no window because of lateness
    late_revised: int = 0  # readings added to a window that had already fired
    dropped_mask: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))


def series_code(dev: I64, met: I64) -> I64:
    return (dev << METRIC_BITS) | met


def snapshot_sketch(snap: dict[str, npt.NDArray[np.generic]], now: SketchParams
                    ) -> SketchParams:
    """The sketch accuracy a checkpoint was written with (``now``'s when it does not say)."""
    if "sketch_alpha" not in snap:
        return now
    return SketchParams(float(snap["sketch_alpha"][0]))


class WindowOperator:
    """State shared by all kinds: sorted keys, aggregates, revisions, sketches by slot."""

    def __init__(self, spec: WindowSpec, *, allowed_lateness_ms: int, sketch: SketchParams,
                 percentiles: tuple[float, ...]) -> None:
        self.spec = spec
        self.lateness = allowed_lateness_ms
        self.percentiles = percentiles
        self.sketches = SketchStore(sketch)
        self.keys: I64 = np.empty(0, np.int64)
        self.agg = AggArrays.empty()
        self.rev: I64 = np.empty(0, np.int64)  # emissions so far
        self.dirty = np.empty(0, bool)
        self.slot: I64 = np.empty(0, np.int64)
        self.anchor: I64 = np.empty(0, np.int64)  # identity time (window start)
        self._next_slot = 0
        self._free: I64 = np.empty(0, np.int64)
        self.superseded = Superseded()

    # ---- slots ----------------------------------------------------------------------------

    def _alloc(self, k: int) -> I64:
        take = min(k, len(self._free))
        out = np.empty(k, np.int64)
        if take:
            out[:take] = self._free[len(self._free) - take:]
            self._free = self._free[: len(self._free) - take]
        fresh = k - take
        if fresh:
            out[take:] = np.arange(self._next_slot, self._next_slot + fresh)
            self._next_slot += fresh
        return out

    def _release(self, slots: I64) -> None:
        if len(slots):
            self.sketches.drop(slots)
            self._free = np.concatenate([self._free, slots])

    # ---- keyed state ----------------------------------------------------------------------

    @staticmethod
    def key(dev: I64, met: I64, number: I64) -> I64:
        return (dev << (METRIC_BITS + NUMBER_BITS)) | (met << NUMBER_BITS) | number

    @staticmethod
    def unkey(keys: I64) -> tuple[I64, I64, I64]:
        return (keys >> (METRIC_BITS + NUMBER_BITS), (keys >> NUMBER_BITS) & (MAX_METRICS - 1),
                keys & ((1 << NUMBER_BITS) - 1))

    def _upsert(self, keys: I64, ts: I64, value: F64, seq: I64, anchor: I64) -> I64:
        """Fold rows into the windows ``keys`` (created when new); returns each row's slot."""
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        first = np.empty(len(k), bool)
        first[0] = True
        np.not_equal(k[1:], k[:-1], out=first[1:])
        starts = np.flatnonzero(first).astype(np.int64)
        groups = fold_sorted(starts, ts[order], value[order], seq[order])
        gkeys = k[starts]
        group_of_row = np.empty(len(k), np.int64)
        group_of_row[order] = np.cumsum(first) - 1

        pos = np.searchsorted(self.keys, gkeys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == gkeys[found]
        gslot = np.empty(len(gkeys), np.int64)
        if found.any():
            hit = np.flatnonzero(found)
            merge_into(self.agg, pos[hit], groups.take(hit))
            self.dirty[pos[hit]] = True
            gslot[hit] = self.slot[pos[hit]]
        if not found.all():
            miss = np.flatnonzero(~found)
            at = pos[miss]
            new = groups.take(miss)
            slots = self._alloc(len(miss))
            gslot[miss] = slots
            first_anchor = anchor[order][starts]
            self.keys = np.insert(self.keys, at, gkeys[miss])
            self.agg = AggArrays(
                *(np.insert(getattr(self.agg, f), at, getattr(new, f)) for f in FIELDS))
            self.rev = np.insert(self.rev, at, 0)
            self.dirty = np.insert(self.dirty, at, True)
            self.slot = np.insert(self.slot, at, slots)
            self.anchor = np.insert(self.anchor, at, first_anchor[miss])
        # sketch entries in window-key order: the codes are then sorted by slot run by run,
        # which a stable (merge) sort handles in near-linear time
        sk_keys = self.sketches.params.keys(value[order])
        self.sketches.add(gslot[group_of_row[order]], sk_keys, presorted=True)
        return gslot[group_of_row]

    def _keep(self, keep: npt.NDArray[np.bool_]) -> None:
        self._release(self.slot[~keep])
        self.keys = self.keys[keep]
        self.agg = self.agg.take(np.flatnonzero(keep))
        self.rev = self.rev[keep]
        self.dirty = self.dirty[keep]
        self.slot = self.slot[keep]
        self.anchor = self.anchor[keep]

    def _results(self, idx: I64, width: I64) -> WindowResults:
        dev, met, _ = self.unkey(self.keys[idx])
        slots = self.slot[idx]
        sk_keys, sk_counts, sk_off = self.sketches.export(slots)
        pct = quantiles_from_counts(self.sketches.params, sk_keys, sk_counts, sk_off,
                                    list(self.percentiles))
        out = WindowResults(device=dev, metric=met, start=self.anchor[idx].copy(),
                            width=width, rev=self.rev[idx].copy(), agg=self.agg.take(idx),
                            pct=pct, sk_keys=sk_keys, sk_counts=sk_counts, sk_offsets=sk_off)
        self.rev[idx] += 1
        self.dirty[idx] = False
        return out

    @property
    def open_windows(self) -> int:
        return len(self.keys)

    def nbytes(self) -> int:
        arrays = [self.keys, self.rev, self.dirty, self.slot, self.anchor, self._free,
                  self.sketches.codes, self.sketches.counts]
        return sum(int(a.nbytes) for a in arrays) + sum(
            int(getattr(self.agg, f).nbytes) for f in FIELDS)

    # ---- kind-specific --------------------------------------------------------------------

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold:
        raise NotImplementedError

    def ends(self) -> I64:
        """Event time at which each open window fires (watermark >= it)."""
        raise NotImplementedError

    def emit(self, wm_by_device: I64, silent: npt.NDArray[np.bool_]) -> WindowResults:
        """Results of windows that fired (or were revised); purge state past lateness."""
        if len(self.keys) == 0:
            return self._results(np.empty(0, np.int64), np.empty(0, np.int64))
        dev, _, _ = self.unkey(self.keys)
        wm = wm_by_device[dev]
        end = self.ends()
        ready = np.flatnonzero(self.dirty & (wm >= end))
        out = self._results(ready, self._width(ready))
        purge = (~self.dirty) & (wm >= end + self.lateness)
        if purge.any():
            self._keep(~purge)
        return out

    def forget(self, purged_devices: npt.NDArray[np.bool_]) -> None:
        """Drop the emitted windows of devices whose state was purged after going silent."""
        if len(self.keys) and len(purged_devices):
            dev, _, _ = self.unkey(self.keys)
            drop = purged_devices[dev] & ~self.dirty
            if drop.any():
                self._keep(~drop)

    def holding(self, n: int) -> npt.NDArray[np.bool_]:
        """Which of the devices ``0..n-1`` have a window here (open, or kept for lateness)."""
        out = np.zeros(n, bool)
        if len(self.keys):
            dev, _, _ = self.unkey(self.keys)
            out[dev[dev < n]] = True
        return out

    def release(self, devices: npt.NDArray[np.bool_]) -> None:
        """Devices whose ids go to other devices: drop what is kept of them between windows
        (they hold no window: ``holding``)."""

    def flush_all(self) -> WindowResults:
        idx = np.flatnonzero(self.dirty)
        return self._results(idx, self._width(idx))

    def _width(self, idx: I64) -> I64:
        raise NotImplementedError

    # ---- durability ---------------------------------------------------------------------

    def snapshot(self, prefix: str) -> dict[str, npt.NDArray[np.generic]]:
        snap: dict[str, npt.NDArray[np.generic]] = {
            "keys": self.keys, "rev": self.rev, "dirty": self.dirty, "slot": self.slot,
            "anchor": self.anchor, "free": self._free,
            "next_slot": np.array([self._next_slot], np.int64),
            "sk_codes": self.sketches.codes, "sk_counts": self.sketches.counts,
            "label": np.array([self.spec.label]),
            "sup": np.array([self.superseded.device, self.superseded.metric,
                             self.superseded.start], np.int64).reshape(3, -1),
        }
        for f in FIELDS:
            snap["agg_" + f] = getattr(self.agg, f)
        snap.update(self._extra_snapshot())
        return {prefix + k: np.asarray(v) for k, v in snap.items()}  # views: see engine

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], prefix: str) -> None:
        def get(name: str) -> npt.NDArray[np.generic]:
            return snap[prefix + name]

        label = str(get("label")[0])
        if label != self.spec.label:
            raise ValueError(f"checkpoint holds window {label!r}, configured {self.spec.label!r}")
        self.keys = get("keys").astype(np.int64)
        self.rev = get("rev").astype(np.int64)
        self.dirty = get("dirty").astype(bool)
        self.slot = get("slot").astype(np.int64)
        self.anchor = get("anchor").astype(np.int64)
        self._free = get("free").astype(np.int64)
        self._next_slot = int(get("next_slot")[0])
        self.sketches.codes = get("sk_codes").astype(np.int64)
        self.sketches.counts = get("sk_counts").astype(np.int64)
        sup = get("sup").astype(np.int64)
        self.superseded = Superseded(sup[0].tolist(), sup[1].tolist(), sup[2].tolist())
        self.agg = AggArrays(*(get("agg_" + f).copy() for f in FIELDS))  # type: ignore[arg-type]
        self._extra_restore(get)
        self.sketches.rekey(snapshot_sketch(snap, self.sketches.params))

    def adopt(self, keys: I64, agg: AggArrays, rev: I64, dirty: npt.NDArray[np.bool_],
              anchor: I64, sk_keys: I64, sk_counts: I64, sk_offsets: I64) -> None:
        """Take over windows it does not hold, with their state (``agg`` with sum, mean and
        M2 as such; sketches in flat form): a dense ring's cells after its size or the layout
        changed between a checkpoint and the configuration it is restored into."""
        if len(keys) == 0:
            return
        slots = self._alloc(len(keys))
        order = np.argsort(np.concatenate([self.keys, keys]), kind="stable")
        cat = np.concatenate
        self.keys = cat([self.keys, keys])[order]
        self.agg = AggArrays(*(cat([getattr(self.agg, f), getattr(agg, f)])[order]
                               for f in FIELDS))
        self.rev = cat([self.rev, rev])[order]
        self.dirty = cat([self.dirty, dirty])[order]
        self.slot = cat([self.slot, slots])[order]
        self.anchor = cat([self.anchor, anchor])[order]
        self.sketches.add(np.repeat(slots, np.diff(sk_offsets)), sk_keys, sk_counts)

    def _extra_snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {}

    def _extra_restore(self, get: object) -> None:
        return None


class FixedWindows(WindowOperator):
    """Tumbling (step = size) and hopping windows aligned to the epoch."""

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold:
        size, step = self.spec.size_ms, self.spec.step
        k = size // step
        n = len(ts)
        base = (ts // step) * step
        rows = np.repeat(np.arange(n), k)
        start = base[rows] - np.tile(np.arange(k, dtype=np.int64), n) * step
        end = start + size
        ok_pair = wm_before[rows] < end + self.lateness
        kept = np.bincount(rows[ok_pair], minlength=n) if n else np.zeros(0, np.int64)
        revised_pair = ok_pair & (wm_before[rows] >= end)
        if ok_pair.any():
            r = rows[ok_pair]
            number = (start[ok_pair] - EPOCH_BASE_MS) // step
            self._upsert(self.key(dev[r], met[r], number), ts[r], value[r], seq[r],
                         start[ok_pair])
        dropped = kept == 0
        revised = np.zeros(n, bool)
        revised[rows[revised_pair]] = True
        return OperatorFold(accepted=int((~dropped).sum()), late_dropped=int(dropped.sum()),
                            late_revised=int((revised & ~dropped).sum()), dropped_mask=dropped)

    def ends(self) -> I64:
        return self.anchor + self.spec.size_ms

    def _width(self, idx: I64) -> I64:
        return np.full(len(idx), self.spec.size_ms, np.int64)

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], prefix: str) -> None:
        if prefix + "W" in snap:  # written by the dense layout (lateness was shorter then)
            from edge.dense import DenseFixedWindows

            written = snapshot_sketch(snap, self.sketches.params)
            DenseFixedWindows.from_snapshot(snap, prefix, self.spec, written,
                                            self.percentiles).hand_over(self)
            self.sketches.rekey(written)
            return
        super().restore(snap, prefix)


class CountWindows(WindowOperator):
    """Every ``count`` accepted readings of a series, in arrival order."""

    def __init__(self, spec: WindowSpec, **kw: object) -> None:
        super().__init__(spec, **kw)  # type: ignore[arg-type]
        self._series: I64 = np.empty(0, np.int64)  # sorted series codes
        self._seen: I64 = np.empty(0, np.int64)  # readings counted per series
        self._anchor: I64 = np.empty(0, np.int64)  # identity of the series' latest window

    def release(self, devices: npt.NDArray[np.bool_]) -> None:
        if not len(devices) or not len(self._series):
            return
        dev = self._series >> METRIC_BITS
        keep = ~devices[np.minimum(dev, len(devices) - 1)] | (dev >= len(devices))
        self._series, self._seen, self._anchor = (
            self._series[keep], self._seen[keep], self._anchor[keep])

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold:
        n = len(ts)
        if n == 0:
            return OperatorFold()
        codes = series_code(dev, met)
        order = np.argsort(codes, kind="stable")  # arrival order kept within a series
        cs = codes[order]
        first = np.empty(n, bool)
        first[0] = True
        np.not_equal(cs[1:], cs[:-1], out=first[1:])
        seg_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        rank = np.arange(n) - seg_start
        uniq = cs[first]
        pos = np.searchsorted(self._series, uniq)
        hit = pos < len(self._series)
        hit[hit] = self._series[pos[hit]] == uniq[hit]
        before = np.zeros(len(uniq), np.int64)
        before[hit] = self._seen[pos[hit]]
        grp = np.cumsum(first) - 1
        index_s = before[grp] + rank  # in series-sorted order
        index = np.empty(n, np.int64)
        index[order] = index_s
        number = index // self.spec.count
        # identity of each window opened by this batch: its first reading's event time, made
        # strictly increasing per series: a_j = max(f_j, a_{j-1} + 1) = j + cummax(f_i - i, ...)
        prev_anchor = np.full(len(uniq), NEVER, np.int64)
        prev_anchor[hit] = self._anchor[pos[hit]]
        opens = np.flatnonzero(index_s % self.spec.count == 0)  # series-sorted positions
        anchor_s = ts[order].copy()
        last_anchor = prev_anchor.copy()
        if len(opens):
            og = grp[opens]
            j = np.arange(len(opens)) - np.searchsorted(og, og)  # rank among the series' opens
            lifted = ts[order][opens] - j
            floor = np.where(prev_anchor[og] == NEVER, NEVER, prev_anchor[og] + 1)
            inclusive = np.maximum(running_max_before(og, lifted, prev_anchor * 0 + NEVER),
                                   lifted)
            anchors = j + np.maximum(floor, inclusive)
            anchor_s[opens] = anchors
            np.maximum.at(last_anchor, og, anchors)
        row_anchor = np.empty(n, np.int64)
        row_anchor[order] = anchor_s
        self._upsert(self.key(dev, met, number), ts, value, seq, row_anchor)
        counts_now = before + np.bincount(grp, minlength=len(uniq))
        self._seen[pos[hit]] = counts_now[hit]
        self._anchor[pos[hit]] = last_anchor[hit]
        miss = ~hit
        self._series = np.insert(self._series, pos[miss], uniq[miss])
        self._seen = np.insert(self._seen, pos[miss], counts_now[miss])
        self._anchor = np.insert(self._anchor, pos[miss], last_anchor[miss])
        return OperatorFold(accepted=n, dropped_mask=np.zeros(n, bool))

    def _upsert(self, keys: I64, ts: I64, value: F64, seq: I64, anchor: I64) -> I64:
        # the anchor of a new window must be its first *arriving* row: stable order by key
        return super()._upsert(keys, ts, value, seq, anchor)

    def emit(self, wm_by_device: I64, silent: npt.NDArray[np.bool_]) -> WindowResults:
        if len(self.keys) == 0:
            return self._results(np.empty(0, np.int64), np.empty(0, np.int64))
        dev, _, _ = self.unkey(self.keys)
        full = self.agg.count >= self.spec.count
        quiet = silent[dev] if len(silent) else np.zeros(len(dev), bool)
        ready = np.flatnonzero(self.dirty & (full | quiet))
        out = self._results(ready, self._width(ready))
        done = full & ~self.dirty
        if done.any():
            self._keep(~done)
        return out

    def ends(self) -> I64:
        return self.agg.last_ts

    def _width(self, idx: I64) -> I64:
        return np.asarray(np.maximum(self.agg.last_ts[idx] - self.agg.first_ts[idx] + 1, 1),
                          dtype=np.int64)

    def _extra_snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"series": self._series, "seen": self._seen, "series_anchor": self._anchor}

    def _extra_restore(self, get: object) -> None:
        self._series = get("series").astype(np.int64)  # type: ignore[operator]
        self._seen = get("seen").astype(np.int64)  # type: ignore[operator]
        self._anchor = get("series_anchor").astype(np.int64)  # type: ignore[operator]


class SessionWindows(WindowOperator):
    """Sessions per series: readings closer than ``gap`` belong together."""

    def __init__(self, spec: WindowSpec, **kw: object) -> None:
        super().__init__(spec, **kw)  # type: ignore[arg-type]
        self._next_id = 0
        # emitted under its current start: a session moves to an earlier start when late
        # readings extend it, and only what was emitted may be withdrawn (``rev`` counts the
        # emissions under any start)
        self.shown = np.empty(0, bool)

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold:
        n = len(ts)
        if n == 0:
            return OperatorFold()
        gap = self.spec.gap_ms
        dropped = wm_before >= ts + self.lateness
        keep = ~dropped
        if not keep.any():
            return OperatorFold(late_dropped=n, dropped_mask=dropped)
        d, m, t, v, w = dev[keep], met[keep], ts[keep], value[keep], wm_before[keep]
        q = seq[keep]
        codes = series_code(d, m)
        touched = np.unique(codes)
        cur_dev, cur_met, _ = self.unkey(self.keys)
        cur_codes = series_code(cur_dev, cur_met)
        old = np.isin(cur_codes, touched)
        old_idx = np.flatnonzero(old)
        old_shown = self.shown[old_idx]
        # items: existing sessions of touched series, then the new readings as singletons
        items = AggArrays.concat([self.agg.take(old_idx), singletons(t, v, q)])
        item_code = np.concatenate([cur_codes[old_idx], codes])
        item_start = items.first_ts
        item_end = items.last_ts
        n_old = len(old_idx)
        order = np.lexsort((item_start, item_code))
        ic, ist, ien = item_code[order], item_start[order], item_end[order]
        new_series = np.empty(len(ic), bool)
        new_series[0] = True
        np.not_equal(ic[1:], ic[:-1], out=new_series[1:])
        prev_end = running_max_before(np.cumsum(new_series) - 1, ien,
                                      np.full(int(new_series.sum()), NEVER, np.int64))
        boundary = new_series | (ist > prev_end + gap)
        if self.spec.max_length_ms:
            boundary = self._cap(boundary, ist, ien)
        gstarts = np.flatnonzero(boundary).astype(np.int64)
        merged = merge_groups(gstarts, items.take(order))
        group_of = np.cumsum(boundary) - 1  # per sorted item
        ng = len(gstarts)

        # revisions, slots and superseded identities
        is_old = order < n_old
        old_pos = np.where(is_old, order, 0)
        g_rev = np.zeros(ng, np.int64)
        g_shown = np.zeros(ng, bool)
        g_slot = np.full(ng, -1, np.int64)
        if n_old:
            ow = np.flatnonzero(is_old)
            og = group_of[ow]
            orow = old_idx[old_pos[ow]]
            np.maximum.at(g_rev, og, self.rev[orow])
            # keep the slot of the first old session of each group; move the others into it
            ug, first_at = np.unique(og, return_index=True)
            g_slot[ug] = self.slot[orow[first_at]]
            absorbed = np.ones(len(og), bool)
            absorbed[first_at] = False
            if absorbed.any():
                src = self.slot[orow[absorbed]]
                self.sketches.move(src, g_slot[og[absorbed]])
                self._free = np.concatenate([self._free, src])
            # an emitted session whose start changed is withdrawn under its old start
            was_shown = old_shown[old_pos[ow]]
            stays = self.anchor[orow] == merged.first_ts[og]
            g_shown[og[was_shown & stays]] = True
            moved = was_shown & ~stays
            for i in orow[moved].tolist():
                self.superseded.device.append(int(cur_dev[i]))
                self.superseded.metric.append(int(cur_met[i]))
                self.superseded.start.append(int(self.anchor[i]))
        fresh = g_slot < 0
        g_slot[fresh] = self._alloc(int(fresh.sum()))
        new_items = np.flatnonzero(~is_old)
        reading_idx = order[new_items] - n_old
        self.sketches.add(g_slot[group_of[new_items]], self.sketches.params.keys(v[reading_idx]))
        g_dirty = np.zeros(ng, bool)
        g_dirty[group_of[new_items]] = True
        if n_old:
            ow = np.flatnonzero(is_old)
            g_dirty[group_of[ow]] |= self.dirty[old_idx[old_pos[ow]]]
        g_code = ic[gstarts]
        ids = np.arange(self._next_id, self._next_id + ng, dtype=np.int64) % (1 << NUMBER_BITS)
        self._next_id += ng
        g_keys = self.key(g_code >> METRIC_BITS, g_code & (MAX_METRICS - 1), ids)
        revised = np.zeros(n, bool)
        kept_idx = np.flatnonzero(keep)
        revised[kept_idx] = w >= t + gap  # the session it joins may have fired already

        # replace the touched series' sessions by the merged groups (slots already handled)
        keep_rows = ~old
        self.keys = self.keys[keep_rows]
        self.agg = self.agg.take(np.flatnonzero(keep_rows))
        self.rev = self.rev[keep_rows]
        self.shown = self.shown[keep_rows]
        self.dirty = self.dirty[keep_rows]
        self.slot = self.slot[keep_rows]
        self.anchor = self.anchor[keep_rows]
        at = np.searchsorted(self.keys, g_keys)
        self.keys = np.insert(self.keys, at, g_keys)
        self.agg = AggArrays(*(np.insert(getattr(self.agg, f), at, getattr(merged, f))
                               for f in FIELDS))
        self.rev = np.insert(self.rev, at, g_rev)
        self.shown = np.insert(self.shown, at, g_shown)
        self.dirty = np.insert(self.dirty, at, g_dirty)
        self.slot = np.insert(self.slot, at, g_slot)
        self.anchor = np.insert(self.anchor, at, merged.first_ts)
        if len(self.keys) > 1 and not (self.keys[1:] > self.keys[:-1]).all():
            self._reorder(np.argsort(self.keys, kind="stable"))
        return OperatorFold(accepted=int(keep.sum()), late_dropped=int(dropped.sum()),
                            late_revised=int((revised & keep).sum()), dropped_mask=dropped)

    def _reorder(self, order: I64) -> None:
        self.keys = self.keys[order]
        self.agg = self.agg.take(order)
        self.rev = self.rev[order]
        self.shown = self.shown[order]
        self.dirty = self.dirty[order]
        self.slot = self.slot[order]
        self.anchor = self.anchor[order]

    def _cap(self, boundary: npt.NDArray[np.bool_], start: I64, end: I64
             ) -> npt.NDArray[np.bool_]:
        """Cut groups whose span exceeds max_length, greedily in start order (items atomic)."""
        cap = self.spec.max_length_ms
        b = boundary.copy()
        gs = [*np.flatnonzero(b).tolist(), len(b)]
        for lo, hi in itertools.pairwise(gs):
            if int(end[lo:hi].max()) - int(start[lo]) <= cap:
                continue
            s0 = int(start[lo])
            for i in range(lo + 1, hi):
                if int(end[i]) - s0 > cap:
                    b[i] = True
                    s0 = int(start[i])
        return b

    def ends(self) -> I64:
        return self.agg.last_ts + self.spec.gap_ms

    def _width(self, idx: I64) -> I64:
        return np.asarray(np.maximum(self.agg.last_ts[idx] - self.agg.first_ts[idx] + 1, 1),
                          dtype=np.int64)

    def _results(self, idx: I64, width: I64) -> WindowResults:
        self.shown[idx] = True
        return super()._results(idx, width)

    def _keep(self, keep: npt.NDArray[np.bool_]) -> None:
        self.shown = self.shown[keep]
        super()._keep(keep)

    def nbytes(self) -> int:
        return super().nbytes() + int(self.shown.nbytes)

    def _extra_snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"next_id": np.array([self._next_id], np.int64), "shown": self.shown}

    def _extra_restore(self, get: object) -> None:
        self._next_id = int(get("next_id")[0])  # type: ignore[operator]
        try:
            self.shown = get("shown").astype(bool)  # type: ignore[operator]
        except KeyError:  # a checkpoint from before 2026-12-05: what it could tell
            self.shown = self.rev > 0


class Operator(Protocol):
    """What the engine needs of a window operator (sparse or dense layout)."""

    spec: WindowSpec
    superseded: Superseded

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold: ...

    def emit(self, wm_by_device: I64, silent: npt.NDArray[np.bool_]) -> WindowResults: ...

    def flush_all(self) -> WindowResults: ...

    def forget(self, purged_devices: npt.NDArray[np.bool_]) -> None: ...

    def holding(self, n: int) -> npt.NDArray[np.bool_]: ...

    def release(self, devices: npt.NDArray[np.bool_]) -> None: ...

    @property
    def open_windows(self) -> int: ...

    def nbytes(self) -> int: ...

    def snapshot(self, prefix: str) -> dict[str, npt.NDArray[np.generic]]: ...

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], prefix: str) -> None: ...


def make_operator(spec: WindowSpec, *, allowed_lateness_ms: int, out_of_orderness_ms: int,
                  sketch: SketchParams, percentiles: tuple[float, ...],
                  dense: bool = True) -> Operator:
    """The operator for a spec: tumbling and hopping windows use the dense layout
    (``edge.dense``) unless ``dense`` is False or its ring would exceed ``DENSE_MAX_CELLS`` cells
    per series (small windows, long lateness: mostly empty cells); sessions and count windows the
    sparse one."""
    if spec.kind in ("tumbling", "hopping"):
        if dense and spec.ring_cells(out_of_orderness_ms, allowed_lateness_ms) <= DENSE_MAX_CELLS:
            from edge.dense import DenseFixedWindows

            return DenseFixedWindows(spec, allowed_lateness_ms=allowed_lateness_ms,
                                     out_of_orderness_ms=out_of_orderness_ms, sketch=sketch,
                                     percentiles=percentiles)
        return FixedWindows(spec, allowed_lateness_ms=allowed_lateness_ms, sketch=sketch,
                            percentiles=percentiles)
    cls: type[WindowOperator] = SessionWindows if spec.kind == "session" else CountWindows
    return cls(spec, allowed_lateness_ms=allowed_lateness_ms, sketch=sketch,
               percentiles=percentiles)
