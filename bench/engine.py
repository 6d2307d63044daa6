"""The windowing engine against two references measured in the same run, on the same data:

* a plain numpy group-by computing only count/sum/min/max per (device, metric, window)
  (target: the engine, with every aggregate and percentiles on, at >= 0.5x its speed);
* a per-reading Python dict loop computing the same four aggregates (target: >= 10x).

Also: memory per open (device, metric, window), and the RSS of a real agent process holding
10,000 active devices (issue 15's target: <= 40 MiB), with its baseline before any reading and
the state per device, measured in a child process so nothing of the bench itself is counted.
"""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Figure, GaveUpError, figure, report, shipped_gateway
from devices.contract import (
    HealthReport,
    ResultBatch,
    ack_topic,
    batch_digest,
    decode_uplink,
    encode_ack,
)
from devices.readings import ReadingColumns
from edge.engine import EngineConfig, WindowEngine
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec
from fieldline.services import Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher

BASE = 1_700_000_000_000
N_DEVICES = 10_000
N_METRICS = 3
SIZE = 10_000
BATCH = 50_000


def make_data(n: int, seed: int = 1) -> ReadingColumns:
    """n readings from 10,000 devices x 3 metrics at 1 Hz, in MQTT arrival order: devices
    interleaved at random within each second, a few readings a little late."""
    rng = np.random.default_rng(seed)
    per_tick = N_DEVICES * N_METRICS
    i = np.arange(n, dtype=np.int64)
    series = np.concatenate([rng.permutation(per_tick) for _ in range(-(-n // per_tick))])[:n]
    tick = i // per_tick
    dev = (series // N_METRICS).astype(np.int32)
    met = (series % N_METRICS).astype(np.int32)
    ts = BASE + tick * 1000 + rng.integers(0, 1000, n) - rng.integers(0, 300, n) * (
        rng.random(n) < 0.05)
    value = 20 + rng.standard_normal(n)
    # per device, numbered in arrival order (a device publishes its readings in sequence)
    order = np.argsort(dev, kind="stable")
    first = np.ones(n, bool)
    first[1:] = dev[order][1:] != dev[order][:-1]
    seq = np.empty(n, np.int64)
    seq[order] = np.arange(n) - np.maximum.accumulate(np.where(first, np.arange(n), 0))
    return ReadingColumns(dev, met, ts.astype(np.int64), value, seq, np.zeros(n, np.int64))


def batches(data: ReadingColumns) -> list[ReadingColumns]:
    return [data.take(np.arange(lo, min(lo + BATCH, len(data))))
            for lo in range(0, len(data), BATCH)]


def run_engine(parts: list[ReadingColumns], *, percentiles: bool = True) -> tuple[float, int]:
    eng = WindowEngine(EngineConfig(
        windows=(WindowSpec(size_ms=SIZE),),
        percentiles=(0.5, 0.9, 0.95, 0.99) if percentiles else (),
        time=EventTimeSpec(out_of_orderness_ms=2_000, allowed_lateness_ms=30_000,
                           idle_timeout_ms=10**9)))
    emitted = 0
    t0 = time.perf_counter()
    for b in parts:
        eng.fold(b, 0)
        emitted += len(eng.emit(0))
    return time.perf_counter() - t0, emitted


def run_numpy_groupby(parts: list[ReadingColumns]) -> float:
    """count/sum/min/max per (device, metric, window) per batch, the way it is usually written:
    np.unique(return_inverse) for the groups, bincount and ufunc.at for the aggregates."""
    t0 = time.perf_counter()
    for b in parts:
        key = ((b.device.astype(np.int64) * N_METRICS + b.metric) << 32) | (b.ts // SIZE
                                                                            - BASE // SIZE)
        uniq, inv = np.unique(key, return_inverse=True)
        g = len(uniq)
        np.bincount(inv, minlength=g)
        np.bincount(inv, weights=b.value, minlength=g)
        mn = np.full(g, np.inf)
        np.minimum.at(mn, inv, b.value)
        mx = np.full(g, -np.inf)
        np.maximum.at(mx, inv, b.value)
    return time.perf_counter() - t0


def run_numpy_groupby_sorted(parts: list[ReadingColumns]) -> float:
    """The fastest variant found: one argsort, then reduceat (counts from the boundaries)."""
    t0 = time.perf_counter()
    for b in parts:
        key = ((b.device.astype(np.int64) * N_METRICS + b.metric) << 32) | (b.ts // SIZE
                                                                            - BASE // SIZE)
        order = np.argsort(key)
        k = key[order]
        v = b.value[order]
        starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
        np.diff(np.append(starts, len(k)))
        np.add.reduceat(v, starts)
        np.minimum.reduceat(v, starts)
        np.maximum.reduceat(v, starts)
    return time.perf_counter() - t0


def run_python_loop(parts: list[ReadingColumns]) -> float:
    """What the engine computes, one reading at a time in Python: count, sum, min, max, mean and
    M2 (Welford), first/last by event time, and a log-bucket sketch per window."""
    log_gamma = math.log((1 + 0.01) / (1 - 0.01))
    t0 = time.perf_counter()
    state: dict[tuple[int, int, int], list[Any]] = {}
    for b in parts:
        for d, m, t, v in zip(b.device.tolist(), b.metric.tolist(), b.ts.tolist(),
                              b.value.tolist(), strict=True):
            key = (d, m, t - t % SIZE)
            bucket = math.ceil(math.log(abs(v)) / log_gamma) if v else 0
            s = state.get(key)
            if s is None:
                state[key] = [1, v, v, v, v, 0.0, t, v, t, v, {bucket: 1}]
                continue
            s[0] += 1
            s[1] += v
            s[2] = min(s[2], v)
            s[3] = max(s[3], v)
            delta = v - s[4]
            s[4] += delta / s[0]
            s[5] += delta * (v - s[4])
            if t < s[6]:
                s[6], s[7] = t, v
            if t > s[8]:
                s[8], s[9] = t, v
            sk = s[10]
            sk[bucket] = sk.get(bucket, 0) + 1
    return time.perf_counter() - t0


def rss_parts(pid: int) -> dict[str, float]:
    """The process's resident memory in MiB, split as the kernel counts it: ``anon`` (its own
    heap, arrays and Python objects: what only swap could take away) and ``file`` (pages of the
    interpreter's, numpy's and OpenBLAS's code and of other mapped files: shared with any other
    process using them, and dropped by the kernel under memory pressure, read again on use)."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem"):
                out[key[3:].lower()] = int(value.split()[0]) / 1024
    return out


def agent_rss(work: Path, devices: int = N_DEVICES, seconds: int = 60,
              backlog: bool = False) -> dict[str, float]:
    """RSS of a real ``fieldline edge run`` process with the shipped ``deploy/gateway.toml``
    (windows 10 s and 1 min, deduplication, percentiles), read from outside, fed by a fleet
    (one sensor per device) through Mosquitto.

    * ``baseline_mb``: the agent up and connected, before any reading;
    * steady state: ``seconds`` of the fleet at 1 Hz in real time, then the RSS;
    * ``backlog``: ``seconds`` of the fleet published at once (a gateway whose agent was down),
      and the peak RSS while the agent catches up."""
    gw = Mosquitto(work / "gw").start()
    cloud = Mosquitto(work / "cloud").start()
    cfg = shipped_gateway(work, gw.url, cloud.url, {"health_interval": '"500ms"'})
    health: dict[str, float] = {}
    got = threading.Event()

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        if not m.topic.endswith(("/results", "/health")):
            return  # late readings, ledgers, our own acknowledgements
        rep = decode_uplink(m.payload)
        if isinstance(rep, ResultBatch):  # acknowledged as the cloud worker would, once stored
            sub.publish(ack_topic(rep.gateway), encode_ack(
                [rep.seq], incarnation=rep.incarnation,
                proofs={rep.seq: batch_digest(m.payload)}), qos=1)
        if isinstance(rep, HealthReport):
            health.update(rep.counters)
            health.update(rep.gauges)
            got.set()

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", cloud.port)
    # everything the agent sends has a taker that acknowledges result batches, as a cloud
    # worker does (stand-in: no InfluxDB here, it would compete for the same two cores); without
    # acknowledgements the outbox grows and the agent keeps re-sending
    sub.subscribe("fieldline/v1/#", qos=1)
    sub.loop_start()
    proc = subprocess.Popen([sys.executable, "-m", "fieldline.cli", "--log-level", "ERROR",
                             "edge", "run", "--config", str(cfg)])
    try:
        got.wait(30)
        agent = psutil.Process(proc.pid)
        time.sleep(2.0)  # a few idle ticks and health reports
        baseline = agent.memory_info().rss / 2**20
        baseline_parts = rss_parts(proc.pid)
        spec = FleetSpec(gateways=1, devices_per_gateway=devices, disorder_fraction=0.05,
                         topic_template="devices/{device}/readings")
        t0 = time.time_ns() // 1_000_000
        sim = FleetSimulator(spec, t0 - seconds * 1000 if backlog else t0)
        pub = FleetPublisher(sim, {"gw-1": gw.address}, qos=1)
        stop = threading.Event()
        runner = threading.Thread(target=pub.run_fast if backlog else pub.run_realtime,
                                  args=(seconds,) if backlog else (stop, seconds), daemon=True)
        runner.start()
        peak = 0.0
        deadline = time.monotonic() + seconds + 180
        while (runner.is_alive() or health.get("readings_received", 0) < pub.published) and \
                time.monotonic() < deadline:
            peak = max(peak, agent.memory_info().rss / 2**20)
            time.sleep(0.1)
        if runner.is_alive() or health.get("readings_received", 0) < pub.published:
            stop.set()
            pub.close()
            raise GaveUpError(f"the agent did not take the fleet in time; saw: {pub.published:,} "
                         f"published, health {health}")
        runner.join(30)
        pub.close()
        time.sleep(1.0)
        rss = agent.memory_info().rss / 2**20
        parts = rss_parts(proc.pid)
        return {"rss_mb": rss, "peak_mb": max(peak, rss), "baseline_mb": baseline,
                "anon_mb": parts["anon"], "file_mb": parts["file"],
                "baseline_anon_mb": baseline_parts["anon"],
                "baseline_file_mb": baseline_parts["file"],
                "published": pub.published, **health}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        sub.loop_stop()
        gw.stop()
        cloud.stop()


def throughput(parts: list[ReadingColumns], rounds: int = 5) -> tuple[float, ...]:
    """Best-of-``rounds`` seconds of the engine (with and without percentiles) and of the two
    numpy group-bys, interleaved round by round so that a noisy stretch of the machine hits
    them alike."""
    run_engine(parts[:4])  # warm up
    best = [math.inf] * 4
    for _ in range(rounds):
        for i, run in enumerate((lambda: run_engine(parts)[0],
                                 lambda: run_engine(parts, percentiles=False)[0],
                                 lambda: run_numpy_groupby(parts),
                                 lambda: run_numpy_groupby_sorted(parts))):
            best[i] = min(best[i], run())
    return tuple(best)


def main(n: int = 1_500_000) -> list[Figure]:
    data = make_data(n)
    parts = batches(data)
    eng_s, eng_np_s, np_s, np_sorted_s = throughput(parts)
    py_s = run_python_loop(parts)
    # memory per open window: engine state bytes / open windows
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=SIZE),), time=EventTimeSpec(
        out_of_orderness_ms=2_000, allowed_lateness_ms=30_000, idle_timeout_ms=10**9)))
    for b in parts[:12]:
        eng.fold(b, 0)
    per_window = eng.state_bytes() / max(eng.open_windows, 1)
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        agent = agent_rss(Path(d))
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        caught_up = agent_rss(Path(d), seconds=90, backlog=True)
    figs = [
        figure("engine readings/s (all aggregates + p50/p90/p95/p99, dedup, watermarks)",
               n / eng_s, "readings/s", n / np_s, "numpy group-by count/sum/min/max"),
        figure("engine readings/s vs the fastest numpy group-by (argsort + reduceat)",
               n / eng_s, "readings/s", n / np_sorted_s,
               "numpy argsort+reduceat count/sum/min/max"),
        figure("engine readings/s vs per-reading Python loop", n / eng_s, "readings/s",
               n / py_s, "Python loop, same aggregates and sketch"),
        figure("engine readings/s without percentiles", n / eng_np_s, "readings/s", n / np_s,
               "numpy group-by count/sum/min/max"),
        figure("state per open (device, metric, window), incl. sketch and duplicate memory",
               per_window, "bytes", note=f"{eng.open_windows:,} open windows"),
        figure("agent RSS (fieldline edge run, shipped gateway.toml), 10,000 active devices at "
               "1 Hz through Mosquitto", agent["rss_mb"], "MiB", 40.0, "target (issue 15)",
               note=f"{agent['devices_seen']:,.0f} devices, {agent['open_windows']:,.0f} open "
                    f"windows, window state {agent['window_state_kb']:,.0f} KiB, "
                    f"{agent['readings_received']:,.0f} readings received"),
        figure("agent RSS baseline: up and connected, before any reading", agent["baseline_mb"],
               "MiB", note=f"interpreter {sys.version.split()[0]} ({sys.executable}), imports, "
                           "buffers"),
        figure("agent RSS per device (steady state minus baseline, / devices)",
               (agent["rss_mb"] - agent["baseline_mb"]) * 1024 / max(agent["devices_seen"], 1),
               "KiB", note="10 s and 1 min windows of one metric, duplicate memory, ledger, "
                           "sequence gaps, clock offsets"),
        figure("of the agent's RSS: anonymous memory (heap, arrays, Python objects)",
               agent["anon_mb"], "MiB", note=f"baseline {agent['baseline_anon_mb']:.1f} MiB"),
        figure("of the agent's RSS: file-backed pages (interpreter, numpy and OpenBLAS code; "
               "shared, reclaimable)", agent["file_mb"], "MiB",
               note=f"baseline {agent['baseline_file_mb']:.1f} MiB"),
        figure("agent peak RSS catching up a 90 s backlog of the same fleet",
               caught_up["peak_mb"], "MiB", 80.0, "earlier target",
               note=f"{caught_up['published']:,.0f} readings published at once, "
                    f"{caught_up['open_windows']:,.0f} open windows at the end"),
    ]
    report("engine", figs)
    return figs


if __name__ == "__main__":
    main()
