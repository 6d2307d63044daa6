"""InfluxDB 1.x sink: the ``/write`` HTTP API with line protocol, precision ms.

Errors are classified at this boundary (RELIABILITY.md):

* 204: written. 413: the batch is split in halves and each half written.
* 400 ``partial write … dropped=N``: N points refused for good (bad type, retention policy), the
  rest kept: not retryable, counted.
* 404 (database missing, e.g. dropped under us): created again (with its retention), then retried.
* 429, 5xx, timeouts, refused connections: retryable.
"""

from __future__ import annotations

import base64
import http.client
import logging
import re
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from cloud.sinks.base import SinkError
from cloud.sinks.points import Points, encode

if TYPE_CHECKING:
    from cloud.config import InfluxConfig

log = logging.getLogger("fieldline.cloud.influx")

_DROPPED = re.compile(r"dropped=(\d+)")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|m|s|ms|us|µs|ns)")
_GO_UNIT_MS = {"h": 3_600_000.0, "m": 60_000.0, "s": 1_000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3,
               "ns": 1e-6}
HOUR_MS, DAY_MS = 3_600_000, 86_400_000


def go_duration_ms(text: str) -> int:
    """A Go duration as InfluxDB 1.x shows it (``168h0m0s``, ``0s``) in milliseconds."""
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return round(sum(float(n) * _GO_UNIT_MS[u] for n, u in parts))


def shard_duration_ms(retention_ms: int) -> int:
    """The shard group duration InfluxDB 1.x gives a retention policy of that duration: 1 h
    under 2 days, 1 day up to 6 months, 7 days beyond (its documented defaults)."""
    if retention_ms < 2 * DAY_MS:
        return HOUR_MS
    return DAY_MS if retention_ms <= 180 * DAY_MS else 7 * DAY_MS


def _influx_error(body: bytes) -> bool:
    """The body is InfluxDB's own JSON error (``{"error": "..."}``), not another server's."""
    return body.lstrip().startswith(b'{"error"')


def _ident(name: str) -> str:
    return name.replace("\\", "\\\\").replace('"', '\\"')


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


class InfluxV1Client:
    """A minimal, dependency-free client for the InfluxDB 1.x HTTP API."""

    def __init__(self, url: str, database: str, *, username: str | None = None,
                 password: str | None = None, token: str | None = None,
                 timeout_s: float = 10.0, retention_policy: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"InfluxDB URL must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.database = database
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 8086)
        self._timeout = timeout_s
        # credentials travel in the Authorization header, never in the URL (where proxies and
        # server logs would keep them)
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Token {token}"
        elif username:
            basic = base64.b64encode(f"{username}:{password or ''}".encode()).decode()
            self._headers["Authorization"] = f"Basic {basic}"
        self._rp = retention_policy
        # one connection per thread: the writer sends several batches at once (an
        # http.client connection carries one request at a time)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: set[http.client.HTTPConnection] = set()
        self.disk_full = 0  # writes InfluxDB refused for want of disk space
        self.recreated = 0  # times the database was missing (dropped under us) and created
        self.not_influx = 0  # writes answered as InfluxDB never answers (a wrong URL)

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._conns.add(conn)
        return conn

    def _drop_connection(self) -> None:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def request(self, method: str, path: str, params: dict[str, str],
                body: bytes | None = None) -> tuple[int, bytes]:
        status, data, _ = self._exchange(method, path, params, body)
        return status, data

    def _exchange(self, method: str, path: str, params: dict[str, str],
                  body: bytes | None = None) -> tuple[int, bytes, http.client.HTTPMessage]:
        q = urlencode(params)
        headers = dict(self._headers)
        if body is not None:
            headers["Content-Type"] = "text/plain; charset=utf-8"
        for attempt in (1, 2):
            reused = getattr(self._local, "conn", None) is not None
            try:
                conn = self._connection()
                conn.request(method, f"{path}?{q}", body=body, headers=headers)
                resp = conn.getresponse()
                return resp.status, resp.read(), resp.headers
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                # a kept-alive connection the server has since closed (a restart): one retry
                # on a fresh connection; anything else is the server being unreachable
                stale = reused and isinstance(exc, (http.client.RemoteDisconnected,
                                                    ConnectionResetError, BrokenPipeError))
                if attempt == 1 and stale:
                    continue
                raise SinkError(f"InfluxDB {self.url} unreachable: {exc!r}",
                                retryable=True) from exc
        raise AssertionError("unreachable")

    def query(self, q: str, *, epoch: str = "ms", database: str | None = None,
              read_only: bool = False) -> object:
        """Run InfluxQL; returns the decoded JSON body (raises SinkError on failure).
        ``read_only``: sent as GET, which InfluxDB answers only for SELECT and SHOW."""
        import orjson

        status, body = self.request("GET" if read_only else "POST", "/query",
                                    {"q": q, "db": database or self.database, "epoch": epoch})
        if status != 200:
            # InfluxDB's own refusals come as its JSON error; anything else is not InfluxDB
            # (a wrong URL, a proxy): worth trying again, never a reason to give points up
            raise SinkError(f"query failed ({status}): {body[:200]!r}",
                            retryable=status >= 500 or not _influx_error(body))
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:  # a 200 from something else (a proxy's page)
            raise SinkError(f"{self.url} answered a query with something that is not "
                            f"InfluxDB's JSON: {body[:120]!r}", retryable=True) from None
        for res in doc.get("results", []):
            if "error" in res:
                raise SinkError(f"query error: {res['error']}", retryable=False)
        return doc

    def create_database(self) -> None:
        name = self.database.replace('"', '\\"')
        self.query(f'CREATE DATABASE "{name}"', database="")

    def retention(self) -> tuple[str, int, int]:
        """The database's default retention policy: name, duration and shard group duration
        (ms; a duration of 0: kept forever)."""
        doc = self.query(f'SHOW RETENTION POLICIES ON "{_ident(self.database)}"', database="",
                         read_only=True)
        assert isinstance(doc, dict)  # (query raises on anything but InfluxDB's JSON)
        for res in doc.get("results", []):
            for series in res.get("series", []):
                cols = series["columns"]
                for row in series.get("values", []):
                    rp = dict(zip(cols, row, strict=True))
                    if rp.get("default"):
                        return (str(rp["name"]), go_duration_ms(str(rp["duration"])),
                                go_duration_ms(str(rp["shardGroupDuration"])))
        raise SinkError(f"database {self.database} has no default retention policy",
                        retryable=False)

    def set_retention(self, duration_ms: int) -> bool:
        """Make the database's default retention policy keep ``duration_ms`` (0: forever):
        InfluxDB then drops each shard group once all of it is older. Its shard groups are
        made shorter when they would be longer than that. True when something changed."""
        name, current, shard = self.retention()
        if current == duration_ms:
            return False
        if duration_ms and shard > duration_ms:
            shard = shard_duration_ms(duration_ms)
        keep = f"{duration_ms // 1000}s" if duration_ms else "INF"
        self.query(f'ALTER RETENTION POLICY "{_ident(name)}" ON "{_ident(self.database)}" '
                   f"DURATION {keep} SHARD DURATION {shard // 1000}s DEFAULT", database="")
        log.info("database %s keeps data %s (retention policy %s, shard groups of %d h)",
                 self.database, f"{duration_ms / DAY_MS:g} days" if duration_ms else "forever",
                 name, shard // HOUR_MS)
        return True

    def ping(self) -> bool:
        try:
            status, _ = self.request("GET", "/ping", {})
        except SinkError:
            return False
        return status == 204

    def server_version(self) -> str | None:
        """What the server at the URL says it is (InfluxDB's ``X-Influxdb-Version`` on
        ``/ping``, 1.x and 2.x alike): "" when it answers without saying (not InfluxDB), None
        when nothing answers (not started yet, perhaps), or only a server error does (5xx: a
        proxy in front of an InfluxDB that is down, or InfluxDB itself unwell; an outage, not
        a wrong URL)."""
        try:
            status, _, headers = self._exchange("GET", "/ping", {})
        except SinkError:
            return None
        version = headers.get("X-Influxdb-Version") or ""
        if not version and status >= 500:
            return None
        return version

    def write_lines(self, lines: list[str]) -> None:
        params = {"db": self.database, "precision": "ms"}
        if self._rp:
            params["rp"] = self._rp
        body = ("\n".join(lines)).encode()
        status, resp = self.request("POST", "/write", params, body)
        if status == 204:
            return
        text = resp.decode(errors="replace")[:500]
        if status == 413 and len(lines) > 1:
            mid = len(lines) // 2
            log.info("InfluxDB said 413 for %d points: splitting", len(lines))
            self.write_lines(lines[:mid])
            self.write_lines(lines[mid:])
            return
        if status == 404 and "database not found" in text:
            try:
                self.create_database()
            except SinkError as exc:  # e.g. a user without the right to: nothing is refused
                raise SinkError(f"database {self.database} is missing and could not be "
                                f"created ({exc}): create it, or grant the right",
                                retryable=True) from None
            self.recreated += 1
            raise SinkError(f"database {self.database} was missing, created", retryable=True)
        if status == 400 and _influx_error(resp):  # InfluxDB's, about points
            m = _DROPPED.search(text)
            rejected = int(m.group(1)) if m else len(lines)
            raise SinkError(f"InfluxDB refused points: {text}", retryable=False,
                            rejected=rejected)
        if status == 413:
            raise SinkError(f"single point too large: {text}", retryable=False, rejected=1)
        if status < 500 and status not in (401, 403, 429):
            # InfluxDB 1.x answers 204, or 400 (its JSON error) or 413 about points, or 404 for
            # a missing database: anything else is not InfluxDB's write endpoint (a wrong port
            # or path, a proxy).
            # Retried and never acknowledged: refusing the points for good (dead-letters) would
            # drop every result of a misconfigured worker
            self.not_influx += 1
            if self.not_influx == 1 or self.not_influx % 100 == 0:
                log.error("%s answered a write with %d (%r): not InfluxDB's write API (check "
                          "influxdb.url); nothing is acknowledged, retrying (%d such so far)",
                          self.url, status, text[:80], self.not_influx)
            raise SinkError(f"{self.url} is not InfluxDB's write API ({status}): {text[:120]}",
                            retryable=True)
        if "no space left" in text:  # its disk: InfluxDB 1.x keeps failing until restarted
            self.disk_full += 1
            if self.disk_full == 1 or self.disk_full % 100 == 0:
                log.error("InfluxDB at %s is out of disk space: nothing is acknowledged to the "
                          "gateways until it takes writes again (they keep their outboxes). "
                          "Free space, then restart influxd: 1.x does not reopen its WAL by "
                          "itself (%d failed writes so far)", self.url, self.disk_full)
        raise SinkError(f"InfluxDB write failed ({status}): {text}",
                        retryable=status == 429 or status >= 500 or status in (401, 403))

    def delete(self, points: list[tuple[str, dict[str, str], int]]) -> None:
        """InfluxQL DELETE by measurement, tags and exact time; many statements per request."""
        stmts = []
        for measurement, tags, ts in points:
            cond = " AND ".join(f'"{_ident(k)}" = \'{_quote(v)}\'' for k, v in sorted(tags.items())
                                if v)
            stmts.append(f'DELETE FROM "{_ident(measurement)}" WHERE {cond} AND '
                         f"time >= {ts}ms AND time <= {ts}ms")
        for i in range(0, len(stmts), 200):
            self.query("; ".join(stmts[i:i + 200]))

    def close(self) -> None:
        """Close every thread's connection (the next request opens a new one)."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()
        self._local = threading.local()


class InfluxV1Sink:
    """Writes to one InfluxDB 1.x database (created at start unless told not to)."""

    name = "influxdb1"

    def __init__(self, url: str, database: str, *, username: str | None = None,
                 password: str | None = None, token: str | None = None,
                 create_database: bool = True, retention_policy: str | None = None,
                 retention_ms: int = 0, timeout_s: float = 10.0) -> None:
        self.client = InfluxV1Client(url, database, username=username, password=password,
                                     token=token, retention_policy=retention_policy,
                                     timeout_s=timeout_s)
        self._create = create_database
        self._retention_ms = retention_ms  # 0: as InfluxDB keeps it
        self._created = False

    @classmethod
    def from_config(cls, ix: InfluxConfig) -> InfluxV1Sink:
        return cls(ix.url, ix.database, username=ix.username, password=ix.password,
                   token=ix.token, create_database=ix.create_database,
                   retention_ms=ix.retention_ms, timeout_s=ix.timeout_ms / 1000)

    def write(self, batch: list[Points]) -> None:
        if not self._created:
            self._prepare()
        recreated = self.client.recreated
        try:
            self.client.write_lines(encode(batch))
        finally:
            if self.client.recreated != recreated:  # dropped under us: its retention again
                self._created = False

    def _prepare(self) -> None:
        """Before the first write: the database created (unless told not to) and its default
        retention policy set to ``influxdb.retention`` (when given)."""
        if self._create:
            try:
                self.client.create_database()
            except SinkError as exc:
                if exc.retryable:
                    raise
                # (a user may write without the right to create: the write says if it is missing)
                log.warning("database %s not created (%s): writing to it as it is",
                            self.client.database, exc)
        if self._retention_ms:
            try:
                self.client.set_retention(self._retention_ms)
            except SinkError as exc:
                if exc.retryable:
                    raise
                # (a user without the right to: data is kept as InfluxDB keeps it, and said so)
                log.error("influxdb.retention: the retention of database %s could not be set "
                          "(%s); it keeps data as its retention policy says. Grant the worker's "
                          "user ALL on it, or set it by hand (ALTER RETENTION POLICY)",
                          self.client.database, exc)
        self._created = True

    def delete(self, points: list[tuple[str, dict[str, str], int]]) -> None:
        self.client.delete(points)

    def close(self) -> None:
        self.client.close()
