"""Fleet simulation config (TOML); see ``deploy/fleet.toml`` for a commented example."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.errors import ConfigError
from devices.mqtt import BrokerAddress, parse_broker_url
from devices.settings import Section, load_toml, parse_duration_ms
from simulators.faults import FaultSpec
from simulators.fleet import FleetSpec

log = logging.getLogger("fieldline.simulators.config")


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    spec: FleetSpec
    brokers: dict[str, BrokerAddress]
    qos: int = 1
    truth_path: Path | None = None
    registry_path: Path | None = None
    backfill_ms: int = 0
    duration_ms: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _topic_template(f: Section, default: str) -> str:
    """A topic to publish to, with ``{device}`` and ``{gateway}`` filled in per device: no
    other placeholder, and none of MQTT's wildcards (a broker refuses those in a PUBLISH)."""
    text = str(f.text("topic", default))
    try:
        sample = text.format(device="d", gateway="g")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f.key("topic"), f"{text!r}: only {{device}} and {{gateway}} can be "
                          f"filled in ({type(exc).__name__}: {exc})", source=f.source) from None
    if not sample or "+" in sample or "#" in sample or "\0" in sample:
        raise ConfigError(f.key("topic"), f"{text!r} is no topic to publish to (no + or #)",
                          source=f.source)
    if "{device}" not in text:
        log.warning("%s = %r names no {device}: every device publishes to one topic (a gateway "
                    "then needs device_identity = \"payload\")", f.key("topic"), text)
    return text


def load_sim_config(path: str | Path) -> SimConfig:
    return sim_config_from(load_toml(path))


def sim_config_from(root: Section) -> SimConfig:
    f = root.section("fleet", required=True)
    faults = root.section("faults")
    declared = root.raw("fault", [])
    if not isinstance(declared, list):
        raise ConfigError("fault", "must be an array of tables ([[fault]])", source=root.source)
    specs = []
    for i, raw in enumerate(declared):
        try:
            specs.append(FaultSpec.from_mapping(dict(raw), key=f"fault[{i}]"))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"fault[{i}]", str(exc), source=root.source) from None
    signals = root.section("signals")
    overrides = []
    for kind in signals.keys():  # noqa: SIM118 (a Section, not a dict)
        table = signals.raw(kind)
        if not isinstance(table, dict):
            raise ConfigError(signals.key(kind), "must be a table", source=root.source)
        items: list[tuple[str, Any]] = []
        for k, v in table.items():
            if k == "interval":
                items.append(("interval_ms", parse_duration_ms(v, signals.key(f"{kind}.{k}"))))
            elif k == "base":
                if not (isinstance(v, list) and len(v) == 2):
                    raise ConfigError(signals.key(f"{kind}.base"), "must be [low, high]",
                                      source=root.source)
                items.append(("base", tuple(v)))
            elif k in ("daily_amplitude", "weekly_amplitude", "noise", "drift_per_hour", "walk",
                       "coupling", "spike", "alarm_low", "alarm_high"):
                if type(v) not in (int, float):
                    raise ConfigError(signals.key(f"{kind}.{k}"), "must be a number",
                                      source=root.source)
                items.append((k, float(v)))
            else:
                raise ConfigError(signals.key(f"{kind}.{k}"), "unknown signal parameter",
                                  source=root.source)
        overrides.append((kind, tuple(sorted(items))))
    brokers = root.section("brokers", required=True)
    out = root.section("output")
    run = root.section("run")
    try:
        spec = FleetSpec(
            gateways=f.integer("gateways", 3, minimum=1),
            devices_per_gateway=f.integer("devices_per_gateway", 200, minimum=1),
            kinds=tuple(f.str_list("kinds", ["temperature", "humidity", "pressure"])),
            sensors_per_device=f.integer("sensors_per_device", 1, minimum=1),
            sites=f.integer("sites", 0, minimum=0),
            signals=tuple(overrides),
            faults=tuple(specs),
            interval_ms=f.duration_ms("interval", 1000, minimum=1),
            seed=f.integer("seed", 1),
            payload=f.choice("payload", ("json", "batch", "senml"), "json"),
            gateway_prefix=f.text("gateway_prefix", "gw"),
            topic_template=_topic_template(f, "{gateway}/devices/{device}/readings"),
            spike_fraction=faults.number("spike_fraction", 0.0, minimum=0, maximum=1),
            spike_after_ms=faults.duration_ms("spike_after", 300_000),
            spike_spacing_ms=faults.duration_ms("spike_spacing", 600_000),
            disorder_fraction=faults.number("disorder_fraction", 0.0, minimum=0, maximum=1),
            straggler_fraction=faults.number("straggler_fraction", 0.0, minimum=0, maximum=1),
            straggler_delay_ms=faults.duration_ms("straggler_delay", 15_000),
            late_fraction=faults.number("late_fraction", 0.0, minimum=0, maximum=1),
            late_delay_ms=faults.duration_ms("late_delay", 60_000),
            malformed_fraction=faults.number("malformed_fraction", 0.0, minimum=0, maximum=1),
            out_of_range_fraction=faults.number("out_of_range_fraction", 0.0, minimum=0,
                                                maximum=1),
        )
    except ValueError as exc:
        raise ConfigError("fleet", str(exc), source=root.source) from None
    try:
        spec.models()
    except ValueError as exc:
        raise ConfigError("signals", str(exc), source=root.source) from None
    default = brokers.text("default", None)
    addrs: dict[str, BrokerAddress] = {}
    for gw in spec.gateway_ids():
        url = brokers.text(gw, default)
        if url is None:
            raise ConfigError(brokers.key(gw), "no broker for this gateway and no default",
                              source=root.source)
        addrs[gw] = parse_broker_url(url, brokers.key(gw))
    truth = out.text("truth", None)
    registry = out.text("registry", None)
    cfg = SimConfig(
        spec=spec, brokers=addrs, qos=f.integer("qos", 1, minimum=0, maximum=2),
        truth_path=Path(truth) if truth else None,
        registry_path=Path(registry) if registry else None,
        backfill_ms=run.duration_ms("backfill", 0),
        duration_ms=run.duration_ms("duration", None),
    )
    for s in (f, faults, brokers, out, run, signals):
        s.done()
    root.done()
    return cfg
