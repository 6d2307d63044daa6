"""A simulated fleet: gateways, devices, their signals, injected faults and the schedule.

``FleetSimulator.ticks()`` yields, for each reporting interval, the messages every gateway's
devices publish (already encoded, in publish order) and records ground truth for every injected
fault. It does no I/O, so the same seeded fleet can be published live, replayed as fast as
possible, or inspected by tests: same seed, same bytes.

Faults (fractions are per reading):

* ``spike``: one reading off by the kind's spike magnitude (written to ground truth).
* ``disorder``: the reading is held back one interval (out of order, within tolerance).
* ``straggler``: the reading is held back ``straggler_delay_ms`` (late, but within the agent's
  allowed lateness: its window is revised).
* ``late``: the reading is held back ``late_delay_ms`` (beyond the agent's allowed lateness).
* ``malformed``: a payload that is not JSON is sent instead of the reading.
* ``out_of_range``: the value is replaced by one outside the kind's physical range.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from devices.catalog import Catalog
from devices.codecs import encode_batch, encode_senml, encode_single
from devices.registry import Device, Registry
from simulators.signals import MODELS, FleetSignals

KIND_PREFIX = {"temperature": "t", "humidity": "h", "pressure": "p", "co2": "c", "vibration": "v"}


@dataclass(frozen=True, kw_only=True)
class FleetSpec:
    gateways: int = 3
    devices_per_gateway: int = 200
    kinds: tuple[str, ...] = ("temperature", "humidity", "pressure")
    interval_ms: int = 1_000
    seed: int = 1
    payload: str = "json"  # json | batch | senml
    gateway_prefix: str = "gw"
    topic_template: str = "devices/{device}/readings"
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


@dataclass(frozen=True)
class Published:
    """One reading as it was published (kept when the simulator records)."""

    gateway: str
    device: str
    metric: str
    ts: int
    value: float
    seq: int
    fault: str  # "" | spike | disorder | late | malformed | out_of_range


@dataclass
class Tick:
    """What to publish for one interval: per gateway, a list of (topic, payload)."""

    tick_ms: int
    messages: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)


class FleetSimulator:
    def __init__(self, spec: FleetSpec, start_ms: int, *, record: bool = False) -> None:
        self.spec = spec
        self.start_ms = start_ms - start_ms % spec.interval_ms
        self.rng = np.random.default_rng(spec.seed)
        gws = spec.gateway_ids()
        self.device_ids: list[str] = []
        self.device_gateway: list[str] = []
        self.device_kind: list[str] = []
        for g, gw in enumerate(gws):
            for i in range(spec.devices_per_gateway):
                kind = spec.kinds[i % len(spec.kinds)]
                self.device_ids.append(f"{gw}-{KIND_PREFIX.get(kind, kind[:2])}{i + 1:04d}")
                self.device_gateway.append(gw)
                self.device_kind.append(kind)
            del g
        n = len(self.device_ids)
        self.signals = FleetSignals(self.device_kind, self.rng, self.start_ms)
        # each device reports at its own offset within the interval
        self.offset = self.rng.integers(0, spec.interval_ms, n)
        self.seq = np.zeros(n, np.int64)
        self.last_spike = np.full(n, -(1 << 62), np.int64)
        self.held: list[tuple[int, int, str, bytes, Published | None]] = []  # release, dev, ...
        self.truth: list[dict[str, object]] = []
        self.record = record
        self.published: list[Published] = []
        self.ticks_done = 0
        catalog = Catalog()
        self._range = {k: (catalog[k].low, catalog[k].high) for k in spec.kinds}
        self._units = {k: catalog[k].unit for k in spec.kinds}

    def registry(self) -> Registry:
        devs = []
        for d, gw, kind in zip(self.device_ids, self.device_gateway, self.device_kind,
                               strict=True):
            m = MODELS[kind]
            devs.append(Device(device_id=d, gateway=gw, site=f"site-{gw.split('-')[-1]}",
                               kind=kind, low=m.alarm_low, high=m.alarm_high))
        return Registry(devs)

    def _encode(self, device: str, metric: str, ts: int, value: float, seq: int) -> bytes:
        fmt = self.spec.payload
        if fmt == "json":
            return encode_single(device, metric, ts, value, seq)
        if fmt == "batch":
            return encode_batch(device, [(metric, ts, value, seq)])
        return encode_senml(device, [(metric, ts, value, seq)], self._units)

    def ticks(self, count: int | None = None) -> Iterator[Tick]:
        """Generate ``count`` intervals (forever when None)."""
        k = 0
        while count is None or k < count:
            yield self.tick()
            k += 1

    def tick(self) -> Tick:
        spec = self.spec
        rng = self.rng
        t0 = self.start_ms + self.ticks_done * spec.interval_ms
        self.ticks_done += 1
        n = len(self.device_ids)
        ts = t0 + self.offset
        values = self.signals.values(ts, rng)
        u = rng.random((6, n))
        spike = (u[0] < spec.spike_fraction) & (ts - self.start_ms >= spec.spike_after_ms) & (
            ts - self.last_spike >= spec.spike_spacing_ms)
        sign = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        values = np.where(spike, values + sign * self.signals.spike, values)
        self.last_spike[spike] = ts[spike]
        oor = u[1] < spec.out_of_range_fraction
        malformed = u[2] < spec.malformed_fraction
        late = u[3] < spec.late_fraction
        straggler = (u[5] < spec.straggler_fraction) & ~late
        disorder = (u[4] < spec.disorder_fraction) & ~late & ~straggler

        out = Tick(t0, {gw: [] for gw in spec.gateway_ids()})
        # release held-back readings whose time has come (before this tick's own)
        still: list[tuple[int, int, str, bytes, Published | None]] = []
        for item in self.held:
            if item[0] <= t0:
                out.messages[self.device_gateway[item[1]]].append((item[2], item[3]))
                if item[4] is not None:
                    self.published.append(item[4])
            else:
                still.append(item)
        self.held = still

        order = rng.permutation(n)
        for d in order.tolist():
            dev = self.device_ids[d]
            gw = self.device_gateway[d]
            kind = self.device_kind[d]
            topic = spec.topic_template.format(device=dev, gateway=gw)
            seq = int(self.seq[d])
            self.seq[d] += 1
            t = int(ts[d])
            v = round(float(values[d]), 4)
            fault = ""
            if malformed[d]:
                fault = "malformed"
                payload = b'{"device": "' + dev.encode() + b'", "value": oops'
            else:
                if oor[d]:
                    fault = "out_of_range"
                    lo, hi = self._range[kind]
                    v = hi + 1000.0 if rng.random() < 0.5 else lo - 1000.0
                elif spike[d]:
                    fault = "spike"
                payload = self._encode(dev, kind, t, v, seq)
            if fault:
                self.truth.append({"type": fault, "gateway": gw, "device": dev, "metric": kind,
                                   "ts": t, "seq": seq, "value": v})
            rec = Published(gw, dev, kind, t, v, seq, fault) if self.record else None
            if late[d] and not malformed[d]:
                self.truth.append({"type": "late", "gateway": gw, "device": dev, "metric": kind,
                                   "ts": t, "seq": seq, "delay_ms": spec.late_delay_ms})
                if rec is not None:
                    rec = Published(gw, dev, kind, t, v, seq, fault or "late")
                self.held.append((t0 + spec.late_delay_ms, d, topic, payload, rec))
            elif straggler[d] and not malformed[d]:
                self.truth.append({"type": "straggler", "gateway": gw, "device": dev,
                                   "metric": kind, "ts": t, "seq": seq,
                                   "delay_ms": spec.straggler_delay_ms})
                if rec is not None:
                    rec = Published(gw, dev, kind, t, v, seq, fault or "straggler")
                self.held.append((t0 + spec.straggler_delay_ms, d, topic, payload, rec))
            elif disorder[d] and not malformed[d]:
                if rec is not None and not fault:
                    rec = Published(gw, dev, kind, t, v, seq, "disorder")
                self.held.append((t0 + spec.interval_ms, d, topic, payload, rec))
            else:
                out.messages[gw].append((topic, payload))
                if rec is not None:
                    self.published.append(rec)
        return out

    def drain_held(self) -> Tick:
        """Everything still held back, as one final tick (used when a finite run ends)."""
        out = Tick(self.start_ms + self.ticks_done * self.spec.interval_ms,
                   {gw: [] for gw in self.spec.gateway_ids()})
        for item in sorted(self.held, key=lambda x: x[0]):
            out.messages[self.device_gateway[item[1]]].append((item[2], item[3]))
            if item[4] is not None:
                self.published.append(item[4])
        self.held = []
        return out
