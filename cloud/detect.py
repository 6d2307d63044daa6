"""Anomaly detection on enriched window results.

The detector contract has two methods, as in River: ``score`` judges rows against what the
detector knows, ``learn`` folds rows into that knowledge. Detectors are kept per (device, metric,
window spec) and keyed by window start, so a revised result *replaces* what was learned from the
earlier revision: a detector never learns twice from one window.

Built in, by config name (``DETECTORS``):

* ``threshold``: the registry's alarm limits, checked against the window's max and min.
* ``robust_z``: robust z-scores (median and MAD over the last ``history`` windows) of the
  window's excursions above and below its own mean (``max - mean``, ``mean - min``) and of its
  mean. A spike shows as an excursion long before it moves a mean, and excursions do not drift
  with the slow wander of the signal (daily cycle, random walk), so they stay sharp; level shifts
  and drifts show in the mean. Scores are only given once ``min_history`` windows are known.

Detection is vectorised per batch; when a batch holds several windows of one series (a replay
after an outage) they are taken in rounds, oldest first, so each is judged against its past.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from cloud.enrich import EnrichedResults
from devices.readings import F64, I64

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True, kw_only=True)
class Anomaly:
    row: int  # index into the EnrichedResults it came from
    detector: str
    direction: str  # high | low | level
    score: float
    value: float
    reference: float  # the limit or the typical value it was judged against
    message: str


class Detector(Protocol):
    name: str

    def score(self, rows: EnrichedResults, idx: I64) -> list[Anomaly]: ...

    def learn(self, rows: EnrichedResults, idx: I64) -> None: ...


class ThresholdDetector:
    """Registry limits: the window's max above ``high`` or its min below ``low``."""

    name = "threshold"

    def score(self, rows: EnrichedResults, idx: I64) -> list[Anomaly]:
        out: list[Anomaly] = []
        with np.errstate(invalid="ignore"):
            over = rows.max[idx] > rows.high[idx]
            under = rows.min[idx] < rows.low[idx]
        for i in idx[over].tolist():
            out.append(Anomaly(
                row=i, detector=self.name, direction="high",
                score=float((rows.max[i] - rows.high[i]) / rows.scale_floor[i]),
                value=float(rows.max[i]), reference=float(rows.high[i]),
                message=f"{rows.metric[i]} max {rows.max[i]:.3g} above limit {rows.high[i]:.3g}",
            ))
        for i in idx[under & ~over].tolist():
            out.append(Anomaly(
                row=i, detector=self.name, direction="low",
                score=float((rows.low[i] - rows.min[i]) / rows.scale_floor[i]),
                value=float(rows.min[i]), reference=float(rows.low[i]),
                message=f"{rows.metric[i]} min {rows.min[i]:.3g} below limit {rows.low[i]:.3g}",
            ))
        return out

    def learn(self, rows: EnrichedResults, idx: I64) -> None:
        """Limits come from the registry; there is nothing to learn."""


class RobustZDetector:
    """Median/MAD z-scores of a window's excursions and mean against the series' recent
    windows."""

    name = "robust_z"

    def __init__(self, *, history: int = 60, min_history: int = 20,
                 threshold: float = 8.0) -> None:
        if history < 3 or not 2 <= min_history <= history or threshold <= 0:
            raise ValueError("robust_z needs history >= 3, 2 <= min_history <= history, "
                             "threshold > 0")
        self.history = history
        self.min_history = min_history
        self.threshold = threshold
        self._slots: dict[tuple[str, str, str], int] = {}
        self._starts = np.full((0, history), -1, np.int64)
        self._vals = np.full((3, 0, history), np.nan)  # excursion up, down, mean
        self._pos = np.zeros(0, np.int64)

    def _slot_of(self, rows: EnrichedResults, idx: I64) -> I64:
        slots = np.empty(len(idx), np.int64)
        for j, i in enumerate(idx.tolist()):
            key = (rows.device[i], rows.metric[i], rows.window[i])
            s = self._slots.get(key)
            if s is None:
                s = len(self._slots)
                self._slots[key] = s
            slots[j] = s
        n = len(self._slots)
        if n > len(self._pos):
            grow = max(n, 2 * len(self._pos), 64)
            starts = np.full((grow, self.history), -1, np.int64)
            starts[: len(self._pos)] = self._starts
            vals = np.full((3, grow, self.history), np.nan)
            vals[:, : len(self._pos)] = self._vals
            pos = np.zeros(grow, np.int64)
            pos[: len(self._pos)] = self._pos
            self._starts, self._vals, self._pos = starts, vals, pos
        return slots

    def score(self, rows: EnrichedResults, idx: I64) -> list[Anomaly]:
        if len(idx) == 0:
            return []
        slots = self._slot_of(rows, idx)
        same = self._starts[slots] == rows.start[idx][:, None]  # the window's own earlier rev
        hist = np.where(same[None], np.nan, self._vals[:, slots])  # (3, k, H)
        n_valid = (~np.isnan(hist[0])).sum(axis=1)
        ready = n_valid >= self.min_history
        if not ready.any():
            return []
        h = hist[:, ready]
        nv = n_valid[ready]
        med = _nanmedian_rows(h, nv)  # (3, r)
        mad = _nanmedian_rows(np.abs(h - med[:, :, None]), nv) * MAD_TO_SIGMA
        r_idx = idx[ready]
        floor = rows.scale_floor[r_idx]
        scale = np.maximum(mad, floor[None, :])
        feats = self._features(rows, r_idx)
        z = np.stack([
            (feats[0] - med[0]) / scale[0],  # excursion above the window's mean
            (feats[1] - med[1]) / scale[1],  # excursion below it
            np.abs(feats[2] - med[2]) / scale[2],  # level
        ])
        best = np.argmax(z, axis=0)
        best_z = z[best, np.arange(z.shape[1])]
        out: list[Anomaly] = []
        for j in np.flatnonzero(best_z > self.threshold).tolist():
            i = int(r_idx[j])
            which = int(best[j])
            value = (rows.max[i], rows.min[i], rows.mean[i])[which]
            # the typical value: the window's mean plus a typical excursion, or a typical mean
            ref = float((rows.mean[i] + med[0, j], rows.mean[i] - med[1, j], med[2, j])[which])
            what = ("max", "min", "mean")[which]
            out.append(Anomaly(
                row=i, detector=self.name,
                direction=("high", "low", "level")[which],
                score=float(best_z[j]), value=float(value), reference=ref,
                message=f"{rows.metric[i]} {what} {value:.4g} vs typical {ref:.4g} "
                        f"(robust z {best_z[j]:.1f})",
            ))
        return out

    def learn(self, rows: EnrichedResults, idx: I64) -> None:
        if len(idx) == 0:
            return
        slots = self._slot_of(rows, idx)
        start = rows.start[idx]
        same = self._starts[slots] == start[:, None]
        has = same.any(axis=1)
        col = np.where(has, np.argmax(same, axis=1), self._pos[slots])
        self._starts[slots, col] = start
        feats = self._features(rows, idx)
        self._vals[0, slots, col] = feats[0]
        self._vals[1, slots, col] = feats[1]
        self._vals[2, slots, col] = feats[2]
        adv = slots[~has]
        self._pos[adv] = (self._pos[adv] + 1) % self.history

    @staticmethod
    def _features(rows: EnrichedResults, idx: I64) -> F64:
        """(max - mean, mean - min, mean) of each row."""
        mean = rows.mean[idx]
        return np.stack([rows.max[idx] - mean, mean - rows.min[idx], mean])

    @property
    def series(self) -> int:
        return len(self._slots)


def _nanmedian_rows(a: F64, n_valid: I64) -> F64:
    """Median along the last axis ignoring NaN, where each row holds ``n_valid`` numbers.

    np.nanmedian takes a slow masked path for small arrays; sorting puts NaN last, so the
    median is the middle of the first ``n_valid`` entries of each row.
    """
    s = np.sort(a, axis=-1)
    lo = ((n_valid - 1) // 2)[None, :, None]
    hi = (n_valid // 2)[None, :, None]
    lo = np.broadcast_to(lo, (*a.shape[:-1], 1))
    hi = np.broadcast_to(hi, (*a.shape[:-1], 1))
    out = 0.5 * (np.take_along_axis(s, lo, axis=-1) + np.take_along_axis(s, hi, axis=-1))
    return np.asarray(out[..., 0], dtype=np.float64)


DETECTORS: dict[str, Callable[..., Detector]] = {
    "threshold": ThresholdDetector,
    "robust_z": RobustZDetector,
}


def rounds(rows: EnrichedResults) -> list[I64]:
    """Row indices in rounds: each round holds at most one window per series, oldest first."""
    n = len(rows)
    if n == 0:
        return []
    keys = [(rows.device[i], rows.metric[i], rows.window[i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: (keys[i], int(rows.start[i])))
    occurrence = np.zeros(n, np.int64)
    prev = None
    k = 0
    for i in order:
        k = k + 1 if keys[i] == prev else 0
        occurrence[i] = k
        prev = keys[i]
    return [np.flatnonzero(occurrence == r) for r in range(int(occurrence.max()) + 1)]


class DetectionStage:
    """Runs every configured detector over a batch: score, then learn, round by round."""

    def __init__(self, detectors: list[Detector]) -> None:
        self.detectors = detectors
        self.anomalies = 0

    def run(self, rows: EnrichedResults) -> list[Anomaly]:
        found: list[Anomaly] = []
        for idx in rounds(rows):
            for det in self.detectors:
                found.extend(det.score(rows, idx))
                det.learn(rows, idx)
        self.anomalies += len(found)
        return found


