"""Sinks against a real InfluxDB 1.6: points land, bad points are refused by count, 413 splits,
a dropped database is recreated, the configured retention is applied, an unreachable server is
retried, never dropped."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from cloud.config import load_cloud_config
from cloud.sinks.base import BufferedWriter, SinkError
from cloud.sinks.influx_v1 import InfluxV1Client, InfluxV1Sink
from cloud.sinks.lineproto import line
from cloud.sinks.points import Points, encode, from_lines
from devices.clock import ManualClock
from fieldline.services import InfluxDB, free_port

pytestmark = pytest.mark.integration

T = 1_700_000_000_000
T_NOW = time.time_ns() // 1_000_000 - 60_000


def count_points(client: InfluxV1Client, measurement: str = "m") -> int:
    doc = client.query(f'SELECT count("v") FROM "{measurement}"')
    assert isinstance(doc, dict)
    series = doc["results"][0].get("series", [])
    return int(series[0]["values"][0][1]) if series else 0


def test_line_protocol_escapes_tags_and_strings() -> None:
    ln = line("m", {"site": "hall A,b=c", "empty": ""}, {"v": 1.5, "n": 3, "s": 'say "hi"'}, T)
    assert ln == f'm,site=hall\\ A\\,b\\=c v=1.5,n=3i,s="say \\"hi\\"" {T}'
    assert line("m", {}, {"v": float("nan")}, T) is None


def test_points_land_and_rewriting_is_idempotent(influx_db: InfluxV1Client) -> None:
    sink = InfluxV1Sink(influx_db.url, influx_db.database)
    lines = [f"m,d=a v={i}.5 {T + i}" for i in range(100)]
    sink.write(from_lines(lines))
    sink.write(from_lines(lines))  # the same identity again: overwritten, not duplicated
    assert count_points(influx_db) == 100


def test_one_bad_point_is_refused_and_the_rest_is_kept(influx_db: InfluxV1Client) -> None:
    sink = InfluxV1Sink(influx_db.url, influx_db.database)
    sink.write(from_lines([f"m,d=a v=1.0 {T}"]))  # v is a float field now
    bad = [f"m,d=a v=2.0 {T + 1}", f'm,d=a v="text" {T + 2}', f"m,d=a v=3.0 {T + 3}"]
    with pytest.raises(SinkError) as info:
        sink.write(from_lines(bad))
    assert not info.value.retryable
    assert info.value.rejected == 1
    assert count_points(influx_db) == 3


def test_a_dropped_database_is_recreated_and_the_write_retried(
        influx_db: InfluxV1Client) -> None:
    sink = InfluxV1Sink(influx_db.url, influx_db.database)
    sink.write(from_lines([f"m v=1.0 {T}"]))
    influx_db.query(f'DROP DATABASE "{influx_db.database}"', database="")
    with pytest.raises(SinkError) as info:
        sink.write(from_lines([f"m v=2.0 {T + 1}"]))
    assert info.value.retryable
    sink.write(from_lines([f"m v=2.0 {T + 1}"]))
    assert count_points(influx_db) == 1


def test_influxdb_retention_is_applied_kept_and_reapplied_to_a_recreated_database(
        influx_db: InfluxV1Client, tmp_path: Path) -> None:
    """``[influxdb] retention``: the database's default retention policy is set before the
    first write (its shard groups made shorter when longer than it), left alone when already
    so, set again when the database was dropped and created under the worker; a point older
    than it is refused by InfluxDB and counted, the rest of its batch kept; without the key
    InfluxDB's own is kept."""
    def show() -> tuple[str, int, int]:
        return influx_db.retention()

    assert show()[1:] == (0, 7 * 86_400_000)  # a new database: autogen, kept forever
    InfluxV1Sink(influx_db.url, influx_db.database).write(from_lines([f"m v=1.0 {T_NOW}"]))
    assert show()[1] == 0  # no key: as InfluxDB keeps it
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[ingest]\nbroker = "mqtt://127.0.0.1:1883"\n[influxdb]\n'
                   f'url = "{influx_db.url}"\ndatabase = "{influx_db.database}"\n'
                   'retention = "400d"\n')
    sink = InfluxV1Sink.from_config(load_cloud_config(cfg).influx)
    sink.write(from_lines([f"m v=2.0 {T_NOW + 1}"]))
    assert show() == ("autogen", 400 * 86_400_000, 7 * 86_400_000)
    assert not influx_db.set_retention(400 * 86_400_000)  # already so: nothing to do
    short = InfluxV1Sink(influx_db.url, influx_db.database, retention_ms=2 * 86_400_000)
    old = T_NOW - 10 * 86_400_000  # (before the 7-day shard group the first points opened)
    with pytest.raises(SinkError) as info:  # the 7-day shard groups made 1 day long
        short.write(from_lines([f"m v=3.0 {T_NOW + 2}", f"m v=4.0 {old}"]))
    assert show() == ("autogen", 2 * 86_400_000, 86_400_000)
    assert not info.value.retryable
    assert info.value.rejected == 1
    assert "retention" in str(info.value)
    assert count_points(influx_db) == 3
    influx_db.query(f'DROP DATABASE "{influx_db.database}"', database="")
    with pytest.raises(SinkError) as info:
        short.write(from_lines([f"m v=5.0 {T_NOW + 3}"]))
    assert info.value.retryable  # created again, and written at the next attempt
    short.write(from_lines([f"m v=5.0 {T_NOW + 3}"]))
    assert show() == ("autogen", 2 * 86_400_000, 86_400_000)
    assert count_points(influx_db) == 1


class _TooLarge(http.server.BaseHTTPRequestHandler):
    """A stand-in answering 413 for bodies over a limit (real 1.6 has max-body-size too, but
    only at 25 MB; this fake makes the split observable with small batches)."""

    limit = 300
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if len(body) > self.limit:
            self.send_response(413)
            self.end_headers()
            self.wfile.write(b'{"error":"Request Entity Too Large"}')
            return
        type(self).bodies.append(body)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def too_large_server() -> Iterator[str]:
    _TooLarge.bodies = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TooLarge)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_413_splits_the_batch_until_it_fits(too_large_server: str) -> None:
    client = InfluxV1Client(too_large_server, "db")
    lines = [f"m,d=dev{i:03d} v={i}.0 {T + i}" for i in range(40)]
    client.write_lines(lines)
    got = b"\n".join(_TooLarge.bodies).decode().split("\n")
    assert sorted(got) == sorted(lines)
    assert all(len(b) <= _TooLarge.limit for b in _TooLarge.bodies)



class _NotInflux(http.server.BaseHTTPRequestHandler):
    """Another service on the URL the worker was given (a web server's 404 or 405 page, a
    proxy's 200, nginx's plain-text 400): a stand-in, as such services are not part of the
    platform."""

    answer: ClassVar[tuple[int, bytes]] = (404, b"<html>Not Found</html>")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = type(self).answer
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST  # noqa: N815 (http.server names its handlers so)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("answer", [(404, b"<html>Not Found</html>"), (405, b""),
                                    (200, b"<html>Sign in</html>"),
                                    (400, b"The plain HTTP request was sent to HTTPS port")])
def test_a_url_that_is_not_influxdb_refuses_no_point_for_good(answer: tuple[int, bytes]) -> None:
    """Before, a 404 or 405 from another service was taken for InfluxDB refusing the points:
    each was isolated, dead-lettered and its batch acknowledged, so a worker pointed at the
    wrong port dropped every result (and a proxy's 200 page crashed the writer). Now that is a
    failed write: retried, nothing dead-lettered, nothing confirmed, the points kept in order."""
    _NotInflux.answer = answer
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotInflux)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        assert InfluxV1Client(url, "fl").server_version() == ""  # (the start-up check's view)
        sink = InfluxV1Sink(url, "fl")
        confirmed: list[object] = []
        writer = BufferedWriter(sink, clock=ManualClock(), batch_points=100,
                                flush_interval_ms=50, max_backoff_ms=20,
                                on_written=confirmed.extend)
        writer.add(from_lines([f"m,d=b{i} v={i}.5 {T_NOW + i}" for i in range(20)]), token="t")
        assert not asyncio.run(writer.flush(None, attempts=3))
        assert not writer.dead_letters
        assert writer.points_rejected == 0
        assert confirmed == []
        assert sum(len(p) for p in writer.pending()) == 20  # still queued, to go again
    finally:
        srv.shutdown()


def test_a_user_who_may_write_but_not_create_the_database_writes(tmp_path: Path) -> None:
    """Least privilege: the worker's InfluxDB user has WRITE on an existing database and no
    right to CREATE DATABASE (403). Before, that refusal was taken for the points' and every
    point was dead-lettered; now the worker says so once and writes."""
    ix = InfluxDB(tmp_path / "ix", auth=True).start()
    try:
        admin = InfluxV1Client(ix.url, "fl")
        admin.query("CREATE USER admin WITH PASSWORD 'a' WITH ALL PRIVILEGES", database="")
        admin = InfluxV1Client(ix.url, "fl", username="admin", password="a")
        for q in ('CREATE DATABASE "fl"', "CREATE USER w WITH PASSWORD 'w'",
                  'GRANT WRITE ON "fl" TO w'):
            admin.query(q, database="")
        sink = InfluxV1Sink(ix.url, "fl", username="w", password="w")
        writer = BufferedWriter(sink, clock=ManualClock(), batch_points=100,
                                flush_interval_ms=50)
        writer.add(from_lines([f"m,d=b{i} v={i}.5 {T_NOW + i}" for i in range(20)]), token="t")
        assert asyncio.run(writer.flush(None, attempts=3))
        assert not writer.dead_letters
        assert count_points(admin) == 20
    finally:
        ix.stop()


def test_writer_retries_until_influxdb_is_back_and_loses_nothing(tmp_path) -> None:
    port = free_port()
    sink = InfluxV1Sink(f"http://127.0.0.1:{port}", "fl", timeout_s=1.0)
    written: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=10, flush_interval_ms=50,
                            max_backoff_ms=200, on_written=written.extend)

    async def scenario() -> int:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        writer.add(from_lines([f"m v={i}.0 {T + i}" for i in range(25)]), token="batch-1")
        await asyncio.sleep(1.0)  # nothing listens on the port: every attempt fails
        assert writer.write_errors >= 2
        assert written == []
        assert writer.buffered == 25
        server = InfluxDB(tmp_path / "ix", port=port)  # InfluxDB comes up where it was expected
        server.start()
        try:
            for _ in range(100):
                if written:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await task
            return count_points(InfluxV1Client(server.url, "fl"))
        finally:
            server.stop()

    assert asyncio.run(scenario()) == 25
    assert written == ["batch-1"]
    assert writer.points_written == 25


@pytest.mark.parametrize("file_ok", [True, False])
def test_r6_bad_points_are_dead_lettered_and_the_rest_lands(influx_db: InfluxV1Client,
                                                            tmp_path: Path, file_ok: bool,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """R6: a batch with a type-conflicting point and two beyond the retention policy. Also
    when the dead-letter file cannot be written (a full disk; here, a directory in its place):
    the rest still lands, the bad points are counted and logged, one line per reason."""
    influx_db.query(f'CREATE RETENTION POLICY "short" ON "{influx_db.database}" DURATION 1h '
                    'REPLICATION 1 DEFAULT', database="")
    sink = InfluxV1Sink(influx_db.url, influx_db.database)
    sink.write(from_lines([f"m,d=a v=1.0 {T_NOW}"]))  # v is a float from now on
    dead = tmp_path / "dead.jsonl"
    if not file_ok:
        dead.mkdir()
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=100, flush_interval_ms=50,
                            dead_letter_path=dead)
    lines = [f"m,d=b{i} v={i}.5 {T_NOW + i}" for i in range(60)]
    lines[17] = f'm,d=b17 v="seventeen" {T_NOW + 17}'  # type conflict
    lines[42] = f"m,d=b42 v=42.5 {T_NOW - 3 * 3_600_000}"  # older than the retention policy
    lines[43] = f"m,d=b43 v=43.5 {T_NOW - 4 * 3_600_000}"
    writer.add(from_lines(lines), token="t")
    with caplog.at_level(logging.ERROR, logger="fieldline"):
        ok = asyncio.run(writer.flush(None, attempts=3))
    assert ok
    assert count_points(influx_db) == 1 + 57
    assert dict(writer.dead_letters) == {"field_type_conflict": 1, "beyond_retention": 2}
    assert writer.points_written == 57
    assert writer.dead_letter_file_errors == (0 if file_ok else 1)
    said = sorted(r.getMessage().split(":")[0] for r in caplog.records
                  if r.getMessage().startswith("dead-lettered ") and "not written" not in
                  r.getMessage())
    assert said == ["dead-lettered 2 points (beyond_retention), the first",
                    "dead-lettered a point (field_type_conflict)"], said
    if file_ok:
        recorded = [json.loads(x) for x in dead.read_text().splitlines()]
        assert sorted(r["line"].split(" ")[0] for r in recorded) == ["m,d=b17", "m,d=b42",
                                                                      "m,d=b43"]


class _RefusesOld:
    """Refuses every point older than the retention, as InfluxDB does (no server needed)."""

    name = "refuses-old"

    def write(self, batch: list[Points]) -> None:
        lines = encode(batch)
        old = sum(int(x.rsplit(" ", 1)[1]) < T_NOW for x in lines)
        if old:
            raise SinkError("partial write: points beyond retention policy dropped=1",
                            retryable=False, rejected=old)

    def delete(self, points: list[object]) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_dead_letter_file_is_moved_aside_past_its_bound(tmp_path: Path) -> None:
    """A backfill older than the database's retention is refused point by point: the
    dead-letter file, past its bound, becomes ``<name>.1`` (the one before it dropped), so the
    two never hold more than twice the bound, and every refused point is in one of them."""
    dead = tmp_path / "dead-letter.jsonl"
    writer = BufferedWriter(_RefusesOld(), clock=ManualClock(), batch_points=50,  # type: ignore[arg-type]
                            flush_interval_ms=10, dead_letter_path=dead)
    writer.dead_letter_max_bytes = 4_000
    kept: list[str] = []
    for round_ in range(6):
        writer.add(from_lines([f"m,d=r{round_} v={i}.5 {T_NOW - 1_000 - i}" for i in range(20)]
                              + [f"m,d=r{round_} v=1.0 {T_NOW + 1}"]), token=round_)
        assert asyncio.run(writer.flush(None, attempts=3))
        kept.append(dead.read_text())
    assert writer.dead_letters == {"beyond_retention": 120}
    older = dead.with_name("dead-letter.jsonl.1")
    assert older.exists()
    assert dead.stat().st_size + older.stat().st_size <= 2 * 4_000 + 4_000
    lines = [json.loads(x) for x in (older.read_text() + dead.read_text()).splitlines()]
    assert len({x["line"] for x in lines}) == len(lines)
    assert {x["line"].split(" ")[0] for x in lines} <= {f"m,d=r{k}" for k in range(6)}
    assert f"m,d=r5 v=0.5 {T_NOW - 1_000}" in dead.read_text()  # the newest are in the file


class _SlowRecorder:
    """Records each request; requests overlap (random sleeps in the writer's threads)."""

    name = "recorder"

    def __init__(self) -> None:
        self.requests: list[tuple[float, float, list[str]]] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def write(self, batch: list[Points]) -> None:
        import random

        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        start = time.monotonic()
        time.sleep(random.random() * 0.01)
        with self._lock:
            self.requests.append((start, time.monotonic(), encode(batch)))
            self.active -= 1

    def delete(self, points: list[object]) -> None:
        pass

    def close(self) -> None:
        pass


def test_concurrent_writes_keep_every_points_versions_in_order(influx_db: InfluxV1Client
                                                               ) -> None:
    """The writer sends a batch as several requests at once; a point's later version (a
    revision) must never be overtaken by an earlier one: all its versions go in one request,
    in the order queued. Checked on the requests and on what InfluxDB kept."""
    rec = _SlowRecorder()
    writer = BufferedWriter(rec, clock=ManualClock(), batch_points=500, flush_interval_ms=50,
                            concurrency=3)
    lines = []
    for version in range(4):  # 4 versions of 300 points, interleaved across batches
        lines += [f"m,d=s{i % 60},w=10s v={version}.0,rev={version}i {T_NOW + i}"
                  for i in range(300)]
    writer.add(from_lines(lines[:700]), token="a")
    writer.add(from_lines(lines[700:]), token="b")
    assert asyncio.run(writer.flush(None, attempts=3))
    assert rec.most_active > 1  # the requests did overlap
    # every version of a point: in one request after the earlier ones, or in a request that
    # started only after the one holding the earlier version had ended
    seen: dict[tuple[str, str], tuple[int, float, float]] = {}  # point -> version, start, end
    for start, end, req in sorted(rec.requests):
        for ln in req:
            tags, fields, ts = ln.split(" ")
            version = int(fields.split("rev=")[1].rstrip("i"))
            before = seen.get((tags, ts))
            if before is not None:
                assert before[0] < version
                assert before[1:] == (start, end) or before[2] <= start, (before, start)
            seen[(tags, ts)] = (version, start, end)
    assert len(seen) == 300
    assert {v[0] for v in seen.values()} == {3}
    # the same lines through real InfluxDB, three requests at a time: the last version stays
    sink = InfluxV1Sink(influx_db.url, influx_db.database)
    real = BufferedWriter(sink, clock=ManualClock(), batch_points=500, flush_interval_ms=50,
                          concurrency=3)
    real.add(from_lines(lines))
    assert asyncio.run(real.flush(None, attempts=3))
    doc = influx_db.query('SELECT min("rev"), max("rev"), count("rev") FROM "m"')
    assert isinstance(doc, dict)
    assert doc["results"][0]["series"][0]["values"][0][1:] == [3, 3, 300]
    assert real.points_written == len(lines)


def test_number_texts_of_the_fast_line_builder_are_read_back_exactly(
        influx_db: InfluxV1Client) -> None:
    """cloud.points formats numbers with orjson (1e-8, 1e+16: not Python's 1e-08, 1e+16):
    InfluxDB must read every form back as the same float."""
    import numpy as np

    from cloud.sinks.points import number_texts

    values = np.array([1e-8, 1e16, -0.0, 5e-324, 1.7976931348623157e308, 22.0, 0.1, -3.5e-300,
                       123456789.125])
    texts = number_texts(values)
    lines = [f"fmt,k=v{i} v={t} {T_NOW + i}" for i, t in enumerate(texts)]
    InfluxV1Sink(influx_db.url, influx_db.database).write(from_lines(lines))
    doc = influx_db.query('SELECT "v" FROM "fmt" GROUP BY "k"')
    assert isinstance(doc, dict)
    got = {s["tags"]["k"]: s["values"][0][1] for s in doc["results"][0]["series"]}
    assert [got[f"v{i}"] for i in range(len(values))] == values.tolist()


def test_points_queued_while_a_write_is_on_its_way_are_written_too() -> None:
    """The writer keeps taking points while a batch is being written; none of them may be
    taken for written (a bug the bench caught once: 10,000 of 100,000 reached InfluxDB while
    every token was confirmed)."""
    rec = _SlowRecorder()
    confirmed: list[object] = []
    writer = BufferedWriter(rec, clock=ManualClock(), batch_points=50, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        for k in range(40):  # 40 batches of 30 points, added while earlier ones are written
            writer.add(from_lines([f"m,d=s{i} v={k}.5 {T_NOW + k * 100 + i}" for i in range(30)]),
                       token=k)
            await asyncio.sleep(0.003)
        for _ in range(300):
            if len(confirmed) == 40:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(scenario())
    assert sorted(confirmed) == list(range(40))  # type: ignore[type-var]
    written = [ln for _, _, req in rec.requests for ln in req]
    assert len(written) == len(set(written)) == 1_200
    assert writer.points_written == 1_200


def test_influxdb_takes_the_settings_and_environment_it_is_given(tmp_path) -> None:
    """What bench/latency.py tries on InfluxDB's side reaches the server through its
    environment: a setting (here a series limit, which refuses the sixth series) and GOGC."""
    ix = InfluxDB(tmp_path, env={"INFLUXDB_DATA_MAX_SERIES_PER_DATABASE": "5",
                                 "GOGC": "200"}).start()
    try:
        client = InfluxV1Client(ix.url, "limits")
        client.create_database()
        client.write_lines([f"m,device=d{i} v=1 1700000000000" for i in range(5)])
        with pytest.raises(SinkError, match="max-series-per-database"):
            client.write_lines(["m,device=d5 v=1 1700000000000"])
        assert ix.proc is not None
        environ = Path(f"/proc/{ix.proc.pid}/environ").read_bytes().split(b"\0")
        assert b"GOGC=200" in environ
    finally:
        ix.stop()


async def _drain_and_stop(writer: BufferedWriter, stop: asyncio.Event, task: asyncio.Task[None],
                          settled: Callable[[], bool] = lambda: True) -> None:
    """Wait (5 s at most) until the writer holds nothing and ``settled``; then stop it."""
    for _ in range(500):
        if not writer.buffered and settled():
            break
        await asyncio.sleep(0.01)
    stop.set()
    await task


def _measurements(rec: _SlowRecorder) -> list[str]:
    """The measurement of every line the recorder was given, in the order written."""
    return [ln.split(",")[0] for _, _, req in rec.requests for ln in req]


def test_background_points_never_hold_up_results() -> None:
    """A gateway's 10,000-row ledger queued just before a burst of window results: the results
    go out after one slice of the ledger at most, the ledger follows, nothing is lost, and only
    the results' token is confirmed (once they are written)."""
    from cloud.sinks.base import BACKGROUND_SLICE

    rec = _SlowRecorder()
    confirmed: list[object] = []
    writer = BufferedWriter(rec, clock=ManualClock(), batch_points=2_000, flush_interval_ms=20,
                            concurrency=1, on_written=confirmed.extend)
    ledger = from_lines([f"ledger,device=d{i} received={i}i {T_NOW}" for i in range(10_000)])
    results = from_lines([f"aggregates,device=d{i} count=10i {T_NOW}" for i in range(3_000)])

    async def scenario() -> None:
        stop = asyncio.Event()
        writer.add(ledger, background=True)
        with pytest.raises(ValueError, match="no token"):
            writer.add(ledger, token="t", background=True)
        assert writer.buffered == 10_000
        task = asyncio.create_task(writer.run(stop))
        await asyncio.sleep(0.001)  # the writer has taken at most one slice of the ledger
        writer.add(results, token="results")
        await _drain_and_stop(writer, stop, task, lambda: bool(confirmed))

    asyncio.run(scenario())
    order = _measurements(rec)
    assert sorted(order) == ["aggregates"] * 3_000 + ["ledger"] * 10_000
    first_result = order.index("aggregates")
    assert first_result <= BACKGROUND_SLICE
    assert order[first_result:first_result + 3_000] == ["aggregates"] * 3_000
    assert all(len(req) <= BACKGROUND_SLICE for _, _, req in rec.requests if "ledger" in req[0])
    assert confirmed == ["results"]
    assert writer.points_written == 13_000
    assert writer.buffered == 0


def test_background_points_wait_no_longer_than_their_bound_under_unrelenting_results() -> None:
    """Results that never let up (a backlog replayed) do not starve a gateway's ledger and
    health: once the oldest has waited BACKGROUND_MAX_WAIT_MS they all go out behind what is
    queued, and nothing is lost."""
    from cloud.sinks.base import BACKGROUND_MAX_WAIT_MS

    class Slower(_SlowRecorder):  # 500 points per 20 ms: slower than the results come
        def write(self, batch: list[Points]) -> None:
            time.sleep(0.02)
            super().write(batch)

    rec = Slower()
    clock = ManualClock()
    writer = BufferedWriter(rec, clock=clock, batch_points=500, flush_interval_ms=20)
    ledger = from_lines([f"ledger,device=d{i} received={i}i {T_NOW}" for i in range(3_000)])
    rounds = 40
    results = [from_lines([f"aggregates,device=d{i} count={k}i {T_NOW + k}" for i in range(2_000)])
               for k in range(rounds)]

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        for k in range(rounds):  # every round queues results before the last are written
            writer.add(results[k])
            if k == 2:
                writer.add(ledger, background=True)
            clock.advance(500)
            await asyncio.sleep(0.005)
        await _drain_and_stop(writer, stop, task)

    asyncio.run(scenario())
    order = _measurements(rec)
    assert order.count("ledger") == 3_000
    assert order.count("aggregates") == rounds * 2_000
    first_ledger = order.index("ledger")
    # queued at round 2, overdue 5 s (10 rounds) later: out behind what was queued then, so
    # results of later rounds are still written after it (without the bound: none)
    assert rounds - 20 > BACKGROUND_MAX_WAIT_MS // 500 + 2  # the scenario outlasts the bound
    assert order[first_ledger + 3_000:].count("aggregates") >= 10 * 2_000, first_ledger
    assert order[first_ledger:first_ledger + 3_000] == ["ledger"] * 3_000


class _Gated:
    """A sink whose requests holding a line with ``hold`` in it wait until ``gate`` opens;
    it records writes and deletes in the order they happened (lines, or ``("delete", ids)``)."""

    name = "gated"

    def __init__(self, hold: str) -> None:
        self.hold = hold
        self.gate = threading.Event()
        self.events: list[object] = []
        self.held = threading.Event()  # a held request is waiting
        self._lock = threading.Lock()

    def write(self, batch: list[Points]) -> None:
        lines = encode(batch)
        if any(self.hold in ln for ln in lines):
            self.held.set()
            assert self.gate.wait(10)
        with self._lock:
            self.events.append(lines)

    def delete(self, points: list[object]) -> None:
        with self._lock:
            self.events.append(("delete", points))

    def close(self) -> None:
        pass

    def written(self) -> list[str]:
        with self._lock:
            return [ln for e in self.events if isinstance(e, list) for ln in e]


def _lane_of(lines: list[str], lanes: int) -> list[int]:
    """The writer's lane of each line (its series key's hash, as the writer shards)."""
    return [hash(s) % lanes for p in from_lines(lines) for s in p.series()]


async def _until(cond: Callable[[], bool], what: str) -> None:
    for _ in range(1_000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_batch_is_confirmed_once_written_not_once_the_queue_is_empty() -> None:
    """The edge hears of its batch as soon as its points are in InfluxDB, while later batches
    are still on their way (a backlog replay no longer holds every acknowledgement until the
    whole queue is written)."""
    sink = _Gated(hold="later")
    confirmed: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=100, flush_interval_ms=20,
                            on_written=confirmed.extend)

    async def scenario() -> None:
        writer.add(from_lines([f"m,d=first{i} v=1.5 {T_NOW}" for i in range(100)]), token="first")
        writer.add(from_lines([f"m,d=later{i} v=1.5 {T_NOW}" for i in range(100)]), token="later")
        flush = asyncio.ensure_future(writer.flush(None, attempts=3))
        await _until(sink.held.is_set, "the later batch's request")
        await _until(lambda: confirmed == ["first"], "the first batch's confirmation")
        assert not flush.done()
        sink.gate.set()
        assert await flush
        assert confirmed == ["first", "later"]

    asyncio.run(scenario())
    assert len(sink.written()) == 200


def test_a_lane_keeps_writing_while_the_other_waits_on_a_slow_request() -> None:
    """Two lanes: one request held up by the server does not stop the other lane, which sends
    its next requests as its own come back; the token covering both waits for both."""
    slow = "m,d=slow v=1.5 1"
    mine = _lane_of([slow], 2)[0]
    others = [ln for ln in (f"m,d=o{i} v=1.5 {T_NOW}" for i in range(400))
              if _lane_of([ln], 2)[0] != mine][:60]
    sink = _Gated(hold="d=slow ")
    confirmed: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=20, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)

    async def scenario() -> None:
        writer.add(from_lines([slow, *others]), token="t")
        flush = asyncio.ensure_future(writer.flush(None, attempts=3))
        # the sink records a request in its thread before the writer hears it came back:
        # wait for both (make test once read 11 buffered, the sixth request not yet heard)
        await _until(lambda: len(sink.written()) == 60 and writer.buffered == 1,
                     "the other lane's six requests, written and heard")
        assert sink.held.is_set()
        assert not confirmed
        sink.gate.set()
        assert await flush
        assert confirmed == ["t"]

    asyncio.run(scenario())
    assert sorted(sink.written()) == sorted([slow, *others])
    assert [len(e) for e in sink.events][:6] == [10] * 6  # batch_points / lanes per request


def test_points_queued_after_a_delete_wait_for_it() -> None:
    """A withdrawal runs after what was queued before it and before anything queued after it:
    a later version of the same point survives it (in the store, field by field), and the token
    queued with the withdrawal is confirmed only once it ran."""
    from cloud.sinks.base import MemorySink

    class Recording(MemorySink):
        def __init__(self) -> None:
            super().__init__(strict=True)
            self.events: list[str] = []

        def write(self, batch: list[Points]) -> None:
            time.sleep(0.002)
            self.events += [f"write {ln}" for ln in encode(batch)]
            super().write(batch)

        def delete(self, points: list[tuple[str, dict[str, str], int]]) -> None:
            time.sleep(0.01)
            self.events += [f"delete {p[1]['d']}" for p in points]
            super().delete(points)

    sink = Recording()
    confirmed: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=4, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)
    writer.add(from_lines([f"m,d=a{i} v=0.5 {T}" for i in range(8)]), token="withdrawing")
    writer.delete([("m", {"d": "a3"}, T)])
    writer.add(from_lines([f"m,d=a3 v=1.5 {T}", f"m,d=b v=1.5 {T}"]), token="after")
    assert asyncio.run(writer.flush(None, attempts=3))
    at = sink.events.index("delete a3")
    assert sorted(sink.events[:at]) == sorted(f"write m,d=a{i} v=0.5 {T}" for i in range(8))
    assert sorted(sink.events[at + 1:]) == [f"write m,d=a3 v=1.5 {T}", f"write m,d=b v=1.5 {T}"]
    assert sink.points[("m", (("d", "a3"),), T)] == {"v": 1.5}
    assert confirmed == ["withdrawing", "after"]
    assert writer.points_deleted == 1
    assert writer.points_written == 10


def test_discarding_while_writes_are_on_their_way_confirms_nothing_of_them() -> None:
    """A fenced worker drops what it holds: requests already on their way finish, but confirm
    nothing; the writer goes on with what is queued after that."""
    sink = _Gated(hold="held")
    confirmed: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=10, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)

    async def scenario() -> None:
        writer.add(from_lines([f"m,d=held{i} v=1.5 {T_NOW}" for i in range(30)]), token="old")
        flush = asyncio.ensure_future(writer.flush(None, attempts=3))
        await _until(sink.held.is_set, "a request on its way")
        assert writer.discard() == 30
        sink.gate.set()
        assert await flush
        assert confirmed == []
        assert writer.buffered == 0
        writer.add(from_lines([f"m,d=new{i} v=1.5 {T_NOW}" for i in range(5)]), token="new")
        assert await writer.flush(None, attempts=3)
        assert confirmed == ["new"]

    asyncio.run(scenario())
    assert sum("d=new" in ln for ln in sink.written()) == 5
    assert sum("d=held" in ln for ln in sink.written()) <= 10  # at most the two first requests


def test_a_write_that_gives_up_keeps_its_points_queued_in_order() -> None:
    """A lane whose request gave up (attempts spent) puts it back at its head: the next flush
    writes every point once, each point's versions in the order queued, and confirms once."""
    class Flaky(_SlowRecorder):
        failures = 3

        def write(self, batch: list[Points]) -> None:
            with self._lock:
                fail = self.failures > 0
                self.failures -= 1
            if fail:
                raise SinkError("503", retryable=True)
            super().write(batch)

    rec = Flaky()
    confirmed: list[object] = []
    writer = BufferedWriter(rec, clock=ManualClock(), batch_points=20, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)
    lines = [f"m,d=s{i % 15} v={k}.0 {T + i % 15}" for k in range(4) for i in range(15)]
    writer.add(from_lines(lines), token="t")
    ok = [asyncio.run(writer.flush(None, attempts=1)) for _ in range(6)]
    assert ok[0] is False
    assert ok[-1] is True
    assert confirmed == ["t"]
    written = [ln for _, _, req in sorted(rec.requests) for ln in req]
    assert sorted(written) == sorted(lines)
    for i in range(15):  # each point's four versions, in order
        assert [ln.split(" ")[1] for ln in written if ln.startswith(f"m,d=s{i} ")] == [
            f"v={k}.0" for k in range(4)]


def test_a_flush_cancelled_with_requests_on_their_way_leaves_nothing_behind() -> None:
    """The worker stopping hard cancels a flush mid-request: what those requests held goes
    back to its lanes, and the next flush writes it (a rewrite is harmless) and confirms."""
    sink = _Gated(hold="d=w")
    confirmed: list[object] = []
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=10, flush_interval_ms=20,
                            concurrency=2, on_written=confirmed.extend)
    lines = [f"m,d=w{i} v=1.5 {T_NOW}" for i in range(30)]

    async def scenario() -> None:
        writer.add(from_lines(lines), token="t")
        flush = asyncio.ensure_future(writer.flush(None, attempts=3))
        await _until(sink.held.is_set, "a request on its way")
        flush.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flush
        assert confirmed == []
        assert writer.buffered == 30
        sink.gate.set()
        assert await writer.flush(None, attempts=3)

    asyncio.run(scenario())
    assert confirmed == ["t"]
    assert set(sink.written()) == set(lines)
    assert writer.buffered == 0


def test_the_writer_sends_at_once_while_input_keeps_coming() -> None:
    """No waiting for a full batch, a pause or the interval: input that never pauses (a
    minute boundary's burst) has its first points written and confirmed while the rest is
    still coming, in requests that grow with what gathered meanwhile."""
    rec = _SlowRecorder()
    confirmed: list[object] = []
    writer = BufferedWriter(rec, clock=ManualClock(), batch_points=5_000,
                            flush_interval_ms=60_000, concurrency=2,
                            on_written=confirmed.extend)

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(writer.run(stop))
        for k in range(60):  # 10 points every 5 ms: never quiet for the writer's tick
            writer.add(from_lines([f"m,d=s{i} v={k}.5 {T_NOW + k}" for i in range(10)]),
                       token=k)
            await asyncio.sleep(0.005)
        assert confirmed[:1] == [0]  # the first chunk went out long before the last came
        await _drain_and_stop(writer, stop, task, lambda: len(confirmed) == 60)

    asyncio.run(scenario())
    assert confirmed == list(range(60))
    assert writer.points_written == 600
    assert max(len(req) for _, _, req in rec.requests) <= 2_500
