"""The edge agent's shell: resilience of its loop and resuming open windows after a restart."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from devices import rejects
from devices.catalog import Catalog
from devices.clock import ManualClock, SystemClock
from devices.codecs import encode_single
from devices.mqtt import BrokerAddress
from devices.registry import Device, Registry
from edge.agent import EdgeAgent, EdgePipeline
from edge.config import EdgeConfig
from edge.engine import EngineConfig
from edge.eventtime import EventTimeSpec
from edge.intake import MqttIntake
from edge.windows import WindowSpec
from fieldline.services import Mosquitto

T = 1_700_000_000_000
NOWHERE = BrokerAddress(host="127.0.0.1", port=1)


def config(tmp: Path, **kw: object) -> EdgeConfig:
    base: dict[str, object] = {
        "gateway": "gw-1", "intake_broker": NOWHERE, "uplink_broker": NOWHERE,
        "engine": EngineConfig(windows=(WindowSpec(size_ms=10_000),), time=EventTimeSpec(
            out_of_orderness_ms=0, allowed_lateness_ms=0, idle_timeout_ms=10**9)),
        "state_dir": tmp, "max_past_ms": 10**12}
    base.update(kw)
    return EdgeConfig(**base)  # type: ignore[arg-type]


def msgs(device: str, seconds: range) -> list[tuple[str, bytes, int]]:
    return [(f"devices/{device}/readings",
             encode_single(device, "temperature", T + s * 1000, 20.0 + s, s), T) for s in seconds]


async def running(agent: EdgeAgent, broker: Mosquitto
                  ) -> tuple[asyncio.Event, asyncio.Task[None], mqtt.Client]:
    """The agent running (its stop event and task) once it is subscribed, and a device's
    client connected to its broker."""
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    deadline = time.monotonic() + 10
    while not agent.intake.subscribed.is_set():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    return stop, task, c


async def stopped(stop: asyncio.Event, task: asyncio.Task[None], c: mqtt.Client) -> None:
    """The device's client gone, the agent stopped (what ``running`` started)."""
    c.disconnect()
    c.loop_stop()
    stop.set()
    await task


def results_by_window(batches: list[object]) -> dict[int, tuple[int, float]]:
    out = {}
    for res in batches:
        for i in range(len(res)):  # type: ignore[arg-type]
            out[int(res.start[i])] = (int(res.count[i]), float(res.mean[i]))  # type: ignore[attr-defined]
    return out



@pytest.mark.parametrize("policy", ["trust", "receive_time"])
def test_a_device_that_reboots_every_20_readings_loses_none(tmp_path: Path,
                                                            policy: str) -> None:
    """A device on a weak supply resets every 20 s, and its counter with it: each boot sends
    seq 0..19 again, with new times. Before, every boot after the first was taken for a replay
    of the one before (the same seqs, well within the dedup memory): all its readings counted
    as duplicates. Where device clocks are trusted, a seq that comes with a time newer than all
    the device sent is a new reading; a broker re-delivering a reading (its own time) is still
    a duplicate. Under receive_time the times are the gateway's, so that cannot be told: the
    old rule holds there, so that no re-delivery is counted twice."""
    clock = ManualClock(now_ms=T + 60_000)
    eng = EngineConfig(windows=(WindowSpec(size_ms=10_000),), time=EventTimeSpec(
        out_of_orderness_ms=0, allowed_lateness_ms=0, idle_timeout_ms=10**9),
        clock_policy=policy)
    p = EdgePipeline(config(tmp_path, engine=eng), clock)
    boots = 3
    for b in range(boots):
        p.process([("devices/d1/readings",
                    encode_single("d1", "temperature", T + (b * 20 + s) * 1000, 20.0, s), T)
                   for s in range(20)])
    redelivered = [("devices/d1/readings",
                    encode_single("d1", "temperature", T + (40 + s) * 1000, 20.0, s), T)
                   for s in range(15, 20)]  # the last boot's last five, again
    p.process(redelivered)
    if policy == "trust":
        assert p.counters["readings_accepted"] == boots * 20
        assert p.counters["duplicates"] == 5
        windows = results_by_window([p.emit(flush=True)])
        assert sum(c for c, _ in windows.values()) == boots * 20
    else:  # receive_time: a re-delivery is never let through as new (boots are not told)
        assert p.counters["duplicates"] >= 5


def test_restart_from_checkpoint_continues_open_windows(tmp_path: Path) -> None:
    clock = ManualClock(now_ms=T + 60_000)
    straight = EdgePipeline(config(tmp_path / "a"), clock)
    straight.process(msgs("d1", range(0, 35)))
    expected = results_by_window([straight.emit(), straight.emit(flush=True)])

    first = EdgePipeline(config(tmp_path / "b"), clock)
    first.process(msgs("d1", range(0, 15)))  # window [10 s, 20 s) is half full at the "crash"
    out = [first.emit()]
    first.save_checkpoint(tmp_path / "b")
    second = EdgePipeline(config(tmp_path / "b"), clock)
    assert second.load_checkpoint(tmp_path / "b") == 0
    second.process(msgs("d1", range(15, 35)))
    out += [second.emit(), second.emit(flush=True)]
    got = results_by_window(out)
    assert got == expected
    assert got[T + 10_000][0] == 10  # the window spanning the restart is whole, not partial


def test_a_restart_with_an_edited_window_config_resumes_instead_of_failing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """gateway.toml edited between two runs (a longer allowed_lateness: another ring size per
    series; a spec added, one removed): the agent starts, the window spanning the restart is
    whole, and the removed spec's open windows are named in the log."""
    clock = ManualClock(now_ms=T + 60_000)

    def cfg(lateness_ms: int, *specs: str) -> EdgeConfig:
        return config(tmp_path, engine=EngineConfig(
            windows=tuple(WindowSpec.parse(x) for x in specs), time=EventTimeSpec(
                out_of_orderness_ms=0, allowed_lateness_ms=lateness_ms, idle_timeout_ms=10**9)))

    first = EdgePipeline(cfg(0, "10s", "count:7"), clock)
    first.process(msgs("d1", range(0, 15)))
    out = [first.emit()]
    first.save_checkpoint(tmp_path)
    second = EdgePipeline(cfg(120_000, "10s", "1m"), clock)
    with caplog.at_level("WARNING"):
        assert second.load_checkpoint(tmp_path) == 0
    assert "'count:7' is no longer configured" in caplog.text
    second.process(msgs("d1", range(15, 35)))
    out += [second.emit(), second.emit(flush=True)]
    tens = [r.take(np.flatnonzero(r.spec == 0)) for r in out]  # type: ignore[attr-defined]
    got = results_by_window(tens)
    assert got[T + 10_000][0] == 10  # the window spanning the restart is whole
    assert got[T + 20_000][0] == 10


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "empty"])
def test_an_unreadable_checkpoint_is_kept_aside_and_the_agent_starts(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """A Pi's SD card returns a damaged windows.npz: the agent still starts (a unit that
    fails at every start would leave the gateway down until someone logs in), says so, counts
    it in health and keeps the file for a post-mortem."""
    clock = ManualClock(now_ms=T + 60_000)
    first = EdgePipeline(config(tmp_path), clock)
    first.process(msgs("d1", range(0, 15)))
    path = first.save_checkpoint(tmp_path)
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "zeroed": bytes(len(data)),
               "empty": b""}[damage]
    path.write_bytes(damaged)
    with caplog.at_level("ERROR"):
        agent = EdgeAgent(config(tmp_path), clock=clock)
    assert "cannot be restored" in caplog.text
    assert not path.exists()
    assert [p.read_bytes() for p in tmp_path.glob("windows.npz.unreadable-*")] == [damaged]
    assert agent.health().counters["checkpoint_unreadable"] == 1
    agent.pipeline.process(msgs("d1", range(15, 25)))  # and it works
    assert agent.pipeline.counters["readings_accepted"] == 10


def test_the_cloud_takes_an_agent_for_idle_once_what_it_stored_is_acknowledged(
        tmp_path: Path) -> None:
    """The worker resolves the incidents of a gateway whose devices all fell silent by its
    health reports, once they say nothing waits there (``cloud.worker.idle_report``): read
    from the gauges a real agent reports, not from names that could drift apart."""
    from cloud.worker import idle_report
    from devices.contract import batch_digest

    clock = ManualClock(now_ms=T + 60_000)
    agent, waiting = agent_holding_batches(tmp_path, clock)
    assert not idle_report(agent.health())  # batches in its outbox: a backlog, not silence
    agent.outbox.ack(waiting, {s: batch_digest(agent.outbox.read(s)) for s in waiting})
    assert idle_report(agent.health())
    agent.pipeline.guard.reason = "before 2020"  # its clock not set: its times mean nothing
    assert not idle_report(agent.health())


def agent_holding_batches(tmp_path: Path, clock: ManualClock) -> tuple[EdgeAgent, list[int]]:
    """An agent whose outbox holds the batches of 25 s of one device, not sent yet."""
    agent = EdgeAgent(config(tmp_path), clock=clock)
    agent.pipeline.process(msgs("d1", range(0, 25)))
    agent._store(agent.pipeline.emit(flush=True))
    agent.outbox.sync()
    waiting = agent.outbox.pending()
    assert waiting
    return agent, waiting


@pytest.mark.parametrize("damage", ["zeroed", "garbage", "cut"])
def test_an_unreadable_sequence_file_starts_a_new_incarnation_and_keeps_the_outbox(
        tmp_path: Path, damage: str) -> None:
    """uplink.seq damaged while the outbox holds a batch for the cloud: the agent starts, new
    batches are numbered under a new incarnation past the outbox's numbers (the cloud cannot
    take one for a batch it has), and the cloud's ack of the waiting batch still clears it."""
    from devices.contract import batch_digest, decode_ack, encode_ack

    clock = ManualClock(now_ms=T + 60_000)
    first, waiting = agent_holding_batches(tmp_path, clock)
    old_inc = first.uplink.seq.incarnation
    payload = first.outbox.read(waiting[0])
    first.outbox.close()
    seq_file = tmp_path / "uplink.seq"
    text = seq_file.read_bytes()
    seq_file.write_bytes({"zeroed": bytes(len(text)), "garbage": b"\xc1\xff 12 x",
                          "cut": text[:10]}[damage])
    again = EdgeAgent(config(tmp_path), clock=clock)
    assert again.uplink.seq.incarnation != old_inc
    assert again.uplink.seq.next() > max(waiting)
    assert again.outbox.pending() == waiting
    assert again.stats()["uplink_seq_recovered"] == 1
    again.uplink.acks.append(decode_ack(encode_ack(
        [waiting[0]], incarnation=old_inc, proofs={waiting[0]: batch_digest(payload)})))
    again.shipper.apply_acks()
    assert waiting[0] not in again.outbox.pending()
    assert again.shipper.foreign_acks == 0



def test_an_ack_about_batches_this_agent_never_sent_moves_it_to_a_new_incarnation(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another agent numbers batches under this one's gateway and incarnation (a copied state
    directory). An ack of this incarnation naming a number not handed out yet, or one the cloud
    marks as a conflict, moves this agent to a new incarnation for what it numbers next (on
    disk first); what its outbox holds stays under the old one, whose acks still count. A
    forger who keeps sending such acks gets one new incarnation in ten minutes, no more."""
    from devices.contract import batch_digest, decode_ack, encode_ack, uplink_json

    clock = ManualClock(now_ms=T + 60_000)
    agent, waiting = agent_holding_batches(tmp_path, clock)
    old = agent.uplink.seq.incarnation
    ahead = agent.uplink.seq.handed_out
    # its own ack, of a batch it sent: nothing happens
    agent.uplink.acks.append(decode_ack(encode_ack(
        [waiting[0]], incarnation=old,
        proofs={waiting[0]: batch_digest(agent.outbox.read(waiting[0]))})))
    agent.shipper.apply_acks()
    assert agent.uplink.seq.incarnation == old
    assert agent.stats()["identity_conflicts"] == 0
    # the other agent's ack, of a number this one has not reached
    with caplog.at_level("ERROR"):
        agent.uplink.acks.append(decode_ack(encode_ack([ahead + 3], incarnation=old,
                                                       proofs={ahead + 3: "0" * 32})))
        agent.shipper.apply_acks()
    new = agent.uplink.seq.incarnation
    assert new != old
    assert "another agent runs as this gateway" in caplog.text
    assert (tmp_path / "uplink.seq").read_text().split()[0] == str(new)  # on disk
    assert old in agent.shipper.earlier
    # what it numbers next is under the new incarnation; the outbox keeps the old batches
    agent.pipeline.process(msgs("d1", range(25, 50)))
    agent._store(agent.pipeline.emit(flush=True))
    later = [s for s in agent.outbox.pending() if s not in waiting]
    assert later
    assert orjson.loads(uplink_json(agent.outbox.read(later[0])))["inc"] == new
    rest = [s for s in waiting if s in agent.outbox.pending()]
    assert all(orjson.loads(uplink_json(agent.outbox.read(s)))["inc"] == old for s in rest)
    # the old incarnation's acks still clear its batches
    agent.uplink.acks.append(decode_ack(encode_ack(
        rest, incarnation=old, proofs={s: batch_digest(agent.outbox.read(s)) for s in rest})))
    agent.shipper.apply_acks()
    assert not set(rest) & set(agent.outbox.pending())
    # a cloud-marked conflict under the new incarnation, soon after: counted, no churn
    agent.uplink.acks.append(decode_ack(encode_ack(
        [later[0]], incarnation=new, conflicts=[later[0]],
        proofs={later[0]: batch_digest(agent.outbox.read(later[0]))})))
    agent.shipper.apply_acks()
    assert agent.uplink.seq.incarnation == new
    assert agent.stats()["identity_conflicts"] == 2
    clock.advance(600_000)
    agent.uplink.acks.append(decode_ack(encode_ack([10**9], incarnation=new)))
    agent.shipper.apply_acks()
    assert agent.uplink.seq.incarnation not in (old, new)


def test_the_agent_says_when_the_cloud_finds_its_clock_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A clock set but wrong (a Pi booted from its saved time where a firewall lets MQTT
    through but not NTP) cannot be found at the gateway. The cloud worker tells it, in its
    acks, from the time the gateway's health reports take: the agent logs it when it begins
    and when it ends, and `fieldline edge status` warns with by how much (its ``clock`` line
    shows it in any case). An ack of an older worker, without it, changes nothing."""
    from devices.contract import decode_ack, encode_ack
    from edge.status import status_command

    clock = ManualClock(now_ms=T + 60_000)
    agent, _ = agent_holding_batches(tmp_path, clock)

    def ack(clock_ms: int | None) -> None:
        agent.uplink.acks.append(decode_ack(encode_ack([], clock_ms=clock_ms)))
        agent.shipper.apply_acks()

    def status() -> str:
        agent._write_status(agent.health(), "running")
        return status_command(tmp_path, as_json=False, now_ms=clock.now_ms())[1]

    ack(None)
    assert agent.shipper.cloud_clock is None
    assert "clock    " not in status()
    caplog.set_level(logging.INFO, "fieldline.edge")
    for _ in range(3):
        ack(-3 * 86_400_000)
        clock.advance(5_000)
    said = [r.getMessage() for r in caplog.records if "cloud worker finds" in r.getMessage()]
    assert len(said) == 1, said
    assert "this gateway's clock 3.0 days behind" in said[0]
    text = status()
    assert ("! the cloud worker finds the gateway's clock 3.0 days behind (told 5.0 s before "
            "this status, from the time its health reports take)") in text, text
    assert "clock    3.0 days behind the cloud's, as its worker told 5.0 s before" in text
    ack(-40)  # its time sync mended
    assert "right again" in caplog.text
    text = status()
    assert "cloud worker finds" not in text
    assert "clock    0.0 s behind the cloud's, as its worker told 0.0 s before" in text


@pytest.mark.integration
def test_a_redelivered_reading_is_received_and_counted_as_a_duplicate(tmp_path: Path) -> None:
    # a broker re-delivering after an agent restart: the reading arrived twice, is in its
    # window once, and the gateway's totals balance like the per-device ledger
    clock = ManualClock(now_ms=T + 60_000)
    agent = EdgePipeline(config(tmp_path), clock)
    agent.process(msgs("d1", range(0, 5)))
    agent.process(msgs("d1", range(3, 8)))  # seconds 3 and 4 again
    s = agent.stats()
    assert (s["readings_received"], s["readings_accepted"], s["duplicates"]) == (10, 8, 2)
    assert s["readings_received"] == (s["readings_accepted"] + s["rejected"]
                                      + s["late_dropped"] + s["duplicates"])
    led = agent.ledger_report(changed_only=False)
    assert (led["received"], led["accepted"], led["duplicates"]) == ([10], [8], [2])
    counts = results_by_window([agent.emit(flush=True)])
    assert sum(c for c, _ in counts.values()) == 8


def test_the_ledger_reports_the_devices_that_changed_since_its_last_report(
        tmp_path: Path) -> None:
    clock = ManualClock(now_ms=T + 60_000)
    agent = EdgePipeline(config(tmp_path), clock)
    agent.process(msgs("d1", range(0, 5)) + msgs("d2", range(0, 5)))
    first = agent.ledger_report()
    assert first["devices"] == ["d1", "d2"]
    assert first["received"] == [5, 5]
    assert agent.ledger_report()["devices"] == []  # nothing happened since
    agent.process(msgs("d2", range(5, 7)))
    assert agent.ledger_report() == {"devices": ["d2"], "received": [7], "accepted": [7],
                                     "late_dropped": [0], "duplicates": [0], "rejected": [0],
                                     "windows_emitted": [0], "gap": [0], "rejected_by": {}}
    agent.process(msgs("d1", range(9, 10)))  # 5..8 skipped: a gap
    agent.process(msgs("d1", range(7, 8)))  # one of them arrives late
    agent.process([*msgs("d3", range(0, 1)), ("devices/d2/readings", b"{", T)])  # new; a reject
    rep = agent.ledger_report()
    assert rep["devices"] == ["d1", "d2", "d3"]
    assert rep["gap"] == [3, 0, 0]
    assert rep["rejected_by"] == {"malformed_json": [0, 1, 0]}
    # restored from a checkpoint, the first report is whole; the next ones are changes again
    agent.save_checkpoint(tmp_path / "ckpt")
    again = EdgePipeline(config(tmp_path), clock)
    again.load_checkpoint(tmp_path / "ckpt")
    whole = again.ledger_report()
    assert whole["devices"] == ["d1", "d2", "d3"]
    assert whole["rejected_by"] == {"malformed_json": [0, 1, 0]}  # kept across the restart
    again.process(msgs("d3", [1]))
    assert again.ledger_report()["devices"] == ["d3"]
    # a reason's counts take memory from its first rejection on, for every device
    assert set(again.ledger_rejects) == {rejects.READING_REASONS.index("malformed_json")}
    again.process([("devices/d1/readings", b'{"ts": 1}', T)])
    rep = again.ledger_report()
    assert rep["devices"] == ["d1"]
    assert rep["rejected_by"] == {"missing_field": [1]}
    assert again.stats()["rejected"] == 2


def test_made_up_metric_names_do_not_use_up_the_metric_ids(tmp_path: Path) -> None:
    # 1,000 readings with metric names outside the catalog (more than the 256 metric ids):
    # each is rejected as unknown_metric without taking an id, so a sensor kind of the
    # catalog seen for the first time afterwards is still accepted
    clock = ManualClock(now_ms=T + 60_000)
    agent = EdgePipeline(config(tmp_path), clock)
    agent.process([("devices/d1/readings", encode_single("d1", f"made-up-{k}", T, 1.0, k), T)
                   for k in range(1_000)])
    agent.process([("devices/d1/readings", encode_single("d1", "humidity", T, 40.0, 1_000), T)])
    s = agent.stats()
    assert s["rejected_unknown_metric"] == 1_000
    assert s["readings_accepted"] == 1
    assert s["readings_received"] == 1_001
    assert agent.metrics.names == ["humidity"]
    led = agent.ledger_report(changed_only=False)
    assert (led["received"], led["rejected"], led["accepted"]) == ([1_001], [1_000], [1])


def test_readings_of_unregistered_devices_do_not_grow_the_agent(tmp_path: Path) -> None:
    # with a registry and unknown_devices = "reject", 5,000 made-up device ids are rejected
    # before they get an id; their ledger row is "(no device)", so the ledger still balances
    reg = tmp_path / "devices.csv"
    Registry([Device(device_id="d1", gateway="gw-1", site="site-a", kind="humidity")]).to_csv(reg)
    clock = ManualClock(now_ms=T + 60_000)
    agent = EdgePipeline(config(tmp_path, registry_path=reg), clock)
    agent.process([(f"devices/ghost-{k}/readings", encode_single(f"ghost-{k}", "humidity", T,
                                                                 40.0, k), T)
                   for k in range(5_000)])
    agent.process([("devices/d1/readings", encode_single("d1", "humidity", T, 40.0, 1), T)])
    s = agent.stats()
    assert (s["rejected_unknown_device"], s["readings_accepted"]) == (5_000, 1)
    assert s["devices_seen"] == 1
    assert len(agent.devices) == 2  # d1 and the "(no device)" row
    led = agent.ledger_report(changed_only=False)
    rows = dict(zip(led["devices"], zip(led["received"], led["rejected"],  # type: ignore[arg-type]
                                        led["accepted"], strict=True), strict=True))
    assert rows == {"(no device)": (5_000, 5_000, 0), "d1": (1, 0, 1)}
    assert sum(r[0] for r in rows.values()) == s["readings_received"]


def test_a_failing_tick_is_counted_and_the_agent_keeps_going(mosquitto: Mosquitto,
                                                             tmp_path: Path) -> None:
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                             uplink_broker=mosquitto.address, tick_ms=20))
    real = agent.pipeline.process
    calls = {"n": 0}

    def flaky(batch: list[tuple[str, bytes, int]]) -> None:
        calls["n"] += 1
        if batch and calls["n"] < 1000 and not calls.get("failed"):
            calls["failed"] = 1
            raise RuntimeError("injected bug")
        real(batch)

    agent.pipeline.process = flaky  # type: ignore[method-assign]

    async def scenario() -> None:
        stop, task, c = await running(agent, mosquitto)
        for batch_no in range(2):
            now = time.time_ns() // 1_000_000
            info = c.publish("devices/d1/readings",
                             encode_single("d1", "temperature", now, 20.0 + batch_no), qos=1)
            info.wait_for_publish(5)
            await asyncio.sleep(0.3)
        await stopped(stop, task, c)

    asyncio.run(scenario())
    s = agent.stats()
    assert s["internal_errors"] == 1
    assert s["rejected_internal_error"] == 1  # the batch hit by the bug is counted, not lost
    assert s["readings_accepted"] == 1  # and the next one goes through
    assert np.isfinite(s["rss_mb"])


@pytest.mark.integration
def test_a_device_slower_than_the_idle_timeout_is_not_reported_silent_between_its_readings(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A device that reports every 0.6 s to an agent whose idle timeout is 0.3 s (as a battery
    sensor heard from every 5 minutes against the shipped 30 s) has its windows closed between
    its readings, but is not reported silent while it keeps its pace; once it stops, it is,
    after 3 of its intervals (1.8 s; asserted from 4 s, for a loaded machine)."""
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                             uplink_broker=mosquitto.address, tick_ms=20,
                             health_interval_ms=100, engine=EngineConfig(
                                 windows=(WindowSpec(size_ms=1_000),), time=EventTimeSpec(
                                     out_of_orderness_ms=0, allowed_lateness_ms=0,
                                     idle_timeout_ms=300))))
    seen: list[tuple[float, int]] = []  # (seconds since the last reading, silent)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        while not agent.intake.subscribed.is_set():
            await asyncio.sleep(0.02)
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                          protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        last = time.monotonic()
        for seq in range(10):
            now = time.time_ns() // 1_000_000
            pub.publish("devices/slow/readings",
                        encode_single("slow", "temperature", now, 20.0, seq), qos=1)
            last = time.monotonic()
            for _ in range(6):
                await asyncio.sleep(0.1)
                if seq >= 3:  # its pace learned
                    seen.append((time.monotonic() - last, int(agent.stats()["devices_silent"])))
        while time.monotonic() - last < 4.5:
            await asyncio.sleep(0.1)
            seen.append((time.monotonic() - last, int(agent.stats()["devices_silent"])))
        pub.disconnect()
        pub.loop_stop()
        stop.set()
        await task

    asyncio.run(scenario())
    while_paced = [s for quiet, s in seen if quiet < 1.0]
    assert while_paced, seen
    assert not any(while_paced), seen
    assert all(s == 1 for quiet, s in seen if quiet > 4.0), seen


def test_late_readings_are_forwarded_raw_and_silent_devices_reported(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A reading beyond allowed lateness goes out on fieldline/v1/<gw>/late; a device gone
    quiet is listed as silent in the health report."""
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                             uplink_broker=mosquitto.address, tick_ms=20, forward_late=True,
                             health_interval_ms=100, engine=EngineConfig(
                                 windows=(WindowSpec(size_ms=1_000),), time=EventTimeSpec(
                                     out_of_orderness_ms=0, allowed_lateness_ms=0,
                                     idle_timeout_ms=300))))
    got: dict[str, list[bytes]] = {"late": [], "health": []}

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        got[m.topic.rsplit("/", 1)[1]].append(m.payload)

    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe([("fieldline/v1/+/late", 1), ("fieldline/v1/+/health", 1)])
    sub.loop_start()

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        while not agent.intake.subscribed.is_set():
            await asyncio.sleep(0.02)
        now = time.time_ns() // 1_000_000
        pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                          protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        for ts, seq in ((now - 5_000, 1), (now - 9_000, 2)):  # the second is beyond lateness
            info = pub.publish("devices/d9/readings",
                               encode_single("d9", "temperature", ts, 20.0, seq), qos=1)
            info.wait_for_publish(5)
        await asyncio.sleep(1.0)  # d9 goes silent (idle 300 ms)
        pub.disconnect()
        pub.loop_stop()
        stop.set()
        await task

    asyncio.run(scenario())
    sub.loop_stop()
    assert agent.stats()["late_dropped"] == 1
    late = [orjson.loads(p) for p in got["late"]]
    forwarded = [r for doc in late for r in doc["readings"]]
    assert len(forwarded) == 1
    assert forwarded[0][:3] == ["d9", "temperature", forwarded[0][2]]
    assert forwarded[0][3] == 20.0
    reports = [orjson.loads(p) for p in got["health"]]
    assert any("d9" in r["devices"].get("silent", []) for r in reports)


def test_a_devices_window_travels_in_one_batch(tmp_path: Path) -> None:
    """Uplink batches are bounded in rows, but the metrics of one device's window are never
    split across two: the cloud judges a device's sensors together."""
    clock = ManualClock(now_ms=T + 60_000)
    pipe = EdgePipeline(config(tmp_path, max_results_per_batch=7), clock)
    metrics = ["temperature", "humidity", "co2"]
    messages = [(f"devices/d{d}/readings",
                 encode_single(f"d{d}", m, T + s * 1000, 20.0 + s, 3 * s + j), T)
                for s in range(25) for d in range(5) for j, m in enumerate(metrics)]
    pipe.process(messages)
    res = pipe.emit(flush=True)
    seq = iter(range(100))
    batches = pipe.to_batches(res, lambda: next(seq))
    assert sum(len(b.results) for b in batches) == len(res) == 5 * 3 * 3
    assert all(len(b.results) <= 7 for b in batches)
    seen: dict[tuple[str, int], int] = {}
    for k, b in enumerate(batches):
        r = b.results
        for i in range(len(r)):
            key = (b.devices[int(r.device[i])], int(r.start[i]))
            assert seen.setdefault(key, k) == k, f"{key} split across batches"


def test_a_flood_of_made_up_device_ids_is_bounded_and_real_devices_go_through(
        tmp_path: Path) -> None:
    """Issue 12, item 8: without a registry, 100,000 made-up ids grew the agent to gigabytes
    and delayed real devices. New ids are bounded (max_devices) and rate-limited (a token
    bucket in receive time): the flood is refused and counted, memory stays flat, and every
    reading of the known devices is folded."""
    import psutil

    clock = ManualClock(now_ms=T + 60_000)
    pipe = EdgePipeline(config(tmp_path, max_devices=2_000, new_devices_per_s=10.0,
                               new_devices_burst=500), clock)
    real = [f"real-{i}" for i in range(20)]
    pipe.process([(f"devices/{d}/readings", encode_single(d, "temperature", T, 20.0, 0), T)
                  for d in real])
    rss0 = psutil.Process().memory_info().rss
    for k in range(20):  # 20 s of a flood of 5,000 new ids a second, real devices among them
        now = T + 1_000 * (k + 1)
        flood = [(f"devices/x{k}-{i}/readings",
                  encode_single(f"x{k}-{i}", "temperature", now, 1.0, 0), now)
                 for i in range(5_000)]
        mine = [(f"devices/{d}/readings", encode_single(d, "temperature", now, 20.0, k + 1),
                 now) for d in real]
        before = pipe.stats()["readings_accepted"]
        pipe.process(flood[:2_500] + mine + flood[2_500:])
        assert pipe.stats()["readings_accepted"] - before >= len(mine)
    s = pipe.stats()
    assert s["devices_seen"] <= 2_000
    assert s["rejected_device_rate"] + s["rejected_device_limit"] >= 100_000 - 2_000
    assert (psutil.Process().memory_info().rss - rss0) / 2**20 < 50
    for d in real:  # every reading of every real device is in a window
        assert pipe.ledger["accepted"][pipe.devices.get(d)] == 21, d


@pytest.mark.integration
def test_clockless_off_the_shelf_sensors_are_read_through_the_broker(
        mosquitto: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Shelly-style bare numbers (the metric in the topic), Zigbee2MQTT-style objects of
    metric names and numbers and Tasmota's sensor objects, none with a usable time, through a
    real broker into the windows of
    a gateway that takes event time from its own clock."""
    engine = EngineConfig(windows=(WindowSpec(size_ms=10_000),), clock_policy="receive_time")
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address, engine=engine,
                             uplink_broker=mosquitto.address, tick_ms=20,
                             topics=["shellies/+/sensor/+"], metric_topic_level=3,
                             catalog=Catalog(undeclared="accept")))  # as deploy/gateway.toml
    sent = [("shellies/sh1/sensor/temperature", b"21.5"), ("shellies/sh1/sensor/humidity", b"40"),
            ("shellies/z1/sensor/state", orjson.dumps({"temperature": 19.0, "pressure": 1013,
                                                       "contact": True, "update": {}})),
            ("shellies/sh1/sensor/relay", b"on"),  # a Shelly relay's bare state: 1
            ("shellies/sh2/sensor/relay", b'"on"'),  # a quoted state: 1 as well
            ("shellies/sh3/sensor/mode", b'"warm"'),  # a JSON text that is no value
            # Tasmota: a sensor's object of quantities, its local time without an offset
            ("shellies/tas1/sensor/SENSOR", orjson.dumps({
                "Time": "2026-12-03T10:00:00", "AM2301": {"Temperature": 20.6, "Humidity": 46},
                "TempUnit": "C"}))]

    async def scenario() -> None:
        stop, task, c = await running(agent, mosquitto)
        for topic, payload in sent:
            c.publish(topic, payload, qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while agent.stats()["messages_in"] < len(sent):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await stopped(stop, task, c)

    with caplog.at_level(logging.WARNING, logger="fieldline.edge"):
        asyncio.run(scenario())
    s = agent.stats()
    logged = [r.getMessage() for r in caplog.records if "rejected reason=" in r.getMessage()]
    assert len(logged) == 1
    assert "reason=malformed_payload" in logged[0]
    assert "detail=malformed_payload: " in logged[0]  # its own reason's sample
    # 21.5, 40, temperature + pressure + contact of z1, sh1's and sh2's relays, the AM2301's two
    assert s["readings_accepted"] == 9
    assert s["rejected"] == 1  # '"warm"' is a JSON string, no reading
    names = set(agent.pipeline.metrics.names)
    assert {"temperature", "humidity", "pressure", "contact", "relay", "AM2301_Temperature",
            "AM2301_Humidity"} <= names



@pytest.mark.parametrize(("policy", "untimed"), [("receive_time", "reject"),
                                                ("trust", "receive_time"), ("trust", "reject")])
def test_a_retained_reading_handed_over_at_subscribe_is_no_new_reading_without_its_time(
        mosquitto: Mosquitto, tmp_path: Path, policy: str, untimed: str) -> None:
    """ESPHome retains its sensors' states by default: at every subscribe the broker hands the
    agent the last one of each again. Where the gateway's receive time is the event time, that
    was a reading placed now that may be hours old, at every restart of the agent (a sensor
    dead since the morning came back with its last value). Such a gateway now subscribes
    without the retained messages (MQTT 5 retain handling 2); a retained one published while it
    runs is a new reading like any other. Where readings carry their own time, the retained
    copy is still taken: its time places it (a repeat is a duplicate, an old one is late).
    A gateway that stamps only readings without a time (``[clock] untimed``, as shipped) does
    not take them either: a retained untimed value would be a reading placed now."""
    ts = int(time.time() * 1000)
    stamps = policy == "receive_time" or untimed == "receive_time"
    timed = orjson.dumps({"temperature": 21.5, "ts": ts, "seq": 1})
    payload = b"21.5" if stamps else timed
    engine = EngineConfig(windows=(WindowSpec(size_ms=10_000),), clock_policy=policy)
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address, engine=engine,
                             untimed=untimed,
                             uplink_broker=mosquitto.address, tick_ms=20,
                             topics=["esphome/+/sensor/+"], metric_topic_level=3,
                             device_topic_level=1, catalog=Catalog(undeclared="accept")))
    before = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    before.connect("127.0.0.1", mosquitto.port)
    before.loop_start()
    before.publish("esphome/e1/sensor/temperature", payload, qos=1,
                   retain=True).wait_for_publish(5)
    before.disconnect()
    before.loop_stop()

    async def scenario() -> None:
        stop, task, c = await running(agent, mosquitto)
        await asyncio.sleep(1.0)  # what the broker hands over at subscribe has come by now
        handed_over = agent.stats()["messages_in"]
        later = b"22.5" if stamps else orjson.dumps({"temperature": 22.5, "ts": ts + 1000,
                                                     "seq": 2})
        c.publish("esphome/e1/sensor/temperature", later, qos=1,
                  retain=True).wait_for_publish(5)
        deadline = time.monotonic() + 10
        while agent.stats()["messages_in"] < handed_over + 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await stopped(stop, task, c)
        assert handed_over == (0 if stamps else 1)

    asyncio.run(scenario())
    assert agent.stats()["readings_accepted"] == (1 if stamps else 2)
    assert agent.stats()["readings_untimed"] == (1 if stamps else 0)


def test_each_rejection_reason_is_logged_with_a_sample_of_its_own(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pipe = EdgePipeline(config(tmp_path), ManualClock(T))
    batch = [("devices/d1/readings", orjson.dumps({"metric": "radiation", "ts": T,
                                                   "value": 1}), T),
             ("devices/d1/readings", b"{broken", T)]
    with caplog.at_level(logging.WARNING, logger="fieldline.edge"):
        pipe.process(batch)
    logged = sorted(r.getMessage() for r in caplog.records if "rejected reason=" in
                    r.getMessage())
    assert len(logged) == 2
    assert "reason=malformed_json" in logged[0]
    assert "detail=malformed_json: " in logged[0]
    assert "reason=unknown_metric" in logged[1]
    assert "detail=unknown_metric: " in logged[1]


@pytest.mark.parametrize("untimed", ["receive_time", "reject"])
def test_readings_without_a_time_take_the_receive_time_and_are_counted(
        tmp_path: Path, untimed: str) -> None:
    """Zigbee2MQTT, ESPHome and Shelly send no time, and Tasmota a local time without its
    zone: under the shipped ``[clock] untimed = "receive_time"`` each such reading is placed at
    the moment the gateway received it (counted as ``readings_untimed``) while a reading with
    a time of its own keeps it, under the trusted clock policy. A time text that is no time at
    all is still refused; with ``untimed = "reject"`` the untimed ones are refused as before."""
    recv = T + 123_456
    pipe = EdgePipeline(config(tmp_path, untimed=untimed, catalog=Catalog(undeclared="accept")),
                        ManualClock(now_ms=recv))
    tasmota = {"Time": "2026-12-03T10:00:00", "AM2301": {"Temperature": 20.6}}
    pipe.process([
        ("devices/z1/readings", orjson.dumps({"temperature": 21.3, "humidity": 45}), recv),
        ("devices/t1/readings", orjson.dumps(tasmota), recv),
        ("devices/d1/readings", encode_single("d1", "temperature", T, 20.0, 0), recv),
        ("devices/d1/readings", orjson.dumps({"metric": "temperature", "ts": "soon",
                                              "value": 1}), recv)])
    s = pipe.stats()
    res = pipe.emit(flush=True)
    starts = {(pipe.devices.names[int(d)], int(st)) for d, st in zip(res.device, res.start,
                                                                      strict=True)}
    if untimed == "reject":
        assert s["readings_untimed"] == 0
        assert (s["rejected_missing_field"], s["rejected_wrong_type"]) == (2, 2)
        assert starts == {("d1", T - T % 10_000)}
        return
    assert s["readings_untimed"] == 3
    assert (s["rejected_missing_field"], s["rejected_wrong_type"]) == (0, 1)
    assert s["readings_accepted"] == 4
    at_recv = recv - recv % 10_000
    assert starts == {("z1", at_recv), ("t1", at_recv), ("d1", T - T % 10_000)}


def test_untimed_readings_of_one_value_received_together_are_each_a_reading(
        tmp_path: Path) -> None:
    """A reading without a time or a seq is placed at its receipt: two of the same value taken
    in the same millisecond (one read of the socket; a device's backlog after an outage) are
    two readings, not a reading and its repeat. So are SenML records whose time is relative
    (RFC 8428 reckons it from the receipt), in packs either decoding path takes. With a time
    of its own, the same bytes twice are still a repeat."""
    recv = T + 5_000
    pipe = EdgePipeline(config(tmp_path, catalog=Catalog(undeclared="accept")),
                        ManualClock(now_ms=recv))
    untimed = orjson.dumps({"temperature": 21.5})
    timed = orjson.dumps({"temperature": 21.5, "ts": T})
    relative = orjson.dumps([{"bn": "s1:", "n": "temperature", "v": 21.5}])
    relative_per_record = orjson.dumps([{"bn": "s2:", "n": "temperature", "t": -1, "v": 21.5},
                                        {"bn": "s2:", "n": "temperature", "t": -1, "v": 21.5}])
    pipe.process([("devices/z1/readings", untimed, recv)] * 3
                 + [("devices/d1/readings", timed, recv)] * 2
                 + [("devices/s1/readings", relative, recv)] * 2
                 + [("devices/s2/readings", relative_per_record, recv)])
    s = pipe.stats()
    assert (s["readings_accepted"], s["duplicates"], s["readings_untimed"]) == (8, 1, 7)
    res = pipe.emit(flush=True)
    counts = {pipe.devices.names[int(d)]: int(c) for d, c in zip(res.device, res.count,
                                                                 strict=True)}
    assert counts == {"z1": 3, "d1": 1, "s1": 2, "s2": 2}


@pytest.mark.integration
def test_untimed_readings_re_delivered_after_a_broker_restart_count_once(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path) -> None:
    """Readings without a time are placed at their receipt, so a copy the broker re-delivers
    would be a second reading, not a duplicate. Here the agent has logged twenty (its
    acknowledgements held back, as when the connection drops before they leave) when the
    gateway broker restarts: the broker re-delivers all twenty to the resumed session, and the
    agent counts each once and acknowledges the re-deliveries for the copies it logged."""
    broker = mosquitto_factory(persistence=True)
    agent = EdgeAgent(config(tmp_path, intake_broker=broker.address,
                             uplink_broker=broker.address, tick_ms=20,
                             topics=["esphome/+/sensor/+"], metric_topic_level=3,
                             device_topic_level=1, catalog=Catalog(undeclared="accept")))
    held: list[list[tuple[str, bytes, int, int, int]]] = []
    ack = agent.intake.ack
    agent.intake.ack = held.append  # type: ignore[method-assign]

    async def scenario() -> None:
        stop, task, c = await running(agent, broker)
        for _ in range(20):
            c.publish("esphome/e1/sensor/temperature", b"21.5", qos=1).wait_for_publish(5)
        await until(lambda: agent.stats()["messages_in"] == 20, "the twenty logged")
        broker.stop()
        broker.start()  # the session, and the twenty it never heard acknowledged, from disk
        await until(lambda: agent.intake.redelivered == 20, "the twenty re-delivered")
        agent.intake.ack = ack  # type: ignore[method-assign]
        for msgs in held:
            ack(msgs)
        await asyncio.sleep(0.5)
        c.disconnect()
        c.loop_stop()
        stop.set()
        await task

    asyncio.run(scenario())
    s = agent.stats()
    assert (s["messages_in"], s["readings_accepted"], s["readings_untimed"],
            s["intake_redelivered"]) == (20, 20, 20, 20), s
    nothing_left_unacknowledged(broker, agent.intake.client_id)


@pytest.mark.integration
@pytest.mark.parametrize("end", ["stopped", "crashed"])
def test_what_an_agent_logged_but_never_acknowledged_counts_once_after_its_restart(
        mosquitto: Mosquitto, tmp_path: Path, end: str) -> None:
    """An agent that stops (a restart for an upgrade) or crashes between logging messages and
    sending their acknowledgements leaves them with the broker, which re-delivers them to the
    next run. Their readings are in the intake log (and the checkpoint, after a clean stop):
    the next run recognises the re-deliveries by the packet ids the log kept, acknowledges them
    and does not count them again (readings without a time would count twice)."""
    def agent() -> EdgeAgent:
        return EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                                uplink_broker=mosquitto.address, tick_ms=20,
                                topics=["esphome/+/sensor/+"], metric_topic_level=3,
                                device_topic_level=1, catalog=Catalog(undeclared="accept")))

    first = agent()
    first.intake.ack = lambda _msgs: None  # type: ignore[method-assign]
    if end == "crashed":  # nothing after the last tick: no final checkpoint, no flush
        first._shutdown = lambda: (first.intake.stop(), first.uplink.stop())  # type: ignore[method-assign]

    async def run_first() -> None:
        stop, task, c = await running(first, mosquitto)
        for _ in range(20):
            c.publish("esphome/e1/sensor/temperature", b"21.5", qos=1).wait_for_publish(5)
        await until(lambda: first.stats()["messages_in"] == 20, "the twenty logged")
        await stopped(stop, task, c)

    asyncio.run(run_first())
    second = agent()

    async def run_second() -> None:
        stop, task, c = await running(second, mosquitto)
        await until(lambda: second.intake.redelivered == 20, "the twenty re-delivered")
        await asyncio.sleep(0.5)
        await stopped(stop, task, c)

    asyncio.run(run_second())
    s = second.stats()
    assert (s["readings_accepted"], s["readings_untimed"], s["intake_redelivered"]) == (
        20, 20, 20), s
    assert second.pipeline.counters["replayed_on_start"] == (20 if end == "crashed" else 0)
    nothing_left_unacknowledged(mosquitto, second.intake.client_id)


@pytest.mark.integration
def test_a_clean_stop_acknowledges_what_it_logged_as_it_stopped(mosquitto: Mosquitto,
                                                                  tmp_path: Path) -> None:
    """At a clean stop the agent folds and logs what the intake still held: those messages are
    acknowledged before it disconnects, so the broker re-delivers none of them to the next run
    (before, the last turn's acknowledgements never left: every restart had the broker send
    them again, recognised only by their packet ids)."""
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                             uplink_broker=mosquitto.address, tick_ms=20,
                             topics=["esphome/+/sensor/+"], metric_topic_level=3,
                             device_topic_level=1, catalog=Catalog(undeclared="accept")))
    tick, shutdown = agent.tick, agent._shutdown
    agent.tick = lambda: 0  # type: ignore[method-assign]  # everything waits for the last turn

    def last_turn() -> None:
        agent.tick = tick  # type: ignore[method-assign]
        shutdown()

    agent._shutdown = last_turn  # type: ignore[method-assign]

    async def scenario() -> None:
        stop, task, c = await running(agent, mosquitto)
        for _ in range(20):
            c.publish("esphome/e1/sensor/temperature", b"21.5", qos=1).wait_for_publish(5)
        await until(lambda: agent.intake.pending == 20, "the twenty received")
        await stopped(stop, task, c)

    asyncio.run(scenario())
    s = agent.stats()
    assert (s["messages_in"], s["readings_accepted"]) == (20, 20), s
    nothing_left_unacknowledged(mosquitto, agent.intake.client_id)


def nothing_left_unacknowledged(broker: Mosquitto, client_id: str) -> None:
    """The agent's session holds no message: every re-delivery was acknowledged."""
    again = MqttIntake(broker.address, ["esphome/+/sensor/+"], clock=SystemClock(),
                       client_id=client_id, manual_ack=True)
    again.start()
    try:
        time.sleep(1.0)
        assert again.subscribed.is_set()
        assert again.pending == 0
    finally:
        again.stop()


async def until(cond: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.integration
def test_a_sparkplug_node_born_before_the_agent_is_asked_to_rebirth_through_the_broker(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    """A Sparkplug B edge node publishes its births once, when it connects; an agent started
    after them receives data by alias it has no names for. It refuses those (counted), asks the
    node over the broker for its births again (an NCMD with Node Control/Rebirth, as a
    Sparkplug host application does), and reads the data that follows the new births."""
    from devices.sparkplug import BOOLEAN, DOUBLE, OutMetric, decode_payload, encode_payload

    now = int(time.time() * 1000)
    births = [("spBv1.0/plant/NBIRTH/n1", encode_payload(
                  [OutMetric("bdSeq", 0, 8), OutMetric("Node Control/Rebirth", False, BOOLEAN)],
                  ts=now, seq=0)),
              ("spBv1.0/plant/DBIRTH/n1/s1", encode_payload(
                  [OutMetric("Inputs/Temperature", 20.0, DOUBLE, alias=7)], ts=now, seq=1))]
    asked: list[bytes] = []
    node = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_command(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        asked.append(m.payload)
        for topic, payload in births:  # what a node does when asked: its births again
            c.publish(topic, payload, qos=0)

    node.on_message = on_command
    node.connect("127.0.0.1", mosquitto.port)
    node.loop_start()
    node.subscribe("spBv1.0/plant/NCMD/n1", qos=1)
    for topic, payload in births:  # born before the agent listens: nobody gets these
        node.publish(topic, payload, qos=1).wait_for_publish(5)
    agent = EdgeAgent(config(tmp_path, intake_broker=mosquitto.address,
                             uplink_broker=mosquitto.address, tick_ms=20,
                             topics=["spBv1.0/#"], catalog=Catalog(undeclared="accept")))

    async def scenario() -> None:
        stop, task, c = await running(agent, mosquitto)
        deadline = time.monotonic() + 15
        k = 0
        while agent.stats()["readings_accepted"] < 2:
            assert time.monotonic() < deadline, agent.stats()
            k += 1
            node.publish("spBv1.0/plant/DDATA/n1/s1", encode_payload(
                [OutMetric(None, 20.0 + k, DOUBLE, alias=7, typed=False)],
                ts=now + k, seq=1 + k), qos=0).wait_for_publish(5)
            await asyncio.sleep(0.2)
        await stopped(stop, task, c)

    asyncio.run(scenario())
    node.disconnect()
    node.loop_stop()
    s = agent.stats()
    assert s["rebirths_requested"] == 1, s  # asked once, however many refusals came first
    assert s["rejected_missing_field"] >= 1
    (rebirth,) = asked
    assert [(m.name, m.reading(m.datatype)) for m in decode_payload(rebirth).metrics] == [
        ("Node Control/Rebirth", 1.0)]
    assert {"Inputs_Temperature"} <= set(agent.pipeline.metrics.names)


def test_batches_are_stored_compressed_once_the_cloud_says_it_reads_them(
        tmp_path: Path) -> None:
    """JSON until an ack says the cloud reads zlib (an older cloud, mid-upgrade, would not read
    it); then compressed, also after a restart; an ack of an older cloud (no reads) turns it
    off again; ``compression = "none"`` never compresses. Either way the cloud reads the batch
    and the ack's digest is of the stored bytes."""
    from devices.contract import (
        ResultBatch,
        batch_digest,
        decode_ack,
        decode_uplink,
        encode_ack,
        uplink_json,
    )

    clock = ManualClock(now_ms=T + 60_000)
    agent, waiting = agent_holding_batches(tmp_path, clock)
    first = agent.outbox.read(waiting[0])
    assert first.startswith(b"{")
    inc = agent.uplink.seq.incarnation
    agent.uplink.acks.append(decode_ack(encode_ack(
        [waiting[0]], incarnation=inc, proofs={waiting[0]: batch_digest(first)})))
    agent.shipper.apply_acks()
    assert waiting[0] not in agent.outbox.pending()

    def store_more(a: EdgeAgent, start: int) -> bytes:
        before = set(a.outbox.pending())
        a.pipeline.process(msgs("d1", range(start, start + 12)))
        a._store(a.pipeline.emit(flush=True))
        new = [s for s in a.outbox.pending() if s not in before]
        assert new
        return a.outbox.read(new[-1])

    packed = store_more(agent, 25)
    assert not packed.startswith(b"{")
    assert isinstance(decode_uplink(packed), ResultBatch)
    assert len(packed) < len(uplink_json(packed))
    s = agent.stats()
    assert s["batches_compressed"] >= 1
    assert s["batch_stored_bytes"] < s["batch_json_bytes"]
    agent.outbox.close()

    again = EdgeAgent(config(tmp_path), clock=clock)  # restarted: it remembers
    assert not store_more(again, 37).startswith(b"{")
    old_cloud = orjson.dumps({"v": 1, "acked": [], "rejected": [], "inc": inc})
    again.uplink.acks.append(decode_ack(old_cloud))
    again.shipper.apply_acks()
    assert store_more(again, 49).startswith(b"{")
    again.outbox.close()

    other = tmp_path / "none"
    never = EdgeAgent(config(other, uplink_compression="none"), clock=clock)
    never.uplink.acks.append(decode_ack(encode_ack([], incarnation=inc)))
    never.shipper.apply_acks()
    assert store_more(never, 61).startswith(b"{")
    assert never.stats()["batches_compressed"] == 0


def test_a_large_health_report_goes_compressed_and_a_small_one_stays_readable(
        tmp_path: Path) -> None:
    """The ledger of hundreds of devices (once a minute) is compressed for a cloud that reads
    zlib; a report without it stays JSON (what an operator reads with mosquitto_sub)."""
    from devices.contract import HealthReport, decode_ack, decode_uplink, encode_ack

    clock = ManualClock(now_ms=T + 60_000)
    agent = EdgeAgent(config(tmp_path), clock=clock)
    for d in range(300):
        agent.pipeline.process(msgs(f"device-{d:04d}", range(0, 3)))
    sent: list[bytes] = []
    agent.uplink.publish_health = sent.append  # type: ignore[method-assign]
    agent._report()  # the first report carries the ledger: JSON while the cloud has not said
    agent.uplink.acks.append(decode_ack(encode_ack([], incarnation=agent.uplink.seq.incarnation)))
    agent.shipper.apply_acks()
    agent._report()  # without the ledger (once a minute): small
    for d in range(300):  # the ledger names the devices that moved since the last one
        agent.pipeline.process(msgs(f"device-{d:04d}", range(3, 6)))
    agent._next_ledger = 0
    agent._report()  # with it
    plain, small, packed = sent
    assert plain.startswith(b"{")
    assert small.startswith(b"{")
    assert not packed.startswith(b"{")
    assert len(packed) < len(plain) / 3
    for payload in (plain, packed):
        rep = decode_uplink(payload)
        assert isinstance(rep, HealthReport)
        assert len(rep.ledger["devices"]) >= 300


def test_a_batch_unacknowledged_through_an_uplink_outage_is_not_blamed_on_the_worker(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Batches wait for their acknowledgement through an outage of the uplink; once it is back
    they are sent again, and only an acknowledgement still missing three ack timeouts after
    that is warned about (as a worker or ACL problem). Before, the first pump after the
    outage warned at once, pointing at the worker. No broker here: the uplink's paho side is
    replaced (sends return a message id and are PUBACKed at once)."""
    clock = ManualClock(now_ms=T + 60_000)
    agent, waiting = agent_holding_batches(tmp_path, clock)
    up, sh = agent.uplink, agent.shipper
    up.publish_results = lambda _payload: 1  # type: ignore[method-assign]
    up.on_the_wire = lambda _mid: False  # type: ignore[method-assign]

    def connect() -> None:  # what the uplink's on-connect callback records
        up._connected_at = clock.monotonic_ms()
        up.connected.set()

    def blamed() -> bool:
        return any("still not acknowledged" in r.getMessage() for r in caplog.records)

    connect()
    assert sh.pump() == len(waiting)
    up.connected.clear()
    clock.advance(10 * sh.ack_timeout_ms)  # the uplink is down meanwhile
    assert sh.pump() == 0
    connect()
    with caplog.at_level(logging.WARNING, logger="fieldline"):
        assert sh.pump() == len(waiting)  # sent again, nobody blamed
        assert not blamed()
        for _ in range(2):
            clock.advance(sh.ack_timeout_ms)
            sh.pump()
            assert not blamed()
        clock.advance(sh.ack_timeout_ms)  # up for three ack timeouts, still no ack
        sh.pump()
        assert blamed()
    assert sh.overdue() == len(waiting)
    agent.outbox.close()


def test_devices_gone_for_good_give_their_ids_to_new_devices(tmp_path: Path) -> None:
    """Device ids churn (replaced sensors, asset tags passing a dock door). An id used to be
    kept for good, in memory and in every checkpoint, so a gateway that had seen
    ``max_devices`` ids refused every new device from then on, restarts included. A device
    silent since before the oldest reading the agent accepts (validate.max_past), whose windows
    are all out, now gives its id to the next new device, which starts as if the id were new:
    no duplicate memory, sequence, count or ledger of the old one."""
    hour = 3_600_000
    clock = ManualClock(now_ms=T + 60_000)
    engine = EngineConfig(windows=(WindowSpec(size_ms=10_000), WindowSpec.parse("count:4")),
                          time=EventTimeSpec(out_of_orderness_ms=0, allowed_lateness_ms=1_000,
                                             idle_timeout_ms=5_000))
    cfg = config(tmp_path, max_devices=3, max_past_ms=hour, engine=engine)
    pipe = EdgePipeline(cfg, clock)

    def send(devices: list[str], values: float) -> list[object]:
        now = clock.now_ms()
        pipe.process([(f"devices/{d}/readings",
                       encode_single(d, "temperature", now - 5_000 + k * 1000, values + k, k),
                       now) for d in devices for k in range(5)])
        out = []
        for _ in range(4):  # the windows close, the devices go silent, then past lateness
            clock.advance(10_000)
            out.append(pipe.emit())
        return out

    first = send(["a", "b", "c"], 20.0)
    assert sum(len(r) for r in first) > 0  # type: ignore[arg-type]
    ids_before = {d: pipe.devices.get(d) for d in "abc"}
    send(["d"], 0.0)  # within the hour: a, b, c still count
    s = pipe.stats()
    assert s["rejected_device_limit"] == 5
    assert s["devices_released"] == 0

    clock.advance(2 * hour)  # a, b, c's newest readings are now older than any it accepts
    pipe.emit()
    s = pipe.stats()
    assert s["devices_released"] == 3
    assert s["devices_seen"] == 0
    assert pipe.devices.get("a") is None

    # new devices, and "a" back, numbering from 0 again as the old ones did
    later = send(["d", "e", "a"], 50.0)
    s = pipe.stats()
    assert s["rejected_device_limit"] == 5  # none more
    assert s["duplicates"] == 0  # no memory of the old "a" (nor of b, c) on reused ids
    assert len(pipe.devices) == 4  # the id space did not grow
    assert {pipe.devices.get(d) for d in "dea"} == set(ids_before.values())
    by: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for res in later:
        for i in range(len(res)):  # type: ignore[arg-type]
            name = pipe.devices.names[int(res.device[i])]  # type: ignore[attr-defined]
            spec = pipe.engine.config.labels[int(res.spec[i])]  # type: ignore[attr-defined]
            by.setdefault((name, spec), []).append(
                (int(res.count[i]), float(res.sum[i])))  # type: ignore[attr-defined]
    for d in "dea":  # each its own 5 readings: 50..54; count windows of 4 from its first
        assert sum(c for c, _ in by[(d, "10s")]) == 5
        assert sum(v for _, v in by[(d, "10s")]) == pytest.approx(260.0)
        assert sorted(c for c, _ in by[(d, "count:4")]) == [1, 4]
        assert pipe.ledger["accepted"][pipe.devices.get(d)] == 5
    rep = pipe.ledger_report(changed_only=False)
    assert sorted(n for n in rep["devices"] if n != "(no device)") == ["a", "d", "e"]  # type: ignore[union-attr]

    # a checkpoint keeps which ids are free; a restart does not hand them out twice
    clock.advance(2 * hour)
    pipe.emit()
    assert pipe.stats()["devices_released"] == 6
    pipe.save_checkpoint(tmp_path)
    again = EdgePipeline(cfg, clock)
    again.load_checkpoint(tmp_path)
    assert again.devices.names == pipe.devices.names
    assert again.devices.free == pipe.devices.free
    assert again.devices.intern("f") in set(ids_before.values())
    assert again.devices.intern("g") in set(ids_before.values())
    assert again.devices.intern("f") != again.devices.intern("g")


def test_devices_whose_every_reading_is_refused_also_give_their_ids_back_once_quiet(
        tmp_path: Path) -> None:
    """A device whose every reading is refused (its clock at 1970, values out of range) never
    had an event time, so its id was kept for good: churn of such devices filled the agent as
    churn of any device used to. Now it is released once nothing of it has been refused for
    ``validate.max_past`` either; and a device still sending, if only readings the agent
    refuses, keeps its id and its ledger row (it used to be released while it talked, its
    ledger starting again from 0). A restart keeps how long ago each refusal was."""
    minute = 60_000
    clock = ManualClock(now_ms=T + 60_000, monotonic_ms=5_000)
    engine = EngineConfig(windows=(WindowSpec(size_ms=10_000),),
                          time=EventTimeSpec(out_of_orderness_ms=0, allowed_lateness_ms=1_000,
                                             idle_timeout_ms=5_000))
    cfg = config(tmp_path, max_devices=10, max_past_ms=60 * minute, engine=engine)
    pipe = EdgePipeline(cfg, clock)

    def send(device: str, good: bool, n: int = 3) -> None:
        now = clock.now_ms()
        pipe.process([(f"devices/{device}/readings",
                       encode_single(device, "temperature",
                                     now - 5_000 + k * 1000 if good else 1_000 + k, 20.0 + k, k),
                       now) for k in range(n)])

    def settle(ms: int) -> None:
        for _ in range(ms // 10_000):
            clock.advance(10_000)
            pipe.emit()

    for d in ("x", "y"):
        send(d, good=False)  # stamped at 1970: refused as older than max_past
    send("w", good=True)
    send("c", good=True)
    assert pipe.stats()["devices_seen"] == 4
    settle(40 * minute)
    send("y", good=False)
    send("w", good=False)  # w now sends only what is refused: still there
    settle(30 * minute)  # x: 70 minutes quiet, never accepted; c: 70 minutes, its windows out
    s = pipe.stats()
    assert s["devices_released"] == 2
    assert {d for d in "xywc" if pipe.devices.get(d) is not None} == {"y", "w"}
    y, w = pipe.devices.get("y"), pipe.devices.get("w")
    assert y is not None
    assert w is not None
    assert pipe.ledger["rejected"][y] == 6
    assert pipe.ledger["accepted"][w] == 3
    assert pipe.ledger["rejected"][w] == 3

    pipe.save_checkpoint(tmp_path)
    clock = ManualClock(now_ms=clock.now_ms() + 5 * minute, monotonic_ms=1_000)  # a reboot
    pipe = EdgePipeline(cfg, clock)
    pipe.load_checkpoint(tmp_path)
    settle(20 * minute)  # y, w: 50 minutes quiet (the 5 minutes down not counted)
    assert {d for d in "yw" if pipe.devices.get(d) is not None} == {"y", "w"}
    settle(20 * minute)
    assert pipe.stats()["devices_released"] == 4
    assert pipe.stats()["devices_seen"] == 0
    for d in ("n1", "n2", "n3", "n4"):  # the four ids go to new devices; the space did not grow
        send(d, good=True)
    assert len(pipe.devices) == 4
    assert all(pipe.ledger["rejected"][pipe.devices.get(d)] == 0 for d in ("n1", "n2", "n3", "n4"))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sets(st.sampled_from("abcdefgh"), min_size=1, max_size=4),
                          st.sampled_from([20_000, 600_000, 7_200_000])),
                min_size=1, max_size=8))
def test_property_released_ids_never_mix_two_devices_readings(
        phases: list[tuple[set[str], int]]) -> None:
    """Whatever devices come and go, and however long they stay away (past validate.max_past
    or not): every reading accepted is in the windows of the device that sent it, exactly once,
    and none is taken for a duplicate of another device's reading on the same id."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        clock = ManualClock(now_ms=T + 60_000)
        engine = EngineConfig(windows=(WindowSpec(size_ms=10_000), WindowSpec.parse("count:3")),
                              time=EventTimeSpec(out_of_orderness_ms=0,
                                                 allowed_lateness_ms=1_000,
                                                 idle_timeout_ms=5_000))
        pipe = EdgePipeline(config(Path(tmp), max_devices=4, max_past_ms=3_600_000,
                                   engine=engine), clock)
        seq: dict[str, int] = {}
        sent: Counter[str] = Counter()
        got: dict[str, Counter[str]] = {"10s": Counter(), "count:3": Counter()}

        def collect(res: object) -> None:
            for i in range(len(res)):  # type: ignore[arg-type]
                name = pipe.devices.names[int(res.device[i])]  # type: ignore[attr-defined]
                spec = pipe.engine.config.labels[int(res.spec[i])]  # type: ignore[attr-defined]
                got[spec][name] += int(res.count[i])  # type: ignore[attr-defined]

        for devices, away in phases:
            now = clock.now_ms()
            batch = []
            for d in sorted(devices):
                for k in range(3):  # each device numbers its readings on, across phases
                    n = seq.get(d, 0)
                    seq[d] = n + 1
                    batch.append((f"devices/{d}/readings",
                                  encode_single(d, "temperature", now - 3_000 + k * 1000,
                                                float(n), n), now))
            before = pipe.ledger["accepted"].copy() if len(pipe.ledger["accepted"]) else None
            pipe.process(batch)
            for d in devices:
                i = pipe.devices.get(d)
                if i is not None:
                    was = int(before[i]) if before is not None and i < len(before) else 0
                    sent[d] += int(pipe.ledger["accepted"][i]) - was
            for _ in range(3):  # windows out (names read before any id can be released)
                clock.advance(10_000)
                collect(pipe.emit())
            clock.advance(away)
            collect(pipe.emit())
        s = pipe.stats()
        assert s["duplicates"] == 0
        assert s["readings_accepted"] == sum(sent.values())
        for spec, counts in got.items():
            assert counts == +sent, spec
