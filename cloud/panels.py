"""The panels, defined once: what the web view shows and what the Grafana dashboards show.

Every panel is InfluxQL with Grafana's macros (``$timeFilter``, ``$__interval``) and variables
(``/^$site$/`` ...), so the same text serves

* Grafana: ``cloud.dashboards`` builds the dashboards and alert rules from these definitions
  with grafana-foundation-sdk, and Grafana expands the macros itself;
* the built-in web view (``fieldline.view``): its server runs only these queries, expanded by
  :func:`render` from a few validated parameters (the browser never sends InfluxQL and never
  sees InfluxDB's credentials).

Alert rules and the ledger's conservation laws are defined here too, so a law shown as holding
in the view is the very expression a Grafana alert watches.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cloud.points import (
    AGGREGATES,
    ALERTS,
    ANOMALIES,
    DEVICES,
    GATEWAY_ROW,
    LEDGER,
    PIPELINE,
    SITES,
)
from devices.rejects import READING_REASONS
from devices.x509 import CERT_WARN_DAYS


@dataclass(frozen=True)
class Query:
    ref: str
    text: str
    alias: str = ""  # Grafana's legend alias ($tag_x, $col)
    fmt: str = "time_series"  # or "table"


@dataclass(frozen=True)
class Threshold:
    value: float
    color: str  # "orange" | "red"


@dataclass(frozen=True)
class Panel:
    """One panel. ``kind``: timeseries | table | stat | band (a metric's window mean with its
    min-max band and p95, anomalies marked: the device page's chart)."""

    key: str  # stable: the view's API names panels by it, Grafana panels carry it as their id
    title: str
    kind: str
    queries: tuple[Query, ...]
    unit: str = ""  # Grafana unit id: ms, reqps, percentunit, bytes, short
    description: str = ""
    thresholds: tuple[Threshold, ...] = ()
    width: int = 12
    height: int = 8
    # its own range in seconds, whatever the page's or dashboard's (Grafana's relative time);
    # 0: the page's
    range_s: int = 0
    # what Grafana shows when the query returns no series ("" : its "No data")
    no_value: str = ""


@dataclass(frozen=True)
class Section:
    """A Grafana row, and the view's page the panels are shown on."""

    title: str
    page: str  # fleet | device | anomalies | health
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Law:
    """A conservation law of the gateway ledger: ``total = sum(parts)`` at every report."""

    hop: str
    total: str
    parts: tuple[str, ...]

    def imbalance(self) -> str:
        """InfluxQL: total minus its parts, 0 while the law holds."""
        return " - ".join(f'last("{f}")' for f in (self.total, *self.parts))


LAWS = (
    Law("devices -> gateway", "readings_received",
        ("readings_accepted", "rejected", "late_dropped", "duplicates")),
    Law("gateway -> cloud", "windows_emitted",
        ("windows_acked", "windows_shed", "windows_pending")),
)

VARIABLE_NAMES = ("site", "gateway", "metric", "device", "window")

SEL = ('"site" =~ /^$site$/ AND "gateway" =~ /^$gateway$/ AND "metric" =~ /^$metric$/ '
       'AND "device" =~ /^$device$/ AND "window" =~ /^$window$/')
SITE_SEL = '"site" =~ /^$site$/ AND "metric" =~ /^$metric$/ AND "window" =~ /^$window$/'
DEVICE_SEL = '"gateway" =~ /^$gateway$/ AND "device" =~ /^$device$/'
EDGE = f'''FROM "{PIPELINE}" WHERE "component" = 'edge' AND "gateway" =~ /^$gateway$/'''
CLOUD = f'''FROM "{PIPELINE}" WHERE "component" = 'cloud\''''
LAG_ORANGE, LAG_RED = 30_000, 60_000
ANOMALY_SHARE = 0.1  # a site whose judged windows are this share anomalous, for 5 minutes
REFUSED_SHARE = 0.1  # a gateway refusing this share of the readings it receives, for 5 minutes
REFUSED_FLOOR = 20  # ... counted as if it had received this many more (one bad message of a few)
REPORTS_WITHIN = "10m"  # a gateway or worker with no health report in this long is not reporting
REPORTERS_FOR_S = 86_400  # ... among those that reported within this long (then forgotten)
# an alert open longer is not counted open, and a pattern rule's stops notifying: its point is at
# the event time that opened it. As long as deploy/cloud.toml's example retention: an absence
# rule's alert for a device dead for weeks must not be notified as resolved after 7 days, as it
# was. Cheap: alerts are a handful of points per incident.
ALERTS_OPEN_FOR_S = 400 * 86_400
RULE_ALERTS_FOR_S = ALERTS_OPEN_FOR_S


def reports_query(component: str, tag: str, field: str) -> str:
    """Health reports per gateway (or worker) in the last ``REPORTS_WITHIN``, for every one that
    reported in the range (0 for those gone quiet): a series that stops has no points left
    for a rule to judge, so the union with the range's last report keeps it in the answer.
    Counted in InfluxDB's time, not in buckets (a bucket just begun would count 0), and
    tolerant of a reporter's clock running late by less than ``REPORTS_WITHIN``."""
    where = f"FROM \"{PIPELINE}\" WHERE \"component\" = '{component}' AND"
    return (f'SELECT sum("reports") FROM (SELECT count("{field}") AS "reports" {where} '
            f'time > now() - {REPORTS_WITHIN} GROUP BY "{tag}"), (SELECT last("{field}") * 0 '
            f'AS "reports" {where} $timeFilter GROUP BY "{tag}") GROUP BY "{tag}"')


def _ts(key: str, title: str, text: str, alias: str = "", **kw: object) -> Panel:
    return Panel(key, title, "timeseries", (Query("A", text, alias),), **kw)  # type: ignore[arg-type]


def _table(key: str, title: str, text: str, **kw: object) -> Panel:
    return Panel(key, title, "table", (Query("A", text, fmt="table"),), **kw)  # type: ignore[arg-type]


_REJECTS = ", ".join(f'non_negative_derivative(max("rejected_{r}"), 1s) AS "{r}"'
                     for r in READING_REASONS)
_LEDGER_FIELDS = tuple(dict.fromkeys(f for law in LAWS for f in (law.total, *law.parts)))

SECTIONS: tuple[Section, ...] = (
    Section("Fleet", "fleet", (
        _table("fleet_devices", "Devices: last window, readings", (
            f'SELECT last("count") AS "readings" FROM "{AGGREGATES}" WHERE "site" =~ /^$site$/ '
            'AND "gateway" =~ /^$gateway$/ AND "window" =~ /^$window$/ AND $timeFilter '
            'GROUP BY "site", "gateway", "device"'), width=8,
            description="Every device with a window in the range, by site and gateway; time is "
                        "the start of its newest window."),
        _table("fleet_anomalies", "Anomalous windows by device", (
            f'SELECT count("score") AS "anomalies" FROM "{ANOMALIES}" WHERE "site" =~ /^$site$/ '
            'AND "gateway" =~ /^$gateway$/ AND $timeFilter GROUP BY "site", "gateway", "device"'),
            width=8),
        _table("fleet_clocks", "Devices: silent, clock offset", (
            f'SELECT last("silent") AS "silent", last("skew_ms") AS "clock offset ms" '
            f'FROM "{DEVICES}" WHERE "gateway" =~ /^$gateway$/ AND $timeFilter '
            'GROUP BY "gateway", "device"'), width=8,
            description="Reported by the edge agents; a negative offset: the device's clock "
                        "runs ahead."),
        _ts("fleet_silent", "Silent devices and skewed clocks by gateway", (
            'SELECT max("devices_silent") AS "silent", max("devices_skewed") AS "skewed" '
            f'{EDGE} AND $timeFilter GROUP BY time($__interval), "gateway" fill(none)'),
            "$tag_gateway $col", thresholds=(Threshold(1, "orange"),)),
        _ts("fleet_mean_by_site", "Mean by site and metric", (
            f'SELECT sum("sum") / sum("readings") AS "mean" FROM "{SITES}" WHERE {SITE_SEL} '
            'AND $timeFilter GROUP BY time($__interval), "site", "metric" fill(none)'),
            "$tag_site $tag_metric",
            description="The mean of every reading of a metric at a site, from the worker's "
                        "per-site rollups (a few points per window, not one per device); "
                        "windows as first shipped, late readings' revisions left out."),
    )),
    Section("Device", "device", (
        Panel("device_metric", "Window mean, min-max band and p95", "band", (Query("A", (
            'SELECT "mean", "min", "max", "p95", "count", "rev" '
            f'FROM "{AGGREGATES}" WHERE {DEVICE_SEL} AND "metric" =~ /^$metric$/ '
            'AND "window" =~ /^$window$/ AND $timeFilter GROUP BY "metric", "unit"'),
            "$tag_metric $col"),), width=24, height=10,
            description="Calibrated statistics of each event-time window of the device; the "
                        "band spans each window's min and max."),
        _table("device_anomalies", "Anomalies of the device", (
            'SELECT "metric", "detector", "direction", "score", "value", "reference", "rev", '
            f'"message" FROM "{ANOMALIES}" WHERE {DEVICE_SEL} AND $timeFilter '
            'ORDER BY time DESC LIMIT 500'), width=12),
        _table("device_revisions", "Revised windows (late readings folded in)", (
            'SELECT "metric", "window", "rev", "count", "mean" '
            f'FROM "{AGGREGATES}" WHERE {DEVICE_SEL} AND "window" =~ /^$window$/ '
            'AND "rev" > 0 AND $timeFilter ORDER BY time DESC LIMIT 500'), width=12,
            description="A window is shipped when the watermark passes its end; readings "
                        "arriving within the allowed lateness revise it (rev 1, 2, ...)."),
        _ts("device_mean", "Window mean by device", (
            f'SELECT mean("mean") FROM "{AGGREGATES}" WHERE {SEL} AND $timeFilter '
            'GROUP BY time($__interval), "device" fill(none)'), "$tag_device"),
        _ts("device_p50_p99", "p50 and p99 by device", (
            f'SELECT mean("p50") AS "p50", max("p99") AS "p99" FROM "{AGGREGATES}" '
            f'WHERE {SEL} AND $timeFilter GROUP BY time($__interval), "device" fill(none)'),
            "$tag_device $col",
            description="Percentiles from each window's mergeable sketch (1 % relative error)."),
    )),
    Section("Anomalies", "anomalies", (
        _table("alerts", "Alerts, one per incident (detectors and rules)", (
            'SELECT "gateway", "device", "metric", "source", "name", "state", "level", '
            f'"severity", "resolved", "message" FROM "{ALERTS}" WHERE "site" =~ /^$site$/ AND '
            '$timeFilter ORDER BY time DESC LIMIT 200'), width=16,
            description="An incident opens when a detector's severity (or a pattern rule) "
                        "crosses its threshold and resolves when the series is back; time is "
                        "the window that opened it, resolved the end of its last window."),
        _ts("alerts_by_source", "Alerts opened by source", (
            f'SELECT count("state") FROM "{ALERTS}" WHERE "site" =~ /^$site$/ AND $timeFilter '
            'GROUP BY time($__interval), "source" fill(0)'), "$tag_source", width=8),
        _table("alerts_open", "Alerts open now, by source", (
            f'SELECT count("state") AS "open" FROM "{ALERTS}" WHERE "site" =~ /^$site$/ AND '
            '"open" = true AND $timeFilter GROUP BY "source"'), width=8, range_s=ALERTS_OPEN_FOR_S,
            no_value="None open",
            description="Every incident and rule alert open now, whenever it opened (up to "
                        f"{ALERTS_OPEN_FOR_S // 86_400} days ago), whatever the time range: "
                        "the Alerts table holds the newest 200 of the range."),
        _table("anomalies", "Anomalous windows", (
            'SELECT "gateway", "device", "metric", "detector", "direction", "score", "value", '
            f'"reference", "message" FROM "{ANOMALIES}" WHERE "site" =~ /^$site$/ '
            'AND "metric" =~ /^$metric$/ AND $timeFilter ORDER BY time DESC LIMIT 200'),
            width=16),
        _ts("anomalies_by_site", "Share of windows anomalous, by site", (
            f'SELECT sum("anomalous") / sum("judged") FROM "{SITES}" WHERE "site" =~ /^$site$/ '
            'AND "judged" > 0 AND $timeFilter GROUP BY time($__interval), "site" fill(none)'),
            "$tag_site", width=8, unit="percentunit",
            thresholds=(Threshold(ANOMALY_SHARE, "red"),),
            description="Of the windows the detectors judged at each site, the share they found "
                        "anomalous, whatever the site's size; the alert rule \"Anomaly rate "
                        "high\" fires above the line for 5 minutes."),
    )),
    Section("Pipeline health", "health", (
        _ts("edge_accepted", "Edge: readings accepted /s", (
            f'SELECT non_negative_derivative(max("readings_accepted"), 1s) {EDGE} '
            'AND $timeFilter GROUP BY time($__interval), "gateway" fill(none)'), "$tag_gateway",
            unit="reqps", width=8),
        _ts("edge_rejects", "Edge: rejected readings /s by reason", (
            f'SELECT {_REJECTS} {EDGE} AND $timeFilter GROUP BY time($__interval) fill(none)'),
            "$col", unit="reqps", width=8),
        _ts("edge_late", "Edge: late readings /s", (
            'SELECT non_negative_derivative(max("late_dropped"), 1s) AS "late dropped", '
            'non_negative_derivative(max("late_revised"), 1s) AS "late, revised a window", '
            'non_negative_derivative(max("duplicates"), 1s) AS "duplicates" '
            f'{EDGE} AND $timeFilter GROUP BY time($__interval) fill(none)'), "$col",
            unit="reqps", width=8),
        _ts("edge_watermark_lag", "Edge: watermark lag", (
            f'SELECT max("watermark_lag_ms") {EDGE} AND $timeFilter '
            'GROUP BY time($__interval), "gateway" fill(none)'), "$tag_gateway",
            unit="ms", width=8),
        _ts("cloud_lag", "End-to-end lag (edge publish -> InfluxDB)", (
            'SELECT max("lag_p50_ms") AS "p50", max("lag_p99_ms") AS "p99" '
            f'{CLOUD} AND $timeFilter GROUP BY time($__interval) fill(none)'), "$col",
            unit="ms", width=8,
            thresholds=(Threshold(LAG_ORANGE, "orange"), Threshold(LAG_RED, "red"))),
        _ts("edge_outbox", "Edge: outbox (batches waiting for the cloud)", (
            'SELECT max("outbox_depth") AS "batches", max("outbox_fill") AS "fill" '
            f'{EDGE} AND $timeFilter GROUP BY time($__interval), "gateway" fill(none)'),
            "$tag_gateway $col", width=8,
            description="Batches stored on the gateway's disk and not yet acknowledged; fill "
                        "is the share of outbox.max_bytes in use."),
        _ts("cloud_written", "Cloud: points written /s", (
            f'SELECT non_negative_derivative(max("points_written"), 1s) {CLOUD} '
            'AND $timeFilter GROUP BY time($__interval), "worker" fill(none)'), "$tag_worker",
            unit="reqps", width=8),
        _ts("edge_memory", "Edge: open windows and memory", (
            'SELECT max("open_windows") AS "open windows", max("rss_mb") AS "RSS MiB" '
            f'{EDGE} AND $timeFilter GROUP BY time($__interval), "gateway" fill(none)'),
            "$tag_gateway $col", width=8),
        _ts("cloud_detector_state", "Cloud: detector state", (
            'SELECT max("detector_series") AS "series", max("detector_state_mb") AS "MiB" '
            f'{CLOUD} AND $timeFilter GROUP BY time($__interval), "worker" fill(none)'),
            "$tag_worker $col", width=8,
            description="Series the detectors hold (about 9 KB each) and their state in MiB; "
                        "a series without a window for [detect] forget_after (30 days) is "
                        "forgotten, so churning device ids do not grow it for good."),
        _table("edge_clocks", "Edge: gateway clocks against the worker's", (
            'SELECT last("clock_off") AS "off", last("clock_offset_ms") AS "offset ms" '
            f'{EDGE} AND $timeFilter GROUP BY "gateway"'), width=8,
            description="Told by the cloud worker from the time each gateway's health reports "
                        "take (the least of 2 minutes of them); off: more than 60 s off the "
                        "worker's, or, when the median of three gateways or more is off the "
                        "worker's (the worker's clock, or its lag: `fieldline cloud status` "
                        "says), off that median (the alert rule \"Gateway clock off\"); a "
                        "negative offset: the gateway's clock runs behind. No offset yet: not "
                        "told yet."),
    )),
    Section("Ledger: every reading accounted for", "health", (
        _table("ledger_balance", "Conservation laws per gateway (0 = holds)", (
            'SELECT ' + ", ".join(f'{law.imbalance()} AS "{law.hop}"' for law in LAWS)
            + f' FROM "{LEDGER}" WHERE "device" = \'{GATEWAY_ROW}\' AND '
            '"gateway" =~ /^$gateway$/ AND $timeFilter GROUP BY "gateway"'),
            width=8, thresholds=(Threshold(1, "red"),),
            description="received = accepted + rejected + late + duplicates; emitted = "
                        "acknowledged (in InfluxDB) + shed + pending; each column is the "
                        "difference, 0 while the law holds."),
        _table("ledger_gateways", "Ledger per gateway", (
            'SELECT ' + ", ".join(f'last("{f}") AS "{f}"' for f in (
                *_LEDGER_FIELDS, "readings_gap", "broker_dropped", "results_written"))
            + f' FROM "{LEDGER}" WHERE "device" = \'{GATEWAY_ROW}\' AND '
            '"gateway" =~ /^$gateway$/ AND $timeFilter GROUP BY "gateway"'), width=16),
        _table("ledger_devices", "Ledger per device", (
            'SELECT last("received") AS "received", last("accepted") AS "accepted", '
            'last("rejected") AS "rejected", last("late_dropped") AS "late", '
            'last("duplicates") AS "duplicates", last("windows_emitted") AS "windows" '
            f'FROM "{LEDGER}" WHERE "gateway" =~ /^$gateway$/ AND "device" != \'{GATEWAY_ROW}\' '
            'AND $timeFilter GROUP BY "gateway", "device"'), width=24,
            description="Every device of the selected gateways, whichever device is selected "
                        "above."),
    )),
)

PANELS: dict[str, Panel] = {p.key: p for s in SECTIONS for p in s.panels}

VARIABLES: tuple[tuple[str, str], ...] = (
    ("site", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "site"'),
    ("gateway", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "gateway" '
                'WHERE "site" =~ /^$site$/'),
    ("metric", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "metric"'),
    ("device", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "device" '
               'WHERE "site" =~ /^$site$/ AND "gateway" =~ /^$gateway$/ '
               'AND "metric" =~ /^$metric$/'),
    ("window", f'SHOW TAG VALUES FROM "{AGGREGATES}" WITH KEY = "window"'),
)

ANNOTATION_QUERY = (f'SELECT "message", "device", "metric" FROM "{ANOMALIES}" '
                    'WHERE "site" =~ /^$site$/ AND "device" =~ /^$device$/ AND $timeFilter')


@dataclass(frozen=True)
class AlertRule:
    """A Grafana alert rule: ``reducer(query) op threshold`` for ``for_`` fires it, per series
    (one alert per gateway, site or worker)."""

    uid: str
    title: str
    query: str
    threshold: float
    summary: str
    reducer: Literal["last", "max", "mean", "sum"] = "last"
    op: Literal["gt", "lt"] = "gt"
    for_: str = "2m"
    range_s: int = 600
    severity: str = "warning"


def gateway_flag(uid: str, title: str, field: str, summary: str) -> AlertRule:
    """A rule that fires for a gateway whose last health point in 5 minutes has ``field`` set
    (a flag its agent reports, or the worker adds), and has for 5 minutes."""
    return AlertRule(uid, title, f'SELECT last("{field}") FROM "{PIPELINE}" WHERE "component" '
                     "= 'edge' AND $timeFilter GROUP BY \"gateway\"", threshold=0, for_="5m",
                     range_s=300, summary=summary)


def not_reporting(tag: str, who: str, query: str, says: str) -> AlertRule:
    """A rule that fires for a gateway or worker with no health report (``reports_query``)."""
    return AlertRule(f"fieldline-{tag}-not-reporting", f"{who} not reporting", query,
                     threshold=1, op="lt", reducer="last", for_="1m", range_s=REPORTERS_FOR_S,
                     severity="critical", summary=f"{who} {{{{ $labels.{tag} }}}} {says}")


def rule_alerts_open(level: str) -> AlertRule:
    """The alerts of the pattern rules (``[[rules]]``) of one level, open now: one Grafana
    alert per rule and subject, resolved when the worker resolves it (its point in ``alerts``
    overwritten with ``open = false``). The point is at the event time that opened it, hence
    the range; ``info`` rules are not notified (they are in the Alerts panel)."""
    return AlertRule(
        f"fieldline-rule-{level}", f"Pattern rule alert ({level})",
        f'SELECT count("state") FROM "{ALERTS}" WHERE "source" = \'rule\' AND "open" = true '
        f'AND "level" = \'{level}\' AND $timeFilter '
        'GROUP BY "name", "site", "gateway", "device", "metric"',
        threshold=0, for_="0s", range_s=RULE_ALERTS_FOR_S, severity=level,
        summary="Rule {{ $labels.name }}: {{ $labels.device }} {{ $labels.metric }} at site "
                "{{ $labels.site }} (gateway {{ $labels.gateway }}); its message is in the "
                "dashboard's Alerts panel and the view. It resolves when the rule's condition "
                "ends (a sequence alert: with the incident that completed it; a site alert: "
                "once fewer devices than the rule's count are in incident).")


ALERT_RULES: tuple[AlertRule, ...] = (
    AlertRule(
        "fieldline-anomaly-rate", "Anomaly rate high",
        f'SELECT sum("anomalous") / sum("judged") FROM "{SITES}" WHERE "judged" > 0 AND '
        '$timeFilter GROUP BY time(1m), "site" fill(none)',
        threshold=ANOMALY_SHARE, reducer="mean", for_="5m",
        summary="More than 10 % of the windows judged at site {{ $labels.site }} anomalous "
                "over 10 minutes: a site-wide event, or detectors too sensitive for this "
                "site."),
    AlertRule(
        "fieldline-ledger-imbalance", "Ledger does not balance",
        'SELECT ' + " + ".join(f"abs({law.imbalance()})" for law in LAWS)
        + f' FROM "{LEDGER}" WHERE "device" = \'{GATEWAY_ROW}\' AND $timeFilter '
        'GROUP BY "gateway"',
        threshold=0, for_="1m", range_s=300, severity="critical",
        summary="Gateway {{ $labels.gateway }}: readings or windows are not accounted for "
                "(a conservation law of the ledger fails); see the view's Health page."),
    AlertRule(
        "fieldline-lag", "End-to-end lag high",
        f'SELECT max("lag_p99_ms") {CLOUD} AND $timeFilter '
        'GROUP BY time(1m), "worker" fill(none)',
        threshold=LAG_RED, reducer="max", for_="5m",
        summary="p99 from edge publish to InfluxDB above 60 s on worker {{ $labels.worker }}."),
    AlertRule(
        "fieldline-watermark-lag", "Edge watermark lag high",
        f'''SELECT max("watermark_lag_ms") FROM "{PIPELINE}" WHERE "component" = 'edge' '''
        'AND $timeFilter GROUP BY time(1m), "gateway" fill(none)',
        threshold=300_000, reducer="max", for_="5m",
        summary="Gateway {{ $labels.gateway }} closes windows more than 5 minutes after "
                "their end: devices far behind, or the agent overloaded."),
    AlertRule(
        "fieldline-silent-devices", "Devices silent",
        f'''SELECT last("devices_silent") FROM "{PIPELINE}" WHERE "component" = 'edge' '''
        'AND $timeFilter GROUP BY "gateway"',
        threshold=0, for_="5m", range_s=300,
        summary="Gateway {{ $labels.gateway }} has devices that stopped reporting."),
    AlertRule(
        "fieldline-outbox-filling", "Edge outbox filling",
        f'''SELECT last("outbox_fill") FROM "{PIPELINE}" WHERE "component" = 'edge' '''
        'AND $timeFilter GROUP BY "gateway"',
        threshold=0.5, for_="5m", range_s=300, severity="critical",
        summary="Gateway {{ $labels.gateway }}'s outbox is over half full: the cloud is not "
                "acknowledging; at 100 % its policy sheds results."),
    not_reporting(
        "gateway", "Gateway", reports_query("edge", "gateway", "readings_accepted"),
        "sent no health report in 10 minutes: its agent or its machine is down, or its uplink "
        "is (its outbox keeps the results until it is back). Once quiet for a day it is no "
        "longer judged."),
    not_reporting(
        "worker", "Cloud worker", reports_query("cloud", "worker", "messages_in"),
        "wrote no health report in 10 minutes: it is down (the gateways keep their results), "
        "or cannot write to InfluxDB. A worker taken out of service stops being judged after "
        "a day."),
    AlertRule(
        "fieldline-readings-refused", "Gateway refusing readings",
        f'SELECT spread("rejected") / (spread("readings_received") + {REFUSED_FLOOR}) '
        f'FROM "{PIPELINE}" '
        "WHERE \"component\" = 'edge' AND $timeFilter GROUP BY \"gateway\"",
        threshold=REFUSED_SHARE, for_="5m", range_s=600,
        summary="Gateway {{ $labels.gateway }} refused more than 10 % of the readings it "
                "received in 10 minutes (a firmware update that changed the devices' payloads, "
                "a new metric or unit, clocks gone wrong): they reach no window. The view's "
                "Health page and `fieldline edge status` give the reasons."),
    gateway_flag(
        "fieldline-clock-untrusted", "Gateway clock not trusted", "clock_unsynced",
        "Gateway {{ $labels.gateway }}'s clock is implausible (before validate.clock_floor, "
        "stepped back behind readings it accepted, or behind its devices' clocks, which agree "
        "on it: set from a saved time without network time): it holds its devices' messages until "
        "network time sets it, and sheds the oldest beyond validate.quarantine_max (rejected "
        "as clock_unsynced). Check its NTP."),
    gateway_flag(
        "fieldline-clock-off", "Gateway clock off", "clock_off",
        "Gateway {{ $labels.gateway }}'s clock is set but more than a minute off the cloud "
        "worker's (told from the time its health reports take; its health is filed at the "
        "worker's time), or, when the worker is off its gateways' median clock, off that "
        "median: what it stamps with its own time (readings without a time of their "
        "own) is misplaced by as much. Check its time sync (NTP, UDP 123 through the site's "
        "firewall); `fieldline cloud status` says by how much."),
    AlertRule(
        "fieldline-certificate-expiring", "Certificate expiring",
        f'SELECT last("cert_days_left") FROM "{PIPELINE}" WHERE $timeFilter '
        'GROUP BY "component", "gateway", "worker"',
        threshold=CERT_WARN_DAYS, op="lt", for_="0s", range_s=3600,
        summary="A TLS certificate the {{ $labels.component }} {{ $labels.gateway }}"
                "{{ $labels.worker }} uses for its MQTT links (its own, a CA, or, for a "
                "gateway, the one the cloud broker shows: then every gateway's) expires within "
                "30 days: renew it and restart it, or the link fails its handshake (its log and, "
                "on a gateway, `fieldline edge status` name which)."),
    AlertRule(
        "fieldline-points-refused", "InfluxDB refusing points",
        f'SELECT non_negative_difference(max("points_rejected")) {CLOUD} AND $timeFilter '
        'GROUP BY time(10s), "worker" fill(none)',
        threshold=0, reducer="sum", for_="0s", range_s=600,
        summary="InfluxDB refused points of worker {{ $labels.worker }} in the last 10 minutes "
                "(a field's type changed, a window older than the database's retention): "
                "they are in the worker's dead-letter file, with the reason, and its log."),
    AlertRule(
        "fieldline-stream-replicas", "JetStream stream under-replicated",
        f'SELECT last("engine_replicas_behind") {CLOUD} AND $timeFilter GROUP BY "worker"',
        threshold=0, for_="5m", range_s=300,
        summary="Worker {{ $labels.worker }} sees replicas of the JetStream stream not current: "
                "a NATS node down, or one whose disk filled (nats-server then disables "
                "JetStream there until restarted). One more node lost stops the pipeline."),
    rule_alerts_open("critical"),
    rule_alerts_open("warning"),
)


def panel_queries() -> list[tuple[str, str]]:
    """(title, InfluxQL) of every panel, variable, annotation and alert-rule query."""
    out = [(p.title, q.text) for s in SECTIONS for p in s.panels for q in p.queries]
    out += [(f"variable {name}", q) for name, q in VARIABLES]
    out.append(("annotation anomalies", ANNOTATION_QUERY))
    out += [(f"alert {r.title}", r.query) for r in ALERT_RULES]
    return out


# ---- expanding the macros and variables (the view's server; tests) --------------------------

RANGES_S = {"5m": 300, "15m": 900, "1h": 3600, "6h": 21_600, "24h": 86_400, "7d": 604_800}
_VALUE = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_VAR = re.compile(r"/\^\$(\w+)\$/")


class ParamError(ValueError):
    pass


@dataclass(frozen=True)
class Params:
    """What a view request may choose: a time range and a value (or all) per variable."""

    range_s: int = 3600
    points: int = 240  # about as many intervals as a chart is wide
    values: Mapping[str, str] = field(default_factory=dict)

    @staticmethod
    def parse(query: Mapping[str, str]) -> Params:
        rng = query.get("range", "1h")
        if rng not in RANGES_S:
            raise ParamError(f"range must be one of {', '.join(RANGES_S)}; got {rng!r}")
        values: dict[str, str] = {}
        for name in VARIABLE_NAMES:
            v = query.get(name)
            if v is None or v in ("", "*"):
                continue
            if not _VALUE.match(v):
                raise ParamError(f"{name}: a value of 1 to 200 printable characters")
            values[name] = v
        return Params(RANGES_S[rng], values=values)


def _regex_literal(value: str) -> str:
    return "^" + re.escape(value).replace("/", r"\/") + "$"


def render(text: str, params: Params) -> str:
    """Grafana's macros and variables expanded the way Grafana would: ``$timeFilter``,
    ``$__interval`` (range / points, at least 1 s), ``/^$var$/`` (one exact value, or all)."""
    interval = max(1, params.range_s // params.points)
    out = text.replace("$timeFilter", f"time > now() - {params.range_s}s")
    out = out.replace("$__interval", f"{interval}s")

    def var(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in VARIABLE_NAMES:
            raise ParamError(f"unknown variable ${name}")
        v = params.values.get(name)
        return "/.*/" if v is None else f"/{_regex_literal(v)}/"

    if "$" in _VAR.sub("", out):
        raise ParamError(f"unknown macro in {text!r}")
    return _VAR.sub(var, out)
