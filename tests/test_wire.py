"""The simulator's bulk MQTT publisher against a real Mosquitto: every publish acknowledged and
delivered in order, the broker's Receive Maximum honoured, refusals counted with their reason,
re-sends through cut connections, and a bounded give-up when the broker stays away."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.mqtt import BrokerAddress
from devices.mqttwire import varint
from fieldline.faults import FaultProxy
from fieldline.services import Mosquitto
from simulators.wire import BrokerUnreachableError, WirePublisher


class Collector:
    """A QoS 1 subscriber that records every payload it receives, in order."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.got: list[bytes] = []
        self._ready = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"collector-{id(self)}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._ready.set()
        self.client.on_message = lambda _c, _u, m: self.got.append(m.payload)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self._ready.wait(10), "the collector did not subscribe"

    def wait_for(self, n: int, timeout_s: float = 60, *, distinct: bool = False) -> list[bytes]:
        """Until ``n`` payloads arrived (``distinct``: ``n`` different ones)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (len(set(self.got)) if distinct else len(self.got)) >= n:
                break
            time.sleep(0.05)
        return self.got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def messages(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"t/dev-{i % 50}", b"%d" % i) for i in range(start, start + n)]


def test_varint_matches_the_mqtt_examples() -> None:
    # MQTT 5 spec 1.5.5: the boundaries of one to four byte Variable Byte Integers
    assert varint(0) == b"\x00"
    assert varint(127) == b"\x7f"
    assert varint(128) == b"\x80\x01"
    assert varint(16_383) == b"\xff\x7f"
    assert varint(16_384) == b"\x80\x80\x01"
    assert varint(268_435_455) == b"\xff\xff\xff\x7f"


def test_every_publish_is_acknowledged_and_delivered_in_order(mosquitto: Mosquitto) -> None:
    sub = Collector(mosquitto, "t/#")
    pub = WirePublisher(mosquitto.address, "wire-order", window=100)
    try:
        sent = messages(70_000)  # more than 65,535: packet ids wrap while others are in flight
        for i in range(0, len(sent), 7_000):
            assert pub.publish_many(sent[i:i + 7_000]) == 7_000
        assert pub.flush(60)
        assert pub.counters.acked == len(sent)
        assert pub.counters.refused == {}
        got = sub.wait_for(len(sent))
        assert got == [p for _t, p in sent]
    finally:
        pub.close()
        sub.close()


def test_qos0_goes_out_without_acknowledgements(mosquitto: Mosquitto) -> None:
    sub = Collector(mosquitto, "t/#")
    pub = WirePublisher(mosquitto.address, "wire-qos0")
    try:
        pub.publish_many(messages(500), qos=0)
        assert pub.in_flight == 0
        assert len(sub.wait_for(500)) == 500
    finally:
        pub.close()
        sub.close()


def test_the_brokers_receive_maximum_bounds_the_window(
        mosquitto_factory: Callable[..., Mosquitto]) -> None:
    broker = mosquitto_factory(extra_conf="max_inflight_messages 10")
    sub = Collector(broker, "t/#")
    pub = WirePublisher(broker.address, "wire-window", window=1000)
    try:
        assert pub.window == 10
        pub.publish_many(messages(2_000))
        assert pub.in_flight <= 10
        assert pub.flush(30)
        assert len(sub.wait_for(2_000)) == 2_000
        assert pub.counters.refused == {}  # exceeding it would have been a protocol error
    finally:
        pub.close()
        sub.close()


def test_refused_publishes_are_counted_with_their_reason(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto]) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic readwrite t/allowed/#\n")
    broker = mosquitto_factory(extra_conf=f"acl_file {acl}")
    pub = WirePublisher(broker.address, "wire-acl")
    try:
        pub.publish_many([("t/allowed/a", b"1"), ("t/denied/a", b"2"), ("t/allowed/b", b"3")])
        assert pub.flush(10)
        assert pub.counters.refused == {0x87: 1}  # not authorised
        assert pub.counters.acked == 2
    finally:
        pub.close()


def test_cut_connections_resend_everything_unacknowledged(
        mosquitto: Mosquitto) -> None:
    proxy = FaultProxy("127.0.0.1", mosquitto.port).start()
    sub = Collector(mosquitto, "t/#")
    pub = WirePublisher(BrokerAddress(host="127.0.0.1", port=proxy.port), "wire-cut",
                        window=500, reconnect_for_s=30)
    done = threading.Event()

    def cutter() -> None:
        while not done.wait(0.15):
            proxy.set_mode("reset")
            time.sleep(0.05)
            proxy.set_mode("pass")

    t = threading.Thread(target=cutter, daemon=True)
    try:
        sent = messages(40_000)
        t.start()
        for i in range(0, len(sent), 500):
            pub.publish_many(sent[i:i + 500])
            time.sleep(0.002)
        done.set()
        t.join(10)
        assert pub.flush(30)
        assert pub.counters.reconnects >= 1
        got = set(sub.wait_for(len(sent), timeout_s=30, distinct=True))
        missing = {p for _t, p in sent} - got
        assert not missing, f"{len(missing)} publishes never arrived"
        assert pub.counters.acked == len(sent)
    finally:
        done.set()
        pub.close()
        sub.close()
        proxy.stop()


def test_gives_up_when_the_broker_stays_away(mosquitto: Mosquitto) -> None:
    with pytest.raises(BrokerUnreachableError, match="cannot connect"):
        WirePublisher(BrokerAddress(host="127.0.0.1", port=1), "wire-nobody")
    pub = WirePublisher(mosquitto.address, "wire-gone", reconnect_for_s=1.0)
    try:
        pub.publish_many(messages(10))
        assert pub.flush(10)
        mosquitto.kill()

        def keep_publishing() -> None:
            for _ in range(100):  # the first writes may still land in the socket buffer
                pub.publish_many(messages(1_000))
                time.sleep(0.05)

        t0 = time.monotonic()
        with pytest.raises(BrokerUnreachableError):
            keep_publishing()
        assert time.monotonic() - t0 < 20
    finally:
        pub.close()
