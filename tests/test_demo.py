"""`fieldline demo --duration` runs the whole platform headless, prints its summary, and leaves
nothing running behind it; while it runs, `fieldline edge status` and `fieldline cloud status`
read its parts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.rig import status_of

pytestmark = pytest.mark.integration


def test_headless_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    demo = subprocess.Popen(
        [sys.executable, "-m", "fieldline.cli", "demo", "--duration", "10", "--gateways", "2",
         "--devices", "20", "--backfill", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # while it runs, the status commands an operator runs beside the real parts work
        # beside the demo's, as the line it prints says
        assert demo.stderr is not None
        hint = ""
        deadline = time.monotonic() + 60
        while not hint.startswith("status: ") and time.monotonic() < deadline:
            hint = demo.stderr.readline()
            assert hint or demo.poll() is None, "the demo ended before it printed its status hint"
        commands = [c.strip().split() for c in hint.removeprefix("status: ").split("|")]
        assert [(Path(c[0]).name, *c[1:4]) for c in commands] == [
            ("fieldline", "edge", "status", "--state-dir"),
            ("fieldline", "cloud", "status", "--state-dir")], hint
        for command, words in zip(commands, ("agent running", "worker demo: OK"), strict=True):
            seen: list[tuple[int, str]] = []
            while not seen or seen[-1][0] != 0:
                assert time.monotonic() < deadline, seen[-3:]
                assert demo.poll() is None, seen[-3:]
                seen.append(status_of(command[1], *command[3:]))
                time.sleep(0.3)
            assert words in seen[-1][1], seen[-1][1]
        stdout, stderr = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:  # a failed check: stop it as Ctrl-C does (its services too)
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(60)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    assert demo.returncode == 0, stderr[-2000:]
    summary = stdout
    assert "fieldline demo summary" in summary
    assert "gw-1" in summary
    assert "gw-2" in summary
    assert "points written" in summary
    total = next(line for line in summary.splitlines() if line.strip().startswith("total"))
    assert int(total.split()[1].replace(",", "")) > 2 * 20 * 60  # backfill at least
    leftovers = [p.info for p in psutil.process_iter(["pid", "name", "cmdline"])
                 if p.info["name"] in ("mosquitto", "influxd")
                 and any("fieldline-demo-" in a for a in (p.info["cmdline"] or []))]
    assert leftovers == []
