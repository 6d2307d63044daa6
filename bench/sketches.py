"""fieldline's vectorised sketch against the Python sketch libraries, on the agent's workload:
many small windows (10,000 windows x 10 readings, sensor noise) and a few large ones
(20 windows x 10,000 lognormal readings). For each: build speed, merge exactness (sketch of
two halves merged vs sketch of the union), accuracy at p50/p99, size on the wire.

ddsketch (Datadog, pure Python): the same log-bucket idea, exact merges, per-value ``add``.
tdigest (pure Python, last release 2019): t-digest, approximate merges.
fastdigest (Rust, maintained): t-digest with batch construction.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.common import Figure, figure, report
from edge.sketch import SketchParams, SketchStore

QS = [0.5, 0.99]
ALPHA = 0.01


def exact(x: np.ndarray, q: float) -> float:
    s = np.sort(x)
    return float(s[math.floor(q * (len(s) - 1))])


def fieldline_build(windows: list[np.ndarray]) -> tuple[float, Any]:
    params = SketchParams(ALPHA)
    store = SketchStore(params)
    t0 = time.perf_counter()
    slots = np.repeat(np.arange(len(windows)), [len(w) for w in windows])
    store.add(slots, params.keys(np.concatenate(windows)))
    return time.perf_counter() - t0, store


def fieldline_quantiles(store: SketchStore, n: int) -> np.ndarray:
    return store.quantiles(np.arange(n, dtype=np.int64), QS)


def fieldline_merge_exact(x: np.ndarray) -> bool:
    params = SketchParams(ALPHA)
    s = SketchStore(params)
    h = len(x) // 2
    s.add(np.zeros(h, np.int64), params.keys(x[:h]))
    s.add(np.full(len(x) - h, 2, np.int64), params.keys(x[h:]))
    s.move(np.array([2]), np.array([0]))
    s.add(np.ones(len(x), np.int64), params.keys(x))
    q = s.quantiles(np.array([0, 1], np.int64), QS)
    return bool(np.array_equal(q[0], q[1]))


def fieldline_wire_bytes(x: np.ndarray) -> int:
    params = SketchParams(ALPHA)
    s = SketchStore(params)
    s.add(np.zeros(len(x), np.int64), params.keys(x))
    k, c, _ = s.export(np.array([0], np.int64))
    return len(json.dumps({"sk": k.tolist(), "sc": c.tolist()}))


def lib_rows() -> list[dict[str, Any]]:
    from ddsketch import DDSketch
    from fastdigest import TDigest as FastTDigest
    from tdigest import TDigest as PyTDigest

    def dd(values: np.ndarray) -> Any:
        s = DDSketch(relative_accuracy=ALPHA)
        for v in values.tolist():
            s.add(v)
        return s

    def pyt(values: np.ndarray) -> Any:
        t = PyTDigest()
        t.batch_update(values.tolist())
        return t

    def fast(values: np.ndarray) -> Any:
        return FastTDigest.from_values(values.tolist())

    return [
        {"name": "ddsketch 3", "build": dd,
         "q": lambda s, q: s.get_quantile_value(q),
         "merge": lambda a, b: (a.merge(b), a)[1],
         # the non-empty bins of its dense store as {key: count}, comparable to our (sk, sc)
         "size": lambda s: len(json.dumps({
             str(s._store.offset + i): c for i, c in enumerate(s._store.bins) if c}))},
        {"name": "tdigest 0.5 (pure Python)", "build": pyt,
         "q": lambda s, q: s.percentile(q * 100),
         "merge": lambda a, b: a + b,
         "size": lambda s: len(json.dumps(s.to_dict()))},
        {"name": "fastdigest (Rust)", "build": fast,
         "q": lambda s, q: s.quantile(q),
         "merge": lambda a, b: a.merge(b),
         "size": lambda s: len(s.to_bytes()) if hasattr(s, "to_bytes") else len(
             json.dumps(s.to_dict()))},
    ]


def run_lib(lib: dict[str, Any], small: list[np.ndarray], large: list[np.ndarray]
            ) -> dict[str, float]:
    build: Callable[[np.ndarray], Any] = lib["build"]
    out: dict[str, float] = {}
    for label, windows in (("small", small), ("large", large)):
        n = sum(len(w) for w in windows)
        t0 = time.perf_counter()
        sketches = [build(w) for w in windows]
        out[f"{label}_rate"] = n / (time.perf_counter() - t0)
        errs = [abs(lib["q"](s, q) - exact(w, q)) / abs(exact(w, q))
                for s, w in zip(sketches[:200], windows[:200], strict=False) for q in QS]
        out[f"{label}_err"] = max(errs)
    x = large[0]
    h = len(x) // 2
    merged = lib["merge"](build(x[:h]), build(x[h:]))
    whole = build(x)
    out["merge_exact"] = float(all(math.isclose(lib["q"](merged, q), lib["q"](whole, q),
                                                rel_tol=0, abs_tol=0) for q in QS))
    out["wire_small"] = lib["size"](build(small[0]))
    out["wire_large"] = lib["size"](whole)
    return out


def main() -> list[Figure]:
    rng = np.random.default_rng(5)
    small = [20 + 0.2 * rng.standard_normal(10) for _ in range(10_000)]
    large = [rng.lognormal(0, 1.5, 10_000) for _ in range(20)]
    figs: list[Figure] = []
    results: dict[str, dict[str, float]] = {}
    # fieldline
    for label, windows in (("small", small), ("large", large)):
        n = sum(len(w) for w in windows)
        dt, store = fieldline_build(windows)
        q = fieldline_quantiles(store, len(windows))
        errs = [abs(q[i, j] - exact(w, qq)) / abs(exact(w, qq))
                for i, w in enumerate(windows[:200]) for j, qq in enumerate(QS)]
        results.setdefault("fieldline (vectorised)", {})[f"{label}_rate"] = n / dt
        results["fieldline (vectorised)"][f"{label}_err"] = max(errs)
    results["fieldline (vectorised)"]["merge_exact"] = float(fieldline_merge_exact(large[0]))
    results["fieldline (vectorised)"]["wire_small"] = fieldline_wire_bytes(small[0])
    results["fieldline (vectorised)"]["wire_large"] = fieldline_wire_bytes(large[0])
    for lib in lib_rows():
        results[lib["name"]] = run_lib(lib, small[:2_000], large[:5])
    ref = results["fieldline (vectorised)"]
    for name, r in results.items():
        figs.append(figure(f"{name}: build, 10-value windows", r["small_rate"], "values/s",
                           ref["small_rate"], "fieldline vectorised",
                           note=f"max rel. error p50/p99 {r['small_err']:.4f}, "
                                f"{r['wire_small']:.0f} B JSON"))
        figs.append(figure(f"{name}: build, 10,000-value windows", r["large_rate"], "values/s",
                           ref["large_rate"], "fieldline vectorised",
                           note=f"max rel. error {r['large_err']:.4f}, {r['wire_large']:.0f} B, "
                                f"merge {'exact' if r['merge_exact'] else 'approximate'}"))
    report("sketches", figs)
    return figs


if __name__ == "__main__":
    main()
