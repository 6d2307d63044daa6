"""The cloud worker's stages against a real InfluxDB (no MQTT: messages are handed in)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.config import CloudConfig, InfluxConfig
from cloud.ingest import SourceMessage
from cloud.rules import Rule, parse_rules
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.worker import CloudWorker
from devices.contract import (
    HealthReport,
    ResultBatch,
    ResultColumns,
    SupersededRows,
    health_topic,
    results_topic,
)
from devices.mqtt import BrokerAddress
from devices.registry import Device, Registry
from fieldline.services import Mosquitto

pytestmark = pytest.mark.integration

T = 1_700_000_000_000


def session_batch(seq: int, start: int, count: int, sup: list[int]) -> ResultBatch:
    one = np.array([0], np.int64)
    res = ResultColumns(
        device=one * 0, metric=one * 0, start=np.array([start], np.int64),
        width=np.array([5_000], np.int64), rev=np.array([seq], np.int64),
        count=np.array([count], np.int64), sum=np.array([20.0 * count]),
        min=np.array([19.0]), max=np.array([21.0]), mean=np.array([20.0]),
        m2=np.array([0.5]), first_ts=np.array([start], np.int64), first=np.array([19.0]),
        last_ts=np.array([start + 4_999], np.int64), last=np.array([21.0]),
        spec=one * 0, pct=np.array([[20.0, 21.0]]),
        sk_keys=np.array([150, 152], np.int64), sk_counts=np.array([count - 1, 1], np.int64),
        sk_offsets=np.array([0, 2], np.int64),
        superseded=SupersededRows(np.zeros(len(sup), np.int64), np.zeros(len(sup), np.int64),
                                  np.zeros(len(sup), np.int64), np.array(sup, np.int64))
        if sup else None)
    return ResultBatch(gateway="gw-1", seq=seq, watermark=0, sent_ms=T, devices=["dev-1"],
                       metrics=["temperature"], results=res, specs=["session:30s"],
                       percentiles=[0.5, 0.99], alpha=0.01)


def test_percentiles_labels_and_superseded_sessions(influx_db: InfluxV1Client) -> None:
    reg = Registry([Device(device_id="dev-1", gateway="gw-1", site="hall", kind="temperature")])
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url=influx_db.url, database=influx_db.database)),
        registry=reg, source=object())  # type: ignore[arg-type]

    async def scenario() -> None:
        worker.handle(SourceMessage(0, 1, results_topic("gw-1"),
                                    session_batch(0, T + 10_000, 4, []).encode()))
        await worker.writer.flush(None)
        # a late reading moved the session's start: new identity, the old one withdrawn
        worker.handle(SourceMessage(0, 2, results_topic("gw-1"),
                                    session_batch(1, T + 8_000, 5, [T + 10_000]).encode()))
        await worker.writer.flush(None)

    asyncio.run(scenario())
    doc = influx_db.query('SELECT "count", "p50", "p99", "rate", "site" FROM "aggregates" '
                          'WHERE "window" = \'session:30s\'')
    assert isinstance(doc, dict)
    rows = doc["results"][0]["series"][0]["values"]
    assert rows == [[T + 8_000, 5, 20.0, 21.0, 2.0 / 4.999, "hall"]]
    assert worker.stats()["superseded"] == 1
    assert worker.writer.points_deleted == 2  # the aggregate and its (absent) anomaly point


def test_an_older_revision_never_overwrites_a_newer_one(influx_db: InfluxV1Client) -> None:
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url=influx_db.url, database=influx_db.database)),
        registry=Registry(), source=object())  # type: ignore[arg-type]
    newer = session_batch(5, T + 10_000, 7, [])  # rev 5, count 7
    older = session_batch(4, T + 10_000, 3, [])  # rev 4 of the same window, arriving later

    async def scenario() -> None:
        worker.handle(SourceMessage(0, 1, results_topic("gw-1"), newer.encode()))
        await worker.writer.flush(None)
        worker.handle(SourceMessage(0, 2, results_topic("gw-1"), older.encode()))
        await worker.writer.flush(None)

    asyncio.run(scenario())
    doc = influx_db.query('SELECT "count", "rev" FROM "aggregates"')
    assert isinstance(doc, dict)
    assert doc["results"][0]["series"][0]["values"] == [[T + 10_000, 7, 5]]
    assert worker.stats()["stale_revisions"] == 1


def test_worker_keeps_its_detector_state_across_a_restart(tmp_path: Path) -> None:
    """A worker saves its detectors to state_dir (at stop, and every few minutes); the next one
    starts from there instead of learning every series again."""
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path)
    first = CloudWorker(cfg, source=object(), sink=object())  # type: ignore[arg-type]
    for k in range(5):
        first.handle(SourceMessage(0, k, results_topic("gw-1"),
                                   session_batch(k, T + 60_000 * k, 4, []).encode()))
    assert len(first.detection.series) == 1
    asyncio.run(first._save_detection())
    second = CloudWorker(cfg, source=object(), sink=object())  # type: ignore[arg-type]
    assert second.detection.series.keys == first.detection.series.keys
    s = second.stats()  # what it holds, in its health
    assert s["detector_series"] == 1
    assert 0 < s["detector_state_mb"] < 1
    assert s["series_forgotten"] == 0
    a, b = first.detection.snapshot()["arrays"], second.detection.snapshot()["arrays"]
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_a_rule_alert_open_when_the_worker_dies_still_resolves_after_its_restart(
        tmp_path: Path) -> None:
    """What each batch changed in the rules' state goes to state_dir once its points are
    written, before that batch is acknowledged: a worker killed right after (no clean stop, no
    periodic save) leaves it there, and the next one resolves the alert instead of leaving it
    open for good, or goes on counting a run no alert came of yet. A state whose points are
    not written yet is not saved."""
    from cloud.sinks.base import MemorySink

    hot = parse_rules([{"name": "hot", "kind": "consecutive", "field": "mean", "above": 25.0,
                        "count": 2}])
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path, rules=hot)

    class Broker:
        def __init__(self) -> None:
            self.acked: list[int] = []

        async def ack(self, gateway: str, acked: list[int], rejected: list[int], inc: int,
                      proofs: object, conflicts: object, clock_ms: object) -> bool:
            self.acked += acked
            return True

    def batch(k: int, mean: float) -> SourceMessage:
        b = tumbling_batch(k + 1, ["dev-1"], T + 10_000 * k, [10], [mean], [0])
        return SourceMessage(0, k, results_topic("gw-1"), b.encode())

    broker = Broker()
    first = CloudWorker(cfg, source=broker, sink=MemorySink())  # type: ignore[arg-type]

    async def live() -> None:
        for k in range(3):
            first.handle(batch(k, 30.0))
        await first._save_rules()
        assert not (tmp_path / "rules.json").exists()  # its points are not written yet
        await first.writer.flush(None)
        stop = asyncio.Event()
        stop.set()
        await first._acker(stop)  # one round of acks, the rules' state saved before it

    asyncio.run(live())
    assert broker.acked == [1, 2, 3]
    assert first.stats()["rule_alerts_opened"] == 1
    assert first.stats()["rule_alerts_open"] == 1
    # killed here: no clean stop, no periodic save
    second = CloudWorker(cfg, source=broker, sink=MemorySink())  # type: ignore[arg-type]
    assert second.stats()["rule_alerts_open"] == 1  # restored
    second.handle(batch(3, 20.0))
    assert second.stats()["rule_alerts_resolved"] == 1
    assert second.stats()["rule_alerts_opened"] == 0
    assert second.stats()["rule_alerts_open"] == 0

    # a batch that opens nothing moves a run on all the same: acknowledged, its part of the
    # run is on disk (the journal) before the ack, and the next worker goes on counting
    async def one(w: CloudWorker, k: int, mean: float) -> None:
        w.handle(batch(k, mean))
        await w.writer.flush(None)
        stop = asyncio.Event()
        stop.set()
        await w._acker(stop)

    asyncio.run(one(second, 4, 30.0))  # run 1 of 2: nothing opens
    assert broker.acked[-1] == 5
    assert second.stats()["rule_alerts_opened"] == 0
    third = CloudWorker(cfg, source=broker, sink=MemorySink())  # type: ignore[arg-type]
    asyncio.run(one(third, 5, 30.0))  # run 2 of 2
    assert third.stats()["rule_alerts_opened"] == 1


def test_incidents_opened_or_resolved_since_the_last_detector_save_survive_a_kill(
        tmp_path: Path) -> None:
    """The detectors' state is saved every 5 minutes, an incident is written with its batch.
    A worker killed between two saves used to come back with the incidents of its last save:
    one opened since stayed open in InfluxDB for good (nothing knew it any more), one
    resolved since was resolved a second time. The open incidents are kept with the rules'
    state (journaled before each ack, rules configured or not): the next worker reopens the
    first, which then resolves, and closes the second. A state dir from before (a detector
    snapshot, no rules' state) has its snapshot's open incidents adopted."""
    from cloud.sinks.base import MemorySink

    reg = Registry([Device(device_id=f"dev-{i}", gateway="gw-1", site="hall",
                           kind="temperature", high=25.0) for i in (1, 2, 3)])
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path)

    class Broker:
        async def ack(self, *_a: object, **_k: object) -> bool:
            return True

    def worker() -> tuple[CloudWorker, MemorySink]:
        sink = MemorySink(strict=True)
        return CloudWorker(cfg, registry=reg, source=Broker(), sink=sink), sink  # type: ignore[arg-type]

    def feed(w: CloudWorker, ks: range, mean: float, dev: str = "dev-1") -> None:
        async def go() -> None:
            for k in ks:
                b = tumbling_batch(k + 1, [dev], T + 10_000 * k, [10], [mean], [0])
                w.handle(SourceMessage(0, k, results_topic("gw-1"), b.encode()))
            await w.writer.flush(None)
            stop = asyncio.Event()
            stop.set()
            await w._acker(stop)  # one round of acks: what they changed is on disk before

        asyncio.run(go())

    def states(sink: MemorySink) -> list[tuple[str, int, object]]:
        return sorted((dict(tags)["device"], ts, f["state"])
                      for (m, tags, ts), f in sink.points.items() if m == "alerts")

    first, _ = worker()
    feed(first, range(5), 20.0)
    asyncio.run(first._save_detection())  # the periodic save: no incident yet
    feed(first, range(5, 7), 30.0)  # opens one
    assert first.stats()["alerts_opened"] == 1
    # killed here
    second, sink = worker()
    feed(second, range(7, 10), 20.0)
    assert states(sink) == [("dev-1", T + 50_000, "resolved")]
    feed(second, range(10, 15), 20.0, "dev-2")
    feed(second, range(15, 17), 30.0, "dev-2")  # opens another ...
    asyncio.run(second._save_detection())  # ... saved open
    feed(second, range(17, 20), 20.0, "dev-2")  # and resolved
    assert second.stats()["alerts_resolved"] == 2
    # killed here
    third, sink = worker()
    feed(third, range(20, 25), 20.0, "dev-2")
    assert third.stats()["alerts_resolved"] == 0  # not a second time
    assert not third.detection.open_by_subject()
    # a state dir of the code before: the detectors' snapshot (one open) and no rules' state
    feed(third, range(25, 30), 20.0, "dev-3")
    feed(third, range(30, 32), 30.0, "dev-3")
    asyncio.run(third._save_detection())
    for name in ("rules.json", "rules.journal"):
        (tmp_path / name).unlink(missing_ok=True)
    fourth, sink = worker()
    assert fourth.parts[0].rules.incidents == fourth.detection.open_by_subject() != {}
    feed(fourth, range(32, 35), 20.0, "dev-3")
    assert states(sink) == [("dev-3", T + 300_000, "resolved")]


def test_a_batch_redelivered_after_its_dedup_mark_was_not_saved_counts_once_in_the_rules(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dedup state could not be saved (a nearly full disk: the rules' small journal
    append went through, the dedup snapshot did not), the acks went out, one was lost, the
    worker restarted: the batch came again and was taken again. Its incidents are the ones
    the rules' state already counted (the open incidents are kept with it): opened again, a
    site rule would count them twice and keep its alert open after every device was back to
    normal (tests/test_rules.py has the rules taking an incident twice)."""
    from cloud.sinks.base import MemorySink

    reg = Registry([Device(device_id=f"dev-{i}", gateway="gw-1", site="hall",
                           kind="temperature", high=25.0) for i in (1, 2)])
    site = parse_rules([{"name": "hall_hot", "kind": "site", "event": "anomaly", "devices": 2,
                         "within": "1m"}])
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path, rules=site)

    class Broker:
        async def ack(self, *_a: object, **_k: object) -> bool:
            return True

    def feed(w: CloudWorker, ks: range, mean: float) -> None:
        async def go() -> None:
            for k in ks:
                b = tumbling_batch(k + 1, ["dev-1", "dev-2"], T + 10_000 * k, [10, 10],
                                   [mean, mean], [0, 0])
                w.handle(SourceMessage(0, k, results_topic("gw-1"), b.encode()))
            await w.writer.flush(None)
            stop = asyncio.Event()
            stop.set()
            await w._acker(stop)

        asyncio.run(go())

    def worker() -> CloudWorker:
        return CloudWorker(cfg, registry=reg, source=Broker(), sink=MemorySink())  # type: ignore[arg-type]

    def full(path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    first = worker()
    monkeypatch.setattr(first.dedup, "save", full)
    feed(first, range(5), 20.0)
    feed(first, range(5, 7), 30.0)  # both devices hot: the site's alert opens
    assert first.stats()["rule_alerts_opened"] == 1
    assert first.counters["state_save_errors"] > 0  # the dedup state was not saved
    # killed here; the last batch's ack was lost: it comes again
    second = worker()
    assert second.stats()["rule_alerts_open"] == 1
    feed(second, range(5, 7), 30.0)
    assert second.stats()["rule_alerts_opened"] == 0
    feed(second, range(7, 12), 20.0)  # both back to normal
    assert second.stats()["rule_alerts_resolved"] == 1
    assert second.stats()["rule_alerts_open"] == 0
    assert not second.parts[0].rules.site_live


def test_a_sighup_reads_the_rules_again(tmp_path: Path) -> None:
    """``systemctl reload``: the worker reads its rules again from its config; a rule removed
    has its open alert resolved with the next batch, the new state goes to disk at once (a
    restart does not resolve it a second time); a config that cannot be read keeps the rules
    before, counted."""
    from cloud.sinks.base import MemorySink
    from devices.errors import ConfigError

    hot = {"name": "hot", "kind": "consecutive", "field": "mean", "above": 25.0, "count": 1}
    cold = {"name": "cold", "kind": "consecutive", "field": "mean", "below": 0.0, "count": 1}
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path, rules=parse_rules([hot]))
    w = CloudWorker(cfg, source=object(), sink=MemorySink())  # type: ignore[arg-type]
    now: list[object] = [[cold]]

    def source() -> list[Rule]:
        if isinstance(now[0], Exception):
            raise now[0]
        return parse_rules(now[0])

    w.rules_source = source

    def batch(k: int) -> SourceMessage:
        b = tumbling_batch(k + 1, ["dev-1"], T + 10_000 * k, [10], [30.0], [0])
        return SourceMessage(0, k, results_topic("gw-1"), b.encode())

    async def go() -> None:
        w.handle(batch(0))
        await w.writer.flush(None)
        await w._save_rules()
        assert w.stats()["rule_alerts_open"] == 1
        w.request_reload()
        w._check_registry()
        assert [r.name for r in w.config.rules] == ["cold"]
        w.handle(batch(1))  # hot's alert resolved with it
        assert w.stats()["rule_alerts_resolved"] == 1
        await w.writer.flush(None)
        await w._save_rules()
        now[0] = ConfigError("rules[0].kind", "must be one of ...")
        w.request_reload()
        w._check_registry()
        assert w.stats()["rule_reload_errors"] == 1
        assert [r.name for r in w.config.rules] == ["cold"]

    asyncio.run(go())
    again = CloudWorker(replace(cfg, rules=parse_rules([cold])), source=object(),
                        sink=MemorySink())  # type: ignore[arg-type]
    again.handle(batch(2))
    assert again.stats()["rule_alerts_resolved"] == 0  # resolved once, before the restart
    assert again.stats()["rule_alerts_open"] == 0


def test_a_rule_that_can_never_fire_is_named_in_the_status_and_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A rule whose metric is misspelt judges no window: once the worker has taken 1,000
    results it names the rule in its status (``fieldline cloud status`` says WARNING, with
    the metrics that came) and logs it once; a rule that judges them is not named."""
    from cloud import status as cloud_status
    from cloud.sinks.base import MemorySink
    from cloud.worker import RULES_IDLE_AFTER

    rules = parse_rules([
        {"name": "typo", "kind": "consecutive", "metric": "temprature", "above": 80.0},
        {"name": "hot", "kind": "consecutive", "metric": "temperature", "above": 80.0}])
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path, rules=rules)
    w = CloudWorker(cfg, source=object(), sink=MemorySink())  # type: ignore[arg-type]
    devices = [f"dev-{i}" for i in range(100)]

    def status() -> tuple[int, str]:
        w.write_status("running")
        return cloud_status.status_command(tmp_path, as_json=False, now_ms=w.clock.now_ms())

    k = 0
    while w.counters["results_in"] < RULES_IDLE_AFTER:
        assert "typo" not in status()[1]  # not before it had its chance
        b = tumbling_batch(k + 1, devices, T + 10_000 * k, [10] * 100, [20.0] * 100, [0] * 100)
        w.handle(SourceMessage(0, k + 1, results_topic("gw-1"), b.encode()))
        k += 1
    with caplog.at_level("WARNING"):
        code, text = status()
        status()
    assert code == cloud_status.WARNING, text
    assert ("rule 'typo' has judged none of the 1,000 results since the worker started: no "
            "result has metric 'temprature' (seen: temperature); it cannot fire") in text, text
    assert "'hot'" not in text
    assert caplog.text.count("rule typo has judged none") == 1, caplog.text


RULES = parse_rules([{"name": "hot", "kind": "consecutive", "field": "mean", "above": 1e9},
                     {"name": "silent", "kind": "absence", "after": "1h"}])


def test_a_partition_moves_with_its_rules_state() -> None:
    """On JetStream a partition's snapshot carries its rules' state to its next owner (runs,
    silences and open alerts went on from nothing there)."""
    from cloud.ingest import PartitionEvent
    from cloud.sinks.base import MemorySink

    class Partitioned:
        per_partition_state = True
        partitions = 2

    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), rules=RULES)
    a = CloudWorker(cfg, source=Partitioned(), sink=MemorySink())  # type: ignore[arg-type]
    a._on_partition(PartitionEvent(1, True, epoch=1))
    for k in range(5):
        a.handle(SourceMessage(1, k + 1, results_topic("gw-1"),
                               session_batch(k, T + 60_000 * k, 4, []).encode(), epoch=1))
    rules = a.parts[1].rules.snapshot()["d"]
    assert [e for e in rules if e[0] == "last_end" and e[1][0] == "silent"], rules
    b = CloudWorker(cfg, source=Partitioned(), sink=MemorySink())  # type: ignore[arg-type]
    b._on_partition(PartitionEvent(1, True, snapshot=a.parts[1].snapshot_bytes(), position=5,
                                   epoch=1))
    assert b.parts[1].rules.snapshot()["d"] == rules


@pytest.mark.parametrize("damage", [b"", b"\0" * 64, b'{"gateways": {"gw-1": ', b"\xc1\xff"])
def test_a_worker_starts_on_damaged_state_files(tmp_path: Path, damage: bytes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """dedup.json and detect.npz cut short or zeroed by a failing disk: the worker starts
    without them (saying so) instead of failing at every start; the dedup file is kept."""
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path, rules=RULES)
    first = CloudWorker(cfg, source=object(), sink=object())  # type: ignore[arg-type]
    first.handle(SourceMessage(0, 0, results_topic("gw-1"),
                               session_batch(0, T, 4, []).encode()))
    first.dedup.save(tmp_path / "dedup.json")
    (tmp_path / "dedup.json").write_bytes(damage)
    (tmp_path / "detect.npz").write_bytes(damage)
    (tmp_path / "rules.json").write_bytes(damage)
    with caplog.at_level("WARNING"):
        second = CloudWorker(cfg, source=object(), sink=object())  # type: ignore[arg-type]
    assert "dedup state" in caplog.text
    assert "detector state" in caplog.text
    assert "rule state" in caplog.text
    assert (tmp_path / "dedup.json.unreadable").read_bytes() == damage
    second.handle(SourceMessage(0, 1, results_topic("gw-1"),
                                session_batch(1, T + 60_000, 4, []).encode()))
    assert second.stats()["batches_in"] == 1


def test_results_of_a_device_registered_to_another_gateway_are_refused(
        influx_db: InfluxV1Client) -> None:
    """Issue 12, item 11: gw-1 sends results of its own dev-2 and of dev-1, which the registry
    assigns to gw-2 (a misconfigured or compromised gateway). dev-1's rows and withdrawals
    are refused and counted; dev-2's are written; the batch is acknowledged (it was used)."""
    reg = Registry([Device(device_id="dev-1", gateway="gw-2", site="yard", kind="temperature"),
                    Device(device_id="dev-2", gateway="gw-1", site="hall", kind="temperature")])
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url=influx_db.url, database=influx_db.database)),
        registry=reg, source=object())  # type: ignore[arg-type]
    one = session_batch(3, T + 10_000, 4, [T])
    two = np.array([0, 1], np.int64)
    r = one.results
    res = ResultColumns(
        **{f: np.concatenate([getattr(r, f), getattr(r, f)]) for f in (
            "start", "width", "rev", "count", "sum", "min", "max", "mean", "m2", "first_ts",
            "first", "last_ts", "last", "spec")},
        device=two, metric=two * 0, pct=np.concatenate([r.pct, r.pct]),
        sk_keys=np.concatenate([r.sk_keys, r.sk_keys]),  # type: ignore[list-item]
        sk_counts=np.concatenate([r.sk_counts, r.sk_counts]),  # type: ignore[list-item]
        sk_offsets=np.array([0, 2, 4], np.int64), superseded=r.superseded)
    batch = ResultBatch(gateway="gw-1", seq=3, watermark=0, sent_ms=T,
                        devices=["dev-1", "dev-2"], metrics=["temperature"], results=res,
                        specs=["session:30s"], percentiles=[0.5, 0.99], alpha=0.01)

    async def scenario() -> None:
        worker.handle(SourceMessage(0, 1, results_topic("gw-1"), batch.encode()))
        await worker.writer.flush(None)

    asyncio.run(scenario())
    doc = influx_db.query('SELECT "count", "device", "site" FROM "aggregates"')
    assert isinstance(doc, dict)
    assert doc["results"][0]["series"][0]["values"] == [[T + 10_000, 4, "dev-2", "hall"]]
    s = worker.stats()
    assert s["rejected_foreign_device"] == 1
    assert s["superseded"] == 0  # dev-1's withdrawal was refused with its rows
    assert [a[0] for a in worker._acks.values()] == [[3]]


class Burst:
    """A source of ``n`` results batches, all queued already: one window each, 10 s apart."""
    partitions = 1
    per_partition_state = False

    def __init__(self, n: int) -> None:
        self.n = n
        self.yielded = 0

    async def messages(self):  # type: ignore[no-untyped-def]
        for k in range(self.n):  # nothing awaited: all of them were queued already
            self.yielded += 1
            yield SourceMessage(0, k + 1, results_topic("gw-1"),
                                session_batch(k, T + k * 10_000, 4, []).encode())

    async def ack(self, *_a: object, **_k: object) -> bool:
        return True


def _memory_worker(source: Burst, sink: object) -> CloudWorker:
    return CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url="http://127.0.0.1:1", database="unused")),
        registry=Registry(), source=source, sink=sink)  # type: ignore[arg-type]


def test_the_writer_sends_a_bursts_first_results_while_the_rest_are_handled() -> None:
    """Messages that are already queued (a minute boundary's burst) are handled one after the
    other without the source ever making the worker wait: the worker must still let its writer
    send the first ones' points meanwhile, not only once the burst is handled (it used to:
    InfluxDB idled for the burst's first 0.4 s in the latency bench)."""
    from cloud.sinks.base import MemorySink
    from cloud.sinks.points import Points

    class Recording(MemorySink):
        def __init__(self) -> None:
            super().__init__()
            self.seen_at: list[int] = []  # messages the source had given out at each write

        def write(self, batch: list[Points]) -> None:
            self.seen_at.append(source.yielded)
            super().write(batch)

    source = Burst(40)
    sink = Recording()
    worker = _memory_worker(source, sink)
    asyncio.run(asyncio.wait_for(worker.run(asyncio.Event()), 30))
    assert source.yielded == 40
    assert worker.stats()["results_written"] == 40
    assert sink.seen_at[0] < 40, sink.seen_at


def test_freshness_leaves_out_history_older_than_its_start() -> None:
    """Window end -> InfluxDB is counted for every written batch, except, once the worker is
    told where live data begins (the demo: after its backfill), batches whose newest window
    ended before that: their age is the backfill's, not the pipeline's."""
    from cloud.sinks.base import MemorySink

    counted = []
    for since in (0, T + 20 * 10_000 + 5_000):  # batch k's window ends at T + k * 10 s + 5 s
        worker = _memory_worker(Burst(40), MemorySink())
        worker.freshness_since_ms = since
        asyncio.run(asyncio.wait_for(worker.run(asyncio.Event()), 30))
        assert worker.stats()["results_written"] == 40
        counted.append(len(worker.freshness_ms))
    assert counted == [40, 20]


def test_a_batch_under_a_taken_number_with_another_digest_is_a_conflict_not_a_copy() -> None:
    """Two agents numbering under one gateway and incarnation (a copied state directory): the
    second batch under a number is not a re-send of the first; a re-send has its digest."""
    from cloud.dedup import DIGESTS, BatchDedup, Seen

    d = BatchDedup()
    a, b = "ab" * 15 + "00", "cd" * 16  # (a digest ending in a zero byte comes back whole)
    assert d.check_and_record("gw-1/7", 5, a) is Seen.NEW
    assert d.check_and_record("gw-1/7", 5, a) is Seen.PENDING  # a copy of it, on its way
    assert d.check_and_record("gw-1/7", 5, b) is Seen.CONFLICT
    d.mark_written("gw-1/7", 5)
    assert d.check_and_record("gw-1/7", 5, a) is Seen.WRITTEN
    assert d.check_and_record("gw-1/7", 5, b) is Seen.CONFLICT
    assert d.check_and_record("gw-2/7", 5, b) is Seen.NEW  # another gateway: its own numbers
    # beyond the numbers whose digests are remembered: a re-send, as before
    for s in range(6, 6 + DIGESTS):
        d.check_and_record("gw-1/7", s, a)
    assert d.check_and_record("gw-1/7", 5, b) is Seen.WRITTEN
    assert (d.duplicates, d.conflicts) == (3, 2)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=120), st.integers(-1, 210))
def test_written_batch_numbers_kept_as_runs_are_the_set_of_them(seqs: list[int],
                                                                 floor: int) -> None:
    """The dedup keeps a gateway's written numbers as runs of consecutive ones (a set of them
    grew to 8.6 MB and a 1 MB snapshot per gateway over 150,000 batches): the same answers as
    the set, in any order of adding, after forgetting up to a floor, and through a snapshot."""
    from cloud.dedup import Runs

    runs = Runs()
    for s in seqs:
        runs.add(s)
    assert all(x in runs for x in seqs)
    assert not any(x in runs for x in range(-1, 202) if x not in set(seqs))
    assert len(runs) == len(set(seqs))
    assert all(b + 1 < a for a, b in zip(runs.starts[1:], runs.ends, strict=False))  # merged
    again = Runs.from_flat(runs.flat())
    assert (again.starts, again.ends) == (runs.starts, runs.ends)
    runs.drop_through(floor)
    assert {x for x in range(-1, 202) if x in runs} == {x for x in seqs if x > floor}


def test_the_dedup_state_is_small_and_restores_from_either_format(tmp_path: Path) -> None:
    from cloud.dedup import BatchDedup, Seen

    d = BatchDedup(horizon=100_000)
    for s in [*range(150_000), *range(151_024, 151_100)]:  # a restart skipped a block
        d.check_and_record("gw-1/7", s)
        d.mark_written("gw-1/7", s)
    d.check_and_record("gw-1/7", 151_100)  # pending, not written
    snap = d.snapshot()
    assert len(snap["gw-1/7"]) <= 6  # high, the marker, two runs
    d.save(tmp_path / "dedup.json")
    assert (tmp_path / "dedup.json").stat().st_size < 100
    back = BatchDedup(horizon=100_000)
    assert back.load(tmp_path / "dedup.json")
    for s, want in [(149_999, Seen.WRITTEN), (150_500, Seen.NEW), (151_050, Seen.WRITTEN),
                    (151_100, Seen.NEW), (40_000, Seen.WRITTEN)]:  # (beyond the horizon)
        assert back.state("gw-1/7", s) is want, s
    old = BatchDedup()
    old.restore({"gw-2/1": [12, 0, 1, 2, 5, 7]})  # the format before runs
    assert [old.state("gw-2/1", s) for s in range(8)] == [
        Seen.WRITTEN, Seen.WRITTEN, Seen.WRITTEN, Seen.NEW, Seen.NEW, Seen.WRITTEN, Seen.NEW,
        Seen.WRITTEN]


def test_a_worker_notices_a_hung_cloud_broker_and_reads_on_once_it_answers(
        mosquitto: Mosquitto) -> None:
    """A broker that stops answering without closing the connection (SIGSTOP here; a partition
    or a NAT that forgot the connection look the same) was noticed after aiomqtt's default
    keepalive twice over, two minutes, meanwhile nothing logged. Now within about two of the
    worker's 10 s keepalives; once the broker answers again the worker is subscribed again
    and reads what is published (its persistent session)."""
    import time

    from paho.mqtt import publish

    from cloud.ingest import KEEPALIVE_S, MqttSource

    async def scenario() -> None:
        src = MqttSource(mosquitto.address, client_id="w-hung")
        items = src.messages()
        first = asyncio.ensure_future(items.__anext__())
        try:
            await asyncio.wait_for(src.connected.wait(), 10)
            mosquitto.pause()
            t0 = time.monotonic()
            try:
                while src.connected.is_set():
                    assert time.monotonic() - t0 < 3 * KEEPALIVE_S + 10, "hang not noticed"
                    await asyncio.sleep(0.2)
                assert src.reconnects == 1
            finally:
                mosquitto.resume()
            await asyncio.wait_for(src.connected.wait(), 30)
            await asyncio.to_thread(publish.single, results_topic("gw-1"), b"{}", qos=1,
                                    hostname="127.0.0.1", port=mosquitto.port)
            msg = await asyncio.wait_for(first, 15)
            assert isinstance(msg, SourceMessage)
            assert msg.topic == results_topic("gw-1")
        finally:
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await first
            await items.aclose()

    asyncio.run(scenario())


def tumbling_batch(seq: int, devices: list[str], start: int, counts: list[int],
                   means: list[float], revs: list[int]) -> ResultBatch:
    n = len(devices)
    c = np.array(counts, np.int64)
    m = np.array(means)
    ix = np.arange(n, dtype=np.int64)
    res = ResultColumns(
        device=ix, metric=ix * 0, start=np.full(n, start, np.int64),
        width=np.full(n, 10_000, np.int64), rev=np.array(revs, np.int64), count=c,
        sum=m * c, min=m - 1, max=m + 1, mean=m, m2=np.full(n, 0.5),
        first_ts=np.full(n, start, np.int64), first=m, last_ts=np.full(n, start + 9_000, np.int64),
        last=m, spec=ix * 0, pct=np.stack([m, m + 1], axis=1),
        sk_keys=np.full(n, 150, np.int64), sk_counts=c, sk_offsets=np.arange(n + 1, dtype=np.int64))
    return ResultBatch(gateway="gw-1", seq=seq, watermark=0, sent_ms=start, devices=devices,
                       metrics=["temperature"], results=res, specs=["10s"],
                       percentiles=[0.5, 0.99], alpha=0.01)


def test_site_means_come_from_rollups_of_first_results_across_batches(
        influx_db: InfluxV1Client) -> None:
    """One 10 s window's results of three devices in two batches (one sent twice), and a late
    reading's revision: the fleet page's "mean by site" panel, run as the view runs it, reads
    the mean of every reading each site's devices first shipped, from the ``sites`` rollups
    (a handful of points, not one per device). The rollups also count the windows the
    detectors judged and found anomalous, so the "Anomaly rate high" rule reads each site's
    share (dev-b's and dev-c's windows are below their registry limits)."""
    from cloud.panels import ALERT_RULES, PANELS, Params, render

    reg = Registry([Device(device_id=d, gateway="gw-1", site=s, kind="temperature", low=low)
                    for d, s, low in (("dev-a", "hall", None), ("dev-b", "hall", 30.0),
                                      ("dev-c", "yard", 0.0))])
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url=influx_db.url, database=influx_db.database)),
        registry=reg, source=object())  # type: ignore[arg-type]
    start = int(time.time() * 1000) // 10_000 * 10_000 - 60_000
    one = tumbling_batch(7, ["dev-a", "dev-b"], start, [10, 30], [20.0, 24.0], [0, 0])
    two = tumbling_batch(8, ["dev-c", "dev-a"], start, [5, 12], [-3.0, 50.0], [0, 1])

    async def scenario() -> None:
        for k, b in enumerate((one, two, one)):
            worker.handle(SourceMessage(0, k + 1, results_topic("gw-1"), b.encode()))
            await worker.writer.flush(None)

    asyncio.run(scenario())
    doc = influx_db.query('SELECT * FROM "sites"')
    assert isinstance(doc, dict)
    assert len(doc["results"][0]["series"][0]["values"]) == 2  # one per batch and site
    panel = PANELS["fleet_mean_by_site"]
    doc = influx_db.query(render(panel.queries[0].text, Params(range_s=900)))
    assert isinstance(doc, dict)
    got = {s["tags"]["site"]: [v[1] for v in s["values"] if v[1] is not None]
           for s in doc["results"][0]["series"]}
    assert got == {"hall": [pytest.approx((10 * 20.0 + 30 * 24.0) / 40)], "yard": [-3.0]}
    doc = influx_db.query('SELECT sum("devices"), sum("readings"), min("min"), max("max") '
                          'FROM "sites" GROUP BY "site"')
    assert isinstance(doc, dict)
    assert {s["tags"]["site"]: s["values"][0][1:] for s in doc["results"][0]["series"]} == {
        "hall": [2, 40, 19.0, 25.0], "yard": [1, 5, -4.0, -2.0]}
    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-anomaly-rate")
    doc = influx_db.query(render(rule.query, Params(range_s=900)))
    assert isinstance(doc, dict)
    share = {s["tags"]["site"]: [v[1] for v in s["values"]] for s in doc["results"][0]["series"]}
    assert share == {"hall": [0.5], "yard": [1.0]}, share


def test_pattern_rule_alerts_notify_until_they_resolve_or_their_rule_is_removed(
        influx_db: InfluxV1Client, tmp_path: Path) -> None:
    """The "Pattern rule alert" Grafana rules (critical, warning), their queries run against
    InfluxDB as Grafana runs them, over what a real worker wrote: an alert of a rule fires
    its level's rule while it is open (``info`` notifies nobody), and stops once the worker
    resolves it: when its condition ends, or, for a rule removed from the config before a
    restart, with the next batch. A device moved to another site meanwhile: the resolution
    overwrites the point that opened it, none is left open under the old site."""
    from cloud.panels import ALERT_RULES, Params, render

    specs: list[dict[str, object]] = [
        {"name": "hot", "kind": "consecutive", "field": "mean", "above": 25.0, "count": 2,
         "level": "critical"},
        {"name": "warm", "kind": "consecutive", "field": "mean", "above": 22.0, "count": 1},
        {"name": "note", "kind": "consecutive", "field": "mean", "above": 0.0, "count": 1,
         "level": "info"}]
    start = int(time.time() * 1000) // 10_000 * 10_000 - 600_000

    def worker(rules: list[dict[str, object]], site: str) -> CloudWorker:
        reg = Registry([Device(device_id="dev-a", gateway="gw-1", site=site,
                               kind="temperature")])
        return CloudWorker(CloudConfig(
            worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1), state_dir=tmp_path,
            influx=InfluxConfig(url=influx_db.url, database=influx_db.database),
            rules=parse_rules(rules)), registry=reg, source=object())  # type: ignore[arg-type]

    def feed(w: CloudWorker, ks: range, mean: float) -> None:
        async def go() -> None:
            for k in ks:
                b = tumbling_batch(k + 1, ["dev-a"], start + 10_000 * k, [10], [mean], [0])
                w.handle(SourceMessage(0, k + 1, results_topic("gw-1"), b.encode()))
            await w.writer.flush(None)
            await w._save_rules()  # as the acker does before acknowledging them

        asyncio.run(go())

    def firing(level: str) -> set[tuple[str, str, str]]:
        rule = next(r for r in ALERT_RULES if r.uid == f"fieldline-rule-{level}")
        assert rule.severity == level
        doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
        assert isinstance(doc, dict)
        return {(x["tags"]["name"], x["tags"]["device"], x["tags"]["site"])
                for r in doc["results"] for x in r.get("series", [])
                if x["values"][-1][1] > rule.threshold}

    def points() -> list[tuple[str, str, str]]:
        doc = influx_db.query('SELECT "state" FROM "alerts" GROUP BY "name", "site"')
        assert isinstance(doc, dict)
        return sorted((x["tags"]["name"], x["tags"]["site"], v[1])
                      for r in doc["results"] for x in r.get("series", []) for v in x["values"])

    first = worker(specs, "hall")
    feed(first, range(3), 30.0)
    assert firing("critical") == {("hot", "dev-a", "hall")}
    assert firing("warning") == {("warm", "dev-a", "hall")}
    assert ("note", "hall", "open") in points()  # written, notified to nobody
    second = worker(specs[:1], "yard")  # warm and note removed; dev-a moved to the yard
    feed(second, range(3, 4), 30.0)
    assert firing("warning") == set()
    assert firing("critical") == {("hot", "dev-a", "hall")}
    feed(second, range(4, 5), 20.0)  # hot's condition ends
    assert firing("critical") == set()
    assert points() == [("hot", "hall", "resolved"), ("note", "hall", "resolved"),
                        ("warm", "hall", "resolved")]


def test_a_rule_alert_open_for_weeks_is_still_notified(influx_db: InfluxV1Client) -> None:
    """A device dead for weeks: its rule alert's point sits at the event time that opened it,
    a month ago. The Grafana rule, run as Grafana runs it, still fires for it (it read 7 days
    and notified it as resolved after a week), and stops once the worker resolves it."""
    from cloud.panels import ALERT_RULES, Params, render

    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-rule-critical")
    worker = CloudWorker(CloudConfig(
        worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
        influx=InfluxConfig(url=influx_db.url, database=influx_db.database),
        rules=parse_rules([{"name": "hot", "kind": "consecutive", "field": "mean",
                            "above": 25.0, "count": 1, "level": "critical"}])),
        registry=Registry(), source=object())  # type: ignore[arg-type]
    month_ago = int(time.time() * 1000) // 10_000 * 10_000 - 30 * 86_400_000

    def feed(k: int, mean: float) -> set[str]:
        async def go() -> None:
            b = tumbling_batch(k, ["dev-a"], month_ago + 10_000 * k, [10], [mean], [0])
            worker.handle(SourceMessage(0, k, results_topic("gw-1"), b.encode()))
            await worker.writer.flush(None)

        asyncio.run(go())
        doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
        assert isinstance(doc, dict)
        return {x["tags"]["device"] for r in doc["results"] for x in r.get("series", [])
                if x["values"][-1][1] > rule.threshold}

    assert feed(1, 30.0) == {"dev-a"}
    assert feed(2, 20.0) == set()


@pytest.mark.parametrize("how", ["dies", "dies with all its gateway's", "recovers"])
def test_an_incident_resolves_in_influxdb_under_the_site_it_opened_with(
        influx_db: InfluxV1Client, how: str) -> None:
    """dev-b goes over its registry limit, is moved to another site in the registry, and then
    dies (dev-a, on the same gateway, goes on), or dies with dev-a (their gateway's agent goes
    on, its health reports saying nothing waits there), or comes back under its limit. Its
    incident's point in ``alerts`` (open: the view counts it, "alerts open") is overwritten as
    resolved, under the site it opened with: no point is left open. Dead, once an hour of the
    worker's time and of dev-a's windows (or of idle health reports) passed without one of
    dev-b's ("resolved as silent", counted in the worker's health)."""
    reg = Registry([Device(device_id="dev-a", gateway="gw-1", site="hall", kind="temperature",
                           high=30.0),
                    Device(device_id="dev-b", gateway="gw-1", site="hall", kind="temperature",
                           high=30.0)])
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url=influx_db.url, database=influx_db.database)),
        registry=reg, source=object())  # type: ignore[arg-type]
    now = [time.time()]
    worker.detection.clock = lambda: now[0]  # the worker's time, moved by the test
    start = int(time.time() * 1000) // 10_000 * 10_000 - 3 * 3_600_000

    def feed(ks: range, devices: list[str], means: list[float]) -> None:
        async def go() -> None:
            for k in ks:
                now[0] += 10.0
                b = tumbling_batch(k + 1, devices, start + 10_000 * k, [10] * len(devices),
                                   means, [0] * len(devices))
                worker.handle(SourceMessage(0, k + 1, results_topic("gw-1"), b.encode()))
            await worker.writer.flush(None)

        asyncio.run(go())

    def report(minutes: int, *, outbox: int = 0) -> None:
        async def go() -> None:
            for k in range(minutes * 6):
                now[0] += 10.0
                rep = HealthReport(gateway="gw-1", ts=int(now[0] * 1000),
                                   counters={"messages_in": 900},
                                   gauges={"outbox_depth": outbox, "intake_pending": 0})
                worker.handle(SourceMessage(0, 10_000 + k, health_topic("gw-1"), rep.encode()))
            await worker.writer.flush(None)

        asyncio.run(go())

    def alerts() -> list[tuple[str, str, str, bool]]:
        doc = influx_db.query('SELECT "state", "open", "message" FROM "alerts" '
                              'GROUP BY "device", "site"')
        assert isinstance(doc, dict)
        return sorted((x["tags"]["device"], x["tags"]["site"], v[1], v[2])
                      for r in doc["results"] for x in r.get("series", []) for v in x["values"])

    feed(range(10), ["dev-a", "dev-b"], [20.0, 40.0])
    assert alerts() == [("dev-b", "hall", "open", True)]
    assert worker.stats()["alerts_open"] == 1
    worker.registry.replace(Registry([  # type: ignore[attr-defined]
        Device(device_id="dev-a", gateway="gw-1", site="hall", kind="temperature", high=30.0),
        Device(device_id="dev-b", gateway="gw-1", site="yard", kind="temperature", high=30.0)]),
        start + 10_000 * 10)  # in force from the windows after the incident's on
    if how == "recovers":
        feed(range(10, 20), ["dev-a", "dev-b"], [20.0, 20.0])
    elif how.startswith("dies with"):
        report(90, outbox=3)  # batches wait in its outbox (a link down): not silence
        report(55)
        assert alerts() == [("dev-b", "hall", "open", True)]
        report(10)
    else:
        feed(range(10, 300), ["dev-a"], [20.0])  # 48 minutes: not yet
        assert alerts() == [("dev-b", "hall", "open", True)]
        feed(range(300, 380), ["dev-a"], [20.0])
    assert alerts() == [("dev-b", "hall", "resolved", False)]
    doc = influx_db.query('SELECT "message" FROM "alerts"')
    assert isinstance(doc, dict)
    message = doc["results"][0]["series"][0]["values"][0][1]
    assert ("back to normal" if how == "recovers" else "resolved as silent") in message
    assert worker.stats()["alerts_resolved_silent"] == (how != "recovers")
    assert worker.stats()["alerts_resolved"] == 1
    assert worker.stats()["alerts_open"] == 0


def test_gateways_and_workers_that_stop_reporting_are_the_ones_their_rules_find(
        influx_db: InfluxV1Client) -> None:
    """The "not reporting" alert rules, their queries run against InfluxDB as Grafana runs
    them: a gateway (or worker) whose health reports stopped 11 minutes ago gives 0, and so
    fires (below the threshold) although no point of it is left to judge in the last minutes;
    one reporting, or one whose clock runs 6 minutes late, does not; one quiet for two days is
    no longer judged."""
    from cloud.panels import ALERT_RULES, Params, render

    now = int(time.time() * 1000)
    lines = []
    for name, first, last in (("alive", now - 3_600_000, now), ("dead", now - 3_600_000,
                                                                now - 660_000),
                              ("late", now - 3_600_000, now - 360_000),
                              ("gone", now - 2 * 86_400_000, now - 2 * 86_400_000 + 60_000)):
        lines += [f"pipeline,component=edge,gateway=gw-{name} readings_accepted={k}i {t}"
                  for k, t in enumerate(range(first, last, 5_000))]
        lines += [f"pipeline,component=cloud,worker=w-{name} messages_in={k}i {t}"
                  for k, t in enumerate(range(first, last, 5_000))]
    influx_db.write_lines(lines)
    for uid, tag, prefix in (("fieldline-gateway-not-reporting", "gateway", "gw-"),
                             ("fieldline-worker-not-reporting", "worker", "w-")):
        rule = next(r for r in ALERT_RULES if r.uid == uid)
        doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
        assert isinstance(doc, dict)
        got = {s["tags"][tag]: s["values"][-1][1] for s in doc["results"][0]["series"]}
        assert got.keys() == {f"{prefix}alive", f"{prefix}dead", f"{prefix}late"}, got
        firing = {k for k, v in got.items() if (v < rule.threshold if rule.op == "lt"
                                                else v > rule.threshold)}
        assert firing == {f"{prefix}dead"}, got
        assert got[f"{prefix}alive"] >= 100, got  # ~120 reports in 10 minutes


def test_a_gateway_refusing_its_readings_fires_its_rule(influx_db: InfluxV1Client) -> None:
    """"Gateway refusing readings": the share of what a gateway received in the range that it
    refused (its counters survive restarts: the agent keeps them in its checkpoint). Devices
    whose payloads changed (40 %) fire it; the usual few (1 %), or a gateway whose devices
    send nothing, do not; what was refused an hour ago is no longer judged. A gateway of few
    readings is counted as if it had 20 more: its 6 readings in 10 minutes all refused fire
    it, one of them does not."""
    from cloud.panels import ALERT_RULES, Params, render

    now = int(time.time() * 1000)
    lines = []
    for k, t in enumerate(range(now - 3_600_000, now, 5_000)):
        healed = min(t, now - 900_000)  # refused 40 % until a quarter of an hour ago
        few = k // 20  # a reading every 100 s: 6 in 10 minutes
        for gw, received, refused in (("usual", 100 * k, k), ("changed", 100 * k, 40 * k),
                                      ("quiet", 5, 2),
                                      ("healed", 100 * k, 40 * ((healed - now) // 5_000 + 720)),
                                      ("few-all-bad", few, few), ("few-one-bad", few, k // 120)):
            lines.append(f"pipeline,component=edge,gateway={gw} readings_received={received}i,"
                         f"rejected={refused}i {t}")
    influx_db.write_lines(lines)
    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-readings-refused")
    doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
    assert isinstance(doc, dict)
    share = {s["tags"]["gateway"]: s["values"][-1][1] for s in doc["results"][0]["series"]}
    assert share["changed"] == pytest.approx(0.4, abs=0.01), share
    firing = {gw for gw, v in share.items() if v > rule.threshold}
    assert firing == {"changed", "few-all-bad"}, share


def test_a_gateway_whose_clock_is_not_trusted_fires_its_rule(
        influx_db: InfluxV1Client) -> None:
    """"Gateway clock not trusted": the gateway's last report says its clock is implausible
    (the worker files such a report at its own time); one whose clock was set again does not."""
    from cloud.panels import ALERT_RULES, Params, render

    now = int(time.time() * 1000)
    until = {"unset": now, "set": now - 120_000, "fine": now - 600_000}  # implausible till
    influx_db.write_lines([
        f"pipeline,component=edge,gateway={gw} clock_unsynced={int(t < end)} {t}"
        for gw, end in until.items() for t in range(now - 600_000, now, 5_000)])
    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-clock-untrusted")
    doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
    assert isinstance(doc, dict)
    last = {s["tags"]["gateway"]: s["values"][-1][1] for s in doc["results"][0]["series"]}
    assert {gw for gw, v in last.items() if v > rule.threshold} == {"unset"}, last


def test_a_gateway_whose_clock_is_off_the_workers_fires_its_rule(
        influx_db: InfluxV1Client) -> None:
    """"Gateway clock off": the worker tells a gateway's clock off its own (and files its
    health at its own time, with ``clock_off``); one set right since does not fire, nor one
    never judged (no such field: a worker of the version before)."""
    from cloud.panels import ALERT_RULES, Params, render

    now = int(time.time() * 1000)
    until = {"off": now, "set": now - 120_000}  # off until
    influx_db.write_lines([
        f"pipeline,component=edge,gateway={gw} clock_off={int(t < end)} {t}"
        for gw, end in until.items() for t in range(now - 600_000, now, 5_000)]
        + [f"pipeline,component=edge,gateway=older outbox_depth=0 {now - 5_000}"])
    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-clock-off")
    doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
    assert isinstance(doc, dict)
    last = {s["tags"]["gateway"]: s["values"][-1][1] for s in doc["results"][0]["series"]}
    assert {gw for gw, v in last.items() if v is not None and v > rule.threshold} == {"off"}, last


def test_points_refused_by_influxdb_fire_their_rule_for_ten_minutes(
        influx_db: InfluxV1Client) -> None:
    """"InfluxDB refusing points": the worker's ``points_rejected`` counter grew in the range
    (3 points 8 minutes ago, 2 more a minute ago, across a restart that began it at 0 again)
    gives their sum; a worker whose counter stands still gives 0, one refused 20 minutes ago
    is not judged any more."""
    from cloud.panels import ALERT_RULES, Params, render

    now = int(time.time() * 1000)

    def refused(t: int, worker: str) -> int:
        if worker == "w-quiet":
            return 7
        if worker == "w-old":
            return 0 if t < now - 1_200_000 else 4
        # 3 refused 8 minutes ago, a restart 4 minutes ago (0 again), 2 more a minute ago
        return (0 if t < now - 480_000 else 3) if t < now - 240_000 else (
            0 if t < now - 60_000 else 2)

    influx_db.write_lines([f"pipeline,component=cloud,worker={w} points_rejected={refused(t, w)}i"
                           f" {t}" for w in ("w-busy", "w-quiet", "w-old")
                           for t in range(now - 1_800_000, now, 5_000)])
    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-points-refused")
    doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))
    assert isinstance(doc, dict)
    got = {s["tags"]["worker"]: sum(v[1] or 0 for v in s["values"])  # Grafana's sum
           for s in doc["results"][0]["series"]}
    assert got == {"w-busy": 5, "w-quiet": 0, "w-old": 0}, got
    assert rule.reducer == "sum"
    assert rule.op == "gt"
    assert rule.threshold == 0


class _SnapshotStore:
    """A partitioned source's snapshot side only (what JetStream's store does is tested in
    test_jetstream.py): records what the worker saves."""

    per_partition_state = True

    def __init__(self) -> None:
        self.saved: list[tuple[int, bytes, int, int]] = []

    async def save_snapshot(self, p: int, blob: bytes, position: int, epoch: int) -> bool:
        self.saved.append((p, blob, position, epoch))
        return True


def test_large_partition_snapshots_are_encoded_aside_and_taken_less_often(
        influx_db: InfluxV1Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A partition's snapshot is copied between two messages and encoded in a thread; one
    still on its way is not taken again; and the bigger the state, the longer between two
    (``SNAPSHOT_BYTES_PER_S``, here lowered so 200 series' state means 30 s), which the
    worker's health says (a takeover replays at most that much)."""
    import cloud.worker as worker_mod
    from cloud.ingest import PartitionEvent
    from cloud.partition import PartitionState

    store = _SnapshotStore()
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(url=influx_db.url, database=influx_db.database))
    worker = CloudWorker(cfg, registry=Registry(), source=store)  # type: ignore[arg-type]
    worker._on_partition(PartitionEvent(3, True, position=0, epoch=7))
    start = int(time.time() * 1000) // 10_000 * 10_000 - 600_000
    devices = [f"dev-{i:03d}" for i in range(200)]

    async def scenario() -> None:
        for k in range(3):
            b = tumbling_batch(k + 1, devices, start + 10_000 * k, [10] * 200,
                               [20.0 + i % 7 for i in range(200)], [0] * 200)
            worker.handle(SourceMessage(3, k + 1, results_topic("gw-1"), b.encode(), epoch=7))
        worker._snapshot_partitions()
        worker._snapshot_partitions()  # the first is on its way: not taken twice
        await worker.writer.flush(None)
        while worker._bg:
            await asyncio.gather(*list(worker._bg))

    assert worker.snapshot_every_s() == 10.0  # nothing measured yet: the configured interval
    asyncio.run(scenario())
    at = worker.parts[3].position  # (the consume loop moves it; handed in here: as assigned)
    assert [(p, pos, ep) for p, _, pos, ep in store.saved] == [(3, at, 7)]
    blob = store.saved[0][1]
    again = PartitionState.fresh(cfg)
    assert again.restore_bytes(blob)
    assert again.position == at
    assert len(again.detection.series) == len(worker.parts[3].detection.series) == 200
    assert worker.stats()["engine_snapshot_bytes"] == len(blob)
    monkeypatch.setattr(worker_mod, "SNAPSHOT_BYTES_PER_S", len(blob) / 30)
    assert worker.snapshot_every_s() == pytest.approx(30.0)
    assert worker.stats()["engine_snapshot_every_s"] == pytest.approx(30.0)
    monkeypatch.setattr(worker_mod, "SNAPSHOT_TIME_SHARE", 1e-9)  # time, too, is counted
    assert worker.snapshot_every_s() > 1000


def test_a_round_of_acks_is_in_flight_at_once(tmp_path: Path) -> None:
    """Each ack waits for the broker's PUBACK (one it refuses is not taken as sent): one
    after the other, a round acknowledging N gateways cost N round trips to the broker (0.93
    s for 200 with a broker 2 ms away, 0.17 s at once: `python -m bench.acks`), and every
    gateway's next batch waited on them. Now a round's acks are in flight together, at most
    ACK_CONCURRENCY; each is counted as sent or not as before."""
    from cloud.sinks.base import MemorySink
    from cloud.worker import ACK_CONCURRENCY

    class Broker:
        def __init__(self) -> None:
            self.in_flight = self.most = 0
            self.acked: dict[str, list[int]] = {}

        async def ack(self, gateway: str, acked: list[int], *_a: object, **_k: object) -> bool:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(0.01)
            self.in_flight -= 1
            self.acked[gateway] = acked
            return gateway != "gw-13"  # one the broker refuses

    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path)
    broker = Broker()
    worker = CloudWorker(cfg, source=broker, sink=MemorySink())  # type: ignore[arg-type]
    for i in range(100):
        worker._acks[f"gw-{i}", 1] = ([i, i + 1], [], {}, [])
    stop = asyncio.Event()
    stop.set()
    asyncio.run(worker._acker(stop))
    assert broker.most == ACK_CONCURRENCY
    assert broker.acked == {f"gw-{i}": [i, i + 1] for i in range(100)}
    assert worker.counters["acks_sent"] == 198
    assert worker.counters["acks_unsent"] == 2
