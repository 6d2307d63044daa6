"""Mergeable quantile sketches for window percentiles, vectorised (DDSketch's log buckets).

A value ``x`` falls in bucket ``k(x)``: ``0`` for ``|x| < MIN_VALUE``, otherwise
``sign(x) * (ceil(log_gamma |x|) + OFFSET)`` with ``gamma = (1 + alpha) / (1 - alpha)``. Bucket
keys are ordered like the values, a bucket's representative value ``2 gamma^i / (gamma + 1)`` is
within a relative ``alpha`` of every value in it, and a sketch is just ``{key: count}``:

* **Guarantee**: the estimate of the q-quantile (the element of rank ``floor(q (n - 1))``, 0-based,
  of the window's readings) is within ``alpha * |x_q|`` of the exact value; values with
  ``|x| < MIN_VALUE`` are reported as 0.
* **Merging is exact**: the sketch of a union is the sum of the counts, whatever the split, so
  late readings, micro-batches and cloud-side roll-ups give the same sketch.
* **Size**: one (key, count) pair per distinct bucket; values spanning a factor F need about
  ``ln F / ln gamma`` buckets (~115 per decade at 1 %). Windows of sensor data hold a handful.

The store keeps the sketches of every open window in one sorted array of codes
``slot << 32 | (key + 2^31)`` (``slot`` is the window's stable id) with a parallel count array,
so adding a micro-batch is one ``unique`` and one ``searchsorted``, with no Python per reading.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64

MIN_VALUE = 1e-9
KEY_BIAS = 1 << 31


@dataclass(frozen=True)
class SketchParams:
    alpha: float = 0.01  # relative accuracy

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"sketch relative accuracy must be in (0, 0.5), got {self.alpha}")

    @property
    def gamma(self) -> float:
        return (1 + self.alpha) / (1 - self.alpha)

    @property
    def offset(self) -> int:
        """Shifts ceil(log_gamma MIN_VALUE) up to 1 so positive and negative keys never meet 0."""
        return 1 - int(np.ceil(np.log(MIN_VALUE) / np.log(self.gamma)))

    def keys(self, values: F64) -> I64:
        if len(values) and values.min() >= MIN_VALUE:  # the common case: positive readings
            k = np.ceil(np.log(values) * (1.0 / np.log(self.gamma)))
            return np.asarray(k.astype(np.int64) + self.offset, dtype=np.int64)
        mag = np.abs(values)
        small = mag < MIN_VALUE
        with np.errstate(divide="ignore"):
            k = np.ceil(np.log(np.where(small, 1.0, mag)) * (1.0 / np.log(self.gamma))).astype(
                np.int64)
        k = k + self.offset
        return np.where(small, 0, np.where(values < 0, -k, k)).astype(np.int64)

    def values(self, keys: I64) -> F64:
        """Representative value of each bucket key."""
        table = self._table
        r = len(table) // 2
        if len(keys) and -r <= keys.min() and keys.max() <= r:  # |values| up to ~1e15
            return table[keys + r]
        return self._values(keys)

    def _values(self, keys: I64) -> F64:
        g = self.gamma
        mag = 2.0 * np.power(g, np.abs(keys) - self.offset) / (g + 1.0)
        return np.where(keys == 0, 0.0, np.sign(keys) * mag)

    @functools.cached_property
    def _table(self) -> F64:
        """``_values`` of the keys of magnitudes up to 1e15 (a lookup is 10x a power)."""
        r = int(self.offset + np.ceil(np.log(1e15) / np.log(self.gamma)))
        return self._values(np.arange(-r, r + 1, dtype=np.int64))


def quantiles_from_counts(params: SketchParams, keys: I64, counts: I64, offsets: I64,
                          qs: list[float]) -> F64:
    """Quantiles for several sketches in flat form.

    Sketch j is ``keys[offsets[j]:offsets[j+1]]`` (ascending) with their counts. Returns an array
    of shape (number of sketches, len(qs)); NaN for an empty sketch.
    """
    n_sk = len(offsets) - 1
    out = np.full((n_sk, len(qs)), np.nan)
    if n_sk == 0 or len(keys) == 0:
        return out
    cum = np.cumsum(counts)
    before = np.concatenate(([0], cum))[offsets[:-1]]  # total count before each sketch
    total = cum[np.maximum(offsets[1:] - 1, 0)] - before
    nonempty = offsets[1:] > offsets[:-1]
    every = bool(nonempty.all())
    last = len(keys) - 1
    pos: I64 | None = None
    for j in sorted(range(len(qs)), key=lambda i: qs[i]):  # ascending: each answer is at or
        rank = np.floor(qs[j] * (total - 1)).astype(np.int64)  # after the previous one
        target = before + rank + 1  # first bucket whose cumulative count reaches rank+1
        if pos is None:
            pos = np.asarray(np.searchsorted(cum, target, side="left"), np.int64)
        else:  # a few steps forward from the lower quantile's bucket, then a search
            pos = pos.copy()
            act = np.flatnonzero(cum[np.minimum(pos, last)] < target)
            for _ in range(3):
                if len(act) == 0:
                    break
                pos[act] += 1
                act = act[cum[np.minimum(pos[act], last)] < target[act]]
            if len(act):
                pos[act] = np.searchsorted(cum, target[act], side="left")
        at = np.minimum(pos, last)
        if every:
            out[:, j] = params.values(keys[at])
        else:
            out[nonempty, j] = params.values(keys[at[nonempty]])
    return out


class SketchStore:
    """The sketches of many windows, addressed by slot id."""

    def __init__(self, params: SketchParams) -> None:
        self.params = params
        self.codes: I64 = np.empty(0, np.int64)
        self.counts: I64 = np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.codes)

    def add(self, slots: I64, keys: I64, counts: I64 | None = None, *,
            presorted: bool = False) -> None:
        """Add ``counts`` (default 1) of ``keys`` to the sketches of ``slots`` (row-aligned).

        ``presorted``: rows come grouped by window, so a stable sort is near-linear.
        """
        if len(slots) == 0:
            return
        codes = (slots << 32) | (keys + KEY_BIAS)
        order = np.argsort(codes, kind="stable" if presorted else "quicksort")
        c = codes[order]
        first = np.empty(len(c), bool)
        first[0] = True
        np.not_equal(c[1:], c[:-1], out=first[1:])
        uniq = c[first]
        starts = np.flatnonzero(first)
        if counts is None:
            add = np.diff(np.append(starts, len(c))).astype(np.int64)
        else:
            add = np.add.reduceat(counts[order], starts).astype(np.int64)
        pos: I64 = np.asarray(np.searchsorted(self.codes, uniq), dtype=np.int64)
        hit = pos < len(self.codes)
        hit[hit] = self.codes[pos[hit]] == uniq[hit]
        if hit.any():
            self.counts[pos[hit]] += add[hit]
        if not hit.all():
            miss = ~hit
            self.codes = np.insert(self.codes, pos[miss], uniq[miss])
            self.counts = np.insert(self.counts, pos[miss], add[miss])

    def _mask(self, slots: I64) -> npt.NDArray[np.bool_]:
        return np.isin(self.codes >> 32, slots)

    def drop(self, slots: I64) -> None:
        if len(slots) and len(self.codes):
            keep = ~self._mask(slots)
            self.codes = self.codes[keep]
            self.counts = self.counts[keep]

    def move(self, src: I64, dst: I64) -> None:
        """Merge the sketch of ``src[i]`` into ``dst[i]`` (sessions merging), emptying ``src``."""
        if len(src) == 0 or len(self.codes) == 0:
            return
        mapping = dict(zip(src.tolist(), dst.tolist(), strict=True))
        sel = self._mask(src)
        if not sel.any():
            return
        codes = self.codes[sel]
        counts = self.counts[sel]
        old = codes >> 32
        new = np.array([mapping[s] for s in old.tolist()], np.int64)
        keys = (codes & 0xFFFFFFFF) - KEY_BIAS
        self.codes = self.codes[~sel]
        self.counts = self.counts[~sel]
        self.add(new, keys, counts)

    def rekey(self, old: SketchParams) -> None:
        """Buckets written with ``old`` accuracy, moved to this store's (a checkpoint of
        another ``sketch_accuracy``): each bucket's representative value lands in its new
        bucket, so the error bound becomes old + new accuracy for what was there."""
        if old == self.params or len(self.codes) == 0:
            return
        slots = self.codes >> 32
        values = old.values((self.codes & 0xFFFFFFFF) - KEY_BIAS)
        counts = self.counts
        self.codes = np.empty(0, np.int64)
        self.counts = np.empty(0, np.int64)
        self.add(slots, self.params.keys(values), counts)

    def export(self, slots: I64) -> tuple[I64, I64, I64]:
        """Flat form of the sketches of ``slots`` (in that order): keys, counts, offsets."""
        if len(slots) == 0 or len(self.codes) == 0:
            return (np.empty(0, np.int64), np.empty(0, np.int64),
                    np.zeros(len(slots) + 1, np.int64))
        sel = self._mask(slots)
        codes = self.codes[sel]
        counts = self.counts[sel]
        slot_of = codes >> 32
        # order the selected entries by the requested slot order, keys ascending within
        order_slots = np.argsort(slots)
        req = order_slots[np.searchsorted(slots[order_slots], slot_of)]  # row of each entry
        order = np.lexsort((codes & 0xFFFFFFFF, req))
        keys = ((codes & 0xFFFFFFFF) - KEY_BIAS)[order]
        offsets = np.concatenate(([0], np.cumsum(np.bincount(req, minlength=len(slots)))))
        return keys, counts[order], offsets.astype(np.int64)

    def quantiles(self, slots: I64, qs: list[float]) -> F64:
        keys, counts, offsets = self.export(slots)
        return quantiles_from_counts(self.params, keys, counts, offsets, qs)
