"""Recorded data through the pipeline's own code, in process: replay -> edge pipeline (decode,
validate, windows) -> uplink contract (encode, decode) -> enrichment -> detection stage -> the
alert policy; then back to the recording's rows, for scoring (``simulators.scoring``).

This is the code path of ``fieldline edge run`` and ``fieldline cloud run`` without the brokers
and InfluxDB in between (the end-to-end test checks that those give the same alerts). The
clock is a manual one that follows the data's event time, so the result does not depend on how
fast anything runs.

Per row of a recording the outcome is:

* ``score``: NAB's anomaly score: on the first row of a window that *opened* an incident,
  ``s / (1 + s)`` for the incident's severity ``s`` (0.5 at the alert threshold); 0 elsewhere.
  One incident costs one detection, however long it lasts;
* ``active``: the row lies inside an incident (from the window that opened it to the end of its
  last window at or above the hold level): SKAB's point-wise outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from cloud.config import CloudConfig
from cloud.detect import AlertEvent, DetectionStage
from cloud.detect.stage import subject_of
from cloud.enrich import EnrichedResults, Enricher
from cloud.partition import build_detection
from devices.clock import ManualClock
from devices.contract import ResultBatch, decode_uplink
from devices.readings import F64, I64
from devices.registry import Registry
from edge.agent import EdgePipeline
from edge.config import EdgeConfig
from simulators.replay import Recording, ReplaySimulator, load_nab, load_skab, shift_to
from simulators.scoring import NabFile

BoolArray = npt.NDArray[np.bool_]


@dataclass
class Outcome:
    """What the pipeline made of one recording, per row of it."""

    name: str
    device: str
    ts: I64  # the recording's own row times (ms)
    value: F64  # the first column
    score: F64
    active: BoolArray
    severity: F64  # highest severity of the row's windows (NaN: not judged)
    alerts: list[tuple[str, AlertEvent]] = field(default_factory=list)  # (subject, event)
    shift_ms: int = 0  # event time = recorded time + shift_ms

    def as_csv_rows(self) -> list[str]:
        """NAB's row-level results format: timestamp,value,anomaly_score."""
        from datetime import UTC, datetime

        out = ["timestamp,value,anomaly_score"]
        for t, v, s in zip(self.ts.tolist(), self.value.tolist(), self.score.tolist(),
                           strict=True):
            stamp = datetime.fromtimestamp(t / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
            out.append(f"{stamp},{v!r},{s:.6f}")
        return out


class _Collector:
    """Window verdicts and incidents of each device's series, by metric."""

    def __init__(self) -> None:
        # device -> metric -> [(start, width, severity)]
        self.windows: dict[str, dict[str, list[tuple[int, int, float]]]] = {}
        self.events: dict[str, list[tuple[str, AlertEvent]]] = {}  # device -> (subject, event)

    def add(self, rows: EnrichedResults, severity: F64, alerts: Iterable[AlertEvent]) -> None:
        for d, m, s, w, v in zip(rows.device, rows.metric, rows.start.tolist(),
                                 rows.width.tolist(), severity.tolist(), strict=True):
            self.windows.setdefault(d, {}).setdefault(m, []).append((s, w, v))
        for e in alerts:
            _, device, subject, _ = subject_of(rows, e)
            self.events.setdefault(device, []).append((subject, e))


def run_recordings(recs: Sequence[Recording], edge: EdgeConfig, cloud: CloudConfig, *,
                   ref_ms: int, speed: float | None = None,
                   stage: DetectionStage | None = None) -> list[Outcome]:
    """Recordings as the devices of one gateway, through the pipeline's code.

    Each recording is moved by whole weeks to end at or before ``ref_ms`` (its own shift:
    recordings from different years overlap, as a fleet's devices do), replayed by
    ``ReplaySimulator`` (as ``fieldline replay`` does) at ``speed`` (None: as fast as
    possible) into the edge pipeline, whose clock follows the replay's wall time, starting
    at ``ref_ms``; its result batches go through the wire contract, enrichment and one
    detection stage. Returns each recording's outcome per row.
    """
    if not recs or not all(r.rows for r in recs):
        raise ValueError("nothing to replay (a recording without rows?)")
    shifts = [shift_to([r], ref_ms) for r in recs]
    moved = [r.moved(k) for r, k in zip(recs, shifts, strict=True)]
    first = min(r.rows[0][0] for r in moved)
    last = max(t for r in moved for t, _ in r.rows)
    wall = ref_ms if speed is None else ref_ms - round((last - first) / speed)
    sim = ReplaySimulator(moved, wall, speed=speed, shift_ms=0, gateway=edge.gateway,
                          topic_template=topic_template(edge))
    clock = ManualClock(now_ms=sim.start_ms, monotonic_ms=0)
    pipe = EdgePipeline(edge, clock)
    enricher = Enricher(Registry(), cloud.catalog)
    stage = stage or build_detection(cloud)
    seq = iter(range(1 << 62))
    got = _Collector()

    def ship(batches: list[ResultBatch]) -> None:
        for b in batches:
            up = decode_uplink(b.encode())  # the wire contract, both ways
            assert isinstance(up, ResultBatch)
            rows = enricher.enrich(up)
            det = stage.run(rows)
            got.add(rows, det.severity, det.alerts)

    for tick in sim.ticks():
        end = tick.tick_ms + sim.spec.interval_ms
        if end > clock.now_ms():
            clock.advance(end - clock.now_ms())
        now = clock.now_ms()
        pipe.process([(t, p, now) for t, p in tick.messages[edge.gateway]])
        ship(pipe.to_batches(pipe.emit(), lambda: next(seq)))
    clock.advance(max(edge.engine.time.idle_timeout_ms, 1) + 1)
    ship(pipe.to_batches(pipe.emit(), lambda: next(seq)))
    ship(pipe.to_batches(pipe.emit(flush=True), lambda: next(seq)))
    return [_outcome(r, got.windows.get(r.device, {}), got.events.get(r.device, []), k)
            for r, k in zip(recs, shifts, strict=True)]


def topic_template(edge: EdgeConfig) -> str:
    """Where a device publishes so that this gateway's intake hears it: its first topic
    filter with the device in the wildcard."""
    return edge.topics[0].replace("+", "{device}").replace("#", "{device}")


def _outcome(rec: Recording, windows: dict[str, list[tuple[int, int, float]]],
             events: list[tuple[str, AlertEvent]], shift_ms: int) -> Outcome:
    n = len(rec.rows)
    ts = np.array([t for t, _ in rec.rows], np.int64)
    et = ts + shift_ms
    metrics = list(rec.rows[0][1])
    value = np.array([v.get(metrics[0], np.nan) for _, v in rec.rows], np.float64)
    score = np.zeros(n)
    active = np.zeros(n, bool)
    severity = np.full(n, np.nan)
    # each row's window, per metric (the primary spec's tumbling windows)
    win_of: dict[str, tuple[I64, I64]] = {}
    for m, ws in windows.items():
        arr = np.array(sorted({(s, w) for s, w, _ in ws}), np.int64).reshape(-1, 2)
        sev: dict[int, float] = {}
        for s, _, v in ws:
            if not np.isnan(v):
                sev[s] = max(sev.get(s, 0.0), v)
        j = np.searchsorted(arr[:, 0], et, side="right") - 1
        inside = (j >= 0) & (et < arr[np.maximum(j, 0), 0] + arr[np.maximum(j, 0), 1])
        start = np.where(inside, arr[np.maximum(j, 0), 0], -1)
        win_of[m] = (start, inside)
        sv = np.array([sev.get(int(s), np.nan) for s in start.tolist()])
        severity = np.fmax(severity, sv)
    # incidents: [opening window start, end of last high window) per subject
    intervals: dict[str, list[tuple[int, int, float]]] = {}
    opened: dict[tuple[str, int], float] = {}
    for subject, e in events:
        if e.state == "open":
            opened[(subject, e.incident)] = e.severity
    closed = {(s, e.incident): e.until for s, e in events if e.state == "resolved"}
    for (subject, inc), sev_open in opened.items():
        until = closed.get((subject, inc), int(et.max()) + 1)
        intervals.setdefault(subject, []).append((inc, until, sev_open))
    for subject, ivs in intervals.items():
        subjects = list(win_of) if subject == "(device)" else [subject]
        for m in subjects:
            if m not in win_of:
                continue
            start, inside = win_of[m]
            for inc, until, sev_open in ivs:
                rows = inside & (start >= inc) & (start < until)
                active |= rows
                first = np.flatnonzero(inside & (start == inc))
                if len(first):
                    i = int(first[0])
                    score[i] = max(score[i], sev_open / (1.0 + sev_open))
    return Outcome(rec.path.name, rec.device, ts, value, score, active, severity, events,
                   shift_ms)


# ---- the data sets -------------------------------------------------------------------------


@dataclass
class NabCase:
    relative: str
    recording: Recording
    windows_ms: list[tuple[int, int]]  # in recorded time

    def nab_file(self) -> NabFile:
        ts = np.array([t for t, _ in self.recording.rows], np.int64)
        return NabFile.from_times(self.relative, ts, self.windows_ms)


@dataclass
class SkabCase:
    relative: str
    recording: Recording
    anomaly: BoolArray  # per row
    changepoints: I64  # recorded times (ms)


def nab_cases(root: Path) -> list[NabCase]:
    """Every labelled file of a NAB directory (``data/``, ``labels/combined_windows.json``)."""
    windows = json.loads((root / "labels" / "combined_windows.json").read_text())
    out = []
    for path in sorted((root / "data").glob("*/*.csv")):
        rel = f"{path.parent.name}/{path.name}"
        if rel not in windows:
            continue
        rec = load_nab(root, rel)
        wins = [(int(lab["orig_start"]), int(lab["orig_end"]))  # type: ignore[call-overload]
                for lab in rec.labels if lab["type"] == "label_window"]
        out.append(NabCase(rel, rec, wins))
    return out


def skab_cases(root: Path) -> list[SkabCase]:
    """Every fault run of a SKAB directory (``data/<group>/<n>.csv``; the anomaly-free run is
    not scored)."""
    out = []
    for path in sorted((root / "data").glob("*/*.csv"),
                       key=lambda p: (p.parent.name, int(p.stem) if p.stem.isdigit() else 0)):
        if path.parent.name == "anomaly-free":
            continue
        rel = f"{path.parent.name}/{path.name}"
        rec = load_skab(root, rel)
        labelled = {int(lab["orig_ts"]) for lab in rec.labels  # type: ignore[call-overload]
                    if lab["type"] == "label_row"}
        anomaly = np.array([t in labelled for t, _ in rec.rows], bool)
        cps = np.array(sorted(int(lab["orig_ts"]) for lab in rec.labels  # type: ignore[call-overload]
                              if lab["type"] == "changepoint"), np.int64)
        out.append(SkabCase(rel, rec, anomaly, cps))
    return out


def bench_edge_config(edge: EdgeConfig) -> EdgeConfig:
    """The shipped gateway config as an in-process pipeline runs it: no registry file, no disk,
    undeclared metrics accepted (recorded columns are rarely in a catalog)."""
    return replace(edge, registry_path=None, state_dir=None, durable=False)


