"""Clock skew: estimated per device, counted, and handled by the configured policy."""

from __future__ import annotations

import numpy as np
import pytest

from devices.readings import ReadingColumns
from edge.engine import EngineConfig, WindowEngine
from edge.eventtime import UNKNOWN_SKEW, EventTimeSpec
from edge.windows import WindowSpec

T = 1_700_000_000_000
AHEAD = 10 * 60_000  # device 1's clock runs ten minutes fast


def batch(second: int) -> ReadingColumns:
    """Both devices report at gateway time T + second; device 1 stamps ten minutes ahead."""
    recv = T + second * 1000
    return ReadingColumns(
        np.array([0, 1], np.int32), np.zeros(2, np.int32),
        np.array([recv - 300, recv - 300 + AHEAD], np.int64), np.array([1.0, 2.0]),
        np.array([second, second], np.int64), np.array([recv, recv], np.int64))


def engine(policy: str) -> WindowEngine:
    return WindowEngine(EngineConfig(
        windows=(WindowSpec(size_ms=10_000),), clock_policy=policy, skew_tolerance_ms=2_000,
        skew_period_ms=5_000, time=EventTimeSpec(idle_timeout_ms=10**9)))


def feed(eng: WindowEngine, seconds: int) -> list[ReadingColumns]:
    out = []
    for s in range(seconds):
        b = eng.adjust_time(batch(s), now_mono_ms=s * 1000)
        eng.fold(b, s * 1000)
        out.append(b)
    return out


def test_skew_is_estimated_per_device_after_one_period() -> None:
    eng = engine("trust")
    feed(eng, 4)
    assert (eng.time.skew()[:2] == UNKNOWN_SKEW).all()  # the first period is still running
    feed_more = [eng.adjust_time(batch(s), s * 1000) for s in range(4, 12)]
    assert feed_more
    skew = eng.time.skew()
    assert skew[0] == 300  # a correct clock: only the transport delay
    assert skew[1] == 300 - AHEAD


@pytest.mark.parametrize(("policy", "expect_dev1_shift"), [
    ("trust", 0), ("correct", 300 - AHEAD), ("receive_time", 300 - AHEAD)])
def test_policies(policy: str, expect_dev1_shift: int) -> None:
    eng = engine(policy)
    out = feed(eng, 12)
    last = out[-1]
    raw = batch(11)
    assert int(last.ts[1] - raw.ts[1]) == expect_dev1_shift
    if policy == "correct":
        assert int(last.ts[0]) == int(raw.ts[0])  # within tolerance: left alone
        assert eng.corrected > 0
