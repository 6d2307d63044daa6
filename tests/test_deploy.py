"""The shipped Mosquitto configs as an operator installs them: dropped into the conf.d of
Debian's package (whose main config already sets persistence), read verbatim; and the
InfluxDB environment file as /etc/default/influxdb."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import orjson
import pytest

from bench.broker import PASSWORD, Subscriber, gateway_broker, publishers
from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import InfluxDB, env_file

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
    # the throwaway CA and certificates are valid for two days: the agent says so, and the
    # "Certificate expiring" rule finds it in what the worker wrote
    assert 1.9 < st["cert_days_left"] <= 2.0, st["cert_days_left"]
    from devices.x509 import earliest_expiry

    shown = agent.uplink.server_cert_expiry  # type: ignore[attr-defined]
    assert shown == earliest_expiry(tmp_path / "pki" / "server.crt")  # what the broker showed
    from cloud.panels import ALERT_RULES, Params, render

    rule = next(r for r in ALERT_RULES if r.uid == "fieldline-certificate-expiring")
    doc = influx_db.query(render(rule.query, Params(range_s=rule.range_s)))  # type: ignore[attr-defined]
    left = {s["tags"]["gateway"] or s["tags"]["worker"]: s["values"][-1][1]
            for s in doc["results"][0]["series"]}
    assert left.keys() == {"gw-1", "t"}, left  # the gateway and the cloud worker
    assert all(v < rule.threshold for v in left.values()), left
    assert 1.9 < ws["cert_days_left"] <= 2.0, ws["cert_days_left"]


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


class TlsClient:
    """One MQTT 5 client of the shipped cloud broker, by certificate; records what it receives."""

    def __init__(self, port: int, ca: Path, cert: tuple[Path, Path] | None, name: str) -> None:
        import ssl

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused = threading.Event()
        self.c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                             client_id=f"r11-{name}", protocol=mqtt.MQTTv5)
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.c.tls_set_context(ctx)
        self.c.on_connect = lambda _c, _u, _f, rc, _p: (
            self.refused if rc.is_failure else self.connected).set()
        self.c.on_disconnect = lambda *_a: self.refused.set()
        self.c.on_message = lambda _c, _u, m: self.got.append((m.topic, bytes(m.payload)))
        self.port = port

    def connect(self, timeout_s: float = 5) -> bool:
        """Whether the broker let it in (a TLS refusal, a CONNACK refusal: False)."""
        try:
            self.c.connect("127.0.0.1", self.port)
        except OSError:  # the handshake failed: no certificate, a stranger's, a revoked one
            return False
        self.c.loop_start()
        deadline = time.monotonic() + timeout_s
        while not (self.connected.is_set() or self.refused.is_set()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return self.connected.is_set() and not self.refused.is_set()

    def subscribe(self, *topics: str) -> None:
        for t in topics:
            self.c.subscribe(t, qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.integration
def test_r11_gateways_are_isolated_by_delivery_and_bad_identities_refused(
        tmp_path: Path) -> None:
    """RELIABILITY R11 on deploy/mosquitto/cloud.conf + cloud.acl verbatim: gateway A
    publishes on and subscribes to gateway B's topics: nothing of A reaches B's readers and A
    receives nothing of B's (checked by delivery: Mosquitto grants every SUBSCRIBE). No
    certificate, a certificate of another CA, and a revoked one are refused."""
    from fieldline.services import DeployedMosquitto
    from tests.pki import make_pki, revoke

    pki = make_pki(tmp_path / "pki", clients=("gw-a", "gw-b", "fieldline-cloud", "gw-stolen"))
    revoke(pki, "gw-stolen")
    rogue = make_pki(tmp_path / "rogue", clients=("gw-b",))  # a stranger's CA, a known name
    server_crt, server_key = pki.cert("server")
    broker = DeployedMosquitto(tmp_path / "cloud", ROOT / "deploy" / "mosquitto" / "cloud.conf",
                               files={
        "/etc/mosquitto/ca/ca.crt": pki.ca, "/etc/mosquitto/certs/server.crt": server_crt,
        "/etc/mosquitto/certs/server.key": server_key, "/etc/mosquitto/ca/crl.pem": pki.crl,
        "/etc/mosquitto/fieldline-cloud.acl": ROOT / "deploy" / "mosquitto" / "cloud.acl",
    }).start()
    clients: list[TlsClient] = []

    def client(cert: tuple[Path, Path] | None, name: str, ca: Path = pki.ca) -> TlsClient:
        c = TlsClient(broker.port, ca, cert, name)
        clients.append(c)
        return c

    try:
        worker = client(pki.cert("fieldline-cloud"), "worker")
        a, b = client(pki.cert("gw-a"), "a"), client(pki.cert("gw-b"), "b")
        for c in (worker, a, b):
            assert c.connect()
        worker.subscribe("fieldline/v1/+/results", "fieldline/v1/+/health")
        a.subscribe("#", "fieldline/v1/gw-b/#", "fieldline/v1/+/ack", "fieldline/v1/+/results")
        b.subscribe("fieldline/v1/gw-b/ack")
        time.sleep(0.5)
        b.publish("fieldline/v1/gw-b/results", b"b's batch")
        a.publish("fieldline/v1/gw-b/results", b"a posing as b")
        a.publish("fieldline/v1/gw-b/health", b"a posing as b")
        a.publish("fieldline/v1/gw-b/ack", b"a acknowledging b")
        a.publish("fieldline/v1/gw-a/results", b"a's batch")
        worker.publish("fieldline/v1/gw-b/ack", b"ack for b")
        worker.publish("fieldline/v1/gw-a/ack", b"ack for a")
        deadline = time.monotonic() + 5
        while (len(worker.got) < 2 or not a.got or not b.got) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything that should not arrive has had its chance
        assert sorted(worker.got) == [("fieldline/v1/gw-a/results", b"a's batch"),
                                      ("fieldline/v1/gw-b/results", b"b's batch")]
        # (once per matching subscription: A subscribed to its ack twice over)
        assert set(a.got) == {("fieldline/v1/gw-a/ack", b"ack for a")}
        assert b.got == [("fieldline/v1/gw-b/ack", b"ack for b")]
        # bad identities never get in
        assert not client(None, "anonymous").connect()
        assert not client(rogue.cert("gw-b"), "stranger").connect()
        assert not client(pki.cert("gw-stolen"), "stolen").connect()
        assert client(pki.cert("gw-a"), "a-again").connect()  # (the refusals were for cause)
    finally:
        for c in clients:
            c.close()
        broker.stop()


DEBIAN_INFLUXDB_CONF = Path("/etc/influxdb/influxdb.conf")  # every setting, defaults commented


def _influxdb_env_names(conf: str) -> set[str]:
    """The environment names InfluxDB 1.x reads for the settings of its config file."""
    names, section = set(), ""
    for line in conf.splitlines():
        m = re.fullmatch(r"\s*\[([a-z_-]+)\]\s*", line)
        if m:
            section = m.group(1)
            continue
        m = re.fullmatch(r"\s*#?\s*([a-z][a-z0-9-]*)\s*=.*", line)
        if m:
            parts = [section, m.group(1)] if section else [m.group(1)]
            names.add("INFLUXDB_" + "_".join(parts).upper().replace("-", "_"))
    return names


def test_shipped_influxdb_env_is_settings_influxdb_has_and_it_runs_with_them(
        tmp_path: Path) -> None:
    """deploy/influxdb/influxdb.env as /etc/default/influxdb: InfluxDB ignores a misspelt
    variable silently, so every name must be one of its settings (from Debian's own config
    file) or Go's; and influxd starts with it and takes writes."""
    env = env_file(ROOT / "deploy" / "influxdb" / "influxdb.env")
    known = _influxdb_env_names(DEBIAN_INFLUXDB_CONF.read_text())
    assert "INFLUXDB_DATA_CACHE_SNAPSHOT_MEMORY_SIZE" in known  # the parse itself works
    assert env
    assert all(k in known or k == "GOGC" for k in env), sorted(set(env) - known)
    ix = InfluxDB(tmp_path, env=env).start()
    try:
        client = InfluxV1Client(ix.url, "envcheck")
        client.create_database()
        client.write_lines([f"m,device=d{i} v={i} 1700000000000" for i in range(100)])
        got = client.query('SELECT count("v") FROM "m"')
        assert "100" in str(got)
        assert ix.proc is not None
        environ = Path(f"/proc/{ix.proc.pid}/environ").read_bytes().split(b"\0")
        assert all(f"{k}={v}".encode() in environ for k, v in env.items())
    finally:
        ix.stop()


def test_env_file_reads_what_systemd_reads(tmp_path: Path) -> None:
    f = tmp_path / "env"
    f.write_text("# a comment\n\n; another\nA=1\n B = two words \nC=\"quoted # not a comment\"\n"
                 "D='x'\n")
    assert env_file(f) == {"A": "1", "B": "two words", "C": "quoted # not a comment", "D": "x"}
    f.write_text("A=1\nnot a pair\n")
    with pytest.raises(ValueError, match=r"env:2: not KEY=VALUE"):
        env_file(f)
