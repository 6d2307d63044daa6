"""``stuck``: a sensor that stopped moving.

A window is *still* when its readings do not move (several readings with zero spread) or, for
windows of one reading, when its value equals the previous window's exactly. A series whose
windows are rarely still (fewer than ``usual`` of them, by an exponentially weighted rate over
about ``memory`` windows) and that has now been still for ``windows`` windows in a row is
reported stuck (a frozen sensor, a gateway repeating its last value). A series that is often
flat by nature (a closed valve, a quantised idle CPU) is not.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import STUCK, Frame, Verdict
from cloud.detect.state import Column, StateArrays


class StuckDetector:
    name: ClassVar[str] = "stuck"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self, *, windows: int = 30, usual: float = 0.05, memory: int = 500,
                 min_history: int = 60) -> None:
        if windows < 2 or not 0 < usual < 1 or memory < 2 or min_history < 2:
            raise ValueError("stuck needs windows >= 2, 0 < usual < 1, memory >= 2, "
                             "min_history >= 2")
        self.windows = windows
        self.usual = usual
        self.alpha = 1.0 / memory
        self.min_history = min_history
        self.state = StateArrays({
            "last": Column((), np.float64, np.nan),
            "run": Column((), np.int64, 0),
            "rate": Column((), np.float64, 0.0),  # how often the series is still
            "n": Column((), np.int64, 0),
        })

    def _still(self, f: Frame) -> np.ndarray:
        spread_zero = (f.count >= 2) & (f.max == f.min)
        same = (f.count < 2) & (f.mean == self.state["last"][f.key])
        return np.asarray(spread_zero | same)

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        k = f.key
        still = self._still(f)
        run = np.where(still, self.state["run"][k] + 1, 0)
        usual = self.state["rate"][k] < self.usual
        ready = (self.state["n"][k] >= self.min_history) & usual
        out.severity[:] = np.where(ready, run / self.windows, 0.0)
        out.direction[:] = STUCK
        out.value[:] = f.mean
        out.reference[:] = self.state["last"][k]
        return out

    def learn(self, f: Frame) -> None:
        if not len(f):
            return
        k = f.key
        still = self._still(f)
        run = np.where(still, self.state["run"][k] + 1, 0)
        # the usual rate: every window of the warm-up counts (an average); after it, a still
        # window counts only once its run has ended short of ``windows`` (a stuck stretch must
        # not make stillness usual)
        n = self.state["n"][k]
        prev_run = self.state["run"][k]
        warm = n < self.min_history
        rate = self.state["rate"][k]
        a = np.where(warm, 1.0 / (n + 1), self.alpha)
        ended = ~warm & ~still & (prev_run > 0) & (prev_run < self.windows)
        rate = np.where(ended, rate + a * prev_run * (1.0 - rate), rate)
        rate = np.where(warm, rate + a * (still - rate),
                        np.where(still, rate, rate + a * (0.0 - rate)))
        self.state["rate"][k] = np.clip(rate, 0.0, 1.0)
        self.state["run"][k] = run
        self.state["last"][k] = f.mean
        self.state["n"][k] += 1
