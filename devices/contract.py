"""The versioned edge->cloud wire contract.

An uplink message is one JSON object (orjson, numpy arrays serialised natively) of a ``kind``:

``results``: a columnar batch of window results from one gateway::

    {"v": 1, "kind": "results", "gw": "gw-1", "seq": 17, "wm": <gateway watermark ms>,
     "sent": <ms>, "dev": ["t-001", ...], "met": ["temperature", ...],
     "cols": {"d": [...], "m": [...], "s": [...], "w": [...], "r": [...], "n": [...],
              "sum": [...], "min": [...], "max": [...], "mean": [...], "m2": [...],
              "ft": [...], "fv": [...], "lt": [...], "lv": [...]}}

Row i is the aggregate of device ``dev[d[i]]``, metric ``met[m[i]]`` over the event-time window
``[s[i], s[i] + w[i])``, revision ``r[i]`` (0 first, n+1 when a late reading revised it). Every
aggregate is mergeable: ``m2`` is the sum of squared deviations from ``mean`` (Chan et al.), ``ft``/
``fv`` and ``lt``/``lv`` the first and last reading by event time.

``health``: counters and gauges of one gateway agent at one instant.

A batch is identified by ``(gw, seq)``; a result by ``(gw, device, metric, w, s)`` plus ``r``.
Readers ignore columns they do not know, so adding one is backward compatible; removing or
retyping one needs ``v`` to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from devices.errors import ContractError
from devices.readings import F64, I64
from devices.rejects import BAD_UPLINK, UNSUPPORTED_VERSION

VERSION = 1
TOPIC_ROOT = "fieldline/v1"

INT_COLUMNS = ("d", "m", "s", "w", "r", "n", "ft", "lt")
FLOAT_COLUMNS = ("sum", "min", "max", "mean", "m2", "fv", "lv")


def results_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/results"


def health_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/health"


def status_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/status"


def gateway_from_topic(topic: str) -> str | None:
    """``fieldline/v1/<gw>/<kind>`` -> ``<gw>``."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] + "/" + parts[1] == TOPIC_ROOT and parts[2]:
        return parts[2]
    return None


@dataclass(frozen=True, kw_only=True)
class ResultColumns:
    """Window results, one row per (device, metric, window, revision)."""

    device: I64
    metric: I64
    start: I64
    width: I64
    rev: I64
    count: I64
    sum: F64
    min: F64
    max: F64
    mean: F64
    m2: F64
    first_ts: I64
    first: F64
    last_ts: I64
    last: F64

    def __len__(self) -> int:
        return len(self.device)

    def variance(self) -> F64:
        """Sample variance (n-1 denominator); 0 for a single reading."""
        n = self.count.astype(np.float64)
        return np.where(self.count > 1, self.m2 / np.maximum(n - 1, 1), 0.0)

    def to_cols(self) -> dict[str, npt.NDArray[Any]]:
        return {
            "d": self.device, "m": self.metric, "s": self.start, "w": self.width, "r": self.rev,
            "n": self.count, "sum": self.sum, "min": self.min, "max": self.max,
            "mean": self.mean, "m2": self.m2, "ft": self.first_ts, "fv": self.first,
            "lt": self.last_ts, "lv": self.last,
        }

    def take(self, idx: npt.NDArray[np.int64] | npt.NDArray[np.bool_]) -> ResultColumns:
        c = self.to_cols()
        return ResultColumns.from_cols({k: v[idx] for k, v in c.items()})

    @staticmethod
    def from_cols(c: dict[str, npt.NDArray[Any]]) -> ResultColumns:
        return ResultColumns(
            device=c["d"], metric=c["m"], start=c["s"], width=c["w"], rev=c["r"],
            count=c["n"], sum=c["sum"], min=c["min"], max=c["max"], mean=c["mean"],
            m2=c["m2"], first_ts=c["ft"], first=c["fv"], last_ts=c["lt"], last=c["lv"],
        )


@dataclass(frozen=True, kw_only=True)
class ResultBatch:
    """One uplink message of window results."""

    gateway: str
    seq: int
    watermark: int
    sent_ms: int
    devices: list[str]
    metrics: list[str]
    results: ResultColumns

    def encode(self) -> bytes:
        doc = {
            "v": VERSION, "kind": "results", "gw": self.gateway, "seq": self.seq,
            "wm": self.watermark, "sent": self.sent_ms, "dev": self.devices, "met": self.metrics,
            "cols": self.results.to_cols(),
        }
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass(frozen=True, kw_only=True)
class HealthReport:
    """Counters (monotonic since agent start) and gauges of one gateway agent."""

    gateway: str
    ts: int
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps({"v": VERSION, "kind": "health", "gw": self.gateway, "ts": self.ts,
                             "counters": self.counters, "gauges": self.gauges})


Uplink = ResultBatch | HealthReport


def _int_col(name: str, raw: object, n: int) -> I64:
    if not isinstance(raw, list) or len(raw) != n:
        raise ContractError(BAD_UPLINK, f"column {name!r} must be a list of {n} integers")
    if n == 0:
        return np.empty(0, np.int64)
    try:
        arr = np.asarray(raw)
    except (ValueError, OverflowError):
        raise ContractError(BAD_UPLINK, f"column {name!r} is not a flat list of integers") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iu":  # bools, floats, strings, None: refused
        raise ContractError(BAD_UPLINK, f"column {name!r} holds a non-integer")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ContractError(BAD_UPLINK, f"column {name!r} overflows int64")
    return arr.astype(np.int64, copy=False)


def _float_col(name: str, raw: object, n: int) -> F64:
    if not isinstance(raw, list) or len(raw) != n:
        raise ContractError(BAD_UPLINK, f"column {name!r} must be a list of {n} numbers")
    try:
        raw_arr = np.asarray(raw)
    except (ValueError, OverflowError):
        raise ContractError(BAD_UPLINK, f"column {name!r} is not a flat list of numbers") from None
    if n and (raw_arr.ndim != 1 or raw_arr.dtype.kind not in "iuf"):
        raise ContractError(BAD_UPLINK, f"column {name!r} holds a non-number")
    arr = raw_arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ContractError(BAD_UPLINK, f"column {name!r} holds a non-finite number")
    return arr


def _header_str(doc: dict[str, Any], key: str) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not v or "/" in v:
        raise ContractError(BAD_UPLINK, f"{key!r} must be a non-empty string without '/'")
    return v


def _header_int(doc: dict[str, Any], key: str) -> int:
    v = doc.get(key)
    if type(v) is not int:
        raise ContractError(BAD_UPLINK, f"{key!r} must be an integer")
    return v


def decode_uplink(payload: bytes) -> Uplink:
    """Parse and check one uplink message; raise ``ContractError`` with a countable reason."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ContractError(BAD_UPLINK, f"not JSON: {payload[:40]!r}") from None
    if not isinstance(doc, dict):
        raise ContractError(BAD_UPLINK, "not a JSON object")
    if doc.get("v") != VERSION:
        raise ContractError(UNSUPPORTED_VERSION, f"version {doc.get('v')!r}, expected {VERSION}")
    kind = doc.get("kind")
    gw = _header_str(doc, "gw")
    if kind == "health":
        counters = doc.get("counters", {})
        gauges = doc.get("gauges", {})
        if not isinstance(counters, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in counters.items()
        ):
            raise ContractError(BAD_UPLINK, "health counters must map names to integers")
        if not isinstance(gauges, dict) or not all(
            isinstance(k, str) and type(v) in (int, float) and math.isfinite(v)
            for k, v in gauges.items()
        ):
            raise ContractError(BAD_UPLINK, "health gauges must map names to finite numbers")
        return HealthReport(gateway=gw, ts=_header_int(doc, "ts"), counters=counters,
                            gauges={k: float(v) for k, v in gauges.items()})
    if kind != "results":
        raise ContractError(BAD_UPLINK, f"unknown kind {kind!r}")
    seq = _header_int(doc, "seq")
    if seq < 0:
        raise ContractError(BAD_UPLINK, "seq must be >= 0")
    devices = doc.get("dev")
    metrics = doc.get("met")
    if not isinstance(devices, list) or not all(isinstance(x, str) and x for x in devices):
        raise ContractError(BAD_UPLINK, "'dev' must be a list of device ids")
    if not isinstance(metrics, list) or not all(isinstance(x, str) and x for x in metrics):
        raise ContractError(BAD_UPLINK, "'met' must be a list of metric names")
    cols = doc.get("cols")
    if not isinstance(cols, dict) or not isinstance(cols.get("d"), list):
        raise ContractError(BAD_UPLINK, "'cols' must be an object of columns")
    n = len(cols["d"])
    parsed: dict[str, npt.NDArray[Any]] = {}
    for name in INT_COLUMNS:
        parsed[name] = _int_col(name, cols.get(name), n)
    for name in FLOAT_COLUMNS:
        parsed[name] = _float_col(name, cols.get(name), n)
    if n:
        if parsed["d"].min() < 0 or parsed["d"].max() >= len(devices):
            raise ContractError(BAD_UPLINK, "device index out of range")
        if parsed["m"].min() < 0 or parsed["m"].max() >= len(metrics):
            raise ContractError(BAD_UPLINK, "metric index out of range")
        if (parsed["n"] < 1).any() or (parsed["w"] < 1).any() or (parsed["r"] < 0).any():
            raise ContractError(BAD_UPLINK, "count and width must be >= 1, revision >= 0")
        if (parsed["min"] > parsed["max"]).any() or (parsed["m2"] < 0).any():
            raise ContractError(BAD_UPLINK, "min > max or negative m2")
    return ResultBatch(
        gateway=gw, seq=seq, watermark=_header_int(doc, "wm"), sent_ms=_header_int(doc, "sent"),
        devices=devices, metrics=metrics, results=ResultColumns.from_cols(parsed),
    )
