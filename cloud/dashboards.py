"""Grafana provisioning generated from code: an InfluxDB data source and the fleet dashboard.

Every query is InfluxQL, so the same dashboard works on InfluxDB 1.x, on 2.x through a DBRP
mapping and on 3.x. ``export`` writes the provisioning files (``deploy/grafana`` holds the
committed copy; a test checks it is current); ``push`` sends both to a running Grafana through
``grafana-client``. ``panel_queries`` lists every query so tests can run each one against a real
InfluxDB.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.points import AGGREGATES, ALERTS, ANOMALIES, DEVICES, LEDGER, PIPELINE

DATASOURCE_UID = "fieldline-influxdb"
DASHBOARD_UID = "fieldline-fleet"
DS = {"type": "influxdb", "uid": DATASOURCE_UID}

SEL = ('"site" =~ /^$site$/ AND "metric" =~ /^$metric$/ AND "device" =~ /^$device$/ '
       'AND "window" =~ /^$window$/')
SITE_SEL = '"site" =~ /^$site$/ AND "metric" =~ /^$metric$/ AND "window" =~ /^$window$/'


@dataclass(frozen=True)
class Query:
    ref: str
    text: str
    alias: str = ""
    fmt: str = "time_series"


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries | table | stat | barchart
    queries: tuple[Query, ...]
    unit: str = ""
    description: str = ""
    width: int = 12
    height: int = 8


ROWS: list[tuple[str, list[Panel]]] = [
    ("Sensors", [
        Panel("Window mean by device", "timeseries", (Query("A", (
            f'SELECT mean("mean") FROM "{AGGREGATES}" WHERE {SEL} AND $timeFilter '
            'GROUP BY time($__interval), "device" fill(none)'), "$tag_device"),),
            description="Calibrated mean of each event-time window, per device."),
        Panel("Min / max envelope", "timeseries", (Query("A", (
            f'SELECT min("min") AS "min", max("max") AS "max" FROM "{AGGREGATES}" '
            f'WHERE {SEL} AND $timeFilter GROUP BY time($__interval) fill(none)')),),
            description="Extremes over the selected devices."),
        Panel("Mean by site", "timeseries", (Query("A", (
            f'SELECT mean("mean") FROM "{AGGREGATES}" WHERE {SITE_SEL} AND $timeFilter '
            'GROUP BY time($__interval), "site" fill(none)'), "$tag_site"),)),
        Panel("p50 and p99 by device", "timeseries", (Query("A", (
            f'SELECT mean("p50") AS "p50", max("p99") AS "p99" FROM "{AGGREGATES}" '
            f'WHERE {SEL} AND $timeFilter GROUP BY time($__interval), "device" fill(none)'),
            "$tag_device $col"),),
            description="Percentiles from each window's mergeable sketch (1 % relative error)."),
        Panel("Readings per interval by site", "timeseries", (Query("A", (
            f'SELECT sum("count") FROM "{AGGREGATES}" WHERE {SITE_SEL} AND $timeFilter '
            'GROUP BY time($__interval), "site" fill(0)'), "$tag_site"),),
            description="Readings that made it into windows (after rejects and late drops)."),
    ]),
    ("Anomalies", [
        Panel("Alerts, one per incident (detectors and rules)", "table", (Query("A", (
            f'SELECT "device", "metric", "source", "name", "state", "level", "severity", '
            f'"resolved", "message" FROM "{ALERTS}" WHERE "site" =~ /^$site$/ AND $timeFilter '
            'ORDER BY time DESC LIMIT 200'), fmt="table"),), width=16,
            description="An incident opens when a detector's severity (or a pattern rule) "
                        "crosses its threshold and resolves when the series is back; time is "
                        "the window that opened it, resolved the end of its last window."),
        Panel("Alerts opened by source", "timeseries", (Query("A", (
            f'SELECT count("state") FROM "{ALERTS}" WHERE "site" =~ /^$site$/ AND $timeFilter '
            'GROUP BY time($__interval), "source" fill(0)'), "$tag_source"),), width=8),
        Panel("Anomalies", "table", (Query("A", (
            f'SELECT "device", "metric", "detector", "direction", "score", "value", '
            f'"reference", "message" FROM "{ANOMALIES}" WHERE "site" =~ /^$site$/ '
            'AND "metric" =~ /^$metric$/ AND $timeFilter ORDER BY time DESC LIMIT 200'),
            fmt="table"),), width=16),
        Panel("Anomalies by site", "timeseries", (Query("A", (
            f'SELECT count("score") FROM "{ANOMALIES}" WHERE "site" =~ /^$site$/ AND '
            '$timeFilter GROUP BY time($__interval), "site" fill(0)'), "$tag_site"),),
            width=8),
    ]),
    ("Ledger: every reading accounted for", [
        Panel("Per gateway (received = accepted + rejected + late + duplicates; "
              "emitted = in InfluxDB + shed + pending)", "table", (Query("A", (
                  'SELECT last("readings_received") AS "received", last("readings_accepted") '
                  'AS "accepted", last("rejected") AS "rejected", last("late_dropped") AS '
                  '"late", last("duplicates") AS "duplicates", last("windows_emitted") AS '
                  '"windows emitted", last("windows_acked") AS "windows in InfluxDB", '
                  'last("windows_shed") AS "windows shed", last("windows_pending") AS '
                  f'"windows pending" FROM "{LEDGER}" WHERE "device" = \'_gateway\' AND '
                  '$timeFilter GROUP BY "gateway"'), fmt="table"),), width=24, height=6),
        Panel("Per device", "table", (Query("A", (
            'SELECT last("received") AS "received", last("accepted") AS "accepted", '
            'last("rejected") AS "rejected", last("late_dropped") AS "late", '
            'last("duplicates") AS "duplicates", last("windows_emitted") AS "windows" '
            f'FROM "{LEDGER}" WHERE "device" =~ /^$device$/ AND "device" != \'_gateway\' '
            'AND $timeFilter GROUP BY "gateway", "device"'), fmt="table"),), width=24),
    ]),
    ("Pipeline health", [
        Panel("Edge: readings accepted /s", "timeseries", (Query("A", (
            f'SELECT non_negative_derivative(max("readings_accepted"), 1s) FROM "{PIPELINE}" '
            '''WHERE "component" = 'edge' AND $timeFilter '''
            'GROUP BY time($__interval), "gateway" fill(none)'), "$tag_gateway"),),
            unit="reqps", width=8),
        Panel("Edge: rejected and late /s", "timeseries", (Query("A", (
            'SELECT non_negative_derivative(max("rejected"), 1s) AS "rejected", '
            'non_negative_derivative(max("late_dropped"), 1s) AS "late dropped", '
            'non_negative_derivative(max("late_revised"), 1s) AS "late revised" '
            f'''FROM "{PIPELINE}" WHERE "component" = 'edge' AND $timeFilter '''
            'GROUP BY time($__interval) fill(none)')),), unit="reqps", width=8),
        Panel("Edge: watermark lag", "timeseries", (Query("A", (
            f'SELECT max("watermark_lag_ms") FROM "{PIPELINE}" '
            '''WHERE "component" = 'edge' AND $timeFilter '''
            'GROUP BY time($__interval), "gateway" fill(none)'), "$tag_gateway"),),
            unit="ms", width=8),
        Panel("Cloud: points written /s", "timeseries", (Query("A", (
            f'SELECT non_negative_derivative(max("points_written"), 1s) FROM "{PIPELINE}" '
            '''WHERE "component" = 'cloud' AND $timeFilter '''
            'GROUP BY time($__interval), "worker" fill(none)'), "$tag_worker"),),
            unit="reqps", width=8),
        Panel("End-to-end lag (edge publish -> InfluxDB)", "timeseries", (Query("A", (
            'SELECT max("lag_p50_ms") AS "p50", max("lag_p99_ms") AS "p99" '
            f'''FROM "{PIPELINE}" WHERE "component" = 'cloud' AND $timeFilter '''
            'GROUP BY time($__interval) fill(none)')),), unit="ms", width=8),
        Panel("Edge: silent devices and skewed clocks", "timeseries", (Query("A", (
            'SELECT max("devices_silent") AS "silent devices", max("devices_skewed") AS '
            f'"skewed clocks" FROM "{PIPELINE}" WHERE "component" = \'edge\' AND $timeFilter '
            'GROUP BY time($__interval), "gateway" fill(none)')),), width=8),
        Panel("Devices: silent, clock offset", "table", (Query("A", (
            'SELECT last("silent") AS "silent", last("skew_ms") AS "clock offset ms" '
            f'FROM "{DEVICES}" WHERE $timeFilter GROUP BY "gateway", "device"'),
            fmt="table"),), width=8,
            description="Reported by the edge agents; a negative offset: the clock runs ahead."),
        Panel("Edge: open windows and memory", "timeseries", (Query("A", (
            'SELECT max("open_windows") AS "open windows", max("rss_mb") AS "RSS MiB" '
            f'''FROM "{PIPELINE}" WHERE "component" = 'edge' AND $timeFilter '''
            'GROUP BY time($__interval), "gateway" fill(none)')),), width=8),
    ]),
]

VARIABLES: list[tuple[str, str]] = [
    ("site", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "site"'),
    ("metric", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "metric"'),
    ("device", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "device" '
               'WHERE "site" =~ /^$site$/ AND "metric" =~ /^$metric$/'),
    ("window", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "window"'),
]

ANNOTATION_QUERY = (f'SELECT "message", "device", "metric" FROM "{ANOMALIES}" '
                    'WHERE "site" =~ /^$site$/ AND $timeFilter')


def panel_queries() -> list[tuple[str, str]]:
    """(title, InfluxQL) of every panel, variable and annotation query, unsubstituted."""
    out = [(p.title, q.text) for _, panels in ROWS for p in panels for q in p.queries]
    out += [(f"variable {name}", q) for name, q in VARIABLES]
    out.append(("annotation anomalies", ANNOTATION_QUERY))
    return out


def _variable(name: str, query: str) -> dict[str, Any]:
    return {
        "name": name, "label": name.capitalize(), "type": "query", "datasource": DS,
        "query": query, "definition": query, "refresh": 2, "includeAll": True,
        "multi": True, "allValue": ".*", "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    pid = 1
    y = 0
    for row_title, row_panels in ROWS:
        panels.append({"id": pid, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid += 1
        y += 1
        x = 0
        for p in row_panels:
            if x + p.width > 24:
                x = 0
                y += p.height
            panels.append({
                "id": pid, "type": p.kind, "title": p.title, "description": p.description,
                "datasource": DS,
                "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
                "fieldConfig": {"defaults": {"unit": p.unit} if p.unit else {},
                                "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
                if p.kind == "timeseries" else {},
                "targets": [{"refId": q.ref, "datasource": DS, "query": q.text,
                             "rawQuery": True, "resultFormat": q.fmt, "alias": q.alias}
                            for q in p.queries],
            })
            pid += 1
            x += p.width
        y += 8
    return {
        "uid": DASHBOARD_UID, "title": "fieldline fleet", "tags": ["fieldline", "iot"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [_variable(n, q) for n, q in VARIABLES]},
        "annotations": {"list": [{
            "name": "Anomalies", "datasource": DS, "enable": True, "iconColor": "red",
            "query": ANNOTATION_QUERY, "textColumn": "message", "tagsColumn": "device,metric",
            "target": {"query": ANNOTATION_QUERY, "rawQuery": True, "refId": "Anno"},
        }]},
        "panels": panels,
    }


def datasource(influx_url: str, database: str, *, token: str | None = None) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "name": "fieldline InfluxDB", "uid": DATASOURCE_UID, "type": "influxdb",
        "access": "proxy", "url": influx_url, "isDefault": True,
        "jsonData": {"dbName": database, "httpMode": "POST", "timeInterval": "10s"},
    }
    if token:  # InfluxDB 2.x through DBRP: InfluxQL with a token header
        ds["jsonData"]["httpHeaderName1"] = "Authorization"
        ds["secureJsonData"] = {"httpHeaderValue1": f"Token {token}"}
    return ds


def export(target: Path, *, influx_url: str = "${FIELDLINE_INFLUX_URL}",
           database: str = "${FIELDLINE_INFLUX_DB}") -> list[Path]:
    """Write Grafana provisioning files below ``target``; returns the written paths.

    The defaults use Grafana's environment-variable expansion, so one set of files serves every
    installation: set FIELDLINE_INFLUX_URL and FIELDLINE_INFLUX_DB in Grafana's environment.
    """
    ds_dir = target / "provisioning" / "datasources"
    db_dir = target / "provisioning" / "dashboards"
    dash_dir = target / "dashboards"
    for d in (ds_dir, db_dir, dash_dir):
        d.mkdir(parents=True, exist_ok=True)
    ds = datasource(influx_url, database)
    ds_yaml = _yaml_datasource(ds)
    provider = (
        "# Generated by `fieldline grafana export`. Loads every dashboard in the folder below.\n"
        "apiVersion: 1\nproviders:\n  - name: fieldline\n    folder: fieldline\n"
        "    type: file\n    disableDeletion: false\n    allowUiUpdates: true\n"
        "    options:\n      path: /var/lib/grafana/dashboards/fieldline\n"
    )
    paths = [ds_dir / "fieldline.yaml", db_dir / "fieldline.yaml", dash_dir / "fleet.json"]
    paths[0].write_text(ds_yaml)
    paths[1].write_text(provider)
    paths[2].write_text(json.dumps(dashboard(), indent=2, sort_keys=True) + "\n")
    return paths


def _yaml_datasource(ds: dict[str, Any]) -> str:
    jd = ds["jsonData"]
    return (
        "# Generated by `fieldline grafana export`. InfluxQL data source for InfluxDB 1.x\n"
        "# (for 2.x add a DBRP mapping and an Authorization header, see the README).\n"
        "apiVersion: 1\ndatasources:\n"
        f"  - name: {ds['name']}\n    uid: {ds['uid']}\n    type: influxdb\n"
        f"    access: proxy\n    url: {ds['url']}\n    isDefault: true\n"
        f"    jsonData:\n      dbName: {jd['dbName']}\n      httpMode: POST\n"
        f"      timeInterval: {jd['timeInterval']}\n"
    )


def push(grafana_url: str, *, credential: str | tuple[str, str] | None, influx_url: str,
         database: str, influx_token: str | None = None) -> dict[str, Any]:
    """Create or update the data source and the dashboard in a running Grafana."""
    from grafana_client.api import GrafanaApi
    from grafana_client.client import GrafanaClientError

    api = GrafanaApi.from_url(grafana_url, credential=credential)
    ds = datasource(influx_url, database, token=influx_token)
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, ds)
        ds_action = "updated"
    except GrafanaClientError as exc:
        if getattr(exc, "status_code", None) != 404:
            raise
        api.datasource.create_datasource(ds)
        ds_action = "created"
    result = api.dashboard.update_dashboard({"dashboard": dashboard(), "overwrite": True,
                                             "message": "fieldline grafana push"})
    return {"datasource": ds_action, "dashboard": result}
