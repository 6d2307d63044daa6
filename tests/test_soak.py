"""The long tier of the fault catalogue (`make soak`): the same checks as test_faults.py, over
minutes instead of seconds, many more kills, and a partition long enough to watch memory."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.oracle import check, expected_windows, export_windows
from fieldline.services import InfluxDB, Mosquitto, NatsServer
from simulators.faults import FaultSpec
from tests.rig import LABEL, WINDOW_MS, Rig, shipped_gateway
from tests.test_faults import check_laws, fill, finish, overload, wait_for
from tests.test_jetstream import GATEWAYS, JsRig, settled

pytestmark = [pytest.mark.integration, pytest.mark.soak]


@pytest.fixture
def rig(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> Rig:
    r = Rig(tmp_path, mosquitto_factory, influx_db, devices=30)
    yield r
    r.stop()


def test_soak_r1_worker_killed_every_six_seconds(rig: Rig) -> None:
    rig.start_chain(fleet_s=120)
    for _ in range(18):
        time.sleep(6)
        rig.kill_worker()
        rig.start_worker()
    rig.wait_fleet(300)
    finish(rig)


def test_soak_r2_long_partition_keeps_memory_flat(rig: Rig) -> None:
    rig.start_chain(fleet_s=100)
    time.sleep(10)
    assert rig.agent is not None
    agent = psutil.Process(rig.agent.pid)
    rig.proxy.set_mode("blackhole")
    rss = []
    for _ in range(12):  # a 60 s partition
        time.sleep(5)
        rss.append(agent.memory_info().rss / 2**20)
    rig.proxy.set_mode("pass")
    rig.wait_fleet(300)
    finish(rig)
    assert max(rss) - rss[0] < 20, rss  # the backlog waits on disk, not in memory


def kill_agent_tearing_its_logs(rig: Rig, rng: random.Random) -> None:
    """SIGKILL the agent; half the time a random torn tail after its outbox's and intake log's
    last record (what a power cut mid-write leaves); start it again."""
    rig.kill_agent()
    state = rig.tmp / "edge-state"
    for d, pattern in (("outbox", "*.seg"), ("intake", "*.wal")):
        segs = sorted((state / d).glob(pattern))
        if segs and rng.random() < 0.5:
            with segs[-1].open("ab") as fh:
                fh.write(rng.randbytes(rng.randint(1, 40)))
    rig.start_agent()


def test_soak_r4_agent_killed_twenty_times(rig: Rig) -> None:
    rng = random.Random(9)
    rig.start_chain(fleet_s=100)
    for _ in range(20):
        time.sleep(rng.uniform(1.0, 6.0))
        kill_agent_tearing_its_logs(rig, rng)
    rig.wait_fleet(300)
    finish(rig)


def test_soak_r10_five_times_overload_for_a_minute(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """Issue 12, item 7 at length: a minute at 5x what the agent takes; every reading a device
    got a PUBACK for is in a window or counted as a gap, equal to the broker's drop count."""
    overload(tmp_path, mosquitto_factory, influx_db, seconds=60)


SEED = int(os.environ.get("FIELDLINE_CHAOS_SEED", "21"))


def crash_broker(broker: Mosquitto, rng: random.Random) -> None:
    """SIGKILL a broker and start it again on its port 0.2-1.5 s later."""
    broker.kill()
    time.sleep(rng.uniform(0.2, 1.5))
    broker.restart()


def crash_influx(influx: InfluxDB, rng: random.Random) -> None:
    """SIGKILL InfluxDB (paused or not; its WAL is all it keeps of what it acknowledged) and
    start it again on its port 0.2-3 s later."""
    influx.resume()
    influx.kill()
    time.sleep(rng.uniform(0.2, 3.0))
    influx.start()


def mixed_faults(rig: Rig, influx: InfluxDB, rng: random.Random, seconds: float) -> list[str]:
    """For ``seconds``, every one to four seconds, one fault starts while the others may still
    be on; then everything heals. Returns the faults in their order."""
    assert rig.influx_proxy is not None
    done: list[str] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 4.0))
        fault = rng.choice(["worker", "agent", "uplink", "cloud_broker", "gateway_broker",
                            "influx", "influx_kill", "influx_pause", "heal"])
        done.append(fault)
        if fault == "worker":
            rig.kill_worker()
            time.sleep(rng.uniform(0.0, 2.0))
            rig.start_worker()
        elif fault == "agent":
            kill_agent_tearing_its_logs(rig, rng)
        elif fault == "uplink":
            rig.proxy.set_mode(rng.choice(["blackhole", "reset"]))
        elif fault == "cloud_broker":
            crash_broker(rig.cloud_broker, rng)
        elif fault == "gateway_broker":  # restarted cleanly (an upgrade): it saves its store
            rig.gw_broker.stop()
            time.sleep(rng.uniform(0.2, 1.5))
            rig.gw_broker.restart()
        elif fault == "influx":
            rig.influx_proxy.set_mode(rng.choice(["http_503", "hang"]))
        elif fault == "influx_kill":
            crash_influx(influx, rng)
        elif fault == "influx_pause":
            influx.pause()
        else:
            heal(rig, influx)
    heal(rig, influx)
    return done


def heal(rig: Rig, influx: InfluxDB) -> None:
    assert rig.influx_proxy is not None
    rig.proxy.set_mode("pass")
    rig.influx_proxy.set_mode("pass")
    influx.resume()


@pytest.mark.parametrize("config", ["rig", "shipped", "device_faults"])
def test_soak_faults_mixed_and_overlapping(
        config: str, tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """Nobody announces faults one at a time: for ninety seconds the worker or the agent is
    SIGKILLed, the agent's logs torn, the uplink blackholed or reset, the cloud broker
    SIGKILLed, the gateway broker restarted, InfluxDB SIGKILLed, paused, answering 503 or
    hanging, overlapping, in an order drawn from a seed (FIELDLINE_CHAOS_SEED picks another).
    Then everything heals and every reading is in InfluxDB exactly once, the oracle clean and
    the ledger balanced.
    ``shipped``: the agent runs deploy/gateway.toml as shipped (10 s and 1 min windows, 30 s
    of lateness and idle timeout, its tick, acknowledgement timeout and checkpoints), only its
    brokers and state directory pointed here; both window specs are checked.
    ``device_faults``: the devices misbehave meanwhile too (readings out of order, held back
    seconds within the lateness, published twice, malformed), so the agent's duplicate filter,
    revisions and rejections are restored from checkpoints and logs torn at random: each good
    reading once, each copy and each malformed message counted as what it is."""
    influx = InfluxDB(tmp_path / "influx").start()
    client = InfluxV1Client(influx.url, "mixed")
    client.create_database()
    rig = Rig(tmp_path, mosquitto_factory, client, devices=20, broker_persistence=True,
              influx_proxy=True)
    specs = [(WINDOW_MS, LABEL)]
    if config == "shipped":
        specs = [(10_000, "10s"), (60_000, "1m")]
        rig.spec = replace(rig.spec, topic_template="devices/{device}/readings")
        shipped_gateway(tmp_path, rig.gw_broker.url, f"mqtt://127.0.0.1:{rig.proxy.port}",
                        out=rig.gateway_cfg)
    if config == "device_faults":
        rig.spec = replace(rig.spec, disorder_fraction=0.05, straggler_fraction=0.01,
                           straggler_delay_ms=5_000, malformed_fraction=0.005,
                           faults=(FaultSpec(type="duplicate", rate=0.02),))
    try:
        rig.start_chain(fleet_s=100)
        done = mixed_faults(rig, influx, random.Random(SEED), 90)
        print(f"seed {SEED}: {' '.join(done)}")
        rig.wait_fleet(300)
        assert rig.sim is not None
        hit = {(str(t["type"]), str(t["device"]), int(t["seq"]))  # type: ignore[call-overload]
               for t in rig.sim.truth}
        bad = {(d, q) for kind, d, q in hit if kind == "malformed"}
        copies = {(d, q) for kind, d, q in hit if kind == "duplicate"}
        good = [p for p in rig.published if (p.device, p.seq) not in bad]
        n = len(good)
        # every reading once in each spec's windows (the 1 min windows close 30 s after)
        got = rig.wait_settled(len(specs) * n, timeout_s=300, quiet_s=45)
        for size_ms, label in specs:
            report = check(expected_windows(good, size_ms),
                           export_windows(rig.influx, label))
            assert report.clean, f"seed {SEED}, {label}, faults {done}: {report}"
        assert got == len(specs) * n, (SEED, done, got, n)
        led = rig.ledger_when(lambda d: d.get("windows_pending", 1) == 0, 60)
        check_laws(led)
        assert led["readings_accepted"] == n, (SEED, done, led)
        # a device's copies, and what the devices' own MQTT clients sent again after the
        # gateway broker's restarts (QoS 1: at least once), each counted as a duplicate
        assert rig.pub is not None
        resent = rig.pub.counters["resent"]
        assert len(copies - bad) <= led["duplicates"] <= len(copies - bad) + resent, (
            SEED, done, led, resent)
        malformed = len(bad) + len(bad & copies)
        assert malformed <= led["rejected"] <= malformed + resent, (SEED, done, led, resent)
        assert led["late_dropped"] == 0, (SEED, done, led)
    finally:
        rig.stop()
        influx.stop()


def jetstream_mixed_faults(rig: JsRig, influx: InfluxDB, rng: random.Random, seconds: float,
                           members: dict[str, str | None]) -> list[str]:
    """For ``seconds``, every one to four seconds, one fault on the scale-out path while others
    may still be on: a worker SIGKILLed (restarted after up to 2 s) or paused past its pin
    timeout, a NATS node SIGKILLed, hung or its disk filled (up to two at once: the cluster
    then has no quorum), the bridge, an agent, the cloud broker or InfluxDB SIGKILLed,
    InfluxDB answering 503 or hanging. Then everything heals."""
    done: list[str] = []
    paused: set[str] = set()
    full: dict[str, Path] = {}  # nodes whose disk we filled: JetStream off there till restart
    end = time.monotonic() + seconds

    def up() -> list[NatsServer]:
        return [n for n in rig.cluster.nodes
                if n.running and n.name not in paused and n.name not in full]

    while time.monotonic() < end:
        time.sleep(rng.uniform(1.0, 4.0))
        fault = rng.choice(["worker", "pause", "nats", "nats", "nats_pause", "nats_disk",
                            "bridge", "agent", "cloud_broker", "influx", "influx_kill", "heal"])
        if fault == "worker":
            name = rng.choice(sorted(members))
            done.append(f"kill:{name}")
            rig.signal(name, signal.SIGCONT)
            rig.signal(name, signal.SIGKILL)
            paused.discard(name)
            time.sleep(rng.uniform(0.0, 2.0))
            rig.start_worker(name, members[name])
        elif fault == "pause":
            name = rng.choice(sorted(members))
            done.append(f"pause:{name}")
            rig.signal(name, signal.SIGSTOP)
            paused.add(name)
        elif fault == "nats":
            if len(up()) > 1:
                node = rng.choice(up())
                done.append(f"kill:{node.name}")
                node.kill()
        elif fault == "nats_pause":  # hung: its connections stay open, nothing answers
            if len(up()) > 1:
                node = rng.choice(up())
                done.append(f"pause:{node.name}")
                node.pause()
                paused.add(node.name)
        elif fault == "nats_disk":  # its disk full: it disables JetStream until restarted
            if len(up()) > 1:
                node = rng.choice(up())
                done.append(f"disk_full:{node.name}")
                full[node.name] = fill(node.store_dir)
        elif fault == "bridge":
            done.append("kill:bridge")
            rig.signal("bridge", signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 2.0))
            rig.start_bridge()
        elif fault == "agent":
            gw = rng.choice(GATEWAYS)
            done.append(f"kill:{gw}")
            rig.signal(gw, signal.SIGKILL)
            rig.start_agent(gw)
        elif fault == "cloud_broker":
            done.append("kill:cloud_broker")
            crash_broker(rig.cloud_broker, rng)
        elif fault == "influx":
            assert rig.influx_proxy is not None
            mode = rng.choice(["http_503", "hang"])
            done.append(f"influx:{mode}")
            rig.influx_proxy.set_mode(mode)
        elif fault == "influx_kill":
            done.append("kill:influx")
            crash_influx(influx, rng)
        else:
            done.append("heal")
            heal_jetstream(rig, paused, full)
    heal_jetstream(rig, paused, full)
    return done


def heal_jetstream(rig: JsRig, paused: set[str], full: dict[str, Path]) -> None:
    """Everything as it was; a node whose disk filled gets its space back and is restarted
    (the operator's part: nats-server keeps JetStream off until then)."""
    if rig.influx_proxy is not None:
        rig.influx_proxy.set_mode("pass")
    for node in rig.cluster.nodes:
        if node.name in full:
            full.pop(node.name).unlink()
            node.restart()
        elif not node.running:
            node.restart()
        elif node.name in paused:
            node.resume()
    for name in paused & set(rig.procs):
        rig.signal(name, signal.SIGCONT)
    paused.clear()


@pytest.mark.timeout(900)
def test_soak_jetstream_faults_mixed_and_overlapping(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """The scale-out path under faults nobody announces: three workers (two members and a
    standby) on a 3-node NATS cluster, for eighty seconds workers SIGKILLed or paused past their
    pin timeout, NATS nodes SIGKILLed, hung or their disk filled (at times two: no quorum),
    the bridge, an agent,
    the cloud broker or InfluxDB SIGKILLed, InfluxDB answering 503 or hanging, overlapping, in
    an order drawn from FIELDLINE_CHAOS_SEED. Then all
    heals: the oracle is clean, both ledger laws hold per gateway, and the anomalies in InfluxDB
    are those of one uninterrupted pass over the stream (detector state moved, never relearned
    or learned twice)."""
    influx = InfluxDB(tmp_path / "influx").start()
    client = InfluxV1Client(influx.url, "mixed")
    client.create_database()
    rig = JsRig(tmp_path, mosquitto_factory, client, influx_proxy=True, nats_disk="64m")
    members: dict[str, str | None] = {"A": "0/2", "B": "1/2", "C": None}
    try:
        for name, member in members.items():
            rig.start_worker(name, member)
        rig.start_bridge()
        rig.start_agents()
        time.sleep(2)
        rig.run_fleet(100)
        time.sleep(5)
        done = jetstream_mixed_faults(rig, influx, random.Random(SEED), 80, members)
        print(f"seed {SEED}: {' '.join(done)}")
        rig.wait_fleet(300)
        n = len(rig.published)
        got = settled(rig, n, 300)
        report = rig.oracle()
        assert report.clean, f"seed {SEED}, faults {done}: {report}"
        assert got == n, (SEED, done, got, n)
        for gw, led in rig.ledgers().items():
            assert led["readings_received"] == (led["readings_accepted"] + led["rejected"]
                                                + led["late_dropped"] + led["duplicates"]), \
                (SEED, done, gw, led)
        ours = rig.influx_anomalies()
        ref = rig.reference_anomalies()
        assert ref, "the fleet's spikes should have raised anomalies"
        assert ours == ref, (SEED, done, set(ours) ^ set(ref))
        named, live = rig.snapshots()
        print(f"snapshots: {len(named)} named, {len(live)} in the store")
        # none lost, none left behind by the workers killed mid-save (7 left with seed 21
        # before the claim's sweep)
        assert live == named, (SEED, done, live - named, named - live)
    finally:
        rig.stop()
        influx.stop()


@pytest.mark.timeout(420)
def test_soak_devices_on_local_time_are_found_wrong_by_the_cloud(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A site's devices all stamp local time as if it were UTC (three hours ahead) while the
    gateway's clock is right. They agree the gateway clock is behind, and it holds their
    messages; the cloud worker, which tells each gateway its clock once a minute from the
    time its health reports take (batches or none), finds it right: the doubt ends, and what
    was held is refused as clock_future, as before the devices could doubt the clock, every
    reading counted. (Health stamped with the devices' time made the cloud find the clock as
    far off as they did, and the doubt lasted for good: the soak that found it.)"""
    rig = Rig(tmp_path, mosquitto_factory, influx_db)
    rig.spec = replace(rig.spec, faults=(FaultSpec(type="clock_jump", at_ms=0,
                                                   offset_ms=3 * 3_600_000),))
    status = tmp_path / "edge-state" / "status.json"

    def agent() -> dict[str, Any]:
        return dict(orjson.loads(status.read_bytes())) if status.exists() else {}

    try:
        rig.start_chain(fleet_s=180)
        wait_for(lambda: agent().get("gauges", {}).get("clock_unsynced") == 1, 30)
        assert "3.0 h behind its devices' clocks" in str(agent().get("clock_unsynced"))
        wait_for(lambda: agent().get("cloud_clock") is not None
                      and agent()["gauges"].get("clock_unsynced") == 0, 240)
        assert abs(agent()["cloud_clock"]["offset_ms"]) < 60_000
        rig.wait_fleet()
        led = rig.ledger_when(lambda d: d.get("readings_received", 0) == len(rig.published), 60)
        check_laws(led)
        assert led["readings_accepted"] == 0
        assert led["rejected"] == len(rig.published)
        h = rig.health("edge")
        assert h["messages_quarantined"] == h["quarantine_released"] > 0, h
        assert h["clock_unsynced"] == 0, h
        assert "clock    0.0 s behind the cloud's" in rig.edge_status()[1]
    finally:
        rig.stop()
