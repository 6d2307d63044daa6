"""The edge->cloud wire contract: round trip, and garbage refused with a countable reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from devices.contract import (
    BASE_FIELDS,
    HealthReport,
    ResultBatch,
    ResultColumns,
    SupersededRows,
    decode_uplink,
    gateway_from_topic,
    results_topic,
)
from devices.errors import ContractError
from devices.rejects import BAD_UPLINK, UNSUPPORTED_VERSION


def sample_batch(n: int = 3) -> ResultBatch:
    i = np.arange(n, dtype=np.int64)
    f = np.linspace(1.0, 2.0, n)
    res = ResultColumns(device=i % 2, metric=np.zeros(n, np.int64),
                        start=1_700_000_000_000 + i * 10_000,
                        width=np.full(n, 10_000, np.int64), rev=np.zeros(n, np.int64),
                        count=i + 1, sum=f * (i + 1), min=f - 1, max=f + 1, mean=f, m2=f * 0.5,
                        first_ts=1_700_000_000_000 + i * 10_000, first=f,
                        last_ts=1_700_000_000_000 + i * 10_000 + 9_000, last=f)
    return ResultBatch(gateway="gw-1", seq=42, watermark=123, sent_ms=456,
                       devices=["a", "b"], metrics=["temperature"], results=res)


def test_results_round_trip_bit_identical() -> None:
    b = sample_batch()
    back = decode_uplink(b.encode())
    assert isinstance(back, ResultBatch)
    assert (back.gateway, back.seq, back.watermark, back.sent_ms) == ("gw-1", 42, 123, 456)
    for k, v in b.results.to_cols().items():
        assert np.array_equal(back.results.to_cols()[k], v), k
    assert back.encode() == b.encode()


def test_optional_parts_round_trip() -> None:
    """Spec labels, percentile columns, sketches and superseded rows survive the wire."""
    b = sample_batch(3)
    pct = np.array([[1.0, 2.0], [3.0, np.nan], [5.0, 6.0]])  # NaN: an empty sketch
    full = ResultColumns(
        **{f: getattr(b.results, f) for f in BASE_FIELDS},
        spec=np.array([0, 1, 1], np.int64), pct=pct,
        sk_keys=np.array([5, 9, 7, 7, 8], np.int64), sk_counts=np.array([1, 2, 3, 1, 1],
                                                                        np.int64),
        sk_offsets=np.array([0, 2, 3, 5], np.int64),
        superseded=SupersededRows(np.array([1]), np.array([0]), np.array([1]),
                                  np.array([1_699_999_990_000])))
    batch = ResultBatch(gateway="gw-1", seq=1, watermark=0, sent_ms=0, devices=["a", "b"],
                        metrics=["temperature"], results=full, specs=["10s", "session:30s"],
                        percentiles=[0.5, 0.99], alpha=0.01)
    back = decode_uplink(batch.encode())
    assert isinstance(back, ResultBatch)
    assert back.spec_labels() == ["10s", "session:30s", "session:30s"]
    assert back.percentiles == [0.5, 0.99]
    r = back.results
    assert r.pct is not None
    assert np.array_equal(r.pct, pct, equal_nan=True)
    assert r.sk_offsets is not None
    assert r.sk_keys is not None
    assert r.sk_offsets.tolist() == [0, 2, 3, 5]
    assert r.sk_keys.tolist() == [5, 9, 7, 7, 8]
    assert r.superseded is not None
    assert r.superseded.start.tolist() == [1_699_999_990_000]
    one = r.take(np.array([2], np.int64))
    assert one.sk_keys is not None
    assert one.sk_keys.tolist() == [7, 8]
    assert back.encode() == batch.encode()


def test_health_round_trip() -> None:
    h = HealthReport(gateway="gw-2", ts=5, counters={"a": 1}, gauges={"b": 2.5})
    assert decode_uplink(h.encode()) == h


def test_topics() -> None:
    assert gateway_from_topic(results_topic("gw-7")) == "gw-7"
    assert gateway_from_topic("other/topic") is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00\x01garbage", BAD_UPLINK),
    (b"[1,2,3]", BAD_UPLINK),
    (orjson.dumps({"v": 99, "kind": "results", "gw": "g"}), UNSUPPORTED_VERSION),
    (orjson.dumps({"v": 1, "kind": "weird", "gw": "g"}), BAD_UPLINK),
    (orjson.dumps({"v": 1, "kind": "results", "gw": "g", "seq": 1, "wm": 0, "sent": 0,
                   "dev": ["a"], "met": ["m"], "cols": {"d": [0]}}), BAD_UPLINK),
    (orjson.dumps({"v": 1, "kind": "health", "gw": "g", "ts": 1, "counters": {"x": "y"}}),
     BAD_UPLINK),
])
def test_garbage_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ContractError) as info:
        decode_uplink(payload)
    assert info.value.reason == reason


def test_index_out_of_range_and_non_integers_are_refused() -> None:
    doc = orjson.loads(sample_batch().encode())
    doc["cols"]["d"][0] = 5
    with pytest.raises(ContractError, match="device index"):
        decode_uplink(orjson.dumps(doc))
    doc = orjson.loads(sample_batch().encode())
    doc["cols"]["n"][0] = 1.5
    with pytest.raises(ContractError, match="non-integer"):
        decode_uplink(orjson.dumps(doc))


def test_batches_and_acks_carry_the_agents_incarnation(tmp_path: Path) -> None:
    """A lost state directory draws a new incarnation: its batch numbers, which start again at
    0, are new batches to the cloud, and acks for the old incarnation are not taken."""
    from devices.clock import ManualClock
    from devices.contract import decode_ack, encode_ack
    from edge.uplink import SequenceAllocator

    first = SequenceAllocator(tmp_path / "a", ManualClock())
    again = SequenceAllocator(tmp_path / "a", ManualClock())  # a restart: same incarnation
    assert again.incarnation == first.incarnation > 0
    assert [first.next(), first.next()] == [0, 1]
    assert again.next() >= 1024  # numbers reserved by the first are never reused
    wiped = SequenceAllocator(tmp_path / "b", ManualClock())
    assert wiped.incarnation != first.incarnation
    legacy = tmp_path / "c"
    legacy.mkdir()
    (legacy / "uplink.seq").write_text("2048")  # written before incarnations existed
    old = SequenceAllocator(legacy, ManualClock())
    assert old.next() == 2048
    assert old.incarnation > 0
    ack = decode_ack(encode_ack([1, 2], [3], incarnation=first.incarnation))
    assert (ack.acked, ack.rejected, ack.incarnation) == ([1, 2], [3], first.incarnation)
    assert ack.conflicts == []
    assert decode_ack(encode_ack([1, 2], conflicts=[2])).conflicts == [2]
    with pytest.raises(ContractError, match="conflicts"):
        decode_ack(b'{"v": 1, "acked": [1], "conflict": ["1"]}')
    # a new incarnation on disk keeps the numbering going
    n = first.next()
    before = first.renew()
    assert before != first.incarnation
    assert first.next() == n + 1
    assert SequenceAllocator(tmp_path / "a", ManualClock()).incarnation == first.incarnation
    assert decode_ack(encode_ack([1])).incarnation == 0


def test_a_compressed_batch_is_read_like_its_json() -> None:
    """Result batches may come zlib-compressed (an agent whose cloud said it reads them): the
    same batch, the same identity for acks of a batch the cloud cannot use; a quarter of the
    bytes for a batch of realistic size."""
    from devices.contract import pack_uplink, peek_batch_id

    b = sample_batch(500)
    raw = b.encode()
    packed = pack_uplink(raw)
    assert len(packed) < len(raw) / 3
    back = decode_uplink(packed)
    assert isinstance(back, ResultBatch)
    assert back.encode() == raw
    assert peek_batch_id(packed) == peek_batch_id(raw) == ("gw-1", 0, 42)


def test_a_compressed_message_that_is_broken_or_a_bomb_is_refused_with_a_reason() -> None:
    """A zip bomb is refused before it inflates past the limit; a stream cut short, one with
    bytes after it, or garbage starting like one are refused, all counted as bad_uplink."""
    import zlib

    from devices.contract import MAX_INFLATED, pack_uplink, peek_batch_id

    packed = pack_uplink(sample_batch().encode())
    bomb = zlib.compress(b"{" + b" " * MAX_INFLATED, 9)
    assert len(bomb) < MAX_INFLATED // 500
    for payload, why in ((bomb, "inflating beyond"), (packed[:-5], "cut short"),
                         (packed + b"{}", "bytes after"), (b"x not zlib", "neither JSON")):
        with pytest.raises(ContractError, match=why) as info:
            decode_uplink(payload)
        assert info.value.reason == BAD_UPLINK
        assert peek_batch_id(payload) is None


def test_acks_say_what_the_cloud_reads() -> None:
    """Every ack names the compressed encodings its cloud reads; an older cloud's ack names
    none (the agent then stores JSON); a malformed list is refused."""
    from devices.contract import READS, decode_ack, encode_ack

    assert decode_ack(encode_ack([1])).reads == READS == ("zlib",)
    assert decode_ack(orjson.dumps({"v": 1, "acked": [1], "rejected": []})).reads == ()
    with pytest.raises(ContractError, match="reads"):
        decode_ack(orjson.dumps({"v": 1, "acked": [1], "rejected": [], "reads": "zlib"}))


def test_acks_tell_the_gateway_how_its_clock_stands_to_the_clouds() -> None:
    """An ack carries the gateway's clock minus the cloud's, once the worker has told it;
    without it (not told yet, an older worker) None; anything but an integer is refused."""
    from devices.contract import decode_ack, encode_ack

    assert decode_ack(encode_ack([1], clock_ms=-86_400_000)).clock_ms == -86_400_000
    assert decode_ack(encode_ack([1], clock_ms=0)).clock_ms == 0
    assert decode_ack(encode_ack([1])).clock_ms is None
    for bad in ("-5", 1.5, True, [1]):
        with pytest.raises(ContractError, match="clock"):
            decode_ack(orjson.dumps({"v": 1, "acked": [1], "rejected": [], "clock": bad}))
