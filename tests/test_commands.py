"""Each part runs alone from its command and config file: `fieldline simulate`, `fieldline edge
run`, `fieldline cloud run`, as separate processes against real Mosquitto and InfluxDB."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import Mosquitto

pytestmark = pytest.mark.integration

CMD = [sys.executable, "-m", "fieldline.cli"]


def total_count(client: InfluxV1Client) -> int:
    doc = client.query('SELECT sum("count") FROM "aggregates"')
    assert isinstance(doc, dict)
    series = doc["results"][0].get("series", [])
    return int(series[0]["values"][0][1]) if series else 0


def openssl_mapped(pid: int) -> bool:
    """Whether OpenSSL's libraries are mapped into the process (Linux)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "libssl" in maps or "libcrypto" in maps


def test_simulate_edge_and_cloud_run_as_separate_commands(
        mosquitto_factory: Callable[..., Mosquitto], influx_db: InfluxV1Client,
        tmp_path: Path) -> None:
    gw, cloud = mosquitto_factory(), mosquitto_factory()
    (tmp_path / "fleet.toml").write_text(f"""
[fleet]
gateways = 1
devices_per_gateway = 15
payload = "senml"
[faults]
disorder_fraction = 0.1
[brokers]
default = "{gw.url}"
[output]
registry = "{tmp_path}/devices.csv"
truth = "{tmp_path}/truth.jsonl"
[run]
backfill = "2m"
""")
    (tmp_path / "gateway.toml").write_text(f"""
[gateway]
id = "gw-1"
state_dir = "{tmp_path}/state"
registry = "{tmp_path}/devices.csv"
[intake]
broker = "{gw.url}"
topics = ["gw-1/devices/+/readings"]
device_topic_level = 2
[windows]
size = "5s"
idle_timeout = "2s"
[uplink]
broker = "{cloud.url}"
[agent]
tick = "100ms"
""")
    (tmp_path / "cloud.toml").write_text(f"""
[worker]
id = "c1"
registry = "{tmp_path}/devices.csv"
[ingest]
broker = "{cloud.url}"
[influxdb]
url = "{influx_db.url}"
database = "{influx_db.database}"
flush_interval = "200ms"
""")
    sim = subprocess.run([*CMD, "simulate", "--config", str(tmp_path / "fleet.toml"),
                          "--registry-only"], capture_output=True, text=True, timeout=60,
                         check=False)
    assert sim.returncode == 0, sim.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([*CMD, part, "run", "--config", str(tmp_path / f"{name}.toml")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
             for part, name in (("cloud", "cloud"), ("edge", "gateway"))]
    try:
        time.sleep(3)  # both connect and subscribe (their sessions persist from then on)
        sim = subprocess.run([*CMD, "simulate", "--config", str(tmp_path / "fleet.toml"),
                              "--duration", "3"], capture_output=True, text=True, timeout=120,
                             check=False)
        assert sim.returncode == 0, sim.stderr
        m = re.search(r"published (\d+) readings", sim.stdout)
        assert m, sim.stdout
        published = int(m.group(1))
        assert published >= 15 * 120
        deadline = time.monotonic() + 60
        while total_count(influx_db) < published and time.monotonic() < deadline:
            time.sleep(0.5)
        assert total_count(influx_db) == published  # every reading is in exactly one window
        # no broker of the agent uses TLS: it ran all along without OpenSSL (edge/memory.py),
        # while the worker, which has no such switch, has it
        assert not openssl_mapped(procs[1].pid)
        assert openssl_mapped(procs[0].pid)
        assert (tmp_path / "truth.jsonl").exists()
    finally:
        outputs = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
            out, _ = p.communicate(timeout=30)
            outputs.append((p.returncode, out))
    for rc, out in outputs:
        assert rc == 0, out[-3000:]
    assert (tmp_path / "state" / "windows.npz").exists()  # the agent checkpointed on SIGTERM
    assert (tmp_path / "state" / "uplink.seq").exists()


def test_misconfiguration_fails_at_start_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "gateway.toml"
    bad.write_text('[gateway]\nid = "gw-1"\n[intake]\nbroker = "mqtt://127.0.0.1:1"\n'
                   '[uplink]\nbroker = "mqtt://127.0.0.1:2"\n[windows]\nallowed_latenes = "5s"\n')
    out = subprocess.run([*CMD, "edge", "run", "--config", str(bad)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 2
    assert "windows.allowed_latenes" in out.stderr
    # a state directory the agent cannot create or write to, and a registry file that is not
    # there (as the shipped gateway.toml names /etc/fieldline/devices.csv, which `fieldline
    # edge install` writes): named at start by their keys, not a traceback
    for name, gateway, key in [
            ("unusable", 'state_dir = "/proc/fieldline-cannot"', "gateway.state_dir"),
            ("missing", f'state_dir = "{tmp_path}/s"\nregistry = "{tmp_path}/nope.csv"',
             "'gateway.registry'")]:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'[gateway]\nid = "gw-1"\n{gateway}\n'
                       '[intake]\nbroker = "mqtt://127.0.0.1:1"\n'
                       '[uplink]\nbroker = "mqtt://127.0.0.1:2"\n')
        out = subprocess.run([*CMD, "edge", "run", "--config", str(cfg)], capture_output=True,
                             text=True, timeout=60, check=False)
        assert out.returncode == 2, out.stderr
        assert key in out.stderr
        assert "Traceback" not in out.stderr
    # a CA file that is not there: the agent crashed with a traceback, the worker and the
    # bridge retried for ever; each now fails at start naming the key
    nope = tmp_path / "nope" / "ca.crt"
    (tmp_path / "tls-gw.toml").write_text(
        f'[gateway]\nid = "gw-1"\nstate_dir = "{tmp_path}/s"\n[intake]\n'
        'broker = "mqtt://127.0.0.1:1"\n[uplink]\nbroker = "mqtts://127.0.0.1:2"\n'
        f'ca_file = "{nope}"\n')
    cloud = (f'[worker]\nid = "w"\n[ingest]\nbroker = "mqtts://127.0.0.1:2"\nca_file = "{nope}"\n'
             '[influxdb]\nurl = "http://127.0.0.1:4"\ndatabase = "x"\n')
    (tmp_path / "tls-cloud.toml").write_text(cloud)
    # on JetStream the bridge reads the broker, a worker reads NATS (over TLS here)
    (tmp_path / "tls-js.toml").write_text(
        cloud + f'[engine]\nkind = "jetstream"\nservers = ["tls://127.0.0.1:3"]\n'
                f'ca_file = "{nope}"\n')
    for args, key in [(["edge", "run", "--config", str(tmp_path / "tls-gw.toml")],
                       "'uplink.ca_file'"),
                      (["cloud", "run", "--config", str(tmp_path / "tls-cloud.toml")],
                       "'ingest.ca_file'"),
                      (["cloud", "run", "--config", str(tmp_path / "tls-js.toml")],
                       "'engine.ca_file'"),
                      (["cloud", "bridge", "--config", str(tmp_path / "tls-js.toml")],
                       "'ingest.ca_file'")]:
        out = subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60,
                             check=False)
        assert out.returncode == 2, out.stderr
        assert f"{key} in {tmp_path}" in out.stderr, out.stderr
        assert str(nope) in out.stderr, out.stderr
        assert "Traceback" not in out.stderr
    # a URL whose port cannot be read is a named misconfiguration, not a traceback
    out = subprocess.run([*CMD, "view", "--influx-url", "http://127.0.0.1:abc"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, out.stderr
    assert "'--influx-url'" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_agent_with_a_tls_broker_loads_openssl(tmp_path: Path) -> None:
    """The other side of running without OpenSSL: an mqtts:// uplink keeps it (the broker
    need not answer for that)."""
    (tmp_path / "gateway.toml").write_text(f"""
[gateway]
id = "gw-1"
state_dir = "{tmp_path}/state"
[intake]
broker = "mqtt://127.0.0.1:1"
[uplink]
broker = "mqtts://127.0.0.1:2"
""")
    agent = subprocess.Popen([*CMD, "edge", "run", "--config", str(tmp_path / "gateway.toml")],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "state").exists() and agent.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # past its imports, trying to connect
        assert agent.poll() is None, agent.communicate()[0]
        assert openssl_mapped(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        out, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, out[-3000:]


def _started(proc: subprocess.Popen[str], lock: Path) -> None:
    """Wait until ``proc`` holds ``lock`` (its pid written there), past its start-up."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.1)
    raise AssertionError(f"{proc.args} did not take {lock}: "
                         f"{proc.communicate(timeout=30)[0][-2000:]}")


def _state_config(tmp_path: Path, part: str) -> tuple[Path, Path, str]:
    """An agent's (or a worker's) config on brokers that are not there: its state directory,
    the config file and the state directory's key."""
    state = tmp_path / "state"
    cfg = tmp_path / f"{part}.toml"
    if part == "edge":
        cfg.write_text(f'[gateway]\nid = "gw-1"\nstate_dir = "{state}"\n'
                       '[intake]\nbroker = "mqtt://127.0.0.1:1"\n'
                       '[uplink]\nbroker = "mqtt://127.0.0.1:2"\n')
        return state, cfg, "gateway.state_dir"
    cfg.write_text(f'[worker]\nid = "cloud-1"\nstate_dir = "{state}"\n'
                   'health_interval = "200ms"\n'
                   '[ingest]\nbroker = "mqtt://127.0.0.1:1"\n'
                   '[influxdb]\nurl = "http://127.0.0.1:2"\n')
    return state, cfg, "worker.state_dir"


@pytest.mark.parametrize(("part", "name"), [("edge", "outbox"), ("cloud", "dedup.json")])
def test_a_state_file_of_the_wrong_kind_is_refused_at_start_not_with_a_traceback(
        tmp_path: Path, part: str, name: str) -> None:
    """The worker's batch dedup state turned into a directory (a ``mkdir`` by hand, a backup
    restored wrongly) ended the worker with an IsADirectoryError traceback at start; the
    agent's outbox a file, likewise. Both now fail at start naming the key and the path."""
    state, cfg, key = _state_config(tmp_path, part)
    if part == "cloud":
        (state / name).mkdir(parents=True)
    else:
        state.mkdir()
        (state / name).write_text("not an outbox")
    got = subprocess.run([*CMD, part, "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert got.returncode == 2, got.stderr[-2000:]
    assert key in got.stderr, got.stderr[-2000:]
    assert f"{state / name} is " in got.stderr, got.stderr[-2000:]
    assert "Traceback" not in got.stderr


@pytest.mark.parametrize("part", ["edge", "cloud"])
def test_a_second_run_on_the_same_state_directory_is_refused_at_start(
        tmp_path: Path, part: str) -> None:
    """Two agents (or workers) on one state directory (one started by hand beside the systemd
    service) would both append to one outbox and rewrite one sequence file and one checkpoint.
    The second fails at start naming the key and the holder's pid; the first runs on untouched;
    once it is gone, stopped or SIGKILLed, the directory can be taken again. (A SIGHUP on the
    way: the worker reads its registry and its rules again, a rule added to its config on
    the way is taken; the agent says it has nothing to read again.)"""
    state, cfg, key = _state_config(tmp_path, part)
    run = [*CMD, part, "run", "--config", str(cfg)]
    lock = state / ".lock"
    first = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _started(first, lock)
        second = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert key in second.stderr
        assert f"process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the one holding it runs on
        # and a SIGHUP (systemctl reload, a log rotation's habit) does not end it
        if part == "cloud":
            with cfg.open("a") as fh:
                fh.write('[[rules]]\nname = "hot"\nkind = "consecutive"\nabove = 80\n')
        first.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert first.poll() is None
        if part == "cloud":  # its status names the rules in force once it read them again
            status = state / "status-cloud-1.json"
            deadline = time.monotonic() + 30
            while b'"hot"' not in (status.read_bytes() if status.exists() else b""):
                assert time.monotonic() < deadline, "the rules were not read again"
                assert first.poll() is None
                time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0, out[-3000:]
    if part == "cloud":
        assert "SIGHUP: rules read again: 1 added (hot), 0 removed (-), 0 changed (-)" in out, \
            out[-3000:]
    # stopped: taken again; SIGKILLed: the lock went with the process, nothing to clean up
    again = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _started(again, lock)
    finally:
        again.kill()
        again.communicate(timeout=30)
    last = subprocess.Popen(run, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _started(last, lock)
    finally:
        last.send_signal(signal.SIGTERM)
        last.communicate(timeout=60)


@pytest.mark.parametrize("status", [404, 503])
def test_a_worker_pointed_at_something_that_is_not_influxdb_fails_at_start(
        tmp_path: Path, status: int) -> None:
    """influxdb.url naming another service (Grafana's port, a web server: 404) fails at start,
    naming the key; one where nothing answers yet is not a misconfiguration (InfluxDB may come
    up after the worker), nor is a server error (503: a proxy in front of an InfluxDB that is
    down; found by the mixed-fault soak, where a worker restarted during such an outage exited
    for good)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):  # another service, or a proxy: a stand-in
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    cfg = tmp_path / "cloud.toml"
    cfg.write_text('[worker]\nid = "cloud-1"\n'
                   f'state_dir = "{tmp_path / "state"}"\n'
                   '[ingest]\nbroker = "mqtt://127.0.0.1:1"\n'
                   f'[influxdb]\nurl = "http://127.0.0.1:{srv.server_address[1]}"\n')
    proc = subprocess.Popen([*CMD, "cloud", "run", "--config", str(cfg)],
                            stderr=subprocess.PIPE, text=True)
    try:
        if status == 503:
            assert proc.stderr is not None
            line = proc.stderr.readline()  # its first line: a warning, not an exit
            assert "does not answer yet" in line, line
            assert proc.poll() is None
            return
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=60)
        srv.shutdown()
    assert proc.returncode == 2, err[-2000:]
    assert "influxdb.url" in err
    assert "not as InfluxDB" in err
    assert "Traceback" not in err
