"""Issue 12, item 13: credentials stay out of URLs, state is private, and the shipped systemd
units can write the state directories the shipped configs name."""

from __future__ import annotations

import configparser
import http.server
import os
import re
import stat
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

from cloud import natslogin
from cloud.sinks.influx_v1 import InfluxV1Client

ROOT = Path(__file__).resolve().parent.parent


def test_influxdb_credentials_go_in_the_authorization_header() -> None:
    seen: list[tuple[str, str | None]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append((self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Handler)  # a fake InfluxDB: it only listens
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = InfluxV1Client(f"http://127.0.0.1:{srv.server_port}", "db", username="fl",
                           password="s3cret")
        status, _ = c.request("POST", "/write", {"db": "db"}, b"m v=1 1")
        assert status == 204
    finally:
        srv.shutdown()
    path, auth = seen[0]
    assert "s3cret" not in path
    assert "u=" not in path
    assert "p=" not in path
    assert auth == "Basic Zmw6czNjcmV0"  # fl:s3cret


def test_agent_state_is_private_outside_systemd(tmp_path: Path) -> None:
    """`fieldline edge run` makes what it writes readable by its user only (0600, 0700)."""
    code = (
        "import sys; from pathlib import Path\n"
        "from fieldline.cli import private_files\n"
        "from devices.mqtt import BrokerAddress\n"
        "from edge.agent import EdgeAgent\n"
        "from edge.config import EdgeConfig\n"
        "private_files()\n"
        "a = BrokerAddress(host='127.0.0.1', port=1)\n"
        "agent = EdgeAgent(EdgeConfig(gateway='gw', intake_broker=a, uplink_broker=a,\n"
        f"                 state_dir=Path({str(tmp_path / 'state')!r})))\n"
        "agent.checkpoint()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    made = list((tmp_path / "state").rglob("*"))
    assert made
    for p in [tmp_path / "state", *made]:
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, f"{p} is {oct(mode)}"


def test_systemd_units_can_write_the_configured_state_dirs() -> None:
    for unit, cfg in (("fieldline-edge.service", "gateway.toml"),
                      ("fieldline-cloud.service", "cloud.toml"),
                      ("fieldline-bridge.service", "cloud.toml")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string((ROOT / "deploy" / "systemd" / unit).read_text())
        state = parser["Service"]["StateDirectory"].split()
        doc = tomllib.loads((ROOT / "deploy" / cfg).read_text())
        section = doc.get("gateway") or doc.get("worker")
        assert section is not None
        configured = Path(section["state_dir"])
        assert configured.parent == Path("/var/lib"), (unit, cfg)
        assert configured.name in state, (unit, cfg)
    # the NATS node: its store where its unit may write, its configuration where it reads it
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string((ROOT / "deploy" / "systemd" / "fieldline-nats.service").read_text())
    run = parser["Service"]["ExecStart"].split()
    store = Path(run[run.index("--store_dir") + 1])
    assert store.parent == Path("/var/lib")
    assert store.name in parser["Service"]["StateDirectory"].split()
    assert run[run.index("--config") + 1] == "/etc/fieldline/nats-server.conf"
    assert parser["Service"]["ConfigurationDirectory"] == "fieldline"
    # its logins and routes, where `fieldline cloud nats-env` is told to write them
    assert parser["Service"]["EnvironmentFile"] == str(natslogin.ENV_FILE)
    conf = (ROOT / "deploy" / "nats" / "nats-server.conf").read_text()
    used = set(re.findall(r"^[^#]*\$([A-Z_]+)", conf, flags=re.M))
    assert used == {"NATS_SERVER_NAME", *natslogin.node_env([], "p", "r")}, used


def test_every_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """deploy/systemd/*.service as systemd reads them, their binary where this installation
    has it (the shipped path is /opt/fieldline/venv)."""
    import re
    import shutil

    if shutil.which("systemd-analyze") is None:
        raise AssertionError("systemd-analyze missing (Debian: apt-get install -y systemd)")
    units = sorted((ROOT / "deploy" / "systemd").glob("*.service"))
    assert len(units) == 5
    for shipped in units:
        text = shipped.read_text()
        run = re.search(r"^ExecStart=/opt/fieldline/venv/bin/(fieldline|nats-server) ", text,
                        re.M)
        assert run, shipped
        unit = tmp_path / shipped.name
        unit.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.prefix}/bin/{run[1]}",
                               text, flags=re.M))
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=60, check=False)
        assert v.returncode == 0, (shipped.name, v.stderr)
