"""fieldline on the whole NAB corpus, against NAB's published detectors, file for file.

``python -m bench.nab_corpus --nab PATH [--subset ../shared/data/nab]``

``PATH`` is a checkout of github.com/numenta/NAB (its ``data/``, ``labels/``,
``config/thresholds.json`` and ``results/``). The development data (``../shared/data/nab``)
holds 24 of NAB's 58 files; the project was tuned on those. Here every labelled file of the
corpus is replayed through the pipeline's code with the shipped configs (as ``bench.detect``
does) and scored at the shipped alert threshold (0.5: the platform's own alerts, never tuned
on these files). Each published detector is scored from its own per-row results
(``results/<detector>/``) at its own threshold (``config/thresholds.json``: tuned by NAB over
the whole corpus, held-out files included, which flatters them). Scores are given for the
development subset, for the files held out of it (how the detectors generalise) and for the
whole corpus (NAB's scoreboard; ``tests/test_scoring.py`` checks that this scorer reproduces
NAB's ``final_results.json`` from the same per-row results).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, figure, report
from bench.detect import REF_MS, ROOT
from cloud.config import load_cloud_config
from edge.config import load_edge_config
from fieldline.evaluate import bench_edge_config, nab_cases, run_recordings
from simulators.replay import parse_time
from simulators.scoring import NAB_PROFILES, NabFile, nab_corpus_score

# NAB's names for its detectors (results/<name>/), as its scoreboard shows them
PUBLISHED = {"ARTime": "ARTime", "numenta": "Numenta HTM", "contextOSE": "CAD OSE",
             "knncad": "KNN CAD", "randomCutForest": "Random Cut Forest",
             "twitterADVec": "Twitter ADVec", "windowedGaussian": "Windowed Gaussian"}
SHIPPED_THRESHOLD = 0.5


def published_scores(nab: Path, detector: str, relative: str) -> tuple[np.ndarray, np.ndarray]:
    """Row times (ms) and anomaly scores of one published detector on one file."""
    cat, base = relative.split("/")
    with (nab / "results" / detector / cat / f"{detector}_{base}").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([parse_time(r["timestamp"]) for r in rows], np.int64),
            np.array([float(r["anomaly_score"]) for r in rows]))


def splits(names: list[str], subset: set[str]) -> dict[str, list[str]]:
    out = {"development subset": [n for n in names if n in subset],
           "held out": [n for n in names if n not in subset], "whole corpus": names}
    return {k: v for k, v in out.items() if v}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nab", type=Path, required=True,
                    help="a checkout of github.com/numenta/NAB (data, labels, config, results)")
    ap.add_argument("--subset", type=Path, default=ROOT.parent / "shared" / "data" / "nab",
                    help="the development subset the project was tuned on (its data/)")
    ap.add_argument("--gateway", type=Path, default=ROOT / "deploy" / "gateway.toml")
    ap.add_argument("--cloud", type=Path, default=ROOT / "deploy" / "cloud.toml")
    args = ap.parse_args(argv)
    for need in ("data", "labels/combined_windows.json", "config/thresholds.json", "results"):
        if not (args.nab / need).exists():
            ap.error(f"--nab {args.nab}: no {need} (a checkout of github.com/numenta/NAB?)")
    subset = {f"{p.parent.name}/{p.name}" for p in (args.subset / "data").glob("*/*.csv")}
    thresholds = json.loads((args.nab / "config" / "thresholds.json").read_text())

    t0 = time.perf_counter()
    cases = nab_cases(args.nab)
    outs = run_recordings([c.recording for c in cases],
                          bench_edge_config(load_edge_config(args.gateway)),
                          load_cloud_config(args.cloud), ref_ms=REF_MS)
    took = time.perf_counter() - t0
    files = {c.relative: c.nab_file() for c in cases}
    ours = {c.relative: o.score for c, o in zip(cases, outs, strict=True)}
    # each detector on its own rows, as NAB scores it (one of them lacks rows of one file)
    theirs: dict[str, dict[str, tuple[NabFile, np.ndarray]]] = {d: {} for d in PUBLISHED}
    for d in PUBLISHED:
        for c in cases:
            ts, s = published_scores(args.nab, d, c.relative)
            theirs[d][c.relative] = (NabFile.from_times(c.relative, ts, c.windows_ms), s)

    table: dict[str, dict[str, dict[str, float]]] = {}
    figures: list[Figure] = []
    for split, names in splits(sorted(files), subset).items():
        fs = [files[n] for n in names]
        rows: dict[str, dict[str, float]] = {"fieldline": {
            p: nab_corpus_score(fs, [ours[n] for n in names], SHIPPED_THRESHOLD, p).normalised
            for p in NAB_PROFILES}}
        for d, label in PUBLISHED.items():
            rows[label] = {p: nab_corpus_score([theirs[d][n][0] for n in names],
                                               [theirs[d][n][1] for n in names],
                                               float(thresholds[d][p]["threshold"]),
                                               p).normalised for p in NAB_PROFILES}
        table[split] = rows
        windows = sum(len(files[n].windows) for n in names)
        print(f"\n{split}: {len(names)} files, {windows} windows")
        print(f"  {'detector':20s}" + "".join(f"{p:>22s}" for p in NAB_PROFILES))
        for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["standard"]):
            print(f"  {label:20s}" + "".join(f"{r[p]:22.1f}" for p in NAB_PROFILES))
        for p in NAB_PROFILES:
            best = max((lab for lab in rows if lab != "fieldline"), key=lambda lab: rows[lab][p])
            rank = 1 + sum(r[p] > rows["fieldline"][p] for lab, r in rows.items()
                           if lab != "fieldline")
            figures.append(figure(f"NAB {p}, {split} ({len(names)} files)",
                                  rows["fieldline"][p], "score", rows[best][p],
                                  f"best published ({best})",
                                  note=f"rank {rank} of {len(rows)}"))
    report("nab_corpus", figures)
    out = ROOT / "bench" / "results" / "nab_corpus_table.json"
    out.write_text(json.dumps({"nab": str(args.nab), "files": len(files), "seconds": took,
                               "threshold": SHIPPED_THRESHOLD, "scores": table},
                              indent=2) + "\n")
    print(f"  -> {out}")


if __name__ == "__main__":
    main()
