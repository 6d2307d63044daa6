"""Replay recorded data sets as device streams: NAB and SKAB files, or any CSV with a timestamp
column and value columns. Several files are several devices; a multi-column file (SKAB) is one
device with several sensors.

Time: a reading recorded at ``t`` is stamped ``start + (t - t0) / speed``, where ``t0`` is the
first timestamp of its file, and published when that moment comes (``speed = 1``: real time;
``speed = 300``: NAB's 5-minute samples arrive every second). Labels travel to the ground-truth
file mapped the same way, each with its original timestamps:

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

from devices.codecs import encode_batch, encode_single
from simulators.fleet import Published, Tick

NAB_TIME = "%Y-%m-%d %H:%M:%S"


def _parse_time(text: str) -> int:
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


def load_nab(data_dir: Path, relative: str, device: str | None = None,
             metric: str = "value") -> Recording:
    path = data_dir / "data" / relative
    rows = []
    with path.open(newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append((_parse_time(r["timestamp"]), {metric: float(r["value"])}))
    dev = device or "nab-" + metric_name(Path(relative).stem).replace("_", "-")
    labels: list[dict[str, object]] = []
    windows = json.loads((data_dir / "labels" / "combined_windows.json").read_text())
    for lo, hi in windows.get(relative, []):
        labels.append({"type": "label_window", "orig_start": _parse_time(lo),
                       "orig_end": _parse_time(hi)})
    points = json.loads((data_dir / "labels" / "combined_labels.json").read_text())
    for ts in points.get(relative, []):
        labels.append({"type": "label_point", "orig_ts": _parse_time(ts)})
    return Recording(dev, path, rows, labels)


def load_skab(data_dir: Path, relative: str, device: str | None = None) -> Recording:
    path = data_dir / "data" / relative
    rows = []
    labels: list[dict[str, object]] = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh, delimiter=";")
        for r in reader:
            t = _parse_time(r["datetime"])
            values = {metric_name(k): float(v) for k, v in r.items()
                      if k not in ("datetime", "anomaly", "changepoint") and v not in ("", None)}
            rows.append((t, values))
            if float(r.get("anomaly") or 0) == 1.0:
                labels.append({"type": "label_row", "orig_ts": t})
            if float(r.get("changepoint") or 0) == 1.0:
                labels.append({"type": "changepoint", "orig_ts": t})
    dev = device or "skab-" + metric_name(relative.replace("/", "-").removesuffix(".csv"))
    return Recording(dev.replace("_", "-"), path, rows, labels)


@dataclass(frozen=True)
class _ReplaySpec:
    interval_ms: int


class ReplaySimulator:
    """Recordings as a fleet of one gateway, with the interface the fleet publisher uses."""

    def __init__(self, recordings: list[Recording], start_ms: int, *, speed: float = 1.0,
                 gateway: str = "replay-1", interval_ms: int = 1_000,
                 topic_template: str = "{gateway}/devices/{device}/readings",
                 payload: str = "json", record: bool = False) -> None:
        if speed <= 0:
            raise ValueError("speed must be > 0")
        self.spec = _ReplaySpec(interval_ms)
        self.start_ms = start_ms - start_ms % interval_ms
        self.speed = speed
        self.gw = gateway
        self.topic_template = topic_template
        self.payload = payload
        self.record = record
        self.recordings = recordings
        self.ticks_done = 0
        self.truth: list[dict[str, object]] = []
        self.published: list[Published] = []
        self._truth_read = 0
        self._pos = [0] * len(recordings)
        self._seq = [0] * len(recordings)
        self._t0 = [rec.rows[0][0] if rec.rows else 0 for rec in recordings]
        for i, rec in enumerate(recordings):  # ground truth: every label, in replay time
            for lab in rec.labels:
                out = {**lab, "gateway": gateway, "device": rec.device,
                       "file": str(rec.path.name)}
                for k in ("orig_start", "orig_end", "orig_ts"):
                    if k in lab:
                        out[k.replace("orig_", "") + ("_ms" if k != "orig_ts" else "")] = (
                            self.map_time(i, int(lab[k])))  # type: ignore[call-overload]
                self.truth.append(out)

    def map_time(self, i: int, orig_ms: int) -> int:
        return self.start_ms + round((orig_ms - self._t0[i]) / self.speed)

    @property
    def gateways(self) -> list[str]:
        return [self.gw]

    @property
    def device_ids(self) -> list[str]:
        return [r.device for r in self.recordings]

    @property
    def finished(self) -> bool:
        return all(p >= len(r.rows) for p, r in zip(self._pos, self.recordings, strict=True))

    def new_truth(self) -> list[dict[str, object]]:
        out = self.truth[self._truth_read:]
        self._truth_read = len(self.truth)
        return out

    def tick(self) -> Tick:
        t0 = self.start_ms + self.ticks_done * self.spec.interval_ms
        end = t0 + self.spec.interval_ms
        out = Tick(t0, {self.gw: []})
        msgs = out.messages[self.gw]
        for i, rec in enumerate(self.recordings):
            topic = self.topic_template.format(device=rec.device, gateway=self.gw)
            while self._pos[i] < len(rec.rows):
                orig, values = rec.rows[self._pos[i]]
                ts = self.map_time(i, orig)
                if ts >= end:
                    break
                self._pos[i] += 1
                readings = []
                for metric, v in values.items():
                    readings.append((metric, ts, v, self._seq[i]))
                    if self.record:
                        self.published.append(Published(self.gw, rec.device, metric, ts, v,
                                                        self._seq[i], ""))
                    self._seq[i] += 1
                if self.payload == "batch":
                    msgs.append((topic, encode_batch(rec.device, [
                        (m, t, v, q) for m, t, v, q in readings])))
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
        """Ticks until every recording has been replayed."""
        last = max((self.map_time(i, r.rows[-1][0]) for i, r in enumerate(self.recordings)
                    if r.rows), default=self.start_ms)
        done = self.start_ms + self.ticks_done * self.spec.interval_ms
        return max(0, -(-(last + 1 - done) // self.spec.interval_ms))
