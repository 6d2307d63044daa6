"""The detection stage: the wrapper that owns everything but the maths.

* **Keying.** A series is (gateway, device, metric, window spec); a device is (gateway, device,
  window spec). Keys get dense ids once, and detector state is indexed by them.
* **Which windows.** Detectors run on the windows of ``windows`` (default: each gateway's
  primary spec, the first it lists); other specs are written but not judged twice.
* **Order.** A batch may hold several windows of one series (a replay after an outage): they are
  taken in rounds, oldest first, each round at most one window per series, so every window is
  judged against its past whatever the batch boundaries were.
* **Revisions.** A window is learned once, from the first result that arrives in event-time
  order. A revision (or any window older than the newest learned one) is judged again against
  the current state, so late data can still raise an anomaly, but never taught twice; its
  anomaly point replaces the earlier one (same identity).
* **Policy.** Severities go through ``AlertPolicy``: one incident per episode, opened and
  resolved, per series and per device. A device in alert does not teach the device detectors
  its state (a lasting fault must not become its normal), until the incident has lasted
  ``relearn_after`` windows: then its state is the new normal and is learned, so the incident
  can resolve. (Series detectors hold an excursion themselves: ``cloud.detect.records``.)
* **Snapshots.** ``snapshot()`` returns the keys, every detector's and the policy's state and
  the learned-up-to marks as arrays; ``restore()`` takes them back and continues exactly.
* **Forgetting.** A series that has had no window for ``forget_after_ms`` of the worker's own
  time (processing time, as Flink's state TTL: a replay of 2014's recordings is as alive as a
  live fleet) is forgotten, with its device once none of the device's series is left, unless
  an incident of either is open: a fleet whose device ids churn (replaced sensors, asset tags
  passing a gateway) would otherwise keep every id it ever saw, ~9 KB a series, in memory and in
  every snapshot. One that comes back starts afresh, as a new series. The others continue
  exactly: forgetting is a snapshot without them, restored (ids are dense again).
* **Silence.** An incident open on a series that stopped sending windows (a device that died,
  or was unplugged, in the middle of one) would stay open for good, and keep its series from
  being forgotten. It is resolved as silent once the series has had no window for
  ``resolve_silent_after_ms`` while its gateway kept sending others, measured both ways: in
  the worker's time (a backlog replayed after an outage is not silence: the gateway sent
  nothing meanwhile) and in event time against the gateway's newest window (replayed
  recordings of different years, or a backlog's first batches, are not silence either), and
  in event time for at least ``clear + 1`` of the series' usual gaps between windows (a device
  that reports once a day is not silent between two reports). A series without any window for
  ``forget_after_ms`` has its incident resolved whatever its gateway does (a gateway gone for
  good). The resolution overwrites the incident's point like any other, its message says why.
  A gateway's silent series are sought at most once a minute of the worker's time.
  A gateway whose devices all fell silent sends no windows at all; its health reports stand in
  (``heard``): one that has reported nothing waiting for the cloud (outbox empty, intake caught
  up, clock set), without a break or a restart, for ``resolve_silent_after_ms`` has sent all
  its devices gave it up to its report's time, which then counts as its newest window's end.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.detect.base import DIRECTIONS, Detector, DeviceDetector, DeviceFrame, Frame, Verdict
from cloud.detect.policy import NO_INCIDENT, AlertPolicy, PolicyConfig
from cloud.detect.state import Array, Column, KeyIndex, StateArrays
from cloud.enrich import EnrichedResults
from devices.readings import F64, I64

log = logging.getLogger("fieldline.cloud.detect")
PRIMARY = "primary"
BoolArray = npt.NDArray[np.bool_]
FORGET_AFTER_MS = 30 * 86_400_000  # default: a series silent for 30 days is forgotten
SWEEP_EVERY_MS = 3_600_000  # how often (processing time) forgetting is considered
NEVER_SEEN = np.iinfo(np.int64).min
RESOLVE_SILENT_AFTER_MS = 3_600_000  # default: an incident of a series silent for 1 h resolves
# health reports further apart than this (worker's time) do not make one run of idle reports
# (twice the longest health interval an agent takes: a gateway this quiet is down)
IDLE_REPORT_GAP_MS = 600_000
SILENCE_CHECK_EVERY_MS = 60_000  # how often (worker's time) a gateway's silent series are sought
GAP_MEMORY = 0.1  # weight of the newest gap between a series' windows in its usual gap
DEVICE_SUBJECT = "(device)"  # the metric of an incident judged across a device's metrics
# snapshot arrays whose first axis is the device id (the rest: the series id)
DEVICE_ARRAYS = ("dmarks.", "dpolicy.", "ddet.")


@dataclass(frozen=True, kw_only=True)
class Anomaly:
    """A window some detector judged at or beyond its threshold."""

    row: int  # index into the EnrichedResults it came from
    detector: str
    direction: str
    score: float  # severity: 1.0 is the detector's threshold
    value: float
    reference: float
    message: str
    device_level: bool = False  # judged across the device's metrics, not this one alone


@dataclass(frozen=True, kw_only=True)
class AlertEvent:
    """An incident opening or resolving. Identity: subject + ``incident`` (its first window)."""

    row: int
    level: str  # "series" | "device"
    source: str  # "detector" | "rule"
    name: str  # the detector (or rule) that opened it
    state: str  # "open" | "resolved"
    incident: int  # start of the window that opened it (ms)
    until: int  # end of its last window at or above the hold level (ms)
    severity: float  # peak so far
    direction: str
    value: float
    reference: float
    message: str
    # an event of no row of the batch (an incident resolved as silent): its subject (gateway,
    # device, metric or DEVICE_SUBJECT, window)
    # a resolution's site, the one its incident opened with (the worker fills it in from the
    # registry as of the incident's start: a device moved meanwhile leaves no point open)
    subject: tuple[str, str, str, str] | None = None
    site: str | None = None


def subject_of(rows: EnrichedResults, e: AlertEvent) -> tuple[str, str, str, str]:
    """(gateway, device, metric or ``DEVICE_SUBJECT``, window) of an event."""
    if e.subject is not None:
        return e.subject
    i = e.row
    return (rows.gateway, rows.device[i],
            rows.metric[i] if e.level == "series" else DEVICE_SUBJECT, rows.window[i])


@dataclass
class Detections:
    anomalies: list[Anomaly] = field(default_factory=list)
    alerts: list[AlertEvent] = field(default_factory=list)
    severity: F64 = field(default_factory=lambda: np.zeros(0))  # per row; NaN: not judged
    incident: I64 = field(default_factory=lambda: np.zeros(0, np.int64))  # per row
    opened: BoolArray = field(default_factory=lambda: np.zeros(0, bool))  # per row


def rounds(key: I64, start: I64) -> list[I64]:
    """Row indices in rounds: each round holds at most one row per key, oldest first."""
    n = len(key)
    if n == 0:
        return []
    order = np.lexsort((start, key))
    k = key[order]
    first = np.r_[True, k[1:] != k[:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    occ = np.empty(n, np.int64)
    occ[order] = np.arange(n) - run_start
    return [np.flatnonzero(occ == r) for r in range(int(occ.max()) + 1)]


# the detectors that judge an on/off state's series too (its limits); the others judge quantities
JUDGES_STATES = frozenset({"threshold"})
# ... and those whose verdict is no change from a reference (a limit crossed, a sensor that
# stopped moving), so that no smallest change worth an alert applies to them
JUDGES_NO_CHANGE = frozenset({"threshold", "stuck"})
# a series whose readings stay this many resolution floors from zero is a fine measurement
# (its step is a small part of what it measures) even before it has shown a range
FINE_LEVEL = 10.0


class DetectionStage:
    def __init__(self, detectors: Sequence[Detector], *,
                 device_detectors: Sequence[DeviceDetector] = (),
                 policy: PolicyConfig | None = None, windows: Sequence[str] = (PRIMARY,),
                 max_device_metrics: int = 16, relearn_after: int = 30,
                 min_change: dict[str, float] | None = None,
                 resolution_steps: float = 3.0,
                 forget_after_ms: int = FORGET_AFTER_MS,
                 resolve_silent_after_ms: int = RESOLVE_SILENT_AFTER_MS,
                 clock: Callable[[], float] = time.time) -> None:
        self.detectors = list(detectors)
        self.forget_after_ms = forget_after_ms  # 0: never
        self.resolve_silent_after_ms = resolve_silent_after_ms  # 0: never
        self.gateway_end: dict[str, int] = {}  # gateway -> end of its newest window judged
        self._silence_checked: dict[str, int] = {}  # gateway -> when (worker's time)
        # gateway -> its run of idle health reports: (worker's time of the first and of the
        # latest, the agent's time of the latest, its agent's counter then); in snapshots, so
        # a restart (or the partition's next owner) goes on with a run (a gap of more than
        # IDLE_REPORT_GAP_MS between its reports, the restart's included, starts it again)
        self.gateway_idle: dict[str, tuple[int, int, int, int]] = {}
        self.clock = clock  # seconds (processing time, for forgetting only)
        self._swept_at = clock() * 1000
        self.min_change = dict(min_change or {})
        self.resolution_steps = resolution_steps
        self.device_detectors = list(device_detectors)
        self.windows = frozenset(windows)
        self.max_device_metrics = max_device_metrics
        self.relearn_after = relearn_after
        self.series = KeyIndex()
        self.devices = KeyIndex()
        self.slots: dict[tuple[int, str], int] = {}  # (device id, metric) -> column
        self.slot_count: Counter[int] = Counter()
        self.series_device = np.zeros(0, np.int64)  # per series id: its device id
        self.series_slot = np.zeros(0, np.int64)  # ... and its column there (-1: none)
        self.device_slots = np.zeros(0, np.int64)  # per device id: columns in use
        self.series_policy = AlertPolicy(policy)
        self.device_policy = AlertPolicy(policy)
        self.marks = StateArrays({"learned": Column((), np.int64, np.iinfo(np.int64).min)})
        # per series: every window so far had its extremes in {0, 1}, an on/off state's series
        self.on_off = StateArrays({"on_off": Column((), np.bool_, True)})
        # per series: the smallest difference seen between its readings (its resolution), its
        # last window's extremes, and the lowest and highest reading it ever had
        self.grain = StateArrays({"step": Column((), np.float64, np.inf),
                                  "lo": Column((), np.float64, np.nan),
                                  "hi": Column((), np.float64, np.nan),
                                  "least": Column((), np.float64, np.nan),
                                  "most": Column((), np.float64, np.nan)})
        self.device_marks = StateArrays({"learned": Column((), np.int64,
                                                           np.iinfo(np.int64).min)})
        # per series: the worker's time (ms) of its latest window, for forgetting; the end of
        # its newest window learned and its usual gap between windows' starts (event time),
        # for silence
        self.seen = StateArrays({"at": Column((), np.int64, NEVER_SEEN),
                                 "end": Column((), np.int64, NEVER_SEEN),
                                 "gap": Column((), np.float64, 0.0)})
        self.counters: Counter[str] = Counter()
        self.anomalies = 0

    # ---- the batch ---------------------------------------------------------------------------

    def run(self, rows: EnrichedResults) -> Detections:
        n = len(rows)
        out = Detections(severity=np.full(n, np.nan), incident=np.full(n, NO_INCIDENT),
                         opened=np.zeros(n, bool))
        if n == 0:
            return out
        primary = rows.primary_window
        take = {w for w in set(rows.window)
                if w in self.windows or (w == primary and PRIMARY in self.windows)}
        wanted = (np.ones(n, bool) if len(take) == len(set(rows.window)) else
                  np.fromiter((w in take for w in rows.window), dtype=bool, count=n))
        finite = np.isfinite(rows.mean) & np.isfinite(rows.min) & np.isfinite(rows.max)
        judge = np.flatnonzero(wanted & finite & (rows.count > 0))
        self.counters["windows_not_finite"] += int((wanted & ~finite).sum())
        if not len(judge):
            return out
        gw = rows.gateway
        dev, met, win = rows.device, rows.metric, rows.window
        known = len(self.series)
        sid = self.series.ids([(gw, dev[i], met[i], win[i]) for i in judge.tolist()])
        if len(self.series) > known:
            self._new_series(known)
        self._reserve()
        now = int(self.clock() * 1000)
        self.seen["at"][sid] = now
        for r in rounds(sid, rows.start[judge]):
            self._series_round(rows, judge[r], sid[r], out)
        if self.device_detectors:
            self._device_pass(rows, judge, sid, out)
        self.anomalies += len(out.anomalies)
        end = int((rows.start[judge] + rows.width[judge]).max())
        self.gateway_end[gw] = max(self.gateway_end.get(gw, end), end)
        if now - self._silence_checked.get(gw, NEVER_SEEN) >= SILENCE_CHECK_EVERY_MS:
            self._silence_checked[gw] = now
            out.alerts += self.resolve_silent(gw, now)
        if self.forget_after_ms and now - self._swept_at >= SWEEP_EVERY_MS:
            self._swept_at = now
            self.forget_silent(now)
        return out

    def forget_silent(self, now_ms: int) -> int:
        """Forget the series without a window for ``forget_after_ms`` and no open incident
        (nor their device's), and the devices left without series; returns how many series."""
        n = len(self.series)
        if not n or not self.forget_after_ms:
            return 0
        self._reserve()
        gone = self.seen["at"][:n] < now_ms - self.forget_after_ms
        if not gone.any():
            return 0
        busy = self.series_policy.state["incident"][:n] != NO_INCIDENT
        dev = self.series_device[:n]
        dinc = self.device_policy.state["incident"][: self.device_policy.state.size]
        dbusy = np.zeros(len(self.devices), bool)
        dbusy[: len(dinc)] = dinc != NO_INCIDENT
        keep = ~gone | busy | dbusy[dev]
        forgotten = n - int(keep.sum())
        if forgotten:
            self._keep(keep)
            self.counters["series_forgotten"] += forgotten
            log.info("forgot %d series not seen for %d days (%d left): if they come back, "
                     "their detectors start afresh", forgotten,
                     self.forget_after_ms // 86_400_000, len(self.series))
        return forgotten

    def _keep(self, keep: BoolArray) -> None:
        """Only the series ``keep`` says (and their devices), as a snapshot restored."""
        snap = self.snapshot()
        keep_dev = np.zeros(len(self.devices), bool)
        keep_dev[self.series_device[: len(keep)][keep]] = True
        new_dev = np.cumsum(keep_dev) - 1
        arrays = {k: v[(keep_dev if k.startswith(DEVICE_ARRAYS) else keep)[: len(v)]]
                  for k, v in snap["arrays"].items()}
        self.restore({
            "series": [k for k, ok in zip(snap["series"], keep.tolist(), strict=True) if ok],
            "devices": [k for k, ok in zip(snap["devices"], keep_dev.tolist(), strict=True)
                        if ok],
            "slots": [[int(new_dev[d]), m, sl] for d, m, sl in snap["slots"] if keep_dev[d]],
            "idle": snap["idle"], "arrays": arrays})

    def _reserve(self) -> None:
        n = len(self.series)
        for det in self.detectors:
            det.state.reserve(n)
        self.marks.reserve(n)
        self.on_off.reserve(n)
        self.grain.reserve(n)
        self.seen.reserve(n)
        self.series_policy.state.reserve(n)

    def _series_round(self, rows: EnrichedResults, idx: I64, sid: I64, out: Detections) -> None:
        f = Frame(key=sid, start=rows.start[idx], width=rows.width[idx], count=rows.count[idx],
                  mean=rows.mean[idx], min=rows.min[idx], max=rows.max[idx], std=rows.std[idx],
                  low=rows.low[idx], high=rows.high[idx], floor=_floor(rows, idx))
        learned = self.marks["learned"]
        fresh = f.start > learned[sid]
        self.counters["windows_judged"] += len(f)
        self.counters["windows_rejudged"] += int((~fresh).sum())
        verdicts = [det.score(f) for det in self.detectors]
        states = self._on_off(f, fresh)
        if states.any():
            for det, v in zip(self.detectors, verdicts, strict=True):
                if det.name not in JUDGES_STATES:
                    v.severity[states] = 0.0
        self._small_changes(rows, idx, f, fresh, verdicts)
        learn_rows = np.flatnonzero(fresh)
        self._learned(f.key[learn_rows], f.start[learn_rows], f.width[learn_rows])
        if not verdicts:
            learned[sid[learn_rows]] = f.start[learn_rows]
            return
        sev = np.stack([v.severity for v in verdicts])  # (detectors, rows)
        top = np.argmax(sev, axis=0)
        best = sev[top, np.arange(len(f))]
        if len(learn_rows):
            g = f.take(learn_rows)
            for det in self.detectors:
                det.learn(g)
            learned[g.key] = g.start
        out.severity[idx] = best
        # revisions are judged but must not step the policy twice for one window
        step_rows = learn_rows
        if len(step_rows):
            ps = self.series_policy.step(sid[step_rows], f.start[step_rows], best[step_rows],
                                         top[step_rows])
            rr = idx[step_rows]
            out.incident[rr] = np.where(ps.incident != NO_INCIDENT, ps.incident,
                                        out.incident[rr])
            out.opened[rr] |= ps.opened
            for j in np.flatnonzero(ps.opened | ps.resolved).tolist():
                k = int(step_rows[j])
                d = int(ps.opened_by[j])
                v = verdicts[d]
                out.alerts.append(self._event(
                    rows, int(idx[k]), "series", self.detectors[d].name,
                    "open" if ps.opened[j] else "resolved", int(ps.incident[j]),
                    int(ps.last_high[j]) + int(f.width[k]), float(ps.peak[j]),
                    int(v.direction[k]), float(v.value[k]), float(v.reference[k])))
        for det, v in zip(self.detectors, verdicts, strict=True):
            for k in np.flatnonzero(v.severity >= self.series_policy.config.open_at).tolist():
                i = int(idx[k])
                out.anomalies.append(Anomaly(
                    row=i, detector=det.name, direction=DIRECTIONS[int(v.direction[k])],
                    score=float(v.severity[k]), value=float(v.value[k]),
                    reference=float(v.reference[k]),
                    message=_message(rows.metric[i], det.name, int(v.direction[k]),
                                     float(v.value[k]), float(v.reference[k]),
                                     float(v.severity[k]))))

    def _learned(self, key: I64, start: I64, width: I64) -> None:
        """The series' newest window end and its usual gap between windows (before its
        ``learned`` mark moves to ``start``)."""
        if not len(key):
            return
        prev = self.marks["learned"][key]
        gap = self.seen["gap"][key]
        had = prev != np.iinfo(np.int64).min
        d = (start - np.where(had, prev, start)).astype(np.float64)
        self.seen["gap"][key] = np.where(~had, gap, np.where(gap == 0.0, d,
                                                             gap + GAP_MEMORY * (d - gap)))
        self.seen["end"][key] = np.maximum(self.seen["end"][key], start + width)

    # ---- silence -----------------------------------------------------------------------------

    def heard(self, gateway: str, ts_ms: int, *, idle: bool,
              running: int) -> list[AlertEvent]:
        """A health report of ``gateway`` came (now, by the worker's clock), its agent's time
        ``ts_ms``; ``idle``: nothing waits there for the cloud; ``running``: a counter that only
        grows while its agent runs (lower than the last report's: it restarted, and a backlog
        its devices' broker kept for it may be on its way). Once it has been idle without a
        break for ``resolve_silent_after_ms``, its silent series are sought (at most once a
        minute), its report's time standing for its newest window's end."""
        now_ms = int(self.clock() * 1000)
        prev = self.gateway_idle.get(gateway)
        if not idle:
            self.gateway_idle.pop(gateway, None)
            return []
        since = now_ms  # a run of idle reports begins, unless this one goes on with it
        if prev is not None and now_ms - prev[1] <= IDLE_REPORT_GAP_MS and running >= prev[3]:
            since, ts_ms = prev[0], max(prev[2], ts_ms)
        self.gateway_idle[gateway] = (since, now_ms, ts_ms, running)
        t = self.resolve_silent_after_ms
        if (not t or now_ms - since < t
                or now_ms - self._silence_checked.get(gateway, NEVER_SEEN)
                < SILENCE_CHECK_EVERY_MS):
            return []
        self._silence_checked[gateway] = now_ms
        return self.resolve_silent(gateway, now_ms)

    def _horizon(self, gateway: str, now_ms: int) -> int:
        """The event time up to which ``gateway`` has sent all it will: its newest window's
        end, or its agent's time in a run of idle reports ``resolve_silent_after_ms`` long."""
        end = self.gateway_end.get(gateway, NEVER_SEEN)
        idle = self.gateway_idle.get(gateway)
        if idle is not None and now_ms - idle[0] >= self.resolve_silent_after_ms:
            return max(end, idle[2])
        return end

    def resolve_silent(self, gateway: str, now_ms: int) -> list[AlertEvent]:
        """Resolve the incidents of series (and devices) silent while ``gateway`` (of the
        batch at hand, or of an idle health report) was up, and of any series silent for
        ``forget_after_ms``."""
        out: list[AlertEvent] = []
        if not self.resolve_silent_after_ms and not self.forget_after_ms:
            return out
        self._reserve()
        t = self.resolve_silent_after_ms
        horizon = self._horizon(gateway, now_ms)
        for level, policy, subj in self._open_levels():
            at, end, gap, width = self._silence_of(level, subj)
            quiet = np.zeros(len(subj), bool)
            if self.forget_after_ms:
                quiet |= at < now_ms - self.forget_after_ms
            if t and horizon != NEVER_SEEN:
                mine = np.fromiter((self._subject(level, j)[0] == gateway
                                    for j in subj.tolist()), bool, count=len(subj))
                wait = np.maximum(t, (policy.config.clear + 1) * gap)
                quiet |= (mine & (at <= now_ms - t) & (end != NEVER_SEEN)
                          & (horizon - end >= wait))
            for k in np.flatnonzero(quiet).tolist():
                out.append(self._silent_event(level, int(subj[k]), now_ms - int(at[k]),
                                              int(width[k])))
            policy.close(subj[quiet])
        self.counters["alerts_resolved_silent"] += len(out)
        return out

    def _silence_of(self, level: str, subj: I64) -> tuple[I64, I64, F64, I64]:
        """Per subject: the worker's time of its latest window, its newest window's end, its
        usual gap and its window width (a device: those of its series, the latest)."""
        seen = self.seen
        n = len(self.series)
        if level == "series":
            learned = self.marks["learned"][subj]
            end = seen["end"][subj]
            return (seen["at"][subj], end, seen["gap"][subj],
                    np.where(end != NEVER_SEEN, end - learned, 0))
        nd = len(self.devices)
        dev = self.series_device[:n]
        at = np.full(nd, NEVER_SEEN, np.int64)
        end = np.full(nd, NEVER_SEEN, np.int64)
        gap = np.zeros(nd)
        width = np.zeros(nd, np.int64)
        np.maximum.at(at, dev, seen["at"][:n])
        np.maximum.at(end, dev, seen["end"][:n])
        np.maximum.at(gap, dev, seen["gap"][:n])
        known = seen["end"][:n] != NEVER_SEEN
        np.maximum.at(width, dev[known], seen["end"][:n][known]
                      - self.marks["learned"][:n][known])
        return at[subj], end[subj], gap[subj], width[subj]

    def _silent_event(self, level: str, j: int, quiet_ms: int, width: int) -> AlertEvent:
        s = (self.series_policy if level == "series" else self.device_policy).state
        subject = self._subject(level, j)
        what = subject[2] if level == "series" else "device"
        return AlertEvent(
            row=-1, level=level, source="detector", name=self._opener(level, j) or "detector",
            state="resolved", incident=int(s["incident"][j]),
            until=int(s["last_high"][j]) + width, severity=float(s["peak"][j]), direction="",
            value=math.nan, reference=math.nan,
            message=f"{subject[1]} {what}: no window for {_span(quiet_ms)} while its gateway "
                    "was up; resolved as silent", subject=subject)

    def _open_levels(self) -> list[tuple[str, AlertPolicy, I64]]:
        """(level, its policy, the subjects with an incident open) of each level with one."""
        out = []
        for level, policy in (("series", self.series_policy), ("device", self.device_policy)):
            subj = policy.open_incidents()
            if len(subj):
                out.append((level, policy, subj))
        return out

    def _names(self, level: str) -> list[str]:
        return ([d.name for d in self.detectors] if level == "series"
                else [d.name for d in self.device_detectors])

    def _opener(self, level: str, j: int) -> str:
        """The detector that opened the subject's incident ("" if it is not configured)."""
        names = self._names(level)
        by = int((self.series_policy if level == "series" else self.device_policy)
                 .state["by"][j])
        return names[by] if 0 <= by < len(names) else ""

    # ---- the incidents written -------------------------------------------------------------

    def open_by_subject(self) -> dict[tuple[str, str, str, str], list[Any]]:
        """The incidents open now, by subject (gateway, device, metric or
        ``DEVICE_SUBJECT``, window): [incident, detector, peak, until], as the rules' state
        keeps them (``RuleEngine.incidents``)."""
        out: dict[tuple[str, str, str, str], list[Any]] = {}
        for level, policy, subj in self._open_levels():
            width = self._silence_of(level, subj)[3]
            st = policy.state
            for j, w in zip(subj.tolist(), width.tolist(), strict=True):
                out[self._subject(level, j)] = [
                    int(st["incident"][j]), self._opener(level, j), float(st["peak"][j]),
                    int(st["last_high"][j]) + int(w)]
        return out

    def open_count(self) -> int:
        """How many incidents are open now (series and devices)."""
        return len(self.series_policy.open_incidents()) + len(self.device_policy.open_incidents())

    def _subject(self, level: str, j: int) -> tuple[str, str, str, str]:
        if level == "series":
            k: tuple[str, ...] = self.series.keys[j]  # type: ignore[assignment]
            return (k[0], k[1], k[2], k[3])
        k = self.devices.keys[j]  # type: ignore[assignment]
        return (k[0], k[1], DEVICE_SUBJECT, k[2])

    def reconcile(self, written: Mapping[tuple[str, str, str, str], Sequence[Any]], *,
                  close: bool = True) -> tuple[int, int]:
        """Make the open incidents those ``written`` says (the rules' state keeps them
        exactly, to the last batch acknowledged): a detector snapshot older than that (a
        SIGKILL between two saves, or none that could be read) lacks those opened since, which
        would stay open in InfluxDB for good, and holds those resolved since. Those it lacks are
        opened again as they were (a series it never saw is added); with ``close``, those it
        holds that are not written open are closed. Returns (opened, closed)."""
        have = self.open_by_subject()
        opened = closed = 0
        for key, (inc, name, peak, until) in written.items():
            if have.get(key, [None])[0] == inc:
                continue
            level = "device" if key[2] == DEVICE_SUBJECT else "series"
            names = self._names(level)
            by = names.index(name) if name in names else None
            if by is None:
                log.warning("incident of %s opened by %r, which is not configured now: it "
                            "stays as written", key, name)
                continue
            if level == "series":
                known = len(self.series)
                j = int(self.series.ids([key])[0])
                if len(self.series) > known:
                    self._new_series(known)
                self._reserve()
                if self.seen["at"][j] == NEVER_SEEN:  # new: seen now, as far as silence goes
                    self.seen["at"][j] = int(self.clock() * 1000)
            else:
                got = self.devices.get((key[0], key[1], key[3]))
                if got is None:  # (device detectors need a long history: not since a save)
                    log.warning("incident of device %s of gateway %s not reopened: its "
                                "detectors do not know it", key[1], key[0])
                    continue
                j = got
                self.device_policy.state.reserve(len(self.devices))
            width = self._silence_of(level, np.array([j]))[3]
            st = (self.series_policy if level == "series" else self.device_policy).state
            st["incident"][j] = int(inc)
            st["by"][j] = by
            st["peak"][j] = float(peak)
            st["last_high"][j] = int(until) - int(width[0])
            st["quiet"][j] = 0
            st["opened_n"][j] = st["n"][j]
            opened += 1
        if close:
            for key in have.keys() - written.keys():
                level = "device" if key[2] == DEVICE_SUBJECT else "series"
                if level == "series":
                    sid = self.series.get(key)
                    policy = self.series_policy
                else:
                    sid = self.devices.get((key[0], key[1], key[3]))
                    policy = self.device_policy
                if sid is not None:
                    policy.close(np.array([sid], np.int64))
                    closed += 1
        return opened, closed

    def _small_changes(self, rows: EnrichedResults, idx: I64, f: Frame, fresh: BoolArray,
                       verdicts: list[Verdict]) -> None:
        """A verdict whose value is within the series' smallest change worth an alert of its
        reference says nothing a user can act on: a drifting room's new high by one step of its
        0.1 degC thermometer. That floor is ``resolution_steps`` steps of the sensor's own
        resolution, learned as the smallest difference seen between readings of the series
        (window extremes: raw readings), or the metric's ``min_change`` if larger. Such a
        verdict has severity 0; the detectors still learn the window as they would (a change
        that grows past the floor, held against the range before it, alerts).

        The floor applies only to a series that has shown a range of at least twice the floor:
        one of few levels (a counter of spikes that reads 0 or 20, a pressure gauge whose
        readings move by whole steps of a coarse converter) says all it has to say in a step
        or two, and its "resolution" is its signal, not its noise. A series whose readings
        stay far from zero next to its floor (``FINE_LEVEL`` floors or more: a battery's whole
        percent at 97, a 0.1 degC thermometer at 21) is a fine measurement from its first change
        on: its first step down is no anomaly, however flat it was before."""
        g = self.grain
        key = f.key
        if fresh.any():
            k = key[fresh]
            lo, hi = f.min[fresh], f.max[fresh]
            tol = 1e-9 * np.maximum(np.abs(hi), 1.0)
            with np.errstate(invalid="ignore"):
                d = np.stack([hi - lo, np.abs(hi - g["hi"][k]), np.abs(lo - g["lo"][k])])
            np.minimum.at(g["step"], k, np.where(d > tol, d, np.inf).min(axis=0))  # NaN: inf
            g["lo"][k] = lo
            g["hi"][k] = hi
            np.fmin.at(g["least"], k, lo)
            np.fmax.at(g["most"], k, hi)
        step = g["step"][key]
        floor = self.resolution_steps * np.where(np.isfinite(step), step, 0.0)
        least, most = g["least"][key], g["most"][key]
        with np.errstate(invalid="ignore"):
            # how far the readings stay from zero (0 when they cross it)
            level = np.maximum(np.maximum(least, -most), 0.0)
            fine = (most - least >= 2 * floor) | (level >= FINE_LEVEL * floor)
        floor[~fine] = 0.0
        floor *= 1 - 1e-9
        if self.min_change:
            floor = np.maximum(floor, np.fromiter(
                (self.min_change.get(rows.metric[i], 0.0) for i in idx.tolist()), np.float64,
                count=len(idx)))
        if not floor.any():
            return
        for det, v in zip(self.detectors, verdicts, strict=True):
            if det.name not in JUDGES_NO_CHANGE:
                with np.errstate(invalid="ignore"):
                    small = np.abs(v.value - v.reference) < floor
                v.severity[small] = 0.0

    def _on_off(self, f: Frame, fresh: BoolArray) -> BoolArray:
        """Which rows belong to an on/off state's series (a door contact, a leak sensor, a
        relay: readings of 1 and 0, so every window's min and max is 0 or 1). Their windows'
        means move from 0 to 1 whenever the state changes, which a detector of quantities takes
        for a spike or a new extreme: one alert per door opening. They are left to the limits
        (``threshold``); a series is a quantity's from its first window with another extreme."""
        mark = self.on_off["on_off"]
        now = ((f.min == 0.0) | (f.min == 1.0)) & ((f.max == 0.0) | (f.max == 1.0))
        mark[f.key[fresh & ~now]] = False
        return np.asarray(mark[f.key] & now)

    def _event(self, rows: EnrichedResults, row: int, level: str, name: str, state: str,
               incident: int, until: int, peak: float, direction: int, value: float,
               reference: float) -> AlertEvent:
        what = rows.metric[row] if level == "series" else "device"
        msg = (f"{rows.device[row]} {what}: {name} {DIRECTIONS[direction] or 'anomaly'}"
               f" (peak severity {peak:.1f})" if state == "open"
               else f"{rows.device[row]} {what}: back to normal")
        return AlertEvent(row=row, level=level, source="detector", name=name, state=state,
                          incident=incident, until=until, severity=peak,
                          direction=DIRECTIONS[direction], value=value, reference=reference,
                          message=msg)

    # ---- devices -----------------------------------------------------------------------------

    def _new_series(self, first: int) -> None:
        """Series ids from ``first`` on are new: give each its device and its column there."""
        keys: list[tuple[str, str, str, str]] = self.series.keys[first:]  # type: ignore[assignment]
        did = self.devices.ids([(k[0], k[1], k[3]) for k in keys])
        slot = [self._slot(int(i), k[2]) for i, k in zip(did.tolist(), keys, strict=True)]
        n = len(self.series)
        grown = np.full(n, -1, np.int64)
        grown[:first] = self.series_device[:first]
        grown[first:] = did
        self.series_device = grown
        grown = np.full(n, -1, np.int64)
        grown[:first] = self.series_slot[:first]
        grown[first:] = slot
        self.series_slot = grown
        cnt = np.zeros(len(self.devices), np.int64)
        cnt[: len(self.device_slots)] = self.device_slots
        for d in set(did.tolist()):
            cnt[d] = self.slot_count[d]
        self.device_slots = cnt

    def _device_pass(self, rows: EnrichedResults, judge: I64, sid: I64,
                     out: Detections) -> None:
        did = self.series_device[sid]
        slot = self.series_slot[sid]
        # a device of one metric has no joint pattern: leave it to the series detectors
        several = self.device_slots[did] >= 2
        # an on/off state has no place in a pattern of quantities (its 0 <-> 1 is no deviation)
        ok = (slot >= 0) & several & ~self.on_off["on_off"][sid]
        judge, did, slot = judge[ok], did[ok], slot[ok]
        if not len(judge):
            return
        nd = len(self.devices)
        for det in self.device_detectors:
            det.state.reserve(nd)
        self.device_marks.reserve(nd)
        self.device_policy.state.reserve(nd)
        # one observation per (device, window start): the device's metrics as columns
        start = rows.start[judge]
        pairs, gi = np.unique(np.stack([did, start]), axis=1, return_inverse=True)
        gi = gi.reshape(-1)
        ng = pairs.shape[1]
        g_did, g_start = pairs[0], pairs[1]
        g_row = np.full(ng, -1, np.int64)  # a representative row of each group
        g_row[gi[::-1]] = judge[::-1]
        m = int(slot.max()) + 1  # only the columns some device of this batch uses
        values = np.full((ng, m), np.nan)
        floor = np.full((ng, m), np.nan)
        values[gi, slot] = rows.mean[judge]
        floor[gi, slot] = _floor(rows, judge)
        g_sev = np.full(ng, np.nan)
        g_inc = np.full(ng, NO_INCIDENT)
        g_opened = np.zeros(ng, bool)
        open_at = self.device_policy.config.open_at
        for r in rounds(g_did, g_start):
            f = DeviceFrame(key=g_did[r], start=g_start[r], values=values[r], floor=floor[r])
            verdicts = [det.score(f) for det in self.device_detectors]
            learned = self.device_marks["learned"]
            fresh = f.start > learned[f.key]
            sev = np.stack([v.severity for v in verdicts])
            top = np.argmax(sev, axis=0)
            best = sev[top, np.arange(len(f))]
            g_sev[r] = best
            # a device in alert does not teach its baseline, unless the alert has lasted so
            # long that its state is the new normal
            age = self.device_policy.open_for(f.key)
            teach = fresh & (((age < 0) & (best < open_at)) | (age >= self.relearn_after))
            for det in self.device_detectors:
                det.learn(f, teach)
            learned[f.key[fresh]] = f.start[fresh]
            step = np.flatnonzero(fresh)
            for k in np.flatnonzero(best >= open_at).tolist():
                v = verdicts[int(top[k])]
                row = int(g_row[r[k]])
                out.anomalies.append(Anomaly(
                    row=row, detector=self.device_detectors[int(top[k])].name,
                    direction=DIRECTIONS[int(v.direction[k])], score=float(best[k]),
                    value=float(v.value[k]), reference=float(v.reference[k]),
                    message=f"{rows.device[row]}: joint deviation across "
                            f"{int(np.isfinite(f.values[k]).sum())} metrics "
                            f"(severity {best[k]:.1f})", device_level=True))
            if not len(step):
                continue
            ps = self.device_policy.step(f.key[step], f.start[step], best[step], top[step])
            g_inc[r[step]] = ps.incident
            g_opened[r[step]] = ps.opened
            for j in np.flatnonzero(ps.opened | ps.resolved).tolist():
                k = int(step[j])
                row = int(g_row[r[k]])
                d = int(ps.opened_by[j])
                v = verdicts[d]
                out.alerts.append(self._event(
                    rows, row, "device", self.device_detectors[d].name,
                    "open" if ps.opened[j] else "resolved", int(ps.incident[j]),
                    int(ps.last_high[j]) + int(rows.width[row]), float(ps.peak[j]),
                    int(v.direction[k]), float(v.value[k]), float(v.reference[k])))
        out.severity[judge] = np.fmax(out.severity[judge], g_sev[gi])
        inc = g_inc[gi]
        out.incident[judge] = np.where(out.incident[judge] == NO_INCIDENT, inc,
                                       out.incident[judge])
        out.opened[judge] |= g_opened[gi]

    def _slot(self, device: int, metric: str) -> int:
        s = self.slots.get((device, metric))
        if s is None:
            s = self.slot_count[device]
            if s >= self.max_device_metrics:
                return -1
            self.slots[(device, metric)] = s
            self.slot_count[device] = s + 1
        return s

    # ---- state ---------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue exactly: keys, marks, policy and detector state."""
        arrays: dict[str, Array] = {}
        arrays.update(self.marks.snapshot("marks."))
        arrays.update(self.on_off.snapshot("marks."))
        arrays.update(self.grain.snapshot("grain."))
        arrays.update(self.seen.snapshot("seen."))
        arrays.update(self.device_marks.snapshot("dmarks."))
        arrays.update(self.series_policy.state.snapshot("policy."))
        arrays.update(self.device_policy.state.snapshot("dpolicy."))
        for det in self.detectors:
            arrays.update(det.state.snapshot(f"det.{det.name}."))
        for ddet in self.device_detectors:
            arrays.update(ddet.state.snapshot(f"ddet.{ddet.name}."))
        return {"series": [list(k) for k in self.series.snapshot()  # type: ignore[call-overload]
                           ],
                "devices": [list(k) for k in self.devices.snapshot()  # type: ignore[call-overload]
                            ],
                "slots": [[d, m, s] for (d, m), s in self.slots.items()],
                "idle": [[g, *run] for g, run in self.gateway_idle.items()],
                "arrays": arrays}

    def restore(self, snap: dict[str, Any]) -> None:
        self.series.restore(tuple(k) for k in snap["series"])
        self.devices.restore(tuple(k) for k in snap["devices"])
        self.slots = {(int(d), str(m)): int(s) for d, m, s in snap["slots"]}
        # (from before runs of idle reports were kept: none)
        self.gateway_idle = {str(g): (int(a), int(b), int(c), int(r))
                             for g, a, b, c, r in snap.get("idle", [])}
        self.slot_count = Counter()
        for (d, _), s in self.slots.items():
            self.slot_count[d] = max(self.slot_count[d], s + 1)
        self.series_device = np.array([self.devices.get((k[0], k[1], k[3]))  # type: ignore[index]
                                       for k in self.series.keys], np.int64)
        self.series_slot = np.array([self.slots.get((int(d), str(k[2])), -1)  # type: ignore[index]
                                     for d, k in zip(self.series_device.tolist(),
                                                     self.series.keys, strict=True)], np.int64)
        self.device_slots = np.array([self.slot_count[d] for d in range(len(self.devices))],
                                     np.int64)
        a = snap["arrays"]
        self.marks.restore(a, "marks.")
        if "marks.on_off" in a:
            self.on_off.restore(a, "marks.")
        else:  # a snapshot from before on/off series were told apart: all judged, as then
            self.on_off.restore({"marks.on_off": np.zeros(self.marks.size, np.bool_)}, "marks.")
        # from before resolutions (or the ranges beside them) were kept: learned from the next
        # windows on
        self.grain.restore(a, "grain.", absent=self.marks.size)
        # from before series were forgotten: each seen now (forgotten 30 days on if silent)
        if "seen.at" not in a:
            a = {**a, "seen.at": np.full(self.marks.size, int(self.clock() * 1000), np.int64)}
        # from before silence was told: each series' newest window ended at least at the start
        # of the newest it learned (its usual gap is learned from its next windows)
        if "seen.end" not in a:
            learned = np.asarray(a["marks.learned"])
            a = {**a, "seen.end": np.where(learned != np.iinfo(np.int64).min, learned,
                                           NEVER_SEEN)}
        self.seen.restore(a, "seen.", absent=self.marks.size)
        self.device_marks.restore(a, "dmarks.")
        self.series_policy.state.restore(a, "policy.")
        self.device_policy.state.restore(a, "dpolicy.")
        for det in self.detectors:
            det.state.restore(a, f"det.{det.name}.")
        for ddet in self.device_detectors:
            ddet.state.restore(a, f"ddet.{ddet.name}.")

    def save(self, path: Path) -> None:
        """The snapshot to one ``.npz`` file (arrays, and the keys as JSON), atomically."""
        write_snapshot(self.snapshot(), path)

    def load(self, path: Path) -> bool:
        """Restore a snapshot written by ``save``; False (and a log line) if there is none or
        it does not fit these detectors (then they start afresh)."""
        if not path.exists():
            return False
        return self._load(path, str(path))

    def load_bytes(self, blob: bytes, source: str = "snapshot") -> bool:
        """Restore from what ``snapshot_bytes`` made (a partition snapshot)."""
        return self._load(io.BytesIO(blob), source)

    def snapshot_bytes(self) -> bytes:
        return encode_detection(self.snapshot())

    def _load(self, src: Path | io.BytesIO, source: str) -> bool:
        try:
            with np.load(src, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "__meta__"}
                meta = json.loads(str(z["__meta__"]))
        except Exception as exc:  # damaged (a zip cut short, zeroed blocks): start afresh
            log.warning("detector state in %s unreadable (%s: %s): detectors start afresh",
                        source, type(exc).__name__, exc)
            return False
        expected = {k: v.shape[1:] for k, v in self.snapshot()["arrays"].items()}
        optional = {k for k in expected if k.startswith("seen.") and k not in arrays}
        if {k: v.shape[1:] for k, v in arrays.items()} != {
                k: v for k, v in expected.items() if k not in optional}:
            log.warning("detector state in %s was written by other detectors or options: "
                        "they start afresh", source)
            return False
        self.restore({**meta, "arrays": arrays})
        return True

    def state_bytes(self) -> int:
        return (sum(d.state.nbytes() for d in self.detectors)
                + sum(d.state.nbytes() for d in self.device_detectors)
                + self.series_policy.state.nbytes() + self.device_policy.state.nbytes())


def _savez(snap: dict[str, Any], fh: Any) -> None:
    meta = json.dumps({k: snap[k] for k in ("series", "devices", "slots", "idle")})
    np.savez(fh, __meta__=np.array(meta), **snap["arrays"])


def encode_detection(snap: dict[str, Any]) -> bytes:
    """A ``DetectionStage.snapshot()`` as the bytes ``load_bytes`` reads."""
    buf = io.BytesIO()
    _savez(snap, buf)
    return buf.getvalue()


def write_snapshot(snap: dict[str, Any], path: Path) -> None:
    """A ``DetectionStage.snapshot()`` to one ``.npz`` file (arrays, keys as JSON), atomically:
    take the snapshot where the stage runs, write it anywhere (a thread)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        _savez(snap, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _span(ms: int) -> str:
    """A duration as a person says it: 45 s, 12 min, 3.5 h, 2.0 days."""
    if ms < 120_000:
        return f"{ms / 1000:.0f} s"
    if ms < 7_200_000:
        return f"{ms / 60_000:.0f} min"
    if ms < 2 * 86_400_000:
        return f"{ms / 3_600_000:.1f} h"
    return f"{ms / 86_400_000:.1f} days"


def _floor(rows: EnrichedResults, idx: I64) -> F64:
    """The metric's scale floor, and never below a millionth of the value's magnitude."""
    return np.maximum(rows.scale_floor[idx], 1e-6 * np.abs(rows.mean[idx]) + 1e-12)


def _message(metric: str, detector: str, direction: int, value: float, reference: float,
             severity: float) -> str:
    what = DIRECTIONS[direction] or "anomaly"
    return (f"{metric} {what}: {value:.4g} vs {reference:.4g} ({detector}, "
            f"severity {severity:.1f})")

