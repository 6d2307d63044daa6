"""Uplink: ship result batches and health to the cloud broker over MQTT 5, QoS 1.

Each result batch gets the next per-gateway sequence number; numbers are reserved on disk a block
at a time (fsynced) so a restarted agent never reuses one and the cloud's (gateway, seq) dedup
never mistakes a new batch for a replay. PUBACK reason codes are checked: a broker that refuses
a publish (not authorised, quota) or has nobody subscribed is counted, not taken for delivery.

A retained status message says whether the gateway is online; the broker publishes the Last Will
(offline) when the agent vanishes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from devices.clock import Clock
from devices.contract import health_topic, late_topic, results_topic, status_topic
from devices.mqtt import NO_MATCHING_SUBSCRIBERS, BrokerAddress, make_client

log = logging.getLogger("fieldline.edge.uplink")

SEQ_BLOCK = 1024


class SequenceAllocator:
    """Per-gateway batch sequence numbers that survive restarts (reserved in fsynced blocks)."""

    def __init__(self, state_dir: Path | None, clock: Clock) -> None:
        self._path = state_dir / "uplink.seq" if state_dir else None
        if self._path is None:
            # No disk: start from the wall clock so restarts still move forward (best effort).
            self._next = clock.now_ms() * 1000
            self._ceiling = 1 << 62
            log.warning("no state_dir: batch sequence numbers start from the wall clock")
        else:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._next = int(self._path.read_text().strip() or 0)
            except FileNotFoundError:
                self._next = 0
            except ValueError:
                raise RuntimeError(f"corrupt sequence file {self._path}") from None
            self._ceiling = self._next
            self._reserve()

    def _reserve(self) -> None:
        assert self._path is not None
        self._ceiling = self._next + SEQ_BLOCK
        tmp = self._path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            fh.write(str(self._ceiling))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self._path)

    def next(self) -> int:
        if self._next >= self._ceiling:
            self._reserve()
        n = self._next
        self._next += 1
        return n


class MqttUplink:
    """Publishes to the cloud broker; counts what the broker confirmed and what it refused."""

    def __init__(
        self,
        address: BrokerAddress,
        gateway: str,
        *,
        clock: Clock,
        client_id: str,
        state_dir: Path | None,
        max_queued: int = 10_000,
        session_expiry_s: int = 3600,
    ) -> None:
        self.address = address
        self.gateway = gateway
        self._clock = clock
        self.seq = SequenceAllocator(state_dir, clock)
        self._client, self._props = make_client(address, client_id,
                                                session_expiry_s=session_expiry_s)
        self._client.max_queued_messages_set(max_queued)
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.will_set(status_topic(gateway), self._status("offline"), qos=1, retain=True)
        self._inflight: set[int] = set()
        self._lock = threading.Lock()  # guards the counters below (never held in paho callbacks
        self.connected = threading.Event()  # for long; only set/dict operations)
        self.sent = 0
        self.acked = 0
        self.refused = 0
        self.no_subscribers = 0
        self.queue_full = 0
        self.bytes_sent = 0

    def _status(self, state: str) -> bytes:
        return orjson.dumps({"gw": self.gateway, "state": state, "ts": self._clock.now_ms()})

    # paho thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                    _p: Any = None) -> None:
        if rc.is_failure:
            log.error("uplink connect to %s refused: %s", self.address.url, rc)
            return
        self.connected.set()
        client.publish(status_topic(self.gateway), self._status("online"), qos=1, retain=True)
        log.info("uplink connected to %s", self.address.url)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any = None) -> None:
        self.connected.clear()
        if rc.value != 0:
            log.warning("uplink disconnected from %s: %s (reconnecting)", self.address.url, rc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any = None) -> None:
        with self._lock:
            tracked = mid in self._inflight
            self._inflight.discard(mid)
            if not tracked:
                return
            if rc.is_failure:
                self.refused += 1
            elif rc.value == NO_MATCHING_SUBSCRIBERS:
                self.no_subscribers += 1
            else:
                self.acked += 1
        if rc.is_failure or rc.value == NO_MATCHING_SUBSCRIBERS:
            log.warning("broker did not deliver publish mid=%d: %s", mid, rc)

    # agent side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._client.connect_async(self.address.host, self.address.port, keepalive=30,
                                   clean_start=False, properties=self._props)
        self._client.loop_start()

    def _publish(self, topic: str, payload: bytes, *, track: bool) -> bool:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            with self._lock:
                self.queue_full += 1
            log.error("uplink queue full: batch shed (counted as uplink_queue_full)")
            return False
        if track:
            with self._lock:
                self._inflight.add(info.mid)
                self.sent += 1
                self.bytes_sent += len(payload)
        return True

    def publish_results(self, payload: bytes) -> bool:
        return self._publish(results_topic(self.gateway), payload, track=True)

    def publish_health(self, payload: bytes) -> bool:
        return self._publish(health_topic(self.gateway), payload, track=False)

    def publish_late(self, payload: bytes) -> bool:
        return self._publish(late_topic(self.gateway), payload, track=False)

    @property
    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until every tracked publish was answered, or the timeout passes."""
        deadline = self._clock.monotonic_ms() + int(timeout_s * 1000)
        ev = threading.Event()
        while self.inflight and self._clock.monotonic_ms() < deadline:
            ev.wait(0.02)
        return self.inflight == 0

    def stop(self) -> None:
        if self.connected.is_set():
            info = self._client.publish(status_topic(self.gateway), self._status("offline"),
                                        qos=1, retain=True)
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()
