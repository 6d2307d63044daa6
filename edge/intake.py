"""Intake: subscribe to the gateway broker and buffer raw messages for the fold loop.

The intake's own thread speaks MQTT 5 to the broker (``edge.mqttwire``: the subscriber's side
of the protocol, no client library): it reads whatever the socket has, takes every PUBLISH in it
apart at once and appends ``(topic, payload, receive time, packet id, qos)`` to a bounded
deque; it never decodes a payload, never takes an application lock and never blocks on the
agent. The agent drains the deque once per tick and decodes the whole micro-batch at once. When
the buffer is full, messages are shed and counted (``intake_overflow``), never silently lost.
A message costs a few microseconds here where a general client library spends tens (an object,
a callback and a socket write for its acknowledgement, each message).

The broker's own count of messages it dropped (``$SYS/broker/publish/messages/dropped``: its
queue limits tripped, so devices got a PUBACK for readings nobody will ever receive) and of
messages it holds are read too, for health: loss upstream of the agent is visible there, and per
device as sequence gaps (``edge.gaps``).

With ``manual_ack`` the broker gets a message's PUBACK only when the agent says so (after the
message is in the fsynced intake log): the acknowledgements of a tick leave in one write. Until
then the broker keeps the message and re-delivers it to the persistent session if the agent
dies, and never has more than ``max_pending`` of them outstanding to us (MQTT 5's Receive
Maximum).

A connection that drops leaves the broker holding what it delivered over it and did not hear
acknowledged; it re-delivers those to the resumed session, with their packet ids and the DUP
flag. The intake already has them (in its buffer, with the agent, or logged and acknowledged
over the old connection too late), so a re-delivery that matches one of them (packet id, topic
and payload) is not handed over a second time. An acknowledgement handed to the socket is no
proof the broker read it (a broker stopping, or a connection cut, leaves it unread in a buffer:
a clean restart of the gateway broker then re-delivered readings the agent had logged), so the
last acknowledged messages are remembered too, as many as the broker can have delivered and
not heard acknowledged (its Receive Maximum), each as its packet id and a digest of its topic
and payload: the agent's acknowledgement of the first copy is
sent for it over the new connection (at once, if it came before). A reading without a time of
its own, stamped at its receipt, would otherwise count twice; one with its time would be a
duplicate. Anything else with such an id (the broker reused it, or the session was lost) is a
new message. After the agent itself restarted (it stopped or crashed between logging messages and
sending their acknowledgements), the intake log's packet ids of the last messages it logged
(``expect_redelivered``) serve the same way. This rests on the broker giving a packet id to a
new message only well after it was freed (Mosquitto counts them up, 65,535 before one comes
back); the messages remembered are at most the broker's Receive Maximum.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from array import array
from collections import deque
from collections.abc import Iterable

from devices import mqttwire as wire
from devices.clock import Clock
from devices.mqtt import BrokerAddress, LinkErrors, describe

log = logging.getLogger("fieldline.edge.intake")

SYS_DROPPED = "$SYS/broker/publish/messages/dropped"
SYS_STORED = "$SYS/broker/store/messages/count"
KEEPALIVE_S = 30
CONNECT_TIMEOUT_S = 10.0
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 30.0
_RECV = 1 << 18
ACKED_REMEMBERED = 32_767
_SUB_MID, _SYS_MID = 1, 2
_MID_BITS = 16  # a taken message's id: connection number << 18 | qos << 16 | packet id
WIRE_ID = (1 << 18) - 1  # of a taken message's id, what the broker knows: qos << 16 | packet id

Message = tuple[str, bytes, int, int, int]  # topic, payload, receive ms, id, qos


def _digest(topic: str, payload: bytes) -> int:
    """What a re-delivery is matched by besides its packet id and DUP flag (this process's
    hash: the messages are matched within one run of the agent)."""
    return hash((topic, payload))


class _Ring:
    """The last ``size`` (tagged id, digest) pairs, in two fixed arrays: 16 bytes a message
    (a deque of tuples would hold ~120, 1.2 MB at the shipped Receive Maximum). Written by
    ``MqttIntake._ack_bytes`` (inlined there: it runs for every message)."""

    def __init__(self, size: int) -> None:
        self.tags = array("q", bytes(8 * size))
        self.digests = array("q", bytes(8 * size))
        self.next = 0
        self.count = 0

    def items(self) -> list[tuple[int, int]]:
        """Oldest first."""
        n, size = self.count, len(self.tags)
        return [(self.tags[j], self.digests[j])
                for j in ((self.next - n + k) % size for k in range(n))]

    def clear(self) -> None:
        self.next = self.count = 0


class _RefusedError(Exception):
    """The broker answered CONNECT with a failure reason code."""


class MqttIntake:
    """Receives device messages from the gateway's MQTT broker."""

    def __init__(
        self,
        address: BrokerAddress,
        topics: list[str],
        *,
        clock: Clock,
        client_id: str,
        qos: int = 1,
        max_pending: int = 10_000,
        session_expiry_s: int = 3600,
        manual_ack: bool = False,
        skip_retained: bool = False,
    ) -> None:
        self.address = address
        # a retained message the broker hands over at subscribe was published at some time
        # before: where the gateway's receive time is the event time, it would be a reading
        # placed now that may be hours old (ESPHome, for one, retains its states by default)
        self.skip_retained = skip_retained
        self.topics = topics
        self.qos = qos
        self.max_pending = max_pending
        self.client_id = client_id
        self.session_expiry_s = session_expiry_s
        self._clock = clock
        self.manual_ack = manual_ack
        self._pending: deque[Message] = deque()
        self.received = 0
        self.overflowed = 0
        self.connected = threading.Event()
        self.errors = LinkErrors("intake", address.url, log)  # why it cannot connect
        self.subscribed = threading.Event()  # set once the broker acknowledged the subscription
        # the broker's counters, as it last published them (-1: not heard, e.g. no ACL for it)
        self.broker_dropped = -1
        self.broker_stored = -1
        self.connections = 0  # connections the broker accepted
        self._conn = 0  # the current connection's number (tags the ids of what it delivered)
        self._keepalive = KEEPALIVE_S  # ours, or the broker's Server Keep Alive
        self._acks: list[int] = []  # tagged ids the agent acknowledged, not yet sent
        # QoS 1/2 messages of the current connection not yet acknowledged over it, by tagged id
        self._held: dict[int, Message] = {}
        # the last messages acknowledged over the current connection, which the broker may not
        # have read the acknowledgements of: (tagged id, digest), at most its Receive Maximum,
        # and at most half the packet ids (one is the broker's to reuse only after ~65,535
        # others, so a remembered message is forgotten before its id can name another)
        self._acked = _Ring(max(1, min(max_pending, ACKED_REMEMBERED)))
        # taken over an earlier connection, maybe unknown to the broker as acknowledged: packet
        # id -> (the tagged id the agent knows, digest of topic and payload); those the agent
        # acknowledged
        self._awaiting: dict[int, tuple[int, int]] = {}
        self._acked_waiting: set[int] = set()
        self._alias: dict[int, int] = {}  # a taken message's id -> its re-delivery's
        self.redelivered = 0  # re-deliveries of messages already taken (not handed over again)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused = threading.Event()  # stopping: take nothing more, still send acks
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        # the few messages the agent itself publishes on this broker (QoS 0; a bounded queue)
        self._outgoing: deque[bytes] = deque(maxlen=256)
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._would_block: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)
        if address.tls:
            import ssl

            self._would_block += (ssl.SSLWantReadError, ssl.SSLWantWriteError)

    # agent side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._paused.clear()
        self._thread = threading.Thread(target=self._run, name="fieldline-intake", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Take no more messages (the broker keeps them for the session), but stay connected:
        acknowledgements given until ``stop`` still reach the broker."""
        self._paused.set()
        self._wake()

    def stop(self) -> None:
        """Send the acknowledgements given so far and disconnect (the broker keeps the
        session and what was not acknowledged)."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(CONNECT_TIMEOUT_S + 5)
            self._thread = None

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 0 over the intake's connection (sent when it is up)."""
        self._outgoing.append(wire.publish0(topic, payload))
        self._wake()

    def drain(self, limit: int) -> list[Message]:
        """Take up to ``limit`` buffered messages, oldest first:
        (topic, payload, receive ms, id, qos)."""
        pending = self._pending
        n = min(limit, len(pending))
        return [pending.popleft() for _ in range(n)]

    def requeue(self, messages: list[Message]) -> None:
        """Put drained messages back in front, in their order (not logged, not acknowledged:
        the intake log could not take them; they are tried again)."""
        self._pending.extendleft(reversed(messages))

    def expect_redelivered(self, logged: Iterable[tuple[int, str, bytes]]) -> None:
        """Before ``start``: messages an earlier run of the agent logged, as (``qos << 16 |
        packet id``, topic, payload), whose acknowledgements may never have reached the broker
        (it stopped or crashed first). A re-delivery of one of them is acknowledged, not handed
        over: its reading is in the intake log already."""
        self._conn = 1  # (the earlier run's ids are those of connection 0)
        for wire_id, topic, payload in logged:
            self._expect(wire_id, _digest(topic, payload), acked=True)

    def ack(self, messages: list[Message]) -> None:
        """Acknowledge these (manual-ack mode), in the order they were received: all of them
        in the intake thread's next write."""
        if not self.manual_ack:
            return
        ids = [m[3] for m in messages if m[4]]
        if ids:
            with self._lock:
                self._acks.extend(ids)
            self._wake()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"x")

    # intake thread -------------------------------------------------------------------------

    def _run(self) -> None:
        delay = RECONNECT_MIN_S
        while not self._stop.is_set():
            try:
                sock, parser, early = self._open()
            except (OSError, wire.ProtocolError, _RefusedError) as exc:
                refused = isinstance(exc, _RefusedError)
                self.errors.failed(f"refused: {exc}" if refused else describe(exc),
                                   logged=refused)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            self.errors.up()
            try:
                self._serve(sock, parser, early)
            except (OSError, wire.ProtocolError) as exc:
                if not self._stop.is_set():
                    log.warning("intake disconnected from %s: %s (reconnecting)",
                                self.address.url, exc)
            finally:
                self.connected.clear()
                self.subscribed.clear()
                self._carry()
                self._conn += 1  # what this connection delivered is never acknowledged now
                sock.close()

    def _open(self) -> tuple[socket.socket, wire.Parser, list[tuple[str, bytes, int, int]]]:
        a = self.address
        sock = socket.create_connection((a.host, a.port), timeout=CONNECT_TIMEOUT_S)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if a.tls:
                import ssl

                ctx = ssl.create_default_context(cafile=a.ca_file)
                if a.cert_file:
                    ctx.load_cert_chain(a.cert_file, a.key_file)
                sock = ctx.wrap_socket(sock, server_hostname=a.host)
            sock.sendall(wire.connect(
                self.client_id, keepalive_s=KEEPALIVE_S, clean_start=False,
                session_expiry_s=self.session_expiry_s,
                receive_maximum=max(1, min(self.max_pending, 65_535)) if self.manual_ack else None,
                username=a.username, password=a.password))
            parser = wire.Parser()
            early: list[tuple[str, bytes, int, int]] = []
            while True:
                data = sock.recv(_RECV)
                if not data:
                    raise OSError("the broker closed the connection before its CONNACK")
                early += parser.feed(data)
                if parser.control:
                    break
            kind, _flags, body = parser.control.pop(0)
            if kind != wire.CONNACK:
                raise wire.ProtocolError(f"packet type {kind} before the CONNACK")
            ack = wire.connack(body)
            if ack.code >= 0x80:
                log.error("intake connect to %s refused: %s", a.url, wire.reason(ack.code))
                raise _RefusedError(wire.reason(ack.code))
            self._keepalive = ack.keepalive_s or KEEPALIVE_S
            if not ack.session_present:  # nothing is re-delivered: whatever has such an id is new
                self._awaiting.clear()
                self._acked_waiting.clear()
                self._alias.clear()
            sock.sendall(wire.subscribe(_SUB_MID, [(t, self.qos) for t in self.topics],
                                        retain_handling=2 if self.skip_retained else 0)
                         + wire.subscribe(_SYS_MID, [(SYS_DROPPED, 0), (SYS_STORED, 0)]))
        except BaseException:
            sock.close()
            raise
        self.connections += 1
        self.connected.set()
        log.info("intake connected to %s, subscribed to %s", a.url, self.topics)
        return sock, parser, early

    def _serve(self, sock: socket.socket, parser: wire.Parser,
               early: list[tuple[str, bytes, int, int]]) -> None:
        sock.setblocking(False)
        out = bytearray()
        conn_tag = self._conn << 18
        now = time.monotonic()
        last_sent = last_heard = now
        keepalive = self._keepalive
        self._take(early, out, conn_tag)
        self._control(parser, out)
        tls = self.address.tls
        while not self._stop.is_set():
            paused = self._paused.is_set()
            buffered = tls and not paused and sock.pending() > 0  # type: ignore[attr-defined]
            wait = 0.0 if buffered else min(1.0, keepalive / 2)
            readable, _writable, _ = select.select(
                [self._wake_r] if paused else [sock, self._wake_r], [sock] if out else [], [],
                wait)
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            if self._acks:
                with self._lock:
                    ids, self._acks = self._acks, []
                self._agent_acks(ids, out, conn_tag)
            now = time.monotonic()
            if buffered or sock in readable:
                try:
                    data = sock.recv(_RECV)
                except self._would_block:
                    data = None
                if data == b"":
                    raise OSError("the broker closed the connection")
                if data:
                    last_heard = now
                    self._take(parser.feed(data), out, conn_tag)
                    if parser.control:
                        self._control(parser, out)
            while self._outgoing:
                out += self._outgoing.popleft()
            if now - last_sent >= keepalive / 2 and not out:
                out += wire.PINGREQ_PACKET
            if out:
                try:
                    sent = sock.send(out)
                    del out[:sent]
                    last_sent = now
                except self._would_block:
                    pass
            if now - last_heard > keepalive * 1.5 and not paused:
                raise OSError(f"nothing from the broker for {now - last_heard:.0f} s")
        # a clean stop: the acknowledgements the agent gave go first (what it logged as it
        # stopped); the session, and whatever was not acknowledged, stays with the broker
        if self._acks:
            with self._lock:
                ids, self._acks = self._acks, []
            self._agent_acks(ids, out, conn_tag)
        try:
            sock.setblocking(True)
            sock.settimeout(2.0)
            sock.sendall(bytes(out) + wire.DISCONNECT_PACKET)
        except OSError:
            pass

    def _take(self, msgs: list[tuple[str, bytes, int, int]], out: bytearray,
              conn_tag: int) -> None:
        if not msgs:
            return
        now_ms = self._clock.now_ms()
        pending = self._pending
        manual = self.manual_ack
        held, awaiting = self._held, self._awaiting
        auto: list[int] = []
        for topic, payload, mid, q in msgs:
            if topic.startswith("$SYS/"):
                self._sys(topic, payload)
                continue
            qos = q & 3
            tag = conn_tag | qos << _MID_BITS | mid
            if awaiting and qos and manual:
                was = awaiting.pop(mid, None)
                if was is not None:
                    if q & wire.DUP and was[1] == _digest(topic, payload):
                        self._redelivery(was[0], (topic, payload, now_ms, tag, qos), auto)
                        continue
                    self._acked_waiting.discard(was[0])  # the broker reused the id: new
            self.received += 1
            msg = (topic, payload, now_ms, tag, qos)
            if qos:
                if manual:
                    held[tag] = msg
                else:
                    auto.append(tag)
            if len(pending) >= self.max_pending and not (manual and qos):
                # (with manual acks the broker's Receive Maximum already bounds what is pending)
                self.overflowed += 1
                continue
            pending.append(msg)
        if auto:
            self._ack_bytes(auto, out)

    def _redelivery(self, first: int, again: Message, acks: list[int]) -> None:
        """``again`` re-delivers the message the agent has as ``first``: it is acknowledged
        over this connection when the agent acknowledges ``first`` (now, if it has)."""
        self.redelivered += 1
        self._held[again[3]] = again
        if first in self._acked_waiting:
            self._acked_waiting.discard(first)
            acks.append(again[3])
        else:
            self._alias[first] = again[3]

    def _agent_acks(self, ids: list[int], out: bytearray, conn_tag: int) -> None:
        """The agent's acknowledgements: of a message taken over this connection, sent; of one
        taken over an earlier one, sent for its re-delivery here (or once that comes)."""
        alias = self._alias
        now: list[int] = []
        for first in ids:
            t = first
            while alias and t in alias:
                t = alias.pop(t)
            if t >> 18 << 18 == conn_tag:
                now.append(t)
            else:
                was = self._awaiting.get(t & 0xFFFF)
                if was is not None and was[0] == t:
                    self._acked_waiting.add(t)
        if now:
            self._ack_bytes(now, out)

    def _carry(self) -> None:
        """The connection dropped: what it delivered that the broker may not have heard
        acknowledged is expected again over the next one (under its packet id)."""
        for tag, digest in self._acked.items():
            self._expect(tag, digest, acked=True)
        for m in self._held.values():
            self._expect(m[3], _digest(m[0], m[1]), acked=False)
        self._acked.clear()
        self._held.clear()

    def _expect(self, tag: int, digest: int, *, acked: bool) -> None:
        pid = tag & 0xFFFF
        before = self._awaiting.get(pid)
        if before is not None:
            self._acked_waiting.discard(before[0])
        self._awaiting[pid] = (tag, digest)
        if acked:
            self._acked_waiting.add(tag)

    def _ack_bytes(self, ids: list[int], out: bytearray) -> None:
        """PUBACK (QoS 1) or PUBREC (QoS 2) of each id taken over this connection, in order."""
        mask = (1 << _MID_BITS) - 1
        if all(i >> _MID_BITS & 3 == 1 for i in ids):
            out += wire.acks(wire.PUBACK, [i & mask for i in ids])
        else:
            for i in ids:
                out += wire.acks(wire.PUBACK if i >> _MID_BITS & 3 == 1 else wire.PUBREC,
                                 [i & mask])
        held = self._held
        if held:  # (manual acks) gone from the broker once it reads these bytes
            ring = self._acked
            tags, digests, size = ring.tags, ring.digests, len(ring.tags)
            j, k = ring.next, 0
            for i in ids:
                m = held.pop(i, None)
                if m is not None:
                    tags[j] = i
                    digests[j] = hash((m[0], m[1]))  # _digest
                    j = j + 1 if j + 1 < size else 0
                    k += 1
            ring.next, ring.count = j, min(ring.count + k, size)

    def _sys(self, topic: str, payload: bytes) -> None:
        try:
            value = int(payload)
        except ValueError:
            return
        if topic == SYS_DROPPED:
            self.broker_dropped = value
        elif topic == SYS_STORED:
            self.broker_stored = value

    def _control(self, parser: wire.Parser, out: bytearray) -> None:
        for kind, _flags, body in parser.control:
            if kind == wire.SUBACK:
                mid, codes = wire.suback(body)
                refused = [wire.reason(c) for c in codes if c >= 0x80]
                if mid == _SYS_MID:
                    if refused:
                        log.warning("the gateway broker refused its $SYS counters (%s): its "
                                    "drops are seen only as sequence gaps", refused)
                elif refused:
                    log.error("intake subscription to %s refused: %s", self.topics, refused)
                else:
                    self.subscribed.set()
            elif kind == wire.PUBREL:  # QoS 2: the broker released the id; we are done with it
                out += wire.acks(wire.PUBCOMP, [body[0] << 8 | body[1]])
            elif kind == wire.DISCONNECT:
                raise OSError(f"the broker disconnected: "
                              f"{wire.reason(wire.disconnect_reason(body))}")
            elif kind == wire.CONNACK:
                raise wire.ProtocolError("a second CONNACK")
        parser.control.clear()
