"""How long a round of acks takes the worker with many gateways: each ack to the cloud broker
waits for its PUBACK (an ack the broker refuses is not taken as sent), so a round acknowledging
one batch of each of ``GATEWAYS`` gateways one after the other costs a round trip per gateway.
The reference, measured in the same run: the acks of a round one after the other (the worker's
acker before); the figure: all in flight at once, at most ``ACK_CONCURRENCY``. The cloud broker
(a real Mosquitto) is reached through a proxy adding ``LATENCY_MS`` each way: a broker in
another zone of the same region. Five interleaved rounds of each; the medians."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import Figure, await_until, figure, report
from cloud.ingest import MqttSource
from cloud.worker import ACK_CONCURRENCY, bounded
from devices.mqtt import BrokerAddress
from fieldline.faults import FaultProxy
from fieldline.services import Mosquitto

GATEWAYS = 200
LATENCY_MS = 2
ROUNDS = 5


async def _rounds(port: int) -> tuple[list[float], list[float]]:
    source = MqttSource(BrokerAddress(host="127.0.0.1", port=port), client_id="bench-acks")

    async def pump() -> None:
        async for _ in source.messages():
            pass

    task = asyncio.create_task(pump())
    try:
        await await_until(source.connected.is_set, 30, "the cloud broker's connection")
        gws = [f"gw-{i:04d}" for i in range(GATEWAYS)]

        def acks() -> list[Callable[[], Awaitable[bool]]]:
            return [lambda gw=gw: source.ack(gw, [1], [], 7, {1: "0" * 32}, clock_ms=-40)
                    for gw in gws]

        async def one_by_one() -> list[bool]:
            return [await a() for a in acks()]

        async def at_once() -> list[bool]:
            return await bounded([a() for a in acks()], ACK_CONCURRENCY)

        seq: list[float] = []
        con: list[float] = []
        for _ in range(ROUNDS):
            for runs, how in ((seq, one_by_one), (con, at_once)):
                t0 = time.perf_counter()
                sent = await how()
                runs.append(time.perf_counter() - t0)
                assert all(sent), "an ack was not sent"
        return seq, con
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def main() -> list[Figure]:
    logging.getLogger("fieldline").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-acks-") as tmp:
        broker = Mosquitto(Path(tmp) / "mosquitto").start()
        proxy = FaultProxy("127.0.0.1", broker.port).start()
        proxy.set_mode("latency", latency_ms=LATENCY_MS)
        try:
            seq, con = asyncio.run(_rounds(proxy.port))
        finally:
            proxy.stop()
            broker.stop()
    ms = [1000 * statistics.median(x) for x in (seq, con)]
    figures = [figure(f"a round of acks to {GATEWAYS} gateways, at most {ACK_CONCURRENCY} in "
                      "flight", ms[1], "ms", ms[0], "the same acks one after the other",
                      note=f"broker {LATENCY_MS} ms away each way; medians of {ROUNDS} rounds")]
    report("acks", figures)
    return figures


if __name__ == "__main__":
    main()
