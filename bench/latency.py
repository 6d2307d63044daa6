"""Window close -> queryable in InfluxDB, at 10,000 devices on one machine, real services.

The shipped ``deploy/gateway.toml`` and ``deploy/cloud.toml`` (pointed at the brokers, InfluxDB
and state directories started here; nothing else changed unless a variant says so), the agent
and the worker as real processes, Mosquitto twice, InfluxDB 1.6, and a fleet of 10,000 devices
publishing once a second in real time.

*Window close* is the watermark passing the window's end: the agent emits the window in that
tick and stamps the batch carrying it with the time (``sent_ms``, the agent's wall clock); this
bench reads every results batch off the cloud broker beside the worker. *Queryable* is the first
moment a query sees the window's point: a sample of the devices (one in 16), polled every 50 ms
with one InfluxDB query for all of them (so a figure is late by up to the poll interval plus the
query's own time, never early). Both clocks are this machine's.

Variants show what the user trades: the shipped settings; and the worker's flush interval, which
is the part of the path that waits on purpose.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import (
    DEPLOY,
    Figure,
    GaveUpError,
    figure,
    report,
    shipped_cloud,
    shipped_gateway,
    stop_processes,
    wait_until,
)
from cloud.sinks.influx_v1 import InfluxV1Client
from devices.contract import ResultBatch, decode_uplink
from fieldline.services import InfluxDB, Mosquitto, env_file
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher

DEVICES = 10_000
# an aggregates point as the worker usually writes it: 9 outputs, 4 percentiles and seq_min
# (seq_max, seq_sum and rev are left out of a first result whose sequence numbers are a run)
WORKER_FIELDS = 14
SAMPLE = 16  # one device in this many is polled
POLL_S = 0.05
CMD = [sys.executable, "-m", "fieldline.cli", "--log-level", "WARNING"]


def _sampled(name: str) -> bool:
    return zlib.crc32(name.encode()) % SAMPLE == 0


class Closes:
    """Every window of a sampled device, with the time the agent closed it, off the wire."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.closed: dict[tuple[str, str, int], int] = {}  # (device, spec, start) -> sent_ms
        self.arrived: dict[tuple[str, str, int], int] = {}  # -> when it reached the broker
        self.batches = 0

    def on_message(self, _c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        if not m.topic.endswith("/results"):
            return
        b = decode_uplink(m.payload)
        if not isinstance(b, ResultBatch):
            return
        r = b.results
        labels = b.spec_labels()
        first = (r.rev == 0).tolist()
        now = time.time_ns() // 1_000_000
        with self.lock:
            self.batches += 1
            for i, (d, s) in enumerate(zip(r.device.tolist(), r.start.tolist(), strict=True)):
                name = b.devices[d]
                if first[i] and _sampled(name):
                    self.closed.setdefault((name, labels[i], s), b.sent_ms)
                    self.arrived.setdefault((name, labels[i], s), now)


def poll(influx: InfluxV1Client, closes: Closes, seen: dict[tuple[str, str, int], int],
         stop: threading.Event, took: list[float]) -> None:
    """Ask InfluxDB every ``POLL_S`` which of the closed, not yet seen windows it has."""
    while not stop.is_set():
        t0 = time.monotonic()
        with closes.lock:
            waiting = [k for k in closes.closed if k not in seen]
        if waiting:
            devices = sorted({k[0] for k in waiting})
            lo, hi = min(k[2] for k in waiting), max(k[2] for k in waiting)
            q = (f'SELECT "count", "device", "window" FROM "aggregates" WHERE time >= {lo}ms '
                 f'AND time <= {hi}ms AND "device" =~ /^({"|".join(map(re.escape, devices))})$/')
            doc: Any = influx.query(q)
            took.append(time.monotonic() - t0)
            now = time.time_ns() // 1_000_000
            for series in doc["results"][0].get("series", []):
                cols = series["columns"]
                t, d, w = cols.index("time"), cols.index("device"), cols.index("window")
                for row in series["values"]:
                    key = (str(row[d]), str(row[w]), int(row[t]))
                    if key in closes.closed and key not in seen:
                        seen[key] = now
        stop.wait(max(0.0, POLL_S - (time.monotonic() - t0)))


def measure(work: Path, *, seconds: int = 70, devices: int = DEVICES,
            cloud_changes: dict[str, str] | None = None,
            gateway_changes: dict[str, str] | None = None,
            influx_env: Path | None = None) -> dict[str, Any]:
    """``influx_env``: InfluxDB's environment from that file (as /etc/default/influxdb)."""
    gw = Mosquitto(work / "gw").start()
    cloud = Mosquitto(work / "cloud").start()
    ix = InfluxDB(work / "influx", env=env_file(influx_env) if influx_env else None).start()
    procs: list[subprocess.Popen[bytes]] = []
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    stop = threading.Event()
    try:
        gcfg = shipped_gateway(work, gw.url, cloud.url, gateway_changes)
        ccfg = shipped_cloud(work, cloud.url, ix.url, cloud_changes)
        closes = Closes()
        sub.on_message = closes.on_message
        sub.connect("127.0.0.1", cloud.port)
        sub.subscribe("fieldline/v1/+/results", qos=0)
        sub.loop_start()
        for part, cfg in (("cloud", ccfg), ("edge", gcfg)):
            log = (work / f"{part}.log").open("ab")
            procs.append(subprocess.Popen([*CMD, part, "run", "--config", str(cfg)],
                                          stdout=log, stderr=subprocess.STDOUT))
        influx = InfluxV1Client(ix.url, "fieldline")
        wait_until(lambda: "fieldline" in str(influx.query("SHOW DATABASES", database="")),
                   60, "the worker to create its database")
        time.sleep(2)
        spec = FleetSpec(gateways=1, devices_per_gateway=devices, disorder_fraction=0.0,
                         topic_template="devices/{device}/readings")
        pub = FleetPublisher(FleetSimulator(spec, time.time_ns() // 1_000_000),
                             {"gw-1": gw.address}, qos=1)
        cpu = CpuShares({"agent": procs[1].pid, "worker": procs[0].pid,
                         "InfluxDB": _pid(ix), "gateway broker": _pid(gw),
                         "cloud broker": _pid(cloud),
                         "fleet and probe (this bench)": psutil.Process().pid})
        seen: dict[tuple[str, str, int], int] = {}
        took: list[float] = []
        poller = threading.Thread(target=poll, args=(influx, closes, seen, stop, took),
                                  daemon=True)
        poller.start()
        pub.run_realtime(threading.Event(), seconds)
        pub.close()
        shares = cpu.used()
        t_end = time.time_ns() // 1_000_000
        # every window closed by then should turn up; give the chain 20 s
        wait_until(lambda: all(k in seen for k in list(closes.closed)), 20,
                   "the closed windows to be queryable",
                   lambda: f"{sum(k not in seen for k in closes.closed)} of "
                           f"{len(closes.closed)} still missing")
        stop.set()
        poller.join(10)
        for p in procs:
            if p.poll() is not None:
                raise GaveUpError(f"fieldline {p.args} exited early; see {work}/*.log")
        first_end = min(k[2] for k in closes.closed)
        # the first windows of the run are partial (the fleet started inside them): left out
        keys = [k for k, c in closes.closed.items() if k[2] > first_end and c < t_end]
        if not keys:
            raise GaveUpError("no complete window closed during the run")
        lat = np.array([seen[k] - closes.closed[k] for k in keys], np.float64)
        edge = np.array([closes.arrived[k] - closes.closed[k] for k in keys], np.float64)
        snaps, compactions = influx_background(work / "influx" / "influxd.log")
        cloud_part = lat - edge
        by_close: dict[tuple[str, int], list[float]] = {}
        for k, v in zip(keys, lat.tolist(), strict=True):
            by_close.setdefault((k[1], k[2]), []).append(v)
        return {"by_window": {f"{w}@{s % 600_000 // 1000}s": (len(v), float(np.median(v)),
                                                              max(v))
                              for (w, s), v in sorted(by_close.items(), key=lambda x: x[0][1])},
                "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                "max_ms": float(lat.max()), "windows": len(lat), "batches": closes.batches,
                "published": pub.published,
                "poll_p50_ms": float(np.percentile(took, 50)) * 1000,
                "poll_max_ms": max(took) * 1000,
                "edge_p50_ms": float(np.percentile(edge, 50)),
                "edge_p99_ms": float(np.percentile(edge, 99)),
                "cloud_p50_ms": float(np.percentile(cloud_part, 50)),
                "cloud_p99_ms": float(np.percentile(cloud_part, 99)),
                "influx_snapshots_ms": snaps, "influx_compactions_ms": compactions,
                "cpu": shares}
    finally:
        stop.set()
        sub.loop_stop()
        stop_processes(procs)
        gw.stop()
        cloud.stop()
        ix.stop()


def _pid(service: InfluxDB | Mosquitto) -> int:
    assert service.proc is not None
    return service.proc.pid


class CpuShares:
    """The CPU (user + system) each process used from now to ``used()``, in cores: on a
    2-core machine the fleet, the agent, the brokers, the worker and InfluxDB share two."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.t0 = time.monotonic()
        self.start = {k: sum(p.cpu_times()[:2]) for k, p in self.procs.items()}

    def used(self) -> dict[str, float]:
        dt = time.monotonic() - self.t0
        return {k: (sum(p.cpu_times()[:2]) - self.start[k]) / dt for k, p in self.procs.items()}


def influx_background(log: Path) -> tuple[list[float], list[float]]:
    """How long InfluxDB spent on each cache snapshot (the in-memory cache written out as a TSM
    file, at every 25 MB of it by default) and each TSM compaction, from its log: CPU bursts
    that every write and query behind them waits out on a small machine."""
    snaps, compactions = [], []
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"op_elapsed=([0-9.]+)ms", line)
        if m and "Cache snapshot (end)" in line:
            snaps.append(float(m.group(1)))
        elif m and "compaction (end)" in line:
            compactions.append(float(m.group(1)))
    return snaps, compactions


def _aggregate_lines(devices: int, fields: int, label: str, r: int, ts_ms: int) -> list[str]:
    """Points shaped like the worker's aggregates: six tags, ``fields`` fields."""
    return [f"aggregates,device=dev-{i:05d},gateway=gw-1,metric=temperature,site=s1,unit=C,"
            f"window={label} " + ",".join(f"f{j}={i * 0.5 + j + r}" for j in range(fields - 2))
            + f",count=10i,rev=0i {ts_ms}" for i in range(devices)]


def influx_minute_burst(work: Path, devices: int = DEVICES, bursts: int = 8,
                        env: dict[str, str] | None = None) -> float:
    """Median wall time, in ms, of InfluxDB alone taking what a minute boundary brings: a 10 s
    and a 1 min window of every device (``WORKER_FIELDS`` fields each), written as the shipped
    worker writes them (``batch_points`` 5,000 at a time, split in ``write_concurrency`` 2
    requests), on an otherwise idle machine, its series already known. The floor of the
    shipped p99: nothing else of the pipeline is in it."""
    ix = InfluxDB(work, env=env).start()
    try:
        client = InfluxV1Client(ix.url, "burst")
        client.create_database()
        base = 1_764_000_000_000
        walls = []
        for r in range(bursts + 1):  # the first creates the series
            lines = [ln for label in ("10s", "1m")
                     for ln in _aggregate_lines(devices, WORKER_FIELDS, label, r,
                                                base + r * 60_000)]
            t0 = time.perf_counter()
            for k in range(0, len(lines), 5_000):
                half = [lines[k:k + 2_500], lines[k + 2_500:k + 5_000]]
                threads = [threading.Thread(target=client.write_lines, args=(h,)) for h in half]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
                    if t.is_alive():
                        raise GaveUpError("an InfluxDB write took over 120 s")
            if r:
                walls.append((time.perf_counter() - t0) * 1000)
            time.sleep(1.0)
        return float(np.median(walls))
    finally:
        ix.stop()


def influx_cpu_per_point(work: Path, fields: int, devices: int = DEVICES, rounds: int = 60,
                         env: dict[str, str] | None = None) -> tuple[float, list[float]]:
    """InfluxDB's CPU per point (ingest, cache snapshots, compactions) for points shaped like
    the worker's aggregates (six tags; ``fields`` fields), a 10 s and a 1 min window per device
    as the shipped config writes them, ``rounds`` 10 s rounds; and its cache snapshots.
    ``env``: InfluxDB's environment (settings to try). Its cache is written out before the CPU is
    read (a cold shard is snapshotted after 1 s here), so a larger cache cannot look cheaper
    by keeping its work for later."""
    ix = InfluxDB(work, env={"INFLUXDB_DATA_CACHE_SNAPSHOT_WRITE_COLD_DURATION": "1s",
                             **(env or {})}).start()
    try:
        client = InfluxV1Client(ix.url, "fields")
        client.create_database()
        assert ix.proc is not None
        influxd = psutil.Process(ix.proc.pid)
        t0, n = sum(influxd.cpu_times()[:2]), 0
        base = 1_764_000_000_000
        for r in range(rounds):
            for label, step in (("10s", 10_000), ("1m", 60_000)):
                if label == "1m" and r % 6:
                    continue
                lines = _aggregate_lines(devices, fields, label, r, base + r * step)
                for k in range(0, len(lines), 5_000):
                    client.write_lines(lines[k:k + 5_000])
                n += len(lines)
        log = work / "influxd.log"
        written = len(influx_background(log)[0])
        wait_until(lambda: len(influx_background(log)[0]) > written, 30,
                   "InfluxDB to write out its cache once the writes stop")
        time.sleep(1)  # the snapshot's end is logged; its last fsyncs and a compaction round
        used = sum(influxd.cpu_times()[:2]) - t0  # user + system
        return used / n * 1e6, influx_background(log)[0]
    finally:
        ix.stop()


# What a user can trade on InfluxDB's side (its environment, not fieldline's), as shipped: a
# larger cache before it is written out and a less eager Go garbage collector
INFLUX_ENV = DEPLOY / "influxdb" / "influxdb.env"


VARIANTS: list[tuple[str, dict[str, str], dict[str, str], Path | None]] = [
    ("shipped configs (windows 10s and 1m)", {}, {}, None),
    ("worker batch_points = 1000", {"batch_points": "1000"}, {}, None),
    ("one window spec (specs = [\"10s\"]), batch_points = 1000", {"batch_points": "1000"},
     {"specs": '["10s"]'}, None),
    ("shipped configs, InfluxDB with deploy/influxdb/influxdb.env", {}, {}, INFLUX_ENV),
]


def main(seconds: int = 70) -> list[Figure]:
    figs = []
    for label, cloud_changes, gateway_changes, influx in VARIANTS:
        with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
            r = measure(Path(d), seconds=seconds, cloud_changes=cloud_changes,
                        gateway_changes=gateway_changes, influx_env=influx)
        worst = max(r["by_window"].items(), key=lambda kv: kv[1][2])
        note = (f"{r['windows']:,} sampled windows (1 device in {SAMPLE}) of {DEVICES:,} "
                f"devices at 1 Hz; close -> cloud broker p50/p99 {r['edge_p50_ms']:,.0f}/"
                f"{r['edge_p99_ms']:,.0f} ms, cloud broker -> queryable "
                f"{r['cloud_p50_ms']:,.0f}/{r['cloud_p99_ms']:,.0f} ms; worst window "
                f"{worst[0]} (seconds into its 10 min) max {worst[1][2]:,.0f} ms; polled every "
                f"{POLL_S * 1000:.0f} ms, poll p50 {r['poll_p50_ms']:,.0f} ms; InfluxDB's "
                f"cache snapshots {len(r['influx_snapshots_ms'])} "
                f"(longest {max(r['influx_snapshots_ms'], default=0):,.0f} ms), compactions "
                f"{len(r['influx_compactions_ms'])} "
                f"(longest {max(r['influx_compactions_ms'], default=0):,.0f} ms); CPU used "
                f"during the run, in cores of 2: "
                + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu"].items()))
        figs.append(figure(f"window close -> queryable in InfluxDB p50, {label}",
                           r["p50_ms"], "ms", note=note))
        figs.append(figure(f"window close -> queryable in InfluxDB p99, {label}",
                           r["p99_ms"], "ms", 1000.0, "target", note=f"max {r['max_ms']:,.0f} ms"))
    # what the p99 is made of: InfluxDB's work grows with the fields of each point
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        wide, wide_snaps = influx_cpu_per_point(Path(d) / "wide", WORKER_FIELDS)
        narrow, narrow_snaps = influx_cpu_per_point(Path(d) / "narrow", 6)
        traded, traded_snaps = influx_cpu_per_point(Path(d) / "traded", WORKER_FIELDS,
                                                    env=env_file(INFLUX_ENV))

    def snaps(s: list[float]) -> str:
        return f"{len(s)} (longest {max(s, default=0):,.0f} ms)"

    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        burst = influx_minute_burst(Path(d) / "default")
        burst_env = influx_minute_burst(Path(d) / "env", env=env_file(INFLUX_ENV))
    figs.append(figure(
        f"InfluxDB alone taking a minute boundary's {2 * DEVICES:,} points ({WORKER_FIELDS} "
        "fields) as the shipped worker writes them, idle machine, median of 8", burst, "ms",
        1000.0, "the p99 target of the whole path",
        note=f"with deploy/influxdb/influxdb.env: {burst_env:,.0f} ms; the floor of the shipped "
             "p99: a minute boundary closes a 10 s and a 1 min window of every device, and "
             "InfluxDB's CPU per point (below) on 2 cores shared with the rest of the path"))
    figs.append(figure(
        f"InfluxDB CPU per point of {WORKER_FIELDS} fields (the worker's aggregates)", wide,
        "us", narrow, "the same points with 6 fields",
        note=f"{DEVICES:,} devices, 10 s and 1 min windows, 6 tags; cache snapshots "
             f"{snaps(wide_snaps)} against {snaps(narrow_snaps)}"))
    figs.append(figure(
        f"InfluxDB CPU per point of {WORKER_FIELDS} fields, with deploy/influxdb/influxdb.env",
        traded, "us", wide, "its defaults (25m, GOGC=100)",
        note=f"cache snapshots {snaps(traded_snaps)} against {snaps(wide_snaps)}"))
    report("latency", figs)
    return figs


if __name__ == "__main__":
    main()
