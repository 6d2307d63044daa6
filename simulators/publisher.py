"""Publishing a simulated fleet to real MQTT brokers, live or as fast as possible."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from devices.mqtt import BrokerAddress, make_client
from simulators.fleet import Tick

log = logging.getLogger("fieldline.simulators")

OUTSTANDING_LIMIT = 20_000


class Source(Protocol):
    """What the publisher needs of a fleet: ``FleetSimulator`` or ``ReplaySimulator``."""

    start_ms: int
    ticks_done: int

    @property
    def truth(self) -> list[dict[str, object]]: ...

    @property
    def spec(self) -> Any: ...

    @property
    def gateways(self) -> list[str]: ...

    def tick(self) -> Tick: ...

    def ticks(self, count: int | None = None) -> Any: ...

    def drain_held(self) -> Tick: ...

    def new_truth(self) -> list[dict[str, object]]: ...


class FleetPublisher:
    """One MQTT connection per distinct broker; gateways sharing a broker share the connection.

    With ``truth_path``, ground truth is appended to that JSONL file as it happens (each record
    is written before the messages of its interval are published)."""

    def __init__(self, sim: Source, brokers: dict[str, BrokerAddress], *, qos: int = 1,
                 client_prefix: str = "fieldline-sim", truth_path: Path | None = None) -> None:
        missing = set(sim.gateways) - set(brokers)
        if missing:
            raise ValueError(f"no broker given for gateway(s) {sorted(missing)}")
        self.sim = sim
        self.qos = qos
        self._truth = truth_path.open("a") if truth_path is not None else None
        self._clients: dict[str, mqtt.Client] = {}
        self._by_gateway: dict[str, mqtt.Client] = {}
        for gw, addr in brokers.items():
            if gw not in sim.gateways:
                continue  # another shard's gateway
            key = f"{addr.host}:{addr.port}"
            if key not in self._clients:
                client, _ = make_client(addr, f"{client_prefix}-{len(self._clients)}")
                client.max_inflight_messages_set(1000)
                client.max_queued_messages_set(0)
                self._clients[key] = client
                client.connect(addr.host, addr.port, keepalive=30)
                client.loop_start()
            self._by_gateway[gw] = self._clients[key]
        self.published = 0
        self.behind_ms = 0.0
        self.max_behind_ms = 0.0
        self.started = time.monotonic()
        self._last: list[mqtt.MQTTMessageInfo] = []
        self._outstanding = 0

    def publish_tick(self, tick: Tick) -> int:
        if self._truth is not None:
            for rec in self.sim.new_truth():
                self._truth.write(json.dumps(rec) + "\n")
            self._truth.flush()
        n = 0
        for gw, msgs in tick.messages.items():
            client = self._by_gateway[gw]
            info = None
            for topic, payload in msgs:
                info = client.publish(topic, payload, qos=self.qos)
                n += 1
                self._outstanding += 1
                if self._outstanding >= OUTSTANDING_LIMIT:
                    # paho has 65,535 message ids: wait for the broker before reusing them
                    info.wait_for_publish(60)
                    self._outstanding = 0
            if info is not None:
                self._last.append(info)
        self.published += n
        if len(self._last) > 64:
            self._last = self._last[-64:]
        return n

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every publish so far left the client (QoS 1: was acknowledged)."""
        deadline = time.monotonic() + timeout_s
        for info in self._last:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                info.wait_for_publish(timeout=remaining)
            except (ValueError, RuntimeError):
                return False
        return all(i.is_published() for i in self._last)

    def run_fast(self, ticks: int) -> int:
        """Publish ``ticks`` intervals back to back, then everything held back; return count."""
        for t in self.sim.ticks(ticks):
            self.publish_tick(t)
        self.publish_tick(self.sim.drain_held())
        self.flush()
        return self.published

    def run_realtime(self, stop: threading.Event, duration_s: float | None = None,
                     clock_ms: Any = None) -> None:
        """Publish each interval when it ends in wall time, until ``stop`` or ``duration_s``."""
        now_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        interval = self.sim.spec.interval_ms
        t_end = None if duration_s is None else now_ms() + int(duration_s * 1000)
        while not stop.is_set():
            due = self.sim.start_ms + (self.sim.ticks_done + 1) * interval
            wait = due - now_ms()
            if wait > 0 and stop.wait(wait / 1000):
                break
            self.behind_ms = max(0.0, float(now_ms() - due))
            self.max_behind_ms = max(self.max_behind_ms, self.behind_ms)
            if t_end is not None and due > t_end:
                break
            self.publish_tick(self.sim.tick())
        self.flush(5.0)

    def write_truth(self, path: Path) -> None:
        with path.open("w") as fh:
            for rec in self.sim.truth:
                fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self._truth is not None:
            for rec in self.sim.new_truth():
                self._truth.write(json.dumps(rec) + "\n")
            self._truth.close()
            self._truth = None
        for c in self._clients.values():
            c.disconnect()
            c.loop_stop()
