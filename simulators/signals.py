"""Signal models: a per-device base, daily and weekly cycles, drift, a random walk and noise,
and a latent factor shared by the sensors of one device (so a device's temperature and humidity
move together, humidity the opposite way).

Values are computed for a whole fleet at once (numpy), one tick at a time, from the signal's own
random stream: faults never consume it, so the clean signal of a fleet with faults is exactly the
signal of the same fleet without them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from devices.readings import F64, I64

DAY_MS = 86_400_000
WEEK_MS = 7 * DAY_MS
HOUR_MS = 3_600_000


@dataclass(frozen=True, kw_only=True)
class SignalModel:
    base_low: float
    base_high: float
    daily_amplitude: float = 0.0
    weekly_amplitude: float = 0.0
    noise: float = 0.0  # standard deviation of white noise
    drift_per_hour: float = 0.0
    walk: float = 0.0  # standard deviation of the random walk's step per reading
    coupling: float = 0.0  # response to the device's shared latent factor
    alarm_low: float | None = None  # registry thresholds for generated fleets
    alarm_high: float | None = None
    spike: float = 0.0  # default spike magnitude
    interval_ms: int = 0  # 0: the fleet's interval

    def with_overrides(self, raw: dict[str, Any]) -> SignalModel:
        fields = {k: v for k, v in raw.items() if k in self.__dataclass_fields__}
        if "base" in raw:
            lo, hi = raw["base"]
            fields["base_low"], fields["base_high"] = float(lo), float(hi)
        return replace(self, **fields)


MODELS: dict[str, SignalModel] = {
    "temperature": SignalModel(base_low=18, base_high=24, daily_amplitude=3.0,
                               weekly_amplitude=0.5, noise=0.15, walk=0.01, coupling=1.0,
                               alarm_low=0.0, alarm_high=45.0, spike=8.0),
    "humidity": SignalModel(base_low=40, base_high=55, daily_amplitude=8.0, weekly_amplitude=1.0,
                            noise=0.5, walk=0.02, coupling=-2.0, alarm_low=5.0, alarm_high=95.0,
                            spike=20.0),
    "pressure": SignalModel(base_low=1005, base_high=1020, daily_amplitude=1.5, noise=0.08,
                            walk=0.02, alarm_low=950.0, alarm_high=1060.0, spike=4.0),
    "co2": SignalModel(base_low=420, base_high=600, daily_amplitude=150.0,
                       weekly_amplitude=60.0, noise=8.0, walk=0.5, coupling=20.0,
                       alarm_high=2000.0, spike=400.0),
    "vibration": SignalModel(base_low=1, base_high=3, daily_amplitude=0.5, noise=0.05,
                             walk=0.005, alarm_high=20.0, spike=1.5),
    "power": SignalModel(base_low=200, base_high=2000, daily_amplitude=300.0,
                         weekly_amplitude=150.0, noise=10.0, walk=1.0, alarm_high=50_000.0,
                         spike=1500.0),
}


class FleetSignals:
    """Per-sensor parameters drawn once from the seed; one row per (device, sensor)."""

    def __init__(self, kinds: list[str], device_of: I64, models: dict[str, SignalModel],
                 rng: np.random.Generator, start_ms: int) -> None:
        n = len(kinds)
        self.kinds = kinds
        self.device_of = device_of
        self.start_ms = start_ms
        self.rng = rng
        m = [models[k] for k in kinds]
        lo = np.array([x.base_low for x in m])
        hi = np.array([x.base_high for x in m])
        self.base: F64 = lo + (hi - lo) * rng.random(n)
        self.amp: F64 = np.array([x.daily_amplitude for x in m]) * (0.7 + 0.6 * rng.random(n))
        self.weekly: F64 = np.array([x.weekly_amplitude for x in m])
        self.phase: F64 = rng.random(n) * 0.1 + 0.3  # peak in the afternoon, varying a little
        self.noise: F64 = np.array([x.noise for x in m])
        self.drift: F64 = np.array([x.drift_per_hour for x in m])
        self.walk_step: F64 = np.array([x.walk for x in m])
        self.coupling: F64 = np.array([x.coupling for x in m])
        self.spike: F64 = np.array([x.spike for x in m])
        self.walk: F64 = np.zeros(n)
        n_dev = int(device_of.max()) + 1 if n else 0
        self.latent: F64 = np.zeros(n_dev)  # shared by the sensors of a device

    def values(self, ts: I64) -> F64:
        """The next value of every sensor at event times ``ts`` (advances the walks)."""
        rng = self.rng
        self.walk = self.walk + self.walk_step * rng.standard_normal(len(ts))
        self.latent = self.latent + 0.005 * rng.standard_normal(len(self.latent))
        day = (ts % DAY_MS) / DAY_MS
        week = (ts % WEEK_MS) / WEEK_MS
        cycle = self.amp * np.sin(2 * np.pi * (day - self.phase + 0.25))
        weekly = self.weekly * np.sin(2 * np.pi * week)
        hours = (ts - self.start_ms) / HOUR_MS
        return np.asarray(self.base + cycle + weekly + self.drift * hours + self.walk
                          + self.coupling * self.latent[self.device_of]
                          + self.noise * rng.standard_normal(len(ts)), dtype=np.float64)
