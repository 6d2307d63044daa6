"""Anomaly detection on enriched window results.

Detectors do only the maths (``cloud.detect.base``); the stage (``cloud.detect.stage``) keys,
orders and snapshots; the policy (``cloud.detect.policy``) turns severities into incidents.
Detectors are named in the cloud config and imported lazily from ``DETECTORS``:

========================  =========================================================================
``threshold``             the registry's alarm limits
``spike``                 a reading far from the rest of its window (robust z of excursions)
``novelty``               a window beyond everything of the series' long history (records)
``seasonal``              a window unlike the same time of day / week (event-time profile)
``shift``                 level shifts and drifts (two-sided CUSUM)
``stuck``                 a sensor that stopped moving
``multivariate``          a device whose sensors leave their joint pattern (Hotelling T²)
========================  =========================================================================
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from cloud.detect.base import Detector, DeviceDetector
from cloud.detect.policy import PolicyConfig
from cloud.detect.stage import (
    FORGET_AFTER_MS,
    PRIMARY,
    RESOLVE_SILENT_AFTER_MS,
    AlertEvent,
    Anomaly,
    Detections,
    DetectionStage,
    rounds,
)

DETECTORS: dict[str, str] = {
    "threshold": "cloud.detect.limits:ThresholdDetector",
    "spike": "cloud.detect.spike:SpikeDetector",
    "novelty": "cloud.detect.novelty:NoveltyDetector",
    "seasonal": "cloud.detect.seasonal:SeasonalDetector",
    "shift": "cloud.detect.change:ShiftDetector",
    "stuck": "cloud.detect.stuck:StuckDetector",
    "multivariate": "cloud.detect.multivariate:MultivariateDetector",
}
DEFAULT_DETECTORS = ("threshold", "spike", "novelty", "seasonal", "stuck", "multivariate")


def detector_class(name: str) -> Any:
    module, _, cls = DETECTORS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def build_stage(names: list[str] | tuple[str, ...], options: dict[str, dict[str, Any]],
                *, policy: PolicyConfig | None = None,
                windows: tuple[str, ...] = (PRIMARY,), relearn_after: int = 30,
                min_change: dict[str, float] | None = None,
                resolution_steps: float = 3.0,
                forget_after_ms: int = FORGET_AFTER_MS,
                resolve_silent_after_ms: int = RESOLVE_SILENT_AFTER_MS,
                clock: Callable[[], float] = time.time) -> DetectionStage:
    """Detectors by config name with their options (``ValueError``/``TypeError`` name the
    problem), wrapped in a stage."""
    series: list[Detector] = []
    devices: list[DeviceDetector] = []
    for name in names:
        det = detector_class(name)(**options.get(name, {}))
        (devices if det.level == "device" else series).append(det)
    return DetectionStage(series, device_detectors=devices, policy=policy, windows=windows,
                          relearn_after=relearn_after, min_change=min_change,
                          resolution_steps=resolution_steps,
                          forget_after_ms=forget_after_ms,
                          resolve_silent_after_ms=resolve_silent_after_ms, clock=clock)


__all__ = ["DEFAULT_DETECTORS", "DETECTORS", "PRIMARY", "AlertEvent", "Anomaly",
           "DetectionStage", "Detections", "PolicyConfig", "build_stage", "detector_class",
           "rounds"]
