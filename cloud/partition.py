"""The state of one partition of the cloud worker's input, and its snapshot.

Everything a worker learns from a partition's results lives here: which batches are written
(dedup marks), the detectors' histories, the pattern rules' state, and the latest revision
written per window. The single-worker path has one such state for every gateway; on JetStream
each partition has its own, snapshotted with the stream sequence it covers and moved with the
partition.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud.config import CloudConfig
from cloud.dedup import BatchDedup
from cloud.detect import DetectionStage, build_stage
from cloud.detect.stage import encode_detection
from cloud.rules import RuleEngine
from devices.errors import ConfigError

log = logging.getLogger("fieldline.cloud.partition")

RevisionKey = tuple[str, str, str, str, int]  # gateway, device, metric, spec label, start


def build_detection(config: CloudConfig) -> DetectionStage:
    """The configured detectors in their stage; a bad option fails naming its detector."""
    for name in config.detectors:
        try:
            build_stage([name], config.detector_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"detect.{name}", str(exc)) from None
    return build_stage(config.detectors, config.detector_options, policy=config.alerts,
                       windows=config.detect_windows, relearn_after=config.relearn_after,
                       min_change=config.min_change,
                       resolution_steps=config.resolution_steps,
                       forget_after_ms=config.forget_after_ms,
                       resolve_silent_after_ms=config.resolve_silent_after_ms)


@dataclass(frozen=True)
class Captured:
    """A partition's state copied at one point of its stream, not yet encoded."""

    meta: bytes
    detection: dict[str, Any]


def encode_snapshot(c: Captured) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(c.meta, np.uint8),
             detection=np.frombuffer(encode_detection(c.detection), np.uint8))
    return buf.getvalue()


@dataclass
class PartitionState:
    dedup: BatchDedup
    detection: DetectionStage
    rules: RuleEngine
    revisions: dict[RevisionKey, int] = field(default_factory=dict)  # windows with rev > 0
    revised: set[tuple[str, str]] = field(default_factory=set)  # (gateway, device) among them
    position: int = 0  # the last source position whose message was handled
    epoch: int = 0  # the ownership period (JetStream): tokens of an older one are void
    # its gateways' last health reports as its snapshot had them (gateway -> ms): what the
    # previous owner heard, for the new owner to name those that went quiet before it took over
    heard_before: dict[str, int] = field(default_factory=dict)

    @classmethod
    def fresh(cls, config: CloudConfig, epoch: int = 0) -> PartitionState:
        return cls(BatchDedup(), build_detection(config), RuleEngine(config.rules), epoch=epoch)

    def snapshot_bytes(self, heard: Mapping[str, int] | None = None) -> bytes:
        """Dedup marks (pending ones as written: the snapshot is published only once they
        are), revisions, the rules' state, position, the gateways ``heard`` (gateway -> when
        its last health report came, ms) and detector state in one blob."""
        return encode_snapshot(self.capture(heard))

    def capture(self, heard: Mapping[str, int] | None = None) -> Captured:
        """The state as it is now, copied (between two messages, where the stage runs), for
        ``encode_snapshot`` to turn into bytes anywhere, a thread included (at 10,000 devices
        x 3 metrics, 280 MB: the copy 0.08-0.6 s, the encoding 0.5 s)."""
        meta = {"v": 1, "position": self.position,
                "dedup": self.dedup.snapshot(pending_as_written=True),
                "revisions": [[*k, v] for k, v in self.revisions.items()],
                "heard": dict(heard or {}), "rules": self.rules.snapshot()}
        return Captured(json.dumps(meta).encode(), self.detection.snapshot())

    def restore_bytes(self, blob: bytes) -> bool:
        """False when the blob is unreadable or the detectors changed (they start afresh;
        the dedup marks are restored whenever readable, the rules' state when readable)."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                det = z["detection"].tobytes()
        except (OSError, ValueError, KeyError):
            return False
        self.position = int(meta["position"])
        self.dedup.restore(meta["dedup"])
        self.revisions = {(g, d, m, s, int(t)): int(r) for g, d, m, s, t, r in meta["revisions"]}
        self.revised = {(k[0], k[1]) for k in self.revisions}
        rules = meta.get("rules")  # absent from the snapshots of older versions
        if rules is not None:
            try:
                self.rules.restore(rules)
            except ValueError as exc:
                log.warning("partition snapshot at %d: %s; the rules start afresh",
                            self.position, exc)
        heard = meta.get("heard")  # absent from the snapshots of older versions
        if isinstance(heard, dict):
            self.heard_before = {str(g): int(t) for g, t in heard.items()
                                 if isinstance(t, int) and not isinstance(t, bool)}
        return self.detection.load_bytes(det, f"partition snapshot at {self.position}")
