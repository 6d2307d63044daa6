"""``seasonal``: a window unlike the same time of day (and day of week) in the past.

The baseline is a profile by event time: ``bins`` slots per day, kept twice — per time of day,
and per time of day *and* weekday — each an exponentially weighted mean of the window means
that fell into it over the last ``memory_days`` days. The weekly slot is used once it has been
seen (a week of data), the daily one before. Windows keep their data time end to end, so a
replay at any speed lands in the same slots.

The residual (window mean minus baseline), smoothed over the last ``smooth`` windows, is then
judged as a record (``cloud.detect.records``): a day whose shape departs from every earlier
day by more than ``margin`` of the residuals' usual range. A holiday's traffic, a heating
schedule that did not run, a daily peak that came at the wrong hour. Residuals start after
``min_days`` days of data and are judged once they span a whole day themselves (every time of
day has shown how well the profile fits it); a young history widens the margin by
``(young / h) ** young_power``, as in ``novelty``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import PATTERN, Frame, Verdict
from cloud.detect.records import Records, exceedance, record_columns, young_margin
from cloud.detect.state import Column, StateArrays
from devices.readings import I64

DAY_MS = 86_400_000
WEEK_DAYS = 7
EPOCH_WEEKDAY = 3  # 1970-01-01 was a Thursday (Monday = 0)


class SeasonalDetector:
    name: ClassVar[str] = "seasonal"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self, *, bins: int = 48, memory_days: float = 14.0, smooth: int = 6,
                 history: int = 4000, blocks: int = 16, min_days: float = 1.0,
                 min_history: int = 60, margin: float = 0.05, young: int = 1000,
                 young_power: float = 1.0, level_stat: str = "median") -> None:
        if bins < 1 or DAY_MS % bins:
            raise ValueError("seasonal.bins must divide a day into whole milliseconds")
        if smooth < 1 or memory_days <= 0 or margin <= 0 or min_days < 1:
            raise ValueError("seasonal needs smooth >= 1, memory_days > 0, margin > 0, "
                             "min_days >= 1")
        self.bins = bins
        self.bin_ms = DAY_MS // bins
        self.memory_days = memory_days
        self.smooth = smooth
        self.min_days = min_days
        self.min_history = min_history
        self.margin = margin
        self.young = young
        self.young_power = young_power
        if level_stat not in ("mean", "median"):
            raise ValueError("seasonal.level_stat must be mean or median")
        self.level_stat = level_stat
        self.state = StateArrays({
            "day": Column((bins,), np.float64, np.nan),
            "day_w": Column((bins,), np.float64, 0.0),  # windows folded into each slot
            "week": Column((WEEK_DAYS * bins,), np.float64, np.nan),
            "week_w": Column((WEEK_DAYS * bins,), np.float64, 0.0),
            "first": Column((), np.int64, -1),  # event time of the first window
            "first_resid": Column((), np.int64, -1),  # ... and of the first residual
            "ring": Column((smooth,), np.float64, np.nan),
            "n": Column((), np.int64, 0),  # residuals learned
            **record_columns("r", 1, blocks),
        })
        self.records = Records(self.state, "r", history=history, blocks=blocks)

    def _slots(self, start: I64) -> tuple[I64, I64]:
        day_slot = (start % DAY_MS) // self.bin_ms
        weekday = (start // DAY_MS + EPOCH_WEEKDAY) % WEEK_DAYS
        return day_slot, weekday * self.bins + day_slot

    def _residual(self, f: Frame) -> np.ndarray:
        ds, ws = self._slots(f.start)
        k = f.key
        day = self.state["day"][k, ds]
        week = self.state["week"][k, ws]
        base = np.where(self.state["week_w"][k, ws] > 0, week, day)
        first = self.state["first"][k]
        old_enough = (first >= 0) & (f.start - first >= self.min_days * DAY_MS)
        return np.where(old_enough, f.mean - base, np.nan)

    def _smoothed(self, f: Frame, resid: np.ndarray) -> np.ndarray:
        ring = self.state["ring"][f.key]
        pos = self.state["n"][f.key] % self.smooth
        keep = ring.copy()
        keep[np.arange(len(f)), pos] = resid
        full = self.state["n"][f.key] >= self.smooth - 1
        stat = np.median(keep, axis=1) if self.level_stat == "median" else np.mean(keep, axis=1)
        return np.where(full, stat, np.nan)

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        fr = self.state["first_resid"][f.key]
        ready = ((self.state["n"][f.key] >= self.min_history) & (fr >= 0)
                 & (f.start - fr >= DAY_MS))
        rows = np.flatnonzero(ready)
        if not len(rows):
            return out
        g = f.take(rows)
        resid = self._residual(g)
        sm = self._smoothed(g, resid)
        hmax, hmin = self.records.extrema(g.key)
        up, down = exceedance(sm, hmax[:, 0], hmin[:, 0], g.floor)
        margin = young_margin(self.margin, self.state["n"][g.key], self.young, self.young_power)
        out.severity[rows] = np.maximum(np.nan_to_num(np.fmax(up, down), nan=0.0), 0.0) / margin
        out.direction[rows] = PATTERN
        out.value[rows] = g.mean
        out.reference[rows] = g.mean - resid
        return out

    def learn(self, f: Frame) -> None:
        if not len(f):
            return
        k = f.key
        first = self.state["first"]
        first[k] = np.where(first[k] < 0, f.start, first[k])
        resid = self._residual(f)
        has = np.isfinite(resid)
        if has.any():
            g = f.take(np.flatnonzero(has))
            r = resid[has]
            fr = self.state["first_resid"]
            fr[g.key] = np.where(fr[g.key] < 0, g.start, fr[g.key])
            sm = self._smoothed(g, r)
            n = self.state["n"][g.key]
            self.state["ring"][g.key, n % self.smooth] = r
            self.state["n"][g.key] = n + 1
            self.records.add(g.key, sm[:, None])
        # fold the window into its profile slots (after judging it against them)
        ds, ws = self._slots(f.start)
        per_slot = np.maximum(self.bin_ms / np.maximum(f.width, 1), 1.0)  # windows per slot/day
        for name, slot in (("day", ds), ("week", ws)):
            days = self.memory_days if name == "day" else self.memory_days / WEEK_DAYS * 3
            w = self.state[name + "_w"][k, slot] + 1.0
            alpha = np.maximum(1.0 / w, 1.0 / (per_slot * max(days, 1.0)))
            cur = self.state[name][k, slot]
            self.state[name][k, slot] = np.where(np.isnan(cur), f.mean,
                                                 cur + alpha * (f.mean - cur))
            self.state[name + "_w"][k, slot] = w
