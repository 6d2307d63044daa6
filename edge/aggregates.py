"""Mergeable window aggregates, vectorised.

An aggregate state is count, sum, min, max, mean, M2 (sum of squared deviations from the mean),
the first and last reading by event time, and the smallest, largest and sum of the readings'
sequence numbers (so a reading missing from a window, or counted twice, shows even when a count
happens to look right). Every field merges exactly or, for mean and M2, with
the numerically stable pairwise update of Chan, Golub and LeVeque, so a window folded from any
split of its readings (micro-batches, late arrivals, several intake processes, cloud roll-ups)
gives the same result up to floating-point rounding, and count/min/max/first/last exactly.

Ties in event time are broken by value, so first/last never depend on arrival order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64
from devices.schema import SEQ, STATE

# the state columns in declaration order (devices.schema: STATE, then the sequence checks)
FIELDS = tuple(c.name for c in STATE + SEQ)
_DTYPES = {c.name: np.int64 if c.kind == "int" else np.float64 for c in STATE + SEQ}


@dataclass
class AggArrays:
    """Aggregate states for G groups, as parallel arrays (mutable: merged in place)."""

    count: I64
    sum: F64
    min: F64
    max: F64
    mean: F64
    m2: F64
    first_ts: I64
    first: F64
    last_ts: I64
    last: F64
    seq_min: I64
    seq_max: I64
    seq_sum: I64  # wraps around on overflow: a checksum, not a quantity

    def __len__(self) -> int:
        return len(self.count)

    def take(self, idx: npt.NDArray[np.int64] | npt.NDArray[np.bool_] | slice) -> AggArrays:
        """The rows ``idx`` as new arrays (a slice is copied, not viewed)."""
        if isinstance(idx, slice):
            return AggArrays(*(getattr(self, f)[idx].copy() for f in FIELDS))
        return AggArrays(*(getattr(self, f)[idx] for f in FIELDS))

    @staticmethod
    def empty() -> AggArrays:
        cols: list[Any] = [np.empty(0, _DTYPES[f]) for f in FIELDS]
        return AggArrays(*cols)

    @staticmethod
    def concat(parts: list[AggArrays]) -> AggArrays:
        return AggArrays(*(np.concatenate([getattr(p, f) for p in parts]) for f in FIELDS))


def fold_sorted(starts: I64, ts: I64, value: F64, seq: I64) -> AggArrays:
    """Aggregate groups of rows that are contiguous (sorted by group, any order within).

    ``starts`` are the first row index of each group (ascending, starting with 0). First and
    last are chosen by event time, ties broken by value, so arrival order never matters.
    """
    n = len(value)
    counts = np.diff(np.append(starts, n)).astype(np.int64)
    group = np.repeat(np.arange(len(starts)), counts)
    sums = np.add.reduceat(value, starts)
    mean = sums / counts
    dev = value - mean[group]
    first_ts = np.minimum.reduceat(ts, starts)
    last_ts = np.maximum.reduceat(ts, starts)
    return AggArrays(
        count=counts,
        sum=sums,
        min=np.minimum.reduceat(value, starts),
        max=np.maximum.reduceat(value, starts),
        mean=mean,
        m2=np.add.reduceat(dev * dev, starts),
        first_ts=first_ts,
        first=np.minimum.reduceat(np.where(ts == first_ts[group], value, np.inf), starts),
        last_ts=last_ts,
        last=np.maximum.reduceat(np.where(ts == last_ts[group], value, -np.inf), starts),
        seq_min=np.minimum.reduceat(seq, starts),
        seq_max=np.maximum.reduceat(seq, starts),
        seq_sum=np.add.reduceat(seq, starts),
    )


def merge_groups(starts: I64, items: AggArrays) -> AggArrays:
    """Merge contiguous groups of aggregate states into one state per group (Chan, n-way)."""
    n = len(items)
    sizes = np.diff(np.append(starts, n))
    group = np.repeat(np.arange(len(starts)), sizes)
    count = np.add.reduceat(items.count, starts)
    cnt = items.count.astype(np.float64)
    mean = np.add.reduceat(cnt * items.mean, starts) / count
    d = items.mean - mean[group]
    first_ts = np.minimum.reduceat(items.first_ts, starts)
    last_ts = np.maximum.reduceat(items.last_ts, starts)
    return AggArrays(
        count=count,
        sum=np.add.reduceat(items.sum, starts),
        min=np.minimum.reduceat(items.min, starts),
        max=np.maximum.reduceat(items.max, starts),
        mean=mean,
        m2=np.add.reduceat(items.m2 + cnt * d * d, starts),
        first_ts=first_ts,
        first=np.minimum.reduceat(
            np.where(items.first_ts == first_ts[group], items.first, np.inf), starts),
        last_ts=last_ts,
        last=np.maximum.reduceat(
            np.where(items.last_ts == last_ts[group], items.last, -np.inf), starts),
        seq_min=np.minimum.reduceat(items.seq_min, starts),
        seq_max=np.maximum.reduceat(items.seq_max, starts),
        seq_sum=np.add.reduceat(items.seq_sum, starts),
    )


def singletons(ts: I64, value: F64, seq: I64) -> AggArrays:
    """One aggregate state per reading."""
    n = len(value)
    return AggArrays(count=np.ones(n, np.int64), sum=value.copy(), min=value.copy(),
                     max=value.copy(), mean=value.copy(), m2=np.zeros(n), first_ts=ts.copy(),
                     first=value.copy(), last_ts=ts.copy(), last=value.copy(),
                     seq_min=seq.copy(), seq_max=seq.copy(), seq_sum=seq.copy())


def merge_into(a: AggArrays, ia: I64, b: AggArrays) -> None:
    """Merge states ``b`` into rows ``ia`` of ``a``, in place (Chan's parallel update)."""
    na = a.count[ia].astype(np.float64)
    nb = b.count.astype(np.float64)
    n = na + nb
    delta = b.mean - a.mean[ia]
    a.m2[ia] = a.m2[ia] + b.m2 + delta * delta * (na * nb / n)
    a.mean[ia] = a.mean[ia] + delta * (nb / n)
    a.count[ia] = a.count[ia] + b.count
    a.sum[ia] = a.sum[ia] + b.sum
    a.min[ia] = np.minimum(a.min[ia], b.min)
    a.max[ia] = np.maximum(a.max[ia], b.max)
    take_first = (b.first_ts < a.first_ts[ia]) | (
        (b.first_ts == a.first_ts[ia]) & (b.first < a.first[ia])
    )
    a.first_ts[ia] = np.where(take_first, b.first_ts, a.first_ts[ia])
    a.first[ia] = np.where(take_first, b.first, a.first[ia])
    take_last = (b.last_ts > a.last_ts[ia]) | (
        (b.last_ts == a.last_ts[ia]) & (b.last > a.last[ia])
    )
    a.last_ts[ia] = np.where(take_last, b.last_ts, a.last_ts[ia])
    a.last[ia] = np.where(take_last, b.last, a.last[ia])
    a.seq_min[ia] = np.minimum(a.seq_min[ia], b.seq_min)
    a.seq_max[ia] = np.maximum(a.seq_max[ia], b.seq_max)
    a.seq_sum[ia] = a.seq_sum[ia] + b.seq_sum
