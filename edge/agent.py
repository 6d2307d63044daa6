"""The gateway agent's composition root: wires intake, decoding, validation, windows and uplink.

One asyncio task ticks the pipeline (drain -> decode -> validate -> fold -> emit -> publish) every
``tick_ms``; another publishes health. MQTT network I/O runs in paho's threads. On stop the open
window state is checkpointed to ``state_dir`` (so a restart continues open windows instead of
emitting partial ones), unless ``flush_on_stop`` asks for everything to be emitted now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from devices import rejects
from devices.clock import Clock, SystemClock
from devices.codecs import PayloadDecoder
from devices.contract import HealthReport, ResultBatch, ResultColumns
from devices.readings import Interner
from devices.rejects import RejectLog
from edge.config import EdgeConfig
from edge.intake import MqttIntake
from edge.uplink import MqttUplink
from edge.validate import Validator
from edge.windows import MAX_DEVICES, MAX_METRICS, WindowEngine

log = logging.getLogger("fieldline.edge")

CHECKPOINT = "windows.npz"


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc, no psutil on the Pi)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EdgePipeline:
    """The synchronous core of the agent: everything between raw messages and result batches.

    Kept free of I/O so tests and benchmarks can drive it directly.
    """

    def __init__(self, config: EdgeConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.devices = Interner(limit=MAX_DEVICES)
        self.metrics = Interner(limit=MAX_METRICS)
        self.decoder = PayloadDecoder(self.devices, self.metrics,
                                      device_topic_level=config.device_topic_level,
                                      max_payload_bytes=config.max_payload_bytes)
        registry = config.load_registry()
        self.validator = Validator(
            config.catalog, self.devices, self.metrics,
            registry=registry if config.unknown_devices == "reject" else None,
            max_future_ms=config.max_future_ms, max_past_ms=config.max_past_ms,
        )
        self.engine = WindowEngine(config.window)
        self.rejects = RejectLog(log)
        self.counters: Counter[str] = Counter()

    def process(self, messages: list[tuple[str, bytes, int]]) -> None:
        """Decode, validate and fold one micro-batch of raw messages."""
        self.counters["messages_in"] += len(messages)
        cols, bad, samples = self.decoder.decode(messages)
        for s in samples:
            log.debug("rejected: %s", s)
        if bad:
            for reason, n in bad.items():
                self.rejects.reject(reason, samples[0] if samples else "", n)
        ok, vbad = self.validator.check(cols, self.clock.now_ms())
        for reason, n in vbad.items():
            self.rejects.reject(reason, f"{n} reading(s) in a batch of {len(cols)}", n)
        good = cols.take(ok) if not ok.all() else cols
        out = self.engine.fold(good, self.clock.monotonic_ms())
        self.counters["readings_accepted"] += out.accepted
        self.counters["late_revised"] += out.late_revised
        self.counters["late_dropped"] += out.late_dropped

    def emit(self, *, flush: bool = False) -> ResultColumns:
        res = self.engine.flush_all() if flush else self.engine.emit(self.clock.monotonic_ms())
        self.counters["windows_emitted"] += len(res)
        self.counters["revisions_emitted"] += int((res.rev > 0).sum())
        return res

    def to_batches(self, res: ResultColumns, next_seq: Any) -> list[ResultBatch]:
        """Split results into uplink batches with a per-batch device/metric dictionary."""
        out = []
        step = self.config.max_results_per_batch
        wm = self.engine.gateway_watermark()
        for lo in range(0, len(res), step):
            part = res.take(np.arange(lo, min(lo + step, len(res))))
            ud, dinv = np.unique(part.device, return_inverse=True)
            um, minv = np.unique(part.metric, return_inverse=True)
            cols = part.to_cols()
            cols["d"] = dinv.astype(np.int64)
            cols["m"] = minv.astype(np.int64)
            out.append(ResultBatch(
                gateway=self.config.gateway, seq=next_seq(),
                watermark=wm if wm is not None else 0, sent_ms=self.clock.now_ms(),
                devices=[self.devices.names[i] for i in ud],
                metrics=[self.metrics.names[i] for i in um],
                results=ResultColumns.from_cols(cols),
            ))
        return out

    def stats(self) -> dict[str, float]:
        c = self.counters
        rej = self.rejects.counts
        received = c["readings_accepted"] + c["late_dropped"] + sum(rej.values())
        wm = self.engine.gateway_watermark()
        s: dict[str, float] = {
            "messages_in": c["messages_in"],
            "readings_received": received,
            "readings_accepted": c["readings_accepted"],
            "rejected": sum(rej.values()),
            "late_revised": c["late_revised"],
            "late_dropped": c["late_dropped"],
            "windows_emitted": c["windows_emitted"],
            "revisions_emitted": c["revisions_emitted"],
            "open_windows": self.engine.open_windows,
            "devices_seen": len(self.devices),
            "devices_idle": len(self.engine.idle_devices()),
            "watermark_lag_ms": (self.clock.now_ms() - wm) if wm is not None else 0,
            "internal_errors": c["internal_errors"],
        }
        for reason in rejects.READING_REASONS:
            s["rejected_" + reason] = rej.get(reason, 0)
        return s

    # ---- checkpoint ---------------------------------------------------------------------

    def save_checkpoint(self, state_dir: Path) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        snap = self.engine.snapshot()
        snap["device_names"] = np.array(self.devices.names, dtype=str)
        snap["metric_names"] = np.array(self.metrics.names, dtype=str)
        path = state_dir / CHECKPOINT
        tmp = state_dir / (CHECKPOINT + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, **snap)  # type: ignore[arg-type]
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, state_dir: Path) -> bool:
        path = state_dir / CHECKPOINT
        if not path.exists():
            return False
        with np.load(path, allow_pickle=False) as z:
            snap = {k: z[k] for k in z.files}
        for name in snap.pop("device_names").tolist():
            self.devices.intern(str(name))
        for name in snap.pop("metric_names").tolist():
            self.metrics.intern(str(name))
        self.engine.restore(snap, self.clock.monotonic_ms())
        log.info("resumed %d open windows from %s", self.engine.open_windows, path)
        return True


class EdgeAgent:
    """One gateway's agent: the pipeline plus its MQTT intake and uplink."""

    def __init__(self, config: EdgeConfig, *, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.pipeline = EdgePipeline(config, self.clock)
        gw = config.gateway
        self.intake = MqttIntake(config.intake_broker, config.topics, clock=self.clock,
                                 client_id=f"fieldline-edge-{gw}-intake", qos=config.intake_qos,
                                 max_pending=config.max_pending)
        self.uplink = MqttUplink(config.uplink_broker, gw, clock=self.clock,
                                 client_id=f"fieldline-edge-{gw}", state_dir=config.state_dir,
                                 max_queued=config.uplink_max_queued)
        if config.state_dir is not None:
            self.pipeline.load_checkpoint(config.state_dir)
        self._last_overflow = 0

    def tick(self) -> int:
        """One turn of the pipeline; returns the number of messages processed."""
        msgs = self.intake.drain(self.config.max_batch_messages)
        overflow = self.intake.overflowed - self._last_overflow
        if overflow:
            self._last_overflow += overflow
            self.pipeline.rejects.reject(rejects.INTAKE_OVERFLOW, "intake buffer full", overflow)
        try:
            self.pipeline.process(msgs)
        except Exception:  # a bug: the batch is counted as rejected, the loop goes on
            self.pipeline.counters["internal_errors"] += 1
            self.pipeline.rejects.reject(rejects.INTERNAL_ERROR, "see traceback", len(msgs))
            log.exception("processing a batch of %d messages failed", len(msgs))
        self._ship(self.pipeline.emit())
        return len(msgs)

    def _ship(self, res: ResultColumns) -> None:
        if len(res) == 0:
            return
        for batch in self.pipeline.to_batches(res, self.uplink.seq.next):
            self.uplink.publish_results(batch.encode())

    def stats(self) -> dict[str, float]:
        s = self.pipeline.stats()
        s.update({
            "intake_pending": self.intake.pending,
            "batches_sent": self.uplink.sent,
            "batches_acked": self.uplink.acked,
            "uplink_refused": self.uplink.refused,
            "uplink_no_subscribers": self.uplink.no_subscribers,
            "uplink_queue_full": self.uplink.queue_full,
            "uplink_inflight": self.uplink.inflight,
            "uplink_bytes": self.uplink.bytes_sent,
            "rss_mb": round(rss_mb(), 1),
        })
        return s

    def health(self) -> HealthReport:
        s = self.stats()
        gauges = {"open_windows", "devices_seen", "devices_idle", "watermark_lag_ms",
                  "intake_pending", "uplink_inflight", "rss_mb"}
        return HealthReport(
            gateway=self.config.gateway, ts=self.clock.now_ms(),
            counters={k: int(v) for k, v in s.items() if k not in gauges},
            gauges={k: float(v) for k, v in s.items() if k in gauges},
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then stop cleanly (checkpoint or flush, drain uplink)."""
        self.intake.start()
        self.uplink.start()
        log.info("edge agent %s running: intake %s %s -> uplink %s", self.config.gateway,
                 self.config.intake_broker.url, self.config.topics, self.config.uplink_broker.url)
        next_health = self.clock.monotonic_ms()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.config.tick_ms / 1000)
                try:
                    self.tick()
                except Exception:  # a bug must not stop the gateway; it is counted and logged
                    self.pipeline.counters["internal_errors"] += 1
                    log.exception("edge tick failed")
                if self.clock.monotonic_ms() >= next_health:
                    next_health = self.clock.monotonic_ms() + self.config.health_interval_ms
                    self.uplink.publish_health(self.health().encode())
        finally:
            await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self.intake.stop()
        self.tick()  # what was already received still gets folded
        if self.config.flush_on_stop or self.config.state_dir is None:
            self._ship(self.pipeline.emit(flush=True))
        if self.config.state_dir is not None:
            self.pipeline.save_checkpoint(self.config.state_dir)
        self.uplink.publish_health(self.health().encode())
        if not self.uplink.wait_drained(5.0):
            log.warning("%d result batches not confirmed by the broker at shutdown",
                        self.uplink.inflight)
        self.uplink.stop()
        log.info("edge agent %s stopped", self.config.gateway)
