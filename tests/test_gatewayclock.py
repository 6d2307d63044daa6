"""A gateway's clock against the worker's, told from the time its health reports take: a
clock set but wrong (days behind, minutes ahead) is found and said, a backlog of reports
queued while the worker was down is not taken for one, and the gateway's health is filed at
the worker's time while its clock is off (at its own it looked long gone)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest

from cloud import status as cloud
from cloud.config import CloudConfig, InfluxConfig
from cloud.gatewayclock import CLOCK_OFF_MS, GatewayClocks
from cloud.ingest import SourceMessage
from cloud.sinks.base import MemorySink
from cloud.sinks.points import encode
from cloud.worker import CloudWorker
from devices.clock import ManualClock
from devices.contract import HealthReport, health_topic
from devices.mqtt import BrokerAddress
from devices.registry import Registry

T = 1_800_000_000_000
DAY = 86_400_000


def reports(clocks: GatewayClocks, gw: str, at: int, n: int, *, skew: int = 0,
            every: int = 5_000, delay: int = 40) -> tuple[int, list[int | None]]:
    """``n`` reports of ``gw`` from ``at`` on, its clock ``skew`` ahead, each taking
    ``delay``: (the worker's time after them, what each told)."""
    told = []
    for _ in range(n):
        told.append(clocks.report(gw, at - delay + skew, at))
        at += every
    return at, told


def edge_health(lines: list[str]) -> dict[tuple[str, int], dict[str, float]]:
    """The edge health points of line protocol: (gateway, time in ms) -> numeric fields."""
    out = {}
    for ln in lines:
        if not ln.startswith("pipeline,component=edge,"):
            continue
        key, fields, ts = ln.split(" ")
        gw = dict(t.split("=") for t in key.split(",")[1:])["gateway"]
        out[gw, int(ts)] = {k: float(v.rstrip("i")) for k, v in
                            (f.split("=") for f in fields.split(","))}
    return out


@pytest.mark.parametrize("skew", [-3 * DAY, -2 * CLOCK_OFF_MS, 5 * 60_000])
def test_a_clock_set_but_wrong_is_found_after_two_minutes_of_reports(skew: int) -> None:
    """Told after two minutes of reports; judged a minute later when the worker has fewer
    than three gateways (which clock is wrong, theirs or its, cannot be told then)."""
    clocks = GatewayClocks()
    at, told = reports(clocks, "gw", T, 24)  # 2 minutes of reports: not judged yet
    at, told = reports(clocks, "gw", at, 1)
    assert told == [-40]  # in sync: off by the least delay of its reports
    assert not clocks.off
    at, told = reports(clocks, "gw-2", at, 30, skew=skew)
    assert told[:23] == [None] * 23
    assert told[-1] == skew - 40
    assert not clocks.off
    at, told = reports(clocks, "gw-2", at, 12, skew=skew)
    assert clocks.off == {"gw-2": skew - 40}
    # set right: back once its wrong reports are out of the last 2.5 minutes
    at, told = reports(clocks, "gw-2", at, 40)
    assert told[-1] == -40
    assert not clocks.off


@pytest.mark.parametrize("drain_ms", [8, 2_500])
def test_reports_queued_while_the_worker_was_down_are_not_a_clock_off(drain_ms: int) -> None:
    """Twenty minutes of reports queued in the broker reach a restarted worker in two seconds,
    or over ten minutes behind its other work (each looks up to 20 minutes behind): not
    judged on them (drained faster than they were sent); the live ones after say the clock is
    right."""
    clocks = GatewayClocks()
    for k in range(240):  # sent every 5 s over 20 minutes, taken every drain_ms
        at = T + drain_ms * k
        clocks.report("gw", T - 1_200_000 + 5_000 * k, at)
        assert not clocks.off
    at, told = reports(clocks, "gw", at + 5_000, 60)
    assert told[-1] == -40
    assert not clocks.off


def fleet(clocks: GatewayClocks, skews: dict[str, int], at: int, rounds: int, *,
          every: int = 5_000, delay: int = 40) -> int:
    """``rounds`` rounds of one report from each gateway (its clock ``skews[gw]`` ahead of
    the worker's), each taking ``delay``: the worker's time after them."""
    for _ in range(rounds):
        for gw, skew in skews.items():
            clocks.report(gw, at - delay + skew, at)
        at += every
    return at


def test_a_worker_off_its_gateways_is_said_and_each_gateway_judged_against_its_peers(
        caplog: pytest.LogCaptureFixture) -> None:
    """The worker's host lost its time sync and runs 10 minutes fast (or the worker stays
    10 minutes behind everything, at its gateways' pace): every gateway looked 10 minutes
    behind, and "Gateway clock off" would have fired for the whole fleet. With three gateways
    or more told, their median clock is the reference: the worker is said to be off it, and
    only the gateway off its peers is (by how much it is off them); once the worker's clock
    is set right, against the worker's again."""
    caplog.set_level(logging.INFO, "fieldline.cloud")
    clocks = GatewayClocks()
    fast = 10 * 60_000
    skews = {f"gw-{i}": -fast for i in range(4)} | {"gw-bad": -fast - DAY}
    at = fleet(clocks, skews, T, 30)
    assert clocks.worker_off == -fast - 40
    assert clocks.off == {"gw-bad": -DAY}
    said = [r.getMessage() for r in caplog.records]
    assert sum("the gateways' clocks are 10 min behind the worker's (the median of 3)" in m
               for m in said) == 1, said
    off = [m for m in said if m.startswith("gateway gw-")]
    assert all("gw-bad" in m for m in off), off  # no gateway in sync with its peers named
    # the clocks are as they were (the fleet reckoned as told: not one by one, each report)
    assert sum("24.0 h behind its peers' (their median)" in m for m in off) == 1, off
    caplog.clear()
    at = fleet(clocks, {gw: s + fast for gw, s in skews.items()}, at, 40)  # host's clock set
    assert clocks.worker_off == 0
    assert clocks.off == {"gw-bad": -DAY - 40}
    assert any("agree with the worker's again" in r.getMessage() for r in caplog.records)
    # two gateways cannot tell which clock is wrong: against the worker's, as before
    pair = GatewayClocks()
    fleet(pair, {"a": -fast, "b": -fast}, T, 42)
    assert pair.worker_off == 0
    assert pair.off == {"a": -fast - 40, "b": -fast - 40}
    doc = {"state": "running", "ts": T, "clocks": {"off": 1, "off_by": {"gw-bad": -DAY},
                                          "worker_off_by": -fast}}
    v = cloud.assess(doc, T, alive=True)
    said = [m for _, m in v.attention]
    assert any(m.startswith("the gateways' clocks are 10 min behind the worker's (their "
                            "median): this host's clock is off") for m in said), said
    assert any("1 gateway clock is more than 60 s off their peers' (the median) (by the time "
               "their health reports take): gw-bad (24.0 h behind)" in m for m in said), said


def test_a_gateway_gone_quiet_is_not_said_to_be_off_for_good() -> None:
    """A gateway whose clock was off, then stopped reporting (unplugged, replaced): it was
    named in `cloud status` for as long as the worker ran. Forgotten 2.5 minutes on."""
    clocks = GatewayClocks()
    at = fleet(clocks, {"gw-off": -DAY, "gw-ok": 0}, T, 42)
    assert set(clocks.off) == {"gw-off"}
    at = fleet(clocks, {"gw-ok": 0}, at, 31)
    assert not clocks.off


def test_a_worker_files_the_health_of_a_gateway_whose_clock_is_off_at_its_own_time(
        tmp_path: Path) -> None:
    """The gateway's clock is a day behind: its health points were filed a day back (the
    dashboards and the "Gateway not reporting" rule took it for gone). Once told, they are
    filed at the worker's time with the offset and ``clock_off``, and `cloud status` says
    so; a gateway in sync keeps its own time and gets ``clock_off`` 0."""
    clock = ManualClock(T)
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path)
    class Acks:  # the source's side of the acks: what each gateway is told
        def __init__(self) -> None:
            self.told: dict[str, int | None] = {}

        async def ack(self, gateway: str, *_a: object, clock_ms: int | None = None,
                      **_k: object) -> bool:
            self.told[gateway] = clock_ms
            return True

    acks = Acks()
    worker = CloudWorker(cfg, clock=clock, registry=Registry(), sink=MemorySink(),
                         source=acks)  # type: ignore[arg-type]
    for k in range(42):  # told after 2 minutes, judged a minute on (two gateways)
        for gw, skew in (("gw-late", -DAY), ("gw-fine", 0)):
            rep = HealthReport(gateway=gw, ts=clock.now_ms() + skew,
                               gauges={"outbox_depth": 0})
            worker.handle(SourceMessage(0, k, health_topic(gw), rep.encode()))
        clock.advance(5_000)
    pipeline = edge_health(encode(worker.writer.pending()))
    late = sorted(ts for gw, ts in pipeline if gw == "gw-late")
    assert late[0] < T - DAY + 60_000  # its first reports: at its own time, not known yet
    assert pipeline["gw-late", late[0]] == {"outbox_depth": 0.0, "clock_off": 0.0}
    last = late[-1]
    assert last == clock.now_ms() - 5_000  # at the worker's
    assert pipeline["gw-late", last]["clock_off"] == 1.0
    assert pipeline["gw-late", last]["clock_offset_ms"] == -DAY
    fine = max(ts for gw, ts in pipeline if gw == "gw-fine")
    assert pipeline["gw-fine", fine]["clock_off"] == 0.0
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["clocks"] == {"off": 1, "off_by": {"gw-late": -DAY}, "worker_off_by": 0}
    v = cloud.assess(doc, clock.now_ms(), alive=True)
    assert "1 gateway clock is more than 60 s off the worker's" in v.attention[0][1]
    assert "gw-late (24.0 h behind)" in v.attention[0][1]
    # and each gateway is told (its `edge status` says it): in an ack of its own once told,
    # batches or none (one whose devices doubt its clock sends none)
    stop = asyncio.Event()
    stop.set()
    assert set(worker._acks) == {("gw-late", 0), ("gw-fine", 0)}
    asyncio.run(worker._acker(stop))
    assert acks.told == {"gw-late": -DAY, "gw-fine": 0}
    tells: dict[tuple[str, int], list[int]] = {}
    for _ in range(30):  # then once a minute, not at every report
        for gw in ("gw-late", "gw-fine"):
            rep = HealthReport(gateway=gw, ts=clock.now_ms() - DAY * (gw == "gw-late"),
                               gauges={"outbox_depth": 0})
            worker.handle(SourceMessage(0, 0, health_topic(gw), rep.encode()))
        for key in worker._acks:
            tells.setdefault(key, []).append(clock.now_ms())
        asyncio.run(worker._acker(stop))
        clock.advance(5_000)
    assert set(tells) == {("gw-late", 0), ("gw-fine", 0)}
    for at in tells.values():
        assert len(at) == 2
        assert 60_000 <= at[1] - at[0] <= 65_000
    # with every ack of its batches too; one not told yet is told nothing
    for gw in ("gw-late", "gw-fine", "gw-new"):
        worker._acks[gw, 7] = ([1], [], {}, [])
    acks.told.clear()
    asyncio.run(worker._acker(stop))
    assert acks.told == {"gw-late": -DAY, "gw-fine": 0, "gw-new": None}
    # and one whose batches are acknowledged gets no ack of its own: it was told with them
    for _ in range(13):
        for gw in ("gw-late", "gw-fine"):
            rep = HealthReport(gateway=gw, ts=clock.now_ms() - DAY * (gw == "gw-late"),
                               gauges={"outbox_depth": 0})
            worker.handle(SourceMessage(0, 0, health_topic(gw), rep.encode()))
        assert ("gw-late", 0) not in worker._acks
        worker._acks["gw-late", 7] = ([1], [], {}, [])
        asyncio.run(worker._acker(stop))
        clock.advance(5_000)
