"""The versioned edge->cloud wire contract.

An uplink message is one JSON object (orjson, numpy arrays serialised natively) of a ``kind``:

``results``: a columnar batch of window results from one gateway::

    {"v": 1, "kind": "results", "gw": "gw-1", "seq": 17, "wm": <gateway watermark ms>,
     "sent": <ms>, "dev": ["t-001", ...], "met": ["temperature", ...],
     "cols": {"d": [...], "m": [...], "s": [...], "w": [...], "r": [...], "n": [...],
              "sum": [...], "min": [...], "max": [...], "mean": [...], "m2": [...],
              "ft": [...], "fv": [...], "lt": [...], "lv": [...]}}

Row i is the aggregate of device ``dev[d[i]]``, metric ``met[m[i]]`` over the window of spec
``specs[k[i]]`` (``"10s"``, ``"1m/10s"``, ``"session:30s"``, ``"count:100"``) that starts at event
time ``s[i]`` and spans ``w[i]`` ms, revision ``r[i]`` (0 first, n+1 when late readings revised
it). Every aggregate is mergeable: ``m2`` is the sum of squared deviations from ``mean`` (Chan et
al.), ``ft``/``fv`` and ``lt``/``lv`` the first and last reading by event time.

Optional parts: the readings' sequence numbers (``qn`` smallest, ``qx`` largest, ``qs`` wrapping
sum, a checksum), percentile columns named in ``pq`` (``"p50"`` … for the fractions listed), the
quantile sketches (``sk`` bucket keys and ``sc`` counts, row i owning ``so[i]:so[i+1]``, relative
accuracy ``alpha``; see ``edge.sketch``), and ``sup``: results withdrawn because their identity
changed (a session whose start moved), as columns ``d``, ``m``, ``k``, ``s``.

``health``: counters and gauges of one gateway agent at one instant.

A results message travels as that JSON or, once the cloud says it reads it (``reads`` in its
acks), compressed with zlib (``pack_uplink``; its first byte is 0x78, which no JSON document
starts with): window results compress about four to one, which is what a cellular gateway pays
for and what its outbox holds through an outage. Readers take either (``decode_uplink``).

A batch is identified by ``(gw, inc, seq)``: ``inc`` (optional, 0 when absent) is the agent's
incarnation, drawn at random when its state directory is new, so numbers that restart at 0
after a lost state are new batches; a result by ``(gw, device, metric, w, s)`` plus ``r``.
Readers ignore columns they do not know, so adding one is backward compatible; removing or
retyping one needs ``v`` to change.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from devices.errors import ContractError
from devices.readings import F64, I64
from devices.rejects import BAD_UPLINK, UNSUPPORTED_VERSION
from devices.schema import FLOAT_WIRE, INT_WIRE, RESULT, SEQ

VERSION = 1
TOPIC_ROOT = "fieldline/v1"
# the compressed encodings of a results message this code reads; every ack names them, so an
# agent compresses only for a cloud that can read it (an older one, mid-upgrade, gets JSON)
READS = ("zlib",)
ZLIB_LEVEL = 6  # zlib's default: ~60 MB/s here, a quarter of the JSON's size for window results
MAX_INFLATED = 64 * 2**20  # a compressed message inflating beyond this is refused (a zip bomb)

INT_COLUMNS = INT_WIRE
FLOAT_COLUMNS = FLOAT_WIRE


def percentile_name(q: float) -> str:
    """0.5 -> "p50", 0.999 -> "p99_9" (a column and InfluxDB field name)."""
    return "p" + f"{q * 100:.6g}".replace(".", "_")


@dataclass(frozen=True)
class SupersededRows:
    """Result identities withdrawn by the edge (device/metric indices, spec index, start)."""

    device: I64
    metric: I64
    spec: I64
    start: I64

    def __len__(self) -> int:
        return len(self.device)

    @staticmethod
    def empty() -> SupersededRows:
        e = np.empty(0, np.int64)
        return SupersededRows(e, e, e, e)

    def extend(self, device: I64, metric: I64, spec: I64, start: I64) -> SupersededRows:
        return SupersededRows(np.concatenate([self.device, device]),
                              np.concatenate([self.metric, metric]),
                              np.concatenate([self.spec, spec]),
                              np.concatenate([self.start, start]))


def results_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/results"


def health_topic(gateway: str) -> str:
    return f"{TOPIC_ROOT}/{gateway}/health"


def ack_topic(gateway: str) -> str:
    """The cloud worker's application-level acknowledgements to one gateway."""
    return f"{TOPIC_ROOT}/{gateway}/ack"


def batch_digest(payload: bytes) -> str:
    """What an ack proves it is about: a digest of the batch exactly as the gateway sent it.
    Only who received the batch can name it, so an ack forged by anyone else who may publish
    on the ack topic (or meant for another copy of a sequence number) deletes nothing."""
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


@dataclass(frozen=True)
class Ack:
    """Batches of one agent incarnation now in InfluxDB, and batches the cloud cannot use,
    each with the digest of the batch it received (``proofs``: seq -> ``batch_digest``)."""

    acked: list[int]
    rejected: list[int]
    incarnation: int = 0
    proofs: dict[int, str] = field(default_factory=dict)
    # of ``acked``: batches that came under a number the cloud already had another batch of
    # (two agents numbering under this incarnation: a copied state directory)
    conflicts: list[int] = field(default_factory=list)
    # the compressed encodings the acknowledging cloud reads (``READS``; none: JSON only)
    reads: tuple[str, ...] = ()
    # the gateway's clock minus the cloud's reference (the worker's, or the median of its
    # gateways' when the worker's is off that), as the worker tells it from the time the
    # gateway's health reports take; None: not told (yet, or an older worker)
    clock_ms: int | None = None


def encode_ack(acked: list[int], rejected: list[int] | None = None, incarnation: int = 0,
               proofs: dict[int, str] | None = None,
               conflicts: list[int] | None = None, clock_ms: int | None = None) -> bytes:
    """Batches now in InfluxDB (``acked``), and batches the cloud cannot use (``rejected``),
    of the agent incarnation ``incarnation``, with the digest of each as received; and which
    of them were ``conflicts`` (another batch had their number: see ``Ack``); and how the
    gateway's clock stands to the cloud's (``clock_ms``, see ``Ack``)."""
    doc: dict[str, Any] = {"v": VERSION, "acked": acked, "rejected": rejected or []}
    if incarnation:
        doc["inc"] = incarnation
    if proofs:
        doc["proof"] = {str(k): v for k, v in proofs.items()}
    if conflicts:
        doc["conflict"] = conflicts
    if clock_ms is not None:
        doc["clock"] = clock_ms
    doc["reads"] = list(READS)
    return orjson.dumps(doc)


def decode_ack(payload: bytes) -> Ack:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ContractError(BAD_UPLINK, "ack is not JSON") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ContractError(UNSUPPORTED_VERSION, "ack version")
    acked, rejected = doc.get("acked", []), doc.get("rejected", [])
    if not (isinstance(acked, list) and isinstance(rejected, list)
            and all(type(x) is int for x in acked + rejected)):
        raise ContractError(BAD_UPLINK, "ack lists must hold integers")
    inc = doc.get("inc", 0)
    if type(inc) is not int or inc < 0:
        raise ContractError(BAD_UPLINK, "ack incarnation must be an integer >= 0")
    raw = doc.get("proof", {})
    if not isinstance(raw, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in raw.items()):
        raise ContractError(BAD_UPLINK, "ack proofs must map sequence numbers to digests")
    conflicts = doc.get("conflict", [])
    if not (isinstance(conflicts, list) and all(type(x) is int for x in conflicts)):
        raise ContractError(BAD_UPLINK, "ack conflicts must be a list of integers")
    reads = doc.get("reads", [])
    if not (isinstance(reads, list) and all(isinstance(x, str) for x in reads)):
        raise ContractError(BAD_UPLINK, "ack reads must be a list of encoding names")
    clock = doc.get("clock")
    if clock is not None and type(clock) is not int:
        raise ContractError(BAD_UPLINK, "ack clock must be an integer number of ms")
    return Ack(acked, rejected, inc, {int(k): v for k, v in raw.items()}, conflicts,
               tuple(reads), clock)


def pack_uplink(payload: bytes) -> bytes:
    """A results message compressed for the uplink (for a cloud whose acks list ``"zlib"``)."""
    return zlib.compress(payload, ZLIB_LEVEL)


def uplink_json(payload: bytes) -> bytes:
    """The JSON of an uplink message: as it came, or inflated when it came compressed.
    Raises ``ContractError`` (``bad_uplink``) for a broken stream, trailing bytes, or one that
    inflates beyond ``MAX_INFLATED``, which is refused before it is inflated any further."""
    if payload[:1] != b"\x78":
        return payload
    z = zlib.decompressobj()
    try:
        out = z.decompress(payload, MAX_INFLATED + 1)
    except zlib.error as exc:
        raise ContractError(BAD_UPLINK, f"neither JSON nor a zlib stream ({exc})") from None
    if len(out) > MAX_INFLATED:
        raise ContractError(BAD_UPLINK, f"a compressed message inflating beyond "
                                        f"{MAX_INFLATED:,} bytes")
    if not z.eof:
        raise ContractError(BAD_UPLINK, "a compressed message cut short")
    if z.unused_data:
        raise ContractError(BAD_UPLINK, f"{len(z.unused_data)} bytes after the compressed "
                                        "message")
    return out


def late_topic(gateway: str) -> str:
    """Readings dropped as late, forwarded raw when the agent is configured to."""
    return f"{TOPIC_ROOT}/{gateway}/late"


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
    seq_min: I64 | None = None  # readings' sequence numbers: smallest, largest, wrapping sum
    seq_max: I64 | None = None
    seq_sum: I64 | None = None
    spec: I64 | None = None  # index into the batch's spec labels (None: one spec per width)
    pct: F64 | None = None  # (rows, percentiles)
    sk_keys: I64 | None = None
    sk_counts: I64 | None = None
    sk_offsets: I64 | None = None  # rows + 1
    superseded: SupersededRows | None = None

    def __len__(self) -> int:
        return len(self.device)

    def rate(self) -> F64:
        """Rate of change per second, from the first to the last reading (0 for one instant)."""
        dt = (self.last_ts - self.first_ts).astype(np.float64) / 1000.0
        return np.where(dt > 0, (self.last - self.first) / np.where(dt > 0, dt, 1.0), 0.0)

    def variance(self) -> F64:
        """Sample variance (n-1 denominator); 0 for a single reading."""
        n = self.count.astype(np.float64)
        return np.where(self.count > 1, self.m2 / np.maximum(n - 1, 1), 0.0)

    def to_cols(self) -> dict[str, npt.NDArray[Any]]:
        """The columns every results message carries, by wire name (``devices.schema``)."""
        return {c.wire: getattr(self, c.name) for c in RESULT}

    def take(self, idx: npt.NDArray[np.int64]) -> ResultColumns:
        """Rows ``idx`` (with their sketches); superseded identities are not carried."""
        c = self.to_cols()
        out = ResultColumns.from_cols({k: v[idx] for k, v in c.items()})
        sk_keys, sk_counts, sk_offsets = None, None, None
        if self.sk_offsets is not None and self.sk_keys is not None and self.sk_counts is not None:
            lo, hi = self.sk_offsets[idx], self.sk_offsets[idx + 1]
            sizes = hi - lo
            sel = np.repeat(lo - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes) + np.arange(
                int(sizes.sum()))
            sk_keys, sk_counts = self.sk_keys[sel], self.sk_counts[sel]
            sk_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        return ResultColumns(
            **{f: getattr(out, f) for f in BASE_FIELDS},
            seq_min=None if self.seq_min is None else self.seq_min[idx],
            seq_max=None if self.seq_max is None else self.seq_max[idx],
            seq_sum=None if self.seq_sum is None else self.seq_sum[idx],
            spec=None if self.spec is None else self.spec[idx],
            pct=None if self.pct is None else self.pct[idx],
            sk_keys=sk_keys, sk_counts=sk_counts, sk_offsets=sk_offsets,
        )

    @staticmethod
    def from_cols(c: dict[str, npt.NDArray[Any]]) -> ResultColumns:
        kw: dict[str, Any] = {col.name: c[col.wire] for col in RESULT}
        return ResultColumns(**kw)


BASE_FIELDS = tuple(c.name for c in RESULT)


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
    specs: list[str] = field(default_factory=list)  # labels for results.spec
    percentiles: list[float] = field(default_factory=list)  # for results.pct columns
    alpha: float | None = None  # sketch relative accuracy
    # the agent's incarnation: drawn at random when its state directory is new, so batch
    # numbers that start again at 0 after the state was lost are not mistaken for old ones
    incarnation: int = 0

    def spec_labels(self) -> list[str]:
        """The window label of every row."""
        r = self.results
        if r.spec is not None and self.specs:
            return [self.specs[k] for k in r.spec.tolist()]
        widths, inverse = np.unique(r.width, return_inverse=True)  # a label per width, once
        labels = [_width_label(int(w)) for w in widths.tolist()]
        return [labels[k] for k in inverse.tolist()]

    def encode(self) -> bytes:
        r = self.results
        cols: dict[str, Any] = r.to_cols()
        doc: dict[str, Any] = {
            "v": VERSION, "kind": "results", "gw": self.gateway, "seq": self.seq,
            "wm": self.watermark, "sent": self.sent_ms, "dev": self.devices, "met": self.metrics,
        }
        if self.incarnation:
            doc["inc"] = self.incarnation
        if r.spec is not None:
            cols["k"] = r.spec
            doc["specs"] = self.specs
        if r.seq_min is not None and r.seq_max is not None and r.seq_sum is not None:
            cols.update({c.wire: getattr(r, c.name) for c in SEQ})
        if r.pct is not None and self.percentiles:
            doc["pq"] = self.percentiles
            for j, q in enumerate(self.percentiles):
                cols[percentile_name(q)] = np.ascontiguousarray(r.pct[:, j])
        if r.sk_keys is not None and r.sk_counts is not None and r.sk_offsets is not None:
            doc["alpha"] = self.alpha
            cols["sk"], cols["sc"], cols["so"] = r.sk_keys, r.sk_counts, r.sk_offsets
        doc["cols"] = cols
        if r.superseded is not None and len(r.superseded):
            sp = r.superseded
            doc["sup"] = {"d": sp.device, "m": sp.metric, "k": sp.spec, "s": sp.start}
        return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def _width_label(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True, kw_only=True)
class HealthReport:
    """Counters (monotonic since agent start) and gauges of one gateway agent."""

    gateway: str
    ts: int
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    devices: dict[str, Any] = field(default_factory=dict)  # {"silent": [...], "skew_ms": {..}}
    # per-device ledger, columnar: {"devices": [...], "<field>": [...], "rejected_by": {..}}
    ledger: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"v": VERSION, "kind": "health", "gw": self.gateway, "ts": self.ts,
                               "counters": self.counters, "gauges": self.gauges,
                               "devices": self.devices}
        if self.ledger:
            doc["ledger"] = self.ledger
        return orjson.dumps(doc)


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


def _float_col(name: str, raw: object, n: int, *, allow_nan: bool = False) -> F64:
    if not isinstance(raw, list) or len(raw) != n:
        raise ContractError(BAD_UPLINK, f"column {name!r} must be a list of {n} numbers")
    if allow_nan:  # orjson writes NaN as null (an empty window's percentile)
        raw = [np.nan if x is None else x for x in raw]
    try:
        raw_arr = np.asarray(raw)
    except (ValueError, OverflowError):
        raise ContractError(BAD_UPLINK, f"column {name!r} is not a flat list of numbers") from None
    if n and (raw_arr.ndim != 1 or raw_arr.dtype.kind not in "iuf"):
        raise ContractError(BAD_UPLINK, f"column {name!r} holds a non-number")
    arr = raw_arr.astype(np.float64)
    if not allow_nan and not np.isfinite(arr).all():
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


def peek_batch_id(payload: bytes) -> tuple[str, int, int] | None:
    """(gateway, incarnation, seq) of a results message whose body may be unusable, if its
    header is fine."""
    try:
        doc = orjson.loads(uplink_json(payload))
    except (orjson.JSONDecodeError, ContractError):
        return None
    if not isinstance(doc, dict) or doc.get("kind") != "results":
        return None
    gw, seq, inc = doc.get("gw"), doc.get("seq"), doc.get("inc", 0)
    if (isinstance(gw, str) and gw and type(seq) is int and seq >= 0 and type(inc) is int
            and inc >= 0):
        return gw, inc, seq
    return None


def decode_uplink(payload: bytes) -> Uplink:
    """Parse and check one uplink message (JSON, or compressed: ``uplink_json``); raise
    ``ContractError`` with a countable reason."""
    payload = uplink_json(payload)
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
        devs = doc.get("devices", {})
        if not isinstance(devs, dict):
            raise ContractError(BAD_UPLINK, "health devices must be an object")
        silent = devs.get("silent", [])
        skew = devs.get("skew_ms", {})
        if not (isinstance(silent, list) and all(isinstance(x, str) for x in silent)
                and isinstance(skew, dict)
                and all(isinstance(k, str) and type(v) is int for k, v in skew.items())):
            raise ContractError(BAD_UPLINK, "health devices: silent is a list of ids, skew_ms "
                                            "maps ids to integers")
        ledger = doc.get("ledger", {})
        if not isinstance(ledger, dict):
            raise ContractError(BAD_UPLINK, "ledger must be an object")
        if ledger:
            names = ledger.get("devices")
            if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
                raise ContractError(BAD_UPLINK, "ledger devices must be a list of ids")
            by = ledger.get("rejected_by", {})
            if not isinstance(by, dict):
                raise ContractError(BAD_UPLINK, "ledger rejected_by must be an object")
            lcols = {k: v for k, v in ledger.items() if k not in ("devices", "rejected_by")}
            lcols.update({f"rejected_{k}": v for k, v in by.items()})
            for k, v in lcols.items():
                if not (isinstance(v, list) and len(v) == len(names)
                        and all(type(x) is int for x in v)):
                    raise ContractError(BAD_UPLINK, f"ledger column {k!r} malformed")
        return HealthReport(gateway=gw, ts=_header_int(doc, "ts"), counters=counters,
                            gauges={k: float(v) for k, v in gauges.items()},
                            devices={"silent": silent, "skew_ms": skew} if devs else {},
                            ledger=ledger)
    if kind != "results":
        raise ContractError(BAD_UPLINK, f"unknown kind {kind!r}")
    seq = _header_int(doc, "seq")
    if seq < 0:
        raise ContractError(BAD_UPLINK, "seq must be >= 0")
    inc = doc.get("inc", 0)
    if type(inc) is not int or inc < 0:
        raise ContractError(BAD_UPLINK, "'inc' must be an integer >= 0")
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
    spec = None
    specs: list[str] = []
    if "k" in cols:
        specs = doc.get("specs", [])
        if not isinstance(specs, list) or not all(isinstance(x, str) and x for x in specs):
            raise ContractError(BAD_UPLINK, "'specs' must be a list of window labels")
        spec = _int_col("k", cols["k"], n)
        if n and (spec.min() < 0 or spec.max() >= len(specs)):
            raise ContractError(BAD_UPLINK, "spec index out of range")
    pct = None
    qs: list[float] = []
    if "pq" in doc:
        qs = doc["pq"]
        if not isinstance(qs, list) or not all(type(q) in (int, float) and 0 <= q <= 1
                                               for q in qs):
            raise ContractError(BAD_UPLINK, "'pq' must list fractions in [0, 1]")
        pct = np.empty((n, len(qs)))
        for j, q in enumerate(qs):
            name = percentile_name(float(q))
            pct[:, j] = _float_col(name, cols.get(name), n, allow_nan=True)
    sk_keys = sk_counts = sk_offsets = None
    alpha = None
    if "so" in cols:
        sk_offsets = _int_col("so", cols["so"], n + 1)
        m = int(sk_offsets[-1]) if n + 1 else 0
        sk_keys = _int_col("sk", cols.get("sk"), m)
        sk_counts = _int_col("sc", cols.get("sc"), m)
        if sk_offsets[0] != 0 or (np.diff(sk_offsets) < 0).any():
            raise ContractError(BAD_UPLINK, "sketch offsets must start at 0 and not decrease")
        alpha = doc.get("alpha")
        if type(alpha) is not float or not 0 < alpha < 0.5:
            raise ContractError(BAD_UPLINK, "'alpha' must be the sketch's relative accuracy")
    sup = None
    if "sup" in doc:
        raw = doc["sup"]
        if not isinstance(raw, dict) or not isinstance(raw.get("d"), list):
            raise ContractError(BAD_UPLINK, "'sup' must be an object of columns")
        k = len(raw["d"])
        sup = SupersededRows(*(_int_col(c, raw.get(c), k) for c in ("d", "m", "k", "s")))
        if k and (sup.device.max() >= len(devices) or sup.metric.max() >= len(metrics)
                  or sup.device.min() < 0 or sup.metric.min() < 0
                  or sup.spec.min() < 0 or sup.spec.max() >= max(len(specs), 1)):
            raise ContractError(BAD_UPLINK, "superseded row index out of range")
    seqs: dict[str, Any] = {c.name: _int_col(c.wire, cols[c.wire], n) if c.wire in cols else None
                            for c in SEQ}
    base = ResultColumns.from_cols(parsed)
    results = ResultColumns(
        **{f: getattr(base, f) for f in BASE_FIELDS}, **seqs, spec=spec, pct=pct, sk_keys=sk_keys,
        sk_counts=sk_counts, sk_offsets=sk_offsets, superseded=sup)
    return ResultBatch(
        gateway=gw, seq=seq, watermark=_header_int(doc, "wm"), sent_ms=_header_int(doc, "sent"),
        devices=devices, metrics=metrics, results=results, specs=specs,
        percentiles=[float(q) for q in qs], alpha=alpha, incarnation=inc,
    )
