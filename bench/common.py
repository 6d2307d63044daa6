"""Shared plumbing for benchmarks: services, timing, result files."""

from __future__ import annotations

import json
import platform
import re
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


def shipped_gateway(work: Path, intake_url: str, cloud_url: str,
                    changes: dict[str, str] | None = None) -> Path:
    """deploy/gateway.toml as shipped, pointed at these brokers and a state directory under
    ``work`` (the registry line dropped: a simulated fleet is in no registry); ``changes``:
    ``key = value`` lines to replace, each of which must exist once."""
    g = (DEPLOY / "gateway.toml").read_text()
    g = re.sub(r'broker = "mqtts?://[^"]*"', f'broker = "{intake_url}"', g, count=1)  # [intake]
    g = re.sub(r'broker = "mqtt://cloud[^"]*"', f'broker = "{cloud_url}"', g, count=1)
    g = re.sub(r'state_dir = "[^"]*"', f'state_dir = "{work}/edge-state"', g)
    g = re.sub(r"^registry = .*$", "", g, flags=re.M)
    g = _change(g, changes, "gateway.toml")
    if intake_url not in g or cloud_url not in g:
        raise ValueError("deploy/gateway.toml no longer has the broker lines this bench points")
    (work / "gateway.toml").write_text(g)
    return work / "gateway.toml"


def shipped_cloud(work: Path, broker_url: str, influx_url: str,
                  changes: dict[str, str] | None = None) -> Path:
    """deploy/cloud.toml as shipped, pointed at this broker and InfluxDB (as above)."""
    c = (DEPLOY / "cloud.toml").read_text()
    c = re.sub(r'broker = "mqtt://[^"]*"', f'broker = "{broker_url}"', c, count=1)
    c = re.sub(r'url = "http://[^"]*"', f'url = "{influx_url}"', c, count=1)
    c = re.sub(r'state_dir = "[^"]*"', f'state_dir = "{work}/cloud-state"', c)
    c = re.sub(r"^registry = .*$", "", c, flags=re.M)
    c = _change(c, changes, "cloud.toml")
    if broker_url not in c or influx_url not in c:
        raise ValueError("deploy/cloud.toml no longer has the lines this bench points")
    (work / "cloud.toml").write_text(c)
    return work / "cloud.toml"


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
