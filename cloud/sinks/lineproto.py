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


def tag_text(key: str, value: str) -> str:
    """``,key=value``, escaped: one tag of a series key."""
    return f",{escape_tag(key)}={escape_tag(value)}"


def tag_prefix(measurement: str, tags: Mapping[str, str]) -> str:
    """``measurement,k=v,...`` with tags sorted (InfluxDB's preferred order) and empty ones left
    out."""
    tagstr = "".join(tag_text(k, v) for k, v in sorted(tags.items()) if v)
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


Fields = dict[str, "bool | int | float | str"]


def _split(s: str, sep: str, *, quotes: bool = False) -> list[str]:
    """Split on ``sep`` where it is neither escaped nor (with ``quotes``) inside a string."""
    out, cur, i, quoted = [], [], 0, False
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if quotes and ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    if quoted:
        raise ValueError("unterminated string")
    out.append("".join(cur))
    return out


def _unescape(s: str) -> str:
    return s.replace("\\,", ",").replace("\\=", "=").replace("\\ ", " ").replace('\\"', '"') \
        .replace("\\\\", "\\")


def parse_field(v: str) -> bool | int | float | str:
    if v.startswith('"'):
        if len(v) < 2 or not v.endswith('"'):
            raise ValueError(f"bad string {v!r}")
        return v[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if v in ("t", "T", "true", "True", "TRUE"):
        return True
    if v in ("f", "F", "false", "False", "FALSE"):
        return False
    if v.endswith("i"):
        return int(v[:-1])
    return float(v)


def parse_line(ln: str) -> tuple[str, dict[str, str], Fields, int]:
    """(measurement, tags, fields, time) of one line; ValueError when it is not line protocol
    (what a server would refuse as unparseable). The time is required here: fieldline always
    sets it."""
    parts = _split(ln, " ", quotes=True)
    if len(parts) != 3:
        raise ValueError(f"expected measurement+tags, fields and time: {ln[:80]!r}")
    head, body, ts = parts
    keys = _split(head, ",")
    if not keys[0]:
        raise ValueError("no measurement")
    tags = {}
    for kv in keys[1:]:
        pair = _split(kv, "=")
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise ValueError(f"bad tag {kv!r}")
        tags[_unescape(pair[0])] = _unescape(pair[1])
    fields: Fields = {}
    for kv in _split(body, ",", quotes=True):
        pair = _split(kv, "=", quotes=True)
        if len(pair) != 2 or not pair[0] or not pair[1]:
            raise ValueError(f"bad field {kv!r}")
        fields[_unescape(pair[0])] = parse_field(pair[1])
    return _unescape(keys[0]), tags, fields, int(ts)
