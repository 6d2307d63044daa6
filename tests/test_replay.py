"""Replaying recorded data: any CSV, the catalog explained before anything is published, and
`fieldline replay` against the shipped gateway config (its topic, its catalog)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devices.catalog import Catalog
from fieldline.services import Mosquitto
from simulators.replay import WEEK_MS, catalog_report, load_csv, shift_to
from tests.rig import shipped_gateway

ROOT = Path(__file__).resolve().parent.parent


def test_any_csv_with_a_time_column_is_a_device(tmp_path: Path) -> None:
    p = tmp_path / "Pump 7.csv"
    p.write_text("time;Flow Rate;Temp;anomaly;comment\n"
                 "2024-05-01 10:00:00;12.5;40.1;0;ok\n"
                 "2024-05-01 10:00:01;12.7;40.2;1;spike\n")
    rec = load_csv(p)
    assert rec.device == "pump-7"
    assert [v for _, v in rec.rows] == [{"flow_rate": 12.5, "temp": 40.1},
                                        {"flow_rate": 12.7, "temp": 40.2}]
    assert [lab["type"] for lab in rec.labels] == ["label_row"]
    q = tmp_path / "epoch.csv"
    q.write_text("ts,value\n1714557600,1.0\n1714557600500,2.0\n")  # seconds, then ms
    assert [t for t, _ in load_csv(q).rows] == [1714557600000, 1714557600500]
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no time column"):
        load_csv(tmp_path / "bad.csv")
    excel = tmp_path / "excel.csv"  # "CSV UTF-8" as a spreadsheet saves it: a byte-order mark
    excel.write_bytes(b"\xef\xbb\xbftimestamp,value\r\n2024-05-01 10:00:00,1.5\r\n")
    assert load_csv(excel).rows == [(1714557600000, {"value": 1.5})]


def test_catalog_report_explains_rejections_and_infers_entries(tmp_path: Path) -> None:
    p = tmp_path / "rig.csv"
    p.write_text("timestamp,pressure,flow\n2024-05-01 10:00:00,0.3,32\n"
                 "2024-05-01 10:00:01,0.4,31\n")
    rec = load_csv(p)
    strict = Catalog()
    lines, declare = catalog_report([rec], strict)
    text = "\n".join(lines)
    assert "pressure: 2 of 2 values are outside the catalog range 300..1100 hPa" in text
    assert "flow: not declared; every reading will be rejected as unknown_metric" in text
    lenient = Catalog(undeclared="accept")
    lines, _ = catalog_report([rec], lenient)
    assert any("flow: not declared; accepted without a range check" in x for x in lines)
    # the inferred entries are a valid [catalog] that admits the data
    import tomllib

    cat = Catalog.from_mapping(tomllib.loads(declare.replace("[catalog.", "[")))
    assert cat.get("flow") is not None
    assert cat["flow"].low <= 31 <= cat["flow"].high
    assert cat["pressure"].low <= 0.3 <= cat["pressure"].high


def test_event_time_moves_by_whole_weeks_to_just_before_now() -> None:
    p_rows = [(1_584_000_000_000, {"v": 1.0}), (1_584_000_060_000, {"v": 2.0})]
    from simulators.replay import Recording

    rec = Recording("d", Path("x.csv"), p_rows)
    now = 1_767_225_600_000
    shift = shift_to([rec], now)
    assert shift % WEEK_MS == 0
    assert now - WEEK_MS < p_rows[-1][0] + shift <= now


@pytest.mark.integration
def test_replay_command_backfills_into_the_shipped_gateway_topic_and_exits(
        mosquitto: Mosquitto, tmp_path: Path) -> None:
    csv = tmp_path / "boiler.csv"
    rows = 300
    csv.write_text("timestamp,water_temp,burner\n" + "".join(
        f"2024-05-01 {10 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d},{60 + i % 7},"
        f"{i % 2}\n" for i in range(rows)))
    got: list[tuple[str, dict[str, object]]] = []
    ready = threading.Event()
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, m: got.append((m.topic, orjson.loads(m.payload)))
    sub.on_subscribe = lambda *_: ready.set()
    sub.connect("127.0.0.1", mosquitto.port)
    sub.subscribe("devices/+/readings", qos=1)  # the shipped gateway's intake filter
    sub.loop_start()
    assert ready.wait(10)
    gateway = shipped_gateway(tmp_path, mosquitto.url)
    before = time.time_ns() // 1_000_000
    run = subprocess.run(
        [sys.executable, "-m", "fieldline.cli", "replay", "--csv", str(csv), "--broker",
         mosquitto.url, "--gateway-config", str(gateway)],
        capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert "water_temp: not declared; accepted without a range check" in run.stdout
    deadline = time.monotonic() + 20
    while len(got) < 2 * rows and time.monotonic() < deadline:
        time.sleep(0.05)
    sub.loop_stop()
    sub.disconnect()
    assert len(got) == 2 * rows
    assert {t for t, _ in got} == {"devices/boiler/readings"}
    ts = sorted({int(d["ts"]) for _, d in got})  # type: ignore[call-overload]
    assert len(ts) == rows
    assert ts[1] - ts[0] == 1_000
    assert before - WEEK_MS < ts[-1] <= before  # moved by whole weeks to just before now
