"""Sparkplug B payloads (Eclipse Sparkplug 3.0), the MQTT convention of industrial devices.

An edge node publishes on ``spBv1.0/<group>/<type>/<edge node>[/<device>]``: a *birth
certificate* (``NBIRTH``, ``DBIRTH``) naming every metric with its data type, current value and
perhaps an *alias* (a number the later messages use instead of the name), then *data*
(``NDATA``, ``DDATA``) carrying the metrics that changed, by name or by alias. The payload is a
Protocol Buffers message (``sparkplug_b.proto``'s ``Payload``): a time, metrics, a sequence
number.

This module reads that message without a protobuf library (the gateway agent keeps its imports
few): the fields it needs, every other field skipped by its wire type, and anything that is not
a well-formed message refused with the reason (``SparkplugError``), never an exception of another
kind. ``encode_payload`` writes the same subset, for tests, the simulator and a rebirth request.

A metric is a reading when its type is a number or a boolean (1 or 0) and it is not null; the
signed integer types are carried as unsigned in their field (two's complement of their width)
and are read back as signed. Strings, dates, bytes, data sets and templates are no readings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

NAMESPACE = "spBv1.0"
READING_MESSAGES = frozenset({"NBIRTH", "DBIRTH", "NDATA", "DDATA"})
MESSAGE_TYPES = READING_MESSAGES | {"NDEATH", "DDEATH", "NCMD", "DCMD"}

# data types (sparkplug_b.proto)
INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64 = range(1, 9)
FLOAT, DOUBLE, BOOLEAN = 9, 10, 11
_SIGNED_BITS = {INT8: 8, INT16: 16, INT32: 32, INT64: 64}
_NUMERIC = frozenset({*range(1, 9), FLOAT, DOUBLE, BOOLEAN})

# wire types
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_VARINT_BYTES = 10

# Metric fields: number -> the wire type it must have (other numbers are skipped)
_METRIC_WIRE = {1: _LEN, 2: _VARINT, 3: _VARINT, 4: _VARINT, 5: _VARINT, 6: _VARINT,
                7: _VARINT, 10: _VARINT, 11: _VARINT, 12: _FIXED32, 13: _FIXED64,
                14: _VARINT, 15: _LEN, 16: _LEN, 17: _LEN, 18: _LEN, 19: _LEN}
_PAYLOAD_WIRE = {1: _VARINT, 2: _LEN, 3: _VARINT, 4: _LEN, 5: _LEN}


class SparkplugError(ValueError):
    """A payload that is not a well-formed Sparkplug B message."""


@dataclass(frozen=True, slots=True)
class Metric:
    name: str | None
    alias: int | None
    ts: int | None  # epoch ms
    datatype: int | None  # in a birth; data messages should leave it out (the birth's holds)
    is_null: bool
    kind: int  # the number of the field holding the value (0: none)
    raw: int | bytes | None

    def reading(self, datatype: int | None) -> float | None:
        """The value as a reading, read as ``datatype`` (its own or its birth's): a number,
        a boolean's 1.0/0.0, or None (a null, a string, bytes, a data set...)."""
        return None if self.is_null else _reading(self.kind, self.raw, datatype)


@dataclass(frozen=True, slots=True)
class Payload:
    ts: int | None
    seq: int | None
    metrics: list[Metric]


def topic_parts(topic: str) -> tuple[str, str, str, str | None] | None:
    """``(group, message type, edge node, device or None)`` of a Sparkplug B topic; None for
    any other topic (and for a host application's ``STATE``)."""
    parts = topic.split("/")
    if parts[0] != NAMESPACE or len(parts) not in (4, 5) or parts[2] not in MESSAGE_TYPES:
        return None
    if not all(parts[1:]):
        return None
    return parts[1], parts[2], parts[3], parts[4] if len(parts) == 5 else None


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    for k in range(_MAX_VARINT_BYTES):
        if i + k >= len(buf):
            raise SparkplugError("truncated varint")
        b = buf[i + k]
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i + k + 1
        shift += 7
    raise SparkplugError("varint longer than 10 bytes")


def _fields(buf: bytes, start: int, end: int, wire: dict[int, int]
            ) -> list[tuple[int, int | bytes]]:
    """The fields of one message in ``buf[start:end]`` whose numbers ``wire`` knows (checked
    against their wire type), in order; the others skipped."""
    out: list[tuple[int, int | bytes]] = []
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wt = key >> 3, key & 7
        if number == 0:
            raise SparkplugError("field number 0")
        value: int | bytes
        if wt == _VARINT:
            value, i = _varint(buf, i)
        elif wt in (_FIXED64, _FIXED32):
            n = 8 if wt == _FIXED64 else 4
            if i + n > end:
                raise SparkplugError("truncated fixed-width field")
            value = buf[i:i + n]
            i += n
        elif wt == _LEN:
            n, i = _varint(buf, i)
            if i + n > end:
                raise SparkplugError("a field longer than its message")
            value = buf[i:i + n]
            i += n
        else:
            raise SparkplugError(f"wire type {wt} (groups are not used by Sparkplug B)")
        want = wire.get(number)
        if want is None:
            continue
        if want != wt:
            raise SparkplugError(f"field {number} has wire type {wt}, not {want}")
        out.append((number, value))
    if i != end:
        raise SparkplugError("a field runs past its message")
    return out


def _int(value: int | bytes) -> int:
    assert isinstance(value, int)  # a varint field (its wire type was checked)
    return value


def _metric(buf: bytes) -> Metric:
    name = None
    alias = ts = datatype = None
    is_null = False
    raw: int | bytes | None = None
    kind = 0  # the value's field number
    for number, value in _fields(buf, 0, len(buf), _METRIC_WIRE):
        if number == 1:
            assert isinstance(value, bytes)
            try:
                name = value.decode()
            except UnicodeDecodeError:
                raise SparkplugError("a metric name that is not UTF-8") from None
        elif number == 2:
            alias = _int(value)
        elif number == 3:
            ts = _int(value)
        elif number == 4:
            datatype = _int(value)
        elif number == 7:
            is_null = bool(value)
        elif number >= 10:
            kind, raw = number, value
    return Metric(name, alias, ts, datatype, is_null, kind, raw)


def _reading(kind: int, raw: int | bytes | None, datatype: int | None) -> float | None:
    if raw is None or (datatype is not None and datatype not in _NUMERIC):
        return None
    if kind in (10, 11):  # int_value (uint32), long_value (uint64)
        assert isinstance(raw, int)
        v = raw & (0xFFFFFFFF if kind == 10 else 0xFFFFFFFFFFFFFFFF)
        bits = _SIGNED_BITS.get(datatype or 0)
        if bits is not None:
            width = 32 if kind == 10 and bits < 64 else 64
            if v >= 1 << (width - 1):  # sign-extended into the field's width
                v -= 1 << width
            elif v >= 1 << (bits - 1):  # or written in the type's own width
                v -= 1 << bits
        return float(v)
    if kind == 12:
        assert isinstance(raw, bytes)
        return float(struct.unpack("<f", raw)[0])
    if kind == 13:
        assert isinstance(raw, bytes)
        return float(struct.unpack("<d", raw)[0])
    if kind == 14:
        return 1.0 if raw else 0.0
    return None  # a string, bytes, a data set, a template, an extension


def decode_payload(buf: bytes) -> Payload:
    """The time, sequence number and metrics of a Sparkplug B payload."""
    ts = seq = None
    metrics: list[Metric] = []
    for number, value in _fields(buf, 0, len(buf), _PAYLOAD_WIRE):
        if number == 1:
            ts = _int(value)
        elif number == 2:
            assert isinstance(value, bytes)
            metrics.append(_metric(value))
        elif number == 3:
            seq = _int(value)
    return Payload(ts, seq, metrics)


# ---- writing (tests, simulators, the rebirth request) ------------------------------------

def _put_varint(out: bytearray, v: int) -> None:
    v &= 0xFFFFFFFFFFFFFFFF
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def _put_key(out: bytearray, number: int, wt: int) -> None:
    _put_varint(out, number << 3 | wt)


def _put_bytes(out: bytearray, number: int, data: bytes) -> None:
    _put_key(out, number, _LEN)
    _put_varint(out, len(data))
    out += data


@dataclass(frozen=True, slots=True)
class OutMetric:
    """A metric to write: ``value`` None writes a null; ``datatype`` picks the field (and is
    written unless ``typed`` is false, as data messages should leave it out)."""

    name: str | None
    value: float | bool | str | None
    datatype: int = DOUBLE
    alias: int | None = None
    ts: int | None = None
    typed: bool = True


def encode_payload(metrics: list[OutMetric], *, ts: int | None = None,
                   seq: int | None = None) -> bytes:
    out = bytearray()
    if ts is not None:
        _put_key(out, 1, _VARINT)
        _put_varint(out, ts)
    for m in metrics:
        mb = bytearray()
        if m.name is not None:
            _put_bytes(mb, 1, m.name.encode())
        if m.alias is not None:
            _put_key(mb, 2, _VARINT)
            _put_varint(mb, m.alias)
        if m.ts is not None:
            _put_key(mb, 3, _VARINT)
            _put_varint(mb, m.ts)
        if m.typed:
            _put_key(mb, 4, _VARINT)
            _put_varint(mb, m.datatype)
        v = m.value
        if v is None:
            _put_key(mb, 7, _VARINT)
            _put_varint(mb, 1)
        elif m.datatype == BOOLEAN:
            _put_key(mb, 14, _VARINT)
            _put_varint(mb, int(bool(v)))
        elif m.datatype == FLOAT:
            _put_key(mb, 12, _FIXED32)
            mb += struct.pack("<f", float(v))
        elif m.datatype == DOUBLE:
            _put_key(mb, 13, _FIXED64)
            mb += struct.pack("<d", float(v))
        elif isinstance(v, str):
            _put_bytes(mb, 15, v.encode())
        else:  # an integer type: uint32 field up to 32 bits, uint64 beyond
            small = m.datatype in (INT8, INT16, INT32, UINT8, UINT16, UINT32)
            _put_key(mb, 10 if small else 11, _VARINT)
            _put_varint(mb, int(v) & (0xFFFFFFFF if small else 0xFFFFFFFFFFFFFFFF))
        _put_bytes(out, 2, bytes(mb))
    if seq is not None:
        _put_key(out, 3, _VARINT)
        _put_varint(out, seq)
    return bytes(out)


REBIRTH = "Node Control/Rebirth"


def rebirth_request(group: str, node: str, now_ms: int) -> tuple[str, bytes]:
    """The ``NCMD`` that asks an edge node to publish its births again (topic, payload)."""
    return (f"{NAMESPACE}/{group}/NCMD/{node}",
            encode_payload([OutMetric(REBIRTH, True, BOOLEAN)], ts=now_ms))
