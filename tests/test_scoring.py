"""The scoring of detections against labelled data: NAB's rule, checked against NAB's published
numbers, and SKAB's point-wise metrics."""

from __future__ import annotations

import csv
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulators.scoring import (
    MAX_TP,
    NAB_PROFILES,
    NabFile,
    PointResult,
    nab_best_threshold,
    nab_corpus_score,
    nab_file_score,
    nab_normalise,
    probation_rows,
    skab_point_score,
)

ROOT = Path(__file__).resolve().parent.parent
NAB = Path(os.environ.get("FIELDLINE_DATA", ROOT.parent / "shared" / "data")) / "nab"
RESULTS = os.environ.get("FIELDLINE_NAB_RESULTS")  # NAB's results/ directory (numenta/NAB)


def t(text: str) -> int:
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return int(datetime.strptime(text.strip(), fmt).replace(tzinfo=UTC).timestamp()
                       * 1000)
        except ValueError:
            continue
    raise ValueError(text)


def one_file(n: int = 1000, windows: tuple[tuple[int, int], ...] = ((400, 499),)) -> NabFile:
    return NabFile("f", np.arange(n, dtype=np.int64) * 60_000, windows)


def test_probation_is_15_percent_capped_at_750_rows() -> None:
    assert probation_rows(1000) == 150
    assert probation_rows(20_000) == 750


def test_earliest_detection_in_a_window_earns_its_position() -> None:
    f = one_file()
    det = np.zeros(1000, bool)
    det[[400, 450, 499]] = True  # only the first counts
    r = nab_file_score(f, det)
    assert r.score == pytest.approx(1.0)  # the left edge: A_TP * S(-1) / S(-1)
    assert (r.tp, r.fp, r.windows_detected) == (3, 0, 1)
    det = np.zeros(1000, bool)
    det[450] = True  # the middle: S(-0.5) / S(-1)
    expected = (2 / (1 + np.exp(-2.5)) - 1) / MAX_TP
    assert nab_file_score(f, det).score == pytest.approx(expected)


def test_false_positives_cost_more_far_from_a_window_and_probation_is_free() -> None:
    f = one_file()
    det = np.zeros(1000, bool)
    det[10] = True  # probation: not scored
    det[300] = True  # before any window: a full A_FP
    r = nab_file_score(f, det)
    assert r.score == pytest.approx(-1.0 - 0.11)  # the missed window, and one false positive
    near = np.zeros(1000, bool)
    near[501] = True  # just after the window: nearly free
    far = np.zeros(1000, bool)
    far[900] = True
    assert nab_file_score(f, near).score > nab_file_score(f, far).score > -1.12


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(200, 900), st.integers(5, 80)), min_size=1, max_size=4))
def test_null_scores_0_and_perfect_scores_100(spans: list[tuple[int, int]]) -> None:
    wins: list[tuple[int, int]] = []
    for a, w in sorted(spans):
        if not wins or a > wins[-1][1] + 1:
            wins.append((a, min(a + w, 999)))
    f = one_file(windows=tuple(wins))
    for profile in NAB_PROFILES:
        never = nab_corpus_score([f], [np.zeros(1000)], 0.5, profile)
        assert never.normalised == pytest.approx(0.0)
        perfect = np.zeros(1000)
        perfect[[a for a, _ in wins]] = 1.0
        assert nab_corpus_score([f], [perfect], 0.5, profile).normalised == pytest.approx(100.0)
    best = nab_best_threshold([f], [np.linspace(0, 1, 1000)])
    assert best.normalised >= nab_corpus_score([f], [np.linspace(0, 1, 1000)], 0.9).normalised


needs_nab = pytest.mark.skipif(not (NAB / "reference").is_dir(),
                               reason=f"NAB's reference files are not at {NAB}")


@needs_nab
def test_normalisation_reproduces_the_published_subset_scores() -> None:
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    n_windows = sum(len(w) for w in windows.values())
    raw: dict[tuple[str, str], float] = {}
    with (NAB / "reference" / "published_per_file_scores.csv").open() as fh:
        for r in csv.DictReader(fh):
            raw[(r["Detector"], r["Profile"])] = raw.get((r["Detector"], r["Profile"]), 0.0) \
                + float(r["Score"])
    with (NAB / "reference" / "subset_normalized_scores.csv").open() as fh:
        published = list(csv.DictReader(fh))
    assert published
    for row in published:
        for profile in NAB_PROFILES:
            ours = nab_normalise(raw[(row["detector"], profile)], n_windows, profile)
            assert round(ours, 1) == pytest.approx(float(row[profile])), (row, profile)


@pytest.mark.skipif(RESULTS is None, reason="set FIELDLINE_NAB_RESULTS to NAB's results/ "
                                            "directory (github.com/numenta/NAB) to run")
@needs_nab
def test_per_file_scores_match_nab_exactly() -> None:
    """Every published per-file score, with its TP/FP/FN/TN counts, from NAB's own per-row
    result files and thresholds."""
    assert RESULTS is not None
    windows = json.loads((NAB / "labels" / "combined_windows.json").read_text())
    checked = 0
    with (NAB / "reference" / "published_per_file_scores.csv").open() as fh:
        for r in csv.DictReader(fh):
            cat, base = r["File"].split("/")
            path = Path(RESULTS) / r["Detector"] / cat / f"{r['Detector']}_{base}"
            with path.open() as rf:
                rows = list(csv.DictReader(rf))
            ts = np.array([t(x["timestamp"]) for x in rows], np.int64)
            scores = np.array([float(x["anomaly_score"]) for x in rows])
            f = NabFile.from_times(r["File"], ts, [(t(a), t(b)) for a, b in windows[r["File"]]])
            got = nab_file_score(f, scores >= float(r["Threshold"]), r["Profile"])
            assert got.score == pytest.approx(float(r["Score"]), abs=1e-9), r
            assert (got.tp, got.fp, got.fn, got.tn) == (int(r["TP"]), int(r["FP"]),
                                                        int(r["FN"]), int(r["TN"])), r
            checked += 1
    assert checked > 1000


@pytest.mark.skipif(RESULTS is None, reason="set FIELDLINE_NAB_RESULTS to NAB's results/ "
                                            "directory (github.com/numenta/NAB) to run")
def test_whole_corpus_scores_match_nab_scoreboard() -> None:
    """NAB's scoreboard (``results/final_results.json``: all 58 files, the held-out ones
    ``bench.nab_corpus`` compares on included) from the published per-row results at NAB's own
    thresholds (``config/thresholds.json`` of the same checkout)."""
    from bench.nab_corpus import PUBLISHED, published_scores

    assert RESULTS is not None
    nab = Path(RESULTS).absolute().parent
    windows = json.loads((nab / "labels" / "combined_windows.json").read_text())
    thresholds = json.loads((nab / "config" / "thresholds.json").read_text())
    final = json.loads((Path(RESULTS) / "final_results.json").read_text())
    assert len(windows) == 58
    for det in PUBLISHED:
        files, scores = [], []
        for name in sorted(windows):
            ts, s = published_scores(nab, det, name)
            files.append(NabFile.from_times(name, ts, [(t(a), t(b)) for a, b in windows[name]]))
            scores.append(s)
        for profile in NAB_PROFILES:
            got = nab_corpus_score(files, scores, thresholds[det][profile]["threshold"], profile)
            assert got.normalised == pytest.approx(final[det][profile], abs=1e-6), (det, profile)


def test_skab_point_wise_counts_after_the_fitting_rows() -> None:
    label = np.zeros(1000, bool)
    label[600:800] = True
    det = np.zeros(1000, bool)
    det[100:200] = True  # inside the first 400 rows: not scored
    det[650:850] = True
    r = skab_point_score(label, det)
    assert (r.tp, r.fp, r.fn, r.tn) == (150, 50, 50, 350)
    assert r.f1 == pytest.approx(150 / (150 + 50))
    assert r.far == pytest.approx(50 / 400)
    assert r.mar == pytest.approx(50 / 200)
    assert (r + r).f1 == pytest.approx(r.f1)
    assert PointResult(0, 0, 0, 0).f1 == 0.0
