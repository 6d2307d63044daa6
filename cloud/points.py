"""What the cloud writes to InfluxDB, and under which identity.

* ``aggregates``: one point per (gateway, site, device, metric, window) at the window start;
  a revision overwrites the earlier one field by field (same identity).
* ``anomalies``: one point per (window, detector), same timestamp as its window.
* ``alerts``: one point per incident (a detector's or a rule's), at the start of the window that
  opened it; written when it opens (``state = "open"``) and overwritten when it resolves.
* ``pipeline``: health counters and gauges, tag ``component`` = edge | cloud.

Dashboards (``cloud.dashboards``) query exactly these names; change them together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from cloud.detect import AlertEvent, Anomaly
from cloud.enrich import EnrichedResults
from cloud.rules import RuleAlert
from cloud.sinks.lineproto import field_value, line, tag_prefix
from devices.schema import OUTPUTS, REVISION_FIELD

AGGREGATES = "aggregates"
ANOMALIES = "anomalies"
ALERTS = "alerts"
DEVICE_SUBJECT = "(device)"  # the metric tag of alerts judged across a device's metrics
CRITICAL_SEVERITY = 5.0  # a detector's alert this far past its threshold is "critical"
PIPELINE = "pipeline"


_PREFIXES: dict[tuple[str, str, str, str, str, str], str] = {}
_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def number_texts(a: npt.NDArray[Any]) -> list[str]:
    """Every value of a numeric column as text, in one C call (orjson: the shortest repr that
    round-trips, as Python's repr, at a tenth of its cost); NaN and infinities come out as
    ``null``, which line protocol cannot carry: callers leave those out."""
    if len(a) == 0:
        return []
    return orjson.dumps(np.ascontiguousarray(a), option=_NUMPY).decode()[1:-1].split(",")


# "<tags> count=%si,sum=%s,...,rate=%s%s,rev=%si %s": the fields of ``devices.schema.OUTPUTS``
_TEMPLATE = ("%s " + ",".join(f"{o.field}=%s{'i' if o.kind == 'int' else ''}" for o in OUTPUTS)
             + f"%s,{REVISION_FIELD}=%si %s")


def aggregate_lines(rows: EnrichedResults) -> list[str]:
    """One line per result, with the fields of ``devices.schema.OUTPUTS``, then percentiles,
    sequence-number checks and the revision. Built column by column: the escaped tag set once
    per series, every number column formatted in one call."""
    prefixes = _PREFIXES
    if len(prefixes) > 200_000:  # a bound, not an LRU: series sets are stable in practice
        prefixes.clear()
    n = len(rows)
    values = [getattr(rows, o.attr) for o in OUTPUTS]
    finite = np.ones(n, bool)
    for o, v in zip(OUTPUTS, values, strict=True):
        if o.kind == "float":
            finite &= np.isfinite(v)
    # percentiles of empty sketches are NaN: line protocol cannot carry them, leave them out
    extra = [""] * n
    for j, name in enumerate(rows.pct_names):
        extra = [e if t == "null" else f"{e},{name}={t}"
                 for e, t in zip(extra, number_texts(rows.pct[:, j]), strict=True)]
    if rows.seq_min is not None and rows.seq_max is not None and rows.seq_sum is not None:
        # only windows whose readings all carried sequence numbers
        extra = [e + (f",seq_min={a}i,seq_max={b}i,seq_sum={c}i" if a[0] != "-" else "")
                 for e, a, b, c in zip(extra, number_texts(rows.seq_min),
                                       number_texts(rows.seq_max), number_texts(rows.seq_sum),
                                       strict=True)]
    tags = []
    gw = rows.gateway
    for dev, met, site, unit, win in zip(rows.device, rows.metric, rows.site, rows.unit,
                                         rows.window, strict=True):
        key = (gw, dev, met, site, unit, win)
        prefix = prefixes.get(key)
        if prefix is None:
            prefix = tag_prefix(AGGREGATES, {"gateway": rows.gateway, "site": site,
                                             "device": dev, "metric": met, "window": win,
                                             "unit": unit})
            prefixes[key] = prefix
        tags.append(prefix)
    tmpl = _TEMPLATE
    out = [tmpl % row for row in zip(tags, *(number_texts(v) for v in values), extra,
                                     number_texts(rows.rev), number_texts(rows.start),
                                     strict=True)]
    if not finite.all():  # a non-finite value (never from a valid batch): left out, field by field
        for i in np.flatnonzero(~finite).tolist():
            parts = [f"{o.field}={fv}" for o, v in zip(OUTPUTS, values, strict=True)
                     if (fv := field_value(v[i].item())) is not None]
            body = (",".join(parts) + extra[i]).lstrip(",")
            out[i] = f"{tags[i]} {body},{REVISION_FIELD}={int(rows.rev[i])}i {int(rows.start[i])}"
    return out


def anomaly_lines(rows: EnrichedResults, found: list[Anomaly]) -> list[str]:
    out = []
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
        ln = line(ANOMALIES, tags, fields, int(rows.start[i]))
        if ln is not None:
            out.append(ln)
    return out


def alert_lines(rows: EnrichedResults, events: list[AlertEvent]) -> list[str]:
    """An incident's point: its identity is the subject and the window that opened it."""
    out = []
    for e in events:
        i = e.row
        tags = {"gateway": rows.gateway, "site": rows.site[i], "device": rows.device[i],
                "metric": rows.metric[i] if e.level == "series" else DEVICE_SUBJECT,
                "window": rows.window[i], "source": e.source, "name": e.name}
        fields: dict[str, object] = {
            "state": e.state, "open": e.state == "open", "severity": e.severity,
            "level": "critical" if e.severity >= CRITICAL_SEVERITY else "warning",
            "opened": e.incident, "resolved": e.until if e.state == "resolved" else 0,
            "direction": e.direction, "message": e.message}
        if math.isfinite(e.value):
            fields["value"] = e.value
        if math.isfinite(e.reference):
            fields["reference"] = e.reference
        ln = line(ALERTS, tags, fields, e.incident)
        if ln is not None:
            out.append(ln)
    return out


def rule_alert_lines(alerts: list[RuleAlert]) -> list[str]:
    """A rule's alert: same measurement as the detectors', ``source = "rule"``."""
    out = []
    for a in alerts:
        tags = {"gateway": a.gateway, "site": a.site, "device": a.device, "metric": a.metric,
                "window": a.window, "source": "rule", "name": a.rule}
        fields: dict[str, object] = {
            "state": a.state, "open": a.state == "open", "level": a.level, "kind": a.kind,
            "opened": a.opened, "resolved": a.until, "message": a.message}
        if math.isfinite(a.value):
            fields["value"] = a.value
        ln = line(ALERTS, tags, fields, a.opened)
        if ln is not None:
            out.append(ln)
    return out


DEVICES = "devices"
LEDGER = "ledger"
GATEWAY_ROW = "_gateway"
LEDGER_GATEWAY_FIELDS = ("readings_received", "readings_accepted", "rejected", "late_dropped",
                         "duplicates", "windows_emitted", "windows_acked", "windows_shed",
                         "readings_shed", "windows_pending", "windows_superseded",
                         "readings_gap", "broker_dropped")


def ledger_lines(gateway: str, counters: Mapping[str, int], ledger: Mapping[str, object],
                 ts_ms: int, cloud_written: int | None) -> list[str]:
    """The ledger: one row per device as the edge reports it, one for the whole gateway (which
    must balance: received = accepted + rejected + late + duplicates; emitted = acknowledged +
    shed + pending), and the cloud's count of that gateway's results written."""
    out = []
    gw_fields: dict[str, object] = {k: int(counters.get(k, 0)) for k in LEDGER_GATEWAY_FIELDS}
    if cloud_written is not None:
        gw_fields["results_written"] = cloud_written
    ln = line(LEDGER, {"gateway": gateway, "device": GATEWAY_ROW}, gw_fields, ts_ms)
    if ln:
        out.append(ln)
    names = ledger.get("devices", [])
    assert isinstance(names, list)
    cols = {k: v for k, v in ledger.items() if k not in ("devices", "rejected_by")}
    by = ledger.get("rejected_by", {})
    assert isinstance(by, dict)
    cols.update({f"rejected_{k}": v for k, v in by.items()})
    for i, dev in enumerate(names):
        fields = {k: int(v[i]) for k, v in cols.items() if isinstance(v, list)}
        ln = line(LEDGER, {"gateway": gateway, "device": str(dev)}, fields, ts_ms)
        if ln:
            out.append(ln)
    return out


def device_lines(gateway: str, report: Mapping[str, object], ts_ms: int) -> list[str]:
    """Per-device health reported by an edge: silent devices and clock skew."""
    out = []
    silent = report.get("silent", [])
    skew = report.get("skew_ms", {})
    assert isinstance(silent, list)
    assert isinstance(skew, dict)
    for dev in silent:
        ln = line(DEVICES, {"gateway": gateway, "device": str(dev)}, {"silent": True}, ts_ms)
        if ln:
            out.append(ln)
    for dev, ms in skew.items():
        ln = line(DEVICES, {"gateway": gateway, "device": str(dev)}, {"skew_ms": int(ms)}, ts_ms)
        if ln:
            out.append(ln)
    return out


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


def pipeline_line(component: str, tags: Mapping[str, str], counters: Mapping[str, int],
                  gauges: Mapping[str, float], ts_ms: int) -> str | None:
    fields: dict[str, object] = {k: int(v) for k, v in counters.items()}
    fields.update({k: float(v) for k, v in gauges.items()})
    return line(PIPELINE, {"component": component, **tags}, fields, ts_ms)
