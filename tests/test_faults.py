"""The fault catalogue of RELIABILITY.md, short tier: real Mosquitto, InfluxDB, agent and worker
processes on loopback, every wait bounded; each test ends with the oracle's lost = unexpected =
mismatched = 0 and the gateway's conservation law exact."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from cloud.sinks.influx_v1 import InfluxV1Client
from edge.status import STATUS_FILE
from fieldline.oracle import check, expected_windows, export_windows
from fieldline.services import InfluxDB, Mosquitto, free_port
from tests.rig import LABEL, WINDOW_MS, Rig

pytestmark = pytest.mark.integration


def finish(rig: Rig, *, shed: int = 0) -> dict[str, int]:
    """Every published reading in InfluxDB exactly once (less what the ledger says was shed by
    policy), the oracle clean, and the gateway's ledger balanced."""
    n = len(rig.published)
    got = rig.wait_settled(n - shed)
    report = rig.oracle()
    led = rig.ledger_when(lambda d: d.get("windows_pending", 1) == 0, 30)
    check_laws(led)
    if shed == 0:
        assert report.clean, str(report)
        assert got == n
        assert led["readings_accepted"] == n  # generated = in windows: no reject, late or shed
    return led


def check_laws(led: dict[str, int]) -> None:
    """Both of the gateway ledger's laws, exactly, whatever happened to the agent."""
    assert led["readings_received"] == (led["readings_accepted"] + led["rejected"]
                                        + led["late_dropped"] + led["duplicates"]), led
    assert led["windows_emitted"] == (led["windows_acked"] + led["windows_shed"]
                                      + led["windows_pending"]), led


def wait_for(cond: Callable[[], bool], timeout_s: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, "condition not reached in time"
        time.sleep(0.1)
    return time.monotonic() - t0


def test_r1_worker_sigkilled_repeatedly(rig: Rig) -> None:
    rig.start_chain(fleet_s=14)
    recoveries = []
    for _ in range(3):
        time.sleep(3.5)
        rig.kill_worker()  # SIGKILL, mid-stream
        before = rig.in_influx()
        rig.start_worker()
        recoveries.append(wait_for(lambda b=before: rig.in_influx() > b, 20))
    rig.wait_fleet()
    finish(rig)
    assert max(recoveries) < 5.0, recoveries  # back to writing within 5 s of each restart


def test_alerts_and_incidents_are_not_opened_twice_across_worker_kills(rig: Rig) -> None:
    """Pattern rules and the detectors' incidents keep their state through SIGKILLs of the
    worker (within its first minute: its detectors are saved every 5 minutes, none yet).

    A rule true of every window (`count` above 0) opens one alert per series and never a
    second one; one that needs ten windows in a row (the kills come within the first ten)
    opens at each series' first window, as without the kills: a run in progress goes on
    counting. Before the rules' journal, each restart forgot the alerts open and opened new
    ones (the first left open for good), and the ten-window rule never opened.

    Every device's readings are above its registry limit all along: one detector incident per
    series, opened at its first window and open at the end. Before the open incidents were
    kept with each acknowledgement, each restart opened every incident again at its next
    window (three per series, two left open for good)."""
    from dataclasses import replace

    from devices.registry import Registry
    from simulators.fleet import FleetSimulator

    Registry([replace(d, low=None, high=-1e6) for d in FleetSimulator(rig.spec, 0).registry()]
             ).to_csv(rig.tmp / "devices.csv")
    text = rig.cloud_cfg.read_text().replace(
        "[worker]\n", f'[worker]\nregistry = "{rig.tmp}/devices.csv"\n', 1)
    for name, count in (("always", 1), ("ten", 10)):
        text += (f'\n[[rules]]\nname = "{name}"\nkind = "consecutive"\nfield = "count"\n'
                 f'above = 0\ncount = {count}\n')
    rig.cloud_cfg.write_text(text)
    rig.start_chain(fleet_s=14)
    for _ in range(2):
        time.sleep(4)
        rig.kill_worker()  # SIGKILL: no clean stop, no periodic save
        rig.start_worker()
    rig.wait_fleet()
    finish(rig)
    doc: Any = rig.influx.query('SELECT "opened", "state" FROM "alerts" WHERE "source" = '
                                '\'rule\' GROUP BY "name", "device", "metric"')
    series = doc["results"][0].get("series", [])
    assert len(series) == 2 * rig.spec.devices_per_gateway, series  # one sensor each
    for s in series:
        assert [v[2] for v in s["values"]] == ["open"], s
    doc = rig.influx.query(f'SELECT first("count") FROM "aggregates" WHERE "window" = '
                           f'\'{LABEL}\' GROUP BY "device"')
    first = {s["tags"]["device"]: s["values"][0][0] for s in doc["results"][0]["series"]}
    ten = {s["tags"]["device"]: s["values"][0][1] for s in series if s["tags"]["name"] == "ten"}
    assert ten == first
    doc = rig.influx.query('SELECT "name", "state" FROM "alerts" WHERE "source" = '
                           '\'detector\' GROUP BY "device", "metric"')
    series = doc["results"][0].get("series", [])
    assert len(series) == rig.spec.devices_per_gateway, series
    for s in series:
        assert [v[1:] for v in s["values"]] == [["threshold", "open"]], s
    assert {s["tags"]["device"]: s["values"][0][0] for s in series} == first


def test_r2_partition_then_heal_drains_fast(rig: Rig) -> None:
    rig.start_chain(fleet_s=16)
    time.sleep(3)
    assert rig.agent is not None
    rss0 = psutil.Process(rig.agent.pid).memory_info().rss
    rig.proxy.set_mode("blackhole")  # gateway <-> cloud partition
    partition = 6.0
    time.sleep(partition)
    rss1 = psutil.Process(rig.agent.pid).memory_info().rss
    status = rig.agent_status()
    backlog = rig.in_influx()
    rig.proxy.set_mode("pass")
    # the backlog (6 s of results) drains at >= 5x the live rate: within 6 s / 5 of a reconnect
    drain = wait_for(lambda: rig.in_influx() >= backlog + 0.8 * partition * 120, 30)
    rig.wait_fleet()
    finish(rig)
    assert status.get("outbox_depth", 0) >= 0
    reconnect_allowance = 3.0  # paho's backoff after the broken connection
    assert drain <= partition / 5 + reconnect_allowance, drain
    assert (rss1 - rss0) / 2**20 < 15  # the backlog waits on disk, not in the agent's memory


def test_a_link_slower_than_the_json_results_keeps_up_compressed(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A congested cellular uplink (2.5 KB/s each way, 400 ms) carries less than this fleet's
    results as JSON (~3 KB/s): once the worker's acks say it reads zlib the agent sends them
    compressed, keeps up, drains a 12 s partition over the same link, and loses nothing."""
    rig = Rig(tmp_path, mosquitto_factory, influx_db)
    cfg = rig.gateway_cfg.read_text()
    for old, new in (('ack_timeout = "3s"', 'ack_timeout = "30s"'),  # as shipped
                     ('health_interval = "500ms"', 'health_interval = "2s"'),
                     ('ledger_interval = "500ms"', 'ledger_interval = "2s"')):
        assert old in cfg
        cfg = cfg.replace(old, new)
    rig.gateway_cfg.write_text(cfg)
    try:
        rig.proxy.set_mode("slow", latency_ms=400, rate_bps=2500)
        rig.start_chain(fleet_s=40)
        time.sleep(10)
        rig.proxy.set_mode("blackhole")
        time.sleep(12)
        rig.proxy.set_mode("slow", latency_ms=400, rate_bps=2500)
        rig.wait_fleet()
        finish(rig)
        h = rig.health("edge")
        print(f"slow link: {h['batch_json_bytes']:,} bytes of JSON results sent as "
              f"{h['batch_stored_bytes']:,}; {h['batches_compressed']} of "
              f"{h['batches_stored']} batches compressed, {h['batches_resent']} re-sent")
        assert h["batch_stored_bytes"] < h["batch_json_bytes"] / 2
        # JSON only until the worker's first ack came back over the slow link
        assert h["batches_compressed"] >= 0.8 * h["batches_stored"]
    finally:
        rig.stop()


def test_r2b_partition_longer_than_the_outbox_sheds_by_policy(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A partition the agent has noticed before the first window closes: every batch it
    shed (the oldest first, once 64 KiB of them wait) is lost for good and counted, nothing
    else. (A batch published before the agent noticed the partition waits in the link and
    its ack comes after all: counted again as acknowledged, not shed; whether any such batch
    is shed depends on timing, so it is not this test's subject: tests/test_outbox.py.)"""
    rig = Rig(tmp_path, mosquitto_factory, influx_db, devices=40,
              outbox='max_bytes = "64KiB"\npolicy = "drop_oldest"')
    try:
        rig.start_worker()
        rig.start_agent()
        rig.wait_agent_subscribed()
        rig.proxy.set_mode("reset")  # the link drops: its connection is cut, at once
        status = tmp_path / "edge-state" / STATUS_FILE
        deadline = time.monotonic() + 30
        while orjson.loads(status.read_bytes())["links"]["uplink"]["connected"]:
            assert time.monotonic() < deadline, "the agent never noticed its uplink cut"
            time.sleep(0.1)
        rig.proxy.set_mode("blackhole")  # and stays down: connecting again gets no answer
        rig.run_fleet(16)
        rig.wait_fleet()
        time.sleep(3)  # idle devices close their last windows into the full outbox
        rig.proxy.set_mode("pass")
        healed = time.time_ns() // 1_000_000
        led = rig.ledger_when(lambda d: d["time"] > healed + 1_000
                              and d.get("windows_pending", 1) == 0, 60)
        shed = led["readings_shed"]
        assert shed > 0, "the outbox was meant to overflow"
        finish(rig, shed=shed)
        report = rig.oracle()
        assert report.unexpected == 0
        assert report.mismatched == 0
        assert report.lost == shed  # exactly what the ledger reports as shed, nothing else
        assert rig.in_influx() + shed == len(rig.published)
    finally:
        rig.stop()


def test_r3_cloud_broker_sigkilled(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
                                   influx_db: InfluxV1Client) -> None:
    rig = Rig(tmp_path, mosquitto_factory, influx_db, broker_persistence=True)
    try:
        rig.start_chain(fleet_s=14)
        for _ in range(2):
            time.sleep(4)
            rig.cloud_broker.kill()
            time.sleep(1)
            rig.cloud_broker.restart()
        rig.wait_fleet()
        finish(rig)  # the uplink loses nothing: the outbox re-sends what was not acknowledged
    finally:
        rig.stop()


def test_r3_gateway_broker_sigkilled_residual_is_measured(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """Readings the gateway broker acknowledged to devices but had not delivered when it was
    SIGKILLed are lost with it, unless its snapshot had them (autosave every second). This test
    measures that residual and bounds it to what one autosave interval can hold."""
    rig = Rig(tmp_path, mosquitto_factory, influx_db, broker_persistence=True)
    try:
        rig.start_chain(fleet_s=12)
        time.sleep(5)
        rig.gw_broker.kill()
        time.sleep(1)
        rig.gw_broker.restart()
        rig.wait_fleet()
        n = len(rig.published)
        got = rig.wait_settled(n, timeout_s=40)
        report = rig.oracle()
        rate = 120  # readings/s published by this fleet
        (tmp_path / "r3-gateway-residual.txt").write_text(f"lost {report.lost} of {n}\n")
        print(f"R3 gateway broker SIGKILL: lost {report.lost} of {n} readings")
        assert report.unexpected == 0
        assert report.mismatched == 0
        assert report.lost <= 2 * rate  # at most what a 1 s autosave window (+ in flight) holds
        assert got == n - report.lost
        # and the ledger says so: what was lost is each device's gap (issue 12, item 7)
        led = rig.ledger_when(lambda d: d.get("readings_accepted", 0) >= got, 20)
        check_laws(led)
        assert led["readings_gap"] == report.lost, (str(report), led)
    finally:
        rig.stop()


def test_r4_r13_agent_sigkilled_at_random_points_with_torn_tails(rig: Rig) -> None:
    """The agent is killed mid-window again and again; before each restart a torn, unsynced
    record is appended to its outbox and intake log. Every reading lands exactly once and the
    windows that spanned a crash are whole, never partial overwrites."""
    rng = random.Random(4)
    rig.start_chain(fleet_s=16)
    state = rig.tmp / "edge-state"
    for _ in range(4):
        time.sleep(rng.uniform(1.5, 3.0))
        rig.kill_agent()
        for d, pattern in (("outbox", "*.seg"), ("intake", "*.wal")):
            segs = sorted((state / d).glob(pattern))
            if segs:
                with segs[-1].open("ab") as fh:  # what a power cut mid-write leaves behind
                    fh.write(b"\x17\x00\x00\x00torn-and-never-synced")
        rig.start_agent()
    rig.wait_fleet()
    finish(rig)
    assert rig.health("edge").get("outbox_torn_records", 0) >= 1


def test_r5_influxdb_down_paused_erroring(tmp_path: Path,
                                          mosquitto_factory: Callable[..., Mosquitto]) -> None:
    port = free_port()
    influx = InfluxDB(tmp_path / "influx", port=port).start()
    client = InfluxV1Client(influx.url, "r5")
    client.create_database()
    rig = Rig(tmp_path, mosquitto_factory, client, influx_proxy=True)
    try:
        rig.start_chain(fleet_s=22)
        time.sleep(2)
        outages = []
        for fault in ("down", "paused", "http_503", "hang"):
            before = rig.health("cloud").get("write_errors", 0)
            if fault == "down":
                influx.kill()
            elif fault == "paused":
                influx.pause()
            else:
                assert rig.influx_proxy is not None
                rig.influx_proxy.set_mode(fault)
            time.sleep(3)
            depth = rig.agent_status().get("outbox_depth", 0)
            if fault == "down":
                influx = InfluxDB(tmp_path / "influx", port=port).start()
            elif fault == "paused":
                influx.resume()
            else:
                rig.influx_proxy.set_mode("pass")  # type: ignore[union-attr]
            outages.append((fault, depth, before))
            time.sleep(1.5)
        rig.wait_fleet()
        finish(rig)
        # nothing was acknowledged without a confirmed write: results waited in the outbox
        assert all(depth > 0 for _f, depth, _b in outages), outages
        errors = rig.health("cloud").get("write_errors", 0)
        assert 0 < errors < 60, errors  # capped backoff: no busy loop over 12 s of outages
    finally:
        rig.stop()
        influx.stop()


def test_agent_state_wiped_then_restarted_loses_nothing(rig: Rig) -> None:
    """Issue 12, item 3: the agent's state directory is lost between two runs (an SD card
    replaced, a disk cleaned). Its batch numbers start again at 0; the cloud must not take the
    new batches for the ones it wrote before (it did: half a run vanished, ledgers balanced)."""
    import shutil

    rig.start_chain(fleet_s=5)
    rig.wait_fleet()
    first = list(rig.published)
    assert rig.wait_settled(len(first)) == len(first)
    rig.ledger_when(lambda d: d.get("windows_pending", 1) == 0, 30)
    rig._kill(rig.agent, signal.SIGTERM)
    shutil.rmtree(rig.tmp / "edge-state")  # everything the agent knew
    rig.start_agent()
    rig.wait_agent_subscribed()
    rig.run_fleet(5)
    rig.wait_fleet()
    everything = first + list(rig.published)
    got = rig.wait_settled(len(everything), timeout_s=60)
    report = check(expected_windows(everything, WINDOW_MS), export_windows(rig.influx, LABEL))
    assert report.clean, str(report)
    assert got == len(everything)
    check_laws(rig.ledger_when(lambda d: d.get("windows_pending", 1) == 0, 30))


def test_r10_overload_upstream_of_the_agent_is_counted(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """Issue 12, item 7 (R10): at 5x what the agent takes, the gateway broker's queue limit
    trips and it drops messages it acknowledged to devices. Nothing may vanish without a trace:
    each device's sequence gaps are counted on the ledger (``gap``), the broker's own drop
    counter is in health, and every reading a device got a PUBACK for is in a window or
    counted: lost (by the oracle) = the ledger's gaps = what the broker says it dropped.
    (``make soak``: the same for a minute.)"""
    overload(tmp_path, mosquitto_factory, influx_db, seconds=12)


def overload(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
             influx_db: InfluxV1Client, *, seconds: float) -> None:
    rig = Rig(tmp_path, mosquitto_factory, influx_db, devices=50, interval_ms=50,
              gw_broker={"max_queued": 1_500, "sys_interval_s": 1},
              intake_extra="max_pending = 100",  # the agent's Receive Maximum
              agent_extra="max_batch_messages = 20")  # 20 per 100 ms tick: 200 msg/s
    try:
        rig.start_worker()
        rig.start_agent()
        rig.wait_agent_subscribed()
        rig.run_fleet(seconds)  # 1,000 msg/s: 5x what the agent takes
        rig.wait_fleet()
        assert rig.pub is not None
        assert rig.sim is not None
        # the agent works off what the broker kept; then every device sends once more, so a
        # loss at the end of a device's run is a gap before its last reading too
        rig.ledger_when(lambda d: d.get("broker_stored", 0) >= 0 and _steady(rig), 60)
        rig.pub.publish_tick(rig.sim.tick())
        assert rig.pub.flush(10)
        n = len(rig.published)
        assert rig.pub.counters["acked"] >= n  # every reading was acknowledged to its device
        led = rig.ledger_when(lambda d: d.get("readings_received", 0) + d.get("readings_gap", 0)
                              >= n and d.get("windows_pending", 1) == 0, 60)
        got = rig.wait_settled(n - led["readings_gap"])
        report = rig.oracle()
        check_laws(led)
        assert report.unexpected == report.mismatched == 0, str(report)
        assert led["readings_gap"] > 0.3 * n  # the overload did drop (the broker's queue cap)
        assert report.lost == led["readings_gap"], (str(report), led)
        assert led["readings_received"] + led["readings_gap"] == n, led
        assert got == led["readings_accepted"] == n - led["readings_gap"]
        dropped = rig.ledger_when(lambda d: d.get("broker_dropped", -1) >= led["readings_gap"],
                                  15)["broker_dropped"]
        assert dropped == led["readings_gap"], (dropped, led)
    finally:
        rig.stop()


def _steady(rig: Rig) -> bool:
    """The agent took all the broker holds for it: received stopped moving for 2 s."""
    a = rig.ledger().get("readings_received", -1)
    time.sleep(2)
    return a == rig.ledger().get("readings_received", -2)


@contextlib.contextmanager
def tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``mnt`` (the tests run as root, as CI does): a disk that really fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """16 MiB under the agent's state directory."""
    with tmpfs(tmp_path / "edge-state", "16m") as mnt:
        yield mnt


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte (ENOSPC for everyone else); called again, take what was
    freed meanwhile (an agent's checkpoint replacing its previous one frees the old file)."""
    filler = disk / "filler"
    block = b"\0" * 65536
    with filler.open("ab", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(block)
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 512)
    return filler


def keep_full(disk: Path, seconds: float, until: Callable[[], bool] = lambda: True,
              limit_s: float = 30) -> Path:
    """Fill ``disk`` and keep it full (what its users free is taken again) for ``seconds``,
    then until ``until()`` says so (within ``limit_s`` in all); returns the filler file."""
    start = time.monotonic()
    filler = fill(disk)
    while time.monotonic() - start < seconds or (not until()
                                                 and time.monotonic() - start < limit_s):
        time.sleep(0.2)
        fill(disk)
    return filler


def test_r12_disk_full_under_the_agent_loses_nothing(
        tmp_path: Path, small_disk: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """Issue 12, item 4 (R12): the agent's state directory fills up (ENOSPC) for 8 s while the
    fleet publishes. A failed intake-log append leaves its messages unacknowledged and retried,
    a failed outbox write rebuilds from disk as after a crash, a failed checkpoint keeps the
    log: nothing is lost, the ledger balances, health shows it, and the agent resumes by itself
    when space returns."""
    rig = Rig(tmp_path, mosquitto_factory, influx_db)
    assert rig.gateway_cfg.read_text().count(str(small_disk)) == 1
    try:
        rig.start_chain(fleet_s=16)
        time.sleep(3)
        # full for 8 s, then (still full) until a health report made since says so: the worker
        # writes health as background points, up to 5 s behind its results
        h: dict[str, Any] = {}
        status: list[tuple[int, str]] = []

        def told() -> bool:
            h.update(rig.health("edge"))
            if not status:  # and the operator at the gateway is told so (edge/status.py)
                status.append(rig.edge_status())
            return bool(h.get("disk_blocked"))

        keep_full(small_disk, 8, until=told).unlink()
        code, text = status[0]
        assert code == 2, text
        assert f"the filesystem under {small_disk} is full" in text, text
        rig.wait_fleet()
        led = finish(rig)
        assert h.get("disk_errors", 0) > 0, h  # it noticed, and said so
        assert h.get("disk_blocked") == 1, h
        assert rig.health("edge").get("disk_blocked") == 0  # and got going again by itself
        assert led["readings_gap"] == 0
    finally:
        rig.stop()


@contextlib.contextmanager
def sd_card(mnt: Path, image: Path) -> Iterator[Path]:
    """An ext4 filesystem at ``mnt`` mounted as Raspberry Pi OS mounts its card's root
    (``errors=remount-ro``): after an error the kernel makes it read-only under the processes
    using it, as it does when a worn SD card fails (the tests run as root, as CI does)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem image needs root (CI runs as root)")
    with image.open("wb") as fh:
        fh.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt.mkdir(parents=True)
    mount = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)],
                           capture_output=True, text=True, check=False)
    if mount.returncode != 0:  # a container without loop devices
        pytest.skip(f"cannot mount a filesystem image here: {mount.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def card_fails(mnt: Path) -> None:
    """An error on the card's filesystem: the kernel remounts it read-only at once."""
    dev = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
               if line.split()[1] == str(mnt))
    Path(f"/sys/fs/ext4/{Path(dev).name}/trigger_fs_error").write_text("the card failed\n")


def card_repaired(mnt: Path, image: Path) -> None:
    """What the operator does: unmount, fsck (repairs: exit 1), mount again."""
    subprocess.run(["umount", str(mnt)], check=True)
    fsck = subprocess.run(["e2fsck", "-f", "-y", str(image)], capture_output=True, text=True,
                          check=False)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr
    subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(mnt)], check=True)


def test_r12_sd_card_gone_read_only_under_the_agent_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """The filesystem under the agent's state directory fails while the fleet publishes and the
    kernel remounts it read-only (a worn SD card: on a Pi the commonest end of a gateway's
    disk), which `statvfs` does not show. The agent holds its intake (readings wait in the
    gateway broker), `fieldline edge status` names the read-only filesystem and what repairs
    it; the operator stops the agent, checks the filesystem, starts the agent again: every
    reading reaches InfluxDB once, the ledger balanced. What the card had not been told to keep
    (nothing the agent acknowledged or shipped) goes with the error, as on a power cut."""
    with sd_card(tmp_path / "edge-state", tmp_path / "card.img") as card:
        rig = Rig(tmp_path, mosquitto_factory, influx_db)
        assert rig.gateway_cfg.read_text().count(str(card)) == 1
        try:
            rig.start_chain(fleet_s=20)
            time.sleep(4)
            card_fails(card)
            seen: list[tuple[int, str]] = []

            def told() -> bool:
                seen.append(rig.edge_status())
                return "is read-only" in seen[-1][1]

            wait_for(told, 30)
            code, text = seen[-1]
            assert code == 2, text
            assert f"the filesystem under {card} is read-only" in text, text
            assert "Stop it, check the filesystem (fsck)" in text, text
            time.sleep(2)  # the fleet goes on publishing into the gateway broker
            assert rig.agent is not None
            rig.agent.send_signal(signal.SIGTERM)  # the operator: stop, fsck, start
            assert rig.agent.wait(30) is not None
            card_repaired(card, tmp_path / "card.img")
            rig.start_agent()
            rig.wait_fleet()
            led = finish(rig)
            assert led["readings_gap"] == 0
            assert "Read-only file system" in (tmp_path / "agent.log").read_text()
        finally:
            rig.stop()


def test_r12_disk_full_under_the_workers_state_directory_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """The worker's state directory fills up for 8 s while the fleet publishes: the worker
    saves its dedup state there before every round of acks. Before, the first save that failed
    ended the worker's acking for good: it went on writing to InfluxDB, acknowledged nothing,
    and the gateway's outbox grew until it shed. Now the failure is counted and logged and the
    acks go out (their batches are in InfluxDB): nothing is lost and nothing waits."""
    with tmpfs(tmp_path / "cloud-state", "4m") as disk:
        rig = Rig(tmp_path, mosquitto_factory, influx_db)
        assert rig.cloud_cfg.read_text().count(str(disk)) == 1
        try:
            rig.start_chain(fleet_s=16)
            time.sleep(3)
            filler = keep_full(disk, 8)
            h = rig.health("cloud")
            filler.unlink()
            rig.wait_fleet()
            finish(rig)
            assert h.get("state_save_errors", 0) > 0, h  # it met the full disk, and said so
        finally:
            rig.stop()


def test_r7_gateway_clock_at_1970_then_stepped_forward_and_back_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """Issue 12, item 10 (R7): the agent's wall clock reads 1970 (a Pi booted without network
    time) while the fleet publishes, is then set right, then steps back three hours and is set
    right again. Before, every reading judged by the 1970 clock was rejected as clock_future
    and lost. Now they are held (quarantined, counted), re-judged once the clock is sane, and
    every reading reaches InfluxDB; health says the clock is unsynced while it is."""
    clock_file = tmp_path / "gateway-clock-offset-ms"
    set_clock = clock_file.write_text
    set_clock(str(90_000 - time.time_ns() // 1_000_000))  # 1970-01-01T00:01:30Z
    rig = Rig(tmp_path, mosquitto_factory, influx_db, wallclock=clock_file)
    try:
        rig.start_chain(fleet_s=16)
        time.sleep(4)
        h_1970 = rig.health("edge")
        set_clock("0")  # network time arrives
        time.sleep(4)
        set_clock(str(-3 * 3_600_000))  # and steps back three hours
        time.sleep(3)
        h_back = rig.health("edge")
        set_clock("0")
        rig.wait_fleet()
        led = finish(rig)
        for h in (h_1970, h_back):
            assert h.get("clock_unsynced") == 1, h
            assert h.get("quarantine_held", 0) > 0, h
        h = rig.health("edge")
        assert h["clock_unsynced"] == 0, h
        assert h["quarantine_held"] == 0, h
        assert h["clock_unsynced_episodes"] == 2, h
        assert h["messages_quarantined"] == h["quarantine_released"] > 0, h
        assert led["rejected"] == 0
        assert led["readings_gap"] == 0
    finally:
        rig.stop()


def test_r7b_gateway_clock_set_days_behind_its_devices_then_mended_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A gateway clock past validate.clock_floor but three days behind (a Pi booted from the
    time it saved when it was switched off, where a firewall lets MQTT through but not NTP):
    it never steps back, so the guard did not doubt it, and every reading of its devices,
    which stamp their own time, was rejected as clock_future and lost. Now the devices agree
    it is behind: it is not trusted (health and `edge status` say why), their messages are
    held, and once network time mends it every reading reaches InfluxDB."""
    clock_file = tmp_path / "gateway-clock-offset-ms"
    clock_file.write_text(str(-3 * 86_400_000))
    rig = Rig(tmp_path, mosquitto_factory, influx_db, wallclock=clock_file)
    try:
        rig.start_chain(fleet_s=16)
        time.sleep(5)
        held = rig.health("edge")
        text = rig.edge_status()[1]  # (by this host's clock: the status looks 3 days old)
        clock_file.write_text("0")  # network time arrives
        rig.wait_fleet()
        led = finish(rig)
        assert held.get("clock_unsynced") == 1, held
        assert held.get("quarantine_held", 0) > 0, held
        assert ("the gateway's clock is not trusted (the gateway clock reads "
                in text), text
        assert "3.0 days behind its devices' clocks (12 devices' readings 3.0 days ahead" in text
        h = rig.health("edge")
        assert h["clock_unsynced"] == 0, h
        assert h["clock_unsynced_episodes"] == 1, h
        assert h["messages_quarantined"] == h["quarantine_released"] > 0, h
        assert led["rejected"] == 0
        assert led["readings_gap"] == 0
    finally:
        rig.stop()


def test_r11_a_forged_ack_deletes_nothing(rig: Rig) -> None:
    """Issue 12, item 11: anyone who may publish on a gateway's ack topic (no ACL, a leaked
    credential) acknowledges every sequence number, with no proof, with made-up proofs, for
    the current incarnation and for none. Before, the agent deleted those batches from its
    outbox and they never reached InfluxDB. Now an ack must name the digest of the batch the
    worker received: the forgeries are counted (acks_unproven) and nothing is lost."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from devices.contract import ack_topic, encode_ack

    rig.start_agent()
    rig.wait_agent_subscribed()
    rig.run_fleet(10)
    wait_for(lambda: rig.agent_status().get("outbox_depth", 0) >= 3, 20)
    depth = rig.agent_status()["outbox_depth"]
    forger = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         protocol=mqtt.MQTTv5)
    forger.connect("127.0.0.1", rig.cloud_broker.port)
    forger.loop_start()
    seqs = list(range(0, 5_000))
    for payload in (encode_ack(seqs), encode_ack([], seqs),
                    encode_ack(seqs, proofs=dict.fromkeys(seqs, "0" * 32)),
                    encode_ack(seqs, proofs={s: f"{s:032x}" for s in seqs})):
        forger.publish(ack_topic("gw-1"), payload, qos=1).wait_for_publish(5)
    forger.loop_stop()
    forger.disconnect()
    time.sleep(1.5)
    assert rig.agent_status()["outbox_depth"] >= depth  # nothing left the outbox
    rig.start_worker()
    rig.wait_fleet()
    finish(rig)
    h = rig.health("edge")
    assert h["acks_unproven"] >= 2 * depth, h


def test_r8_an_hour_replayed_twice_leaves_influxdb_unchanged(rig: Rig, tmp_path: Path) -> None:
    """RELIABILITY R8 by the operator's own tool: an hour of a recorded device (two sensors
    at 1 Hz, ending 20 s ago) is replayed with `fieldline replay`, then replayed again. The
    second time its last minute is still within allowed lateness, and its numbering starts
    again from 0. Before, that minute was folded a second time (revised windows, double
    counts); now every copy is a duplicate or late, and InfluxDB is exactly as it was."""
    from tests.rig import CMD

    end = time.time_ns() // 1_000_000 - 20_000
    csv = tmp_path / "boiler-7.csv"
    csv.write_text("timestamp,temperature,humidity\n" + "".join(
        f"{end - (3_599 - k) * 1_000},{20 + (k % 50) / 10},{40 + (k % 30) / 3:.3f}\n"
        for k in range(3_600)))
    n = 7_200

    def replay() -> None:
        subprocess.run([*CMD, "replay", "--csv", str(csv), "--broker", rig.gw_broker.url,
                        "--gateway", "gw-1", "--gateway-config", str(rig.gateway_cfg),
                        "--event-time", "recorded", "--speed", "max"],
                       check=True, timeout=120, capture_output=True)

    def aggregates() -> list[list[object]]:
        doc = rig.influx.query('SELECT * FROM "aggregates" GROUP BY *')
        return sorted(([s["tags"], *v] for s in doc["results"][0].get("series", [])
                       for v in s["values"]), key=repr)

    rig.start_worker()
    rig.start_agent()
    rig.wait_agent_subscribed()
    replay()
    assert rig.wait_settled(n) == n
    led = rig.ledger_when(lambda d: d.get("readings_received") == n
                          and d.get("windows_pending", 1) == 0, 60)
    first = aggregates()
    assert led["readings_accepted"] == n
    replay()
    led = rig.ledger_when(lambda d: d.get("readings_received") == 2 * n
                          and d.get("windows_pending", 1) == 0, 60)
    time.sleep(2)  # anything revised has reached InfluxDB by now
    check_laws(led)
    assert led["readings_accepted"] == n  # nothing of the second copy was folded
    assert led["duplicates"] + led["late_dropped"] == n
    assert led["duplicates"] > 0  # the last minute was still open to revision: recognised
    assert aggregates() == first
    assert rig.in_influx() == n


def test_r12_disk_full_under_influxdb_and_the_gateway_broker_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """RELIABILITY R12, the other disks: InfluxDB's (its WAL write fails: HTTP 500) and the
    gateway broker's persistence fill up for 8 s while the fleet publishes. The worker keeps
    retrying and acknowledges nothing it could not write (the agent keeps it all in its
    outbox), the broker keeps serving from memory; neither crashes. InfluxDB 1.6 keeps failing
    on its WAL after the space returns, until it is restarted, as the worker's log says to:
    then every reading is in InfluxDB once."""
    with tmpfs(tmp_path / "influx", "64m") as idisk, \
            tmpfs(tmp_path / "mosquitto-0", "16m") as bdisk:  # the rig's first broker: gw
        influx = InfluxDB(idisk / "db").start()
        client = InfluxV1Client(influx.url, "r12")
        client.create_database()
        rig = Rig(tmp_path, mosquitto_factory, client, broker_persistence=True)
        try:
            rig.start_chain(fleet_s=16)
            time.sleep(3)
            fillers = [fill(idisk), fill(bdisk)]
            time.sleep(8)
            for f in fillers:
                f.unlink()
            influx.stop()  # the operator's restart, as the worker's error says
            influx = InfluxDB(idisk / "db", port=influx.port).start()
            rig.wait_fleet()
            finish(rig)
            assert rig.health("cloud")["write_errors"] > 0  # it did hit the full disk
            assert rig.gw_broker.running  # it kept serving on a full disk
        finally:
            rig.stop()
            client.close()
            influx.stop()


def test_device_ids_that_churn_never_fill_the_agent(rig: Rig) -> None:
    """Devices come and go (replaced sensors, asset tags passing a dock door): six devices
    report, fall silent for good, and six others take their place, with max_devices 6 and
    validate.max_past 10 s. The second six used to be refused for good (device_limit: the
    gateway had seen six ids); now the first six give their ids up once silent past max_past,
    and every reading of all twelve is in InfluxDB, none refused, per device."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from devices.codecs import encode_single

    cfg = rig.gateway_cfg.read_text()
    cfg = cfg.replace('allowed_lateness = "60s"', 'allowed_lateness = "2s"')
    cfg = cfg.replace('[intake]', 'max_devices = 6\n[intake]', 1)
    rig.gateway_cfg.write_text(cfg + '\n[validate]\nmax_past = "10s"\n')
    rig.start_worker()
    rig.start_agent()
    rig.wait_agent_subscribed()
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", rig.gw_broker.port)
    c.loop_start()
    sent: dict[str, int] = {}

    def report(devices: list[str], seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            now = int(time.time() * 1000)
            for d in devices:
                n = sent.get(d, 0)
                c.publish(f"gw-1/devices/{d}/readings",
                          encode_single(d, "temperature", now, 20.0 + n % 7, n), qos=1
                          ).wait_for_publish(10)
                sent[d] = n + 1
            time.sleep(0.2)

    try:
        report([f"old-{i}" for i in range(6)], 3)
        time.sleep(14)  # silent past idle_timeout + lateness, then past max_past (10 s)
        report([f"new-{i}" for i in range(6)], 3)
    finally:
        c.loop_stop()
        c.disconnect()
    total = sum(sent.values())
    assert rig.wait_settled(total, timeout_s=60) == total
    doc = rig.influx.query('SELECT sum("count") FROM "aggregates" GROUP BY "device"')
    got = {s["tags"]["device"]: int(s["values"][0][1]) for s in doc["results"][0]["series"]}
    assert got == sent
    led = rig.ledger_when(lambda d: d.get("readings_accepted", 0) >= total, 30)
    check_laws(led)
    h = rig.health("edge")
    assert h.get("rejected_device_limit", 0) == 0, h
    assert h.get("devices_released", 0) >= 6, h
