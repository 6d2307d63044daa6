"""The aggregate schema: every per-window column and every field written for it, defined once.

A window result travels as three shapes of the same columns, each derived from this table:

* the edge's aggregate state (``edge.aggregates.AggArrays``) and the wire form of a result
  (``devices.contract.ResultColumns``: attribute ``name``, message column ``wire``);
* the enriched rows of the cloud (``cloud.enrich.EnrichedResults``: calibrated by ``calibrate``);
* the fields of the ``aggregates`` measurement (``OUTPUTS``: what InfluxDB, the dashboards and
  the pattern rules see).

Adding an aggregate: a ``STATE`` entry, its arithmetic in ``edge.aggregates`` (fold and merge)
and, when it is to be written, an ``OUTPUTS`` entry. The dataclasses that carry the columns keep
typed attributes (mypy strict); ``tests/test_schema.py`` fails when one of them and this table
disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

Kind = Literal["int", "float"]
# one window's sequence numbers, or a column of them (int64: sums wrap around)
Seqs = TypeVar("Seqs", int, "npt.NDArray[np.int64]")
# how a device's calibration offset applies to a column: "" not at all, "shift" (+offset),
# "sum" (+offset * count); the spread (m2) and the times never change
Calibration = Literal["", "shift", "sum"]


@dataclass(frozen=True)
class Column:
    name: str  # attribute of AggArrays / ResultColumns
    wire: str  # key in the results message's ``cols``
    kind: Kind
    calibrate: Calibration = ""


# a result's identity (the edge's window bookkeeping, not aggregate state)
KEY = (
    Column("device", "d", "int"),
    Column("metric", "m", "int"),
    Column("start", "s", "int"),
    Column("width", "w", "int"),
    Column("rev", "r", "int"),
)

# the mergeable aggregate state of one window
STATE = (
    Column("count", "n", "int"),
    Column("sum", "sum", "float", "sum"),
    Column("min", "min", "float", "shift"),
    Column("max", "max", "float", "shift"),
    Column("mean", "mean", "float", "shift"),
    Column("m2", "m2", "float"),  # sum of squared deviations from the mean
    Column("first_ts", "ft", "int"),
    Column("first", "fv", "float", "shift"),
    Column("last_ts", "lt", "int"),
    Column("last", "lv", "float", "shift"),
)

# the readings' sequence numbers (optional on the wire: only when every reading carried one)
SEQ = (
    Column("seq_min", "qn", "int"),
    Column("seq_max", "qx", "int"),
    Column("seq_sum", "qs", "int"),  # wrapping sum: a checksum
)

RESULT = KEY + STATE  # the columns every results message carries
INT_WIRE = tuple(c.wire for c in RESULT if c.kind == "int")
FLOAT_WIRE = tuple(c.wire for c in RESULT if c.kind == "float")


@dataclass(frozen=True)
class Output:
    """A field of the ``aggregates`` measurement, taken from the enriched rows' ``attr``."""

    field: str
    attr: str
    kind: Kind
    aliases: tuple[str, ...] = ()  # other names a pattern rule may use for it
    describe: str = ""


OUTPUTS = (
    Output("count", "count", "int", describe="readings in the window"),
    Output("sum", "sum", "float"),
    Output("min", "min", "float"),
    Output("max", "max", "float"),
    Output("mean", "mean", "float"),
    Output("stddev", "std", "float", aliases=("std",), describe="sample standard deviation"),
    Output("first", "first", "float", describe="first reading by event time"),
    Output("last", "last", "float", describe="last reading by event time"),
    Output("rate", "rate", "float", describe="change per second, first to last reading"),
)
# written after the outputs: percentiles (p50, p99, ... as the gateway configured them), the
# sequence-number checks (seq_min, seq_max, seq_sum) when the edge sent them, then the revision
# (``cloud.points.aggregate_points`` leaves out what a reader can work out: ``seq_checks``)
REVISION_FIELD = "rev"


def _int64(v: int) -> int:
    """``v`` wrapped into a signed 64-bit integer, as numpy's int64 arithmetic wraps."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def seq_run(seq_min: Seqs, count: Seqs) -> tuple[Seqs, Seqs]:
    """(seq_max, seq_sum) of a window whose readings are the run ``seq_min .. seq_min + count
    - 1`` (one window, or int64 columns of them); the sum wraps around as the edge's does."""
    total = seq_min * count + count * (count - 1) // 2
    if isinstance(total, int):  # numpy's int64 columns wrap by themselves
        total = _int64(total)
    return seq_min + count - 1, total


def seq_checks(count: int, seq_min: int | None, seq_max: int | None, seq_sum: int | None
               ) -> tuple[int, int, int] | None:
    """A window's (seq_min, seq_max, seq_sum) from its ``aggregates`` point: a first result
    whose sequence numbers are a run carries ``seq_min`` alone. None: the window's readings
    carried no sequence numbers."""
    if seq_min is None:
        return None
    if seq_max is None and seq_sum is None:
        return (int(seq_min), *seq_run(int(seq_min), count))
    return int(seq_min), int(seq_max if seq_max is not None else -1), int(seq_sum or 0)


def output_names() -> tuple[str, ...]:
    """Every name a pattern rule may use for an output field (percentiles come on top)."""
    return tuple(n for o in OUTPUTS for n in (o.field, *o.aliases))
