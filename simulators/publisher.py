"""Publishing a simulated fleet to real MQTT brokers, live or as fast as possible."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from devices.mqtt import BrokerAddress
from simulators.fleet import Tick
from simulators.wire import BrokerUnreachableError, WirePublisher

log = logging.getLogger("fieldline.simulators")


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

    Each interval's messages go out in bulk (``simulators.wire``): one simulator process keeps
    10,000 devices at 1 Hz on schedule. While a broker is unreachable the devices wait and
    re-send what was not acknowledged (``behind_ms`` shows it), and give up after
    ``reconnect_for_s``. With ``truth_path``, ground truth is appended to that JSONL file as it
    happens (each record is written before the messages of its interval are published)."""

    def __init__(self, sim: Source, brokers: dict[str, BrokerAddress], *, qos: int = 1,
                 client_prefix: str = "fieldline-sim", truth_path: Path | None = None,
                 reconnect_for_s: float = 300.0) -> None:
        missing = set(sim.gateways) - set(brokers)
        if missing:
            raise ValueError(f"no broker given for gateway(s) {sorted(missing)}")
        self.sim = sim
        self.qos = qos
        stop = threading.Event()
        self._truth = truth_path.open("a") if truth_path is not None else None
        self._clients: dict[str, WirePublisher] = {}
        self._by_gateway: dict[str, WirePublisher] = {}
        for gw, addr in brokers.items():
            if gw not in sim.gateways:
                continue  # another shard's gateway
            key = f"{addr.host}:{addr.port}"
            if key not in self._clients:
                self._clients[key] = WirePublisher(
                    addr, f"{client_prefix}-{os.getpid()}-{len(self._clients)}",
                    reconnect_for_s=reconnect_for_s, stop=stop)
            self._by_gateway[gw] = self._clients[key]
        self.published = 0
        self.behind_ms = 0.0
        self.max_behind_ms = 0.0
        self.started = time.monotonic()
        self.error: str | None = None

    def publish_tick(self, tick: Tick) -> int:
        if self._truth is not None:
            for rec in self.sim.new_truth():
                self._truth.write(json.dumps(rec) + "\n")
            self._truth.flush()
        n = 0
        for gw, msgs in tick.messages.items():
            n += self._by_gateway[gw].publish_many(msgs, self.qos)
        self.published += n
        return n

    @property
    def counters(self) -> dict[str, int]:
        """Summed over connections: acknowledged, refused by the broker, re-sent, reconnects."""
        out = {"acked": 0, "refused": 0, "no_subscribers": 0, "resent": 0, "reconnects": 0,
               "in_flight": 0}
        for c in self._clients.values():
            k = c.counters
            out["acked"] += k.acked
            out["refused"] += sum(k.refused.values())
            out["no_subscribers"] += k.no_subscribers
            out["resent"] += k.resent
            out["reconnects"] += k.reconnects
            out["in_flight"] += c.in_flight
        return out

    def idle(self) -> None:
        for c in self._clients.values():
            c.idle()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every publish so far was acknowledged (QoS 1)."""
        deadline = time.monotonic() + timeout_s
        return all(c.flush(max(0.0, deadline - time.monotonic()))
                   for c in self._clients.values())

    def run_fast(self, ticks: int) -> int:
        """Publish ``ticks`` intervals back to back, then everything held back; return count."""
        for t in self.sim.ticks(ticks):
            self.publish_tick(t)
        self.publish_tick(self.sim.drain_held())
        self.flush()
        return self.published

    def run_realtime(self, stop: threading.Event, duration_s: float | None = None,
                     clock_ms: Any = None) -> None:
        """Publish each interval when it ends in wall time, until ``stop`` or ``duration_s``.

        ``stop`` also ends waiting for an unreachable broker; if a broker stays unreachable
        for ``reconnect_for_s`` the run ends with ``error`` set."""
        for c in self._clients.values():
            c.stop = stop
        try:
            self._realtime(stop, duration_s, clock_ms)
        except BrokerUnreachableError as exc:
            self.error = str(exc)
            log.error("simulator stopped: %s", exc)

    def _realtime(self, stop: threading.Event, duration_s: float | None,
                  clock_ms: Any) -> None:
        now_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)
        interval = self.sim.spec.interval_ms
        t_end = None if duration_s is None else now_ms() + int(duration_s * 1000)
        while not stop.is_set():
            due = self.sim.start_ms + (self.sim.ticks_done + 1) * interval
            wait = due - now_ms()
            if wait > 0:
                # read acknowledgements (and keep the connection alive) while waiting
                self.idle()
                if stop.wait(min(wait / 1000, 5.0)):
                    break
                continue
            if t_end is not None and due > t_end:
                break
            self.publish_tick(self.sim.tick())
            # how late the last message of this interval left (the first left ``wait`` late)
            self.behind_ms = max(0.0, float(now_ms() - due))
            self.max_behind_ms = max(self.max_behind_ms, self.behind_ms)
        self.flush(5.0)

    def write_truth(self, path: Path) -> None:
        with path.open("w") as fh:
            for rec in self.sim.truth:
                fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        """Stop waiting for brokers (this sets the ``stop`` given to ``run_realtime``)."""
        for c in self._clients.values():
            c.stop.set()
        if self._truth is not None:
            for rec in self.sim.new_truth():
                self._truth.write(json.dumps(rec) + "\n")
            self._truth.close()
            self._truth = None
        for c in self._clients.values():
            c.close()
