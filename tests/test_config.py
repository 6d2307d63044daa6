"""Misconfiguration fails at start-up and names the key; the example configs in deploy/ load."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud.config import load_cloud_config
from devices.errors import ConfigError
from devices.registry import Registry
from edge.config import load_edge_config
from simulators.config import load_sim_config

ROOT = Path(__file__).resolve().parent.parent

GOOD_EDGE = """
[gateway]
id = "gw-1"
[intake]
broker = "mqtt://127.0.0.1:1883"
[uplink]
broker = "mqtt://127.0.0.1:1884"
[windows]
size = "10s"
"""


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_good_edge_config_loads(tmp_path: Path) -> None:
    cfg = load_edge_config(write(tmp_path, GOOD_EDGE))
    assert cfg.gateway == "gw-1"
    assert cfg.engine.labels == ["10s"]
    assert cfg.uplink_broker.port == 1884


@pytest.mark.parametrize(("text", "key"), [
    (GOOD_EDGE.replace('size = "10s"', 'size = "ten"'), "windows.size"),
    (GOOD_EDGE.replace('size = "10s"', 'size = "10ms"'), "windows.size"),
    (GOOD_EDGE.replace('size = "10s"', 'sise = "10s"'), "windows.sise"),
    (GOOD_EDGE.replace('id = "gw-1"', 'id = "gw/1"'), "gateway.id"),
    (GOOD_EDGE.replace("mqtt://127.0.0.1:1883", "http://x"), "intake.broker"),
    (GOOD_EDGE.replace("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:0"), "intake.broker"),
    (GOOD_EDGE.replace("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:70000"), "intake.broker"),
    (GOOD_EDGE.replace("mqtt://127.0.0.1:1884", "mqtt://:1884"), "uplink.broker"),
    (GOOD_EDGE.replace('[uplink]\nbroker = "mqtt://127.0.0.1:1884"', ""), "uplink"),
    (GOOD_EDGE.replace('broker = "mqtt://127.0.0.1:1884"',
                       'broker = "mqtt://127.0.0.1:1884"\ncompression = "gzip"'),
     "uplink.compression"),
    (GOOD_EDGE + '[agent]\ntick = -5\n', "agent.tick"),
    (GOOD_EDGE + '[agent]\nhealth_interval = "10m"\n', "agent.health_interval"),
    (GOOD_EDGE + '[intake.extra]\n', "intake.extra"),
    (GOOD_EDGE.replace('size = "10s"', 'specs = ["10s", "hopping:1m/7s"]'), "windows.specs[1]"),
    (GOOD_EDGE.replace('size = "10s"', 'specs = ["10s", "10s"]'), "windows.specs"),
    (GOOD_EDGE + '[clock]\npolicy = "guess"\n', "clock.policy"),
    (GOOD_EDGE + '[clock]\nuntimed = "now"\n', "clock.untimed"),
    (GOOD_EDGE + '[agent]\ncompact_malloc = "yes"\n', "agent.compact_malloc"),
    (GOOD_EDGE.replace('size = "10s"', 'percentiles = [50]'), "windows.percentiles"),
    (GOOD_EDGE.replace('size = "10s"', 'percentiles = [0.5, 0.5]'), "windows.percentiles"),
    (GOOD_EDGE.replace('size = "10s"', 'specs = ["hopping:10s/0s"]'), "windows.specs[0]"),
    # a ring of 3.5 M windows per series (a typo for 400ms) would take the gateway's memory
    (GOOD_EDGE + 'out_of_orderness = "400d"\n', "windows.out_of_orderness"),
    (GOOD_EDGE + 'allowed_lateness = "3650d"\n', "windows.allowed_lateness"),
    (GOOD_EDGE.replace("[uplink]", 'topics = []\n[uplink]'), "intake.topics"),
    (GOOD_EDGE.replace("[uplink]", 'topics = ["devices/#/readings"]\n[uplink]'),
     "intake.topics"),
    (GOOD_EDGE.replace("[uplink]", 'topics = ["devices/x+/readings"]\n[uplink]'),
     "intake.topics"),
    (GOOD_EDGE.replace("[uplink]", 'device_topic_level = 3\n[uplink]'),
     "intake.device_topic_level"),
    (GOOD_EDGE.replace("[uplink]", 'metric_topic_level = 3\n[uplink]'),
     "intake.metric_topic_level"),
    (GOOD_EDGE.replace("[uplink]", 'metric_topic_level = 1\n[uplink]'),
     "intake.metric_topic_level"),
])
def test_bad_edge_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_edge_config(write(tmp_path, text))
    assert info.value.key == key, str(info.value)
    assert key in str(info.value)


def test_several_window_kinds_parse_from_config(tmp_path: Path) -> None:
    text = GOOD_EDGE.replace('size = "10s"', 'specs = ["10s", "1m", "hopping:1m/10s", '
                             '"session:30s/10m", "count:100"]\nforward_late = true\n'
                             '[clock]\npolicy = "correct"\nskew_tolerance = "5s"\n'
                             'untimed = "reject"\n[dedup]\nmemory = 128\n')
    assert load_edge_config(write(tmp_path, GOOD_EDGE)).untimed == "receive_time"
    cfg = load_edge_config(write(tmp_path, text))
    assert cfg.untimed == "reject"
    assert not cfg.stamps_receive_time()
    assert cfg.engine.labels == ["10s", "1m", "1m/10s", "session:30s/10m", "count:100"]
    assert cfg.engine.clock_policy == "correct"
    assert cfg.engine.skew_tolerance_ms == 5_000
    assert cfg.engine.dedup_memory == 128
    assert cfg.forward_late


def test_bad_cloud_config_names_the_key(tmp_path: Path) -> None:
    base = '[ingest]\nbroker = "mqtt://127.0.0.1:1883"\n'
    with pytest.raises(ConfigError) as info:
        load_cloud_config(write(tmp_path, base + '[influxdb]\nversion = 2\nurl = "http://x"\n'))
    assert info.value.key == "influxdb.token"
    with pytest.raises(ConfigError) as info:
        load_cloud_config(write(tmp_path, base + '[detect]\ndetectors = ["magic"]\n'))
    assert info.value.key == "detect.detectors"
    for extra, key in (('[influxdb]\ndatabase = ""\n', "influxdb.database"),
                       ('[influxdb]\ndatabase = "a\\"b"\n', "influxdb.database"),
                       ('[detect]\ndetectors = ["spike", "spike"]\n', "detect.detectors"),
                       ('[detect]\nwindows = ["ten seconds"]\n', "detect.windows"),
                       ('[worker]\nid = "cloud/1"\n', "worker.id"),
                       ('[worker]\nid = ""\n', "worker.id"),
                       ('[detect.min_change]\ntemperature = -1\n', "detect.min_change.temperature"),
                       ('[detect.min_change]\nflow = "lots"\n', "detect.min_change.flow"),
                       ('[detect]\nresolution_steps = -1\n', "detect.resolution_steps"),
                       ('[detect]\nforget_after = "30m"\n', "detect.forget_after"),
                       ('[detect]\nforget_after = "a month"\n', "detect.forget_after"),
                       ('[detect]\nresolve_silent_after = "5m"\n',
                        "detect.resolve_silent_after"),
                       ('[worker]\nhealth_interval = "6m"\n', "worker.health_interval"),
                       ('[influxdb]\nretention = "30m"\n', "influxdb.retention"),
                       ('[influxdb]\nretention = "a year"\n', "influxdb.retention"),
                       ('[influxdb]\nversion = 2\ntoken = "t"\norg = "o"\nbucket = "b"\n'
                        'retention = "30d"\n', "influxdb.retention")):
        with pytest.raises(ConfigError) as info:
            load_cloud_config(write(tmp_path, base + extra))
        assert info.value.key == key, extra
    # what detection judges is named as the gateways' config names it, or as InfluxDB shows it
    judged = load_cloud_config(write(tmp_path, base + '[detect]\nwindows = ["primary", "60s", '
                                     '"hopping:1m/10s", "1m/10s", "session:30s", "count:5"]\n'))
    assert judged.detect_windows == ("primary", "1m", "1m/10s", "1m/10s", "session:30s",
                                     "count:5")
    # the smallest change worth an alert: per metric, 0 is none; steps of resolution
    det = load_cloud_config(write(tmp_path, base + '[detect]\nresolution_steps = 2\n'
                                  '[detect.min_change]\nhumidity = 0\nflow = 0.5\n'))
    assert det.min_change == {"flow": 0.5}
    assert det.resolution_steps == 2.0
    assert det.forget_after_ms == 30 * 86_400_000  # the default
    assert load_cloud_config(write(tmp_path, base + '[detect]\nforget_after = 0\n')
                             ).forget_after_ms == 0
    assert det.resolve_silent_after_ms == 3_600_000  # the default
    for zero in ('0', '"0"', '"0s"'):  # 0 written as a duration, as the shipped comment says
        assert load_cloud_config(write(tmp_path, base + f'[detect]\nresolve_silent_after = '
                                       f'{zero}\nforget_after = {zero}\n')
                                 ).resolve_silent_after_ms == 0
    with pytest.raises(ConfigError, match=r"detect\.forget_after"):  # a number without its unit
        load_cloud_config(write(tmp_path, base + '[detect]\nforget_after = "30"\n'))
    for url in ("http://127.0.0.1:abc", "http://127.0.0.1:99999", "http://:8086",
                "http://127.0.0.1:0"):
        with pytest.raises(ConfigError) as info:
            load_cloud_config(write(tmp_path, base + f'[influxdb]\nurl = "{url}"\n'))
        assert info.value.key == "influxdb.url", url


def test_bad_registry_rows_name_file_row_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "device_id,gateway,site,kind,low,high\n"
                        "d1,gw-1,s1,temperature,0,40\n"
                        "d2,gw-1,s1,temperature,abc,40\n", "reg.csv")
    with pytest.raises(ConfigError) as info:
        Registry.load(p)
    assert info.value.key == "low"
    assert "reg.csv:3" in str(info.value)
    p = write(tmp_path, "device_id,gateway,kind\nd1,gw,temperature\n", "reg2.csv")
    with pytest.raises(ConfigError, match="site"):
        Registry.load(p)


def test_a_registry_saved_by_a_spreadsheet_loads(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark, European locales separate fields with
    ';' and write decimals with a comma, people leave comments and blank lines: the same
    devices every time, and a row's line number in an error still counts the file's lines."""
    rows = ["device_id,gateway,site,kind,low,high", "d1,gw-1,hall,temperature,0,40",
            "d2,gw-1,yard,humidity,,"]
    forms = {
        "bom.csv": "\ufeff" + "\n".join(rows) + "\n",
        "semicolon.csv": "\n".join(r.replace(",", ";") for r in rows) + "\n",
        "commented.csv": "# fleet of hall A\n\n" + "\r\n".join(rows) + "\r\n\n",
    }
    for name, text in forms.items():
        reg = Registry.load(write(tmp_path, text, name))
        assert [(d.device_id, d.site, d.kind, d.high) for d in reg] == [
            ("d1", "hall", "temperature", 40.0), ("d2", "yard", "humidity", None)], name
    bad = write(tmp_path, "# fleet\n" + "\n".join(rows) + "\nd3,gw-1,hall,temperature,x,1\n",
                "bad.csv")
    with pytest.raises(ConfigError, match=r"bad.csv:5"):
        Registry.load(bad)
    twice = write(tmp_path, "\n".join([*rows, rows[1]]) + "\n", "twice.csv")
    with pytest.raises(ConfigError, match=r"'d1' is registered twice \(lines 2 and 4\)"):
        Registry.load(twice)
    german = write(tmp_path, "device_id;gateway;site;kind;low;high;calibration_offset\n"
                             "d1;gw-1;hall;temperature;-10,5;40,25;-0,3\n"
                             "d2;gw-1;yard;humidity;0;100;\n", "german.csv")
    assert [(d.low, d.high, d.calibration_offset) for d in Registry.load(german)] == [
        (-10.5, 40.25, -0.3), (0.0, 100.0, 0.0)]
    for text in ("1.013,25", "1,2,3", "12,"):  # thousands separators, lists: not numbers
        odd = write(tmp_path, f"device_id;gateway;site;kind;high\nd1;gw-1;hall;pressure;{text}\n",
                    "odd.csv")
        with pytest.raises(ConfigError, match=r"not a number"):
            Registry.load(odd)
    with pytest.raises(ConfigError, match=r"not a number: '40,5'"):  # ',' between fields
        Registry.load(write(tmp_path, 'device_id,gateway,site,kind,high\n'
                                      'd1,gw-1,hall,temperature,"40,5"\n', "quoted.csv"))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(("\n".join(rows) + "\nd3,gw-1,Halle Süd,temperature,0,1\n")
                      .encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        Registry.load(latin)


def test_registry_round_trips_csv_and_loads_toml(tmp_path: Path) -> None:
    p = write(tmp_path, '[[device]]\ndevice_id = "d1"\ngateway = "gw-1"\nsite = "hall A"\n'
                        'kind = "humidity"\nhigh = 90.0\ncalibration_offset = -1.5\n', "r.toml")
    reg = Registry.load(p)
    d = reg.get("d1")
    assert d is not None
    assert (d.site, d.kind, d.low, d.high, d.calibration_offset) == (
        "hall A", "humidity", None, 90.0, -1.5)
    reg.to_csv(tmp_path / "r.csv")
    again = Registry.load(tmp_path / "r.csv").get("d1")
    assert again == d


@pytest.mark.parametrize("name", ["gateway.toml", "cloud.toml", "fleet.toml"])
def test_example_configs_in_deploy_load(name: str) -> None:
    loader = {"gateway.toml": load_edge_config, "cloud.toml": load_cloud_config,
              "fleet.toml": load_sim_config}[name]
    cfg = loader(ROOT / "deploy" / name)
    assert cfg is not None


def test_the_commented_engine_block_of_deploy_cloud_toml_loads_as_written(tmp_path: Path) -> None:
    """deploy/cloud.toml ships its JetStream [engine] block commented out: un-commented as a
    user would, it must load and mean what its comments say."""
    text = (ROOT / "deploy" / "cloud.toml").read_text()
    lines = text.splitlines()
    at = lines.index("# [engine]")
    out = list(lines)
    for i in range(at, len(lines)):
        if not lines[i].startswith("# "):
            break
        out[i] = lines[i][2:]
    cfg_path = tmp_path / "cloud.toml"
    cfg_path.write_text("\n".join(out) + "\n")
    cfg = load_cloud_config(cfg_path)
    js = cfg.jetstream
    assert js is not None
    assert js.servers == ("nats://nats-1:4222", "nats://nats-2:4222", "nats://nats-3:4222")
    assert (js.stream, js.partitions, js.replicas) == ("FIELDLINE", 64, 3)
    assert (js.priority_timeout_ms, js.snapshot_interval_ms, js.max_age_s) == (
        5_000, 10_000, 7 * 86_400)
    assert js.max_bytes == 50_000_000_000
    for bad in ('"1KB"', '"a lot"', "-5"):
        cfg_path.write_text("\n".join(out).replace('retention_bytes = "50GB"',
                                                   f"retention_bytes = {bad}") + "\n")
        with pytest.raises(ConfigError) as info:
            load_cloud_config(cfg_path)
        assert info.value.key == "engine.retention_bytes", bad
    # TLS files for NATS: the servers must say tls:// (nats-py uses TLS only with a server
    # that requires it; a nats:// URL with a CA file would look encrypted and might not be)
    tls = "\n".join(out).replace('kind = "jetstream"', 'kind = "jetstream"\nca_file = "/ca.crt"')
    cfg_path.write_text(tls + "\n")
    with pytest.raises(ConfigError) as info:
        load_cloud_config(cfg_path)
    assert info.value.key == "engine.servers"
    assert "with engine.ca_file list the NATS servers as tls://" in str(info.value)
    # one login for the cluster: it goes to every node, the ones the cluster announces too
    login = "\n".join(out).replace("nats://nats-1", "nats://fl:pw1@nats-1")
    cfg_path.write_text(login.replace("nats://nats-2", "nats://fl:pw2@nats-2") + "\n")
    with pytest.raises(ConfigError) as info:
        load_cloud_config(cfg_path)
    assert info.value.key == "engine.servers"
    assert "take one login" in str(info.value)
    cfg_path.write_text(login.replace("nats://nats-2", "nats://fl:pw1@nats-2") + "\n")
    assert load_cloud_config(cfg_path).jetstream is not None
    cfg_path.write_text(tls.replace("nats://", "tls://") + "\n")
    js = load_cloud_config(cfg_path).jetstream
    assert js is not None
    assert (js.servers[0], js.ca_file, js.cert_file) == ("tls://nats-1:4222", "/ca.crt", None)
    # the shipped TLS lines, un-commented with the servers as they say
    tls_at = lines.index("# TLS to the NATS servers: list them as tls://host:4222 (the servers "
                         "must require TLS: a tls {} block)")
    for i in range(tls_at + 1, tls_at + 4):
        out[i] = lines[i][2:]
    cfg_path.write_text("\n".join(out).replace("nats://", "tls://") + "\n")
    js = load_cloud_config(cfg_path).jetstream
    assert js is not None
    assert (js.ca_file, js.cert_file, js.key_file) == (
        "/etc/fieldline/tls/nats-ca.crt", "/etc/fieldline/tls/worker.crt",
        "/etc/fieldline/tls/worker.key")


def test_a_fleet_topic_with_an_unknown_placeholder_or_a_wildcard_is_refused(
        tmp_path: Path) -> None:
    shipped = (ROOT / "deploy" / "fleet.toml").read_text()
    assert 'topic = "devices/{device}/readings"' in shipped
    for bad in ("devices/{devic}/readings", "devices/#/{device}", "devices/+/{device}", "{0}"):
        p = write(tmp_path, shipped.replace('topic = "devices/{device}/readings"',
                                            f'topic = "{bad}"'), "fleet.toml")
        with pytest.raises(ConfigError) as info:
            load_sim_config(p)
        assert info.value.key == "fleet.topic", bad


def test_the_shipped_fleet_publishes_where_the_shipped_gateway_listens() -> None:
    """deploy/fleet.toml's devices reach deploy/gateway.toml's agent: same gateway id, a topic
    its subscription matches, and the device id at the level it reads it from."""
    from paho.mqtt.client import topic_matches_sub

    from simulators.fleet import FleetSimulator

    sim_cfg = load_sim_config(ROOT / "deploy" / "fleet.toml")
    edge = load_edge_config(ROOT / "deploy" / "gateway.toml")
    spec = sim_cfg.spec
    assert edge.gateway in spec.gateway_ids()
    devices = [d for d, g in zip(FleetSimulator(spec, 0).device_ids,
                                 FleetSimulator(spec, 0).device_gateway, strict=True)
               if g == edge.gateway]
    assert devices
    for dev in devices[:20]:
        topic = spec.topic_template.format(device=dev, gateway=edge.gateway)
        assert any(topic_matches_sub(sub, topic) for sub in edge.topics), (topic, edge.topics)
        assert edge.device_topic_level is not None
        assert topic.split("/")[edge.device_topic_level] == dev


@pytest.mark.parametrize(("argv", "flag"), [
    (["demo", "--devices", "0"], "--devices"),
    (["demo", "--gateways", "-1"], "--gateways"),
    (["demo", "--duration", "-5"], "--duration"),
    (["demo", "--duration", "nan"], "--duration"),
    (["demo", "--window", "0"], "--window"),
    (["demo", "--view-port", "70000"], "--view-port"),
    (["demo", "--influx-url", "http://127.0.0.1:abc"], "--influx-url"),
    (["demo", "--mqtt-url", "mqtt://127.0.0.1:0"], "--mqtt-url"),
    (["view", "--influx-url", "http://127.0.0.1:99999"], "--influx-url"),
    (["view", "--influx-url", "http://127.0.0.1:8086", "--refresh", "0"], "--refresh"),
    (["simulate", "--config", "fleet.toml", "--duration", "0"], "--duration"),
    (["replay", "--csv", "x.csv", "--broker", "mqtt://h:abc"], "--broker"),
    (["replay", "--csv", "x.csv", "--broker", "mqtt://h:1", "--speed", "-3"], "--speed"),
    (["replay", "--csv", "x.csv", "--broker", "mqtt://h:1", "--speed", "fast"], "--speed"),
    (["grafana", "push", "--url", "grafana.local", "--influx-url", "http://x:8086"], "--url"),
    (["grafana", "export", "/proc/fieldline-cannot-be-here"], "dir"),
])
def test_bad_command_flags_fail_at_start_naming_the_flag(
        argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command checks its flags before it starts anything (a broker, InfluxDB, a fleet):
    a wrong one is exit status 2 and a message naming it, never a traceback."""
    from fieldline.cli import main

    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own refusal
        rc = int(exc.code or 0)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert flag in err, err
    assert "Traceback" not in err, err


def test_the_example_registry_is_what_the_shipped_configs_load(tmp_path: Path) -> None:
    """deploy/devices.example.csv, the registry an operator copies to the path both shipped
    configs name, loads as they load theirs (its kinds known to the shipped catalog), and the
    agent judges by it: a listed device's reading kept, a listed humidity sensor's 101 %
    refused as out of range, an unlisted device refused as unknown."""
    from dataclasses import replace

    from devices import rejects
    from devices.clock import ManualClock
    from devices.codecs import encode_single
    from edge.agent import EdgePipeline

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    example = deploy / "devices.example.csv"
    shipped = load_edge_config(deploy / "gateway.toml")
    assert shipped.registry_path == load_cloud_config(deploy / "cloud.toml").registry_path
    gateway = replace(shipped, registry_path=example, state_dir=tmp_path)
    registry = gateway.load_registry()
    assert registry is not None
    assert len(registry) == len(example.read_text().splitlines()) - 1
    t = 1_700_000_000_000
    p = EdgePipeline(gateway, ManualClock(now_ms=t))
    assert registry.get("gw-1-h0002") is not None
    p.process([(f"devices/{d}/readings", encode_single(d, kind, t, v, 1), t) for d, kind, v in (
        ("gw-1-t0001", "temperature", 21.5),
        ("gw-1-h0002", "humidity", 101.0),  # beyond what its kind can read (its low/high are
        # the cloud's alarm thresholds, not this)
        ("gw-9-x0001", "temperature", 21.5))])
    rep = p.ledger_report(changed_only=False)
    assert rep["devices"] == ["gw-1-t0001", "gw-1-h0002", "(no device)"], rep
    assert rep["accepted"] == [1, 0, 0], rep
    assert rep["rejected_by"] == {rejects.OUT_OF_RANGE: [0, 1, 0],
                                  rejects.UNKNOWN_DEVICE: [0, 0, 1]}, rep


def test_the_commented_rules_of_deploy_cloud_toml_load_as_written(tmp_path: Path) -> None:
    """deploy/cloud.toml ships no pattern rule but one commented example of each kind: with the
    rules un-commented as a user would, the file must load, one rule per kind as described."""
    text = (ROOT / "deploy" / "cloud.toml").read_text()
    assert load_cloud_config(ROOT / "deploy" / "cloud.toml").rules == []
    lines = text.splitlines()
    at = lines.index("# [[rules]]")
    out = lines[:at] + [ln[2:] if ln.startswith("# ") else "" if ln == "#" else ln
                        for ln in lines[at:]]
    cfg_path = tmp_path / "cloud.toml"
    cfg_path.write_text("\n".join(out) + "\n")
    rules = load_cloud_config(cfg_path).rules
    assert [r.kind for r in rules] == ["consecutive", "rate", "absence", "sequence", "site"]
    hot, fast, silent, seq, site = rules
    assert (hot.metric, hot.field, hot.above, hot.count, hot.level) == (
        "temperature", "max", 80.0, 3, "critical")
    assert (fast.above, fast.per_ms) == (2.0, 60_000)
    assert (silent.metric, silent.after_ms) == (None, 900_000)
    assert (seq.first, seq.then, seq.within_ms) == (
        "anomaly:pressure", "anomaly:temperature", 600_000)
    assert (site.event, site.devices, site.within_ms) == ("anomaly", 3, 300_000)


def _as_nobody(fn: Callable[[], str]) -> str:
    """``fn()`` in a child process that runs as uid/gid 65534 (nobody): what it returns, or
    the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            try:
                out = fn()
            except Exception as exc:  # reported to the parent as text
                out = f"{type(exc).__name__}: {exc}"
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        out = fh.read().decode()
    os.waitpid(pid, 0)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a child as another user: needs root")
def test_a_state_directory_left_by_a_run_as_another_user_fails_at_start_naming_the_fix() -> None:
    """The agent (or worker) run once by hand as root, then as the service's user: the state
    directory was writable, but the files the root run left in it (0600) were not, and the
    agent died at start with a traceback at the first one it read. Now: the key, a file, its
    owner and the command that fixes it; the directory itself owned by another, its owner. A
    state directory that is a file system's root has its ``lost+found`` (root's): no matter."""
    from devices.settings import usable_dir

    base = Path(tempfile.mkdtemp(prefix="fieldline-perm-"))  # under /tmp: nobody can enter
    try:
        base.chmod(0o755)
        state = base / "state"
        (state / "outbox").mkdir(parents=True)
        (state / "uplink.seq").write_text("1 2\n")
        (state / "outbox" / "seg-1").write_bytes(b"x")
        for p in (state, state / "outbox"):
            p.chmod(0o700)

        def check() -> str:
            usable_dir(state, "gateway.state_dir", "gw.toml", lock=".lock")
            return "usable"

        got = _as_nobody(check)  # all root's, 0700: the directory itself
        assert got.startswith("ConfigError"), got
        assert "'gateway.state_dir'" in got
        assert (f"{state} cannot be used: Permission denied ({state} is owned by root, mode "
                "0700; this process runs as nobody)") in got, got
        os.chown(state, 65534, 65534)  # the directory handed over, not what is in it
        got = _as_nobody(check)
        assert "'gateway.state_dir'" in got
        assert "holds 2 file(s) this process (user nobody) cannot read and write" in got, got
        assert "(owned by root, mode 0" in got
        assert f"`chown -R nobody: {state}`" in got
        assert "Traceback" not in got
        for p in [state, *state.rglob("*")]:
            os.chown(p, 65534, 65534)
        (state / "lost+found").mkdir(mode=0o700)  # a file system of its own: its, not ours
        assert _as_nobody(check) == "usable"
        for p in [state, *state.rglob("*")]:
            os.chown(p, 0, 0)
        usable_dir(state, "gateway.state_dir")  # root may, whoever owns them
    finally:
        shutil.rmtree(base)


@pytest.mark.parametrize("part", ["edge", "cloud"])
def test_a_state_file_of_the_wrong_kind_fails_at_start_naming_it(tmp_path: Path,
                                                                  part: str) -> None:
    """A directory where the agent or the worker keeps a file (a ``mkdir`` by hand, a backup
    restored into the wrong place), or a file where it keeps a directory: the worker died with
    a traceback at its first read of ``dedup.json``, and its saves failed at every interval.
    Now each of those names fails at start naming the key, the path and the way out; the same
    directory with each of the right kind is used as it is."""
    from cloud.worker import state_files
    from devices.settings import usable_dir
    from edge.agent import STATE_DIRS, STATE_FILES

    if part == "edge":
        key, files, dirs = "gateway.state_dir", STATE_FILES, STATE_DIRS
        assert {"windows.npz", "uplink.seq", "status.json"} <= set(files)
        assert {"outbox", "intake"} <= set(dirs)
    else:
        key, files, dirs = "worker.state_dir", state_files("cloud 1"), ()
        assert {"dedup.json", "detect.npz", "rules.json", "status-cloud_1.json"} <= set(files)
    wrong = [(name, True) for name in files] + [(name, False) for name in dirs]
    for i, (name, as_dir) in enumerate(wrong):
        state = tmp_path / f"state-{i}"
        state.mkdir()
        p = state / name
        if as_dir:
            p.mkdir()
            (p / "inside").write_text("kept")
        else:
            p.write_text("a file")
        with pytest.raises(ConfigError) as err:
            usable_dir(state, key, "x.toml", files=files, dirs=dirs)
        msg = str(err.value)
        assert key in msg, msg
        assert "x.toml" in msg, msg
        assert (f"{p} is {'' if as_dir else 'not '}a directory, where fieldline keeps a "
                f"{'file' if as_dir else 'directory'}: move it away (`mv {p} {p}.aside`)") in msg
        assert (p / "inside").exists() if as_dir else p.read_text() == "a file"  # untouched
        p.rename(p.with_name(name + ".aside"))
        if as_dir:
            p.write_bytes(b"")
        else:
            p.mkdir()
        usable_dir(state, key, "x.toml", files=files, dirs=dirs)
