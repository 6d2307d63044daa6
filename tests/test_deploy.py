"""The shipped Mosquitto configs as an operator installs them: dropped into the conf.d of
Debian's package (whose main config already sets persistence), read verbatim."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import orjson
import pytest

from bench.broker import PASSWORD, Subscriber, gateway_broker, publishers

ROOT = Path(__file__).resolve().parent.parent
DROPINS = sorted((ROOT / "deploy" / "mosquitto").glob("*.conf"))


@pytest.mark.parametrize("conf", DROPINS, ids=lambda p: p.name)
def test_dropins_are_what_mosquitto_reads(conf: Path) -> None:
    """Mosquitto takes the rest of a line as the value (no end-of-line comments); Debian's
    main config sets persistence_location (a second one stops Mosquitto); and the store is
    saved by time, not after every message (autosave_on_changes with autosave_interval 1 saved
    the whole store per message: a gateway topped out near 150-2,000 messages/s)."""
    settings: dict[str, str] = {}
    for n, raw in enumerate(conf.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert "#" not in line, f"{conf.name}:{n}: a comment after a value is part of it"
        key, _, value = line.partition(" ")
        settings[key] = value
    assert "persistence_location" not in settings
    assert settings.get("autosave_on_changes", "false") == "false"
    assert int(settings.get("autosave_interval", "1800")) <= 5


@pytest.mark.integration
def test_gateway_dropin_runs_and_its_acl_binds_devices_to_their_topics(tmp_path: Path) -> None:
    broker = gateway_broker(tmp_path)
    try:
        sub = Subscriber(broker.port)
        got: list[str] = []
        lock = threading.Lock()

        def on_message(_c: object, _u: object, m: object) -> None:
            with lock:
                got.append(m.topic)  # type: ignore[attr-defined]

        sub.c.on_message = on_message
        sub.connect()
        d0 = publishers(broker.port)[0]  # user d0
        d0.publish_many([("devices/d0/readings", b"{}"), ("devices/d1/readings", b"{}")], 1)
        d0.flush(10)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert got == ["devices/d0/readings"]  # d0 may not speak for d1
        log = (broker.workdir / "mosquitto.log").read_text()
        assert not re.search(r"[Ee]rror", log), log
    finally:
        broker.stop()


CLOUD_ACL_BEFORE = """pattern write fieldline/v1/%u/results
pattern write fieldline/v1/%u/health
pattern write fieldline/v1/%u/status
user fieldline-cloud
topic read fieldline/v1/+/results
topic read fieldline/v1/+/health
topic read fieldline/v1/+/status
"""


def run_chain(tmp: Path, influx: object, acl: Path, seconds: float) -> tuple[object, object]:
    """Devices -> the shipped gateway broker (passwords, ACL) -> agent -> the shipped cloud
    broker (TLS, client certificates, ACL) -> worker -> InfluxDB, for ``seconds`` after the
    readings are published; returns (agent, worker)."""
    import asyncio

    from cloud.config import CloudConfig, InfluxConfig
    from cloud.worker import CloudWorker
    from devices.mqtt import BrokerAddress
    from edge.agent import EdgeAgent
    from edge.config import EdgeConfig
    from edge.engine import EngineConfig
    from edge.eventtime import EventTimeSpec
    from edge.windows import WindowSpec
    from fieldline.services import DeployedMosquitto
    from tests.pki import make_pki

    pki = make_pki(tmp / "pki", clients=("gw-1", "fieldline-cloud"))
    gw = gateway_broker(tmp / "gw")
    server_crt, server_key = pki.cert("server")
    cloud = DeployedMosquitto(tmp / "cloud", ROOT / "deploy" / "mosquitto" / "cloud.conf", files={
        "/etc/mosquitto/ca/ca.crt": pki.ca, "/etc/mosquitto/certs/server.crt": server_crt,
        "/etc/mosquitto/certs/server.key": server_key, "/etc/mosquitto/ca/crl.pem": pki.crl,
        "/etc/mosquitto/fieldline-cloud.acl": acl}).start()
    gw_crt, gw_key = pki.cert("gw-1")
    cl_crt, cl_key = pki.cert("fieldline-cloud")
    tls = {"host": "127.0.0.1", "port": cloud.port, "tls": True, "ca_file": str(pki.ca)}
    agent = EdgeAgent(EdgeConfig(
        gateway="gw-1", state_dir=tmp / "edge", tick_ms=50, health_interval_ms=500,
        intake_broker=BrokerAddress(host="127.0.0.1", port=gw.port, username="fieldline-edge",
                                    password=PASSWORD),
        uplink_broker=BrokerAddress(**tls, cert_file=str(gw_crt), key_file=str(gw_key)),
        engine=EngineConfig(windows=(WindowSpec(size_ms=1_000),), time=EventTimeSpec(
            out_of_orderness_ms=0, allowed_lateness_ms=5_000, idle_timeout_ms=1_000)),
        ack_timeout_ms=1_000))
    worker = CloudWorker(CloudConfig(
        worker_id="t", broker=BrokerAddress(**tls, cert_file=str(cl_crt), key_file=str(cl_key)),
        influx=InfluxConfig(url=influx.url, database=influx.database,  # type: ignore[attr-defined]
                            flush_interval_ms=100), health_interval_ms=500))

    async def main() -> None:
        stop_a, stop_w = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(worker.run(stop_w)), asyncio.create_task(agent.run(stop_a))]
        deadline = time.monotonic() + 20
        while not (agent.intake.subscribed.is_set() and agent.uplink.connected.is_set()
                   and worker.source.connected.is_set()):
            assert time.monotonic() < deadline, "the shipped brokers did not let them in"
            await asyncio.sleep(0.05)
        now = time.time_ns() // 1_000_000 - 30_000
        for i, p in enumerate(publishers(gw.port)):
            p.publish_many([(f"devices/d{i}/readings", orjson.dumps(
                {"metric": "temperature", "ts": now + k * 100, "value": 20.0 + k % 7,
                 "seq": k})) for k in range(100)], 1)
            p.flush(10)
        await asyncio.sleep(seconds)
        stop_a.set()
        stop_w.set()
        await asyncio.gather(*tasks)

    try:
        asyncio.run(main())
    finally:
        gw.stop()
        cloud.stop()
    return agent, worker


@pytest.mark.integration
def test_the_chain_runs_through_both_shipped_broker_configs_over_tls(
        tmp_path: Path, influx_db: object) -> None:
    """Issue 12, item 1: with deploy/mosquitto's configs and ACLs verbatim (TLS, a throwaway
    CA, client certificates), every batch reaches InfluxDB and is acknowledged: the worker may
    publish each gateway's ack and the gateway may read it."""
    agent, worker = run_chain(tmp_path, influx_db, ROOT / "deploy" / "mosquitto" / "cloud.acl",
                              seconds=6)
    ws = worker.stats()  # type: ignore[attr-defined]
    st = agent.stats()  # type: ignore[attr-defined]
    assert st["readings_accepted"] == 400
    assert ws["results_written"] == st["windows_emitted"] > 0
    assert st["outbox_depth"] == 0  # every batch acknowledged
    assert ws["acks_refused"] == 0
    assert ws["acks_sent"] > 0
    assert st["broker_dropped"] == 0  # the shipped ACL lets the agent read the broker's count
    assert st["readings_gap"] == 0


@pytest.mark.integration
def test_acks_the_broker_refuses_are_counted_and_the_agent_says_they_are_overdue(
        tmp_path: Path, influx_db: object) -> None:
    """The cloud ACL as it was (no ack topic): each refused ack (0x87) is counted and logged
    by the worker, and the agent reports its acknowledgements overdue, instead of a silent
    stall after the first max_inflight batches."""
    acl = tmp_path / "old.acl"
    acl.write_text(CLOUD_ACL_BEFORE)
    agent, worker = run_chain(tmp_path, influx_db, acl, seconds=5)
    ws = worker.stats()  # type: ignore[attr-defined]
    st = agent.stats()  # type: ignore[attr-defined]
    assert ws["acks_refused"] > 0
    assert ws["acks_sent"] == 0
    assert st["outbox_depth"] > 0
    assert st["acks_overdue"] > 0
