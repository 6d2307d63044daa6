"""One contract, every sink: what the cloud worker relies on from wherever it writes, checked
through the same BufferedWriter the worker uses (several requests at once, retries, bisection
and dead letters are the writer's; the sink only writes, deletes and says why it failed).

* ``influxdb1``: a real InfluxDB 1.6, started by the session fixture.
* ``influxdb2``: the real ``influxdb-client`` against a FAKE InfluxDB 2.x HTTP API (2.x cannot be
  installed on these machines: Debian ships 1.6 and nothing else may be downloaded). The fake
  implements what the sink uses, as documented for 2.x: ``POST /api/v2/write`` (token auth,
  org/bucket, precision, 204 / 400 ``invalid`` with nothing written / 401 / 404) and
  ``POST /api/v2/delete`` (start, stop, predicate).
* ``memory``: ``MemorySink(strict=True)``, the double the other tests use.
"""

from __future__ import annotations

import asyncio
import gzip
import http.server
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import pytest

from cloud.config import InfluxConfig
from cloud.sinks import BY_VERSION, build_sink
from cloud.sinks.base import BufferedWriter, MemorySink, Sink, SinkError
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.sinks.lineproto import line, parse_line
from cloud.sinks.points import from_lines
from devices.clock import ManualClock
from fieldline.services import free_port

pytestmark = pytest.mark.integration

T = 1_700_000_000_000
Key = tuple[str, tuple[tuple[str, str], ...], int]
Store = dict[Key, dict[str, object]]
TOKEN = "contract-token"


class _Fake2x(http.server.BaseHTTPRequestHandler):
    """The slice of the InfluxDB 2.x HTTP API the 2.x sink uses."""

    store: ClassVar[Store] = {}
    types: ClassVar[dict[tuple[str, str], type]] = {}
    buckets: ClassVar[set[str]] = {"fl"}
    lock = threading.Lock()

    def log_message(self, *_: Any) -> None:
        pass

    def _reply(self, status: int, doc: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode() if doc else b""
        self.send_response(status)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._reply(401, {"code": "unauthorized", "message": "unauthorized access"})
        if q.get("bucket") not in self.buckets or not q.get("org"):
            return self._reply(404, {"code": "not found",
                                     "message": f'bucket "{q.get("bucket")}" not found'})
        if url.path == "/api/v2/write":
            if q.get("precision") != "ms":
                return self._reply(400, {"code": "invalid", "message": "precision must be ms"})
            parsed = []
            for ln in raw.decode().splitlines():
                try:
                    parsed.append(parse_line(ln))
                except ValueError as exc:
                    return self._reply(400, {"code": "invalid",
                                             "message": f"unable to parse '{ln}': {exc}"})
            refused = []
            with self.lock:
                for meas, tags, fields, ts in parsed:
                    clash = [k for k, v in fields.items()
                             if self.types.setdefault((meas, k), type(v)) is not type(v)]
                    if clash:
                        refused.append(clash[0])
                        continue
                    self.store.setdefault((meas, tuple(sorted(tags.items())), ts), {}).update(
                        fields)
            if refused:  # 2.x: the others are written, the request answered 422
                return self._reply(422, {
                    "code": "unprocessable entity",
                    "message": f"failure writing points to database: partial write: field type "
                               f"conflict: input field \"{refused[0]}\" dropped={len(refused)}"})
            return self._reply(204)
        if url.path == "/api/v2/delete":
            doc = json.loads(raw)
            lo = int(datetime.fromisoformat(doc["start"]).timestamp() * 1000)
            hi = int(datetime.fromisoformat(doc["stop"]).timestamp() * 1000)
            cond = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', doc["predicate"]))
            meas = cond.pop("_measurement")
            with self.lock:
                for key in [k for k in self.store if k[0] == meas and lo <= k[2] <= hi
                            and dict(k[1]) == cond]:
                    del self.store[key]
            return self._reply(204)
        return self._reply(404, {"code": "not found", "message": "path not found"})


@dataclass
class Target:
    name: str
    sink: Sink
    read: Callable[[], Store]


def _v1_read(client: InfluxV1Client) -> Store:
    out: Store = {}
    doc = client.query("SELECT * FROM /.*/ GROUP BY *")
    assert isinstance(doc, dict)
    for s in doc["results"][0].get("series", []):
        tags = tuple(sorted((k, v) for k, v in (s.get("tags") or {}).items() if v))
        for row in s["values"]:
            fields = {c: v for c, v in zip(s["columns"][1:], row[1:], strict=True)
                      if v is not None}
            out[(s["name"], tags, int(row[0]))] = fields
    return out


def _config(version: int, url: str) -> InfluxConfig:
    if version == 1:
        return InfluxConfig(url=url, database="fl", timeout_ms=1_000)
    return InfluxConfig(version=2, url=url, token=TOKEN, org="o", bucket="fl", timeout_ms=1_000)


@pytest.fixture(params=["influxdb1", "influxdb2", "memory"])
def target(request: pytest.FixtureRequest, influx_db: InfluxV1Client) -> Iterator[Target]:
    if request.param == "influxdb1":
        sink = build_sink(InfluxConfig(url=influx_db.url, database=influx_db.database))
        yield Target("influxdb1", sink, lambda: _v1_read(influx_db))
        sink.close()
    elif request.param == "influxdb2":
        _Fake2x.store = {}
        _Fake2x.types = {}
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake2x)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        sink = build_sink(_config(2, f"http://127.0.0.1:{server.server_address[1]}"))
        yield Target("influxdb2", sink, lambda: dict(_Fake2x.store))
        sink.close()
        server.shutdown()
    else:
        mem = MemorySink(strict=True)
        yield Target("memory", mem, lambda: dict(mem.points))


def _write(sink: Sink, lines: list[str], deletes: list[Any] | None = None,
           batch: int = 7) -> BufferedWriter:
    """Through the worker's writer, as points (the sink never sees line protocol from us)."""
    writer = BufferedWriter(sink, clock=ManualClock(), batch_points=batch, flush_interval_ms=50,
                            concurrency=2)
    confirmed: list[object] = []
    writer.on_written = confirmed.extend
    writer.add(from_lines(lines), token="t")
    if deletes:
        writer.delete(deletes)
    assert asyncio.run(writer.flush(None, attempts=3))
    assert confirmed == ["t"]
    return writer


def _key(meas: str, tags: dict[str, str], ts: int) -> Key:
    return meas, tuple(sorted(tags.items())), ts


def test_points_land_with_their_types_tags_and_escapes(target: Target) -> None:
    tags = {"device": "t 1,a=b", "site": "hall \"2\"", "metric": "temperature"}
    fields: dict[str, object] = {"count": 10, "mean": 21.25, "tiny": 1e-8, "huge": 1e16,
                                 "open": True, "message": 'said "hi", a=b\\c'}
    lines = [line("aggregates", {**tags, "window": f"w{i}"}, fields, T + i) for i in range(20)]
    assert all(ln is not None for ln in lines)
    w = _write(target.sink, [ln for ln in lines if ln])
    assert w.points_written == 20
    got = target.read()
    for i in range(20):
        assert got[_key("aggregates", {**tags, "window": f"w{i}"}, T + i)] == fields


def test_rewriting_an_identity_merges_field_by_field(target: Target) -> None:
    first = [f"m,d=a{i} v={i}.5,rev=0i,keep=1i {T + i}" for i in range(10)]
    second = [f"m,d=a{i} v={i}.75,rev=1i {T + i}" for i in range(0, 10, 2)]
    _write(target.sink, first + second)
    got = target.read()
    assert len(got) == 10
    for i in range(10):
        want = ({"v": i + 0.75, "rev": 1, "keep": 1} if i % 2 == 0
                else {"v": i + 0.5, "rev": 0, "keep": 1})
        assert got[_key("m", {"d": f"a{i}"}, T + i)] == want


def test_a_delete_removes_that_identity_only(target: Target) -> None:
    lines = [f"m,d=a,w=10s v={i}.0 {T + i * 10_000}" for i in range(6)]
    lines += [f"m,d=b,w=10s v=9.0 {T}"]
    _write(target.sink, lines, deletes=[("m", {"d": "a", "w": "10s"}, T + 20_000)])
    got = target.read()
    assert _key("m", {"d": "a", "w": "10s"}, T + 20_000) not in got
    assert len(got) == 6
    assert got[_key("m", {"d": "b", "w": "10s"}, T)] == {"v": 9.0}


def test_a_refused_point_is_dead_lettered_and_the_rest_lands(target: Target) -> None:
    """A field keeps the type of its first write; a point that changes it is refused for good
    (found by bisection, dead-lettered with its reason) and every other point lands."""
    _write(target.sink, [f"m,d=first v=0.5 {T - 1}"])  # v is a float from now on
    lines = [f"m,d=a{i} v={i}.5 {T + i}" for i in range(12)]
    lines[5] = f'm,d=a5 v="five" {T + 5}'
    w = _write(target.sink, lines)
    got = target.read()
    assert len(got) == 12
    assert _key("m", {"d": "a5"}, T + 5) not in got
    assert dict(w.dead_letters) == {"field_type_conflict": 1}
    assert w.points_written == 11
    assert w.points_rejected == 1


@pytest.mark.parametrize("version", sorted(BY_VERSION))
def test_an_unreachable_server_is_retryable(version: int) -> None:
    """Every server-backed sink says "try again" when nothing answers (never "refused")."""
    sink = build_sink(_config(version, f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(SinkError) as err:
        sink.write(from_lines([f"m v=1.0 {T}"]))
    assert err.value.retryable
    sink.close()


def test_a_missing_bucket_is_retried_and_refuses_no_point() -> None:
    """2.x answers 404 for a bucket that is not there (deleted, or misspelt in the config):
    that is not the points' fault. Before, it was taken as a refusal: every point was isolated,
    dead-lettered, and its batch acknowledged."""
    _Fake2x.store = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Fake2x)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cfg = InfluxConfig(version=2, url=f"http://127.0.0.1:{server.server_address[1]}",
                       token=TOKEN, org="o", bucket="gone", timeout_ms=1_000)
    sink = build_sink(cfg)
    try:
        with pytest.raises(SinkError) as err:
            sink.write(from_lines([f"m v=1.0 {T}"]))
        assert err.value.retryable
        writer = BufferedWriter(sink, clock=ManualClock(), batch_points=7, flush_interval_ms=50,
                                max_backoff_ms=20)
        writer.add(from_lines([f"m,d=a{i} v=1.0 {T + i}" for i in range(5)]), token="t")
        assert not asyncio.run(writer.flush(None, attempts=2))
        assert not writer.dead_letters
    finally:
        sink.close()
        server.shutdown()
