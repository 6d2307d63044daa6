"""Pattern rules (what Flink calls CEP) over window results and anomalies, declared in the
cloud config as ``[[rules]]`` tables.

======================  ============================================================================
``consecutive``         ``count`` windows in a row with ``field`` above ``above`` (or below
                        ``below``) on one series
``rate``                ``field`` changing faster than ``above`` per ``per`` between consecutive
                        windows of one series
``absence``             a device (or one metric of it) sends no window for ``after`` of event
                        time, while its gateway's data goes on
``sequence``            event ``first`` followed by event ``then`` within ``within`` on one device
``site``                event ``event`` on at least ``devices`` devices of one site within one
                        ``within`` of event time ("k of n at once")
======================  ============================================================================

Events, for ``sequence`` and ``site``: ``anomaly`` (a detector opened an incident on the
device), ``anomaly:<metric>`` (on that metric), ``rule:<name>`` (another rule opened one).

Everything is judged in event time, in the order of the windows, and each window is taken
once (the first result that arrives; a revision is not taken again), and an incident opened
again (the same one, a batch re-delivered) is not counted again, so a replay of the same
results opens the same alerts. Each rule alert's identity is the rule, its subject (series,
device or site) and the event time that opened it; it is written to ``alerts`` when it opens
and again, same identity (the site it opened with), when it resolves. Every kind resolves:
``consecutive`` and ``rate`` on the first window back within the limit, ``absence`` when the
device speaks again, ``sequence`` with the incident that completed it (``then``), ``site`` once
fewer than ``devices`` of the devices that raised it are still in incident; the open alerts of
a rule removed from the config are resolved with the next batch after the restart.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from cloud.detect.stage import AlertEvent, Detections, subject_of
from cloud.enrich import EnrichedResults
from devices.errors import ConfigError
from devices.readings import F64
from devices.schema import OUTPUTS, output_names
from devices.settings import parse_duration_ms

log = logging.getLogger("fieldline.cloud.rules")

KINDS = ("consecutive", "rate", "absence", "sequence", "site")
LEVELS = ("info", "warning", "critical")
FIELDS = output_names()  # the fields of the aggregates measurement (devices.schema)


@dataclass(frozen=True, kw_only=True)
class Rule:
    name: str
    kind: str
    level: str = "warning"
    metric: str | None = None  # None: every metric
    field: str = "mean"
    above: float | None = None
    below: float | None = None
    count: int = 3
    per_ms: int = 1_000
    after_ms: int = 300_000
    first: str = ""
    then: str = ""
    event: str = ""
    within_ms: int = 60_000
    devices: int = 2
    windows: tuple[str, ...] = ()  # window specs it reads (empty: the primary)


@dataclass(frozen=True, kw_only=True)
class RuleAlert:
    rule: str
    kind: str
    level: str
    state: str  # open | resolved
    gateway: str
    site: str
    device: str  # "(site)" for site rules
    metric: str  # "(device)" when it is about the device
    window: str
    opened: int  # event time that opened it (its identity)
    until: int  # event time it resolved (0: open)
    value: float
    message: str


# an alert's identity, as its point in ``alerts`` has it: rule, gateway, site (site rules
# only: a device's alert keeps the site it opened with), device, metric, window, opened
Ident = tuple[str, str, str, str, str, str, int]
# an incident another rule waits on: gateway, device, metric, event name, opened
Incident = tuple[str, str, str, str, int]


def ident(a: RuleAlert) -> Ident:
    return (a.rule, a.gateway, a.site if a.device == "(site)" else "", a.device, a.metric,
            a.window, a.opened)


def _ident(x: Sequence[Any]) -> Ident:
    return (str(x[0]), str(x[1]), str(x[2]), str(x[3]), str(x[4]), str(x[5]), int(x[6]))


STATE_VERSION = 2
STATE_FIELDS = ("series", "last_end", "absent", "seq_first", "site_hits", "site_open", "open",
                "waits", "site_live", "site_alert", "orphans", "number", "incidents",
                "keeps_incidents")
SITE_HORIZON_MS = 6 * 3_600_000  # a site rule counts events this far behind its newest
SEEN_MAX = 200  # metric names and window specs kept to name when a rule matches none


def _few(names: Sequence[str], n: int = 12) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "") if names else "nothing"


def _wait(w: Sequence[Any]) -> list[Any]:
    if w[0] == "alert":
        return ["alert", *_ident(w[1:])]
    if w[0] == "site":
        return ["site", str(w[1]), str(w[2]), int(w[3]), str(w[4])]
    raise ValueError(f"what waits on an incident: {w[0]!r}")


def parse_rules(raw: object, source: str | None = None) -> list[Rule]:
    """``[[rules]]`` tables; every mistake names ``rules[i].key``."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError("rules", "must be an array of tables ([[rules]])", source=source)
    out: list[Rule] = []
    names: set[str] = set()
    for i, spec in enumerate(raw):
        key = f"rules[{i}]"
        if not isinstance(spec, Mapping):
            raise ConfigError(key, "must be a table", source=source)
        out.append(_rule(dict(spec), key, source))
        if out[-1].name in names:
            raise ConfigError(f"{key}.name", f"rule {out[-1].name!r} is defined twice",
                              source=source)
        names.add(out[-1].name)
    for i, r in enumerate(out):
        for ev_key, ev in (("first", r.first), ("then", r.then), ("event", r.event)):
            if ev.startswith("rule:") and ev[5:] not in names:
                raise ConfigError(f"rules[{i}].{ev_key}", f"no rule named {ev[5:]!r}",
                                  source=source)
    return out


def _rule(spec: dict[str, Any], key: str, source: str | None) -> Rule:
    def take(name: str, default: Any = None) -> Any:
        return spec.pop(name, default)

    def fail(name: str, problem: str) -> ConfigError:
        return ConfigError(f"{key}.{name}", problem, source=source)

    name = take("name")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace(
            "-", "").isalnum():
        raise fail("name", "is required: letters, digits, _ and -")
    kind = take("kind")
    if kind not in KINDS:
        raise fail("kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    level = take("level", "warning")
    if level not in LEVELS:
        raise fail("level", f"must be one of {', '.join(LEVELS)}")
    metric = take("metric")
    if metric is not None and not isinstance(metric, str):
        raise fail("metric", "must be a metric name")
    fld = take("field", "mean")
    if fld not in FIELDS and not (isinstance(fld, str) and fld.startswith("p")):
        raise fail("field", f"must be one of {', '.join(FIELDS)} or a percentile (p95)")

    def number(name: str) -> float | None:
        v = take(name)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise fail(name, f"must be a number, got {v!r}")
        return float(v)

    def dur(name: str, default: int) -> int:
        v = take(name)
        if v is None:
            return default
        ms = parse_duration_ms(v, f"{key}.{name}", source)
        if ms <= 0:
            raise fail(name, "must be > 0")
        return ms

    def event(name: str) -> str:
        v = take(name, "")
        if not isinstance(v, str) or not (v == "anomaly" or v.startswith(("anomaly:", "rule:"))):
            raise fail(name, "must be anomaly, anomaly:<metric> or rule:<name>")
        return v

    above, below = number("above"), number("below")
    windows = take("windows", [])
    if isinstance(windows, str):
        windows = [windows]
    if not isinstance(windows, list) or not all(isinstance(w, str) for w in windows):
        raise fail("windows", "must be a list of window specs")
    rule = Rule(name=name, kind=kind, level=level, metric=metric, field=fld, above=above,
                below=below, windows=tuple(windows))
    if kind == "consecutive":
        if (above is None) == (below is None):
            raise fail("above", "give exactly one of above or below")
        count = take("count", 3)
        if type(count) is not int or count < 1:
            raise fail("count", "must be an integer >= 1")
        rule = _replace(rule, count=count)
    elif kind == "rate":
        if above is None or above <= 0 or below is not None:
            raise fail("above", "give the largest normal rate of change (> 0) as above")
        rule = _replace(rule, per_ms=dur("per", 1_000))
    elif kind == "absence":
        rule = _replace(rule, after_ms=dur("after", 300_000))
    elif kind == "sequence":
        rule = _replace(rule, first=event("first"), then=event("then"),
                        within_ms=dur("within", 600_000))
    else:  # site
        devices = take("devices", 2)
        if type(devices) is not int or devices < 2:
            raise fail("devices", "must be an integer >= 2")
        rule = _replace(rule, event=event("event"), within_ms=dur("within", 60_000),
                        devices=devices)
    if spec:
        raise fail(sorted(spec)[0], f"unknown key for a {kind} rule (typo?)")
    return rule


def _replace(rule: Rule, **kw: Any) -> Rule:
    from dataclasses import replace

    return replace(rule, **kw)


@dataclass
class _Series:
    """Per (gateway, device, metric, window) state of the window-driven rules."""

    learned: int = -(1 << 62)  # newest window start taken
    run: int = 0
    run_start: int = 0
    open_since: int | None = None
    last_value: float = math.nan
    last_time: int = 0


@dataclass
class RuleEngine:
    rules: Sequence[Rule]
    series: dict[tuple[str, str, str, str, str], _Series] = field(default_factory=dict)
    # absence, per rule: (gateway, device, metric) -> end of its newest window / while silent
    last_end: dict[str, dict[tuple[str, str, str], int]] = field(default_factory=dict)
    absent: dict[str, dict[tuple[str, str, str], int]] = field(default_factory=dict)
    seq_first: dict[tuple[str, str, str], list[int]] = field(default_factory=dict)
    site_hits: dict[tuple[str, str, int], set[str]] = field(default_factory=dict)
    site_open: set[tuple[str, str, int]] = field(default_factory=set)  # opened once, ever
    # every alert open now, by identity: what resolves it takes its tags from here (a site
    # changed in the registry meanwhile still overwrites the point that opened)
    open: dict[Ident, RuleAlert] = field(default_factory=dict)
    # what waits for an incident (gateway, device, metric, event, opened) to resolve: a
    # sequence alert it opened (["alert", *ident]), a site it counts toward (["site", rule,
    # site, bucket, device])
    waits: dict[Incident, list[list[Any]]] = field(default_factory=dict)
    site_live: dict[tuple[str, str, int], dict[str, int]] = field(default_factory=dict)
    site_alert: dict[tuple[str, str, int], Ident] = field(default_factory=dict)
    orphans: list[RuleAlert] = field(default_factory=list)  # open alerts of removed rules
    # the detectors' incidents open now, by subject (gateway, device, metric or "(device)",
    # window): [incident, detector, peak severity, until]. Kept here, with the rules' state
    # (journaled before each ack), so that a worker whose detector snapshot is older than its
    # last acknowledged batch (a SIGKILL between two saves) knows exactly which are open
    incidents: dict[tuple[str, str, str, str], list[Any]] = field(default_factory=dict)
    # whether ``incidents`` is kept (False: a state from before it was, or none: adopt the
    # detectors' open incidents)
    keeps_incidents: bool = False
    max_keys: int = 1_000_000
    # what changed since the last take_delta() (kept only when journaled: the worker's single
    # path writes each batch's changes to a journal before acknowledging the batch)
    journaled: bool = False
    number: int = 0  # of the last delta or snapshot taken: a journal replays only newer ones
    _dirty: dict[str, set[Any]] = field(default_factory=dict)  # (last_end: (rule, key))
    # the series moved on since (their keys only: tuples of texts, which the collector stops
    # tracking; with their state, 20,000 pairs a batch outlived its young generations)
    _moved: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    # since the process started: the windows each window or absence rule judged, and what the
    # results were (metric, window spec): a rule that judges none names what it waits for
    judged: dict[str, int] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=lambda: {"metric": set(), "window": set()})
    _site_newest: int = -(1 << 62)  # newest event time a site rule counted
    _site_pruned: int = -(1 << 62)

    def _mark(self, struct: str, key: Any) -> None:
        if self.journaled:
            self._dirty.setdefault(struct, set()).add(key)

    def _marker(self, struct: str) -> Callable[[Any], None] | None:
        """For a loop over many rows: its ``add``, or None when nothing is journaled."""
        return self._dirty.setdefault(struct, set()).add if self.journaled else None

    def run(self, rows: EnrichedResults, det: Detections) -> list[RuleAlert]:
        """Judge one batch: window rules on its results, event rules on its alerts."""
        out: list[RuleAlert] = []
        if det.alerts:
            self._track_incidents(rows, det.alerts)
        if self.orphans and len(rows):  # closed at the event time of the next batch
            out += self._close_orphans(int((rows.start + rows.width).max()))
        if not len(rows):  # incidents resolved as silent (an idle gateway): what waited on them
            return out + self._incidents_resolved(rows, det.alerts, out)
        if not self.rules:
            return out
        order = np.lexsort((rows.start,))
        fields = _fields(rows)
        for what, values in (("metric", rows.metric), ("window", rows.window)):
            if len(self.seen[what]) < SEEN_MAX:
                self.seen[what].update(values)
        for rule in self.rules:
            if rule.kind in ("consecutive", "rate"):
                out += self._window_rule(rule, rows, order, fields)
            elif rule.kind == "absence":
                out += self._absence(rule, rows)
        events = self._events(rows, det.alerts, out)
        for rule in self.rules:
            if rule.kind == "sequence":
                out += self._sequence(rule, rows, events)
            elif rule.kind == "site":
                out += self._site(rule, rows, events)
        out = self._track(out)
        out += self._incidents_resolved(rows, det.alerts, out)
        self._bound()
        return out

    def _track_incidents(self, rows: EnrichedResults, alerts: list[AlertEvent]) -> None:
        for a in alerts:
            k = subject_of(rows, a)
            if a.state == "open":
                self.incidents[k] = [a.incident, a.name, a.severity, a.until]
            elif self.incidents.pop(k, None) is None:
                continue
            self._mark("incidents", k)

    def adopt_incidents(self, open_now: Mapping[tuple[str, str, str, str], list[Any]]) -> int:
        """From a state that did not keep the detectors' incidents (or none): take those
        ``open_now`` (the detectors' snapshot's) beside any it has; kept from now on."""
        new = {k: v for k, v in open_now.items() if k not in self.incidents}
        self.incidents.update(new)
        for k in new:
            self._mark("incidents", k)
        self.keeps_incidents = True
        self._mark("kept", "incidents")
        return len(new)

    # ---- every alert resolves --------------------------------------------------------------

    def _track(self, alerts: list[RuleAlert]) -> list[RuleAlert]:
        """Keep what opens; a resolution overwrites exactly the point its opening wrote."""
        out = []
        for a in alerts:
            k = ident(a)
            self._mark("open", k)
            if a.state == "open":
                self.open[k] = a
                out.append(a)
            elif (was := self.open.pop(k, None)) is not None:
                out.append(replace(a, site=was.site))
            else:
                out.append(a)
        return out

    def _close(self, k: Ident, until: int, message: str) -> RuleAlert | None:
        a = self.open.pop(k, None)
        if a is None:
            return None
        self._mark("open", k)
        return replace(a, state="resolved", until=until, message=message)

    def _incidents_resolved(self, rows: EnrichedResults, alerts: list[AlertEvent],
                            rule_alerts: list[RuleAlert]) -> list[RuleAlert]:
        """Sequence and site alerts resolve with the incidents that raised them: a sequence
        alert when its ``then`` incident resolves, a site alert once fewer than ``devices``
        of the devices that raised it are still in incident."""
        ends: list[tuple[int, Incident]] = []
        for a in alerts:
            if a.state == "resolved":
                gateway, device, metric, _ = subject_of(rows, a)
                ends.append((a.until, (gateway, device, metric, "anomaly", a.incident)))
        for r in rule_alerts:
            if r.state == "resolved" and r.device != "(site)":
                ends.append((r.until, (r.gateway, r.device, r.metric, "rule:" + r.rule,
                                       r.opened)))
        out = []
        ends.sort()
        rules = {r.name: r for r in self.rules}
        for until, inc in ends:
            if inc in self.waits:
                self._mark("waits", inc)
            for w in self.waits.pop(inc, []):
                if w[0] == "alert":
                    k = _ident(w[1:])
                    done = self._close(k, until, f"{k[3]}: {inc[3]} back to normal "
                                                 f"(rule {k[0]})")
                else:
                    key, dev = (str(w[1]), str(w[2]), int(w[3])), str(w[4])
                    self._mark("site_live", key)
                    live = self.site_live.get(key, {})
                    live[dev] = live.get(dev, 1) - 1
                    if live[dev] <= 0:
                        live.pop(dev, None)
                    if not live:
                        self.site_live.pop(key, None)
                    rule = rules.get(key[0])
                    if rule is None or key not in self.site_alert or len(live) >= rule.devices:
                        continue
                    self._mark("site_alert", key)
                    done = self._close(self.site_alert.pop(key), until,
                                       f"site {key[1]}: {len(live)} device(s) still in "
                                       f"incident, fewer than {rule.devices} (rule {key[0]})")
                if done is not None:
                    out.append(done)
        return out

    def _close_orphans(self, until: int) -> list[RuleAlert]:
        out = [replace(a, state="resolved", until=max(until, a.opened),
                        message=f"{a.device} {a.metric}: rule {a.rule} is no longer configured "
                                "(removed, or changed)")
               for a in self.orphans]
        for a in self.orphans:  # gone from the open ones a snapshot before may hold
            self._mark("open", ident(a))
        self.orphans = []
        self._mark("orphans", None)
        return out

    # ---- window rules ----------------------------------------------------------------------

    def _selected(self, rule: Rule, rows: EnrichedResults, i: int) -> bool:
        if rule.metric is not None and rows.metric[i] != rule.metric:
            return False
        if rule.windows:
            return rows.window[i] in rule.windows
        return rows.window[i] == rows.primary_window

    def _window_rule(self, rule: Rule, rows: EnrichedResults, order: np.ndarray,
                     fields: dict[str, F64]) -> list[RuleAlert]:
        out: list[RuleAlert] = []
        values = fields.get(rule.field)
        if values is None:
            return out
        # the series this batch moves on, with their state (serialised at take_delta)
        moved = self._moved.append if self.journaled else None
        judged = 0
        for i in order.tolist():
            if not self._selected(rule, rows, i):
                continue
            judged += 1
            key = (rule.name, rows.gateway, rows.device[i], rows.metric[i], rows.window[i])
            st = self.series.get(key)
            if st is None:
                st = self.series[key] = _Series()
            start = int(rows.start[i])
            if start <= st.learned:
                continue  # a revision, or older than what was taken: taken once
            st.learned = start
            if moved is not None:
                moved(key)
            v = float(values[i])
            end = start + int(rows.width[i])
            if rule.kind == "consecutive":
                beyond = (v > rule.above) if rule.above is not None else (
                    rule.below is not None and v < rule.below)
                st.run = st.run + 1 if beyond else 0
                if st.run == 1:
                    st.run_start = start
                hit = st.run >= rule.count
                shown = v
            else:  # rate of change between consecutive windows, per ``per``
                dt = start - st.last_time
                rate = (abs(v - st.last_value) / dt * rule.per_ms
                        if dt > 0 and math.isfinite(st.last_value) else 0.0)
                st.last_value, st.last_time = v, start
                hit = rule.above is not None and rate > rule.above
                shown = rate
            if hit and st.open_since is None:
                st.open_since = st.run_start if rule.kind == "consecutive" else start
                out.append(self._alert(rule, rows, i, "open", st.open_since, 0, shown))
            elif not hit and st.open_since is not None:
                out.append(self._alert(rule, rows, i, "resolved", st.open_since, end, shown))
                st.open_since = None
        self.judged[rule.name] = self.judged.get(rule.name, 0) + judged
        return out

    def idle(self) -> list[dict[str, str]]:
        """The window and absence rules that have judged no window since the process started,
        each with what in it matches none of the results that came (a metric or a window
        spec misspelt, a percentile the windows do not compute): such a rule never fires."""
        out = []
        seen = {k: sorted(v) for k, v in self.seen.items()}
        for r in self.rules:
            if r.kind not in ("consecutive", "rate", "absence") or self.judged.get(r.name):
                continue
            if r.metric is not None and r.metric not in self.seen["metric"]:
                why = f"no result has metric {r.metric!r} (seen: {_few(seen['metric'])})"
            elif r.windows and not set(r.windows) & self.seen["window"]:
                why = (f"no result is of window spec {' or '.join(map(repr, r.windows))} (seen: "
                       f"{_few(seen['window'])}; without `windows`, the gateway's first)")
            elif r.kind != "absence" and r.field not in FIELDS:
                why = f"no window spec computes {r.field!r} (a percentile of its `percentiles`)"
            else:
                why = "none of the results matches its metric and window spec together"
            out.append({"rule": r.name, "why": why})
        return out

    def _absence(self, rule: Rule, rows: EnrichedResults) -> list[RuleAlert]:
        """Per (device, metric or the whole device): the end of its newest window; silent
        once the gateway's newest window ends ``after`` later."""
        out = []
        newest = int((rows.start + rows.width).max())
        last = self.last_end.setdefault(rule.name, {})
        absent = self.absent.setdefault(rule.name, {})
        latest: dict[tuple[str, str, str], tuple[int, int]] = {}
        mark = self._marker("last_end")
        self.judged[rule.name] = self.judged.get(rule.name, 0) + sum(
            1 for m in rows.metric if rule.metric is None or m == rule.metric)
        for i in range(len(rows)):
            if rule.metric is not None and rows.metric[i] != rule.metric:
                continue
            k = (rows.gateway, rows.device[i], rule.metric or "(device)")
            end = int(rows.start[i] + rows.width[i])
            if end > latest.get(k, (-1, -1))[0]:
                latest[k] = (end, i)
        for k, (end, i) in latest.items():
            if k in absent and end > absent[k]:  # it speaks again
                opened = absent.pop(k)
                self._mark("absent", (rule.name, k))
                out.append(self._alert(rule, rows, i, "resolved", opened, end,
                                       float(end - opened), metric=k[2]))
            last[k] = max(last.get(k, end), end)
            if mark is not None:
                mark((rule.name, k))
        for k, end in last.items():
            if k[0] != rows.gateway or k in absent or newest - end < rule.after_ms:
                continue
            absent[k] = end
            self._mark("absent", (rule.name, k))
            gw, dev, met = k
            out.append(RuleAlert(
                rule=rule.name, kind=rule.kind, level=rule.level, state="open", gateway=gw,
                site=_site_of(rows, dev), device=dev, metric=met, window="", opened=end,
                until=0, value=float(newest - end),
                message=f"{dev}: no data for {(newest - end) / 1000:,.0f} s of event time "
                        f"(rule {rule.name}: {rule.after_ms / 1000:,.0f} s)"))
        return out

    # ---- event rules -----------------------------------------------------------------------

    def _events(self, rows: EnrichedResults, alerts: list[AlertEvent],
                rule_alerts: list[RuleAlert]) -> list[tuple[int, str, str, str]]:
        """(event time, device, metric, event name) of incidents that opened, time order."""
        ev: list[tuple[int, str, str, str]] = []
        for a in alerts:
            if a.state == "open":
                _, device, metric, _ = subject_of(rows, a)
                ev.append((a.incident, device, metric, "anomaly"))
        for r in rule_alerts:
            if r.state == "open" and r.device != "(site)":
                ev.append((r.opened, r.device, r.metric, "rule:" + r.rule))
        ev.sort()
        return ev

    @staticmethod
    def _matches(pattern: str, metric: str, name: str) -> bool:
        if pattern == "anomaly":
            return name == "anomaly"
        if pattern.startswith("anomaly:"):
            return name == "anomaly" and metric == pattern[8:]
        return name == pattern

    def _sequence(self, rule: Rule, rows: EnrichedResults,
                  events: list[tuple[int, str, str, str]]) -> list[RuleAlert]:
        out = []
        for t, dev, metric, name in events:
            k = (rule.name, rows.gateway, dev)
            inc = (rows.gateway, dev, metric, name, t)
            if self._matches(rule.then, metric, name):
                firsts = [x for x in self.seq_first.get(k, []) if 0 <= t - x <= rule.within_ms]
                if firsts and not self._waits_on(inc, "alert", rule.name):
                    i = rows.device.index(dev)
                    a = RuleAlert(
                        rule=rule.name, kind=rule.kind, level=rule.level, state="open",
                        gateway=rows.gateway, site=rows.site[i], device=dev, metric=metric,
                        window=rows.window[i], opened=t, until=0, value=float(t - firsts[0]),
                        message=f"{dev}: {rule.first} then {rule.then} "
                                f"{(t - firsts[0]) / 1000:,.0f} s later (rule {rule.name})")
                    out.append(a)
                    # it resolves with the incident that completed it
                    self.waits.setdefault(inc, []).append(["alert", *ident(a)])
                    self._mark("waits", inc)
            if self._matches(rule.first, metric, name):
                lst = self.seq_first.setdefault(k, [])
                if t not in lst:
                    lst.append(t)
                    lst.sort()
                    del lst[:-16]  # the latest few are enough
                    self._mark("seq_first", k)
        return out

    def _waits_on(self, inc: Incident, what: str, rule: str) -> bool:
        """Whether a ``what`` ("alert", "site") of ``rule`` waits on the incident already: an
        incident opened again is the same one taken twice (a batch re-delivered after its
        dedup mark was lost), not a new one to count."""
        return any(w[0] == what and w[1] == rule for w in self.waits.get(inc, ()))

    def _site(self, rule: Rule, rows: EnrichedResults,
              events: list[tuple[int, str, str, str]]) -> list[RuleAlert]:
        out = []
        for t, dev, metric, name in events:
            if not self._matches(rule.event, metric, name):
                continue
            inc = (rows.gateway, dev, metric, name, t)
            if self._waits_on(inc, "site", rule.name):
                continue  # the same incident, taken again (a batch re-delivered): counted
            i = rows.device.index(dev)
            site = rows.site[i]
            bucket = t - t % rule.within_ms
            k = (rule.name, site, bucket)
            hits = self.site_hits.setdefault(k, set())
            hits.add(dev)
            live = self.site_live.setdefault(k, {})
            live[dev] = live.get(dev, 0) + 1  # its incidents counted here, still open
            self.waits.setdefault(inc, []).append(["site", *k, dev])
            self._site_newest = max(self._site_newest, t)
            for struct, key in (("site_hits", k), ("site_live", k), ("waits", inc)):
                self._mark(struct, key)
            if len(hits) >= rule.devices and k not in self.site_open:
                self.site_open.add(k)
                self._mark("site_open", k)
                a = RuleAlert(
                    rule=rule.name, kind=rule.kind, level=rule.level, state="open",
                    gateway=rows.gateway, site=site, device="(site)", metric=metric,
                    window=rows.window[i], opened=bucket, until=0, value=float(len(hits)),
                    message=f"site {site}: {rule.event} on {len(hits)} devices within "
                            f"{rule.within_ms / 1000:,.0f} s (rule {rule.name})")
                out.append(a)
                self.site_alert[k] = ident(a)
                self._mark("site_alert", k)
        return out

    # ---- state that outlives the process -----------------------------------------------------
    # The state is a set of entries [structure, key, value] (value None: the entry is gone): a
    # snapshot holds them all, a delta those a batch changed. The worker's single path writes a
    # batch's delta to ``rules.journal`` before acknowledging the batch, and every few minutes
    # a snapshot to ``rules.json``: a restart (a SIGKILL included) goes on exactly from the
    # last batch acknowledged. On JetStream the snapshot rides in each partition's.

    def snapshot(self) -> dict[str, Any]:
        """Every entry, numbered after the deltas taken so far."""
        self._dirty.clear()
        self._moved.clear()
        self.number += 1
        keys: dict[str, Any] = {st: list(getattr(self, st)) for st in (
            "series", "seq_first", "site_hits", "site_open", "open", "waits", "site_live",
            "site_alert", "incidents")}
        if self.keeps_incidents:
            keys["kept"] = ["incidents"]
        for st in ("last_end", "absent"):
            keys[st] = [(r, k) for r, d in getattr(self, st).items() for k in d]
        if self.orphans:
            keys["orphans"] = [None]
        return {"v": STATE_VERSION, "n": self.number, "d": self._entries(keys),
                "rules": {r.name: _definition(r) for r in self.rules}}

    def take_delta(self) -> bytes | None:
        """The entries changed since the last delta or snapshot, as one line of the journal
        (None: nothing changed). Encoded here, where they are taken: a batch of 10,000 devices
        changes 30,000 entries, and kept as Python objects until the journal is written they
        outlived the collector's young generations, and so made it traverse every object of
        the process (a full collection) after nearly every batch."""
        if not self._moved and not any(self._dirty.values()):
            return None
        self.number += 1
        series = self.series
        d = _series_entries((k, series.get(k)) for k in self._moved)
        d += self._entries(self._dirty)  # after: a series gone since is gone
        self._moved, self._dirty = [], {}
        return orjson.dumps({"n": self.number, "d": d})

    def _entries(self, keys: Mapping[str, Any]) -> list[Any]:
        """[structure, key, value] of these keys, as JSON data (copies; value None: gone)."""
        out: list[Any] = []
        for struct, ks in keys.items():
            if struct == "series":
                out += _series_entries((k, self.series.get(k)) for k in ks)
            elif struct in ("last_end", "absent"):
                m = getattr(self, struct)
                none: dict[Any, int] = {}
                out += [(struct, (r, *k), m.get(r, none).get(k)) for r, k in ks]
            else:
                out += [(struct, k, self._value(struct, k)) for k in ks]
        return out

    def _value(self, struct: str, key: Any) -> Any:
        """An entry's value as JSON data (a copy), None when it is gone."""
        if struct == "orphans":
            return [_alert_row(a) for a in self.orphans]
        if struct == "site_open":
            return True if key in self.site_open else None
        if struct == "kept":
            return self.keeps_incidents or None
        v = getattr(self, struct).get(key)
        if v is None:
            return None
        if struct == "open":
            return _alert_row(v)
        if struct == "site_hits":
            return sorted(v)
        if struct == "waits":
            return [list(w) for w in v]
        if struct == "site_live":
            return dict(v)
        return list(v)  # seq_first, site_alert

    def _apply(self, entries: Any) -> None:
        """Take entries (a snapshot's or a delta's) into this state."""
        for struct, raw_key, v in entries:
            key = _decode_key(struct, raw_key)
            if struct in ("last_end", "absent"):
                d = getattr(self, struct)
                if v is None:
                    d.get(key[0], {}).pop(key[1:], None)
                else:
                    d.setdefault(key[0], {})[key[1:]] = int(v)
                continue
            if struct == "orphans":
                self.orphans = [_alert_from(x) for x in v or []]
                continue
            if struct == "site_open":
                (self.site_open.discard if v is None else self.site_open.add)(key)
                continue
            if struct == "kept":
                self.keeps_incidents = v is True
                continue
            target: dict[Any, Any] = getattr(self, struct)
            if v is None:
                target.pop(key, None)
            elif struct == "series":
                target[key] = _Series(int(v[0]), int(v[1]), int(v[2]),
                                      None if v[3] is None else int(v[3]),
                                      math.nan if v[4] is None else float(v[4]), int(v[5]))
            elif struct == "open":
                target[key] = _alert_from(v)
            elif struct == "seq_first":
                target[key] = [int(t) for t in v]
            elif struct == "site_hits":
                target[key] = {str(d) for d in v}
            elif struct == "waits":
                target[key] = [_wait(w) for w in v]
            elif struct == "site_live":
                target[key] = {str(d): int(n) for d, n in v.items()}
            elif struct == "incidents":
                target[key] = [int(v[0]), str(v[1]), float(v[2]), int(v[3])]
            else:  # site_alert
                target[key] = _ident(v)

    def restore(self, doc: Any, journal: Sequence[Any] = ()) -> None:
        """Take a :meth:`snapshot` back, then the deltas of ``journal`` newer than it, in
        order; raises ``ValueError`` (state unchanged) for one it cannot read. The state of
        rules no longer configured is dropped; the alerts they had open are resolved with the
        next batch (nothing would judge them again)."""
        fresh = RuleEngine(self.rules, max_keys=self.max_keys, journaled=self.journaled)
        try:
            if doc.get("v") != STATE_VERSION:
                raise ValueError(f"version {doc.get('v')!r}")
            fresh._apply(doc["d"])
            fresh.number = int(doc["n"])
            for rec in journal:
                if int(rec["n"]) > fresh.number:
                    fresh._apply(rec["d"])
                    fresh.number = int(rec["n"])
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"rule state unreadable ({type(exc).__name__}: {exc})") from None
        fresh._dirty.clear()
        # a rule changed since (its definition as the snapshot has it) starts afresh, as one
        # removed and added: its runs counted another limit, its alerts another condition
        before = doc.get("rules") or {}
        changed = {r.name for r in self.rules
                   if r.name in before and before[r.name] != _definition(r)}
        names = {r.name for r in self.rules} - changed
        gone = ({k[0] for k in fresh.series} | set(fresh.last_end) | set(fresh.absent)
                | {k[0] for k in fresh.seq_first} | {k[0] for k in fresh.site_hits}
                | {k[0] for k in fresh.open} | {a.rule for a in fresh.orphans}) - names
        # an orphan whose rule is back in the config is its open alert again
        fresh.open.update({ident(a): a for a in fresh.orphans if a.rule in names})
        fresh.orphans = [a for a in (*fresh.orphans, *fresh.open.values()) if a.rule in gone]
        if gone:
            log.warning("rule state: %s no longer configured%s: %s state dropped; %d alert(s) "
                        "%s had open are resolved with the next batch",
                        ", ".join(sorted(gone)), " as it was" if gone <= changed else "",
                        "its" if len(gone) == 1 else "their",
                        len(fresh.orphans), "it" if len(gone) == 1 else "they")
        fresh.open = {k: a for k, a in fresh.open.items() if a.rule in names}
        fresh.series = {k: v for k, v in fresh.series.items() if k[0] in names}
        fresh.last_end = {r: d for r, d in fresh.last_end.items() if r in names}
        fresh.absent = {r: d for r, d in fresh.absent.items() if r in names}
        fresh.seq_first = {k: v for k, v in fresh.seq_first.items() if k[0] in names}
        fresh.site_hits = {k: v for k, v in fresh.site_hits.items() if k[0] in names}
        fresh.site_open = {k for k in fresh.site_open if k[0] in names}
        fresh.waits = {k: kept for k, v in fresh.waits.items()
                       if (kept := [w for w in v if w[1] in names])}
        fresh.site_live = {k: v for k, v in fresh.site_live.items() if k[0] in names}
        fresh.site_alert = {k: v for k, v in fresh.site_alert.items() if k[0] in names}
        for f in STATE_FIELDS:
            setattr(self, f, getattr(fresh, f))
        self._dirty.clear()

    def reconfigure(self, rules: Sequence[Rule]) -> None:
        """Rules read again (the worker's SIGHUP): a rule added starts afresh, one removed
        has its state dropped and its open alerts resolved with the next batch, one changed
        both; the others go on."""
        doc = self.snapshot()
        self.rules = list(rules)
        judged, seen = self.judged, self.seen
        self.restore(doc)
        self.judged = {k: v for k, v in judged.items() if k in {r.name for r in rules}}
        self.seen = seen

    def load(self, path: Path) -> bool:
        """Restore what :func:`save_rules` and :func:`append_rules` wrote (``path`` and its
        journal beside it). A snapshot that cannot be read is kept aside with its journal and
        logged, and the rules start afresh (False) instead of the worker not at all; a
        journal's torn last line (a crash while it was written: its batches were not
        acknowledged, they come again) is left out."""
        journal = journal_path(path)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = None
        records, bad = _read_journal(journal)
        if raw is None and not records:
            return False
        try:
            doc = orjson.loads(raw) if raw is not None else {"v": STATE_VERSION, "n": 0, "d": []}
            self.restore(doc, records)
        except ValueError as exc:  # JSON errors included
            for f in (path, journal):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f, f.with_name(f.name + ".unreadable"))
            log.error("rule state %s unreadable (%s), kept as %s: the rules start afresh "
                      "(an alert open before the restart does not resolve)", path, exc,
                      path.name + ".unreadable")
            return False
        if bad:  # what is appended next must not follow a line that cannot be read
            log.warning("rule state journal %s: %d line(s) after line %d unreadable, left out",
                        journal, bad, len(records))
            try:
                save_rules(self.snapshot(), path)
            except OSError as exc:
                log.error("rule state not saved to %s: %s", path, exc)
        return True

    # ---- plumbing --------------------------------------------------------------------------

    def _alert(self, rule: Rule, rows: EnrichedResults, i: int, state: str, opened: int,
               until: int, value: float, *, metric: str | None = None) -> RuleAlert:
        if rule.kind == "consecutive":
            limit = rule.above if rule.above is not None else rule.below
            what = (f"{rule.field} {'above' if rule.above is not None else 'below'} "
                    f"{limit:g} for {rule.count} windows")
        elif rule.kind == "rate":
            what = f"{rule.field} changing faster than {rule.above:g} per {rule.per_ms / 1000:g} s"
        else:
            what = "no data"
        return RuleAlert(
            rule=rule.name, kind=rule.kind, level=rule.level, state=state,
            gateway=rows.gateway, site=rows.site[i], device=rows.device[i],
            metric=metric or rows.metric[i],
            window=rows.window[i] if metric is None else "", opened=opened,
            until=until, value=value,
            message=f"{rows.device[i]} {rows.metric[i]}: {what} (rule {rule.name})"
            if state == "open" else f"{rows.device[i]} {rows.metric[i]}: back to normal "
                                    f"(rule {rule.name})")

    def _bound(self) -> None:
        """Keys are bounded: the oldest go first (a long-gone series forgets its run). A site
        rule's minutes older than ``SITE_HORIZON_MS`` before the newest event it counted are
        forgotten (once an hour), unless their alert is still open."""
        if self._site_newest - self._site_pruned >= 3_600_000:
            self._site_pruned = self._site_newest
            horizon = self._site_newest - SITE_HORIZON_MS
            for k in [k for k in self.site_hits if k[2] < horizon and k not in self.site_alert]:
                self.site_hits.pop(k, None)
                self.site_open.discard(k)
                self.site_live.pop(k, None)
                for struct in ("site_hits", "site_open", "site_live"):
                    self._mark(struct, k)
        maps: list[tuple[str, dict[Any, Any]]] = [
            ("series", self.series), ("seq_first", self.seq_first),
            ("site_hits", self.site_hits), ("open", self.open), ("waits", self.waits),
            ("site_live", self.site_live), ("site_alert", self.site_alert),
            ("incidents", self.incidents)]
        for struct, d in maps:
            while len(d) > self.max_keys:
                self._mark(struct, next(iter(d)))
                d.pop(next(iter(d)))
        for struct in ("last_end", "absent"):
            for r, d in getattr(self, struct).items():
                while len(d) > self.max_keys:
                    self._mark(struct, (r, next(iter(d))))
                    d.pop(next(iter(d)))
        if len(self.site_open) > self.max_keys:
            for k in self.site_open:
                self._mark("site_open", k)
            self.site_open.clear()


def _fields(rows: EnrichedResults) -> dict[str, F64]:
    out: dict[str, F64] = {}
    for o in OUTPUTS:
        v = getattr(rows, o.attr).astype(np.float64, copy=False)
        for name in (o.field, *o.aliases):
            out[name] = v
    for j, name in enumerate(rows.pct_names):
        out[name] = rows.pct[:, j]
    return out


def _site_of(rows: EnrichedResults, device: str) -> str:
    try:
        return rows.site[rows.device.index(device)]
    except ValueError:
        return "unknown"


def _series_entries(pairs: Iterable[tuple[Any, _Series | None]]) -> list[Any]:
    """The entries of these series (None: gone), in one comprehension: a batch of 10,000
    devices moves 20,000 of them."""
    isnan = math.isnan
    return [("series", k, None if st is None else (
        st.learned, st.run, st.run_start, st.open_since,
        None if isnan(st.last_value) else st.last_value, st.last_time)) for k, st in pairs]


def _definition(r: Rule) -> dict[str, Any]:
    """A rule as JSON data, as a snapshot keeps it to tell a rule changed since."""
    return orjson.loads(orjson.dumps(asdict(r)))  # type: ignore[no-any-return]


def _alert_row(a: RuleAlert) -> list[Any]:
    return [a.rule, a.kind, a.level, a.gateway, a.site, a.device, a.metric, a.window, a.opened,
            None if math.isnan(a.value) else a.value, a.message]


def _alert_from(x: Sequence[Any]) -> RuleAlert:
    return RuleAlert(rule=str(x[0]), kind=str(x[1]), level=str(x[2]), state="open",
                     gateway=str(x[3]), site=str(x[4]), device=str(x[5]), metric=str(x[6]),
                     window=str(x[7]), opened=int(x[8]), until=0,
                     value=math.nan if x[9] is None else float(x[9]), message=str(x[10]))


def _decode_key(struct: str, k: Any) -> Any:
    if struct == "series":
        return (str(k[0]), str(k[1]), str(k[2]), str(k[3]), str(k[4]))
    if struct in ("last_end", "absent"):
        return (str(k[0]), str(k[1]), str(k[2]), str(k[3]))
    if struct == "seq_first":
        return (str(k[0]), str(k[1]), str(k[2]))
    if struct in ("site_hits", "site_open", "site_live", "site_alert"):
        return (str(k[0]), str(k[1]), int(k[2]))
    if struct == "open":
        return _ident(k)
    if struct == "waits":
        return (str(k[0]), str(k[1]), str(k[2]), str(k[3]), int(k[4]))
    if struct == "orphans":
        return None
    if struct == "incidents":
        return (str(k[0]), str(k[1]), str(k[2]), str(k[3]))
    if struct == "kept":
        return str(k)
    raise ValueError(f"no such part of the rules' state: {struct!r}")


def journal_path(path: Path) -> Path:
    return path.with_suffix(".journal")


def _read_journal(path: Path) -> tuple[list[Any], int]:
    """The journal's records up to the first line that cannot be read, and how many lines
    were left out from there."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return [], 0
    records: list[Any] = []
    for i, line in enumerate(lines):
        try:
            records.append(orjson.loads(line))
        except ValueError:
            return records, len(lines) - i
    return records, 0


def save_rules(doc: Mapping[str, Any], path: Path) -> int:
    """A :meth:`RuleEngine.snapshot` to ``path``, atomically, then the journal emptied (what
    it holds is older than the snapshot: replayed on top of it, it would be skipped); its
    size. Take the snapshot where the rules run, write it anywhere: a thread."""
    tmp = path.with_name(path.name + ".tmp")
    data = orjson.dumps(doc)
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(FileNotFoundError):
        os.truncate(journal_path(path), 0)
    return len(data)


def append_rules(records: Sequence[bytes], path: Path) -> int:
    """Deltas (:meth:`RuleEngine.take_delta`) appended to the journal beside ``path``, on
    disk before this returns; the journal's size after."""
    with journal_path(path).open("ab") as fh:
        fh.write(b"".join(r + b"\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())
        return fh.tell()
