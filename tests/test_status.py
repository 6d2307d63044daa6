"""`fieldline edge status`: what an operator standing beside a gateway learns from the gateway
itself, above all when its uplink is down and the cloud's view of it has stopped."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

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
from tests.rig import Rig, edge_status
from tests.test_faults import finish


def status_when(cfg: Path, cond: Callable[[int, dict[str, Any]], bool], timeout_s: float
                ) -> tuple[int, dict[str, Any], str]:
    """Poll `edge status --json` until ``cond(code, doc)``; then the text form too."""
    deadline = time.monotonic() + timeout_s
    while True:
        code, out = edge_status(cfg, "--json")
        doc = orjson.loads(out) if code != UNKNOWN else {}
        if doc and cond(code, doc):
            return code, doc, edge_status(cfg)[1]
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

    code, doc, text = status_when(cfg, cut_off, 30)
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
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {**doc[k], **v}
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize(("over", "age_ms", "code", "words"), [
    ({}, 0, OK, "OK, agent running"),
    ({}, 16_000, CRITICAL, "has written no status for 16 s: hung or stopped"),
    ({"pid": 2**22 + 12345}, 0, CRITICAL, "is gone: killed or crashed"),
    ({"gauges": {"outbox_depth": 40, "outbox_fill": 0.6, "outbox_bytes": 600_000}}, 0, WARNING,
     "the outbox is 60% full (585.9 KiB of 1.0 MiB): when full, its policy (drop_oldest)"),
    ({"gauges": {"outbox_depth": 90, "outbox_fill": 0.93, "outbox_bytes": 970_000}}, 0,
     CRITICAL, "the outbox is 93% full"),
    ({"gauges": {"disk_blocked": 1}}, 0, CRITICAL, "the disk under the state directory fails"),
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
