"""Identities survive the trip to InfluxDB: a device id the codec accepts comes back from the
real server unchanged, so two devices never merge into one series (issue 12, item 9)."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud.config import CloudConfig, InfluxConfig
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.sinks.lineproto import line
from cloud.worker import CloudWorker
from devices.codecs import PayloadDecoder
from devices.readings import Interner
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from edge.engine import EngineConfig
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec
from fieldline.services import Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher
from tests.running import connected, settled

pytestmark = pytest.mark.integration

T = 1_767_225_600_000
ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))


def accepted(device: str) -> bool:
    dec = PayloadDecoder(Interner(), Interner())
    payload = orjson.dumps({"device": device, "metric": "temperature", "ts": T, "value": 1.0})
    cols, _bad, _ = dec.decode([("devices/x/readings", payload, T)])
    return len(cols) == 1


def test_an_id_ending_in_a_backslash_is_not_the_id_without_it() -> None:
    assert not (accepted("lp\\") and accepted("lp"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=8,
                unique=True))
@example(["lp\\", "lp", "a\\b", "a,b", "a=b", 'a"b', "tab\t", "é", "x\x00y", "a\rb", "'q'"])
def test_accepted_device_ids_round_trip_through_influxdb(influx_db: InfluxV1Client,
                                                         ids: list[str]) -> None:
    ok = [d for d in ids if accepted(d)]
    if not ok:
        return
    influx_db.request("POST", "/query", {"q": 'DROP SERIES FROM "rt"', "db": influx_db.database})
    body = "\n".join(x for i, d in enumerate(ok)
                     if (x := line("rt", {"device": d}, {"v": i}, T)) is not None)
    status, text = influx_db.request("POST", "/write", {"db": influx_db.database,
                                                       "precision": "ms"}, body.encode())
    assert status == 204, text
    doc = influx_db.query('SELECT "v" FROM "rt" GROUP BY "device"')
    assert isinstance(doc, dict)
    back = {int(s["values"][0][1]): s["tags"]["device"]
            for s in doc["results"][0].get("series", [])}
    assert back == dict(enumerate(ok))


# ---- a gateway's state copied to a second gateway (an SD card image) ------------------------

def _agent(gw_broker: Mosquitto, cloud: Mosquitto, state: Path) -> EdgeAgent:
    engine = EngineConfig(windows=(WindowSpec(size_ms=5_000),), time=EventTimeSpec(
        out_of_orderness_ms=1_000, allowed_lateness_ms=5_000, idle_timeout_ms=3_000))
    return EdgeAgent(EdgeConfig(
        gateway="gw-1", intake_broker=gw_broker.address, uplink_broker=cloud.address,
        topics=["+/devices/+/readings"], device_topic_level=2, engine=engine, state_dir=state,
        tick_ms=50, health_interval_ms=500, ledger_interval_ms=500))


async def _subscribed(agents: list[EdgeAgent]) -> None:
    deadline = time.monotonic() + 15
    while not all(a.intake.subscribed.is_set() for a in agents):
        assert time.monotonic() < deadline, "the agents did not subscribe"
        await asyncio.sleep(0.05)


def test_a_gateway_copied_with_its_state_loses_nothing(
        mosquitto_factory: Callable[..., Mosquitto], influx_db: InfluxV1Client,
        tmp_path: Path) -> None:
    """Gateway A runs, stops; its state directory is copied to gateway B (an SD card image made
    after the agent ran, its config left as it was: the same gateway id). Both start from the
    same batch numbers under the same incarnation. Before, the cloud took B's batches for
    re-sends of A's under the same numbers, acknowledged them, and B deleted them: B's readings
    never reached InfluxDB. Now the cloud writes a batch whose digest differs from the one it
    has under that number, and the agent that sees an ack of its incarnation about a batch it
    never sent numbers under a new incarnation. Every reading of both is in InfluxDB."""
    g1, g2, cloud = mosquitto_factory(), mosquitto_factory(), mosquitto_factory()
    start = time.time_ns() // 1_000_000 - 20 * 60_000
    worker = CloudWorker(CloudConfig(
        worker_id="w", broker=cloud.address,
        influx=InfluxConfig(url=influx_db.url, database=influx_db.database,
                            flush_interval_ms=100), health_interval_ms=500))

    async def scenario() -> tuple[int, list[EdgeAgent]]:
        stop_worker = asyncio.Event()
        wt = asyncio.create_task(worker.run(stop_worker))
        # A alone: 60 s of its 4 devices, everything written and acknowledged, then stopped
        first = _agent(g1, cloud, tmp_path / "a")
        restored = [first.pipeline.counters["windows_emitted"]]
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await connected([first], worker)
        sim1 = FleetSimulator(FleetSpec(gateways=1, devices_per_gateway=4, seed=5,
                                        disorder_fraction=0.0,
                                        topic_template="{gateway}/devices/{device}/readings"),
                              start, record=True)
        pub = FleetPublisher(sim1, {"gw-1": g1.address})
        await asyncio.to_thread(pub.run_fast, 60)
        pub.close()
        await settled([first], worker, 100, 0, restored)
        stop.set()
        await task
        before = worker.stats()["results_written"]
        shutil.copytree(tmp_path / "a", tmp_path / "b")  # the image
        # A again, and B from the copy, each with its own devices, at the same time
        agents = [_agent(g1, cloud, tmp_path / "a"), _agent(g2, cloud, tmp_path / "b")]
        assert agents[0].uplink.seq.incarnation == agents[1].uplink.seq.incarnation
        stop = asyncio.Event()
        restored = [a.pipeline.counters["windows_emitted"] for a in agents]
        tasks = [asyncio.create_task(a.run(stop)) for a in agents]
        # (one MQTT client id on the cloud broker: each connection takes over the other's, so
        # the two are seldom connected at once; each subscribed at its gateway broker is enough)
        await _subscribed(agents)
        sim2 = FleetSimulator(FleetSpec(gateways=2, devices_per_gateway=4, seed=6,
                                        disorder_fraction=0.0, gateway_prefix="site",
                                        topic_template="{gateway}/devices/{device}/readings"),
                              start + 70_000, record=True)
        pub = FleetPublisher(sim2, {"site-1": g1.address, "site-2": g2.address})
        await asyncio.to_thread(pub.run_fast, 120)
        pub.close()
        await settled(agents, worker, 100, before, restored)
        stop.set()
        await asyncio.gather(*tasks)
        stop_worker.set()
        await wt
        return Counter(p.device for p in sim1.published + sim2.published), agents

    published, agents = asyncio.run(scenario())
    doc = influx_db.query('SELECT sum("count") FROM "aggregates" GROUP BY "device"')
    got = {s["tags"]["device"]: s["values"][0][1] for s in doc["results"][0]["series"]}
    assert got == published, worker.stats()
    a, b = (x.uplink.seq.incarnation for x in agents)
    assert a != b  # one of them moved to an incarnation of its own
    assert sum(x.stats()["identity_conflicts"] for x in agents) >= 1


def test_two_agents_with_one_gateway_id_are_told_why_the_broker_keeps_closing_them(
        mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two agents with one gateway id share one MQTT client id on the cloud broker: each
    connection takes over the other's, and Mosquitto closes the older one without saying why
    (paho reports an unspecified error). After five connections in a row closed within seconds,
    the agent says what may be going on."""
    from devices.clock import SystemClock
    from edge.uplink import MqttUplink

    ups = [MqttUplink(mosquitto.address, "gw-1", clock=SystemClock(),
                      client_id="fieldline-edge-gw-1", state_dir=tmp_path / name)
           for name in ("a", "b")]
    with caplog.at_level("ERROR", logger="fieldline.edge.uplink"):
        for u in ups:
            u.start()
        try:
            deadline = time.monotonic() + 90
            while "takes over the other's" not in caplog.text:
                assert time.monotonic() < deadline, [u.short_sessions for u in ups]
                time.sleep(0.2)
        finally:
            for u in ups:
                u.stop()
    assert "'fieldline-edge-gw-1'" in caplog.text


def test_a_lost_connection_is_one_disconnect_however_often_paho_reports_it(
        mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """paho calls on_disconnect twice for one keepalive timeout (eclipse-paho/paho.mqtt.python
    #870), and once more for each attempt that gets no CONNACK from a broker still hung: the
    agent logged each as a lost connection and counted each towards the "closed within
    seconds, N times in a row" warning above (as if another agent took its client id)."""
    from devices.clock import SystemClock
    from edge.uplink import MqttUplink

    up = MqttUplink(mosquitto.address, "gw-1", clock=SystemClock(), client_id="gw-1-hung",
                    state_dir=tmp_path / "a", keepalive_s=1)
    with caplog.at_level("DEBUG", logger="fieldline.edge.uplink"):
        up.start()
        try:
            assert up.connected.wait(10)
            mosquitto.pause()
            try:
                deadline = time.monotonic() + 15
                while up.connected.is_set():
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
                # a few keepalives more while it tries to connect to a broker that is hung
                time.sleep(6)
            finally:
                mosquitto.resume()
            assert up.connected.wait(60)
        finally:
            up.stop()
    lost = [r for r in caplog.records if "uplink disconnected" in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    assert up.short_sessions <= 1
    assert any("(not connected)" in r.getMessage() for r in caplog.records)  # the repeat
