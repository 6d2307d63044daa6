"""Device payload decoding: every shape, and every kind of bad input counted with its reason."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import orjson

from devices import rejects
from devices.codecs import PayloadDecoder, encode_batch, encode_senml, encode_single
from devices.readings import NO_SEQ, STAMPED_SEQ, Interner

T = 1_700_000_000_000


def decoder() -> PayloadDecoder:
    return PayloadDecoder(Interner(), Interner(), device_topic_level=1)


def test_single_batch_and_senml_decode_to_the_same_columns() -> None:
    readings = [("temperature", T, 21.5, 1), ("temperature", T + 1000, 21.75, 2)]
    single = [("devices/d1/readings", encode_single("d1", m, t, v, s), 0)
              for m, t, v, s in readings]
    batch = [("devices/d1/readings", encode_batch("d1", readings), 0)]
    senml = [("devices/d1/readings", encode_senml("d1", readings), 0)]
    results = []
    for msgs in (single, batch, senml):
        d = decoder()
        cols, bad, _ = d.decode(msgs)
        assert not bad
        results.append((cols.ts.tolist(), cols.value.tolist(), cols.seq.tolist(),
                        [d.devices.names[i] for i in cols.device],
                        [d.metrics.names[i] for i in cols.metric]))
    assert results[0] == results[1] == results[2]
    assert results[0][0] == [T, T + 1000]


def test_device_comes_from_topic_when_payload_has_none() -> None:
    d = decoder()
    payload = orjson.dumps({"metric": "humidity", "ts": T, "value": 50})
    cols, bad, _ = d.decode([("devices/abc/readings", payload, 0)])
    assert not bad
    assert d.devices.names[cols.device[0]] == "abc"
    assert cols.value.tolist() == [50.0]
    assert cols.seq.tolist() == [NO_SEQ]


def test_bad_inputs_are_counted_by_reason_and_do_not_poison_neighbours() -> None:
    good = encode_single("d1", "temperature", T, 20.0, 7)
    msgs = [
        ("devices/d1/readings", b"not json at all", 0),
        ("devices/d1/readings", b'{"device": "d1", "metric": "temperature", "ts": 1, '
                                b'"value": NaN}', 0),
        ("devices/d1/readings", b'{"device": "d1", "metric": "temperature", "value": 1.0}', 0),
        ("devices/d1/readings", b'{"device": "d1", "metric": "temperature", "ts": "x", '
                                b'"value": 1.0}', 0),
        ("devices/d1/readings", b'"just a string"', 0),
        ("devices/d1/readings", b'{"device": "d1", "metric": "t", "ts": 1, "value": "warm"}', 0),
        ("devices/d1/readings", good, 0),
        ("devices/d1/readings", b"x" * 300_000, 0),
    ]
    cols, bad, samples = decoder().decode(msgs)
    assert len(cols) == 1
    assert cols.seq.tolist() == [7]
    assert bad == {
        rejects.MALFORMED_JSON: 1, rejects.NOT_FINITE: 1, rejects.MISSING_FIELD: 1,
        rejects.WRONG_TYPE: 2, rejects.MALFORMED_PAYLOAD: 1, rejects.PAYLOAD_TOO_LARGE: 1,
    }
    assert samples


def test_one_bad_reading_in_a_batch_rejects_only_itself() -> None:
    payload = orjson.dumps({"device": "d1", "readings": [
        {"metric": "temperature", "ts": T, "value": 1.0},
        {"metric": "temperature", "ts": T + 1, "value": "warm"},
        "garbage",
        {"metric": "temperature", "ts": T + 2, "value": 3.0},
    ]})
    cols, bad, _ = decoder().decode([("devices/d1/readings", payload, 0)])
    assert cols.value.tolist() == [1.0, 3.0]
    assert bad == {rejects.WRONG_TYPE: 1, rejects.MALFORMED_PAYLOAD: 1}


def test_senml_relative_time_is_relative_to_receive_time() -> None:
    """Placed by the receipt, as a reading without a time: counted as such, and without a
    seq of its own never taken for a repeat (STAMPED_SEQ); an absolute time is the device's."""
    payload = orjson.dumps([{"bn": "dev9:", "n": "temperature", "t": -2.5, "v": 20},
                            {"n": "temperature", "t": -1, "v": 20, "seq": 7},
                            {"n": "temperature", "t": T / 1000 - 9, "v": 20}])
    d = decoder()
    cols, bad, _ = d.decode([("x/y", payload, T)])
    assert not bad
    assert cols.ts.tolist() == [T - 2500, T - 1000, T - 9000]
    assert cols.seq.tolist() == [STAMPED_SEQ, 7, NO_SEQ]
    assert d.untimed_taken == 2


def test_invalid_device_ids_are_rejected() -> None:
    payload = orjson.dumps({"device": "a/b", "metric": "temperature", "ts": T, "value": 1})
    cols, bad, _ = decoder().decode([("devices/ok/readings", payload, 0)])
    assert len(cols) == 0
    assert bad == {rejects.WRONG_TYPE: 1}


def test_under_topic_identity_a_payload_cannot_claim_another_device() -> None:
    """Issue 12, item 11: the gateway ACL binds each device's login to its own topic, so the
    topic is who sent it; a payload naming another device is refused, counted against the
    sender. Every shape: single, batch, SenML with a base name and with a full name."""
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, topic_identity=True)
    good = encode_single("d1", "temperature", T, 20.0, 1)
    claims = [encode_single("d2", "temperature", T, 99.0, 1),
              encode_batch("d2", [("temperature", T, 99.0, 1)]),
              encode_senml("d2", [("temperature", T, 99.0, 1)]),
              orjson.dumps([{"n": "d2/temperature", "t": T / 1000, "v": 99.0}])]
    cols, bad, _ = d.decode([("devices/d1/readings", p, 0) for p in [good, *claims]])
    assert [d.devices.names[i] for i in cols.device] == ["d1"]
    assert bad == {rejects.DEVICE_MISMATCH: 4}
    assert d.rejected_devices == [(d.devices.get("d1"), rejects.DEVICE_MISMATCH)] * 4
    # payload identity (a bridge publishing for many devices on one topic) trusts the payload
    trusting = PayloadDecoder(Interner(), Interner(), device_topic_level=1)
    cols, bad, _ = trusting.decode([("devices/bridge/readings", p, 0) for p in claims])
    assert not bad
    assert {trusting.devices.names[i] for i in cols.device} == {"d2"}


def test_the_shipped_gateway_config_takes_identity_from_the_topic(tmp_path: Path) -> None:
    from dataclasses import replace

    from devices.clock import ManualClock
    from edge.agent import EdgePipeline
    from edge.config import load_edge_config

    shipped = load_edge_config(Path(__file__).parent.parent / "deploy" / "gateway.toml")
    assert shipped.device_identity == "topic"
    p = EdgePipeline(replace(shipped, registry_path=None, state_dir=tmp_path),
                     ManualClock(now_ms=T))
    p.process([("devices/d1/readings", encode_single("d1", "temperature", T, 20.0, 1), T),
               ("devices/d1/readings", encode_single("d2", "temperature", T, 99.0, 1), T)])
    rep = p.ledger_report(changed_only=False)
    assert rep["devices"] == ["d1"]
    assert rep["accepted"] == [1]
    assert rep["rejected_by"] == {rejects.DEVICE_MISMATCH: [1]}


def test_event_times_in_seconds_micro_nanoseconds_and_iso_8601_are_read_as_milliseconds(
        ) -> None:
    """Devices send epoch seconds (whole or with a fraction), microseconds, nanoseconds or ISO
    8601 with an offset as often as milliseconds. Told apart by magnitude where milliseconds
    cannot be meant, each lands on the same event time; a batch may mix them."""
    t = 1_764_752_400_250  # 2025-12-03T09:00:00.250Z
    iso = dt.datetime.fromtimestamp(t / 1000, dt.UTC)
    forms: list[object] = [t, t / 1000, t * 1000, t * 1_000_000, iso.isoformat(),
                           iso.isoformat().replace("+00:00", "Z"),
                           iso.astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))
                                          ).isoformat()]
    d = decoder()
    singles = [("devices/d1/readings", orjson.dumps(
        {"metric": "temperature", "ts": f, "value": 1.0}), 0) for f in forms]
    batch = [("devices/d1/readings", orjson.dumps(
        {"readings": [{"metric": "temperature", "ts": f, "value": 1.0} for f in forms]}), 0)]
    for msgs in (singles, batch):
        cols, bad, _ = d.decode(msgs)
        assert not bad
        assert cols.ts.tolist() == [t] * len(forms)
    whole_seconds = orjson.dumps({"metric": "temperature", "ts": t // 1000, "value": 1.0})
    cols, _, _ = d.decode([("devices/d1/readings", whole_seconds, 0)])
    assert cols.ts.tolist() == [t // 1000 * 1000]


def test_times_that_are_no_time_are_still_rejected() -> None:
    """A clock that was never set (seconds since boot), a time without a zone, a date alone."""
    d = decoder()
    bad_forms: list[object] = ["2025-12-03T09:00:00", "yesterday", "2025-12-03", [1], True]
    msgs = [("devices/d1/readings", orjson.dumps(
        {"metric": "temperature", "ts": f, "value": 1.0}), 0) for f in bad_forms]
    cols, bad, _ = d.decode(msgs)
    assert len(cols) == 0
    assert bad == {rejects.WRONG_TYPE: len(bad_forms)}
    boot = orjson.dumps({"metric": "temperature", "ts": 5_000, "value": 1.0})
    cols, _, _ = d.decode([("devices/d1/readings", boot, 0)])
    assert cols.ts.tolist() == [5_000]  # left alone: validation rejects it as bad_timestamp


def test_an_object_of_metric_names_and_numbers_is_a_reading_per_number() -> None:
    """Zigbee2MQTT / ESPHome-style: every numeric member a reading at the message's time, and
    every on/off state (1 or 0); other texts and objects beside the numbers (Zigbee2MQTT's
    firmware ``update``) are no readings (not rejections either)."""
    d = decoder()
    payload = orjson.dumps({"temperature": 21.5, "humidity": 40, "linkquality": 120,
                            "state": "ON", "battery_low": False, "power_on_behavior": "off",
                            "color_mode": "xy", "list": [1],
                            "update": {"state": "idle", "installed_version": 587765297},
                            "time": T / 1000, "seq": 9})
    cols, bad, _ = d.decode([("devices/z1/readings", payload, T + 700)])
    assert not bad
    got = {d.metrics.names[m]: v for m, v in zip(cols.metric, cols.value.tolist(), strict=True)}
    assert got == {"temperature": 21.5, "humidity": 40.0, "linkquality": 120.0, "state": 1.0,
                   "battery_low": 0.0, "power_on_behavior": 0.0}
    assert cols.ts.tolist() == [T] * 6  # "time" in epoch seconds
    assert cols.seq.tolist() == [NO_SEQ] * 6  # one seq cannot name several readings
    assert {d.devices.names[i] for i in cols.device} == {"z1"}
    # Zigbee2MQTT's last_seen (its advanced.last_seen option), as text or epoch ms, is the time
    for seen in ("2026-01-01T01:00:00+01:00", 1_767_225_600_000):
        cols, bad, _ = d.decode([("zigbee2mqtt/z1", orjson.dumps(
            {"temperature": 21.5, "linkquality": 90, "last_seen": seen}), T + 700)])
        assert not bad
        assert cols.ts.tolist() == [1_767_225_600_000] * 2


def test_a_metric_object_counts_each_bad_member_on_its_own() -> None:
    d = decoder()
    msgs = [("devices/z1/readings", orjson.dumps({"ts": T, "temperature": 2**62,
                                                  "humidity": 40.5}), 0),
            ("devices/z1/readings", orjson.dumps({"ts": T, "state": "idle"}), 0),
            ("devices/z1/readings", orjson.dumps({"ts": "yesterday", "humidity": 1}), 0)]
    cols, bad, _ = d.decode(msgs)
    assert cols.value.tolist() == [40.5]
    assert bad == {rejects.OUT_OF_RANGE: 1, rejects.MISSING_FIELD: 1, rejects.WRONG_TYPE: 1}


def test_on_off_states_are_readings_of_one_and_zero_in_every_shape() -> None:
    """Door and leak sensors, presence detectors, relays: the states a fleet watches most.
    Before, Zigbee2MQTT's ``{"contact": false}`` was left out (only logged), ESPHome's binary
    sensor ``ON`` and Shelly's relay ``on`` were rejected as malformed, a ``value`` of ``true``
    and SenML's ``vb`` as ``wrong_type``. Each is a reading of 1 or 0 now, so a window's mean is
    the fraction of it spent on (open, wet, occupied). A number is never taken for a state, and
    other texts still are no readings."""
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, metric_topic_level=3,
                       receive_time=True)  # bare states carry no time
    msgs = [
        ("zigbee2mqtt/door-1", orjson.dumps({"contact": False, "water_leak": True,
                                             "battery": 97, "ts": T}), T),
        ("esphome/node-1/binary_sensor/motion/state", b"ON", T),
        ("esphome/node-1/binary_sensor/motion/state", b"OFF\n", T),
        ("shellies/relay-1/relay/0", b"on", T),
        ("shellies/relay-1/relay/0", b"false", T),
        ("devices/d1/readings", orjson.dumps({"metric": "pump", "ts": T, "value": True,
                                              "seq": 3}), T),
        ("devices/d1/readings", orjson.dumps({"readings": [
            {"metric": "pump", "ts": T + 1, "value": False},
            {"metric": "flow", "ts": T + 1, "value": 2.5}]}), T),
        ("devices/d1/readings", orjson.dumps([{"bn": "d1:", "bt": T / 1000, "n": "valve",
                                               "vb": True}, {"n": "level", "v": 0.5}]), T),
        ("shelly/shellyplus-1/events/rpc", orjson.dumps({"method": "NotifyStatus", "params": {
            "ts": T / 1000, "switch:0": {"id": 0, "output": True, "apower": 12.5}}}), T),
    ]
    cols, bad, _ = d.decode(msgs)
    assert not bad
    got = [(d.devices.names[i], d.metrics.names[m], v) for i, m, v in
           zip(cols.device, cols.metric, cols.value.tolist(), strict=True)]
    assert got == [
        ("door-1", "contact", 0.0), ("door-1", "water_leak", 1.0), ("door-1", "battery", 97.0),
        ("node-1", "motion", 1.0), ("node-1", "motion", 0.0),
        ("relay-1", "0", 1.0), ("relay-1", "0", 0.0),
        ("d1", "pump", 1.0), ("d1", "pump", 0.0), ("d1", "flow", 2.5),
        ("d1", "valve", 1.0), ("d1", "level", 0.5),
        ("shellyplus-1", "switch_0_output", 1.0), ("shellyplus-1", "switch_0_apower", 12.5),
    ]
    # other texts stay refused where a value must be one, and a number is never a state
    cols, bad, _ = d.decode([
        ("devices/d1/readings", orjson.dumps({"metric": "pump", "ts": T, "value": "open"}), T),
        ("esphome/node-1/binary_sensor/motion/state", b"DETECTED", T),
        ("devices/d1/readings", orjson.dumps([{"bn": "d1:", "n": "v", "vb": "yes"}]), T),
        ("devices/d1/readings", orjson.dumps({"metric": "n", "ts": T, "value": 1}), T)])
    assert cols.value.tolist() == [1.0]
    assert bad == {rejects.WRONG_TYPE: 2, rejects.MALFORMED_JSON: 1}


def test_a_number_written_as_text_is_a_reading_where_a_value_must_be_one() -> None:
    """Node-RED flows and bridges that pass everything on as strings publish ``"value":
    "21.5"`` and ``"ts": "1767225600"``; before, each was refused as ``wrong_type``. Where a
    value must be one (a single reading, a batch's readings, a bare payload, JSON-quoted or
    not) a number in plain decimal notation is that number, and a quoted state its 1 or 0; a
    time as text is an epoch number like any other. Other notations stay refused, and
    the texts of a metric object (versions, channel numbers) are still no readings."""
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, metric_topic_level=3,
                       receive_time=True)
    good = [
        ("devices/d1/readings", orjson.dumps({"metric": "t", "ts": T, "value": "21.5"}), T),
        ("devices/d1/readings", orjson.dumps({"readings": [
            {"metric": "t", "ts": T + 1, "value": " -3 "},
            {"metric": "t", "ts": T + 2, "value": "1.5e3"},
            {"metric": "t", "ts": T + 3, "value": 22.0}]}), T),
        ("shellies/s1/sensor/temperature", b'"19.25"', T),
        ("shellies/s1/relay/0", b'"on"', T),
        ("shellies/s1/sensor/humidity", b"40", T),
        # a time as text: epoch seconds, with a fraction, milliseconds (ISO 8601 as before)
        ("devices/d3/readings", orjson.dumps({"metric": "t", "ts": str(T // 1000),
                                              "value": 1}), T),
        ("devices/d3/readings", orjson.dumps({"metric": "t", "ts": f"{T / 1000 + 0.25}",
                                              "value": 2}), T),
        ("zigbee2mqtt/d3", orjson.dumps({"ts": str(T + 7), "t": 3}), T),
    ]
    cols, bad, _ = d.decode(good)
    assert not bad
    assert cols.ts.tolist()[-3:] == [T // 1000 * 1000, T // 1000 * 1000 + 250, T + 7]
    cols, bad, _ = d.decode(good[:-3])
    got = [(d.devices.names[i], d.metrics.names[m], v) for i, m, v in
           zip(cols.device, cols.metric, cols.value.tolist(), strict=True)]
    assert got == [("d1", "t", 21.5), ("d1", "t", -3.0), ("d1", "t", 1500.0), ("d1", "t", 22.0),
                   ("s1", "temperature", 19.25), ("s1", "0", 1.0), ("s1", "humidity", 40.0)]
    bad_texts = ["0x1F", "1_000", "inf", "NaN", "21.5 C", "", "1.2.3", "1" * 65,
                 "\u0663"]  # an Arabic-Indic 3: decimal notation is ASCII digits
    cols, bad, _ = d.decode(
        [("devices/d1/readings", orjson.dumps({"metric": "t", "ts": T, "value": v}), T)
         for v in bad_texts]
        + [("devices/d1/readings", orjson.dumps({"metric": "t", "ts": T, "value": "1e999"}), T),
           ("shellies/s1/sensor/temperature", b'"warm"', T),
           # a metric object's texts are identifiers, not quantities
           ("zigbee2mqtt/d2", orjson.dumps({"ts": T, "fw": "1.2", "channel": "3",
                                            "temperature": 20.5}), T)])
    assert [d.metrics.names[m] for m in cols.metric] == ["temperature"]
    assert bad == {rejects.WRONG_TYPE: len(bad_texts), rejects.NOT_FINITE: 1,
                   rejects.MALFORMED_PAYLOAD: 1}
    # a time text that is neither a number nor ISO 8601 with an offset stays refused
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1)
    _, bad, _ = d.decode([("devices/d1/readings", orjson.dumps(
        {"metric": "t", "ts": ts, "value": 1}), T) for ts in ("soon", "0x65", "1767225600s")])
    assert bad == {rejects.WRONG_TYPE: 3}


def test_tasmota_sensor_objects_are_readings_named_by_sensor_and_quantity() -> None:
    """Tasmota's ``tele/<device>/SENSOR``: each sensor an object of quantities, ``Time`` local
    (with its offset only under ``SetOption52 1``), texts beside them. A number inside a
    sensor's object is a reading ``<sensor>_<quantity>``; texts, lists and anything deeper are
    not; a time without an offset is refused, counted, unless the gateway's clock gives the
    event time."""
    t = dt.datetime.fromtimestamp(T / 1000, dt.timezone(dt.timedelta(hours=1)))
    energy = {"TotalStartTime": "2019-11-02T10:13:52", "Total": 0.011, "Power": 26,
              "Voltage": 227, "Channels": [1, 2], "Deep": {"x": 1}}
    with_offset = orjson.dumps({"Time": t.isoformat(), "AM2301": {"Temperature": 20.6,
                                                                  "Humidity": 46},
                                "ENERGY": energy, "TempUnit": "C"})
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1)
    cols, bad, _ = d.decode([("tele/plug-1/SENSOR", with_offset, T + 900)])
    assert not bad
    got = {d.metrics.names[m]: v for m, v in zip(cols.metric, cols.value.tolist(), strict=True)}
    assert got == {"AM2301_Temperature": 20.6, "AM2301_Humidity": 46.0, "ENERGY_Total": 0.011,
                   "ENERGY_Power": 26.0, "ENERGY_Voltage": 227.0}
    assert cols.ts.tolist() == [T] * 5
    assert {d.devices.names[i] for i in cols.device} == {"plug-1"}

    local = orjson.dumps({"Time": "2026-12-03T10:00:00", "DS18B20-1": {
        "Id": "01144A0CB2AA", "Temperature": 22.5}})
    cols, bad, samples = d.decode([("tele/plug-1/SENSOR", local, T)])
    assert len(cols) == 0
    assert bad == {rejects.WRONG_TYPE: 1}
    assert any("SetOption52" in s and "receive_time" in s for s in samples)
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, receive_time=True)
    cols, bad, _ = d.decode([("tele/plug-1/SENSOR", local, T)])
    assert not bad
    assert [d.metrics.names[m] for m in cols.metric] == ["DS18B20_1_Temperature"]
    assert cols.ts.tolist() == [T]
    # still refused under receive_time: no number at all, or a time that is no text
    cols, bad, _ = d.decode([("tele/plug-1/SENSOR", orjson.dumps({"Time": "x", "S": {
        "Id": "a"}}), T), ("tele/plug-1/SENSOR", orjson.dumps({"ts": [1], "t": 1.5}), T)])
    assert len(cols) == 0
    assert bad == {rejects.MISSING_FIELD: 1, rejects.WRONG_TYPE: 1}



def test_shelly_rpc_notifications_are_readings_at_their_own_time() -> None:
    """Shelly's second generation (Plus H&T and the like) sends its states as RPC notifications
    on ``<device>/events/rpc``: the components' objects inside ``params``, with ``params.ts``
    in epoch seconds. Before, that was one reading ``params_ts`` (the time as a value) under
    receive_time and a refusal otherwise; the temperature was never read. ``id`` (a
    component's number) is never a reading, at any level; an object with numbers of its own
    is no envelope (its numbers are readings, as before)."""
    note = orjson.dumps({"src": "shellyplusht-08b6", "dst": "shellyplusht-08b6/events",
                         "method": "NotifyStatus", "params": {
                             "ts": T / 1000 + 0.12,
                             "temperature:0": {"id": 0, "tC": 21.5, "tF": 70.7},
                             "humidity:0": {"id": 0, "rh": 44.1},
                             "devicepower:0": {"id": 0, "battery": {"V": 6.1, "percent": 97}}}})
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=0)
    cols, bad, _ = d.decode([("shellyplusht-08b6/events/rpc", note, T + 900)])
    assert not bad
    got = {d.metrics.names[m]: v for m, v in zip(cols.metric, cols.value.tolist(), strict=True)}
    assert got == {"temperature_0_tC": 21.5, "temperature_0_tF": 70.7, "humidity_0_rh": 44.1}
    assert cols.ts.tolist() == [T + 120] * 3
    # its status topic: the component alone; under receive_time, its numbers but not its id
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=0, receive_time=True)
    cols, bad, _ = d.decode([("shellyplusht-08b6/status/temperature:0",
                              orjson.dumps({"id": 0, "tC": 21.5, "tF": 70.7}), T)])
    assert not bad
    assert [d.metrics.names[m] for m in cols.metric] == ["tC", "tF"]
    # numbers beside the object: no envelope, read as before
    cols, bad, _ = d.decode([("x/events/rpc", orjson.dumps(
        {"meta": {"rssi": -60, "sensor": {"t": 1.0}}}), T)])
    assert [d.metrics.names[m] for m in cols.metric] == ["meta_rssi"]



def test_lorawan_network_server_uplinks_are_the_decoded_payload_at_its_time() -> None:
    """The Things Stack (v3) and ChirpStack (v4) forward each LoRaWAN uplink over MQTT: the
    device's decoded payload beside the frame counter, port and radio figures. Before, a TTN
    uplink gave readings ``uplink_message_f_port`` and ``uplink_message_f_cnt`` and none of the
    sensor's, and a ChirpStack one ``fCnt``, ``fPort``, ``dr``. Now the readings are the decoded
    payload's numbers, at the time the network received the frame, or at the payload's own
    time when its decoder gives one."""
    at = f"{dt.datetime.fromtimestamp(T / 1000, dt.UTC):%Y-%m-%dT%H:%M:%S}"
    ttn = {"end_device_ids": {"device_id": "eui-70b3", "dev_eui": "70B3D57ED0000001",
                              "application_ids": {"application_id": "farm"}},
           "received_at": f"{at}.200Z",
           "uplink_message": {
               "f_port": 2, "f_cnt": 42, "frm_payload": "AQI=",
               "decoded_payload": {"temperature": 21.5, "humidity": 40, "status": "ok"},
               "rx_metadata": [{"gateway_ids": {"gateway_id": "gw"}, "rssi": -80, "snr": 7.5}],
               "settings": {"data_rate": {"lora": {"spreading_factor": 7}}},
               "received_at": f"{at}.123456789Z"}}
    chirp = {"deduplicationId": "3a1b", "time": f"{at}.5+00:00",
             "deviceInfo": {"deviceName": "soil-1", "devEui": "0101"}, "adr": True, "dr": 5,
             "fCnt": 10, "fPort": 1, "data": "AQ==", "object": {"moisture": 31.2, "temp": 18.0},
             "rxInfo": [{"rssi": -90}]}
    own_time = {**chirp, "object": {"moisture": 30.0, "ts": T + 7}}
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=3)
    cols, bad, _ = d.decode([
        ("v3/farm@ttn/devices/eui-70b3/up", orjson.dumps(ttn), T + 5000),
        ("application/1/device/0101/event/up", orjson.dumps(chirp), T + 5000),
        ("application/1/device/0101/event/up", orjson.dumps(own_time), T + 5000)])
    assert not bad
    got = [(d.devices.names[i], d.metrics.names[m], t - T, v) for i, m, t, v in zip(
        cols.device, cols.metric, cols.ts.tolist(), cols.value.tolist(), strict=True)]
    assert got == [("eui-70b3", "temperature", 123, 21.5), ("eui-70b3", "humidity", 123, 40.0),
                   ("0101", "moisture", 500, 31.2), ("0101", "temp", 500, 18.0),
                   ("0101", "moisture", 7, 30.0)]


def test_readings_without_a_time_need_the_receive_time_policy() -> None:
    timeless = [("devices/z1/readings", orjson.dumps({"temperature": 21.5, "humidity": 40}),
                 T),
                ("devices/z1/readings", orjson.dumps({"metric": "pressure", "value": 1013}), T)]
    cols, bad, samples = decoder().decode(timeless)
    assert len(cols) == 0
    assert bad == {rejects.MISSING_FIELD: 3}
    assert any("receive_time" in s for s in samples)
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, receive_time=True)
    cols, bad, _ = d.decode(timeless)
    assert not bad
    assert cols.ts.tolist() == [T, T, T]
    assert sorted(d.metrics.names[m] for m in cols.metric) == ["humidity", "pressure",
                                                                "temperature"]


def test_a_gateway_on_receive_time_takes_timeless_sensors(tmp_path: Path) -> None:
    """The agent hands its clock policy and ``untimed`` to the decoder: a clockless sensor's
    objects are readings under ``[clock] policy = "receive_time"`` or ``untimed =
    "receive_time"`` (the default), counted rejections under trust with ``untimed = "reject"``."""
    import dataclasses
    import time

    from devices.clock import SystemClock
    from devices.mqtt import BrokerAddress
    from edge.agent import EdgePipeline
    from edge.config import EdgeConfig

    nowhere = BrokerAddress(host="127.0.0.1", port=1)
    now = time.time_ns() // 1_000_000
    msgs = [(f"devices/z{i}/readings", orjson.dumps({"temperature": 20 + i, "humidity": 40}),
             now) for i in range(5)]
    for policy, untimed, accepted in (("trust", "reject", 0), ("receive_time", "reject", 10),
                                      ("trust", "receive_time", 10)):
        cfg = EdgeConfig(gateway="gw", intake_broker=nowhere, uplink_broker=nowhere,
                         untimed=untimed)
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine,
                                                                  clock_policy=policy))
        pipe = EdgePipeline(cfg, SystemClock())
        pipe.process(msgs)
        stats = pipe.stats()
        assert stats["readings_accepted"] == accepted, policy
        assert stats["rejected"] == 10 - accepted, policy
        assert stats.get("rejected_missing_field", 0) == 10 - accepted, policy


def test_a_bare_number_takes_its_metric_from_the_topic(tmp_path: Path) -> None:
    """Shelly / ESPHome: one value per topic (``shellies/<device>/sensor/<metric>``), no time;
    the gateway config names the metric's level, and the receive-time policy gives the time."""
    from edge.config import load_edge_config

    cfg = tmp_path / "g.toml"
    cfg.write_text('[gateway]\nid = "gw"\n[intake]\nbroker = "mqtt://127.0.0.1:1883"\n'
                   'topics = ["shellies/+/sensor/+"]\nmetric_topic_level = 3\n'
                   '[uplink]\nbroker = "mqtt://127.0.0.1:1884"\n[clock]\n'
                   'policy = "receive_time"\n')
    edge = load_edge_config(cfg)
    assert edge.metric_topic_level == 3
    msgs = [("shellies/sh1/sensor/temperature", b"21.50", T),
            ("shellies/sh1/sensor/humidity", b"40", T + 5),
            ("shellies/sh1/sensor/power", orjson.dumps({"value": 12.5, "ts": T - 1000}), T),
            ("shellies/sh1/sensor/status", b"ready", T)]
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=edge.device_topic_level,
                       metric_topic_level=edge.metric_topic_level, receive_time=True)
    cols, bad, _ = d.decode(msgs)
    got = [(d.devices.names[i], d.metrics.names[m], t, v) for i, m, t, v in zip(
        cols.device, cols.metric, cols.ts.tolist(), cols.value.tolist(), strict=True)]
    assert got == [("sh1", "temperature", T, 21.5), ("sh1", "humidity", T + 5, 40.0),
                   ("sh1", "power", T - 1000, 12.5)]
    assert bad == {rejects.MALFORMED_JSON: 1}  # a text that is no number nor an on/off state

    clockless = PayloadDecoder(Interner(), Interner(), device_topic_level=1,
                               metric_topic_level=3)
    cols, bad, samples = clockless.decode(msgs[:1])
    assert (len(cols), bad) == (0, {rejects.MISSING_FIELD: 1})
    assert "receive_time" in samples[0]
    cols, bad, samples = decoder().decode(msgs[:1])  # no metric level configured
    assert (len(cols), bad) == (0, {rejects.MALFORMED_PAYLOAD: 1})
    assert "metric_topic_level" in samples[0]


def test_arrays_of_readings_wrapped_quantities_and_value_objects() -> None:
    """Shapes gateways and cloud SDKs use that nobody announced: an array of reading objects
    (or of metric objects) instead of a ``readings`` batch, which was refused as a SenML pack
    without names; a device's quantities under one generic wrapper (``data``, ``payload``,
    ...), which gave ``data_temperature``; and a quantity as an object with its ``value`` and
    unit, which gave ``temperature_value``. A sensor's own object keeps its name as a prefix
    (Tasmota), and a SenML pack is still one."""
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1)
    msgs = [
        orjson.dumps([{"metric": "temperature", "ts": T, "value": 21.5, "seq": 1},
                      {"device": "t-1", "metric": "humidity", "ts": T, "value": 40}]),
        orjson.dumps([{"ts": T + 1000, "temperature": 21.6}, {"ts": T + 2000, "co2": 600}]),
        orjson.dumps({"deviceId": "t-1", "timestamp": T, "payload": {"pressure": 1013}}),
        orjson.dumps({"ts": T, "data": {"ts": T + 5, "voltage": 3.3, "mode": "eco",
                                        "current": {"value": 0.2, "unit": "A"}}}),
        orjson.dumps({"ts": T, "humidity": 41, "update": {"installed_version": 7},
                      "temperature": {"value": "21.7", "unit": "C", "time": T + 7},
                      "status": {"value": "running"}}),
        orjson.dumps({"ts": T, "AM2301": {"Temperature": 20.6}}),
        orjson.dumps([{"bn": "t-1:", "bt": T / 1000, "n": "level", "v": 0.5}]),
    ]
    cols, bad, _ = d.decode([("devices/t-1/readings", m, T) for m in msgs])
    assert not bad
    got = [(d.metrics.names[m], t - T, v) for m, t, v in
           zip(cols.metric, cols.ts.tolist(), cols.value.tolist(), strict=True)]
    assert got == [("temperature", 0, 21.5), ("humidity", 0, 40.0),
                   ("temperature", 1000, 21.6), ("co2", 2000, 600.0),
                   ("pressure", 0, 1013.0),
                   ("voltage", 5, 3.3), ("current", 5, 0.2),
                   ("humidity", 0, 41.0), ("temperature", 7, 21.7),
                   ("AM2301_Temperature", 0, 20.6),
                   ("level", 0, 0.5)]
    assert cols.seq.tolist()[0] == 1
    # an element of an array of readings that is no object, or claims another device
    d = PayloadDecoder(Interner(), Interner(), device_topic_level=1, topic_identity=True)
    cols, bad, _ = d.decode([("devices/t-1/readings", orjson.dumps(
        [{"metric": "t", "ts": T, "value": 1}, 5, {"device": "t-2", "metric": "t", "ts": T,
                                                   "value": 2}]), T)])
    assert cols.value.tolist() == [1.0]
    assert bad == {rejects.MALFORMED_PAYLOAD: 1, rejects.DEVICE_MISMATCH: 1}


def test_a_byte_order_mark_and_c_strings_nul_bytes_around_json_are_not_the_payload() -> None:
    """A UTF-8 byte order mark in front (Notepad's file sent with ``mosquitto_pub -f``) and
    the NUL bytes C firmware sends behind (``strlen(buf) + 1``) are framing, not JSON: the
    readings inside are taken, in every shape; anything else around JSON stays refused."""
    single = encode_single("d1", "temperature", T, 21.5, 1)
    batch = encode_batch("d1", [("temperature", T + 1000, 21.75, 2)])
    senml = encode_senml("d1", [("temperature", T + 2000, 22.0, 3)])
    metrics = orjson.dumps({"ts": T + 3000, "humidity": 40})
    framed = [b"\xef\xbb\xbf" + single, batch + b"\x00", b"\xef\xbb\xbf" + senml + b"\x00" * 7,
              metrics + b"\x00"]
    d = decoder()
    cols, bad, _ = d.decode([("devices/d1/readings", p, 0) for p in framed])
    assert not bad
    assert cols.ts.tolist() == [T, T + 1000, T + 2000, T + 3000]
    assert cols.value.tolist() == [21.5, 21.75, 22.0, 40.0]
    assert cols.seq.tolist()[:3] == [1, 2, 3]
    # a NUL or a mark anywhere else, another encoding's mark, or a mark alone: refused
    refused = [single[:-1] + b"\x00}", b"\x00" + single, b"\xff\xfe" + single, b"\xef\xbb\xbf",
               b"\x00\x00", single + b"\x00x"]
    cols, bad, _ = decoder().decode([("devices/d1/readings", p, 0) for p in refused])
    assert len(cols) == 0
    assert sum(bad.values()) == len(refused)
    assert set(bad) == {rejects.MALFORMED_JSON}
