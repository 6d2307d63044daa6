"""Per-series state as columns: every detector keeps its state in arrays whose first axis is the
series id, so a round of windows updates thousands of series with one numpy operation, and a
snapshot is a dict of arrays (``numpy.savez``-able) that can be restored exactly.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from devices.readings import I64

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Column:
    """One state array: per-series shape ``tail``, dtype and the value a new series starts with."""

    tail: tuple[int, ...]
    dtype: type[np.generic] | np.dtype[Any]
    fill: float | int | bool


class StateArrays:
    """Named arrays of per-series state, grown on demand (amortised doubling)."""

    def __init__(self, columns: Mapping[str, Column]) -> None:
        self.columns = dict(columns)
        self.size = 0  # series with state
        self._cap = 0
        self.a: dict[str, Array] = {
            k: np.full((0, *c.tail), c.fill, dtype=c.dtype) for k, c in self.columns.items()}

    def reserve(self, n: int) -> None:
        """Make room for series ids below ``n``."""
        if n <= self._cap:
            self.size = max(self.size, n)
            return
        cap = max(n, 2 * self._cap, 64)
        for k, c in self.columns.items():
            grown = np.full((cap, *c.tail), c.fill, dtype=c.dtype)
            grown[: self._cap] = self.a[k]
            self.a[k] = grown
        self._cap = cap
        self.size = n

    def __getitem__(self, name: str) -> Array:
        return self.a[name]

    def snapshot(self, prefix: str = "") -> dict[str, Array]:
        return {prefix + k: v[: self.size].copy() for k, v in self.a.items()}

    def restore(self, snap: Mapping[str, Array], prefix: str = "", *,
                absent: int | None = None) -> None:
        """The state ``snapshot`` gave. ``absent``: a snapshot from before some of the columns
        existed holds this many series, and each column it lacks starts at its fill value for
        them (without it, a lacking column is an error)."""
        n = absent or 0
        for k, c in self.columns.items():
            key = prefix + k
            if key not in snap:
                if absent is None:
                    raise ValueError(f"snapshot lacks state {key!r}")
                snap = {**snap, key: np.full((absent, *c.tail), c.fill, dtype=c.dtype)}
            n = max(n, len(snap[key]))
        self.size = 0
        self._cap = 0
        self.a = {k: np.full((0, *c.tail), c.fill, dtype=c.dtype)
                  for k, c in self.columns.items()}
        self.reserve(n)
        for k, c in self.columns.items():
            src = np.asarray(snap[prefix + k])
            if src.shape[1:] != c.tail:
                raise ValueError(f"state {prefix + k!r} has shape {src.shape[1:]}, "
                                 f"expected {c.tail}")
            self.a[k][: len(src)] = src

    def nbytes(self) -> int:
        return sum(v[: self.size].nbytes for v in self.a.values())


class KeyIndex:
    """Dense ids for hashable keys (series or devices), in first-seen order; never reused."""

    def __init__(self) -> None:
        self._ids: dict[Hashable, int] = {}
        self.keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self.keys)

    def ids(self, keys: list[Hashable]) -> I64:
        get = self._ids.get
        found = [get(k, -1) for k in keys]
        if -1 in found:  # new keys, in order
            for j, known in enumerate(found):
                if known == -1:
                    k = keys[j]
                    new = self._ids.get(k, -1)
                    if new == -1:
                        new = len(self.keys)
                        self._ids[k] = new
                        self.keys.append(k)
                    found[j] = new
        return np.array(found, dtype=np.int64)

    def get(self, key: Hashable) -> int | None:
        return self._ids.get(key)

    def snapshot(self) -> list[Hashable]:
        return list(self.keys)

    def restore(self, keys: Iterable[Hashable]) -> None:
        self.keys = list(keys)
        self._ids = {k: i for i, k in enumerate(self.keys)}
        if len(self._ids) != len(self.keys):
            raise ValueError("snapshot holds a key twice")
