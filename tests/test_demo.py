"""`fieldline demo --duration` runs the whole platform headless, prints its summary, and leaves
nothing running behind it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.integration


def test_headless_demo_runs_and_cleans_up(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fieldline.cli", "demo", "--duration", "6", "--gateways", "2",
         "--devices", "20", "--backfill", "60"],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = out.stdout
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
