"""Sinks: where enriched results, anomalies and pipeline health end up.

A sink is ``write(lines)`` of InfluxDB line protocol, confirmed or raising ``SinkError``; the
``BufferedWriter`` owns batching, retries with capped backoff and the counters. Sinks are looked up
by name in ``SINKS`` and imported lazily, so a worker that writes to InfluxDB 1.x never imports
the 2.x client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud.config import InfluxConfig
    from cloud.sinks.base import Sink

SINKS: dict[str, str] = {
    "influxdb1": "cloud.sinks.influx_v1:InfluxV1Sink",
    "influxdb2": "cloud.sinks.influx_v2:InfluxV2Sink",
    "memory": "cloud.sinks.base:MemorySink",
}


# the sink for each ``[influxdb] version``; every sink builds itself from the section
BY_VERSION: dict[int, str] = {1: "influxdb1", 2: "influxdb2"}


def build_sink(influx: InfluxConfig) -> Sink:
    """The sink ``[influxdb]`` describes (its ``version`` picks the class)."""
    sink: Sink = sink_class(BY_VERSION[influx.version]).from_config(influx)
    return sink


def sink_class(name: str) -> Any:
    """The sink class registered under ``name`` (imported on first use)."""
    try:
        target = SINKS[name]
    except KeyError:
        raise KeyError(f"unknown sink {name!r}; known: {', '.join(sorted(SINKS))}") from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
