"""The batch fast paths of the payload decoder (issue 15: batched intake at >= 1 M readings/s;
msgspec decodes a batch straight into typed records) decide nothing of their own: for any
input, batched JSON or SenML, well-formed or not, the decoder with them gives exactly what the
per-reading path gives: the same columns, the same rejections by reason and device, the same
ids handed out."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.codecs import PayloadDecoder
from devices.readings import ColumnBuilder, Interner

T = 1_700_000_000_000
BIG = 2**62

GOOD = {  # what a well-behaved device sends
    "metric": st.sampled_from(["temperature", "humidity", "co2"]),
    "ts": st.integers(T - 10**6, T + 10**6),
    "value": st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-1000, 1000)),
    "seq": st.integers(-1, 10**6),
}
BAD_VALUES: dict[str, list[Any]] = {  # what one reading of a batch may get wrong (at boundaries)
    "metric": ["", 7, None, "made_up", "a:b", "a/b", "new1", "new2", [1], {"m": 1}],
    "ts": [0, -1, 1.5, float(T), BIG, -BIG, BIG - 1, 1 - BIG, 2**63, "x", None, True, 1e300],
    "value": [BIG, -BIG, BIG - 1, 1 - BIG, 1e308, -0.0, "7", None, True, [1]],
    "seq": [-2, BIG, BIG - 1, 1.0, "1", None, False],
}
BAD = {k: st.sampled_from(v) for k, v in BAD_VALUES.items()}
SENML_KEYS = {"metric": "n", "ts": "t", "value": "v", "seq": "seq"}
RELATIVE = [2.0**28, 2.0**28 - 0.001, -(2.0**28), 0, 12.5, -3, 2**28]  # SenML's "now"-relative edge


@st.composite
def reading(draw: st.DrawFn, senml: bool, bad: bool) -> Any:
    if bad and draw(st.integers(0, 8)) == 0:
        return draw(st.sampled_from([1, "r", [], None]))
    wrong = draw(st.sampled_from(sorted(GOOD))) if bad else None
    r: dict[str, Any] = {}
    for key, good in GOOD.items():
        if key == wrong and draw(st.integers(0, 4)) == 0:
            continue  # the field is missing
        v = draw(BAD[key] if key == wrong else good)
        if key == "seq" and key != wrong and draw(st.integers(0, 5)) == 0:
            continue  # some devices do not number their readings
        if senml and key == "ts" and type(v) is int and abs(v) > 10**9:
            v = draw(st.sampled_from([v / 1000.0] * 4 + RELATIVE))  # SenML times are seconds
        r[SENML_KEYS[key] if senml else key] = v
    if senml and bad and draw(st.integers(0, 6)) == 0:
        r[draw(st.sampled_from(["bn", "bt", "vs"]))] = draw(st.sampled_from(["d2:", 5, "x"]))
    return r


@st.composite
def payload(draw: st.DrawFn) -> tuple[str, bytes, int]:
    device = draw(st.sampled_from(["d1", "d1", "d1", "d2", "d3", "bad id"]))
    topic = f"devices/{draw(st.sampled_from(['d1', 'd1', 'd2', 'd3']))}/readings"
    senml = draw(st.booleans())
    n = draw(st.integers(0, 12))
    spoilt = draw(st.sampled_from([-1, -1, -1, *range(n)]))  # most batches are clean
    rs = [draw(reading(senml, i == spoilt)) for i in range(n)]
    if senml:
        if rs and isinstance(rs[0], dict):
            rs[0]["bn"] = draw(st.sampled_from([f"{device}:", f"{device}/", device, "", 3]))
            if draw(st.booleans()):
                rs[0]["bt"] = draw(st.sampled_from([0, T / 1000, 1.5, -3, BIG, 2**28, "x"]))
        doc: Any = rs
    else:
        doc = {"device": device, "readings": rs}
        if draw(st.integers(0, 10)) == 0:
            del doc["device"]
    try:
        raw = orjson.dumps(doc, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    except (orjson.JSONEncodeError, TypeError):
        raw = b"[]"
    return topic, raw, T


def _decoder(*, fast: bool, identity: bool, catalog: bool, admit: bool) -> PayloadDecoder:
    d = PayloadDecoder(
        Interner(), Interner(limit=4), device_topic_level=1, topic_identity=identity,
        known_metric=(lambda m: m != "made_up") if catalog else None,
        admit_device=(lambda name, _t: "device_limit" if name == "d3" else None)
        if admit else None)
    if not fast:  # the per-reading path alone
        d._batch_fast = lambda *_a: False  # type: ignore[method-assign]
        d._senml_fast = lambda *_a: False  # type: ignore[method-assign]
    return d


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(payload(), min_size=1, max_size=8), st.booleans(), st.booleans(),
       st.booleans())
def test_fast_paths_decode_exactly_as_the_per_reading_path(
        msgs: list[tuple[str, bytes, int]], identity: bool, catalog: bool, admit: bool) -> None:
    _same_either_way(msgs, identity=identity, catalog=catalog, admit=admit)


def _same_either_way(msgs: list[tuple[str, bytes, int]], **kw: bool) -> None:
    got = []
    for fast in (True, False):
        d = _decoder(fast=fast, **kw)
        cols, bad, _ = d.decode(msgs)
        got.append((
            [d.devices.names[i] for i in cols.device], [d.metrics.names[i] for i in cols.metric],
            cols.ts.tolist(), cols.value.tolist(), cols.seq.tolist(), cols.recv.tolist(),
            dict(bad), d.rejected_devices, d.devices.names, d.metrics.names,
            d.untimed_taken))
    assert got[0] == got[1], msgs


@pytest.mark.parametrize("senml", [False, True])
@pytest.mark.parametrize("identity", [False, True])
def test_every_single_fault_in_a_batch_decodes_as_the_per_reading_path(senml: bool,
                                                                      identity: bool) -> None:
    """Each boundary value of ``BAD`` (and each missing field) in the middle reading of an
    otherwise good batch, for each base name a SenML pack may carry: exhaustively, where the
    property above only samples."""
    good = [{"metric": "temperature", "ts": T + i, "value": 20.5, "seq": i} for i in range(3)]
    cases: list[list[dict[str, Any]]] = []
    for key, values in BAD_VALUES.items():
        for v in [*values, "missing"]:
            rs = [dict(r) for r in good]
            if v == "missing":
                del rs[1][key]
            else:
                rs[1][key] = v
            cases.append(rs)
    for rs in cases:
        if senml:
            for t in [*RELATIVE, T / 1000, 2.0**62]:
                for bn in ("d1:", "d1/", "d2:", "d1", ""):
                    pack = [{SENML_KEYS[k]: (t + i if k == "ts" and type(v) is int else v)
                             for k, v in r.items()} for i, r in enumerate(rs)]
                    pack[0]["bn"] = bn
                    _same_either_way([("devices/d1/readings", orjson.dumps(pack), T)],
                                     identity=identity, catalog=True, admit=False)
        else:
            msg = ("devices/d1/readings", orjson.dumps({"device": "d1", "readings": rs}), T)
            _same_either_way([msg], identity=identity, catalog=True, admit=False)
    if senml:  # base fields again later in a good pack (SenML allows it; the fast path not)
        pack = [{"bn": "d1:", "n": "co2", "v": 1.0, "t": 0.5}, {"n": "co2", "v": 2.0, "t": 1.5},
                {"n": "co2", "v": 3.0, "t": 2.5}]
        for extra in ({"bn": "d2:"}, {"bn": "d1:"}, {"bt": 5}, {"bt": T / 1000}, {"vs": "x"}):
            raw = orjson.dumps([pack[0], pack[1] | extra, pack[2]])
            _same_either_way([("devices/d1/readings", raw, T)], identity=identity, catalog=True,
                             admit=False)
    # what only the lenient parser lets through (orjson refuses it, Python devices write it)
    for word in (b"NaN", b"Infinity", b"-Infinity"):
        raw = (b'[{"bn":"d1:","n":"co2","v":1,"t":0},{"n":"co2","v":%s,"t":1}]' if senml else
               b'{"readings":[{"metric":"co2","ts":%d,"value":1},{"metric":"co2","ts":%d,'
               b'"value":%%s}]}' % (T, T)) % word
        _same_either_way([("devices/d1/readings", raw, T)], identity=identity, catalog=True,
                         admit=False)


RAW_EDGES = [  # what a typed decoder could read differently from orjson and the per-reading path
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d,"ts":"x","value":1}]}' % T,
    b'{"device":"d1","readings":[{"metric":"co2","ts":"x","ts":%d,"value":1}]}' % T,
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d,"value":1,"value":2.5}]}' % T,
    b'{"device":null,"readings":[{"metric":"co2","ts":%d,"value":1}]}' % T,
    b'{"device":"d1","device":"d2","readings":[{"metric":"co2","ts":%d,"value":1}]}' % T,
    b'{"device":"d1","readings":[]}',
    b'{"device":"d1","readings":null}',
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d,"value":1,"seq":null}]}' % T,
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d,"value":123456789012345678901234567890}]}'
    % T,
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d,"value":1e-400}]}' % T,
    b'{"device":"d1","readings":[{"metric":"co2","ts":%d.0,"value":1}]}' % T,
    b' {"device":"d1","readings":[{"metric":"co2","ts":%d,"value":1}]}' % T,
    b'{"device":"d1","note":"readings","metric":"co2","ts":%d,"value":1}' % T,
    b'[{"bn":"d1:","n":"co2","v":1,"t":0},{"bn":null,"n":"co2","v":2,"t":1}]',
    b'[{"bn":"d1:","n":"co2","v":1,"t":0},{"bt":null,"n":"co2","v":2,"t":1}]',
    b'[{"bn":"d1:","n":"co2","v":1,"t":0},{"bn":"","n":"co2","v":2,"t":1}]',
    b'[{"bn":"d1:","n":"co2","v":1,"t":0},{"bt":0,"n":"co2","v":2,"t":1}]',
    b'[{"bn":"d1:","bt":null,"n":"co2","v":1,"t":0}]',
    b'[{"bn":"d1:","n":"co2","v":1,"t":null}]',
    b'[{"bn":"d1:","n":"","v":1,"t":0}]',
    b'[{"bn":"d1:","n":"co2","v":1,"v":"x","t":0}]',
    b'[{"bn":"d1:","n":"co2","vs":"on","t":0}]',
    b'[{"bn":"d1:","n":"co2","v":1,"vs":"on","u":"ppm","t":0}]',
    b'[]',
    b'[{"bn":"d1:","n":"co2","v":1e308,"t":0},{"n":"co2","v":-1e308,"t":1}]',
]


@pytest.mark.parametrize("raw", RAW_EDGES)
def test_payloads_a_typed_decoder_could_misread_decode_as_the_per_reading_path(
        raw: bytes) -> None:
    """Duplicate keys (the last one counts), nulls, empty batches, big numbers, leading
    whitespace, SenML base fields repeated as null or empty: the fast paths (msgspec) either
    give what the per-reading path (orjson) gives or leave the payload to it."""
    for identity in (False, True):
        _same_either_way([("devices/d1/readings", raw, T)], identity=identity, catalog=True,
                         admit=False)


def test_well_formed_batches_take_the_fast_path() -> None:
    """The property above would hold trivially if the fast paths never took anything."""
    rs = [{"metric": "temperature", "ts": T + i, "value": 20.0 + i, "seq": i} for i in range(50)]
    senml = [{"bn": "d1:", "bt": T / 1000, "n": "humidity", "t": 0.0, "v": 40}] + [
        {"n": "humidity", "t": i * 0.5, "v": 40.5 + i} for i in range(1, 50)]
    d = _decoder(fast=True, identity=True, catalog=True, admit=True)
    d._one = None  # type: ignore[assignment,method-assign]  # the per-reading path would fail
    cols, bad, _ = d.decode([
        ("devices/d1/readings", orjson.dumps({"device": "d1", "readings": rs}), T),
        ("devices/d1/readings", orjson.dumps(senml), T)])
    assert not bad
    assert len(cols) == 100
    assert cols.ts[50:].tolist() == [T + i * 500 for i in range(50)]
    assert cols.value[50:].tolist() == [40.0] + [40.5 + i for i in range(1, 50)]


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 5, 9, 10])
def test_column_builder_truncates_across_single_readings_and_batches(cut: int) -> None:
    b = ColumnBuilder()
    b.append(1, 0, 10, 1.0, 0, 100)
    b.add_batch(2, [0, 1, 0], [11, 12, 13], [2.0, 3.0, 4.0], [1, 2, 3], 200)
    b.append(3, 1, 14, 5.0, 4, 300)
    b.add_batch(4, [1] * 5, [15, 16, 17, 18, 19], [6.0] * 5, [5, 6, 7, 8, 9], 400)
    full = b.build()
    b.truncate(cut)
    assert len(b) == cut
    part = b.build()
    for name in ("device", "metric", "ts", "value", "seq", "recv"):
        assert np.array_equal(getattr(part, name), getattr(full, name)[:cut]), name
