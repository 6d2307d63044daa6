"""Grafana provisioning: the committed files are current, and `push` talks Grafana's HTTP API.

No Grafana server can be installed here, so `push` is tested against a small fake that records
requests and answers like Grafana's API. That every panel query returns data from a real
InfluxDB is checked in test_end_to_end.py.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from cloud.dashboards import (
    ALERT_GROUP,
    DASHBOARD_UID,
    DATASOURCE_UID,
    FOLDER_UID,
    alert_group,
    alert_provisioning,
    dashboard,
    export,
    panel_queries,
    push,
)
from cloud.panels import ALERT_RULES, PANELS, SECTIONS, Params, render
from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.view.server import ViewConfig, meta

ROOT = Path(__file__).resolve().parent.parent


def test_committed_provisioning_files_are_current(tmp_path: Path) -> None:
    for p in export(tmp_path):
        rel = p.relative_to(tmp_path)
        committed = ROOT / "deploy" / "grafana" / rel
        assert committed.exists(), f"{rel} missing: run `make grafana`"
        assert committed.read_text() == p.read_text(), f"{rel} is stale: run `make grafana`"


def test_dashboard_has_variables_annotations_and_health_panels() -> None:
    d = dashboard()
    names = [v["name"] for v in d["templating"]["list"]]
    assert names == ["site", "gateway", "metric", "device", "window"]
    assert d["annotations"]["list"][0]["query"].startswith('SELECT "message"')
    titles = [p["title"] for p in d["panels"]]
    assert "Pipeline health" in titles
    assert any("lag" in t for t in titles)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for title, q in panel_queries():
        if not title.startswith("variable"):
            assert "$timeFilter" in q, title


def test_grafana_and_the_view_show_the_same_panels_from_one_definition() -> None:
    d = dashboard()
    grafana = {p["title"]: [t["query"] for t in p["targets"]]
               for p in d["panels"] if p["type"] != "row"}
    defined = {p.title: [q.text for q in p.queries] for p in PANELS.values()}
    assert grafana == defined
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == [s.title for s in SECTIONS]
    view = {p["key"] for s in meta(ViewConfig(), "db")["sections"] for p in s["panels"]}
    assert view == set(PANELS)
    units = {p["title"]: p["fieldConfig"]["defaults"].get("unit", "") for p in d["panels"]
             if p["type"] != "row"}
    assert units == {p.title: p.unit for p in PANELS.values()}
    # a panel whose query returns no series when all is well says so, not Grafana's "No data"
    # (what its table panel shows then is the field config's noValue)
    no_value = {p["title"]: p["fieldConfig"]["defaults"]["noValue"] for p in d["panels"]
                if "noValue" in p.get("fieldConfig", {}).get("defaults", {})}
    assert no_value == {PANELS["alerts_open"].title: "None open"}
    lag = next(p for p in d["panels"] if p.get("title", "").startswith("End-to-end lag"))
    steps = lag["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 30_000, 60_000]


def test_alert_rules_cover_the_fleet_and_evaluate_their_own_query() -> None:
    g = alert_group()
    assert g["folderUid"] == FOLDER_UID
    titles = " ".join(r["title"].lower() for r in g["rules"])
    for topic in ("anomaly rate", "ledger", "lag", "silent", "outbox"):
        assert topic in titles, topic
    uids = [r["uid"] for r in g["rules"]]
    assert len(uids) == len(set(uids)) == len(ALERT_RULES)
    for rule, spec in zip(g["rules"], ALERT_RULES, strict=True):
        a, b, c = rule["data"]
        assert rule["condition"] == "C"
        assert a["datasourceUid"] == DATASOURCE_UID
        assert a["model"]["query"] == spec.query
        assert a["model"]["rawQuery"] is True
        assert "$timeFilter" in spec.query
        assert a["relativeTimeRange"] == {"from": spec.range_s, "to": 0}
        assert b["model"] == {"expression": "A", "reducer": spec.reducer, "refId": "B",
                              "type": "reduce"}
        cond = c["model"]["conditions"][0]["evaluator"]
        assert cond == {"params": [spec.threshold], "type": spec.op}
        assert rule["for"] == spec.for_
        assert rule["labels"]["severity"] in ("warning", "critical")
    prov = alert_provisioning()
    assert prov["apiVersion"] == 1
    grp = prov["groups"][0]
    assert grp["name"] == ALERT_GROUP
    assert [r["uid"] for r in grp["rules"]] == uids
    assert all("folderUID" not in r for r in grp["rules"])


class FakeGrafana(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[tuple[str, str, object]]] = []
    datasources: ClassVar[dict[str, dict[str, object]]] = {}

    def _reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> object:
        n = int(self.headers.get("Content-Length", 0))
        return json.loads(self.rfile.read(n)) if n else None

    folders: ClassVar[dict[str, object]] = {}

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path, None))
        if self.path == f"/api/folders/{FOLDER_UID}":
            if FOLDER_UID in self.folders:
                self._reply(200, self.folders[FOLDER_UID])
            else:
                self._reply(404, {"message": "folder not found"})
        elif self.path == f"/api/datasources/uid/{DATASOURCE_UID}":
            ds = self.datasources.get(DATASOURCE_UID)
            if ds is None:
                self._reply(404, {"message": "Data source not found"})
            else:
                self._reply(200, ds)
        else:
            self._reply(404, {"message": "not found"})

    def do_POST(self) -> None:
        body = self._body()
        self.requests.append(("POST", self.path, body))
        assert isinstance(body, dict)
        if self.path == "/api/datasources":
            self.datasources[body["uid"]] = body
            self._reply(200, {"id": 1, "message": "Datasource added"})
        elif self.path == "/api/dashboards/db":
            self._reply(200, {"status": "success", "uid": body["dashboard"]["uid"]})
        elif self.path == "/api/folders":
            self.folders[body["uid"]] = body
            self._reply(200, {"uid": body["uid"], "title": body["title"]})
        else:
            self._reply(404, {"message": "not found"})

    def do_PUT(self) -> None:
        body = self._body()
        self.requests.append(("PUT", self.path, body))
        if self.path.startswith("/api/v1/provisioning/"):
            self._reply(200, body)
        else:
            self._reply(200, {"message": "Datasource updated"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_grafana() -> Iterator[str]:
    FakeGrafana.requests = []
    FakeGrafana.datasources = {}
    FakeGrafana.folders = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_push_creates_then_updates_datasource_dashboard_and_alert_rules(fake_grafana: str) -> None:
    r1 = push(fake_grafana, credential="token-123", influx_url="http://influx:8086",
              database="fieldline")
    assert r1["datasource"] == "created"
    posted = [b for m, p, b in FakeGrafana.requests if m == "POST" and p == "/api/datasources"]
    assert posted[0]["url"] == "http://influx:8086"  # type: ignore[index]
    assert posted[0]["jsonData"]["dbName"] == "fieldline"  # type: ignore[index]
    dash = [b for m, p, b in FakeGrafana.requests if p == "/api/dashboards/db"]
    assert dash[0]["dashboard"]["uid"] == DASHBOARD_UID  # type: ignore[index]
    assert dash[0]["overwrite"] is True  # type: ignore[index]
    r2 = push(fake_grafana, credential="token-123", influx_url="http://influx:8086",
              database="fieldline", influx_token="secret")
    assert r2["datasource"] == "updated"
    put = [b for m, p, b in FakeGrafana.requests if m == "PUT" and "/datasources/" in p]
    assert put[0]["secureJsonData"]["httpHeaderValue1"] == "Token secret"  # type: ignore[index]
    folders = [b for m, p, b in FakeGrafana.requests if m == "POST" and p == "/api/folders"]
    assert len(folders) == 1  # created once, found the second time
    assert dash[0]["folderUid"] == FOLDER_UID  # type: ignore[index]
    groups = [b for m, p, b in FakeGrafana.requests if m == "PUT" and
              p == f"/api/v1/provisioning/folder/{FOLDER_UID}/rule-groups/{ALERT_GROUP}"]
    assert len(groups) == 2
    assert [r["uid"] for r in groups[0]["rules"]] == [r.uid for r in ALERT_RULES]  # type: ignore[index]
    assert r2["alert_rules"]["rules"]


@pytest.mark.integration
def test_the_dashboard_as_provisioned_reads_one_device_not_the_whole_fleet(
        influx_db: InfluxV1Client) -> None:
    """Opened as provisioned, with its variables as Grafana starts them (``All``, or the
    first value where "All" is not offered), against a real InfluxDB holding 300 devices: the
    device panels read one device's series, not 300 (at 10,000 devices an hour of them is 12
    million windows, more than Grafana can draw); the fleet tables read one row per device; the
    site means read the rollups, one series per site and metric."""
    now = int(time.time() * 1000) // 10_000 * 10_000
    lines = []
    for k in range(30):
        t = now - 10_000 * (k + 1)
        for i in range(300):
            for m in ("t", "h"):
                lines.append(f"aggregates,gateway=g{i % 3},site=s{i % 3},device=d{i:03d},"
                             f"metric={m},window=10s,unit=x count=10i,sum=200,mean=20,min=19,"
                             f"max=21,p50=20,p95=21,p99=21 {t}")
        for g in range(3):
            for m in ("t", "h"):
                lines.append(f"sites,gateway=g{g},site=s{g},metric={m},window=10s devices=100i,"
                             f"readings=1000i,sum=20000,min=19,max=21 {t}")
    lines += [f"ledger,gateway=g{i % 3},device=d{i:03d} received=300i,accepted=300i {now}"
              for i in range(300)]
    influx_db.write_lines(lines)
    d = dashboard()
    start: dict[str, str] = {}
    for v in d["templating"]["list"]:
        if v["includeAll"]:
            assert v["current"]["value"] == ["$__all"], v["name"]
            continue
        assert "current" not in v, v["name"]  # Grafana selects the first value
        doc = influx_db.query(render(v["query"], Params(range_s=3600, values=start)))
        assert isinstance(doc, dict)
        start[v["name"]] = sorted(r[1] for r in doc["results"][0]["series"][0]["values"])[0]
    assert start == {"device": "d000"}

    def devices_read(key: str) -> set[str]:
        doc = influx_db.query(render(PANELS[key].queries[0].text,
                                     Params(range_s=3600, values=start)))
        assert isinstance(doc, dict)
        assert "error" not in doc["results"][0], (key, doc)
        series = doc["results"][0].get("series", [])
        out = {s.get("tags", {}).get("device", "") for s in series}
        for s in series:  # raw selects name the device in a column
            cols = s["columns"]
            if "device" in cols:
                out |= {r[cols.index("device")] for r in s["values"]}
        return out - {""}

    for key, p in PANELS.items():
        if "$device" in p.queries[0].text:
            assert devices_read(key) <= {"d000"}, key
    doc = influx_db.query(render(PANELS["device_metric"].queries[0].text,
                                 Params(range_s=3600, values=start)))
    assert isinstance(doc, dict)  # its windows: 30 of each metric, of one device
    assert sum(len(s["values"]) for s in doc["results"][0]["series"]) == 30 * 2
    assert devices_read("device_mean") == {"d000"}
    assert len(devices_read("fleet_devices")) == 300
    assert len(devices_read("ledger_devices")) == 300  # every device's ledger, as before
    doc = influx_db.query(render(PANELS["fleet_mean_by_site"].queries[0].text,
                                 Params(range_s=3600, values=start)))
    assert isinstance(doc, dict)
    assert len(doc["results"][0]["series"]) == 3 * 2
