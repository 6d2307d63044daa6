"""Shared plumbing for benchmarks: services, timing, result files."""

from __future__ import annotations

import json
import platform
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _change(text: str, changes: dict[str, str] | None, name: str) -> str:
    for key, value in (changes or {}).items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        if n != 1:
            raise ValueError(f"deploy/{name} has no single {key} line to change")
    return text


def _shipped(name: str, work: Path, points: list[tuple[str, str]], changes: dict[str, str] | None,
             state: str) -> Path:
    """deploy/<name> as shipped with each (pattern, value) of ``points`` replaced once (the
    first match), its state directory under ``work`` and its registry line dropped (a simulated
    fleet is in no registry); ``changes``: ``key = value`` lines to replace, each of which must
    exist once. Fails when a pattern no longer matches, rather than run something else."""
    text = (DEPLOY / name).read_text()
    for pattern, value in points:
        text, n = re.subn(pattern, value, text, count=1)
        if n != 1:
            raise ValueError(f"deploy/{name} no longer has a line matching {pattern!r}")
    text = re.sub(r'state_dir = "[^"]*"', f'state_dir = "{work}/{state}"', text)
    text = re.sub(r"^registry = .*$", "", text, flags=re.M)
    text = _change(text, changes, name)
    (work / name).write_text(text)
    return work / name


def shipped_gateway(work: Path, intake_url: str, cloud_url: str,
                    changes: dict[str, str] | None = None) -> Path:
    """deploy/gateway.toml as shipped, pointed at these brokers (``_shipped``)."""
    return _shipped("gateway.toml", work, [
        (r'broker = "mqtts?://[^"]*"', f'broker = "{intake_url}"'),  # [intake], the first
        (r'broker = "mqtt://cloud[^"]*"', f'broker = "{cloud_url}"')], changes, "edge-state")


def shipped_cloud(work: Path, broker_url: str, influx_url: str,
                  changes: dict[str, str] | None = None) -> Path:
    """deploy/cloud.toml as shipped, pointed at this broker and InfluxDB (``_shipped``)."""
    return _shipped("cloud.toml", work, [
        (r'broker = "mqtt://[^"]*"', f'broker = "{broker_url}"'),
        (r'url = "http://[^"]*"', f'url = "{influx_url}"')], changes, "cloud-state")


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (a clean stop), then wait; whatever is still running after 30 s is
    killed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    reference: float | None = None  # the same quantity for the reference, same run
    reference_name: str = ""
    ratio: float | None = None
    note: str = ""


def figure(name: str, value: float, unit: str, reference: float | None = None,
           reference_name: str = "", note: str = "") -> Figure:
    ratio = value / reference if reference else None
    return Figure(name, value, unit, reference, reference_name, ratio, note)


def _num(v: float) -> str:
    """Large figures with thousands separators, small ones (an F1, a ratio) with 3 decimals."""
    return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"


def report(bench: str, figures: list[Figure]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}.json"
    doc = {"bench": bench, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": {"python": platform.python_version(), "cpu": platform.processor() or
                       platform.machine()},
           "figures": [asdict(f) for f in figures]}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\n== {bench} ==")
    for f in figures:
        ref = (f"  vs {f.reference_name} {_num(f.reference)} {f.unit}: ratio {f.ratio:.2f}x"
               if f.reference is not None and f.ratio is not None else "")
        print(f"  {f.name}: {_num(f.value)} {f.unit}{ref}"
              f"{'  (' + f.note + ')' if f.note else ''}")
    print(f"  -> {path}")
    return path


class GaveUpError(RuntimeError):
    """A benchmark waited as long as it may for something that did not happen."""


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str,
               saw: Callable[[], object] = lambda: "", poll_s: float = 0.05) -> float:
    """Poll ``cond`` until it holds; seconds waited. After ``timeout_s``: ``GaveUpError``, saying
    what was awaited and what was seen (a benchmark never waits for ever: a broker that drops
    messages would otherwise hang it)."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise GaveUpError(f"gave up after {timeout_s:.0f} s waiting for {what}; saw: {saw()}")
        time.sleep(poll_s)
    return time.monotonic() - t0


async def await_until(cond: Callable[[], bool], timeout_s: float, what: str,
                      saw: Callable[[], object] = lambda: "", poll_s: float = 0.05) -> float:
    """``wait_until`` for the event loop."""
    import asyncio

    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise GaveUpError(f"gave up after {timeout_s:.0f} s waiting for {what}; saw: {saw()}")
        await asyncio.sleep(poll_s)
    return time.monotonic() - t0
