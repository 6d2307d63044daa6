"""Tumbling and hopping windows in a dense layout: the agent's hot path, with no sort at all.

Every series (device x metric) owns a ring of ``W`` cells; window number ``w`` (its start
divided by the step) lives in cell ``(w % W) * cap + series`` (``cap``: series capacity). ``W``
covers every window that can be open at once (those not yet past allowed lateness, up to the
newest), so in steady state every reading finds its cell directly. The layout is slot-major: a
fleet reporting every second fills one window of every series at a time, so a micro-batch
touches one contiguous run of cells per slot (2.4x faster state access than series-major).

A micro-batch is folded with ``ufunc.at`` straight into the state: count, min, max, first and
last by event time, sequence checks, and the moments; no grouping sort, no ``searchsorted``, no
inserts. The moments are kept shifted: a cell holds ``K`` (a reading of its window, the first
one folded), ``S1 = sum(x - K)`` and ``S2 = sum(x - K)^2``, so each reading adds to two sums;
results carry ``sum = n K + S1``, ``mean = K + S1 / n`` and ``M2 = S2 - S1^2 / n``. Because
``K`` is one of the window's readings, ``n (mean - K)^2 <= n M2``: the cancellation in ``M2``
costs at most a factor ``n`` over machine precision (Chan's pairwise update, used by the sparse
layout and the cloud merge, needs a per-batch grouping this layout avoids).

Each cell also holds a small dense histogram of sketch buckets (``H`` counters centred on the
bucket of its first reading, ~±37 % around it at 1 % accuracy), which is where sensor noise lands.
Everything that does not fit falls back to the sparse structures with the same semantics: a
window whose ring cell is held by another live window (a device clock jumping far ahead, say)
goes to an ``edge.windows.FixedWindows`` overflow operator, and a bucket outside a cell's
histogram goes to a sparse ``SketchStore`` keyed by cell.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64, capacity
from edge.aggregates import FIELDS, AggArrays
from edge.sketch import SketchParams, SketchStore, quantiles_from_counts
from edge.windows import (
    EPOCH_BASE_MS,
    FixedWindows,
    OperatorFold,
    Superseded,
    WindowOperator,
    WindowResults,
    WindowSpec,
    snapshot_sketch,
)

H = 32  # dense histogram buckets per cell, a power of two (uint16 counters: a cell switches to
HIST_MAX = 65_000  # the sparse store beyond this count, so no counter can overflow)
SHIFT_H = H.bit_length() - 1
FREE = -1
INF = np.inf
NO_CLAIM = np.iinfo(np.int32).max


class DenseFixedWindows:
    def __init__(self, spec: WindowSpec, *, allowed_lateness_ms: int, out_of_orderness_ms: int,
                 sketch: SketchParams, percentiles: tuple[float, ...]) -> None:
        self.spec = spec
        self.lateness = allowed_lateness_ms
        self.percentiles = percentiles
        self.params = sketch
        self.step = spec.step
        self.k = spec.size_ms // self.step
        # number of the window starting at the first multiple of the step >= EPOCH_BASE_MS
        self._first_number = -(-EPOCH_BASE_MS // self.step)
        # cells per series: every window that can be open at once, plus the next one
        self.W = spec.ring_cells(out_of_orderness_ms, allowed_lateness_ms)
        self.overflow = FixedWindows(spec, allowed_lateness_ms=allowed_lateness_ms,
                                     sketch=sketch, percentiles=percentiles)
        self.sparse_sketch = SketchStore(sketch)
        self.superseded = Superseded()  # fixed windows never supersede
        # series table: (device, metric) -> series id
        self.series_of: npt.NDArray[np.int64] = np.full((0, 0), -1, np.int64)
        self.series_dev: I64 = np.empty(0, np.int64)
        self.series_met: I64 = np.empty(0, np.int64)
        self.n_series = 0
        # no live cell needs emitting or purging before a device watermark reaches this
        self._next_check = np.iinfo(np.int64).min
        self._alloc_cells(0)

    # ---- storage ----------------------------------------------------------------------------

    def _alloc_cells(self, series_cap: int) -> None:
        self.cap = series_cap
        c = series_cap * self.W
        self.widx: I64 = np.full(c, FREE, np.int64)
        self.agg = AggArrays(
            count=np.zeros(c, np.int64), sum=np.zeros(c), min=np.full(c, INF),
            max=np.full(c, -INF), mean=np.zeros(c), m2=np.zeros(c),
            first_ts=np.full(c, np.iinfo(np.int64).max, np.int64), first=np.full(c, INF),
            last_ts=np.full(c, np.iinfo(np.int64).min, np.int64), last=np.full(c, -INF),
            seq_min=np.full(c, np.iinfo(np.int64).max, np.int64),
            seq_max=np.full(c, np.iinfo(np.int64).min, np.int64), seq_sum=np.zeros(c, np.int64))
        self.rev: I64 = np.zeros(c, np.int64)
        self.dirty = np.zeros(c, bool)
        self.hist: npt.NDArray[np.uint16] = np.zeros((c, H), np.uint16)
        self.hbase: I64 = np.zeros(c, np.int64)
        # scratch, one per cell: first the claims of free cells, then cell -> touched index
        self._map: npt.NDArray[np.int32] = np.full(c, NO_CLAIM, np.int32)

    def _grow_cells(self, series_needed: int) -> None:
        old = self.cap
        if series_needed <= old:
            return
        keep = {f: getattr(self.agg, f) for f in FIELDS}
        kept = {"widx": self.widx, "rev": self.rev, "dirty": self.dirty, "hist": self.hist,
                "hbase": self.hbase}
        self._alloc_cells(capacity(series_needed))
        w, new = self.W, self.cap
        for name, arr in kept.items():  # slot-major: each slot's series run grows in place
            dst = getattr(self, name)
            dst.reshape(w, new, *dst.shape[1:])[:, :old] = arr.reshape(w, old, *arr.shape[1:])
        for f, arr in keep.items():
            getattr(self.agg, f).reshape(w, new)[:, :old] = arr.reshape(w, old)
        if len(self.sparse_sketch) and old:
            codes = self.sparse_sketch.codes
            cell = codes >> 32
            # (slot, series) order is kept, so the codes stay sorted
            self.sparse_sketch.codes = (((cell // old) * new + cell % old) << 32) | (
                codes & 0xFFFFFFFF)

    def _series(self, dev: I64, met: I64) -> I64:
        """Series id of every row, allocating new series."""
        nd, nm = self.series_of.shape
        if dev.max() >= nd or met.max() >= nm:
            grown = np.full((max(nd, capacity(int(dev.max()) + 1)), max(int(met.max()) + 1, nm)),
                            -1, np.int64)
            grown[:nd, :nm] = self.series_of
            self.series_of = grown
        cols = self.series_of.shape[1]
        flat = dev * cols + met
        sid = self.series_of.reshape(-1)[flat]  # flat: much faster than [dev, met]
        new = sid < 0
        if new.any():
            seen = np.zeros(self.series_of.size, bool)  # the distinct new pairs, in (dev, met)
            seen[flat[new]] = True  # order, without a sort
            pairs = np.flatnonzero(seen)
            ids = np.arange(self.n_series, self.n_series + len(pairs), dtype=np.int64)
            pd, pm = pairs // cols, pairs % cols
            self.series_of.reshape(-1)[pairs] = ids
            self.series_dev = np.concatenate([self.series_dev, pd])
            self.series_met = np.concatenate([self.series_met, pm])
            self.n_series += len(pairs)
            self._grow_cells(self.n_series)
            sid = self.series_of.reshape(-1)[dev * cols + met]
        return np.asarray(sid, dtype=np.int64)

    def _reset(self, cells: I64) -> None:
        """Free ``cells`` (ascending)."""
        sel = _run(cells)
        self.widx[sel] = FREE
        a = self.agg
        a.count[sel] = 0
        a.sum[sel] = 0.0
        a.min[sel] = INF
        a.max[sel] = -INF
        a.mean[sel] = 0.0
        a.m2[sel] = 0.0
        a.first_ts[sel] = np.iinfo(np.int64).max
        a.first[sel] = INF
        a.last_ts[sel] = np.iinfo(np.int64).min
        a.last[sel] = -INF
        a.seq_min[sel] = np.iinfo(np.int64).max
        a.seq_max[sel] = np.iinfo(np.int64).min
        a.seq_sum[sel] = 0
        self.rev[sel] = 0
        self.dirty[sel] = False
        self.hist[sel] = 0
        if len(self.sparse_sketch):
            self.sparse_sketch.drop(cells)

    # ---- folding ------------------------------------------------------------------------------

    def fold(self, dev: I64, met: I64, ts: I64, value: F64, seq: I64, wm_before: I64
             ) -> OperatorFold:
        n = len(ts)
        if n == 0:
            return OperatorFold()
        size, step, k = self.spec.size_ms, self.step, self.k
        sid = self._series(dev, met)
        # window number: the start (aligned to the Unix epoch) over the step, from EPOCH_BASE_MS
        widx = ts // step - self._first_number
        rows = None  # row of each (reading, window) pair, None: every row once, in order
        if k > 1:
            rows = np.repeat(np.arange(n), k)
            widx = widx[rows] - np.tile(np.arange(k, dtype=np.int64), n)
        start = (widx + self._first_number) * step
        past = (wm_before if rows is None else wm_before[rows]) - (start + size)
        ok = past < self.lateness  # past its end by less than the allowed lateness
        every = bool(ok.all())  # the common case: nothing dropped
        revised_pair = past.view(np.uint64) < self.lateness  # 0 <= past < lateness
        if rows is None:
            dropped = ~ok
            late_revised = int(np.count_nonzero(revised_pair))
        else:
            dropped = np.bincount(rows[ok], minlength=n) == 0
            revised = np.zeros(n, bool)
            revised[rows[revised_pair]] = True
            late_revised = int((revised & ~dropped).sum())
        if not every:
            rows = np.flatnonzero(ok) if rows is None else rows[ok]
            start, widx = start[ok], widx[ok]
        if rows is None:
            rows = np.arange(n)
            cell = (widx % self.W) * self.cap + sid
        else:
            cell = (widx % self.W) * self.cap + sid[rows]
        occupant = self.widx[cell]
        # a free cell is claimed by the oldest window of this batch that maps to it, unless that
        # window already lives in the overflow operator
        free = occupant == FREE
        if free.any():
            fc = cell[free]
            cand = widx[free]
            if self.overflow.open_windows:
                in_over = self._in_overflow(dev[rows[free]], met[rows[free]], cand)
                cand = np.where(in_over, np.iinfo(np.int64).max, cand)
            # the claim is stored relative to the batch's oldest window (int32 scratch)
            wbase = int(widx[free].min())
            rel = np.where(cand == np.iinfo(np.int64).max, NO_CLAIM,
                           np.minimum(cand - wbase, NO_CLAIM - 1)).astype(np.int32)
            np.minimum.at(self._map, fc, rel)
            won = self._map[fc].astype(np.int64)
            self._map[fc] = NO_CLAIM
            claimed = won != NO_CLAIM
            self.widx[fc[claimed]] = won[claimed] + wbase
            occupant = self.widx[cell]
        dense = occupant == widx
        if not dense.all():
            every = False
            spill = ~dense
            r = rows[spill]
            self.overflow._upsert(self.overflow.key(dev[r], met[r], widx[spill]), ts[r],
                                  value[r], seq[r], start[spill])
            rows, cell, start = rows[dense], cell[dense], start[dense]
        if len(rows):
            if every and k == 1:  # rows is 0..n-1: no gathers
                self._fold_dense(cell, ts, value, seq)
            else:
                self._fold_dense(cell, ts[rows], value[rows], seq[rows])
            self._next_check = min(self._next_check, int(start.min()) + size)
        late = int(dropped.sum())
        return OperatorFold(accepted=n - late, late_dropped=late, late_revised=late_revised,
                            dropped_mask=dropped)

    def _in_overflow(self, dev: I64, met: I64, widx: I64) -> npt.NDArray[np.bool_]:
        keys = self.overflow.key(dev, met, widx)
        pos = np.searchsorted(self.overflow.keys, keys)
        pos = np.minimum(pos, len(self.overflow.keys) - 1)
        return np.asarray(self.overflow.keys[pos] == keys, dtype=bool)

    def _fold_dense(self, cell: I64, ts: I64, v: F64, seq: I64) -> None:
        """Every aggregate goes straight into the state with ``ufunc.at``: in the slot-major
        layout a batch's cells are close together, and nothing is grouped first."""
        a = self.agg
        keys = self.params.keys(v)
        before = a.count[cell]
        fresh = before == 0
        if fresh.any():  # a new window: any reading of its first batch becomes its shift and
            fc = cell[fresh]  # the centre of its histogram
            a.mean[fc] = v[fresh]
            self.hbase[fc] = keys[fresh] - H // 2
        np.add.at(a.count, cell, np.int64(1))
        # shifted moments (see the module docstring): mean holds the shift K, sum and m2 the
        # sums of (x - K) and (x - K)^2
        d = v - a.mean[cell]
        np.add.at(a.sum, cell, d)
        np.add.at(a.m2, cell, d * d)
        np.minimum.at(a.min, cell, v)
        np.maximum.at(a.max, cell, v)
        np.minimum.at(a.seq_min, cell, seq)
        np.maximum.at(a.seq_max, cell, seq)
        np.add.at(a.seq_sum, cell, seq)  # wraps around: a checksum
        # first/last by event time, ties broken by value: the extreme times first, then the
        # value among the rows at it (a cell whose extreme time moved forgets its old value)
        self._extreme(a.first_ts, a.first, cell, ts, v, np.minimum)
        self._extreme(a.last_ts, a.last, cell, ts, v, np.maximum)
        self.dirty[cell] = True
        # sketch: dense histogram around the first bucket of the cell, sparse beyond it
        j = keys - self.hbase[cell]
        inside = j.view(np.uint64) < H  # 0 <= j < H
        if int(before.max()) + len(cell) > HIST_MAX:  # counters of a cell this full stop here
            inside &= a.count[cell] <= HIST_MAX
        # every row counts in its cell's histogram (a row outside it at ``j mod H``, taken back
        # below: cheaper than selecting the rows inside); a flat index and a uint16 operand keep
        # ufunc.at on its fast path (40x faster)
        hist = self.hist.reshape(-1)
        at = cell * H + (j & (H - 1))
        np.add.at(hist, at, np.uint16(1))
        if not inside.all():
            out = np.flatnonzero(~inside)
            np.subtract.at(hist, at[out], np.uint16(1))
            self.sparse_sketch.add(cell[out], keys[out])

    @staticmethod
    def _extreme(at_ts: I64, at_v: F64, cell: I64, ts: I64, v: F64, op: np.ufunc) -> None:
        before = at_ts[cell]
        # only rows at or beyond their cell's extreme so far can move or tie it: in-order data
        # leaves few rows for the first reading (those of new windows) and most for the last
        cand = ts <= before if op is np.minimum else ts >= before
        nc = np.count_nonzero(cand)
        if nc == 0:
            return
        if nc * 2 < len(cand):
            c = np.flatnonzero(cand)
            cell, ts, v, before = cell[c], ts[c], v[c], before[c]
        op.at(at_ts, cell, ts)
        now = at_ts[cell]
        moved = now != before
        init = np.inf if op is np.minimum else -np.inf
        if moved.any():
            at_v[cell[moved]] = init
        win = ts == now
        if np.count_nonzero(win) * 2 < len(win):  # few rows at their cell's extreme: only those
            w = np.flatnonzero(win)
            op.at(at_v, cell[w], v[w])
        else:
            op.at(at_v, cell, np.where(win, v, init))

    # ---- emitting -----------------------------------------------------------------------------

    def _starts(self, cells: I64 | slice) -> I64:
        return (self.widx[cells] + self._first_number) * self.step

    def _ends(self, cells: I64) -> I64:
        return self._starts(cells) + self.spec.size_ms

    def emit(self, wm_by_device: I64, silent: npt.NDArray[np.bool_]) -> WindowResults:
        dense = self._empty()
        # the scan of every cell is skipped while no device watermark can fire or purge one
        if len(wm_by_device) and int(wm_by_device.max()) >= self._next_check:
            live = np.flatnonzero(self.widx != FREE)
            wm = wm_by_device[self.series_dev[live % self.cap]]
            end = self._ends(live)
            dirty = self.dirty[live]
            fire = dirty & (wm >= end)
            dense = self._results(live[fire])
            purge = ~dirty & (wm >= end + self.lateness)
            if purge.any():
                self._reset(live[purge])
            # what is left: dirty windows fire at their end, clean ones are purged after lateness
            left = ~purge
            self._next_check = int(np.where(dirty & ~fire, end, end + self.lateness)[left].min()
                                   ) if left.any() else np.iinfo(np.int64).max
        return _concat([dense, self.overflow.emit(wm_by_device, silent)],
                       len(self.percentiles))

    def flush_all(self) -> WindowResults:
        ready = np.flatnonzero(self.dirty)
        return _concat([self._results(ready), self.overflow.flush_all()], len(self.percentiles))

    def holding(self, n: int) -> npt.NDArray[np.bool_]:
        out = self.overflow.holding(n)
        live = np.flatnonzero(self.widx != FREE)
        if len(live):
            dev = self.series_dev[live % self.cap]
            out[dev[dev < n]] = True
        return out

    def release(self, devices: npt.NDArray[np.bool_]) -> None:
        # a released device's series keep their (empty) cells for the device that takes its id
        self.overflow.release(devices)

    def forget(self, purged_devices: npt.NDArray[np.bool_]) -> None:
        live = np.flatnonzero(self.widx != FREE)
        if len(live) and len(purged_devices):
            drop = live[purged_devices[self.series_dev[live % self.cap]] & ~self.dirty[live]]
            if len(drop):
                self._reset(drop)
        self.overflow.forget(purged_devices)

    def _empty(self) -> WindowResults:
        e = np.empty(0, np.int64)
        return WindowResults(device=e, metric=e, start=e, width=e, rev=e, agg=AggArrays.empty(),
                             pct=np.empty((0, len(self.percentiles))), sk_keys=e, sk_counts=e,
                             sk_offsets=np.zeros(1, np.int64))

    def _results(self, cells: I64) -> WindowResults:
        if len(cells) == 0:
            return self._empty()
        s = cells % self.cap
        sel = _run(cells)  # a fired slot is usually one run of cells: copies, not gathers
        keys, counts, offsets = self._sketches(cells, sel)
        pct = quantiles_from_counts(self.params, keys, counts, offsets, list(self.percentiles))
        out = WindowResults(
            device=self.series_dev[s], metric=self.series_met[s], start=self._starts(sel),
            width=np.full(len(cells), self.spec.size_ms, np.int64), rev=np.array(self.rev[sel]),
            agg=self._moments(self.agg.take(sel)), pct=pct, sk_keys=keys, sk_counts=counts,
            sk_offsets=offsets)
        self.rev[sel] += 1
        self.dirty[sel] = False
        return out

    @staticmethod
    def _moments(agg: AggArrays) -> AggArrays:
        """Shifted moments (K, sum of x - K, sum of (x - K)^2) to sum, mean and M2."""
        n = agg.count.astype(np.float64)
        k, s1, s2 = agg.mean, agg.sum, agg.m2
        agg.sum = n * k + s1
        agg.mean = k + s1 / n
        agg.m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
        return agg

    def _sketches(self, cells: I64, sel: I64 | slice) -> tuple[I64, I64, I64]:
        """Flat (keys, counts, offsets) of the cells' sketches, keys ascending per cell
        (``sel``: the cells, or their slice when they are one run)."""
        h = self.hist[sel]
        # row-major: rows ascending, buckets ascending within a row (a boolean mask first:
        # flatnonzero of a bool array is 5x faster than of uint16)
        flat = np.flatnonzero(h != 0)
        row = flat >> SHIFT_H
        keys = self.hbase[sel][row] + (flat & (H - 1))
        counts = h.reshape(-1)[flat].astype(np.int64)
        if len(self.sparse_sketch):
            sk, sc, so = self.sparse_sketch.export(cells)
            if len(sk):
                # both runs are sorted by (row, key): the few sparse entries are inserted where
                # they belong (a search and one copy, instead of sorting everything)
                srow = np.repeat(np.arange(len(cells)), np.diff(so))
                at = np.searchsorted((row << 32) | (keys + (1 << 31)),
                                     (srow << 32) | (sk + (1 << 31)), side="right")
                keys = np.insert(keys, at, sk)
                counts = np.insert(counts, at, sc)
                row = np.insert(row, at, srow)
                # a bucket can be in both (a cell whose histogram counters are full): one entry
                same = (row[1:] == row[:-1]) & (keys[1:] == keys[:-1])
                if same.any():
                    first = np.flatnonzero(np.concatenate(([True], ~same)))
                    keys, row = keys[first], row[first]
                    counts = np.add.reduceat(counts, first)
        offsets = np.concatenate(([0], np.cumsum(np.bincount(row, minlength=len(cells)))))
        return np.asarray(keys, np.int64), counts, offsets.astype(np.int64)

    # ---- introspection and durability -----------------------------------------------------------

    @property
    def open_windows(self) -> int:
        return int((self.widx != FREE).sum()) + self.overflow.open_windows

    def nbytes(self) -> int:
        arrays = [self.widx, self.rev, self.dirty, self.hist, self.hbase, self._map,
                  self.series_of, self.sparse_sketch.codes, self.sparse_sketch.counts]
        arrays += [getattr(self.agg, f) for f in FIELDS]
        over = self.overflow
        arrays += [over.keys, over.rev, over.slot, over.anchor, over.sketches.codes]
        arrays += [getattr(over.agg, f) for f in FIELDS]
        return sum(int(x.nbytes) for x in arrays)

    def snapshot(self, prefix: str) -> dict[str, npt.NDArray[np.generic]]:
        snap: dict[str, npt.NDArray[np.generic]] = {
            "widx": self.widx, "rev": self.rev, "dirty": self.dirty, "hist": self.hist,
            "hbase": self.hbase, "series_of": self.series_of, "series_dev": self.series_dev,
            "series_met": self.series_met, "n_series": np.array([self.n_series]),
            "ssk_codes": self.sparse_sketch.codes, "ssk_counts": self.sparse_sketch.counts,
            "label": np.array([self.spec.label]), "W": np.array([self.W]),
            "layout": np.array(["slot-major"]), "moments": np.array(["shifted"]),
        }
        for f in FIELDS:
            snap["agg_" + f] = getattr(self.agg, f)
        out = {prefix + k: np.asarray(v) for k, v in snap.items()}  # views: see engine
        out.update(self.overflow.snapshot(prefix + "over_"))
        return out

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], prefix: str) -> None:
        def get(name: str) -> npt.NDArray[np.generic]:
            return snap[prefix + name]

        label = str(get("label")[0])
        if label != self.spec.label:
            raise ValueError(f"checkpoint holds window {label!r}, configured {self.spec.label!r}")
        if prefix + "W" not in snap:  # the sparse layout wrote it: its windows, as they are
            self.overflow.restore(snap, prefix)
            return
        written = snapshot_sketch(snap, self.params)
        if int(get("W")[0]) != self.W or written != self.params:
            # out_of_orderness, allowed_lateness or sketch_accuracy changed: the checkpoint's
            # windows go on in the overflow operator (new readings of them too), new windows
            # take the ring
            self.from_snapshot(snap, prefix, self.spec, written, self.percentiles
                               ).hand_over(self.overflow)
            self.overflow.sketches.rekey(written)
            return
        self.series_of = get("series_of").astype(np.int64)
        self.series_dev = get("series_dev").astype(np.int64)
        self.series_met = get("series_met").astype(np.int64)
        self.n_series = int(get("n_series")[0])
        w = self.W
        self.cap = len(get("widx")) // w
        # checkpoints written before the slot-major layout hold cell series * W + slot
        old_layout = prefix + "layout" not in snap

        def cells(name: str) -> npt.NDArray[np.generic]:
            a = get(name)
            if old_layout:
                return a.reshape(self.cap, w, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
            return a

        self.widx = cells("widx").astype(np.int64)
        self.rev = cells("rev").astype(np.int64)
        self.dirty = cells("dirty").astype(bool)
        self.hist = cells("hist").astype(np.uint16)
        self.hbase = cells("hbase").astype(np.int64)
        self.agg = AggArrays(*(cells("agg_" + f).copy() for f in FIELDS))  # type: ignore[arg-type]
        if prefix + "moments" not in snap:  # sum, mean and M2 as such: shift by the mean
            self.agg.sum = np.zeros(len(self.agg.sum))
            self.agg.m2 = np.where(self.agg.count > 0, self.agg.m2, 0.0)
            self.agg.mean = np.where(self.agg.count > 0, self.agg.mean, 0.0)
        self._map = np.full(len(self.widx), NO_CLAIM, np.int32)
        self._next_check = np.iinfo(np.int64).min
        codes = get("ssk_codes").astype(np.int64)
        counts = get("ssk_counts").astype(np.int64)
        if old_layout and len(codes):
            cell = codes >> 32
            codes = (((cell % w) * self.cap + cell // w) << 32) | (codes & 0xFFFFFFFF)
            order = np.argsort(codes)
            codes, counts = codes[order], counts[order]
        self.sparse_sketch.codes, self.sparse_sketch.counts = codes, counts
        self.overflow.restore(snap, prefix + "over_")

    @classmethod
    def from_snapshot(cls, snap: dict[str, npt.NDArray[np.generic]], prefix: str,
                      spec: WindowSpec, sketch: SketchParams,
                      percentiles: tuple[float, ...]) -> DenseFixedWindows:
        """The dense operator a checkpoint was written by, whatever ring size it had."""
        ring = int(snap[prefix + "W"][0])
        # a lateness that gives the checkpoint's ring: ceil((ring - 1) step / step) + 1 = ring
        op = cls(spec, allowed_lateness_ms=max(0, (ring - 1) * spec.step - spec.size_ms),
                 out_of_orderness_ms=0, sketch=sketch, percentiles=percentiles)
        if ring != op.W:
            raise ValueError(f"checkpoint holds window {spec.label!r} with {ring} cells per "
                             "series, fewer than one window needs")
        op.restore(snap, prefix)
        return op

    def hand_over(self, to: WindowOperator) -> None:
        """Every live window, ring and overflow, into ``to`` (a sparse operator of the same
        spec holding none of them), state and revision count as they are."""
        live = np.flatnonzero(self.widx != FREE)
        if len(live):
            s = live % self.cap
            start = self._starts(live)
            keys = to.key(self.series_dev[s], self.series_met[s],
                          (start - EPOCH_BASE_MS) // self.step)
            sk_keys, sk_counts, sk_offsets = self._sketches(live, live)
            to.adopt(keys, self._moments(self.agg.take(live)), self.rev[live].copy(),
                     self.dirty[live].copy(), start, sk_keys, sk_counts, sk_offsets)
        over = self.overflow
        if len(over.keys):
            to.adopt(over.keys, over.agg, over.rev, over.dirty, over.anchor,
                     *over.sketches.export(over.slot))


def _run(cells: I64) -> I64 | slice:
    """``cells`` (ascending, distinct) as a slice when they are one contiguous run."""
    if len(cells) and int(cells[-1]) - int(cells[0]) + 1 == len(cells):
        return slice(int(cells[0]), int(cells[-1]) + 1)
    return cells


def _concat(parts: list[WindowResults], nq: int) -> WindowResults:
    parts = [p for p in parts if len(p)]
    if not parts:
        e = np.empty(0, np.int64)
        return WindowResults(device=e, metric=e, start=e, width=e, rev=e, agg=AggArrays.empty(),
                             pct=np.empty((0, nq)), sk_keys=e, sk_counts=e,
                             sk_offsets=np.zeros(1, np.int64))
    if len(parts) == 1:
        return parts[0]
    cat = np.concatenate
    base = np.cumsum([0] + [int(p.sk_offsets[-1]) for p in parts[:-1]])
    return WindowResults(
        device=cat([p.device for p in parts]), metric=cat([p.metric for p in parts]),
        start=cat([p.start for p in parts]), width=cat([p.width for p in parts]),
        rev=cat([p.rev for p in parts]), agg=AggArrays.concat([p.agg for p in parts]),
        pct=cat([p.pct for p in parts]), sk_keys=cat([p.sk_keys for p in parts]),
        sk_counts=cat([p.sk_counts for p in parts]),
        sk_offsets=cat([[0]] + [p.sk_offsets[1:] + b for p, b in zip(parts, base,
                                                                     strict=True)]))
