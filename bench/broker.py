"""The gateway broker as shipped (``deploy/mosquitto/gateway.conf`` in a Debian-style
``conf.d``, its password file and ACL, 3,000 devices holding persistent sessions): how many
device messages a second it carries to the agent's subscription, against the same broker
without a store on disk; what the configuration it replaced carried (``autosave_on_changes``
with ``autosave_interval 1``: the whole store, every session in it, rewritten after every
message); and the residual loss window the shipped one leaves: messages the broker acknowledged
to devices and had not yet delivered when the broker itself was SIGKILLed, in seconds of the
publish rate.
"""

from __future__ import annotations

import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from bench.common import Figure, GaveUpError, figure, report, wait_until
from devices.mqtt import BrokerAddress
from fieldline.services import DeployedMosquitto
from simulators.wire import WirePublisher

ROOT = Path(__file__).resolve().parent.parent
DEVICES = [f"d{i}" for i in range(4)]
PASSWORD = "bench-secret"
OLD_AUTOSAVE = "autosave_interval 1\nautosave_on_changes true\n"


def gateway_broker(work: Path, *, persistence: bool = True,
                   old_autosave: bool = False) -> DeployedMosquitto:
    work.mkdir(parents=True, exist_ok=True)
    passwd = work / "passwd"
    passwd.write_text("")
    for user in ("fieldline-edge", *DEVICES):
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, PASSWORD], check=True,
                       timeout=30, capture_output=True)
    acl = work / "gateway.acl"
    acl.write_text((ROOT / "deploy" / "mosquitto" / "gateway.acl").read_text())
    dropin = work / "fieldline-gateway.conf"
    text = (ROOT / "deploy" / "mosquitto" / "gateway.conf").read_text()
    if old_autosave:  # what the shipped file said before
        text = text.replace("autosave_on_changes false", "autosave_on_changes true")
    dropin.write_text(text)
    return DeployedMosquitto(work / "broker", dropin, persistence=persistence, files={
        "/etc/mosquitto/passwd": passwd,
        "/etc/mosquitto/fieldline-gateway.acl": acl}).start()


class Subscriber:
    """The agent's side: user fieldline-edge, QoS 1, a persistent session (MQTT 5)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.got = 0
        self.lock = threading.Lock()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id="bench-agent", protocol=mqtt.MQTTv5)
        self.c.username_pw_set("fieldline-edge", PASSWORD)
        self.c.on_message = self._on_message
        self.ready = threading.Event()
        self.c.on_subscribe = lambda *_: self.ready.set()

    def _on_message(self, *_: object) -> None:
        with self.lock:
            self.got += 1

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.ready.clear()
        self.c.connect("127.0.0.1", self.port, clean_start=False, properties=props)
        self.c.subscribe("devices/+/readings", qos=1)
        self.c.loop_start()
        if not self.ready.wait(10):
            raise GaveUpError("the agent's subscription was not acknowledged in 10 s")

    def disconnect(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def device_sessions(port: int, n: int) -> None:
    """``n`` devices that keep a persistent session on the broker (MQTT 3.1.1, clean session
    0): what a gateway's broker holds, and writes out with every save of its store."""
    user, pw = b"fieldline-edge", PASSWORD.encode()
    for i in range(n):
        cid = f"device-{i:05d}".encode()
        body = (b"\x00\x04MQTT\x04" + bytes([0x80 | 0x40]) + struct.pack("!H", 60)
                + struct.pack("!H", len(cid)) + cid + struct.pack("!H", len(user)) + user
                + struct.pack("!H", len(pw)) + pw)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(bytes([0x10, len(body)]) + body)
            if s.recv(4)[:1] != b"\x20":
                raise GaveUpError(f"device session {i} was not accepted")
            s.sendall(b"\xe0\x00")


def publishers(port: int) -> list[WirePublisher]:
    return [WirePublisher(BrokerAddress(host="127.0.0.1", port=port, username=d,
                                        password=PASSWORD), f"bench-{d}", reconnect_for_s=30)
            for d in DEVICES]


def carry(broker: DeployedMosquitto, n: int) -> float:
    """Messages a second from four devices (QoS 1, as fast as the broker acknowledges) to the
    agent's subscription, until all ``n`` arrived."""
    sub = Subscriber(broker.port)
    sub.connect()
    pubs = publishers(broker.port)
    per = n // len(pubs)
    payload = b'{"metric":"temperature","ts":1767225600000,"value":21.5}'
    t0 = time.perf_counter()
    threads = [threading.Thread(target=p.publish_many, args=(
        [(f"devices/{d}/readings", payload)] * per, 1), daemon=True)
        for p, d in zip(pubs, DEVICES, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wait_until(lambda: sub.got >= per * len(pubs), 600, f"{per * len(pubs):,} messages",
               lambda: {"received": sub.got, "acked": [p.counters.acked for p in pubs]})
    dt = time.perf_counter() - t0
    for p in pubs:
        p.close()
    sub.disconnect()
    return per * len(pubs) / dt


def residual_loss(work: Path, rate: int = 2_000, seconds: float = 4.0) -> tuple[int, int, float]:
    """The agent is away (its session queues), devices publish at ``rate``; the broker is
    SIGKILLed and restarted. Returns (acknowledged to devices, delivered after the restart,
    the loss in seconds of publishing)."""
    broker = gateway_broker(work)
    try:
        sub = Subscriber(broker.port)
        sub.connect()
        sub.disconnect()  # a persistent session: messages for it wait in the broker
        pubs = publishers(broker.port)
        payload = b'{"metric":"temperature","ts":1767225600000,"value":21.5}'
        per_tick = rate // 10 // len(pubs)
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            tick = time.monotonic()
            for p, d in zip(pubs, DEVICES, strict=True):
                p.publish_many([(f"devices/{d}/readings", payload)] * per_tick, 1)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        for p in pubs:
            p.flush(10)
        acked = sum(p.counters.acked for p in pubs)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGKILL)  # the broker dies: power cut, OOM kill
        broker.proc.wait(10)
        for p in pubs:
            p.close()
        broker.restart()
        sub = Subscriber(broker.port)
        sub.connect()
        last, since = -1, time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and time.monotonic() - since < 2:
            if sub.got != last:
                last, since = sub.got, time.monotonic()
            time.sleep(0.1)
        sub.disconnect()
        return acked, sub.got, (acked - sub.got) / rate
    finally:
        broker.stop()


SESSIONS = 3_000


def measure(work: Path, n: int, **kw: bool) -> float:
    broker = gateway_broker(work, **kw)
    try:
        device_sessions(broker.port, SESSIONS)
        return carry(broker, n)
    finally:
        broker.stop()


def main() -> None:
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-broker-") as tmp:
        work = Path(tmp)
        rate = measure(work / "shipped", 40_000)
        ref = measure(work / "memory", 40_000, persistence=False)
        old_rate = measure(work / "old", 2_000, old_autosave=True)
        note = f"{SESSIONS:,} devices hold persistent sessions"
        figures.append(figure("gateway broker, deploy config (persistence, autosave every 1 s)",
                              rate, "msgs/s", ref, "the same broker without persistence",
                              note=note))
        figures.append(figure("gateway broker, the config it replaced (autosave on every change)",
                              old_rate, "msgs/s", ref, "the same broker without persistence",
                              note=note))
        acked, delivered, window = residual_loss(work / "loss")
        figures.append(figure("residual loss window: broker SIGKILLed, agent away", window, "s",
                              note=f"{acked - delivered:,} of {acked:,} acknowledged messages "
                                   f"lost at 2,000 msgs/s (autosave_interval 1 s)"))
    report("broker", figures)


if __name__ == "__main__":
    main()
