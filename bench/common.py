"""Shared plumbing for benchmarks: services, timing, result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


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
