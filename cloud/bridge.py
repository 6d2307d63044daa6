"""The bridge between the gateways' MQTT broker and NATS JetStream (README "Scale out").

Agents keep speaking MQTT 5 to the cloud broker (its TLS, ACLs and reason codes unchanged). The
bridge holds a persistent MQTT session on that broker and, for each result or health message,
publishes it to ``fl.in.<gateway>.<kind>`` and waits for JetStream's acknowledgement (stored on
the stream's replicas) before it sends the MQTT PUBACK: a message the bridge has not stored stays
with the broker, which redelivers it. Acks flow back the other way: workers publish on
``fl.ack.<gateway>``, the bridge republishes them on ``fieldline/v1/<gateway>/ack``.

Custody is still the edge's: a batch leaves its outbox only on the worker's ack, which is sent
after the InfluxDB write. The bridge is stateless; run one per cloud broker (a restart resumes
its MQTT session), or several with an MQTT shared subscription.

Beside it, the bridge replaces ``status-fieldline-bridge-<worker id>.json`` in
``worker.state_dir`` at every health interval (both links, whether JetStream stores what it is
given, its counters), which ``fieldline cloud status`` judges with the workers'
(cloud/status.py): a bridge that stopped, or a JetStream that stores nothing, is otherwise seen
only as every gateway going quiet.

Why not NATS's own MQTT listener: it speaks MQTT 3.1.1 only (no PUBACK reason codes, which the
agents use to tell "refused" from "delivered"), and its QoS 1 PUBACK covers its internal
``$MQTT_msgs`` stream, not a user stream; the app-level ack would cover that, but the agents
would lose their broker diagnostics, and the deploy broker's TLS and ACL files would not apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.jetstream import ACK, IN, connect, gateway_from_token, gateway_token, shown
from cloud.status import status_path
from devices import status as st
from devices.contract import TOPIC_ROOT, ack_topic, gateway_from_topic
from devices.mqtt import BrokerAddress, LinkErrors, make_client
from devices.x509 import link_certificate

log = logging.getLogger("fieldline.cloud.bridge")

KINDS = ("results", "health")
STALL_WARN_S = 10.0


@dataclass
class _Inbound:
    mid: int
    qos: int
    topic: str
    payload: bytes


class Bridge:
    def __init__(self, broker: BrokerAddress, servers: list[str], *, client_id: str,
                 nats_tls: Any = None, nats_cert: dict[str, Any] | None = None,
                 receive_maximum: int = 200, session_expiry_s: int = 3600,
                 shared_group: str | None = None, state_dir: Path | None = None,
                 status_interval_ms: int = 5_000) -> None:
        self.broker = broker
        self.servers = servers
        self.nats_tls = nats_tls  # an ssl.SSLContext for the NATS servers, or None
        self.client_id = client_id
        self.receive_maximum = receive_maximum
        self.session_expiry_s = session_expiry_s
        self.shared_group = shared_group
        self.state_dir = state_dir
        self.status_interval_ms = status_interval_ms
        self.counters: dict[str, int] = {"forwarded": 0, "acks_back": 0, "rejected": 0,
                                         "publish_retries": 0, "too_large": 0}
        # the last message over NATS's max_payload: its gateway, kind, bytes, the limit, when
        self._too_large: dict[str, Any] | None = None
        self._too_large_warned: dict[str, float] = {}  # gateway -> when last logged
        self.connected = asyncio.Event()
        self._failing_since: float | None = None
        self._warned = 0.0
        # for its status: since when JetStream stores nothing (epoch ms), the last error, the
        # last message stored; the links' states and since when
        self._store_failing_since: int | None = None
        self._store_error: str | None = None
        self._last_stored: int | None = None
        self._links = st.Links()
        self.broker_errors = LinkErrors("bridge", broker.url, log)  # why it cannot connect
        self.nats_errors = LinkErrors("bridge", shown(*servers), log)
        self._nc: Any = None  # its NATS connection, once a server answered
        self._started = _now_ms()
        self._status_failed = False
        # the soonest-expiring TLS certificate of its two links (the broker's, NATS')
        certs = [c for c in (link_certificate(broker.url, (broker.ca_file, broker.cert_file),
                                              log) if broker.tls else None, nats_cert) if c]
        self._cert = min(certs, key=lambda c: int(c["not_after"])) if certs else None

    async def run(self, stop: asyncio.Event) -> None:
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        inbound: asyncio.Queue[_Inbound] = asyncio.Queue()
        # its own task, from the start: a bridge waiting for a NATS server, or a forward
        # retrying against a JetStream that stores nothing, must not keep it from saying so
        reporter = asyncio.create_task(self._report(inbound, stop))
        try:
            self._nc = await _unless_stopped(
                connect(list(self.servers), self.client_id, self.nats_errors, self.nats_tls),
                stop)
            if self._nc is not None:
                await self._bridge(self._nc, inbound, stop)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            self.write_status("stopped", inbound)
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await self._nc.drain()

    async def _bridge(self, nc: Any, inbound: asyncio.Queue[_Inbound],
                      stop: asyncio.Event) -> None:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        loop = asyncio.get_running_loop()
        js = nc.jetstream()
        client, props = make_client(self.broker, self.client_id,
                                    session_expiry_s=self.session_expiry_s, manual_ack=True)
        if props is None:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self.receive_maximum  # unacked deliveries the broker may send

        def on_connect(c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            if rc.is_failure:
                log.error("bridge: %s refused the connection: %s", self.broker.url, rc)
                self.broker_errors.failed(f"refused: {rc}", logged=True)
                return
            self.broker_errors.up()
            for kind in KINDS:
                topic = f"{TOPIC_ROOT}/+/{kind}"
                if self.shared_group:
                    topic = f"$share/{self.shared_group}/{topic}"
                c.subscribe(topic, qos=1)
            loop.call_soon_threadsafe(self.connected.set)
            log.info("bridge: %s -> NATS %s (max_payload %s bytes)", self.broker.url,
                     shown(*self.servers), f"{getattr(self._nc, 'max_payload', 0):,}")

        def on_disconnect(_c: Any, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
            loop.call_soon_threadsafe(self.connected.clear)

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            item = _Inbound(msg.mid, msg.qos, msg.topic, bytes(msg.payload))
            loop.call_soon_threadsafe(inbound.put_nowait, item)

        client.on_connect = on_connect
        client.on_connect_fail = self.broker_errors.on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message

        async def on_ack(msg: Any) -> None:
            gw = gateway_from_token(msg.subject.split(".")[-1])
            client.publish(ack_topic(gw), msg.data, qos=1)
            self.counters["acks_back"] += 1

        ack_sub = await nc.subscribe(f"{ACK}.*", cb=on_ack)
        client.connect_async(self.broker.host, self.broker.port, keepalive=10,
                             clean_start=False, properties=props)
        client.loop_start()
        try:
            while not stop.is_set():
                try:
                    item = await asyncio.wait_for(inbound.get(), 0.5)
                except TimeoutError:
                    continue
                await self._forward(js, client, item, stop)
        finally:
            client.loop_stop()
            with contextlib.suppress(Exception):
                client.disconnect()
            with contextlib.suppress(Exception):
                await ack_sub.unsubscribe()

    async def _forward(self, js: Any, client: Any, item: _Inbound, stop: asyncio.Event) -> None:
        gw = gateway_from_topic(item.topic)
        kind = item.topic.rsplit("/", 1)[-1]
        if gw is None or kind not in KINDS:
            self.counters["rejected"] += 1
            client.ack(item.mid, item.qos)
            return
        subject = f"{IN}.{gateway_token(gw)}.{kind}"
        backoff = 0.2
        while True:
            # (asked at each attempt: a server reconnected to may have another max_payload)
            if self._over_max_payload(gw, kind, len(item.payload)):
                client.ack(item.mid, item.qos)  # never storable: the next must not wait
                return
            try:
                await js.publish(subject, item.payload, timeout=5.0)
                self._failing_since = None
                self._store_failing_since = None
                self._last_stored = _now_ms()
                break
            except Exception as exc:  # no quorum just now, a node gone: keep it, retry
                self.counters["publish_retries"] += 1
                if self._store_failing_since is None:
                    self._store_failing_since = _now_ms()
                self._store_error = repr(exc)[:300]
                now = time.monotonic()
                if self._failing_since is None or (
                        now - self._failing_since >= STALL_WARN_S and now - self._warned >= 30.0):
                    self._failing_since = self._failing_since or now
                    self._warned = now
                    log.warning(
                        "bridge: JetStream has stored nothing for %.0f s (last: %r for %s); "
                        "retrying, the message stays with the broker and the agents keep their "
                        "results. If this lasts: no quorum, or JetStream disabled on the nodes "
                        "(nats-server disables it on a full disk and keeps it so until "
                        "restarted; its log says \"JetStream out of resources\")",
                        now - self._failing_since, exc, gw)
                if stop.is_set():
                    return  # not acked: the broker redelivers it to the next session
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)
        client.ack(item.mid, item.qos)
        self.counters["forwarded"] += 1

    def _over_max_payload(self, gw: str, kind: str, size: int) -> bool:
        """A message NATS would never take (over its servers' ``max_payload``, 1 MB unless
        configured): counted and named instead of retried for ever, which held up every
        gateway's messages behind it. A results batch stays in its agent's outbox, which sends
        it again until it is acknowledged: nothing is lost once ``max_payload`` is raised."""
        limit = int(getattr(self._nc, "max_payload", 0) or 0)
        if not limit or size <= limit:
            return False
        self.counters["too_large"] += 1
        self._too_large = {"gateway": gw, "kind": kind, "bytes": size, "max_payload": limit,
                           "ts": _now_ms()}
        now = time.monotonic()
        if now - self._too_large_warned.get(gw, -1e9) >= 60.0:
            self._too_large_warned[gw] = now
            log.warning(
                "bridge: a %s message of gateway %s is %d bytes, over the NATS servers' "
                "max_payload of %d: not stored (%s). Set max_payload in every NATS server's "
                "configuration to at least the cloud broker's message_size_limit (4 MiB in "
                "deploy/mosquitto/cloud.conf) and restart them one at a time", kind, gw, size,
                limit, "its agent keeps the batch and sends it again" if kind == "results"
                else "the gateway's next report may fit")
        return True

    async def _report(self, inbound: asyncio.Queue[_Inbound], stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.write_status("running", inbound)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.status_interval_ms / 1000)

    def write_status(self, state: str, inbound: asyncio.Queue[_Inbound]) -> None:
        """The status ``fieldline cloud status`` reads beside the bridge (cloud/status.py)."""
        if self.state_dir is None:
            return
        now = _now_ms()
        nats_up = self._nc is not None and bool(self._nc.is_connected)
        try:
            st.write_status(status_path(self.state_dir, self.client_id), {
                "kind": "bridge", "bridge": self.client_id, "ts": now, "state": state,
                "pid": os.getpid(), "started": self._started,
                "health_interval_ms": self.status_interval_ms, "cert": self._cert,
                "links": {
                    "broker": {"url": self.broker.url,
                               **self._links.state("broker", self.connected.is_set(), now),
                               # it connects to the broker once it has somewhere to forward to
                               "error": self.broker_errors.last or (
                                   None if self._nc is not None
                                   else "not tried yet: it waits for a NATS server first")},
                    "nats": {"url": shown(*self.servers),
                             **self._links.state("nats", nats_up, now),
                             "error": self.nats_errors.last}},
                "store": {"ok": self._store_failing_since is None,
                          "failing_since": self._store_failing_since,
                          "last_ok": self._last_stored, "last_error": self._store_error},
                "too_large": self._too_large,
                "stats": {**self.counters, "waiting": inbound.qsize()}})
            self._status_failed = False
        except OSError as exc:  # only the operator's view: never the bridge's work
            if not self._status_failed:
                log.warning("cannot write the bridge's status under %s: %s", self.state_dir,
                            exc)
            self._status_failed = True


async def _unless_stopped(connecting: Coroutine[Any, Any, Any], stop: asyncio.Event) -> Any:
    """``connecting``'s result, or None if ``stop`` came first (it is then abandoned)."""
    task = asyncio.ensure_future(connecting)
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


def _now_ms() -> int:
    return int(time.time() * 1000)
