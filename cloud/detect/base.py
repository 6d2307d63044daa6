"""The detector contract.

A detector only does the maths, vectorised over series, as in River's two-method contract:
``score`` judges one round of windows (at most one window per series, all in event-time order)
against what it knows, ``learn`` folds windows into that knowledge. Everything else — which
series a row belongs to, revisions, the order of windows, counters, state snapshots, and turning
scores into alerts — belongs to the wrapper (``cloud.detect.stage``) and the alert policy
(``cloud.detect.policy``).

Scores are *severities*: >= 0, with 1.0 at the detector's own alert threshold, so the policy
can combine detectors whose raw statistics live on different scales.

State lives in ``StateArrays`` (first axis: series id), which makes snapshot/restore generic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

import numpy as np

from cloud.detect.state import StateArrays
from devices.readings import F64, I64

# what a verdict says about the window, by code
NONE, HIGH, LOW, SHIFT_UP, SHIFT_DOWN, STUCK, PATTERN = range(7)
DIRECTIONS = ("", "high", "low", "shift_up", "shift_down", "stuck", "pattern")


@dataclass(frozen=True)
class Frame:
    """One round of window results: at most one row per key (series or device), in the order
    the wrapper hands them over. ``key`` is the series id for series detectors and the device
    id for device detectors."""

    key: I64
    start: I64  # window start, event time (ms)
    width: I64
    count: I64
    mean: F64
    min: F64
    max: F64
    std: F64
    low: F64  # registry alarm limits (NaN: none)
    high: F64
    floor: F64  # smallest spread that means anything for this metric

    def __len__(self) -> int:
        return len(self.key)

    def take(self, idx: I64) -> Frame:
        return Frame(*(getattr(self, f)[idx] for f in _FIELDS))


_FIELDS = tuple(Frame.__dataclass_fields__)


@dataclass(frozen=True)
class DeviceFrame:
    """One round for device detectors: one row per device window, the device's metrics as
    columns (``values``: the window means, NaN where a metric did not report this round)."""

    key: I64  # device id
    start: I64
    values: F64  # (rows, slots)
    floor: F64  # (rows, slots)

    def __len__(self) -> int:
        return len(self.key)


@dataclass(frozen=True)
class Verdict:
    severity: F64  # >= 0; 1.0 is this detector's alert threshold
    direction: I64  # codes above
    value: F64  # what was judged
    reference: F64  # what it was judged against (a limit, a typical value)

    @staticmethod
    def empty(n: int) -> Verdict:
        return Verdict(np.zeros(n), np.zeros(n, np.int64), np.full(n, np.nan), np.full(n, np.nan))


class Detector(Protocol):
    name: ClassVar[str]
    level: ClassVar[Literal["series", "device"]]
    state: StateArrays

    def score(self, f: Frame) -> Verdict:
        """Judge each row against the state of its key; must not change the state."""

    def learn(self, f: Frame) -> None:
        """Fold each row into the state of its key."""


class DeviceDetector(Protocol):
    name: ClassVar[str]
    level: ClassVar[Literal["series", "device"]]
    state: StateArrays

    def score(self, f: DeviceFrame) -> Verdict: ...

    def learn(self, f: DeviceFrame, mask: np.ndarray[tuple[int], np.dtype[np.bool_]]) -> None:
        """Fold the rows where ``mask`` holds (the wrapper keeps devices in alert out)."""
