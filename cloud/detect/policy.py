"""The alert policy: turns per-window severities into incidents.

An incident *opens* on the first window whose severity reaches ``open_at`` (and only once
``suppress`` windows have passed since the subject's previous incident resolved); it stays
open while windows keep reaching ``hold_at`` (hysteresis: a lower bar to stay open than to
open) and *resolves* after ``clear`` windows in a row below it. One incident is one alert,
however many windows it spans: a stuck fault is reported once, not every window.

With ``likelihood`` > 0 a severity must also be unusual *for its subject*: ``likelihood``
standard deviations above the subject's usual ``log(1 + severity)`` (exponentially weighted over
``likelihood_memory`` windows), in the spirit of Numenta's anomaly likelihood: a series that
crosses its detectors' thresholds every day learns that this is how it is.

An incident is identified by its subject (series or device) and the start of the window that
opened it, so replaying the same windows opens the same incident (idempotent in InfluxDB).
Vectorised over subjects; state in ``StateArrays``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cloud.detect.state import Column, StateArrays
from devices.readings import F64, I64

NO_INCIDENT = np.iinfo(np.int64).min


@dataclass(frozen=True, kw_only=True)
class PolicyConfig:
    open_at: float = 1.0
    hold_at: float = 0.5
    clear: int = 3
    suppress: int = 100
    likelihood: float = 3.0  # > 0: also need a severity this many deviations above the usual
    likelihood_memory: int = 1000  # windows the usual severity is learned over

    def __post_init__(self) -> None:
        if not 0 < self.hold_at <= self.open_at:
            raise ValueError("alerts need 0 < hold_at <= open_at")
        if self.clear < 1 or self.suppress < 0:
            raise ValueError("alerts need clear >= 1 and suppress >= 0")
        if self.likelihood < 0 or self.likelihood_memory < 2:
            raise ValueError("alerts need likelihood >= 0 and likelihood_memory >= 2")


@dataclass(frozen=True)
class PolicyStep:
    """What one round did, per row: the incident each row belongs to after it (NO_INCIDENT:
    none), whether it opened or resolved one there, and the incident's peak so far."""

    incident: I64
    opened: npt.NDArray[np.bool_]
    resolved: npt.NDArray[np.bool_]
    peak: F64
    opened_by: I64  # detector index that opened the incident
    last_high: I64  # start of the incident's last window at or above hold_at


class AlertPolicy:
    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()
        self.state = StateArrays({
            "n": Column((), np.int64, 0),  # windows seen
            "incident": Column((), np.int64, NO_INCIDENT),  # start of the opening window
            "by": Column((), np.int64, -1),
            "quiet": Column((), np.int64, 0),  # windows in a row below hold_at
            "resolved_n": Column((), np.int64, -(1 << 40)),
            "opened_n": Column((), np.int64, 0),
            "peak": Column((), np.float64, 0.0),
            "last_high": Column((), np.int64, NO_INCIDENT),  # start of the last window >= hold
            "lmean": Column((), np.float64, 0.0),  # usual log(1 + severity), and its spread
            "lvar": Column((), np.float64, 0.0),
        })

    def step(self, subject: I64, start: I64, severity: F64, top: I64) -> PolicyStep:
        """One round: at most one row per subject, in event-time order per subject."""
        c = self.config
        s = self.state
        s.reserve(int(subject.max()) + 1 if len(subject) else 0)
        n = s["n"][subject] + 1
        s["n"][subject] = n
        inc = s["incident"][subject]
        is_open = inc != NO_INCIDENT
        sev = np.nan_to_num(severity, nan=0.0)
        opened = ~is_open & (sev >= c.open_at) & (n - s["resolved_n"][subject] > c.suppress)
        if c.likelihood > 0:  # the severity must also be unusual for this subject
            x = np.log1p(np.maximum(sev, 0.0))
            mu, var = s["lmean"][subject], s["lvar"][subject]
            z = (x - mu) / np.sqrt(np.maximum(var, 1e-4))
            opened &= z >= c.likelihood
            a = np.maximum(1.0 / c.likelihood_memory, 1.0 / n)
            d = x - mu
            s["lmean"][subject] = mu + a * d
            s["lvar"][subject] = (1 - a) * (var + a * d * d)
        quiet = np.where(sev >= c.hold_at, 0, s["quiet"][subject] + 1)
        resolved = is_open & (quiet >= c.clear)
        inc = np.where(opened, start, inc)
        peak = np.where(opened, sev, np.where(is_open, np.maximum(s["peak"][subject], sev), 0.0))
        by = np.where(opened, top, s["by"][subject])
        s["quiet"][subject] = np.where(opened, 0, quiet)
        s["peak"][subject] = peak
        s["by"][subject] = by
        last_high = np.where((opened | is_open) & (sev >= c.hold_at), start,
                             s["last_high"][subject])
        s["last_high"][subject] = last_high
        after = np.where(resolved, NO_INCIDENT, inc)
        s["incident"][subject] = after
        s["resolved_n"][subject] = np.where(resolved, n, s["resolved_n"][subject])
        s["opened_n"][subject] = np.where(opened, n, s["opened_n"][subject])
        return PolicyStep(incident=inc, opened=opened, resolved=resolved, peak=peak,
                          opened_by=by, last_high=last_high)

    def open_for(self, subject: I64) -> I64:
        """Windows each subject's open incident has lasted (-1: none open)."""
        s = self.state
        is_open = s["incident"][subject] != NO_INCIDENT
        return np.where(is_open, s["n"][subject] - s["opened_n"][subject], -1)

    def open_incidents(self) -> I64:
        """Subjects with an incident open now."""
        return np.flatnonzero(self.state["incident"][: self.state.size] != NO_INCIDENT)

    def close(self, subjects: I64) -> None:
        """Resolve the open incidents of ``subjects`` from outside the windows (their series
        went silent): as if they had resolved at their last window."""
        if not len(subjects):
            return
        s = self.state
        s["incident"][subjects] = NO_INCIDENT
        s["resolved_n"][subjects] = s["n"][subjects]
        s["quiet"][subjects] = 0
        s["peak"][subjects] = 0.0
