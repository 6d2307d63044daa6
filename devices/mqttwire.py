"""MQTT 5 packets as bytes, for the two clients that speak the protocol themselves instead of
going through paho: the agent's intake (``edge.intake``, a subscriber) and the simulator's
publisher (``simulators.wire``).

A subscriber receives far more than it sends: the cost that matters is taking PUBLISH packets
apart, which ``Parser.feed`` does for a whole ``recv`` at once (a slice and a few integer reads a
message, no object per packet but the tuple it hands on), and acknowledging them, which the
intake does with one write a tick (``puback`` of every message taken) instead of one a message.
Only the client's side of the protocol is here: CONNECT, SUBSCRIBE, PUBACK/PUBREC/PUBCOMP,
PINGREQ and DISCONNECT out; CONNACK, SUBACK, PUBLISH, PUBREL, PINGRESP, DISCONNECT in (the
publisher reads its PUBACKs itself).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 12, 13, 14, 15

DUP = 0x08  # a PUBLISH's first byte: a re-delivery of a packet sent before (MQTT 5.0, 3.3.1.1)
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # normal disconnection; the session stays (its expiry runs)

# CONNACK / SUBACK / DISCONNECT reason codes worth a name in a log line (MQTT 5.0, 2.4)
REASONS = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2", 0x04: "Disconnect with will",
    0x80: "Unspecified error", 0x81: "Malformed packet", 0x82: "Protocol error",
    0x83: "Implementation specific error", 0x84: "Unsupported protocol version",
    0x85: "Client identifier not valid", 0x86: "Bad user name or password",
    0x87: "Not authorized", 0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned",
    0x8B: "Server shutting down", 0x8D: "Keep alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic filter invalid", 0x93: "Receive maximum exceeded", 0x95: "Packet too large",
    0x97: "Quota exceeded", 0x9C: "Use another server", 0x9D: "Server moved",
    0x9F: "Connection rate exceeded",
}


def reason(code: int) -> str:
    return f"{REASONS.get(code, 'reason')} (0x{code:02x})"


class ProtocolError(Exception):
    """The broker sent something this client cannot read: the connection is dropped."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def mqtt_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


_str = mqtt_string


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def publish0(topic: str, payload: bytes) -> bytes:
    """PUBLISH at QoS 0, no properties (the intake's one message of its own: a request)."""
    return _packet(0x30, _str(topic) + b"\x00" + payload)


def connect(client_id: str, *, keepalive_s: int, clean_start: bool, session_expiry_s: int,
            receive_maximum: int | None, username: str | None = None,
            password: str | None = None) -> bytes:
    flags = (0x02 if clean_start else 0) | (0x80 if username is not None else 0) \
        | (0x40 if password is not None else 0)
    props = b""
    if session_expiry_s:
        props += b"\x11" + struct.pack("!I", session_expiry_s)
    if receive_maximum is not None:
        props += b"\x21" + struct.pack("!H", receive_maximum)
    body = (_str("MQTT") + bytes([5, flags]) + struct.pack("!H", keepalive_s)
            + varint(len(props)) + props + _str(client_id))
    if username is not None:
        body += _str(username)
    if password is not None:
        body += _str(password)
    return _packet(0x10, body)


def subscribe(mid: int, topics: list[tuple[str, int]], retain_handling: int = 0) -> bytes:
    """SUBSCRIBE to each (filter, qos); no-local and retain-as-published 0. ``retain_handling``
    (MQTT 5): 0 the broker sends the retained messages of the filter at every subscribe, 1 only
    when the subscription is new, 2 never."""
    opt = (retain_handling & 3) << 4
    body = struct.pack("!H", mid) + b"\x00" + b"".join(_str(t) + bytes([q | opt])
                                                        for t, q in topics)
    return _packet(0x82, body)


_ACK = struct.Struct("!BBH")


def acks(kind: int, mids: list[int]) -> bytes:
    """PUBACK (or PUBREC, PUBCOMP) of each packet id, reason Success, in one buffer."""
    first = kind << 4
    pack = _ACK.pack
    return b"".join([pack(first, 2, m) for m in mids])


@dataclass
class Parser:
    """Splits the bytes from the broker into packets, across ``recv`` boundaries.

    ``feed`` returns the PUBLISH packets it completed, as (topic, payload, packet id, qos) (the
    packet id 0 for QoS 0; ``qos | DUP`` for a re-delivery, the packet's DUP flag set), and
    appends every other packet to ``control`` as (type, flags, body) for the connection to act
    on."""

    buf: bytearray = field(default_factory=bytearray)
    control: list[tuple[int, int, bytes]] = field(default_factory=list)

    def feed(self, data: bytes) -> list[tuple[str, bytes, int, int]]:
        buf = self.buf
        buf += data
        n = len(buf)
        i = 0
        out: list[tuple[str, bytes, int, int]] = []
        append = out.append
        while i + 2 <= n:
            b0 = buf[i]
            # remaining length: a variable byte integer of at most 4 bytes
            j = i + 1
            length = buf[j] & 0x7F
            if buf[j] & 0x80:
                shift = 7
                while True:
                    j += 1
                    if j >= n:
                        self._keep(i)
                        return out
                    if shift > 21:
                        raise ProtocolError("a remaining length longer than 4 bytes")
                    length |= (buf[j] & 0x7F) << shift
                    shift += 7
                    if not buf[j] & 0x80:
                        break
            start = j + 1
            end = start + length
            if end > n:
                break
            if b0 >> 4 == PUBLISH:
                qos = (b0 >> 1) & 3
                if length < 2:
                    raise ProtocolError("a PUBLISH too short for its topic")
                k = start + 2 + (buf[start] << 8 | buf[start + 1])
                if k + (2 if qos else 0) >= end:
                    raise ProtocolError("a PUBLISH's header runs past its end")
                topic = buf[start + 2:k].decode("utf-8", "replace")
                mid = 0
                if qos:
                    if qos == 3:
                        raise ProtocolError("a PUBLISH with QoS 3")
                    mid = buf[k] << 8 | buf[k + 1]
                    k += 2
                # properties: a variable byte integer length, then that many bytes (skipped)
                plen, shift = 0, 0
                while True:
                    if k >= end or shift > 21:
                        raise ProtocolError("a PUBLISH's properties run past its end")
                    b = buf[k]
                    k += 1
                    plen |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                k += plen
                if k > end:
                    raise ProtocolError("a PUBLISH's properties run past its end")
                append((topic, bytes(buf[k:end]), mid, qos | (b0 & DUP)))
            else:
                self.control.append((b0 >> 4, b0 & 0x0F, bytes(buf[start:end])))
            i = end
        self._keep(i)
        return out

    def _keep(self, used: int) -> None:
        if used:
            del self.buf[:used]


def read_varint(data: bytes, k: int) -> tuple[int, int]:
    """A variable byte integer at ``k``: (value, index after it)."""
    value, shift = 0, 0
    while True:
        if k >= len(data) or shift > 21:
            raise ProtocolError("a variable byte integer runs past its packet")
        b = data[k]
        value |= (b & 0x7F) << shift
        k += 1
        shift += 7
        if not b & 0x80:
            return value, k


@dataclass(frozen=True)
class Connack:
    session_present: bool
    code: int
    keepalive_s: int | None = None  # Server Keep Alive: the broker's, instead of ours
    receive_maximum: int = 65_535  # QoS 1/2 publishes it takes from us unacknowledged
    maximum_packet_size: int | None = None


def connack(body: bytes) -> Connack:
    if len(body) < 2:
        raise ProtocolError("a CONNACK too short")
    found: dict[str, int] = {}
    if len(body) > 2:
        plen, k = read_varint(body, 2)
        end = k + plen
        while k < end:
            ident = body[k]
            k += 1
            if ident in _WANTED:
                size = 2 if ident in _TWO else 4
                found[_WANTED[ident]] = int.from_bytes(body[k:k + size], "big")
                k += size
            else:
                k = _skip_property(body, ident, k)
    return Connack(bool(body[0] & 1), body[1], **found)


def suback(body: bytes) -> tuple[int, list[int]]:
    """(packet id, reason codes) of a SUBACK."""
    if len(body) < 3:
        raise ProtocolError("a SUBACK too short")
    mid = body[0] << 8 | body[1]
    plen, k = read_varint(body, 2)
    return mid, list(body[k + plen:])


# property identifier -> how its value is encoded (MQTT 5.0, 2.2.2.2)
_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_TWO = {0x13, 0x21, 0x22, 0x23}
_FOUR = {0x02, 0x11, 0x18, 0x27}
_STRING = {0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F}
_WANTED = {0x13: "keepalive_s", 0x21: "receive_maximum", 0x27: "maximum_packet_size"}


def _skip_property(body: bytes, ident: int, k: int) -> int:
    if ident in _BYTE:
        return k + 1
    if ident in _TWO:
        return k + 2
    if ident in _FOUR:
        return k + 4
    if ident in _STRING:
        return k + 2 + (body[k] << 8 | body[k + 1])
    if ident == 0x26:  # user property: two strings
        k += 2 + (body[k] << 8 | body[k + 1])
        return k + 2 + (body[k] << 8 | body[k + 1])
    if ident == 0x0B:  # subscription identifier
        return read_varint(body, k)[1]
    raise ProtocolError(f"unknown property 0x{ident:02x}")


def disconnect_reason(body: bytes) -> int:
    return body[0] if body else 0
