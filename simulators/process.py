"""Running a fleet publisher in a child process, with live counters shared with the parent.

A simulator and the agents it feeds should not share one interpreter (and its GIL): in the demo
the fleet publishes from its own process, like real devices would.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

from devices.mqtt import BrokerAddress
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher


@dataclass
class SharedCounters:
    published: Synchronized[int]
    faults: Synchronized[int]
    behind_ms: Synchronized[int]
    finished: Synchronized[int]


def _run(spec: FleetSpec, brokers: dict[str, BrokerAddress], start_ms: int,
         duration_s: float | None, stop: MpEvent, counters: SharedCounters,
         truth_path: str | None) -> None:
    # a Ctrl-C in the terminal reaches the whole process group: the parent stops this child
    # through ``stop`` (after the last publishes), so the child itself ignores it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sim = FleetSimulator(spec, start_ms)
    pub = FleetPublisher(sim, brokers)
    local_stop = threading.Event()

    def relay() -> None:
        while not local_stop.is_set():
            counters.published.value = pub.published
            counters.faults.value = len(sim.truth)
            counters.behind_ms.value = int(pub.behind_ms)
            if stop.wait(0.2):
                local_stop.set()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    try:
        pub.run_realtime(local_stop, duration_s)
    finally:
        local_stop.set()
        t.join()
        counters.published.value = pub.published
        counters.faults.value = len(sim.truth)
        if truth_path:
            pub.write_truth(Path(truth_path))
        pub.close()
        counters.finished.value = 1


class PublisherProcess:
    """``FleetPublisher.run_realtime`` in a spawned child process."""

    def __init__(self, spec: FleetSpec, brokers: dict[str, BrokerAddress], start_ms: int, *,
                 duration_s: float | None = None, truth_path: Path | None = None) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self.counters = SharedCounters(ctx.Value("q", 0), ctx.Value("q", 0), ctx.Value("q", 0),
                                       ctx.Value("q", 0))
        self._proc = ctx.Process(
            target=_run, name="fieldline-simulator", daemon=True,
            args=(spec, brokers, start_ms, duration_s, self._stop, self.counters,
                  str(truth_path) if truth_path else None))

    def start(self) -> None:
        self._proc.start()

    @property
    def published(self) -> int:
        return int(self.counters.published.value)

    @property
    def faults(self) -> int:
        return int(self.counters.faults.value)

    @property
    def behind_ms(self) -> int:
        return int(self.counters.behind_ms.value)

    @property
    def finished(self) -> bool:
        return bool(self.counters.finished.value) or not self._proc.is_alive()

    def stop(self, timeout_s: float = 15.0) -> None:
        self._stop.set()
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
