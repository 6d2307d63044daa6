"""The fleet simulator: deterministic, shardable, and every declared fault shows in what a
subscriber receives from a real Mosquitto exactly as declared, and in the ground truth."""

from __future__ import annotations

import csv
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from fieldline.services import Mosquitto
from simulators.faults import FaultSpec
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher
from simulators.replay import ReplaySimulator, load_nab, load_skab, shift_to

START = 1_700_000_000_000
DATA = Path(os.environ.get("FIELDLINE_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))


def s(sec: int) -> int:
    return sec * 1000


DEVS = [f"gw-1-{p}{i:04d}" for i, p in zip(range(1, 7), "thpthp", strict=True)]
FAULTS = (
    FaultSpec(type="spike", devices=(DEVS[0],), at_ms=s(10), magnitude=5.0),
    FaultSpec(type="level_shift", devices=(DEVS[1],), at_ms=s(10), duration_ms=s(5),
              magnitude=3.0),
    FaultSpec(type="stuck", devices=(DEVS[2],), at_ms=s(10), duration_ms=s(5)),
    FaultSpec(type="drift", devices=(DEVS[3],), at_ms=s(10), duration_ms=s(10), magnitude=360.0),
    FaultSpec(type="dropout", devices=(DEVS[4],), at_ms=s(10), duration_ms=s(5)),
    FaultSpec(type="burst", devices=(DEVS[5],), at_ms=s(10), duration_ms=s(3), factor=4),
    FaultSpec(type="duplicate", devices=(DEVS[0],), at_ms=s(20)),
    FaultSpec(type="out_of_order", devices=(DEVS[1],), at_ms=s(20)),
    FaultSpec(type="clock_skew", devices=(DEVS[2],), at_ms=s(20), duration_ms=s(5),
              offset_ms=600_000),
    FaultSpec(type="clock_jump", devices=(DEVS[3],), at_ms=s(20), offset_ms=3_600_000),
    FaultSpec(type="malformed", devices=(DEVS[4],), at_ms=s(20)),
    FaultSpec(type="out_of_range", devices=(DEVS[5],), at_ms=s(20)),
    FaultSpec(type="straggler", devices=(DEVS[0],), at_ms=s(25), offset_ms=s(3)),
    FaultSpec(type="late", devices=(DEVS[1],), at_ms=s(25), offset_ms=s(8)),
)
TICKS = 40


def spec(faults: tuple[FaultSpec, ...] = FAULTS, **kw: object) -> FleetSpec:
    base: dict[str, object] = {
        "gateways": 1, "devices_per_gateway": 6, "disorder_fraction": 0.0, "seed": 5,
        "topic_template": "{gateway}/devices/{device}/readings", "faults": faults}
    base.update(kw)
    return FleetSpec(**base)  # type: ignore[arg-type]


def all_bytes(sim: FleetSimulator, ticks: int) -> list[tuple[str, str, bytes]]:
    out = [(gw, t, p) for tick in sim.ticks(ticks) for gw, msgs in tick.messages.items()
           for t, p in msgs]
    out += [(gw, t, p) for gw, msgs in sim.drain_held().messages.items() for t, p in msgs]
    return out


def test_same_seed_same_bytes_and_shards_add_up_to_the_fleet() -> None:
    every_fault = spec(gateways=3, payload="senml", sensors_per_device=2, spike_fraction=0.02,
                       disorder_fraction=0.1, malformed_fraction=0.01)
    a = all_bytes(FleetSimulator(every_fault, START), 60)
    b = all_bytes(FleetSimulator(every_fault, START), 60)
    assert a == b
    assert b"".join(p for _g, _t, p in a) == b"".join(p for _g, _t, p in b)
    shards = [all_bytes(FleetSimulator(every_fault, START, shard=(i, 2)), 60) for i in range(2)]
    for gw in ("gw-1", "gw-2", "gw-3"):
        whole = [x for x in a if x[0] == gw]
        parts = [x for part in shards for x in part if x[0] == gw]
        assert whole == parts
    other = all_bytes(FleetSimulator(spec(gateways=3, seed=6, payload="senml",
                                          sensors_per_device=2), START), 60)
    assert other != a


def collect(broker: Mosquitto, sim: FleetSimulator, ticks: int, truth: Path,
            gateway: str = "gw-1", topic: str = "{gateway}/devices/+/readings"
            ) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    ready = threading.Event()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, m: got.append((m.topic, bytes(m.payload)))
    sub.on_subscribe = lambda *_: ready.set()
    sub.connect("127.0.0.1", broker.port)
    sub.subscribe(topic.format(gateway=gateway), qos=1)
    sub.loop_start()
    assert ready.wait(10)
    pub = FleetPublisher(sim, {gateway: broker.address}, truth_path=truth)
    n = pub.run_fast(ticks)
    pub.close()
    deadline = time.monotonic() + 20
    while len(got) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.loop_stop()
    sub.disconnect()
    assert len(got) == n
    return got


@pytest.mark.integration
def test_every_fault_arrives_as_declared(mosquitto: Mosquitto, tmp_path: Path) -> None:
    truth_path = tmp_path / "truth.jsonl"
    faulty = FleetSimulator(spec(), START)
    got = collect(mosquitto, faulty, TICKS, truth_path)
    clean_sim = FleetSimulator(spec(faults=()), START, record=True)
    for _ in clean_sim.ticks(TICKS):
        pass
    clean = {(p.device, p.seq): p for p in clean_sim.published}
    offset = {p.device: (p.ts - START) % 1000 for p in clean_sim.published}

    def seq_at(device: str, sec: int) -> int:  # clean seq of a device's reading in second sec
        return next(q for (d, q), p in clean.items() if d == device and (p.ts - START) // 1000
                    == sec)

    rx: dict[str, list[dict[str, object] | None]] = defaultdict(list)
    payloads: dict[str, list[bytes]] = defaultdict(list)
    for topic, payload in got:
        dev = topic.split("/")[2]
        payloads[dev].append(payload)
        try:
            rx[dev].append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            rx[dev].append(None)
    by_seq = {d: {r["seq"]: r for r in rs if r} for d, rs in rx.items()}

    def diff(dev: str, sec: int) -> float:
        q = seq_at(dev, sec)
        return float(by_seq[dev][q]["value"]) - clean[(dev, q)].value  # type: ignore[arg-type]

    # spike: one reading off by the magnitude
    assert abs(abs(diff(DEVS[0], 10)) - 5.0) < 1e-3
    assert abs(diff(DEVS[0], 11)) < 1e-9
    # level shift: +3 for five seconds, then gone
    assert all(abs(diff(DEVS[1], t) - 3.0) < 1e-3 for t in range(10, 15))
    assert abs(diff(DEVS[1], 15)) < 1e-9
    # stuck: the value of the first second, five times
    stuck = {by_seq[DEVS[2]][seq_at(DEVS[2], t)]["value"] for t in range(10, 15)}
    assert stuck == {clean[(DEVS[2], seq_at(DEVS[2], 10))].value}
    # drift: 360 per hour = 0.1 per second since the fault began
    assert all(abs(diff(DEVS[3], t) - 0.1 * (t - 10)) < 1e-3 for t in range(10, 20))
    # dropout: five seconds of readings never arrive, but their numbers are used
    lost = [seq_at(DEVS[4], t) for t in range(10, 15)]
    assert not set(lost) & set(by_seq[DEVS[4]])
    assert seq_at(DEVS[4], 15) in by_seq[DEVS[4]]
    # burst: four readings per second for three seconds
    per_sec: dict[int, int] = defaultdict(int)
    for r in rx[DEVS[5]]:
        if r:
            per_sec[(int(r["ts"]) - START - offset[DEVS[5]]) // 1000] += 1  # type: ignore[call-overload]
    assert [per_sec[t] for t in range(9, 14)] == [1, 4, 4, 4, 1]
    # duplicate: the same payload twice
    dup = [p for p in payloads[DEVS[0]] if orjson.loads(p)["seq"] == seq_at(DEVS[0], 20)]
    assert len(dup) == 2
    assert dup[0] == dup[1]
    # out of order: the reading of second 20 arrives after the one of second 21
    order = [r["seq"] for r in rx[DEVS[1]] if r]
    assert order.index(seq_at(DEVS[1], 20)) > order.index(seq_at(DEVS[1], 21))
    # clock skew: ten minutes ahead for five seconds
    for t in (19, 20, 24, 25):
        q = seq_at(DEVS[2], t)
        shift = int(by_seq[DEVS[2]][q]["ts"]) - clean[(DEVS[2], q)].ts  # type: ignore[call-overload]
        assert shift == (600_000 if 20 <= t < 25 else 0)
    # clock jump: an hour ahead from second 20 on, for good
    for t in (19, 20, 30, 39):
        q = seq_at(DEVS[3], t)
        shift = int(by_seq[DEVS[3]][q]["ts"]) - clean[(DEVS[3], q)].ts  # type: ignore[call-overload]
        assert shift == (3_600_000 if t >= 20 else 0)
    # malformed: in its place, a payload that is not JSON
    idx = [i for i, r in enumerate(rx[DEVS[4]]) if r is None]
    assert len(idx) == 1
    assert seq_at(DEVS[4], 20) not in by_seq[DEVS[4]]
    # out of range: outside the kind's physical range
    kind = Catalog()["pressure"]
    v = float(by_seq[DEVS[5]][seq_at(DEVS[5], 20) + 9]["value"])  # type: ignore[arg-type]
    assert v < kind.low or v > kind.high
    # straggler: held three seconds; late: held eight seconds
    order0 = [r["seq"] for r in rx[DEVS[0]] if r]
    assert order0.index(seq_at(DEVS[0], 25)) > order0.index(seq_at(DEVS[0], 27))
    assert order0.index(seq_at(DEVS[0], 25)) < order0.index(seq_at(DEVS[0], 29))
    order1 = [r["seq"] for r in rx[DEVS[1]] if r]
    assert order1.index(seq_at(DEVS[1], 25)) > order1.index(seq_at(DEVS[1], 32))
    # ground truth, written as it happened: one record per declared fault, at its time
    truth = [json.loads(x) for x in truth_path.read_text().splitlines()]
    declared = {(f.type, f.devices[0]) for f in FAULTS}
    recorded = {(t["type"], t["device"]) for t in truth}
    assert declared == recorded
    for t in truth:
        when = t.get("start_ms", t.get("ts"))
        assert isinstance(when, int)
        fs = next(f for f in FAULTS if (f.type, f.devices[0]) == (t["type"], t["device"]))
        assert fs.at_ms is not None
        expect = START + fs.at_ms + (offset[t["device"]] if "ts" in t else 0)
        skew = 600_000 if t["type"] == "clock_skew" and "ts" in t else 0
        assert when - skew == expect or (t["type"] == "out_of_range" and when == expect)


needs_data = pytest.mark.skipif(
    not (DATA / "nab").is_dir() or not (DATA / "skab").is_dir(),
    reason=f"recorded data sets not found at {DATA} (set FIELDLINE_DATA to the shared/data "
           "folder to run the replay tests)")


@needs_data
@pytest.mark.integration
def test_replay_of_nab_and_skab_arrives_with_values_and_labels(mosquitto: Mosquitto,
                                                                tmp_path: Path) -> None:
    nab_file = "realKnownCause/machine_temperature_system_failure.csv"
    skab_file = "valve1/0.csv"
    nab = load_nab(DATA / "nab", nab_file)
    skab = load_skab(DATA / "skab", skab_file)
    shift = shift_to([nab, skab], START)
    sim = ReplaySimulator([nab, skab], START, speed=None, shift_ms=shift, chunk=3_000)
    truth_path = tmp_path / "truth.jsonl"
    got = collect(mosquitto, sim, sim.remaining_ticks(), truth_path,  # type: ignore[arg-type]
                  gateway="replay-1", topic="devices/+/readings")
    rx: dict[str, list[dict[str, object]]] = defaultdict(list)
    for topic, payload in got:
        rx[topic.split("/")[1]].append(orjson.loads(payload))
    # NAB: every value of the file, in order
    with (DATA / "nab" / "data" / nab_file).open() as fh:
        nab_rows = list(csv.DictReader(fh))
    assert [r["value"] for r in rx[nab.device]] == [float(r["value"]) for r in nab_rows]
    ts = [int(r["ts"]) for r in rx[nab.device]]  # type: ignore[call-overload]
    # recorded times, moved by whole weeks (this file repeats an hour on 2014-01-07: its clock
    # goes back); weekday and time of day as recorded
    assert shift % (7 * 86_400_000) == 0
    assert max(ts) <= START
    assert ts == [load_time(r["timestamp"]) + shift for r in nab_rows]
    assert ts[1] - ts[0] == 300_000  # five minutes apart, as recorded, at any speed
    # SKAB: every column of every row
    with (DATA / "skab" / "data" / skab_file).open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=";"))
    got_skab: dict[str, list[float]] = defaultdict(list)
    for r in rx[skab.device]:
        got_skab[str(r["metric"])].append(float(r["value"]))  # type: ignore[arg-type]
    assert got_skab["current"] == [float(r["Current"]) for r in rows]
    assert got_skab["volume_flow_raterms"] == [float(r["Volume Flow RateRMS"]) for r in rows]
    assert len(got_skab) == 8
    # labels, in replay time
    truth = [json.loads(x) for x in truth_path.read_text().splitlines()]
    windows = json.loads((DATA / "nab" / "labels" / "combined_windows.json").read_text())
    nab_windows = [t for t in truth if t["type"] == "label_window"]
    assert len(nab_windows) == len(windows[nab_file])
    for t, (lo, _hi) in zip(nab_windows, windows[nab_file], strict=True):
        assert t["start_ms"] == load_time(lo) + shift
    anomalous = [r for r in rows if float(r["anomaly"]) == 1.0]
    assert len([t for t in truth if t["type"] == "label_row"]) == len(anomalous)
    changes = [r for r in rows if float(r["changepoint"]) == 1.0]
    assert len([t for t in truth if t["type"] == "changepoint"]) == len(changes)


def load_time(text: str) -> int:
    from simulators.replay import parse_time

    return parse_time(text)


def test_a_rebooting_device_counts_from_zero_again_and_the_agent_keeps_every_reading(
        tmp_path: Path) -> None:
    """The ``reboot`` fault: the device's sequence numbers start again at 0 (its clock goes on),
    every 10 s here. Its readings through the agent's pipeline (device clocks trusted): every
    one accepted, none taken for a repeat of the boot before, and each reboot in the truth."""
    from devices.clock import ManualClock
    from devices.mqtt import BrokerAddress
    from edge.agent import EdgePipeline
    from edge.config import EdgeConfig
    from edge.engine import EngineConfig
    from edge.eventtime import EventTimeSpec
    from edge.windows import WindowSpec

    faults = (FaultSpec(type="reboot", devices=(DEVS[0],), at_ms=s(10), every_ms=s(10)),)
    sim = FleetSimulator(spec(faults, devices_per_gateway=2), START, record=True)
    msgs = [(t, p, START) for _gw, t, p in all_bytes(sim, TICKS)]
    seqs = [r.seq for r in sim.published if r.device == DEVS[0]]
    assert seqs == [*range(10), *range(10), *range(10), *range(10)]
    assert [r["type"] for r in sim.truth if r["device"] == DEVS[0]] == ["reboot"] * 3
    pipe = EdgePipeline(EdgeConfig(
        gateway="gw-1", intake_broker=BrokerAddress(host="127.0.0.1", port=1),
        uplink_broker=BrokerAddress(host="127.0.0.1", port=1), state_dir=tmp_path,
        topics=["+/devices/+/readings"], device_topic_level=2, max_past_ms=10**12,
        engine=EngineConfig(windows=(WindowSpec(size_ms=10_000),), time=EventTimeSpec(
            out_of_orderness_ms=2_000, allowed_lateness_ms=30_000, idle_timeout_ms=10**9))),
        ManualClock(now_ms=START + s(TICKS)))
    for lo in range(0, len(msgs), 7):  # in micro-batches, as an agent's ticks take them
        pipe.process(msgs[lo:lo + 7])
    assert pipe.counters["duplicates"] == 0
    assert pipe.counters["readings_accepted"] == len(sim.published)
