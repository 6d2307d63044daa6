"""Robust location and scale over a short ring of recent values, with a noise floor.

When most recent values are equal (a quantised or flat signal) the MAD is 0; dividing by it,
or by a tiny constant, turns one step of the quantiser into a z-score in the thousands. The
scale used here is therefore never below the larger of

* the metric's floor (from the sensor catalog: its resolution, or a small fraction of its
  range), and
* the typical size of the steps the series actually makes (the median of its nonzero absolute
  differences, i.e. its quantum), and
* a fraction of the ring's own spread (its interdecile range), so a series that is flat most of
  the time but legitimately jumps between a few levels is judged against those jumps.
"""

from __future__ import annotations

import numpy as np

from devices.readings import F64

MAD_TO_SIGMA = 1.4826


def median_rows(a: F64) -> F64:
    """Median of each row, ignoring NaN (NaN where a row has no number)."""
    s = np.sort(a, axis=1)  # NaN last
    n = (~np.isnan(a)).sum(axis=1)
    lo = np.maximum((n - 1) // 2, 0)
    hi = np.maximum(n // 2, 0)
    r = np.arange(len(a))
    out = 0.5 * (s[r, lo] + s[r, hi])
    return np.where(n > 0, out, np.nan)


def quantile_rows(a: F64, q: float) -> F64:
    s = np.sort(a, axis=1)
    n = (~np.isnan(a)).sum(axis=1)
    k = np.clip(np.floor(q * (n - 1)).astype(np.int64), 0, a.shape[1] - 1)
    out = s[np.arange(len(a)), k]
    return np.where(n > 0, out, np.nan)


def robust_scale(ring: F64, floor: F64, spread_fraction: float = 0.05) -> tuple[F64, F64]:
    """(median, scale) of each row of ``ring`` (NaN = empty slot), the scale floored as above."""
    med = median_rows(ring)
    mad = median_rows(np.abs(ring - med[:, None])) * MAD_TO_SIGMA
    steps = np.abs(np.diff(ring, axis=1))
    steps = np.where(steps > 0, steps, np.nan)
    quantum = np.nan_to_num(median_rows(steps), nan=0.0)
    spread = np.nan_to_num(quantile_rows(ring, 0.9) - quantile_rows(ring, 0.1), nan=0.0)
    scale = np.maximum.reduce([np.nan_to_num(mad, nan=0.0), floor, quantum,
                               spread_fraction * spread])
    return med, scale
