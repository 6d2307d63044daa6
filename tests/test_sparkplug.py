"""Sparkplug B: the protobuf payload read without a protobuf library, and what the decoder makes
of births, data by alias, deaths and commands."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices import rejects
from devices.codecs import PayloadDecoder
from devices.readings import Interner
from devices.sparkplug import (
    BOOLEAN,
    DOUBLE,
    FLOAT,
    INT8,
    INT16,
    INT32,
    INT64,
    UINT32,
    UINT64,
    OutMetric,
    SparkplugError,
    decode_payload,
    encode_payload,
    rebirth_request,
    topic_parts,
)

if TYPE_CHECKING:  # (the module runs on a gateway without the cloud's parts: make pi-check)
    from cloud.sinks.influx_v1 import InfluxV1Client
    from fieldline.services import Mosquitto

T = 1_767_225_600_000
STRING = 12


def decoder(**kw: object) -> PayloadDecoder:
    return PayloadDecoder(Interner(), Interner(), device_topic_level=1,
                          **kw)  # type: ignore[arg-type]


def readings(d: PayloadDecoder, msgs: list[tuple[str, bytes]]
             ) -> tuple[list[tuple[str, str, int, float]], dict[str, int]]:
    cols, bad, _ = d.decode([(t, p, T + 999) for t, p in msgs])
    return ([(d.devices.names[i], d.metrics.names[m], ts, v) for i, m, ts, v in zip(
        cols.device, cols.metric, cols.ts.tolist(), cols.value.tolist(), strict=True)],
        dict(bad))


@pytest.mark.parametrize(("datatype", "value"), [
    (INT8, -5), (INT8, 127), (INT16, -30_000), (INT32, -2**31), (INT32, 2**31 - 1),
    (INT64, -2**63), (INT64, 42), (UINT32, 2**32 - 1), (UINT64, 2**53), (FLOAT, 21.5),
    (DOUBLE, -0.125), (BOOLEAN, True), (BOOLEAN, False)])
def test_every_number_type_reads_back_as_written(datatype: int, value: float) -> None:
    buf = encode_payload([OutMetric("m", value, datatype, alias=3, ts=T)], ts=T + 1, seq=7)
    p = decode_payload(buf)
    assert (p.ts, p.seq, len(p.metrics)) == (T + 1, 7, 1)
    m = p.metrics[0]
    assert (m.name, m.alias, m.ts, m.datatype, m.is_null) == ("m", 3, T, datatype, False)
    assert m.reading(datatype) == float(value)


def test_a_signed_integer_in_the_width_of_its_type_reads_as_negative() -> None:
    """Writers differ: Int8 -1 as 0xFF (its own width) or 0xFFFFFFFF (the uint32 field's);
    and a data message names no type, so its birth's decides."""
    for raw in (0xFF, 0xFFFFFFFF):
        buf = bytes([0x12, 0x08, 0x20, INT8, 0x50]) + _varint(raw)
        buf = bytes([0x12, len(buf) - 2]) + buf[2:]
        (m,) = decode_payload(buf).metrics
        assert m.reading(INT8) == -1.0
        assert m.reading(None) == float(raw)  # no type known: as the unsigned field holds it


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def test_nulls_texts_and_unknown_fields() -> None:
    buf = encode_payload([OutMetric("a", None, DOUBLE), OutMetric("b", "running", STRING)])
    a, b = decode_payload(buf).metrics
    assert a.is_null
    assert a.reading(DOUBLE) is None
    assert b.reading(STRING) is None
    assert b.reading(None) is None
    # a field this reader does not know (uuid, a third party's extension) is skipped
    extra = buf + bytes([0x22, 0x03]) + b"abc" + bytes([0xF8, 0x01, 0x05])
    assert [m.name for m in decode_payload(extra).metrics] == ["a", "b"]


@pytest.mark.parametrize("bad", [
    b"\x12\x05\x0a\x03ab",  # a metric whose name runs past it
    b"\x08",  # a truncated varint
    b"\x08" + b"\xff" * 11,  # a varint longer than 10 bytes
    b"\x0b\x00",  # a group (wire type 3)
    b"\x10\x01",  # metrics (field 2) as a varint
    b"\x12\x02\x0a\x01",  # a field runs past its message
    b"\x12\x03\x0a\x01\xff",  # a name that is not UTF-8
    b"\x00\x01",  # field number 0
])
def test_a_malformed_payload_is_refused_with_its_reason(bad: bytes) -> None:
    with pytest.raises(SparkplugError):
        decode_payload(bad)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_read_or_refused_never_anything_else(data: bytes) -> None:
    d = decoder(untimed=True)
    _, bad = readings(d, [("spBv1.0/g/DDATA/n1/s1", data)])
    assert set(bad) <= {rejects.MALFORMED_PAYLOAD, rejects.MISSING_FIELD, rejects.NOT_FINITE,
                        rejects.WRONG_TYPE, rejects.BAD_TIMESTAMP, rejects.OUT_OF_RANGE}


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_every_truncation_of_a_good_payload_is_refused_or_read(data: st.DataObject) -> None:
    buf = encode_payload([OutMetric("Inputs/Temperature", 21.5, DOUBLE, alias=1, ts=T),
                          OutMetric("Inputs/Run", True, BOOLEAN, alias=2)], ts=T, seq=1)
    whole = decode_payload(buf)
    cut = data.draw(st.integers(0, len(buf) - 1))
    try:
        part = decode_payload(buf[:cut])
    except SparkplugError:
        return
    # cut between two fields: what is left is read as it was, never as something else
    assert part.metrics == whole.metrics[:len(part.metrics)]
    assert part.ts in (None, whole.ts)


def test_births_and_data_by_alias_are_readings_of_the_node_and_its_devices() -> None:
    """An edge node's birth names its metrics (with aliases and types), its devices' births
    theirs; data then carries aliases and no types. Control metrics, the birth/death session
    number, properties and texts are no readings; a metric's own time wins over the
    payload's."""
    d = decoder()
    nbirth = encode_payload([
        OutMetric("bdSeq", 3, UINT64), OutMetric("Node Control/Rebirth", False, BOOLEAN),
        OutMetric("Properties/Hardware Make", "acme", STRING),
        OutMetric("Supply Voltage", 24.1, FLOAT, alias=1)], ts=T, seq=0)
    dbirth = encode_payload([
        OutMetric("Inputs/Temperature", 21.25, DOUBLE, alias=10),
        OutMetric("Inputs/Offset", -3, INT16, alias=11),
        OutMetric("Outputs/Pump", True, BOOLEAN, alias=12),
        OutMetric("Status", "RUN", STRING, alias=13)], ts=T, seq=1)
    ddata = encode_payload([
        OutMetric(None, 22.5, DOUBLE, alias=10),
        OutMetric(None, -4, INT16, alias=11, ts=T + 500),
        OutMetric(None, False, BOOLEAN, alias=12),
        OutMetric(None, "STOP", STRING, alias=13)], ts=T + 1000, seq=2)
    # a data message without the type of its metrics, as the specification prefers it
    ddata_untyped = encode_payload([
        OutMetric(None, 22.5, DOUBLE, alias=10, typed=False),
        OutMetric(None, -4, INT16, alias=11, ts=T + 500, typed=False),
        OutMetric(None, False, BOOLEAN, alias=12, typed=False),
        OutMetric(None, "STOP", STRING, alias=13, typed=False)], ts=T + 1000, seq=3)
    got, bad = readings(d, [
        ("spBv1.0/plant/NBIRTH/n1", nbirth), ("spBv1.0/plant/DBIRTH/n1/s1", dbirth),
        ("spBv1.0/plant/DDATA/n1/s1", ddata), ("spBv1.0/plant/DDATA/n1/s1", ddata_untyped),
        ("spBv1.0/plant/NDATA/n1", encode_payload([OutMetric(None, 23.9, FLOAT, alias=1)],
                                                  ts=T + 2000)),
        ("spBv1.0/plant/NCMD/n1", encode_payload([OutMetric("Node Control/Rebirth", True,
                                                            BOOLEAN)])),
        ("spBv1.0/plant/DDEATH/n1/s1", encode_payload([], ts=T + 3000)),
        ("spBv1.0/STATE/host-1", b'{"online": true, "timestamp": 1}'),
    ])
    assert not bad
    assert got[:4] == [("n1", "Supply_Voltage", T, pytest.approx(24.1)),
                       ("n1.s1", "Inputs_Temperature", T, 21.25),
                       ("n1.s1", "Inputs_Offset", T, -3.0), ("n1.s1", "Outputs_Pump", T, 1.0)]
    data = [("n1.s1", "Inputs_Temperature", T + 1000, 22.5),
            ("n1.s1", "Inputs_Offset", T + 500, -4.0), ("n1.s1", "Outputs_Pump", T + 1000, 0.0)]
    assert got[4:7] == data
    assert got[7:10] == data  # the birth's types: -4 read as Int16 again
    assert got[10] == ("n1", "Supply_Voltage", T + 2000, pytest.approx(23.9))
    assert len(got) == 11
    assert not d.rebirth_wanted


def test_data_by_an_alias_never_born_is_refused_and_the_node_asked_to_rebirth() -> None:
    d = decoder()
    got, bad = readings(d, [("spBv1.0/plant/DDATA/n2/s1",
                             encode_payload([OutMetric(None, 1.0, DOUBLE, alias=10)], ts=T)),
                            ("spBv1.0/plant/NDATA/n3",
                             encode_payload([OutMetric("Load", 0.5, DOUBLE)], ts=T))])
    assert bad == {rejects.MISSING_FIELD: 1}
    assert got == [("n3", "Load", T, 0.5)]  # data naming its metrics needs no birth
    assert d.rebirth_wanted == {("plant", "n2")}
    topic, payload = rebirth_request("plant", "n2", T)
    assert topic == "spBv1.0/plant/NCMD/n2"
    (m,) = decode_payload(payload).metrics
    assert (m.name, m.reading(m.datatype)) == ("Node Control/Rebirth", 1.0)


def test_times_bad_topics_and_bad_payloads() -> None:
    """No time in the payload: the receive time where the gateway stamps untimed readings,
    refused otherwise. A topic under spBv1.0 that is not Sparkplug's, and a payload that is
    not a Sparkplug message, are refused, counted; their neighbours are read."""
    good = encode_payload([OutMetric("Level", 0.75, DOUBLE)])
    for untimed, expect in ((True, ([("n1", "Level", T + 999, 0.75)], {})),
                            (False, ([], {rejects.MISSING_FIELD: 1}))):
        assert readings(decoder(untimed=untimed), [("spBv1.0/g/NDATA/n1", good)]) == expect
    got, bad = readings(decoder(), [
        ("spBv1.0/g/NDATA", good), ("spBv1.0/g/XDATA/n1", good),
        ("spBv1.0/g/NDATA/n1", b'{"Level": 0.75}'),
        ("spBv1.0/g/NDATA/n1", encode_payload([OutMetric("Level", 0.5, DOUBLE)], ts=T))])
    assert got == [("n1", "Level", T, 0.5)]
    assert bad == {rejects.MALFORMED_PAYLOAD: 3}
    assert topic_parts("spBv1.0/g/DDATA/n1/s1") == ("g", "DDATA", "n1", "s1")
    assert topic_parts("spBv1.0/g//n1") is None


def test_a_checkpoint_keeps_what_the_births_said(tmp_path: Path) -> None:
    """An agent restarted after the births (which an edge node sends only when it connects)
    still reads data by alias."""
    from devices.catalog import Catalog
    from devices.clock import ManualClock
    from devices.mqtt import BrokerAddress
    from edge.agent import EdgePipeline
    from edge.config import EdgeConfig

    nowhere = BrokerAddress(host="127.0.0.1", port=1)
    cfg = EdgeConfig(gateway="gw", intake_broker=nowhere, uplink_broker=nowhere,
                     max_past_ms=10**12, catalog=Catalog(undeclared="accept"))
    clock = ManualClock(now_ms=T + 60_000)
    first = EdgePipeline(cfg, clock)
    first.process([("spBv1.0/g/DBIRTH/n1/s1", encode_payload(
        [OutMetric("Inputs/Offset", -3, INT32, alias=5)], ts=T), T)])
    first.save_checkpoint(tmp_path)
    again = EdgePipeline(cfg, clock)
    again.load_checkpoint(tmp_path)
    data = encode_payload([OutMetric(None, -7, INT32, alias=5, typed=False)], ts=T + 1000)
    again.process([("spBv1.0/g/DDATA/n1/s1", data, T + 1000)])
    s = again.stats()
    assert (s["readings_accepted"], s["rejected"]) == (2, 0)
    res = again.emit(flush=True)
    assert res.min.tolist() == [-7.0]  # one window: -3 from the birth, -7 read as Int32
    assert not again.decoder.rebirth_wanted


def test_float_fields_are_little_endian_ieee() -> None:
    """The bytes a C or Java writer puts in the fixed-width fields (not what this module
    wrote itself)."""
    metric = b"\x0a\x01t" + b"\x20" + bytes([FLOAT]) + b"\x65" + struct.pack("<f", 1.5)
    metric2 = b"\x0a\x01u" + b"\x20" + bytes([DOUBLE]) + b"\x69" + struct.pack("<d", -2.25)
    buf = b"\x12" + bytes([len(metric)]) + metric + b"\x12" + bytes([len(metric2)]) + metric2
    a, b = decode_payload(buf).metrics
    assert (a.reading(FLOAT), b.reading(DOUBLE)) == (1.5, -2.25)


@pytest.mark.integration
def test_a_sparkplug_plant_lands_in_influxdb_reading_for_reading(
        mosquitto_factory: Callable[..., Mosquitto], influx_db: InfluxV1Client,
        tmp_path: Path) -> None:
    """End to end through real brokers and InfluxDB: an edge node with two devices publishes
    its births, then two minutes of data by alias (no types, as the specification prefers),
    a string status and a node metric beside them. Every numeric reading is in the
    aggregates, under ``<node>.<device>`` and the metric's name as a metric name may be."""
    import asyncio
    import time

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from cloud.config import CloudConfig, InfluxConfig
    from cloud.worker import CloudWorker
    from devices.catalog import Catalog
    from edge.agent import EdgeAgent
    from edge.config import EdgeConfig
    from edge.engine import EngineConfig
    from edge.eventtime import EventTimeSpec
    from edge.windows import WindowSpec
    from tests.running import connected, settled

    gw, cloud = mosquitto_factory(), mosquitto_factory()
    engine = EngineConfig(windows=(WindowSpec(size_ms=10_000),), time=EventTimeSpec(
        out_of_orderness_ms=1_000, allowed_lateness_ms=5_000, idle_timeout_ms=2_000))
    agent = EdgeAgent(EdgeConfig(
        gateway="gw-1", intake_broker=gw.address, uplink_broker=cloud.address,
        topics=["spBv1.0/#"], engine=engine, state_dir=tmp_path / "edge", tick_ms=50,
        catalog=Catalog(undeclared="accept")))
    worker = CloudWorker(CloudConfig(
        worker_id="w", broker=cloud.address,
        influx=InfluxConfig(url=influx_db.url, database=influx_db.database,
                            flush_interval_ms=100), health_interval_ms=500))
    start = time.time_ns() // 1_000_000 - 10 * 60_000
    start -= start % 10_000
    msgs = [("spBv1.0/plant/NBIRTH/n1", encode_payload(
                [OutMetric("bdSeq", 0, UINT64), OutMetric("Supply", 24.0, FLOAT, alias=1)],
                ts=start, seq=0))]
    for dev in ("s1", "s2"):
        msgs.append((f"spBv1.0/plant/DBIRTH/n1/{dev}", encode_payload(
            [OutMetric("Inputs/Temperature", 20.0, DOUBLE, alias=10),
             OutMetric("Inputs/Offset", -1, INT16, alias=11),
             OutMetric("Status", "RUN", STRING, alias=12)], ts=start, seq=1)))
    sent = {("n1", "Supply"): 1, ("n1.s1", "Inputs_Temperature"): 1,
            ("n1.s1", "Inputs_Offset"): 1, ("n1.s2", "Inputs_Temperature"): 1,
            ("n1.s2", "Inputs_Offset"): 1}
    for k in range(1, 121):
        t = start + k * 1000
        for dev in ("s1", "s2"):
            msgs.append((f"spBv1.0/plant/DDATA/n1/{dev}", encode_payload(
                [OutMetric(None, 20.0 + k / 10, DOUBLE, alias=10, typed=False),
                 OutMetric(None, -k, INT16, alias=11, typed=False),
                 OutMetric(None, "RUN", STRING, alias=12, typed=False)], ts=t, seq=k % 256)))
            sent[("n1." + dev, "Inputs_Temperature")] += 1
            sent[("n1." + dev, "Inputs_Offset")] += 1
        if k % 10 == 0:
            msgs.append(("spBv1.0/plant/NDATA/n1", encode_payload(
                [OutMetric(None, 24.0 + k / 100, FLOAT, alias=1, typed=False)], ts=t)))
            sent[("n1", "Supply")] += 1

    async def scenario() -> None:
        stops = asyncio.Event(), asyncio.Event()
        wt = asyncio.create_task(worker.run(stops[0]))
        at = asyncio.create_task(agent.run(stops[1]))
        await connected([agent], worker)
        node = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                           protocol=mqtt.MQTTv5)
        node.connect("127.0.0.1", gw.port)
        node.loop_start()
        for topic, payload in msgs:
            node.publish(topic, payload, qos=1)
        node.publish("spBv1.0/plant/DDEATH/n1/s1", encode_payload([], ts=start + 121_000),
                     qos=1).wait_for_publish(10)
        node.disconnect()
        node.loop_stop()
        await settled([agent], worker, 60)
        for s in stops:
            s.set()
        await asyncio.gather(wt, at)

    asyncio.run(scenario())
    s = agent.stats()
    assert (s["rejected"], s["readings_accepted"]) == (0, sum(sent.values())), s
    doc = influx_db.query('SELECT sum("count"), min("min") FROM "aggregates" '
                          'GROUP BY "device", "metric"')
    got = {(r["tags"]["device"], r["tags"]["metric"]): r["values"][0][1]
           for r in doc["results"][0]["series"]}
    assert got == sent
    low = {(r["tags"]["device"], r["tags"]["metric"]): r["values"][0][2]
           for r in doc["results"][0]["series"]}
    assert low[("n1.s1", "Inputs_Offset")] == -120  # read as Int16 from the births' type
