"""Cloud worker configuration (TOML); see ``deploy/cloud.toml`` for a commented example."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cloud.detect import DEFAULT_DETECTORS, DETECTORS, PRIMARY, PolicyConfig
from cloud.jetstream import JetStreamConfig, logins
from cloud.rules import Rule, parse_rules
from devices.catalog import Catalog
from devices.errors import ConfigError
from devices.mqtt import BrokerAddress, parse_broker_url
from devices.settings import HEALTH_WHY, MAX_HEALTH_INTERVAL_MS, Section, load_toml, window_label


def check_http_url(url: str, key: str) -> None:
    """An HTTP service's URL (InfluxDB, Grafana) is http(s)://host[:port][/path]; anything else
    fails at start-up naming ``key``."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(key, f"must be an http(s) URL, got {url!r}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"bad URL {url!r}: {exc}") from None
    if not parts.hostname or port == 0:
        raise ConfigError(key, f"needs a host and a port above 0, got {url!r}")


@dataclass(frozen=True, kw_only=True)
class InfluxConfig:
    version: int = 1
    url: str = "http://127.0.0.1:8086"
    database: str = "fieldline"  # 1.x
    username: str | None = None
    password: str | None = None
    token: str | None = None  # 1.x token auth, or 2.x API token
    org: str | None = None  # 2.x
    bucket: str | None = None  # 2.x
    create_database: bool = True
    retention_ms: int = 0  # 1.x: how long the database keeps data (0: as InfluxDB keeps it)
    batch_points: int = 5_000
    flush_interval_ms: int = 1_000
    timeout_ms: int = 10_000
    # batches in flight at once, split by series (a point's versions stay in order)
    write_concurrency: int = 2

    def __post_init__(self) -> None:
        if self.version not in (1, 2):
            raise ConfigError("influxdb.version", "must be 1 (1.x HTTP API) or 2 (2.x/3.x client)")
        if self.version == 2 and not (self.token and self.org and self.bucket):
            raise ConfigError("influxdb.token" if not self.token else
                              "influxdb.org" if not self.org else "influxdb.bucket",
                              "is required with version = 2")
        check_http_url(self.url, "influxdb.url")
        if self.version == 1 and (not self.database.strip() or
                                  any(c in self.database for c in '"\n\r\t')):
            raise ConfigError("influxdb.database", f"a database name, without quotes or line "
                              f"breaks, got {self.database!r}")
        if self.retention_ms and self.version == 2:
            raise ConfigError("influxdb.retention", "is for InfluxDB 1.x: a 2.x bucket keeps "
                              "data as long as its own retention says (influx bucket update "
                              "--retention); remove the key")
        if 0 < self.retention_ms < 3_600_000:
            raise ConfigError("influxdb.retention", "must be at least 1h (InfluxDB's shortest "
                              "retention), or 0 to keep data as InfluxDB keeps it")


@dataclass(frozen=True, kw_only=True)
class CloudConfig:
    worker_id: str
    broker: BrokerAddress
    influx: InfluxConfig
    registry_path: Path | None = None
    state_dir: Path | None = None  # dedup state that survives restarts
    partitions: int = 1
    detectors: list[str] = field(default_factory=lambda: list(DEFAULT_DETECTORS))
    detector_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    detect_windows: tuple[str, ...] = (PRIMARY,)  # window specs judged ("primary": the first)
    alerts: PolicyConfig = field(default_factory=PolicyConfig)
    relearn_after: int = 30  # windows a device incident keeps its state out of the baseline
    # a series without a window for this long (the worker's time) is forgotten; 0: never
    forget_after_ms: int = 30 * 86_400_000
    # an incident of a series silent this long while its gateway sends others resolves; 0: never
    resolve_silent_after_ms: int = 3_600_000
    rules: list[Rule] = field(default_factory=list)
    health_interval_ms: int = 5_000
    catalog: Catalog = field(default_factory=Catalog)
    jetstream: JetStreamConfig | None = None  # [engine] kind = "jetstream": many workers
    # a change smaller than this many steps of a series' resolution is no anomaly (0: off)
    resolution_steps: float = 3.0
    # [detect.min_change]: metric -> the smallest change (in its unit) worth an alert
    min_change: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # it names the worker's MQTT client ids and its NATS consumer: no topic wildcards
        if not self.worker_id or any(c in self.worker_id for c in "/+#. \t\n*>"):
            raise ConfigError("worker.id", "non-empty, without / + # . * > or spaces, got "
                              f"{self.worker_id!r}")


def load_cloud_config(path: str | Path) -> CloudConfig:
    return cloud_config_from(load_toml(path))


def cloud_config_from(root: Section) -> CloudConfig:
    w = root.section("worker")
    ingest = root.section("ingest", required=True)
    ix = root.section("influxdb")
    det = root.section("detect")
    catalog = Catalog.from_mapping(root.raw("catalog", {}))
    influx = InfluxConfig(
        version=ix.integer("version", 1),
        url=ix.text("url", "http://127.0.0.1:8086"),
        database=ix.text("database", "fieldline"),
        username=ix.text("username", None),
        password=ix.text("password", None),
        token=ix.text("token", None),
        org=ix.text("org", None),
        bucket=ix.text("bucket", None),
        create_database=ix.flag("create_database", True),
        retention_ms=ix.duration_ms("retention", 0),
        batch_points=ix.integer("batch_points", 5_000, minimum=1),
        flush_interval_ms=ix.duration_ms("flush_interval", 1_000, minimum=10),
        timeout_ms=ix.duration_ms("timeout", 10_000, minimum=100),
        write_concurrency=ix.integer("write_concurrency", 2, minimum=1, maximum=16),
    )
    names = det.str_list("detectors", list(DEFAULT_DETECTORS))
    if len(set(names)) != len(names):
        raise ConfigError(det.key("detectors"), f"a detector is named twice: {names}",
                          source=root.source)
    windows = tuple(w if w == PRIMARY else window_label(w, det.key("windows"), root.source)
                    for w in det.str_list("windows", [PRIMARY]))
    relearn_after = det.integer("relearn_after", 30, minimum=1)
    forget_after = det.duration_ms("forget_after", 30 * 86_400_000)
    if 0 < forget_after < 3_600_000:
        raise ConfigError(det.key("forget_after"), "must be 0 (never) or at least 1h: a series "
                          "silent for less may be a device between two readings",
                          source=root.source)
    resolve_silent = det.duration_ms("resolve_silent_after", 3_600_000)
    if 0 < resolve_silent < 600_000:
        raise ConfigError(det.key("resolve_silent_after"), "must be 0 (never) or at least 10m: "
                          "a series silent for less may be a device between two readings",
                          source=root.source)
    resolution_steps = det.number("resolution_steps", 3.0, minimum=0.0)
    if not windows:
        raise ConfigError(det.key("windows"), "name at least one window spec (or \"primary\")",
                          source=root.source)
    al = det.section("alerts")
    try:
        alerts = PolicyConfig(open_at=al.number("open_at", 1.0, minimum=0.0),
                              hold_at=al.number("hold_at", 0.5, minimum=0.0),
                              clear=al.integer("clear", 3, minimum=1),
                              suppress=al.integer("suppress", 100, minimum=0),
                              likelihood=al.number("likelihood", 3.0, minimum=0.0),
                              likelihood_memory=al.integer("likelihood_memory", 1000,
                                                           minimum=2))
    except ValueError as exc:
        raise ConfigError(al.key("hold_at"), str(exc), source=root.source) from None
    al.done()
    mc = det.section("min_change")
    min_change = {name: mc.number(name, 0.0, minimum=0.0) for name in mc.keys()}  # noqa: SIM118
    mc.done()
    options: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in DETECTORS:
            raise ConfigError(det.key("detectors"), f"unknown detector {name!r}; known: "
                              f"{', '.join(sorted(DETECTORS))}", source=root.source)
        opts = det.section(name)
        options[name] = {k: opts.raw(k) for k in opts.keys()}  # noqa: SIM118  # checked by build_detectors
    jetstream = _engine(root.section("engine"), root.source)
    registry = w.text("registry", None)
    state_dir = w.text("state_dir", None)
    cfg = CloudConfig(
        state_dir=Path(state_dir) if state_dir else None,
        worker_id=w.text("id", "cloud-1"),
        registry_path=Path(registry) if registry else None,
        broker=parse_broker_url(ingest.text("broker"), ingest.key("broker"),
                                ca_file=ingest.text("ca_file", None),
                                cert_file=ingest.text("cert_file", None),
                                key_file=ingest.text("key_file", None)),
        partitions=ingest.integer("partitions", 1, minimum=1, maximum=4096),
        influx=influx,
        detectors=names,
        detector_options=options,
        detect_windows=windows,
        alerts=alerts,
        relearn_after=relearn_after,
        forget_after_ms=forget_after,
        resolve_silent_after_ms=resolve_silent,
        rules=parse_rules(root.raw("rules", None), root.source),
        health_interval_ms=w.duration_ms(
            "health_interval", 5_000, minimum=100, maximum=MAX_HEALTH_INTERVAL_MS,
            why=HEALTH_WHY),
        catalog=catalog,
        jetstream=jetstream,
        min_change={name: v for name, v in min_change.items() if v > 0},
        resolution_steps=resolution_steps,
    )
    for s in (w, ingest, ix, det):
        s.done()
    root.done()
    return cfg


def parse_member(text: str, key: str = "engine.member") -> tuple[int, int]:
    """``k/N``: this worker is member k of N (it serves partitions p with p % N == k)."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(key, f"must be k/N, e.g. 0/3; got {text!r}") from None
    if not 0 <= k < n:
        raise ConfigError(key, f"needs 0 <= k < N; got {text!r}")
    return k, n


def _engine(e: Section, source: str | None) -> JetStreamConfig | None:
    kind = e.choice("kind", ("mqtt", "jetstream"), "mqtt")
    if kind == "mqtt":
        e.done()
        return None
    servers = e.str_list("servers")
    if not servers or not all(s.startswith(("nats://", "tls://")) for s in servers):
        raise ConfigError(e.key("servers"), "list the NATS servers as nats://host:port",
                          source=source)
    if len(logins(*servers)) > 1:
        # one login goes to every node, the ones the cluster announces too (cloud/jetstream.py)
        raise ConfigError(e.key("servers"), "the NATS servers take one login: "
                          "user:password@ given on any of them goes to all", source=source)
    files = {k: e.text(k, None) for k in ("ca_file", "cert_file", "key_file")}
    if any(files.values()) and not all(s.startswith("tls://") for s in servers):
        # TLS is spoken to the servers listed as tls:// (cloud/jetstream.py): say so in the URLs
        raise ConfigError(e.key("servers"), f"with engine.{next(k for k, v in files.items() if v)}"
                          " list the NATS servers as tls://host:port", source=source)
    member = e.text("member", None)
    # above the worst pause of a busy worker's event loop, or it loses its pins while working
    timeout = e.duration_ms("priority_timeout", 5_000, minimum=2_000)
    cfg = JetStreamConfig(
        servers=tuple(servers),
        stream=e.text("stream", "FIELDLINE"),
        partitions=e.integer("partitions", 16, minimum=1, maximum=1024),
        replicas=e.integer("replicas", 1, minimum=1, maximum=5),
        member=parse_member(member, e.key("member")) if member else None,
        priority_timeout_ms=timeout,
        ack_wait_ms=e.duration_ms("ack_wait", max(15_000, 3 * timeout), minimum=1_000),
        snapshot_interval_ms=e.duration_ms("snapshot_interval", 10_000, minimum=100),
        max_age_s=e.duration_ms("retention", 7 * 86_400_000, minimum=60_000) // 1000,
        max_bytes=e.size("retention_bytes", 0),
        **files,
    )
    if 0 < cfg.max_bytes < 1 << 20:
        raise ConfigError(e.key("retention_bytes"), "at least 1MiB (or 0: no cap)",
                          source=source)
    e.done()
    return cfg
