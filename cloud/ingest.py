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
from devices.mqtt import BrokerAddress

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


class PartitionedSource(Protocol):
    partitions: int

    def messages(self) -> AsyncIterator[SourceMessage]: ...

    async def ack(self, gateway: str, acked: list[int], rejected: list[int],
                  incarnation: int = 0) -> bool:
        """Tell a gateway (its ``incarnation``) which batches are safely stored (and which are
        unusable); False when it could not be sent now (the gateway will re-send, and be
        acked again)."""
        ...


class MqttSource:
    """Subscribes to every gateway's uplink topics on one MQTT broker (owns all partitions).

    The session is persistent (MQTT 5 session expiry) so a restarted worker receives what was
    published while it was away; connection losses are retried with capped backoff.
    """

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
        self._client: Any = None
        self.acks_sent = 0

    async def messages(self) -> AsyncIterator[SourceMessage]:
        import aiomqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.session_expiry_s
        tls = None
        if self.address.tls:
            tls = aiomqtt.TLSParameters(ca_certs=self.address.ca_file,
                                        certfile=self.address.cert_file,
                                        keyfile=self.address.key_file)
        backoff = 0.5
        while True:
            try:
                async with aiomqtt.Client(
                    self.address.host, self.address.port, identifier=self.client_id,
                    username=self.address.username, password=self.address.password,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=props,
                    tls_params=tls, max_queued_incoming_messages=0,
                ) as client:
                    self._client = client
                    await client.subscribe(f"{TOPIC_ROOT}/+/results", qos=1)
                    await client.subscribe(f"{TOPIC_ROOT}/+/health", qos=1)
                    self.connected.set()
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
                log.warning("ingest lost %s: %s; reconnecting in %.1fs", self.address.url, exc,
                            backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 30.0)

    async def ack(self, gateway: str, acked: list[int], rejected: list[int],
                  incarnation: int = 0) -> bool:
        import aiomqtt

        client = self._client
        if client is None:
            return False
        try:
            await client.publish(ack_topic(gateway), encode_ack(acked, rejected, incarnation),
                                 qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("could not acknowledge %d batch(es) of %s: %s", len(acked), gateway, exc)
            return False
        self.acks_sent += 1
        return True
