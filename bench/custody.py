"""The chain of custody, measured:

* replay after a 10-minute outage: a fleet's ten minutes of results pile up in the agent's outbox
  while the uplink is partitioned (fault proxy); after the heal, the rate at which the backlog
  reaches InfluxDB (acknowledged by the cloud) as a multiple of the live rate (target >= 20x);
* the cost of durability: agent throughput with the custody chain on (intake log fsynced before
  PUBACK, outbox fsynced) vs off (auto-ack, no intake log, outbox not fsynced), same broker
  backlog, same run (target >= 0.7x).

Real Mosquitto and InfluxDB 1.6; agent and worker in this process.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import Figure, await_until, figure, report
from bench.pipeline import device_messages, publish_backlog, register_session, time_until
from cloud.config import CloudConfig, InfluxConfig
from cloud.worker import CloudWorker
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from edge.engine import EngineConfig
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec
from fieldline.faults import FaultProxy
from fieldline.services import InfluxDB, Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher

DEVICES = 2_000
OUTAGE_S = 600
WINDOW_MS = 10_000


def replay_after_outage(work: Path) -> list[Figure]:
    # ten minutes of the fleet (1.2 million messages) published faster than the agent takes
    # them: the broker must hold them all (the test brokers' default cap of a million would
    # drop some, as the gateway's would, counted: that is tests/test_faults.py's R10)
    gw = Mosquitto(work / "gw", max_queued=0).start()
    cloud = Mosquitto(work / "cloud").start()
    ix = InfluxDB(work / "influx").start()
    proxy = FaultProxy("127.0.0.1", cloud.port).start()
    try:
        engine = EngineConfig(windows=(WindowSpec(size_ms=WINDOW_MS),), time=EventTimeSpec(
            out_of_orderness_ms=2_000, allowed_lateness_ms=30_000, idle_timeout_ms=5_000))
        agent = EdgeAgent(EdgeConfig(
            gateway="gw-1", intake_broker=gw.address,
            uplink_broker=proxy_address(proxy), topics=["gw-1/devices/+/readings"],
            device_topic_level=2, engine=engine, state_dir=work / "edge", tick_ms=100))
        worker = CloudWorker(CloudConfig(
            worker_id="bench", broker=cloud.address, state_dir=work / "cloud",
            influx=InfluxConfig(url=ix.url, database="replay", flush_interval_ms=100)))

        async def run() -> tuple[int, float, float]:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(agent.run(stop)), asyncio.create_task(worker.run(stop))]
            await await_until(lambda: agent.intake.subscribed.is_set()
                              and agent.uplink.connected.is_set(), 30, "the agent to connect",
                              agent.stats)
            proxy.set_mode("blackhole")  # the outage starts
            spec = FleetSpec(gateways=1, devices_per_gateway=DEVICES, disorder_fraction=0.0,
                             topic_template="{gateway}/devices/{device}/readings")
            sim = FleetSimulator(spec, time.time_ns() // 1_000_000 - OUTAGE_S * 1000 - 60_000)
            pub = FleetPublisher(sim, {"gw-1": gw.address})
            await asyncio.to_thread(pub.run_fast, OUTAGE_S)  # ten minutes of the fleet
            pub.close()
            await await_until(
                lambda: agent.pipeline.counters["messages_in"] >= pub.published, 300,
                f"the agent to take the {pub.published:,} messages published",
                lambda: {"messages_in": agent.pipeline.counters["messages_in"],
                         "intake_pending": agent.intake.pending,
                         "broker_acked": pub.counters["acked"]})
            await asyncio.sleep(6)  # idle timeout: the last windows close into the outbox
            backlog = agent.stats()["windows_pending"]
            written0 = worker.stats()["results_written"]
            proxy.set_mode("pass")  # healed
            t0 = time.perf_counter()
            await await_until(
                lambda: worker.stats()["results_written"] >= written0 + backlog
                and not agent.outbox.depth, 600, f"{backlog:,} backlogged windows in InfluxDB",
                lambda: {"written": worker.stats()["results_written"] - written0,
                         "outbox_depth": agent.outbox.depth}, poll_s=0.02)
            drain = time.perf_counter() - t0
            stop.set()
            await asyncio.gather(*tasks)
            return int(backlog), drain, backlog / OUTAGE_S

        backlog, drain, live_rate = asyncio.run(run())
        return [figure("replay after a 10-minute outage: results/s into InfluxDB (acknowledged)",
                       backlog / drain, "results/s", live_rate, "live rate of the same fleet",
                       note=f"{backlog:,} windows of {DEVICES:,} devices drained in "
                            f"{drain:.1f} s (including reconnect)")]
    finally:
        proxy.stop()
        gw.stop()
        cloud.stop()
        ix.stop()


def proxy_address(proxy: FaultProxy):  # type: ignore[no-untyped-def]
    from devices.mqtt import BrokerAddress

    return BrokerAddress(host="127.0.0.1", port=proxy.port)


def durability_cost(work: Path, n: int = 150_000) -> list[Figure]:
    gw = Mosquitto(work / "gw2").start()
    cloud = Mosquitto(work / "cloud2").start()
    try:
        start = time.time_ns() // 1_000_000 - 3_600_000
        msgs = device_messages(n, start)
        rates: dict[str, float] = {}
        for round_no, durable in enumerate((False, True, False, True)):  # alternate, best of 2
            name = "on" if durable else "off"
            cid = f"fieldline-edge-gw-{name}{round_no}-intake"
            register_session(gw, cid, "devices/+/readings")
            publish_backlog(gw, msgs)
            agent = EdgeAgent(EdgeConfig(
                gateway=f"gw-{name}{round_no}", intake_broker=gw.address,
                uplink_broker=cloud.address, state_dir=work / f"state-{name}{round_no}",
                tick_ms=50, durable=durable,
                outbox_fsync=durable, max_pending=50_000))
            seconds = time_until(agent.run, lambda a=agent: a.pipeline.counters[
                "readings_accepted"] + a.pipeline.rejects.total + a.pipeline.counters[
                "duplicates"] >= n)
            rates[name] = max(rates.get(name, 0.0), n / seconds)
        return [figure("edge agent readings/s with the custody chain on (intake log fsynced "
                       "before PUBACK, outbox fsynced)", rates["on"], "readings/s", rates["off"],
                       "custody chain off (auto-ack, no intake log, outbox not fsynced)",
                       note=f"{n:,} JSON readings, same broker backlog, best of 2 alternating "
                            "runs each")]
    finally:
        gw.stop()
        cloud.stop()


def main() -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        work = Path(d)
        figs = replay_after_outage(work) + durability_cost(work)
    report("custody", figs)
    return figs


if __name__ == "__main__":
    main()
