"""Typed points, column by column: what the worker hands its sinks.

A ``Points`` holds rows of one measurement: row i has the tags ``{k: tags[k][i]}`` (an empty
value: no such tag), the fields ``{k: fields[k][i]}`` and the time ``time[i]`` (epoch ms). A
field column is a numpy array (float64, int64 or bool) or a list of Python values; a missing
value (None, NaN, an infinity) leaves that field out of that row, and a row with no field at all
is not a point. Each sink encodes points its own way: InfluxDB 1.x/2.x/3.x as line protocol
(``lines``), the memory sink keeps the typed values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from cloud.sinks.lineproto import escape_measurement, escape_tag, field_value, tag_text

FieldColumn = npt.NDArray[Any] | list[Any]
Row = tuple[Mapping[str, str], Mapping[str, object], int]  # tags, fields, time (ms)

_NUMPY = orjson.OPT_SERIALIZE_NUMPY
# escaped "measurement,tag=value,..." per (measurement, tag names) and tag values; bounded
_PREFIXES: dict[tuple[str, tuple[str, ...]], dict[tuple[str, ...], str]] = {}
_MAX_PREFIXES = 200_000


def number_texts(a: npt.NDArray[Any]) -> list[str]:
    """Every value of a numeric column as text, in one C call (orjson: the shortest text that
    reads back as the same float, at a tenth of repr's cost); NaN and infinities come out as
    ``null``, which line protocol cannot carry."""
    if len(a) == 0:
        return []
    return orjson.dumps(np.ascontiguousarray(a), option=_NUMPY).decode()[1:-1].split(",")


@dataclass(frozen=True)
class Points:
    measurement: str
    tags: dict[str, list[str]]
    fields: dict[str, FieldColumn]
    time: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.time)

    @staticmethod
    def of(measurement: str, rows: Sequence[Row]) -> Points:
        """Points from rows of dicts (the small measurements: alerts, health, the ledger); a
        row none of whose fields can be written is not a point."""
        rows = [r for r in rows if any(field_value(v) is not None for v in r[1].values())]
        tag_names = sorted({k for tags, _, _ in rows for k in tags})
        field_names = list(dict.fromkeys(k for _, fields, _ in rows for k in fields))
        return Points(
            measurement,
            {k: [tags.get(k, "") for tags, _, _ in rows] for k in tag_names},
            {k: [fields.get(k) for _, fields, _ in rows] for k in field_names},
            np.array([ts for _, _, ts in rows], dtype=np.int64),
        )

    def take(self, idx: Sequence[int] | slice) -> Points:
        """The rows ``idx`` (in that order)."""
        known = self.__dict__.get("_series")
        if isinstance(idx, slice):
            out = Points(self.measurement, {k: v[idx] for k, v in self.tags.items()},
                         {k: v[idx] for k, v in self.fields.items()}, self.time[idx])
            if known is not None:
                object.__setattr__(out, "_series", known[idx])
            return out
        ix = np.asarray(idx, dtype=np.int64)
        lst = ix.tolist()

        def pick(col: FieldColumn) -> FieldColumn:
            return col[ix] if isinstance(col, np.ndarray) else [col[i] for i in lst]

        out = Points(self.measurement, {k: [v[i] for i in lst] for k, v in self.tags.items()},
                     {k: pick(v) for k, v in self.fields.items()}, self.time[ix])
        if known is not None:
            object.__setattr__(out, "_series", [known[i] for i in lst])
        return out

    def series(self) -> list[str]:
        """The escaped measurement and tag set of every row (line protocol's series key),
        worked out once per ``Points``."""
        known: list[str] | None = self.__dict__.get("_series")
        if known is None:
            known = self._series_keys()
            object.__setattr__(self, "_series", known)
        return known

    def _series_keys(self) -> list[str]:
        n = len(self)
        names = tuple(sorted(self.tags))
        if not names:
            return [escape_measurement(self.measurement)] * n
        cache = _PREFIXES.setdefault((self.measurement, names), {})
        if len(cache) > _MAX_PREFIXES:  # a bound, not an LRU: series sets are stable
            cache.clear()
        rows = list(zip(*(self.tags[k] for k in names), strict=True))
        try:
            return list(map(cache.__getitem__, rows))
        except KeyError:
            pass
        # series not seen before (a minute boundary after a start brings 10,000 at once):
        # each distinct tag value escaped once, not once per series it is in
        measurement = escape_measurement(self.measurement)
        texts: list[dict[str, str]] = [{} for _ in names]
        for values in set(rows).difference(cache):
            parts = [measurement]
            for j, v in enumerate(values):
                if v:
                    t = texts[j].get(v)
                    if t is None:
                        t = texts[j][v] = tag_text(names[j], v)
                    parts.append(t)
            cache[values] = "".join(parts)
        return list(map(cache.__getitem__, rows))

    def row(self, i: int) -> tuple[dict[str, str], dict[str, object], int]:
        """Row ``i`` as typed values (missing fields left out)."""
        fields: dict[str, object] = {}
        for k, col in self.fields.items():
            v = col[i].item() if isinstance(col, np.ndarray) else col[i]
            if field_value(v) is not None:
                fields[k] = v
        return ({k: v[i] for k, v in self.tags.items() if v[i]}, fields, int(self.time[i]))

    def lines(self) -> list[str]:
        """Line protocol, one line per point (rows without a field are left out). Complete
        numeric columns are formatted a column at a time and joined by one template."""
        n = len(self)
        if n == 0:
            return []
        complete: list[list[str]] = []
        template: list[str] = []
        partial: list[list[str]] = []
        for name, col in self.fields.items():
            key = escape_tag(name)
            if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
                texts = number_texts(col)
                suffix = "i" if col.dtype.kind in "iu" else ""
                if col.dtype.kind == "f" and not np.isfinite(col).all():
                    partial.append([f"{key}={t}" if t != "null" else "" for t in texts])
                else:
                    complete.append(texts)
                    template.append(f"{key}=%s{suffix}")
                continue
            values = col.tolist() if isinstance(col, np.ndarray) else col
            frags = [f"{key}={fv}" if (fv := field_value(v)) is not None else ""
                     for v in values]
            if all(frags):
                complete.append(frags)
                template.append("%s")
            else:
                partial.append(frags)
        if complete:
            tmpl = ",".join(template)
            body = [tmpl % row for row in zip(*complete, strict=True)]
        else:
            body = [""] * n
        for frags in partial:
            body = [(f"{b},{f}" if b else f) if f else b for b, f in zip(body, frags, strict=True)]
        return [f"{p} {b} {t}" for p, b, t in zip(self.series(), body, number_texts(self.time),
                                                 strict=True) if b]


def total(batch: Sequence[Points]) -> int:
    return sum(len(p) for p in batch)


def split(batch: Sequence[Points], at: int) -> tuple[list[Points], list[Points]]:
    """The first ``at`` points of a batch, and the rest."""
    head: list[Points] = []
    tail: list[Points] = []
    left = at
    for p in batch:
        if left >= len(p):
            head.append(p)
            left -= len(p)
        elif left > 0:
            head.append(p.take(slice(0, left)))
            tail.append(p.take(slice(left, len(p))))
            left = 0
        else:
            tail.append(p)
    return head, tail


def encode(batch: Sequence[Points]) -> list[str]:
    return [ln for p in batch for ln in p.lines()]


def from_lines(lines: Sequence[str]) -> list[Points]:
    """Line protocol back into points, one ``Points`` per run of one measurement (what tests
    and tools hold as text); ValueError on a line that is not line protocol."""
    from cloud.sinks.lineproto import parse_line

    out: list[Points] = []
    run: list[Row] = []
    meas = ""
    for ln in lines:
        m, tags, fields, ts = parse_line(ln)
        if run and m != meas:
            out.append(Points.of(meas, run))
            run = []
        meas = m
        run.append((tags, fields, ts))
    if run:
        out.append(Points.of(meas, run))
    return out
