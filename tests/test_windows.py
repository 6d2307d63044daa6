"""The windowing engine: property tests against the plain-Python reference, plus examples.

For random streams (random devices, event times, values, arrival order, exact duplicates) cut
into random micro-batches, the final result of every window of every kind must equal the
reference computed one reading at a time; watermarks never go back; every reading is either
in windows or counted (duplicate or late), never both; a snapshot restored mid-stream changes
nothing; percentiles stay within the sketch's bound.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devices.contract import ResultColumns
from devices.readings import ReadingColumns
from edge.aggregates import AggArrays, fold_sorted, merge_groups, merge_into
from edge.duplicates import DuplicateFilter, words_for
from edge.engine import EngineConfig, WindowEngine
from edge.eventtime import NEVER, EventTimeSpec
from edge.windows import WindowSpec
from tests.reference import reference_engine, reference_windows

BASE = 1_700_000_000_000
SIZE, OOO, LATE = 1_000, 300, 2_000
ALPHA = 0.01

SPECS = [WindowSpec.parse(s) for s in ("1s", "hopping:2s/500ms", "session:700ms", "count:3")]

reading_st = st.tuples(st.integers(0, 2), st.integers(0, 1), st.integers(0, 12_000),
                       st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False))


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[int, int, int, float, int]]:
    base = draw(st.lists(reading_st, min_size=1, max_size=120))
    # every third reading carries no sequence number: identified by event time and value
    rows = [(d, m, t, v, -1 if i % 3 == 0 else i) for i, (d, m, t, v) in enumerate(base)]
    dups = draw(st.lists(st.integers(0, len(rows) - 1), max_size=10))
    for i in dups:  # exact re-deliveries, later in the stream
        at = draw(st.integers(i + 1, len(rows)))
        rows.insert(at, rows[i])
    return rows


def cols(rows: list[tuple[int, int, int, float, int]]) -> ReadingColumns:
    n = len(rows)
    return ReadingColumns(
        np.array([r[0] for r in rows], np.int32), np.array([r[1] for r in rows], np.int32),
        np.array([BASE + r[2] for r in rows], np.int64), np.array([r[3] for r in rows]),
        np.array([r[4] for r in rows], np.int64), np.zeros(n, np.int64))


def engine(specs: list[WindowSpec] = SPECS, dense: bool = True) -> WindowEngine:
    return WindowEngine(EngineConfig(
        windows=tuple(specs), sketch_alpha=ALPHA, percentiles=(0.0, 0.5, 0.9, 1.0),
        dedup_memory=1024, dense=dense,
        time=EventTimeSpec(out_of_orderness_ms=OOO, allowed_lateness_ms=LATE,
                           idle_timeout_ms=10**9)))


Final = dict[tuple[str, int, int, int], dict[str, object]]


def run(rows: list[tuple[int, int, int, float, int]], cuts: list[int],
        snapshot_at: int | None = None, specs: list[WindowSpec] = SPECS, dense: bool = True,
        rewrite: Callable[[dict[str, Any]], dict[str, Any]] = lambda snap: snap,
        first: WindowEngine | None = None, then: WindowEngine | None = None,
        ) -> tuple[Final, int, dict[str, int]]:
    """Fold ``rows`` cut at ``cuts``, emitting after each micro-batch; ``snapshot_at``: the
    state goes through a snapshot and ``restore`` there, into ``then`` when given (another
    configuration), else a fresh engine like the first (``first``, else ``engine(...)``)."""
    eng = first or engine(specs, dense)
    labels = eng.config.labels
    bounds = sorted({0, len(rows), *[c % (len(rows) + 1) for c in cuts]})
    final: Final = {}
    dups = 0
    late: dict[str, int] = dict.fromkeys(labels, 0)
    prev_wm = None

    def take(res: ResultColumns) -> None:
        sup = res.superseded
        if sup is not None:
            for d, m, k, s in zip(sup.device.tolist(), sup.metric.tolist(), sup.spec.tolist(),
                                  sup.start.tolist(), strict=True):
                final.pop((labels[k], d, m, s))
        assert res.spec is not None
        assert res.pct is not None
        for j in range(len(res)):
            key = (labels[int(res.spec[j])], int(res.device[j]), int(res.metric[j]),
                   int(res.start[j]))
            if key in final:  # revisions count up
                assert int(res.rev[j]) > int(final[key]["rev"])  # type: ignore[call-overload]
            final[key] = {f: float(getattr(res, f)[j]) for f in (
                "count", "sum", "min", "max", "mean", "m2", "first_ts", "first", "last_ts",
                "last", "rev")}
            assert res.seq_min is not None
            assert res.seq_max is not None
            assert res.seq_sum is not None
            final[key]["seq"] = (int(res.seq_min[j]), int(res.seq_max[j]), int(res.seq_sum[j]))
            final[key]["pct"] = res.pct[j].tolist()

    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if snapshot_at is not None and i == snapshot_at:
            snap = rewrite(eng.snapshot())
            eng = then or engine(specs, dense)
            eng.restore(snap, 0)
            labels = eng.config.labels
        out = eng.fold(cols(rows[lo:hi]), 0)
        dups += out.duplicates
        for k, v in out.late_dropped.items():
            late[k] = late.get(k, 0) + v
        take(eng.emit(0))
        wm = eng.watermarks()
        if prev_wm is not None:  # watermarks never regress
            assert (wm[: len(prev_wm)] >= prev_wm).all()
        prev_wm = wm.copy()
    take(eng.flush_all())
    return final, dups, late


def check(rows: list[tuple[int, int, int, float, int]], final: Final, dups: int,
          late: dict[str, int], specs: list[WindowSpec] = SPECS, *, lateness_ms: int = LATE,
          alpha: float = ALPHA) -> None:
    ref, ref_dups, ref_late = reference_engine(
        [(d, m, BASE + t, v, s) for d, m, t, v, s in rows], specs, ooo_ms=OOO,
        lateness_ms=lateness_ms)
    assert dups == ref_dups
    assert late == ref_late
    assert set(final) == set(ref), (sorted(set(final) ^ set(ref))[:5])
    for spec in specs:  # every accepted reading is in windows or counted late, never both
        if spec.kind in ("tumbling", "session", "count"):
            inside = sum(int(f["count"]) for k, f in final.items()  # type: ignore[call-overload]
                         if k[0] == spec.label)
            assert inside + late[spec.label] + dups == len(rows)
    for k, w in ref.items():
        f = final[k]
        assert f["count"] == w.count
        assert f["min"] == w.min
        assert f["max"] == w.max
        assert w.first is not None
        assert w.last is not None
        assert (f["first_ts"], f["first"]) == w.first
        assert (f["last_ts"], f["last"]) == w.last
        assert f["seq"] == (min(w.seqs), max(w.seqs), sum(w.seqs))
        exact_mean = math.fsum(w.values) / w.count
        assert math.isclose(f["mean"], exact_mean, rel_tol=1e-9, abs_tol=1e-9)  # type: ignore[arg-type]
        exact_m2 = math.fsum((v - exact_mean) ** 2 for v in w.values)
        assert math.isclose(f["m2"], exact_m2, rel_tol=1e-7, abs_tol=1e-6)  # type: ignore[arg-type]
        vals = sorted(w.values)
        for q, est in zip((0.0, 0.5, 0.9, 1.0), f["pct"], strict=True):  # type: ignore[call-overload]
            exact = vals[math.floor(q * (len(vals) - 1))]
            assert abs(est - exact) <= alpha * abs(exact) + 1e-9, (q, est, exact)


@settings(max_examples=400, deadline=None)
@given(streams(), st.lists(st.integers(0, 200), max_size=8), st.booleans())
def test_every_window_kind_equals_the_reference_whatever_the_micro_batches(rows, cuts,
                                                                           dense) -> None:
    final, dups, late = run(rows, cuts, dense=dense)
    check(rows, final, dups, late)


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(0, 200), min_size=2, max_size=8), st.integers(1, 4),
       st.booleans())
def test_a_snapshot_restored_mid_stream_gives_the_same_results(rows, cuts, at, dense) -> None:
    straight = run(rows, cuts, dense=dense)
    resumed = run(rows, cuts, snapshot_at=at, dense=dense)
    assert straight[1:] == resumed[1:]
    assert straight[0].keys() == resumed[0].keys()
    for k, f in straight[0].items():
        g = resumed[0][k]
        for name in ("count", "min", "max", "first", "last", "rev", "pct"):
            assert f[name] == g[name], name
        assert math.isclose(f["mean"], g["mean"], rel_tol=1e-12, abs_tol=1e-12)  # type: ignore[arg-type]


def series_major(snap: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint as written before the dense layout became slot-major (cell = series * W +
    slot) with shifted moments, from one written now (cell = slot * cap + series; mean, sum and
    m2 holding K, sum(x - K) and sum((x - K)^2)), and before duplicates had seq slots."""
    out = dict(snap)
    for key in [k for k in snap if k.endswith("layout")]:
        p = key[: -len("layout")]
        del out[key], out[p + "moments"]
        n = snap[p + "agg_count"].astype(float)
        k, s1, s2 = snap[p + "agg_mean"], snap[p + "agg_sum"], snap[p + "agg_m2"]
        with np.errstate(invalid="ignore", divide="ignore"):
            snap = {**snap, p + "agg_sum": n * k + s1,
                    p + "agg_mean": np.where(n > 0, k + s1 / n, 0.0),
                    p + "agg_m2": np.where(n > 0, s2 - s1 * s1 / n, 0.0)}
        w = int(snap[p + "W"][0])
        cap = len(snap[p + "widx"]) // w
        for name in ["widx", "rev", "dirty", "hist", "hbase"] + [k[len(p):] for k in snap
                                                                 if k.startswith(p + "agg_")]:
            a = snap[p + name]
            out[p + name] = a.reshape(w, cap, *a.shape[1:]).swapaxes(0, 1).reshape(a.shape)
        codes, counts = snap[p + "ssk_codes"], snap[p + "ssk_counts"]
        cell = codes >> 32
        old = (((cell % cap) * w + cell // cap) << 32) | (codes & 0xFFFFFFFF)
        order = np.argsort(old)
        out[p + "ssk_codes"], out[p + "ssk_counts"] = old[order], counts[order]
    # duplicates: one ring per device of seqs and flagged hashes in arrival order, with a
    # position and the highest seq, instead of seq slots and a ring of hashes
    out = seq_slots(out)
    seq_ring, hash_ring = out.pop("dup_seq_ring"), out.pop("dup_hash_ring")
    m = max(seq_ring.shape[1], hash_ring.shape[1])
    devices = max(len(seq_ring), len(hash_ring))
    ring = np.full((devices, m), -1, np.int64)
    pos = np.zeros(devices, np.int64)
    high = np.full(devices, -1, np.int64)
    for d in range(devices):
        seqs = [int(x) for x in (seq_ring[d] if d < len(seq_ring) else []) if x >= 0]
        codes = sorted(seqs) + [int(x) for x in (hash_ring[d] if d < len(hash_ring) else [])
                                if x >= 0]
        ring[d, : len(codes)] = codes
        pos[d] = len(codes) % m
        high[d] = max(seqs, default=-1)
    out.update(dup_ring=ring, dup_pos=pos, dup_high=high)
    return out


def seq_slots(snap: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's duplicate memory as it was until 2026-12-02: per device ``memory`` slots,
    slot ``seq % memory`` holding the highest seq that landed there, instead of bitmaps."""
    out = dict(snap)
    tags, bits = out.pop("dup_seq_tag"), out.pop("dup_seq_bits")
    m = int(out.pop("dup_memory")[0])
    ring = np.full((len(tags), m), -1, np.int64)
    for d in range(len(tags)):
        for tag, word in zip(tags[d].tolist(), bits[d].tolist(), strict=True):
            for b in range(64):
                if tag >= 0 and word >> b & 1:
                    q = tag * 64 + b
                    ring[d, q % m] = max(ring[d, q % m], q)
    out["dup_seq_ring"] = ring
    return out


# device, metric, ms after BASE, value, seq (-1: none); found by hypothesis on 2026-12-05
MOVED_TWICE = [(0, 0, 0, 0.0, -1), (0, 0, 0, 0.0, 1), (0, 0, 0, 0.0, 2), (1, 0, 2, 0.0, -1),
               (1, 0, 1002, 0.0, 4), (0, 0, 0, 0.0, 5), (0, 0, 0, 0.0, -1), (0, 0, 0, 0.0, 7),
               (0, 0, 0, 0.0, 8), (1, 0, 1, 0.0, -1), (1, 0, 3, 0.0, 10), (1, 0, 0, 0.0, 11)]


def test_a_session_moved_twice_by_late_readings_withdraws_only_what_it_emitted() -> None:
    """Device 1's session is emitted under start 2; late readings at 1 and 3 move it to 1 and
    keep it open (withdrawn under 2, not emitted under 1 yet); a reading at 0 moves it again.
    The engine withdrew start 1 too, which was never emitted (it took "emitted once" for
    "emitted under this start"). ``run`` fails on withdrawing what it never got."""
    final, dups, late = run(MOVED_TWICE, [5, 11])
    check(MOVED_TWICE, final, dups, late)
    sessions = sorted(k[3] - BASE for k in final if k[0] == "session:700ms" and k[1] == 1)
    assert sessions == [0, 1002]
    for at in (1, 2, 3):
        assert run(MOVED_TWICE, [5, 11], snapshot_at=at) == (final, dups, late)


def test_a_session_checkpoint_from_before_it_said_what_was_emitted_restores() -> None:
    """Checkpoints written before 2026-12-05 do not say under which start a session was
    emitted; they restore taking every emitted session as emitted under its start (at worst
    a withdrawal of a point that was never written, which the cloud finds nothing for)."""
    def older(snap: dict[str, Any]) -> dict[str, Any]:
        assert any(k.endswith("shown") for k in snap)
        return {k: v for k, v in snap.items() if not k.endswith("shown")}

    straight = run(MOVED_TWICE, [5, 11])
    assert run(MOVED_TWICE, [5, 11], snapshot_at=1, rewrite=older) == straight


@settings(max_examples=60, deadline=None)
@given(streams(), st.lists(st.integers(0, 200), min_size=2, max_size=8), st.integers(1, 4))
def test_a_checkpoint_with_the_seq_slots_of_before_restores(rows, cuts, at) -> None:
    straight = run(rows, cuts)
    assert run(rows, cuts, snapshot_at=at, rewrite=seq_slots) == straight


@settings(max_examples=60, deadline=None)
@given(streams(), st.lists(st.integers(0, 200), min_size=2, max_size=8), st.integers(1, 4))
def test_a_checkpoint_in_the_earlier_layout_and_moments_restores(rows, cuts, at) -> None:
    straight = run(rows, cuts)
    resumed = run(rows, cuts, snapshot_at=at, rewrite=series_major)
    assert straight[1:] == resumed[1:]
    assert straight[0].keys() == resumed[0].keys()
    for k, f in straight[0].items():
        for name in ("count", "min", "max", "first", "last", "rev", "pct", "seq"):
            assert f[name] == resumed[0][k][name], name
        g = resumed[0][k]
        assert math.isclose(f["mean"], g["mean"], rel_tol=1e-9, abs_tol=1e-9)  # type: ignore[arg-type]
        assert math.isclose(f["m2"], g["m2"], rel_tol=1e-7, abs_tol=1e-6)  # type: ignore[arg-type]
        assert math.isclose(f["sum"], g["sum"], rel_tol=1e-9, abs_tol=1e-6)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 100), st.floats(-1e6, 1e6, allow_nan=False)),
                min_size=2, max_size=60), st.integers(1, 59), st.integers(1, 59))
def test_merging_parts_equals_folding_the_whole(pairs, cut, cut2) -> None:
    cut = min(cut, len(pairs) - 1)

    def fold(part: list[tuple[int, float]]) -> AggArrays:
        ts = np.array([p[0] for p in part], np.int64)
        v = np.array([p[1] for p in part])
        return fold_sorted(np.array([0], np.int64), ts, v, ts * 7 + 3)  # seqs derived from ts

    whole = fold(pairs)
    a = fold(pairs[:cut])
    merge_into(a, np.array([0], np.int64), fold(pairs[cut:]))
    cuts = sorted({0, cut, min(cut2, len(pairs) - 1)})
    parts = AggArrays.concat([fold(pairs[lo:hi]) for lo, hi in
                              zip(cuts, [*cuts[1:], len(pairs)], strict=True) if hi > lo])
    n_way = merge_groups(np.array([0], np.int64), parts)
    for merged in (a, n_way):
        for f in ("count", "min", "max", "first_ts", "first", "last_ts", "last", "seq_min",
                  "seq_max", "seq_sum"):
            assert getattr(merged, f)[0] == getattr(whole, f)[0], f
        assert math.isclose(merged.mean[0], whole.mean[0], rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(merged.m2[0], whole.m2[0], rel_tol=1e-7, abs_tol=1e-3)


def test_a_device_with_a_fast_clock_does_not_make_others_late() -> None:
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=10_000),), time=EventTimeSpec(
        out_of_orderness_ms=1_000, allowed_lateness_ms=0, idle_timeout_ms=10**9)))
    skew = 10 * 60_000  # device 1's clock runs ten minutes ahead
    rows = []
    for s in range(120):
        rows.append((0, 0, s * 1000, float(s), s))
        rows.append((1, 0, s * 1000 + skew, float(s), s))
    out = eng.fold(cols(rows), 0)
    assert out.late_dropped["10s"] == 0
    assert out.late_revised["10s"] == 0
    res = eng.emit(0)
    dev0 = res.device == 0
    assert int(res.count[dev0].sum()) == 110  # all but the window still open (wm 119 s - 1 s)
    assert eng.watermarks()[0] == BASE + 119_000 - 1_000
    assert eng.watermarks()[1] == BASE + 119_000 + skew - 1_000


def test_silent_devices_close_their_windows_and_stop_holding_the_gateway_back() -> None:
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=1_000),), time=EventTimeSpec(
        out_of_orderness_ms=0, allowed_lateness_ms=5_000, idle_timeout_ms=2_000)))
    eng.fold(cols([(0, 0, 100, 1.0, 0), (1, 0, 50_000, 2.0, 0)]), now_mono_ms=0)
    assert eng.gateway_watermark() == BASE + 100
    assert len(eng.emit(1_000)) == 0  # nothing has fired yet
    eng.fold(cols([(1, 0, 51_000, 3.0, 1)]), now_mono_ms=1_500)
    res = eng.emit(2_500)  # device 0 silent for 2.5 s: its window closes
    assert (res.device == 0).sum() == 1
    assert (res.device == 1).sum() == 1  # device 1's first window fired normally
    assert eng.gateway_watermark() == BASE + 51_000  # device 0 no longer counts
    assert eng.active_devices == 1
    assert eng.silent_devices(2_500).tolist() == [0]
    eng.emit(10_000)  # silent beyond idle_timeout + lateness: device 0's state is purged
    assert eng.watermarks()[0] >= BASE + 1_000 + 5_000
    assert eng.time.max_ts[0] != NEVER


def test_silence_is_judged_against_each_devices_own_pace() -> None:
    """A device heard from every 5 minutes (a battery sensor) is idle between its readings,
    not silent: it is reported silent once quiet for 3 of its intervals (its windows still
    close after ``idle_timeout``); a 1 Hz device after ``idle_timeout``; one long outage does
    not make a device look slow for long; a checkpoint keeps each device's pace."""
    spec = EngineConfig(windows=(WindowSpec(size_ms=1_000),), time=EventTimeSpec(
        out_of_orderness_ms=0, allowed_lateness_ms=0, idle_timeout_ms=30_000))
    eng = WindowEngine(spec)
    minute = 60_000
    for k in range(6):  # device 0: every 5 minutes; device 1: every second
        eng.fold(cols([(0, 0, k * 5 * minute, 1.0, k)]), now_mono_ms=k * 5 * minute)
        for t in range(k * 5 * minute, (k + 1) * 5 * minute, 1_000):
            eng.fold(cols([(1, 0, t, 2.0, t // 1_000)]), now_mono_ms=t)
        eng.emit((k + 1) * 5 * minute - 1)
    now = 30 * minute - 1  # device 0 quiet for 5 min: its windows closed, yet not silent
    assert eng.time.state[0] != 0
    assert eng.silent_devices(now).tolist() == []
    assert eng.time.interval[:2].tolist() == [5 * minute, 1_000]
    eng.emit(now + 30_000)
    assert eng.silent_devices(now + 30_000).tolist() == [1]  # the 1 Hz one after idle_timeout
    assert eng.silent_devices(25 * minute + 15 * minute).tolist() == [0, 1]  # 3 intervals
    eng.fold(cols([(0, 0, 90 * minute, 1.0, 6)]), now_mono_ms=90 * minute)  # after an hour out
    assert eng.time.interval[0] < 2 * 5 * minute  # 5 -> 8.75 min, not an hour's average
    restored = WindowEngine(spec)
    restored.restore(eng.snapshot(), now_mono_ms=0)
    assert restored.time.interval[:2].tolist() == eng.time.interval[:2].tolist()
    assert restored.silent_devices(60_000).tolist() == [1]  # device 1 silent before, 1 min on


def test_a_late_reading_that_moves_a_session_start_supersedes_the_old_result() -> None:
    eng = WindowEngine(EngineConfig(windows=(WindowSpec.parse("session:1s"),),
                                    time=EventTimeSpec(out_of_orderness_ms=0,
                                                       allowed_lateness_ms=60_000,
                                                       idle_timeout_ms=10**9)))
    eng.fold(cols([(0, 0, 5_000, 1.0, 0), (0, 0, 5_500, 2.0, 1), (0, 0, 9_000, 3.0, 2)]), 0)
    first = eng.emit(0)
    assert first.start.tolist() == [BASE + 5_000]
    eng.fold(cols([(0, 0, 4_200, 4.0, 3)]), 0)  # late, within 1 s of the session: extends it
    second = eng.emit(0)
    assert second.superseded is not None
    assert second.superseded.start.tolist() == [BASE + 5_000]
    assert [(int(s), int(c), int(r)) for s, c, r in zip(
        second.start, second.count, second.rev, strict=True)] == [(BASE + 4_200, 3, 1)]
    flushed = eng.flush_all()  # the session still open
    assert [(int(s), int(c)) for s, c in zip(flushed.start, flushed.count, strict=True)] == [
        (BASE + 9_000, 1)]


def test_duplicates_are_recognised_among_a_devices_last_readings() -> None:
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=1_000),), dedup_memory=4))
    out = eng.fold(cols([(0, 0, 100, 1.0, 7), (0, 0, 100, 1.0, 7), (0, 0, 150, 9.0, 7),
                         (1, 0, 100, 1.0, 7)]), 0)
    assert out.duplicates == 2  # exact copy and a re-stamped resend; device 1 has its own seqs
    out = eng.fold(cols([(0, 0, 200, 2.0, -1), (0, 0, 200, 2.0, -1), (0, 0, 200, 3.0, -1)]), 0)
    assert out.duplicates == 1  # without seq: same event time and value
    eng.fold(cols([(0, 0, 300 + k, 1.0, 100 + k) for k in range(4)]), 0)
    out = eng.fold(cols([(0, 0, 9_000, 1.0, 7)]), 0)  # seq 7 is no longer among the last 4...
    # ...but the memory grew: the device sent more within the lateness horizon than it held
    assert out.duplicates == 1
    assert eng.dedup.memory > 4


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1, 40), st.integers(0, 3),
                          st.sampled_from([0.0, -0.0, 1.5, 2.5])), max_size=60),
       st.lists(st.integers(0, 60), max_size=6), st.sampled_from([8, 64]))
def test_duplicate_filter_knows_exactly_what_it_saw_within_its_memory(
        rows: list[tuple[int, int, int, float]], cuts: list[int], memory: int) -> None:
    # seq -1: none, identified by (event time, value bits); with memory 64 every seq (< 41) has
    # a slot of its own and no device sends 64 readings, so the filter must be exact; with
    # memory 8 it may forget, but never calls a reading a duplicate that was not seen before
    f = DuplicateFilter(memory=memory)
    seen: set[tuple[int, int, int, int]] = set()
    bounds = sorted({0, len(rows), *[min(c, len(rows)) for c in cuts]})
    for lo, hi in itertools.pairwise(bounds):
        part = rows[lo:hi]
        got = f.check(np.array([r[0] for r in part], np.int64),
                      np.array([BASE + r[2] for r in part], np.int64),
                      np.array([r[3] for r in part]), np.array([r[1] for r in part], np.int64))
        for (d, q, t, v), dup in zip(part, got.tolist(), strict=True):
            ident = (d, q, -1, -1) if q >= 0 else (d, -1, t, int(np.float64(v).view(np.int64)))
            if memory == 64:
                assert dup == (ident in seen), (ident, dup)
            else:
                assert not dup or ident in seen, ident
            seen.add(ident)


def test_a_device_sending_more_than_its_memory_in_one_batch() -> None:
    # 300 readings of one device in one batch, more than its memory (8 readings: two words of
    # 64 seqs): repeats are still found, and each word remembers the newest block that
    # landed in it (blocks 4 and 3: seqs 192..299)
    f = DuplicateFilter(memory=8)
    assert f.words == 2
    seq = np.array([*range(300), 3, 299, 135], np.int64)
    n = len(seq)
    dup = f.check(np.zeros(n, np.int64), BASE + seq, np.zeros(n), seq)
    assert np.flatnonzero(dup).tolist() == [300, 301, 302]
    probe = np.array([299, 200, 192, 150, 10], np.int64)
    again = f.check(np.zeros(5, np.int64), BASE + probe, np.zeros(5), probe)
    # 150 (block 2) and 10 (block 0) shared word 0 with block 4: forgotten, not called repeats
    assert again.tolist() == [True, True, True, False, False]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.builds(  # few devices, few bits per block
    lambda block, bit: block * 64 + bit, st.integers(0, 12), st.integers(0, 3))
    | st.integers(0, 900)), max_size=80),
       st.lists(st.integers(0, 120), max_size=8), st.sampled_from([1, 8, 64, 100, 300]),
       st.booleans())
# a word taken by a newer block forgets the old block's bits (69 was never seen), a reboot
# clears the words its old count held (65 comes twice after the counter fell from 1000)
@example(rows=[(0, 5), (0, 70), (0, 69)], cuts=[1, 2], memory=1, ordered=False)
@example(rows=[(0, 1000), (0, 65), (0, 65)], cuts=[1, 2], memory=8, ordered=False)
# two blocks of one batch want the same word (5 and 134 with two words): the bits of one
# block must not become the other's (133 was never seen)
@example(rows=[(0, 5), (0, 134), (0, 133)], cuts=[2], memory=64, ordered=False)
def test_the_seq_memory_holds_the_newest_seqs_and_never_invents_a_repeat(
        rows: list[tuple[int, int]], cuts: list[int], memory: int, ordered: bool) -> None:
    # seqs spread over many blocks, batches of any size: a reading is called a repeat only if
    # it was seen; a seq seen since the device's counter last restarted (a batch whose newest
    # seq is below its mark minus the memory) and within ``memory`` of the mark before the
    # batch is always recognised, as is a repeat within one batch
    if ordered:  # counters that only go up (and repeat): no restarts
        rows = sorted(rows, key=lambda r: r[1])
    f = DuplicateFilter(memory=memory)
    seen: dict[int, set[int]] = {}
    ever: dict[int, set[int]] = {}
    high: dict[int, int] = {}
    bounds = sorted({0, len(rows), *[min(c, len(rows)) for c in cuts]})
    for lo, hi in itertools.pairwise(bounds):
        part = rows[lo:hi]
        dev = np.array([r[0] for r in part], np.int64)
        seq = np.array([r[1] for r in part], np.int64)
        got = f.check(dev, BASE + seq, np.zeros(len(part)), seq).tolist()
        newest: dict[int, int] = {}
        for d, q in part:
            newest[d] = max(newest.get(d, -1), q)
        restarted = {d for d, q in newest.items() if q < high.get(d, -1) - memory}
        for d in restarted:
            seen[d] = set()
        in_batch: set[tuple[int, int]] = set()
        for (d, q), dup in zip(part, got, strict=True):
            if dup:
                assert q in ever.get(d, set()) or (d, q) in in_batch, (d, q)
            if (d, q) in in_batch or (q in seen.get(d, set()) and q > high.get(d, -1) - memory):
                assert dup, (d, q)
            in_batch.add((d, q))
        for d, q in part:
            seen.setdefault(d, set()).add(q)
            ever.setdefault(d, set()).add(q)
        for d, q in newest.items():
            high[d] = q if d in restarted else max(high.get(d, -1), q)



@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 40), st.integers(0, 6)),
                min_size=1, max_size=12),
       st.sampled_from([8, 32, 64]), st.integers(1, 30), st.randoms(use_true_random=False))
def test_a_rebooted_counter_is_followed_and_a_resend_still_recognised(
        boots: list[tuple[int, int, int]], memory: int, batch: int, rnd: Any) -> None:
    """Devices that reboot (their seq starts again at 0, their clock goes on) and re-send some
    of their readings (the same seq and time) soon after: with each device's newest event time
    given, as the engine gives it where device clocks are trusted, no new reading is ever
    called a repeat, and every re-send of a reading of the current boot within the memory is.
    ``boots``: (device, readings in the boot, re-sends of its last readings)."""
    f = DuplicateFilter(memory=memory)
    newest = np.full(3, NEVER, np.int64)
    clock = [BASE] * 3
    stream: list[tuple[int, int, int, bool]] = []  # device, seq, ts, is a re-send
    for dev, n, resend in boots:
        sent = []
        for q in range(n):
            clock[dev] += 1000
            stream.append((dev, q, clock[dev], False))
            sent.append((q, clock[dev]))
        for q, t in rnd.sample(sent[-min(memory, len(sent)):], min(resend, len(sent), memory)):
            stream.append((dev, q, t, True))
    for lo in range(0, len(stream), batch):
        part = stream[lo:lo + batch]
        dev = np.array([r[0] for r in part], np.int64)
        seq = np.array([r[1] for r in part], np.int64)
        ts = np.array([r[2] for r in part], np.int64)
        got = f.check(dev, ts, np.zeros(len(part)), seq, None, newest)
        for (d, q, t, again), dup in zip(part, got.tolist(), strict=True):
            assert dup == again, (d, q, t, again)
        for d, t, dup in zip(dev.tolist(), ts.tolist(), got.tolist(), strict=True):
            if not dup:
                newest[d] = max(newest[d], t)


def test_a_first_seq_arriving_late_with_the_newest_time_is_no_reboot() -> None:
    """A device of two sensors numbers its readings across both; one sensor's seq 1 (or 0)
    reaches the gateway after seqs 2..7, its time the newest of all (the sensors' times need
    not follow the numbering). It is a first arrival, not a new count: re-sends of the
    readings before it are still repeats, in the same batch or a later one."""
    for first in (0, 1):
        for split in (False, True):
            f = DuplicateFilter(memory=4)
            newest = np.full(1, NEVER, np.int64)
            seqs = [q for q in range(8) if q != first] + [first]
            ts = [BASE + 400] * 7 + [BASE + 700]
            again = [1 - first, 2, 5]
            rows = [(q, t) for q, t in zip(seqs, ts, strict=True)]
            rows += [(q, BASE + 400) for q in again]
            parts = [rows[:8], rows[8:]] if split else [rows]
            dups: list[bool] = []
            for part in parts:
                dev = np.zeros(len(part), np.int64)
                got = f.check(dev, np.array([t for _, t in part], np.int64),
                              np.zeros(len(part)), np.array([q for q, _ in part], np.int64),
                              None, newest)
                newest[0] = max([int(newest[0]), *(t for _, t in part)])
                dups += got.tolist()
            assert dups == [False] * 8 + [True] * len(again), (first, split)
    # a true reboot is still followed: seq 0 again, already seen, with a newer time
    f = DuplicateFilter(memory=4)
    newest = np.full(1, NEVER, np.int64)
    dev = np.zeros(4, np.int64)
    assert not f.check(dev, BASE + np.arange(4, dtype=np.int64), np.zeros(4),
                       np.arange(4, dtype=np.int64), None, newest).any()
    newest[0] = BASE + 3
    assert not f.check(dev, BASE + 10 + np.arange(4, dtype=np.int64), np.zeros(4),
                       np.arange(4, dtype=np.int64), None, newest).any()


def test_the_bitmap_words_hold_at_least_the_memory() -> None:
    for m in [*range(1, 700), 4_096, 8_192, 65_536]:
        w = words_for(m)
        assert w & (w - 1) == 0
        assert (w - 1) * 64 + 1 >= m  # whatever the newest seq's place in its block
        assert w == 1 or (w // 2 - 1) * 64 + 1 < m  # and not twice what it needs


@given(st.sampled_from([7_000, 333, 86_400_000 * 7]), st.booleans())
@settings(max_examples=12, deadline=None)
def test_windows_whose_step_does_not_divide_the_epoch_base_start_on_its_multiples(
        size: int, dense: bool) -> None:
    # EPOCH_BASE_MS (2020-01-01) is a multiple of a day but not of 7 s, 333 ms or a week
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=size),), dense=dense))
    ts = [5, size - 1, size, 3 * size + 7]
    eng.fold(cols([(0, 0, t, 1.0, i) for i, t in enumerate(ts)]), 0)
    out = eng.flush_all()
    got = {int(s): int(c) for s, c in zip(out.start, out.count, strict=True)}
    want: dict[int, int] = {}
    for t in ts:
        start = (BASE + t) // size * size
        want[start] = want.get(start, 0) + 1
    assert got == want


@settings(max_examples=5, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_a_window_of_more_readings_than_a_histogram_counter_holds(seed: int) -> None:
    # 140,000 readings in one window: the dense histogram's uint16 counters stop at 65,000
    # and the rest goes to the sparse store; the sketch must still be the one of every reading
    rng = np.random.default_rng(seed)
    n = 140_000
    values = np.round(np.where(rng.random(n) < 0.9, 20 + rng.standard_normal(n),
                               rng.lognormal(3, 2, n)), 3)
    out = {}
    for dense in (True, False):
        eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=600_000),), dense=dense,
                                        dedup=False))
        for lo in range(0, n, 60_000):
            hi = min(lo + 60_000, n)
            eng.fold(ReadingColumns(np.zeros(hi - lo, np.int32), np.zeros(hi - lo, np.int32),
                                    BASE + np.arange(lo, hi, dtype=np.int64),
                                    values[lo:hi], np.arange(lo, hi, dtype=np.int64),
                                    np.zeros(hi - lo, np.int64)), 0)
        out[dense] = eng.flush_all()
    a, b = out[True], out[False]
    assert a.count.tolist() == b.count.tolist() == [n]
    assert a.sk_keys.tolist() == b.sk_keys.tolist()
    assert a.sk_counts.tolist() == b.sk_counts.tolist()
    assert int(a.sk_counts.sum()) == n
    assert a.pct.tolist() == b.pct.tolist()


def test_several_window_specs_per_metric_at_once() -> None:
    specs = [WindowSpec.parse("1s"), WindowSpec.parse("5s")]
    rows = [(0, 0, t, float(t), t) for t in range(0, 12_000, 250)]
    final, dups, late = run(rows, [17, 31], specs=specs)
    check(rows, final, dups, late, specs)
    assert sum(1 for k in final if k[0] == "1s") == 12
    assert sum(1 for k in final if k[0] == "5s") == 3


def test_reference_of_the_old_tumbling_only_api_still_agrees() -> None:
    rows = [(0, 0, t, float(t % 7), -1) for t in (0, 900, 1_800, 400, 5_000, 700, 12_000, 2)]
    final, dups, late = run(rows, [3], specs=[WindowSpec(size_ms=SIZE)])
    ref = reference_windows([(str(d), str(m), BASE + t, v) for d, m, t, v, _ in rows],
                            size_ms=SIZE, ooo_ms=OOO, lateness_ms=LATE)
    assert late["1s"] == len(ref.dropped)
    assert sorted(k[3] for k in final) == sorted(k[2] for k in ref.windows)
    assert dups == 0


@st.composite
def replays(draw: st.DrawFn) -> tuple[list[tuple[int, int, int, float, int]], list[int]]:
    """Numbered readings of up to three devices (1-3 sensors each, event times moving on by
    0-1.5 s, a little disorder), and the indices of any of them sent again afterwards (a
    replay of recorded data, a device re-sending its buffer, a broker re-delivering)."""
    rows: list[tuple[int, int, int, float, int]] = []
    for d in range(draw(st.integers(1, 3))):
        t, seq = 0, 0
        metrics = draw(st.integers(1, 3))
        for _ in range(draw(st.integers(1, 150))):
            t += draw(st.integers(0, 1_500))
            for m in range(metrics):
                rows.append((d, m, t + draw(st.integers(0, OOO)), float(seq % 17), seq))
                seq += 1
    order = sorted(range(len(rows)), key=lambda i: (rows[i][2] - rows[i][2] % 700, i))
    again = draw(st.lists(st.sampled_from(range(len(rows))), max_size=200))
    return [rows[i] for i in order], again


@settings(max_examples=150, deadline=None)
@given(replays(), st.lists(st.integers(0, 400), max_size=8))
@example(([(0, 0, 400, 0.0, 0), (0, 0, 400, 2.0, 2), (0, 1, 400, 3.0, 3), (0, 0, 400, 4.0, 4),
           (0, 1, 400, 5.0, 5), (0, 0, 400, 6.0, 6), (0, 1, 400, 7.0, 7), (0, 1, 700, 1.0, 1)],
          [0]), []).via("found under arm64 emulation: seq 1 late and newest taken for a reboot")
def test_readings_sent_again_never_change_a_window(
        case: tuple[list[tuple[int, int, int, float, int]], list[int]], cuts: list[int]) -> None:
    """R8: whatever is sent again, in whatever batches, the windows are those of the stream
    sent once; every copy is counted as a duplicate or late, never folded a second time. The
    duplicate memory starts at 4 readings per device, as wide as no fleet should configure it:
    it has to grow to the lateness horizon by itself."""
    rows, again = case
    once = WindowEngine(EngineConfig(windows=tuple(SPECS[:3]), dedup_memory=4,
                                     time=EventTimeSpec(out_of_orderness_ms=OOO,
                                                        allowed_lateness_ms=LATE,
                                                        idle_timeout_ms=10**9)))
    twice = WindowEngine(once.config)
    stream = rows + [rows[i] for i in again]

    def final(eng: WindowEngine, feed: list[tuple[int, int, int, float, int]]
              ) -> tuple[dict[tuple[int, int, int, int], tuple[int, float]], int, int]:
        out: dict[tuple[int, int, int, int], tuple[int, float]] = {}
        dups = late = 0
        bounds = sorted({0, len(feed), *[c % (len(feed) + 1) for c in cuts]})
        for lo, hi in itertools.pairwise(bounds):
            f = eng.fold(cols(feed[lo:hi]), 0)
            dups += f.duplicates
            late += f.late_dropped[eng.config.labels[0]]
            for res in (eng.emit(0),):
                keep(out, res)
        keep(out, eng.flush_all())
        return out, dups, late

    def keep(out: dict[tuple[int, int, int, int], tuple[int, float]],
             res: ResultColumns) -> None:
        sup = res.superseded
        if sup is not None:
            for d, m, k, s in zip(sup.device, sup.metric, sup.spec, sup.start, strict=True):
                out.pop((int(d), int(m), int(k), int(s)), None)
        spec = res.spec if res.spec is not None else np.zeros(len(res), np.int64)
        for i in range(len(res)):
            out[(int(res.device[i]), int(res.metric[i]), int(spec[i]), int(res.start[i]))] = (
                int(res.count[i]), float(res.sum[i]))

    expected, dups0, _ = final(once, rows)
    got, dups, late = final(twice, stream)
    assert dups0 == 0
    assert got == expected
    late0 = final(WindowEngine(once.config), rows)[2]
    assert dups + late - late0 == len(again)  # every copy counted, none folded


def test_two_sensors_reading_the_same_value_at_the_same_time_are_two_readings() -> None:
    """Without sequence numbers a reading is known by its event time and value, and by its
    metric: a door and a motion sensor both reading 1 at the same instant are not a repeat."""
    eng = WindowEngine(EngineConfig(windows=(WindowSpec(size_ms=1_000),)))
    out = eng.fold(cols([(0, 0, 100, 1.0, -1), (0, 1, 100, 1.0, -1), (0, 1, 100, 1.0, -1)]), 0)
    assert out.duplicates == 1  # only the true repeat
    assert out.accepted == 2


def test_small_windows_with_long_lateness_use_the_sparse_layout() -> None:
    """The dense ring holds every window that can be open at once: 500 ms windows kept 30 s for
    late readings would be 66 cells per series, mostly empty at 1 Hz; beyond 64 the operator is
    the sparse one (same results: the reference tests run both layouts)."""
    from edge.dense import DenseFixedWindows
    from edge.sketch import SketchParams
    from edge.windows import DENSE_MAX_CELLS, FixedWindows, make_operator

    sk = SketchParams(alpha=0.01)
    small = WindowSpec.parse("500ms")
    assert small.ring_cells(2_000, 30_000) > DENSE_MAX_CELLS
    assert isinstance(make_operator(small, allowed_lateness_ms=30_000, out_of_orderness_ms=2_000,
                                    sketch=sk, percentiles=(0.5,)), FixedWindows)
    assert isinstance(make_operator(small, allowed_lateness_ms=5_000, out_of_orderness_ms=2_000,
                                    sketch=sk, percentiles=(0.5,)), DenseFixedWindows)


def configured(lateness_ms: int, *, alpha: float = ALPHA, dense: bool = True,
               specs: list[WindowSpec] = SPECS) -> WindowEngine:
    return WindowEngine(EngineConfig(
        windows=tuple(specs), sketch_alpha=alpha, percentiles=(0.0, 0.5, 0.9, 1.0),
        dedup_memory=1024, dense=dense,
        time=EventTimeSpec(out_of_orderness_ms=OOO, allowed_lateness_ms=lateness_ms,
                           idle_timeout_ms=10**9)))


@settings(max_examples=120, deadline=None)
@given(streams(), st.lists(st.integers(0, 200), min_size=2, max_size=8), st.integers(1, 4),
       st.sampled_from([15_000, 20_000, 31_000]), st.sampled_from([15_000, 20_000, 31_000]),
       st.booleans(), st.booleans(), st.sampled_from([ALPHA, 0.02]))
def test_a_checkpoint_resumes_under_a_changed_lateness_layout_and_accuracy(
        rows, cuts, at, late_a, late_b, dense_a, dense_b, alpha_b) -> None:
    """An operator edits gateway.toml and restarts: the checkpoint's windows resume under the
    new allowed_lateness (another ring size per series; 31 s makes the hopping spec's ring too
    big for the dense layout), layout and sketch accuracy, and every window still equals the
    reference (lateness beyond the streams' 12 s: nothing is late under either)."""
    final, dups, late = run(rows, cuts, snapshot_at=at,
                            first=configured(late_a, dense=dense_a),
                            then=configured(late_b, alpha=alpha_b, dense=dense_b))
    check(rows, final, dups, late, lateness_ms=max(late_a, late_b), alpha=ALPHA + alpha_b)


def test_a_checkpoint_resumes_the_specs_still_configured() -> None:
    """Specs added since the checkpoint start empty, one removed is reported with its open
    windows; the one kept resumes every window."""
    rng = np.random.default_rng(5)
    rows = [(int(rng.integers(0, 3)), 0, int(t), float(rng.normal()), i)
            for i, t in enumerate(sorted(rng.integers(0, 12_000, 300)))]
    kept = WindowSpec.parse("1s")
    old = [kept, WindowSpec.parse("count:3")]
    new = [WindowSpec.parse("2s"), kept]
    after = configured(LATE, specs=new)
    final, _, _ = run(rows, [150], snapshot_at=1, specs=new,
                      first=configured(LATE, specs=old), then=after)
    assert set(after.retired_windows) == {"count:3"}
    assert after.retired_windows["count:3"] > 0
    ref, _, _ = reference_engine([(d, m, BASE + t, v, s) for d, m, t, v, s in rows], [kept],
                                 ooo_ms=OOO, lateness_ms=LATE)
    got = {k: f["count"] for k, f in final.items() if k[0] == "1s"}
    assert got == {k: w.count for k, w in ref.items()}
    # the added spec holds only what came after the restart
    assert 0 < sum(int(f["count"]) for k, f in final.items() if k[0] == "2s") < len(rows)
