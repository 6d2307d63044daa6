"""The percentile sketch: documented relative-error bound on hard distributions, exact merges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.sketch import MIN_VALUE, SketchParams, SketchStore, quantiles_from_counts

QS = [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]


def exact_quantiles(x: np.ndarray, qs: list[float]) -> np.ndarray:
    s = np.sort(x)
    return np.array([s[math.floor(q * (len(s) - 1))] for q in qs])


def sketch_quantiles(params: SketchParams, x: np.ndarray, qs: list[float]) -> np.ndarray:
    store = SketchStore(params)
    store.add(np.zeros(len(x), np.int64), params.keys(x))
    return store.quantiles(np.array([0], np.int64), qs)[0]


rng = np.random.default_rng(42)
DATASETS = {
    "pareto (heavy tail)": rng.pareto(1.2, 50_000) + 1,
    "lognormal sigma 3": rng.lognormal(0, 3, 50_000),
    "constant": np.full(10_000, 21.37),
    "bimodal, both signs": np.concatenate([rng.normal(-40, 2, 20_000), rng.normal(900, 30, 5_000)]),
    "with exact zeros": np.concatenate([np.zeros(3_000), rng.exponential(5, 7_000)]),
    "tiny and huge": np.concatenate([rng.uniform(1e-6, 1e-5, 1000), rng.uniform(1e8, 1e9, 1000)]),
}


@pytest.mark.parametrize("alpha", [0.01, 0.005, 0.05])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_relative_error_within_the_documented_bound(name: str, alpha: float) -> None:
    x = DATASETS[name]
    params = SketchParams(alpha)
    est = sketch_quantiles(params, x, QS)
    exact = exact_quantiles(x, QS)
    bound = alpha * np.abs(exact) + np.where(np.abs(exact) < MIN_VALUE, MIN_VALUE, 0)
    assert (np.abs(est - exact) <= bound * (1 + 1e-12)).all(), (est, exact)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e12, 1e12, allow_nan=False, allow_subnormal=False), min_size=1,
                max_size=200),
       st.lists(st.floats(-1e12, 1e12, allow_nan=False, allow_subnormal=False), min_size=1,
                max_size=200))
def test_a_merged_sketch_equals_the_sketch_of_the_union(a, b) -> None:
    params = SketchParams(0.01)
    xa, xb = np.array(a), np.array(b)
    store = SketchStore(params)
    store.add(np.zeros(len(xa), np.int64), params.keys(xa))  # slot 0: a ...
    store.add(np.full(len(xb), 2, np.int64), params.keys(xb))  # slot 2: b, merged below
    store.move(np.array([2], np.int64), np.array([0], np.int64))
    union = np.concatenate([xa, xb])
    store.add(np.ones(len(union), np.int64), params.keys(union))  # slot 1: the union at once
    k, c, off = store.export(np.array([0, 1], np.int64))
    assert np.array_equal(k[off[0]:off[1]], k[off[1]:off[2]])
    assert np.array_equal(c[off[0]:off[1]], c[off[1]:off[2]])
    q = quantiles_from_counts(params, k, c, off, QS)
    assert np.array_equal(q[0], q[1])
    exact = exact_quantiles(union, QS)
    assert (np.abs(q[1] - exact) <= 0.01 * np.abs(exact) + MIN_VALUE).all()


def test_bucket_keys_are_ordered_like_values() -> None:
    params = SketchParams(0.02)
    x = np.sort(np.concatenate([-np.logspace(-12, 12, 500), [0.0], np.logspace(-12, 12, 500)]))
    keys = params.keys(x)
    assert (np.diff(keys) >= 0).all()


def test_size_on_the_wire_is_a_handful_of_buckets_for_sensor_windows() -> None:
    params = SketchParams(0.01)
    x = 21.0 + 0.2 * rng.standard_normal(60)  # one minute of a temperature sensor at 1 Hz
    assert len(np.unique(params.keys(x))) <= 6


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-300, 300), st.integers(1, 50)), max_size=40,
                         unique_by=lambda kc: kc[0]), min_size=1, max_size=12),
       st.lists(st.sampled_from(QS), min_size=1, max_size=6))
def test_quantiles_of_many_sketches_at_once_equal_each_sketch_alone(sketches, qs) -> None:
    # empty sketches, wide ones, quantiles unsorted and repeated: the batched search (a search
    # for the lowest quantile, steps forward for the next) answers what one sketch at a time does
    params = SketchParams(0.01)
    rows = [sorted(s) for s in sketches]
    keys = np.array([k for r in rows for k, _ in r], np.int64)
    counts = np.array([c for r in rows for _, c in r], np.int64)
    offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    got = quantiles_from_counts(params, keys, counts, offsets, qs)
    for i, r in enumerate(rows):
        if not r:
            assert np.isnan(got[i]).all()
            continue
        expanded = np.repeat([k for k, _ in r], [c for _, c in r])
        want = [params.values(np.array([expanded[math.floor(q * (len(expanded) - 1))]]))[0]
                for q in qs]
        assert got[i].tolist() == want


@pytest.mark.parametrize("alpha", [0.01, 0.005, 0.3])
def test_bucket_values_from_the_lookup_table_equal_the_formula(alpha: float) -> None:
    params = SketchParams(alpha)
    x = np.concatenate([-np.logspace(-9, 300, 4000), [0.0], np.logspace(-9, 300, 4000)])
    keys = params.keys(x)
    inside = keys[np.abs(params.values(keys)) < 1e15]  # the table's range
    assert np.array_equal(params.values(inside), params._values(inside))
    assert np.array_equal(params.values(keys), params._values(keys))  # beyond it: the formula
    est = params.values(keys)
    assert (np.abs(est - x) <= alpha * np.abs(x) * (1 + 1e-12) + MIN_VALUE).all()
