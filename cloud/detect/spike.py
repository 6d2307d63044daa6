"""``spike``: a reading far from the rest of its own window.

For windows of several readings, the excursions ``max - mean`` and ``mean - min`` are judged
against the series' recent excursions with a robust z-score (median and MAD of the last
``history`` windows, scale floored as in ``cloud.detect.robust``). A spike shows as an
excursion long before it moves a mean, and excursions do not drift with the slow wander of
the signal (daily cycle, random walk), so they stay sharp. Windows of one or two readings
carry no excursion and are left to the other detectors.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import HIGH, LOW, Frame, Verdict
from cloud.detect.robust import robust_scale
from cloud.detect.state import Column, StateArrays


class SpikeDetector:
    name: ClassVar[str] = "spike"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self, *, history: int = 60, min_history: int = 20,
                 threshold: float = 12.0, min_count: int = 3, refresh: int = 5) -> None:
        if history < 3 or not 2 <= min_history <= history or threshold <= 0:
            raise ValueError("spike needs history >= 3, 2 <= min_history <= history, "
                             "threshold > 0")
        self.history = history
        self.min_history = min_history
        self.threshold = threshold
        self.min_count = min_count
        self.refresh = refresh
        self.state = StateArrays({
            "up": Column((history,), np.float64, np.nan),
            "down": Column((history,), np.float64, np.nan),
            "n": Column((), np.int64, 0),
            # median and scale of the rings, recomputed every ``refresh`` windows (they move
            # slowly; sorting 60 numbers per series and window is the stage's largest cost)
            "stats": Column((4,), np.float64, np.nan),
        })

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        ready = (self.state["n"][f.key] >= self.min_history) & (f.count >= self.min_count)
        rows = np.flatnonzero(ready)
        if not len(rows):
            return out
        g = f.take(rows)
        st = self.state["stats"][g.key]
        med_u, med_d = st[:, 0], st[:, 2]
        sc_u = np.maximum(st[:, 1], g.floor)
        sc_d = np.maximum(st[:, 3], g.floor)
        zu = (g.max - g.mean - med_u) / sc_u
        zd = (g.mean - g.min - med_d) / sc_d
        high = zu >= zd
        z = np.where(high, zu, zd)
        out.severity[rows] = np.maximum(z, 0.0) / self.threshold
        out.direction[rows] = np.where(high, HIGH, LOW)
        out.value[rows] = np.where(high, g.max, g.min)
        out.reference[rows] = np.where(high, g.mean + med_u, g.mean - med_d)
        return out

    def learn(self, f: Frame) -> None:
        g = f.take(np.flatnonzero(f.count >= self.min_count))
        if not len(g):
            return
        n = self.state["n"][g.key]
        pos = n % self.history
        self.state["up"][g.key, pos] = g.max - g.mean
        self.state["down"][g.key, pos] = g.mean - g.min
        self.state["n"][g.key] = n + 1
        due = ((n + 1) % self.refresh == 0) | (n + 1 <= self.min_history)
        if due.any():
            k = g.key[due]
            floor = g.floor[due]
            med_u, sc_u = robust_scale(self.state["up"][k], floor)
            med_d, sc_d = robust_scale(self.state["down"][k], floor)
            self.state["stats"][k] = np.stack([med_u, sc_u, med_d, sc_d], axis=1)
