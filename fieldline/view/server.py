"""The built-in web view's server: static files and an allow-listed, read-only query API.

The browser asks for a panel by its key (``/api/panel/<key>?range=1h&device=...``); the server
expands that panel's InfluxQL from ``cloud.panels`` with the validated parameters
(:func:`cloud.panels.render`) and runs it against InfluxDB with its own credentials, as a GET
(InfluxDB refuses anything but SELECT and SHOW that way). The browser never sends a query and
never sees where InfluxDB is or how to log in.

It is a standard-library threading HTTP server, bound to 127.0.0.1 unless told otherwise, so
``fieldline demo`` can run it in a thread beside the pipeline and ``fieldline view`` on its own.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson

from cloud.panels import (
    ALERT_RULES,
    LAWS,
    PANELS,
    RANGES_S,
    SECTIONS,
    VARIABLES,
    ParamError,
    Params,
    render,
)
from cloud.sinks.base import SinkError
from cloud.sinks.influx_v1 import InfluxV1Client

log = logging.getLogger("fieldline.view")

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml",
         ".txt": "text/plain; charset=utf-8"}
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self'; connect-src 'self'; frame-ancestors 'none'")
CACHE_S = 1.0  # several tabs, or a refresh racing a page switch, share one InfluxDB query
_VARIABLES = dict(VARIABLES)


def static_dir() -> Path:
    return Path(str(resources.files("fieldline.view") / "static"))


class ViewError(RuntimeError):
    pass


def static_files(root: Path | None = None) -> dict[str, Path]:
    """Every file the view serves, by URL path; the chart library must have been vendored."""
    root = root or static_dir()
    files = {"/" + p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
    from fieldline.view.vendor import FILES

    missing = [f for f in FILES if f"/vendor/{f}" not in files]
    if missing:
        raise ViewError(f"the chart library is not in the package ({', '.join(missing)} "
                        "missing): run `make setup` or `python -m fieldline.view.vendor`")
    return files


@dataclass(frozen=True)
class ViewConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    refresh_s: float = 5.0
    silent_after_s: float = 120.0  # a device without a window this long is shown silent
    title: str = "fieldline"


def meta(cfg: ViewConfig, database: str) -> dict[str, Any]:
    """What the page needs to lay itself out: panels without their queries, laws, settings."""
    return {
        "title": cfg.title, "database": database, "refresh_s": cfg.refresh_s,
        "silent_after_s": cfg.silent_after_s, "ranges": list(RANGES_S),
        "variables": [n for n, _ in VARIABLES],
        "sections": [{"title": s.title, "page": s.page, "panels": [
            {"key": p.key, "title": p.title, "kind": p.kind, "unit": p.unit,
             "description": p.description,
             "thresholds": [{"value": t.value, "color": t.color} for t in p.thresholds]}
            for p in s.panels]} for s in SECTIONS],
        "laws": [{"hop": law.hop, "total": law.total, "parts": list(law.parts)}
                 for law in LAWS],
        "alert_rules": [{"title": r.title, "threshold": r.threshold, "for": r.for_,
                         "severity": r.severity, "summary": r.summary} for r in ALERT_RULES],
    }


class ViewServer:
    def __init__(self, client: InfluxV1Client, cfg: ViewConfig | None = None) -> None:
        self.client = client
        self.cfg = cfg or ViewConfig()
        self.files = static_files()
        self.meta: bytes = orjson.dumps(meta(self.cfg, client.database))
        self._cache: dict[tuple[str, ...], tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        self.queries = 0
        self.errors = 0
        handler = type("Handler", (_Handler,), {"view": self})
        self.httpd = http.server.ThreadingHTTPServer((self.cfg.host, self.cfg.port), handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{name}]" if ":" in name else name
        return f"http://{shown}:{port}/"

    def start(self) -> ViewServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="fieldline-view",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # ---- the API ---------------------------------------------------------------------------

    def _cached(self, key: tuple[str, ...], run: Any) -> bytes:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < CACHE_S:
                return hit[1]
        body: bytes = run()
        with self._lock:
            if len(self._cache) > 512:
                self._cache.clear()
            self._cache[key] = (now, body)
        return body

    def _run(self, text: str) -> list[dict[str, Any]]:
        self.queries += 1
        doc = self.client.query(text, read_only=True)
        assert isinstance(doc, dict)
        return [s for r in doc.get("results", []) for s in r.get("series", [])]

    def panel(self, key: str, query: dict[str, str]) -> bytes:
        p = PANELS.get(key)
        if p is None:
            raise KeyError(key)
        params = Params.parse(query)
        if p.range_s:  # its own range, whatever the page's
            params = replace(params, range_s=p.range_s)
        cache_key = (key, *sorted(f"{k}={v}" for k, v in query.items()))

        def run() -> bytes:
            out = [{"ref": q.ref, "series": self._run(render(q.text, params))}
                   for q in p.queries]
            return orjson.dumps({"panel": key, "now": int(time.time() * 1000),
                                 "queries": out})

        return self._cached(cache_key, run)

    def variable(self, name: str, query: dict[str, str]) -> bytes:
        text = _VARIABLES.get(name)
        if text is None:
            raise KeyError(name)
        params = Params.parse(query)
        cache_key = ("var", name, *sorted(f"{k}={v}" for k, v in query.items()))

        def run() -> bytes:
            values = sorted({str(row[1]) for s in self._run(render(text, params))
                             for row in s.get("values", [])})
            return orjson.dumps({"variable": name, "values": values})

        return self._cached(cache_key, run)


class _Handler(http.server.BaseHTTPRequestHandler):
    view: ViewServer
    server_version = "fieldline-view"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, body: bytes, ctype: str, *, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=300" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, orjson.dumps(obj), "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        view = self.view
        try:
            if path in ("/", "/index.html"):
                self._send(200, view.files["/index.html"].read_bytes(), TYPES[".html"])
            elif path.startswith("/static/") and path[7:] in view.files:
                f = view.files[path[7:]]
                self._send(200, f.read_bytes(), TYPES.get(f.suffix, "application/octet-stream"),
                           cache="/vendor/" in path)
            elif path == "/api/meta":
                self._send(200, view.meta, "application/json")
            elif path.startswith("/api/panel/"):
                self._send(200, view.panel(path[11:], query), "application/json")
            elif path.startswith("/api/variable/"):
                self._send(200, view.variable(path[14:], query), "application/json")
            elif path == "/healthz":
                ok = view.client.ping()
                self._json(200 if ok else 503, {"influxdb": "up" if ok else "unreachable"})
            else:
                self._json(404, {"error": "not found"})
        except KeyError as exc:
            self._json(404, {"error": f"no such panel or variable: {exc.args[0]}"})
        except ParamError as exc:
            self._json(400, {"error": str(exc)})
        except SinkError as exc:
            view.errors += 1
            log.warning("view query failed: %s", exc)
            # the query's own error is useful; where InfluxDB is stays on the server
            said = str(exc) if not exc.retryable else "InfluxDB unreachable (see the log)"
            self._json(502, {"error": said})

    def _refuse(self) -> None:
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815 (http.server's names)
