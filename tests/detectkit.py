"""Hand-built window results for detector tests: EnrichedResults without a pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cloud.enrich import EnrichedResults

T0 = 1_767_225_600_000  # 2026-01-01T00:00Z, a Thursday


@dataclass
class Win:
    device: str
    metric: str
    start: int
    mean: float
    lo: float | None = None  # window min (default: mean - 0.5 * spread)
    hi: float | None = None
    count: int = 10
    rev: int = 0
    spread: float = 1.0
    high: float = float("nan")
    low: float = float("nan")


def rows(wins: Sequence[Win], *, width: int = 60_000, gateway: str = "gw",
         window: str = "1m", floor: float = 1e-3) -> EnrichedResults:
    n = len(wins)
    mean = np.array([w.mean for w in wins], np.float64)
    lo = np.array([w.mean - 0.5 * w.spread if w.lo is None else w.lo for w in wins])
    hi = np.array([w.mean + 0.5 * w.spread if w.hi is None else w.hi for w in wins])
    count = np.array([w.count for w in wins], np.int64)
    return EnrichedResults(
        gateway=gateway, device=[w.device for w in wins], metric=[w.metric for w in wins],
        site=["s"] * n, unit=[""] * n, window=[window] * n, known=np.ones(n, bool),
        start=np.array([w.start for w in wins], np.int64), width=np.full(n, width, np.int64),
        rev=np.array([w.rev for w in wins], np.int64), count=count, sum=mean * count,
        min=lo, max=hi, mean=mean, std=np.full(n, 0.3), first=mean, last=mean,
        low=np.array([w.low for w in wins]), high=np.array([w.high for w in wins]),
        scale_floor=np.full(n, floor), rate=np.zeros(n), pct=np.empty((n, 0)), pct_names=[],
        seq_min=None, seq_max=None, seq_sum=None, primary_window=window)


def noisy_fleet(windows: int, *, seed: int = 0, width: int = 60_000,
                devices: int = 3) -> list[list[Win]]:
    """Per window time, one Win per (device, metric): correlated sensors with a daily cycle,
    noise, and a few faults (a spike, a level shift, a stuck stretch, a broken correlation)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(windows):
        t = T0 + k * width
        day = np.sin(2 * np.pi * ((t % 86_400_000) / 86_400_000))
        batch = []
        for d in range(devices):
            base = 20 + 5 * day + rng.normal(0, 0.3)
            a = base + rng.normal(0, 0.2)
            b = 2 * base + rng.normal(0, 0.3)
            c = 100 - base + rng.normal(0, 0.3)
            spread = 1.0 + abs(rng.normal(0, 0.1))
            if d == 0 and k == windows // 2:
                batch.append(Win(f"dev{d}", "a", t, a, hi=a + 25, spread=spread))
            elif d == 1 and k > 2 * windows // 3:
                batch.append(Win(f"dev{d}", "a", t, a + 6, spread=spread))
            elif d == 2 and windows // 3 < k < windows // 3 + 40:
                batch.append(Win(f"dev{d}", "a", t, 21.0, lo=21.0, hi=21.0, spread=0.0))
            else:
                batch.append(Win(f"dev{d}", "a", t, a, spread=spread))
            if d == 0 and 3 * windows // 4 < k < 3 * windows // 4 + 20:
                b = 2 * (20 - 5 * day)  # b leaves its relation to a, inside its usual range
            batch.append(Win(f"dev{d}", "b", t, b, spread=spread))
            batch.append(Win(f"dev{d}", "c", t, c, spread=spread))
        out.append(batch)
    return out
