"""What the uplink carries: result batches of the shipped gateway config (10 s and 1 min windows,
four percentiles and their sketches) as JSON and compressed (zlib, ``devices.contract``), in
bytes per result and in time per batch, the JSON encoding measured in the same run as the
reference. Data: 1,000 devices x 3 metrics at 1 Hz for 3 minutes of event time, noisy values."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.common import Figure, figure, report
from devices.clock import ManualClock
from devices.codecs import encode_single
from devices.contract import ResultBatch, decode_uplink, pack_uplink
from edge.agent import EdgePipeline
from edge.config import load_edge_config

SHIPPED = Path(__file__).resolve().parent.parent / "deploy" / "gateway.toml"
BASE = 1_796_000_000_000
DEVICES = 1_000
METRICS = ("temperature", "humidity", "pressure")
RANGES = {"temperature": (21.0, 2.0), "humidity": (45.0, 5.0), "pressure": (1013.0, 3.0)}


def batches(seconds: int = 180, seed: int = 3) -> list[ResultBatch]:
    cfg = replace(load_edge_config(SHIPPED), registry_path=None)  # every device accepted
    clock = ManualClock(now_ms=BASE)
    pipe = EdgePipeline(cfg, clock)
    rng = np.random.default_rng(seed)
    out: list[ResultBatch] = []
    seq = iter(range(10**9))
    for s in range(seconds):
        t = BASE + s * 1000
        clock.set_wall(t + 500)
        msgs = []
        for d in range(DEVICES):
            dev = f"plant-{d:05d}"
            for k, m in enumerate(METRICS):
                mean, sd = RANGES[m]
                v = round(float(mean + sd * rng.standard_normal()), 2)
                msgs.append((f"devices/{dev}/readings",
                             encode_single(dev, m, t + int(rng.integers(0, 900)), v, s * 3 + k),
                             t + 500))
        pipe.process(msgs)
        out.extend(pipe.to_batches(pipe.emit(), lambda: next(seq)))
    out.extend(pipe.to_batches(pipe.emit(flush=True), lambda: next(seq)))
    return [b for b in out if len(b.results)]


def main() -> list[Figure]:
    bs = batches()
    rows = sum(len(b.results) for b in bs)
    t0 = time.perf_counter()
    raw = [b.encode() for b in bs]
    t_json = time.perf_counter() - t0
    t0 = time.perf_counter()
    packed = [pack_uplink(b.encode()) for b in bs]
    t_pack = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in raw:
        decode_uplink(p)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in packed:
        decode_uplink(p)
    t_unpack = time.perf_counter() - t0
    n_raw, n_packed = sum(map(len, raw)), sum(map(len, packed))
    figs = [
        figure("result batch bytes per result, compressed (zlib 6)", n_packed / rows, "bytes",
               n_raw / rows, "the same batches as JSON",
               note=f"{len(bs)} batches, {rows:,} results of {DEVICES:,} devices x "
                    f"{len(METRICS)} metrics"),
        figure("uplink bytes a second for 1,000 devices x 3 metrics at 1 Hz, compressed",
               n_packed / 180, "bytes/s", n_raw / 180, "as JSON"),
        figure("agent: encode + compress per result", t_pack / rows * 1e6, "us",
               t_json / rows * 1e6, "encode as JSON alone"),
        figure("cloud: inflate + decode per result", t_unpack / rows * 1e6, "us",
               t_read / rows * 1e6, "decode JSON alone"),
    ]
    report("uplink", figs)
    return figs


if __name__ == "__main__":
    main()
