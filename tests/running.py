"""Bounded waits for agents and workers run in-process: connected, and every window written."""

from __future__ import annotations

import asyncio
import time

from cloud.worker import CloudWorker
from edge.agent import EdgeAgent


async def connected(agents: list[EdgeAgent], worker: CloudWorker, seconds: float = 15) -> None:
    """Until every agent is subscribed and connected upstream and the worker is connected."""
    deadline = time.monotonic() + seconds
    while not (all(a.intake.subscribed.is_set() and a.uplink.connected.is_set() for a in agents)
               and worker.source.connected.is_set()):
        assert time.monotonic() < deadline, "services did not connect"
        await asyncio.sleep(0.05)


async def settled(agents: list[EdgeAgent], worker: CloudWorker, seconds: float,
                  written_before: int = 0, restored: list[int] | None = None) -> None:
    """Until every window the agents emitted since they started (their counters then:
    ``restored``, from a checkpoint) is written, the agents idle and their outboxes empty."""
    base = restored if restored is not None else [0] * len(agents)
    deadline = time.monotonic() + seconds
    while True:
        emitted = written_before + sum(a.pipeline.counters["windows_emitted"] - r
                                       for a, r in zip(agents, base, strict=True))
        if (all(a.intake.pending == 0 and a.pipeline.engine.active_devices == 0
                and a.outbox.depth == 0 for a in agents)
                and worker.stats()["results_written"] == emitted and emitted > 0):
            return
        assert time.monotonic() < deadline, (
            f"did not settle: {emitted} emitted; {[a.stats() for a in agents]} {worker.stats()}")
        await asyncio.sleep(0.2)
