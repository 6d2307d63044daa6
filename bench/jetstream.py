"""Cloud workers on NATS JetStream: results/s with 1 and 2 workers, and how long a partition takes
to move to a standby when its worker dies. A 3-node cluster (R3 stream), InfluxDB 1.6 and the
workers as real processes (`fieldline cloud run`), all started here on loopback.

Each run reads the same backlog already on the stream (gateways spread over the partitions), so
the publisher never competes with the workers; the clock runs from the first point in InfluxDB
to the last (worker start-up excluded). The reference is a raw line-protocol write loop of the
same number of points into the same InfluxDB, measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import DEPLOY, Figure, figure, report, stop_processes, wait_until
from bench.pipeline import result_batches
from cloud.jetstream import IN, JetStreamConfig, ensure_stream, gateway_token, partition_of_gateway
from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import InfluxDB, NatsCluster

P = 8
PER_BATCH = 2_000  # one window of all 2,000 devices per batch (distinct points)
CMD = [sys.executable, "-m", "fieldline.cli", "--log-level", "WARNING"]


def _gateways(n: int) -> list[str]:
    """``n`` gateway ids covering the partitions evenly (so two workers share the load)."""
    out: list[str] = []
    for i in range(100 * n):
        gw = f"gw-{i}"
        if sum(partition_of_gateway(g, P) == partition_of_gateway(gw, P) for g in out) < n // P:
            out.append(gw)
        if len(out) == n:
            break
    return out


async def _publish(urls: list[str], stream: str, n_results: int) -> None:
    import nats

    nc = await nats.connect(urls)
    try:
        await ensure_stream(nc, JetStreamConfig(servers=tuple(urls), stream=stream,
                                                partitions=P, replicas=3))
        js = nc.jetstream()
        gws = _gateways(16)
        start = time.time_ns() // 1_000_000 - 86_400_000
        per_gw = n_results // len(gws)
        for gw in gws:
            for batch in result_batches(per_gw, PER_BATCH, start):
                mine = replace(batch, gateway=gw,
                               devices=[d.replace("gw-1", gw) for d in batch.devices])
                await js.publish(f"{IN}.{gateway_token(gw)}.results", mine.encode(),
                                 stream=stream)
    finally:
        await nc.close()


async def _drop(urls: list[str], stream: str) -> None:
    """Streams may not overlap: each run's goes before the next is made."""
    import nats

    nc = await nats.connect(urls)
    try:
        await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()


def _config(work: Path, urls: list[str], stream: str, influx: str, db: str,
            timeout: str = "5s") -> Path:
    servers = ", ".join(f'"{u}"' for u in urls)
    cfg = work / f"{stream}.toml"
    cfg.write_text(f"""
[worker]
id = "bench"
health_interval = "1s"
[ingest]
broker = "mqtt://127.0.0.1:1"
[engine]
kind = "jetstream"
servers = [{servers}]
stream = "{stream}"
partitions = {P}
replicas = 3
priority_timeout = "{timeout}"
snapshot_interval = "5s"
[influxdb]
url = "{influx}"
database = "{db}"
batch_points = 5000
flush_interval = "100ms"
""")
    return cfg


def _count(client: InfluxV1Client) -> int:
    try:
        doc: Any = client.query('SELECT count("mean") FROM "aggregates"')
    except Exception:
        return 0
    series = doc["results"][0].get("series", [])
    return int(series[0]["values"][0][1]) if series else 0


def _spawn(work: Path, cfg: Path, name: str, member: str | None = None
           ) -> subprocess.Popen[bytes]:
    args = [*CMD, "cloud", "run", "--config", str(cfg), "--worker-id", name]
    if member:
        args += ["--member", member]
    return subprocess.Popen(args, stdout=(work / f"{name}.log").open("ab"),
                            stderr=subprocess.STDOUT, env={**os.environ})


def _run_workers(work: Path, urls: list[str], ix: InfluxDB, workers: int, n: int) -> float:
    stream = f"W{workers}"
    asyncio.run(_publish(urls, stream, n))
    db = f"w{workers}"
    client = InfluxV1Client(ix.url, db)
    client.create_database()
    cfg = _config(work, urls, stream, ix.url, db)
    procs = [_spawn(work, cfg, f"{stream}-{k}", f"{k}/{workers}" if workers > 1 else None)
             for k in range(workers)]
    try:
        wait_until(lambda: _count(client) > 0, 120, f"the first point ({workers} worker(s))",
                   lambda: [p.poll() for p in procs], poll_s=0.05)
        t0 = time.perf_counter()
        wait_until(lambda: _count(client) >= n, 240, f"{n:,} results ({workers} worker(s))",
                   lambda: (_count(client), [p.poll() for p in procs]), poll_s=0.1)
        return n / (time.perf_counter() - t0)
    finally:
        stop_processes(procs)
        asyncio.run(_drop(urls, stream))


async def _owners(urls: list[str], stream: str) -> dict[int, str]:
    import json

    import nats

    nc = await nats.connect(urls)
    try:
        kv = await nc.jetstream().key_value(f"{stream}_SNAP")
        out = {}
        for p in range(P):
            try:
                out[p] = json.loads((await kv.get(f"p{p}")).value or b"{}").get("owner", "")
            except Exception:
                out[p] = ""
        return out
    finally:
        await nc.close()


def _move(work: Path, urls: list[str], ix: InfluxDB) -> float:
    """SIGKILL the worker holding every partition while results keep arriving; seconds until
    a standby has claimed them all (pin timeout 2 s: the engine's part) and restored their
    snapshots."""
    stream = "MOVE"
    asyncio.run(_publish(urls, stream, 16 * PER_BATCH))
    client = InfluxV1Client(ix.url, "move")
    client.create_database()
    cfg = _config(work, urls, stream, ix.url, "move", timeout="2s")
    first = _spawn(work, cfg, "first")
    procs = [first]
    try:
        wait_until(lambda: set(asyncio.run(_owners(urls, stream)).values()) == {"first"}, 120,
                   "the first worker to hold every partition",
                   lambda: asyncio.run(_owners(urls, stream)), poll_s=0.3)
        procs.append(_spawn(work, cfg, "standby"))
        time.sleep(5)  # the standby connected and pulling
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        t0 = time.perf_counter()
        # the engine re-pins when it has something to deliver: results keep arriving
        asyncio.run(_publish(urls, stream, 16 * PER_BATCH))
        wait_until(lambda: set(asyncio.run(_owners(urls, stream)).values()) == {"standby"}, 120,
                   "the standby to hold every partition",
                   lambda: asyncio.run(_owners(urls, stream)), poll_s=0.1)
        return time.perf_counter() - t0
    finally:
        stop_processes(procs)
        asyncio.run(_drop(urls, stream))


def main(n: int = 160_000) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-js-") as d:
        work = Path(d)
        cluster = NatsCluster(work / "nats", 3,  # the shipped configuration
                              shipped=DEPLOY / "nats" / "nats-server.conf").start()
        ix = InfluxDB(work / "influx").start()
        try:
            raw = InfluxV1Client(ix.url, "raw")
            raw.create_database()
            start = time.time_ns() // 1_000_000 - 86_400_000
            lines = [f"aggregates,device=d{i % 2000},metric=temperature,site=s count=10i,"
                     f"mean={20 + (i % 7) * 0.1},min=19.0,max=21.0 "
                     f"{start + (i // 2000) * 10_000}" for i in range(n)]
            t0 = time.perf_counter()
            for k in range(0, n, 5_000):
                raw.write_lines(lines[k:k + 5_000])
            raw_rate = n / (time.perf_counter() - t0)
            one = _run_workers(work, cluster.urls, ix, 1, n)
            two = _run_workers(work, cluster.urls, ix, 2, n)
            move = _move(work, cluster.urls, ix)
        finally:
            ix.stop()
            cluster.stop()
    figs = [
        figure("cloud results/s on JetStream, 1 worker (3-node R3 stream -> decode -> dedup "
               "-> enrich -> detect -> InfluxDB)", one, "results/s", raw_rate,
               "raw line-protocol write loop", note=f"{n:,} results, {P} partitions"),
        figure("same, 2 workers (--member 0/2, 1/2)", two, "results/s", one, "1 worker",
               note="2 cores shared with 3 NATS nodes and InfluxDB"),
        figure("a partition moves: worker SIGKILLed -> standby holds all its partitions",
               move, "s", note="priority_timeout 2 s"),
    ]
    report("jetstream", figs)
    return figs


if __name__ == "__main__":
    main()
