"""The windowing engine: property tests against the plain-Python reference, plus examples."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.contract import ResultColumns
from devices.readings import ReadingColumns
from edge.aggregates import AggArrays, fold_sorted, merge_into
from edge.windows import NEVER, WindowEngine, WindowSpec
from tests.reference import reference_windows

BASE = 1_700_000_000_000
SIZE, OOO, LATE = 1_000, 300, 2_000

readings_st = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 12_000),
              st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)),
    min_size=1, max_size=150,
)


def cols(rows: list[tuple[int, int, int, float]]) -> ReadingColumns:
    n = len(rows)
    return ReadingColumns(
        np.array([r[0] for r in rows], np.int32), np.array([r[1] for r in rows], np.int32),
        np.array([BASE + r[2] for r in rows], np.int64), np.array([r[3] for r in rows]),
        np.full(n, -1, np.int64), np.zeros(n, np.int64))


Final = dict[tuple[int, int, int], dict[str, float]]


def run_engine(rows: list[tuple[int, int, int, float]], cuts: list[int],
               snapshot_at: int | None = None) -> tuple[Final, int, list[ResultColumns]]:
    spec = WindowSpec(size_ms=SIZE, out_of_orderness_ms=OOO, allowed_lateness_ms=LATE,
                      idle_timeout_ms=10**9)
    eng = WindowEngine(spec)
    bounds = sorted({0, len(rows), *[c % (len(rows) + 1) for c in cuts]})
    emitted: list[ResultColumns] = []
    dropped = 0
    prev_wm = None
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if snapshot_at is not None and i == snapshot_at:
            snap = eng.snapshot()
            eng = WindowEngine(spec)
            eng.restore(snap, 0)
        out = eng.fold(cols(rows[lo:hi]), 0)
        dropped += out.late_dropped
        emitted.append(eng.emit(0))
        wm = eng.watermarks()
        if prev_wm is not None:  # watermarks never regress
            assert (wm[: len(prev_wm)] >= prev_wm).all()
        prev_wm = wm.copy()
    emitted.append(eng.flush_all())
    final: Final = {}
    for res in emitted:
        for j in range(len(res)):
            key = (int(res.device[j]), int(res.metric[j]), int(res.start[j]))
            if key in final:
                assert res.rev[j] == final[key]["rev"] + 1  # revisions count up by one
            final[key] = {f: float(getattr(res, f)[j]) for f in (
                "count", "sum", "min", "max", "mean", "m2", "first_ts", "first", "last_ts",
                "last", "rev")}
    return final, dropped, emitted


def check_against_reference(rows: list[tuple[int, int, int, float]],
                            final: Final,
                            dropped: int) -> None:
    ref = reference_windows([(f"d{d}", f"m{m}", BASE + t, v) for d, m, t, v in rows],
                            size_ms=SIZE, ooo_ms=OOO, lateness_ms=LATE)
    expected = {(int(k[0][1:]), int(k[1][1:]), k[2]): w for k, w in ref.windows.items()}
    assert set(final) == set(expected)
    assert dropped == len(ref.dropped)
    # nothing is both in a window and dropped
    assert sum(int(f["count"]) for f in final.values()) + dropped == len(rows)
    for k, w in expected.items():
        f = final[k]
        assert f["count"] == w.count
        assert f["min"] == w.min
        assert f["max"] == w.max
        assert w.first is not None
        assert w.last is not None
        assert (f["first_ts"], f["first"]) == w.first
        assert (f["last_ts"], f["last"]) == w.last
        exact_mean = math.fsum(w.values) / w.count
        assert math.isclose(f["mean"], exact_mean, rel_tol=1e-9, abs_tol=1e-9)
        exact_m2 = math.fsum((v - exact_mean) ** 2 for v in w.values)
        assert math.isclose(f["m2"], exact_m2, rel_tol=1e-7, abs_tol=1e-6)


@settings(max_examples=300, deadline=None)
@given(readings_st, st.lists(st.integers(0, 200), max_size=8))
def test_results_equal_reference_whatever_the_micro_batches(rows, cuts) -> None:
    final, dropped, _ = run_engine(rows, cuts)
    check_against_reference(rows, final, dropped)


@settings(max_examples=150, deadline=None)
@given(readings_st, st.lists(st.integers(0, 200), min_size=2, max_size=8),
       st.integers(1, 4))
def test_snapshot_restored_mid_stream_gives_the_same_results(rows, cuts, at) -> None:
    straight, d1, _ = run_engine(rows, cuts)
    resumed, d2, _ = run_engine(rows, cuts, snapshot_at=at)
    assert d1 == d2
    assert straight.keys() == resumed.keys()
    for k in straight:
        for f in ("count", "min", "max", "first", "last", "rev"):
            assert straight[k][f] == resumed[k][f]
        assert math.isclose(straight[k]["mean"], resumed[k]["mean"], rel_tol=1e-12,
                            abs_tol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.floats(-1e6, 1e6, allow_nan=False)),
                min_size=2, max_size=60), st.integers(1, 59))
def test_merge_of_two_parts_equals_folding_the_whole(pairs, cut) -> None:
    cut = min(cut, len(pairs) - 1)

    def fold(part: list[tuple[int, float]]) -> AggArrays:
        part = sorted(part, key=lambda p: (p[0], p[1]))
        ts = np.array([p[0] for p in part], np.int64)
        v = np.array([p[1] for p in part])
        return fold_sorted(np.array([0], np.int64), ts, v)

    whole = fold(pairs)
    a = fold(pairs[:cut])
    merge_into(a, np.array([0], np.int64), fold(pairs[cut:]))
    for f in ("count", "min", "max", "first_ts", "first", "last_ts", "last"):
        assert getattr(a, f)[0] == getattr(whole, f)[0], f
    assert math.isclose(a.mean[0], whole.mean[0], rel_tol=1e-9, abs_tol=1e-6)
    assert math.isclose(a.m2[0], whole.m2[0], rel_tol=1e-7, abs_tol=1e-3)


def test_a_device_with_a_fast_clock_does_not_make_others_late() -> None:
    eng = WindowEngine(WindowSpec(size_ms=10_000, out_of_orderness_ms=1_000,
                                  allowed_lateness_ms=0, idle_timeout_ms=10**9))
    skew = 10 * 60_000  # device 1's clock runs ten minutes ahead
    rows = []
    for s in range(120):
        rows.append((0, 0, s * 1000, float(s)))
        rows.append((1, 0, s * 1000 + skew, float(s)))
    out = eng.fold(cols(rows), 0)
    assert out.late_dropped == 0
    assert out.late_revised == 0
    res = eng.emit(0)
    dev0 = res.device == 0
    assert int(res.count[dev0].sum()) == 110  # all but the window still open (wm 119 s - 1 s)
    assert eng.watermarks()[0] == BASE + 119_000 - 1_000
    assert eng.watermarks()[1] == BASE + 119_000 + skew - 1_000


def test_idle_devices_close_their_windows_and_stop_holding_the_gateway_back() -> None:
    eng = WindowEngine(WindowSpec(size_ms=1_000, out_of_orderness_ms=0,
                                  allowed_lateness_ms=5_000, idle_timeout_ms=2_000))
    eng.fold(cols([(0, 0, 100, 1.0), (1, 0, 50_000, 2.0)]), now_mono_ms=0)
    assert eng.gateway_watermark() == BASE + 100
    assert len(eng.emit(1_000)) == 0  # nothing has fired yet
    eng.fold(cols([(1, 0, 51_000, 3.0)]), now_mono_ms=1_500)
    res = eng.emit(2_500)  # device 0 silent for 2.5 s: idle, its window closes
    assert (res.device == 0).sum() == 1
    assert (res.device == 1).sum() == 1  # device 1's first window fired normally
    assert eng.gateway_watermark() == BASE + 51_000  # device 0 no longer counts
    assert eng.active_devices == 1
    eng.emit(10_000)  # idle beyond idle_timeout + lateness: device 0's state is purged
    assert eng.watermarks()[0] >= BASE + 1_000 + 5_000
    assert eng.max_ts[0] != NEVER
