"""R9: fuzzed device payloads never crash or stall the pipeline, every message is accounted
for (accepted + rejected by reason == sent), and memory stays bounded."""

from __future__ import annotations

import random
import time
from pathlib import Path

import orjson
import pytest

from devices.clock import SystemClock
from devices.mqtt import BrokerAddress
from edge.agent import EdgePipeline, rss_mb
from edge.config import EdgeConfig

NOWHERE = BrokerAddress(host="127.0.0.1", port=1)


def mutations(rng: random.Random, now: int):  # type: ignore[no-untyped-def]
    """Single-reading messages, valid and broken in every way a device can break them."""
    devices = [f"d{i}" for i in range(50)] + ["", "a/b", "x" * 500, "ünïcode", "#", "+"]
    metrics = ["temperature", "humidity", "pressure", "", "radiation", 7, None]
    values: list[object] = [21.5, -1e308, 1e308, 0, True, "21", None, [], {}, 1e400, -40.0, 125.1]
    times: list[object] = [now, now - 1000, 0, -5, 2**63, 1.5, "now", None, now + 10**9,
                           float(now)]
    while True:
        kind = rng.random()
        if kind < 0.15:
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64)))
            continue
        if kind < 0.17:  # nesting, NaN inside nesting, huge integers, invalid UTF-8
            depth = rng.choice([10, 100, 2_000])
            yield rng.choice([
                b"[" * depth + rng.choice([b"NaN", b"1", b"Infinity"]) + b"]" * depth,
                b'{"device": "d1", "metric": "temperature", "ts": %d, "value": NaN, "n": %s}'
                % (now, b"[" * depth + b"]" * depth),
                b'{"device": "d1", "metric": "temperature", "ts": %d, "value": %s}'
                % (now, b"9" * rng.randint(20, 400)),
                b'{"device": "d\xff", "metric": "temperature", "ts": %d, "value": 1}' % now,
            ])
            continue
        doc: dict[str, object] = {}
        for key, pool in (("device", devices), ("metric", metrics), ("value", values),
                          ("ts", times), ("seq", [1, -7, "x", 2**70, None])):
            if rng.random() < 0.9:
                doc[key] = rng.choice(pool)
        if rng.random() < 0.05:
            doc["readings"] = rng.choice([5, "x", None])
        try:
            raw = orjson.dumps(doc)
        except (orjson.JSONEncodeError, TypeError):
            raw = repr(doc).encode()
        if rng.random() < 0.1:  # truncated or bit-flipped on the way
            raw = raw[: rng.randint(0, len(raw))]
        if rng.random() < 0.05:
            raw = b"[" + raw + b"]"  # a one-record SenML-looking array
        if rng.random() < 0.08:  # a one-record SenML pack, mutated
            rec: dict[str, object] = {"bn": rng.choice(devices) + ":", "n": rng.choice(metrics),
                                      "v": rng.choice(values), "t": rng.choice(times),
                                      "bt": rng.choice([0, now / 1000, 2**70, -1.5, "x"])}
            try:
                raw = orjson.dumps([rec])
            except (orjson.JSONEncodeError, TypeError):
                raw = b"[]"
        yield raw


def run_fuzz(n: int, seed: int) -> tuple[dict[str, float], float, float]:
    pipe = EdgePipeline(EdgeConfig(gateway="gw", intake_broker=NOWHERE, uplink_broker=NOWHERE),
                        SystemClock())
    rng = random.Random(seed)
    now = time.time_ns() // 1_000_000
    gen = mutations(rng, now)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    batch = 5_000
    for lo in range(0, n, batch):
        msgs = [(f"devices/d{rng.randint(0, 60)}/readings", next(gen), now)
                for _ in range(min(batch, n - lo))]
        pipe.process(msgs)
        pipe.emit()
    return pipe.stats(), rss_mb() - rss0, time.perf_counter() - t0


def check(stats: dict[str, float], n: int) -> None:
    accounted = (stats["readings_accepted"] + stats["rejected"] + stats["late_dropped"]
                 + stats["duplicates"])
    assert stats["messages_in"] == n
    assert accounted == n
    assert stats["internal_errors"] == 0
    assert stats["readings_accepted"] > 0
    assert stats["rejected"] > 0


def test_r9_fuzzed_payloads_short() -> None:
    n = 30_000
    stats, _grew, _s = run_fuzz(n, seed=1)
    check(stats, n)


@pytest.mark.soak
def test_r9_a_million_fuzzed_payloads() -> None:
    n = 1_000_000
    stats, grew_mb, seconds = run_fuzz(n, seed=2)
    check(stats, n)
    assert grew_mb < 100, grew_mb  # bounded: interned names are capped, state is per window
    assert seconds < 1800


def hostile_payloads(now: int) -> list[bytes]:
    """Payloads that broke decoders elsewhere: deep nesting (alone and with NaN, which sends
    strict-JSON failures to the lenient parser), huge integers, invalid UTF-8."""
    deep = 100_000
    return [
        b"[" * deep + b"NaN" + b"]" * deep,  # RecursionError in a recursive parser
        b'{"device": "d1", "readings": ' + b"[" * deep + b"]" * deep + b"}",
        b'{"device": "d1", "metric": "temperature", "ts": %d, "value": NaN, "x": %s}'
        % (now, b"[" * 50_000 + b"]" * 50_000),
        b'{"device": "d1", "metric": "temperature", "ts": %d, "value": Infinity}' % now,
        b'{"device": "d1", "metric": "temperature", "ts": %d, "value": %s}' % (now, b"9" * 5000),
        b'{"device": "d1", "metric": "temperature", "ts": %s, "value": 1}' % (b"1" * 400),
        b'{"device": "d\xff\xfe", "metric": "temperature", "ts": %d, "value": 1}' % now,
        b'{"device": "d1", "metric": "temp\xc3", "ts": %d, "value": 1}' % now,
        b"\xef\xbb\xbf" + b'{"device": "d1"}',
    ]


def test_r9_hostile_payloads_are_rejected_and_spare_their_batch() -> None:
    """No payload raises out of decoding: each hostile one is a counted reject, and the good
    readings of the same micro-batch are folded."""
    pipe = EdgePipeline(EdgeConfig(gateway="gw", intake_broker=NOWHERE, uplink_broker=NOWHERE),
                        SystemClock())
    now = time.time_ns() // 1_000_000
    bad = hostile_payloads(now)
    good = [orjson.dumps({"device": f"g{i}", "metric": "temperature", "ts": now, "value": 20.0})
            for i in range(10)]
    msgs = [("devices/d1/readings", p, now) for p in bad[:3]]
    msgs += [(f"devices/g{i}/readings", p, now) for i, p in enumerate(good)]  # each its own
    msgs += [("devices/d1/readings", p, now) for p in bad[3:]]
    pipe.process(msgs)
    stats = pipe.stats()
    assert stats["internal_errors"] == 0
    assert stats["readings_accepted"] == 10
    assert stats["rejected"] == len(bad)
    assert stats["messages_in"] == len(msgs)


def test_a_logged_record_that_breaks_the_pipeline_does_not_stop_every_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaying the intake log on start isolates a record the pipeline cannot take (counted,
    logged) and goes on with the rest: before, one poisoned record killed the agent at every
    start. The poison here is a hostile payload, and a pipeline bug triggered by a marker."""
    from edge.agent import EdgeAgent
    from edge.wal import IntakeLog

    now = time.time_ns() // 1_000_000

    def reading(dev: str, payload: bytes | None = None) -> tuple[str, bytes, int]:
        return (f"devices/{dev}/readings", payload or orjson.dumps(
            {"device": dev, "metric": "temperature", "ts": now, "value": 20.0}), now)

    wal = IntakeLog(tmp_path / "intake")
    wal.append([reading("a"), reading("a", hostile_payloads(now)[0]), reading("b")])
    wal.append([reading("c"), reading("boom")])
    wal.append([reading("d")])
    wal.sync()
    wal.close()
    real = EdgePipeline.process

    def process(self: EdgePipeline, msgs: list[tuple[str, bytes, int]]) -> None:
        if any(t == "devices/boom/readings" for t, _, _ in msgs):
            raise RuntimeError("a bug that only this record triggers")
        real(self, msgs)

    monkeypatch.setattr(EdgePipeline, "process", process)
    agent = EdgeAgent(EdgeConfig(gateway="gw", intake_broker=NOWHERE, uplink_broker=NOWHERE,
                                 state_dir=tmp_path))
    s = agent.pipeline.stats()
    assert s["readings_accepted"] == 3  # a, b (beside the hostile payload) and d
    assert s["rejected_malformed_json"] == 1
    assert s["rejected_internal_error"] == 2  # the tick with the bug, counted, not lost
    assert s["internal_errors"] == 1
