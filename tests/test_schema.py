"""The aggregate schema (devices/schema.py) is the one definition: the state arrays, the wire
columns, the enriched rows, the InfluxDB fields and the rule fields all follow it, and the fast
line builder writes exactly what the field-by-field one would."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cloud.enrich import EnrichedResults, Enricher
from cloud.points import SITES, aggregate_points, site_points
from cloud.rules import parse_rules
from cloud.sinks.lineproto import line, tag_prefix
from devices.catalog import Catalog
from devices.contract import ResultBatch, ResultColumns, decode_uplink
from devices.registry import Registry
from devices.schema import (
    KEY,
    OUTPUTS,
    RESULT,
    REVISION_FIELD,
    SEQ,
    STATE,
    output_names,
    seq_checks,
    seq_run,
)
from edge.aggregates import FIELDS, AggArrays


def test_every_carrier_has_the_schemas_columns() -> None:
    assert [f.name for f in dataclasses.fields(AggArrays)] == [c.name for c in STATE + SEQ]
    assert tuple(c.name for c in STATE + SEQ) == FIELDS
    rc = {f.name for f in dataclasses.fields(ResultColumns)}
    assert {c.name for c in KEY + STATE + SEQ} <= rc
    wires = [c.wire for c in KEY + STATE + SEQ]
    assert len(set(wires)) == len(wires)
    er = {f.name for f in dataclasses.fields(EnrichedResults)}
    assert {o.attr for o in OUTPUTS} <= er
    fields = [o.field for o in OUTPUTS] + [REVISION_FIELD]
    assert len(set(fields)) == len(fields)
    empty = AggArrays.empty()
    for c in STATE + SEQ:
        assert getattr(empty, c.name).dtype == (np.int64 if c.kind == "int" else np.float64)


def _batch(n: int, rng: np.random.Generator, seq: bool) -> ResultBatch:
    cols: dict[str, np.ndarray] = {}
    for c in RESULT:
        if c.kind == "int":
            cols[c.name] = rng.integers(1, 10, n).astype(np.int64)
        else:
            cols[c.name] = rng.normal(20, 5, n)
    cols["device"] = rng.integers(0, 3, n).astype(np.int64)
    cols["metric"] = np.zeros(n, np.int64)
    cols["start"] = 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 10_000
    cols["m2"] = np.abs(cols["m2"])
    cols["min"] = np.minimum(cols["min"], cols["max"])
    cols["rev"] = rng.integers(0, 3, n).astype(np.int64)  # mostly first results
    extra = {c.name: rng.integers(0, 100, n).astype(np.int64) for c in SEQ} if seq else {}
    if seq:  # about half the windows hold a run of sequence numbers, as a device's usually do
        run = rng.random(n) < 0.5
        lo, count = extra["seq_min"], cols["count"]
        extra["seq_max"] = np.where(run, lo + count - 1, np.maximum(extra["seq_max"], lo))
        extra["seq_sum"] = np.where(run, lo * count + count * (count - 1) // 2,
                                    extra["seq_sum"])
    res = ResultColumns(**cols, **extra)
    return ResultBatch(gateway="gw 1", seq=1, watermark=0, sent_ms=0,
                       devices=["a", "b,c", "d=e"], metrics=["temperature"], results=res)


def test_the_wire_carries_every_schema_column() -> None:
    b = _batch(5, np.random.default_rng(0), seq=True)
    back = decode_uplink(b.encode())
    assert isinstance(back, ResultBatch)
    for c in RESULT + SEQ:
        assert np.array_equal(getattr(back.results, c.name), getattr(b.results, c.name)), c


def _reference_lines(rows: EnrichedResults) -> list[str]:
    """Field by field, with the generic line(): what the fast builder must equal."""
    out = []
    for i in range(len(rows)):
        fields: dict[str, object] = {o.field: getattr(rows, o.attr)[i].item() for o in OUTPUTS}
        for j, name in enumerate(rows.pct_names):
            fields[name] = float(rows.pct[i, j])
        rev, count = int(rows.rev[i]), int(rows.count[i])
        if rows.seq_min is not None and rows.seq_max is not None and rows.seq_sum is not None \
                and rows.seq_min[i] >= 0:
            lo, hi, total = int(rows.seq_min[i]), int(rows.seq_max[i]), int(rows.seq_sum[i])
            fields["seq_min"] = lo
            if rev > 0 or (hi, total) != (lo + count - 1, sum(range(lo, lo + count))):
                fields.update(seq_max=hi, seq_sum=total)
        if rev > 0:
            fields[REVISION_FIELD] = rev
        ln = line("aggregates", {}, fields, int(rows.start[i]))
        assert ln is not None
        tags = tag_prefix("aggregates", {"gateway": rows.gateway, "site": rows.site[i],
                                         "device": rows.device[i], "metric": rows.metric[i],
                                         "window": rows.window[i], "unit": rows.unit[i]})
        out.append(tags + ln[len("aggregates"):])
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 30), seed=st.integers(0, 2**32 - 1), seq=st.booleans(),
       pct_nan=st.booleans(), scale=st.sampled_from([1e-9, 1.0, 1e17]),
       bad_row=st.booleans())
def test_fast_lines_equal_field_by_field_lines(n: int, seed: int, seq: bool, pct_nan: bool,
                                               scale: float, bad_row: bool) -> None:
    rng = np.random.default_rng(seed)
    b = _batch(n, rng, seq)
    rows = Enricher(Registry(), Catalog()).enrich(b)
    scaled = {f: getattr(rows, f) * scale for f in ("mean", "min", "max", "sum", "first")}
    pct = rng.normal(0, 1, (n, 2))
    if pct_nan and n:
        pct[rng.integers(0, n), 1] = np.nan  # an empty sketch's percentile: left out
    seq_min = rows.seq_min
    if seq_min is not None and n:
        seq_min = seq_min.copy()
        seq_min[0] = -1  # a window with readings that carried no sequence numbers
    rows = dataclasses.replace(rows, **scaled, pct=pct, pct_names=["p50", "p99_9"],
                               seq_min=seq_min)
    if bad_row and n:  # never from a valid batch, but a line must not be broken by it
        rows.mean[0] = np.nan
    got = aggregate_points(rows).lines()
    want = _reference_lines(rows)
    if bad_row and n:
        assert "mean=" not in got[0]
        assert "null" not in got[0]
        got, want = got[1:], want[1:]
    assert [parse(x) for x in got] == [parse(x) for x in want]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_a_reader_gets_every_windows_sequence_checks_back(n: int, seed: int) -> None:
    """What the points leave out (seq_max and seq_sum of a first result that is a run, rev 0)
    ``seq_checks`` restores from what they hold: the oracle reads InfluxDB through it."""
    rows = Enricher(Registry(), Catalog()).enrich(_batch(n, np.random.default_rng(seed), True))
    assert rows.seq_min is not None
    assert rows.seq_max is not None
    assert rows.seq_sum is not None
    got = [parse(x)[1] for x in aggregate_points(rows).lines()]
    for i, f in enumerate(got):
        want = (int(rows.seq_min[i]), int(rows.seq_max[i]), int(rows.seq_sum[i]))
        assert seq_checks(int(f["count"]), *(f.get(k) for k in ("seq_min", "seq_max", "seq_sum"))
                          ) == want  # type: ignore[arg-type]
        assert f.get(REVISION_FIELD, 0) == rows.rev[i]


@pytest.mark.parametrize("lo", [0, 5, 2**62, 2**63 - 40])
def test_the_run_sum_wraps_as_the_edges_checksum_does(lo: int) -> None:
    seqs = np.arange(lo, lo + 30, dtype=np.int64)  # from 2**62 on, their sum wraps
    with np.errstate(over="ignore"):
        edge_sum = int(np.add.reduce(seqs))
    assert seq_run(lo, 30) == (lo + 29, edge_sum)


def test_a_window_without_sequence_numbers_has_no_checks() -> None:
    assert seq_checks(5, None, None, None) is None
    assert seq_checks(3, 7, None, None) == (7, 9, 24)
    assert seq_checks(3, 7, 12, 30) == (7, 12, 30)


def parse(ln: str) -> tuple[str, dict[str, int | float], str]:
    """A line's tags, fields (typed as line protocol types them) and timestamp: number texts
    may differ (1e-08 / 1e-8), values may not."""
    tags, fields, ts = ln.rsplit(" ", 2)
    out: dict[str, int | float] = {}
    for kv in fields.split(","):
        k, v = kv.split("=")
        out[k] = int(v[:-1]) if v.endswith("i") else float(v)
        assert v.endswith("i") or "." in v or "e" in v or v in ("inf", "-inf"), v
    return tags, out, ts


@pytest.mark.parametrize("name", output_names())
def test_rules_accept_every_output_field(name: str) -> None:
    (rule,) = parse_rules([{"name": "r", "kind": "consecutive", "field": name, "above": 1.0}])
    assert rule.field == name


_TAG_TEXT = st.text(alphabet=st.sampled_from(list("ab1 ,=\\\n\"é")), max_size=4)


@settings(max_examples=80, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({"device": _TAG_TEXT, "site": _TAG_TEXT,
                                            "a b": _TAG_TEXT}), min_size=1, max_size=12),
       measurement=st.sampled_from(["m", "my m,x"]))
def test_series_keys_equal_tag_prefix_whether_the_series_are_new_or_known(
        rows: list[dict[str, str]], measurement: str) -> None:
    """The writer's series keys, built a column at a time (new series) or looked up (known
    ones), are ``tag_prefix`` of each row: escapes, empty values left out, tags sorted."""
    from cloud.sinks.points import Points

    def points() -> Points:
        tags = {k: [r[k] for r in rows] for k in rows[0]}
        return Points(measurement, tags, {"v": np.ones(len(rows))},
                      np.arange(len(rows), dtype=np.int64))

    want = [tag_prefix(measurement, r) for r in rows]
    assert points().series() == want  # the first time (some of them new)
    assert points().series() == want  # all known


@example(rows_=[("s1", "t", "10s", 0, 0, 5, 1.0), ("s1", "t", "10s", 0, 0, 5, 2.0)], seq=3,
         marks=[(True, False), (False, True)] * 20)  # one window, one judged, one not
@settings(max_examples=60, deadline=None)
@given(rows_=st.lists(st.tuples(
    st.sampled_from(["s1", "s2"]), st.sampled_from(["t", "p"]),
    st.sampled_from(["10s", "1m/10s", "session:30s", "count:100", "500ms"]),
    st.integers(0, 3), st.integers(0, 2), st.integers(0, 50),
    st.floats(-1e6, 1e6, allow_nan=False)), max_size=40),
    seq=st.integers(0, 10**9), marks=st.lists(st.sampled_from([(False, False), (True, False),
                                                               (True, True), (False, True)]),
                                               min_size=40, max_size=40))
def test_site_rollups_sum_each_time_aligned_windows_first_results(
        rows_: list[tuple[str, str, str, int, int, int, float]], seq: int,
        marks: list[tuple[bool, bool]]) -> None:
    """``site_points`` against a loop: per (site, metric, window, start), the first results of
    tumbling and hopping windows summed (sessions, count windows and revisions left out), each
    point inside its window's first second and named by the batch's seq; with the results the
    detectors judged and those they found anomalous counted (an anomaly on a row not judged
    is not counted), on the points with a judged result only."""
    n = len(rows_)
    judged = np.array([j for j, _ in marks[:n]], bool)
    anomalous = np.array([a for _, a in marks[:n]], bool)
    widths = {"10s": 10_000, "1m/10s": 60_000, "session:30s": 45_000, "count:100": 7_000,
              "500ms": 500}
    start = np.array([1_700_000_000_000 + k * (500 if w == "500ms" else 10_000)
                      for _, _, w, k, _, _, _ in rows_], np.int64)
    count = np.array([c for *_, c, _ in rows_], np.int64)
    mean = np.array([m for *_, m in rows_], np.float64)
    rows = EnrichedResults(
        gateway="gw", device=[f"d{i}" for i in range(n)], metric=[r[1] for r in rows_],
        site=[r[0] for r in rows_], unit=[""] * n, window=[r[2] for r in rows_],
        known=np.ones(n, bool), start=start,
        width=np.array([widths[r[2]] for r in rows_], np.int64),
        rev=np.array([r[4] for r in rows_], np.int64), count=count, sum=mean * count,
        min=mean - 1, max=mean + 1, mean=mean, std=np.zeros(n), first=mean, last=mean,
        low=np.full(n, np.nan), high=np.full(n, np.nan), scale_floor=np.ones(n),
        rate=np.zeros(n), pct=np.empty((n, 0)), pct_names=[], seq_min=None, seq_max=None,
        seq_sum=None)
    want: dict[tuple[str, str, str, int], list[float]] = {}
    for i, (site, metric, window, _, rev, c, m) in enumerate(rows_):
        if ":" in window or rev or c == 0:
            continue
        w = want.setdefault((site, metric, window, int(start[i])),
                            [0, 0, 0.0, np.inf, -np.inf, 0, 0])
        w[0] += 1
        w[1] += c
        w[2] += m * c
        w[3] = min(w[3], m - 1)
        w[4] = max(w[4], m + 1)
        w[5] += judged[i]
        w[6] += judged[i] and anomalous[i]
    assert len(site_points(rows, seq)) == len(want)
    assert not {"judged", "anomalous"} & set(site_points(rows, seq).fields)
    pts = site_points(rows, seq, judged, anomalous)
    assert pts.measurement == SITES
    got: dict[tuple[str, str, str, int], list[float]] = {}
    for i in range(len(pts)):
        window = pts.tags["window"][i]
        width = widths[window]
        t = int(pts.time[i])
        s = t - t % width if width < 1000 else t - t % 1000
        assert t - s == seq % min(width, 1000)
        assert pts.tags["gateway"][i] == "gw"
        key = (pts.tags["site"][i], pts.tags["metric"][i], window, s)
        assert key not in got
        got[key] = [float(pts.fields[f][i]) for f in ("devices", "readings", "sum", "min", "max")]
        counted = [pts.fields[f][i] if f in pts.fields else None
                   for f in ("judged", "anomalous")]
        got[key] += [0, 0] if counted == [None, None] else counted
        assert (counted == [None, None]) == (got[key][5] == 0)  # only on judged points
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k][5:] == w[5:]
        assert got[k][:2] == w[:2]
        assert got[k][2] == pytest.approx(w[2], rel=1e-9, abs=1e-6)
        assert got[k][3:] == w[3:]
