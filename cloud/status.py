"""A cloud worker's status on its own machine: ``fieldline cloud status``.

The worker's health goes into InfluxDB, which is exactly what is missing when InfluxDB is
down, refuses the worker, or when the worker itself hangs. So at every health report the
worker also replaces ``status-<worker id>.json`` in its state directory (the workers of a
JetStream cluster may share one directory, each under its own name): its links (the broker
or NATS it reads, the InfluxDB it writes), the gateways it hears from, and its counters.
``fieldline cloud status`` reads every such file there (or one worker's), says whether each
worker runs and what needs attention, worst first, with the Nagios exit code of the worst.
The bridge from the cloud broker to JetStream (cloud/bridge.py), which writes nothing to
InfluxDB at all, writes ``status-fieldline-bridge-<worker id>.json`` there alike (``"kind":
"bridge"``) and is judged with the workers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from cloud.gatewayclock import CLOCK_OFF_MS, told
from cloud.panels import REPORTERS_FOR_S
from devices import status as st
from devices.status import CRITICAL, OK, UNKNOWN, WARNING, Verdict, duration, plural, size

__all__ = ["CRITICAL", "OK", "UNKNOWN", "WARNING", "assess", "assess_bridge", "bridge_id",
           "heard_path", "load_heard", "save_heard", "status_command", "status_path",
           "write_status"]

WHO = "the worker"
BRIDGE = "the bridge"
DOWN_CRITICAL_MS = 30_000  # a link down (or InfluxDB failing) this long is critical, not a blip
QUIET_MS = 10 * 60_000  # a gateway with no health report this long is not reporting (the
# Grafana rule "Gateway not reporting" uses the same, panels.REPORTS_WITHIN)
QUIET_SHOWN = 20  # gateways named in a status (the count is always whole)
# a message over NATS's max_payload within this long makes the bridge critical (its agent sends
# a results batch again every ack_timeout until it is stored); older ones are a warning
TOO_LARGE_FOR_MS = 10 * 60_000
# a gateway heard is remembered this long after its last health report, across the worker's
# restarts (its own file in the state directory): one that went quiet just before a restart
# is still named after it. As long as the Grafana rule keeps one (panels.REPORTERS_FOR_S)
HEARD_FOR_MS = REPORTERS_FOR_S * 1000

# counters since the worker started that need the operator: (key, what it means). Not the
# acks it could not send: they go with its broker being down (said as such while it is), and
# the gateways send those batches again; counting them for good would keep a worker in WARNING
# after every broker restart
SINCE_START = (
    ("internal_errors", "internal errors (see the journal)"),
    ("batch_conflicts", "batches under a number another batch of the same gateway has: two "
                        "agents use one gateway id, or a copy of its state directory"),
    ("points_rejected", "points InfluxDB refused for good (dead-lettered: see {dead_letters})"),
    ("rejected_messages", "uplink messages the worker could not read (counted by reason in "
                          "its health: rejected_*)"),
    ("acks_refused", "acknowledgements the broker refused (its ACL must let the worker publish "
                     "fieldline/v1/<gateway>/ack)"),
    ("state_save_errors", "failures to save which batches are in InfluxDB to its state "
                          "directory (a restart then may write some batches again)"),
    ("detector_snapshot_errors", "failures to save the detectors' state (a restart then "
                                 "relearns from the last saved one)"),
    ("rule_state_save_errors", "failures to save the pattern rules' state (a restart then "
                               "goes on from the last saved one: an alert opened since may "
                               "stay open)"),
    ("registry_reload_errors", "reloads of the device registry that failed (the reference "
                               "data loaded before is kept)"),
    ("rule_reload_errors", "reloads of the rules (SIGHUP) whose config could not be read (the "
                           "rules before go on)"),
    ("partition_snapshot_errors", "partition snapshots JetStream did not take (a takeover "
                                  "replays more)"),
    ("dead_letter_file_errors", "dead-lettered points it could not write to {dead_letters}"),
)


def bridge_id(worker_id: str) -> str:
    """The bridge's name (its MQTT client id, and its status file's) beside ``worker_id``."""
    return f"fieldline-bridge-{worker_id}"


def status_path(state_dir: Path, worker_id: str) -> Path:
    return state_dir / f"status-{re.sub(r'[^A-Za-z0-9._-]', '_', worker_id)}.json"


def write_status(state_dir: Path, worker_id: str, doc: Mapping[str, Any]) -> None:
    st.write_status(status_path(state_dir, worker_id), doc)


def heard_path(state_dir: Path, worker_id: str) -> Path:
    """Where a worker keeps the gateways it heard (not a ``status-*.json``: not judged)."""
    return state_dir / f"heard-{re.sub(r'[^A-Za-z0-9._-]', '_', worker_id)}.json"


def save_heard(path: Path, heard: Mapping[str, tuple[int, int]]) -> None:
    """Replace ``path`` with gateway -> (its last health report by the worker's clock, its
    partition)."""
    st.write_status(path, {"heard": heard})


def load_heard(path: Path, now_ms: int) -> dict[str, tuple[int, int]]:
    """What :func:`save_heard` kept, less what was last heard over ``HEARD_FOR_MS`` ago; no
    file is nothing heard. Raises ``ValueError`` with the reason for a file it cannot use."""
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path} is unreadable ({exc})") from None
    heard = doc.get("heard") if isinstance(doc, dict) else None
    if not isinstance(heard, dict):
        raise ValueError(f"{path} holds no gateways heard")
    out: dict[str, tuple[int, int]] = {}
    for gw, entry in heard.items():
        if (isinstance(entry, list) and len(entry) == 2
                and all(type(x) is int for x in entry) and now_ms - entry[0] <= HEARD_FOR_MS):
            out[gw] = (entry[0], entry[1])
    return out


def _down(since: object, now_ms: int) -> tuple[int, str]:
    """How bad a link down (or failing) since ``since`` is, and for how long, as text."""
    ms = now_ms - (since if isinstance(since, int) else now_ms)
    return CRITICAL if ms >= DOWN_CRITICAL_MS else WARNING, duration(ms)


def _not_connected(v: Verdict, link: Mapping[str, Any], to: str, then: str,
                   now_ms: int) -> None:
    """A link ``link`` to ``to`` that is down: since when, why if it knows, and ``then``."""
    if not link.get("connected", True):
        level, long = _down(link.get("since"), now_ms)
        v.add(level, f"not connected to {to} for {long}{st.because(link)}: {then}")


def assess(doc: Mapping[str, Any], now_ms: int, *, alive: bool,
           disk: st.Disk | None = None) -> Verdict:
    """What a worker's status says: running or not, and what needs attention (worst first)."""
    s: Mapping[str, Any] = doc.get("stats") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    v = Verdict(OK, running=st.running(doc, now_ms, alive))
    buffered = int(s.get("buffered_points", 0))
    if not v.running:
        why = st.why_not_running(doc, now_ms, WHO, alive=alive, disk=disk)
        v.add(CRITICAL, f"not running: {why}; the gateways keep what it had not written in "
                        "their outboxes until a worker acknowledges it")
    if disk is not None and disk.read_only:
        v.add(CRITICAL, st.read_only_text(
            disk, "the worker", "cannot save which batches are in InfluxDB, nor its "
            "detectors' state, nor dead letters, nor its status"))
    elif disk is not None and disk.full:
        v.add(CRITICAL, f"the filesystem under {disk.path} is full ({size(disk.free)} free): "
                        "the worker cannot save which batches are in InfluxDB, nor its "
                        "detectors' state, nor dead letters")
    if v.running:
        ingest = links.get("ingest") or {}
        _not_connected(v, ingest, str(ingest.get("url")), "no results come in (the gateways "
                       "keep them in their outboxes)", now_ms)
        engine = doc.get("engine")
        if ingest.get("connected", True) and isinstance(engine, Mapping):
            level, long = _down(engine.get("since"), now_ms)
            v.add(level, f"JetStream has not served the worker for {long} "
                         f"({engine.get('error')}): no results come in (the gateways keep "
                         "them in their outboxes)")
        influx = links.get("influxdb") or {}
        if not influx.get("ok", True):
            level, long = _down(influx.get("failing_since"), now_ms)
            error = str(influx.get("last_error") or "?")[:200]
            v.add(level, f"writes to InfluxDB at {influx.get('url')} have failed for {long} "
                         f"({error}): {buffered:,} points wait in memory and the gateways' "
                         "batches are not acknowledged until they are written")
        behind = int(s.get("engine_replicas_behind", 0))
        if behind:
            v.add(WARNING, f"{plural(behind, 'JetStream replica is', 'JetStream replicas are')}"
                           " not current: a node is down or lagging (the stream survives one "
                           "node less until it catches up)")
        quiet = doc.get("gateways") or {}
        n_quiet = int(quiet.get("quiet", 0))
        if n_quiet:
            names = list(quiet.get("quiet_names") or [])
            shown = ", ".join(str(n) for n in names) + (", ..." if n_quiet > len(names) else "")
            v.add(WARNING, f"{n_quiet:,} of {int(quiet.get('heard', 0)):,} gateways heard in "
                           f"the last {duration(HEARD_FOR_MS)} have sent no health report for "
                           f"{duration(QUIET_MS)} (down, or their uplink): {shown}")
        clocks = doc.get("clocks") or {}
        n_off, mine = int(clocks.get("off", 0)), int(clocks.get("worker_off_by", 0))
        if mine:
            v.add(WARNING, f"the gateways' clocks are {told(mine)} the worker's (their median): "
                           "this host's clock is off, or the worker stays that far behind what "
                           "they send; its lag rules and what it files at its own time are off "
                           "by as much: check this host's time sync (timedatectl) and the "
                           "worker's lag (the gateways are judged against each other meanwhile)")
        if n_off:
            by: Mapping[str, Any] = clocks.get("off_by") or {}
            shown = ", ".join(f"{gw} ({told(int(ms))})" for gw, ms in by.items()) + (
                ", ..." if n_off > len(by) else "")
            ref = "their peers' (the median)" if mine else "the worker's"
            v.add(WARNING, f"{plural(n_off, 'gateway clock is', 'gateway clocks are')} more "
                           f"than {duration(CLOCK_OFF_MS)} off {ref} (by the time their health "
                           f"reports take): {shown}; what they stamp "
                           "with their own time (readings without a time of their own) is "
                           "misplaced by as much: check their time sync (NTP, UDP 123)")
    st.judge_certificate(v, doc.get("cert"), now_ms)
    for r in doc.get("rules_idle") or []:
        v.add(WARNING, f"rule {r.get('rule')!r} has judged none of the "
                       f"{int(s.get('results_in', 0)):,} results since the worker started: "
                       f"{r.get('why')}; it cannot fire (`[[rules]]` in its config)")
    for key, text in SINCE_START:
        if s.get(key):
            v.add(WARNING, f"{int(s[key]):,} "
                           + text.format(dead_letters=doc.get("dead_letters") or "its log")
                           + " since the worker started")
    unknown = int(s.get("unknown_device_results", 0))
    if unknown:
        v.add(OK, f"{unknown:,} results of devices the registry does not know (written "
                  "without their reference data: add them to the registry)")
    if _partitioned(doc) and v.running and not int(s.get("partitions_owned", 0)):
        v.add(OK, "owns no partition: a hot standby (or the cluster has not assigned it yet)")
    v.sort()
    return v


def _partitioned(doc: Mapping[str, Any]) -> bool:
    """A JetStream worker (a member of the partitions, or a standby of them all): it owns
    partitions. Statuses written before the key existed name their member only."""
    return bool(doc.get("jetstream") or doc.get("member"))


def assess_bridge(doc: Mapping[str, Any], now_ms: int, *, alive: bool,
                  disk: st.Disk | None = None) -> Verdict:
    """What the bridge's status says (cloud/bridge.py): running or not, its two links, and
    whether JetStream stores what it is given."""
    s: Mapping[str, Any] = doc.get("stats") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    v = Verdict(OK, running=st.running(doc, now_ms, alive))
    if not v.running:
        why = st.why_not_running(doc, now_ms, BRIDGE, alive=alive, disk=disk)
        v.add(CRITICAL, f"not running: {why}; no result reaches a worker: the gateways' "
                        "results wait on the cloud broker (the bridge's persistent session) "
                        "and in the agents' outboxes")
    if v.running:
        broker = links.get("broker") or {}
        _not_connected(v, broker, f"the cloud broker {broker.get('url')}", "no result is "
                       "taken from it (the agents keep them in their outboxes)", now_ms)
        nats = links.get("nats") or {}
        _not_connected(v, nats, f"NATS ({nats.get('url')})", "nothing is forwarded (the "
                       "results stay on the cloud broker)", now_ms)
        store = doc.get("store") or {}
        if not store.get("ok", True):
            level, long = _down(store.get("failing_since"), now_ms)
            error = str(store.get("last_error") or "?")[:200]
            v.add(level, f"JetStream has stored nothing for {long} ({error}): no quorum, or "
                         "JetStream disabled on the nodes (nats-server does so on a full disk "
                         "and keeps it off until restarted; its log says \"JetStream out of "
                         f"resources\"); {int(s.get('waiting', 0)):,} messages wait, the "
                         "rest stay on the cloud broker")
    big = doc.get("too_large")
    if isinstance(big, Mapping) and s.get("too_large"):
        ago = now_ms - int(big.get("ts", 0))
        v.add(CRITICAL if ago < TOO_LARGE_FOR_MS else WARNING,
              f"{plural(int(s['too_large']), 'message', 'messages')} over the NATS servers' "
              f"max_payload ({int(big.get('max_payload', 0)):,} bytes) not stored since the "
              "bridge started, "
              f"the last {duration(ago)} ago: a {big.get('kind')} message of gateway "
              f"{big.get('gateway')}, {int(big.get('bytes', 0)):,} bytes; raise max_payload in "
              "every NATS server's configuration to at least the cloud broker's "
              "message_size_limit (the agents keep their batches until then)")
    st.judge_certificate(v, doc.get("cert"), now_ms)
    if s.get("rejected"):
        v.add(WARNING, f"{int(s['rejected']):,} messages on topics that are not a gateway's "
                       "results or health dropped since the bridge started")
    v.sort()
    return v


def render_bridge(doc: Mapping[str, Any], verdict: Verdict, now_ms: int) -> str:
    s: Mapping[str, Any] = doc.get("stats") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    store = doc.get("store") or {}
    started = int(doc.get("started", doc["ts"]))
    head = (f"running (pid {doc.get('pid')}), up {duration(now_ms - started)}"
            if verdict.running else "NOT RUNNING")
    lines = [f"bridge {doc.get('bridge')}: {st.LEVELS[verdict.code]}, bridge {head}; "
             f"status of {st.at(int(doc['ts']))} ({duration(now_ms - int(doc['ts']))} ago)"]
    lines += [f"  {'!' if level >= WARNING else '-'} {text}" for level, text in verdict.attention]
    if store.get("ok", True):
        stored = (f"the last stored at {st.at(int(store['last_ok']))}" if store.get("last_ok")
                  else "nothing to store yet")
    else:
        stored = f"FAILING since {st.at(int(store.get('failing_since', doc['ts'])))}"
    lines += [
        f"broker   {st.link_text(links.get('broker') or {}, int(doc['ts']))}",
        f"nats     {st.link_text(links.get('nats') or {}, int(doc['ts']))}",
        f"stored   {int(s.get('forwarded', 0)):,} messages in JetStream, {stored}; "
        f"{int(s.get('waiting', 0)):,} waiting, {int(s.get('publish_retries', 0)):,} retries; "
        f"{int(s.get('acks_back', 0)):,} acks passed back to the gateways",
    ]
    return "\n".join(lines)


def render(doc: Mapping[str, Any], verdict: Verdict, now_ms: int,
           disk: st.Disk | None = None) -> str:
    s: Mapping[str, Any] = doc.get("stats") or {}
    links: Mapping[str, Any] = doc.get("links") or {}
    started = int(doc.get("started", doc["ts"]))
    head = (f"running (pid {doc.get('pid')}), up {duration(now_ms - started)}"
            if verdict.running else "NOT RUNNING")
    member = f" (member {doc['member']})" if doc.get("member") else ""
    lines = [f"worker {doc.get('worker')}{member}: {st.LEVELS[verdict.code]}, worker {head}; "
             f"status of {st.at(int(doc['ts']))} ({duration(now_ms - int(doc['ts']))} ago)"]
    for level, text in verdict.attention:
        lines.append(f"  {'!' if level >= WARNING else '-'} {text}")

    def n(key: str) -> str:
        return f"{int(s.get(key, 0)):,}"

    ingest = links.get("ingest") or {}
    influx = links.get("influxdb") or {}
    if influx.get("ok", True):
        writes = (f"writing, the last write at {st.at(int(influx['last_ok']))}"
                  if influx.get("last_ok") else "no write yet")
    else:
        writes = f"FAILING since {st.at(int(influx.get('failing_since', doc['ts'])))}"
    gw = doc.get("gateways") or {}
    lines += [
        f"ingest   {st.link_text(ingest, int(doc['ts']))}",
        f"results  {n('batches_in')} batches ({n('duplicate_batches')} duplicates), "
        f"{n('results_in')} results in, {n('results_written')} written; window end -> "
        f"written p50 {duration(float(s.get('freshness_p50_ms', 0)))}",
        f"influxdb {influx.get('url')} database {influx.get('database')}: {writes}; "
        f"{n('points_written')} points written, {n('buffered_points')} waiting, "
        f"{n('points_rejected')} refused",
        f"gateways {int(gw.get('heard', 0)):,} heard in the last {duration(HEARD_FOR_MS)}, "
        f"{int(gw.get('quiet', 0)):,} quiet for {duration(QUIET_MS)}",
        f"detect   {n('detector_series')} series ({float(s.get('detector_state_mb', 0)):.1f} "
        f"MiB), {n('anomalies')} anomalies, alerts {n('alerts_open')} open, "
        f"{n('alerts_opened')} opened / {n('alerts_resolved')} resolved"
        + (f" ({n('alerts_resolved_silent')} as silent: their series sent no more windows)"
           if s.get("alerts_resolved_silent") else ""),
        f"disk     {disk.path}: {size(disk.free)} free of {size(disk.total)}" if disk else
        "disk     (not readable)",
    ]
    if s.get("rule_alerts_opened") or s.get("rule_alerts_open"):
        lines.append(f"rules    {n('rule_alerts_open')} alerts open, {n('rule_alerts_opened')} "
                     f"opened / {n('rule_alerts_resolved')} resolved since the start")
    if _partitioned(doc):
        lines.append(f"engine   {n('partitions_owned')} partitions owned, snapshots every "
                     f"{float(s.get('engine_snapshot_every_s', 0)):.0f} s")
    return "\n".join(lines)


def status_command(state_dir: Path | None, *, worker: str | None = None, as_json: bool,
                   now_ms: int | None = None) -> tuple[int, str]:
    """The text (or JSON) ``fieldline cloud status`` prints, and its exit code: the status of
    every worker that wrote one in ``state_dir`` (or of ``worker`` alone, with the bridge of
    the same worker id when there is one), the worst code."""
    if state_dir is None:
        return UNKNOWN, ("worker.state_dir is not set: the worker writes no status (and keeps "
                         "which batches are in InfluxDB only in memory); set worker.state_dir")
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if worker is not None:
        paths = [status_path(state_dir, worker)]
        beside = status_path(state_dir, bridge_id(worker))
        if beside not in paths and beside.exists():
            paths.append(beside)
    else:
        try:
            paths = sorted(state_dir.glob("status-*.json"))
        except OSError as exc:
            return UNKNOWN, f"UNKNOWN: {state_dir}: {exc}"
        if not paths:
            return UNKNOWN, (f"UNKNOWN: no status-*.json in {state_dir}: no worker has run with "
                             "this state directory yet (or is a version that wrote none)")
    disk = st.Disk.of(state_dir)
    code, texts = OK, []
    docs: list[dict[str, Any]] = []
    for path in paths:
        try:
            doc = st.read_status(path, WHO)
        except st.StatusUnreadableError as exc:
            code = max(code, UNKNOWN)
            texts.append(f"UNKNOWN: {exc}")
            docs.append({"status": "UNKNOWN", "error": str(exc)})
            continue
        alive = st.pid_alive(doc.get("pid"))
        bridge = doc.get("kind") == "bridge"
        if bridge:
            verdict = assess_bridge(doc, now, alive=alive, disk=disk)
            texts.append(render_bridge(doc, verdict, now))
        else:
            verdict = assess(doc, now, alive=alive, disk=disk)
            texts.append(render(doc, verdict, now, disk))
        code = max(code, verdict.code)
        docs.append({"status": st.LEVELS[verdict.code], "running": verdict.running,
                     "attention": [{"level": st.LEVELS[lv], "text": t}
                                   for lv, t in verdict.attention],
                     "bridge" if bridge else "worker": doc})
    if as_json:
        out = {"status": st.LEVELS[code], "workers": docs,
               "disk": disk.as_json() if disk else None}
        return code, orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    return code, "\n\n".join(texts)
