"""The cloud worker's composition root: ingest -> dedup -> enrich -> detect -> InfluxDB.

Three named tasks: ``consume`` (reads the partitioned source and runs the synchronous stages),
``write`` (the buffered sink writer) and ``health`` (the worker's own pipeline point). Bad uplink
messages are counted by reason and logged; they never stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cloud.config import CloudConfig
from cloud.dedup import BatchDedup, Seen
from cloud.detect import DetectionStage
from cloud.detect.stage import Detections, subject_of, write_snapshot
from cloud.enrich import UNKNOWN_SITE, EnrichedResults, Enricher
from cloud.gatewayclock import CLOCK_TELL_MS, GatewayClocks
from cloud.ingest import MqttSource, PartitionedSource, PartitionEvent, SourceMessage
from cloud.jetstream import shown
from cloud.partition import Captured, PartitionState, build_detection, encode_snapshot
from cloud.points import (
    aggregate_points,
    alert_points,
    anomaly_points,
    device_points,
    ledger_points,
    pipeline_points,
    rule_alert_points,
    site_points,
    superseded_identities,
)
from cloud.refdata import ReferenceData
from cloud.rules import Rule, RuleEngine, append_rules, save_rules
from cloud.sinks import build_sink
from cloud.sinks.base import BufferedWriter, Sink
from cloud.sinks.points import Points
from cloud.status import (
    HEARD_FOR_MS,
    QUIET_MS,
    QUIET_SHOWN,
    heard_path,
    load_heard,
    save_heard,
    status_path,
    write_status,
)
from devices.clock import Clock, SystemClock
from devices.contract import (
    BASE_FIELDS,
    HealthReport,
    ResultBatch,
    ResultColumns,
    SupersededRows,
    batch_digest,
    decode_uplink,
    gateway_from_topic,
    peek_batch_id,
)
from devices.errors import ConfigError, ContractError
from devices.registry import Registry
from devices.rejects import RejectLog
from devices.status import Links
from devices.x509 import CERT_WARN_DAYS, DAY_MS, link_certificate

# what a worker keeps in ``worker.state_dir``, beside its status and heard files
DEDUP_FILE, DETECT_FILE, RULES_FILE = "dedup.json", "detect.npz", "rules.json"
DEAD_LETTER_FILE = "dead-letter.jsonl"


ACK_CONCURRENCY = 64  # acks in flight at once (each waits for its PUBACK)
T = TypeVar("T")


async def bounded(calls: list[Coroutine[Any, Any, T]], most: int) -> list[T]:
    """Await ``calls`` with at most ``most`` of them running at once; their results in order."""
    gate = asyncio.Semaphore(most)

    async def one(call: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


def state_files(worker_id: str) -> tuple[str, ...]:
    """The files a worker of that name reads and writes in its state directory."""
    return (DEDUP_FILE, DETECT_FILE, RULES_FILE, DEAD_LETTER_FILE,
            status_path(Path(), worker_id).name, heard_path(Path(), worker_id).name)


log = logging.getLogger("fieldline.cloud")

_SNAPSHOT = object()  # writer token: publish this partition snapshot once it is all written
_RULES = object()  # writer token: the rules' state as it was here, to save once it is all written
_DELTA = object()  # writer token: what changed in the rules' state, to journal once written
# a gateway's health gauges that say something waits there for the cloud (its outbox is a
# gauge it must report: an agent that does not is never taken for idle)
BUSY_GAUGES = ("intake_pending", "quarantine_held", "backpressure", "disk_blocked",
               "clock_unsynced")
# the detection stages' counters a worker reports (each partition's, and those it held before)
STAGE_COUNTERS = ("series_forgotten", "alerts_resolved_silent")
# Partition snapshots (JetStream) of a large state are taken less often than snapshot_interval:
# at most this share of the worker's time goes to them, and at most this many bytes a second to
# the engine (the detectors' state is ~9 KB a series: 280 MB at 10,000 devices x 3 metrics, 0.8 s
# to encode). A takeover then replays more of the stream: `engine_snapshot_every_s` says how much.
SNAPSHOT_TIME_SHARE = 0.05
SNAPSHOT_BYTES_PER_S = 4_000_000

FOREIGN_DEVICE = "foreign_device"  # results of a device the registry assigns to another gateway


def idle_report(rep: HealthReport) -> bool:
    """Nothing waits at this report's gateway for the cloud: its outbox is empty (every batch
    it stored acknowledged), its intake caught up, its clock set, its disk writable."""
    g = rep.gauges
    return "outbox_depth" in g and not g["outbox_depth"] and not any(
        g.get(k) for k in BUSY_GAUGES)


def _keep_rows(batch: ResultBatch, keep: np.ndarray, superseded: SupersededRows | None
               ) -> ResultBatch:
    """The batch with only the result rows ``keep`` (a mask) and these superseded ones."""
    kept = batch.results.take(np.flatnonzero(keep))
    results = ResultColumns(
        **{f: getattr(kept, f) for f in BASE_FIELDS}, seq_min=kept.seq_min,
        seq_max=kept.seq_max, seq_sum=kept.seq_sum, spec=kept.spec, pct=kept.pct,
        sk_keys=kept.sk_keys, sk_counts=kept.sk_counts, sk_offsets=kept.sk_offsets,
        superseded=superseded)
    return replace(batch, results=results)


RULES_IDLE_AFTER = 1_000  # results taken before a rule that judged none of them is named
# the rules' journal past this, or past the size of their last snapshot: a snapshot replaces
# it (a restart reads both: at 10,000 devices x 3 rules, 8 MiB of journal took 1 s)
RULES_JOURNAL_MIN = 8 << 20
RULES_SNAPSHOT_WAIT_S = 60.0  # a rules snapshot queued: the next once it is written, or after this
DETECT_SNAPSHOT_S = 300.0  # how often the detector state is saved to state_dir (and at stop)
CERT_WARN_EVERY_S = 3_600.0  # a certificate about to expire is warned about this often

__all__ = ["CloudWorker", "build_detection", "build_sink", "dedup_key"]


def dedup_key(gateway: str, incarnation: int) -> str:
    """Batches are numbered per agent incarnation: a gateway whose state was lost counts from
    0 again as a new incarnation, under its own dedup marks (gateway ids hold no '/')."""
    return gateway if incarnation == 0 else f"{gateway}/{incarnation}"


def _percentile(values: deque[int], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.fromiter(values, np.int64, len(values)), q))


class CloudWorker:
    def __init__(self, config: CloudConfig, *, clock: Clock | None = None,
                 sink: Sink | None = None, source: PartitionedSource | None = None,
                 registry: Registry | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        if registry is None:
            if config.registry_path is None:
                log.warning("no registry configured: every device will be reported unknown")
                registry = Registry()
            else:
                registry = Registry.load(config.registry_path, "worker.registry")
                registry.check_kinds(config.catalog, source=str(config.registry_path))
        # reloaded when its file changes (or on SIGHUP: request_reload), joined as-of
        self.registry = ReferenceData(registry, path=config.registry_path,
                                      catalog=config.catalog)
        self._reload_requested = False
        # ``[[rules]]`` read again at a SIGHUP (``fieldline cloud run`` sets it: the config file)
        self.rules_source: Callable[[], Sequence[Rule]] | None = None
        if source is None and config.jetstream is not None:
            from cloud.jetstream import JetStreamSource

            source = JetStreamSource(config.jetstream, worker_id=config.worker_id)
        self.source = source or MqttSource(config.broker, partitions=config.partitions,
                                           client_id=f"fieldline-cloud-{config.worker_id}")
        # the TLS certificates its ingest link loaded (its own, the CA): the soonest expiry;
        # a JetStream worker's link is to NATS
        b = config.broker
        self.cert = (config.jetstream.certificate(log) if config.jetstream is not None
                     else link_certificate(b.url, (b.ca_file, b.cert_file), log)
                     if b.tls else None)
        self.cert_expiry: int | None = None if self.cert is None else self.cert["not_after"]
        self._cert_warned = -CERT_WARN_EVERY_S
        self.sink = sink or build_sink(config.influx)
        self.writer = BufferedWriter(self.sink, clock=self.clock,
                                     batch_points=config.influx.batch_points,
                                     flush_interval_ms=config.influx.flush_interval_ms,
                                     concurrency=config.influx.write_concurrency,
                                     on_written=self._on_written,
                                     dead_letter_path=config.state_dir / DEAD_LETTER_FILE
                                     if config.state_dir else None,
                                     fence=self._fence)
        self.enricher = Enricher(self.registry, config.catalog)
        # one state per partition the source hands over (JetStream), or one for all (MQTT)
        self.per_partition = bool(getattr(self.source, "per_partition_state", False))
        self.parts: dict[int, PartitionState] = {}
        if not self.per_partition:
            self.parts[0] = PartitionState.fresh(config)
        self.snapshot_interval_s = (config.jetstream.snapshot_interval_ms / 1000
                                    if config.jetstream else 10.0)
        self._bg: set[asyncio.Task[None]] = set()
        self._snapshots_busy: set[int] = set()  # partitions whose snapshot is on its way
        self._snapshot_cost: dict[int, tuple[float, int]] = {}  # p -> seconds, bytes
        self.rejects = RejectLog(log)
        self.counters: Counter[str] = Counter()
        self.lag_ms: deque[int] = deque(maxlen=5000)  # edge publish -> InfluxDB confirmed
        self.freshness_ms: deque[int] = deque(maxlen=5000)  # window end -> InfluxDB confirmed
        # batches whose newest window ended before this are history (a backfill, a replay):
        # not counted in freshness (0: all are)
        self.freshness_since_ms = 0
        # gateway -> (when its last health report came, by this worker's clock; its partition)
        self.gateways_heard: dict[str, tuple[int, int]] = {}
        self.gateway_clocks = GatewayClocks()  # each gateway's clock against ours
        self._clock_told: dict[str, int] = {}  # gateway -> when (our ms) an ack last told it
        self._started = self.clock.now_ms()
        self._links = Links()
        self._status_failed = False
        self._idle_said: set[str] = set()  # rules logged as judging nothing
        # (gateway, incarnation) -> (acked, rejected) batch numbers, sent by the acker task
        self._acks: dict[tuple[str, int], tuple[list[int], list[int], dict[int, str],
                                                list[int]]] = {}
        self.written_by_gateway: dict[str, int] = {}  # results written since this worker start
        self.max_tracked_revisions = 1_000_000  # per partition (dedup covers older re-sends)
        self._ack_wake = asyncio.Event()
        self._dedup_path = config.state_dir / DEDUP_FILE if config.state_dir else None
        self._detect_path = config.state_dir / DETECT_FILE if config.state_dir else None
        self._rules_path = config.state_dir / RULES_FILE if config.state_dir else None
        # the single path keeps its rules' state in state_dir (JetStream: in partition snapshots);
        # with every rule removed, a state left is still read: the alerts it has open close.
        # Rules or none, that state keeps the detectors' open incidents exactly too
        self._keeps_rules = bool(self._rules_path and not self.per_partition)
        # to save, all their effects written: a snapshot (then the journal starts afresh),
        # each batch's changes since, in order
        self._rules_full: dict[str, Any] | None = None
        self._rules_deltas: list[bytes] = []
        self._rules_journal_bytes = 0
        self._rules_snapshot_bytes = 0
        self._rules_snapshot_queued = -RULES_SNAPSHOT_WAIT_S  # monotonic s: one on its way
        if self._keeps_rules and self._rules_path is not None:
            self.parts[0].rules.journaled = True
            if self.parts[0].rules.load(self._rules_path):
                log.info("rule state restored from %s", self._rules_path)
        if (self._detect_path is not None and not self.per_partition
                and self.detection.load(self._detect_path)):
            log.info("detector state restored from %s (%d series)", self._detect_path,
                     len(self.detection.series))
        if self._keeps_rules:
            self._reconcile_incidents()
        if self._dedup_path is not None:
            config.state_dir.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
            if not self.per_partition and self.dedup.load(self._dedup_path):
                log.info("dedup state restored from %s", self._dedup_path)
        # the gateways heard before a restart: one that went quiet just before it is named too
        self._heard_path = (heard_path(config.state_dir, config.worker_id)
                            if config.state_dir else None)
        if self._heard_path is not None:
            try:
                self.gateways_heard.update(load_heard(self._heard_path, self._started))
            except (OSError, ValueError) as exc:  # only the operator's view: start without
                log.warning("the gateways heard before are not known: %s", exc)

    def _reconcile_incidents(self) -> None:
        """The detectors' snapshot is saved every few minutes, the incidents written with
        every batch (in the rules' state): a restart takes the open incidents from the latter,
        or, from a state that did not keep them yet, from the former."""
        rules = self.parts[0].rules
        if not rules.keeps_incidents:
            n = rules.adopt_incidents(self.detection.open_by_subject())
            opened, _ = self.detection.reconcile(rules.incidents, close=False)
            if n or opened:
                log.info("open incidents kept with the rules' state from now on: %d", n + opened)
            return
        opened, closed = self.detection.reconcile(rules.incidents)
        if opened or closed:
            log.info("detector state is older than the last batch acknowledged: %d incident(s) "
                     "opened since reopened, %d resolved since closed", opened, closed)

    # the single-worker path's one state (also what tests and the demo look at)
    @property
    def dedup(self) -> BatchDedup:
        return self.parts[0].dedup

    @property
    def detection(self) -> DetectionStage:
        return self.parts[0].detection

    def _state(self, msg: SourceMessage) -> PartitionState | None:
        return self.parts.get(msg.partition if self.per_partition else 0)

    # ---- synchronous stages -------------------------------------------------------------

    def _ack(self, gateway: str, inc: int, seq: int, digest: str, *,
             rejected: bool = False, conflict: bool = False) -> None:
        """Acknowledge batch ``seq``, naming the digest of what we received as its proof;
        ``conflict``: another batch had its number (the agent that gets the ack numbers under
        a new incarnation)."""
        acked, refused, proofs, conflicts = self._acks.setdefault((gateway, inc),
                                                                  ([], [], {}, []))
        (refused if rejected else acked).append(seq)
        proofs[seq] = digest
        if conflict:
            conflicts.append(seq)
        self._ack_wake.set()

    def handle(self, msg: SourceMessage) -> None:
        part = self._state(msg)
        if part is None or (self.per_partition and msg.epoch != part.epoch):
            self.counters["messages_not_owned"] += 1  # read before its partition moved away
            return
        part.position = msg.position
        self.counters["messages_in"] += 1
        if msg.replay:
            self.counters["messages_replayed"] += 1
        try:
            up = decode_uplink(msg.payload)
        except ContractError as exc:
            self.rejects.reject(exc.reason, f"{msg.topic}: {exc.detail}")
            ident = peek_batch_id(msg.payload)
            if ident is not None and ident[0] == gateway_from_topic(msg.topic):
                # a well-addressed batch we cannot use: say so, or the edge re-sends it forever
                self.counters["batches_rejected"] += 1
                self._ack(ident[0], ident[1], ident[2], batch_digest(msg.payload),
                          rejected=True)
            return
        topic_gw = msg.topic.split("/")[2] if msg.topic.count("/") >= 3 else None
        if topic_gw != up.gateway:
            self.rejects.reject("gateway_mismatch",
                                f"{msg.topic} carries gateway {up.gateway!r}")
            return
        if isinstance(up, HealthReport):
            # heard now; a replay (after a takeover) was heard when the engine stored it
            at = msg.stored_ms if msg.replay else self.clock.now_ms()
            self._heard(up.gateway, at, msg.partition)
            self._handle_health(up, at)
            if not msg.replay:  # what it says of its gateway now, not as it was
                self._idle_gateway(up, part)
        else:
            self._handle_results(up, batch_digest(msg.payload), part, msg.partition)

    def _heard(self, gateway: str, at_ms: int, partition: int) -> None:
        """``gateway``'s health report came at ``at_ms`` (0: when is not known, not kept)."""
        if at_ms > self.gateways_heard.get(gateway, (0, 0))[0]:
            self.gateways_heard[gateway] = (at_ms, partition)

    def _heard_in(self, partition: int) -> dict[str, int]:
        """The gateways of ``partition`` heard, for its snapshot: its next owner names those
        that went quiet before it took over."""
        return {gw: t for gw, (t, p) in self.gateways_heard.items() if p == partition}

    def _handle_health(self, rep: HealthReport, at_ms: int) -> None:
        """A gateway's health report, which came at ``at_ms`` (the worker's time)."""
        self.counters["health_in"] += 1
        offset = (self.gateway_clocks.report(rep.gateway, rep.ts, at_ms) if at_ms > 0
                  else None)  # (a replay the engine did not say when it stored: not told)
        off = rep.gateway in self.gateway_clocks.off
        gauges = {**rep.gauges, "clock_off": int(off)}  # (0 also while not told yet)
        if offset is not None:  # its clock against ours, once known
            gauges["clock_offset_ms"] = offset
            if at_ms - self._clock_told.get(rep.gateway, -CLOCK_TELL_MS) >= CLOCK_TELL_MS:
                # and the gateway told so: every ack says it; one that had none for a minute
                # (its devices doubt its clock and it holds them all, say) gets one of its own
                self._clock_told[rep.gateway] = at_ms
                self._acks.setdefault((rep.gateway, 0), ([], [], {}, []))
                self._ack_wake.set()
        # a gateway whose own clock is not set yet says so, one whose clock is off ours we
        # tell: its report is filed at our time (at its own, it would look long gone)
        ts = (at_ms or self.clock.now_ms()) if off or rep.gauges.get("clock_unsynced") else rep.ts
        points = [pipeline_points("edge", {"gateway": rep.gateway}, rep.counters, gauges, ts)]
        if rep.devices:
            points.append(device_points(rep.gateway, rep.devices, ts))
        points.append(ledger_points(rep.gateway, rep.counters, rep.ledger, ts,
                                    self.written_by_gateway.get(rep.gateway, 0)))
        self.writer.add(points, background=True)

    def _idle_gateway(self, rep: HealthReport, part: PartitionState) -> None:
        """A gateway with nothing waiting for the cloud: the detectors may take its series
        without a window since for silent, as its windows' arrival would let them (a gateway
        all of whose devices fell silent sends none)."""
        alerts = part.detection.heard(rep.gateway, rep.ts, idle=idle_report(rep),
                                      running=int(rep.counters.get("messages_in", 0)))
        if alerts:
            points, rules_now = self._judged(EnrichedResults.none(rep.gateway),
                                             Detections(alerts=alerts), part)
            self.writer.add(points, token=None if rules_now is None else (_DELTA, rules_now))

    def _judged(self, rows: EnrichedResults, det: Detections,
                part: PartitionState) -> tuple[list[Points], bytes | None]:
        """The points of the detectors' alerts on ``rows`` and of the rules judging them, and
        what that changed in the rules' state (to journal once written, before the batch's
        ack: a crash then loses none of it)."""
        if det.alerts:  # a resolution overwrites its opening: under the site it opened with
            det.alerts = [e if e.state == "open" else replace(e, site=self.enricher.site_at(
                subject_of(rows, e)[1], e.incident)) for e in det.alerts]
        fired = part.rules.run(rows, det)
        rules_now = part.rules.take_delta() if self._keeps_rules else None
        for a in fired:
            self.counters["rule_alerts_opened" if a.state == "open"
                          else "rule_alerts_resolved"] += 1
        self.counters["anomalies"] += len(det.anomalies)
        for e in det.alerts:
            self.counters["alerts_opened" if e.state == "open" else "alerts_resolved"] += 1
        return [alert_points(rows, det.alerts), rule_alert_points(fired)], rules_now

    def _handle_results(self, batch: ResultBatch, digest: str, part: PartitionState,
                        pkey: int = 0) -> None:
        inc = batch.incarnation
        seen = part.dedup.check_and_record(dedup_key(batch.gateway, inc), batch.seq, digest)
        conflict = seen is Seen.CONFLICT
        if conflict:  # written like a new one: it is not a copy of the first
            self.counters["batch_conflicts"] += 1
            n = self.counters["batch_conflicts"]
            if n <= 5 or n % 1000 == 0:
                log.error("gateway %s sent two different batches numbered %d (incarnation %d; "
                          "%d such so far): two agents run as this gateway from copies of one "
                          "state directory (an SD card image?). Both are written, and the agent "
                          "that gets the ack numbers under a new incarnation; give each gateway "
                          "its own [gateway] id and state directory", batch.gateway,
                          batch.seq, inc, n)
        elif seen is Seen.WRITTEN:  # written before: the edge missed our ack, say it again
            self.counters["duplicate_batches"] += 1
            self._ack(batch.gateway, inc, batch.seq, digest)
            return
        if seen is Seen.PENDING:  # its first copy is on its way to InfluxDB
            self.counters["duplicate_batches"] += 1
            return
        self.counters["batches_in"] += 1
        self.counters["results_in"] += len(batch.results)
        batch = self._drop_foreign_devices(batch)
        batch = self._drop_stale_revisions(batch, part)
        if len(batch.results) == 0 and batch.results.superseded is None:
            self._ack(batch.gateway, inc, batch.seq, digest,  # nothing newer in it; done
                      conflict=conflict)
            return
        rows = self.enricher.enrich(batch)
        det = part.detection.run(rows)
        judged, rules_now = self._judged(rows, det, part)
        anomalous = np.zeros(len(rows), bool)
        anomalous[[a.row for a in det.anomalies]] = True
        points = [aggregate_points(rows),
                  site_points(rows, batch.seq, np.isfinite(det.severity), anomalous),
                  anomaly_points(rows, det.anomalies), *judged]
        max_end = int((batch.results.start + batch.results.width).max()) if len(rows) else 0
        self.writer.add(points, token=(batch.gateway, inc, batch.seq, batch.sent_ms, max_end,
                                      len(rows), digest, pkey, part.epoch, conflict, rules_now))
        sup = batch.results.superseded
        if sup is not None and len(sup):
            self.counters["superseded"] += len(sup)
            sites = {d: (dev.site if (dev := self.registry.get(d)) else UNKNOWN_SITE)
                     for d in (batch.devices[i] for i in sup.device.tolist())}
            self.writer.delete(superseded_identities(
                batch.gateway, batch.devices, batch.metrics, batch.specs, sites,
                sup.device.tolist(), sup.metric.tolist(), sup.spec.tolist(),
                sup.start.tolist()))

    def _drop_foreign_devices(self, batch: ResultBatch) -> ResultBatch:
        """Rows of devices the registry assigns to another gateway are refused and counted
        (a gateway speaks for its own devices only: a compromised or misconfigured one must
        not write another's series)."""
        foreign = [i for i, name in enumerate(batch.devices)
                   if (dev := self.registry.get(name)) is not None and dev.gateway
                   and dev.gateway != batch.gateway]
        if not foreign:
            return batch
        r = batch.results
        bad = np.isin(r.device, foreign)
        n = int(bad.sum())
        if n:
            self.rejects.reject(FOREIGN_DEVICE, f"{batch.gateway} sent {n} result(s) of "
                                f"{[batch.devices[i] for i in foreign][:5]}, registered to "
                                f"other gateways", n)
        sup = r.superseded
        if sup is not None and len(sup):
            ok = ~np.isin(sup.device, foreign)
            sup = None if not ok.any() else SupersededRows(
                sup.device[ok], sup.metric[ok], sup.spec[ok], sup.start[ok])
        return _keep_rows(batch, ~bad, sup)

    def _drop_stale_revisions(self, batch: ResultBatch, part: PartitionState) -> ResultBatch:
        """Rows whose window was already written at a newer revision are left out: a revision
        never overwrites a newer one, whatever order batches arrive in."""
        r = batch.results
        if len(r) == 0:
            return batch
        # Only revised windows (rev > 0) are remembered: a first revision never overwrites
        # anything. So only rows that are revisions, or of devices with a remembered revision,
        # need looking at (usually none: no per-row loop).
        revised = part.revised
        gw = batch.gateway
        flagged = np.fromiter(((gw, name) in revised for name in batch.devices), np.bool_,
                              len(batch.devices))
        candidates = np.flatnonzero((r.rev > 0) | flagged[r.device])
        keep = np.ones(len(r), bool)
        if len(candidates) == 0:
            return batch
        labels = batch.spec_labels()
        latest = part.revisions
        for i in candidates.tolist():
            rev = int(r.rev[i])
            dev = batch.devices[int(r.device[i])]
            key = (gw, dev, batch.metrics[int(r.metric[i])], labels[i], int(r.start[i]))
            seen = latest.get(key)
            if seen is not None and seen > rev:
                keep[i] = False
            elif rev > 0:
                latest[key] = rev
                revised.add((gw, dev))
        while len(latest) > self.max_tracked_revisions:
            latest.pop(next(iter(latest)))
        if keep.all():
            return batch
        self.counters["stale_revisions"] += int((~keep).sum())
        return _keep_rows(batch, keep, r.superseded)

    def _on_written(self, tokens: list[object]) -> None:
        now = self.clock.now_ms()
        done: list[SourceMessage] = []
        for tok in tokens:
            if isinstance(tok, SourceMessage):
                done.append(tok)
                continue
            assert isinstance(tok, tuple)
            if tok[0] is _SNAPSHOT:
                self._background(self._save_partition(tok[1], tok[2], tok[3], tok[4]))
                continue
            if tok[0] is _RULES:  # a snapshot: what came before it is in it
                self._rules_full, self._rules_deltas = tok[1], []
                self._rules_snapshot_queued = -RULES_SNAPSHOT_WAIT_S
                continue
            if tok[0] is _DELTA:  # journaled with the next acks' (none waits on it)
                self._rules_deltas.append(tok[1])
                continue
            if tok[10] is not None:  # before its ack: the acker saves it first
                self._rules_deltas.append(tok[10])
            gw: str = tok[0]
            inc: int = tok[1]
            seq: int = tok[2]
            sent: int = tok[3]
            max_end: int = tok[4]
            n: int = tok[5]
            digest: str = tok[6]
            part = self.parts.get(tok[7])
            if part is not None and part.epoch == tok[8]:
                part.dedup.mark_written(dedup_key(gw, inc), seq)
            self._ack(gw, inc, seq, digest, conflict=tok[9])
            self.written_by_gateway[gw] = self.written_by_gateway.get(gw, 0) + n
            self.counters["results_written"] += n
            self.lag_ms.append(now - sent)
            if max_end and max_end >= self.freshness_since_ms:
                self.freshness_ms.append(now - max_end)
        if done:
            self._background(self._source_done(done))

    # ---- partitions that move (JetStream) ---------------------------------------------------

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _source_done(self, msgs: list[SourceMessage]) -> None:
        done = getattr(self.source, "done", None)
        if done is not None:
            await done(msgs)

    def _drop_part(self, p: int) -> None:
        part = self.parts.pop(p, None)
        if part is not None:  # its counts stay in this worker's
            for k in STAGE_COUNTERS:
                self.counters[k] += part.detection.counters[k]

    def _on_partition(self, ev: PartitionEvent) -> None:
        if not ev.assigned:
            self._drop_part(ev.partition)
            self.counters["partitions_revoked"] += 1
            return
        part = PartitionState.fresh(self.config, epoch=ev.epoch)
        part.position = ev.position
        if ev.snapshot is not None and not part.restore_bytes(ev.snapshot):
            self.counters["snapshot_restore_failed"] += 1
            log.warning("partition %d: its snapshot could not be restored in full (detectors "
                        "start afresh)", ev.partition)
        for gw, t in part.heard_before.items():
            self._heard(gw, t, ev.partition)
        part.heard_before.clear()
        self.parts[ev.partition] = part
        self.counters["partitions_assigned"] += 1

    def _snapshot_partitions(self) -> None:
        """A snapshot of each partition, copied between two messages; it is encoded (in a
        thread) and published once everything it covers is written (the writer confirms the
        token). A partition whose previous snapshot is still on its way is skipped."""
        for p, part in self.parts.items():
            if p in self._snapshots_busy:
                continue
            began = time.perf_counter()
            captured = part.capture(self._heard_in(p))
            # the size stays the last one's until this one is encoded
            self._snapshot_cost[p] = (time.perf_counter() - began,
                                      self._snapshot_cost.get(p, (0.0, 0))[1])
            self._snapshots_busy.add(p)
            self.writer.add([], token=(_SNAPSHOT, p, part.epoch, captured, part.position))

    def snapshot_every_s(self) -> float:
        """How often partitions are snapshotted: ``snapshot_interval``, or longer where their
        state is large (``SNAPSHOT_TIME_SHARE``, ``SNAPSHOT_BYTES_PER_S``)."""
        seconds, size = self._snapshot_totals()
        return max(self.snapshot_interval_s, seconds / SNAPSHOT_TIME_SHARE,
                   size / SNAPSHOT_BYTES_PER_S)

    def _snapshot_totals(self) -> tuple[float, int]:
        """The last snapshots' seconds (copy and encoding) and bytes, over the partitions
        held now."""
        cost = [self._snapshot_cost[p] for p in self.parts if p in self._snapshot_cost]
        return sum(c[0] for c in cost), sum(c[1] for c in cost)

    async def _save_partition(self, p: int, epoch: int, snap: bytes | Captured,
                              position: int) -> None:
        try:
            await self._save_partition_once(p, epoch, snap, position)
        finally:
            self._snapshots_busy.discard(p)  # saved, refused or failed: the next may be taken

    async def _save_partition_once(self, p: int, epoch: int, snap: bytes | Captured,
                                   position: int) -> None:
        save = getattr(self.source, "save_snapshot", None)
        part = self.parts.get(p)
        if save is None or part is None or part.epoch != epoch:
            return
        if isinstance(snap, Captured):
            began = time.perf_counter()
            blob = await asyncio.to_thread(encode_snapshot, snap)
            took, _ = self._snapshot_cost.get(p, (0.0, 0))
            self._snapshot_cost[p] = (took + time.perf_counter() - began, len(blob))
        else:
            blob = snap
        try:
            ok = await save(p, blob, position, epoch)
        except Exception as exc:  # the engine unreachable just now: the next one will do
            self.counters["partition_snapshot_errors"] += 1
            log.warning("partition %d: snapshot not saved: %r", p, exc)
            return
        if ok:
            self.counters["partition_snapshots"] += 1
        elif (part := self.parts.get(p)) is not None and part.epoch == epoch:
            self._drop_part(p)  # fenced: another worker holds it now

    async def _final_snapshots(self) -> None:
        """At a clean stop, after the last write: every partition's state as it ends, so a
        restart (or the next owner) replays nothing already done."""
        if self._bg:
            await asyncio.gather(*self._bg, return_exceptions=True)
        if not self.per_partition or self.writer.buffered:
            return
        for p, part in list(self.parts.items()):
            await self._save_partition(p, part.epoch, part.snapshot_bytes(self._heard_in(p)),
                                       part.position)

    def _fence(self) -> bool:
        """Before each write: a worker that may have lost its partitions while it was not
        running (paused, starved past the engine's pin timeout) writes nothing it holds."""
        fence_ok = getattr(self.source, "fence_ok", None)
        if fence_ok is None or fence_ok():
            return True
        self.parts.clear()
        self.counters["fenced_points"] += self.writer.discard()
        self._snapshots_busy.clear()  # their tokens went with the rest
        return False

    def stats(self) -> dict[str, float]:
        c = self.counters
        s: dict[str, float] = {
            "messages_in": c["messages_in"],
            "batches_in": c["batches_in"],
            "duplicate_batches": c["duplicate_batches"],
            # another batch under a number already taken (two agents, one copied state)
            "batch_conflicts": c["batch_conflicts"],
            # the dedup state not saved to state_dir (a full disk): acks went out anyway
            "state_save_errors": c["state_save_errors"],
            # the detectors' and the rules' state not saved (a restart goes on from older)
            "detector_snapshot_errors": c["detector_snapshot_errors"],
            "rule_state_save_errors": c["rule_state_save_errors"],
            "results_in": c["results_in"],
            "results_written": c["results_written"],
            "rejected_messages": self.rejects.total,
            "unknown_device_results": self.enricher.unknown_results,
            "anomalies": c["anomalies"],
            "alerts_opened": c["alerts_opened"],
            "alerts_resolved": c["alerts_resolved"],
            "rule_alerts_opened": c["rule_alerts_opened"],
            "rule_alerts_resolved": c["rule_alerts_resolved"],
            "rule_alerts_open": sum(len(p.rules.open) for p in self.parts.values()),
            "rule_reload_errors": c["rule_reload_errors"],
            "acks_sent": c["acks_sent"],
            "acks_unsent": c["acks_unsent"],
            "batches_rejected": c["batches_rejected"],
            "internal_errors": c["internal_errors"],
            "points_written": self.writer.points_written,
            "points_rejected": self.writer.points_rejected,
            "points_deleted": self.writer.points_deleted,
            "superseded": c["superseded"],
            "stale_revisions": c["stale_revisions"],
            "write_errors": self.writer.write_errors,
            "buffered_points": self.writer.buffered,
            "lag_p50_ms": _percentile(self.lag_ms, 50),
            "lag_p99_ms": _percentile(self.lag_ms, 99),
            "freshness_p50_ms": _percentile(self.freshness_ms, 50),
        }
        for reason, n in self.rejects.counts.items():
            s["rejected_" + reason] = n
        refused = getattr(self.source, "acks_refused", {})
        s["acks_refused"] = sum(refused.values())
        for reason, n in refused.items():
            s["acks_refused_" + reason] = n
        s["acks_unheard"] = getattr(self.source, "acks_unheard", 0)
        # detector state: the series it holds now (~9 KB each with the shipped detectors) and
        # those forgotten after [detect] forget_after without a window
        stages = [part.detection for part in self.parts.values()]
        s["detector_series"] = sum(len(d.series) for d in stages)
        s["alerts_open"] = sum(d.open_count() for d in stages)  # detectors' incidents, now
        s["detector_state_mb"] = round(sum(d.state_bytes() for d in stages) / 2**20, 2)
        # ... and the incidents resolved because their series fell silent
        for k in STAGE_COUNTERS:
            s[k] = c[k] + sum(d.counters[k] for d in stages)
        s["registry_reloads"] = self.registry.reloads
        s["registry_reload_errors"] = self.registry.reload_errors
        if self.per_partition:
            s["partitions_owned"] = len(self.parts)
            for k, n in getattr(self.source, "counters", {}).items():
                s["engine_" + k] = n
            behind = getattr(self.source, "replicas_behind", None)
            if behind is not None:
                s["engine_replicas_behind"] = behind
            # a takeover replays at most this much of a partition's stream
            s["engine_snapshot_every_s"] = round(self.snapshot_every_s(), 1)
            s["engine_snapshot_bytes"] = self._snapshot_totals()[1]
            for k in ("partitions_assigned", "partitions_revoked", "partition_snapshots",
                      "partition_snapshot_errors", "messages_replayed", "messages_not_owned",
                      "fenced_points"):
                s[k] = c[k]
        for reason, n in self.writer.dead_letters.items():
            s["dead_lettered_" + reason] = n
        if self.writer.dead_letter_file_errors:
            s["dead_letter_file_errors"] = self.writer.dead_letter_file_errors
        if self.cert_expiry is not None:
            s["cert_days_left"] = round((self.cert_expiry - self.clock.now_ms()) / DAY_MS, 2)
        return s

    def _warn_certificates(self) -> None:
        """Hourly, while a certificate of its ingest link (the broker, or NATS) has less than
        30 days left."""
        if self.cert is None or self.cert_expiry is None or \
                time.monotonic() - self._cert_warned < CERT_WARN_EVERY_S:
            return
        days = (self.cert_expiry - self.clock.now_ms()) / DAY_MS
        if days < CERT_WARN_DAYS:
            self._cert_warned = time.monotonic()
            when = f"expired {-days:.1f} days ago" if days < 0 else f"expires in {days:.1f} days"
            log.warning("a TLS certificate %s %s: renew it and restart the worker",
                        self.cert["what"], when)

    def _health_points(self, s: dict[str, float]) -> Points:
        gauges = {"buffered_points", "lag_p50_ms", "lag_p99_ms", "freshness_p50_ms",
                  "cert_days_left",
                  "partitions_owned", "engine_replicas_behind", "engine_snapshot_every_s",
                  "engine_snapshot_bytes", "detector_series", "detector_state_mb"}
        return pipeline_points(
            "cloud", {"worker": self.config.worker_id},
            {k: int(v) for k, v in s.items() if k not in gauges},
            {k: float(v) for k, v in s.items() if k in gauges}, self.clock.now_ms())

    def _heard_here(self, now: int) -> list[tuple[int, str]]:
        """(last heard, gateway) of this worker's partitions, those heard over HEARD_FOR_MS ago
        forgotten (as the Grafana rule forgets them)."""
        gone = [gw for gw, (t, _) in self.gateways_heard.items() if now - t > HEARD_FOR_MS]
        for gw in gone:
            del self.gateways_heard[gw]
        return [(t, gw) for gw, (t, p) in self.gateways_heard.items()
                if not self.per_partition or p in self.parts]

    def _quiet_gateways(self, heard: list[tuple[int, str]], now: int) -> list[str]:
        """Gateways heard (:meth:`_heard_here`) but not for QUIET_MS, the longest quiet
        first."""
        return [gw for t, gw in sorted(heard) if now - t > QUIET_MS]

    def write_status(self, state: str, stats: dict[str, float] | None = None) -> None:
        """The status ``fieldline cloud status`` reads beside the worker (cloud/status.py):
        its links and counters, also when InfluxDB (where its health goes) is not there."""
        c = self.config
        if c.state_dir is None:
            return
        now = self.clock.now_ms()
        w = self.writer
        heard = self._heard_here(now)
        quiet = self._quiet_gateways(heard, now)
        b = c.broker
        up = bool(getattr(self.source, "link_up", True))
        try:
            write_status(c.state_dir, c.worker_id, {
                "worker": c.worker_id, "ts": now, "state": state, "pid": os.getpid(),
                "started": self._started, "health_interval_ms": c.health_interval_ms,
                "member": "/".join(map(str, c.jetstream.member))
                if c.jetstream is not None and c.jetstream.member else None,
                "jetstream": c.jetstream is not None,  # pulls partitions (member or all)
                "cert": self.cert,
                # JetStream connected but not serving it (cloud/jetstream.py), or None
                "engine": getattr(self.source, "engine_trouble", None),
                "dead_letters": str(w.dead_letter_path) if w.dead_letter_path else None,
                "links": {
                    "ingest": {"url": shown(*c.jetstream.servers) if c.jetstream else b.url,
                               **self._links.state("ingest", up, now),
                               "error": getattr(self.source, "link_error", None)},
                    "influxdb": {"url": c.influx.url, "database": c.influx.database,
                                 "ok": w.failing_since is None,
                                 "failing_since": w.failing_since, "last_ok": w.last_ok,
                                 "last_error": w.last_error}},
                "gateways": {"heard": len(heard), "quiet": len(quiet),
                             "quiet_names": quiet[:QUIET_SHOWN]},
                # the gateways whose clock is off ours (or, when the gateways' median clock
                # is off ours, off that), the furthest first: by how much
                "clocks": {"off": len(self.gateway_clocks.off),
                           "off_by": dict(sorted(self.gateway_clocks.off.items(),
                                                 key=lambda kv: -abs(kv[1]))[:QUIET_SHOWN]),
                           "worker_off_by": self.gateway_clocks.worker_off},
                "rules": [r.name for r in c.rules],  # in force (a SIGHUP reads them again)
                "rules_idle": self.rules_idle(),
                "stats": self.stats() if stats is None else stats})
            if self._heard_path is not None:
                save_heard(self._heard_path, self.gateways_heard)
            self._status_failed = False
        except OSError as exc:  # only the operator's view: never the worker's work
            if not self._status_failed:
                log.warning("cannot write the worker's status under %s: %s", c.state_dir, exc)
            self._status_failed = True

    def rules_idle(self) -> list[dict[str, str]]:
        """The window and absence rules that judged none of the results since the worker
        started, once ``RULES_IDLE_AFTER`` came (a metric or window spec misspelt: the rule
        can never fire), each logged once."""
        results = self.counters["results_in"]
        if not self.config.rules or results < RULES_IDLE_AFTER or not self.parts:
            return []
        merged = RuleEngine(self.config.rules)
        for part in self.parts.values():
            for name, n in part.rules.judged.items():
                merged.judged[name] = merged.judged.get(name, 0) + n
            for what, names in part.rules.seen.items():
                merged.seen[what] |= names
        idle = merged.idle()
        for r in idle:
            if r["rule"] not in self._idle_said:
                self._idle_said.add(r["rule"])
                log.warning("rule %s has judged none of the %s results since the worker "
                            "started: %s; it cannot fire", r["rule"], f"{results:,}", r["why"])
        return idle

    # ---- async shell --------------------------------------------------------------------

    async def _consume(self) -> None:
        async for msg in self.source.messages():
            if isinstance(msg, PartitionEvent):
                self._on_partition(msg)
                continue
            if msg.covered:
                part = self._state(msg)
                if part is not None and part.epoch == msg.epoch:
                    self.writer.add([], token=msg)
                continue
            try:
                self.handle(msg)
            except Exception:  # a bug must not stop ingest; it is logged with the message
                self.counters["internal_errors"] += 1
                log.exception("failed to handle message on %s", msg.topic)
            if msg.handle is not None:  # the engine's ack, once its effects are written
                self.writer.add([], token=msg)
            # a burst of queued messages is handled without a pause otherwise: the writer
            # must get to send the first one's points while the next ones are handled
            await asyncio.sleep(0)

    async def _acker(self, stop: asyncio.Event) -> None:
        """Acknowledge confirmed batches: first persist the dedup state that covers them."""
        while not stop.is_set() or self._acks:
            if not self._acks:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ack_wake.wait(), 0.5)
                self._ack_wake.clear()
                continue
            todo, self._acks = self._acks, {}
            await self._save_rules()  # first: what these batches did to the rules' state
            if self._dedup_path is not None and not self.per_partition:
                await self._save_dedup(self._dedup_path)
            # (and how its clock stands to ours, or its peers': its `edge status` says)
            clocks = [self.gateway_clocks.against(gw) for gw, _ in todo]
            # all in flight at once: each waits for its PUBACK, and one after the other a
            # round cost a round trip to the broker per gateway (`python -m bench.acks`)
            sent = await bounded([
                self.source.ack(gw, acked, rejected, inc, proofs, conflicts or None,
                                clock_ms=clock_ms)
                for ((gw, inc), (acked, rejected, proofs, conflicts)), clock_ms
                in zip(todo.items(), clocks, strict=True)], ACK_CONCURRENCY)
            now = self.clock.now_ms()
            for ((gw, _), (acked, rejected, _, _)), clock_ms, ok in zip(
                    todo.items(), clocks, sent, strict=True):
                if ok:
                    self.counters["acks_sent"] += len(acked) + len(rejected)
                    if clock_ms is not None:
                        self._clock_told[gw] = now
                else:
                    self.counters["acks_unsent"] += len(acked) + len(rejected)
            if stop.is_set():
                break

    async def _save_dedup(self, path: Path) -> None:
        """The dedup state, before the acks it covers. If the disk refuses it (full, gone
        read-only), the acks go out all the same: their batches are in InfluxDB, and holding
        them would only fill every gateway's outbox until it sheds. What is at stake is a
        restart before the next save that works: a batch whose ack was lost on the way is then
        written again (the same points). Counted, logged, tried again at every round."""
        try:
            await asyncio.to_thread(self.dedup.save, path)
        except OSError as exc:
            self.counters["state_save_errors"] += 1
            n = self.counters["state_save_errors"]
            if n <= 3 or n % 100 == 0:
                log.error("the dedup state could not be saved to %s (%s; %d failures so far): "
                          "acknowledging anyway, the batches are in InfluxDB; tried again at "
                          "every round of acks", path, exc.strerror or exc, n)
            with contextlib.suppress(OSError):
                path.with_suffix(".tmp").unlink(missing_ok=True)  # what the failed save left

    async def _save_detection(self) -> None:
        """Detector state to ``state_dir`` (a restart continues with the histories it had); the
        rules' state as it is now, saved once everything before it is written."""
        self._queue_rules_snapshot()
        if self._detect_path is None or self.per_partition:
            return
        snap = self.detection.snapshot()  # a copy, taken between two messages
        try:
            await asyncio.to_thread(write_snapshot, snap, self._detect_path)
            self.counters["detector_snapshots"] += 1
        except OSError as exc:
            self.counters["detector_snapshot_errors"] += 1
            log.error("detector state not saved to %s: %s", self._detect_path, exc)

    def _queue_rules_snapshot(self, *, now: bool = False) -> None:
        """A snapshot of the rules' state (taken here, between two messages) behind what the
        writer holds: saved once all of it is written, it replaces the journal. Unless ``now``,
        not while one queued less than ``RULES_SNAPSHOT_WAIT_S`` ago is on its way."""
        t = time.monotonic()
        if not self._keeps_rules or (not now and t - self._rules_snapshot_queued
                                     < RULES_SNAPSHOT_WAIT_S):
            return
        self._rules_snapshot_queued = t
        self.writer.add([], token=(_RULES, self.parts[0].rules.snapshot()))

    async def _save_rules(self) -> None:
        """The rules' state whose effects are all written (runs, silences, open alerts), to
        ``state_dir`` before those batches are acknowledged: a snapshot when one came
        (``rules.json``; the journal then starts afresh), each batch's changes since appended
        to ``rules.journal``. A restart, a crash included, goes on exactly from the last batch
        acknowledged. A disk that refuses it is counted and logged, and a snapshot asked for
        at once (what was not saved is in it; the acks go out all the same, as with the dedup
        state: a crash before a save works loses that much of the rules' progress)."""
        full, deltas = self._rules_full, self._rules_deltas
        path = self._rules_path
        if (full is None and not deltas) or path is None:
            return
        self._rules_full, self._rules_deltas = None, []

        def write() -> int:
            if full is not None:
                self._rules_snapshot_bytes = save_rules(full, path)
            return append_rules(deltas, path) if deltas else 0

        try:
            self._rules_journal_bytes = await asyncio.to_thread(write)
            self.counters["rule_state_saves"] += 1
        except OSError as exc:
            self.counters["rule_state_save_errors"] += 1
            log.error("rule state not saved to %s: %s", path, exc)
            self._queue_rules_snapshot(now=True)
            return
        if self._rules_journal_bytes > max(RULES_JOURNAL_MIN, self._rules_snapshot_bytes):
            self._queue_rules_snapshot()

    def request_reload(self) -> None:
        """Reload the registry and the rules at the next health tick (SIGHUP)."""
        self._reload_requested = True

    def _check_registry(self) -> None:
        now = self.clock.now_ms()
        if self._reload_requested:
            self._reload_requested = False
            self.registry.reload(now)
            self._reload_rules()
        else:
            self.registry.maybe_reload(now)

    def _reload_rules(self) -> None:
        """``[[rules]]`` read again from the config (``rules_source``, set by ``fieldline cloud
        run``): added ones start, removed or changed ones have their open alerts resolved with
        the next batch, the others go on. A config that cannot be read keeps the rules before
        (logged, counted)."""
        if self.rules_source is None:
            return
        try:
            rules = list(self.rules_source())
        except (ConfigError, OSError) as exc:
            self.counters["rule_reload_errors"] += 1
            log.error("SIGHUP: the rules were not read again (%s): the ones before go on", exc)
            return
        before = {r.name: r for r in self.config.rules}
        if rules == list(self.config.rules):
            log.info("SIGHUP: the rules are as they were")
            return
        self.config = replace(self.config, rules=rules)
        for part in self.parts.values():
            part.rules.reconfigure(rules)
        now = {r.name: r for r in rules}
        changes = (now.keys() - before.keys(), before.keys() - now.keys(),
                   {k for k in now.keys() & before.keys() if now[k] != before[k]})
        log.warning("SIGHUP: rules read again: %d added (%s), %d removed (%s), %d changed (%s)",
                    *(x for names in changes
                      for x in (len(names), ", ".join(sorted(names)) or "-")))
        self._queue_rules_snapshot(now=True)  # what was dropped, on disk too

    async def _health(self, stop: asyncio.Event) -> None:
        last_save = last_snap = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.health_interval_ms / 1000)
            self._check_registry()
            self._warn_certificates()
            stats = self.stats()  # one reading of the counters for InfluxDB and the status
            self.writer.add(self._health_points(stats), background=True)
            self.write_status("running", stats)
            if (self.per_partition and not stop.is_set()
                    and time.monotonic() - last_snap >= self.snapshot_every_s()):
                last_snap = time.monotonic()
                self._snapshot_partitions()
            if time.monotonic() - last_save >= DETECT_SNAPSHOT_S and not stop.is_set():
                last_save = time.monotonic()
                await self._save_detection()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("cloud worker %s: %s -> %s", self.config.worker_id, self.config.broker.url,
                 self.config.influx.url)
        consume = asyncio.create_task(self._consume(), name="cloud-consume")
        writer_stop = asyncio.Event()
        write = asyncio.create_task(self.writer.run(writer_stop), name="cloud-write")
        health = asyncio.create_task(self._health(stop), name="cloud-health")
        acker_stop = asyncio.Event()
        acker = asyncio.create_task(self._acker(acker_stop), name="cloud-ack")
        stopping = asyncio.create_task(stop.wait(), name="cloud-stop")
        try:
            await asyncio.wait({stopping, consume}, return_when=asyncio.FIRST_COMPLETED)
            if consume.done() and not consume.cancelled() and consume.exception():
                log.error("ingest failed: %r; stopping the worker", consume.exception())
        finally:
            stopping.cancel()
            stop.set()
            consume.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consume
            await health
            await self._save_detection()
            writer_stop.set()
            await write
            acker_stop.set()
            self._ack_wake.set()
            await acker
            await self._save_rules()  # the state as it ends, if everything before it is written
            try:  # bounded: an unreachable engine must not keep the worker from stopping
                await asyncio.wait_for(self._final_snapshots(), 15)
            except TimeoutError:
                log.warning("final partition snapshots not all saved: the next owner "
                            "replays from the previous ones")
            close = getattr(self.source, "close", None)
            if close is not None:
                await close()
            await asyncio.to_thread(self.sink.close)
            self.write_status("stopped")
            log.info("cloud worker %s stopped", self.config.worker_id)
        if consume.done() and not consume.cancelled() and consume.exception():
            raise RuntimeError("cloud worker ingest failed") from consume.exception()

    def describe(self) -> dict[str, Any]:
        return {"worker": self.config.worker_id, "broker": self.config.broker.url,
                "influxdb": self.config.influx.url, "database": self.config.influx.database}
