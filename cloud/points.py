"""What the cloud writes to InfluxDB, and under which identity.

* ``aggregates``: one point per (gateway, site, device, metric, window) at the window start;
  a revision overwrites the earlier one field by field (same identity).
* ``anomalies``: one point per (window, detector), same timestamp as its window.
* ``pipeline``: health counters and gauges, tag ``component`` = edge | cloud.

Dashboards (``cloud.dashboards``) query exactly these names; change them together.
"""

from __future__ import annotations

from collections.abc import Mapping

from cloud.detect import Anomaly
from cloud.enrich import EnrichedResults
from cloud.sinks.lineproto import line

AGGREGATES = "aggregates"
ANOMALIES = "anomalies"
PIPELINE = "pipeline"


def window_label(width_ms: int) -> str:
    for unit, ms in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if width_ms % ms == 0:
            return f"{width_ms // ms}{unit}"
    return f"{width_ms}ms"


def aggregate_lines(rows: EnrichedResults) -> list[str]:
    out = []
    start = rows.start.tolist()
    width = rows.width.tolist()
    count = rows.count.tolist()
    rev = rows.rev.tolist()
    s, mn, mx, mean, std = (rows.sum.tolist(), rows.min.tolist(), rows.max.tolist(),
                            rows.mean.tolist(), rows.std.tolist())
    first, last = rows.first.tolist(), rows.last.tolist()
    for i in range(len(start)):
        tags = {"gateway": rows.gateway, "site": rows.site[i], "device": rows.device[i],
                "metric": rows.metric[i], "window": window_label(width[i]), "unit": rows.unit[i]}
        fields = {"count": count[i], "sum": s[i], "min": mn[i], "max": mx[i], "mean": mean[i],
                  "stddev": std[i], "first": first[i], "last": last[i], "rev": rev[i]}
        ln = line(AGGREGATES, tags, fields, start[i])
        if ln is not None:
            out.append(ln)
    return out


def anomaly_lines(rows: EnrichedResults, found: list[Anomaly]) -> list[str]:
    out = []
    for a in found:
        i = a.row
        tags = {"gateway": rows.gateway, "site": rows.site[i], "device": rows.device[i],
                "metric": rows.metric[i], "window": window_label(int(rows.width[i])),
                "detector": a.detector}
        fields = {"score": a.score, "value": a.value, "reference": a.reference,
                  "direction": a.direction, "message": a.message, "rev": int(rows.rev[i]),
                  "window_end": int(rows.start[i] + rows.width[i])}
        ln = line(ANOMALIES, tags, fields, int(rows.start[i]))
        if ln is not None:
            out.append(ln)
    return out


def pipeline_line(component: str, tags: Mapping[str, str], counters: Mapping[str, int],
                  gauges: Mapping[str, float], ts_ms: int) -> str | None:
    fields: dict[str, object] = {k: int(v) for k, v in counters.items()}
    fields.update({k: float(v) for k, v in gauges.items()})
    return line(PIPELINE, {"component": component, **tags}, fields, ts_ms)
