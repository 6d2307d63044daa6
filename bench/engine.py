"""The windowing engine against two references measured in the same run, on the same data:

* a plain numpy group-by computing only count/sum/min/max per (device, metric, window)
  (target: the engine, with every aggregate and percentiles on, at >= 0.5x its speed);
* a per-reading Python dict loop computing the same four aggregates (target: >= 10x).

Also: memory per open (device, metric, window), and the RSS of a real agent process holding
10,000 active devices (target <= 80 MB), measured in a child process so nothing of the bench
itself is counted.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from typing import Any

import numpy as np

from bench.common import Figure, figure, report
from devices.readings import ReadingColumns
from edge.engine import EngineConfig, WindowEngine
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec

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
    """count/sum/min/max per (device, metric, window) per batch: argsort + reduceat."""
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


AGENT_RSS = r"""
import time, numpy as np
from bench.engine import make_data, batches, N_DEVICES, N_METRICS
from edge.agent import EdgePipeline, rss_mb
from edge.config import EdgeConfig
from devices.clock import SystemClock
from devices.mqtt import BrokerAddress
from devices.codecs import encode_single
b = BrokerAddress(host="127.0.0.1", port=1)
p = EdgePipeline(EdgeConfig(gateway="gw", intake_broker=b, uplink_broker=b, max_past_ms=10**13),
                 SystemClock())
now = time.time_ns() // 1_000_000
names = [f"dev-{d:05d}" for d in range(N_DEVICES)]
metrics = ["temperature", "humidity", "pressure"]
base = now - 120_000
# two minutes of 10,000 devices x 3 metrics at 1 Hz, through the real decode path
for tick in range(120):
    msgs = [(f"devices/{names[d]}/readings",
             encode_single(names[d], metrics[m], base + tick * 1000 + d % 1000, 20.0 + m,
                           tick * 3 + m),
             now) for d in range(N_DEVICES) for m in range(N_METRICS)]
    p.process(msgs)
    p.emit()
    del msgs
print(rss_mb(), p.engine.open_windows, p.engine.active_devices, p.engine.state_bytes())
"""


def agent_rss() -> tuple[float, int, int, int]:
    out = subprocess.run([sys.executable, "-c", AGENT_RSS], capture_output=True, text=True,
                         check=True, timeout=600)
    rss, windows, active, state = out.stdout.split()
    return float(rss), int(windows), int(active), int(state)


def main(n: int = 1_500_000) -> list[Figure]:
    data = make_data(n)
    parts = batches(data)
    run_engine(parts[:4])  # warm up
    eng_s, _ = min((run_engine(parts) for _ in range(2)), key=lambda r: r[0])
    eng_np_s, _ = min((run_engine(parts, percentiles=False) for _ in range(2)),
                      key=lambda r: r[0])
    np_s = min(run_numpy_groupby(parts) for _ in range(3))
    py_s = run_python_loop(parts)
    # memory per open window: engine state bytes / open windows
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=SIZE),), time=EventTimeSpec(
        out_of_orderness_ms=2_000, allowed_lateness_ms=30_000, idle_timeout_ms=10**9)))
    for b in parts[:12]:
        eng.fold(b, 0)
    per_window = eng.state_bytes() / max(eng.open_windows, 1)
    rss, windows, active, _state = agent_rss()
    figs = [
        figure("engine readings/s (all aggregates + p50/p90/p95/p99, dedup, watermarks)",
               n / eng_s, "readings/s", n / np_s, "numpy group-by count/sum/min/max"),
        figure("engine readings/s vs per-reading Python loop", n / eng_s, "readings/s",
               n / py_s, "Python loop, same aggregates and sketch"),
        figure("engine readings/s without percentiles", n / eng_np_s, "readings/s", n / np_s,
               "numpy group-by count/sum/min/max"),
        figure("state per open (device, metric, window), incl. sketch and duplicate memory",
               per_window, "bytes", note=f"{eng.open_windows:,} open windows"),
        figure("agent RSS, 10,000 active devices x 3 metrics, 2 minutes at 1 Hz", rss, "MiB",
               80.0, "target", note=f"{active:,} active devices, {windows:,} open windows"),
    ]
    report("engine", figs)
    return figs


if __name__ == "__main__":
    main()
