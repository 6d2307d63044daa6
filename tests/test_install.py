"""`fieldline edge install` / `uninstall` into a scratch root (``--root``; the tests run as root,
so users are really created there with ``useradd --root``): every step, idempotence, dry run,
modes, the generated config as the agent reads it, the broker login it creates working on the
shipped Mosquitto drop-in, the unit passing ``systemd-analyze verify``, and an uninstall that
leaves nothing but what the user keeps."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import load_edge_config
from fieldline.services import DeployedMosquitto

ROOT = Path(__file__).resolve().parent.parent
CMD = [sys.executable, "-m", "fieldline.cli", "edge"]
BASE = ("etc/passwd", "etc/group", "etc/shadow", "etc/gshadow")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates users: needs root")


def scratch_root(tmp: Path) -> Path:
    """An empty system as far as fieldline goes: the account files, and the directories the
    systemd and Mosquitto packages own."""
    root = tmp / "root"
    for d in ("etc/systemd/system", "etc/mosquitto/conf.d", "var/lib"):
        (root / d).mkdir(parents=True)
    for f in BASE:
        (root / f).touch()
    return root


def tree(root: Path) -> dict[str, tuple[int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = (p.stat().st_mode, p.read_bytes() if p.is_file() else b"")
    return out


def fieldline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          check=False)


@pytest.fixture
def tls(tmp_path: Path) -> list[str]:
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki", clients=("gw-7",))  # the installer loads them as TLS does
    crt, key = pki.cert("gw-7")
    for name, src in (("ca.crt", pki.ca), ("gw.crt", crt), ("gw.key", key)):
        shutil.copyfile(src, tmp_path / name)
    (tmp_path / "devices.csv").write_text("device_id,gateway,site,kind\nd0,gw-7,s1,temperature\n")
    return ["--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / "gw.crt"),
            "--key", str(tmp_path / "gw.key"), "--registry", str(tmp_path / "devices.csv")]


def test_install_is_idempotent_and_dry_run_changes_nothing(tmp_path: Path,
                                                           tls: list[str]) -> None:
    root = scratch_root(tmp_path)
    args = ["install", "--gateway-id", "gw-7", "--cloud", "mqtts://cloud.example:8883", *tls,
            "--root", str(root)]
    before = tree(root)
    dry = fieldline(*args, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    steps = [ln for ln in dry.stdout.splitlines() if ln.startswith("would: ")]
    assert len(steps) >= 12
    assert tree(root) == before, "--dry-run changed something"

    first = fieldline(*args)
    assert first.returncode == 0, first.stderr
    done = [ln for ln in first.stdout.splitlines() if ln.startswith("done: ")]
    assert [d[6:] for d in done] == [s[7:] for s in steps]  # the dry run said what it did
    installed = tree(root)
    second = fieldline(*args)
    assert second.returncode == 0, second.stderr
    assert all(ln.startswith("unchanged: ") for ln in second.stdout.splitlines()[:-1])
    assert "0 steps changed" in second.stdout
    assert tree(root) == installed

    def mode(rel: str) -> int:
        return stat.S_IMODE((root / rel).stat().st_mode)

    assert mode("etc/fieldline") == 0o750
    assert mode("var/lib/fieldline") == 0o700
    assert mode("etc/fieldline/gateway.toml") == 0o640
    assert mode("etc/fieldline/tls/gateway.key") == 0o640
    uid = next(int(ln.split(":")[2]) for ln in (root / "etc/passwd").read_text().splitlines()
               if ln.startswith("fieldline:"))
    assert (root / "var/lib/fieldline").stat().st_uid == uid
    assert (root / "etc/fieldline/gateway.toml").stat().st_uid == 0

    cfg = load_edge_config(root / "etc/fieldline/gateway.toml")
    assert cfg.gateway == "gw-7"
    assert cfg.registry_path == Path("/etc/fieldline/devices.csv")
    assert cfg.uplink_broker.tls
    assert (cfg.uplink_broker.host, cfg.uplink_broker.port) == ("cloud.example", 8883)
    assert cfg.uplink_broker.ca_file == "/etc/fieldline/tls/ca.crt"
    assert cfg.uplink_broker.cert_file == "/etc/fieldline/tls/gateway.crt"
    assert cfg.intake_broker.username == "fieldline-edge"
    assert cfg.intake_broker.password
    for rel in ("etc/fieldline/tls/ca.crt", "etc/fieldline/devices.csv"):
        assert (root / rel).is_file()

    unit = root / "etc/systemd/system/fieldline-edge.service"
    assert f"ExecStart={sys.prefix}/bin/fieldline edge run" in unit.read_text()
    v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert v.returncode == 0, v.stderr

    # another gateway id: the config follows, the broker password stays
    again = fieldline(*[a if a != "gw-7" else "gw-8" for a in args])
    assert again.returncode == 0, again.stderr
    cfg2 = load_edge_config(root / "etc/fieldline/gateway.toml")
    assert cfg2.gateway == "gw-8"
    assert cfg2.intake_broker.password == cfg.intake_broker.password


def test_misconfiguration_names_the_flag(tmp_path: Path) -> None:
    root = scratch_root(tmp_path)
    r = fieldline("install", "--gateway-id", "gw-7", "--cloud", "mqtts://c:8883",
                  "--root", str(root))
    assert r.returncode == 2
    assert "'--ca'" in r.stderr
    # files that cannot work are named here, before anything is installed, not by the agent
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    r = fieldline("install", "--gateway-id", "gw-7", "--cloud", "mqtts://c:8883",
                  "--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / "ca.crt"),
                  "--key", str(tmp_path / "ca.crt"), "--root", str(root))
    assert r.returncode == 2
    assert "'--ca'" in r.stderr, r.stderr
    assert "no CA certificate" in r.stderr, r.stderr
    r = fieldline("install", "--gateway-id", "gw-7", "--cloud", "mqtt://c:1883",
                  "--ca", str(tmp_path / "ca.crt"), "--root", str(root))
    assert r.returncode == 2
    assert "'--ca'" in r.stderr, r.stderr
    assert "only with an mqtts://" in r.stderr, r.stderr
    r = fieldline("install", "--gateway-id", "gw/7", "--cloud", "mqtt://c", "--root", str(root))
    assert r.returncode == 2
    assert "'--gateway-id'" in r.stderr
    for bad_port in ("99999", "abc", "0"):  # checked here, not when the agent starts
        r = fieldline("install", "--gateway-id", "gw-7", "--cloud", f"mqtt://c:{bad_port}",
                      "--root", str(root))
        assert r.returncode == 2, bad_port
        assert "'--cloud'" in r.stderr, r.stderr
        assert "port" in r.stderr.lower(), r.stderr
    assert not (root / "etc/fieldline").exists()


def test_installed_broker_login_works_on_the_shipped_dropin(tmp_path: Path) -> None:
    """The agent's user the install puts in Mosquitto's password file, with the password it
    writes into gateway.toml, may read every device's readings through the shipped ACL, and
    every Sparkplug B edge node's, which publish only under their own node id and receive the
    agent's rebirth request."""
    root = scratch_root(tmp_path)
    r = fieldline("install", "--gateway-id", "gw-7", "--cloud", "mqtt://cloud.example:1883",
                  "--root", str(root))
    assert r.returncode == 0, r.stderr
    passwd = root / "etc/mosquitto/passwd"
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "d0", "device-pw"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "n0", "node-pw"], check=True)
    acl = root / "etc/mosquitto/fieldline-gateway.acl"
    broker = DeployedMosquitto(
        tmp_path / "mosquitto", root / "etc/mosquitto/conf.d/fieldline-gateway.conf",
        files={"/etc/mosquitto/passwd": passwd, "/etc/mosquitto/fieldline-gateway.acl": acl})
    broker.start()
    try:
        agent = load_edge_config(root / "etc/fieldline/gateway.toml").intake_broker
        got: list[str] = []
        ready = threading.Event()
        sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                          protocol=mqtt.MQTTv5, client_id="agent")
        sub.username_pw_set(agent.username, agent.password)
        sub.on_connect = lambda c, *_: c.subscribe([("devices/+/readings", 1),
                                                     ("spBv1.0/#", 1)])
        sub.on_subscribe = lambda *_: ready.set()
        sub.on_message = lambda _c, _u, m: got.append(m.topic)
        sub.connect("127.0.0.1", broker.port)
        sub.loop_start()
        assert ready.wait(10), "the agent's login was refused"
        dev = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                          protocol=mqtt.MQTTv5, client_id="d0")
        dev.username_pw_set("d0", "device-pw")
        dev.connect("127.0.0.1", broker.port)
        dev.loop_start()
        dev.publish("devices/d0/readings", b"{}", qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == ["devices/d0/readings"]
        commands: list[str] = []
        node = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                           protocol=mqtt.MQTTv5, client_id="n0")
        node.username_pw_set("n0", "node-pw")
        node.on_message = lambda _c, _u, m: commands.append(m.topic)
        node.connect("127.0.0.1", broker.port)
        node.loop_start()
        node.subscribe([("spBv1.0/plant/NCMD/n0", 1), ("spBv1.0/plant/NCMD/n9", 1)])
        for topic in ("spBv1.0/plant/DDATA/n0/s1", "spBv1.0/plant/NBIRTH/n0",
                      "spBv1.0/plant/DDATA/n9/s1", "devices/d0/readings"):
            node.publish(topic, b"x", qos=1).wait_for_publish(10)
        sub.publish("spBv1.0/plant/NCMD/n0", b"rebirth", qos=1).wait_for_publish(10)
        sub.publish("spBv1.0/plant/NCMD/n9", b"rebirth", qos=1).wait_for_publish(10)
        deadline = time.monotonic() + 10
        while (len(got) < 4 or not commands) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything refused would have arrived by now
        # its own node's and device's messages, and the agent's own command (it reads spBv1.0/#)
        assert got == ["devices/d0/readings", "spBv1.0/plant/DDATA/n0/s1",
                       "spBv1.0/plant/NBIRTH/n0", "spBv1.0/plant/NCMD/n0",
                       "spBv1.0/plant/NCMD/n9"]
        assert commands == ["spBv1.0/plant/NCMD/n0"]  # another node's commands: not for n0
        for c in (dev, node, sub):
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()


def test_uninstall_leaves_only_what_is_kept(tmp_path: Path) -> None:
    root = scratch_root(tmp_path)
    before = tree(root)
    r = fieldline("install", "--gateway-id", "gw-7", "--cloud", "mqtt://cloud.example",
                  "--root", str(root))
    assert r.returncode == 0, r.stderr
    (root / "var/lib/fieldline/outbox").mkdir()
    (root / "var/lib/fieldline/outbox/0001.batch").write_bytes(b"results")
    dry = fieldline("uninstall", "--root", str(root), "--dry-run")
    assert dry.returncode == 0
    assert (root / "etc/fieldline/gateway.toml").is_file()

    kept = fieldline("uninstall", "--root", str(root), "--keep-data")
    assert kept.returncode == 0, kept.stderr
    left = {p for p in tree(root) if p.startswith("var/lib/")}
    assert left == {"var/lib/fieldline", "var/lib/fieldline/outbox",
                    "var/lib/fieldline/outbox/0001.batch"}
    assert not (root / "etc/fieldline").exists()
    assert not (root / "etc/systemd/system/fieldline-edge.service").exists()
    assert not (root / "etc/mosquitto/conf.d/fieldline-gateway.conf").exists()

    gone = fieldline("uninstall", "--root", str(root))
    assert gone.returncode == 0, gone.stderr
    after = tree(root)
    after.pop("etc/.pwd.lock", None)  # useradd's lock file, and its backups (passwd-)
    for f in BASE:
        after.pop(f + "-", None)
    for f in BASE:  # the account files: the user came and went
        after.pop(f)
        before.pop(f, None)
    assert after == before
    assert "fieldline:" not in (root / "etc/passwd").read_text()
    assert not (root / "etc/mosquitto/passwd").exists()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `make dist` builds, from this checkout."""
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
                    str(ROOT)], check=True, timeout=600, capture_output=True)
    return next(dist.glob("fieldline-*.whl"))


def test_the_wheel_carries_the_view_and_the_configs_it_installs(tmp_path: Path,
                                                                 wheel: Path) -> None:
    """`make dist`'s wheel, installed in a fresh virtualenv, installs a gateway from the
    configs inside it (not from a checkout)."""
    whl = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    for f in ("fieldline/view/static/vendor/uPlot.iife.min.js", "fieldline/view/static/view.js",
              "fieldline-0.1.0.data/data/share/fieldline/deploy/gateway.toml",
              "fieldline-0.1.0.data/data/share/fieldline/deploy/mosquitto/gateway.conf",
              "fieldline-0.1.0.data/data/share/fieldline/deploy/systemd/fieldline-edge.service"):
        assert f in names, f
    assert not any(n.startswith("tests/") for n in names)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                    "install", "-q", "--no-deps", str(whl)], check=True, timeout=300,
                   capture_output=True)
    root = scratch_root(tmp_path)
    r = subprocess.run([str(venv / "bin" / "fieldline"), "edge", "install", "--gateway-id",
                        "gw-3", "--cloud", "mqtt://cloud.example", "--root", str(root)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert r.returncode == 0, r.stderr
    unit = (root / "etc/systemd/system/fieldline-edge.service").read_text()
    assert f"ExecStart={venv}/bin/fieldline edge run" in unit
    shipped = (ROOT / "deploy/mosquitto/gateway.conf").read_bytes()
    assert (root / "etc/mosquitto/conf.d/fieldline-gateway.conf").read_bytes() == shipped


SCRIPT = ROOT / "deploy/pi/install-edge.sh"


def install_edge(*args: str, env: dict[str, str], timeout_s: float = 600
                 ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout_s, check=False, env={**os.environ, **env})


def test_the_one_command_installs_from_the_wheel_and_uninstalls(tmp_path: Path,
                                                                wheel: Path) -> None:
    """`install-edge.sh` (what `make dist` puts beside the wheel): a virtualenv with the wheel
    and its [edge] dependencies from PyPI, then `fieldline edge install`; a second run changes
    nothing; `uninstall` removes the installation and the virtualenv. Into a scratch root and
    prefix (the Debian packages it would install are there already: this machine's tests use
    them; `make pi-check` runs it in the arm64 root)."""
    prefix = tmp_path / "opt"
    env = {"FIELDLINE_PREFIX": str(prefix), "FIELDLINE_WHEEL": str(wheel)}
    root = scratch_root(tmp_path)
    args = ["--gateway-id", "gw-9", "--cloud", "mqtt://cloud.example", "--root", str(root)]
    dry = install_edge(*args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would: python3 -m venv {prefix}/venv" in dry.stdout, dry.stdout
    assert not prefix.exists()
    assert not (root / "etc/fieldline").exists()
    first = install_edge(*args, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "done: fieldline==0.1.0 " in first.stdout, first.stdout
    assert "numpy==" in first.stdout, first.stdout
    unit = (root / "etc/systemd/system/fieldline-edge.service").read_text()
    assert f"ExecStart={prefix}/venv/bin/fieldline edge run" in unit
    assert load_edge_config(root / "etc/fieldline/gateway.toml").gateway == "gw-9"
    again = install_edge(*args, env=env)
    assert again.returncode == 0, again.stderr
    assert "unchanged: fieldline-0.1.0-py3-none-any.whl with [edge]" in again.stdout
    assert "0 steps changed" in again.stdout, again.stdout
    gone = install_edge("uninstall", "--root", str(root), env=env)
    assert gone.returncode == 0, gone.stderr
    assert not prefix.exists()
    assert not (root / "etc/fieldline").exists()
    assert not (root / "etc/systemd/system/fieldline-edge.service").exists()


def test_the_one_command_refuses_32_bit_arm_and_a_missing_wheel(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uname").write_text("#!/bin/sh\necho armv7l\n")
    (fake / "uname").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "FIELDLINE_PREFIX": str(tmp_path / "opt")}
    r = install_edge("--gateway-id", "gw-9", "--cloud", "mqtt://x", env=env, timeout_s=60)
    assert r.returncode == 1, r.stderr
    assert "32-bit ARM is not supported" in r.stderr, r.stderr
    r = install_edge("--gateway-id", "gw-9", "--cloud", "mqtt://x", timeout_s=60,
                     env={"FIELDLINE_PREFIX": str(tmp_path / "opt"), "FIELDLINE_WHEEL": ""})
    assert r.returncode == 1, r.stderr
    assert "no fieldline wheel" in r.stderr, r.stderr
    assert not (tmp_path / "opt").exists()
