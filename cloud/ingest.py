"""Ingest: where the worker's input comes from.

The worker reads a **partitioned source**: results are keyed by gateway into ``partitions``
fixed partitions (a stable hash of the gateway id); a worker owns a set of partitions and reads
messages with a position per partition. One Mosquitto subscription is the one-owner case: it
owns every partition and positions are a local counter. Adapters for NATS JetStream (a durable
consumer per partition) or Kafka consumer groups implement the same interface; per-partition state
(dedup marks, detector state) is snapshotted with the position it covers and replayed from there.

MQTT shared subscriptions are deliberately not used to spread gateways over workers: brokers only
round-robin or remap keys on membership changes, and never hand state over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from devices.contract import TOPIC_ROOT, ack_topic, encode_ack
from devices.mqtt import BrokerAddress, describe, tls_context

log = logging.getLogger("fieldline.cloud.ingest")


def partition_of(gateway: str, partitions: int) -> int:
    """Stable partition of a gateway (crc32, identical on every platform and Python run)."""
    return zlib.crc32(gateway.encode()) % partitions


@dataclass(frozen=True)
class SourceMessage:
    partition: int
    position: int
    topic: str
    payload: bytes
    handle: Any = None  # the engine's message, acknowledged once its effects are written
    epoch: int = 0  # the ownership period of its partition it was read in
    replay: bool = False  # read again after a takeover, to rebuild the partition's state
    covered: bool = False  # a delivery the replay already handled: only acknowledge it
    stored_ms: int = 0  # when the engine stored it (a replay's), if it says; 0: unknown


@dataclass(frozen=True)
class PartitionEvent:
    """A partition became ours (restore ``snapshot``, which covers up to ``position``; its
    replay follows) or is ours no more (drop its state)."""

    partition: int
    assigned: bool
    snapshot: bytes | None = None
    position: int = 0
    epoch: int = 0


class PartitionedSource(Protocol):
    partitions: int
    per_partition_state: bool  # False: one owner of every partition, one state

    def messages(self) -> AsyncIterator[SourceMessage | PartitionEvent]: ...

    async def ack(self, gateway: str, acked: list[int], rejected: list[int],
                  incarnation: int = 0, proofs: dict[int, str] | None = None,
                  conflicts: list[int] | None = None, clock_ms: int | None = None) -> bool:
        """Tell a gateway (its ``incarnation``) which batches are safely stored (and which are
        unusable), and how its clock stands to the cloud's (``clock_ms``); False when it
        could not be sent now (the gateway will re-send, and be acked again)."""
        ...


# a connection that died silently (a partition, a NAT that forgot it, a hung broker) is
# noticed within about two keepalives: 20 s, not aiomqtt's default 60 s (two minutes)
KEEPALIVE_S = 10


class MqttSource:
    """Subscribes to every gateway's uplink topics on one MQTT broker (owns all partitions).

    The session is persistent (MQTT 5 session expiry) so a restarted worker receives what was
    published while it was away; connection losses are retried with capped backoff.
    """

    per_partition_state = False

    def __init__(self, address: BrokerAddress, *, client_id: str, partitions: int = 1,
                 session_expiry_s: int = 3600, max_queued: int = 10_000) -> None:
        self.address = address
        self.client_id = client_id
        self.partitions = partitions
        self.session_expiry_s = session_expiry_s
        self.max_queued = max_queued
        self._position = 0
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.link_error: str | None = None  # why the last connection failed, while down
        self._client: Any = None
        self.acks_sent = 0
        # acks the broker refused (not authorised, quota...) by reason, and acks nobody heard
        self.acks_refused: dict[str, int] = {}
        self.acks_unheard = 0
        self._puback: dict[int, asyncio.Future[Any]] = {}
        self._paho: Any = None
        self._early: dict[int, Any] = {}  # PUBACKs that came before their future

    @property
    def link_up(self) -> bool:
        """Connected to the broker and subscribed now (for the operator's status)."""
        return self.connected.is_set()

    async def messages(self) -> AsyncIterator[SourceMessage | PartitionEvent]:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        tls = tls_context(self.address) if self.address.tls else None
        backoff = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self.address.host, self.address.port, identifier=self.client_id,
                    username=self.address.username, password=self.address.password,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                    tls_context=tls, max_queued_incoming_messages=0,
                    keepalive=KEEPALIVE_S,
                ) as client:
                    self._client = client
                    self._watch_pubacks(client)
                    await client.subscribe(f"{TOPIC_ROOT}/+/results", qos=1)
                    await client.subscribe(f"{TOPIC_ROOT}/+/health", qos=1)
                    self.connected.set()
                    self.link_error = None
                    backoff = 0.5
                    log.info("ingest subscribed on %s", self.address.url)
                    async for msg in client.messages:
                        payload = bytes(msg.payload)
                        topic = msg.topic.value
                        gw = topic.split("/")[2] if topic.count("/") >= 3 else ""
                        self._position += 1
                        yield SourceMessage(partition_of(gw, self.partitions), self._position,
                                            topic, payload)
            except aiomqtt.MqttError as exc:
                self._client = None
                self.connected.clear()
                self.reconnects += 1
                self.link_error = describe(exc)
                log.warning("ingest lost %s: %s; reconnecting in %.1fs", self.address.url, exc,
                            backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)

    def _watch_pubacks(self, client: Any) -> None:
        """aiomqtt drops the PUBACK's reason code: read it from paho underneath, so an ack the
        broker refuses (an ACL without ``fieldline/v1/<gw>/ack``: 0x87) is not taken as sent."""
        paho = client._client
        original = paho.on_publish

        def on_publish(c: Any, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
            fut = self._puback.pop(mid, None)
            if fut is None:
                self._early[mid] = rc
            elif not fut.done():
                fut.get_loop().call_soon_threadsafe(fut.set_result, rc)
            original(c, userdata, mid, rc, props)

        paho.on_publish = on_publish
        self._paho = paho

    async def ack(self, gateway: str, acked: list[int], rejected: list[int],
                  incarnation: int = 0, proofs: dict[int, str] | None = None,
                  conflicts: list[int] | None = None, clock_ms: int | None = None,
                  timeout_s: float = 10.0) -> bool:
        """Publish the ack and wait for its PUBACK; False (counted, logged) when it could not
        be sent or the broker refused it: the gateway will re-send, and be acked again."""
        import aiomqtt

        client = self._client
        if client is None:
            return False
        try:
            payload = encode_ack(acked, rejected, incarnation, proofs, conflicts, clock_ms)
            info = self._paho.publish(ack_topic(gateway), payload, qos=1)
            if info.rc != 0:
                raise aiomqtt.MqttError(f"publish failed ({info.rc})")
            rc = self._early.pop(info.mid, None)
            if rc is None:
                fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._puback[info.mid] = fut
                rc = self._early.pop(info.mid, None)
                if rc is None:
                    rc = await asyncio.wait_for(fut, timeout_s)
                self._puback.pop(info.mid, None)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not acknowledge %d batch(es) of %s: %s", len(acked), gateway, exc)
            return False
        value = int(getattr(rc, "value", rc))
        if value == 0x10:  # no matching subscribers: the gateway is not listening just now
            self.acks_unheard += 1
        elif value >= 0x80:
            reason = str(rc).lower().replace(" ", "_")
            self.acks_refused[reason] = self.acks_refused.get(reason, 0) + 1
            n = self.acks_refused[reason]
            if n <= 3 or n % 100 == 0:
                log.error("the broker refused our ack to %s (%s, %d so far): may this worker "
                          "publish on %s? (deploy/mosquitto/cloud.acl)", gateway, rc, n,
                          ack_topic(gateway))
            return False
        self.acks_sent += 1
        return True
