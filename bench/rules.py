"""What keeping the pattern rules' state exactly costs the cloud worker: each batch's changes
journaled before its ack (``take_delta`` where the rules run, encoding and an fsynced append in
a thread) against the rules alone, per batch of a 10,000-device gateway; a snapshot; a restart
from a snapshot and five minutes of journal.

    python -m bench.rules [--devices 10000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, figure, report
from cloud.detect.stage import Detections
from cloud.enrich import EnrichedResults
from cloud.rules import RuleEngine, append_rules, parse_rules, save_rules
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


def run(journal: Path | None, stream: list[EnrichedResults]) -> float:
    """Seconds per batch (the first, which creates every series, left out)."""
    eng = RuleEngine(parse_rules(SPECS))
    eng.journaled = journal is not None
    spent = 0.0
    for k, b in enumerate(stream):
        t0 = time.perf_counter()
        eng.run(b, Detections())
        if journal is not None and (delta := eng.take_delta()) is not None:
            append_rules([delta], journal)
        if k:
            spent += time.perf_counter() - t0
    return spent / (len(stream) - 1)


def main(devices: int = 10_000) -> list[Figure]:
    stream = batches(devices, 31)
    figs: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rules.json"
        plain = min(run(None, stream) for _ in range(2))
        kept = min(run(path, stream) for _ in range(2))
        series = len(SPECS) * devices
        figs.append(figure(f"rules, journaled: a {devices:,}-row batch", kept * 1000, "ms",
                           plain * 1000, "the rules alone",
                           note=f"{len(SPECS)} rules, {series:,} entries changed a batch"))
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
                                f"{path.stat().st_size / 2**20:.1f} MiB; every 5 minutes"))
        # a restart: the snapshot of before, then 30 batches (5 minutes) of journal
        eng.journaled = True
        for b in batches(devices, 61)[31:]:
            eng.run(b, Detections())
            if (delta := eng.take_delta()) is not None:
                append_rules([delta], path)
        size = path.with_suffix(".journal").stat().st_size
        t0 = time.perf_counter()
        back = RuleEngine(parse_rules(SPECS))
        assert back.load(path)
        load = time.perf_counter() - t0
        assert back.snapshot()["d"] == eng.snapshot()["d"]
        figs.append(figure("restart: snapshot + 5 minutes of journal read", load * 1000, "ms",
                           plain * 1000, "one batch through the rules",
                           note=f"journal {size / 2**20:.1f} MiB"))
    report("rules", figs)
    return figs


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    main(ap.parse_args().devices)
