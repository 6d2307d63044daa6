"""The agent's status on the gateway itself: ``fieldline edge status``.

Health goes to the cloud over the uplink, which is exactly what is missing when an operator
stands beside a gateway whose uplink is down. So at every health report the agent also
writes its status, the same counters and gauges plus its links, into ``status.json`` in its
state directory (replaced whole, never fsynced: the file says how old it is, and a reader
that meets a torn one says so). ``fieldline edge status`` reads it, tells whether the agent
is running, and names what needs attention, with an exit code monitoring can use (0 ok,
1 warning, 2 critical, 3 unknown: the Nagios convention).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from devices.x509 import CERT_WARN_DAYS

STATUS_FILE = "status.json"
VERSION = 1
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
STALE_INTERVALS = 3  # reports missed before the agent counts as not running
STALE_MIN_MS = 15_000
OUTBOX_WARN, OUTBOX_CRITICAL = 0.5, 0.9  # outbox fill (of outbox.max_bytes)
DISK_FULL_BYTES = 1 << 20  # less free under the state directory: full for the agent


def write_status(state_dir: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``status.json`` whole (a reader sees the old file or the new one)."""
    tmp = state_dir / (STATUS_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps({"v": VERSION, **doc}))
    os.replace(tmp, state_dir / STATUS_FILE)


class StatusUnreadableError(Exception):
    """No status to judge (exit 3), with the reason."""


def read_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATUS_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StatusUnreadableError(
            f"no {path}: the agent has not run with this state directory yet (or is a "
            "version that wrote none)") from None
    except PermissionError:
        raise StatusUnreadableError(f"{path}: permission denied (the agent's state is "
                               "readable by its user only: run as root)") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StatusUnreadableError(f"{path} is unreadable (cut short: written as the machine "
                               "lost power?); the agent replaces it at its next report") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ts"), int):
        raise StatusUnreadableError(f"{path} is not an agent status")
    return doc


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


def duration(ms: float) -> str:
    s = max(0.0, ms / 1000)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    m = s / 60
    if m < 120:
        return f"{m:.0f} min"
    h = m / 60
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def at(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@dataclass
class Verdict:
    code: int
    running: bool
    attention: list[tuple[int, str]] = field(default_factory=list)

    def add(self, level: int, text: str) -> None:
        self.attention.append((level, text))
        self.code = max(self.code, level)


@dataclass(frozen=True)
class Disk:
    """The filesystem under the state directory, as the agent's user sees it."""

    path: Path
    free: int
    total: int

    @classmethod
    def of(cls, path: Path) -> Disk | None:
        try:
            du = shutil.disk_usage(path)
        except OSError:
            return None
        return cls(path, du.free, du.total)

    @property
    def full(self) -> bool:
        return self.free < DISK_FULL_BYTES


def assess(doc: Mapping[str, Any], now_ms: int, *, alive: bool,
           disk: Disk | None = None) -> Verdict:
    """What the status says: running or not, and what needs attention (worst first)."""
    c: Mapping[str, Any] = doc.get("counters") or {}
    g: Mapping[str, Any] = doc.get("gauges") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    age = now_ms - int(doc["ts"])
    stale_ms = max(STALE_MIN_MS, STALE_INTERVALS * int(doc.get("health_interval_ms", 5_000)))
    v = Verdict(OK, running=doc.get("state") == "running" and alive and age <= stale_ms)
    depth, fill = int(g.get("outbox_depth", 0)), float(g.get("outbox_fill", 0.0))
    waiting = (f"{plural(depth, 'result batch', 'result batches')} "
               f"({size(g.get('outbox_bytes', 0))}) {'waits' if depth == 1 else 'wait'} in the "
               f"outbox" + (f", the oldest {duration(g.get('outbox_oldest_age_ms', 0))} old"
                            if depth else ""))
    if not v.running:
        if doc.get("state") == "stopped":
            why = f"the agent stopped at {at(int(doc['ts']))}"
        elif not alive:
            why = f"the agent (pid {doc.get('pid')}) is gone: killed or crashed"
        elif disk is not None and disk.full:
            why = (f"the agent has written no status for {duration(age)}: its disk is full "
                   "(or it hung)")
        else:
            why = f"the agent has written no status for {duration(age)}: hung or stopped"
        v.add(CRITICAL, f"not running: {why}; {waiting}" if depth else f"not running: {why}")
    if disk is not None and disk.full:
        v.add(CRITICAL, f"the filesystem under {disk.path} is full ({size(disk.free)} free): "
                        "the agent can log no readings and store no results, and holds its "
                        "intake until there is room (devices' readings wait in the gateway "
                        "broker)")
    elif disk is not None and disk.free < int(doc.get("outbox_max_bytes", 0)) - int(
            g.get("outbox_bytes", 0)):
        v.add(WARNING, f"the outbox may grow to {size(doc.get('outbox_max_bytes', 0))} but "
                       f"{disk.path} has {size(disk.free)} free: lower outbox.max_bytes or "
                       "free space, or the disk fills before the outbox's policy applies")
    elif g.get("disk_blocked"):
        v.add(CRITICAL, "the disk under the state directory fails (full?): the agent takes "
                        "no readings until it can write again (disk_errors "
                        f"{int(c.get('disk_errors', 0)):,})")
    if fill >= OUTBOX_WARN:
        v.add(CRITICAL if fill >= OUTBOX_CRITICAL else WARNING,
              f"the outbox is {fill:.0%} full ({size(g.get('outbox_bytes', 0))} of "
              f"{size(doc.get('outbox_max_bytes', 0))}): when full, its policy "
              f"({doc.get('outbox_policy', '?')}) sheds results")
    up = links.get("uplink") or {}
    if v.running and not up.get("connected", True):
        v.add(WARNING, f"uplink to {up.get('url')} down for "
                       f"{duration(now_ms - int(up.get('since', now_ms)))}; {waiting}")
    intake = links.get("intake") or {}
    if v.running and not intake.get("connected", True):
        v.add(WARNING, f"not connected to the gateway broker {intake.get('url')} for "
                       f"{duration(now_ms - int(intake.get('since', now_ms)))}: devices' "
                       "readings wait there (those its queue limits drop are lost)")
    elif v.running and not intake.get("subscribed", True):
        v.add(WARNING, f"the gateway broker {intake.get('url')} has not acknowledged the "
                       "agent's subscription: devices' messages reach nobody")
    if v.running and g.get("acks_overdue"):
        v.add(WARNING, f"{plural(int(g['acks_overdue']), 'batch', 'batches')} sent but not "
                       f"acknowledged within "
                       f"{duration(int(doc.get('ack_timeout_ms', 30_000)))} (the oldest "
                       f"{duration(g.get('ack_wait_ms', 0))}): is a cloud worker running?")
    if g.get("clock_unsynced"):
        held = plural(int(g.get("quarantine_held", 0)), "message", "messages")
        v.add(WARNING, f"the gateway's clock is not trusted ({doc.get('clock_unsynced')}): "
                       f"{held} held until it is")
    cert = doc.get("cert")
    if cert:
        left = (int(cert["not_after"]) - now_ms) / 86_400_000
        if left < 0:
            v.add(CRITICAL, f"the TLS certificate {cert['what']} expired at "
                            f"{at(int(cert['not_after']))}: the link using it fails its "
                            "handshake until it is renewed")
        elif left < CERT_WARN_DAYS:
            v.add(WARNING, f"the TLS certificate {cert['what']} expires in {left:.0f} "
                           f"days ({at(int(cert['not_after']))}): renew it before, or the "
                           "link using it fails")
    if g.get("backpressure"):
        v.add(WARNING, "backpressure: the agent takes readings more slowly than they come")
    for key, text in (
            ("identity_conflicts", "acks of batches this agent never sent: another agent "
                                   "uses this gateway's id or a copy of its state directory"),
            ("internal_errors", "internal errors (see the journal)"),
            ("readings_shed", "readings whose windows the outbox shed (full or too old)"),
            ("uplink_size_disconnects", "uplink disconnects after a batch above the cloud "
                                        "broker's message size limit"),
            ("batches_rejected_by_cloud", "result batches the cloud refused")):
        if c.get(key):
            v.add(WARNING, f"{int(c[key]):,} {text} since the agent started")
    silent = int(g.get("devices_silent", 0))
    if silent:
        names = list((doc.get("devices") or {}).get("silent") or [])
        shown = ", ".join(str(n) for n in names[:5]) + (", ..." if silent > 5 else "")
        v.add(OK, f"{silent:,} of {int(g.get('devices_seen', 0)):,} devices silent: {shown}")
    v.attention.sort(key=lambda a: -a[0])
    return v


def render(doc: Mapping[str, Any], verdict: Verdict, now_ms: int,
           disk: Disk | None = None) -> str:
    c: Mapping[str, Any] = doc.get("counters") or {}
    g: Mapping[str, Any] = doc.get("gauges") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    started = int(doc.get("started", doc["ts"]))
    head = (f"running (pid {doc.get('pid')}), up {duration(now_ms - started)}"
            if verdict.running else "NOT RUNNING")
    lines = [f"gateway {doc.get('gw')}: {LEVELS[verdict.code]}, agent {head}; "
             f"status of {at(int(doc['ts']))} ({duration(now_ms - int(doc['ts']))} ago)"]
    for level, text in verdict.attention:
        lines.append(f"  {'!' if level >= WARNING else '-'} {text}")
    intake, up = links.get("intake") or {}, links.get("uplink") or {}

    def link(d: Mapping[str, Any]) -> str:
        state = "connected" if d.get("connected") else "DOWN"
        return f"{d.get('url')} {state} since {at(int(d.get('since', doc['ts'])))}"

    def n(key: str) -> str:
        return f"{int(c.get(key, 0)):,}"

    rejected = {k[len("rejected_"):]: int(v) for k, v in c.items()
                if k.startswith("rejected_") and v}
    lines += [
        f"intake   {link(intake)}; topics {', '.join(intake.get('topics', []))}",
        f"devices  {int(g.get('devices_seen', 0)):,} seen, {int(g.get('devices_silent', 0)):,} "
        f"silent, {int(g.get('devices_skewed', 0)):,} with skewed clocks"
        + (f"; {n('devices_released')} gone for good gave their ids to new ones"
           if c.get("devices_released") else ""),
        f"readings since {at(started)}: {n('readings_received')} received = "
        f"{n('readings_accepted')} accepted + {n('rejected')} rejected + "
        f"{n('late_dropped')} too late + {n('duplicates')} duplicates",
    ]
    if rejected:
        lines.append("         rejected: " + ", ".join(
            f"{k} {v:,}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1])))
    lines += [
        f"uplink   {link(up)}; "
        f"{plural(int(c.get('batches_acked', 0)), 'batch', 'batches')} acknowledged by the "
        f"cloud ({n('readings_acked')} readings)",
        f"outbox   {plural(int(g.get('outbox_depth', 0)), 'batch', 'batches')}, "
        f"{size(g.get('outbox_bytes', 0))} "
        f"({float(g.get('outbox_fill', 0)):.1%} of {size(doc.get('outbox_max_bytes', 0))})",
        f"disk     {disk.path}: {size(disk.free)} free of {size(disk.total)}" if disk else
        "disk     (not readable)",
        f"agent    {float(g.get('rss_mb', 0)):.1f} MiB resident, {int(g.get('open_windows', 0)):,}"
        f" open windows, watermark {duration(g.get('watermark_lag_ms', 0))} behind",
    ]
    return "\n".join(lines)


def status_command(state_dir: Path | None, *, as_json: bool,
                   now_ms: int | None = None) -> tuple[int, str]:
    """The text (or JSON) ``fieldline edge status`` prints, and its exit code."""
    if state_dir is None:
        return UNKNOWN, ("gateway.state_dir is not set: the agent keeps its state (and its "
                         "status) in a temporary directory; set gateway.state_dir")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        doc = read_status(state_dir)
    except StatusUnreadableError as exc:
        return UNKNOWN, f"UNKNOWN: {exc}"
    disk = Disk.of(state_dir)
    verdict = assess(doc, now, alive=pid_alive(doc.get("pid")), disk=disk)
    if as_json:
        out = {"status": LEVELS[verdict.code], "running": verdict.running,
               "attention": [{"level": LEVELS[lv], "text": t} for lv, t in verdict.attention],
               "disk": {"path": str(disk.path), "free": disk.free, "total": disk.total}
               if disk else None,
               "agent": doc}
        return verdict.code, orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    return verdict.code, render(doc, verdict, now, disk)
