"""The agent on a Raspberry Pi, proven on an emulated one: `make pi-check`.

A Debian 12 (Bookworm, as Raspberry Pi OS 64-bit) arm64 root built with ``debootstrap`` and run
through ``qemu-user-static`` (binfmt_misc): the checkout's wheel installed in it with
``pip install '<wheel>[edge]'`` (arm64 wheels of numpy, orjson, msgspec; paho is pure Python:
nothing compiled), the README's one command (``deploy/pi/install-edge.sh``, which ends in
``fieldline edge install``) inside it (idempotent; the unit passes ``systemd-analyze verify``;
Debian's own arm64 Mosquitto starts with the installed drop-in and takes the agent's login), the
edge tests run by the emulated interpreter, and the emulated agent in the real chain: host
Mosquitto, cloud worker and InfluxDB, 1,000 devices at 1 Hz, nothing lost.

The root is built once and kept (``$FIELDLINE_PI_ROOT``, default
``/var/tmp/fieldline-pi-arm64``; about 3 minutes); the wheel is installed afresh each run.
Needs root (chroot, mounts). Not part of `make test`: `make pi-check` (about 6 minutes with the
root already built).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import Mosquitto
from tests.rig import Rig

pytestmark = [pytest.mark.pi, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
PI = Path(os.environ.get("FIELDLINE_PI_ROOT", "/var/tmp/fieldline-pi-arm64"))
MIRROR = os.environ.get("FIELDLINE_PI_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3,python3-venv,ca-certificates,mosquitto,mosquitto-clients,systemd,passwd"
STAMP = PI / ".fieldline-root"
VENV = "/opt/fieldline/venv"
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "HOME": "/root"}  # what a login inside the root would have
EDGE_TESTS = ["tests/test_windows.py", "tests/test_sketch.py", "tests/test_codecs.py",
              "tests/test_outbox.py", "tests/test_clockguard.py", "tests/test_contract.py",
              "tests/test_schema.py", "tests/test_sparkplug.py"]


def sh(argv: list[str], timeout_s: float, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False,
                       **kw)  # type: ignore[call-overload]
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n" \
                              f"{r.stderr[-3000:]}"
    return r  # type: ignore[no-any-return]


def chroot(*argv: str, timeout_s: float = 300, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return sh(["chroot", str(PI), *argv], timeout_s, env={**CHROOT_ENV, **(env or {})})


def binfmt() -> None:
    reg = Path("/proc/sys/fs/binfmt_misc")
    if not (reg / "register").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(reg)], 30)
    if not (reg / "qemu-aarch64").exists():
        sh(["update-binfmts", "--enable", "qemu-aarch64"], 30)
    assert (reg / "qemu-aarch64").exists(), "qemu-aarch64 is not registered with binfmt_misc"


def build_root() -> float:
    """debootstrap in two stages: download on the host, configure under emulation. The
    binfmt entry (flags PF) resolves its interpreter inside the root: it is copied there."""
    t0 = time.monotonic()
    unmount_all()  # never delete through a bind mount of the host's /dev or /sys
    shutil.rmtree(PI, ignore_errors=True)
    sh(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
        f"--include={PACKAGES}", "bookworm", str(PI), MIRROR], 900)
    for f in ("/usr/bin/qemu-aarch64-static", "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"):
        if Path(f).exists():
            (PI / f.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, PI / f.lstrip("/"))
    sh(["chroot", str(PI), "/debootstrap/debootstrap", "--second-stage"], 1800)
    STAMP.write_text(PACKAGES + "\n")
    return time.monotonic() - t0


def unmount_all() -> None:
    """Whatever an interrupted earlier run left mounted below the root, deepest first."""
    inside = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(f"{PI}/")]
    for m in sorted(inside, reverse=True):
        subprocess.run(["umount", "-l", m], check=False, timeout=30)
    left = [line for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{PI}/")]
    assert not left, f"still mounted below {PI}: {left}"


class Mounts:
    def __init__(self) -> None:
        self.points: list[Path] = []

    def bind(self, src: Path, rel: str | None = None, *, proc: bool = False) -> Path:
        dst = PI / (rel or str(src).lstrip("/"))
        dst.mkdir(parents=True, exist_ok=True)
        if proc:
            sh(["mount", "-t", "proc", "proc", str(dst)], 30)
        else:
            sh(["mount", "--bind", str(src), str(dst)], 30)
        self.points.append(dst)
        return dst

    def release(self) -> None:
        for p in reversed(self.points):
            subprocess.run(["umount", "-l", str(p)], check=False, timeout=30)
        self.points.clear()


@dataclass
class PiRoot:
    root_build_s: float  # 0: kept from an earlier run
    wheel_install_s: float
    mounts: Mounts
    wheel: Path  # the checkout's wheel, as it is inside the root


def prepare_root(dist: Path) -> PiRoot:
    """The arm64 root (built once, kept), mounted, with this checkout's wheel installed in a
    fresh venv (``dist``: where the wheel is built). Release ``.mounts`` when done."""
    if os.geteuid() != 0:
        raise RuntimeError("the arm64 root needs root (debootstrap, chroot, mounts)")
    for tool in ("debootstrap", "qemu-aarch64-static", "update-binfmts"):
        if not shutil.which(tool):
            raise RuntimeError(f"{tool} missing: apt-get install -y debootstrap "
                               "qemu-user-static binfmt-support (make pi-check does)")
    binfmt()
    unmount_all()
    built_s = 0.0 if STAMP.is_file() and STAMP.read_text().strip() == PACKAGES else build_root()
    mounts = Mounts()
    try:
        mounts.bind(Path("/proc"), "proc", proc=True)
        mounts.bind(Path("/dev"))
        mounts.bind(Path("/sys"))
        # the root reaches PyPI through the host's network: the host's CA bundle (which may
        # hold a proxy's CA) and resolver
        shutil.copy2("/etc/ssl/certs/ca-certificates.crt",
                     PI / "etc/ssl/certs/ca-certificates.crt")
        shutil.copy2("/etc/resolv.conf", PI / "etc/resolv.conf")
        for d in ("run/mosquitto", "var/log/mosquitto"):  # what the package's unit creates
            (PI / d).mkdir(parents=True, exist_ok=True)
            chroot("chown", "mosquitto", f"/{d}")
        sh([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist),
            str(ROOT)], 600)
        wheel = next(dist.glob("fieldline-*.whl"))
        shutil.rmtree(PI / "opt/fieldline", ignore_errors=True)
        shutil.copy2(wheel, PI / "tmp" / wheel.name)
        t0 = time.monotonic()
        chroot("python3", "-m", "venv", VENV)
        out = chroot(f"{VENV}/bin/pip", "install", f"/tmp/{wheel.name}[edge]", timeout_s=900,
                     env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        installed_s = time.monotonic() - t0
        assert "Building wheel" not in out.stdout, "something was compiled:\n" + out.stdout
    except BaseException:
        mounts.release()
        raise
    return PiRoot(built_s, installed_s, mounts, Path("/tmp") / wheel.name)


@pytest.fixture(scope="module")
def pi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PiRoot]:
    try:
        root = prepare_root(tmp_path_factory.mktemp("dist"))
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield root
    finally:
        root.mounts.release()


def test_wheel_installs_on_arm64_with_nothing_compiled(pi: PiRoot) -> None:
    arch = chroot("uname", "-m").stdout.strip()
    assert arch == "aarch64"
    listed = chroot(f"{VENV}/bin/pip", "list", "--format=freeze").stdout
    for pkg in ("fieldline==0.1.0", "numpy==", "orjson==", "paho-mqtt=="):
        assert pkg in listed, listed
    probe = chroot(f"{VENV}/bin/python", "-c",
                   "import platform, numpy, orjson, edge.agent; print(platform.machine(), "
                   "numpy.__version__)").stdout
    assert probe.startswith("aarch64 ")
    print(f"root built in {pi.root_build_s:.0f} s (0: kept from an earlier run); wheel "
          f"with [edge] installed in {pi.wheel_install_s:.0f} s under emulation")


def test_edge_install_in_the_arm64_root(pi: PiRoot) -> None:
    """The README's one command, ``install-edge.sh`` beside the wheel, as a user runs it on the
    Pi (its Debian packages are in the root already: it finds them and installs none)."""
    shutil.copy2(ROOT / "deploy/pi/install-edge.sh", PI / "tmp/install-edge.sh")
    args = ["sh", "/tmp/install-edge.sh", "--gateway-id", "gw-pi",
            "--cloud", "mqtt://127.0.0.1:1884"]
    env = {"FIELDLINE_WHEEL": str(pi.wheel)}
    chroot(f"{VENV}/bin/fieldline", "edge", "uninstall")  # whatever an earlier run left
    (PI / VENV.lstrip("/") / ".fieldline-wheel.sha256").unlink(missing_ok=True)
    dry = chroot(*args, "--dry-run", env=env).stdout
    assert "unchanged: mosquitto, mosquitto-clients, python3-venv are installed" in dry, dry
    assert not (PI / "etc/fieldline").exists()
    t0 = time.monotonic()
    first = chroot(*args, env=env, timeout_s=900).stdout
    assert "done: fieldline==0.1.0 " in first, first
    assert "done: file /etc/fieldline/gateway.toml" in first, first
    again = chroot(*args, env=env, timeout_s=900).stdout
    assert "unchanged: fieldline-0.1.0-py3-none-any.whl with [edge]" in again, again
    assert "0 steps changed" in again, again
    print(f"install-edge.sh in the arm64 root: {time.monotonic() - t0:.0f} s for both runs")
    chroot("systemd-analyze", "verify", "/etc/systemd/system/fieldline-edge.service")
    # Debian's arm64 Mosquitto, started as its unit does, with the installed drop-in: it
    # listens on the shipped port, and the agent's login from gateway.toml is accepted by the
    # ACL'd broker. In a network namespace of its own, so 1883 is free whatever the host runs.
    from edge.config import load_edge_config

    cfg = load_edge_config(PI / "etc/fieldline/gateway.toml").intake_broker
    script = f"""
ip link set lo up
chroot {PI} mosquitto -c /etc/mosquitto/mosquitto.conf & broker=$!
trap 'kill $broker; wait $broker' EXIT
for i in $(seq 60); do
  if mosquitto_sub -h 127.0.0.1 -p 1883 -u '{cfg.username}' -P '{cfg.password}' \
       -t '$SYS/broker/store/messages/count' -C 1 -W 10; then exit 0; fi
  kill -0 $broker || {{ echo "emulated Mosquitto exited"; exit 1; }}
  sleep 0.5
done
exit 1
"""
    sub = sh(["unshare", "--net", "sh", "-c", script], 180)
    count = sub.stdout.strip().splitlines()[-1]
    assert count.isdigit(), sub.stdout  # the ACL lets the agent read the broker's counters
    gone = chroot("sh", "/tmp/install-edge.sh", "uninstall", "--dry-run", env=env).stdout
    assert "would: remove /opt/fieldline" in gone, gone  # (the other tests still need the venv)
    chroot(f"{VENV}/bin/fieldline", "edge", "uninstall")
    assert not (PI / "etc/fieldline").exists()


def test_edge_tests_pass_under_emulation(pi: PiRoot) -> None:
    chroot(f"{VENV}/bin/pip", "install", "-q", "pytest", "pytest-timeout", "hypothesis",
           timeout_s=900, env={"PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    dst = PI / "tmp/fieldline-tests"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ROOT / "tests", dst / "tests",
                    ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
    shutil.copytree(ROOT / "deploy", dst / "deploy")  # tests load the shipped configs
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    t0 = time.monotonic()
    r = chroot("sh", "-c", f"cd /tmp/fieldline-tests && {VENV}/bin/python -m pytest -q "
               f"-p no:cacheprovider -m 'not integration' --timeout 900 {' '.join(EDGE_TESTS)}",
               timeout_s=1800)
    print(f"edge tests under emulation: {r.stdout.strip().splitlines()[-1]} "
          f"({time.monotonic() - t0:.0f} s)")


def test_emulated_agent_in_the_real_chain(pi: PiRoot, tmp_path: Path,
                                          mosquitto_factory: Callable[..., Mosquitto],
                                          influx_db: InfluxV1Client) -> None:
    """Host Mosquitto (gateway and cloud), cloud worker and InfluxDB; the arm64 agent under
    emulation; 1,000 devices at 1 Hz for 30 s: every reading in InfluxDB, ledger balanced."""
    pi.mounts.bind(tmp_path)  # the rig's configs and state at the same path inside the root
    # checkpoints as often as the shipped config (the rig's fault tests take one a second: here
    # 15 MB of window state a second, which an emulated core on a slow day cannot keep up with)
    rig = Rig(tmp_path, mosquitto_factory, influx_db, devices=1_000, interval_ms=1_000,
              agent_cmd=["chroot", str(PI), f"{VENV}/bin/fieldline", "--log-level", "WARNING"],
              checkpoint="30s")
    try:
        rig.start_chain(fleet_s=30)
        rig.wait_fleet(120)
        # the simulator waits 5 s for its last acknowledgements; with the emulated agent taking
        # a core, the host's publisher can trail that long, and what it still holds then was
        # counted as published but never sent (27,000-29,000 of 30,000 arrived, the agent's
        # ledger exact): let it finish sending first
        assert rig.pub is not None
        assert rig.pub.flush(120), f"the fleet's broker never acknowledged: {rig.pub.counters}"
        n = len(rig.published)
        # emulation is several times slower than a Pi: the agent may trail the fleet by a while
        got = rig.wait_settled(n, timeout_s=300, quiet_s=60)
        led = rig.ledger_when(lambda d: d.get("windows_pending", 1) == 0, 120)
        report = rig.oracle()
        assert got == n, (f"{got} of {n} readings in InfluxDB; edge ledger {led}; edge "
                          f"health {rig.health('edge')}")
        assert report.clean, str(report)
        assert led["readings_received"] == (led["readings_accepted"] + led["rejected"]
                                            + led["late_dropped"] + led["duplicates"]), led
        assert led["windows_emitted"] == (led["windows_acked"] + led["windows_shed"]
                                          + led["windows_pending"]), led
        # and the operator's view on the gateway, by the arm64 `fieldline` (edge/status.py)
        st = subprocess.run(["chroot", str(PI), f"{VENV}/bin/fieldline", "edge", "status",
                             "--config", str(rig.gateway_cfg)], capture_output=True, text=True,
                            timeout=300, check=False)
        assert st.returncode == 0, st.stdout + st.stderr
        assert st.stdout.startswith("gateway gw-1: OK, agent running"), st.stdout
        health = rig.health("edge")
        print(f"emulated agent: {n:,} readings from 1,000 devices, all in InfluxDB; "
              f"agent RSS {health.get('rss_mb', 0):.0f} MiB")
    finally:
        rig.stop()
