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

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from devices import status as st
from devices.status import (
    CLOCK_OFF_MS,
    CRITICAL,
    LEVELS,
    OK,
    UNKNOWN,
    WARNING,
    Disk,
    StatusUnreadableError,
    Verdict,
    at,
    duration,
    link_text,
    pid_alive,
    plural,
    size,
    told,
)

__all__ = ["CRITICAL", "OK", "STATUS_FILE", "UNKNOWN", "WARNING", "Disk", "assess",
           "status_command", "write_status"]

STATUS_FILE = "status.json"
OUTBOX_WARN, OUTBOX_CRITICAL = 0.5, 0.9  # outbox fill (of outbox.max_bytes)
WHO = "the agent"


def write_status(state_dir: Path, doc: Mapping[str, Any]) -> None:
    """Replace ``status.json`` whole (a reader sees the old file or the new one)."""
    st.write_status(state_dir / STATUS_FILE, doc)


def assess(doc: Mapping[str, Any], now_ms: int, *, alive: bool,
           disk: Disk | None = None) -> Verdict:
    """What the status says: running or not, and what needs attention (worst first)."""
    c: Mapping[str, Any] = doc.get("counters") or {}
    g: Mapping[str, Any] = doc.get("gauges") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    v = Verdict(OK, running=st.running(doc, now_ms, alive))
    depth, fill = int(g.get("outbox_depth", 0)), float(g.get("outbox_fill", 0.0))
    waiting = (f"{plural(depth, 'result batch', 'result batches')} "
               f"({size(g.get('outbox_bytes', 0))}) {'waits' if depth == 1 else 'wait'} in the "
               f"outbox" + (f", the oldest {duration(g.get('outbox_oldest_age_ms', 0))} old"
                            if depth else ""))
    if not v.running:
        why = st.why_not_running(doc, now_ms, WHO, alive=alive, disk=disk)
        v.add(CRITICAL, f"not running: {why}; {waiting}" if depth else f"not running: {why}")
    if disk is not None and disk.read_only:
        v.add(CRITICAL, st.read_only_text(
            disk, "the agent", "can log no readings and store no results, and holds its "
            "intake (devices' readings wait in the gateway broker; nothing it acknowledged is "
            "lost)"))
    elif disk is not None and disk.full:
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
        v.add(CRITICAL, "the disk under the state directory fails (full? read-only?): the "
                        "agent takes no readings until it can write again (disk_errors "
                        f"{int(c.get('disk_errors', 0)):,})")
    if fill >= OUTBOX_WARN:
        v.add(CRITICAL if fill >= OUTBOX_CRITICAL else WARNING,
              f"the outbox is {fill:.0%} full ({size(g.get('outbox_bytes', 0))} of "
              f"{size(doc.get('outbox_max_bytes', 0))}): when full, its policy "
              f"({doc.get('outbox_policy', '?')}) sheds results")
    up = links.get("uplink") or {}
    if v.running and not up.get("connected", True):
        v.add(WARNING, f"uplink to {up.get('url')} down for "
                       f"{duration(now_ms - int(up.get('since', now_ms)))}{st.because(up)}; "
                       f"{waiting}")
    intake = links.get("intake") or {}
    if v.running and not intake.get("connected", True):
        v.add(WARNING, f"not connected to the gateway broker {intake.get('url')} for "
                       f"{duration(now_ms - int(intake.get('since', now_ms)))}"
                       f"{st.because(intake)}: devices' "
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
    cloud_clock = doc.get("cloud_clock") or {}
    if abs(int(cloud_clock.get("offset_ms", 0))) >= CLOCK_OFF_MS:
        ago = duration(int(doc["ts"]) - int(cloud_clock.get("told", doc["ts"])))
        v.add(WARNING, f"the cloud worker finds the gateway's clock "
                       f"{told(int(cloud_clock['offset_ms']))} (told {ago} before this status, "
                       "from the time its health reports take): what the agent stamps with it "
                       "(readings without a time of their own) is misplaced by as much: check "
                       "its time sync (timedatectl; NTP, UDP 123 through the site's firewall)")
    st.judge_certificate(v, doc.get("cert"), now_ms)
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
    v.sort()
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
        return link_text(d, int(doc["ts"]))

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
        # a reading is in one result of each window spec (and in a revision of one): more
        # readings here than received is no double count
        f"cloud ({n('readings_acked')} readings in their window results)",
        f"outbox   {plural(int(g.get('outbox_depth', 0)), 'batch', 'batches')}, "
        f"{size(g.get('outbox_bytes', 0))} "
        f"({float(g.get('outbox_fill', 0)):.1%} of {size(doc.get('outbox_max_bytes', 0))})",
        f"disk     {disk.path}: {size(disk.free)} free of {size(disk.total)}" if disk else
        "disk     (not readable)",
        f"agent    {float(g.get('rss_mb', 0)):.1f} MiB resident, {int(g.get('open_windows', 0)):,}"
        f" open windows, watermark {duration(g.get('watermark_lag_ms', 0))} behind",
    ]
    cloud_clock = doc.get("cloud_clock")
    if cloud_clock:  # (an older worker does not tell)
        lines.append(f"clock    {told(int(cloud_clock['offset_ms']))} the cloud's, as its worker "
                     f"told {duration(int(doc['ts']) - int(cloud_clock['told']))} before this "
                     "status")
    return "\n".join(lines)


def status_command(state_dir: Path | None, *, as_json: bool,
                   now_ms: int | None = None) -> tuple[int, str]:
    """The text (or JSON) ``fieldline edge status`` prints, and its exit code."""
    if state_dir is None:
        return UNKNOWN, ("gateway.state_dir is not set: the agent keeps its state (and its "
                         "status) in a temporary directory; set gateway.state_dir")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        doc = st.read_status(state_dir / STATUS_FILE, WHO)
    except StatusUnreadableError as exc:
        return UNKNOWN, f"UNKNOWN: {exc}"
    disk = Disk.of(state_dir)
    verdict = assess(doc, now, alive=pid_alive(doc.get("pid")), disk=disk)
    if as_json:
        out = {"status": LEVELS[verdict.code], "running": verdict.running,
               "attention": [{"level": LEVELS[lv], "text": t} for lv, t in verdict.attention],
               "disk": disk.as_json() if disk else None,
               "agent": doc}
        return verdict.code, orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    return verdict.code, render(doc, verdict, now, disk)
