"""Grafana provisioning: the committed files are current, and `push` talks Grafana's HTTP API.

No Grafana server can be installed here, so `push` is tested against a small fake that records
requests and answers like Grafana's API. That every panel query returns data from a real
InfluxDB is checked in test_end_to_end.py.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from cloud.dashboards import DASHBOARD_UID, DATASOURCE_UID, dashboard, export, panel_queries, push

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
    assert names == ["site", "metric", "device", "window"]
    assert d["annotations"]["list"][0]["query"].startswith('SELECT "message"')
    titles = [p["title"] for p in d["panels"]]
    assert "Pipeline health" in titles
    assert any("lag" in t for t in titles)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for title, q in panel_queries():
        if not title.startswith("variable"):
            assert "$timeFilter" in q, title


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

    def do_GET(self) -> None:
        self.requests.append(("GET", self.path, None))
        if self.path == f"/api/datasources/uid/{DATASOURCE_UID}":
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
        else:
            self._reply(404, {"message": "not found"})

    def do_PUT(self) -> None:
        body = self._body()
        self.requests.append(("PUT", self.path, body))
        self._reply(200, {"message": "Datasource updated"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_grafana() -> Iterator[str]:
    FakeGrafana.requests = []
    FakeGrafana.datasources = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_push_creates_then_updates_datasource_and_dashboard(fake_grafana: str) -> None:
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
    put = [b for m, p, b in FakeGrafana.requests if m == "PUT"]
    assert put[0]["secureJsonData"]["httpHeaderValue1"] == "Token secret"  # type: ignore[index]
