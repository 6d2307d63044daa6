"""The edge agent on arm64 under emulation, against a bare paho-mqtt loop under the same
emulation: how much of a Raspberry Pi's MQTT intake the agent's work costs.

The Debian 12 arm64 root of ``make pi-check`` (built once, kept in /var/tmp, qemu-user through
binfmt_misc; as root), this checkout's wheel installed in it. Mosquitto runs on the host and holds
a backlog of single JSON readings for two persistent sessions; inside the root, first a bare paho
receive loop drains one, then ``fieldline edge run`` drains the other (every reading decoded,
validated, deduplicated, folded into 10 s windows and logged before its PUBACK, results shipped
to a second broker). Each is timed from its first reading to its last, so neither interpreter's
start-up (slow under emulation) is counted. Emulation makes both several times slower than a
Pi's own cores; the ratio is what carries over.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import Figure, GaveUpError, figure, report, wait_until
from bench.pipeline import device_messages, publish_backlog, register_session
from devices.contract import HealthReport, decode_uplink
from fieldline.services import Mosquitto
from tests.test_pi import CHROOT_ENV, PI, VENV, prepare_root

N = 30_000
BARE = """
import sys, threading, time
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
port, n = int(sys.argv[1]), int(sys.argv[2])
got, t, done = [0], [0.0, 0.0], threading.Event()
def on_message(_c, _u, _m):
    if got[0] == 0:
        t[0] = time.perf_counter()
    got[0] += 1
    if got[0] >= n:
        t[1] = time.perf_counter()
        done.set()
c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-bare",
                protocol=mqtt.MQTTv5)
c.max_inflight_messages_set(1000)
c.max_queued_messages_set(0)
p = Properties(PacketTypes.CONNECT)
p.SessionExpiryInterval = 3600
c.on_message = on_message
c.connect("127.0.0.1", port, clean_start=False, properties=p)
c.loop_start()
done.wait(900)
c.loop_stop()
print(got[0], t[1] - t[0])
"""


def _in_root(*argv: str, timeout_s: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["timeout", str(int(timeout_s)), "chroot", str(PI), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=CHROOT_ENV)


def measure(work: Path, n: int = N) -> dict[str, float]:
    gw = Mosquitto(work / "gw").start()
    cloud = Mosquitto(work / "cloud").start()
    health: list[tuple[float, float]] = []  # (when, readings received)
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: object, _u: object, m: mqtt.MQTTMessage) -> None:
        rep = decode_uplink(m.payload)
        if isinstance(rep, HealthReport):
            health.append((time.perf_counter(), rep.counters.get("readings_received", 0)))

    try:
        msgs = device_messages(n, time.time_ns() // 1_000_000 - 3_600_000)
        register_session(gw, "bench-bare", "devices/+/readings")
        register_session(gw, "fieldline-edge-gw-1-intake", "devices/+/readings")
        publish_backlog(gw, msgs)
        (PI / "tmp/bench-bare.py").write_text(BARE)
        bare = _in_root(f"{VENV}/bin/python", "/tmp/bench-bare.py", str(gw.port), str(n),
                        timeout_s=900)
        out, _ = bare.communicate()
        got, bare_s = out.split()[-2:]
        if int(got) < n:
            raise GaveUpError(f"the emulated bare loop received {got} of {n}: {out[-500:]}")
        (PI / "tmp/bench-gateway.toml").write_text(f"""
[gateway]
id = "gw-1"
state_dir = "/tmp/bench-edge-state"
[intake]
broker = "{gw.url}"
topics = ["devices/+/readings"]
max_pending = {2 * n}
[windows]
size = "10s"
[uplink]
broker = "{cloud.url}"
[agent]
tick = "50ms"
health_interval = "100ms"
""")
        sub.on_message = on_message
        sub.connect("127.0.0.1", cloud.port)
        sub.subscribe("fieldline/v1/gw-1/health", qos=0)
        sub.loop_start()
        started = time.perf_counter()
        agent = _in_root(f"{VENV}/bin/fieldline", "--log-level", "WARNING", "edge", "run",
                         "--config", "/tmp/bench-gateway.toml", timeout_s=900)
        drain = threading.Thread(target=agent.communicate, daemon=True)  # keep its pipe empty
        drain.start()
        wait_until(lambda: bool(health) and health[-1][1] >= n, 600,
                   "the emulated agent to take the backlog",
                   lambda: health[-1] if health else "no health report")
        agent.terminate()
        drain.join(60)
        # from the last report with nothing received (the agent takes a backlog this fast
        # outside emulation within one report, so the first report with readings is no start)
        last = next(t for t, got_n in health if got_n >= n)
        first = max((t for t, got_n in health if got_n == 0 and t < last), default=started)
        return {"bare_s": float(bare_s), "agent_s": last - first, "n": n}
    finally:
        sub.loop_stop()
        gw.stop()
        cloud.stop()


def main() -> list[Figure]:
    if os.geteuid() != 0:
        print("bench.arm64: needs root (chroot into the arm64 root); not measured")
        return []
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        root = prepare_root(Path(d))
        try:
            r = measure(Path(d))
        finally:
            root.mounts.release()
    figs = [figure("edge agent readings/s on arm64 under emulation (qemu-user), MQTT intake -> "
                   "decode -> validate -> windows -> uplink", r["n"] / r["agent_s"],
                   "readings/s", r["n"] / r["bare_s"], "bare paho-mqtt loop, same emulation",
                   note=f"{r['n']:,} single JSON readings held by the broker; timed from the "
                        "first reading to the last (the agent's within its 100 ms health "
                        "reports)")]
    report("arm64", figs)
    return figs


if __name__ == "__main__":
    main()
