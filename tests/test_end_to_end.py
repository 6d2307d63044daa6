"""Simulator -> edge agents -> cloud worker -> InfluxDB, on real Mosquitto and InfluxDB 1.6.

A seeded fleet (two gateways, out-of-order delivery, stragglers within lateness, readings beyond
lateness, malformed payloads, out-of-range values and spikes) is published as fast as possible.
Afterwards every window in InfluxDB is compared with an independent reference computation, the
edge's counters must account for every reading, every spike must have produced an anomaly, and
every Grafana panel query must return data from the same database.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.config import CloudConfig, InfluxConfig
from cloud.panels import PANELS, Params, panel_queries, render
from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.worker import CloudWorker
from devices.catalog import Catalog
from devices.codecs import encode_single
from devices.contract import results_topic
from devices.schema import seq_checks
from edge.agent import EdgeAgent
from edge.config import EdgeConfig
from edge.engine import EngineConfig
from edge.eventtime import EventTimeSpec
from edge.windows import WindowSpec
from fieldline.services import Mosquitto
from simulators.fleet import FleetSimulator, FleetSpec
from simulators.publisher import FleetPublisher
from tests.reference import reference_windows
from tests.running import connected, settled

pytestmark = pytest.mark.integration

SIZE, OOO, LATENESS = 10_000, 2_000, 30_000
TICKS = 600


def publish_raw(url_port: int, messages: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", url_port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in messages]
    for i in infos:
        i.wait_for_publish(10)
    c.disconnect()
    c.loop_stop()


def influx_rows(client: InfluxV1Client, q: str) -> list[dict[str, object]]:
    doc = client.query(q)
    assert isinstance(doc, dict)
    out = []
    for res in doc["results"]:
        for s in res.get("series", []):
            for v in s["values"]:
                row = dict(zip(s["columns"], v, strict=True))
                row.update(s.get("tags", {}))
                out.append(row)
    return out


async def run_pipeline(gw_brokers: list[Mosquitto], cloud_broker: Mosquitto,
                       influx: InfluxV1Client, tmp: Path) -> dict[str, object]:
    spec = FleetSpec(
        gateways=2, devices_per_gateway=12, seed=7,
        topic_template="{gateway}/devices/{device}/readings",
        spike_fraction=0.01, spike_after_ms=300_000, spike_spacing_ms=120_000,
        disorder_fraction=0.05, straggler_fraction=0.01, straggler_delay_ms=15_000,
        late_fraction=0.01, late_delay_ms=60_000, malformed_fraction=0.005,
        out_of_range_fraction=0.005,
    )
    start = time.time_ns() // 1_000_000 - 15 * 60_000
    sim = FleetSimulator(spec, start, record=True)
    registry = tmp / "devices.csv"
    sim.registry().to_csv(registry)
    engine = EngineConfig(windows=(WindowSpec(size_ms=SIZE),), time=EventTimeSpec(
        out_of_orderness_ms=OOO, allowed_lateness_ms=LATENESS, idle_timeout_ms=5_000))
    agents = [
        EdgeAgent(EdgeConfig(
            gateway=gw, intake_broker=gw_brokers[i].address, uplink_broker=cloud_broker.address,
            topics=[f"{gw}/devices/+/readings"], device_topic_level=2, engine=engine,
            registry_path=registry, unknown_devices="reject" if i == 0 else "accept",
            state_dir=tmp / gw, tick_ms=50, health_interval_ms=500, ledger_interval_ms=500))
        for i, gw in enumerate(spec.gateway_ids())
    ]
    worker = CloudWorker(CloudConfig(
        worker_id="e2e", broker=cloud_broker.address, registry_path=registry,
        influx=InfluxConfig(url=f"http://{influx.url.split('//')[1]}", database=influx.database,
                            flush_interval_ms=200),
        health_interval_ms=500))
    stop_agents, stop_worker = asyncio.Event(), asyncio.Event()
    worker_start_s = time.time()
    wt = asyncio.create_task(worker.run(stop_worker))
    ats = [asyncio.create_task(a.run(stop_agents)) for a in agents]
    await connected(agents, worker)

    pub = FleetPublisher(sim, {gw: gw_brokers[i].address
                               for i, gw in enumerate(spec.gateway_ids())})
    await asyncio.to_thread(pub.run_fast, TICKS)
    pub.close()

    mid = start + 300_000
    bad_gw1 = [
        ("gw-1/devices/gw-1-t0001/readings", b"garbage{"),
        ("gw-1/devices/gw-1-t0001/readings",
         b'{"metric": "temperature", "ts": %d, "value": NaN}' % mid),
        ("gw-1/devices/gw-1-t0001/readings", encode_single("gw-1-t0001", "temperature", mid,
                                                           500.0)),
        ("gw-1/devices/gw-1-t0001/readings", b'{"metric": "temperature", "ts": "soon", '
                                             b'"value": 1}'),
        ("gw-1/devices/ghost-1/readings", encode_single("ghost-1", "temperature", mid, 20.0)),
        ("gw-1/devices/gw-1-t0001/readings", encode_single("gw-1-t0001", "radiation", mid, 1.0)),
    ]
    ghost_ts = mid - mid % SIZE
    bad_gw2 = [("gw-2/devices/ghost-2/readings",
                encode_single("ghost-2", "humidity", ghost_ts + k * 1000, 40.0 + k, k))
               for k in range(5)]
    publish_raw(gw_brokers[0].port, bad_gw1)
    publish_raw(gw_brokers[1].port, bad_gw2)
    publish_raw(cloud_broker.port, [
        (results_topic("gw-1"), b"garbage on the uplink"),
        (results_topic("gw-1"), orjson.dumps({"v": 7, "kind": "results", "gw": "gw-1"})),
    ])

    # Wait until every device went idle (windows closed) and the cloud wrote every result.
    deadline = time.monotonic() + 90
    while True:
        emitted = sum(a.pipeline.counters["windows_emitted"] for a in agents)
        done = (all(a.intake.pending == 0 and a.pipeline.engine.active_devices == 0
                    and a.outbox.depth == 0 for a in agents)
                and worker.stats()["results_written"] == emitted and emitted > 0)
        if done:
            break
        assert time.monotonic() < deadline, (
            f"pipeline did not settle: {[a.stats() for a in agents]} {worker.stats()}")
        await asyncio.sleep(0.2)
    # Let a few more health points be written for the dashboards, and the worker's span two of
    # the 10 s buckets the "InfluxDB refusing points" rule differences (a run shorter than that,
    # or one inside a single bucket, gives it nothing to compare: CI found it so). Its first
    # health point is written half a second after it starts: 2 s leave a margin for a slow start.
    second_bucket_s = ((worker_start_s + 2) // 10 + 1) * 10 + 1.5
    await asyncio.sleep(max(1.5, second_bucket_s - time.time()))
    stop_agents.set()
    await asyncio.gather(*ats)
    stop_worker.set()
    await wt
    return {"sim": sim, "agents": agents, "worker": worker, "start": start}


def test_pipeline_end_to_end(mosquitto_factory: Callable[..., Mosquitto],
                             influx_db: InfluxV1Client, tmp_path: Path) -> None:
    gw_brokers = [mosquitto_factory(), mosquitto_factory()]
    cloud = mosquitto_factory()
    out = asyncio.run(run_pipeline(gw_brokers, cloud, influx_db, tmp_path))
    sim: FleetSimulator = out["sim"]
    agents: list[EdgeAgent] = out["agents"]
    worker: CloudWorker = out["worker"]

    # ---- the reference: what should be in every window --------------------------------
    accepted_input = [(p.device, p.metric, p.ts, p.value, p.seq) for p in sim.published
                      if p.fault not in ("malformed", "out_of_range")]
    ref = reference_windows(accepted_input, size_ms=SIZE, ooo_ms=OOO, lateness_ms=LATENESS)
    assert ref.dropped, "the scenario must exercise readings beyond lateness"
    assert ref.revised, "the scenario must exercise late readings within lateness"

    rows = influx_rows(influx_db, 'SELECT "count", "min", "max", "mean", "rev", "site", '
                                  '"seq_min", "seq_max", "seq_sum" '
                                  'FROM "aggregates" GROUP BY "device", "metric"')
    got = {(str(r["device"]), str(r["metric"]), int(r["time"])): r for r in rows}
    ghost = {k: v for k, v in got.items() if k[0].startswith("ghost")}
    got = {k: v for k, v in got.items() if not k[0].startswith("ghost")}

    missing = set(ref.windows) - set(got)
    unexpected = set(got) - set(ref.windows)
    assert not missing, f"{len(missing)} windows missing, e.g. {sorted(missing)[:3]}"
    assert not unexpected, f"{len(unexpected)} unexpected windows, e.g. {sorted(unexpected)[:3]}"
    mismatched = [k for k, w in ref.windows.items() if got[k]["count"] != w.count]
    assert not mismatched, f"{len(mismatched)} windows with a wrong count: {mismatched[:3]}"
    for k, w in ref.windows.items():
        r = got[k]
        assert r["min"] == w.min
        assert r["max"] == w.max
        assert seq_checks(int(r["count"]), r["seq_min"], r["seq_max"], r["seq_sum"]) == (
            min(w.seqs), max(w.seqs), sum(w.seqs))
        assert math.isclose(float(r["mean"]), math.fsum(w.values) / w.count,
                            rel_tol=1e-9)
    assert any((r["rev"] or 0) > 0 for r in got.values()), "revisions must reach InfluxDB"
    assert any(r["seq_max"] is None for r in got.values()), "a run's seq_max is left out"

    # ---- exact accounting per gateway -------------------------------------------------
    published_by_gw = Counter(p.gateway for p in sim.published)
    dropped_by_gw = Counter(d.rsplit("-", 1)[0] for d, _, _ in ref.dropped)
    in_windows_by_gw: Counter[str] = Counter()
    for (device, _, _), w in ref.windows.items():
        in_windows_by_gw[device.rsplit("-", 1)[0]] += w.count
    injected = Counter((p.gateway, p.fault) for p in sim.published)
    for a in agents:
        gw = a.config.gateway
        s = a.stats()
        extra = 6 if gw == "gw-1" else 5  # what the test sent by hand
        assert s["readings_received"] == published_by_gw[gw] + extra
        assert s["late_dropped"] == dropped_by_gw[gw]
        assert s["readings_accepted"] == in_windows_by_gw[gw] + (5 if gw == "gw-2" else 0)
        assert (s["readings_accepted"] + s["late_dropped"] + s["rejected"] + s["duplicates"]
                == s["readings_received"])
        hand = gw == "gw-1"
        assert s["rejected_malformed_json"] == injected[(gw, "malformed")] + hand
        assert s["rejected_out_of_range"] == injected[(gw, "out_of_range")] + hand
        assert s["rejected_not_finite"] == int(hand)
        assert s["rejected_wrong_type"] == int(hand)
        assert s["rejected_unknown_device"] == int(hand)
        assert s["rejected_unknown_metric"] == int(hand)

    # ---- the ledger in InfluxDB balances ------------------------------------------------
    ledger = influx_rows(influx_db, 'SELECT * FROM "ledger" GROUP BY "gateway", "device" '
                                    'ORDER BY time DESC LIMIT 1')
    for a in agents:
        gw = a.config.gateway
        row = next(r for r in ledger if r["gateway"] == gw and r["device"] == "_gateway")
        assert row["readings_received"] == (row["readings_accepted"] + row["rejected"]
                                            + row["late_dropped"] + row["duplicates"])
        assert row["readings_received"] == a.stats()["readings_received"]
        assert row["windows_emitted"] == row["windows_acked"] + row["windows_shed"] + row[
            "windows_pending"]
        assert row["windows_acked"] == row["windows_emitted"]  # everything is in InfluxDB
        devs = [r for r in ledger if r["gateway"] == gw and r["device"] != "_gateway"]
        assert sum(int(r["received"]) for r in devs) == row["readings_received"]
        assert sum(int(r["accepted"]) for r in devs) == row["readings_accepted"]
        assert sum(int(r["late_dropped"]) for r in devs) == row["late_dropped"]
        assert sum(int(r["windows_emitted"]) for r in devs) == row["windows_emitted"]
        assert all(int(r["received"]) == int(r["accepted"]) + int(r["rejected"])
                   + int(r["late_dropped"]) + int(r["duplicates"]) for r in devs)

    # ---- unknown devices and garbage on the uplink ------------------------------------
    ws = worker.stats()
    assert ws["unknown_device_results"] == 1
    assert len(ghost) == 1
    (gk, gv), = ghost.items()
    assert gk[0] == "ghost-2"
    assert gv["count"] == 5
    assert gv["site"] == "unknown"
    assert ws["rejected_bad_uplink"] == 1
    assert ws["rejected_unsupported_version"] == 1
    assert ws["duplicate_batches"] == 0

    # ---- every spike that was accepted produced an anomaly -----------------------------
    dropped_set = set(ref.dropped)
    mangled = {(t["device"], t["seq"]) for t in sim.truth
               if t["type"] in ("malformed", "out_of_range")}  # faults stack on one reading
    spikes = [t for t in sim.truth if t["type"] == "spike"
              and (t["device"], t["metric"], t["ts"]) not in dropped_set
              and (t["device"], t["seq"]) not in mangled]
    assert len(spikes) >= 10
    anomalies = influx_rows(influx_db, 'SELECT "score", "detector" FROM "anomalies" '
                                       'GROUP BY "device", "metric"')
    flagged = {(str(a["device"]), str(a["metric"]), int(a["time"])) for a in anomalies}
    unflagged = [s for s in spikes if (s["device"], s["metric"],
                                       int(s["ts"]) - int(s["ts"]) % SIZE) not in flagged]
    assert not unflagged, f"{len(unflagged)} of {len(spikes)} spikes not detected: {unflagged[:3]}"
    spike_windows = {(s["device"], s["metric"], int(s["ts"]) - int(s["ts"]) % SIZE)
                     for s in sim.truth if s["type"] == "spike"}
    false_alarms = flagged - spike_windows
    assert len(false_alarms) <= 0.01 * len(ref.windows), false_alarms

    # ---- every panel (Grafana and the web view), variable, annotation and alert-rule
    # query returns data from this database, expanded as the view's server expands them --------
    empty = []
    open_now = sum(1 for r in influx_rows(influx_db, 'SELECT "open" FROM "alerts"') if r["open"])
    for title, q in panel_queries():
        if '"engine_' in q:  # a JetStream worker's only: tests/test_jetstream.py runs those
            continue
        if '"cert_days_left"' in q:  # TLS links only: tests/test_deploy.py runs it
            continue
        if "\"source\" = 'rule'" in q:  # pattern rules' alerts: tests/test_cloud.py runs it
            continue
        doc = influx_db.query(render(q, Params(range_s=3600, points=3600)))
        assert isinstance(doc, dict)
        series = [s for r in doc["results"] for s in r.get("series", [])]
        values = [v for s in series for row in s["values"] for v in row[1:] if v is not None]
        if title == PANELS["alerts_open"].title:  # none when no alert is open (the view: 0)
            assert sum(values) == open_now, (values, open_now)
            continue
        if not values:
            empty.append(title)
    assert not empty, f"panels without data: {empty}"


def test_a_door_sensor_and_a_thermometer_alert_on_what_matters_only(
        mosquitto_factory: Callable[..., Mosquitto], influx_db: InfluxV1Client,
        tmp_path: Path) -> None:
    """A Zigbee2MQTT-style device (``{"contact": false, "temperature": 21.3, "battery": 97,
    ...}``), two hours of event time from its first reading, through a real gateway broker,
    agent, cloud broker, worker (the default detectors and settings) and InfluxDB.

    Each 10 s window of the contact holds the share of readings with the door shut as its mean,
    and its openings raise no anomaly (before on/off states were readings, the contact never
    reached InfluxDB; before they were judged by their limits only, the openings were flagged).
    The thermometer (0.1 degC steps, a slow swing of 1 degC) raises one anomaly: its 12 degC
    spike. Before a change within a few steps of a series' learned resolution was muted, each
    new high or low of its first hours by a step of the sensor was one: 121 windows of 720."""
    gw_broker, cloud = mosquitto_factory(), mosquitto_factory()
    start = time.time_ns() // 1_000_000 - 2 * 3_600_000
    start -= start % SIZE
    step, n = 5_000, 1_440  # two hours, two readings a window
    opened = {k for o in range(150, n, 97) for k in range(o, o + 1 + o % 3)}
    spike_at = 1_200

    def temperature(k: int) -> float:
        jitter = 0.05 * ((k * 7919) % 13 - 6) / 6
        return round(21.0 + math.sin(k / 200) + jitter, 1) + (12.0 if k == spike_at else 0.0)

    msgs = [("devices/door-1/readings", orjson.dumps({
        "ts": start + k * step, "contact": k not in opened, "battery": 97, "linkquality": 120,
        "temperature": temperature(k)})) for k in range(n)]

    async def run() -> EdgeAgent:
        agent = EdgeAgent(EdgeConfig(
            gateway="gw-1", intake_broker=gw_broker.address, uplink_broker=cloud.address,
            topics=["devices/+/readings"], device_topic_level=1, state_dir=tmp_path / "edge",
            engine=EngineConfig(windows=(WindowSpec(size_ms=SIZE),), time=EventTimeSpec(
                out_of_orderness_ms=OOO, allowed_lateness_ms=LATENESS, idle_timeout_ms=2_000)),
            catalog=Catalog(undeclared="accept"), tick_ms=50, health_interval_ms=500))
        worker = CloudWorker(CloudConfig(
            worker_id="doors", broker=cloud.address,
            influx=InfluxConfig(url=influx_db.url, database=influx_db.database,
                                flush_interval_ms=200), health_interval_ms=500))
        stop_a, stop_w = asyncio.Event(), asyncio.Event()
        wt = asyncio.create_task(worker.run(stop_w))
        at = asyncio.create_task(agent.run(stop_a))
        await connected([agent], worker)
        await asyncio.to_thread(publish_raw, gw_broker.port, msgs)
        await settled([agent], worker, 60)
        stop_a.set()
        await at
        stop_w.set()
        await wt
        return agent

    agent = asyncio.run(run())
    assert agent.stats()["readings_accepted"] == 4 * n  # contact, battery, linkquality, temperature
    rows = influx_rows(influx_db, 'SELECT "count", "mean" FROM "aggregates" '
                                  'WHERE "metric" = \'contact\'')
    assert len(rows) == n // 2
    for r in rows:
        first = (int(str(r["time"])) - start) // step
        opens = sum(k in opened for k in (first, first + 1))
        assert r["count"] == 2
        assert math.isclose(float(r["mean"]), 1 - opens / 2)  # contact true: the door is shut
    anomalies = influx_rows(influx_db, 'SELECT "score" FROM "anomalies" GROUP BY "metric"')
    flagged = Counter(str(a["metric"]) for a in anomalies)
    assert flagged["contact"] == 0, flagged
    spike_window = start + spike_at * step - (start + spike_at * step) % SIZE
    hot = [int(str(a["time"])) for a in anomalies if a["metric"] == "temperature"]
    assert hot == [spike_window], (len(hot), flagged)
    alerts = influx_rows(influx_db, 'SELECT * FROM "alerts" GROUP BY "metric"')
    assert not [a for a in alerts if a.get("metric") == "contact"], alerts
