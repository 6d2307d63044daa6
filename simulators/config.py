"""Fleet simulation config (TOML); see ``deploy/fleet.toml`` for a commented example."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from devices.errors import ConfigError
from devices.mqtt import BrokerAddress, parse_broker_url
from devices.settings import Section, load_toml
from simulators.fleet import FleetSpec


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


def load_sim_config(path: str | Path) -> SimConfig:
    return sim_config_from(load_toml(path))


def sim_config_from(root: Section) -> SimConfig:
    f = root.section("fleet", required=True)
    faults = root.section("faults")
    brokers = root.section("brokers", required=True)
    out = root.section("output")
    run = root.section("run")
    try:
        spec = FleetSpec(
            gateways=f.integer("gateways", 3, minimum=1),
            devices_per_gateway=f.integer("devices_per_gateway", 200, minimum=1),
            kinds=tuple(f.str_list("kinds", ["temperature", "humidity", "pressure"])),
            interval_ms=f.duration_ms("interval", 1000, minimum=1),
            seed=f.integer("seed", 1),
            payload=f.choice("payload", ("json", "batch", "senml"), "json"),
            gateway_prefix=f.text("gateway_prefix", "gw"),
            topic_template=f.text("topic", "{gateway}/devices/{device}/readings"),
            spike_fraction=faults.number("spike_fraction", 0.0, minimum=0, maximum=1),
            spike_after_ms=faults.duration_ms("spike_after", 300_000),
            spike_spacing_ms=faults.duration_ms("spike_spacing", 600_000),
            disorder_fraction=faults.number("disorder_fraction", 0.05, minimum=0, maximum=1),
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
    for s in (f, faults, brokers, out, run):
        s.done()
    root.done()
    return cfg
