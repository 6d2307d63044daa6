"""Detectors: spikes and limits are found, revisions never teach a detector twice."""

from __future__ import annotations

import numpy as np

from cloud.detect import DetectionStage, RobustZDetector, ThresholdDetector, rounds
from cloud.enrich import EnrichedResults

T = 1_700_000_000_000


def rows(starts: list[int], maxes: list[float], *, device: str = "d1", rev: int = 0,
         high: float = np.nan, means: list[float] | None = None) -> EnrichedResults:
    """Windows whose max is given; their mean sits 0.5 below it unless ``means`` are given."""
    n = len(starts)
    mx = np.array(maxes)
    mean = np.array(means) if means is not None else mx - 0.5
    return EnrichedResults(
        gateway="gw", device=[device] * n, metric=["temperature"] * n, site=["s"] * n,
        unit=["degC"] * n, window=["10s"] * n, known=np.ones(n, bool),
        start=np.array(starts, np.int64),
        width=np.full(n, 10_000, np.int64), rev=np.full(n, rev, np.int64),
        count=np.full(n, 10, np.int64), sum=mean * 10, min=mean - 0.5, max=mx, mean=mean,
        std=np.full(n, 0.3), first=mean, last=mean, low=np.full(n, np.nan),
        high=np.full(n, high), scale_floor=np.full(n, 0.01), rate=np.zeros(n),
        pct=np.empty((n, 0)), pct_names=[], seq_min=None, seq_max=None, seq_sum=None)


def test_robust_z_flags_a_spike_after_warm_up_only() -> None:
    rng = np.random.default_rng(1)
    det = RobustZDetector(history=30, min_history=10, threshold=8.0)
    stage = DetectionStage([det])
    base = list(20 + 0.1 * rng.standard_normal(12))
    found = stage.run(rows([T + i * 10_000 for i in range(12)], base))
    assert found == []
    spike = stage.run(rows([T + 12 * 10_000], [28.0], means=[20.8]))
    assert len(spike) == 1
    assert spike[0].direction == "high"
    assert spike[0].score > 8


def test_a_slow_wander_is_not_a_spike_but_an_excursion_is() -> None:
    """The level walks away over the history; excursions within windows stay typical."""
    det = RobustZDetector(history=30, min_history=10, threshold=8.0)
    stage = DetectionStage([det])
    rng = np.random.default_rng(2)
    level = 20 + np.cumsum(0.3 * rng.standard_normal(40))  # a strong random walk of the mean
    exc = 0.5 + 0.05 * rng.standard_normal(40)
    found = []
    for i in range(40):
        found += stage.run(rows([T + i * 10_000], [float(level[i] + exc[i])],
                                means=[float(level[i])]))
    assert [a for a in found if a.direction == "high"] == []
    spike = stage.run(rows([T + 40 * 10_000], [float(level[-1] + 4.0)], means=[float(level[-1])]))
    assert [a.direction for a in spike] == ["high"]


def test_a_revision_replaces_what_was_learned() -> None:
    det = RobustZDetector(history=10, min_history=3, threshold=8.0)
    stage = DetectionStage([det])
    stage.run(rows([T, T + 10_000, T + 20_000], [20.0, 20.1, 19.9]))
    for rev in range(1, 6):  # the same window revised again and again
        stage.run(rows([T + 20_000], [19.9 + rev * 0.01], rev=rev))
    slot = det._slots[("d1", "temperature", "10s")]
    learned = det._starts[slot][det._starts[slot] >= 0]
    assert sorted(learned.tolist()) == [T, T + 10_000, T + 20_000]


def test_threshold_detector_uses_registry_limits() -> None:
    r = rows([T, T + 10_000], [30.0, 50.0], high=45.0)
    found = ThresholdDetector().score(r, np.arange(2))
    assert [(a.row, a.direction, a.value) for a in found] == [(1, "high", 50.0)]


def test_rounds_take_several_windows_of_one_series_oldest_first() -> None:
    r = rows([T + 20_000, T, T + 10_000], [1.0, 2.0, 3.0])
    assert [x.tolist() for x in rounds(r)] == [[1], [2], [0]]
