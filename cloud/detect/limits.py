"""``threshold``: the registry's alarm limits (``low``/``high`` per device), checked against the
window's min and max. Stateless: the limits are reference data, joined at enrichment."""

from __future__ import annotations

from typing import ClassVar, Literal

import numpy as np

from cloud.detect.base import HIGH, LOW, Frame, Verdict
from cloud.detect.state import StateArrays


class ThresholdDetector:
    name: ClassVar[str] = "threshold"
    level: ClassVar[Literal["series", "device"]] = "series"

    def __init__(self) -> None:
        self.state = StateArrays({})

    def score(self, f: Frame) -> Verdict:
        out = Verdict.empty(len(f))
        span = np.maximum(np.abs(f.high - f.low), f.floor)
        span = np.where(np.isfinite(span), span, np.maximum(np.abs(f.high), f.floor))
        span = np.where(np.isfinite(span), span, np.maximum(np.abs(f.low), f.floor))
        with np.errstate(invalid="ignore"):
            over = f.max > f.high
            under = (f.min < f.low) & ~over
        out.severity[over] = 1.0 + (f.max - f.high)[over] / span[over]
        out.direction[over] = HIGH
        out.value[over] = f.max[over]
        out.reference[over] = f.high[over]
        out.severity[under] = 1.0 + (f.low - f.min)[under] / span[under]
        out.direction[under] = LOW
        out.value[under] = f.min[under]
        out.reference[under] = f.low[under]
        return out

    def learn(self, f: Frame) -> None:
        """Limits come from the registry; there is nothing to learn."""
