"""Intake: subscribe to the gateway broker and buffer raw messages for the fold loop.

paho's network thread only appends ``(topic, payload, receive time)`` to a bounded deque; it never
decodes, never takes an application lock and never blocks (paho callbacks run under paho's locks).
The agent drains the deque once per tick and decodes the whole micro-batch at once. When the
buffer is full, messages are shed and counted (``intake_overflow``), never silently lost.

The broker's own count of messages it dropped (``$SYS/broker/publish/messages/dropped``: its
queue limits tripped, so devices got a PUBACK for readings nobody will ever receive) and of
messages it holds are read too, for health: loss upstream of the agent is visible there, and per
device as sequence gaps (``edge.gaps``).

With ``manual_ack`` the broker gets a message's PUBACK only when the agent says so (after the
message is in the fsynced intake log); until then the broker keeps it and re-delivers it to the
persistent session if the agent dies.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from devices.clock import Clock
from devices.mqtt import BrokerAddress, make_client

log = logging.getLogger("fieldline.edge.intake")

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
SYS_STORED = "$SYS/broker/store/messages/count"


class MqttIntake:
    """Receives device messages from the gateway's MQTT broker."""

    def __init__(
        self,
        address: BrokerAddress,
        topics: list[str],
        *,
        clock: Clock,
        client_id: str,
        qos: int = 1,
        max_pending: int = 10_000,
        session_expiry_s: int = 3600,
        manual_ack: bool = False,
    ) -> None:
        self.address = address
        self.topics = topics
        self.qos = qos
        self.max_pending = max_pending
        self._clock = clock
        self.manual_ack = manual_ack
        self._pending: deque[tuple[str, bytes, int, int, int]] = deque()  # + mid, qos
        self.received = 0
        self.overflowed = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set once the broker acknowledged the subscription
        # the broker's counters, as it last published them (-1: not heard, e.g. no ACL for it)
        self.broker_dropped = -1
        self.broker_stored = -1
        self._sys_mid: int | None = None
        self._client, self._props = make_client(address, client_id,
                                                session_expiry_s=session_expiry_s,
                                                manual_ack=manual_ack)
        if manual_ack:
            if self._props is None:
                self._props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # the broker never has more unacknowledged deliveries to us outstanding than this
            self._props.ReceiveMaximum = max(1, min(max_pending, 65_535))
        self._client.on_message = self._on_message
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe

    # paho thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                    _p: Any = None) -> None:
        if rc.is_failure:
            log.error("intake connect to %s refused: %s", self.address.url, rc)
            return
        opts = SubscribeOptions(qos=self.qos)
        client.subscribe([(t, opts) for t in self.topics])
        _rc, self._sys_mid = client.subscribe([(t, SubscribeOptions(qos=0))
                                               for t in (SYS_DROPPED, SYS_STORED)])
        self.connected.set()
        log.info("intake connected to %s, subscribed to %s", self.address.url, self.topics)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode],
                      _p: Any = None) -> None:
        refused = [rc for rc in rcs if rc.is_failure]
        if mid == self._sys_mid:
            if refused:
                log.warning("the gateway broker refused its $SYS counters (%s): its drops are "
                            "seen only as sequence gaps", refused)
            return
        if refused:
            log.error("intake subscription to %s refused: %s", self.topics, refused)
        else:
            self.subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any = None) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if rc.value != 0:
            log.warning("intake disconnected from %s: %s (reconnecting)", self.address.url, rc)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic.startswith("$SYS/"):
            try:
                value = int(msg.payload)
            except ValueError:
                return
            if msg.topic == SYS_DROPPED:
                self.broker_dropped = value
            elif msg.topic == SYS_STORED:
                self.broker_stored = value
            return
        self.received += 1
        if len(self._pending) >= self.max_pending and not (self.manual_ack and msg.qos):
            # (with manual acks the broker's Receive Maximum already bounds what is pending)
            self.overflowed += 1
            return
        self._pending.append((msg.topic, bytes(msg.payload), self._clock.now_ms(), msg.mid,
                              msg.qos))

    # agent side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._client.connect_async(self.address.host, self.address.port, keepalive=30,
                                   clean_start=False, properties=self._props)
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def drain(self, limit: int) -> list[tuple[str, bytes, int, int, int]]:
        """Take up to ``limit`` buffered messages, oldest first:
        (topic, payload, receive ms, mid, qos)."""
        pending = self._pending
        n = min(limit, len(pending))
        return [pending.popleft() for _ in range(n)]

    def requeue(self, messages: list[tuple[str, bytes, int, int, int]]) -> None:
        """Put drained messages back in front, in their order (not logged, not acknowledged:
        the intake log could not take them; they are tried again)."""
        self._pending.extendleft(reversed(messages))

    def ack(self, messages: list[tuple[str, bytes, int, int, int]]) -> None:
        """PUBACK these (manual-ack mode), in the order they were received."""
        if self.manual_ack:
            client = self._client
            for m in messages:
                if m[4]:
                    client.ack(m[3], m[4])

    @property
    def pending(self) -> int:
        return len(self._pending)
