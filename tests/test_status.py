"""`fieldline edge status`: what an operator standing beside a gateway learns from the gateway
itself, above all when its uplink is down and the cloud's view of it has stopped; and
`fieldline cloud status`: the same beside a cloud worker, above all when InfluxDB (where its
health goes) is not there."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from cloud import status as cloud
from cloud.sinks.influx_v1 import InfluxV1Client
from edge.status import (
    CRITICAL,
    OK,
    STATUS_FILE,
    UNKNOWN,
    WARNING,
    Disk,
    assess,
    status_command,
    write_status,
)
from fieldline.services import Mosquitto
from tests.rig import Rig, cloud_status, edge_status, status_of
from tests.test_faults import finish


def status_when(cfg: Path, cond: Callable[[int, dict[str, Any]], bool], timeout_s: float,
                command: Callable[..., tuple[int, str]] = edge_status,
                words: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
    """Poll `edge status --json` (or ``command``'s) until ``cond(code, doc)``; then the text
    form too, read again until it has ``words`` (a moment later than the JSON, an ack in
    flight when the link was cut may have emptied the outbox meanwhile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, out = command(cfg, "--json")
        doc = orjson.loads(out) if code != UNKNOWN else {}
        if doc and cond(code, doc):
            text = command(cfg)[1]
            if all(w in text for w in words):
                return code, doc, text
        assert time.monotonic() < deadline, f"status never got there: {code} {out[-3000:]}"
        time.sleep(0.3)


@pytest.mark.integration
def test_edge_status_tells_the_operator_at_the_gateway_what_the_cloud_cannot_see(
        rig: Rig) -> None:
    """A real agent, broker and worker: OK while results are acknowledged; WARNING, naming the
    uplink and what waits in the outbox, once the cloud is cut off (the cloud's own view of the
    gateway stops there); CRITICAL when the agent is SIGKILLed, with the outbox it left; OK again
    after a restart and the heal, every reading once; CRITICAL "stopped" after SIGTERM."""
    cfg = rig.gateway_cfg
    rig.start_chain(fleet_s=14)
    assert rig.agent is not None
    pid = rig.agent.pid

    def acked(code: int, d: dict[str, Any]) -> bool:
        return code == OK and d["agent"]["counters"].get("readings_acked", 0) > 0

    code, doc, text = status_when(cfg, acked, 30)
    c = doc["agent"]["counters"]
    assert doc["running"]
    assert doc["status"] == "OK"
    assert c["readings_received"] == (c["readings_accepted"] + c["rejected"]
                                      + c["late_dropped"] + c["duplicates"])
    assert text.startswith(f"gateway gw-1: OK, agent running (pid {pid})"), text
    assert f"intake   {rig.gw_broker.url} connected" in text
    assert "readings since" in text
    assert " received = " in text

    rig.proxy.set_mode("reset")  # the cloud broker unreachable: connections cut and refused

    def cut_off(code: int, d: dict[str, Any]) -> bool:
        return code == WARNING and d["agent"]["gauges"]["outbox_depth"] > 0 and any(
            "uplink to" in a["text"] for a in d["attention"])

    code, doc, text = status_when(cfg, cut_off, 30, words=("in the outbox, the oldest",))
    assert f"! uplink to mqtt://127.0.0.1:{rig.proxy.port} down for" in text, text
    assert "result batch" in text
    assert "in the outbox, the oldest" in text

    rig.kill_agent()  # SIGKILL, the uplink still down: the outbox holds what was not sent
    code, text = edge_status(cfg)
    assert code == CRITICAL, text
    assert "NOT RUNNING" in text, text
    assert f"(pid {pid}) is gone: killed or crashed" in text, text
    assert "in the outbox" in text

    rig.proxy.set_mode("pass")
    rig.start_agent()

    def drained(code: int, d: dict[str, Any]) -> bool:
        return (code == OK and d["agent"]["pid"] != pid
                and d["agent"]["gauges"]["outbox_depth"] == 0)

    status_when(cfg, drained, 60)  # the new agent, the backlog shipped
    rig.wait_fleet()
    finish(rig)  # every reading in InfluxDB once, the oracle clean, the ledger balanced

    rig._kill(rig.agent, signal.SIGTERM)
    code, text = edge_status(cfg)
    assert code == CRITICAL, text
    assert "NOT RUNNING" in text, text
    assert "the agent stopped at" in text, text


def merged(doc: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``over``'s keys, sections (dicts) merged one level deep."""
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


def base_status(**over: Any) -> dict[str, Any]:
    now = int(time.time() * 1000)
    doc: dict[str, Any] = {
        "gw": "gw-9", "ts": now, "state": "running", "pid": os.getpid(), "started": now - 60_000,
        "health_interval_ms": 5_000, "ack_timeout_ms": 30_000, "outbox_max_bytes": 2**20,
        "outbox_policy": "drop_oldest", "clock_unsynced": None,
        "links": {"intake": {"url": "mqtt://127.0.0.1:1883", "topics": ["devices/+/readings"],
                             "subscribed": True, "connected": True, "since": now - 60_000},
                  "uplink": {"url": "mqtts://cloud:8883", "connected": True,
                             "since": now - 60_000}},
        "counters": {"readings_received": 10, "readings_accepted": 10},
        "gauges": {"outbox_depth": 0, "outbox_fill": 0.0, "devices_seen": 2},
        "devices": {"silent": []},
    }
    return merged(doc, over)


@pytest.mark.parametrize(("over", "age_ms", "code", "words"), [
    ({}, 0, OK, "OK, agent running"),
    ({}, 16_000, CRITICAL, "has written no status for 16 s: hung or stopped"),
    ({"pid": 2**22 + 12345}, 0, CRITICAL, "is gone: killed or crashed"),
    ({"gauges": {"outbox_depth": 40, "outbox_fill": 0.6, "outbox_bytes": 600_000}}, 0, WARNING,
     "the outbox is 60% full (585.9 KiB of 1.0 MiB): when full, its policy (drop_oldest)"),
    ({"gauges": {"outbox_depth": 90, "outbox_fill": 0.93, "outbox_bytes": 970_000}}, 0,
     CRITICAL, "the outbox is 93% full"),
    ({"gauges": {"disk_blocked": 1}}, 0, CRITICAL, "the disk under the state directory fails"),
    # (times fixed at collection, long before the case runs: the words name no duration)
    ({"links": {"uplink": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": int(time.time() * 1000) - 9_000,
                           "error": "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                                    "failed"}}}, 0, WARNING,
     "([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed); 0 result batches"),
    ({"links": {"intake": {"url": "mqtt://127.0.0.1:1883", "connected": False,
                           "since": int(time.time() * 1000) - 9_000,
                           "error": "[Errno 111] Connection refused"}}}, 0, WARNING,
     "([Errno 111] Connection refused); topics"),
    ({"links": {"intake": {"url": "mqtt://127.0.0.1:1883", "connected": False,
                           "since": int(time.time() * 1000) - 9_000,
                           "error": "[Errno 111] Connection refused"}}}, 0, WARNING,
     "([Errno 111] Connection refused): devices' readings wait there"),
    ({"gauges": {"clock_unsynced": 1, "quarantine_held": 7},
      "clock_unsynced": "before 2024-01-01"}, 0, WARNING,
     "clock is not trusted (before 2024-01-01): 7 messages held"),
    ({"counters": {"identity_conflicts": 3}}, 0, WARNING, "another agent uses this gateway's id"),
    ({"cert": {"what": "in /etc/fieldline/gw.crt", "not_after": int(time.time() * 1000)
               + 12 * 86_400_000 + 3_600_000}}, 0, WARNING,
     "the TLS certificate in /etc/fieldline/gw.crt expires in 12 days"),
    ({"cert": {"what": "in /etc/fieldline/ca.crt", "not_after": int(time.time() * 1000)
               + 45 * 86_400_000}}, 0, OK, "OK, agent running"),
    ({"cert": {"what": "the cloud broker mqtts://cloud:8883 shows", "not_after":
               int(time.time() * 1000) - 3_600_000}}, 0, CRITICAL,
     "the TLS certificate the cloud broker mqtts://cloud:8883 shows expired at"),
    ({"gauges": {"devices_silent": 7, "devices_seen": 9},
      "devices": {"silent": [f"d{i}" for i in range(7)]}}, 0, OK,
     "7 of 9 devices silent: d0, d1, d2, d3, d4, ..."),
])
def test_the_status_verdict(tmp_path: Path, over: dict[str, Any], age_ms: int, code: int,
                            words: str) -> None:
    doc = base_status(**over)
    write_status(tmp_path, doc)
    got, text = status_command(tmp_path, as_json=False, now_ms=doc["ts"] + age_ms)
    assert got == code, text
    assert words in text, text


def test_a_status_that_cannot_be_read_is_unknown_and_says_why(tmp_path: Path) -> None:
    assert status_command(None, as_json=False)[0] == UNKNOWN
    code, text = status_command(tmp_path, as_json=False)
    assert code == UNKNOWN
    assert "has not run with this state directory" in text
    (tmp_path / STATUS_FILE).write_bytes(b'{"v": 1, "gw": "gw-9", "ts": 17')  # power cut
    code, text = status_command(tmp_path, as_json=False)
    assert code == UNKNOWN
    assert "cut short" in text
    code, text = edge_status(tmp_path / "nowhere.toml")
    assert code == UNKNOWN
    assert "nowhere.toml" in text


def test_a_disk_smaller_than_the_outbox_may_grow_is_a_warning(tmp_path: Path) -> None:
    """An SD card with less free than outbox.max_bytes fills before the outbox's policy (drop
    the oldest) can apply: said at once, not when the outage is long enough to fill it."""
    doc = base_status(outbox_max_bytes=256 * 2**20,
                      gauges={"outbox_depth": 3, "outbox_bytes": 3 * 2**20})
    roomy = Disk(tmp_path, free=10 * 2**30, total=30 * 2**30)
    assert assess(doc, doc["ts"], alive=True, disk=roomy).code == OK
    small = Disk(tmp_path, free=100 * 2**20, total=30 * 2**30)
    v = assess(doc, doc["ts"], alive=True, disk=small)
    assert v.code == WARNING
    assert "the outbox may grow to 256.0 MiB but" in v.attention[0][1]
    full = Disk(tmp_path, free=4096, total=30 * 2**30)
    v = assess(doc, doc["ts"] + 60_000, alive=True, disk=full)
    assert v.code == CRITICAL
    assert [t for _, t in v.attention][:2] == [
        "not running: the agent has written no status for 60 s: its disk is full (or it "
        "hung); 3 result batches (3.0 MiB) wait in the outbox, the oldest 0.0 s old",
        f"the filesystem under {tmp_path} is full (4.0 KiB free): the agent can log no readings "
        "and store no results, and holds its intake until there is room (devices' readings "
        "wait in the gateway broker)"]


def test_a_read_only_state_directory_is_critical_for_agent_and_worker(tmp_path: Path) -> None:
    """A filesystem the kernel made read-only (a failing SD card) is named, with the repair,
    whether the process still writes a status (it cannot) or not; a real read-only mount is
    seen as such, a writable directory not (and the probe leaves nothing behind)."""
    ro = Disk(tmp_path, free=10 * 2**30, total=30 * 2**30, read_only=True)
    doc = base_status()
    v = assess(doc, doc["ts"] + 60_000, alive=True, disk=ro)
    assert v.code == CRITICAL
    texts = [t for _, t in v.attention]
    assert texts[0] == ("not running: the agent has written no status for 60 s: its "
                        "filesystem is read-only")
    assert texts[1].startswith(f"the filesystem under {tmp_path} is read-only (the kernel "
                               "remounts a disk read-only after errors"), texts
    assert "Stop it, check the filesystem (fsck) or replace the card" in texts[1]
    worker = base_worker()
    v = cloud.assess(worker, worker["ts"], alive=True, disk=ro)
    assert v.code == CRITICAL
    assert "the worker cannot save which batches are in InfluxDB" in v.attention[0][1]
    assert not Disk.of(tmp_path).read_only  # type: ignore[union-attr]
    assert list(tmp_path.iterdir()) == []
    write_status(tmp_path, doc)
    code, out = status_command(tmp_path, as_json=True)
    assert (code, orjson.loads(out)["disk"]["read_only"]) == (OK, False), out
    if os.geteuid() != 0:
        return  # mounting needs root (CI runs as root)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], check=True)
    try:
        assert Disk.of(mnt).read_only  # type: ignore[union-attr]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# ---- fieldline cloud status ---------------------------------------------------------------


NOW = int(time.time() * 1000)  # the cases' times are relative to it (fixed at collection)


def base_worker(**over: Any) -> dict[str, Any]:
    now = NOW
    doc: dict[str, Any] = {
        "worker": "cloud-9", "ts": now, "state": "running", "pid": os.getpid(),
        "started": now - 60_000, "health_interval_ms": 5_000, "member": None, "cert": None,
        "dead_letters": "/var/lib/fieldline-cloud/dead-letter.jsonl",
        "links": {"ingest": {"url": "mqtts://cloud:8883", "connected": True,
                             "since": now - 60_000},
                  "influxdb": {"url": "http://influx:8086", "database": "fieldline", "ok": True,
                               "failing_since": None, "last_ok": now - 1_000,
                               "last_error": None}},
        "gateways": {"heard": 3, "quiet": 0, "quiet_names": []},
        "stats": {"batches_in": 10, "results_in": 300, "results_written": 300,
                  "points_written": 700, "buffered_points": 0},
    }
    return merged(doc, over)


def _ago(ms: int) -> int:
    return NOW - ms


@pytest.mark.parametrize(("over", "age_ms", "code", "words"), [
    ({}, 0, OK, "worker cloud-9: OK, worker running"),
    ({}, 16_000, CRITICAL, "the worker has written no status for 16 s: hung or stopped"),
    ({"pid": 2**22 + 12345}, 0, CRITICAL, "the worker (pid 4206649) is gone: killed or crashed"),
    ({"state": "stopped"}, 0, CRITICAL, "not running: the worker stopped at"),
    ({"links": {"ingest": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": _ago(12_000)}}}, 0, WARNING,
     "not connected to mqtts://cloud:8883 for 12 s: no results come in"),
    ({"links": {"ingest": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": _ago(95_000), "error": "[Errno -2] Name or service not "
                                                           "known"}}}, 0, CRITICAL,
     "not connected to mqtts://cloud:8883 for 95 s ([Errno -2] Name or service not known): "),
    ({"links": {"ingest": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": _ago(95_000), "error": "x"}}}, 0, CRITICAL,
     " (x)\nresults  "),
    ({"links": {"influxdb": {"url": "http://influx:8086", "ok": False,
                             "failing_since": _ago(5_000), "last_error": "connection refused"}},
      "stats": {"buffered_points": 4200}}, 0, WARNING,
     "writes to InfluxDB at http://influx:8086 have failed for 5.0 s (connection refused): "
     "4,200 points wait in memory"),
    ({"links": {"influxdb": {"url": "http://influx:8086", "ok": False,
                             "failing_since": _ago(40 * 60_000),
                             "last_error": '(503): {"error":"unavailable"}'}}},
     0, CRITICAL, 'have failed for 40 min ((503): {"error":"unavailable"})'),
    ({"gateways": {"heard": 5, "quiet": 2, "quiet_names": ["gw-3", "gw-1"]}}, 0, WARNING,
     "2 of 5 gateways heard in the last 24.0 h have sent no health report for 10 min "
     "(down, or their uplink): gw-3, gw-1"),
    ({"gateways": {"heard": 50, "quiet": 30, "quiet_names": [f"g{i}" for i in range(20)]}},
     0, WARNING, "g18, g19, ..."),
    ({"clocks": {"off": 3, "off_by": {"gw-9": -259_200_000, "gw-2": 300_000}}}, 0, WARNING,
     "3 gateway clocks are more than 60 s off the worker's (by the time their health reports "
     "take): gw-9 (3.0 days behind), gw-2 (5 min ahead), ...; what they stamp with their own "
     "time (readings without a time of their own) is misplaced by as much: check their time "
     "sync (NTP, UDP 123)"),
    ({"stats": {"points_rejected": 12}}, 0, WARNING,
     "12 points InfluxDB refused for good (dead-lettered: see "
     "/var/lib/fieldline-cloud/dead-letter.jsonl) since the worker started"),
    ({"stats": {"batch_conflicts": 2}}, 0, WARNING, "two agents use one gateway id"),
    ({"stats": {"acks_refused": 4}}, 0, WARNING, "its ACL must let the worker publish"),
    ({"stats": {"engine_replicas_behind": 1}}, 0, WARNING, "1 JetStream replica is not current"),
    ({"member": "0/2", "engine": {"since": _ago(8_000), "error": "the stream FIELDLINE cannot "
                                  "be set up: nats: timeout"}}, 0, WARNING,
     "JetStream has not served the worker for 8.0 s (the stream FIELDLINE cannot be set up: "
     "nats: timeout): no results come in"),
    ({"engine": {"since": _ago(45_000), "error": "no server answers"}}, 0, CRITICAL,
     "JetStream has not served the worker for 45 s (no server answers)"),
    ({"cert": {"what": "of the link to mqtts://cloud:8883 (ca.crt)",
               "not_after": _ago(-5 * 86_400_000 - 3_600_000)}}, 0, WARNING,
     "the TLS certificate of the link to mqtts://cloud:8883 (ca.crt) expires in 5 days"),
    ({"rules_idle": [{"rule": "hot", "why": "no result has metric 'temprature' (seen: t)"}],
      "stats": {"results_in": 1200}}, 0, WARNING,
     "rule 'hot' has judged none of the 1,200 results since the worker started: no result has "
     "metric 'temprature' (seen: t); it cannot fire"),
    ({"stats": {"rule_alerts_open": 2, "rule_alerts_opened": 5, "rule_alerts_resolved": 3}},
     0, OK, "rules    2 alerts open, 5 opened / 3 resolved since the start"),
    ({"stats": {"unknown_device_results": 9}}, 0, OK, "9 results of devices the registry"),
    ({"stats": {"alerts_open": 1, "alerts_opened": 4, "alerts_resolved": 3,
                "alerts_resolved_silent": 1}}, 0, OK,
     "alerts 1 open, 4 opened / 3 resolved (1 as silent: their series sent no more windows)"),
    ({"member": "1/3", "stats": {"partitions_owned": 0}}, 0, OK,
     "owns no partition: a hot standby"),
    ({"jetstream": True, "stats": {"partitions_owned": 0}}, 0, OK,
     "owns no partition: a hot standby"),  # not a member: a standby of every partition
    ({"jetstream": True, "stats": {"partitions_owned": 3}}, 0, OK,
     "engine   3 partitions owned"),
])
def test_the_cloud_status_verdict(tmp_path: Path, over: dict[str, Any], age_ms: int, code: int,
                                  words: str) -> None:
    judged_alone(tmp_path, base_worker(**over), "worker", age_ms, code, words)


def judged_alone(tmp_path: Path, doc: dict[str, Any], kind: str, age_ms: int, code: int,
                 words: str) -> None:
    """``doc`` (a worker's or the bridge's status) judged ``age_ms`` after it was written."""
    cloud.write_status(tmp_path, doc[kind], doc)
    got, text = cloud.status_command(tmp_path, as_json=False, now_ms=doc["ts"] + age_ms)
    assert got == code, text
    assert words in text, text


def test_cloud_status_reads_every_worker_of_a_shared_directory(tmp_path: Path) -> None:
    """Workers of one JetStream cluster may share a state directory: each writes its own
    status, the command judges each, exits with the worst, or reads one with --worker-id."""
    assert cloud.status_command(None, as_json=False)[0] == UNKNOWN
    code, text = cloud.status_command(tmp_path, as_json=False)
    assert code == UNKNOWN
    assert "no worker has run with this state directory" in text
    ok = base_worker(worker="w/0", member="0/2")
    ok["stats"]["partitions_owned"] = 32
    gone = base_worker(worker="w-1", member="1/2", pid=2**22 + 12345)
    cloud.write_status(tmp_path, "w/0", ok)
    cloud.write_status(tmp_path, "w-1", gone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status-w-1.json", "status-w_0.json"]
    code, text = cloud.status_command(tmp_path, as_json=False, now_ms=ok["ts"])
    assert code == CRITICAL, text
    assert "worker w-1 (member 1/2): CRITICAL, worker NOT RUNNING" in text
    assert "worker w/0 (member 0/2): OK, worker running" in text
    assert "engine   32 partitions owned" in text
    code, out = cloud.status_command(tmp_path, worker="w/0", as_json=True, now_ms=ok["ts"])
    assert code == OK
    doc = orjson.loads(out)
    assert [w["worker"]["worker"] for w in doc["workers"]] == ["w/0"]
    (tmp_path / "status-w-1.json").write_bytes(b'{"v": 1, "worker": "w-1", "ts": 17')
    code, text = cloud.status_command(tmp_path, as_json=False, now_ms=ok["ts"])
    assert code == UNKNOWN
    assert "cut short" in text
    assert "worker w/0 (member 0/2): OK" in text  # the other one still judged


def base_bridge(**over: Any) -> dict[str, Any]:
    now = NOW
    doc: dict[str, Any] = {
        "kind": "bridge", "bridge": "fieldline-bridge-cloud-9", "ts": now, "state": "running",
        "pid": os.getpid(), "started": now - 60_000, "health_interval_ms": 5_000, "cert": None,
        "links": {"broker": {"url": "mqtts://cloud:8883", "connected": True,
                             "since": now - 60_000},
                  "nats": {"url": "nats://n1:4222, nats://n2:4222", "connected": True,
                           "since": now - 60_000}},
        "store": {"ok": True, "failing_since": None, "last_ok": now - 500, "last_error": None},
        "stats": {"forwarded": 120, "acks_back": 60, "rejected": 0, "publish_retries": 0,
                  "waiting": 0},
    }
    return merged(doc, over)


@pytest.mark.parametrize(("over", "age_ms", "code", "words"), [
    ({}, 0, OK, "bridge fieldline-bridge-cloud-9: OK, bridge running"),
    ({}, 0, OK, "stored   120 messages in JetStream, the last stored at"),
    ({}, 16_000, CRITICAL, "the bridge has written no status for 16 s: hung or stopped"),
    ({"pid": 2**22 + 12345}, 0, CRITICAL,
     "the bridge (pid 4206649) is gone: killed or crashed; no result reaches a worker"),
    ({"state": "stopped"}, 0, CRITICAL, "not running: the bridge stopped at"),
    ({"links": {"broker": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": _ago(7_000)}}}, 0, WARNING,
     "not connected to the cloud broker mqtts://cloud:8883 for 7.0 s"),
    ({"links": {"broker": {"url": "mqtts://cloud:8883", "connected": False,
                           "since": _ago(7_000), "error": "refused: Not authorized"}}}, 0,
     WARNING, "cloud broker mqtts://cloud:8883 for 7.0 s (refused: Not authorized): no result"),
    ({"links": {"nats": {"url": "nats://n1:4222", "connected": False,
                         "since": _ago(45_000)}}}, 0, CRITICAL,
     "not connected to NATS (nats://n1:4222) for 45 s: nothing is forwarded"),
    ({"store": {"ok": False, "failing_since": _ago(3_000), "last_error": "TimeoutError()"},
      "stats": {"waiting": 17}}, 0, WARNING,
     "JetStream has stored nothing for 3.0 s (TimeoutError()): no quorum"),
    ({"store": {"ok": False, "failing_since": _ago(120_000),
                "last_error": "ServiceUnavailableError"}}, 0, CRITICAL,
     "JetStream out of resources"),
    ({"store": {"ok": False, "failing_since": _ago(120_000), "last_error": "x"}}, 0, CRITICAL,
     "stored   120 messages in JetStream, FAILING since"),
    ({"stats": {"rejected": 3}}, 0, WARNING, "3 messages on topics that are not a gateway's"),
    ({"stats": {"too_large": 4}, "too_large": {"gateway": "gw-7", "kind": "results",
                                              "bytes": 1_500_000, "max_payload": 1_048_576,
                                              "ts": _ago(30_000)}}, 0, CRITICAL,
     "4 messages over the NATS servers' max_payload (1,048,576 bytes) not stored since the "
     "bridge started, the last 30 s ago: a results message of gateway gw-7, 1,500,000 bytes"),
    ({"stats": {"too_large": 1}, "too_large": {"gateway": "gw-7", "kind": "health",
                                              "bytes": 1_500_000, "max_payload": 1_048_576,
                                              "ts": _ago(11 * 60_000)}}, 0, WARNING,
     "1 message over the NATS servers' max_payload (1,048,576 bytes) not stored since the "
     "bridge started, the last 11 min ago: a health message"),
    ({"cert": {"what": "of the link to mqtts://cloud:8883 (ca.crt)",
               "not_after": _ago(86_400_000)}}, 0, CRITICAL,
     "the TLS certificate of the link to mqtts://cloud:8883 (ca.crt) expired"),
])
def test_the_bridge_status_verdict(tmp_path: Path, over: dict[str, Any], age_ms: int,
                                   code: int, words: str) -> None:
    judged_alone(tmp_path, base_bridge(**over), "bridge", age_ms, code, words)


def test_the_bridge_is_judged_with_the_workers_of_its_directory(tmp_path: Path) -> None:
    worker = base_worker()
    bridge = base_bridge(pid=2**22 + 12345)  # killed
    cloud.write_status(tmp_path, worker["worker"], worker)
    cloud.write_status(tmp_path, bridge["bridge"], bridge)
    code, text = cloud.status_command(tmp_path, as_json=False, now_ms=NOW)
    assert code == CRITICAL, text
    assert "worker cloud-9: OK, worker running" in text, text
    assert "bridge fieldline-bridge-cloud-9: CRITICAL, bridge NOT RUNNING" in text, text
    code, out = cloud.status_command(tmp_path, as_json=True, now_ms=NOW)
    doc = orjson.loads(out)
    assert doc["status"] == "CRITICAL"
    assert [(w["status"], "bridge" in w) for w in doc["workers"]] == [
        ("OK", False), ("CRITICAL", True)]


def test_the_status_commands_read_a_state_directory_named_in_place_of_a_config(
        tmp_path: Path) -> None:
    """`--state-dir` (a demo's, a copied one) is read without any config; `--worker-id` reads
    that worker and the bridge beside it, not the other workers of a shared directory."""
    now = int(time.time() * 1000)  # the commands judge by their own clock
    gw, shared = tmp_path / "gw", tmp_path / "cloud"
    gw.mkdir()
    shared.mkdir()
    write_status(gw, base_status(ts=now))
    worker = base_worker(ts=now)
    cloud.write_status(shared, worker["worker"], worker)
    cloud.write_status(shared, cloud.bridge_id(worker["worker"]),
                       base_bridge(ts=now, pid=2**22 + 12345))  # killed
    other = base_worker(ts=now, worker="cloud-10")
    cloud.write_status(shared, "cloud-10", other)
    code, text = status_of("edge", "--state-dir", str(gw))
    assert code == OK, text
    assert text.startswith("gateway gw-9: OK, agent running"), text
    code, text = status_of("cloud", "--state-dir", str(shared), "--worker-id", "cloud-9")
    assert code == CRITICAL, text
    assert "worker cloud-9: OK" in text, text
    assert "bridge fieldline-bridge-cloud-9: CRITICAL, bridge NOT RUNNING" in text, text
    assert "cloud-10" not in text, text
    code, text = status_of("cloud", "--state-dir", str(shared), "--worker-id", "cloud-10")
    assert (code, "bridge" in text) == (OK, False), text
    code, text = status_of("cloud", "--state-dir", str(shared))
    assert code == CRITICAL, text
    assert "worker cloud-10: OK" in text, text
    # one or the other: a state directory given and a config too is refused, not guessed
    code, text = status_of("cloud", "--state-dir", str(shared),
                           "--config", str(tmp_path / "cloud.toml"))
    assert code == 2, text
    assert "not allowed with argument" in text, text


def test_a_worker_names_the_gateways_it_stopped_hearing(tmp_path: Path) -> None:
    """Gateways whose health reports stopped for 10 minutes of the worker's clock (as the
    Grafana rule "Gateway not reporting" judges them), the longest quiet first; a replayed
    report (a takeover) is no proof of life; a restart forgets none of them, a day of
    silence does (as the rule)."""
    from cloud.config import CloudConfig, InfluxConfig
    from cloud.ingest import SourceMessage
    from cloud.sinks.base import MemorySink
    from cloud.worker import CloudWorker
    from devices.clock import ManualClock
    from devices.contract import HealthReport, health_topic
    from devices.mqtt import BrokerAddress
    from devices.registry import Registry

    clock = ManualClock()
    cfg = CloudConfig(worker_id="t", broker=BrokerAddress(host="127.0.0.1", port=1),
                      influx=InfluxConfig(), state_dir=tmp_path)
    worker = CloudWorker(cfg, clock=clock, registry=Registry(), sink=MemorySink(),
                         source=object())  # type: ignore[arg-type]
    pos = iter(range(1, 100))

    def heard(gw: str, *, replay: bool = False) -> None:
        msg = SourceMessage(0, next(pos), health_topic(gw),
                            HealthReport(gateway=gw, ts=clock.now_ms()).encode())
        worker.handle(replace(msg, replay=True) if replay else msg)

    for gw in ("gw-a", "gw-b", "gw-c"):
        heard(gw)
    clock.advance(4 * 60_000)
    heard("gw-b")
    clock.advance(7 * 60_000)  # gw-a and gw-c quiet for 11 minutes, gw-b for 7
    heard("gw-c", replay=True)
    heard("gw-a", replay=True)
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"] == {"heard": 3, "quiet": 2, "quiet_names": ["gw-a", "gw-c"]}
    assert doc["links"]["influxdb"]["ok"] is True
    v = cloud.assess(doc, clock.now_ms(), alive=True)
    assert v.code == WARNING
    assert "2 of 3 gateways" in v.attention[0][1]
    heard("gw-a")
    worker.write_status("stopped")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"]["quiet_names"] == ["gw-c"]
    assert doc["state"] == "stopped"

    # restarted (an upgrade) while gw-c is down: still named, not forgotten with the process,
    # nor is gw-b, gone quiet since (its last report heard by the worker before)
    clock.advance(4 * 60_000)
    worker = CloudWorker(cfg, clock=clock, registry=Registry(), sink=MemorySink(),
                         source=object())  # type: ignore[arg-type]
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"] == {"heard": 3, "quiet": 2, "quiet_names": ["gw-c", "gw-b"]}
    code, text = cloud.status_command(tmp_path, as_json=False, now_ms=clock.now_ms())
    assert code == WARNING, text
    assert "2 of 3 gateways heard in the last 24.0 h have sent no health report" in text, text
    # ... until the Grafana rule forgets them too: a day after their last report
    heard("gw-a")
    clock.advance(cloud.HEARD_FOR_MS - 30_000)
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"] == {"heard": 1, "quiet": 1, "quiet_names": ["gw-a"]}
    clock.advance(60_000)
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"] == {"heard": 0, "quiet": 0, "quiet_names": []}
    # a file it cannot use costs that memory only (said in the log), never the start
    heard("gw-d")
    worker.write_status("running")
    assert sorted(orjson.loads((tmp_path / "heard-t.json").read_bytes())["heard"]) == ["gw-d"]
    (tmp_path / "heard-t.json").write_bytes(b'{"v": 1, "heard": {"gw-d": [1')
    worker = CloudWorker(cfg, clock=clock, registry=Registry(), sink=MemorySink(),
                         source=object())  # type: ignore[arg-type]
    assert worker.gateways_heard == {}
    heard("gw-e")
    worker.write_status("running")
    doc = orjson.loads((tmp_path / "status-t.json").read_bytes())
    assert doc["gateways"]["heard"] == 1


def test_a_partitions_next_owner_names_the_gateways_that_went_quiet_before_it_took_over(
        tmp_path: Path) -> None:
    """JetStream: the gateways a partition's owner heard travel in its snapshot, so the worker
    that takes the partition over names one that went quiet before the takeover (it never
    hears that one itself); a report replayed after the snapshot counts as heard when the
    engine stored it, not when it is replayed; another partition's gateways stay out."""
    from cloud.config import CloudConfig, InfluxConfig
    from cloud.ingest import PartitionEvent, SourceMessage
    from cloud.sinks.base import MemorySink
    from cloud.worker import CloudWorker
    from devices.clock import ManualClock
    from devices.contract import HealthReport, health_topic
    from devices.mqtt import BrokerAddress
    from devices.registry import Registry

    class Partitioned:  # the partitioned source's side the worker uses here
        per_partition_state = True
        partitions = 4

    clock = ManualClock()

    def worker(name: str) -> CloudWorker:
        cfg = CloudConfig(worker_id=name, broker=BrokerAddress(host="127.0.0.1", port=1),
                          influx=InfluxConfig(), state_dir=tmp_path / name)
        return CloudWorker(cfg, clock=clock, registry=Registry(), sink=MemorySink(),
                           source=Partitioned())  # type: ignore[arg-type]

    def report(w: CloudWorker, gw: str, p: int, *, stored_ms: int | None = None) -> None:
        msg = SourceMessage(p, 1, health_topic(gw),
                            HealthReport(gateway=gw, ts=clock.now_ms()).encode(),
                            epoch=w.parts[p].epoch)
        w.handle(msg if stored_ms is None else replace(msg, replay=True, stored_ms=stored_ms))

    a, b = worker("a"), worker("b")
    for p in (1, 2):
        a._on_partition(PartitionEvent(p, True, epoch=1))
    report(a, "gw-quiet", 1)
    report(a, "gw-other", 2)
    clock.advance(3 * 60_000)
    report(a, "gw-live", 1)
    blob = a.parts[1].snapshot_bytes(a._heard_in(1))
    clock.advance(60_000)
    stored = clock.now_ms()  # gw-live reported once more after the snapshot, then a died
    clock.advance(2 * 60_000)
    b._on_partition(PartitionEvent(1, True, snapshot=blob, epoch=2))
    report(b, "gw-live", 1, stored_ms=stored)
    report(b, "gw-late", 1, stored_ms=0)  # the engine did not say when: not counted
    assert b.gateways_heard == {"gw-quiet": (stored - 4 * 60_000, 1),
                                "gw-live": (stored, 1)}
    clock.advance(5 * 60_000)  # gw-quiet silent for 11 minutes, gw-live for 7
    b.write_status("running")
    doc = orjson.loads((tmp_path / "b" / "status-b.json").read_bytes())
    assert doc["gateways"] == {"heard": 2, "quiet": 1, "quiet_names": ["gw-quiet"]}
    report(b, "gw-quiet", 1)  # back: heard now, whatever the snapshot said
    clock.advance(4 * 60_000)
    b.write_status("running")
    doc = orjson.loads((tmp_path / "b" / "status-b.json").read_bytes())
    assert doc["gateways"] == {"heard": 2, "quiet": 1, "quiet_names": ["gw-live"]}

@pytest.mark.integration
def test_cloud_status_tells_the_operator_what_influxdb_cannot_show(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> None:
    """A real worker, agent, brokers and InfluxDB (through a fault proxy): OK while results
    are written; InfluxDB cut off (where the worker's own health goes) is named with its error;
    the cloud broker stopped is named; SIGKILL and SIGTERM are told apart; every reading in
    InfluxDB once at the end."""
    rig = Rig(tmp_path, mosquitto_factory, influx_db, influx_proxy=True)
    try:
        cfg = rig.cloud_cfg
        rig.start_chain(fleet_s=25)
        assert rig.worker is not None
        pid = rig.worker.pid

        def written(code: int, d: dict[str, Any]) -> bool:
            w = d["workers"][0]["worker"]
            return (code == OK and w["stats"]["results_written"] > 0
                    and w["gateways"]["heard"] == 1)

        _code, _doc, text = cloud_status_when(cfg, written, 30)
        assert text.startswith(f"worker rig: OK, worker running (pid {pid})"), text
        assert f"ingest   {rig.cloud_broker.url} connected since" in text, text
        assert "database " + influx_db.database + ": writing, the last write at" in text, text

        assert rig.influx_proxy is not None
        rig.influx_proxy.set_mode("reset")

        def failing(code: int, d: dict[str, Any]) -> bool:
            return code in (WARNING, CRITICAL) and any(
                "writes to InfluxDB at" in a["text"] for a in d["workers"][0]["attention"])

        _code, _doc, text = cloud_status_when(cfg, failing, 30)
        assert f"writes to InfluxDB at http://127.0.0.1:{rig.influx_proxy.port} have failed " \
               "for" in text, text
        assert ": FAILING since" in text, text
        rig.influx_proxy.set_mode("pass")
        cloud_status_when(cfg, lambda c, _d: c == OK, 60)

        rig.cloud_broker.stop()

        def cut(code: int, d: dict[str, Any]) -> bool:
            return code in (WARNING, CRITICAL) and any(
                f"not connected to {rig.cloud_broker.url}" in a["text"]
                for a in d["workers"][0]["attention"])

        code, _doc, text = cloud_status_when(cfg, cut, 60)
        assert f"ingest   {rig.cloud_broker.url} DOWN since" in text, text
        rig.cloud_broker.start()
        cloud_status_when(cfg, lambda c, _d: c == OK, 60)

        rig.kill_worker()
        code, text = cloud_status(cfg)
        assert code == CRITICAL, text
        assert f"the worker (pid {pid}) is gone: killed or crashed" in text, text
        rig.start_worker()
        cloud_status_when(cfg, lambda c, d: c == OK and d["workers"][0]["worker"]["pid"] != pid,
                          60)
        rig.wait_fleet()
        finish(rig)
        rig._kill(rig.worker, signal.SIGTERM)
        code, text = cloud_status(cfg)
        assert code == CRITICAL, text
        assert "not running: the worker stopped at" in text, text
    finally:
        rig.stop()


def cloud_status_when(cfg: Path, cond: Callable[[int, dict[str, Any]], bool], timeout_s: float
                      ) -> tuple[int, dict[str, Any], str]:
    return status_when(cfg, cond, timeout_s, cloud_status)
