"""What keeping the pattern rules' state exactly costs the cloud worker: each batch's changes
journaled before its ack (``take_delta``, encoded where the rules run; an fsynced append in a
thread) against the rules alone, per batch of a 10,000-device gateway; a snapshot; a restart
from a snapshot and the longest journal the worker keeps.

    python -m bench.rules [--devices 10000]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, figure, report
from cloud.detect.stage import Detections
from cloud.enrich import EnrichedResults
from cloud.rules import RuleEngine, append_rules, parse_rules, save_rules
from cloud.worker import RULES_JOURNAL_MIN
from tests.detectkit import T0, Win, rows

SPECS: list[dict[str, object]] = [
    {"name": "hot", "kind": "consecutive", "field": "max", "above": 80, "count": 3},
    {"name": "fast", "kind": "rate", "above": 5.0},
    {"name": "silent", "kind": "absence", "after": "5m"},
]
WIDTH = 10_000  # 10 s windows: a batch every 10 s, five minutes of journal = 30 batches


def batches(devices: int, n: int) -> list[EnrichedResults]:
    rng = np.random.default_rng(7)
    return [rows([Win(f"d{i:05d}", "t", T0 + k * WIDTH, float(50 + 40 * rng.random()))
                  for i in range(devices)], width=WIDTH) for k in range(n)]


def run(journal: Path | None, stream: list[EnrichedResults]) -> tuple[float, float, float, int]:
    """Seconds per batch (the first, which creates every series, left out): the rules, taking
    the delta and encoding it (both where the rules run: the worker's event loop), the fsynced
    append (the worker's thread); and the full collections meanwhile (each walks every object
    of the process: what a batch's work keeps past the collector's young generations sets
    them off)."""
    eng = RuleEngine(parse_rules(SPECS))
    eng.journaled = journal is not None
    rules = take = append = 0.0
    full = gc.get_stats()[2]["collections"]
    for k, b in enumerate(stream):
        if k == 1:
            full = gc.get_stats()[2]["collections"]
        t0 = time.perf_counter()
        eng.run(b, Detections())
        t1 = time.perf_counter()
        delta = eng.take_delta() if journal is not None else None
        t2 = time.perf_counter()
        if journal is not None and delta is not None:
            append_rules([delta], journal)
        if k:
            rules += t1 - t0
            take += t2 - t1
            append += time.perf_counter() - t2
    n = len(stream) - 1
    return rules / n, take / n, append / n, gc.get_stats()[2]["collections"] - full


def main(devices: int = 10_000) -> list[Figure]:
    stream = batches(devices, 31)
    figs: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.json"
        plain = min(run(None, stream)[0] for _ in range(2))
        kept = min((run(path, stream) for _ in range(2)), key=lambda r: sum(r[:3]))
        series = len(SPECS) * devices
        figs.append(figure(f"rules journaled, in the event loop: a {devices:,}-row batch",
                           (kept[0] + kept[1]) * 1000, "ms", plain * 1000, "the rules alone",
                           note=f"{len(SPECS)} rules, {series:,} entries changed a batch; "
                                f"of which taking them {kept[1] * 1000:.1f} ms; full "
                                f"collections: {kept[3]} in {len(stream) - 1} batches"))
        figs.append(figure("rules journaled, in a thread: the fsynced append",
                           kept[2] * 1000, "ms", plain * 1000, "the rules alone"))
        eng = RuleEngine(parse_rules(SPECS))
        for b in stream:
            eng.run(b, Detections())
        t0 = time.perf_counter()
        doc = eng.snapshot()
        snap = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_rules(doc, path)
        write = time.perf_counter() - t0
        figs.append(figure("rules snapshot, where the rules run", snap * 1000, "ms",
                           plain * 1000, "one batch through the rules",
                           note=f"written in a thread in {write * 1000:.0f} ms, "
                                f"{path.stat().st_size / 2**20:.1f} MiB; every 5 minutes, or "
                                "once the journal is larger"))
        # a restart: the snapshot of before, then as much journal as the worker lets grow
        # before a snapshot replaces it (RULES_JOURNAL_MIN, or the snapshot's size)
        bound = max(RULES_JOURNAL_MIN, path.stat().st_size)
        eng.journaled = True
        size = 0
        for b in batches(devices, 61)[31:]:
            eng.run(b, Detections())
            if (delta := eng.take_delta()) is not None:
                size = append_rules([delta], path)
            if size > bound:
                break
        t0 = time.perf_counter()
        back = RuleEngine(parse_rules(SPECS))
        assert back.load(path)
        load = time.perf_counter() - t0
        got, want = back.snapshot()["d"], eng.snapshot()["d"]
        assert sorted(map(repr, got)) == sorted(map(repr, want))  # the same state
        figs.append(figure("restart: the snapshot and the longest journal read", load * 1000,
                           "ms", plain * 1000, "one batch through the rules",
                           note=f"journal {size / 2**20:.1f} MiB"))
    report("rules", figs)
    return figs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    main(ap.parse_args().devices)
