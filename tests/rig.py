"""A whole deployment on loopback for fault tests: gateway broker, cloud broker (reached through a
fault proxy), InfluxDB, the agent and the worker as real processes, and an oracle fleet
publishing in real time. Every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from cloud.points import LEDGER_GATEWAY_FIELDS
from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.faults import FaultProxy
from fieldline.oracle import OracleReport, check, expected_windows, export_windows
from fieldline.services import InfluxDB, Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher

CMD = [sys.executable, "-m", "fieldline.cli", "--log-level", "WARNING"]
WINDOW_MS = 1_000
LABEL = "1s"


def status_of(part: str, *args: str) -> tuple[int, str]:
    """`fieldline <part> status args...`: its exit code and output."""
    r = subprocess.run([*CMD, part, "status", *args],
                       capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return r.returncode, r.stdout + r.stderr


def edge_status(cfg: Path, *extra: str) -> tuple[int, str]:
    """`fieldline edge status --config cfg`: its exit code and output."""
    return status_of("edge", "--config", str(cfg), *extra)


def cloud_status(cfg: Path, *extra: str) -> tuple[int, str]:
    """`fieldline cloud status --config cfg`: its exit code and output."""
    return status_of("cloud", "--config", str(cfg), *extra)


class FleetRig:
    """A fleet publishing in real time to the gateway broker, and what reached InfluxDB."""

    influx: InfluxV1Client
    gw_broker: Mosquitto
    spec: FleetSpec
    sim: FleetSimulator | None = None
    pub: FleetPublisher | None = None
    _thread: threading.Thread | None = None

    def _init_fleet(self) -> None:
        self._stop = threading.Event()

    def run_fleet(self, seconds: float) -> None:
        """Publish in real time for ``seconds`` (in a thread); ``wait_fleet`` joins it."""
        self.sim = FleetSimulator(self.spec, time.time_ns() // 1_000_000, record=True)
        self.pub = FleetPublisher(self.sim, dict.fromkeys(self.spec.gateway_ids(),
                                                          self.gw_broker.address))
        self._thread = threading.Thread(target=self.pub.run_realtime,
                                        args=(self._stop, seconds), daemon=True)
        self._thread.start()

    def wait_fleet(self, timeout_s: float = 120) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the fleet did not finish publishing"

    def stop_fleet(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.pub is not None:
            self.pub.close()

    @property
    def published(self) -> list[Any]:
        assert self.sim is not None
        return self.sim.published

    def in_influx(self) -> int:
        doc = self.influx.query('SELECT sum("count") FROM "aggregates"')
        series = doc["results"][0].get("series", [])
        return int(series[0]["values"][0][1]) if series else 0

    def oracle(self) -> OracleReport:
        return check(expected_windows(self.published, WINDOW_MS),
                     export_windows(self.influx, LABEL))


class Rig(FleetRig):
    def __init__(self, tmp: Path, mosquitto: Callable[..., Mosquitto], influx: InfluxV1Client,
                 *, devices: int = 12, interval_ms: int = 100, outbox: str = "",
                 agent_extra: str = "", broker_persistence: bool = False,
                 influx_proxy: bool = False, gw_broker: dict[str, Any] | None = None,
                 intake_extra: str = "", wallclock: Path | None = None,
                 agent_cmd: list[str] | None = None, checkpoint: str = "1s") -> None:
        self.tmp = tmp
        self.agent_cmd = agent_cmd  # another `fieldline` (e.g. arm64, emulated, in a chroot)
        self.wallclock = wallclock  # the agent's wall clock offset, in this file (wallclock.py)
        self.influx = influx
        host_port = influx.url.rsplit("/", 1)[-1]
        self.influx_proxy = FaultProxy("127.0.0.1", int(host_port.rsplit(":", 1)[1])).start() \
            if influx_proxy else None
        influx_url = (f"http://127.0.0.1:{self.influx_proxy.port}" if self.influx_proxy
                      else influx.url)
        self.gw_broker = mosquitto(persistence=broker_persistence, **(gw_broker or {}))
        self.cloud_broker = mosquitto(persistence=broker_persistence)
        self.proxy = FaultProxy("127.0.0.1", self.cloud_broker.port).start()
        self.spec = FleetSpec(gateways=1, devices_per_gateway=devices, interval_ms=interval_ms,
                              disorder_fraction=0.0, seed=11,
                              topic_template="{gateway}/devices/{device}/readings")
        self.agent: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self._init_fleet()
        self.gateway_cfg = tmp / "gateway.toml"
        self.gateway_cfg.write_text(f"""
[gateway]
id = "gw-1"
state_dir = "{tmp}/edge-state"
[intake]
broker = "{self.gw_broker.url}"
topics = ["gw-1/devices/+/readings"]
device_topic_level = 2
{intake_extra}
[windows]
size = "1s"
out_of_orderness = "300ms"
allowed_lateness = "60s"
idle_timeout = "2s"
[uplink]
broker = "mqtt://127.0.0.1:{self.proxy.port}"
ack_timeout = "3s"
max_results_per_batch = 200
[outbox]
{outbox}
[agent]
tick = "100ms"
health_interval = "500ms"
ledger_interval = "500ms"
checkpoint_interval = "{checkpoint}"
{agent_extra}
""")
        self.cloud_cfg = tmp / "cloud.toml"
        self.cloud_cfg.write_text(f"""
[worker]
id = "rig"
state_dir = "{tmp}/cloud-state"
health_interval = "500ms"
[ingest]
broker = "{self.cloud_broker.url}"
[influxdb]
url = "{influx_url}"
database = "{influx.database}"
flush_interval = "200ms"
timeout = "2s"
""")

    # ---- processes -------------------------------------------------------------------------

    def _spawn(self, part: str, cfg: Path, log: str, *, cmd: list[str] = CMD,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = (self.tmp / log).open("ab")
        return subprocess.Popen([*cmd, part, "run", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def start_agent(self) -> None:
        if self.agent_cmd is not None:
            self.agent = self._spawn("edge", self.gateway_cfg, "agent.log", cmd=self.agent_cmd)
            return
        if self.wallclock is None:
            self.agent = self._spawn("edge", self.gateway_cfg, "agent.log")
            return
        root = str(Path(__file__).resolve().parent.parent)
        self.agent = self._spawn(
            "edge", self.gateway_cfg, "agent.log",
            cmd=[sys.executable, "-m", "tests.wallclock", *CMD[3:]],
            env={"FIELDLINE_TEST_WALLCLOCK": str(self.wallclock),
                 "PYTHONPATH": os.pathsep.join(filter(None, [root,
                                                             os.environ.get("PYTHONPATH")]))})

    def start_chain(self, *, fleet_s: float) -> None:
        """Worker and agent up, then the fleet publishing for ``fleet_s`` (in a thread)."""
        self.start_worker()
        self.start_agent()
        self.wait_agent_subscribed()
        self.run_fleet(fleet_s)

    def wait_agent_subscribed(self, timeout_s: float = 180) -> None:
        """Until the agent's status says the gateway broker acknowledged its subscription (a
        fresh broker holds no session for it: what devices publish before then reaches nobody;
        an emulated agent can take tens of seconds to start)."""
        deadline = time.monotonic() + timeout_s
        while not self.agent_status().get("intake_subscribed"):
            assert self.agent is None or self.agent.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, f"agent not subscribed: {self.agent_status()}"
            time.sleep(0.2)

    def start_worker(self) -> None:
        self.worker = self._spawn("cloud", self.cloud_cfg, "worker.log")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGKILL) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)

    def kill_agent(self) -> None:
        self._kill(self.agent)

    def kill_worker(self) -> None:
        self._kill(self.worker)

    def stop(self) -> None:
        self.stop_fleet()
        self._kill(self.agent, signal.SIGTERM)
        self._kill(self.worker, signal.SIGTERM)
        self.proxy.stop()
        if self.influx_proxy is not None:
            self.influx_proxy.stop()

    # ---- results -------------------------------------------------------------------------------

    def wait_settled(self, expect: int, timeout_s: float = 90, quiet_s: float = 15) -> int:
        """Until InfluxDB holds ``expect`` readings (or the count stops moving for ``quiet_s``
        while the gateway's outbox is empty: results the cloud has not acknowledged are still
        on their way, e.g. behind the writer's backoff after an outage, up to 30 s)."""
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.in_influx()
            if n >= expect:
                time.sleep(1.0)  # let late duplicates show, if any
                return self.in_influx()
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since > quiet_s:
                if not self.agent_status().get("outbox_depth", 0):
                    return n
                since = time.monotonic()
            time.sleep(0.3)
        return self.in_influx()

    def ledger(self) -> dict[str, int]:
        doc = self.influx.query('SELECT * FROM "ledger" WHERE "device" = \'_gateway\' '
                                'ORDER BY time DESC LIMIT 1')
        s = doc["results"][0]["series"][0]
        led = {k: v for k, v in zip(s["columns"], s["values"][0], strict=True)
               if isinstance(v, int)}
        # InfluxDB 1.6 can answer ORDER BY time DESC LIMIT 1 with some fields of the newest point
        # still null while it is being merged (seen once in CI): a row without every ledger field
        # is not an answer yet
        missing = [k for k in LEDGER_GATEWAY_FIELDS if k not in led]
        if missing:
            raise KeyError(f"ledger row without {missing}")
        return led

    def ledger_when(self, cond: Callable[[dict[str, int]], bool], timeout_s: float
                    ) -> dict[str, int]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                led = self.ledger()
            except (KeyError, IndexError):
                led = {}
            if led and cond(led):
                return led
            assert time.monotonic() < deadline, f"ledger never got there: {led}"
            time.sleep(0.3)

    def health(self, component: str) -> dict[str, Any]:
        """The latest pipeline health point of the edge or the cloud, as written to InfluxDB."""
        doc = self.influx.query(f'SELECT * FROM "pipeline" WHERE "component" = \'{component}\' '
                                'ORDER BY time DESC LIMIT 1')
        series = doc["results"][0].get("series", [])
        if not series:
            return {}
        s = series[0]
        return dict(zip(s["columns"], s["values"][0], strict=True))

    def edge_status(self, *extra: str) -> tuple[int, str]:
        return edge_status(self.gateway_cfg, *extra)

    def agent_status(self) -> dict[str, Any]:
        """The retained status of the gateway, read from the cloud broker."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        got: list[bytes] = []
        c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.on_message = lambda _c, _u, m: got.append(m.payload)
        c.connect("127.0.0.1", self.cloud_broker.port)
        c.subscribe("fieldline/v1/gw-1/status", qos=1)
        c.loop_start()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        c.loop_stop()
        c.disconnect()
        return dict(orjson.loads(got[-1])) if got else {}


def restartable_influx(tmp: Path) -> InfluxDB:
    return InfluxDB(tmp / "influx").start()


def shipped_gateway(tmp: Path, broker: str, uplink: str | None = None, *,
                    out: Path | None = None) -> Path:
    """deploy/gateway.toml as shipped, pointed at a test broker (``uplink``: another for the
    [uplink], else the same) and a temporary state dir (``tmp``/edge-state); no registry."""
    text = (Path(__file__).resolve().parent.parent / "deploy" / "gateway.toml").read_text()
    brokers = iter([broker, uplink or broker])  # [intake] comes before [uplink]
    text = re.sub(r'broker = "mqtts?://[^"]*"', lambda _m: f'broker = "{next(brokers)}"', text)
    text = re.sub(r'state_dir = "[^"]*"', f'state_dir = "{tmp}/edge-state"', text)
    text = re.sub(r'^registry = .*$', "", text, flags=re.M)
    out = out or tmp / "gateway.toml"
    out.write_text(text)
    return out
