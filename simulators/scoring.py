"""Scoring detections against the labels of recorded data sets, the way their authors do.

NAB (``nab_*``): every row gets an anomaly score in [0, 1]; rows at or above a threshold are
detections. The first 15 % of a file (at most 750 rows) is probationary and not scored. Inside
a labelled window only the earliest detection counts, earning ``A_TP * S(y) / S(-1)`` with
``S(y) = 2 / (1 + e^(5y)) - 1`` and ``y`` the detection's position relative to the window's right
edge (-1 at the left edge); a window without detection costs ``A_FN``; every detected row
outside a window costs ``A_FP * S(d)``, ``d`` its distance after the previous window in window
widths (``-A_FP`` when there is no previous window or it is more than 3 widths away). A corpus
total is normalised so that the detector that never fires scores 0 and the perfect one 100.
This is a re-implementation of NAB's ``sweeper.py``, checked against NAB's published per-file
scores (``tests/test_scoring.py``).

SKAB (``skab_*``): point-wise over the ``anomaly`` column after each file's first 400 rows,
counts pooled over the files: F1 = TP / (TP + (FP + FN) / 2), FAR = FP / (FP + TN),
MAR = FN / (FN + TP).

Pure numpy; nothing here knows about MQTT or the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
B = npt.NDArray[np.bool_]

NAB_PROFILES: dict[str, tuple[float, float, float]] = {  # (A_TP, A_FP, A_FN)
    "standard": (1.0, 0.11, 1.0),
    "reward_low_FP_rate": (1.0, 0.22, 1.0),
    "reward_low_FN_rate": (1.0, 0.11, 2.0),
}
OUTSIDE = -1  # window id of a scored row outside every window
PROBATION = -2  # window id of a probationary row


def scaled_sigmoid(y: F64) -> F64:
    """NAB's ``scaledSigmoid``: 0.9866 at -1, 0 at 0, -0.9866 at 1, -1 beyond 3."""
    with np.errstate(over="ignore"):
        s = 2.0 / (1.0 + np.exp(5.0 * y)) - 1.0
    return np.where(y > 3.0, -1.0, s)


MAX_TP = float(scaled_sigmoid(np.array([-1.0]))[0])


def probation_rows(n: int, fraction: float = 0.15) -> int:
    """Rows NAB leaves unscored at the start of a file of ``n`` rows."""
    return math.ceil(min(math.floor(fraction * n), fraction * 5000))


@dataclass(frozen=True)
class NabFile:
    """One labelled file: row timestamps and its anomaly windows as row index ranges."""

    name: str
    ts: I64  # epoch ms per row
    windows: tuple[tuple[int, int], ...]  # (first row, last row), inclusive, in time order

    @staticmethod
    def from_times(name: str, ts: I64, windows_ms: Iterable[tuple[int, int]]) -> NabFile:
        """Windows given as (start ms, end ms): the rows at or after start up to end."""
        wins = []
        for lo, hi in windows_ms:
            a = int(np.searchsorted(ts, lo, side="left"))
            b = int(np.searchsorted(ts, hi, side="right")) - 1
            if b >= a:
                wins.append((a, b))
        return NabFile(name, np.asarray(ts, np.int64), tuple(wins))

    def __len__(self) -> int:
        return len(self.ts)

    def sweep(self, fraction: float = 0.15) -> tuple[I64, F64, F64]:
        """Per row: window id (or OUTSIDE / PROBATION), the unweighted S() a detection there
        would earn as a true positive (inside) or cost as a false positive (outside, < 0)."""
        n = len(self.ts)
        win = np.full(n, OUTSIDE, np.int64)
        tp_s = np.zeros(n)
        fp_s = np.full(n, -1.0)  # no preceding window: as far away as can be
        idx = np.arange(n, dtype=np.float64)
        prev_right: int | None = None
        prev_width = 0.0
        for k, (a, b) in enumerate(self.windows):
            width = float(b - a + 1)
            win[a:b + 1] = k
            tp_s[a:b + 1] = scaled_sigmoid(-(b - idx[a:b + 1] + 1) / width)
            if prev_right is not None:
                seg = slice(prev_right + 1, a)
                fp_s[seg] = scaled_sigmoid(np.abs(prev_right - idx[seg]) / (prev_width - 1))
            prev_right, prev_width = b, width
        if prev_right is not None:
            seg = slice(prev_right + 1, n)
            fp_s[seg] = scaled_sigmoid(np.abs(prev_right - idx[seg]) / (prev_width - 1))
        win[:probation_rows(n, fraction)] = PROBATION
        return win, tp_s, fp_s


@dataclass(frozen=True)
class NabResult:
    score: float  # raw, weighted
    tp: int  # detected rows inside windows
    tn: int
    fp: int  # detected rows outside windows
    fn: int
    windows: int
    windows_detected: int


def nab_file_score(f: NabFile, detected: B, profile: str = "standard") -> NabResult:
    """Score one file's detections (a boolean per row)."""
    a_tp, a_fp, a_fn = NAB_PROFILES[profile]
    win, tp_s, fp_s = f.sweep()
    scored = win != PROBATION
    det = detected & scored
    inside = win >= 0
    nwin = len(f.windows)
    best = np.full(nwin, -np.inf)
    hit = det & inside
    np.maximum.at(best, win[hit], tp_s[hit] * a_tp / MAX_TP)
    found = np.isfinite(best)
    # a window lying wholly in the probationary period is not scored (NAB never has one)
    live = np.zeros(nwin, bool)
    live[np.unique(win[scored & inside])] = True
    total = float(best[found & live].sum()) - a_fn * int((~found & live).sum())
    out = det & ~inside
    total += float((fp_s[out] * a_fp).sum())
    tp = int(hit.sum())
    fp = int(out.sum())
    return NabResult(total, tp, int((scored & ~inside).sum()) - fp, fp,
                     int((scored & inside).sum()) - tp, int(live.sum()), int((found & live).sum()))


@dataclass(frozen=True)
class NabCorpusResult:
    profile: str
    threshold: float
    raw: float
    normalised: float
    windows: int
    windows_detected: int
    false_positive_rows: int
    per_file: dict[str, NabResult]


def nab_normalise(raw: float, windows: int, profile: str = "standard") -> float:
    a_tp, _, a_fn = NAB_PROFILES[profile]
    null = -a_fn * windows
    perfect = a_tp * windows
    return 100.0 * (raw - null) / (perfect - null) if perfect != null else 0.0


def nab_corpus_score(files: Sequence[NabFile], scores: Sequence[F64], threshold: float,
                     profile: str = "standard") -> NabCorpusResult:
    """The normalised NAB score of a whole set at one threshold (rows with score >= it)."""
    per: dict[str, NabResult] = {}
    for f, s in zip(files, scores, strict=True):
        if len(s) != len(f):
            raise ValueError(f"{f.name}: {len(s)} scores for {len(f)} rows")
        per[f.name] = nab_file_score(f, np.asarray(s) >= threshold, profile)
    raw = sum(r.score for r in per.values())
    nwin = sum(r.windows for r in per.values())
    return NabCorpusResult(profile, threshold, raw, nab_normalise(raw, nwin, profile), nwin,
                           sum(r.windows_detected for r in per.values()),
                           sum(r.fp for r in per.values()), per)


def nab_best_threshold(files: Sequence[NabFile], scores: Sequence[F64],
                       profile: str = "standard") -> NabCorpusResult:
    """NAB's own practice: the one threshold over the whole set that scores best."""
    cand = np.unique(np.concatenate([np.asarray(s, np.float64) for s in scores]
                                    or [np.ones(1)]))
    cand = cand[cand > 0]
    points = sum(len(s) for s in scores)
    every = cand
    if len(cand) * points > 20_000_000:  # too many levels to try each: 400 quantiles, then
        cand = np.unique(np.quantile(cand, np.linspace(0, 1, 400)))  # every level near the best
    best: NabCorpusResult | None = None
    for th in [*cand.tolist(), 1.01]:
        r = nab_corpus_score(files, scores, th, profile)
        if best is None or r.normalised > best.normalised:
            best = r
    assert best is not None
    if len(cand) < len(every):
        k = int(np.searchsorted(cand, best.threshold))
        lo, hi = cand[max(k - 1, 0)], cand[min(k + 1, len(cand) - 1)]
        near = every[(every > lo) & (every < hi)]
        step = max(1, len(near) // 400)
        for th in near[::step].tolist():
            r = nab_corpus_score(files, scores, th, profile)
            if r.normalised > best.normalised:
                best = r
    return best


@dataclass(frozen=True)
class PointResult:
    """Point-wise detection quality, SKAB's outlier problem."""

    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def f1(self) -> float:
        d = self.tp + (self.fp + self.fn) / 2
        return self.tp / d if d else 0.0

    @property
    def far(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0

    @property
    def mar(self) -> float:
        return self.fn / (self.fn + self.tp) if self.fn + self.tp else 0.0

    def __add__(self, other: PointResult) -> PointResult:
        return PointResult(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn,
                           self.tn + other.tn)


SKAB_FIT_ROWS = 400


def skab_point_score(label: B, detected: B, skip: int = SKAB_FIT_ROWS) -> PointResult:
    """One file's point-wise counts, its first ``skip`` rows left out (they are for fitting)."""
    y = np.asarray(label, bool)[skip:]
    p = np.asarray(detected, bool)[skip:]
    return PointResult(int((p & y).sum()), int((p & ~y).sum()), int((~p & y).sum()),
                       int((~p & ~y).sum()))


def changepoint_windows(changepoints: I64, width_ms: int = 60_000) -> list[tuple[int, int]]:
    """SKAB's changepoint problem: a window of ``width_ms`` to the right of each changepoint
    (cut where it would reach the next), as (start ms, end ms) for ``NabFile.from_times``."""
    cps = np.sort(np.asarray(changepoints, np.int64))
    out = []
    for i, c in enumerate(cps.tolist()):
        end = c + width_ms
        if i + 1 < len(cps):
            end = min(end, int(cps[i + 1]) - 1)
        out.append((c, end))
    return out


def detection_delays(files: Sequence[NabFile], detected: Sequence[B]) -> list[int]:
    """Data-time delay (ms) from each window's labelled anomaly to its first detection.

    NAB windows are centred on the labelled instant, so the delay is measured from the window's
    middle; a detection ahead of it gives a negative delay. Missed windows give no entry.
    """
    out: list[int] = []
    for f, det in zip(files, detected, strict=True):
        for a, b in f.windows:
            hits = np.flatnonzero(det[a:b + 1])
            if len(hits):
                mid = (int(f.ts[a]) + int(f.ts[b])) // 2
                out.append(int(f.ts[a + int(hits[0])]) - mid)
    return out
