"""The gateway agent's composition root: wires intake, decoding, validation, windows and uplink.

One asyncio task ticks the pipeline (drain -> decode -> validate -> fold -> emit -> publish) every
``tick_ms``; another publishes health. MQTT network I/O runs in threads: the intake's own
(``edge.intake``) and paho's for the uplink. On stop the open window state is checkpointed to
``state_dir`` (so a restart continues open windows instead of emitting partial ones), unless
``flush_on_stop`` asks for everything to be emitted now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import tempfile
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from devices import rejects, sparkplug
from devices.clock import Clock, SystemClock
from devices.codecs import PayloadDecoder
from devices.contract import (
    BASE_FIELDS,
    HealthReport,
    ResultBatch,
    ResultColumns,
    SupersededRows,
    pack_uplink,
    peek_batch_id,
)
from devices.readings import NO_SEQ, Interner, ReadingColumns, capacity
from devices.rejects import RejectLog
from devices.status import Links
from devices.x509 import CERT_WARN_DAYS, DAY_MS, expiry_or_warn
from edge.clockguard import ClockGuard
from edge.config import EdgeConfig
from edge.engine import WindowEngine
from edge.eventtime import UNKNOWN_SKEW
from edge.gaps import SeqGaps
from edge.intake import WIRE_ID, MqttIntake
from edge.outbox import Outbox
from edge.status import STATUS_FILE, write_status
from edge.uplink import READS_FILE, SEQ_FILE, MqttUplink, Shipper
from edge.validate import Validator
from edge.wal import IntakeLog
from edge.windows import MAX_DEVICES, MAX_METRICS

log = logging.getLogger("fieldline.edge")

LEDGER_FIELDS = ("received", "accepted", "late_dropped", "duplicates", "rejected",
                 "windows_emitted", "gap")  # gap: sent by the device, never received (now)
_REASON_INDEX = {r: i for i, r in enumerate(rejects.READING_REASONS)}
REBIRTH_EVERY_MS = 60_000  # a Sparkplug B edge node is asked for its births at most this often


def _padded(arr: np.ndarray, size: int, fill: int = 0) -> np.ndarray:
    """``arr`` copied into the start of ``size`` elements of its dtype, ``fill`` after it."""
    out = np.full(size, fill, arr.dtype)
    out[: len(arr)] = arr
    return out


def _field(label: str) -> str:
    """A window label as part of a field name: "session:30s" -> "session_30s"."""
    return "".join(c if c.isalnum() else "_" for c in label)

CHECKPOINT = "windows.npz"
OUTBOX_DIR, INTAKE_DIR = "outbox", "intake"  # in the gateway's state directory
# what the agent keeps there, as files and as directories
STATE_FILES = (CHECKPOINT, SEQ_FILE, READS_FILE, STATUS_FILE)
STATE_DIRS = (OUTBOX_DIR, INTAKE_DIR)
DISK_RETRY_MS = 1_000  # after a failed write under state_dir, try again this much later
UNATTRIBUTED = "(no device)"  # the ledger row of readings rejected before naming a device
RELEASE_EVERY_MS = 1_000  # how often ids of devices gone for good are looked for (cheap)
NOT_REJECTED = np.iinfo(np.int64).min  # a device's last rejection: none
HEALTH_PACK_BYTES = 4096  # health reports above this go compressed (a ledger of many devices)
CERT_CHECK_MS = 3_600_000  # the links' certificates are read again this often


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc, no psutil on the Pi)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def devices_held(devices: Interner) -> int:
    """Devices holding an id (the ledger row of readings without a device is no device)."""
    return devices.live - (devices.get(UNATTRIBUTED) is not None)


class DeviceAdmission:
    """Who gets a device id: at most ``max_devices`` in all, and new ones at most ``per_s`` a
    second once a burst of ``burst`` is spent (a token bucket in receive time). A flood of
    made-up ids is refused and counted before it takes memory or becomes InfluxDB series, and
    the devices already known go through untouched."""

    def __init__(self, devices: Interner, *, max_devices: int, per_s: float,
                 burst: int) -> None:
        self.devices = devices
        self.max_devices = max_devices
        self.per_s = per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last_ms: int | None = None

    def __call__(self, name: str, recv_ms: int) -> str | None:
        if devices_held(self.devices) >= self.max_devices:
            return rejects.DEVICE_LIMIT
        if self.last_ms is not None and recv_ms > self.last_ms:
            self.tokens = min(self.burst,
                              self.tokens + (recv_ms - self.last_ms) / 1000 * self.per_s)
        self.last_ms = recv_ms if self.last_ms is None else max(self.last_ms, recv_ms)
        if self.tokens < 1:
            return rejects.DEVICE_RATE
        self.tokens -= 1
        return None


class EdgePipeline:
    """The synchronous core of the agent: everything between raw messages and result batches.

    Kept free of I/O so tests and benchmarks can drive it directly.
    """

    def __init__(self, config: EdgeConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.devices = Interner(limit=MAX_DEVICES)
        self.metrics = Interner(limit=MAX_METRICS)
        registry = config.load_registry()
        # names outside the catalog (and, in reject mode, the registry) never get an id
        self.decoder = PayloadDecoder(
            self.devices, self.metrics, device_topic_level=config.device_topic_level,
            max_payload_bytes=config.max_payload_bytes, known_metric=config.catalog.admits,
            known_device=registry.__contains__
            if registry is not None and config.unknown_devices == "reject" else None,
            topic_identity=config.device_identity == "topic",
            receive_time=config.engine.clock_policy == "receive_time",
            untimed=config.untimed == "receive_time",
            metric_topic_level=config.metric_topic_level,
            admit_device=DeviceAdmission(self.devices, max_devices=config.max_devices,
                                         per_s=config.new_devices_per_s,
                                         burst=config.new_devices_burst))
        self.validator = Validator(config.catalog, self.metrics,
                                   max_future_ms=config.max_future_ms,
                                   max_past_ms=config.max_past_ms)
        self.engine = WindowEngine(config.engine)
        self.primary = config.engine.labels[0]
        self.late_out: list[list[object]] = []  # late readings to forward raw
        self.rejects = RejectLog(log)
        self.counters: Counter[str] = Counter()
        # the ledger: per device, every reading's fate (and the windows it produced)
        self.ledger: dict[str, np.ndarray] = {k: np.zeros(0, np.int64) for k in LEDGER_FIELDS}
        # rejections per device, one column per reason (rejects.READING_REASONS), allocated at
        # that reason's first rejection: a healthy fleet holds none of them (all 18 were 1.4 MB
        # at 10,000 devices)
        self.ledger_rejects: dict[int, np.ndarray] = {}
        # devices whose ledger changed since the last report (instead of a copy of the ledger
        # to compare with: 2 MB at 10,000 devices), and how many devices that report had
        self._ledger_dirty: np.ndarray = np.zeros(0, bool)
        self._ledger_reported: int | None = None
        self.gaps = SeqGaps()  # holes in each device's numbering: lost before the agent
        # per device, when (monotonic ms) the agent last rejected one of its readings: a device
        # still sending, if only readings it refuses, keeps its id (and its ledger row)
        self._rejected_mono: np.ndarray = np.zeros(0, np.int64)
        self._next_release = 0  # monotonic ms: when to look for device ids to release next
        # the gateway's own clock: while it cannot be trusted, messages wait here
        self.guard = ClockGuard(floor_ms=config.clock_floor_ms,
                                max_future_ms=config.max_future_ms,
                                max_bytes=config.quarantine_max_bytes)

    def _ledger_grow(self) -> None:
        n = len(self.devices)
        if n > len(self.ledger["accepted"]):
            size = capacity(n)
            self.ledger = {k: _padded(arr, size) for k, arr in self.ledger.items()}
            self.ledger_rejects = {j: _padded(col, size) for j, col in self.ledger_rejects.items()}
        if len(self._ledger_dirty) < len(self.ledger["accepted"]):  # grown, or restored
            self._ledger_dirty = _padded(self._ledger_dirty, len(self.ledger["accepted"]))
        if len(self._rejected_mono) < len(self.ledger["accepted"]):
            self._rejected_mono = _padded(self._rejected_mono, len(self.ledger["accepted"]),
                                          NOT_REJECTED)

    def _unattributed(self) -> int:
        """The ledger row of rejections without a device (unparseable, unregistered): a name
        no device can have (it holds a space)."""
        i = self.devices.intern(UNATTRIBUTED)
        self._ledger_grow()
        return i

    def _count(self, field: str, devices: np.ndarray) -> None:
        if len(devices):
            np.add.at(self.ledger[field], devices, 1)
            self._ledger_dirty[devices] = True

    def _count_rejects(self, devices: np.ndarray, reason: str) -> None:
        known = devices[devices >= 0]
        if len(known):
            np.add.at(self.ledger["rejected"], known, 1)
            j = _REASON_INDEX[reason]
            col = self.ledger_rejects.get(j)
            if col is None:
                col = self.ledger_rejects[j] = np.zeros(len(self.ledger["accepted"]), np.int64)
            np.add.at(col, known, 1)
            self._ledger_dirty[known] = True
            self._rejected_mono[known] = self.clock.monotonic_ms()

    def process(self, messages: list[tuple[str, bytes, int]]) -> None:
        """Decode, validate and fold one micro-batch of raw messages; while the gateway clock
        cannot be trusted, hold them instead (and fold what was held once it can)."""
        now, mono = self.clock.now_ms(), self.clock.monotonic_ms()
        if self.guard.judge(now, mono) is not None:
            shed = self.guard.hold(messages, now, mono)
            if shed:
                self._fold(shed, now, refuse=rejects.CLOCK_UNSYNCED)
            return
        if self.guard.held:
            messages = self.guard.release(now, mono) + messages
        self._fold(messages, now)

    def wall_ms(self) -> int:
        """The time to stamp what leaves the agent: the gateway clock, or while it cannot be
        trusted, the best estimate of the true time."""
        return self.guard.estimate_ms(self.clock.now_ms(), self.clock.monotonic_ms())

    def _fold(self, messages: list[tuple[str, bytes, int]], now_ms: int, *,
              refuse: str | None = None) -> None:
        """Decode, validate and fold raw messages (``refuse``: reject every reading in them
        for that reason, still per device). ``now_ms``: the gateway clock as ``process``
        judged it sane; readings are validated against that reading of it, not a later one (a
        network-time step between the two would have judged a batch by a clock the guard
        never saw: readings 3 hours ahead of it, refused as clock_future instead of held)."""
        untimed = self.decoder.untimed_taken
        cols, bad, samples = self.decoder.decode(messages)
        mono = self.clock.monotonic_ms()
        if (refuse is None and len(cols) and self.config.engine.clock_policy == "trust"
                and self.guard.devices_say(cols.device, cols.ts, cols.recv, now_ms, mono)):
            # its devices agree the gateway clock is behind theirs: held with what follows,
            # nothing of them counted yet (decoded again when released)
            self.guard.judge(now_ms, mono)
            shed = self.guard.hold(messages, now_ms, mono)
            if shed:
                self._fold(shed, now_ms, refuse=rejects.CLOCK_UNSYNCED)
            return
        self.counters["messages_in"] += len(messages)
        self.counters["readings_untimed"] += self.decoder.untimed_taken - untimed
        self._ledger_grow()
        by_reason: dict[str, list[int]] = {}
        for dev, reason in self.decoder.rejected_devices:
            by_reason.setdefault(reason, []).append(dev)
        for reason, devs in by_reason.items():
            arr = np.array(devs, np.int64)
            if (arr < 0).any():  # no device to name: counted on a row of their own
                arr[arr < 0] = self._unattributed()
            self._count_rejects(arr, reason)
            self._count("received", arr[arr >= 0])  # rejected before becoming a reading
        for s in samples:
            log.debug("rejected: %s", s)
        for reason, n in bad.items():  # each logged with a sample of its own reason
            detail = next((x for x in samples if x.startswith(f"{reason}: ")), "")
            self.rejects.reject(reason, detail, n)
        if refuse is not None and len(cols):
            self.rejects.reject(refuse, f"{len(cols)} reading(s) of {len(messages)} "
                                        f"message(s)", len(cols))
            self._count_rejects(cols.device.astype(np.int64), refuse)
            self._count("received", cols.device.astype(np.int64))
            self._observe_gaps(cols, np.ones(len(cols), bool), np.empty(0, np.int64))
            return
        cols = self.engine.adjust_time(cols, self.clock.monotonic_ms())
        ok, vbad = self.validator.check(cols, now_ms)
        for reason, n in vbad.items():
            self.rejects.reject(reason, f"{n} reading(s) in a batch of {len(cols)}", n)
        for rows, reason in self.validator.row_reasons:
            self._count_rejects(cols.device[rows].astype(np.int64), reason)
        good = cols.take(ok) if not ok.all() else cols
        out = self.engine.fold(good, self.clock.monotonic_ms())
        self._observe_gaps(cols, ok, out.dup_rows)
        gdev = good.device.astype(np.int64)
        self._count("received", cols.device.astype(np.int64))
        self._count("duplicates", gdev[out.dup_rows])
        self._count("late_dropped", gdev[out.late_rows])
        fine = np.ones(len(good), bool)
        fine[out.dup_rows] = False
        fine[out.late_rows] = False
        self._count("accepted", gdev[fine])
        self.guard.accepted(good.ts[fine])
        late = out.late_dropped[self.primary]
        self.counters["readings_accepted"] += out.accepted - late
        self.counters["late_revised"] += out.late_revised[self.primary]
        self.counters["late_dropped"] += late
        self.counters["duplicates"] += out.duplicates
        for label in self.config.engine.labels[1:]:
            key = _field(label)
            self.counters["late_dropped_" + key] += out.late_dropped[label]
            self.counters["late_revised_" + key] += out.late_revised[label]
        if self.config.forward_late and len(out.late_rows):
            r = out.late_rows
            dn, mn = self.devices.names, self.metrics.names
            self.late_out.extend(
                [dn[d], mn[m], t, v, max(q, NO_SEQ)] for d, m, t, v, q in zip(
                    good.device[r].tolist(), good.metric[r].tolist(), good.ts[r].tolist(),
                    good.value[r].tolist(), good.seq[r].tolist(), strict=True))

    def _observe_gaps(self, cols: ReadingColumns, ok: np.ndarray, dup_rows: np.ndarray) -> None:
        """Every reading that arrived (accepted or rejected, but not a repeat) fills its number;
        the ledger's ``gap`` is what is still missing of each device's numbering."""
        fresh = np.ones(len(cols), bool)
        fresh[np.flatnonzero(ok)[dup_rows]] = False
        if not fresh.all():
            cols = cols.take(fresh)
        if not len(cols):
            return
        self.gaps.observe(cols.device.astype(np.int64), cols.seq)
        n = min(len(self.gaps.gap), len(self.ledger["gap"]))
        self._ledger_dirty[:n] |= self.ledger["gap"][:n] != self.gaps.gap[:n]
        self.ledger["gap"][:n] = self.gaps.gap[:n]

    def release_devices(self) -> list[str]:
        """Give the ids of devices gone for good to new devices, so a gateway whose device ids
        churn (replaced sensors, asset tags passing by) neither grows nor reaches
        ``max_devices`` and refuses every new device for good. Gone for good: silent, their
        newest reading older than the oldest the agent accepts, no window held
        (``WindowEngine.releasable``), or never a reading accepted (every one refused: a
        device clock at 1970, values out of range); and in either case, none of their
        readings refused for as long (``validate.max_past`` of the agent's own monotonic
        time). Their ledger rows were reported while they counted; the gateway's totals keep
        what they counted. Not while the gateway clock is untrusted (the age is judged by it)."""
        if self.guard.reason is not None:
            return []
        self._ledger_grow()
        n = len(self.devices)
        rejected = self._rejected_mono[:n]
        quiet = rejected < self.clock.monotonic_ms() - self.config.max_past_ms
        refused_only = self.engine.never_folded(n) & (rejected != NOT_REJECTED) & quiet
        ids = np.union1d(self.engine.releasable(self.wall_ms() - self.config.max_past_ms),
                         np.flatnonzero(refused_only)).astype(np.int64)
        ids = ids[ids < n]
        ids = ids[quiet[ids]]
        unattributed = self.devices.get(UNATTRIBUTED)
        if unattributed is not None:  # readings without a device: the row stays
            ids = ids[ids != unattributed]
        if not len(ids):
            return []
        self.engine.release(ids)
        self.counters["readings_gap_released"] += self.gaps.reset(ids)
        for col in (*self.ledger.values(), *self.ledger_rejects.values()):
            col[ids] = 0
        self._ledger_dirty[ids] = False
        self._rejected_mono[ids] = NOT_REJECTED
        names = self.devices.release(ids.tolist())
        self.counters["devices_released"] += len(names)
        gone = set(names)
        d = self.decoder
        d.sp_alias = {k: v for k, v in d.sp_alias.items() if k[0] not in gone}
        d.sp_type = {k: v for k, v in d.sp_type.items() if k[0] not in gone}
        log.info("%d devices silent since before the oldest reading the agent accepts "
                 "(validate.max_past) released their ids for new devices, e.g. %s",
                 len(names), ", ".join(names[:3]))
        return names

    def emit(self, *, flush: bool = False) -> ResultColumns:
        if not flush and self.clock.monotonic_ms() >= self._next_release:
            self._next_release = self.clock.monotonic_ms() + RELEASE_EVERY_MS
            self.release_devices()
        res = self.engine.flush_all() if flush else self.engine.emit(self.clock.monotonic_ms())
        self.counters["windows_emitted"] += len(res)
        self._count("windows_emitted", res.device)
        self.counters["revisions_emitted"] += int((res.rev > 0).sum())
        if res.superseded is not None:
            self.counters["windows_superseded"] += len(res.superseded)
        return res

    @staticmethod
    def _chunks(res: ResultColumns, step: int) -> list[np.ndarray]:
        """Row indices of each batch: at most ``step`` rows, and the results of one device's
        window (its metrics) never split across two batches, so the cloud judges a device's
        sensors together whatever the batch size (unless one window alone exceeds it)."""
        n = len(res)
        if n == 0:
            return [np.arange(0)]
        spec = res.spec if res.spec is not None else np.zeros(n, np.int64)
        order = np.lexsort((res.metric, res.start, res.device, spec))
        key = np.stack([spec[order], res.device[order], res.start[order]])
        starts = np.flatnonzero(np.r_[True, (key[:, 1:] != key[:, :-1]).any(axis=0)])
        out, lo = [], 0
        while lo < n:
            hi = min(lo + step, n)
            if hi < n:
                cut = starts[np.searchsorted(starts, hi, side="right") - 1]
                hi = int(cut) if cut > lo else hi
            out.append(order[lo:hi])
            lo = hi
        return out

    def to_batches(self, res: ResultColumns, next_seq: Any, incarnation: int = 0
                   ) -> list[ResultBatch]:
        """Split results into uplink batches with a per-batch device/metric dictionary."""
        out = []
        step = self.config.max_results_per_batch
        wm = self.engine.gateway_watermark()
        sup = res.superseded if res.superseded is not None else SupersededRows.empty()
        eng = self.config.engine
        for k, rows in enumerate(self._chunks(res, step)):
            part = res.take(rows)
            first = k == 0
            s_dev = sup.device if first else np.empty(0, np.int64)
            s_met = sup.metric if first else np.empty(0, np.int64)
            ud, dinv = np.unique(np.concatenate([part.device, s_dev]), return_inverse=True)
            um, minv = np.unique(np.concatenate([part.metric, s_met]), return_inverse=True)
            n = len(part)
            cols = part.to_cols()
            cols["d"] = dinv[:n].astype(np.int64)
            cols["m"] = minv[:n].astype(np.int64)
            base = ResultColumns.from_cols(cols)
            results = ResultColumns(
                **{f: getattr(base, f) for f in BASE_FIELDS},
                seq_min=part.seq_min, seq_max=part.seq_max, seq_sum=part.seq_sum,
                spec=part.spec, pct=part.pct, sk_keys=part.sk_keys, sk_counts=part.sk_counts,
                sk_offsets=part.sk_offsets,
                superseded=SupersededRows(dinv[n:].astype(np.int64), minv[n:].astype(np.int64),
                                          sup.spec, sup.start) if first and len(sup) else None,
            )
            out.append(ResultBatch(
                gateway=self.config.gateway, seq=next_seq(),
                watermark=wm if wm is not None else 0, sent_ms=self.wall_ms(),
                devices=[self.devices.names[i] for i in ud],
                metrics=[self.metrics.names[i] for i in um],
                results=results, specs=eng.labels, percentiles=list(eng.percentiles),
                alpha=eng.sketch_alpha, incarnation=incarnation,
            ))
        return out

    def stats(self) -> dict[str, float]:
        c = self.counters
        rej = self.rejects.counts
        # every reading that arrived: a re-delivery dropped as a duplicate arrived too (the
        # per-device ledger counts it the same way)
        received = (c["readings_accepted"] + c["late_dropped"] + c["duplicates"]
                    + sum(rej.values()))
        wm = self.engine.gateway_watermark()
        s: dict[str, float] = {
            "messages_in": c["messages_in"],
            "readings_received": received,
            "readings_accepted": c["readings_accepted"],
            # of those received, without a time of their own: stamped with the receive time
            "readings_untimed": c["readings_untimed"],
            # Sparkplug B edge nodes asked for their births again (data by unknown aliases)
            "rebirths_requested": c["rebirths_requested"],
            "rejected": sum(rej.values()),
            "late_revised": c["late_revised"],
            "late_dropped": c["late_dropped"],
            "windows_emitted": c["windows_emitted"],
            "revisions_emitted": c["revisions_emitted"],
            "duplicates": c["duplicates"],
            "windows_superseded": c["windows_superseded"],
            "open_windows": self.engine.open_windows,
            "window_state_kb": self.engine.state_bytes() // 1024,
            "devices_seen": devices_held(self.devices),
            # devices gone for good whose ids went to new devices (release_devices)
            "devices_released": c["devices_released"],
            "devices_silent": len(self.engine.silent_devices(self.clock.monotonic_ms())),
            "clock_corrected": self.engine.corrected,
            "watermark_lag_ms": (self.wall_ms() - wm) if wm is not None else 0,
            "internal_errors": c["internal_errors"],
            "checkpoint_unreadable": c["checkpoint_unreadable"],
            "readings_gap": int(self.gaps.gap.sum()) + c["readings_gap_released"],
            # readings remembered per device to tell a repeat (grows to the lateness horizon)
            "dedup_memory": self.engine.dedup.memory,
            "windows_unshipped": c["windows_unshipped"],
            # the gateway's own clock: 1 while it cannot be trusted (messages are held)
            "clock_unsynced": int(self.guard.reason is not None),
            "quarantine_held": len(self.guard.held),
            "quarantine_bytes": self.guard.held_bytes,
            "messages_quarantined": self.guard.quarantined,
            "quarantine_released": self.guard.released,
            "quarantine_shed": self.guard.shed,
            "clock_unsynced_episodes": self.guard.episodes,
        }
        for reason in rejects.READING_REASONS:
            s["rejected_" + reason] = rej.get(reason, 0)
        for k, v in c.items():
            if k.startswith(("late_dropped_", "late_revised_")):
                s[k] = v
        skew = self.engine.time.skew()
        known = skew[skew != UNKNOWN_SKEW]
        s["skew_max_abs_ms"] = int(np.abs(known).max()) if len(known) else 0
        s["devices_skewed"] = int((np.abs(known) > self.config.engine.skew_tolerance_ms).sum())
        return s

    def ledger_report(self, *, changed_only: bool = True) -> dict[str, object]:
        """Per-device ledger (cumulative), columnar; by default only devices that changed."""
        self._ledger_grow()
        n = len(self.devices)
        cur = {k: v[:n] for k, v in self.ledger.items()}
        if changed_only and self._ledger_reported is not None:
            changed = self._ledger_dirty[:n].copy()
            changed[self._ledger_reported:] = True  # devices new since: named once at least
            idx = np.flatnonzero(changed)
        else:
            idx = np.arange(n)
        self._ledger_dirty[:] = False
        self._ledger_reported = n
        names = self.devices.names
        idx = idx[[bool(names[i]) for i in idx.tolist()]] if self.devices.free else idx
        by = {j: col[:n][idx] for j, col in sorted(self.ledger_rejects.items())}
        return {
            "devices": [self.devices.names[i] for i in idx.tolist()],
            **{k: cur[k][idx].tolist() for k in LEDGER_FIELDS},
            "rejected_by": {rejects.READING_REASONS[j]: c.tolist() for j, c in by.items()
                            if c.any()},
        }

    def device_report(self, limit: int = 50) -> dict[str, object]:
        """Silent devices and the most skewed clocks, by name (bounded, for health)."""
        names = self.devices.names
        silent = [names[i] for i in
                  self.engine.silent_devices(self.clock.monotonic_ms())[:limit].tolist()
                  if i < len(names)]
        skew = self.engine.time.skew()[: len(names)]
        known = np.flatnonzero((skew != UNKNOWN_SKEW)
                               & (np.abs(skew) > self.config.engine.skew_tolerance_ms))
        worst = known[np.argsort(-np.abs(skew[known]))][:limit]
        return {"silent": silent, "skew_ms": {names[i]: int(skew[i]) for i in worst.tolist()}}

    # ---- checkpoint ---------------------------------------------------------------------

    def save_checkpoint(self, state_dir: Path, tick: int = 0) -> Path:
        """Window state, names and counters as of intake-log tick ``tick`` (fsynced)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        snap = self.engine.snapshot()
        snap["device_names"] = np.array(self.devices.names, dtype=str)
        snap["device_free"] = np.array(self.devices.free, np.int64)
        snap["metric_names"] = np.array(self.metrics.names, dtype=str)
        snap["tick"] = np.array([tick], np.int64)
        for k, v in self.ledger.items():
            snap["ledger_" + k] = v
        # on disk as one matrix, a column per reason up to the last one allocated
        width = max(self.ledger_rejects, default=-1) + 1
        matrix = np.zeros((len(self.ledger["accepted"]), width), np.int64)
        for j, col in self.ledger_rejects.items():
            matrix[:, j] = col
        snap["ledger_rejects"] = matrix
        # how long ago each device's last refused reading was (-1: none): monotonic time does
        # not survive a restart, an age does (the time the agent was down is not counted)
        mono = self.clock.monotonic_ms()
        snap["ledger_rejected_age_ms"] = np.where(
            self._rejected_mono == NOT_REJECTED, -1, mono - self._rejected_mono)
        snap.update(self.gaps.snapshot())
        snap.update(self.guard.snapshot())
        snap["counters"] = np.array([orjson.dumps({"c": dict(self.counters),
                                                   "r": dict(self.rejects.counts)}).decode()])
        d = self.decoder  # what Sparkplug B births said: data by alias needs it after a restart
        snap["sparkplug"] = np.array([orjson.dumps({
            "alias": [[dev, a, n] for (dev, a), n in d.sp_alias.items()],
            "type": [[dev, n, t] for (dev, n), t in d.sp_type.items()]}).decode()])
        path = state_dir / CHECKPOINT
        tmp = state_dir / (CHECKPOINT + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, **snap)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, state_dir: Path) -> int | None:
        """Restore a checkpoint; returns the intake-log tick it covers (None: no checkpoint)."""
        path = state_dir / CHECKPOINT
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            snap = {k: z[k] for k in z.files}
        names = [str(n) for n in snap.pop("device_names").tolist()]
        free = snap.pop("device_free").tolist() if "device_free" in snap else []
        self.devices.restore(names, [int(i) for i in free])
        for name in snap.pop("metric_names").tolist():
            self.metrics.intern(str(name))
        tick = int(snap.pop("tick")[0]) if "tick" in snap else 0
        for k in LEDGER_FIELDS:
            if "ledger_" + k in snap:
                self.ledger[k] = snap.pop("ledger_" + k).astype(np.int64)
        if "ledger_rejects" in snap:
            saved = snap.pop("ledger_rejects").astype(np.int64)
            width = len(rejects.READING_REASONS)  # reasons are only ever appended
            rows = max(len(saved), len(self.ledger["accepted"]))
            self.ledger_rejects = {j: _padded(saved[:, j], rows)
                                   for j in range(min(width, saved.shape[1]))
                                   if saved[:, j].any()}
        if "ledger_rejected_age_ms" in snap:  # (checkpoints before it: none refused, as then)
            age = snap.pop("ledger_rejected_age_ms").astype(np.int64)
            self._rejected_mono = np.where(age < 0, NOT_REJECTED,
                                           self.clock.monotonic_ms() - age)
        if "sparkplug" in snap:
            sp = orjson.loads(str(snap.pop("sparkplug")[0]))
            self.decoder.sp_alias.update({(dev, a): n for dev, a, n in sp["alias"]})
            self.decoder.sp_type.update({(dev, n): t for dev, n, t in sp["type"]})
        self.guard.restore(snap)
        self.gaps.restore(snap)
        if "counters" in snap:
            saved = orjson.loads(str(snap.pop("counters")[0]))
            self.counters.update(saved["c"])
            self.rejects.counts.update(saved["r"])
        self.engine.restore(snap, self.clock.monotonic_ms())
        log.info("resumed %d open windows from %s (intake tick %d)", self.engine.open_windows,
                 path, tick)
        for label, n in self.engine.retired_windows.items():
            log.warning("window spec %r is no longer configured: its %d open windows in the "
                        "checkpoint are dropped (the other specs keep their readings)", label, n)
        return tick


class EdgeAgent:
    """One gateway's agent: the pipeline plus its MQTT intake, outbox and uplink."""

    def __init__(self, config: EdgeConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.pipeline = EdgePipeline(config, self.clock)
        gw = config.gateway
        state_dir = config.state_dir
        if state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix=f"fieldline-{gw}-"))
            log.warning("no gateway.state_dir configured: outbox and checkpoints go to %s and "
                        "will not survive a reboot", state_dir)
        self.state_dir = state_dir
        self.intake = MqttIntake(config.intake_broker, config.topics, clock=self.clock,
                                 client_id=f"fieldline-edge-{gw}-intake", qos=config.intake_qos,
                                 max_pending=config.max_pending, manual_ack=config.durable,
                                 skip_retained=config.stamps_receive_time())
        self._rebirth_asked: dict[tuple[str, str], int] = {}
        self.wal = IntakeLog(state_dir / INTAKE_DIR) if config.durable else None
        self.uplink = MqttUplink(config.uplink_broker, gw, clock=self.clock,
                                 client_id=f"fieldline-edge-{gw}", state_dir=state_dir)
        self.outbox = self._open_outbox()
        self.shipper = Shipper(self.outbox, self.uplink, self.clock, state_dir=state_dir,
                               max_inflight=config.max_inflight_batches,
                               ack_timeout_ms=config.ack_timeout_ms)
        # the cloud's word on this gateway's clock: devices ahead of a clock it finds right
        # do not make the clock untrusted (ClockGuard.devices_say)
        self.shipper.on_clock = lambda offset: self.pipeline.guard.cloud_says(
            offset, self.clock.monotonic_ms())
        if self.uplink.seq.recovered:
            self._resume_sequence()
        self._last_overflow = 0
        # result batches as JSON and as stored (compressed when the cloud reads it), in bytes
        self.batch_json_bytes = 0
        self.batch_stored_bytes = 0
        self.batches_compressed = 0
        self._unstored: list[tuple[int, bytes, int, int]] = []  # refused by the outbox
        self._recover()
        self._next_checkpoint = self.clock.monotonic_ms() + config.checkpoint_interval_ms
        self._next_ledger = self.clock.monotonic_ms()
        self._broker_dropped = -1
        # a full (or failing) disk under state_dir: nothing is acknowledged, dropped or
        # half-written; the agent holds its intake and tries again every second
        self.disk_errors = 0
        self.checkpoint_errors = 0
        self.disk_recoveries = 0
        self._disk_reload = False  # outbox state unsure: reopen it and replay, as after a crash
        self._disk_retry_at = 0  # monotonic ms: no intake (and no reload) before this
        self._disk_since: int | None = None
        # for `fieldline edge status`: when the agent started, and each link's state and since
        self._started = self.clock.now_ms()
        self._links = Links()
        self._status_failed = False
        # the TLS certificates the links use (client certificates, CAs): the soonest expiry
        self._cert_files = sorted({f for b in (config.intake_broker, config.uplink_broker)
                                   if b.tls for f in (b.ca_file, b.cert_file) if f})
        self._cert_expiry: tuple[int, str] | None = None  # (not after, epoch ms; which one)
        self._next_cert_check = 0
        # what the links loaded when they were made (renewed files take effect at a restart)
        self._cert_loaded = {f: expiry_or_warn(f, log) for f in self._cert_files}
        self._cert_replaced: set[str] = set()

    def _resume_sequence(self) -> None:
        """After an unreadable sequence file: new batches are numbered past the outbox's (its
        entries are keyed by number), and acks for the batches it holds of the incarnations
        before are taken."""
        pending = self.outbox.pending()
        if not pending:
            return
        self.uplink.seq.skip_to(max(pending) + 1)
        for seq in pending:
            ident = peek_batch_id(self.outbox.read(seq))
            if ident is not None:
                self.shipper.earlier.add(ident[1])
        self.shipper.earlier.discard(self.uplink.seq.incarnation)

    def _checkpoint_unreadable(self, exc: Exception) -> int:
        """A checkpoint that cannot be read or restored (truncated, zeroed, from a newer
        version) is kept aside for a post-mortem and the agent starts without it: the intake
        log is replayed from its start, and the windows the checkpoint held lose what they
        had before it. Counted in health (``checkpoint_unreadable``)."""
        path = self.state_dir / CHECKPOINT
        aside = path.with_name(f"{CHECKPOINT}.unreadable-{self.clock.now_ms()}")
        try:
            os.replace(path, aside)
            kept = f"kept as {aside.name}"
        except OSError as move:
            kept = f"could not be moved aside ({move})"
        log.error("the window checkpoint %s cannot be restored (%s: %s); %s. Starting without "
                  "it: the intake log is replayed from its start, and windows open at that "
                  "checkpoint lose the readings they held before it", path,
                  type(exc).__name__, exc, kept)
        self.pipeline = EdgePipeline(self.config, self.clock)
        self.pipeline.counters["checkpoint_unreadable"] += 1
        return 0

    def _open_outbox(self) -> Outbox:
        c = self.config
        return Outbox(self.state_dir / OUTBOX_DIR, max_bytes=c.outbox_max_bytes,
                      max_age_ms=c.outbox_max_age_ms, policy=c.outbox_policy,
                      fsync=c.outbox_fsync)

    def _disk_error(self, exc: OSError, where: str, *, reload: bool) -> None:
        """A write under state_dir failed. Count it, hold the intake for a second, and (when
        the outbox may hold a half-written batch) rebuild from disk before going on."""
        now = self.clock.monotonic_ms()
        self.disk_errors += 1
        self._disk_reload = self._disk_reload or reload
        self._disk_retry_at = now + DISK_RETRY_MS
        if self._disk_since is None:
            self._disk_since = now
            log.error("writing the %s under %s failed (%s): holding device messages at the "
                      "broker (nothing acknowledged, nothing lost) and retrying every %.0f s",
                      where, self.state_dir, exc, DISK_RETRY_MS / 1000)

    def _disk_ok(self) -> bool:
        """Whether the agent may take intake now; after a failure, rebuild first."""
        if self._disk_since is None:
            return True
        if self.clock.monotonic_ms() < self._disk_retry_at:
            return False
        if self._disk_reload:
            try:
                self._reload()
            except OSError as exc:
                self._disk_error(exc, "outbox (recovering)", reload=True)
                return False
        log.warning("the disk under %s takes writes again after %.1f s: resuming",
                    self.state_dir, (self.clock.monotonic_ms() - self._disk_since) / 1000)
        self._disk_since = None
        return True

    def _reload(self) -> None:
        """What a restart does, without losing the connections: the outbox reopened from
        disk, the pipeline rebuilt from its checkpoint and the intake log (re-emitted windows
        are identical; InfluxDB keeps one copy)."""
        self.outbox.abandon()
        self.outbox = self._open_outbox()
        self.shipper.outbox = self.outbox
        self.shipper.inflight.clear()
        self._unstored = []
        self.pipeline = EdgePipeline(self.config, self.clock)
        self._recover(seed=False)  # (the intake runs on: it knows what it has taken)
        self._disk_reload = False
        self.disk_recoveries += 1

    def _recover(self, *, seed: bool = True) -> None:
        """Checkpoint, then the intake log after it, in its original ticks. The last messages
        logged (as many as the broker can have unacknowledged: ``max_pending``, its Receive
        Maximum) are told to the intake (``seed``): an acknowledgement the last run did not get
        out (it stopped, or crashed, after logging them) leaves them with the broker, which
        re-delivers them; they are in the log, so a re-delivery is acknowledged and dropped
        (a reading placed at its receipt would otherwise count twice)."""
        try:
            tick = self.pipeline.load_checkpoint(self.state_dir) or 0
        except Exception as exc:  # a gateway must start whatever its SD card kept
            tick = self._checkpoint_unreadable(exc)
        if self.wal is None:
            return
        replayed = 0
        logged: deque[tuple[int, str, bytes]] = deque(maxlen=self.config.max_pending)
        for t, msgs, ids in self.wal.replay(0):
            if seed and ids is not None:
                logged.extend((i, m[0], m[1]) for m, i in zip(msgs, ids, strict=True) if i)
            if t <= tick:
                continue  # in the checkpoint
            replayed += len(msgs)
            try:
                self.pipeline.process(msgs)
            except Exception:  # a record that breaks the pipeline must not stop every start
                self.pipeline.counters["internal_errors"] += 1
                self.pipeline.rejects.reject(rejects.INTERNAL_ERROR,
                                             f"logged tick {t} could not be replayed", len(msgs))
                log.exception("replaying logged tick %d (%d messages) failed; going on", t,
                              len(msgs))
                continue
            self._store(self.pipeline.emit())
        self.outbox.sync()
        if logged:
            self.intake.expect_redelivered(logged)
        self.pipeline.counters["replayed_on_start"] += replayed
        if replayed:
            log.info("replayed %d logged messages after the checkpoint of tick %d", replayed,
                     tick)

    @property
    def backpressure(self) -> bool:
        """Under refuse_newest, a full outbox stops emitting and stops taking intake."""
        return bool(self._unstored) or not self.outbox.has_room(
            self.config.max_results_per_batch * 200)

    def tick(self) -> int:
        """One turn: acks in, intake folded, results into the outbox (fsynced), batches out."""
        disk_ok = self._disk_ok()
        if not disk_ok and self._disk_reload:
            return 0  # the outbox is not touched again before it is reopened from disk
        self.shipper.apply_acks()
        n = 0
        if self._unstored:
            self._store_pending()
        if not self.backpressure and disk_ok:
            raw = self.intake.drain(self.config.max_batch_messages)
            msgs = [(m[0], m[1], m[2]) for m in raw]
            n = len(msgs)
            if self.wal is not None and raw:
                try:
                    self.wal.append(msgs, [m[3] & WIRE_ID for m in raw])
                    self.wal.sync()  # group commit: durable before any of them is acknowledged
                except OSError as exc:  # a full disk: keep them, unacknowledged, for later
                    self.wal.rollback()
                    self.intake.requeue(raw)
                    self._disk_error(exc, "intake log", reload=False)
                    raw, msgs, n = [], [], 0
                self.intake.ack(raw)
            overflow = self.intake.overflowed - self._last_overflow
            if overflow:
                self._last_overflow += overflow
                self.pipeline.rejects.reject(rejects.INTAKE_OVERFLOW, "intake buffer full",
                                             overflow)
            try:
                self.pipeline.process(msgs)
            except Exception:  # a bug: the batch is counted as rejected, the loop goes on
                self.pipeline.counters["internal_errors"] += 1
                self.pipeline.rejects.reject(rejects.INTERNAL_ERROR, "see traceback", len(msgs))
                log.exception("processing a batch of %d messages failed", len(msgs))
            self._ask_rebirths()
            res = self.pipeline.emit()
            try:
                self._store(res)
            except OSError:
                raise  # the disk: handled by the caller (rebuilt from disk, nothing lost)
            except Exception:  # a bug: the windows are counted as unshipped, the loop goes on
                self.pipeline.counters["internal_errors"] += 1
                self.pipeline.counters["windows_unshipped"] += len(res)
                log.exception("storing %d window results failed", len(res))
        self.outbox.expire(self.pipeline.wall_ms())
        self.outbox.sync()  # group commit: one fsync for everything appended this tick
        if self.wal is not None and self.clock.monotonic_ms() >= self._next_checkpoint:
            self.checkpoint()
        self.shipper.pump()
        if self.pipeline.late_out:
            late, self.pipeline.late_out = self.pipeline.late_out, []
            self.uplink.publish_late(orjson.dumps({"gw": self.config.gateway, "readings": late}))
        return n

    def _ask_rebirths(self) -> None:
        """Sparkplug B edge nodes whose data named an alias the agent has no name for (their
        births came before it listened) are asked to publish their births again, as a
        Sparkplug host application does: an ``NCMD`` with ``Node Control/Rebirth``, at most
        once a minute per node."""
        wanted = self.pipeline.decoder.rebirth_wanted
        if not wanted:
            return
        now = self.clock.monotonic_ms()
        for group, node in sorted(wanted):
            if now - self._rebirth_asked.get((group, node), -REBIRTH_EVERY_MS) < REBIRTH_EVERY_MS:
                continue
            self._rebirth_asked[(group, node)] = now
            self.pipeline.counters["rebirths_requested"] += 1
            log.info("asking Sparkplug B edge node %s/%s for its births again (data named "
                     "aliases the agent has no names for)", group, node)
            self.intake.publish(*sparkplug.rebirth_request(group, node, self.pipeline.wall_ms()))
        wanted.clear()

    def checkpoint(self) -> None:
        """Window state as of the last logged tick; the log before it can go. When the disk
        will not take it, the previous checkpoint and the whole log since stay: nothing is
        lost, the log only grows until a checkpoint succeeds again."""
        tick = self.wal.last_tick if self.wal is not None else 0
        try:
            self.pipeline.save_checkpoint(self.state_dir, tick)
        except OSError as exc:
            (self.state_dir / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
            self.checkpoint_errors += 1
            self._next_checkpoint = self.clock.monotonic_ms() + DISK_RETRY_MS
            if self.checkpoint_errors == 1 or self.checkpoint_errors % 100 == 0:
                log.error("checkpoint under %s failed (%s); the intake log keeps everything "
                          "since the last one (%d failures)", self.state_dir, exc,
                          self.checkpoint_errors)
            return
        if self.wal is not None:
            self.wal.truncate_through(tick)
        self._next_checkpoint = self.clock.monotonic_ms() + self.config.checkpoint_interval_ms
        self.pipeline.counters["checkpoints"] += 1

    def _packing(self) -> bool:
        """Compress what goes up: configured so, and the cloud said it reads zlib."""
        return self.config.uplink_compression == "zlib" and "zlib" in self.shipper.cloud.reads

    def _store(self, res: ResultColumns) -> None:
        if len(res) == 0 and (res.superseded is None or len(res.superseded) == 0):
            return
        pack = self._packing()
        for batch in self.pipeline.to_batches(res, self.uplink.seq.next,
                                              self.uplink.seq.incarnation):
            payload = batch.encode()
            self.batch_json_bytes += len(payload)
            if pack:
                payload = pack_uplink(payload)
                self.batches_compressed += 1
            self.batch_stored_bytes += len(payload)
            self._unstored.append((batch.seq, payload, len(batch.results),
                                   int(batch.results.count.sum())))
        self._store_pending()

    def _store_pending(self) -> None:
        now = self.pipeline.wall_ms()
        while self._unstored:
            seq, payload, windows, readings = self._unstored[0]
            if not self.outbox.append(seq, payload, windows=windows, readings=readings,
                                      now_ms=now):
                return  # refused: back-pressure until acknowledgements make room
            self._unstored.pop(0)

    def stats(self) -> dict[str, float]:
        s = self.pipeline.stats()
        ob = self.outbox
        now = self.pipeline.wall_ms()
        s.update({
            "intake_pending": self.intake.pending,
            # loss upstream of the agent: the gateway broker's own count of messages its queue
            # limits dropped (-1: not heard), and what it holds; per device: readings_gap
            "broker_dropped": self.intake.broker_dropped,
            "broker_stored": self.intake.broker_stored,
            # messages the broker re-delivered after a reconnect that the agent already had
            # (recognised by packet id and bytes, not handed over again)
            "intake_redelivered": self.intake.redelivered,
            "outbox_depth": ob.depth,
            # state files found damaged at start and set aside (1: this run began that way)
            "outbox_journal_unreadable": int(ob.journal_unreadable),
            "uplink_seq_recovered": int(self.uplink.seq.recovered),
            "outbox_bytes": ob.bytes,
            # how full the outbox is (0..1 of outbox.max_bytes): past it, its policy sheds
            "outbox_fill": round(ob.bytes / ob.max_bytes, 4),
            "outbox_oldest_age_ms": ob.oldest_age_ms(now),
            "outbox_shed_batches": ob.shed_batches,
            "windows_shed": ob.shed_windows,
            "readings_shed": ob.shed_readings,
            # shed batches the cloud acknowledged after all (they were on the wire): not lost
            "outbox_recovered": ob.recovered_batches,
            "outbox_expired": ob.expired_batches,
            "outbox_refused": ob.refused,
            "outbox_torn_records": ob.torn_records,
            "outbox_corrupt_records": ob.corrupt_records,
            # damaged records in the middle of the intake log found at start (their ticks lost)
            "intake_log_corrupt_records": self.wal.corrupt if self.wal is not None else 0,
            "backpressure": int(self.backpressure),
            "batches_stored": ob.appended,
            "batches_sent": self.uplink.sent,
            "batches_resent": self.shipper.resent,
            "batches_acked": self.shipper.acked,
            "windows_acked": ob.acked_windows,
            "readings_acked": ob.acked_readings,
            "windows_pending": sum(e.windows for e in ob.entries.values()) + sum(
                u[2] for u in self._unstored),
            # the shipping ledger, durable in the outbox's journal: every window put into it is
            # acknowledged, shed or pending (after a crash, windows the intake-log replay
            # emits again are shipped again and count again; InfluxDB keeps one copy)
            "windows_closed": s["windows_emitted"],
            "windows_emitted": ob.stored_windows + sum(u[2] for u in self._unstored)
            + self.pipeline.counters["windows_unshipped"],
            "batches_rejected_by_cloud": self.shipper.rejected,
            "acks_for_other_incarnation": self.shipper.foreign_acks,
            # acks of this incarnation about batches it never sent: a copied state directory
            "identity_conflicts": self.shipper.identity_conflicts,
            "acks_unproven": ob.unproven_acks,  # not naming the batch's digest: ignored
            "acks_overdue": self.shipper.overdue(),
            "ack_wait_ms": self.shipper.oldest_unacked_ms(),
            "uplink_inflight": len(self.shipper.inflight),
            "uplink_refused": self.uplink.refused,
            # the cloud broker closed the connection after a publish it may find too large
            # (its message size limit; logged with the size), and batches above the maximum
            # packet size it announced
            "uplink_size_disconnects": self.uplink.size_disconnects,
            "uplink_oversize": self.uplink.oversize,
            "uplink_no_subscribers": self.uplink.no_subscribers,
            "uplink_bytes": self.uplink.bytes_sent,
            # what compression saves: result batches' JSON against what was stored and sent
            "batch_json_bytes": self.batch_json_bytes,
            "batch_stored_bytes": self.batch_stored_bytes,
            "batches_compressed": self.batches_compressed,
            "rss_mb": round(rss_mb(), 1),
            "disk_errors": self.disk_errors,
            "disk_blocked": int(self._disk_since is not None),
            "checkpoint_errors": self.checkpoint_errors,
            "disk_recoveries": self.disk_recoveries,
        })
        if self._cert_expiry is not None:
            s["cert_days_left"] = round((self._cert_expiry[0] - self.pipeline.wall_ms())
                                        / DAY_MS, 2)
        return s

    def health(self) -> HealthReport:
        s = self.stats()
        gauges = {"open_windows", "window_state_kb", "devices_seen", "devices_silent",
                  "acks_overdue", "ack_wait_ms",
                  "watermark_lag_ms", "intake_pending", "broker_stored", "uplink_inflight",
                  "rss_mb",
                  "skew_max_abs_ms", "devices_skewed", "outbox_depth", "outbox_bytes",
                  "outbox_fill", "outbox_oldest_age_ms", "backpressure", "disk_blocked",
                  "clock_unsynced", "quarantine_held", "quarantine_bytes", "dedup_memory",
                  "cert_days_left"}
        return HealthReport(
            gateway=self.config.gateway, ts=self.pipeline.wall_ms(),
            counters={k: int(v) for k, v in s.items() if k not in gauges},
            gauges={k: float(v) for k, v in s.items() if k in gauges},
            devices=self.pipeline.device_report(),
        )

    def _check_certificates(self) -> None:
        """The soonest expiry of the links' TLS certificates (the files: client certificates and
        CAs; and the one the cloud broker showed), read at start and hourly: once one has
        expired its link fails its handshake and the gateway goes silent, so the log warns
        under ``CERT_WARN_DAYS`` left, and health (``cert_days_left``) and ``fieldline edge
        status`` say so."""
        now = self.clock.monotonic_ms()
        if not (self._cert_files or self.config.uplink_broker.tls) or \
                now < self._next_cert_check:
            return
        self._next_cert_check = now + CERT_CHECK_MS
        soonest: tuple[int, str] | None = None
        for f in self._cert_files:
            t = expiry_or_warn(f, log)
            loaded = self._cert_loaded.get(f)
            if loaded is None:  # unreadable when the agent started: what it reads now
                self._cert_loaded[f] = loaded = t
            if t is not None and t != loaded and f not in self._cert_replaced:
                self._cert_replaced.add(f)
                log.warning("the certificates in %s were replaced on disk: the agent's links use "
                            "them once it is restarted (systemctl restart fieldline-edge)", f)
            if loaded is not None and (soonest is None or loaded < soonest[0]):
                replaced = " (replaced on disk: restart the agent to use the new one)" \
                    if f in self._cert_replaced else ""
                soonest = (loaded, f"in {f}{replaced}")
        server = self.uplink.server_cert_expiry  # the cloud broker's, as it last showed it
        if server is not None and (soonest is None or server < soonest[0]):
            soonest = (server, f"the cloud broker {self.config.uplink_broker.url} shows")
        self._cert_expiry = soonest
        if soonest is None:
            return
        days = (soonest[0] - self.pipeline.wall_ms()) / DAY_MS
        if days < 0:
            log.error("the TLS certificate %s expired %.1f days ago: the link using it fails "
                      "its handshake until it is renewed", soonest[1], -days)
        elif days < CERT_WARN_DAYS:
            log.warning("the TLS certificate %s expires in %.1f days: renew it before, or the "
                        "link using it fails", soonest[1], days)

    def _report(self) -> None:
        """Health (counters) and the retained status, ahead of any bulk replay."""
        self._check_certificates()
        rep = self.health()
        dropped = self.intake.broker_dropped
        if dropped > self._broker_dropped >= 0:
            log.warning("the gateway broker dropped %d more messages it had acknowledged to "
                        "devices (its queue limits: the agent falls behind); per device they "
                        "show as sequence gaps (readings_gap %d)", dropped - self._broker_dropped,
                        int(rep.counters.get("readings_gap", 0)))
        self._broker_dropped = dropped  # (it starts again from 0 when the broker restarts)
        if self.clock.monotonic_ms() >= self._next_ledger:
            self._next_ledger = self.clock.monotonic_ms() + self.config.ledger_interval_ms
            rep = HealthReport(gateway=rep.gateway, ts=rep.ts, counters=rep.counters,
                               gauges=rep.gauges, devices=rep.devices,
                               ledger=self.pipeline.ledger_report())
        payload = rep.encode()
        if len(payload) > HEALTH_PACK_BYTES and self._packing():
            payload = pack_uplink(payload)  # a ledger of thousands of devices; small ones stay
        self.uplink.publish_health(payload)  # readable with mosquitto_sub
        wm = self.pipeline.engine.gateway_watermark()
        self.uplink.publish_status({
            "last_seen": rep.ts, "outbox_depth": self.outbox.depth,
            "outbox_oldest_age_ms": self.outbox.oldest_age_ms(rep.ts),
            "clock_unsynced": self.pipeline.guard.reason,
            # whether the gateway broker has acknowledged the intake's subscription: until
            # then devices' messages reach nobody (a fresh broker keeps no session for the agent)
            "intake_subscribed": self.intake.subscribed.is_set(),
            "watermark": wm if wm is not None else 0})
        self._write_status(rep, "running")

    def _write_status(self, rep: HealthReport, state: str) -> None:
        """The status ``fieldline edge status`` reads on the gateway (edge/status.py)."""
        c, links = self.config, self._links
        try:
            write_status(self.state_dir, {
                "gw": rep.gateway, "ts": rep.ts,
                "state": state, "pid": os.getpid(), "started": self._started,
                "health_interval_ms": c.health_interval_ms, "ack_timeout_ms": c.ack_timeout_ms,
                "outbox_max_bytes": c.outbox_max_bytes, "outbox_policy": c.outbox_policy,
                "clock_unsynced": self.pipeline.guard.reason,
                # how the cloud finds this gateway's clock (Ack.clock_ms), and when it said so
                "cloud_clock": None if self.shipper.cloud_clock is None else dict(
                    zip(("offset_ms", "told"), self.shipper.cloud_clock, strict=True)),
                "cert": None if self._cert_expiry is None else {
                    "what": self._cert_expiry[1], "not_after": self._cert_expiry[0]},
                "links": {
                    "intake": {"url": c.intake_broker.url, "topics": c.topics,
                               "subscribed": self.intake.subscribed.is_set(),
                               **links.state("intake", self.intake.connected.is_set(), rep.ts),
                               "error": self.intake.errors.last},
                    "uplink": {"url": c.uplink_broker.url,
                               **links.state("uplink", self.uplink.connected.is_set(), rep.ts),
                               "error": self.uplink.errors.last}},
                "counters": rep.counters, "gauges": rep.gauges, "devices": rep.devices})
            self._status_failed = False
        except OSError as exc:  # only the operator's view: never the agent's work
            if not self._status_failed:
                log.warning("cannot write the agent's status under %s: %s", self.state_dir, exc)
            self._status_failed = True

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then stop cleanly (checkpoint or flush, sync outbox)."""
        self.intake.start()
        self.uplink.start()
        log.info("edge agent %s running: intake %s %s -> uplink %s (outbox %d batches)",
                 self.config.gateway, self.config.intake_broker.url, self.config.topics,
                 self.config.uplink_broker.url, self.outbox.depth)
        next_health = self.clock.monotonic_ms()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.tick_ms / 1000)
                try:
                    if self.clock.monotonic_ms() >= next_health:
                        next_health = self.clock.monotonic_ms() + self.config.health_interval_ms
                        self._report()
                    self.tick()
                except OSError as exc:  # the disk under state_dir: rebuilt from it, retried
                    self._disk_error(exc, "outbox", reload=True)
                except Exception:  # a bug must not stop the gateway; it is counted and logged
                    self.pipeline.counters["internal_errors"] += 1
                    log.exception("edge tick failed")
        finally:
            await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self.intake.pause()  # nothing more is taken; what is logged now is still acknowledged
        try:
            if self._disk_reload:
                raise OSError("the outbox is still to be reopened from disk")
            self.tick()  # what was already received still gets folded and stored
        except OSError as exc:  # a full disk: what was not logged was not acknowledged either
            self.intake.stop()
            log.error("stopping with the disk under %s failing (%s); the broker keeps what "
                      "was not logged", self.state_dir, exc)
            self.outbox.abandon()
            if self.wal is not None:
                self.wal.rollback()
            self.uplink.stop()
            return
        except BaseException:
            self.intake.stop()
            raise
        self.intake.stop()
        if self.config.flush_on_stop:
            self._store(self.pipeline.emit(flush=True))
            self.outbox.sync()
        self.checkpoint()
        if self.wal is not None:
            try:
                self.wal.close()
            except OSError:
                self.wal.rollback()  # (its last tick was not acknowledged: the broker has it)
        # give the cloud a moment to acknowledge what is on the wire; the rest stays on disk
        deadline = self.clock.monotonic_ms() + 3_000
        while self.outbox.depth and self.uplink.connected.is_set() and (
                self.clock.monotonic_ms() < deadline):
            self.shipper.apply_acks()
            self.shipper.pump()
            threading.Event().wait(0.05)
        self.shipper.apply_acks()
        self._next_ledger = 0
        self._report()
        self._write_status(self.health(), "stopped")
        try:
            self.outbox.close()
        except OSError:  # what did not reach the disk is replayed from the intake log
            self.outbox.abandon()
        self.uplink.stop()
        log.info("edge agent %s stopped (%d batches left in the outbox)", self.config.gateway,
                 self.outbox.depth)
