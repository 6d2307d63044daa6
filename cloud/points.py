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
from cloud.sinks.lineproto import line, tag_prefix

AGGREGATES = "aggregates"
ANOMALIES = "anomalies"
PIPELINE = "pipeline"


def window_label(width_ms: int) -> str:
    for unit, ms in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if width_ms % ms == 0:
            return f"{width_ms // ms}{unit}"
    return f"{width_ms}ms"


_PREFIXES: dict[tuple[str, str, str, str, str, int], str] = {}


def aggregate_lines(rows: EnrichedResults) -> list[str]:
    """One line per result. The escaped tag set is built once per series and batch; fields are
    finite by construction (validated readings), so no per-value checks are needed here."""
    prefixes = _PREFIXES
    if len(prefixes) > 200_000:  # a bound, not an LRU: series sets are stable in practice
        prefixes.clear()
    width = rows.width.tolist()
    out = []
    for dev, met, site, unit, w, c, s, mn, mx, mean, sd, first, last, rev, t in zip(
        rows.device, rows.metric, rows.site, rows.unit, width, rows.count.tolist(),
        rows.sum.tolist(), rows.min.tolist(), rows.max.tolist(), rows.mean.tolist(),
        rows.std.tolist(), rows.first.tolist(), rows.last.tolist(), rows.rev.tolist(),
        rows.start.tolist(), strict=True,
    ):
        key = (rows.gateway, dev, met, site, unit, w)
        prefix = prefixes.get(key)
        if prefix is None:
            prefix = tag_prefix(AGGREGATES, {"gateway": rows.gateway, "site": site,
                                             "device": dev, "metric": met,
                                             "window": window_label(w), "unit": unit})
            prefixes[key] = prefix
        out.append(f"{prefix} count={c}i,sum={s!r},min={mn!r},max={mx!r},mean={mean!r},"
                   f"stddev={sd!r},first={first!r},last={last!r},rev={rev}i {t}")
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
