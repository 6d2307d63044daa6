"""Signal models per sensor kind: a daily cycle, noise and drift around a per-device base.

Values are computed for a whole fleet at once (numpy), one tick at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from devices.readings import F64, I64

DAY_MS = 86_400_000
HOUR_MS = 3_600_000


@dataclass(frozen=True, kw_only=True)
class SignalModel:
    base_low: float
    base_high: float
    daily_amplitude: float
    noise: float  # standard deviation of white noise
    drift_per_hour: float = 0.0
    alarm_low: float | None = None  # registry thresholds for generated fleets
    alarm_high: float | None = None
    spike: float = 0.0  # spike magnitude (added; sign chosen at random per spike)


MODELS: dict[str, SignalModel] = {
    "temperature": SignalModel(base_low=18, base_high=24, daily_amplitude=3.0, noise=0.15,
                               alarm_low=0.0, alarm_high=45.0, spike=8.0),
    "humidity": SignalModel(base_low=40, base_high=55, daily_amplitude=8.0, noise=0.5,
                            alarm_low=5.0, alarm_high=95.0, spike=20.0),
    "pressure": SignalModel(base_low=1005, base_high=1020, daily_amplitude=1.5, noise=0.08,
                            alarm_low=950.0, alarm_high=1060.0, spike=4.0),
    "co2": SignalModel(base_low=420, base_high=600, daily_amplitude=150.0, noise=8.0,
                       alarm_high=2000.0, spike=400.0),
    "vibration": SignalModel(base_low=1, base_high=3, daily_amplitude=0.5, noise=0.05,
                             alarm_high=20.0, spike=1.5),
}


class FleetSignals:
    """Per-device parameters, drawn once from the seed."""

    def __init__(self, kinds: list[str], rng: np.random.Generator, start_ms: int) -> None:
        n = len(kinds)
        self.kinds = kinds
        self.start_ms = start_ms
        lo = np.array([MODELS[k].base_low for k in kinds])
        hi = np.array([MODELS[k].base_high for k in kinds])
        self.base: F64 = lo + (hi - lo) * rng.random(n)
        self.amp: F64 = np.array([MODELS[k].daily_amplitude for k in kinds]) * (
            0.7 + 0.6 * rng.random(n))
        self.phase: F64 = rng.random(n) * 0.1 + 0.3  # peak in the afternoon, varying a little
        self.noise: F64 = np.array([MODELS[k].noise for k in kinds])
        self.drift: F64 = np.array([MODELS[k].drift_per_hour for k in kinds])
        self.spike: F64 = np.array([MODELS[k].spike for k in kinds])

    def values(self, ts: I64, rng: np.random.Generator) -> F64:
        day = (ts % DAY_MS) / DAY_MS
        cycle = self.amp * np.sin(2 * np.pi * (day - self.phase + 0.25))
        hours = (ts - self.start_ms) / HOUR_MS
        return np.asarray(self.base + cycle + self.drift * hours
                          + self.noise * rng.standard_normal(len(ts)), dtype=np.float64)
