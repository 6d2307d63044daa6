"""``novelty``: a window that goes where the series has not been for a long time.

Two features per series, each judged as a record (``cloud.detect.records``) against its own
history of ``history`` windows:

* the window's extremes: its max above every earlier max, its min below every earlier min
  (spikes, dips, breaks of the usual range);
* the level: the median (``level_stat``) of the last ``smooth`` window means, above or below
  every earlier level (level shifts and slow drifts that stay inside the range of single
  windows, but not of its level; a median, so one spike does not move it). Its exceedance is
  measured in units of the windows' range divided by ``sqrt(smooth)`` (the range a level of
  ``smooth`` windows would have), not of its own history's range, which for a smooth series
  can be tiny; its margin is ``level_margin`` (default: ``margin``).

Severity is the exceedance divided by the margin, so 1.0 means "a new record by the margin".
A short history sets records easily (one window in ``h+1`` is the highest of ``h+1`` for any
noise), so while ``h < young`` the margin is widened by ``(young / h) ** young_power`` (for the
level, whose history holds fewer independent values, while ``h < young * smooth_young``). No
score before ``min_history`` windows. A record is learned at once (the same spike later is not new),
and the range before it is held as the reference of an excursion for up to ``hold`` windows
(``cloud.detect.records.Excursion``): a change that lasts keeps its alert open while it lasts.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import HIGH, LOW, SHIFT_DOWN, SHIFT_UP, Frame, Verdict
from cloud.detect.records import (
    Excursion,
    Records,
    excursion_columns,
    record_columns,
    young_margin,
)
from cloud.detect.state import Column, StateArrays


class NoveltyDetector:
    name: ClassVar[str] = "novelty"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self, *, history: int = 4000, blocks: int = 16, min_history: int = 60,
                 smooth: int = 12, margin: float = 0.02, young: int = 1000,
                 young_power: float = 0.5, hold: int = 20, smooth_young: float = 3.0,
                 level_stat: str = "median", level_margin: float | None = None) -> None:
        if not 2 <= smooth <= min_history or min_history >= history:
            raise ValueError("novelty needs 2 <= smooth <= min_history < history")
        if margin <= 0:
            raise ValueError("novelty.margin must be > 0")
        self.smooth = smooth
        self.min_history = min_history
        self.margin = margin
        self.young = young
        self.young_power = young_power
        self.smooth_young = smooth_young
        if level_stat not in ("mean", "median"):
            raise ValueError("novelty.level_stat must be mean or median")
        self.level_stat = level_stat
        self.level_margin = margin if level_margin is None else level_margin
        self.state = StateArrays({
            **record_columns("r", 2, blocks),  # feature 0: window max/min; 1: smoothed mean
            "ring": Column((smooth,), np.float64, np.nan),
            "n": Column((), np.int64, 0),
            **excursion_columns("x", 2),
        })
        self.records = Records(self.state, "r", history=history, blocks=blocks)
        self.excursion = Excursion(self.state, "x", hold=hold)

    def _smoothed(self, f: Frame) -> np.ndarray:
        """The level: of the last ``smooth - 1`` learned means and this window's, the mean
        (``level = "mean"``) or the median (``"median"``: one spike does not move it)."""
        ring = self.state["ring"][f.key].copy()
        pos = self.state["n"][f.key] % self.smooth
        ring[np.arange(len(f)), pos] = f.mean  # replaces the oldest
        if self.level_stat == "median":
            return np.asarray(np.median(ring, axis=1), np.float64)
        return np.asarray(ring.mean(axis=1), np.float64)

    def _judge(self, g: Frame) -> tuple[np.ndarray, ...]:
        """Exceedances of the rows of ``g`` (all ready) over the history and, where an
        excursion is held, over its reference: (severity, which, value, reference, record
        severity, history max, history min, back inside the reference)."""
        hmax, hmin = self.records.extrema(g.key)
        sm = self._smoothed(g)
        h = self.state["n"][g.key]
        # a young history widens the margin; the smoothed level's history holds fewer
        # independent values than the windows'
        margin = np.stack([
            young_margin(self.margin, h, self.young, self.young_power),
            young_margin(self.level_margin, h, self.young * self.smooth_young,
                         self.young_power)])

        def over(mx: np.ndarray, mn: np.ndarray) -> np.ndarray:
            rng0 = np.maximum(mx[:, 0] - mn[:, 0], g.floor)
            rng1 = rng0 / np.sqrt(self.smooth)
            with np.errstate(invalid="ignore"):
                return np.stack([(g.max - mx[:, 0]) / rng0, (mn[:, 0] - g.min) / rng0,
                                 (sm - mx[:, 1]) / rng1, (mn[:, 1] - sm) / rng1])

        m4 = margin[[0, 0, 1, 1]]  # (4, rows)
        cand = over(hmax, hmin) / m4  # (4, rows), in margins
        rmax, rmin, held = self.excursion.reference(g.key)
        cand_ref = np.where(held[None, :], over(rmax, rmin) / m4, np.nan)
        rec = np.maximum(np.nan_to_num(np.nanmax(np.nan_to_num(cand, nan=-np.inf), axis=0),
                                       nan=0.0, neginf=0.0), 0.0)
        both = np.fmax(cand, cand_ref)
        best = np.argmax(np.nan_to_num(both, nan=-np.inf), axis=0)
        e = both[best, np.arange(len(g))]
        sev = np.maximum(np.nan_to_num(e, nan=0.0), 0.0)
        ref_max = np.where(held[:, None], rmax, hmax)
        ref_min = np.where(held[:, None], rmin, hmin)
        value = np.choose(best, [g.max, g.min, sm, sm])
        ref = np.choose(best, [ref_max[:, 0], ref_min[:, 0], ref_max[:, 1], ref_min[:, 1]])
        inside = ~(np.nan_to_num(np.nanmax(np.nan_to_num(cand_ref, nan=-np.inf), axis=0),
                                 neginf=-1.0) > 0)
        return sev, best, value, ref, rec, hmax, hmin, inside

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        rows = np.flatnonzero(self.state["n"][f.key] >= self.min_history)
        if not len(rows):
            return out
        sev, best, value, ref, *_ = self._judge(f.take(rows))
        out.severity[rows] = sev
        out.direction[rows] = np.array([HIGH, LOW, SHIFT_UP, SHIFT_DOWN])[best]
        out.value[rows] = value
        out.reference[rows] = ref
        return out

    def learn(self, f: Frame) -> None:
        if not len(f):
            return
        rows = np.flatnonzero(self.state["n"][f.key] >= self.min_history)
        if len(rows):
            g = f.take(rows)
            _, _, _, _, rec, hmax, hmin, inside = self._judge(g)
            self.excursion.step(g.key, rec >= 1.0, hmax, hmin, inside)
        sm = self._smoothed(f)
        n = self.state["n"][f.key]
        sm = np.where(n >= self.smooth - 1, sm, np.nan)  # the smoothed mean needs a full ring
        self.state["ring"][f.key, n % self.smooth] = f.mean
        self.state["n"][f.key] = n + 1
        # feature 0 keeps maxima of window maxima and minima of window minima
        self.records.add(f.key, np.stack([f.max, sm], axis=1), np.stack([f.min, sm], axis=1))
