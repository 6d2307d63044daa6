"""Semantic checks on decoded readings, vectorised: known metric, physical range, plausible
event time. Structural checks (types, JSON) and the registry happened in the codec, before a
device got an id.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import numpy.typing as npt

from devices import rejects
from devices.catalog import Catalog
from devices.readings import Interner, ReadingColumns
from edge.windows import EPOCH_BASE_MS


class Validator:
    """Splits a batch into accepted rows and counted rejections."""

    def __init__(
        self,
        catalog: Catalog,
        metrics: Interner,
        *,
        max_future_ms: int = 5 * 60_000,
        max_past_ms: int = 7 * 86_400_000,
    ) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self.max_future_ms = max_future_ms
        self.max_past_ms = max_past_ms
        self._low = np.empty(0)
        self._high = np.empty(0)

    def _refresh(self) -> None:
        if len(self._low) != len(self.metrics):
            self._low, self._high = self.catalog.bounds(self.metrics.names)

    def check(self, batch: ReadingColumns, now_ms: int
              ) -> tuple[npt.NDArray[np.bool_], Counter[str]]:
        """Mask of accepted rows and rejection counts. Each row gets at most one reason;
        ``self.row_reasons`` then maps every rejected row to its reason."""
        self._refresh()
        counts: Counter[str] = Counter()
        n = len(batch)
        ok = np.ones(n, bool)
        self.row_reasons: list[tuple[npt.NDArray[np.int64], str]] = []
        if n == 0:
            return ok, counts

        def apply(bad: npt.NDArray[np.bool_], reason: str) -> None:
            hit = bad & ok
            k = int(hit.sum())
            if k:
                counts[reason] += k
                ok[hit] = False
                self.row_reasons.append((np.flatnonzero(hit), reason))

        low = self._low[batch.metric]
        high = self._high[batch.metric]
        apply(np.isnan(low), rejects.UNKNOWN_METRIC)
        apply(~np.isfinite(batch.value), rejects.NOT_FINITE)
        apply((batch.value < low) | (batch.value > high), rejects.OUT_OF_RANGE)
        apply(batch.ts < EPOCH_BASE_MS, rejects.BAD_TIMESTAMP)
        apply(batch.ts > now_ms + self.max_future_ms, rejects.CLOCK_FUTURE)
        apply(batch.ts < now_ms - self.max_past_ms, rejects.CLOCK_PAST)
        return ok, counts
