"""Cloud workers on NATS JetStream: partitions pinned by the engine, state that moves with them.

A 3-node JetStream cluster (R3 stream), the bridge from the cloud Mosquitto, edge agents and
three workers run as real processes on loopback. Workers are killed, paused and a NATS node is
killed while a fleet publishes; each run ends with the oracle (lost = unexpected = mismatched =
0), both ledger laws per gateway, and the anomalies in InfluxDB equal to those of one
uninterrupted pass over the very same stream (detector state moved, not relearned).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud.config import load_cloud_config
from cloud.ingest import PartitionEvent, SourceMessage
from cloud.jetstream import (
    PART,
    FencedError,
    JetStreamConfig,
    JetStreamSource,
    SnapshotStore,
    StreamMismatchError,
    _topic,
    connect,
    ensure_stream,
    gateway_from_token,
    gateway_token,
    login,
    partition_of_gateway,
    replicas_behind,
)
from cloud.panels import ALERT_RULES, Params, render
from cloud.sinks.base import MemorySink
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.sinks.points import encode
from cloud.worker import CloudWorker
from fieldline.faults import FaultProxy
from fieldline.services import Mosquitto, NatsCluster, NatsServer, free_ports
from simulators.fleet import FleetSpec
from tests.rig import FleetRig, cloud_status
from tests.test_faults import fill, tmpfs

CMD = [sys.executable, "-m", "fieldline.cli", "--log-level", "INFO"]
NATS_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "nats-server.conf"
P = 4  # partitions; gw-1 -> 1, gw-2 -> 0: member 0/2 serves {0, 2}, member 1/2 {1, 3}
GATEWAYS = ("gw-1", "gw-2")


@given(st.text(min_size=1, max_size=20).filter(lambda s: all(c not in s for c in "/+#")))
def test_gateway_ids_round_trip_through_subject_tokens(gw: str) -> None:
    tok = gateway_token(gw)
    assert tok
    assert all(c.isascii() and (c.isalnum() or c in "_-~") for c in tok)
    assert gateway_from_token(tok) == gw


def source_reading_from(sub: type, max_queue: int | None = None) -> JetStreamSource:
    """A source whose pull subscriptions are instances of ``sub`` (a stand-in for the server's
    consumer: what it answers to ``consumer_info`` and ``fetch``), for the replay's pacing."""

    class Sub(sub):  # type: ignore[misc]
        async def unsubscribe(self) -> None:
            return None

    class Js:
        async def pull_subscribe(self, *_a: object, **_k: object) -> Any:
            return Sub()

    class Nc:
        def jetstream(self) -> Js:
            return Js()

    kw = {} if max_queue is None else {"max_queue": max_queue}
    src = JetStreamSource(JetStreamConfig(servers=("nats://127.0.0.1:1",)), worker_id="w", **kw)
    src._nc = Nc()
    return src


def test_a_login_is_taken_out_of_the_server_urls() -> None:
    """...and given to nats-py as options, which it sends to every server (see
    test_a_login_reaches_the_nodes_the_cluster_announces)."""
    assert login("nats://fl:p%40ss@n1:4222", "tls://n2:4222") == (
        ["nats://n1:4222", "tls://n2:4222"], {"user": "fl", "password": "p@ss"})
    assert login("nats://a-token@n1:4222") == (["nats://n1:4222"], {"token": "a-token"})
    assert login("nats://n1:4222", "nats://n2:4222") == (["nats://n1:4222", "nats://n2:4222"], {})


def test_a_replay_waits_between_asks_while_the_consumer_is_not_ready() -> None:
    """A consumer just created on a cluster answers 503 at once until it has a leader (the CI
    failure of 2026-12-03): the replay asks again after a pause, not in a busy loop, and gives
    the partition up at its bound. Its first second is watched: a spin makes thousands of asks."""
    import nats.js.errors

    class Sub:
        asks = 0

        async def consumer_info(self) -> Any:
            return type("Info", (), {"num_pending": 3})()

        async def fetch(self, n: int, timeout: float) -> list[Any]:
            Sub.asks += 1
            raise nats.js.errors.ServiceUnavailableError

    src = source_reading_from(Sub)

    async def watch() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(src._replay(0, 9, 1), 1.0)

    asyncio.run(watch())
    assert 1 <= Sub.asks <= 10, Sub.asks


@pytest.mark.parametrize("offers", ["no TLS", "TLS, not required"])
def test_a_server_listed_as_tls_gets_tls_or_nothing(offers: str) -> None:
    """A server listed as tls:// whose INFO does not require TLS: nats-py alone spoke to it in
    the clear, its CONNECT carrying the login (a server whose `tls {}` block was forgotten, or
    whatever answers at its address). Now one that offers TLS (`allow_non_tls`) is spoken to in
    TLS (the next bytes are a TLS handshake), and one that does not is sent nothing: the cause
    is named for the status, never the password. (A fake server: it sends an INFO and records
    what comes back.)"""
    from devices.mqtt import LinkErrors

    received = bytearray()
    info = {"server_id": "fake", "version": "2.11.0", "proto": 1, "max_payload": 1 << 20,
            "auth_required": True, **({"tls_available": True} if offers != "no TLS" else {})}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await writer.drain()
        with contextlib.suppress(asyncio.TimeoutError, OSError):
            while chunk := await asyncio.wait_for(reader.read(4096), 1.0):
                received.extend(chunk)
        writer.close()

    async def scenario() -> LinkErrors:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        link = LinkErrors("NATS (t)", f"tls://127.0.0.1:{port}", logging.getLogger("t"))
        with pytest.raises(asyncio.TimeoutError):  # it keeps trying, as with any failure
            await asyncio.wait_for(connect([f"tls://fieldline:s3cret@127.0.0.1:{port}"], "t",
                                           errors=link), 2.5)
        server.close()
        return link

    link = asyncio.run(scenario())
    assert b"s3cret" not in received, bytes(received[:200])
    assert b"CONNECT" not in received, bytes(received[:200])
    if offers == "no TLS":
        assert received == b""
        said = link.last or ""
        assert "offers no TLS" in said, said
        assert "tls://127.0.0.1:" in said, said
        assert "s3cret" not in said, said
    else:
        assert received[:2] == b"\x16\x03", bytes(received[:20])  # a TLS ClientHello


def test_a_long_replay_is_read_as_the_worker_gets_through_it() -> None:
    """A takeover replays the partition's tail after its snapshot (all of the stream when the
    snapshot is lost): it is fetched as the worker consumes it, never all into memory."""
    from datetime import UTC, datetime
    from types import SimpleNamespace

    total, fetched, most, stored_s = 5_000, [0], [0], 1_700_000_000

    class Sub:
        async def consumer_info(self) -> Any:
            return SimpleNamespace(num_pending=total)

        async def fetch(self, n: int, timeout: float) -> list[Any]:
            most[0] = max(most[0], src._queue.qsize())
            out = [SimpleNamespace(subject="fl.p.0.gw-1.results", data=b"",
                                   metadata=SimpleNamespace(
                                       sequence=SimpleNamespace(stream=fetched[0] + i + 1),
                                       timestamp=datetime.fromtimestamp(  # when stored
                                           stored_s + fetched[0] + i + 1, UTC)))
                   for i in range(n)]
            fetched[0] += n
            return out

    src = source_reading_from(Sub, max_queue=300)

    async def worker() -> list[int]:
        seen = []
        while len(seen) < total:
            msg = await src._queue.get()
            assert isinstance(msg, SourceMessage)
            assert (msg.replay, msg.stored_ms) == (True, (stored_s + msg.position) * 1000)
            seen.append(msg.position)
            if len(seen) % 50 == 0:
                await asyncio.sleep(0.001)  # slower than the fetches
        return seen

    async def both() -> list[int]:
        consume = asyncio.create_task(worker())
        assert await src._replay(0, 0, 1) == total
        return await asyncio.wait_for(consume, 30)

    assert asyncio.run(both()) == list(range(1, total + 1))
    assert most[0] < 300, most  # (without the wait: thousands queued at once)
    assert src._through[0] == total


def on_one_node(tmp_path: Path, scenario: Callable[[Any, JetStreamConfig], Awaitable[None]]
                ) -> None:
    """Run ``scenario(js, cfg)`` against one real nats-server with the stream (2 partitions)
    and the snapshot buckets set up."""
    import nats

    server = NatsServer(tmp_path / "nats", "n1").start()

    async def run() -> None:
        nc = await nats.connect(server.url)
        try:
            cfg = JetStreamConfig(servers=(server.url,), partitions=2)
            await ensure_stream(nc, cfg)
            await scenario(nc.jetstream(), cfg)
        finally:
            await nc.close()

    try:
        asyncio.run(run())
    finally:
        server.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_fenced_save_never_removes_the_snapshot_another_owner_points_to(
        tmp_path: Path) -> None:
    """Two owners of a partition snapshot the same stream sequence whenever nothing arrived
    between their turns (the fail-over test failing, 2026-12-04: a paused worker resumed, its
    save was fenced, and its clean-up removed the object under the new owner's pointer by that
    shared name; every later claim failed and the partition was never read again). Each save
    has its own object now; and a pointer whose object is gone anyway (lost from the store) makes
    the next owner rebuild the partition from the start of the stream instead of failing."""

    async def scenario(js: Any, cfg: JetStreamConfig) -> None:
        a, b = SnapshotStore(js, cfg, "A"), SnapshotStore(js, cfg, "B")
        assert await a.claim(0) == (None, 0)
        await a.save(0, b"state of A", 5)
        assert await b.claim(0) == (b"state of A", 5)  # A was paused past its pin
        await b.save(0, b"state of B", 5)  # nothing new since: the same sequence
        with pytest.raises(FencedError):  # A resumes and tries to save what it held
            await a.save(0, b"stale state of A", 5)
        obs = await js.object_store(cfg.obj_bucket)
        live = [o.name for o in await obs.list(ignore_deletes=True)]
        assert len(live) == 1, live  # B's; A's earlier and fenced ones are removed
        c = SnapshotStore(js, cfg, "C")
        assert await c.claim(0) == (b"state of B", 5)
        await obs.delete(live[0])  # lost from the store
        d = SnapshotStore(js, cfg, "D")
        assert await d.claim(0) == (None, 0)  # replay it all
        assert d.missing == 1
        await d.save(0, b"state of D", 9)
        assert await SnapshotStore(js, cfg, "E").claim(0) == (b"state of D", 9)

    on_one_node(tmp_path, scenario)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_delivery_lost_on_its_way_still_reaches_the_worker_in_stream_order(
        tmp_path: Path) -> None:
    """CI, 2026-12-07: in the fail-over test, after a NATS node was killed, the anomalies of one
    partition differed from one pass over the stream (its aggregates were right). A delivery
    the server sent but the worker never got (in flight on the connection lost) comes again
    only after ack_wait, behind newer messages, and the worker took it out of order: detectors
    and revisions depend on the order. Here one delivery is dropped on its way in: the worker
    must still get every message once, in stream order."""
    import nats

    server = NatsServer(tmp_path / "nats", "n1").start()
    cfg = JetStreamConfig(servers=(server.url,), partitions=2, ack_wait_ms=1_000)
    p = partition_of_gateway("gw-1", cfg.partitions)
    subject = f"fl.in.{gateway_token('gw-1')}.results"
    dropped: list[bytes] = []

    class LossySub:
        def __init__(self, sub: Any) -> None:
            self.sub = sub

        async def next_msg(self, timeout: float) -> Any:
            while True:
                msg = await self.sub.next_msg(timeout=timeout)
                if msg.data == b"m5" and not dropped:
                    dropped.append(msg.data)  # lost on the way: the server thinks it sent it
                    continue
                return msg

    class Lossy(JetStreamSource):
        async def _pull_once(self, p: int, nc: Any, sub: Any, inbox: str, subject: str,
                             expires: float) -> str | None:
            return await super()._pull_once(p, nc, LossySub(sub), inbox, subject, expires)

    src = Lossy(cfg, worker_id="w")
    got: list[bytes] = []

    async def read() -> None:
        async for item in src.messages():
            if isinstance(item, SourceMessage):
                if not item.covered:
                    got.append(item.payload)
                await src.done([item])  # as the worker does once written

    async def until(cond: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 20
        while not cond():
            assert time.monotonic() < deadline, f"{what}: {got}"
            await asyncio.sleep(0.05)

    async def scenario() -> None:
        nc = await nats.connect(server.url)
        reader = asyncio.create_task(read())
        try:
            js = nc.jetstream()
            await ensure_stream(nc, cfg)
            await js.publish(subject, b"m0", stream=cfg.stream)
            await until(lambda: p in src.owned and got == [b"m0"], "the partition taken")
            for i in range(1, 20):  # delivered as they come
                await js.publish(subject, f"m{i}".encode(), stream=cfg.stream)
                await asyncio.sleep(0.1)
            await until(lambda: len(got) >= 20, "every message")
            await asyncio.sleep(2.5)  # past ack_wait: the lost delivery came again meanwhile
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await src.close()
            await nc.close()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert dropped == [b"m5"]
    assert got == [f"m{i}".encode() for i in range(20)]
    assert src.counters["deliveries_lost"] >= 1


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_snapshot_bucket_lookup_that_failed_is_asked_again(tmp_path: Path) -> None:
    """Found by the disk-full test below: the store looked its two buckets up on first use, and
    when the second lookup failed (JetStream just back after a restart, a timeout) it kept the
    first and never asked again: every later claim of that worker failed ("'NoneType' object
    has no attribute 'get'") and its partitions were never read again."""

    async def scenario(js: Any, cfg: JetStreamConfig) -> None:
        class Flaky:
            failures = 1

            def __getattr__(self, name: str) -> Any:
                return getattr(js, name)

            async def object_store(self, bucket: str) -> Any:
                if self.failures:
                    self.failures -= 1
                    raise TimeoutError("JetStream did not answer")
                return await js.object_store(bucket)

        store = SnapshotStore(Flaky(), cfg, "A")
        with pytest.raises(TimeoutError):
            await store.claim(0)
        assert await store.claim(0) == (None, 0)
        await store.save(0, b"state", 4)
        assert await SnapshotStore(js, cfg, "B").claim(0) == (b"state", 4)

    on_one_node(tmp_path, scenario)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_changed_retention_reaches_the_existing_stream(tmp_path: Path) -> None:
    """engine.retention and retention_bytes apply to a stream that exists: before, the stream
    kept the values it was created with, whatever the configuration said later."""

    async def scenario(js: Any, cfg: JetStreamConfig) -> None:
        info = await js.stream_info(cfg.stream)
        assert (info.config.max_age, info.config.max_bytes) == (7 * 86_400, -1)
        nc = js._nc
        await ensure_stream(nc, replace(cfg, max_age_s=3_600, max_bytes=2 << 20))
        info = await js.stream_info(cfg.stream)
        assert (info.config.max_age, info.config.max_bytes) == (3_600, 2 << 20)
        subjects = info.config.subjects
        await ensure_stream(nc, replace(cfg, max_age_s=3_600))  # the cap taken away again
        info = await js.stream_info(cfg.stream)
        assert (info.config.max_age, info.config.max_bytes) == (3_600, -1)
        assert info.config.subjects == subjects  # the rest as it was

    on_one_node(tmp_path, scenario)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_snapshots_no_pointer_names_are_removed(tmp_path: Path) -> None:
    """A worker SIGKILLed between writing its snapshot object and pointing to it, or never told
    whether its pointer update landed (a timeout, a cluster without quorum), left the object in
    the store for good. The next owner's claim sweeps the partition's objects its pointer does
    not name (other partitions' untouched); an owner whose update went unanswered removes the
    object at its next save that succeeds."""

    async def scenario(js: Any, cfg: JetStreamConfig) -> None:
        obs = await js.object_store(cfg.obj_bucket)

        async def live() -> set[str]:
            return {o.name for o in await obs.list(ignore_deletes=True)}

        a = SnapshotStore(js, cfg, "A")
        await a.claim(0)
        await a.save(0, b"A at 5", 5)
        await a.claim(1)
        await a.save(1, b"A's p1", 3)
        await obs.put("p0.9.0123456789ab", b"A at 9, killed before pointing to it")
        kv = await js.key_value(cfg.kv_bucket)
        real_update = kv.update
        calls = 0

        async def unanswered(*args: Any, **kw: Any) -> int:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise TimeoutError("no answer")
            return int(await real_update(*args, **kw))

        a._kv = kv
        kv.update = unanswered  # type: ignore[method-assign]
        with pytest.raises(TimeoutError):
            await a.save(1, b"A's p1, unanswered", 4)
        assert len(await live()) == 4
        await a.save(1, b"A's p1 again", 5)  # it knows now: the unanswered one is stale
        assert sum(n.startswith("p1.") for n in await live()) == 1
        kv.update = real_update  # type: ignore[method-assign]

        b = SnapshotStore(js, cfg, "B")
        assert await b.claim(0) == (b"A at 5", 5)
        assert await b.sweep(0) == 1
        names = await live()
        assert "p0.9.0123456789ab" not in names
        assert sum(n.startswith("p0.") for n in names) == 1  # the one the pointer names
        assert sum(n.startswith("p1.") for n in names) == 1  # not B's partition
        assert await SnapshotStore(js, cfg, "C").claim(0) == (b"A at 5", 5)
        # C claimed since: B touches nothing (it tries again while it believes p0 is its)
        assert await b.sweep(0) is None
        assert sum(n.startswith("p0.") for n in await live()) == 1

    on_one_node(tmp_path, scenario)


@pytest.mark.integration
@pytest.mark.timeout(90)
def test_the_shipped_nats_nodes_let_no_one_in_without_their_logins(tmp_path: Path) -> None:
    """deploy/nats/nats-server.conf as its unit runs it (logins and routes from the nats.env
    `fieldline cloud nats-env` writes): a client without the login is refused, and so is a
    node without the route login, which would otherwise join the cluster and see and publish
    everything; the nodes' own routes, with it, carry messages."""
    import nats
    import nats.errors
    cluster = NatsCluster(tmp_path / "nats", 2, shipped=NATS_CONF).start()
    n1, n2 = cluster.nodes
    intruder = NatsServer(tmp_path / "intruder", "x", cluster_port=free_ports(1)[0],
                          routes=(n1.cluster_port or 0,))

    async def scenario() -> None:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(n1.address, allow_reconnect=False, max_reconnect_attempts=0)
        sub_nc = await nats.connect(n1.url)
        pub_nc = await nats.connect(n2.url)
        x_nc = await nats.connect(intruder.url)
        try:
            inbox = await sub_nc.subscribe("probe.>")
            await sub_nc.flush()
            deadline = time.monotonic() + 10
            got = None
            while got is None:  # the route between the shipped nodes is up once one arrives
                assert time.monotonic() < deadline, "the shipped nodes never routed"
                await pub_nc.publish("probe.ours", b"ours")
                with contextlib.suppress(nats.errors.TimeoutError):
                    got = (await inbox.next_msg(timeout=0.5)).data
            assert got == b"ours"
            log_file = n1.workdir / "nats.log"
            while "authentication error" not in log_file.read_text():  # the intruder tried
                assert time.monotonic() < deadline + 10, log_file.read_text()[-2000:]
                await asyncio.sleep(0.2)
            for _ in range(3):
                await x_nc.publish("probe.theirs", b"theirs")
                await x_nc.flush()
                with pytest.raises(nats.errors.TimeoutError):
                    await inbox.next_msg(timeout=0.7)
        finally:
            for nc in (sub_nc, pub_nc, x_nc):
                await nc.close()

    try:
        intruder.start()
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        intruder.stop()
        cluster.stop()


def test_nats_env_writes_new_logins_once(tmp_path: Path) -> None:
    """`fieldline cloud nats-env`: the nodes' environment file (0600, never written over: its
    passwords are in use) and cloud.toml's servers with the clients' login."""
    from cloud.natslogin import ROUTE_USER, USER, read_env
    out = tmp_path / "nats.env"
    cmd = [*CMD, "cloud", "nats-env", "--nodes", "nats-a,nats-b", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
    assert out.stat().st_mode & 0o777 == 0o600
    env = read_env(out)
    password, route = env["NATS_PASSWORD"], env["NATS_ROUTE_PASSWORD"]
    assert password != route
    assert min(len(password), len(route)) >= 32
    assert env["NATS_ROUTES"] == (f"[nats-route://{ROUTE_USER}:{route}@nats-a:6222,"
                                  f"nats-route://{ROUTE_USER}:{route}@nats-b:6222]")
    cfg = tmp_path / "cloud.toml"
    cfg.write_text(f'[worker]\nstate_dir = "s"\n[ingest]\nbroker = "mqtt://127.0.0.1:1883"\n'
                   f'[engine]\nkind = "jetstream"\n{done.stdout}')
    js = load_cloud_config(cfg).jetstream
    assert js is not None
    assert js.servers == (f"nats://{USER}:{password}@nats-a:4222",
                          f"nats://{USER}:{password}@nats-b:4222")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode != 0, again.stderr
    assert "exists" in again.stderr, again.stderr
    assert read_env(out) == env
    bad = subprocess.run([*CMD, "cloud", "nats-env", "--nodes", "nats-a:4222",
                          "--out", str(tmp_path / "other.env")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0, bad.stderr
    assert "--nodes" in bad.stderr, bad.stderr
    assert not (tmp_path / "other.env").exists()


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_worker_started_while_its_cluster_has_no_quorum_waits_for_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Found by the JetStream mixed-fault soak (2026-12-05): two of three NATS nodes were down
    when a killed worker was started again; its set-up gave up after 30 tries of "JetStream
    system temporarily unavailable" (~25 s) and the worker exited, so a partition had no
    worker left and its gateway's results waited for good. A worker now waits for its cluster,
    warning, and serves once quorum is back; a stream of another partitioning still fails at
    once, naming the key."""
    cluster = NatsCluster(tmp_path / "nats", 3, shipped=NATS_CONF).start()

    async def scenario() -> None:
        import nats

        cfg = JetStreamConfig(servers=tuple(cluster.urls), partitions=2, replicas=3)
        nc = await nats.connect(cluster.urls)
        try:
            await ensure_stream(nc, cfg)
            with pytest.raises(StreamMismatchError, match=r"engine\.partitions"):
                await ensure_stream(nc, replace(cfg, partitions=3))
        finally:
            await nc.close()
        cluster.nodes[1].kill()
        cluster.nodes[2].kill()
        src = JetStreamSource(cfg, worker_id="w")
        items = src.messages()
        first = asyncio.ensure_future(items.__anext__())
        try:
            await asyncio.sleep(35)  # the old set-up gave up after 30 tries: 25 s here
            assert not first.done(), first
            assert not src.connected.is_set()
            # its status says so (it had said nothing: a standby-like "owns no partition")
            trouble = src.engine_trouble or {}
            assert "the stream FIELDLINE cannot be set up: " in trouble.get("error", ""), trouble
            assert any("cannot be set up yet on engine.servers" in r.getMessage()
                       for r in caplog.records)
            cluster.nodes[1].restart()
            cluster.nodes[2].restart()
            await asyncio.wait_for(src.connected.wait(), 60)
            nc = await nats.connect(cluster.urls)
            try:
                # as the bridge does: the cluster answering the worker does not mean the stream
                # has elected its leader yet ("no responders" until then; CI met it once)
                deadline = time.monotonic() + 60
                while True:
                    try:
                        await nc.jetstream().publish(
                            f"fl.in.{gateway_token('gw-1')}.results", b"x", stream=cfg.stream,
                            timeout=5.0)
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
            finally:
                await nc.close()
            event = await asyncio.wait_for(first, 30)  # it claims the partition and reads
            assert isinstance(event, PartitionEvent)
            assert event.assigned
            assert event.partition == partition_of_gateway("gw-1", 2)
            assert "cannot be set up" not in str(src.engine_trouble)
        finally:
            first.cancel()
            await src.close()

    try:
        asyncio.run(scenario())
    finally:
        cluster.stop()


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


class JsRig(FleetRig):
    def __init__(self, tmp: Path, mosquitto: Callable[..., Mosquitto], influx: InfluxV1Client,
                 *, nodes: int = 3, devices: int = 8, interval_ms: int = 200,
                 influx_proxy: bool = False, nats_disk: str | None = None) -> None:
        self.tmp = tmp
        self.mounts = contextlib.ExitStack()
        self.influx = influx
        port = int(influx.url.rsplit(":", 1)[1])
        # the workers may reach InfluxDB through a fault proxy (503, hanging); the checks not
        self.influx_proxy = FaultProxy("127.0.0.1", port).start() if influx_proxy else None
        influx_url = (f"http://127.0.0.1:{self.influx_proxy.port}" if self.influx_proxy
                      else influx.url)
        self.cluster = NatsCluster(tmp / "nats", nodes, shipped=NATS_CONF)  # as shipped
        if nats_disk:  # each node's JetStream store on a disk of its own, this small
            for node in self.cluster.nodes:
                self.mounts.enter_context(tmpfs(node.store_dir, nats_disk))
        self.cluster.start()
        self.gw_broker = mosquitto()
        self.cloud_broker = mosquitto()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.spec = FleetSpec(gateways=len(GATEWAYS), devices_per_gateway=devices,
                              interval_ms=interval_ms, disorder_fraction=0.0, seed=23,
                              spike_fraction=0.3, spike_after_ms=8_000, spike_spacing_ms=6_000,
                              topic_template="{gateway}/devices/{device}/readings")
        self._init_fleet()
        for gw in GATEWAYS:
            (tmp / f"{gw}.toml").write_text(f"""
[gateway]
id = "{gw}"
state_dir = "{tmp}/edge-{gw}"
[intake]
broker = "{self.gw_broker.url}"
topics = ["{gw}/devices/+/readings"]
device_topic_level = 2
[windows]
size = "1s"
out_of_orderness = "300ms"
allowed_lateness = "60s"
idle_timeout = "2s"
[uplink]
broker = "{self.cloud_broker.url}"
ack_timeout = "4s"
max_results_per_batch = 200
[agent]
tick = "100ms"
health_interval = "500ms"
ledger_interval = "500ms"
checkpoint_interval = "1s"
""")
        servers = ", ".join(f'"{u}"' for u in self.cluster.urls)
        self.cloud_cfg = tmp / "cloud.toml"
        self.cloud_cfg.write_text(f"""
[worker]
id = "w"
health_interval = "500ms"
state_dir = "{tmp}/cloud-state"
[ingest]
broker = "{self.cloud_broker.url}"
[engine]
kind = "jetstream"
servers = [{servers}]
partitions = {P}
replicas = {min(3, nodes)}
priority_timeout = "3s"
ack_wait = "6s"
snapshot_interval = "2s"
[influxdb]
url = "{influx_url}"
database = "{influx.database}"
flush_interval = "200ms"
timeout = "5s"
[detect]
detectors = ["spike", "novelty", "stuck"]
""")

    def _spawn(self, name: str, args: list[str]) -> None:
        out = (self.tmp / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([*CMD, *args], stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def start_worker(self, name: str, member: str | None = None) -> None:
        args = ["cloud", "run", "--config", str(self.cloud_cfg), "--worker-id", name]
        self._spawn(name, [*args, "--member", member] if member else args)

    def start_bridge(self) -> None:
        self._spawn("bridge", ["cloud", "bridge", "--config", str(self.cloud_cfg)])

    def start_agent(self, gw: str) -> None:
        self._spawn(gw, ["edge", "run", "--config", str(self.tmp / f"{gw}.toml")])

    def start_agents(self, timeout_s: float = 90) -> None:
        """Every agent started and subscribed on its gateway broker: what the fleet publishes
        before then reaches nobody (a loaded machine once took over 2 s to start one)."""
        for gw in GATEWAYS:
            self.start_agent(gw)
        deadline = time.monotonic() + timeout_s
        for gw in GATEWAYS:
            path = self.tmp / f"edge-{gw}" / "status.json"
            while True:
                assert self.procs[gw].poll() is None, f"the agent {gw} exited"
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    doc = json.loads(path.read_bytes())
                    if doc["links"]["intake"]["subscribed"]:
                        break
                assert time.monotonic() < deadline, f"the agent {gw} did not subscribe"
                time.sleep(0.2)

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.wait(30)

    def stop(self) -> None:
        self.stop_fleet()
        for name in list(self.procs):
            self.signal(name, signal.SIGCONT)
            self.signal(name, signal.SIGTERM)
        self.cluster.stop()
        self.mounts.close()
        if self.influx_proxy is not None:
            self.influx_proxy.stop()

    # ---- what the engine says --------------------------------------------------------------

    async def _owners(self) -> dict[int, str]:
        import nats

        nc = await nats.connect(self.cluster_urls_alive(), connect_timeout=2)
        try:
            kv = await nc.jetstream().key_value("FIELDLINE_SNAP")
            out = {}
            for p in range(P):
                try:
                    e = await kv.get(f"p{p}")
                    out[p] = json.loads(e.value or b"{}").get("owner", "")
                except Exception:
                    out[p] = ""
            return out
        finally:
            await nc.close()

    async def _snapshots(self) -> tuple[set[str], set[str]]:
        import nats

        nc = await nats.connect(self.cluster_urls_alive(), connect_timeout=2)
        try:
            js = nc.jetstream()
            kv = await js.key_value("FIELDLINE_SNAP")
            named = set()
            for p in range(P):
                with contextlib.suppress(Exception):
                    name = json.loads((await kv.get(f"p{p}")).value or b"{}").get("object")
                    if name:
                        named.add(name)
            obs = await js.object_store("FIELDLINE_SNAPDATA")
            try:
                live = {o.name for o in await obs.list(ignore_deletes=True)}
            except Exception:  # an empty store answers "not found"
                live = set()
            return named, live
        finally:
            await nc.close()

    async def stream_state(self) -> dict[str, Any]:
        """The stream's state (messages, bytes, first_seq, last_seq); {} while it is not
        there or the cluster does not answer."""
        import nats

        nc = await nats.connect(self.cluster_urls_alive(), connect_timeout=2)
        try:
            doc = json.loads((await nc.request("$JS.API.STREAM.INFO.FIELDLINE", b"",
                                               timeout=5)).data)
            return dict(doc.get("state", {}))
        except nats.errors.Error:
            return {}
        finally:
            await nc.close()

    def snapshots(self) -> tuple[set[str], set[str]]:
        """The snapshot objects the partitions' pointers name, and those in the store."""
        return tuple(_run(self._snapshots()))  # type: ignore[return-value]

    def owners(self) -> dict[int, str]:
        try:
            return dict(_run(self._owners()))
        except Exception:
            return {}

    def cluster_urls_alive(self) -> list[str]:
        return [n.url for n in self.cluster.nodes if n.running]

    def wait_owner(self, partition: int, owner: str, timeout_s: float) -> float:
        t0 = time.monotonic()
        seen: dict[int, str] = {}
        while time.monotonic() - t0 < timeout_s:
            seen = self.owners()
            if seen.get(partition) == owner:
                return time.monotonic() - t0
            time.sleep(0.3)
        raise AssertionError(f"partition {partition} never went to {owner} in {timeout_s} s; "
                             f"owners: {seen}")

    async def _stream(self) -> list[tuple[int, int, str, bytes]]:
        import nats
        import nats.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        async def partition(js: Any, p: int) -> list[tuple[int, int, str, bytes]]:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL,
                                 ack_policy=AckPolicy.NONE, filter_subject=f"{PART}.{p}.>")
            sub = await js.pull_subscribe(f"{PART}.{p}.>", stream="FIELDLINE", config=cfg)
            try:
                pending = int((await sub.consumer_info()).num_pending or 0)
                got: list[tuple[int, int, str, bytes]] = []
                while len(got) < pending:
                    for m in await sub.fetch(min(500, pending - len(got)), timeout=5):
                        got.append((p, m.metadata.sequence.stream, _topic(m.subject), m.data))
                return got
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

        nc = await nats.connect(self.cluster_urls_alive(), connect_timeout=2)
        out: list[tuple[int, int, str, bytes]] = []
        try:
            js = nc.jetstream()
            for p in range(P):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        out += await partition(js, p)
                        break
                    except nats.errors.Error:
                        # a consumer without a leader yet answers 503 ("no responders"), a
                        # request times out during an election: read the partition again, as
                        # the worker's own replay asks again, within a bound
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.5)
        finally:
            await nc.close()
        return out

    def reference_anomalies(self) -> dict[tuple[Any, ...], float]:
        """One uninterrupted pass of a fresh worker over the stream, partition by partition,
        in stream order: the anomalies it finds (last write of each point wins, as in
        InfluxDB)."""
        cfg = replace(load_cloud_config(self.cloud_cfg), jetstream=None, state_dir=None)

        class Replay:
            per_partition_state = True
            partitions = P

        worker = CloudWorker(cfg, sink=MemorySink(), source=Replay())  # type: ignore[arg-type]
        for p in range(P):
            worker._on_partition(PartitionEvent(p, True, epoch=1))
        for p, seq, topic, payload in _run(self._stream()):
            worker.handle(SourceMessage(p, seq, topic, payload, epoch=1))
        found: dict[tuple[Any, ...], float] = {}
        for ln in encode(worker.writer.pending()):
            if not ln.startswith("anomalies,"):
                continue
            head = ln.split(" ", 1)[0]
            tags = dict(t.split("=", 1) for t in head.split(",")[1:])
            score = float(ln.split("score=", 1)[1].split(",", 1)[0].split(" ", 1)[0])
            key = (int(ln.rsplit(" ", 1)[1]), tags["device"], tags["metric"], tags["window"],
                   tags["detector"])
            found[key] = score
        return found

    def influx_anomalies(self) -> dict[tuple[Any, ...], float]:
        doc: Any = self.influx.query('SELECT "score", "device", "metric", "window", "detector" '
                                     'FROM "anomalies"')
        series = doc["results"][0].get("series", [])
        if not series:
            return {}
        return {(int(t), d, m, w, det): float(s) for t, s, d, m, w, det in series[0]["values"]}

    def ledgers(self) -> dict[str, dict[str, int]]:
        out = {}
        for gw in GATEWAYS:
            doc: Any = self.influx.query(
                f'SELECT * FROM "ledger" WHERE "device" = \'_gateway\' AND "gateway" = \'{gw}\' '
                'ORDER BY time DESC LIMIT 1')
            series = doc["results"][0].get("series", [])
            if series:
                s = series[0]
                out[gw] = {k: v for k, v in zip(s["columns"], s["values"][0], strict=True)
                           if isinstance(v, int)}
        return out

    def worker_health(self, name: str) -> dict[str, Any]:
        doc: Any = self.influx.query(
            f'SELECT * FROM "pipeline" WHERE "component" = \'cloud\' AND "worker" = \'{name}\' '
            'ORDER BY time DESC LIMIT 1')
        series = doc["results"][0].get("series", [])
        if not series:
            return {}
        s = series[0]
        return dict(zip(s["columns"], s["values"][0], strict=True))


@pytest.fixture
def jsrig(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
          influx_db: InfluxV1Client) -> Iterator[JsRig]:
    r = JsRig(tmp_path, mosquitto_factory, influx_db)
    yield r
    r.stop()


def settled(rig: JsRig, expect: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    n = rig.in_influx()
    while n < expect and time.monotonic() < deadline:
        time.sleep(0.5)
        n = rig.in_influx()
    time.sleep(1.0)
    return rig.in_influx()


@pytest.mark.integration
@pytest.mark.timeout(400)
def test_partition_mapping_is_the_servers(jsrig: JsRig) -> None:
    """Our FNV-1a says where the stream's partition() transform files each gateway."""
    import nats

    async def go() -> dict[str, int]:
        from cloud.jetstream import JetStreamConfig, ensure_stream

        nc = await nats.connect(jsrig.cluster.urls)
        try:
            cfg = JetStreamConfig(servers=tuple(jsrig.cluster.urls), stream="MAP",
                                  partitions=7, replicas=3)
            await ensure_stream(nc, replace(cfg))
            js = nc.jetstream()
            names = [f"gw-{i}" for i in range(20)] + ["a.b", "x y", "ü*>"]
            got = {}
            for gw in names:
                await js.publish(f"fl.in.{gateway_token(gw)}.results", b"x", stream="MAP")
                m = await js.get_last_msg("MAP", f"{PART}.*.{gateway_token(gw)}.results")
                got[gw] = int(m.subject.split(".")[2])
            return got
        finally:
            await nc.close()

    got = _run(go())
    assert got == {gw: partition_of_gateway(gw, 7) for gw in got}


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_workers_fail_over_with_their_state(jsrig: JsRig) -> None:
    """Member 0/2 is SIGKILLed mid-run: the standby takes its partitions from their snapshots;
    member 1/2 is paused past its pin timeout: the standby takes those too and the resumed
    worker writes nothing it held; a NATS node is SIGKILLed: nothing stops."""
    rig = jsrig
    p_a = partition_of_gateway("gw-2", P)  # served by member 0/2 ("A")
    p_b = partition_of_gateway("gw-1", P)  # served by member 1/2 ("B")
    assert p_a % 2 == 0
    assert p_b % 2 == 1
    rig.start_worker("A", "0/2")
    rig.start_worker("B", "1/2")
    rig.start_bridge()
    rig.start_agents()
    time.sleep(2)
    rig.run_fleet(50)
    rig.wait_owner(p_a, "A", 30)
    rig.wait_owner(p_b, "B", 30)
    rig.start_worker("C")  # the hot standby of every partition
    time.sleep(12)
    rig.signal("A", signal.SIGKILL)
    moved_a = rig.wait_owner(p_a, "C", 45)
    time.sleep(4)
    rig.signal("B", signal.SIGSTOP)
    moved_b = rig.wait_owner(p_b, "C", 45)
    rig.signal("B", signal.SIGCONT)
    # the resumed worker finds out it may have lost its partition and drops it (state and
    # unwritten lines) instead of writing on
    deadline = time.monotonic() + 20
    health_b: dict[str, Any] = {}
    while time.monotonic() < deadline:
        health_b = rig.worker_health("B")
        if (health_b.get("engine_stalls") or 0) + (health_b.get("engine_pin_lost") or 0) >= 1:
            break
        time.sleep(0.3)
    assert (health_b.get("engine_stalls") or 0) + (health_b.get("engine_pin_lost") or 0) >= 1
    assert health_b.get("partitions_owned") == 0, health_b
    # beside the others (one state directory for the three), the paused worker now a standby
    # (it may win a partition again later: a consumer's new leader pins whoever pulls first)
    def b_block(said: str) -> str:
        block = said[said.index("worker B (member 1/2): "):]
        return block[:block.index("\n\n")]
    text = status_when(rig.cloud_cfg, lambda said: "engine   0 partitions owned" in b_block(said),
                       "the paused worker's status should say it owns nothing", 10)
    assert "worker B (member 1/2): CRITICAL" not in b_block(text), text
    assert "owns no partition: a hot standby" in b_block(text), text
    rig.cluster.nodes[2].kill()
    rig.wait_fleet()
    assert rig.sim is not None
    expected = len(rig.sim.published)
    n = settled(rig, expected, 120)
    report = rig.oracle()
    health_c = rig.worker_health("C")
    print(f"partition moves: killed worker {moved_a:.1f} s, paused worker {moved_b:.1f} s; "
          f"readings in InfluxDB {n}; standby: {health_c}")
    assert report.lost == report.unexpected == report.mismatched == 0, report
    for gw, led in rig.ledgers().items():
        assert led["readings_received"] == (led["readings_accepted"] + led["rejected"]
                                            + led["late_dropped"] + led["duplicates"]), (gw, led)
    # the standby continued from snapshots: it replayed only their tails
    assert health_c.get("partitions_assigned", 0) >= 2
    # beside the workers: the killed one named, the paused one running, the standby serving
    # from another NATS node
    code, text = cloud_status(rig.cloud_cfg)
    assert code == 2, text
    assert "worker A (member 0/2): CRITICAL, worker NOT RUNNING" in text, text
    assert f"the worker (pid {rig.procs['A'].pid}) is gone: killed or crashed" in text, text
    assert "worker B (member 1/2): CRITICAL" not in text, text
    block_c = text[text.index("worker C: "):]
    assert "worker C: CRITICAL" not in block_c, text
    assert "partitions owned" in block_c, text
    # the nodes as shipped take a login: no status shows it
    assert f"ingest   {', '.join(rig.cluster.addresses)} connected since" in block_c, text
    assert str(rig.cluster.nodes[0].password) not in text
    # and the bridge beside them, forwarding through the node lost
    block_bridge = text[text.index("bridge fieldline-bridge-w: "):]
    assert block_bridge.startswith("bridge fieldline-bridge-w: OK, bridge running"), text
    assert f"nats     {', '.join(rig.cluster.addresses)} connected since" in block_bridge, text
    stored = int(block_bridge.split("stored   ")[1].split(" messages")[0].replace(",", ""))
    assert stored > 0, text
    ours = rig.influx_anomalies()
    ref = rig.reference_anomalies()
    assert ref, "the fleet's spikes should have raised anomalies"
    assert ours == ref


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_restart_from_snapshots_replays_only_the_tail(jsrig: JsRig) -> None:
    """Every worker stopped (SIGTERM: a last snapshot after the last write) and started again:
    each partition is replayed from its snapshot, not from the start of the stream."""
    rig = jsrig
    rig.start_worker("W")
    rig.start_bridge()
    rig.start_agents()
    time.sleep(2)
    rig.run_fleet(24)
    time.sleep(12)
    rig.signal("W", signal.SIGTERM)
    stopped = rig.worker_health("W")
    before = int(stopped.get("messages_in") or 0)
    time.sleep(3)  # results keep arriving on the stream meanwhile: the tail
    rig.start_worker("W2")
    rig.wait_fleet()
    assert rig.sim is not None
    n = settled(rig, len(rig.sim.published), 90)
    health = rig.worker_health("W2")
    replayed = int(health.get("engine_replayed") or 0)
    print(f"before the restart {before} message(s) handled; after it {replayed} replayed "
          f"(the tail published while no worker ran); readings {n}")
    report = rig.oracle()
    assert report.lost == report.unexpected == report.mismatched == 0, report
    assert before > 50
    assert 0 < replayed < before / 2
    assert rig.influx_anomalies() == rig.reference_anomalies()



@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_hung_nats_node_stalls_the_bridge_and_workers_for_seconds_not_minutes(
        jsrig: JsRig) -> None:
    """A NATS node that stops answering without closing its connections (SIGSTOP here; a link
    that drops packets looks the same to its clients): the bridge and the worker connected to
    it notice within a few pings and move to the other nodes, which still have quorum. With
    the client's default pings (every 2 min, 2 outstanding) both stood still for minutes, the
    agents' results waiting in their outboxes."""
    rig = jsrig
    hung = rig.cluster.nodes[0]
    # the bridge and the worker start on the node that will hang (they learn the others from it)
    rig.cloud_cfg.write_text(re.sub(r"^servers = \[.*\]$", f'servers = ["{hung.url}"]',
                                    rig.cloud_cfg.read_text(), flags=re.M))
    rig.start_worker("W")
    rig.start_bridge()
    rig.start_agents()
    time.sleep(2)
    rig.run_fleet(45)  # the node hangs 12 s in; the path works again about 10 s after
    time.sleep(12)
    assert rig.in_influx() > 0
    rate = len(GATEWAYS) * rig.spec.devices_per_gateway * 1000 / rig.spec.interval_ms
    hung.pause()
    t0 = time.monotonic()
    before = rig.in_influx()
    moved_after = None
    try:
        while time.monotonic() - t0 < 40:
            time.sleep(0.5)
            # ten seconds of the fleet's readings more than before the node hung: more than
            # anything in flight then, so the path works again without the hung node
            if rig.in_influx() - before >= 10 * rate:
                moved_after = time.monotonic() - t0
                break
    finally:
        hung.resume()
    print(f"the path worked again {moved_after} s after the node hung")
    assert moved_after is not None, "nothing got through while one of three nodes hung"
    rig.wait_fleet()
    assert rig.sim is not None
    n = settled(rig, len(rig.sim.published), 120)
    report = rig.oracle()
    assert report.lost == report.unexpected == report.mismatched == 0, report
    assert n == len(rig.sim.published)


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


@pytest.mark.integration
def test_r12_disk_full_under_every_nats_node_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """R12 for the scale-out path: the disks under all three NATS nodes fill up while the fleet
    publishes. nats-server meets ENOSPC, logs "JetStream out of resources, will be DISABLED" and
    stays so after space returns (measured with nats-server 2.15: a restart is what brings
    JetStream back). Meanwhile the bridge keeps every result unacknowledged on the cloud broker
    and the agents keep theirs in their outboxes; once the operator has freed space and
    restarted the nodes one by one, everything arrives: nothing lost, nothing twice, and the
    stream the nodes wrote up to the full disk reads back whole."""
    rig = JsRig(tmp_path, mosquitto_factory, influx_db, nats_disk="48m")
    try:
        rig.start_worker("A")
        rig.start_worker("B")
        rig.start_bridge()
        rig.start_agents()
        time.sleep(2)
        rig.run_fleet(40)
        time.sleep(8)
        before = rig.in_influx()
        assert before > 0
        t_full = time.monotonic()
        fillers = [fill(n.store_dir) for n in rig.cluster.nodes]
        logs = [n.workdir / "nats.log" for n in rig.cluster.nodes]

        def disabled() -> list[bool]:
            return ["will be DISABLED" in p.read_text(errors="replace") for p in logs]

        while time.monotonic() - t_full < 30 and not all(disabled()):
            time.sleep(0.5)
            for n in rig.cluster.nodes:
                fill(n.store_dir)
        off = disabled()
        cpu0 = {k: cpu_s(p.pid) for k, p in rig.procs.items()}
        time.sleep(8)
        cpu = {k: round(cpu_s(p.pid) - cpu0[k], 2) for k, p in rig.procs.items()}
        stalled = rig.in_influx()
        # beside the bridge, which writes nothing to InfluxDB: what it meets, and the cause
        code, text = cloud_status(rig.cloud_cfg)
        block = text[text.index("bridge fieldline-bridge-w: "):]
        print(f"fieldline cloud status, the bridge while JetStream is disabled:\n{block}")
        assert code >= 1, text
        assert "bridge fieldline-bridge-w: OK" not in block, text
        assert "JetStream has stored nothing for" in block, text
        assert "JetStream out of resources" in block, text
        # and beside each worker: connected to NATS, but not served, and why
        for name in ("A", "B"):
            worker = text[text.index(f"worker {name}: "):].split("\n\n")[0]
            assert f"worker {name}: OK" not in worker, text
            assert "JetStream has not served the worker for " in worker, text
            assert "no server answers the pulls of 4 partitions (0, 1, 2, 3; 503" in worker, text
        for f in fillers:
            f.unlink()
        time.sleep(6)  # the workers warn after 10 s without an answer, then every 30 s
        # nats-server's behaviour, not ours (2.15 keeps JetStream off): reported, not asserted
        came_back = rig.in_influx() - stalled
        for node in rig.cluster.nodes:  # the operator's part: a rolling restart
            node.restart()
            time.sleep(2)
        outage_s = time.monotonic() - t_full
        rig.wait_fleet()
        assert rig.sim is not None
        n = settled(rig, len(rig.sim.published), 120)
        report = rig.oracle()
        pulls = {w: rig.worker_health(w).get("engine_pulls_unanswered", -1) for w in "AB"}
        print(f"disabled: {off}; in InfluxDB {before} before, {stalled} while full, {n} at the "
              f"end of {len(rig.sim.published)}; CPU s in 8 s while disabled: {cpu}; pulls "
              f"unanswered {pulls} in {outage_s:.0f} s; {came_back} arrived after space "
              "returned, before the restarts")
        assert all(off), off
        assert report.lost == report.unexpected == report.mismatched == 0, report
        assert n == len(rig.sim.published)
        # nobody served the consumers meanwhile; a worker asked again at once (thousands of
        # pulls a second, a core each), now no faster than an idle pull (expires = 0.75 s)
        for w, k in pulls.items():
            assert 0 < k <= P * (outage_s / 0.75 + 10), (w, k, outage_s)
        for name in ("A", "B", "bridge"):
            text = (tmp_path / f"{name}.log").read_text(errors="replace")
            assert "JetStream out of resources" in text, name  # each names the likely cause
            assert "Traceback" not in text, name
    finally:
        rig.stop()


@pytest.mark.integration
def test_a_stream_capped_below_the_backlog_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """``engine.retention_bytes`` caps the stream (oldest dropped) so JetStream cannot fill its
    disk. With no worker running, the backlog outgrows the cap and results nobody read are
    dropped from the stream: the agents still hold them (a batch leaves an outbox only on the
    worker's ack, after the InfluxDB write) and send them again, so once workers run nothing is
    lost."""
    rig = JsRig(tmp_path, mosquitto_factory, influx_db, devices=60, interval_ms=100)
    cap = 1 << 20
    rig.cloud_cfg.write_text(rig.cloud_cfg.read_text().replace(
        'ack_wait = "6s"\n', f'ack_wait = "6s"\nretention_bytes = {cap}\n'))
    try:
        rig.start_worker("A")  # sets the stream up with its cap, then stops
        deadline = time.monotonic() + 30
        while not _run(rig.stream_state()) and time.monotonic() < deadline:
            time.sleep(0.5)
        rig.signal("A", signal.SIGTERM)
        rig.start_bridge()
        rig.start_agents()
        time.sleep(2)
        rig.run_fleet(25)
        info: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the stream at its cap, its oldest dropped
            time.sleep(1)
            info = _run(rig.stream_state())
            if info.get("first_seq", 1) > 1:
                break
        assert info.get("first_seq", 1) > 1, info
        assert info["bytes"] <= cap, info
        rig.start_worker("A")
        rig.wait_fleet()
        assert rig.sim is not None
        n = settled(rig, len(rig.sim.published), 120)
        report = rig.oracle()
        print(f"stream at its cap: {info}; {n} of {len(rig.sim.published)} in InfluxDB")
        assert report.lost == report.unexpected == report.mismatched == 0, report
        assert n == len(rig.sim.published)
    finally:
        rig.stop()


def test_replicas_behind_reads_the_servers_stream_info() -> None:
    """The shape nats-server 2.15 answers with one of three nodes' disk full (recorded)."""
    info: dict[str, Any] = {"config": {}, "cluster": {"leader": "n2", "replicas": [
        {"name": "n1", "current": False, "active": 14091224823, "lag": 17972},
        {"name": "n3", "current": True, "active": 598683}]}}
    assert replicas_behind(info, 3) == 1
    info["cluster"]["replicas"][0].update(current=True)
    assert replicas_behind(info, 3) == 0
    info["cluster"]["replicas"][1].update(offline=True)
    assert replicas_behind(info, 3) == 1
    assert replicas_behind({"config": {}, "cluster": {"name": "c"}}, 3) == 3  # no leader
    assert replicas_behind({"config": {}}, 1) == 0
    assert replicas_behind({"error": {"code": 503}}, 3) is None


@pytest.mark.integration
def test_a_full_disk_under_one_nats_node_is_reported_and_loses_nothing(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """One node's disk fills: nats-server disables JetStream on that node only, and the stream
    goes on with two of its three replicas (publishes stall ~5 s while a leader there moves).
    Nothing tells an operator that one more lost node now stops the pipeline, and the node
    keeps serving clients: the workers now report the replicas that are not current
    (`engine_replicas_behind`, an alert rule on it) and log it; back to 0 once the node has
    space and is restarted. Nothing is lost."""
    rig = JsRig(tmp_path, mosquitto_factory, influx_db, nats_disk="48m")
    full = rig.cluster.nodes[0]
    try:
        rig.start_worker("A")
        rig.start_bridge()
        rig.start_agents()
        time.sleep(2)
        rig.run_fleet(45)
        time.sleep(5)

        def health() -> dict[str, Any]:
            return rig.worker_health("A")

        # known once two checks 5 s apart agree: from about 6 s after the worker's stream is
        # set up (asserting at 7 s after its start failed once on a loaded machine)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and health().get("engine_replicas_behind") is None:
            time.sleep(0.5)
        assert health().get("engine_replicas_behind") == 0
        filler = fill(full.store_dir)
        deadline = time.monotonic() + 40
        h = health()
        while time.monotonic() < deadline and h.get("engine_replicas_behind") != 1:
            time.sleep(0.5)
            fill(full.store_dir)
            h = health()
        assert h.get("engine_replicas_behind") == 1, h
        assert "will be DISABLED" in (full.workdir / "nats.log").read_text(errors="replace")
        # the shipped alert rule's query, as Grafana runs it, sees it
        rule = next(r for r in ALERT_RULES if r.uid == "fieldline-stream-replicas")
        doc: Any = rig.influx.query(render(rule.query, Params(range_s=300, points=300)))
        series = doc["results"][0].get("series", [])
        assert [(s["tags"]["worker"], s["values"][-1][1]) for s in series] == [("A", 1)], doc
        filler.unlink()
        full.restart()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and health().get("engine_replicas_behind") != 0:
            time.sleep(0.5)
        assert health().get("engine_replicas_behind") == 0
        rig.wait_fleet()
        assert rig.sim is not None
        n = settled(rig, len(rig.sim.published), 120)
        report = rig.oracle()
        assert report.lost == report.unexpected == report.mismatched == 0, report
        assert n == len(rig.sim.published)
        log_a = (tmp_path / "A.log").read_text(errors="replace")
        assert "1 of its 3 replicas not current" in log_a
        assert "all 3 replicas current again" in log_a
    finally:
        rig.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_publish_to_a_hung_node_gives_up_instead_of_waiting_for_ever(tmp_path: Path) -> None:
    """A node that stops answering (SIGSTOP) without closing the connection: a publish that
    fills the NATS client's buffer (a snapshot's chunks, a burst of results) waited for the
    buffer to be written with no time limit (nats-py's default flush_timeout), so a worker or
    the bridge stood still, and did not stop on SIGTERM, until the node answered again (over
    60 s in a /tmp experiment). Our connections give up after FLUSH_TIMEOUT_S with an error the
    caller retries on."""
    from cloud.jetstream import FLUSH_TIMEOUT_S, close_quietly, connect

    server = NatsServer(tmp_path / "nats", "n1").start()

    async def scenario() -> None:
        nc = await connect([server.url], "t")
        server.pause()
        try:
            async def burst() -> None:
                chunk = b"x" * 65536
                for _ in range(200):  # 13 MB: past the client's buffer and the socket's
                    await nc.publish("fl.t", chunk)
                await nc.flush(timeout=5)

            t0 = time.monotonic()
            with contextlib.suppress(Exception):  # which error it ends with is nats-py's
                await asyncio.wait_for(burst(), 60)
            assert time.monotonic() - t0 < 3 * FLUSH_TIMEOUT_S  # not wait_for's 60 s
        finally:
            server.resume()
            await close_quietly(nc, 20)

    try:
        asyncio.run(scenario())
    finally:
        server.stop()


def write_cloud_toml(path: Path, *, state_dir: Path, broker_url: str, servers: list[str],
                     influx: InfluxV1Client, engine: str = "") -> Path:
    """A worker's and bridge's cloud.toml on JetStream (2 partitions), ``engine``: more of its
    [engine] section."""
    quoted = ", ".join(f'"{s}"' for s in servers)
    path.write_text(f"""
[worker]
id = "w"
health_interval = "500ms"
state_dir = "{state_dir}"
[ingest]
broker = "{broker_url}"
[engine]
kind = "jetstream"
servers = [{quoted}]
partitions = 2
{engine}
[influxdb]
url = "{influx.url}"
database = "{influx.database}"
""")
    return path


def status_when(cfg: Path, cond: Callable[[str], bool], what: str,
                timeout_s: float = 40) -> str:
    """`fieldline cloud status --config cfg` once ``cond`` holds of what it says."""
    deadline = time.monotonic() + timeout_s
    while True:
        _, said = cloud_status(cfg)
        if cond(said):
            return said
        assert time.monotonic() < deadline, f"{what}; the status says:\n{said}"
        time.sleep(0.5)


def terminate(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each process still running, SIGKILL one that does not stop in 30 s."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_login_reaches_the_nodes_the_cluster_announces(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """nats-py takes a login from the URL of the server it connects to, and the nodes a
    cluster announces (their own addresses) carry none: a worker that lost the one node it
    listed was refused by every other ("Authorization Violation") and never came back; with all
    three listed, it was refused by the announced copies of them on its way round. The login
    now goes to every node."""
    secret = "s3cret-Pa55"
    ports = free_ports(6)
    cports = tuple(ports[3:])
    nodes = [NatsServer(tmp_path / f"n{i}", f"n{i}", port=ports[i], cluster_port=cports[i],
                        routes=cports,
                        extra_conf=f'authorization {{ user: fl, password: "{secret}" }}')
             for i in range(3)]

    async def scenario() -> str:
        nc = await connect([nodes[0].url.replace("nats://", f"nats://fl:{secret}@")], "t")
        try:
            deadline = time.monotonic() + 15
            while len(nc.discovered_servers) < 2:  # the cluster announced the two others
                assert time.monotonic() < deadline, nc.discovered_servers
                await asyncio.sleep(0.1)
            nodes[0].stop()
            while not (nc.is_connected and nc.connected_url.port != nodes[0].port):
                assert time.monotonic() < deadline + 15, "never reconnected to another node"
                await asyncio.sleep(0.1)
            inbox = await nc.subscribe("t.echo")
            await nc.publish("t.echo", b"after")
            return bytes((await inbox.next_msg(timeout=5)).data).decode()
        finally:
            await nc.close()

    try:
        for node in nodes:
            node.start()
        with caplog.at_level(logging.WARNING, logger="fieldline.cloud.jetstream"):
            assert asyncio.run(asyncio.wait_for(scenario(), 45)) == "after"
        assert "Authorization Violation" not in caplog.text, caplog.text
        assert secret not in caplog.text
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_workers_and_the_bridge_say_why_no_nats_server_answers(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A worker or a bridge started while no NATS server of its ``engine.servers`` answers
    (a port nobody listens on, a name that does not resolve) waited without a word in its
    status, and logged one warning per server at every attempt (four a second here). Each now
    logs the cause once, `fieldline cloud status` shows it beside the link; a bridge asked to
    stop while it waits stops (it waited for NATS for ever, deaf to SIGTERM); once a server
    is up both connect and the cause is gone. The server takes a login in its URL (how
    nats-py takes credentials): no log or status shows the password, and a wrong one is
    named as the cause."""
    from cloud.jetstream import connect
    from devices.mqtt import LinkErrors

    broker = mosquitto_factory()
    secret = "s3cret-Pa55"
    node = NatsServer(tmp_path / "nats", "n1",  # its port: nobody listens there yet
                      extra_conf=f'authorization {{ user: fl, password: "{secret}" }}')
    login = node.url.replace("nats://", f"nats://fl:{secret}@")
    cfg = write_cloud_toml(tmp_path / "cloud.toml", state_dir=tmp_path / "state",
                           broker_url=broker.url, influx=influx_db, engine="replicas = 1",
                           servers=[login, "nats://nats.invalid:4222"])
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "bridge")}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str) -> None:
        with logs[name].open("ab") as out:
            procs[name] = subprocess.Popen(
                [*CMD, "cloud", "run" if name == "worker" else "bridge", "--config", str(cfg)],
                stdout=out, stderr=subprocess.STDOUT)

    refused = f"{node.url}: [Errno 111] Connect call failed"
    unnamed = "nats://nats.invalid:4222: "  # the resolver's words vary with the machine
    try:
        spawn("worker")
        spawn("bridge")
        said = status_when(cfg, lambda s: s.count(refused) >= 2 and s.count(unnamed) >= 2
                           and "bridge fieldline" in s, "both causes beside both links")
        assert "waits for a NATS server first" in said, said  # the bridge's broker link
        time.sleep(3)  # a dozen more attempts
        for name, log_file in logs.items():
            text = log_file.read_text()
            for url in (node.url, "nats://nats.invalid:4222"):
                said_why = [ln for ln in text.splitlines() if f"cannot reach {url}: " in ln]
                assert len(said_why) == 1, (name, text)
                assert said_why[0].endswith("(retrying)"), said_why
            assert "Traceback" not in text, text
        procs["bridge"].send_signal(signal.SIGTERM)
        assert procs["bridge"].wait(15) == 0, logs["bridge"].read_text()
        spawn("bridge")
        node.start()
        said = status_when(cfg, lambda s: "Connect call failed" not in s and "waits for" not in s
                           and "bridge fieldline" in s and "DOWN" not in s,
                           "both connected once the server is up")
        assert f"ingest   {node.url}, nats://nats.invalid:4222 connected since" in said, said

        async def wrong_password() -> str | None:
            errors = LinkErrors("test", node.url, logging.getLogger("test"))
            trying = asyncio.ensure_future(connect([login.replace(secret, "wrong-one")], "t",
                                                   errors))
            try:
                while errors.failures < 2:
                    assert not trying.done(), trying
                    await asyncio.sleep(0.1)
            finally:
                trying.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await trying
            return errors.last

        assert asyncio.run(asyncio.wait_for(wrong_password(), 20)) == \
            f"{node.url}: nats: 'Authorization Violation'"
        for log_file in logs.values():
            assert secret not in log_file.read_text()
        for doc in (tmp_path / "state").glob("status-*.json"):
            assert secret not in doc.read_text()
    finally:
        terminate(procs.values())
        node.stop()


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_a_message_over_the_nats_max_payload_holds_up_no_other(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """NATS servers left at their default max_payload (1 MB) under a cloud broker that takes
    4 MiB (deploy/mosquitto/cloud.conf): the bridge retried a message over it for ever, so one
    gateway's large batch held up every gateway's messages behind it, while it said "no
    quorum, or JetStream disabled". Now such a message is counted and named (the gateway, its
    size, the limit, the fix; `cloud status` critical) and the next messages are stored."""
    import nats
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    node = NatsServer(tmp_path / "nats", "n1", max_payload="1MB")
    node.start()
    broker = mosquitto_factory()
    cfg = write_cloud_toml(tmp_path / "cloud.toml", state_dir=tmp_path / "state",
                           broker_url=broker.url, servers=[node.url], influx=influx_db)
    procs: list[subprocess.Popen[bytes]] = []
    for what in ("run", "bridge"):
        with (tmp_path / f"{what}.log").open("ab") as out:
            procs.append(subprocess.Popen([*CMD, "cloud", what, "--config", str(cfg)],
                                          stdout=out, stderr=subprocess.STDOUT))

    async def stored() -> dict[str, int]:
        nc = await nats.connect(node.url)
        try:
            info = json.loads((await nc.request(
                "$JS.API.STREAM.INFO.FIELDLINE", json.dumps({"subjects_filter": ">"}).encode(),
                timeout=5)).data)
            return {k.split(".")[-2] if k.count(".") >= 2 else k: v
                    for k, v in (info.get("state", {}).get("subjects") or {}).items()}
        finally:
            await nc.close()

    big = 1_500_000
    try:
        status_when(cfg, lambda s: "bridge fieldline" in s and "DOWN" not in s
                    and "JetStream has not served" not in s, "the worker and bridge connected")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        try:
            pub.publish("fieldline/v1/gw-big/results", b"x" * big, qos=1).wait_for_publish(10)
            for _ in range(3):
                pub.publish("fieldline/v1/gw-small/results", b"{}", qos=1).wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
        said = status_when(cfg, lambda s: "max_payload" in s, "the refusal named")
        assert "1 message over the NATS servers' max_payload (1,048,576 bytes)" in said, said
        assert f"a results message of gateway gw-big, {big:,} bytes" in said, said
        assert "bridge fieldline-bridge-w: CRITICAL" in said, said
        deadline = time.monotonic() + 20
        while (got := asyncio.run(stored())).get(gateway_token("gw-small"), 0) < 3:
            assert time.monotonic() < deadline, f"the messages behind it not stored: {got}"
            time.sleep(0.3)
        assert gateway_token("gw-big") not in got, got
        logged = (tmp_path / "bridge.log").read_text()
        assert f"a results message of gateway gw-big is {big} bytes, over the NATS servers' " \
               "max_payload of 1048576: not stored (its agent keeps the batch" in logged, logged
    finally:
        terminate(procs)
        node.stop()


@pytest.mark.integration
def test_a_nats_server_that_only_offers_tls_is_spoken_to_in_tls(tmp_path: Path) -> None:
    """A real nats-server with a `tls {}` block and `allow_non_tls: true` tells its clients
    TLS is available, not required: a worker listing it as tls:// connects in TLS (its own
    monitoring page says so), where nats-py alone spoke to it in the clear."""
    import urllib.request

    from devices.mqtt import ssl_context
    from fieldline.services import free_port
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    crt, key = pki.cert("server")
    http = free_port()
    node = NatsServer(tmp_path / "nats", "n1", extra_conf=(
        f'allow_non_tls: true\nhttp: "127.0.0.1:{http}"\n'
        f'tls {{ cert_file: "{crt}", key_file: "{key}" }}'))
    node.start()

    async def tls_version() -> str | None:
        nc = await asyncio.wait_for(connect([node.url.replace("nats://", "tls://")], "probe",
                                            tls=ssl_context(str(pki.ca), None, None)), 10)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/connz", timeout=5) as r:
                conns = json.loads(r.read())["connections"]
            return next(c.get("tls_version") for c in conns if c.get("name") == "probe")
        finally:
            await nc.close()

    try:
        assert asyncio.run(tls_version()) == "1.3"
    finally:
        node.stop()


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_nats_over_tls_with_a_private_ca_and_client_certificates(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """NATS servers that require TLS with certificates of the operator's own CA, and verify
    their clients' (`[engine] ca_file`, `cert_file`, `key_file`; the servers as tls://): the
    worker and the bridge connect and results flow into the stream; the certificates' expiry is
    judged by `cloud status`; a CA that did not sign the servers' certificates is named as the
    cause. (Before, only the system's CAs could be used: a private CA could not connect.)"""
    import nats
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from devices.mqtt import ssl_context
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki", clients=("fieldline",))
    stranger = make_pki(tmp_path / "stranger")
    crt, key = pki.cert("server")
    client_crt, client_key = pki.cert("fieldline")
    node = NatsServer(tmp_path / "nats", "n1", extra_conf=(
        f'tls {{ cert_file: "{crt}", key_file: "{key}", ca_file: "{pki.ca}", verify: true }}'))
    node.start()
    url = node.url.replace("nats://", "tls://")
    broker = mosquitto_factory()

    def config(name: str, ca: Path) -> Path:
        return write_cloud_toml(
            tmp_path / f"{name}.toml", state_dir=tmp_path / f"{name}-state",
            broker_url=broker.url, servers=[url], influx=influx_db,
            engine=f'ca_file = "{ca}"\ncert_file = "{client_crt}"\nkey_file = "{client_key}"')

    procs: list[subprocess.Popen[bytes]] = []

    def spawn(cfg: Path, *args: str) -> None:
        with (tmp_path / f"{cfg.stem}-{args[0]}.log").open("ab") as out:
            procs.append(subprocess.Popen([*CMD, "cloud", *args, "--config", str(cfg)],
                                          stdout=out, stderr=subprocess.STDOUT))

    async def stored() -> int:
        nc = await nats.connect(node.url, tls=ssl_context(str(pki.ca), str(client_crt),
                                                          str(client_key)))
        try:
            info = json.loads((await nc.request("$JS.API.STREAM.INFO.FIELDLINE", b"",
                                                timeout=5)).data)
            return int(info.get("state", {}).get("messages", 0))
        finally:
            await nc.close()

    try:
        wrong = config("wrong", stranger.ca)
        spawn(wrong, "run")
        status_when(wrong, lambda s: "CERTIFICATE_VERIFY_FAILED" in s,
                    "the untrusted server's certificate named as the cause")
        right = config("right", pki.ca)
        spawn(right, "run")
        spawn(right, "bridge")
        said = status_when(right, lambda s: "bridge fieldline" in s and "DOWN" not in s
                           and "JetStream has not served" not in s, "both connected over TLS")
        # make_pki's certificates live two days: judged from the NATS link's files
        assert f"of the link to {url} ({pki.ca}, {client_crt}) expires in" in said, said
        logged = (tmp_path / "right-run.log").read_text()
        assert f"a TLS certificate of the link to {url} ({pki.ca}, {client_crt}) expires in " \
               "2.0 days: renew it and restart the worker" in logged, logged
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        try:
            pub.publish("fieldline/v1/gw-1/results", b"{}", qos=1).wait_for_publish(10)
        finally:
            pub.loop_stop()
            pub.disconnect()
        deadline = time.monotonic() + 30
        while asyncio.run(stored()) < 1:
            assert time.monotonic() < deadline, "the bridge stored nothing in JetStream"
            time.sleep(0.3)
    finally:
        terminate(procs)
        node.stop()
