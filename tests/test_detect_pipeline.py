"""Recorded data with the shipped configuration: the in-process bench path
(``fieldline.evaluate``) and the real pipeline (Mosquitto, edge agent, cloud worker, InfluxDB)
open the same incidents; and the replay speed changes nothing, because windows and detections
live in the data's own time."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cloud.config import InfluxConfig, load_cloud_config
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.worker import CloudWorker
from edge.agent import EdgeAgent
from edge.config import EdgeConfig, load_edge_config
from fieldline.evaluate import bench_edge_config, run_recordings, topic_template
from fieldline.services import Mosquitto
from simulators.publisher import FleetPublisher
from simulators.replay import Recording, ReplaySimulator, load_nab, load_skab, shift_to
from tests.running import connected, settled
from tests.test_end_to_end import influx_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("FIELDLINE_DATA", ROOT.parent / "shared" / "data"))
NAB = ["realKnownCause/ec2_request_latency_system_failure.csv",
       "realAWSCloudwatch/ec2_cpu_utilization_825cc2.csv"]
SKAB = ["valve1/1.csv"]
needs_data = pytest.mark.skipif(not (DATA / "nab").is_dir() or not (DATA / "skab").is_dir(),
                                reason=f"the recorded data sets are not at {DATA} "
                                       "(set FIELDLINE_DATA)")


def recordings() -> list[Recording]:
    return ([load_nab(DATA / "nab", f) for f in NAB]
            + [load_skab(DATA / "skab", f) for f in SKAB])


def shipped_edge(**kw: object) -> EdgeConfig:
    edge = load_edge_config(ROOT / "deploy" / "gateway.toml")
    # devices fall silent at the end of a recording: close their windows soon after
    engine = replace(edge.engine, time=replace(edge.engine.time, idle_timeout_ms=2_000))
    return replace(edge, engine=engine, **kw)  # type: ignore[arg-type]


def opened(outs: list) -> set[tuple[str, str, int]]:  # type: ignore[type-arg]
    return {(o.device, subject, e.incident) for o in outs for subject, e in o.alerts
            if e.state == "open"}


@needs_data
def test_replay_speed_does_not_change_the_result() -> None:
    edge = bench_edge_config(shipped_edge())
    cloud = load_cloud_config(ROOT / "deploy" / "cloud.toml")
    ref = 1_767_225_600_000
    nab = [load_nab(DATA / "nab", NAB[0])]
    skab = [load_skab(DATA / "skab", SKAB[0])]
    fast = run_recordings(nab + skab, edge, cloud, ref_ms=ref, speed=None)
    nab_600 = run_recordings(nab, edge, cloud, ref_ms=ref, speed=600.0)  # 5 min a 0.5 s
    skab_1 = run_recordings(skab, edge, cloud, ref_ms=ref, speed=1.0)  # real time
    for a, b in zip(fast, nab_600 + skab_1, strict=True):
        assert a.device == b.device
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.score > 0, b.score > 0)
        # readings folded in other micro-batches sum in another order: the last bits differ
        np.testing.assert_allclose(a.score, b.score, rtol=1e-9)
        np.testing.assert_allclose(a.severity, b.severity, rtol=1e-9)
    assert opened(fast), "these recordings must raise alerts for the test to mean anything"
    assert opened(fast) == opened(nab_600 + skab_1)


@needs_data
@pytest.mark.integration
def test_real_pipeline_opens_the_same_incidents_as_the_bench_path(
        mosquitto: Mosquitto, influx_db: InfluxV1Client, tmp_path: Path) -> None:
    recs = recordings()
    now = time.time_ns() // 1_000_000
    ref = now - now % 60_000
    edge = shipped_edge(intake_broker=mosquitto.address, uplink_broker=mosquitto.address,
                        registry_path=None, state_dir=tmp_path / "edge", tick_ms=50,
                        gateway="replay-gw")
    cloud = replace(load_cloud_config(ROOT / "deploy" / "cloud.toml"),
                    broker=mosquitto.address, registry_path=None,
                    state_dir=tmp_path / "cloud", worker_id="t",
                    influx=InfluxConfig(url=f"http://{influx_db.url.split('//')[1]}",
                                        database=influx_db.database, flush_interval_ms=200))
    bench = run_recordings(recs, bench_edge_config(edge), cloud, ref_ms=ref)
    expected = opened(bench)
    assert expected, "these recordings must raise alerts for the test to mean anything"

    moved = [r.moved(shift_to([r], ref)) for r in recs]

    async def run() -> tuple[EdgeAgent, CloudWorker]:
        agent = EdgeAgent(edge)
        worker = CloudWorker(cloud)
        stop_a, stop_w = asyncio.Event(), asyncio.Event()
        wt = asyncio.create_task(worker.run(stop_w))
        at = asyncio.create_task(agent.run(stop_a))
        await connected([agent], worker)
        sim = ReplaySimulator(moved, now, speed=None, gateway=edge.gateway,
                              topic_template=topic_template(edge), chunk=2_000)
        pub = FleetPublisher(sim, {edge.gateway: mosquitto.address})
        await asyncio.to_thread(pub.run_fast, sim.remaining_ticks())
        pub.close()
        await settled([agent], worker, 120)
        stop_a.set()
        await at
        stop_w.set()
        await wt
        return agent, worker

    asyncio.run(run())
    alerts = influx_rows(influx_db, "SELECT \"state\", \"name\" FROM \"alerts\" "
                                    "WHERE \"source\" = 'detector' GROUP BY \"device\", \"metric\"")
    got = {(str(a["device"]), str(a["metric"]), int(a["time"])) for a in alerts}
    assert got == expected
