"""Gateway agent configuration (TOML), checked at start-up with every error naming its key.

See ``deploy/gateway.toml`` for a commented example.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from devices.catalog import Catalog
from devices.errors import ConfigError
from devices.mqtt import BrokerAddress, parse_broker_url
from devices.registry import Registry
from devices.settings import HEALTH_WHY, MAX_HEALTH_INTERVAL_MS, Section, load_toml
from edge.engine import CLOCK_POLICIES, EngineConfig
from edge.eventtime import EventTimeSpec
from edge.windows import EPOCH_BASE_MS, MAX_OPEN_WINDOWS, WindowSpec

UNTIMED = ("receive_time", "reject")  # [clock] untimed: what a reading without a time gets


@dataclass(frozen=True, kw_only=True)
class EdgeConfig:
    gateway: str
    intake_broker: BrokerAddress
    uplink_broker: BrokerAddress
    engine: EngineConfig = field(default_factory=EngineConfig)
    topics: list[str] = field(default_factory=lambda: ["devices/+/readings"])
    device_topic_level: int | None = 1
    metric_topic_level: int | None = None  # the topic level naming the metric of a bare number
    device_identity: str = "topic"  # topic: a payload may not name another device than its topic
    # a reading without a time of its own: "receive_time" (stamped when the gateway received
    # it, counted as readings_untimed) or "reject" (missing_field)
    untimed: str = "receive_time"
    intake_qos: int = 1
    durable: bool = True  # intake log + acknowledging device messages only once logged
    checkpoint_interval_ms: int = 30_000
    max_pending: int = 10_000
    max_payload_bytes: int = 256 * 1024
    max_future_ms: int = 5 * 60_000
    max_past_ms: int = 7 * 86_400_000
    clock_floor_ms: int = EPOCH_BASE_MS  # a gateway clock before this is not yet set
    quarantine_max_bytes: int = 64 * 2**20  # messages held while the gateway clock is wrong
    registry_path: Path | None = None
    unknown_devices: str = "reject"  # with a registry: reject or accept readings of unknown ids
    max_devices: int = 20_000  # device ids the agent takes at most (new ones beyond: refused)
    new_devices_per_s: float = 50.0  # new device ids a second once the burst is spent
    new_devices_burst: int = 10_000  # new device ids at once (a whole fleet starting up)
    state_dir: Path | None = None
    tick_ms: int = 200
    max_batch_messages: int = 50_000
    health_interval_ms: int = 5_000
    ledger_interval_ms: int = 60_000
    max_results_per_batch: int = 2_000
    max_inflight_batches: int = 16
    ack_timeout_ms: int = 30_000
    # result batches compressed (zlib) once the cloud's acks say it reads them, or never
    uplink_compression: str = "zlib"
    outbox_max_bytes: int = 256 * 2**20
    outbox_max_age_ms: int = 7 * 86_400_000
    outbox_policy: str = "drop_oldest"
    outbox_fsync: bool = True
    flush_on_stop: bool = False
    compact_malloc: bool = True  # edge.memory: pin glibc's malloc thresholds (lower RSS)
    forward_late: bool = False  # publish readings dropped as late, raw, on fieldline/v1/<gw>/late
    catalog: Catalog = field(default_factory=Catalog)

    def __post_init__(self) -> None:
        if not self.gateway or any(c in self.gateway for c in "/+# "):
            raise ConfigError("gateway.id", f"must be non-empty without / + # or spaces: "
                                            f"{self.gateway!r}")
        if self.device_identity not in ("topic", "payload"):
            raise ConfigError("intake.device_identity", "must be topic or payload")
        if self.unknown_devices not in ("reject", "accept"):
            raise ConfigError("gateway.unknown_devices", "must be reject or accept")
        if self.untimed not in UNTIMED:
            raise ConfigError("clock.untimed", f"must be one of {', '.join(UNTIMED)}")

    def stamps_receive_time(self) -> bool:
        """Some readings may take the receive time for their event time (all of them under the
        clock policy, those without a time under ``untimed``)."""
        return self.engine.clock_policy == "receive_time" or self.untimed == "receive_time"

    def load_registry(self) -> Registry | None:
        if self.registry_path is None:
            return None
        reg = Registry.load(self.registry_path, "gateway.registry")
        reg.check_kinds(self.catalog, source=str(self.registry_path))
        return reg


def _engine_config(w: Section, clock: Section, dedup: Section) -> EngineConfig:
    if w.has("size") and w.has("specs"):
        raise ConfigError(w.key("specs"), "give either size (one tumbling window) or specs",
                          source=w.source)
    if w.has("specs"):
        texts = w.str_list("specs")
    else:
        texts = [str(w.duration_ms("size", 10_000, minimum=100)) + "ms"]
    specs = []
    for i, text in enumerate(texts):
        try:
            specs.append(WindowSpec.parse(text))
        except ValueError as exc:
            raise ConfigError(w.key(f"specs[{i}]"), str(exc), source=w.source) from None
    try:
        time = EventTimeSpec(
            out_of_orderness_ms=w.duration_ms("out_of_orderness", 2_000),
            allowed_lateness_ms=w.duration_ms("allowed_lateness", 30_000),
            idle_timeout_ms=w.duration_ms("idle_timeout", 30_000, minimum=1),
        )
    except ValueError as exc:
        raise ConfigError(w.key("allowed_lateness"), str(exc), source=w.source) from None
    for spec in specs:
        cells = spec.ring_cells(time.out_of_orderness_ms, time.allowed_lateness_ms)
        if cells > MAX_OPEN_WINDOWS:
            key = "allowed_lateness" if time.allowed_lateness_ms >= time.out_of_orderness_ms \
                else "out_of_orderness"
            raise ConfigError(w.key(key), f"keeps {cells:,} windows {spec.label} of every series "
                              f"open at once (at most {MAX_OPEN_WINDOWS:,}): shorten "
                              "allowed_lateness or out_of_orderness, or use longer windows",
                              source=w.source)
    pct = w.raw("percentiles", [0.5, 0.9, 0.95, 0.99])
    if not isinstance(pct, list) or not all(type(q) in (int, float) and 0 <= q <= 1
                                            for q in pct) or len(set(pct)) != len(pct):
        raise ConfigError(w.key("percentiles"), "must be a list of distinct fractions in [0, 1], "
                          "e.g. [0.5, 0.99]", source=w.source)
    try:
        cfg = EngineConfig(
            windows=tuple(specs), time=time, percentiles=tuple(float(q) for q in pct),
            sketch_alpha=w.number("sketch_accuracy", 0.01, minimum=0.0001, maximum=0.2),
            clock_policy=clock.choice("policy", CLOCK_POLICIES, "trust"),
            skew_tolerance_ms=clock.duration_ms("skew_tolerance", 2_000),
            skew_period_ms=clock.duration_ms("skew_period", 60_000, minimum=1_000),
            dedup=dedup.flag("enabled", True),
            dedup_memory=dedup.integer("memory", 32, minimum=1, maximum=65_536),
        )
    except ValueError as exc:
        raise ConfigError(w.key("specs"), str(exc), source=w.source) from None
    return cfg


def _check_topics(topics: list[str], level: int, intake: Section,
                  key: str = "device_topic_level") -> None:
    """MQTT topic filters the broker will take ('+' and '#' alone in their level, '#' last), and
    a device (or metric: ``key``) level every filter has (unless a '#' may reach it)."""
    if not topics:
        raise ConfigError(intake.key("topics"), "at least one topic filter is needed",
                          source=intake.source)
    for t in topics:
        levels = t.split("/")
        bad = [lv for lv in levels if lv not in ("+", "#") and ("+" in lv or "#" in lv)]
        if bad or "#" in levels[:-1]:
            raise ConfigError(intake.key("topics"), f"not an MQTT topic filter: {t!r} ('+' and "
                              "'#' stand alone in a level, '#' only last)", source=intake.source)
        if level >= len(levels) and levels[-1] != "#":
            raise ConfigError(intake.key(key), f"topic {t!r} has no level "
                              f"{level} (levels count from 0)", source=intake.source)


def _instant_ms(sec: Section, name: str, default: int) -> int:
    """A point in time: a TOML date or date-time (UTC unless it says otherwise)."""
    v = sec.raw(name, None)
    if v is None:
        return default
    if isinstance(v, str):
        try:
            v = dt.datetime.fromisoformat(v)
        except ValueError:
            raise ConfigError(sec.key(name), f"must be a date like 2024-01-01, got {v!r}",
                              source=sec.source) from None
    if isinstance(v, dt.date) and not isinstance(v, dt.datetime):
        v = dt.datetime(v.year, v.month, v.day)
    if not isinstance(v, dt.datetime):
        raise ConfigError(sec.key(name), f"must be a date like 2024-01-01, got {v!r}",
                          source=sec.source)
    if v.tzinfo is None:
        v = v.replace(tzinfo=dt.UTC)
    return int(v.timestamp() * 1000)


def load_edge_config(path: str | Path) -> EdgeConfig:
    root = load_toml(path)
    return edge_config_from(root)


def edge_config_from(root: Section) -> EdgeConfig:
    gw = root.section("gateway", required=True)
    intake = root.section("intake", required=True)
    uplink = root.section("uplink", required=True)
    windows = root.section("windows")
    clock = root.section("clock")
    outbox = root.section("outbox")
    dedup = root.section("dedup")
    validate = root.section("validate")
    agent = root.section("agent")
    catalog = Catalog.from_mapping(root.raw("catalog", {}))

    state_dir = gw.text("state_dir", None)
    registry = gw.text("registry", None)
    level = intake.integer("device_topic_level", 1, minimum=-1)
    topics = intake.str_list("topics", ["devices/+/readings"])
    _check_topics(topics, level, intake)
    metric_level = intake.integer("metric_topic_level", -1, minimum=-1)
    if metric_level >= 0:
        _check_topics(topics, metric_level, intake, "metric_topic_level")
        if metric_level == level:
            raise ConfigError(intake.key("metric_topic_level"), f"level {level} already names "
                              "the device (intake.device_topic_level)", source=intake.source)
    if level < 0 and intake.has("device_identity") and intake.raw("device_identity") == "topic":
        raise ConfigError(intake.key("device_identity"), "topic needs intake.device_topic_level "
                          "(the level of the topic naming the device)", source=intake.source)
    cfg = EdgeConfig(
        gateway=gw.text("id"),
        state_dir=Path(state_dir) if state_dir else None,
        registry_path=Path(registry) if registry else None,
        unknown_devices=gw.choice("unknown_devices", ("reject", "accept"), "reject"),
        max_devices=gw.integer("max_devices", 20_000, minimum=1, maximum=1 << 20),
        new_devices_per_s=gw.number("new_devices_per_s", 50.0, minimum=0.0),
        new_devices_burst=gw.integer("new_devices_burst", 10_000, minimum=1),
        intake_broker=parse_broker_url(intake.text("broker"), intake.key("broker"),
                                       ca_file=intake.text("ca_file", None),
                                       cert_file=intake.text("cert_file", None),
                                       key_file=intake.text("key_file", None)),
        topics=topics,
        device_topic_level=None if level < 0 else level,
        metric_topic_level=None if metric_level < 0 else metric_level,
        device_identity=intake.choice("device_identity", ("topic", "payload"),
                                      "topic" if level >= 0 else "payload"),
        untimed=clock.choice("untimed", UNTIMED, "receive_time"),
        intake_qos=intake.integer("qos", 1, minimum=0, maximum=2),
        durable=intake.flag("durable", True),
        checkpoint_interval_ms=agent.duration_ms("checkpoint_interval", 30_000, minimum=100),
        max_pending=intake.integer("max_pending", 10_000, minimum=1),
        max_payload_bytes=intake.integer("max_payload_bytes", 256 * 1024, minimum=64),
        uplink_broker=parse_broker_url(uplink.text("broker"), uplink.key("broker"),
                                       ca_file=uplink.text("ca_file", None),
                                       cert_file=uplink.text("cert_file", None),
                                       key_file=uplink.text("key_file", None)),
        max_results_per_batch=uplink.integer("max_results_per_batch", 2_000, minimum=1),
        max_inflight_batches=uplink.integer("max_inflight", 16, minimum=1, maximum=10_000),
        ack_timeout_ms=uplink.duration_ms("ack_timeout", 30_000, minimum=100),
        uplink_compression=uplink.choice("compression", ("zlib", "none"), "zlib"),
        outbox_max_bytes=outbox.size("max_bytes", 256 * 2**20, minimum=64 * 1024),
        outbox_max_age_ms=outbox.duration_ms("max_age", 7 * 86_400_000, minimum=1_000),
        outbox_policy=outbox.choice("policy", ("drop_oldest", "refuse_newest"), "drop_oldest"),
        outbox_fsync=outbox.flag("fsync", True),
        engine=_engine_config(windows, clock, dedup),
        forward_late=windows.flag("forward_late", False),
        max_future_ms=validate.duration_ms("max_future", 5 * 60_000),
        max_past_ms=validate.duration_ms("max_past", 7 * 86_400_000),
        clock_floor_ms=_instant_ms(validate, "clock_floor", EPOCH_BASE_MS),
        quarantine_max_bytes=validate.size("quarantine_max", 64 * 2**20, minimum=64 * 1024),
        tick_ms=agent.duration_ms("tick", 200, minimum=10),
        max_batch_messages=agent.integer("max_batch_messages", 50_000, minimum=1),
        health_interval_ms=agent.duration_ms(
            "health_interval", 5_000, minimum=100, maximum=MAX_HEALTH_INTERVAL_MS,
            why=HEALTH_WHY),
        ledger_interval_ms=agent.duration_ms("ledger_interval", 60_000, minimum=100),
        flush_on_stop=agent.flag("flush_on_stop", False),
        compact_malloc=agent.flag("compact_malloc", True),
        catalog=catalog,
    )
    for s in (gw, intake, uplink, validate, agent, windows, clock, dedup, outbox):
        s.done()
    root.done()
    return cfg
