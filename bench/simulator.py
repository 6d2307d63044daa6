"""The fleet simulator's publishing, measured against ``mosquitto_pub -l`` on the same broker:

* maximum sustained publish rate of one simulator process (QoS 1, 10,000 devices published as
  fast as possible), against ``mosquitto_pub -l -q 1`` sending the same payloads from a file;
* how far behind schedule one process runs with 10,000 devices reporting at 1 Hz in real time.

mosquitto_pub 2.0.11 (Debian 12) silently stops short when ``-l`` is given more than 65,535
lines at once: message ids wrap, and it disconnects on the first PUBACK whose id equals the last
one it queued (200,000 lines -> 3,415 published). The reference is therefore fed files of at most
60,000 lines, one connection each, and the times are summed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bench.common import Figure, GaveUpError, figure, report
from fieldline.services import Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher

DEVICES = 10_000
MOSQUITTO_PUB_LINES = 60_000


def spec() -> FleetSpec:
    return FleetSpec(gateways=1, devices_per_gateway=DEVICES, disorder_fraction=0.0,
                     topic_template="{gateway}/devices/{device}/readings")


def max_rate(broker: Mosquitto, work: Path, ticks: int = 20) -> tuple[float, float]:
    sim = FleetSimulator(spec(), time.time_ns() // 1_000_000 - 3_600_000)
    pub = FleetPublisher(sim, {"gw-1": broker.address})
    t0 = time.perf_counter()
    n = pub.run_fast(ticks)
    sim_rate = n / (time.perf_counter() - t0)
    acked = pub.counters["acked"]
    pub.close()
    if acked != n:
        raise RuntimeError(f"the broker acknowledged {acked} of {n} publishes")
    # the same payloads through mosquitto_pub -l (one message per line, one topic)
    again = FleetSimulator(spec(), time.time_ns() // 1_000_000 - 3_600_000)
    payloads = [p for tick in again.ticks(ticks) for _t, p in tick.messages["gw-1"]]
    files = []
    for i in range(0, len(payloads), MOSQUITTO_PUB_LINES):
        f = work / f"payloads-{i}.txt"
        f.write_bytes(b"".join(p + b"\n" for p in payloads[i:i + MOSQUITTO_PUB_LINES]))
        files.append(f)
    exe = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    spent = 0.0
    for f in files:
        with f.open("rb") as fh:
            t0 = time.perf_counter()
            subprocess.run([exe, "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-l",
                            "-t", "gw-1/devices/bench/readings"], stdin=fh, check=True,
                           timeout=600)
            spent += time.perf_counter() - t0
    return sim_rate, len(payloads) / spent


def behind_schedule(broker: Mosquitto, seconds: float = 30) -> tuple[float, float, float]:
    sim = FleetSimulator(spec(), time.time_ns() // 1_000_000)
    pub = FleetPublisher(sim, {"gw-1": broker.address})
    samples: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=pub.run_realtime, args=(stop, seconds), daemon=True)
    t.start()
    deadline = time.monotonic() + seconds + 120
    while t.is_alive() and time.monotonic() < deadline:
        t.join(0.25)
        samples.append(pub.behind_ms)
    if t.is_alive():
        stop.set()
        pub.close()
        raise GaveUpError(f"the real-time run of {seconds:.0f} s did not end; saw: "
                     f"{pub.published:,} published, {pub.counters}")
    acked = pub.counters["acked"]
    pub.close()
    if acked != pub.published:
        raise RuntimeError(f"the broker acknowledged {acked} of {pub.published} publishes")
    return pub.max_behind_ms, sum(samples) / max(len(samples), 1), pub.published / seconds


def main() -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="fieldline-bench-") as d:
        work = Path(d)
        broker = Mosquitto(work / "broker").start()
        try:
            sim_rate, ref_rate = max_rate(broker, work)
            worst, mean, achieved = behind_schedule(broker)
        finally:
            broker.stop()
    figs = [
        figure("simulator publish rate, QoS 1, one process", sim_rate, "msgs/s", ref_rate,
               "mosquitto_pub -l -q 1, same payloads", note=f"{DEVICES:,} devices, JSON"),
        figure("10,000 devices at 1 Hz in real time: worst behind schedule", worst, "ms",
               note=f"mean {mean:.0f} ms, achieved {achieved:,.0f} msgs/s over 30 s"),
    ]
    report("simulator", figs)
    return figs


if __name__ == "__main__":
    main()
