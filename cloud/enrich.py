"""Enrichment: join each window result with the device registry (reference data).

Adds site, kind and unit; applies the device's calibration offset (an offset shifts sum, min,
max, mean, first and last and leaves the spread unchanged, so mergeability is kept); carries the
alarm thresholds to the detectors. Results of devices missing from the registry are still
written, under site ``unknown``, and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from devices.catalog import Catalog
from devices.contract import ResultBatch, ResultColumns, percentile_name
from devices.readings import F64, I64
from devices.registry import Device, Registry
from devices.schema import OUTPUTS, STATE

if TYPE_CHECKING:
    from cloud.refdata import ReferenceData

UNKNOWN_SITE = "unknown"
log = logging.getLogger("fieldline.cloud.enrich")


@dataclass(frozen=True)
class EnrichedResults:
    """One batch of results, calibrated, with reference data per row."""

    gateway: str
    device: list[str]
    metric: list[str]
    site: list[str]
    unit: list[str]
    window: list[str]  # window spec label per row ("10s", "session:30s", ...)
    known: npt.NDArray[np.bool_]
    start: I64
    width: I64
    rev: I64
    count: I64
    sum: F64
    min: F64
    max: F64
    mean: F64
    std: F64
    first: F64
    last: F64
    low: F64  # alarm thresholds (NaN when none)
    high: F64
    scale_floor: F64  # smallest meaningful spread for the metric (for robust scores)
    rate: F64  # rate of change per second, first to last reading
    seq_min: I64 | None  # readings' sequence numbers (None: the edge sent none)
    seq_max: I64 | None
    seq_sum: I64 | None
    pct: F64  # (rows, len(pct_names)), calibrated
    pct_names: list[str]
    primary_window: str = ""  # the gateway's primary window spec (the first it lists)

    def __len__(self) -> int:
        return len(self.start)

    @classmethod
    def none(cls, gateway: str) -> EnrichedResults:
        """No rows, of ``gateway`` (what its events without rows are judged with)."""
        i, f = np.zeros(0, np.int64), np.zeros(0)
        return cls(gateway, [], [], [], [], [], np.zeros(0, bool), i, i, i, i, f, f, f, f, f, f,
                   f, f, f, f, f, None, None, None, np.zeros((0, 0)), [])


def calibrated(r: ResultColumns, off: F64) -> ResultColumns:
    """The state columns with a calibration offset per row applied as ``devices.schema`` says
    (a shift moves sum by offset x count, the spread not at all: mergeability is kept)."""
    cal: dict[str, Any] = {}
    for c in STATE:
        if c.calibrate == "shift":
            cal[c.name] = getattr(r, c.name) + off
        elif c.calibrate == "sum":
            cal[c.name] = getattr(r, c.name) + off * r.count
    return replace(r, **cal)


def outputs(r: ResultColumns, off: F64) -> dict[str, Any]:
    """The ``devices.schema.OUTPUTS`` values by attribute: a state column (calibrated) of that
    name, or one derived here."""
    cal = calibrated(r, off)
    derived = {"std": lambda: np.sqrt(cal.variance()), "rate": cal.rate}
    return {o.attr: derived[o.attr]() if o.attr in derived else getattr(cal, o.attr)
            for o in OUTPUTS}


class Enricher:
    def __init__(self, registry: Registry | ReferenceData, catalog: Catalog) -> None:
        self.registry = registry
        self.catalog = catalog
        self.unknown_results = 0
        self.unknown_devices: set[str] = set()

    def site_at(self, device: str, t_ms: int) -> str:
        """The device's site for a window starting at ``t_ms``, as ``enrich`` gives it."""
        dev = self.registry.get(device)
        as_of = getattr(self.registry, "as_of", None)
        if as_of is not None:
            since = self.registry.changed(device)  # type: ignore[union-attr]
            if since is not None and t_ms < since:
                dev = as_of(device, t_ms)
        return dev.site if dev is not None else UNKNOWN_SITE

    def enrich(self, batch: ResultBatch) -> EnrichedResults:
        r = batch.results
        nd = len(batch.devices)
        site = [UNKNOWN_SITE] * nd
        offset_by_dev = np.zeros(nd)
        kind_by_dev: list[str | None] = [None] * nd
        low_by_dev = np.full(nd, np.nan)
        high_by_dev = np.full(nd, np.nan)
        known_by_dev = np.zeros(nd, bool)
        for i, name in enumerate(batch.devices):
            dev = self.registry.get(name)
            if dev is None:
                continue
            known_by_dev[i] = True
            site[i] = dev.site
            kind_by_dev[i] = dev.kind
            offset_by_dev[i] = dev.calibration_offset
            low_by_dev[i] = np.nan if dev.low is None else dev.low
            high_by_dev[i] = np.nan if dev.high is None else dev.high

        unit_by_met = []
        floor_by_met = np.zeros(len(batch.metrics))
        for j, metric_name in enumerate(batch.metrics):
            k = self.catalog.get(metric_name)
            unit_by_met.append(k.unit if k else "")
            floor_by_met[j] = 1e-4 * (k.high - k.low) if k else 1e-6

        d = r.device
        m = r.metric
        # thresholds and calibration apply to the device's own kind only
        met_index = {name: j for j, name in enumerate(batch.metrics)}
        kind_met = np.array([-1 if k is None else met_index.get(k, -1) for k in kind_by_dev],
                            dtype=np.int64)
        own_kind = kind_met[d] == m if nd else np.zeros(len(d), bool)
        off = np.where(own_kind, offset_by_dev[d], 0.0)
        known = known_by_dev[d].copy()
        low = np.where(own_kind, low_by_dev[d], np.nan)
        high = np.where(own_kind, high_by_dev[d], np.nan)
        site_row = [site[i] for i in d.tolist()]
        as_of = getattr(self.registry, "as_of", None)
        if as_of is not None:  # windows from before a registry change: the record then
            for i, name in enumerate(batch.devices):
                since = self.registry.changed(name)  # type: ignore[union-attr]
                if since is None:
                    continue
                for row in np.flatnonzero((d == i) & (r.start < since)).tolist():
                    then: Device | None = as_of(name, int(r.start[row]))
                    own = then is not None and then.kind == batch.metrics[int(m[row])]
                    known[row] = then is not None
                    site_row[row] = then.site if then is not None else UNKNOWN_SITE
                    off[row] = then.calibration_offset if own and then else 0.0
                    low[row] = then.low if own and then and then.low is not None else np.nan
                    high[row] = (then.high if own and then and then.high is not None
                                 else np.nan)
        n_unknown = int((~known).sum())
        if n_unknown:
            self.unknown_results += n_unknown
            new = [batch.devices[i] for i in np.unique(d[~known]).tolist()
                   if batch.devices[i] not in self.unknown_devices]
            if new and len(self.unknown_devices) < 100_000:
                before = len(self.unknown_devices)
                self.unknown_devices.update(new)
                # the first few by name, then one line per batch that brings new ones
                for name in new[:max(0, 10 - before)]:
                    log.warning("device %r of gateway %s is not in the registry: its results "
                                "are written under site %r", name, batch.gateway, UNKNOWN_SITE)
                if before + len(new) > 10:
                    log.warning("%d more device(s) of gateway %s not in the registry (%d in "
                                "all): written under site %r", len(new) - max(0, 10 - before),
                                batch.gateway, len(self.unknown_devices), UNKNOWN_SITE)
        labels = batch.spec_labels()
        pct_names = [percentile_name(q) for q in batch.percentiles] if r.pct is not None else []
        pct = (r.pct + off[:, None]) if r.pct is not None else np.empty((len(d), 0))
        return EnrichedResults(
            gateway=batch.gateway, window=labels,
            primary_window=batch.specs[0] if batch.specs else (labels[0] if labels else ""),
            pct=pct, pct_names=pct_names, seq_min=r.seq_min, seq_max=r.seq_max,
            seq_sum=r.seq_sum,
            device=[batch.devices[i] for i in d.tolist()],
            metric=[batch.metrics[i] for i in m.tolist()],
            site=site_row,
            unit=[unit_by_met[i] for i in m.tolist()],
            known=known,
            start=r.start, width=r.width, rev=r.rev, **outputs(r, off),
            low=low, high=high,
            scale_floor=floor_by_met[m],
        )
