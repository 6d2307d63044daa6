"""Edge agent readings/s vs a bare paho-mqtt receive loop; cloud results/s to InfluxDB vs a raw
line-protocol write loop. Real Mosquitto and InfluxDB 1.6, started here.

Both sides of each comparison read the same input the same way: the broker holds a backlog of
QoS 1 messages for a persistent session, and the timer runs from connect until everything was
processed, so the publisher never competes with the measured process.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import Figure, await_until, figure, report
from cloud.config import CloudConfig, InfluxConfig
from cloud.ingest import SourceMessage
from cloud.sinks.base import MemorySink
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.sinks.points import encode
from cloud.worker import CloudWorker
from devices.contract import ResultBatch, ResultColumns, results_topic
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from fieldline.services import InfluxDB, Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec

N_DEVICES = 10_000
INFLUX_CONCURRENCY = InfluxConfig().write_concurrency


def _client(cid: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=cid,
                    protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    return c


def _props() -> Properties:
    p = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    p.SessionExpiryInterval = 3600
    return p


def register_session(broker: Mosquitto, cid: str, topic: str) -> None:
    """Create a persistent session with a QoS 1 subscription, then go offline."""
    done = threading.Event()
    c = _client(cid)
    c.on_subscribe = lambda *_: done.set()
    c.connect(broker.address.host, broker.port, clean_start=False, properties=_props())
    c.loop_start()
    c.subscribe(topic, qos=1)
    done.wait(10)
    c.disconnect()
    c.loop_stop()


def publish_backlog(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> None:
    c = _client("bench-publisher")
    c.connect(broker.address.host, broker.port)
    c.loop_start()
    info = None
    for k, (t, p) in enumerate(messages):
        info = c.publish(t, p, qos=1)
        if k % 20_000 == 19_999:  # paho has 65,535 message ids: never have more outstanding
            info.wait_for_publish(120)
    if info is not None:
        info.wait_for_publish(120)
    time.sleep(0.5)
    c.disconnect()
    c.loop_stop()


def bare_paho_drain(broker: Mosquitto, cid: str, n: int) -> float:
    """Seconds for a bare paho callback loop to receive n queued messages."""
    got = [0]
    done = threading.Event()

    def on_message(_c: mqtt.Client, _u: object, _m: mqtt.MQTTMessage) -> None:
        got[0] += 1
        if got[0] >= n:
            done.set()

    c = _client(cid)
    c.on_message = on_message
    t0 = time.perf_counter()
    c.connect(broker.address.host, broker.port, clean_start=False, properties=_props())
    c.loop_start()
    done.wait(300)
    dt = time.perf_counter() - t0
    c.disconnect()
    c.loop_stop()
    assert got[0] >= n, f"bare loop received {got[0]} of {n}"
    return dt


def time_until(run: Callable[[asyncio.Event], Awaitable[None]],
               done: Callable[[], bool], saw: Callable[[], object] = lambda: "",
               timeout_s: float = 600) -> float:
    """Seconds from starting ``run`` until ``done()`` holds; then stop it cleanly (and stop it
    all the same, saying what it saw, when ``done()`` never comes)."""

    async def main() -> float:
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(run(stop))
        try:
            await await_until(done, timeout_s, "the run to finish", saw, poll_s=0.01)
        finally:
            stop.set()
            await task
        return time.perf_counter() - t0

    return asyncio.run(main())


def device_messages(n_readings: int, start_ms: int) -> list[tuple[str, bytes]]:
    spec = FleetSpec(gateways=1, devices_per_gateway=N_DEVICES, disorder_fraction=0.05,
                     topic_template="devices/{device}/readings")
    sim = FleetSimulator(spec, start_ms)
    out: list[tuple[str, bytes]] = []
    for tick in sim.ticks():  # every tick holds a reading per device
        out.extend(tick.messages["gw-1"])
        if len(out) >= n_readings:
            break
    return out[:n_readings]


def bench_edge(work: Path, n: int) -> list[Figure]:
    gw = Mosquitto(work / "gw").start()
    cloud = Mosquitto(work / "cloud").start()
    try:
        start = time.time_ns() // 1_000_000 - 3_600_000
        msgs = device_messages(n, start)
        register_session(gw, "bench-bare", "devices/+/readings")
        register_session(gw, "fieldline-edge-gw-1-intake", "devices/+/readings")
        publish_backlog(gw, msgs)

        bare_s = bare_paho_drain(gw, "bench-bare", n)

        cfg = EdgeConfig(gateway="gw-1", intake_broker=gw.address, uplink_broker=cloud.address,
                         state_dir=work / "state",
                         tick_ms=50, max_pending=2 * n)
        agent = EdgeAgent(cfg)
        agent_s = time_until(agent.run, lambda: agent.pipeline.counters["readings_accepted"]
                             + agent.pipeline.rejects.total >= n)
        return [
            figure("edge agent readings/s (MQTT intake -> decode -> validate -> windows -> "
                   "uplink)", n / agent_s, "readings/s", n / bare_s, "bare paho-mqtt loop",
                   note=f"{n:,} JSON readings from {N_DEVICES:,} devices"),
        ]
    finally:
        gw.stop()
        cloud.stop()


def result_batches(n_results: int, per_batch: int, start_ms: int) -> list[ResultBatch]:
    rng = np.random.default_rng(3)
    batches = []
    n_dev = 2_000
    for b in range(n_results // per_batch):
        i = np.arange(per_batch, dtype=np.int64)
        dev = i % n_dev
        window = b * (per_batch // n_dev) + i // n_dev
        mean = 20 + rng.standard_normal(per_batch)
        res = ResultColumns(
            device=dev, metric=np.zeros(per_batch, np.int64), start=start_ms + window * 10_000,
            width=np.full(per_batch, 10_000, np.int64), rev=np.zeros(per_batch, np.int64),
            count=np.full(per_batch, 10, np.int64), sum=mean * 10, min=mean - 1, max=mean + 1,
            mean=mean, m2=np.full(per_batch, 0.4), first_ts=start_ms + window * 10_000,
            first=mean, last_ts=start_ms + window * 10_000 + 9_000, last=mean)
        batches.append(ResultBatch(gateway="gw-1", seq=b, watermark=0, sent_ms=start_ms,
                                   devices=[f"gw-1-t{d:05d}" for d in range(n_dev)],
                                   metrics=["temperature"], results=res))
    return batches


class _NoSource:
    per_partition_state = False
    partitions = 1


def bench_cloud(work: Path, n: int, batch_points: int = 5_000) -> list[Figure]:
    cloud = Mosquitto(work / "cloud2").start()
    ix = InfluxDB(work / "influx").start()
    try:
        start = time.time_ns() // 1_000_000 - 86_400_000
        batches = result_batches(n, 5_000, start)
        # reference: the same number of points, pre-formatted, written in 5,000-point batches
        raw = InfluxV1Client(ix.url, "raw")
        raw.create_database()
        lines = [f"aggregates,device=d{i % 2000},metric=temperature,site=s count=10i,"
                 f"mean={20 + (i % 7) * 0.1},min=19.0,max=21.0 {start + (i // 2000) * 10_000}"
                 for i in range(n)]
        t0 = time.perf_counter()
        for k in range(0, n, 5_000):
            raw.write_lines(lines[k:k + 5_000])
        raw_s = time.perf_counter() - t0

        # second reference: the very points the worker writes (wide: ~14 fields, ~300 bytes),
        # made by a worker pass into memory first, then written by the same raw loop
        dry = CloudWorker(CloudConfig(worker_id="dry", broker=cloud.address,
                                      influx=InfluxConfig(url=ix.url)),
                          sink=MemorySink(), source=_NoSource())
        for i, b in enumerate(batches):
            dry.handle(SourceMessage(0, i, results_topic("gw-1"), b.encode()))
        own = encode(dry.writer.pending())
        conc = INFLUX_CONCURRENCY

        def sequential(db: str) -> float:
            client = InfluxV1Client(ix.url, db)
            client.create_database()
            t0 = time.perf_counter()
            for k in range(0, len(own), 5_000):
                client.write_lines(own[k:k + 5_000])
            return time.perf_counter() - t0

        def parallel(db: str) -> float:  # as the worker sends them: split by series
            client = InfluxV1Client(ix.url, db)
            client.create_database()
            t0 = time.perf_counter()
            for k in range(0, len(own), 5_000):
                shards: list[list[str]] = [[] for _ in range(conc)]
                for ln in own[k:k + 5_000]:
                    shards[hash(ln[:ln.find(" ")]) % conc].append(ln)
                threads = [threading.Thread(target=client.write_lines, args=(sh,))
                           for sh in shards]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(120)
            return time.perf_counter() - t0

        # the references are taken before and after the worker's run (InfluxDB's background
        # compactions of earlier databases weigh on whatever runs next) and averaged
        same_s = [sequential("same_a")]
        par_s = [parallel("par_a")]

        cid = "fieldline-cloud-bench"
        register_session(cloud, cid, "fieldline/v1/+/results")
        publish_backlog(cloud, [(results_topic("gw-1"), b.encode()) for b in batches])
        cfg = CloudConfig(worker_id="bench", broker=cloud.address,
                          influx=InfluxConfig(url=ix.url, database="cloud",
                                              batch_points=batch_points,
                                              flush_interval_ms=100))
        worker = CloudWorker(cfg)
        # timed from the moment the first batch is seen handled (start-up, a connect and a
        # subscribe, is not throughput), counting only the results that came after it
        marks: dict[str, float] = {}

        def done() -> bool:
            st = worker.stats()
            if "first" not in marks and st["results_in"] > 0:
                marks["first"] = time.perf_counter()
                marks["first_n"] = st["results_in"]
            if st["results_written"] >= n:
                marks["end"] = time.perf_counter()
                return True
            return False

        time_until(worker.run, done)
        cloud_rate = (n - marks["first_n"]) / (marks["end"] - marks["first"])
        same_s.append(sequential("same_b"))
        par_s.append(parallel("par_b"))
        same_rate = len(own) / (sum(same_s) / 2)
        par_rate = len(own) / (sum(par_s) / 2)
        return [figure("cloud window results/s to InfluxDB (MQTT -> decode -> dedup -> enrich -> "
                       "detect -> points -> /write)", cloud_rate, "results/s", same_rate,
                       "raw write loop of the worker's own points (one request at a time)",
                       note=f"{n:,} results in 5,000-row batches; references before and after "
                            f"the run: {len(own) / same_s[0]:,.0f} and "
                            f"{len(own) / same_s[1]:,.0f}/s"),
                figure("same worker", cloud_rate, "results/s", n / raw_s,
                       "raw loop of narrow points (4 fields, 3 tags)",
                       note="InfluxDB takes narrow points 2.5-3x faster than the worker's"),
                figure("same worker", cloud_rate, "results/s", par_rate,
                       f"raw loop of its own points, {conc} requests at once",
                       note="the worker's write strategy without the worker: its own cost")]
    finally:
        cloud.stop()
        ix.stop()


def main(n_edge: int = 200_000, n_cloud: int = 100_000) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        work = Path(d)
        figs = bench_edge(work, n_edge) + bench_cloud(work, n_cloud)
    report("pipeline", figs)
    return figs


if __name__ == "__main__":
    main()
