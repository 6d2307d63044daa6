"""The intake's own MQTT 5 subscriber: its packet parser (any split of the byte stream, malformed
input) and, against a real Mosquitto, what the agent's custody rests on: acknowledgements only
when the agent gives them, re-delivery of the rest to the persistent session (recognised, not
handed over twice), the broker's Receive Maximum, QoS 2, TLS."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from devices import mqttwire as wire
from devices.clock import SystemClock
from devices.mqtt import BrokerAddress
from edge.intake import MqttIntake
from fieldline.faults import FaultProxy
from fieldline.services import Mosquitto, free_port

pytestmark = pytest.mark.timeout(120)


def _vbi(n: int) -> bytes:
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (128 if n else 0)])
        if not n:
            return out


def _publish(topic: str, payload: bytes, qos: int, mid: int, props: bytes) -> bytes:
    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + (struct.pack("!H", mid) if qos else b"")
    body += _vbi(len(props)) + props + payload
    return bytes([0x30 | qos << 1]) + _vbi(len(body)) + body


_PUBLISH = st.tuples(
    st.text(min_size=1, max_size=20), st.binary(max_size=300), st.integers(0, 2),
    st.integers(1, 65_535), st.binary(max_size=140))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_PUBLISH, st.sampled_from([b"\xd0\x00", b"\x62\x02\x00\x07"])),
                max_size=30),
       st.lists(st.integers(1, 400), max_size=40))
def test_parser_reads_every_packet_whatever_the_reads_split(
        packets: list[tuple[str, bytes, int, int, bytes] | bytes], cuts: list[int]) -> None:
    stream = b""
    want_pub, want_ctl = [], []
    for p in packets:
        if isinstance(p, bytes):  # PINGRESP, PUBREL
            stream += p
            want_ctl.append((p[0] >> 4, p[0] & 15, p[2:]))
        else:
            topic, payload, qos, mid, props = p
            # properties are opaque to the parser: any bytes of the declared length
            stream += _publish(topic, payload, qos, mid, props)
            want_pub.append((topic, payload, mid if qos else 0, qos))
    parser = wire.Parser()
    got = []
    i = 0
    for c in [*cuts, len(stream)]:
        got += parser.feed(stream[i:i + c])
        i += c
    got += parser.feed(stream[i:])
    assert got == want_pub
    assert parser.control == want_ctl
    assert not parser.buf


@pytest.mark.parametrize("bad", [
    bytes([0x36, 4, 0, 1, 97, 0]),  # QoS 3
    b"\x30\xff\xff\xff\xff\x01",  # a remaining length of five bytes
    bytes([0x32, 5, 0, 1, 97, 0, 1]),  # QoS 1 with no room for its properties
    bytes([0x30, 4, 0, 1, 97, 9]),  # properties longer than the packet
    bytes([0x30, 4, 0, 9, 97, 0]),  # a topic longer than the packet
])
def test_parser_refuses_a_malformed_publish(bad: bytes) -> None:
    with pytest.raises(wire.ProtocolError):
        wire.Parser().feed(bad)


def test_connack_and_suback_are_read() -> None:
    assert wire.connack(b"\x01\x00\x0a\x13\x00\x3c\x21\x00\x10\x27\x00\x01\x00\x00") \
        == wire.Connack(True, 0, keepalive_s=60, receive_maximum=16, maximum_packet_size=65_536)
    assert wire.connack(b"\x00\x87") == wire.Connack(False, 0x87)
    assert wire.suback(b"\x00\x01\x00\x01\x80") == (1, [1, 0x80])


# against a real broker ----------------------------------------------------------------------

def _publisher(port: int, qos: int, n: int, topic: str = "devices/d1/readings",
               payload: bytes | None = None) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(topic, payload if payload is not None else f"{i}".encode(), qos=qos)
             for i in range(n)]
    for info in infos:
        info.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def _intake(address: BrokerAddress, **kw: object) -> MqttIntake:
    i = MqttIntake(address, ["devices/+/readings"], clock=SystemClock(),
                   client_id="test-intake", **kw)  # type: ignore[arg-type]
    i.start()
    _wait(i.subscribed.is_set, "the subscription")
    return i


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _take(intake: MqttIntake, n: int) -> list[tuple[str, bytes, int, int, int]]:
    got: list[tuple[str, bytes, int, int, int]] = []

    def enough() -> bool:
        got.extend(intake.drain(n - len(got)))
        return len(got) >= n

    _wait(enough, f"{n} messages ({len(got)} so far)")
    return got


def _settles(intake: MqttIntake, s: float = 1.0) -> int:
    time.sleep(s)
    return intake.pending


def test_only_what_the_agent_acknowledged_is_gone_from_the_session(
        mosquitto: Mosquitto) -> None:
    first = _intake(mosquitto.address, manual_ack=True)
    _publisher(mosquitto.port, 1, 50)
    got = _take(first, 50)
    assert [m[1] for m in got] == [f"{i}".encode() for i in range(50)]
    first.ack(got[:20])
    time.sleep(0.5)
    first.stop()
    again = _intake(mosquitto.address, manual_ack=True)
    redelivered = _take(again, 30)
    assert [m[1] for m in redelivered] == [f"{i}".encode() for i in range(20, 50)]
    again.ack(redelivered)
    time.sleep(0.5)
    again.stop()
    third = _intake(mosquitto.address, manual_ack=True)
    assert _settles(third) == 0  # all acknowledged: nothing comes back
    third.stop()


def test_a_reconnect_does_not_hand_over_again_what_was_already_taken(
        mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """Readings without a time of their own repeat byte for byte: the broker's re-delivery of
    one the agent has is told from a new one by its packet id and DUP flag, not its bytes."""
    broker = mosquitto_factory(persistence=True)
    intake = _intake(broker.address, manual_ack=True)
    _publisher(broker.port, 1, 10, payload=b"21.5")
    old = _take(intake, 10)
    intake.ack(old[:4])
    time.sleep(0.5)  # four acknowledged over the first connection, six not
    broker.stop()
    broker.start()  # same port, the session (and the six unacknowledged) from its data
    _wait(lambda: intake.connections == 2 and intake.subscribed.is_set(), "the reconnection")
    _wait(lambda: intake.redelivered == 6, "the six re-deliveries")
    assert _settles(intake, 0.5) == 0  # not handed over a second time
    _publisher(broker.port, 1, 5, payload=b"21.5")  # the same bytes, new messages
    new = _take(intake, 5)
    assert intake.redelivered == 6
    assert intake.received == 15
    # the agent acknowledges the first copies: sent for their re-deliveries over this connection
    intake.ack(old[4:] + new)
    time.sleep(0.5)
    intake.stop()
    after = _intake(broker.address, manual_ack=True)
    assert _settles(after) == 0  # the broker holds nothing unacknowledged
    after.stop()


def test_acknowledgements_a_stopping_broker_never_read_do_not_hand_readings_over_twice(
        mosquitto_factory: Callable[..., Mosquitto]) -> None:
    """A gateway broker stopped cleanly (an upgrade) before it read the agent's acknowledgements
    saves those messages as unacknowledged and re-delivers them after its restart. The intake
    remembers what it acknowledged, so they are acknowledged again, not handed over: on the old
    code all ten came again (readings without a time of their own, stamped at receipt, would
    have been counted twice). A partition holds the acknowledgements back until the broker has
    stopped, so the broker never reads them (a paused broker resumed with SIGTERM pending
    sometimes read a few before it stopped: CI saw fewer than ten re-deliveries)."""
    broker = mosquitto_factory(persistence=True)
    link = FaultProxy("127.0.0.1", broker.port).start()
    try:
        intake = _intake(BrokerAddress(host="127.0.0.1", port=link.port), manual_ack=True)
        _publisher(broker.port, 1, 10, payload=b"21.5")
        old = _take(intake, 10)
        link.set_mode("blackhole")
        intake.ack(old)
        time.sleep(0.3)  # the acknowledgements wait in the partition
        broker.stop()  # same port; the session and the ten, unacknowledged, in its data
        broker.start()
        link.set_mode("pass")  # the old connection ends; the intake reconnects to the new broker
        _wait(lambda: intake.connections == 2 and intake.subscribed.is_set(), "the reconnection")
        _wait(lambda: intake.redelivered == 10, "the ten re-deliveries")
        assert _settles(intake, 0.5) == 0
        assert intake.received == 10
        intake.stop()
        after = _intake(broker.address, manual_ack=True)
        assert _settles(after) == 0  # acknowledged again at once: the broker holds nothing
        after.stop()
    finally:
        link.stop()


def test_a_lost_session_re_delivers_nothing_and_takes_everything_new(
        mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory()  # no persistence: a restart forgets the session
    intake = _intake(broker.address, manual_ack=True)
    _publisher(broker.port, 1, 5, payload=b"on")
    old = _take(intake, 5)
    broker.stop()
    broker.start()
    _wait(lambda: intake.connections == 2 and intake.subscribed.is_set(), "the reconnection")
    _publisher(broker.port, 1, 5, payload=b"on")  # the broker numbers them from 1 again
    assert [m[1] for m in _take(intake, 5)] == [b"on"] * 5
    assert intake.redelivered == 0
    intake.ack(old)  # taken over a connection whose session is gone: nothing to send
    time.sleep(0.3)
    assert intake.connected.is_set()
    intake.stop()


class _ScriptedBroker:
    """One side of MQTT 5 written by the test: it accepts the intake's connections one by one
    and sends exactly the packets the test gives it (for what a real broker does only by
    chance: a packet id reused right after a reconnect, a DUP flag on a message never sent)."""

    def __init__(self) -> None:
        import socket

        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10)
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None
        self.parser = wire.Parser()

    def accept(self, session_present: bool) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, _ = self.server.accept()
        self.conn.settimeout(10)
        self.parser = wire.Parser()
        self.expect(wire.CONNECT)
        self.conn.sendall(bytes([0x20, 3, int(session_present), 0, 0]))
        for _ in range(2):  # the readings' subscription and the $SYS counters'
            body = self.expect(wire.SUBSCRIBE)
            self.conn.sendall(bytes([0x90, 4]) + body[:2] + b"\x00\x01")

    def expect(self, kind: int) -> bytes:
        assert self.conn is not None
        while not self.parser.control:
            data = self.conn.recv(65536)
            assert data, "the intake closed the connection"
            self.parser.feed(data)
        got, _flags, body = self.parser.control.pop(0)
        assert got == kind, f"packet type {got}, not {kind}"
        return body

    def publish(self, mid: int, payload: bytes, *, dup: bool = False) -> None:
        assert self.conn is not None
        packet = bytearray(_publish("devices/d1/readings", payload, 1, mid, b""))
        packet[0] |= wire.DUP if dup else 0
        self.conn.sendall(packet)

    def pubacks(self, n: int) -> list[int]:
        return [struct.unpack("!H", self.expect(wire.PUBACK)[:2])[0] for _ in range(n)]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_a_re_delivery_is_known_by_its_id_flag_and_bytes_and_answered_for_the_first_copy(
        ) -> None:
    fake = _ScriptedBroker()
    intake = MqttIntake(BrokerAddress(host="127.0.0.1", port=fake.port), ["devices/+/readings"],
                        clock=SystemClock(), client_id="test-intake", manual_ack=True)
    intake.start()
    try:
        fake.accept(session_present=False)
        for mid, payload in ((1, b"a"), (2, b"b"), (3, b"c")):
            fake.publish(mid, payload)
        first = _take(intake, 3)
        intake.ack(first[:1])
        assert fake.pubacks(1) == [1]
        assert fake.conn is not None
        fake.conn.close()  # the connection drops with b and c unacknowledged
        _wait(lambda: not intake.connected.is_set(), "the drop")
        intake.ack(first[1:2])  # b logged while the intake is offline
        fake.accept(session_present=True)
        fake.publish(2, b"b", dup=True)  # b again: the agent has acknowledged it
        assert fake.pubacks(1) == [2]
        fake.publish(3, b"c", dup=True)  # c again: the agent still has it
        fake.publish(1, b"a")  # the id of a, acknowledged, reused: a new message
        fake.publish(4, b"d", dup=True)  # a re-delivery of nothing this intake took: new
        fake.publish(5, b"e")
        again = _take(intake, 3)
        assert [(m[1], m[3] & 0xFFFF) for m in again] == [(b"a", 1), (b"d", 4), (b"e", 5)]
        assert intake.redelivered == 2
        assert intake.received == 6
        intake.ack(first[2:] + again)  # c's acknowledgement goes out for its re-delivery
        assert fake.pubacks(4) == [3, 1, 4, 5]
        # a session the broker lost: a DUP message with a remembered id and bytes is new
        fake.publish(6, b"f")
        kept = _take(intake, 1)
        fake.conn.close()
        _wait(lambda: not intake.connected.is_set(), "the second drop")
        fake.accept(session_present=False)
        fake.publish(6, b"f", dup=True)
        assert [m[1] for m in _take(intake, 1)] == [b"f"]
        assert intake.redelivered == 2
        intake.ack(kept)  # its connection and session are gone: nothing is sent for it
        fake.publish(7, b"g")
        intake.ack(_take(intake, 1))
        assert fake.pubacks(1) == [7]
    finally:
        intake.stop()
        fake.close()


def test_a_re_delivery_of_what_was_acknowledged_before_the_broker_read_it_is_known(
        ) -> None:
    """An acknowledgement handed to the socket is no proof the broker read it: a broker
    stopping (a clean restart of the gateway broker, with persistence) or a cut connection leaves
    it unread, and the resumed session re-delivers the message. The intake remembers the last
    messages it acknowledged (the broker's Receive Maximum of them), so such a re-delivery is
    acknowledged again and not handed over: an untimed reading would otherwise be counted
    twice. Beyond the Receive Maximum nothing can be unacknowledged, so nothing is kept."""
    fake = _ScriptedBroker()
    intake = MqttIntake(BrokerAddress(host="127.0.0.1", port=fake.port), ["devices/+/readings"],
                        clock=SystemClock(), client_id="test-intake", manual_ack=True,
                        max_pending=3)
    intake.start()
    try:
        fake.accept(session_present=False)
        for mid, payload in ((1, b"21.5"), (2, b"21.5"), (3, b"21.5"), (4, b"21.5")):
            fake.publish(mid, payload)
        first = _take(intake, 4)
        intake.ack(first)
        assert fake.pubacks(4) == [1, 2, 3, 4]  # read here; "unread" by the broker
        assert fake.conn is not None
        fake.conn.close()
        _wait(lambda: not intake.connected.is_set(), "the drop")
        fake.accept(session_present=True)
        # the broker had at most its Receive Maximum (3) unacknowledged: 2, 3 and 4 come again
        for mid in (2, 3, 4):
            fake.publish(mid, b"21.5", dup=True)
        assert fake.pubacks(3) == [2, 3, 4]  # acknowledged at once: the agent has them
        fake.publish(5, b"21.5")
        assert [(m[1], m[3] & 0xFFFF) for m in _take(intake, 1)] == [(b"21.5", 5)]
        assert intake.redelivered == 3
        assert intake.received == 5
        assert _settles(intake, 0.3) == 0
    finally:
        intake.stop()
        fake.close()


def test_the_broker_holds_back_beyond_the_receive_maximum(mosquitto: Mosquitto) -> None:
    intake = _intake(mosquitto.address, manual_ack=True, max_pending=5)
    _publisher(mosquitto.port, 1, 20)
    assert _settles(intake) == 5  # five outstanding, the broker keeps the rest
    taken: list[tuple[str, bytes, int, int, int]] = []
    while len(taken) < 20:
        batch = _take(intake, min(5, 20 - len(taken)))
        taken += batch
        intake.ack(batch)
    assert [m[1] for m in taken] == [f"{i}".encode() for i in range(20)]
    assert intake.overflowed == 0
    intake.stop()


def test_qos2_is_received_and_completed(mosquitto: Mosquitto) -> None:
    intake = _intake(mosquitto.address, manual_ack=True, qos=2)
    _publisher(mosquitto.port, 2, 10)
    got = _take(intake, 10)
    assert {m[4] for m in got} == {2}
    intake.ack(got)
    time.sleep(0.5)
    intake.stop()
    again = _intake(mosquitto.address, manual_ack=True, qos=2)
    assert _settles(again) == 0
    again.stop()


def test_without_manual_acks_everything_is_acknowledged_on_arrival(
        mosquitto: Mosquitto) -> None:
    intake = _intake(mosquitto.address)
    _publisher(mosquitto.port, 1, 30)
    assert len(_take(intake, 30)) == 30
    intake.stop()
    again = _intake(mosquitto.address)
    assert _settles(again) == 0
    again.stop()


def test_tls_and_a_refused_login(mosquitto_factory: Callable[..., Mosquitto],
                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    crt, key = pki.cert("server")
    tls_port = free_port()
    broker = mosquitto_factory(extra_conf=f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\n"
                                          f"certfile {crt}\nkeyfile {key}\n")
    tls = BrokerAddress(host="127.0.0.1", port=tls_port, tls=True, ca_file=str(pki.ca))
    intake = _intake(tls, manual_ack=True)
    _publisher(broker.port, 1, 20)
    got = _take(intake, 20)
    assert [m[1] for m in got] == [f"{i}".encode() for i in range(20)]
    intake.stop()

    pw = tmp_path / "passwd"
    pw.write_text("")
    locked = mosquitto_factory(extra_conf=f"password_file {pw}\n")
    stranger = MqttIntake(BrokerAddress(host="127.0.0.1", port=locked.port, username="nobody",
                                        password="x"), ["devices/+/readings"],
                          clock=SystemClock(), client_id="stranger")
    with caplog.at_level("ERROR", logger="fieldline.edge.intake"):
        stranger.start()
        _wait(lambda: "refused" in caplog.text, "the refusal to be logged")
        stranger.stop()
    assert not stranger.connected.is_set()
    assert (stranger.errors.last or "").startswith("refused: "), stranger.errors.last


def test_links_that_cannot_connect_say_why_once_and_in_the_status(
        mosquitto_factory: Callable[..., Mosquitto], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """paho's reconnect loop swallows why a connection fails. A cloud broker whose certificate
    the gateway does not trust (a CA file from another PKI), a broker name that does not
    resolve, a port nobody listens on: each link logs the cause once per outage (not at every
    retry), keeps it for `fieldline edge status` while the link is down, forgets it once up."""
    from edge.uplink import MqttUplink
    from tests.pki import make_pki

    pki, stranger = make_pki(tmp_path / "pki"), make_pki(tmp_path / "stranger")
    crt, key = pki.cert("server")
    tls_port = free_port()
    mosquitto_factory(extra_conf=f"listener {tls_port} 127.0.0.1\ncafile {pki.ca}\n"
                                 f"certfile {crt}\nkeyfile {key}\n")

    def uplink(host: str, port: int, ca: Path | None) -> MqttUplink:
        address = BrokerAddress(host=host, port=port, tls=ca is not None,
                                ca_file=str(ca) if ca else None)
        return MqttUplink(address, "gw-1", clock=SystemClock(), client_id=f"gw-1-{port}",
                          state_dir=tmp_path / f"up-{port}")

    untrusted = uplink("127.0.0.1", tls_port, stranger.ca)
    nobody = uplink("127.0.0.1", free_port(), None)
    unnamed = MqttIntake(BrokerAddress(host="broker.invalid", port=1883), ["devices/+/readings"],
                         clock=SystemClock(), client_id="unnamed")
    with caplog.at_level("WARNING", logger="fieldline.edge"):
        for link in (untrusted, nobody, unnamed):
            link.start()
        try:
            _wait(lambda: all(link.errors.failures >= 3 for link in (untrusted, nobody)),
                  "three failed attempts each", timeout_s=30)
            _wait(lambda: unnamed.errors.failures >= 1, "the name to fail")
            assert "CERTIFICATE_VERIFY_FAILED" in (untrusted.errors.last or "")
            assert "Connection refused" in (nobody.errors.last or "")
            assert unnamed.errors.last  # the resolver's words (they vary with the machine)
            lines = [r.getMessage() for r in caplog.records]
            for link, url in ((untrusted, f"mqtts://127.0.0.1:{tls_port}"),
                              (nobody, nobody.address.url),
                              (unnamed, "mqtt://broker.invalid:1883")):
                said = [line for line in lines if f"cannot reach {url}: " in line]
                assert said == [f"{link.errors.what} cannot reach {url}: {link.errors.last} "
                                "(retrying)"], lines
        finally:
            for link in (untrusted, nobody, unnamed):
                link.stop()
    trusted = uplink("127.0.0.1", tls_port, pki.ca)
    trusted.start()
    try:
        _wait(trusted.connected.is_set, "the uplink with the right CA")
        assert (trusted.errors.last, trusted.errors.failures) == (None, 0)
    finally:
        trusted.stop()
