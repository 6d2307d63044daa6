"""Replay recorded data sets as device streams: NAB and SKAB files, or any CSV with a timestamp
column and value columns. Several files are several devices; a multi-column file (SKAB) is one
device with several sensors.

Time, end to end: a reading recorded at ``t`` keeps ``t`` as its event time, moved by one
constant ``shift_ms`` for the whole replay (``event_time(t) = t + shift_ms``; 0 keeps the
recorded times; ``shift_to(now)`` gives the whole number of weeks that makes the newest reading
land just before now, so time of day and weekday stay as recorded). The speed only decides
*when* a reading is published: at ``wall_start + (t - t_first) / speed``, or as fast as the
broker takes them (``speed=None``: a backfill, which ends once everything is published). Windows
and detections are therefore in data time and the same at any speed. Labels travel to the
ground-truth file in event time:

* NAB: the anomaly windows of ``labels/combined_windows.json`` (``label_window``) and the
  anomaly points of ``labels/combined_labels.json`` (``label_point``);
* SKAB: every row's ``anomaly`` and ``changepoint`` columns (``label_row`` for rows inside an
  anomaly, ``changepoint`` for change points).

Recordings are replayed as recorded, quirks included: NAB's machine_temperature file repeats the
hour 02:00-02:55 of 2014-01-07, so its replay looks like a device whose clock stepped back an
hour, and the agent counts those readings as late, as it would from a real device.

The data directory is an argument: nothing is copied into the repository.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from devices.catalog import Catalog
from devices.codecs import encode_batch, encode_single
from simulators.fleet import Published, Tick

NAB_TIME = "%Y-%m-%d %H:%M:%S"


def parse_time(text: str) -> int:
    text = text.strip()
    for fmt in (NAB_TIME, "%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return int(datetime.strptime(text, fmt).replace(tzinfo=UTC).timestamp() * 1000)
        except ValueError:
            continue
    raise ValueError(f"unrecognised timestamp {text!r}")


def metric_name(column: str) -> str:
    """A column header as a metric name: ``Volume Flow RateRMS`` -> ``volume_flow_raterms``."""
    return re.sub(r"[^a-z0-9]+", "_", column.strip().lower()).strip("_")


@dataclass
class Recording:
    """One file: rows of (original ms, {metric: value}), plus labels in original time."""

    device: str
    path: Path
    rows: list[tuple[int, dict[str, float]]]
    labels: list[dict[str, object]] = field(default_factory=list)  # original times

    def moved(self, shift_ms: int) -> Recording:
        """The same recording with every time (rows and labels) moved by ``shift_ms``."""
        labels = [{k: (int(v) + shift_ms if k.startswith("orig_") else v)  # type: ignore[call-overload]
                   for k, v in lab.items()} for lab in self.labels]
        return Recording(self.device, self.path, [(t + shift_ms, v) for t, v in self.rows],
                         labels)


def load_nab(data_dir: Path, relative: str, device: str | None = None,
             metric: str = "value") -> Recording:
    path = data_dir / "data" / relative
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for r in csv.DictReader(fh):
            rows.append((parse_time(r["timestamp"]), {metric: float(r["value"])}))
    dev = device or "nab-" + metric_name(Path(relative).stem).replace("_", "-")
    labels: list[dict[str, object]] = []
    windows = json.loads((data_dir / "labels" / "combined_windows.json").read_text())
    for lo, hi in windows.get(relative, []):
        labels.append({"type": "label_window", "orig_start": parse_time(lo),
                       "orig_end": parse_time(hi)})
    points = json.loads((data_dir / "labels" / "combined_labels.json").read_text())
    for ts in points.get(relative, []):
        labels.append({"type": "label_point", "orig_ts": parse_time(ts)})
    return Recording(dev, path, rows, labels)


# SKAB's columns whose names clash with a catalog kind of another unit: its Pressure is the
# loop's gauge pressure in bar, the catalog's ``pressure`` is barometric (hPa, 300-1100)
SKAB_RENAME = {"pressure": "pressure_bar"}


def load_skab(data_dir: Path, relative: str, device: str | None = None) -> Recording:
    path = data_dir / "data" / relative
    rows = []
    labels: list[dict[str, object]] = []
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh, delimiter=";")
        for r in reader:
            t = parse_time(r["datetime"])
            values = {SKAB_RENAME.get(metric_name(k), metric_name(k)): float(v)
                      for k, v in r.items()
                      if k not in ("datetime", "anomaly", "changepoint") and v not in ("", None)}
            rows.append((t, values))
            if float(r.get("anomaly") or 0) == 1.0:
                labels.append({"type": "label_row", "orig_ts": t})
            if float(r.get("changepoint") or 0) == 1.0:
                labels.append({"type": "changepoint", "orig_ts": t})
    dev = device or "skab-" + metric_name(relative.replace("/", "-").removesuffix(".csv"))
    return Recording(dev.replace("_", "-"), path, rows, labels)


WEEK_MS = 7 * 86_400_000


def shift_to(recordings: list[Recording], now_ms: int) -> int:
    """The shift (whole weeks) that puts the newest reading of ``recordings`` at or just
    before ``now_ms``: recorded weekdays and times of day are kept."""
    last = max((max(t for t, _ in r.rows) for r in recordings if r.rows), default=now_ms)
    return ((now_ms - last) // WEEK_MS) * WEEK_MS


@dataclass(frozen=True)
class _ReplaySpec:
    interval_ms: int


class ReplaySimulator:
    """Recordings as a fleet of one gateway, with the interface the fleet publisher uses.

    Each tick publishes the readings due in one ``interval_ms`` of wall time (or, with
    ``speed=None``, the next ``chunk`` readings), in recorded order across recordings.
    """

    def __init__(self, recordings: list[Recording], wall_start_ms: int, *,
                 speed: float | None = 1.0, shift_ms: int = 0, gateway: str = "replay-1",
                 interval_ms: int = 1_000, topic_template: str = "devices/{device}/readings",
                 payload: str = "json", record: bool = False, chunk: int = 5_000) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be > 0 (or None: as fast as possible)")
        self.spec = _ReplaySpec(interval_ms)
        self.start_ms = wall_start_ms - wall_start_ms % interval_ms
        self.speed = speed
        self.shift_ms = shift_ms
        self.gw = gateway
        self.topic_template = topic_template
        self.payload = payload
        self.record = record
        self.chunk = chunk
        self.recordings = recordings
        self.ticks_done = 0
        self.truth: list[dict[str, object]] = []
        self.published: list[Published] = []
        self._truth_read = 0
        self._seq = [0] * len(recordings)
        # every row of every recording, merged by recorded time; within a file, in the file's
        # own order (a clock that steps back is replayed as recorded: its rows are due at once)
        merged: list[tuple[int, int, int]] = []
        for i, rec in enumerate(recordings):
            latest = [t for t, _ in rec.rows]
            for j in range(1, len(latest)):
                latest[j] = max(latest[j], latest[j - 1])
            merged.extend((latest[j], i, j) for j in range(len(latest)))
        merged.sort()
        self._order = [(i, j) for _, i, j in merged]
        self._next = 0
        self.t_first = merged[0][0] if merged else 0
        for rec in recordings:  # ground truth: every label, in event time
            for lab in rec.labels:
                out = {**lab, "gateway": gateway, "device": rec.device,
                       "file": str(rec.path.name)}
                for k in ("orig_start", "orig_end", "orig_ts"):
                    if k in lab:
                        out[k.replace("orig_", "") + ("_ms" if k != "orig_ts" else "")] = (
                            int(lab[k]) + shift_ms)  # type: ignore[call-overload]
                self.truth.append(out)

    def event_time(self, orig_ms: int) -> int:
        return orig_ms + self.shift_ms

    def due(self, orig_ms: int) -> int:
        """Wall time at which a reading recorded at ``orig_ms`` is published."""
        if self.speed is None:
            return self.start_ms
        return self.start_ms + round((orig_ms - self.t_first) / self.speed)

    @property
    def gateways(self) -> list[str]:
        return [self.gw]

    @property
    def device_ids(self) -> list[str]:
        return [r.device for r in self.recordings]

    @property
    def finished(self) -> bool:
        return self._next >= len(self._order)

    def new_truth(self) -> list[dict[str, object]]:
        out = self.truth[self._truth_read:]
        self._truth_read = len(self.truth)
        return out

    def tick(self) -> Tick:
        t0 = self.start_ms + self.ticks_done * self.spec.interval_ms
        end = t0 + self.spec.interval_ms
        out = Tick(t0, {self.gw: []})
        msgs = out.messages[self.gw]
        limit = self._next + self.chunk if self.speed is None else len(self._order)
        while self._next < min(limit, len(self._order)):
            i, j = self._order[self._next]
            rec = self.recordings[i]
            orig, values = rec.rows[j]
            if self.speed is not None and self.due(orig) >= end:
                break
            self._next += 1
            ts = self.event_time(orig)
            topic = self.topic_template.format(device=rec.device, gateway=self.gw)
            readings: list[tuple[str, int, float, int | None]] = []
            for metric, v in values.items():
                readings.append((metric, ts, v, self._seq[i]))
                if self.record:
                    self.published.append(Published(self.gw, rec.device, metric, ts, v,
                                                    self._seq[i], ""))
                self._seq[i] += 1
            if self.payload == "batch":
                msgs.append((topic, encode_batch(rec.device, readings)))
            else:
                msgs.extend((topic, encode_single(rec.device, m, t, v, q))
                            for m, t, v, q in readings)
        self.ticks_done += 1
        return out

    def ticks(self, count: int | None = None):  # type: ignore[no-untyped-def]
        k = 0
        while (count is None and not self.finished) or (count is not None and k < count):
            yield self.tick()
            k += 1

    def drain_held(self) -> Tick:
        return Tick(self.start_ms + self.ticks_done * self.spec.interval_ms, {self.gw: []})

    def remaining_ticks(self) -> int:
        """Ticks until every recording has been published."""
        left = len(self._order) - self._next
        if left <= 0:
            return 0
        if self.speed is None:
            return -(-left // self.chunk)
        i, j = self._order[-1]
        last = self.due(self.recordings[i].rows[j][0])
        done = self.start_ms + self.ticks_done * self.spec.interval_ms
        return max(0, -(-(last + 1 - done) // self.spec.interval_ms))


LABEL_COLUMNS = ("anomaly", "changepoint", "label", "is_anomaly")
TIME_HINTS = ("timestamp", "datetime", "time", "date", "ts")


def load_csv(path: Path, device: str | None = None, time_column: str | None = None
             ) -> Recording:
    """Any CSV (``,`` or ``;``): a time column (named like timestamp/datetime/time, or
    ``time_column``; text times or epoch seconds/milliseconds) and value columns, each a
    metric named after its header. Columns named anomaly/changepoint/label are labels."""
    text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark too
    first = text.splitlines()[0] if text else ""
    delim = ";" if first.count(";") > first.count(",") else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delim)
    fields = reader.fieldnames or []
    tcol = time_column or next((f for f in fields if f.strip().lower() in TIME_HINTS), None)
    if tcol is None or tcol not in fields:
        raise ValueError(f"{path}: no time column (looked for {', '.join(TIME_HINTS)}; name "
                         "it with --time-column)")
    rows: list[tuple[int, dict[str, float]]] = []
    labels: list[dict[str, object]] = []
    for n, r in enumerate(reader, start=2):
        raw_t = (r.get(tcol) or "").strip()
        try:
            t = parse_time(raw_t)
        except ValueError:
            try:
                x = float(raw_t)
            except ValueError:
                raise ValueError(f"{path}:{n}: unrecognised time {raw_t!r}") from None
            t = int(x * 1000) if x < 1e11 else int(x)  # epoch seconds or milliseconds
        values: dict[str, float] = {}
        for k, v in r.items():
            if k is None or k == tcol or v in ("", None):
                continue
            name = metric_name(k)
            try:
                val = float(v)
            except ValueError:
                continue  # a text column is not a metric
            if name in LABEL_COLUMNS:
                if val:
                    labels.append({"type": "changepoint" if name == "changepoint"
                                   else "label_row", "orig_ts": t})
                continue
            values[name] = val
        rows.append((t, values))
    dev = device or metric_name(path.stem).replace("_", "-") or "csv"
    return Recording(dev, path, rows, labels)


def catalog_report(recordings: list[Recording], catalog: Catalog) -> tuple[list[str], str]:
    """What a gateway with ``catalog`` will make of these recordings, before anything is
    published: per metric, whether it is declared (and how many values its range rejects as
    out_of_range), accepted undeclared, or rejected as unknown_metric; and the ``[catalog]``
    entries, inferred from the data, that would declare the rest."""
    seen: dict[str, list[float]] = {}
    for rec in recordings:
        for _, values in rec.rows:
            for k, v in values.items():
                seen.setdefault(k, []).append(v)
    lines: list[str] = []
    declare: list[str] = []
    accepted = 0
    for name in sorted(seen):
        vals = seen[name]
        lo, hi = min(vals), max(vals)
        kind = catalog.get(name)
        if kind is not None:
            bad = sum(1 for v in vals if v < kind.low or v > kind.high)
            if bad:
                lines.append(f"{name}: {bad:,} of {len(vals):,} values are outside the catalog "
                             f"range {kind.low:g}..{kind.high:g} {kind.unit} and will be "
                             f"rejected as out_of_range (the data spans {lo:g}..{hi:g}: "
                             f"another unit? declare [catalog.{name}] with its own range)")
                declare.append(_catalog_block(name, lo, hi))
            continue
        if catalog.undeclared == "accept" and accepted < catalog.max_undeclared:
            accepted += 1
            lines.append(f"{name}: not declared; accepted without a range check "
                         f"(catalog.undeclared = \"accept\")")
        else:
            lines.append(f"{name}: not declared; every reading will be rejected as "
                         f"unknown_metric (catalog.undeclared = \"{catalog.undeclared}\")")
        declare.append(_catalog_block(name, lo, hi))
    return lines, "\n".join(declare)


def _catalog_block(name: str, lo: float, hi: float) -> str:
    pad = 0.1 * (hi - lo) if hi > lo else max(abs(hi), 1.0)
    return (f"[catalog.{name}]\nunit = \"\"                # unknown: say what it is\n"
            f"low = {lo - pad:.6g}\nhigh = {hi + pad:.6g}\n")
