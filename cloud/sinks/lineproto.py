"""InfluxDB line protocol, written by hand: the one format InfluxDB 1.x, 2.x and 3.x all accept.

Timestamps are integer epoch milliseconds (``precision=ms``). A point's identity in InfluxDB is
measurement + tag set + timestamp: writing the same identity again overwrites its fields, which is
what makes re-sent results idempotent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

_MEAS = str.maketrans({",": r"\,", " ": r"\ ", "\n": " "})
_TAG = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": " "})


def escape_tag(s: str) -> str:
    out = s.translate(_TAG)
    return out.rstrip("\\") or "_"


def escape_measurement(s: str) -> str:
    return s.translate(_MEAS)


def field_value(v: object) -> str | None:
    """Render one field value; None for values line protocol cannot carry (NaN, inf, None)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v}i"
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
    return None


def tag_prefix(measurement: str, tags: Mapping[str, str]) -> str:
    """``measurement,k=v,...`` with tags sorted (InfluxDB's preferred order) and empty ones left
    out."""
    tagstr = "".join(f",{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()) if v)
    return escape_measurement(measurement) + tagstr


def line(measurement: str, tags: Mapping[str, str], fields: Mapping[str, object],
         ts_ms: int) -> str | None:
    """One point; None when no field is representable."""
    rendered = []
    for k, v in fields.items():
        fv = field_value(v)
        if fv is not None:
            rendered.append(f"{escape_tag(k)}={fv}")
    if not rendered:
        return None
    return f"{tag_prefix(measurement, tags)} {','.join(rendered)} {ts_ms}"
