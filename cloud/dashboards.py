"""Grafana provisioning from the one panel definition (``cloud.panels``), with Grafana's own
dashboards-as-code SDK (grafana-foundation-sdk): an InfluxDB data source, the fleet dashboard
and the alert rules.

Every query is InfluxQL, so the same dashboard works on InfluxDB 1.x, on 2.x through a DBRP
mapping and on 3.x. ``export`` writes the provisioning files (``deploy/grafana`` holds the
committed copy; a test checks it is current); ``push`` sends all of it to a running Grafana
through ``grafana-client``.

The SDK has no InfluxDB query type; ``InfluxQL`` below is one (a cog Dataquery). It has no field
for an InfluxDB annotation's query either: ``dashboard()`` adds it to the encoded annotation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import alerting, common, expr, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import alerting as am
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm

from cloud.panels import (
    ALERT_RULES,
    ANNOTATION_QUERY,
    SECTIONS,
    VARIABLES,
    AlertRule,
    Panel,
    Query,
    panel_queries,
)

__all__ = ["DASHBOARD_UID", "DATASOURCE_UID", "alert_group", "dashboard", "export",
           "panel_queries", "push"]

DATASOURCE_UID = "fieldline-influxdb"
DASHBOARD_UID = "fieldline-fleet"
FOLDER_UID = "fieldline"
FOLDER_TITLE = "fieldline"
ALERT_GROUP = "fieldline"
DS = dm.DataSourceRef(type_val="influxdb", uid=DATASOURCE_UID)


class InfluxQLQuery(cogvariants.Dataquery):
    """A raw InfluxQL target of Grafana's InfluxDB data source."""

    def __init__(self, q: Query) -> None:
        self.q = q

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "refId": self.q.ref, "datasource": {"type": "influxdb", "uid": DATASOURCE_UID},
            "query": self.q.text, "rawQuery": True, "resultFormat": self.q.fmt}
        if self.q.alias:
            out["alias"] = self.q.alias
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(self, q: Query) -> None:
        self._internal = InfluxQLQuery(q)

    def build(self) -> InfluxQLQuery:
        return self._internal


_COLORS = {"orange": "orange", "red": "red"}


def _thresholds(p: Panel) -> gd.ThresholdsConfig:
    steps = [dm.Threshold(value=None, color="green")]
    steps += [dm.Threshold(value=t.value, color=_COLORS[t.color]) for t in p.thresholds]
    return gd.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)


def _panel(p: Panel, pid: int) -> cogbuilder.Builder[dm.Panel]:
    b: Any
    if p.kind in ("timeseries", "band"):
        b = (timeseries.Panel().legend(common.VizLegendOptions().show_legend(True)
                                       .display_mode(cm.LegendDisplayMode.LIST)
                                       .placement(cm.LegendPlacement.BOTTOM))
             .span_nulls(True))
        if p.thresholds:
            b = b.thresholds_style(common.GraphThresholdsStyleConfig()
                                   .mode(cm.GraphThresholdsStyleMode.LINE))
    elif p.kind == "table":
        b = table.Panel()
    elif p.kind == "stat":
        b = stat.Panel()
    else:
        raise ValueError(f"panel {p.key}: unknown kind {p.kind!r}")
    b = (b.id(pid).title(p.title).description(p.description).datasource(DS)
         .span(p.width).height(p.height).thresholds(_thresholds(p)))
    if p.unit:
        b = b.unit(p.unit)
    if p.no_value:  # (a table or stat with no series shows it in place of "No data")
        b = b.no_value(p.no_value)
    if p.range_s:
        b = b.time_from(f"{p.range_s // 86_400}d" if p.range_s % 86_400 == 0
                        else f"{p.range_s}s")
    queries = p.queries
    if p.kind == "band":
        # one panel per metric (repeated over $metric): the band between the window's min and
        # max, the mean over it, p95 dashed; count and revision only in the tooltip's table
        b = b.repeat("metric").max_per_row(1)
        queries = tuple(Query(q.ref, q.text, "$col", q.fmt) for q in queries)
        b = (b.override_by_name("max", [dm.DynamicConfigValue("custom.fillBelowTo", "min"),
                                        dm.DynamicConfigValue("custom.lineWidth", 0),
                                        dm.DynamicConfigValue("custom.fillOpacity", 25)])
             .override_by_name("min", [dm.DynamicConfigValue("custom.lineWidth", 0)])
             .override_by_name("p95", [dm.DynamicConfigValue(
                 "custom.lineStyle", {"fill": "dash", "dash": [6, 4]})])
             .override_by_regexp("^(count|rev)$", [dm.DynamicConfigValue(
                 "custom.hideFrom", {"viz": True, "legend": True, "tooltip": False})]))
    for q in queries:
        b = b.with_target(InfluxQL(q))
    return b  # type: ignore[no-any-return]


FLEET_SIZED = ("device",)  # variables with a value per device: never "All" by default


def _variable(name: str, query: str) -> gd.QueryVariable:
    """A multi-value variable; "All" for all but ``device``: the device panels (raw windows of
    each selected device) over every device of a large fleet would bring Grafana down (an hour
    of 10,000 devices is 12 million windows), so Grafana starts on the first device instead."""
    b = (gd.QueryVariable(name).label(name.capitalize()).datasource(DS).query(query)
         .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).multi(True)
         .sort(dm.VariableSort.ALPHABETICAL_ASC))
    if name in FLEET_SIZED:
        return b.include_all(False)
    return (b.include_all(True).all_value(".*")
            .current(dm.VariableOption(selected=True, text=["All"], value=["$__all"])))



def _encode(b: cogbuilder.Builder[Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    return out


def dashboard() -> dict[str, Any]:
    """The fleet dashboard: one row per section of ``cloud.panels``."""
    b = (gd.Dashboard("fieldline fleet").uid(DASHBOARD_UID).tags(["fieldline", "iot"])
         .timezone("browser").editable().refresh("10s").time("now-1h", "now")
         .annotation(gd.AnnotationQuery().name("Anomalies").datasource(DS).enable(True)
                     .icon_color("red")))
    for name, q in VARIABLES:
        b = b.with_variable(_variable(name, q))
    pid = 1
    for section in SECTIONS:
        b = b.with_row(gd.Row(section.title).id(pid))
        pid += 1
        for p in section.panels:
            b = b.with_panel(_panel(p, pid))
            pid += 1
    out = _encode(b)
    # the SDK's annotation model has no InfluxDB query: the data source's own fields
    anno = out["annotations"]["list"][0]
    anno.update({"query": ANNOTATION_QUERY, "textColumn": "message",
                 "tagsColumn": "device,metric",
                 "target": {"query": ANNOTATION_QUERY, "rawQuery": True, "refId": "Anno"}})
    out["version"] = 1
    return out


def _rule(r: AlertRule) -> alerting.Rule:
    a = (alerting.Query("A").datasource_uid(DATASOURCE_UID)
         .relative_time_range(am.RelativeTimeRange(from_val=r.range_s, to=0))
         .model(InfluxQL(Query("A", r.query))))
    b = (alerting.Query("B").datasource_uid("__expr__")
         .model(expr.TypeReduce().ref_id("B").expression("A").reducer(r.reducer)))
    c = (alerting.Query("C").datasource_uid("__expr__")
         .model(expr.TypeThreshold().ref_id("C").expression("B").conditions([
             expr.ExprTypeThresholdConditions().evaluator(
                 expr.ExprTypeThresholdConditionsEvaluator().type(r.op).params([r.threshold]))
         ])))
    return (alerting.Rule(r.title).uid(r.uid).condition("C").queries([a, b, c])
            .for_val(r.for_).no_data_state("OK").exec_err_state("Error")
            .labels({"severity": r.severity, "team": "fieldline"})
            .annotations({"summary": r.summary, "__dashboardUid__": DASHBOARD_UID})
            .folder_uid(FOLDER_UID).rule_group(ALERT_GROUP).org_id(1))


def alert_group() -> dict[str, Any]:
    """The alert rules as one group, as Grafana's provisioning API takes it."""
    g = (alerting.RuleGroup(ALERT_GROUP).folder_uid(FOLDER_UID).interval(60)
         .rules([_rule(r) for r in ALERT_RULES]))
    return _encode(g)


def alert_provisioning() -> dict[str, Any]:
    """The same group in Grafana's file-provisioning format."""
    g = alert_group()
    keep = ("uid", "title", "condition", "data", "noDataState", "execErrState", "for",
            "annotations", "labels", "isPaused")
    rules = [{k: r[k] for k in keep if k in r} for r in g["rules"]]
    return {"apiVersion": 1, "groups": [{"orgId": 1, "name": ALERT_GROUP,
                                         "folder": FOLDER_TITLE, "interval": "1m",
                                         "rules": rules}]}


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
    al_dir = target / "provisioning" / "alerting"
    dash_dir = target / "dashboards"
    for d in (ds_dir, db_dir, al_dir, dash_dir):
        d.mkdir(parents=True, exist_ok=True)
    ds = datasource(influx_url, database)
    provider = (
        "# Generated by `fieldline grafana export`. Loads every dashboard in the folder below.\n"
        "apiVersion: 1\nproviders:\n  - name: fieldline\n    folder: fieldline\n"
        "    type: file\n    disableDeletion: false\n    allowUiUpdates: true\n"
        "    options:\n      path: /var/lib/grafana/dashboards/fieldline\n"
    )
    paths = [ds_dir / "fieldline.yaml", db_dir / "fieldline.yaml", al_dir / "fieldline.json",
             dash_dir / "fleet.json"]
    paths[0].write_text(_yaml_datasource(ds))
    paths[1].write_text(provider)
    paths[2].write_text(json.dumps(alert_provisioning(), indent=2, sort_keys=True) + "\n")
    paths[3].write_text(json.dumps(dashboard(), indent=2, sort_keys=True) + "\n")
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
    """Create or update the data source, the folder, the dashboard and the alert rules in a
    running Grafana."""
    from grafana_client.api import GrafanaApi
    from grafana_client.client import GrafanaClientError

    def missing(exc: GrafanaClientError) -> bool:
        return getattr(exc, "status_code", None) == 404

    api = GrafanaApi.from_url(grafana_url, credential=credential)
    ds = datasource(influx_url, database, token=influx_token)
    try:
        api.datasource.get_datasource_by_uid(DATASOURCE_UID)
        api.datasource.update_datasource_by_uid(DATASOURCE_UID, ds)
        ds_action = "updated"
    except GrafanaClientError as exc:
        if not missing(exc):
            raise
        api.datasource.create_datasource(ds)
        ds_action = "created"
    try:
        api.folder.get_folder(FOLDER_UID)
    except GrafanaClientError as exc:
        if not missing(exc):
            raise
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
    result = api.dashboard.update_dashboard({"dashboard": dashboard(), "overwrite": True,
                                             "folderUid": FOLDER_UID,
                                             "message": "fieldline grafana push"})
    rules = api.alertingprovisioning.update_rule_group(FOLDER_UID, ALERT_GROUP, alert_group())
    return {"datasource": ds_action, "dashboard": result, "alert_rules": rules}
