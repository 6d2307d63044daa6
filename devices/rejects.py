"""Reasons a reading or a message is not accepted, and the counters that keep them.

Every reason is a short stable string: it becomes a field name in InfluxDB (``rejected_<reason>``)
and a log key, so renaming one is a breaking change.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping

# Device payloads (edge intake)
MALFORMED_JSON = "malformed_json"  # not JSON at all
MALFORMED_PAYLOAD = "malformed_payload"  # JSON, but not any supported payload shape
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
NOT_FINITE = "not_finite"  # NaN or +-Infinity
OUT_OF_RANGE = "out_of_range"  # outside the sensor kind's physical range
UNKNOWN_METRIC = "unknown_metric"  # metric not in the sensor catalog
UNKNOWN_DEVICE = "unknown_device"  # device not in the registry (when the registry is enforced)
BAD_TIMESTAMP = "bad_timestamp"  # event time before 2020: a device clock at 1970
CLOCK_FUTURE = "clock_future"  # event time further ahead of the gateway clock than max_future
CLOCK_PAST = "clock_past"  # event time further behind the gateway clock than max_past
DEVICE_MISMATCH = "device_mismatch"  # the payload names another device than its topic
CLOCK_UNSYNCED = "clock_unsynced"  # held while the gateway clock was implausible; the hold was full
PAYLOAD_TOO_LARGE = "payload_too_large"
INTAKE_OVERFLOW = "intake_overflow"  # intake buffer full: shed, counted
DEVICE_LIMIT = "device_limit"  # a new device id beyond gateway.max_devices
DEVICE_RATE = "device_rate"  # a new device id beyond gateway.new_devices_per_s (a flood)
INTERNAL_ERROR = "internal_error"  # a bug hit the batch: counted, logged with a traceback
LATE = "late"  # beyond allowed lateness
DUPLICATE = "duplicate"  # same device and seq, or same device, event time and value

# Uplink messages (cloud ingest)
BAD_UPLINK = "bad_uplink"  # garbage on an uplink topic
UNSUPPORTED_VERSION = "unsupported_version"

READING_REASONS = (
    MALFORMED_JSON,
    MALFORMED_PAYLOAD,
    MISSING_FIELD,
    WRONG_TYPE,
    NOT_FINITE,
    OUT_OF_RANGE,
    UNKNOWN_METRIC,
    UNKNOWN_DEVICE,
    BAD_TIMESTAMP,
    CLOCK_FUTURE,
    CLOCK_PAST,
    PAYLOAD_TOO_LARGE,
    INTAKE_OVERFLOW,
    INTERNAL_ERROR,
    DEVICE_LIMIT,
    DEVICE_RATE,
    CLOCK_UNSYNCED,
    DEVICE_MISMATCH,
)


class RejectLog:
    """Counts rejections by reason and logs the first few of each, then every ``log_every``-th.

    A flood of bad input must not turn into a flood of log lines, but every rejection is counted.
    """

    def __init__(self, logger: logging.Logger, *, log_first: int = 5,
                 log_every: int = 1000) -> None:
        self.counts: Counter[str] = Counter()
        self._logger = logger
        self._log_first = log_first
        self._log_every = log_every

    def reject(self, reason: str, detail: str, n: int = 1) -> None:
        before = self.counts[reason]
        self.counts[reason] = before + n
        after = before + n
        if before < self._log_first or before // self._log_every != after // self._log_every:
            self._logger.warning("rejected reason=%s total=%d detail=%s", reason, after, detail)

    def add(self, counts: Mapping[str, int] | Iterable[tuple[str, int]]) -> None:
        items = counts.items() if isinstance(counts, Mapping) else counts
        for reason, n in items:
            if n:
                self.counts[reason] += n

    @property
    def total(self) -> int:
        return sum(self.counts.values())
