"""NATS JetStream: the partitioned source when one cloud worker is not enough (README "Scale out").

Layout (one stream, P fixed partitions)::

    fl.in.<gw>.<kind>                 what the bridge publishes (results, health)
    fl.p.<partition>.<gw>.<kind>      as stored: the stream's subject transform
                                      ``{{partition(P,1)}}`` (FNV-1a of the gateway token mod P;
                                      a gateway never moves while P is fixed)
    fl.ack.<gw>                       the workers' application-level acks, back to the bridge

Ownership comes from the engine, not from us: one durable pull consumer per partition with a
``pinned_client`` priority group. Every worker serving a partition pulls on its consumer; the
server pins one puller and re-pins another after ``priority_timeout`` without pulls from it. A
worker knows it holds a partition when messages arrive with a new ``Nats-Pin-Id``; it knows it
lost it on a ``423`` answer, when its snapshot's compare-and-set fails, or when it finds that it
could not pull for most of the timeout (a paused or starved process must assume the server moved
the partition; it then drops everything it holds, unwritten lines included, and starts again).

State follows the partition as snapshot + replay, the Flink / Kafka Streams recipe: each owner
snapshots its partition state (dedup marks, detector state, revisions) with the stream sequence
it covers, once everything up to that sequence is in InfluxDB, into an object store, and points to
it from a KV key updated with compare-and-set (a stale owner cannot overwrite a newer snapshot).
A new owner claims the key, restores the snapshot and replays the partition from the next
sequence, so detectors continue with the history they had instead of relearning it.

A partition's messages reach its state once each and in stream order (detectors and revisions
depend on the order; aggregates alone would not show a swap). A delivery the server sent but the
worker never got (a connection cut, a NATS node lost) comes again only after ``ack_wait``, behind
newer ones: the consumer's delivery sequence shows the hole at the next delivery, and the worker
then reads the partition's stream from the last message it took, in order, before going on.
Deliveries of what it already took (those redeliveries, ones that crossed a replay) are only
acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cloud.ingest import PartitionEvent, SourceMessage
from devices.contract import TOPIC_ROOT, encode_ack
from devices.mqtt import LinkErrors, describe, ssl_context
from devices.status import plural
from devices.x509 import link_certificate

if TYPE_CHECKING:
    from nats.aio.client import Client

log = logging.getLogger("fieldline.cloud.jetstream")

IN = "fl.in"
PART = "fl.p"
ACK = "fl.ack"
GROUP = "owner"
PING_INTERVAL_S = 2  # a silent server is dropped after ~3 unanswered pings
FLUSH_TIMEOUT_S = 10.0
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def gateway_token(gateway: str) -> str:
    """A gateway id as one NATS subject token: bytes outside ``[A-Za-z0-9_-]`` as ``~XX``."""
    return "".join(c if c in _SAFE else "".join(f"~{b:02X}" for b in c.encode())
                   for c in gateway)


def gateway_from_token(token: str) -> str:
    out = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            out.append(int(token[i + 1:i + 3], 16))
            i += 3
        else:
            out += token[i].encode()
            i += 1
    return out.decode()


def partition_of_gateway(gateway: str, partitions: int) -> int:
    """The partition the stream's ``{{partition(P,1)}}`` transform files a gateway under
    (FNV-1a 32 of its subject token, mod P): tools and tests can tell who owns what."""
    h = 2166136261
    for b in gateway_token(gateway).encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h % partitions


@dataclass(frozen=True, kw_only=True)
class JetStreamConfig:
    servers: tuple[str, ...]
    stream: str = "FIELDLINE"
    partitions: int = 16
    replicas: int = 1  # 3 on a 3-node cluster: survives the loss of a node
    member: tuple[int, int] | None = None  # (k, N): partitions p with p % N == k; None: all
    priority_timeout_ms: int = 5_000
    ack_wait_ms: int = 15_000
    snapshot_interval_ms: int = 10_000
    max_age_s: int = 7 * 86_400  # the stream keeps this much for replay (and the snapshots' tail)
    max_bytes: int = 0  # and at most this much (per replica; 0: no cap of its own)
    # TLS to the servers (tls://): the CA that signed their certificates (else the system's),
    # and this process's own certificate and key when the servers verify clients
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    pull_batch: int = 200

    def served(self) -> list[int]:
        if self.member is None:
            return list(range(self.partitions))
        k, n = self.member
        return [p for p in range(self.partitions) if p % n == k]

    @property
    def tls(self) -> Any:
        """The ``ssl.SSLContext`` for the servers when TLS files are configured, else None
        (nats-py then uses the system's CAs for a server that requires TLS)."""
        if not (self.ca_file or self.cert_file):
            return None
        return ssl_context(self.ca_file, self.cert_file, self.key_file)

    def certificate(self, log: logging.Logger) -> dict[str, Any] | None:
        """The soonest-expiring certificate the NATS links load (their CA, this process's
        own), for the process's status; None without TLS files."""
        if not (self.ca_file or self.cert_file):
            return None
        return link_certificate(shown(*self.servers), (self.ca_file, self.cert_file), log)

    @property
    def kv_bucket(self) -> str:
        return f"{self.stream}_SNAP"

    @property
    def obj_bucket(self) -> str:
        return f"{self.stream}_SNAPDATA"


def shown(*servers: str) -> str:
    """NATS servers as logs and statuses show them: without the user, password or token a URL
    may carry (``nats://user:secret@host:4222`` is how nats-py takes credentials)."""
    out = []
    for url in servers:
        parts = urlsplit(url)
        out.append(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
                   if "@" in parts.netloc else url)
    return ", ".join(out)


def login(*servers: str) -> tuple[list[str], dict[str, Any]]:
    """The servers without the login their URLs carry, and that login as nats-py's options.

    nats-py takes a login from the URL of the server it is connecting to, and the servers a
    cluster announces (its ``connect_urls``, the nodes' own addresses) carry none: a client that
    lost its listed node was refused by every announced one ("Authorization Violation") and, with
    one node listed, never came back. Given as options, the login goes to every server.
    ``servers`` share one login (the configuration checks it: :func:`logins`)."""
    found = logins(*servers)
    bare = [shown(url) for url in servers]
    if not found:
        return bare, {}
    parts = urlsplit(next(iter(found)))
    user, password = unquote(parts.username or ""), parts.password
    return bare, ({"token": user} if password is None
                  else {"user": user, "password": unquote(password)})


def logins(*servers: str) -> set[str]:
    """The distinct logins (``scheme://user:password@``) the servers' URLs carry."""
    out = set()
    for url in servers:
        parts = urlsplit(url)
        if "@" in parts.netloc:
            out.add(f"nats://{parts.netloc.rpartition('@')[0]}@")
    return out


class TlsNotOfferedError(ConnectionError):
    """A server listed as ``tls://`` offered no TLS: nothing, a login above all, is sent to
    it in the clear."""


def _tls_only_client() -> Client:
    """A nats-py client that speaks TLS to every server listed as ``tls://``, or nothing.

    nats-py upgrades to TLS only when the server's INFO says ``tls_required``: to a server
    listed as tls:// that merely offers TLS (``allow_non_tls``) it spoke in the clear, and to
    one without TLS (its ``tls {}`` block forgotten, or anything answering at its address) it
    sent its CONNECT, the login in it, in the clear. As NATS documents for its clients ("if
    configured to connect with TLS, client libraries will fail to connect to a server without
    TLS"), a server that offers TLS is spoken to in TLS, and one that does not is refused before
    anything is sent (nats-py internals: its INFO is checked where the client reads it)."""
    from nats.aio.client import Client

    class TlsOnly(Client):
        async def _process_info(self, info: dict[str, Any],
                                initial_connection: bool = False) -> None:
            uri = self._current_server.uri if self._current_server is not None else None
            if initial_connection and uri is not None and uri.scheme == "tls" \
                    and not info.get("tls_required"):
                if not info.get("tls_available"):
                    raise TlsNotOfferedError(
                        f"{shown(f'tls://{uri.netloc}')} offers no TLS (its configuration has "
                        "no tls {} block?): nothing sent to it in the clear")
                info["tls_required"] = True  # offered, not required: take it
            await super()._process_info(info, initial_connection)

    return TlsOnly()


async def connect(servers: list[str], name: str, errors: LinkErrors | None = None,
                  tls: Any = None) -> Any:
    """A NATS connection that reconnects for ever and notices a silent server in seconds: a
    node that hangs, or a link that drops packets, closes nothing, so only unanswered pings tell
    (the client's default, a ping every 2 min with 2 outstanding, left the bridge and the
    workers on such a node standing still for minutes).

    It also waits for ever for a first server: nats-py tries them all again every
    ``reconnect_time_wait`` and reports each failed attempt to ``error_cb``. Each server's
    first failure of an outage is logged ("worker w cannot reach nats://n2:4222: ... (retrying)",
    not one warning an attempt: four a second with two servers down) and the latest of every
    server kept in ``errors`` for the process's status until a server answers; errors on a
    connected link (a permission refused, a slow consumer) are logged as they come."""
    link = errors if errors is not None else LinkErrors(f"NATS ({name})", shown(*servers), log)
    failing: dict[str, str] = {}  # server -> why its last attempt failed, this outage
    nc = _tls_only_client()

    async def on_error(exc: Exception) -> None:
        if nc.is_connected:
            log.warning("NATS (%s): %s", name, describe(exc))
            return
        # nats-py tries the server it moved to the end of its pool (internals: without them
        # the error alone, which names no server when a name does not resolve)
        pool = getattr(nc, "_server_pool", None)
        uri = getattr(pool[-1], "uri", None) if pool else None
        server = shown(f"{uri.scheme}://{uri.netloc}") if uri is not None else "a server"
        if server not in failing:
            log.warning("%s cannot reach %s: %s (retrying)", link.what, server, describe(exc))
        elif isinstance(exc, ConnectionResetError):
            return  # what follows a server's refusal (a wrong login): keep the refusal
        failing[server] = describe(exc)
        link.failed("; ".join(f"{k}: {v}" for k, v in sorted(failing.items())), logged=True)

    def up() -> None:
        failing.clear()
        link.up()

    async def on_disconnect() -> None:
        if nc.is_closed:  # its own close says so too: a stop, not an outage
            return
        log.warning("NATS (%s): disconnected; reconnecting to one of %s", name, shown(*servers))

    async def on_reconnect() -> None:
        up()
        url = nc.connected_url
        log.info("NATS (%s): reconnected to %s", name,
                 shown(f"{url.scheme}://{url.netloc}") if url is not None else "?")

    bare, credentials = login(*servers)
    await nc.connect(bare, name=name, max_reconnect_attempts=-1,
                     **({"tls": tls} if tls is not None else {}), **credentials,
                     # seconds, typed int by nats-py but used as a float
                     reconnect_time_wait=0.5,  # type: ignore[arg-type]
                     allow_reconnect=True, drain_timeout=5,
                     ping_interval=PING_INTERVAL_S, max_outstanding_pings=2,
                     # a publish that fills the client's buffer waits for it to be
                     # written; on a hung node that wait had no end (the default)
                     flush_timeout=FLUSH_TIMEOUT_S,
                     error_cb=on_error, disconnected_cb=on_disconnect,
                     reconnected_cb=on_reconnect)
    up()
    return nc


async def close_quietly(nc: Any, timeout_s: float) -> None:
    """Close a connection whatever state it is in. nats-py's close can raise CancelledError
    of its own (closing after a flush timed out on a hung node, then resumed): that is not a
    cancellation of ours, and must not end a worker's stop early; a real one still does."""
    try:
        await asyncio.wait_for(nc.close(), timeout_s)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
    except Exception as exc:  # closing: nothing left to do about it
        log.debug("NATS close: %r", exc)


def consumer_name(p: int) -> str:
    return f"p{p}"


async def _api(nc: Any, subject: str, body: dict[str, Any], timeout: float = 5.0
               ) -> dict[str, Any]:
    resp = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    doc: dict[str, Any] = json.loads(resp.data)
    return doc


class StreamMismatchError(RuntimeError):
    """The stream exists with a setting this configuration cannot change: waiting will not
    help, the operator must."""


async def ensure_stream(nc: Any, cfg: JetStreamConfig, attempts: int | None = 30,
                        warn_every_s: float = 30.0,
                        on_failure: Callable[[Exception], None] | None = None) -> None:
    """The stream, its P pinned consumers and the snapshot buckets (idempotent). Retried while
    the cluster cannot answer (a fresh cluster electing its leaders, a cluster without quorum):
    ``attempts`` times, or until it can (None: a worker waits, warning every ``warn_every_s``,
    rather than exit because its cluster is down for a while). A stream that exists with another
    partitioning fails at once. ``on_failure`` hears of each failed attempt."""
    js = nc.jetstream()
    tries = 0
    warned = time.monotonic()
    while True:
        try:
            await _ensure(nc, js, cfg)
            if tries and attempts is None:
                log.warning("JetStream stream %s set up after %d attempt(s)", cfg.stream,
                            tries + 1)
            return
        except StreamMismatchError:
            raise
        except Exception as exc:  # cluster not ready: no meta leader, no quorum, timeouts
            tries += 1
            if on_failure is not None:
                on_failure(exc)
            if attempts is not None and tries >= attempts:
                raise RuntimeError(f"JetStream stream {cfg.stream} could not be set up on "
                                   f"{shown(*cfg.servers)}: {exc!r}") from exc
            if attempts is None and (tries == 1 or time.monotonic() - warned >= warn_every_s):
                warned = time.monotonic()
                log.warning("JetStream stream %s cannot be set up yet on engine.servers %s "
                            "(%r): waiting for the cluster", cfg.stream, shown(*cfg.servers), exc)
            await asyncio.sleep(min(0.5 * tries, 2.0))


async def _ensure(nc: Any, js: Any, cfg: JetStreamConfig) -> None:
    from nats.js.api import KeyValueConfig, ObjectStoreConfig, StorageType

    stream = {
        "name": cfg.stream, "subjects": [f"{IN}.*.*"],
        "subject_transform": {"src": f"{IN}.*.*",
                              "dest": f"{PART}.{{{{partition({cfg.partitions},1)}}}}"
                                      f".{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"},
        "retention": "limits", "storage": "file", "num_replicas": cfg.replicas,
        "max_age": cfg.max_age_s * 1_000_000_000, "max_bytes": cfg.max_bytes or -1,
        "discard": "old", "duplicate_window": 120 * 1_000_000_000,
    }
    doc = await _api(nc, f"$JS.API.STREAM.CREATE.{cfg.stream}", stream)
    err = doc.get("error")
    if err and err.get("err_code") != 10058:  # 10058: exists (with this config or another)
        raise RuntimeError(f"stream {cfg.stream}: {err}")
    if err:
        info = await _api(nc, f"$JS.API.STREAM.INFO.{cfg.stream}", {})
        have = info.get("config", {}).get("subject_transform", {}).get("dest", "")
        if have != stream["subject_transform"]["dest"]:  # type: ignore[index]
            raise StreamMismatchError(
                f"stream {cfg.stream} exists with another partitioning ({have!r}): "
                "changing engine.partitions needs a new stream (engine.stream)")
        await _retain(nc, cfg, info.get("config", {}), stream)
    for p in range(cfg.partitions):
        name = consumer_name(p)
        body = {"stream_name": cfg.stream, "config": {
            "durable_name": name, "name": name, "filter_subject": f"{PART}.{p}.>",
            "ack_policy": "explicit", "ack_wait": cfg.ack_wait_ms * 1_000_000,
            "max_ack_pending": 10_000, "deliver_policy": "all",
            "priority_groups": [GROUP], "priority_policy": "pinned_client",
            "priority_timeout": cfg.priority_timeout_ms * 1_000_000,
            "num_replicas": cfg.replicas}}
        doc = await _api(nc, f"$JS.API.CONSUMER.CREATE.{cfg.stream}.{name}", body)
        if doc.get("error"):
            raise RuntimeError(f"consumer {name}: {doc['error']}")
    await js.create_key_value(KeyValueConfig(bucket=cfg.kv_bucket, history=1,
                                             replicas=cfg.replicas))
    await js.create_object_store(cfg.obj_bucket, ObjectStoreConfig(
        bucket=cfg.obj_bucket, replicas=cfg.replicas, storage=StorageType.FILE))


async def _retain(nc: Any, cfg: JetStreamConfig, have: dict[str, Any],
                  want: dict[str, Any]) -> None:
    """An existing stream takes a changed ``engine.retention`` / ``retention_bytes`` (before,
    the values it was created with stayed, whatever the configuration said)."""
    changed = {k: want[k] for k in ("max_age", "max_bytes") if have.get(k) != want[k]}
    if not changed:
        return
    doc = await _api(nc, f"$JS.API.STREAM.UPDATE.{cfg.stream}", {**have, **changed})
    if doc.get("error"):
        raise RuntimeError(f"stream {cfg.stream}: could not apply engine.retention / "
                           f"retention_bytes: {doc['error']}")
    log.warning("JetStream stream %s: retention now %s s and %s bytes (was %s s and %s bytes)",
                cfg.stream, want["max_age"] // 1_000_000_000, want["max_bytes"],
                int(have.get("max_age", 0)) // 1_000_000_000, have.get("max_bytes"))


class FencedError(Exception):
    """Another worker claimed the partition since we did: we must not write its snapshot."""


class SnapshotStore:
    """Per-partition snapshots: blobs in an object store, a KV pointer updated with CAS.

    Each save writes an object of its own name (partition, sequence and a random part): a
    worker whose save is fenced removes its own object, never one that another worker's
    pointer names (two owners snapshot the same sequence whenever nothing arrived between
    their turns)."""

    def __init__(self, js: Any, cfg: JetStreamConfig, owner: str) -> None:
        self.js = js
        self.cfg = cfg
        self.owner = owner
        self.revision: dict[int, int] = {}  # partition -> KV revision of our claim
        self.missing = 0  # claims whose pointer named an object that is gone (full replays)
        self.swept = 0  # objects removed that no pointer named (see sweep)
        self._mine: dict[int, set[str]] = {}  # objects we wrote while we own the partition
        self._unsure: dict[int, set[str]] = {}  # objects whose pointer update went unanswered
        self._kv: Any = None
        self._obs: Any = None

    async def _buckets(self) -> tuple[Any, Any]:
        if self._kv is None or self._obs is None:
            # both or neither: a lookup that fails (a timeout, JetStream unavailable) is asked
            # again next time (keeping the one that answered left the other None for good)
            kv = await self.js.key_value(self.cfg.kv_bucket)
            obs = await self.js.object_store(self.cfg.obj_bucket)
            self._kv, self._obs = kv, obs
        return self._kv, self._obs

    async def claim(self, p: int) -> tuple[bytes | None, int]:
        """Take partition ``p`` over: its latest snapshot and the sequence it covers; the KV
        pointer is rewritten naming us, so the previous owner's next save fails. A pointer
        whose object is gone (lost from the store) cannot be restored: the partition is then
        rebuilt by replaying the stream from its start (sequence 0), not left unowned."""
        from nats.js.errors import (
            BadObjectMetaError,
            DigestMismatchError,
            KeyNotFoundError,
            KeyWrongLastSequenceError,
            ObjectNotFoundError,
        )

        kv, obs = await self._buckets()
        key = f"p{p}"
        for _ in range(20):
            try:
                entry = await kv.get(key)
                rev = entry.revision
                ptr = json.loads(entry.value or b"{}")
            except KeyNotFoundError:
                rev, ptr = 0, {}
            ptr["owner"] = self.owner
            try:
                if rev:
                    new = await kv.update(key, json.dumps(ptr).encode(), last=rev)
                else:
                    new = await kv.create(key, json.dumps(ptr).encode())
            except (KeyWrongLastSequenceError, Exception) as exc:
                if isinstance(exc, KeyWrongLastSequenceError) or "wrong last" in str(exc):
                    await asyncio.sleep(0.05)
                    continue
                raise
            self.revision[p] = new
            if not ptr.get("object"):
                return None, int(ptr.get("seq", 0))
            try:
                res = await obs.get(ptr["object"])
            except (ObjectNotFoundError, BadObjectMetaError, DigestMismatchError) as exc:
                self.missing += 1
                log.error("partition %d: its snapshot %s (at sequence %s) cannot be read from "
                          "%s (%s); rebuilding the partition from the start of the stream", p,
                          ptr["object"], ptr.get("seq"), self.cfg.obj_bucket,
                          type(exc).__name__)
                return None, 0
            return (bytes(res.data) if res.data is not None else None), int(ptr.get("seq", 0))
        raise FencedError(f"partition {p}: could not claim its snapshot key")

    async def save(self, p: int, blob: bytes, seq: int) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        kv, obs = await self._buckets()
        rev = self.revision.get(p)
        if rev is None:
            raise FencedError(f"partition {p} is not ours")
        name = f"p{p}.{seq}.{secrets.token_hex(6)}"
        self._mine.setdefault(p, set()).add(name)
        await obs.put(name, blob)
        ptr = {"seq": seq, "object": name, "owner": self.owner, "ts": int(time.time() * 1000)}
        try:
            entry = await kv.get(f"p{p}")
            old = json.loads(entry.value or b"{}").get("object")
            self.revision[p] = await kv.update(f"p{p}", json.dumps(ptr).encode(), last=rev)
        except KeyWrongLastSequenceError:
            self.revision.pop(p, None)
            with contextlib.suppress(Exception):
                await obs.delete(name)
            raise FencedError(f"partition {p} was claimed by another worker") from None
        except BaseException:
            # no answer (a timeout, no quorum): the pointer may name it or not; the next
            # save that succeeds knows, or the next owner's sweep
            self._unsure.setdefault(p, set()).add(name)
            raise
        # the update at our revision succeeded: the pointer named ``old`` until now, so none
        # of the objects whose update went unanswered is named (a later answer to any of them
        # would have moved the revision and failed this update)
        for stale in {old, *self._unsure.pop(p, ())} - {name, None, ""}:
            with contextlib.suppress(Exception):
                await obs.delete(stale)

    async def sweep(self, p: int) -> int | None:
        """After our claim of ``p``, remove the objects of ``p`` no pointer names: saves of owners
        killed between writing their object and pointing to it, or never told whether their
        update landed. Only an update at the current revision can move the pointer, and it
        names an object written after that revision: so if the pointer is still at our revision
        once the store was listed, nothing listed but the named object and our own saves can
        ever be named again. Returns how many were removed: 0 when the partition is no longer
        ours (its owner sweeps); None when the store could not be read or our own save moved
        the pointer meanwhile (try again)."""
        from nats.js.errors import NotFoundError

        kv, obs = await self._buckets()
        try:
            infos = await obs.list(ignore_deletes=True)
        except NotFoundError:  # nothing stored
            return 0
        except Exception:  # no quorum, a timeout
            return None
        try:
            entry = await kv.get(f"p{p}")
        except Exception:
            return None
        if entry.revision != self.revision.get(p):
            return None if p in self.revision else 0
        keep = {json.loads(entry.value or b"{}").get("object"), *self._mine.get(p, ())}
        removed = 0
        for info in infos:
            name = str(info.name)
            if name.startswith(f"p{p}.") and name not in keep:
                with contextlib.suppress(Exception):
                    await obs.delete(name)
                    removed += 1
        self.swept += removed
        return removed

    def release(self, p: int) -> None:
        self.revision.pop(p, None)
        self._mine.pop(p, None)
        self._unsure.pop(p, None)


UNANSWERED = "503"  # a pull nobody serves: "no responders"
UNANSWERED_WARN_S = 10.0  # then a warning (every 30 s) naming the likely causes
REPLICA_CHECK_S = 5.0  # how often a worker asks whether the stream's replicas are current


def replicas_behind(info: dict[str, Any], replicas: int) -> int | None:
    """From a STREAM.INFO answer: how many of ``replicas`` are not current (the leader is;
    a peer is when the server says ``current`` and not ``offline``); all of them without a
    leader; None for an error answer."""
    if "error" in info or "config" not in info:
        return None
    cluster = info.get("cluster") or {}
    if replicas <= 1:
        return 0
    if not cluster.get("leader"):
        return replicas
    current = 1 + len(cluster.get("replicas") or []) - len(_lagging(cluster))
    return max(0, replicas - current)


def _lagging(cluster: dict[str, Any]) -> list[str]:
    """The peers of a STREAM.INFO ``cluster`` that are not current (or offline)."""
    return [str(r.get("name")) for r in cluster.get("replicas") or []
            if not r.get("current") or r.get("offline")]


def _client_error(exc: BaseException) -> bool:
    """An error the NATS client raises for a server, link or timeout (not a fault of ours)."""
    import nats.errors

    return isinstance(exc, (nats.errors.Error, TimeoutError, OSError))


def _status(msg: Any) -> str | None:
    h = msg.headers or {}
    s = h.get("Status")
    return str(s) if s is not None else None


def _seqs(reply: str) -> tuple[int, int]:
    """The stream sequence of a delivery and the consumer's delivery sequence (one more for
    every delivery, redeliveries included)."""
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>, or
    # with a domain and account hash before the stream and a random token after <pending>
    parts = reply.split(".")
    if len(parts) >= 11:
        return int(parts[7]), int(parts[8])
    return int(parts[5]), int(parts[6])


def _topic(subject: str) -> str:
    """``fl.p.<p>.<gw token>.<kind>`` -> ``fieldline/v1/<gw>/<kind>`` (what the worker reads)."""
    parts = subject.split(".")
    return f"{TOPIC_ROOT}/{gateway_from_token(parts[3])}/{parts[4]}"


class JetStreamSource:
    """Reads the partitions this worker serves; see the module docstring for ownership."""

    per_partition_state = True

    def __init__(self, cfg: JetStreamConfig, *, worker_id: str, max_queue: int = 5_000) -> None:
        self.cfg = cfg
        self.partitions = cfg.partitions
        self.worker_id = worker_id
        self.max_queue = max_queue
        self._queue: asyncio.Queue[SourceMessage | PartitionEvent] = asyncio.Queue()
        self._nc: Any = None
        self.link_errors = LinkErrors(f"worker {worker_id}", shown(*cfg.servers), log)
        self._tasks: list[asyncio.Task[None]] = []
        self._sweeps: set[asyncio.Task[None]] = set()
        self._pull_to: dict[int, tuple[str, str]] = {}  # partition -> (request subject, inbox)
        self.store: SnapshotStore | None = None
        self.owned: dict[int, str] = {}  # partition -> pin id, while we hold its state
        self._pins: dict[int, str] = {}  # the pin id the server gave us last, per partition
        self._last_pull: dict[int, float] = {}
        # per partition held: the last stream sequence handed to the worker (replayed or
        # delivered; what is at or below it is only acknowledged), and the delivery sequence
        # the next delivery should have (another one: a delivery was lost on the way)
        self._through: dict[int, int] = {}
        self._next_delivery: dict[int, int] = {}
        self._epoch: dict[int, int] = {}
        self.counters: dict[str, int] = {"assigned": 0, "pin_lost": 0, "fenced": 0,
                                         "stalls": 0, "replayed": 0, "skipped_replayed": 0,
                                         "deliveries_lost": 0,
                                         "snapshots_missing": 0, "snapshots_swept": 0,
                                         "pulls_unanswered": 0}
        self.acks_refused: dict[str, int] = {}
        self.acks_unheard = 0
        self.connected = asyncio.Event()
        self._reset = asyncio.Event()
        self.move_ms: list[float] = []  # first message after a claim: claim + restore + replay
        # replicas of the stream that are not current (None: not known yet, or no answer);
        # the stream goes on with a quorum, but one node fewer stops it (a node whose disk
        # filled keeps serving clients with JetStream disabled: only this tells)
        self.replicas_behind: int | None = None
        # what keeps JetStream from serving this worker, for its status (epoch ms since when):
        # the stream not set up yet (no quorum), or partitions whose pulls nobody answers
        self._setup_failing: tuple[int, str] | None = None
        self._unanswered: dict[int, int] = {}

    @property
    def link_up(self) -> bool:
        """Connected to a NATS server now (for the operator's status)."""
        return self._nc is not None and bool(self._nc.is_connected)

    @property
    def link_error(self) -> str | None:
        """Why its last attempt to reach a NATS server failed, while it has none."""
        return self.link_errors.last

    @property
    def engine_trouble(self) -> dict[str, Any] | None:
        """Since when (epoch ms) and why JetStream does not serve this worker though it is
        connected, for its status; None while it does."""
        if self._setup_failing is not None:
            since, error = self._setup_failing
            return {"since": since, "error": f"the stream {self.cfg.stream} cannot be set up: "
                                             f"{error}"}
        if self._unanswered:
            parts = sorted(self._unanswered)
            named = ", ".join(map(str, parts[:8])) + (", ..." if len(parts) > 8 else "")
            which = plural(len(parts), "partition", "partitions")
            return {"since": min(self._unanswered.values()),
                    "error": f"no server answers the pulls of {which} ({named}; 503 no "
                             "responders): no leader (quorum lost?) or "
                             "JetStream disabled (nats-server disables it on a full disk, until "
                             "restarted)"}
        return None

    def _setup_failed(self, exc: Exception) -> None:
        since = self._setup_failing[0] if self._setup_failing else _now_ms()
        self._setup_failing = (since, describe(exc))

    # ---- the PartitionedSource interface ------------------------------------------------

    async def messages(self) -> AsyncIterator[SourceMessage | PartitionEvent]:
        self._nc = await connect(list(self.cfg.servers), self.worker_id, self.link_errors,
                                 self.cfg.tls)
        await ensure_stream(self._nc, self.cfg, attempts=None, on_failure=self._setup_failed)
        self._setup_failing = None
        self.store = SnapshotStore(self._nc.jetstream(), self.cfg, self.worker_id)
        self.connected.set()
        self._tasks = [asyncio.create_task(self._pull_loop(p), name=f"js-pull-{p}")
                       for p in self.cfg.served()]
        self._tasks.append(asyncio.create_task(self._watch_replicas(), name="js-replicas"))
        while True:
            item = await self._queue.get()
            yield item
            # a full queue never suspends get(): let the pull loops run between messages,
            # or a busy worker would stop pulling and lose its pins
            await asyncio.sleep(0)

    async def close(self) -> None:
        """Stop pulling, hand the pins back (a standby takes over at once instead of after
        the pin timeout) and disconnect; bounded in time even with the cluster unreachable."""
        tasks = [*self._tasks, *self._sweeps]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        nc, self._nc = self._nc, None
        if nc is None:
            return
        for p in list(self.owned):
            with contextlib.suppress(Exception):
                await _api(nc, f"$JS.API.CONSUMER.UNPIN.{self.cfg.stream}.{consumer_name(p)}",
                           {"group": GROUP}, timeout=1.0)
        # flush, not drain: what must reach the server are the acknowledgements already
        # published; messages still in a pull inbox are unacknowledged and come again to the
        # next owner, while a drain would wait for them (up to its timeout, seconds of a stop)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)
        await close_quietly(nc, 2)

    async def ack(self, gateway: str, acked: list[int], rejected: list[int],
                  incarnation: int = 0, proofs: dict[int, str] | None = None,
                  conflicts: list[int] | None = None, clock_ms: int | None = None) -> bool:
        if self._nc is None or not self._nc.is_connected:
            return False
        try:
            await self._nc.publish(f"{ACK}.{gateway_token(gateway)}",
                                   encode_ack(acked, rejected, incarnation, proofs,
                                              conflicts, clock_ms))
        except Exception as exc:
            log.warning("could not publish the ack for %s: %s", gateway, exc)
            return False
        return True

    async def done(self, msgs: list[SourceMessage]) -> None:
        """Their effects are in InfluxDB: acknowledge them to JetStream (the consumer's
        position; recovery does not depend on it, the snapshot + replay does)."""
        for m in msgs:
            if m.handle is not None and self._epoch.get(m.partition) == m.epoch:
                with contextlib.suppress(Exception):
                    await m.handle.ack()

    async def save_snapshot(self, p: int, blob: bytes, seq: int, epoch: int) -> bool:
        """False when the partition is no longer ours (then it is revoked here)."""
        if self.store is None or self._epoch.get(p) != epoch or p not in self.owned:
            return False
        try:
            await self.store.save(p, blob, seq)
            return True
        except FencedError as exc:
            self.counters["fenced"] += 1
            log.warning("%s: %s; dropping it", self.worker_id, exc)
            self._lose(p)
            return False

    def fence_ok(self) -> bool:
        """False when some partition we hold may have moved while this process was not
        pulling (paused, starved): then everything held is dropped (``reset``)."""
        now = time.monotonic()
        limit = self.cfg.priority_timeout_ms / 1000 * 0.8
        stale = [p for p in self.owned if now - self._last_pull.get(p, now) > limit]
        if not stale:
            return True
        self.counters["stalls"] += 1
        log.warning("%s did not pull partitions %s for over %.1f s (paused or starved): the "
                    "server may have moved them; dropping every partition and what is not "
                    "yet written", self.worker_id, stale[:8], limit)
        for p in list(self.owned):
            self._lose(p, event=False)
        self._reset.set()
        return False

    def take_reset(self) -> bool:
        if self._reset.is_set():
            self._reset.clear()
            return True
        return False

    # ---- internals ----------------------------------------------------------------------

    def _lose(self, p: int, *, event: bool = True, unpinned: bool = False) -> None:
        if unpinned:
            self._pins.pop(p, None)
        self._next_delivery.pop(p, None)  # the next owner's deliveries are counted afresh
        if self.owned.pop(p, None) is None:
            return
        self._epoch[p] = self._epoch.get(p, 0) + 1
        if self.store is not None:
            self.store.release(p)
        self.counters["pin_lost"] += 1
        if event:
            self._queue.put_nowait(PartitionEvent(p, False, epoch=self._epoch[p]))

    async def _watch_replicas(self, every_s: float = REPLICA_CHECK_S) -> None:
        """Every ``every_s``: how many of the stream's replicas are not current. A change
        that holds for two checks in a row is logged (a replica catching up after a restart
        is behind for a moment)."""
        seen: int | None = None
        while True:
            try:
                doc = await _api(self._nc, f"$JS.API.STREAM.INFO.{self.cfg.stream}", {})
                behind = replicas_behind(doc, self.cfg.replicas)
            except Exception:  # no answer: the pulls say so; keep the last known
                behind = None
            if behind is not None:
                if behind == seen and behind != self.replicas_behind:
                    lagging = _lagging(doc.get("cluster") or {})
                    if behind:
                        log.warning(
                            "stream %s: %d of its %d replicas not current (%s): it goes on while "
                            "a majority is, one node fewer stops it. A node down, or one whose "
                            "disk filled (nats-server then disables JetStream there until it "
                            "is restarted)", self.cfg.stream, behind, self.cfg.replicas,
                            ", ".join(lagging) or "no leader")
                    elif self.replicas_behind:
                        log.warning("stream %s: all %d replicas current again", self.cfg.stream,
                                    self.cfg.replicas)
                    self.replicas_behind = behind
                seen = behind
            await asyncio.sleep(every_s)

    async def _pull_loop(self, p: int) -> None:
        nc = self._nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.cfg.stream}.{consumer_name(p)}"
        expires = max(0.2, self.cfg.priority_timeout_ms / 1000 / 4)
        self._pull_to[p] = (subject, inbox)
        backoff = 0.0
        unanswered_since: float | None = None
        warned = 0.0
        while True:
            try:
                status = await self._pull_once(p, nc, sub, inbox, subject, expires)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a connection change, a leader election: pull again
                # anything but the client's own errors is a fault of ours: show where
                log.warning("partition %d: pull failed: %r", p, exc,
                            exc_info=not _client_error(exc))
                await asyncio.sleep(0.5)
                continue
            if status != UNANSWERED:
                backoff, unanswered_since = 0.0, None
                self._unanswered.pop(p, None)
                continue
            # nobody serves the consumer: no leader just now (an election, quorum lost) or
            # JetStream disabled on the cluster. The answer comes at once, so pulling again at
            # once spun a core per worker; ask again no faster than an idle pull would
            self.counters["pulls_unanswered"] += 1
            now = time.monotonic()
            if unanswered_since is None:
                unanswered_since = now
                self._unanswered[p] = _now_ms()
            elif now - unanswered_since >= UNANSWERED_WARN_S and now - warned >= 30.0:
                warned = now
                log.warning(
                    "partition %d: JetStream has not served its consumer for %.0f s (503 no "
                    "responders): no leader (quorum lost?) or JetStream disabled; nats-server "
                    "disables it on a full disk and keeps it so until restarted (its log: "
                    "\"JetStream out of resources, will be DISABLED\")", p, now - unanswered_since)
            backoff = min(expires, max(0.05, backoff * 2))
            await asyncio.sleep(backoff)

    async def _pull_once(self, p: int, nc: Any, sub: Any, inbox: str, subject: str,
                         expires: float) -> str | None:
        """One pull request and what it delivers; ``UNANSWERED`` when no server serves the
        consumer."""
        batch = self.cfg.pull_batch if self._queue.qsize() < self.max_queue else 1
        req: dict[str, Any] = {"batch": batch, "expires": int(expires * 1e9), "group": GROUP}
        pin = self._pins.get(p)
        if pin:
            req["id"] = pin  # still ours after a stall: deliveries resume, state restored
        self._last_pull[p] = time.monotonic()
        await nc.publish(subject, json.dumps(req).encode(), reply=inbox)
        got = 0
        # wait for the server's answer (408 at expiry) with some slack, but ask again before
        # fence_ok would take the silence for a stall of ours: a pull the server never answers
        # (a consumer leader gone) made a worker with a 3 s priority_timeout drop everything
        limit = self.cfg.priority_timeout_ms / 1000 * 0.8
        deadline = time.monotonic() + expires + max(0.1, min(2.0, limit - expires - 0.3))
        while got < batch:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # nats TimeoutError: the request expired unanswered
                return None
            status = _status(msg)
            if status is not None:
                if status == "423":  # the server pinned someone else
                    if p in self.owned:
                        log.info("%s lost partition %d (pin moved)", self.worker_id, p)
                    self._lose(p, unpinned=True)
                elif status == "503" and got == 0:
                    return UNANSWERED
                elif status not in ("404", "408", "100"):
                    log.debug("partition %d: pull status %s %s", p, status, msg.headers)
                    if status == "409":
                        await asyncio.sleep(0.2)
                return None
            got += 1
            new_pin = (msg.headers or {}).get("Nats-Pin-Id")
            if new_pin and (p not in self.owned or new_pin != self.owned[p]):
                if p in self.owned:  # re-pinned to us under a new id: state may be stale
                    self._lose(p)
                self._pins[p] = new_pin
                await self._assign(p, new_pin)
            if p not in self.owned:
                continue  # an in-flight delivery after we dropped it: leave it unacked
            sseq, dseq = _seqs(msg.reply)
            expected = self._next_delivery.get(p)
            self._next_delivery[p] = dseq + 1
            if expected is not None and dseq != expected:
                # a delivery to us was lost on the way (or a new consumer leader counts
                # afresh): what it carried comes again after ack_wait, behind newer messages.
                # Read on from the last message taken, in stream order, before this one
                self.counters["deliveries_lost"] += 1
                log.info("partition %d: delivery %d came after %d (a delivery lost on the "
                         "way): reading the partition on from sequence %d", p, dseq,
                         expected - 1, self._through.get(p, 0) + 1)
                try:
                    await self._replay(p, self._through.get(p, 0), self._epoch.get(p, 0))
                except Exception:
                    self._lose(p, unpinned=True)  # from the snapshot with the next delivery
                    raise
            if sseq <= self._through.get(p, 0):
                # taken already (by a replay, or delivered before): acknowledged once that is
                # written (if the worker drops it unwritten, the redelivery brings the
                # partition back)
                self.counters["skipped_replayed"] += 1
                self._queue.put_nowait(SourceMessage(p, sseq, "", b"", handle=msg,
                                                     epoch=self._epoch.get(p, 0),
                                                     covered=True))
                continue
            self._through[p] = sseq
            self._queue.put_nowait(SourceMessage(p, sseq, _topic(msg.subject), msg.data,
                                                 handle=msg, epoch=self._epoch.get(p, 0)))
        return None

    async def _keepalive(self, p: int) -> None:
        """A pull on the durable with our pin while we are busy elsewhere (claiming, replaying),
        so the server does not hand the partition on meanwhile; what it delivers waits in the
        pull loop's subscription and is filtered there like any delivery."""
        pin = self._pins.get(p)
        target = self._pull_to.get(p)
        if not pin or target is None or self._nc is None:
            return
        if time.monotonic() - self._last_pull.get(p, 0.0) < self.cfg.priority_timeout_ms / 4000:
            return
        expires = max(0.2, self.cfg.priority_timeout_ms / 1000 / 4)
        req = {"batch": 1, "expires": int(expires * 1e9), "group": GROUP, "id": pin}
        self._last_pull[p] = time.monotonic()
        await self._nc.publish(target[0], json.dumps(req).encode(), reply=target[1])

    async def _assign(self, p: int, pin: str) -> None:
        assert self.store is not None
        t0 = time.monotonic()
        await self._keepalive(p)
        blob, seq = await self.store.claim(p)
        self.counters["snapshots_missing"] = self.store.missing
        self.owned[p] = pin
        self._epoch[p] = self._epoch.get(p, 0) + 1
        epoch = self._epoch[p]
        sweep = asyncio.create_task(self._sweep(p), name=f"js-sweep-{p}")
        self._sweeps.add(sweep)
        sweep.add_done_callback(self._sweeps.discard)
        self.counters["assigned"] += 1
        self._queue.put_nowait(PartitionEvent(p, True, snapshot=blob, position=seq,
                                              epoch=epoch))
        try:
            n = await self._replay(p, seq, epoch)
        except Exception:
            self._lose(p, unpinned=True)  # try again from the snapshot with the next delivery
            raise
        self.move_ms.append((time.monotonic() - t0) * 1000)
        log.info("%s took partition %d: snapshot at %d, replayed %d message(s) in %.0f ms",
                 self.worker_id, p, seq, n, self.move_ms[-1])

    async def _sweep(self, p: int) -> None:
        """The store's sweep of ``p`` after our claim, tried again while it cannot read the
        store and the partition is ours."""
        assert self.store is not None
        epoch = self._epoch.get(p)
        for attempt in range(60):
            await asyncio.sleep(min(1.0 + attempt, 10.0))
            if p not in self.owned or self._epoch.get(p) != epoch:
                return
            try:
                n = await self.store.sweep(p)
            except Exception:
                n = None
            if n is not None:
                self.counters["snapshots_swept"] = self.store.swept
                if n:
                    log.info("%s: partition %d: removed %d snapshot object(s) no pointer names",
                             self.worker_id, p, n)
                return

    async def _replay(self, p: int, after: int, epoch: int) -> int:
        """Everything stored for ``p`` after sequence ``after``, in order, before the pinned
        deliveries (which skip what the replay covered)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        js = self._nc.jetstream()
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             opt_start_seq=after + 1, ack_policy=AckPolicy.NONE,
                             inactive_threshold=30.0, filter_subject=f"{PART}.{p}.>")
        sub = await js.pull_subscribe(f"{PART}.{p}.>", stream=self.cfg.stream, config=cfg)
        n = 0
        last = after
        try:
            info = await sub.consumer_info()
            pending = int(info.num_pending or 0)
            # all of it, or the partition is given up: a partial replay would leave a hole
            # that the next snapshot would claim as done
            deadline = time.monotonic() + 120.0
            while n < pending:
                await self._keepalive(p)
                if self._queue.qsize() >= self.max_queue:
                    # a long tail (or the whole stream, its snapshot lost) is read as the
                    # worker gets through it, not into memory all at once
                    await asyncio.sleep(0.05)
                    deadline = time.monotonic() + 120.0
                    continue
                try:
                    msgs = await sub.fetch(min(500, pending - n), timeout=2.0)
                except Exception as exc:
                    if time.monotonic() > deadline or self._nc is None:
                        raise RuntimeError(f"replay of partition {p} stopped at {last}: "
                                           f"{exc!r}") from None
                    # a consumer without a leader yet answers at once (503): do not spin
                    await asyncio.sleep(0.2)
                    continue
                for m in msgs:
                    last = m.metadata.sequence.stream
                    stored = int(m.metadata.timestamp.timestamp() * 1000)
                    self._queue.put_nowait(SourceMessage(p, last, _topic(m.subject), m.data,
                                                         epoch=epoch, replay=True,
                                                         stored_ms=stored))
                    n += 1
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._through[p] = last
        self.counters["replayed"] += n
        return n


def _now_ms() -> int:
    return int(time.time() * 1000)
