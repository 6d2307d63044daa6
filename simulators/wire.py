"""A publish-only MQTT 5 client that writes many PUBLISH packets per system call.

A simulated fleet of 10,000 devices at 1 Hz is 10,000 QoS 1 publishes a second from one process.
paho spends most of that budget on its per-message locks and bookkeeping; this client builds the
packets of a whole tick into one buffer, writes it with one ``sendall``, and reads the PUBACKs that
came back in bulk. It keeps what a device needs and nothing else:

* QoS 0 and 1; an in-flight window (ours, capped by the broker's Receive Maximum); packet ids
  are never reused while in flight;
* PUBACK reason codes counted (MQTT 5: "not authorised", "quota exceeded", "no subscribers");
* keep-alive pings when idle; TLS and username/password from the broker URL;
* on a lost connection: reconnect with back-off and re-send every unacknowledged publish with the
  DUP flag, as a real device with a persistent outgoing queue does.

It never subscribes; the broker has nothing to send it but CONNACK, PUBACK, PINGRESP, DISCONNECT.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from devices import mqttwire as wire
from devices.errors import FieldlineError
from devices.mqtt import BrokerAddress

log = logging.getLogger("fieldline.simulators.wire")

CONNACK, PUBACK, PINGRESP, DISCONNECT = 0x20, 0x40, 0xD0, 0xE0
SEND_CHUNK = 256 * 1024  # bytes written per sendall before PUBACKs are read again
TOPIC_CACHE = 200_000


class MqttError(ConnectionError):
    """The broker refused us or broke the protocol."""


class BrokerUnreachableError(FieldlineError):
    """The broker stayed unreachable for ``reconnect_for_s``, or we were told to stop."""


@dataclass
class WireCounters:
    sent: int = 0          # PUBLISH packets written (first attempts)
    acked: int = 0         # PUBACKs with a success code (0x00 or 0x10)
    no_subscribers: int = 0
    refused: dict[int, int] = field(default_factory=dict)  # PUBACK reason code -> count
    resent: int = 0
    reconnects: int = 0


class WirePublisher:
    """One connection to one broker. Not thread-safe: one thread publishes."""

    def __init__(self, address: BrokerAddress, client_id: str, *, keepalive_s: int = 60,
                 window: int = 2000, reconnect_for_s: float = 300.0,
                 stop: threading.Event | None = None, timeout_s: float = 10.0) -> None:
        if not 0 < window < 65535:
            raise ValueError("window must be between 1 and 65,534")
        self.address = address
        self.client_id = client_id
        self.keepalive_s = keepalive_s
        self.reconnect_for_s = reconnect_for_s
        self.timeout_s = timeout_s
        self.stop = stop or threading.Event()
        self.counters = WireCounters()
        self._our_window = window
        self.window = window
        self.max_packet = 268_435_455
        self._inflight: dict[int, bytes] = {}  # packet id -> PUBLISH packet (DUP not yet set)
        self._next_id = 1
        self._rx = b""
        self._topics: dict[str, bytes] = {}
        self._sock: socket.socket | None = None
        self._last_write = 0.0
        self._ping_outstanding = False
        try:
            self._connect()
        except (OSError, MqttError) as exc:
            raise BrokerUnreachableError(f"cannot connect to {address.url}: {exc}") from exc

    # ---- connection ------------------------------------------------------------------------

    def _open(self) -> socket.socket:
        a = self.address
        raw = socket.create_connection((a.host, a.port), timeout=self.timeout_s)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not a.tls:
            return raw
        ctx = ssl.create_default_context(cafile=a.ca_file)
        if a.cert_file:
            ctx.load_cert_chain(a.cert_file, a.key_file)
        return ctx.wrap_socket(raw, server_hostname=a.host)

    def _connect(self) -> None:
        sock = self._open()
        try:
            sock.sendall(wire.connect(self.client_id, keepalive_s=self.keepalive_s,
                                      clean_start=True, session_expiry_s=0,
                                      receive_maximum=None, username=self.address.username,
                                      password=self.address.password))
            self._sock = sock
            self._rx = b""
            kind, body = self._read_packet()
        except BaseException:
            self._sock = None
            sock.close()
            raise
        if kind != CONNACK or len(body) < 2:
            self._drop()
            raise MqttError(f"expected CONNACK from {self.address.url}, got 0x{kind:02x}")
        if body[1] != 0:
            self._drop()
            raise MqttError(f"{self.address.url} refused the connection: reason 0x{body[1]:02x}")
        ack = wire.connack(bytes(body))
        self.window = min(self._our_window, ack.receive_maximum)
        self.max_packet = ack.maximum_packet_size or self.max_packet
        self._last_write = time.monotonic()
        self._ping_outstanding = False

    def _drop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None

    def _reconnect(self, why: BaseException) -> None:
        """Reconnect, then re-send everything unacknowledged (DUP set), oldest first, within
        the broker's window. ``BrokerUnreachableError`` after ``reconnect_for_s`` or on stop."""
        self._drop()
        log.warning("connection to %s lost (%s); reconnecting", self.address.url, why)
        deadline = time.monotonic() + self.reconnect_for_s
        delay = 0.1
        while True:
            if self.stop.is_set() or time.monotonic() > deadline:
                raise BrokerUnreachableError(f"{self.address.url}: gave up reconnecting ({why})")
            try:
                self._connect()
                break
            except (OSError, MqttError) as exc:
                log.debug("reconnect to %s failed: %s", self.address.url, exc)
                self.stop.wait(delay)
                delay = min(delay * 2, 2.0)
        self.counters.reconnects += 1
        again = [bytes([pkt[0] | 0x08]) + pkt[1:] for pkt in self._inflight.values()]
        self.counters.resent += len(again)
        log.info("reconnected to %s; re-sending %d unacknowledged", self.address.url, len(again))
        # the oldest ``window`` go out at once; the rest as acknowledgements make room
        self._send(b"".join(again[:self.window]))
        for i in range(self.window, len(again)):
            self._wait_window(1, unsent=len(again) - i)
            self._send(again[i])

    # ---- reading ---------------------------------------------------------------------------

    def _recv(self, block: bool) -> bool:
        """Read what the broker sent; True if anything arrived."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        if not block:
            pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not pending and not select.select([sock], [], [], 0)[0]:
                return False
        try:
            data = sock.recv(65536)
        except ssl.SSLWantReadError:
            return False
        if not data:
            raise ConnectionError("broker closed the connection")
        self._rx += data
        self._parse()
        return True

    def _read_packet(self) -> tuple[int, bytes]:
        """Block for one whole packet (used only while connecting)."""
        assert self._sock is not None
        while True:
            got = self._split(self._rx)
            if got is not None:
                kind, body, used = got
                self._rx = self._rx[used:]
                return kind, body
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("broker closed the connection")
            self._rx += data

    @staticmethod
    def _split(buf: bytes, at: int = 0) -> tuple[int, bytes, int] | None:
        """(packet type, body, end offset) of the packet at ``at``, or None if incomplete."""
        if len(buf) - at < 2:
            return None
        length, mult, i = 0, 1, at + 1
        while True:
            if i >= len(buf):
                return None
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
            if mult > 128 ** 4:
                raise MqttError("malformed remaining length from broker")
        if len(buf) < i + length:
            return None
        return buf[at] & 0xF0, buf[i:i + length], i + length

    def _parse(self) -> None:
        buf, at = self._rx, 0
        inflight, c = self._inflight, self.counters
        while True:
            got = self._split(buf, at)
            if got is None:
                break
            kind, body, at = got
            if kind == PUBACK:
                pid = (body[0] << 8) | body[1]
                reason = body[2] if len(body) > 2 else 0
                if inflight.pop(pid, None) is None:
                    continue  # not ours (any more): nothing to count
                if reason == 0:
                    c.acked += 1
                elif reason == 0x10:
                    c.acked += 1
                    c.no_subscribers += 1
                else:
                    c.refused[reason] = c.refused.get(reason, 0) + 1
            elif kind == PINGRESP:
                self._ping_outstanding = False
            elif kind == DISCONNECT:
                reason = body[0] if body else 0
                raise MqttError(f"broker sent DISCONNECT, reason 0x{reason:02x}")
            else:
                raise MqttError(f"unexpected packet 0x{kind:02x} from broker")
        self._rx = buf[at:]

    # ---- writing ---------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionError("not connected")
        if data:
            self._sock.sendall(data)
            self._last_write = time.monotonic()

    def _topic(self, topic: str) -> bytes:
        enc = self._topics.get(topic)
        if enc is None:
            if len(self._topics) >= TOPIC_CACHE:
                self._topics.clear()
            enc = self._topics[topic] = wire.mqtt_string(topic)
        return enc

    def _pump(self, wait_s: float) -> None:
        """Wait up to ``wait_s`` for the broker, and read what it sent."""
        sock = self._sock
        if sock is None:
            raise ConnectionError("not connected")
        if (isinstance(sock, ssl.SSLSocket) and sock.pending()) or \
                select.select([sock], [], [], wait_s)[0]:
            self._recv(block=True)

    def _wait_window(self, room: int, unsent: int = 0) -> None:
        """Block until ``room`` more publishes may go on the wire (``unsent`` of the in-flight
        are not on it yet)."""
        deadline = time.monotonic() + self.timeout_s * 6
        while len(self._inflight) - unsent > self.window - room:
            if time.monotonic() > deadline:
                raise ConnectionError("no PUBACKs from the broker for a minute")
            self._pump(1.0)

    def _guarded(self, step: Callable[[], object]) -> None:
        """Run ``step``; on a lost connection reconnect instead (which re-sends the in-flight).

        A chunk that was being written when the connection broke is in ``_inflight`` (QoS 1)
        and goes out again with the rest; QoS 0 messages of that chunk may be lost, as QoS 0
        allows."""
        try:
            if self._sock is None:
                raise ConnectionError("not connected")
            step()
            return
        except (OSError, MqttError) as exc:
            why: BaseException = exc
        while True:
            try:
                self._reconnect(why)
                return
            except (OSError, MqttError) as exc:
                why = exc

    def publish_many(self, messages: Iterable[tuple[str, bytes]], qos: int = 1) -> int:
        """Publish every (topic, payload); return how many went out. Blocks while the in-flight
        window is full, and through reconnects (up to ``reconnect_for_s``, then
        ``BrokerUnreachableError``). A packet larger than the broker's Maximum Packet Size is
        counted as refused (0x95)."""
        n = 0
        chunk: list[bytes] = []
        size = 0
        c = self.counters
        for topic, payload in messages:
            t = self._topic(topic)
            if qos == 0:
                pkt = b"\x30" + wire.varint(len(t) + 1 + len(payload)) + t + b"\x00" + payload
            else:
                pid = self._take_id()
                pkt = (b"\x32" + wire.varint(len(t) + 3 + len(payload)) + t
                       + bytes((pid >> 8, pid & 0xFF, 0)) + payload)
            if len(pkt) > self.max_packet:
                c.refused[0x95] = c.refused.get(0x95, 0) + 1
                continue
            if qos:
                while len(self._inflight) >= self.window:
                    self._flush_chunk(chunk)
                    chunk, size = [], 0
                    self._guarded(lambda: self._wait_window(1))
                self._inflight[pid] = pkt
            chunk.append(pkt)
            size += len(pkt)
            n += 1
            if size >= SEND_CHUNK:
                self._flush_chunk(chunk)
                chunk, size = [], 0
        self._flush_chunk(chunk)
        c.sent += n
        return n

    def _take_id(self) -> int:
        pid = self._next_id
        while pid in self._inflight:
            pid = pid % 65535 + 1
        self._next_id = pid % 65535 + 1
        return pid

    def _flush_chunk(self, chunk: list[bytes]) -> None:
        if chunk:
            data = b"".join(chunk)

            def step() -> None:
                self._send(data)
                while self._recv(block=False):
                    pass
            self._guarded(step)

    # ---- upkeep ----------------------------------------------------------------------------

    def idle(self) -> None:
        """Read acknowledgements; ping if nothing was written for half the keep-alive."""
        def step() -> None:
            while self._recv(block=False):
                pass
            if time.monotonic() - self._last_write > self.keepalive_s / 2:
                if self._ping_outstanding:
                    raise ConnectionError("no PINGRESP within half the keep-alive")
                self._ping_outstanding = True
                self._send(b"\xc0\x00")
        self._guarded(step)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every QoS 1 publish so far was acknowledged (or ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while self._inflight:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            wait = min(left, 0.5)
            try:
                self._guarded(lambda: self._pump(wait))  # noqa: B023 (called right here)
            except BrokerUnreachableError:
                return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(b"\xe0\x00")  # DISCONNECT, normal
        self._drop()
