"""What the cloud writes to InfluxDB, and under which identity.

* ``aggregates``: one point per (gateway, site, device, metric, window) at the window start;
  a revision overwrites the earlier one field by field (same identity).
* ``anomalies``: one point per (window, detector), same timestamp as its window.
* ``alerts``: one point per incident (a detector's or a rule's), at the start of the window that
  opened it; written when it opens (``state = "open"``) and overwritten when it resolves.
* ``sites``: per-site rollups of the time-aligned windows' first results, one point per results
  batch and (gateway, site, metric, window) at the window start plus a few milliseconds that
  name the batch (``site_points``): what fleet-wide charts read instead of every device's series.
* ``pipeline``: health counters and gauges, tag ``component`` = edge | cloud.

Dashboards (``cloud.dashboards``) query exactly these names; change them together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.detect import AlertEvent, Anomaly
from cloud.detect.stage import DEVICE_SUBJECT, subject_of
from cloud.enrich import EnrichedResults
from cloud.rules import RuleAlert
from cloud.sinks.points import FieldColumn, Points, Row
from devices.schema import OUTPUTS, REVISION_FIELD, seq_run
from devices.settings import time_aligned

AGGREGATES = "aggregates"
SITES = "sites"
ANOMALIES = "anomalies"
ALERTS = "alerts"
CRITICAL_SEVERITY = 5.0  # a detector's alert this far past its threshold is "critical"
PIPELINE = "pipeline"


def aggregate_points(rows: EnrichedResults) -> Points:
    """One point per result: the fields of ``devices.schema.OUTPUTS``, then percentiles (an
    empty sketch's NaN is left out), the sequence-number checks (only for windows whose
    readings all carried one) and the revision. Columns, never a loop per row.

    What a reader can work out is not written (InfluxDB's work grows with every field of every
    point): ``seq_max`` and ``seq_sum`` of a first result (rev 0) only where its sequence
    numbers are not the run ``seq_min .. seq_min + count - 1`` (``devices.schema.seq_checks``
    restores them), ``rev`` only from the first revision on (absent: 0)."""
    n = len(rows)
    fields: dict[str, FieldColumn] = {o.field: getattr(rows, o.attr) for o in OUTPUTS}
    for j, name in enumerate(rows.pct_names):
        fields[name] = np.ascontiguousarray(rows.pct[:, j])
    if rows.seq_min is not None and rows.seq_max is not None and rows.seq_sum is not None:
        have = rows.seq_min >= 0
        # a revision writes all three: it overwrites field by field, and an earlier revision's
        # seq_max / seq_sum must not outlive it
        run_max, run_sum = seq_run(rows.seq_min, rows.count)
        run = have & (rows.rev == 0) & (rows.seq_max == run_max) & (rows.seq_sum == run_sum)
        _put(fields, "seq_min", rows.seq_min, have)
        _put(fields, "seq_max", rows.seq_max, have & ~run)
        _put(fields, "seq_sum", rows.seq_sum, have & ~run)
    _put(fields, REVISION_FIELD, rows.rev, rows.rev > 0)
    tags = {"gateway": [rows.gateway] * n, "site": rows.site, "device": rows.device,
            "metric": rows.metric, "window": rows.window, "unit": rows.unit}
    return Points(AGGREGATES, tags, fields, rows.start)


def site_points(rows: EnrichedResults, seq: int,
                judged: npt.NDArray[np.bool_] | None = None,
                anomalous: npt.NDArray[np.bool_] | None = None) -> Points:
    """The batch's first results (rev 0) of time-aligned windows (tumbling, hopping: not
    sessions or count windows, whose starts differ per device) rolled up per (site, metric,
    window spec, window start): ``devices`` (results), ``readings``, ``sum``, ``min``, ``max``;
    and, given which rows the detectors judged and which they found anomalous (per row),
    ``judged`` and ``anomalous`` (how many of those results), on the points with a judged
    result only: a site's share of anomalous windows, whatever its size, is
    ``sum("anomalous") / sum("judged")``.

    A fleet-wide chart then reads a few points per site and window instead of one per device
    (the site mean over an hour at 10,000 devices: 30 s of InfluxDB's time from ``aggregates``).
    A gateway's results for one window come in several batches, so each batch writes its own
    point, at the window start plus ``seq`` modulo the window's width (at most 999 ms): still
    inside the window and the same time bucket, and never overwriting another batch's part;
    a reader sums them (mean = sum("sum") / sum("readings")). Written again (a retried write),
    a batch's points land on themselves. Revisions are left out (what they change is the
    device's own series): the rollup is each window as first shipped."""
    kinds = {w: time_aligned(w) for w in set(rows.window)}
    aligned = np.fromiter((kinds[w] for w in rows.window), np.bool_, len(rows))
    idx = np.flatnonzero(aligned & (rows.rev == 0) & (rows.count > 0))
    if len(idx) == 0:
        return Points.of(SITES, [])
    codes: dict[tuple[str, str, str], int] = {}
    site, metric, window = rows.site, rows.metric, rows.window
    code = np.fromiter((codes.setdefault((site[i], metric[i], window[i]), len(codes))
                        for i in idx.tolist()), np.int64, len(idx))
    start = rows.start[idx]
    order = np.lexsort((start, code))
    code, start, idx = code[order], start[order], idx[order]
    first = np.flatnonzero(np.r_[True, (code[1:] != code[:-1]) | (start[1:] != start[:-1])])
    names = list(codes)
    tags: dict[str, list[str]] = {"gateway": [rows.gateway] * len(first), "site": [],
                                  "metric": [], "window": []}
    for c in code[first].tolist():
        s_, m_, w_ = names[c]
        tags["site"].append(s_)
        tags["metric"].append(m_)
        tags["window"].append(w_)
    fields: dict[str, FieldColumn] = {
        "devices": np.diff(np.r_[first, len(idx)]).astype(np.int64),
        "readings": np.add.reduceat(rows.count[idx], first),
        "sum": np.add.reduceat(rows.sum[idx], first),
        "min": np.minimum.reduceat(rows.min[idx], first),
        "max": np.maximum.reduceat(rows.max[idx], first),
    }
    if judged is not None and anomalous is not None and len(judged) == len(rows):
        k = np.add.reduceat(judged[idx].astype(np.int64), first)
        _put(fields, "judged", k, k > 0)
        _put(fields, "anomalous", np.add.reduceat((anomalous & judged)[idx].astype(np.int64),
                                                  first), k > 0)
    width = rows.width[idx][first]
    at = start[first] + seq % np.maximum(np.minimum(width, 1000), 1)
    return Points(SITES, tags, fields, at.astype(np.int64))


def _put(fields: dict[str, FieldColumn], name: str, col: npt.NDArray[Any],
         keep: npt.NDArray[np.bool_]) -> None:
    """Field ``name`` from ``col`` where ``keep``, left out elsewhere (the whole array when kept
    everywhere: the fast path of ``Points.lines``; no column at all when kept nowhere)."""
    if keep.all():
        fields[name] = col
    elif keep.any():
        fields[name] = [v if k else None for v, k in zip(col.tolist(), keep.tolist(),
                                                         strict=True)]


def anomaly_points(rows: EnrichedResults, found: list[Anomaly]) -> Points:
    out: list[Row] = []
    for a in found:
        i = a.row
        tags = {"gateway": rows.gateway, "site": rows.site[i], "device": rows.device[i],
                "metric": rows.metric[i], "window": rows.window[i], "detector": a.detector}
        if a.device_level:
            tags["metric"] = DEVICE_SUBJECT
        fields: dict[str, object] = {
            "score": a.score, "direction": a.direction, "message": a.message,
            "rev": int(rows.rev[i]), "window_end": int(rows.start[i] + rows.width[i])}
        if math.isfinite(a.value):
            fields["value"] = a.value
        if math.isfinite(a.reference):
            fields["reference"] = a.reference
        out.append((tags, fields, int(rows.start[i])))
    return Points.of(ANOMALIES, out)


def alert_points(rows: EnrichedResults, events: list[AlertEvent]) -> Points:
    """An incident's point: its identity is the subject and the window that opened it."""
    out: list[Row] = []
    for e in events:
        gateway, device, metric, window = subject_of(rows, e)
        site = rows.site[e.row] if e.site is None else e.site
        tags = {"gateway": gateway, "site": site, "device": device, "metric": metric,
                "window": window, "source": e.source, "name": e.name}
        fields: dict[str, object] = {
            "state": e.state, "open": e.state == "open", "severity": e.severity,
            "level": "critical" if e.severity >= CRITICAL_SEVERITY else "warning",
            "opened": e.incident, "resolved": e.until if e.state == "resolved" else 0,
            "direction": e.direction, "message": e.message}
        if math.isfinite(e.value):
            fields["value"] = e.value
        if math.isfinite(e.reference):
            fields["reference"] = e.reference
        out.append((tags, fields, e.incident))
    return Points.of(ALERTS, out)


def rule_alert_points(alerts: list[RuleAlert]) -> Points:
    """A rule's alert: same measurement as the detectors', ``source = "rule"``."""
    out: list[Row] = []
    for a in alerts:
        tags = {"gateway": a.gateway, "site": a.site, "device": a.device, "metric": a.metric,
                "window": a.window, "source": "rule", "name": a.rule}
        fields: dict[str, object] = {
            "state": a.state, "open": a.state == "open", "level": a.level, "kind": a.kind,
            "opened": a.opened, "resolved": a.until, "message": a.message}
        if math.isfinite(a.value):
            fields["value"] = a.value
        out.append((tags, fields, a.opened))
    return Points.of(ALERTS, out)


DEVICES = "devices"
LEDGER = "ledger"
GATEWAY_ROW = "_gateway"
LEDGER_GATEWAY_FIELDS = ("readings_received", "readings_accepted", "rejected", "late_dropped",
                         "duplicates", "windows_emitted", "windows_acked", "windows_shed",
                         "readings_shed", "windows_pending", "windows_superseded",
                         "readings_gap", "broker_dropped")


def ledger_points(gateway: str, counters: Mapping[str, int], ledger: Mapping[str, object],
                  ts_ms: int, cloud_written: int | None) -> Points:
    """The ledger: one row per device as the edge reports it, one for the whole gateway (which
    must balance: received = accepted + rejected + late + duplicates; emitted = acknowledged +
    shed + pending), and the cloud's count of that gateway's results written."""
    out: list[Row] = []
    gw_fields: dict[str, object] = {k: int(counters.get(k, 0)) for k in LEDGER_GATEWAY_FIELDS}
    if cloud_written is not None:
        gw_fields["results_written"] = cloud_written
    out.append(({"gateway": gateway, "device": GATEWAY_ROW}, gw_fields, ts_ms))
    names = ledger.get("devices", [])
    assert isinstance(names, list)
    cols = {k: v for k, v in ledger.items() if k not in ("devices", "rejected_by")}
    by = ledger.get("rejected_by", {})
    assert isinstance(by, dict)
    cols.update({f"rejected_{k}": v for k, v in by.items()})
    for i, dev in enumerate(names):
        fields = {k: int(v[i]) for k, v in cols.items() if isinstance(v, list)}
        out.append(({"gateway": gateway, "device": str(dev)}, fields, ts_ms))
    return Points.of(LEDGER, out)


def device_points(gateway: str, report: Mapping[str, object], ts_ms: int) -> Points:
    """Per-device health reported by an edge: silent devices and clock skew."""
    out: list[Row] = []
    silent = report.get("silent", [])
    skew = report.get("skew_ms", {})
    assert isinstance(silent, list)
    assert isinstance(skew, dict)
    for dev in silent:
        out.append(({"gateway": gateway, "device": str(dev)}, {"silent": True}, ts_ms))
    for dev, ms in skew.items():
        out.append(({"gateway": gateway, "device": str(dev)}, {"skew_ms": int(ms)}, ts_ms))
    return Points.of(DEVICES, out)


def superseded_identities(gateway: str, batch_devices: list[str], batch_metrics: list[str],
                          labels: list[str], site_of: Mapping[str, str],
                          device: list[int], metric: list[int], spec: list[int],
                          start: list[int]) -> list[tuple[str, dict[str, str], int]]:
    """(measurement, tags, time) of results the edge withdrew, in every measurement that
    carries them (aggregates and anomalies)."""
    out = []
    for d, m, k, s in zip(device, metric, spec, start, strict=True):
        dev = batch_devices[d]
        tags = {"gateway": gateway, "device": dev, "metric": batch_metrics[m],
                "window": labels[k] if labels else "", "site": site_of.get(dev, "unknown")}
        out.append((AGGREGATES, tags, s))
        out.append((ANOMALIES, tags, s))
    return out


def pipeline_points(component: str, tags: Mapping[str, str], counters: Mapping[str, int],
                    gauges: Mapping[str, float], ts_ms: int) -> Points:
    fields: dict[str, object] = {k: int(v) for k, v in counters.items()}
    fields.update({k: float(v) for k, v in gauges.items()})
    return Points.of(PIPELINE, [({"component": component, **tags}, fields, ts_ms)])
