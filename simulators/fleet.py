"""A simulated fleet: sites, gateways, devices with one or more sensors, their signals, the
faults they suffer (with ground truth) and the schedule.

``FleetSimulator.tick()`` returns, for each reporting interval, the messages every gateway's
devices publish (encoded, in publish order) and records ground truth for every injected fault.
It does no I/O, so the same seeded fleet can be published live, replayed as fast as possible, or
inspected by tests. Each gateway draws from its own random streams (signals, faults, publish
order), so:

* same seed, same bytes;
* a fleet split across processes (``shard``) publishes exactly what the whole fleet would;
* faults never disturb the clean signal: a fleet with faults carries the same underlying values
  as the same fleet without them, which is how tests verify each fault exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from devices.catalog import Catalog
from devices.codecs import encode_batch, encode_senml, encode_single
from devices.readings import F64, I64
from devices.registry import Device, Registry
from simulators.faults import FaultSpec
from simulators.signals import HOUR_MS, MODELS, FleetSignals, SignalModel

KIND_PREFIX = {"temperature": "t", "humidity": "h", "pressure": "p", "co2": "c", "vibration": "v",
               "power": "w"}
NEVER = -(1 << 62)
_POINT_ORDER = ("malformed", "spike", "out_of_range", "duplicate", "late", "straggler",
                "out_of_order", "reboot")


@dataclass(frozen=True, kw_only=True)
class FleetSpec:
    gateways: int = 3
    devices_per_gateway: int = 200
    kinds: tuple[str, ...] = ("temperature", "humidity", "pressure")
    sensors_per_device: int = 1  # >1: devices carry several (correlated) sensors
    sites: int = 0  # 0: one site per gateway
    interval_ms: int = 1_000
    seed: int = 1
    payload: str = "json"  # json | batch | senml
    gateway_prefix: str = "gw"
    topic_template: str = "devices/{device}/readings"
    signals: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per-kind overrides
    faults: tuple[FaultSpec, ...] = ()
    # shorthands for fleet-wide random faults (the demo and tests use them)
    spike_fraction: float = 0.0
    spike_after_ms: int = 300_000  # no spikes before detectors have a history
    spike_spacing_ms: int = 600_000  # at least this much between two spikes of one device
    disorder_fraction: float = 0.05
    straggler_fraction: float = 0.0
    straggler_delay_ms: int = 15_000
    late_fraction: float = 0.0
    late_delay_ms: int = 60_000
    malformed_fraction: float = 0.0
    out_of_range_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.gateways < 1 or self.devices_per_gateway < 1:
            raise ValueError("a fleet needs at least one gateway with one device")
        unknown = [k for k in self.kinds if k not in MODELS]
        if unknown:
            raise ValueError(f"no signal model for kind(s) {unknown}; known: {sorted(MODELS)}")
        if not 1 <= self.sensors_per_device <= len(self.kinds):
            raise ValueError("sensors_per_device must be between 1 and the number of kinds")
        if self.payload not in ("json", "batch", "senml"):
            raise ValueError("payload must be json, batch or senml")
        if self.interval_ms < 1:
            raise ValueError("interval_ms must be >= 1")
        for name in ("spike_fraction", "disorder_fraction", "late_fraction", "straggler_fraction",
                     "malformed_fraction", "out_of_range_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {v}")

    def gateway_ids(self) -> list[str]:
        return [f"{self.gateway_prefix}-{g + 1}" for g in range(self.gateways)]

    def models(self) -> dict[str, SignalModel]:
        out = dict(MODELS)
        for kind, overrides in self.signals:
            if kind not in out:
                raise ValueError(f"signals.{kind}: no such kind")
            out[kind] = out[kind].with_overrides(dict(overrides))
        return out

    def all_faults(self) -> list[FaultSpec]:
        out: list[FaultSpec] = []
        shorthand: tuple[tuple[str, float, dict[str, int]], ...] = (
            ("spike", self.spike_fraction, {"after_ms": self.spike_after_ms,
                                            "spacing_ms": self.spike_spacing_ms}),
            ("out_of_order", self.disorder_fraction, {}),
            ("straggler", self.straggler_fraction, {"offset_ms": self.straggler_delay_ms}),
            ("late", self.late_fraction, {"offset_ms": self.late_delay_ms}),
            ("malformed", self.malformed_fraction, {}),
            ("out_of_range", self.out_of_range_fraction, {}),
        )
        for kind, rate, extra in shorthand:
            if rate > 0:
                out.append(FaultSpec(type=kind, rate=rate, **extra))  # type: ignore[arg-type]
        return out + list(self.faults)


@dataclass(frozen=True)
class Published:
    """One reading as it was delivered to the broker (kept when the simulator records)."""

    gateway: str
    device: str
    metric: str
    ts: int  # event time as the device stamped it
    value: float
    seq: int
    fault: str  # "" or the point fault that touched it


@dataclass
class Tick:
    """What to publish for one interval: per gateway, a list of (topic, payload)."""

    tick_ms: int
    messages: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)


@dataclass
class _Interval:
    spec: FaultSpec
    affected: np.ndarray  # bool per device
    until: I64  # active until (tick ms), per device
    since: I64
    random_last: I64


class GatewayGenerator:
    """One gateway's devices, with their own random streams."""

    def __init__(self, spec: FleetSpec, g: int, start_ms: int, *, record: bool,
                 models: dict[str, SignalModel]) -> None:
        self.spec = spec
        self.gw = spec.gateway_ids()[g]
        seed = spec.seed
        params = np.random.default_rng([seed, g, 3])
        self.rng_fault = np.random.default_rng([seed, g, 1])
        self.rng_order = np.random.default_rng([seed, g, 2])
        self.start_ms = start_ms
        self.record = record
        n = spec.devices_per_gateway
        k = spec.sensors_per_device
        self.device_ids: list[str] = []
        self.device_kinds: list[list[str]] = []
        for i in range(n):
            kinds = [spec.kinds[(i + j) % len(spec.kinds)] for j in range(k)]
            prefix = KIND_PREFIX.get(kinds[0], kinds[0][:2]) if k == 1 else "d"
            self.device_ids.append(f"{self.gw}-{prefix}{i + 1:04d}")
            self.device_kinds.append(kinds)
        self.row_dev = np.repeat(np.arange(n), k)
        self.row_kind = [kind for kinds in self.device_kinds for kind in kinds]
        self.models = models
        every = [max(1, (models[kd].interval_ms or spec.interval_ms) // spec.interval_ms)
                 for kd in self.row_kind]
        self.row_every = np.array(every, np.int64)
        self.signals = FleetSignals(self.row_kind, self.row_dev, models,
                                    np.random.default_rng([seed, g, 0]), start_ms)
        self.offset = params.integers(0, spec.interval_ms, n)
        self.seq = np.zeros(n, np.int64)
        self.clock = np.zeros(n, np.int64)  # permanent offsets from clock jumps
        self.held: list[tuple[int, str, bytes, list[Published]]] = []
        self.truth: list[dict[str, object]] = []
        self.published: list[Published] = []
        catalog = Catalog()
        self.range = {kd: (catalog[kd].low, catalog[kd].high) for kd in spec.kinds}
        self.units = {kd: catalog[kd].unit for kd in spec.kinds}
        self.point: list[tuple[FaultSpec, np.ndarray, I64]] = []
        self.intervals: list[_Interval] = []
        index = {d: i for i, d in enumerate(self.device_ids)}
        for fs in spec.all_faults():
            if fs.devices:
                affected = np.zeros(n, bool)
                for d in fs.devices:
                    if d in index:
                        affected[index[d]] = True
            else:
                affected = params.random(n) < fs.fraction if fs.fraction < 1 else np.ones(n, bool)
            last = np.full(n, NEVER, np.int64)
            if fs.point:
                self.point.append((fs, affected, last))
            else:
                self.intervals.append(_Interval(fs, affected, np.full(n, NEVER, np.int64),
                                                np.full(n, NEVER, np.int64), last))
        self.stuck = np.zeros(len(self.row_kind))

    def _scheduled(self, fs: FaultSpec, rel: int) -> bool:
        """Whether a scheduled fault is due in the interval starting ``rel`` ms after start."""
        if fs.at_ms is None or rel < fs.at_ms:
            return False
        since = rel - fs.at_ms
        if fs.every_ms:
            since %= fs.every_ms
        return since < self.spec.interval_ms

    def _encode(self, device: str, readings: list[tuple[str, int, float, int]]) -> bytes:
        fmt = self.spec.payload
        if fmt == "json":
            metric, ts, value, seq = readings[0]
            return encode_single(device, metric, ts, value, seq)
        rs: list[tuple[str, int, float, int | None]] = [(m, t, v, q) for m, t, v, q in readings]
        if fmt == "batch":
            return encode_batch(device, rs)
        return encode_senml(device, rs, self.units)

    def tick(self, tick_no: int, t0: int, out: list[tuple[str, bytes]]) -> None:
        spec = self.spec
        n = len(self.device_ids)
        rows = len(self.row_kind)
        rel = t0 - self.start_ms
        ts_true = t0 + self.offset[self.row_dev]
        values = self.signals.values(ts_true)
        reporting = tick_no % self.row_every == 0
        ts_sent = ts_true + self.clock[self.row_dev]
        dropped = np.zeros(n, bool)
        burst = np.ones(n, np.int64)
        # ---- interval faults ---------------------------------------------------------------
        for iv in self.intervals:
            fs = iv.spec
            u = self.rng_fault.random(n)
            starting = np.zeros(n, bool)
            if fs.at_ms is not None and self._scheduled(fs, rel):
                starting = iv.affected & (iv.until <= t0)
            if fs.rate > 0 and rel >= fs.after_ms:
                starting |= iv.affected & (iv.until <= t0) & (u < fs.rate) & (
                    t0 - iv.random_last >= fs.spacing_ms)
            for d in np.flatnonzero(starting).tolist():
                iv.since[d] = t0
                iv.until[d] = t0 + (fs.duration_ms if fs.type != "clock_jump" else 1)
                iv.random_last[d] = t0
                rec: dict[str, object] = {"type": fs.type, "gateway": self.gw,
                                          "device": self.device_ids[d], "start_ms": t0,
                                          "end_ms": int(iv.until[d])}
                if fs.type in ("level_shift", "drift"):
                    rec["magnitude"] = self._magnitude(fs, d)
                if fs.type in ("clock_skew", "clock_jump"):
                    rec["offset_ms"] = fs.offset_ms
                if fs.type == "burst":
                    rec["factor"] = fs.factor
                if fs.type == "dropout":
                    rec["first_seq"] = int(self.seq[d])
                if fs.type == "clock_jump":
                    self.clock[d] += fs.offset_ms
                    ts_sent[self.row_dev == d] += fs.offset_ms
                    del rec["end_ms"]
                if fs.type == "stuck":
                    self.stuck[self.row_dev == d] = values[self.row_dev == d]
                self.truth.append(rec)
            active = iv.until > t0
            if fs.type == "clock_jump" or not active.any():
                continue
            arow = active[self.row_dev]
            if fs.type == "level_shift":
                mags = np.array([self._magnitude(fs, d) for d in self.row_dev.tolist()])
                values = np.where(arow, values + mags, values)
            elif fs.type == "stuck":
                values = np.where(arow, self.stuck, values)
            elif fs.type == "drift":
                hours = (t0 - iv.since[self.row_dev]) / HOUR_MS
                mags = np.array([self._magnitude(fs, d) for d in self.row_dev.tolist()])
                values = np.where(arow, values + mags * hours, values)
            elif fs.type == "dropout":
                dropped |= active
            elif fs.type == "burst":
                burst = np.where(active, np.maximum(burst, fs.factor), burst)
            elif fs.type == "clock_skew":
                ts_sent = np.where(arow, ts_sent + fs.offset_ms, ts_sent)
        # ---- point faults ------------------------------------------------------------------
        hit: dict[str, np.ndarray] = {}
        for fs, affected, last in self.point:
            u = self.rng_fault.random(rows)
            sign = np.where(self.rng_fault.random(rows) < 0.5, -1.0, 1.0)
            h = np.zeros(rows, bool)
            if fs.rate > 0 and rel >= fs.after_ms:
                h |= (u < fs.rate) & (t0 - last[self.row_dev] >= fs.spacing_ms)
            if fs.at_ms is not None and self._scheduled(fs, rel):
                h |= True
            h &= affected[self.row_dev] & reporting & ~dropped[self.row_dev]
            if fs.spacing_ms and h.any():  # one per device per spacing, even with sensors
                first = np.zeros(rows, bool)
                _, idx = np.unique(self.row_dev[h], return_index=True)
                first[np.flatnonzero(h)[idx]] = True
                h = first
            last[self.row_dev[h]] = t0
            hit[fs.type] = hit.get(fs.type, np.zeros(rows, bool)) | h
            if fs.type == "spike":
                mag = np.array([fs.magnitude if fs.magnitude is not None
                                else self.models[kd].spike for kd in self.row_kind])
                values = np.where(h, values + sign * mag, values)
            elif fs.type == "out_of_range":
                lo = np.array([self.range[kd][0] for kd in self.row_kind])
                hi = np.array([self.range[kd][1] for kd in self.row_kind])
                values = np.where(h, np.where(sign > 0, hi + 1000.0, lo - 1000.0), values)
        hold = np.zeros(rows, np.int64)
        for fs, _a, _l in self.point:
            if fs.type not in hit:
                continue
            hh = hit[fs.type]
            if fs.type == "out_of_order":
                hold = np.where(hh, np.maximum(hold, spec.interval_ms), hold)
            elif fs.type in ("straggler", "late"):
                hold = np.where(hh, np.maximum(hold, fs.offset_ms), hold)
        self._build(t0, values, ts_sent, reporting, dropped, burst, hit, hold, out)

    def _magnitude(self, fs: FaultSpec, d: int) -> float:
        if fs.magnitude is not None:
            return fs.magnitude
        return float(self.models[self.device_kinds[d][0]].spike) / 2

    def _build(self, t0: int, values: F64, ts_sent: I64, reporting: np.ndarray,
               dropped: np.ndarray, burst: I64, hit: dict[str, np.ndarray], hold: I64,
               out: list[tuple[str, bytes]]) -> None:
        spec = self.spec
        due = [item for item in self.held if item[0] <= t0]
        self.held = [item for item in self.held if item[0] > t0]
        row_start = np.searchsorted(self.row_dev, np.arange(len(self.device_ids)))
        k = spec.sensors_per_device
        for d in self.rng_order.permutation(len(self.device_ids)).tolist():
            dev = self.device_ids[d]
            topic = spec.topic_template.format(device=dev, gateway=self.gw)
            lo = int(row_start[d])
            if "reboot" in hit and bool(hit["reboot"][lo:lo + k].any()):
                self.seq[d] = 0  # its counter starts again, its clock goes on (truth: below)
            for b in range(int(burst[d])):
                readings: list[tuple[str, int, float, int]] = []
                faults: list[str] = []
                kinds_hit: set[str] = set()
                delay = 0
                for r in range(int(row_start[d]), int(row_start[d]) + k):
                    if not reporting[r]:
                        continue
                    ts = int(ts_sent[r]) + b * spec.interval_ms // int(burst[d])
                    seq = int(self.seq[d])
                    self.seq[d] += 1
                    v = round(float(values[r]), 4)
                    hits = [name for name in _POINT_ORDER
                            if b == 0 and name in hit and hit[name][r]]
                    readings.append((self.row_kind[r], ts, v, seq))
                    faults.append(hits[0] if hits else ("burst" if b > 0 else ""))
                    kinds_hit.update(hits)
                    delay = max(delay, int(hold[r]) if b == 0 else 0)
                    for name in hits:
                        rec: dict[str, object] = {"type": name, "gateway": self.gw,
                                                  "device": dev, "metric": self.row_kind[r],
                                                  "ts": ts, "seq": seq, "value": v}
                        if name in ("out_of_order", "straggler", "late"):
                            rec["delay_ms"] = int(hold[r])
                        self.truth.append(rec)
                if not readings or dropped[d]:
                    continue
                malformed = "malformed" in kinds_hit
                if malformed:
                    payload = b'{"device": "' + dev.encode() + b'", "value": oops'
                else:
                    payload = self._encode(dev, readings)
                recs = ([Published(self.gw, dev, m, t, v, q, f)
                         for (m, t, v, q), f in zip(readings, faults, strict=True)]
                        if self.record else [])
                copies = 2 if "duplicate" in kinds_hit else 1
                if delay:
                    self.held.append((t0 + delay, topic, payload, recs))
                    for _ in range(copies - 1):
                        self.held.append((t0 + delay, topic, payload, []))
                else:
                    out.extend([(topic, payload)] * copies)
                    self.published.extend(recs)
        # readings held back from earlier intervals go out after this interval's own, so a
        # reading held one interval arrives after its device's next one: out of order
        for item in due:
            out.append((item[1], item[2]))
            self.published.extend(item[3])

    def drain(self, out: list[tuple[str, bytes]]) -> None:
        for item in sorted(self.held, key=lambda x: x[0]):
            out.append((item[1], item[2]))
            self.published.extend(item[3])
        self.held = []


class FleetSimulator:
    def __init__(self, spec: FleetSpec, start_ms: int, *, record: bool = False,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.spec = spec
        self.start_ms = start_ms - start_ms % spec.interval_ms
        self.record = record
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
        models = spec.models()
        self.gens = [GatewayGenerator(spec, g, self.start_ms, record=record, models=models)
                     for g in range(spec.gateways) if g % count == index]
        self.ticks_done = 0
        self._truth_read = [0] * len(self.gens)

    # ---- views used by publishers, the demo and tests -------------------------------------

    @property
    def device_ids(self) -> list[str]:
        return [d for g in self.gens for d in g.device_ids]

    @property
    def device_gateway(self) -> list[str]:
        return [g.gw for g in self.gens for _ in g.device_ids]

    @property
    def device_kind(self) -> list[str]:
        return [kinds[0] for g in self.gens for kinds in g.device_kinds]

    @property
    def gateways(self) -> list[str]:
        return [g.gw for g in self.gens]

    @property
    def truth(self) -> list[dict[str, object]]:
        return [t for g in self.gens for t in g.truth]

    def new_truth(self) -> list[dict[str, object]]:
        """Ground truth recorded since the last call (to write it as it happens)."""
        out = []
        for i, g in enumerate(self.gens):
            out.extend(g.truth[self._truth_read[i]:])
            self._truth_read[i] = len(g.truth)
        return out

    @property
    def published(self) -> list[Published]:
        return [p for g in self.gens for p in g.published]

    def registry(self) -> Registry:
        sites = self.spec.sites or self.spec.gateways
        devs = []
        for g in self.gens:
            gi = self.spec.gateway_ids().index(g.gw)
            site = f"site-{gi % sites + 1}"
            for d, kinds in zip(g.device_ids, g.device_kinds, strict=True):
                m = g.models[kinds[0]]
                devs.append(Device(device_id=d, gateway=g.gw, site=site, kind=kinds[0],
                                   low=m.alarm_low, high=m.alarm_high))
        return Registry(devs)

    # ---- time ----------------------------------------------------------------------------------

    def ticks(self, count: int | None = None) -> Iterator[Tick]:
        k = 0
        while count is None or k < count:
            yield self.tick()
            k += 1

    def tick(self) -> Tick:
        t0 = self.start_ms + self.ticks_done * self.spec.interval_ms
        out = Tick(t0, {g.gw: [] for g in self.gens})
        for g in self.gens:
            g.tick(self.ticks_done, t0, out.messages[g.gw])
        self.ticks_done += 1
        return out

    def drain_held(self) -> Tick:
        """Everything still held back, as one final tick (used when a finite run ends)."""
        out = Tick(self.start_ms + self.ticks_done * self.spec.interval_ms,
                   {g.gw: [] for g in self.gens})
        for g in self.gens:
            g.drain(out.messages[g.gw])
        return out
