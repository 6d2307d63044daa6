"""Device payload codecs: what sensors publish, decoded straight into columns.

Three shapes are understood, told apart by the payload itself so one gateway can serve a mixed
fleet:

* a single reading, a JSON object:
  ``{"device": "t-001", "metric": "temperature", "ts": 1700000000000, "value": 21.5, "seq": 42}``
* a batch from one device, a JSON object with ``readings``:
  ``{"device": "t-001", "readings": [{"metric": "humidity", "ts": ..., "value": ..., "seq": 1}]}``
* a SenML pack (RFC 8428), a JSON array: ``[{"bn": "t-001:", "bt": 1700000000.0,
  "n": "temperature", "u": "Cel", "v": 21.5}]``; the device is the base name up to its last
  ``:`` or ``/``, times are seconds (relative to now when below 2**28, as the RFC says);
* an object of metric names and numbers, as many off-the-shelf sensors and bridges publish
  (Zigbee2MQTT, ESPHome, Tasmota-style firmware):
  ``{"ts": 1700000000000, "temperature": 21.5, "humidity": 40}``: one reading per member whose
  value is a number, at ``ts`` (or ``time`` / ``timestamp`` / Tasmota's ``Time`` /
  Zigbee2MQTT's ``last_seen``). An object
  with no number at its own level has one per numeric member of each object inside it, named
  ``<outer>_<inner>`` with anything but letters, digits and ``_`` written as ``_`` (Tasmota's
  ``{"Time": "2026-12-03T09:00:00+01:00", "DS18B20-1": {"Temperature": 20.6}}`` is
  ``DS18B20_1_Temperature``). An on/off state is a reading of 1 or 0: JSON ``true``/``false``
  (Zigbee2MQTT's ``contact``, ``occupancy``, ``water_leak``) and the texts ``ON``/``OFF`` (or
  ``on``/``off``). Members that are none of these (another text, a list, an object beside
  top-level numbers, an object deeper down) are no readings: left out, each name logged once.
  An object whose one object holds the sensors' objects, with no number of its own
  but a time, is an envelope: Shelly's RPC notification ``{"method": "NotifyStatus", "params":
  {"ts": 1767225600.12, "temperature:0": {"id": 0, "tC": 21.5}}}`` is ``temperature_0_tC`` at
  ``params.ts`` (``id`` is never a reading). A ``seq`` is not used there (it would name several
  readings at once). A LoRaWAN network server's uplink event is the device's decoded payload at
  the time the network received it (The Things Stack's ``uplink_message.decoded_payload`` at
  ``received_at``, ChirpStack's ``object`` at ``time``), not its frame counter or radio figures;
* an array of any of the object shapes above, each read as if sent alone (an array is a SenML
  pack only when a record carries SenML's own labels); within an object of metrics, a
  quantity given as an object with its ``value`` (``{"temperature": {"value": 21.5, "unit":
  "C"}}``) is a reading of ``temperature``, and the members of one generic wrapper
  (``{"data": {"temperature": 21.5}}``, see ``_WRAPPERS``) are named as they are inside it;
* a bare number on a topic that names the metric (``metric_topic_level``), as ESPHome and
  Shelly devices publish each value (``shellies/<device>/sensor/temperature``: ``21.5``), or a
  bare state (ESPHome's binary sensors ``ON``/``OFF``, Shelly's relays ``on``/``off``: 1 or 0);
  an object with ``value`` but no ``metric`` takes its metric from such a topic too. A
  ``value`` may be ``true``/``false`` (SenML: ``vb``), a reading of 1 or 0, and a number
  written as text in decimal notation (``"value": "21.5"``, a bare ``"21.5"``) is that number,
  where a value must be one; a metric object's texts stay no readings (they are versions and
  identifiers: ``"fw": "1.2"``).

A UTF-8 byte order mark before JSON and C strings' NUL bytes after it are framing, not the
payload (``_unframed``).

A Sparkplug B message (a topic under ``spBv1.0/``) is read by ``devices.sparkplug``: see
``PayloadDecoder._sparkplug``.

A reading without any time takes the time the gateway received the message when the gateway
is told to (``untimed``: ``[clock] untimed = "receive_time"``, as shipped, for the many devices
that keep no clock, Zigbee2MQTT's and ESPHome's among them; or ``[clock] policy =
"receive_time"``, which takes it for every reading); otherwise it is refused
(``missing_field``). So is a time text without a UTC offset (its zone is unknown: Tasmota's
local ``Time`` unless ``SetOption52 1`` adds the offset), refused as ``wrong_type`` otherwise.
Each reading so stamped is counted (the agent's ``readings_untimed``), and so is a SenML
record whose time is relative (reckoned from the receipt, as the RFC says): such readings are
told apart by nothing but their ``seq``, so without one they are never judged duplicates
(``STAMPED_SEQ``). Under the policy any
time text the gateway cannot read is no matter either: the policy replaces every device time.

``ts`` is event time in integer epoch milliseconds; epoch seconds (with a fraction or not),
microseconds and nanoseconds are recognised by magnitude (``devices.readings.epoch_ms``), and an
ISO 8601 string with a UTC offset is taken too, as is an epoch number written as text
(``"1767225600"``). ``device`` may be omitted when the topic
carries it. ``seq`` is optional: a per-device counter that lets duplicates and gaps be seen.

One bad reading in a batch rejects that reading, never its neighbours; every rejection is counted
under its reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from msgspec import UNSET, UnsetType

from devices import rejects, sparkplug
from devices.readings import (
    NO_SEQ,
    SECONDS_BELOW,
    SECONDS_FROM,
    STAMPED_SEQ,
    ColumnBuilder,
    Interner,
    ReadingColumns,
)

MAX_DEVICE_ID = 128
INT_LIMIT = 1 << 62  # integers beyond this cannot be a time, a sequence number or a reading
SENML_RELATIVE_LIMIT = 2**28  # RFC 8428 4.5.3: smaller times are relative to "now"


log = logging.getLogger("fieldline.codecs")
MAX_NESTING = 64  # deeper than any reading needs; orjson itself stops at 1,024
# an object of metric names and numbers: where its time is (the first found), and what else is
# no metric
# "Time": Tasmota's; "last_seen": Zigbee2MQTT's (when its advanced.last_seen option is on: when
# the coordinator heard the device, ISO 8601 with an offset or epoch milliseconds)
_TIME_MEMBERS = ("ts", "time", "timestamp", "Time", "last_seen")
# ("id": a component's number, as Shelly's {"id": 0, "tC": 21.5}: no quantity)
_NOT_METRICS = frozenset({*_TIME_MEMBERS, "device", "seq", "id"})
_MAX_LOGGED = 64
# A switch's or a contact's state, as devices and bridges write it: JSON true/false, and the
# texts ESPHome, Tasmota and Zigbee2MQTT publish by default (Shelly's first generation in lower
# case). Each is a reading of 1 or 0, so a window's mean is the fraction of it spent on/open.
_STATES: dict[object, float] = {True: 1.0, False: 0.0, "ON": 1.0, "OFF": 0.0, "on": 1.0,
                                "off": 0.0}
_BARE_STATES = {b"ON": 1.0, b"OFF": 0.0, b"on": 1.0, b"off": 0.0}
# A number written as text where a value must be one (``"value": "21.5"``, as flows built in
# Node-RED and bridges that pass everything on as strings publish it): plain decimal notation
# only, so "0x1F", "1_000", "inf" or "21.5 C" stay refused. Not for members of a metric object,
# whose texts are identifiers and versions ("fw": "1.2", "channel": "3"), no quantities.
_NUMBER_TEXT = re.compile(r"\s*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?\s*", re.ASCII)
_INTEGER_TEXT = re.compile(r"\s*[-+]?\d+\s*", re.ASCII)
_MAX_NUMBER_TEXT = 64
_NOT_NAME = re.compile(r"[^A-Za-z0-9_]")  # what a metric name cannot hold (devices.catalog)
# A JSON array is a SenML pack when a record has one of SenML's own labels (RFC 8428 2.5, less
# "t" and "u", which short-named sensors use for temperature); else an array of readings
_SENML_KEYS = frozenset({"n", "bn", "bt", "bu", "bv", "bs", "bver", "v", "vs", "vb", "vd",
                         "s", "ut"})
# An object wrapping a device's quantities under one generic name: its members are named as
# they are (``{"ts": .., "data": {"temperature": 21.5}}`` is ``temperature``, not
# ``data_temperature``); a sensor's object (Tasmota's ``AM2301``) keeps its name as a prefix
_WRAPPERS = frozenset({"data", "payload", "values", "measurements", "telemetry", "fields",
                       "sensors", "reading"})
# Sparkplug B: metrics that are an edge node's controls, properties or session number, not
# measurements; and how many aliases and data types of births are remembered at most
_SP_PREFIX = sparkplug.NAMESPACE + "/"
_SP_NOT_READINGS = ("Node Control/", "Device Control/", "Properties/", "bdSeq")
_SP_MAX_NAMES = 200_000


def _envelope(doc: dict[str, Any]) -> tuple[dict[str, Any], object] | None:
    """The one object of ``doc`` that holds the sensors' objects (and perhaps a time) and no
    number of its own: Shelly's RPC notification ``{"src": .., "method": "NotifyStatus",
    "params": {"ts": 1767225600.12, "temperature:0": {"id": 0, "tC": 21.5}}}``; with the time
    found in it. None when ``doc`` is not such an envelope."""
    objects = [v for v in doc.values() if type(v) is dict]
    if len(objects) != 1:
        return None
    inner = objects[0]
    if any((type(v) is int or type(v) is float) and k not in _TIME_MEMBERS
           for k, v in inner.items()) or not any(type(v) is dict for v in inner.values()):
        return None
    return inner, next((inner[k] for k in _TIME_MEMBERS if k in inner), None)


def _network_server(doc: dict[str, Any]) -> dict[str, Any] | None:
    """A LoRaWAN network server's uplink event, as the readings it carries: the device's decoded
    payload, at its own time if the decoder gives one, else when the network received it. The
    Things Stack (v3): ``{"end_device_ids": {..}, "received_at": "..Z", "uplink_message":
    {"f_cnt": 42, "decoded_payload": {"temperature": 21.5}, "received_at": "..Z", ..}}``;
    ChirpStack (v4): ``{"deviceInfo": {..}, "time": "..Z", "fCnt": 42, "object": {..}}``. The
    frame counter, port and radio figures beside them are no readings. None for anything else."""
    up = doc.get("uplink_message")
    if type(up) is dict and type(up.get("decoded_payload")) is dict:
        readings, at = up["decoded_payload"], up.get("received_at", doc.get("received_at"))
    elif type(doc.get("object")) is dict and type(doc.get("deviceInfo")) is dict:
        readings, at = doc["object"], doc.get("time")
    else:
        return None
    if at is None or any(k in readings for k in _TIME_MEMBERS):
        return dict(readings)
    return {**readings, "ts": at}


def _iso_ms(text: str) -> int | None:
    """An ISO 8601 date-time with a UTC offset (``2026-12-03T09:00:00.5Z``) in epoch ms; None
    for anything else, a time without an offset included (whose zone nobody knows)."""
    if len(text) > 40:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if t.tzinfo is None:
        return None
    return round(t.timestamp() * 1000)


def _state(value: object) -> float | None:
    """An on/off state's reading (1 or 0), or None for anything else (not a number: 1 == True
    would find True's entry)."""
    return _STATES.get(value) if type(value) is bool or type(value) is str else None


def _value_text(value: str) -> float | None:
    """What a value given as text reads as: an on/off state's 1 or 0, or a number in decimal
    notation; None for any other text."""
    state = _STATES.get(value)
    if state is not None:
        return state
    if len(value) <= _MAX_NUMBER_TEXT and _NUMBER_TEXT.fullmatch(value):
        return float(value)
    return None


def _time_text(text: str) -> int | float | None:
    """An event time given as text: ISO 8601 with a UTC offset (epoch ms), or an epoch number
    in decimal notation (``"1767225600"``), left for the magnitude rules like any number."""
    iso = _iso_ms(text)
    if iso is not None:
        return iso
    if len(text) > _MAX_NUMBER_TEXT or not _NUMBER_TEXT.fullmatch(text):
        return None
    return int(text) if _INTEGER_TEXT.fullmatch(text) else float(text)


def _zoneless(text: str) -> bool:
    """An ISO 8601 date-time without a UTC offset (a local time whose zone nobody knows)."""
    if len(text) > 40:
        return False
    try:
        return dt.datetime.fromisoformat(text).tzinfo is None
    except ValueError:
        return False


_BOM = b"\xef\xbb\xbf"


def _unframed(payload: bytes) -> bytes:
    """A JSON text without what some publishers put around it: a UTF-8 byte order mark in
    front (a file saved by Windows' Notepad and sent with ``mosquitto_pub -f``, .NET's and
    PowerShell's UTF-8 writers; RFC 8259 lets a parser ignore it) and C strings' terminating
    NUL bytes behind (firmware publishing ``strlen(buf) + 1`` or ``sizeof(buf)`` bytes).
    JSON has no other use for either."""
    if payload[:3] == _BOM:
        payload = payload[3:]
    return payload.rstrip(b"\x00")


def _loads(payload: bytes) -> tuple[Any, str | None]:
    """Parse one payload; never raises (a payload no parser takes is ``malformed_json``)."""
    try:
        return orjson.loads(payload), None
    except orjson.JSONDecodeError:
        # orjson is strict JSON; devices written in Python happily emit NaN/Infinity. Parse those
        # with the lenient decoder so they are rejected as not_finite, not as garbage; but not a
        # deeply nested payload, which would take the recursive decoder down with it.
        if (b"NaN" in payload or b"Infinity" in payload) and _depth(payload) <= MAX_NESTING:
            try:
                return json.loads(payload), None
            except (ValueError, UnicodeDecodeError, RecursionError):
                pass
        return None, rejects.MALFORMED_JSON


def _depth(payload: bytes) -> int:
    """The deepest bracket nesting of a payload (strings ignored roughly: brackets inside
    strings only make the estimate larger, never smaller)."""
    depth = deepest = 0
    for b in payload.translate(None, delete=_NOT_BRACKETS):
        depth += 1 if b in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def _topic_level(topic: str, level: int | None) -> str | None:
    """Level ``level`` of ``topic`` (None: no such level, or none configured)."""
    if level is None:
        return None
    parts = topic.split("/")
    return parts[level] if level < len(parts) else None


def _device_ok(device: object, topic: str, reject: Any) -> bool:
    """A usable device id; otherwise the message is rejected, saying why."""
    if _valid_device_id(device):
        return True
    reject(rejects.MISSING_FIELD if device is None else rejects.WRONG_TYPE,
           f"{topic}: bad or missing device id {device!r}")
    return False


def _valid_device_id(d: object) -> bool:
    """A device id is 1-128 characters without MQTT's topic separators and wildcards, spaces,
    control characters or backslashes: what every hop (topics, line protocol, InfluxDB tags)
    carries unchanged (an id ending in a backslash lost it in InfluxDB and merged with the id
    without it)."""
    return (
        isinstance(d, str)
        and 0 < len(d) <= MAX_DEVICE_ID
        and not any(c in d for c in "/+# \\")
        and d.isprintable()
    )


# What the fast paths take, typed for msgspec: anything else (a missing field, a wrong type, a
# number out of range, NaN) fails the typed decode and goes the per-reading way, which rejects
# precisely what is wrong. The ranges are those ``_one`` checks (a float value beyond 2**62 is
# a good reading the fast path leaves to it).
_Int = Annotated[int, msgspec.Meta(gt=-INT_LIMIT, lt=INT_LIMIT)]
_Seq = Annotated[int, msgspec.Meta(ge=NO_SEQ, lt=INT_LIMIT)]
_Float = Annotated[float, msgspec.Meta(gt=-float(INT_LIMIT), lt=float(INT_LIMIT))]


class _Reading(msgspec.Struct, gc=False):
    metric: Annotated[str, msgspec.Meta(min_length=1)]
    ts: _Int
    value: _Float
    seq: _Seq = NO_SEQ


class _Batch(msgspec.Struct):
    readings: list[_Reading]
    device: str | None = None  # (null: as absent, the topic's device)


class _Record(msgspec.Struct, gc=False):  # a SenML record
    n: str
    v: _Float
    t: _Float = 0.0
    bn: str | UnsetType = UNSET  # (a null base name is wrong, not absent: no default None)
    bt: _Float | UnsetType = UNSET
    seq: _Seq = NO_SEQ


_BATCH = msgspec.json.Decoder(_Batch)
_PACK = msgspec.json.Decoder(list[_Record])


def _no_reject(*_args: object) -> None:
    """The fast paths only ask; the per-reading path counts the rejection."""


class PayloadDecoder:
    """Decodes raw MQTT messages into ``ReadingColumns``, counting what it cannot use."""

    def __init__(
        self,
        devices: Interner,
        metrics: Interner,
        *,
        device_topic_level: int | None = 1,
        max_payload_bytes: int = 256 * 1024,
        known_metric: Callable[[str], bool] | None = None,
        known_device: Callable[[str], bool] | None = None,
        admit_device: Callable[[str, int], str | None] | None = None,
        topic_identity: bool = False,
        receive_time: bool = False,
        untimed: bool = False,
        metric_topic_level: int | None = None,
    ) -> None:
        self.devices = devices
        self.metrics = metrics
        # metric names outside the catalog are rejected before they take one of the few metric
        # ids (a flood of made-up names would otherwise lock out sensor kinds added later)
        self.known_metric = known_metric
        self.known_device = known_device  # likewise device ids, when only registered ones count
        # and a new device id may be refused (a reason) before it takes one: a bound, a rate
        self.admit_device = admit_device
        self.device_topic_level = device_topic_level
        self.metric_topic_level = metric_topic_level  # the level naming the metric, if any
        # the topic names the device, and a payload may not claim another (the broker's ACL
        # binds each device's credentials to its own topic: the payload is only its word)
        self.topic_identity = topic_identity and device_topic_level is not None
        self.max_payload_bytes = max_payload_bytes
        # event time is the receive time (the clock policy): a reading needs none of its own
        self.receive_time = receive_time
        # a reading without a time of its own (or with a local time of unknown zone) takes the
        # receive time; the others keep theirs. Counted: readings stamped so, cumulative
        self.untimed = untimed
        self.untimed_taken = 0
        self.rejected_devices: list[tuple[int, str]] = []
        self._not_readings: set[str] = set()  # members of metric objects left out (logged once)
        # Sparkplug B: what each device's birth said of its metrics (name by alias, data type
        # by name), kept in the agent's checkpoint; and the edge nodes (group, node) whose
        # data named an alias no birth had: the agent asks them to publish their births again
        self.sp_alias: dict[tuple[str, int], str] = {}
        self.sp_type: dict[tuple[str, str], int] = {}
        self.rebirth_wanted: set[tuple[str, str]] = set()

    def _topic_device(self, topic: str) -> str | None:
        return _topic_level(topic, self.device_topic_level)

    def _claim_ok(self, claimed: object, topic: str, reject: Any) -> bool:
        """Under topic identity, a payload naming another device than its topic is refused
        (counted against the topic's device, whose credentials sent it)."""
        if not self.topic_identity:
            return True
        mine = self._topic_device(topic)
        if mine is None or claimed == mine:
            return True
        reject(rejects.DEVICE_MISMATCH, f"{topic}: the payload claims device {claimed!r}")
        return False

    def decode(
        self, messages: list[tuple[str, bytes, int]]
    ) -> tuple[ReadingColumns, Counter[str], list[str]]:
        """Decode ``(topic, payload, recv_ms)`` triples.

        Returns the readings, rejection counts by reason, and up to a few sample details of the
        rejections for the log. ``self.rejected_devices`` then holds, per rejection, the id of
        its device when the device is already known (-1 otherwise: a garbage id, a device
        outside the registry or a metric outside the catalog is never interned, so bad input
        cannot grow the agent's tables).
        """
        out = ColumnBuilder()
        bad: Counter[str] = Counter()
        samples: list[str] = []
        rejected: list[tuple[int, str]] = []
        self.rejected_devices = rejected
        current: list[str | None] = [None]

        def reject(reason: str, detail: str, device_id: int | None = None) -> None:
            bad[reason] += 1
            if device_id is None:
                name = current[0]
                device_id = self.devices.get(name) if name is not None else None
            rejected.append((-1 if device_id is None else device_id, reason))
            if len(samples) < 5:
                samples.append(f"{reason}: {detail}")

        for topic, payload, recv in messages:
            mark = len(out)
            try:
                self._message(topic, payload, recv, out, reject, current)
            except Exception as exc:  # no payload may raise out of decoding: it is rejected
                out.truncate(mark)  # whatever it had added
                reject(rejects.MALFORMED_PAYLOAD, f"{topic}: undecodable ({type(exc).__name__})")
                log.warning("payload on %s could not be decoded: %r", topic, exc)
        return out.build(), bad, samples

    def _message(self, topic: str, payload: bytes, recv: int, out: ColumnBuilder,
                 reject: Any, current: list[str | None]) -> None:
        """One message's readings into ``out`` (or its rejections)."""
        current[0] = self._topic_device(topic)
        if len(payload) > self.max_payload_bytes:
            reject(rejects.PAYLOAD_TOO_LARGE, f"{topic}: {len(payload)} bytes")
            return
        if topic.startswith(_SP_PREFIX):
            self._sparkplug(topic, payload, recv, out, reject, current)
            return
        if payload[:3] == _BOM or payload[-1:] == b"\x00":
            payload = _unframed(payload)
        head = payload[:1]
        if head == b"{" and b'"readings"' in payload:
            if self._batch_fast(payload, topic, recv, out):
                return
        elif head == b"[" and self._senml_fast(payload, topic, recv, out):
            return
        doc, err = _loads(payload)
        if err is not None and payload.strip() in _BARE_STATES:  # ESPHome, Tasmota's POWER
            doc, err = _BARE_STATES[payload.strip()], None
        if err is not None:
            reject(err, f"{topic}: {payload[:60]!r}")
            return
        if isinstance(doc, dict):
            self._object(doc, topic, recv, out, reject, current)
        elif isinstance(doc, list):
            if not doc:
                reject(rejects.MALFORMED_PAYLOAD, f"{topic}: an empty SenML pack")
            elif any(type(r) is dict and not _SENML_KEYS.isdisjoint(r) for r in doc):
                self._senml(doc, topic, recv, out, reject)
            else:  # an array of readings (or of metric objects), each as if sent alone
                for r in doc:
                    if type(r) is dict:
                        self._object(r, topic, recv, out, reject, current)
                    else:
                        reject(rejects.MALFORMED_PAYLOAD, f"{topic}: an array of readings "
                               f"holds a {type(r).__name__}, not an object")
        elif type(doc) not in (int, float, bool, str):
            reject(rejects.MALFORMED_PAYLOAD, f"{topic}: top level is {type(doc).__name__}")
        elif type(doc) is str and _value_text(doc) is None:
            reject(rejects.MALFORMED_PAYLOAD, f"{topic}: top level is a text, neither a number "
                   "nor an on/off state")
        elif self.metric_topic_level is None:
            reject(rejects.MALFORMED_PAYLOAD, f"{topic}: top level is {type(doc).__name__}: a "
                   "bare number needs its metric in the topic (intake.metric_topic_level)")
        elif _device_ok(current[0], topic, reject):
            assert current[0] is not None
            self._one({"metric": _topic_level(topic, self.metric_topic_level), "ts": None,
                       "value": doc}, current[0], recv, out, reject)

    # ---- fast paths: a whole batch of well-formed readings at once --------------------------
    # They take a batch only when every reading in it would pass ``_one``'s checks, and then add
    # exactly what ``_one`` would have added; anything else (one missing field, one odd type, a
    # device or metric that is refused) and they add nothing and say so, and the batch goes
    # through the per-reading path that rejects precisely what is wrong.

    def _ids(self, device: str, metrics: list[str], recv: int) -> tuple[int, dict[str, int]] | None:
        """The device's id and the id of each metric of a batch, when all are admitted without
        a rejection. New metric names get their ids in order of appearance, as on the
        per-reading path."""
        distinct = set(metrics)
        if len(distinct) > 64 or "" in distinct:
            return None
        if self.known_device is not None and not self.known_device(device):
            return None
        new = [m for m in distinct if self.metrics.get(m) is None]
        if new and self.known_metric is not None and not all(map(self.known_metric, new)):
            return None
        # nothing is interned until the device is admitted, as on the per-reading path
        d = self.devices.get(device)
        if d is None:
            if self.admit_device and self.admit_device(device, recv) is not None:
                return None  # the per-reading path refuses (and counts) each of them
            d = self.devices.intern(device)
        order = dict.fromkeys(metrics) if new else distinct
        mids = {m: self.metrics.intern(m) for m in order}
        if d < 0 or min(mids.values()) < 0:
            return None
        return d, mids

    def _batch_fast(self, payload: bytes, topic: str, recv: int, out: ColumnBuilder) -> bool:
        """A ``readings`` batch whose every reading has a metric name, an integer ``ts``, a
        finite number ``value`` and an integer ``seq`` or none, decoded by msgspec straight into
        typed records (the types and ranges checked in C, as it parses)."""
        try:
            doc = _BATCH.decode(payload)
        except msgspec.DecodeError:  # (a ValidationError is one)
            return False
        rs = doc.readings
        device = doc.device
        if device is None:
            device = self._topic_device(topic)
        elif not self._claim_ok(device, topic, _no_reject):
            return False
        if not rs or not _valid_device_id(device):
            return False
        assert device is not None
        metrics = [r.metric for r in rs]
        return self._columns_fast(device, metrics, [r.ts for r in rs], [r.value for r in rs],
                                  [r.seq for r in rs], recv, out)

    def _columns_fast(self, device: str, metrics: list[str], ts: list[int],
                      values: list[float], seqs: list[int], recv: int, out: ColumnBuilder) -> bool:
        """The device and metric checks ``_one`` makes, for a batch whose fields are already
        known to be good."""
        ids = self._ids(device, metrics, recv)
        if ids is None:
            return False
        d, mids = ids
        metric = list(map(mids.__getitem__, metrics)) if len(mids) > 1 else \
            [mids[metrics[0]]] * len(ts)
        out.add_batch(d, metric, ts, values, seqs, recv)
        return True

    def _senml_fast(self, payload: bytes, topic: str, recv: int, out: ColumnBuilder) -> bool:
        """A SenML pack from one device: a base name ``<device>:`` (or ``/``) and base time in
        its first record only, plain metric names, numeric ``t`` and ``v`` (typed by msgspec
        as it parses, as ``_batch_fast``)."""
        try:
            pack = _PACK.decode(payload)
        except msgspec.DecodeError:
            return False
        if not pack:
            return False
        first = pack[0]
        bn, bt = first.bn, first.bt
        if bn is UNSET or not bn or bn[-1] not in ":/":
            return False
        device = bn[:-1]
        if not _valid_device_id(device) or not self._claim_ok(device, topic, _no_reject):
            return False
        if [r for r in pack[1:] if r.bn is not UNSET or r.bt is not UNSET]:
            return False  # (a list comprehension: a third faster here than any() of a generator)
        names = [r.n for r in pack]
        joined = "".join(names)
        if ":" in joined or "/" in joined:
            return False
        # as the per-reading path: seconds = bt + float(t), rounded to ms half to even (as
        # round() does), relative to the receive time below 2**28 s
        seconds = np.array([r.t for r in pack], np.float64) + (0.0 if bt is UNSET else bt)
        ms = np.rint(seconds * 1000.0)
        if not np.isfinite(ms).all() or np.abs(ms).max() >= INT_LIMIT:
            return False
        ts = ms.astype(np.int64)
        relative = np.abs(seconds) < SENML_RELATIVE_LIMIT
        seqs = [r.seq for r in pack]
        placed = 0
        if relative.any():  # placed by the receipt: as readings without a time (_one)
            ts[relative] += recv
            placed = int(relative.sum())
            for i in np.flatnonzero(relative).tolist():
                if seqs[i] == NO_SEQ:
                    seqs[i] = STAMPED_SEQ
        if not self._columns_fast(device, names, ts.tolist(), [r.v for r in pack], seqs, recv,
                                  out):
            return False
        self.untimed_taken += placed
        return True

    def _object(self, doc: dict[str, Any], topic: str, recv: int, out: ColumnBuilder,
                reject: Any, current: list[str | None]) -> None:
        """One JSON object: a reading, a batch (``readings``) or an object of metrics."""
        device = doc.get("device")
        if device is None:
            device = self._topic_device(topic)
        elif not self._claim_ok(device, topic, reject):
            return
        if not _device_ok(device, topic, reject):
            return
        assert isinstance(device, str)
        current[0] = device
        readings = doc.get("readings")
        if readings is None and "metric" not in doc and "value" not in doc:
            self._members(doc, device, recv, out, reject)
        elif readings is None:
            metric = _topic_level(topic, self.metric_topic_level)
            if metric and "metric" not in doc:
                doc = {**doc, "metric": metric}
            self._one(doc, device, recv, out, reject)
        elif isinstance(readings, list):
            if not readings:
                reject(rejects.MALFORMED_PAYLOAD, f"{topic}: an empty batch")
            for r in readings:
                if isinstance(r, dict):
                    self._one(r, device, recv, out, reject)
                else:
                    reject(rejects.MALFORMED_PAYLOAD, f"{topic}: reading is not an object")
        else:
            reject(rejects.MALFORMED_PAYLOAD, f"{topic}: 'readings' is not a list")

    def _sparkplug(self, topic: str, payload: bytes, recv: int, out: ColumnBuilder,
                   reject: Any, current: list[str | None]) -> None:
        """A Sparkplug B message (``devices.sparkplug``): births and data are readings of the
        device ``<edge node>`` (node metrics) or ``<edge node>.<device>``, each metric named
        as a metric name may be (``Inputs/Temperature``: ``Inputs_Temperature``); deaths and
        commands carry none, nor does a host application's ``STATE``."""
        parts = sparkplug.topic_parts(topic)
        if parts is None:
            if topic.split("/")[1:2] != ["STATE"]:
                reject(rejects.MALFORMED_PAYLOAD, f"{topic}: not a Sparkplug B topic "
                       "(spBv1.0/<group>/<type>/<edge node>[/<device>])")
            return
        group, kind, node, dev = parts
        if kind not in sparkplug.READING_MESSAGES:
            return
        device = node if dev is None else f"{node}.{dev}"
        current[0] = device
        if not _device_ok(device, topic, reject):
            return
        try:
            msg = sparkplug.decode_payload(payload)
        except sparkplug.SparkplugError as exc:
            reject(rejects.MALFORMED_PAYLOAD, f"{topic}: not a Sparkplug B payload ({exc})")
            return
        birth = kind.endswith("BIRTH")
        room = len(self.sp_alias) + len(self.sp_type) < _SP_MAX_NAMES
        for m in msg.metrics:
            name = m.name
            if name is None and m.alias is not None:
                name = self.sp_alias.get((device, m.alias))
            if name is None:
                self.rebirth_wanted.add((group, node))
                reject(rejects.MISSING_FIELD, f"{device}: Sparkplug B metric alias {m.alias} "
                       "was named in a birth certificate the agent did not see (it asks the "
                       "edge node for its births again)")
                continue
            if birth and room:
                if m.alias is not None:
                    self.sp_alias[(device, m.alias)] = name
                if m.datatype is not None:
                    self.sp_type[(device, name)] = m.datatype
            if name.startswith(_SP_NOT_READINGS):
                continue
            datatype = m.datatype if m.datatype is not None else self.sp_type.get((device, name))
            value = m.reading(datatype)
            if value is None:
                if not m.is_null:
                    self._not_a_reading(name, device)
                continue
            self._one({"metric": _NOT_NAME.sub("_", name),
                       "ts": m.ts if m.ts is not None else msg.ts, "value": value},
                      device, recv, out, reject)

    def _not_a_reading(self, name: str, device: str) -> None:
        if name not in self._not_readings and len(self._not_readings) < _MAX_LOGGED:
            self._not_readings.add(name)
            log.info("member %r of %s's messages is no number: not a reading (logged once)",
                     name, device)

    def _members(self, doc: dict[str, Any], device: str, recv: int, out: ColumnBuilder,
                 reject: Any) -> None:
        """An object of metric names and numbers: a reading per numeric member. An object
        without any, whose numbers are all one object down (Tasmota's sensors:
        ``{"DS18B20-1": {"Temperature": 20.6}}``), has a reading per numeric member of each
        object inside it, named ``<outer>_<inner>`` with what a metric name cannot hold written
        as ``_`` (``DS18B20_1_Temperature``). Where the numbers are at the top (Zigbee2MQTT), the
        objects beside them are metadata (``"update": {"installed_version": ..}``): no readings."""
        lorawan = _network_server(doc)
        if lorawan is not None:
            doc = lorawan
        ts = next((doc[k] for k in _TIME_MEMBERS if k in doc), None)
        nested = not any(type(v) is int or type(v) is float
                         for k, v in doc.items() if k not in _NOT_METRICS)
        if nested:  # an envelope around the sensors' objects: the objects inside its one object
            env = _envelope(doc)
            if env is not None:
                doc, ts = env[0], env[1] if ts is None else ts
        found = False
        for name, value in doc.items():
            if name in _NOT_METRICS:
                continue
            if type(value) is dict and "value" in value:  # {"temperature": {"value": 21.5, ..}}
                found = self._valued(name, value, ts, device, recv, out, reject) or found
            elif nested and type(value) is dict:
                wrapper = name in _WRAPPERS  # its own time, if it has one, is its members'
                inner_ts = next((value[k] for k in _TIME_MEMBERS if k in value), ts) \
                    if wrapper else ts
                for inner, v in value.items():
                    if inner in _NOT_METRICS:
                        continue
                    metric = inner if wrapper else f"{name}_{inner}"
                    if wrapper and type(v) is dict and "value" in v:
                        found = self._valued(metric, v, inner_ts, device, recv, out,
                                             reject) or found
                        continue
                    found = self._member(_NOT_NAME.sub("_", metric), v, inner_ts, device, recv,
                                         out, reject) or found
            else:
                found = self._member(name, value, ts, device, recv, out, reject) or found
        if not found:
            reject(rejects.MISSING_FIELD, f"{device}: needs metric, ts and value (or metric "
                   "names with numbers)")

    def _valued(self, name: str, obj: dict[str, Any], ts: object, device: str, recv: int,
                out: ColumnBuilder, reject: Any) -> bool:
        """A quantity given as an object with its ``value`` (and perhaps its unit and its own
        time): ``{"temperature": {"value": 21.5, "unit": "C"}}`` is a reading of
        ``temperature``."""
        value = obj["value"]
        if not (type(value) is int or type(value) is float or type(value) is bool
                or (type(value) is str and _value_text(value) is not None)):
            self._not_a_reading(name, device)  # {"status": {"value": "running"}}
            return False
        own = next((obj[k] for k in _TIME_MEMBERS if k in obj), ts)
        self._one({"metric": _NOT_NAME.sub("_", name), "ts": own, "value": value},
                  device, recv, out, reject)
        return True

    def _member(self, name: str, value: object, ts: object, device: str, recv: int,
                out: ColumnBuilder, reject: Any) -> bool:
        """One member of a metric object: a reading when it is a number or an on/off state
        (True), otherwise logged once by name."""
        if type(value) is int or type(value) is float or _state(value) is not None:
            self._one({"metric": name, "ts": ts, "value": value}, device, recv, out, reject)
            return True
        self._not_a_reading(name, device)
        return False

    def _one(self, r: dict[str, Any], device: str, recv: int, out: ColumnBuilder,
             reject: Any, *, placed: bool = False) -> None:
        """One reading; ``placed``: its ``ts`` was reckoned from the receipt (SenML's relative
        times), so it counts as stamped, as a reading without a time does."""
        metric = r.get("metric")
        ts = r.get("ts")
        value = r.get("value")
        seq = r.get("seq", NO_SEQ)
        stamped = ts is None and (self.receive_time or self.untimed)
        if stamped:
            ts = recv  # a device without a clock
        stamped |= placed
        if metric is None or ts is None or value is None:
            hint = "" if ts is not None else (" (a device that keeps no time: [clock] untimed "
                                              "= \"receive_time\")")
            reject(rejects.MISSING_FIELD, f"{device}: needs metric, ts and value{hint}")
            return
        if not isinstance(metric, str) or not metric:
            reject(rejects.WRONG_TYPE, f"{device}: metric {metric!r}")
            return
        if type(ts) is str:
            # a time text the gateway cannot place is no matter when the gateway's own clock
            # gives every event time (the policy); a local time of unknown zone is as good as
            # none where readings without one take the receive time (untimed)
            parsed = _time_text(ts)
            if parsed is None and (self.receive_time or (self.untimed and _zoneless(ts))):
                parsed, stamped = recv, True
            ts = parsed
        if type(ts) is float and ts.is_integer():
            ts = int(ts)
        elif type(ts) is float and SECONDS_FROM <= ts < SECONDS_BELOW:
            ts = round(ts * 1000)  # epoch seconds with a fraction
        if type(ts) is not int:
            reject(rejects.WRONG_TYPE, f"{device}: ts {r.get('ts')!r} is not epoch ms (or s, "
                   "us, ns) nor an ISO 8601 time with an offset (Tasmota adds it with "
                   "SetOption52 1; a local time without one is placed at its receipt under "
                   "[clock] untimed = \"receive_time\")")
            return
        if not -INT_LIMIT < ts < INT_LIMIT:  # would not fit the int64 column
            reject(rejects.BAD_TIMESTAMP, f"{device}: ts {ts} out of any plausible range")
            return
        if type(value) is int:
            if not -INT_LIMIT < value < INT_LIMIT:
                reject(rejects.OUT_OF_RANGE, f"{device}/{metric}: value {value}")
                return
            value = float(value)
        elif type(value) is not float:
            state = _value_text(value) if type(value) is str else _state(value)
            if state is None:
                reject(rejects.WRONG_TYPE, f"{device}: value {value!r}")
                return
            value = state
        if type(seq) is not int or not NO_SEQ <= seq < INT_LIMIT:
            reject(rejects.WRONG_TYPE, f"{device}: seq {seq!r}")
            return
        if not math.isfinite(value):
            reject(rejects.NOT_FINITE, f"{device}/{metric}: {value}")
            return
        allowed = self.known_device is None or self.known_device(device)
        d = self.devices.get(device) if allowed else -1
        if d is None:  # a device not seen before: is there room, and is this not a flood?
            refused = self.admit_device(device, recv) if self.admit_device else None
            if refused is not None:
                reject(refused, f"{device}: a new device id refused ({refused})", -1)
                return
            d = self.devices.intern(device)
        m = self.metrics.get(metric)
        if m is None:
            if self.known_metric is not None and not self.known_metric(metric):
                reject(rejects.UNKNOWN_METRIC, f"{device}: metric {metric!r} is not in the "
                       "catalog", d)
                return
            m = self.metrics.intern(metric)
        if not allowed:
            reject(rejects.UNKNOWN_DEVICE, f"{device} is not in the registry", -1)
            return
        if d < 0 or m < 0:
            reject(rejects.INTAKE_OVERFLOW, f"too many distinct ids ({device}/{metric})")
            return
        if stamped and seq == NO_SEQ:
            seq = STAMPED_SEQ  # never judged a duplicate (its time is its receipt)
        out.append(d, m, ts, value, seq, recv)
        self.untimed_taken += stamped

    def _senml(self, pack: list[Any], topic: str, recv: int, out: ColumnBuilder,
               reject: Any) -> None:
        bn = ""
        bt = 0.0
        for rec in pack:
            if not isinstance(rec, dict):
                reject(rejects.MALFORMED_PAYLOAD, f"{topic}: SenML record is not an object")
                continue
            if "bn" in rec:
                if not isinstance(rec["bn"], str):
                    reject(rejects.WRONG_TYPE, f"{topic}: SenML bn {rec['bn']!r}")
                    continue
                bn = rec["bn"]
            if "bt" in rec:
                if type(rec["bt"]) not in (int, float) or abs(rec["bt"]) >= INT_LIMIT:
                    reject(rejects.WRONG_TYPE, f"{topic}: SenML bt {rec['bt']!r}")
                    continue
                bt = float(rec["bt"])
            name = bn + str(rec.get("n", ""))
            cut = max(name.rfind(":"), name.rfind("/"))
            if cut >= 0:
                device: str | None = name[:cut]
                metric = name[cut + 1:]
            else:
                device, metric = self._topic_device(topic), name
            t = rec.get("t", 0.0)
            v = rec.get("v")
            if v is None and type(rec.get("vb")) is bool:
                v = rec["vb"]  # a boolean value: a reading of 1 or 0
            if v is None:
                other_value = bool({"vs", "vb", "vd"} & rec.keys())
                reject(rejects.WRONG_TYPE if other_value else rejects.MISSING_FIELD,
                       f"{topic}: SenML record without numeric v")
                continue
            if type(t) not in (int, float) or abs(t) >= INT_LIMIT:
                reject(rejects.WRONG_TYPE, f"{topic}: SenML t {t!r}")
                continue
            seconds = bt + float(t)
            if not math.isfinite(seconds) or abs(seconds) * 1000 >= INT_LIMIT:
                reject(rejects.BAD_TIMESTAMP, f"{topic}: SenML time {seconds}")
                continue
            ts = round(seconds * 1000)
            relative = abs(seconds) < SENML_RELATIVE_LIMIT
            if relative:
                ts = recv + ts
            if not _valid_device_id(device):
                reject(rejects.MISSING_FIELD, f"{topic}: SenML name {name!r} names no device")
                continue
            if cut >= 0 and not self._claim_ok(device, topic, reject):
                continue
            assert device is not None
            seq = rec.get("seq", NO_SEQ)
            self._one({"metric": metric, "ts": ts, "value": v, "seq": seq}, device, recv, out,
                      reject, placed=relative)


# ---- encoders (simulators and tests use them) ----------------------------------------------


def _compact(payload: bytes) -> bytes:
    """An exact-size copy: orjson's bytes keep a ~4 KiB allocation each, which adds up to
    gigabytes when a simulator holds a few hundred thousand payloads."""
    return memoryview(payload).tobytes()


def encode_single(device: str, metric: str, ts: int, value: float, seq: int | None = None) -> bytes:
    doc: dict[str, object] = {"device": device, "metric": metric, "ts": ts, "value": value}
    if seq is not None:
        doc["seq"] = seq
    return _compact(orjson.dumps(doc))


def encode_batch(device: str, readings: list[tuple[str, int, float, int | None]]) -> bytes:
    rs = []
    for metric, ts, value, seq in readings:
        r: dict[str, object] = {"metric": metric, "ts": ts, "value": value}
        if seq is not None:
            r["seq"] = seq
        rs.append(r)
    return _compact(orjson.dumps({"device": device, "readings": rs}))


def encode_senml(device: str, readings: list[tuple[str, int, float, int | None]],
                 units: dict[str, str] | None = None) -> bytes:
    """A SenML pack; event times are written as absolute seconds with millisecond precision."""
    recs: list[dict[str, object]] = []
    for i, (metric, ts, value, seq) in enumerate(readings):
        rec: dict[str, object] = {"n": metric, "t": ts / 1000.0, "v": value}
        if i == 0:
            rec["bn"] = f"{device}:"
        if units and metric in units:
            rec["u"] = units[metric]
        if seq is not None:
            rec["seq"] = seq
        recs.append(rec)
    return _compact(orjson.dumps(recs))
