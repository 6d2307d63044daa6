"""fieldline's detectors against River's online anomaly detectors, on the same recordings.

River (``pip install river``, in the ``bench`` extra) is the reference library for online
learning in Python; its detectors learn one sample at a time (``score_one`` then
``learn_one``), as ours learn one window at a time. Each River detector reads the same window
means fieldline's detectors read (one reading per window on NAB; a 10 s window's mean per
sensor on SKAB), one model per series (NAB) or per device (SKAB, all sensors as features),
and its scores go through the same alert policy (one alert per incident, hysteresis,
suppression). River's scores have no common scale, so each gets the one threshold that suits
it best over the whole set (NAB's own practice; the most favourable reading of River). Speed:
windows per second of one model learning and scoring a stream, against fieldline's stage
on 10,000 series.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from cloud.detect.policy import PolicyConfig
from simulators.scoring import NabFile, PointResult, nab_corpus_score, skab_point_score

Factory = Callable[[], Any]


UNIVARIATE = ("StandardAbsoluteDeviation", "GaussianScorer")


def river_models(window: int = 250) -> dict[str, Factory]:
    """River's detectors with their documented settings; HalfSpaceTrees scores nothing before
    its first ``window`` samples (250 by default; SKAB's runs have ~110 windows, so there it
    gets the 40 windows of a run's fitting period)."""
    from river import anomaly, compose, preprocessing, stats

    return {
        "HalfSpaceTrees": lambda: compose.Pipeline(
            preprocessing.MinMaxScaler(),
            anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=window, seed=42)),
        "LODA": lambda: compose.Pipeline(preprocessing.StandardScaler(),
                                         anomaly.LODA(n_bins=10, n_random_cuts=100, seed=42)),
        "StandardAbsoluteDeviation": lambda: anomaly.StandardAbsoluteDeviation(
            sub_stat=stats.Mean()),
        "GaussianScorer": lambda: anomaly.GaussianScorer(window_size=1000, grace_period=100),
    }


def score_stream(name: str, factory: Factory, rows: list[dict[str, float]]
                 ) -> tuple[np.ndarray, float]:
    """River's score of each row before learning it, and the time it took. Univariate
    detectors (River's ``y`` argument) read the row's only value."""
    model = factory()
    out = np.zeros(len(rows))
    uni = name in UNIVARIATE
    t0 = time.perf_counter()
    for i, x in enumerate(rows):
        if uni:
            y = next(iter(x.values()))
            out[i] = model.score_one(None, y)
            model.learn_one(None, y)
        else:
            out[i] = model.score_one(x)
            model.learn_one(x)
    return out, time.perf_counter() - t0


def _policy_runs(scores: np.ndarray, threshold: float, policy: PolicyConfig
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: incident opened here, incident open here. The same rules as
    ``cloud.detect.policy.AlertPolicy`` (without the likelihood part: River's scores are
    judged as they are), as a plain loop: one series, hundreds of thresholds."""
    hold = policy.hold_at / policy.open_at * threshold
    opened = np.zeros(len(scores), bool)
    active = np.zeros(len(scores), bool)
    is_open, quiet, resolved_n = False, 0, -(1 << 40)
    for n, s in enumerate(np.nan_to_num(scores, nan=0.0).tolist(), start=1):
        if not is_open and s >= threshold and n - resolved_n > policy.suppress:
            is_open, quiet = True, 0
            opened[n - 1] = True
        elif is_open:
            quiet = 0 if s >= hold else quiet + 1
            if quiet >= policy.clear:
                is_open, resolved_n = False, n
                active[n - 1] = True
                continue
        active[n - 1] = is_open
    return opened, active


def thresholds(all_scores: list[np.ndarray], k: int = 24, lowest: float = 0.90) -> list[float]:
    """Candidate thresholds: quantiles of the scores from ``lowest`` up (NAB's anomalies are
    rare; a third of SKAB's rows are anomalous)."""
    x = np.concatenate(all_scores)
    x = x[np.isfinite(x) & (x > 0)]
    if not len(x):
        return [1.0]
    return sorted({float(q) for q in np.quantile(x, np.linspace(lowest, 0.99995, k))})


def compare_nab(files: list[NabFile], values: list[np.ndarray], policy: PolicyConfig
                ) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, factory in river_models().items():
        scores, secs, n = [], 0.0, 0
        for v in values:
            s, dt = score_stream(name, factory, [{"value": float(x)} for x in v])
            scores.append(s)
            secs += dt
            n += len(v)
        best = -1e9
        for th in thresholds(scores):
            det = [_policy_runs(s, th, policy)[0].astype(float) for s in scores]
            best = max(best, nab_corpus_score(files, det, 0.5).normalised)
        out[name] = {"nab_standard": best, "windows_per_s": n / secs}
    return out


def compare_skab(labels: list[np.ndarray], rows: list[list[dict[str, float]]],
                 row_window: list[np.ndarray], policy: PolicyConfig
                 ) -> dict[str, dict[str, float]]:
    """``rows``: per file, one feature dict per 10 s window (the window means);
    ``row_window``: per file, the window index of every data row."""
    out: dict[str, dict[str, float]] = {}
    for name, factory in river_models(window=40).items():
        if name in UNIVARIATE:
            continue
        scores = [score_stream(name, factory, r)[0] for r in rows]
        best: tuple[float, float, float] = (-1.0, 0.0, 0.0)
        for th in thresholds(scores, k=40, lowest=0.2):
            total = PointResult(0, 0, 0, 0)
            for s, y, wi in zip(scores, labels, row_window, strict=True):
                _, active = _policy_runs(s, th, policy)
                total = total + skab_point_score(y, active[wi])
            if total.f1 > best[0]:
                best = (total.f1, total.far, total.mar)
        out[name] = {"skab_f1": best[0], "skab_far": best[1], "skab_mar": best[2]}
    return out
