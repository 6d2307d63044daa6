"""Batched device payloads through the agent's core (decode -> validate -> windows) against
``orjson.loads`` of the same payloads, measured in the same run.

Two shapes a device (or a bridge in front of a few) sends in batches: a JSON object with a
``readings`` array, and a SenML pack (RFC 8428), each of 100 readings. 1,000 devices with four
metrics at 10 Hz; every message goes through ``EdgePipeline.process`` as the agent's tick hands it
over (micro-batches of 500 messages), with deduplication, sequence gaps, the ledger, two window
specs and percentiles on: the agent's shipped defaults. The reference parses the same payloads
and does nothing else, so the ratio says what the agent's work costs on top of reading JSON.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable

import orjson

from bench.common import Figure, figure, report
from devices.clock import ManualClock
from devices.codecs import encode_batch, encode_senml
from devices.mqtt import BrokerAddress
from edge.agent import EdgePipeline
from edge.config import EdgeConfig

NOWHERE = BrokerAddress(host="127.0.0.1", port=1)
DEVICES = 1_000
PER_MESSAGE = 100
METRICS = ("temperature", "humidity", "vibration", "co2")
TICK_MESSAGES = 500
START = 1_700_000_000_000


def payloads(rounds: int, shape: str) -> list[list[tuple[str, bytes, int]]]:
    """``rounds`` messages from every device, each of ``PER_MESSAGE`` readings (four metrics at
    10 Hz: 2.5 s of them), as the agent's micro-batches, each message with the receive time a
    gateway would stamp."""
    encode = encode_batch if shape == "readings" else encode_senml
    span = PER_MESSAGE // len(METRICS) * 100  # ms of readings in one message
    msgs: list[tuple[str, bytes, int]] = []
    for r in range(rounds):
        t0 = START + r * span
        for d in range(DEVICES):
            device = f"dev-{d:05d}"
            rs: list[tuple[str, int, float, int | None]] = [
                (METRICS[i % len(METRICS)], t0 + (i // len(METRICS)) * 100,
                 20.0 + math.sin(d + i) * 5, r * PER_MESSAGE + i) for i in range(PER_MESSAGE)]
            msgs.append((f"devices/{device}/readings", encode(device, rs), t0 + span))
    return [msgs[i:i + TICK_MESSAGES] for i in range(0, len(msgs), TICK_MESSAGES)]


def _pipeline() -> tuple[EdgePipeline, ManualClock]:
    clock = ManualClock(now_ms=START)
    return EdgePipeline(EdgeConfig(gateway="gw", intake_broker=NOWHERE, uplink_broker=NOWHERE),
                        clock), clock


def run_agent(ticks: list[list[tuple[str, bytes, int]]]) -> float:
    pipe, clock = _pipeline()
    gc.collect()
    t0 = time.perf_counter()
    for batch in ticks:
        clock.set_wall(batch[-1][2])
        pipe.process(batch)
        pipe.emit()
    elapsed = time.perf_counter() - t0
    accepted = pipe.counters["readings_accepted"]
    expected = sum(len(b) for b in ticks) * PER_MESSAGE
    if accepted != expected:  # a fast path that drops readings is no fast path
        raise AssertionError(f"the pipeline accepted {accepted:,} of {expected:,} readings "
                             f"(rejects {dict(pipe.rejects.counts)})")
    return elapsed


def run_orjson(ticks: list[list[tuple[str, bytes, int]]]) -> float:
    loads = orjson.loads
    t0 = time.perf_counter()
    for batch in ticks:
        for _t, p, _r in batch:
            loads(p)
    return time.perf_counter() - t0


def best(run: Callable[[], float], rounds: int) -> float:
    return min(run() for _ in range(rounds))


def main(rounds: int = 20, repeat: int = 3) -> list[Figure]:
    figs = []
    for shape, label in (("readings", "JSON readings arrays"), ("senml", "SenML packs")):
        ticks = payloads(rounds, shape)
        n = sum(len(b) for b in ticks) * PER_MESSAGE
        agent_s = ref_s = math.inf
        for _ in range(repeat):  # interleaved, so a noisy stretch hits both alike
            agent_s = min(agent_s, run_agent(ticks))
            ref_s = min(ref_s, run_orjson(ticks))
        figs.append(figure(
            f"batched intake, {label} of {PER_MESSAGE}: decode -> validate -> windows",
            n / agent_s, "readings/s", n / ref_s, "orjson.loads of the same payloads",
            note=f"{n:,} readings from {DEVICES:,} devices, one core, target >= 1,000,000/s"))
    report("intake", figs)
    return figs


if __name__ == "__main__":
    main()
