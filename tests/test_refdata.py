"""Reference data that changes: the registry reloaded without a restart, joined as-of event time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cloud.config import CloudConfig, InfluxConfig
from cloud.ingest import SourceMessage
from cloud.sinks.base import MemorySink
from cloud.sinks.points import encode
from cloud.worker import CloudWorker
from devices.clock import ManualClock
from devices.contract import ResultBatch, ResultColumns, results_topic
from devices.mqtt import BrokerAddress

T = 1_700_000_000_000
HEADER = "device_id,gateway,site,kind,low,high,calibration_offset\n"


def batch(seq: int, start: int) -> ResultBatch:
    one = np.array([0], np.int64)
    res = ResultColumns(
        device=one, metric=one, start=np.array([start], np.int64),
        width=np.array([1_000], np.int64), rev=one, count=np.array([4], np.int64),
        sum=np.array([80.0]), min=np.array([19.0]), max=np.array([21.0]),
        mean=np.array([20.0]), m2=np.array([0.5]), first_ts=np.array([start], np.int64),
        first=np.array([19.0]), last_ts=np.array([start + 900], np.int64),
        last=np.array([21.0]))
    return ResultBatch(gateway="gw-1", seq=seq, watermark=0, sent_ms=start,
                       devices=["dev-1"], metrics=["temperature"], results=res)


def sites(sink_lines: list[str]) -> dict[int, tuple[str, float]]:
    """aggregates point time -> (site tag, mean)."""
    out = {}
    for ln in sink_lines:
        if ln.startswith("aggregates,"):
            tags = dict(t.split("=", 1) for t in ln.split(" ", 1)[0].split(",")[1:])
            mean = float(ln.split("mean=", 1)[1].split(",", 1)[0])
            out[int(ln.rsplit(" ", 1)[1])] = (tags["site"], mean)
    return out


def test_registry_reloads_and_joins_as_of_event_time(tmp_path: Path) -> None:
    reg = tmp_path / "devices.csv"
    reg.write_text(HEADER + "dev-1,gw-1,hall,temperature,,,0\n")
    clock = ManualClock(T + 60_000)
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url="http://127.0.0.1:1"), registry_path=reg),
        clock=clock, sink=MemorySink(), source=object())  # type: ignore[arg-type]

    def send(seq: int, start: int) -> None:
        worker.handle(SourceMessage(0, seq, results_topic("gw-1"), batch(seq, start).encode()))

    send(0, T + 50_000)
    # the device moves to the roof, recalibrated: a new file, no restart
    reg.write_text(HEADER + "dev-1,gw-1,roof,temperature,,,1.5\n")
    os.utime(reg, ns=(T * 1_000_000, T * 1_000_000))  # a stamp the worker has not seen
    worker._check_registry()
    assert worker.stats()["registry_reloads"] == 1
    send(1, T + 61_000)  # after the change
    send(2, T + 55_000)  # late: a window from before the change keeps the record of then
    # a broken file is refused, naming the row; the registry in force stays
    reg.write_text(HEADER + "dev-1,gw-1,roof,temperature,5,1,0\n")
    os.utime(reg, ns=(T * 1_000_000 + 1, T * 1_000_000 + 1))
    worker._check_registry()
    send(3, T + 62_000)
    s = worker.stats()
    assert s["registry_reload_errors"] == 1
    assert worker.registry.last_error is not None
    assert "devices.csv" in worker.registry.last_error
    got = sites(encode(worker.writer.pending()))
    assert got == {T + 50_000: ("hall", 20.0), T + 61_000: ("roof", 21.5),
                   T + 55_000: ("hall", 20.0), T + 62_000: ("roof", 21.5)}


def test_sighup_reloads_on_request(tmp_path: Path) -> None:
    reg = tmp_path / "devices.csv"
    reg.write_text(HEADER + "dev-1,gw-1,hall,temperature,,,0\n")
    worker = CloudWorker(
        CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                    influx=InfluxConfig(url="http://127.0.0.1:1"), registry_path=reg),
        clock=ManualClock(T), sink=MemorySink(), source=object())  # type: ignore[arg-type]
    worker._check_registry()
    assert worker.stats()["registry_reloads"] == 0  # nothing changed, nothing reloaded
    worker.request_reload()
    worker._check_registry()
    assert worker.stats()["registry_reloads"] == 1
