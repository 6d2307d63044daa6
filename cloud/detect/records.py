"""Record-breaking statistics: is this value beyond everything the series showed over its last
``history`` windows, by more than a margin of that history's range?

A record is a rank statistic, so it needs no distributional assumption: it behaves the same on
heavy-tailed counts, quantised percentages and smooth temperatures, and a periodic spike that
the history already holds is not new. Under exchangeable noise the chance that a window sets a
record over ``h`` windows is 1/(h+1), and far less with a margin, which is what keeps false
alarms rare on long streams.

The history is kept as ``blocks`` block extrema per feature: the record is checked against the
last ``history - history/blocks`` to ``history`` windows, in O(blocks) time and memory per
series, whatever ``history`` is.
"""

from __future__ import annotations

import numpy as np

from cloud.detect.state import Column, StateArrays
from devices.readings import F64, I64


def record_columns(prefix: str, features: int, blocks: int) -> dict[str, Column]:
    return {
        f"{prefix}max": Column((blocks, features), np.float64, -np.inf),
        f"{prefix}min": Column((blocks, features), np.float64, np.inf),
        f"{prefix}blk": Column((), np.int64, 0),  # current block
        f"{prefix}fill": Column((), np.int64, 0),  # windows in the current block
    }


class Records:
    """Block extrema of ``features`` values per series, over a sliding history of windows."""

    def __init__(self, state: StateArrays, prefix: str, *, history: int, blocks: int) -> None:
        if blocks < 2 or history < 2 * blocks:
            raise ValueError("records need blocks >= 2 and history >= 2 * blocks")
        self.a = state
        self.p = prefix
        self.blocks = blocks
        self.block_size = history // blocks

    def extrema(self, sid: I64) -> tuple[F64, F64]:
        """History max and min of every feature: (rows, features) each."""
        return (self.a[self.p + "max"][sid].max(axis=1),
                self.a[self.p + "min"][sid].min(axis=1))

    def add(self, sid: I64, high: F64, low: F64 | None = None) -> None:
        """Fold (rows, features) values in: ``high`` into the maxima, ``low`` (default: the
        same values) into the minima; NaN leaves a feature untouched."""
        mx, mn = self.a[self.p + "max"], self.a[self.p + "min"]
        blk = self.a[self.p + "blk"][sid]
        mx[sid, blk] = np.fmax(mx[sid, blk], high)
        mn[sid, blk] = np.fmin(mn[sid, blk], high if low is None else low)
        fill = self.a[self.p + "fill"]
        fill[sid] += 1
        full = sid[fill[sid] >= self.block_size]
        if len(full):
            nxt = (self.a[self.p + "blk"][full] + 1) % self.blocks
            self.a[self.p + "blk"][full] = nxt
            fill[full] = 0
            mx[full, nxt] = -np.inf
            mn[full, nxt] = np.inf


def exceedance(value: F64, hist_max: F64, hist_min: F64, floor: F64) -> tuple[F64, F64]:
    """How far ``value`` lies above the history's max and below its min, in units of the
    history's range (never below ``floor``); negative inside the range, NaN without history."""
    rng = np.maximum(hist_max - hist_min, floor)
    with np.errstate(invalid="ignore"):
        up = (value - hist_max) / rng
        down = (hist_min - value) / rng
    return up, down


def young_margin(margin: float, history: I64, young: float, power: float) -> F64:
    """The margin a record must pass, widened while the history of ``history`` windows is
    young: ``margin * (young / h) ** power`` below ``young`` windows."""
    return np.asarray(margin * np.maximum(1.0, young / np.maximum(history, 1)) ** power,
                      np.float64)


def excursion_columns(prefix: str, features: int) -> dict[str, Column]:
    return {
        f"{prefix}ref_max": Column((features,), np.float64, np.nan),
        f"{prefix}ref_min": Column((features,), np.float64, np.nan),
        f"{prefix}left": Column((), np.int64, 0),  # windows the excursion is still held
    }


class Excursion:
    """Holds an episode open while the series stays beyond the range it had before.

    A record is learned at once (so the same spike, seen again later, is not new), which alone
    would let an alert on a lasting change close after one window. So when a window sets a
    record, the history's extrema *before* it are kept as the reference; the following windows
    are judged against that reference too, until one is back inside it or ``hold`` windows
    have passed (by then the new state is the new normal). A spike ends its excursion with
    the next window; a valve left closed, or a level that moved, holds it.
    """

    def __init__(self, state: StateArrays, prefix: str, *, hold: int) -> None:
        self.s = state
        self.p = prefix
        self.hold = hold

    def reference(self, sid: I64) -> tuple[F64, F64, np.ndarray]:
        """Reference max/min per feature and whether an excursion is held, per row."""
        held = self.s[self.p + "left"][sid] > 0
        return self.s[self.p + "ref_max"][sid], self.s[self.p + "ref_min"][sid], held

    def step(self, sid: I64, opens: np.ndarray, hist_max: F64, hist_min: F64,
             back_inside: np.ndarray) -> None:
        """After judging a round: start excursions where ``opens`` (keeping the history's
        extrema as they were), end those whose window is ``back_inside``, count the rest."""
        left = self.s[self.p + "left"]
        held = left[sid] > 0
        start = opens & ~held
        end = held & back_inside
        rmax, rmin = self.s[self.p + "ref_max"], self.s[self.p + "ref_min"]
        rmax[sid[start]] = hist_max[start]
        rmin[sid[start]] = hist_min[start]
        left[sid] = np.where(start, self.hold, np.where(end, 0, np.maximum(left[sid] - 1, 0)))
        gone = sid[left[sid] == 0]
        rmax[gone] = np.nan
        rmin[gone] = np.nan
