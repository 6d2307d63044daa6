"""``shift``: level shifts and drifts, by a two-sided CUSUM of the window means.

Each window mean is standardised against a slow baseline (an exponentially weighted mean over
about ``memory`` windows, and a robust scale from the last ``history`` means with the noise
floor of ``cloud.detect.robust``), clipped to +-``clip`` so one spike cannot fake a shift, and
accumulated: ``S+ = max(0, S+ + z - drift)``, ``S- = max(0, S- - z - drift)``. A sustained
move of the level, sudden or gradual, grows one of the sums steadily; noise around the level
keeps both near 0. Severity is ``S / limit``; once a sum passes the limit the episode is
reported and the sums restart from 0 against the baseline, which by then has begun to follow
the new level.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import SHIFT_DOWN, SHIFT_UP, Frame, Verdict
from cloud.detect.robust import robust_scale
from cloud.detect.state import Column, StateArrays


class ShiftDetector:
    name: ClassVar[str] = "shift"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self, *, history: int = 60, memory: int = 200, min_history: int = 30,
                 drift: float = 0.5, limit: float = 12.0, clip: float = 4.0) -> None:
        if history < 3 or memory < 2 or not 2 <= min_history <= history:
            raise ValueError("shift needs history >= 3, memory >= 2, "
                             "2 <= min_history <= history")
        if drift < 0 or limit <= 0 or clip <= 0:
            raise ValueError("shift needs drift >= 0, limit > 0, clip > 0")
        self.history = history
        self.alpha = 1.0 / memory
        self.min_history = min_history
        self.drift = drift
        self.limit = limit
        self.clip = clip
        self.state = StateArrays({
            "ring": Column((history,), np.float64, np.nan),
            "base": Column((), np.float64, np.nan),
            "pos": Column((), np.float64, 0.0),
            "neg": Column((), np.float64, 0.0),
            "n": Column((), np.int64, 0),
        })

    def _step(self, f: Frame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        k = f.key
        _, scale = robust_scale(self.state["ring"][k], f.floor)
        base = self.state["base"][k]
        z = np.clip((f.mean - base) / scale, -self.clip, self.clip)
        z = np.nan_to_num(z, nan=0.0)
        pos = np.maximum(0.0, self.state["pos"][k] + z - self.drift)
        neg = np.maximum(0.0, self.state["neg"][k] - z - self.drift)
        return pos, neg, base, scale

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        rows = np.flatnonzero(self.state["n"][f.key] >= self.min_history)
        if not len(rows):
            return out
        g = f.take(rows)
        pos, neg, base, _ = self._step(g)
        up = pos >= neg
        out.severity[rows] = np.maximum(pos, neg) / self.limit
        out.direction[rows] = np.where(up, SHIFT_UP, SHIFT_DOWN)
        out.value[rows] = g.mean
        out.reference[rows] = base
        return out

    def learn(self, f: Frame) -> None:
        if not len(f):
            return
        k = f.key
        n = self.state["n"][k]
        ready = n >= self.min_history
        pos, neg, base, _ = self._step(f)
        fired = np.maximum(pos, neg) >= self.limit
        self.state["pos"][k] = np.where(ready & ~fired, pos, 0.0)
        self.state["neg"][k] = np.where(ready & ~fired, neg, 0.0)
        alpha = np.maximum(self.alpha, 1.0 / (n + 1))
        self.state["base"][k] = np.where(np.isnan(base), f.mean, base + alpha * (f.mean - base))
        self.state["ring"][k, n % self.history] = f.mean
        self.state["n"][k] = n + 1

