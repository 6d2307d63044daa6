"""Anomaly detection on real labelled recordings, with the shipped configuration.

``python -m bench.detect [--data ../shared/data] [--out bench/results/detect]``

Every NAB and SKAB file under the data directory is replayed through the pipeline's own code
(``fieldline.evaluate``: edge decode/validate/windows -> uplink contract -> enrichment ->
detection stage -> alert policy) with ``deploy/gateway.toml`` and ``deploy/cloud.toml`` as
shipped: one configuration for every file, no per-file setting. Reported:

* NAB: the normalised score per profile at the shipped alert threshold (the platform's own
  alerts), and at the one threshold per profile NAB itself would pick over the whole set
  (how NAB's published scores are made), against the published detectors;
* SKAB: point-wise F1 / FAR / MAR (the outlier problem) and the NAB-rule score of the
  changepoint problem (60 s windows right of each changepoint);
* false alarms per 1,000 stream-hours, detection delay in data time;
* the detection stage's speed on 10,000 series (windows/s), against a numpy pass that only
  reads the same columns (the floor no detector can beat);
* the row-level output NAB uses (``timestamp,value,anomaly_score``), one CSV per data file.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import RESULTS, Figure, figure, report
from cloud.config import CloudConfig, load_cloud_config
from cloud.enrich import EnrichedResults
from cloud.partition import build_detection
from cloud.points import aggregate_points
from edge.config import EdgeConfig, load_edge_config
from fieldline.evaluate import (
    Outcome,
    bench_edge_config,
    nab_cases,
    run_recordings,
    skab_cases,
)
from simulators.replay import load_skab
from simulators.scoring import (
    NAB_PROFILES,
    NabFile,
    PointResult,
    changepoint_windows,
    detection_delays,
    nab_best_threshold,
    nab_corpus_score,
    skab_point_score,
)

ROOT = Path(__file__).resolve().parent.parent
REF_MS = 1_767_225_600_000  # recordings are moved by whole weeks to end before 2026-01-01
HOUR_MS = 3_600_000
# published, SCORING.md (NAB: this development subset; SKAB: the whole leaderboard)
NAB_PUBLISHED = {"ARTime": (67.3, 56.3, 73.4), "Numenta HTM": (66.5, 59.4, 70.8),
                 "CAD OSE": (60.0, 56.2, 65.6), "KNN CAD": (54.7, 43.3, 61.0),
                 "Windowed Gaussian": (24.3, 6.8, 31.8)}
SKAB_PUBLISHED = {"Conv-AE": (0.78, 13.55, 28.02), "MSET": (0.78, 39.73, 14.13),
                  "T2+Q (PCA)": (0.76, 26.62, 24.92)}


@dataclass
class NabReport:
    shipped: dict[str, float]
    tuned: dict[str, tuple[float, float]]  # profile -> (score, threshold)
    windows: int
    detected: int
    false_alarms: int
    stream_hours: float
    delays_ms: list[int]


def nab_report(files: list[NabFile], outs: list[Outcome]) -> NabReport:
    scores = [o.score for o in outs]
    shipped = {p: nab_corpus_score(files, scores, 0.5, p).normalised for p in NAB_PROFILES}
    tuned = {}
    for p in NAB_PROFILES:
        b = nab_best_threshold(files, scores, p)
        tuned[p] = (b.normalised, b.threshold)
    std = nab_corpus_score(files, scores, 0.5, "standard")
    hours = sum((int(f.ts[-1]) - int(f.ts[0])) / HOUR_MS for f in files)
    delays = detection_delays(files, [o.score >= 0.5 for o in outs])
    return NabReport(shipped, tuned, std.windows, std.windows_detected,
                     std.false_positive_rows, hours, delays)


@dataclass
class SkabReport:
    points: PointResult
    changepoint_nab: float
    false_alarms: int  # incidents opened outside the labelled fault
    stream_hours: float
    delays_ms: list[int]


def skab_report(cases: list, outs: list[Outcome]) -> SkabReport:  # type: ignore[type-arg]
    total = PointResult(0, 0, 0, 0)
    files, scores, delays = [], [], []
    false_alarms = 0
    hours = 0.0
    for c, o in zip(cases, outs, strict=True):
        total = total + skab_point_score(c.anomaly, o.active)
        f = NabFile.from_times(c.relative, o.ts, changepoint_windows(c.changepoints))
        files.append(f)
        scores.append(o.score)
        opened = np.flatnonzero(o.score > 0)
        false_alarms += int((~c.anomaly[opened]).sum())
        hours += (int(o.ts[-1]) - int(o.ts[0])) / HOUR_MS
        first_label = np.flatnonzero(c.anomaly)
        hit = np.flatnonzero(o.active & c.anomaly)
        if len(first_label) and len(hit):
            delays.append(int(o.ts[hit[0]] - o.ts[first_label[0]]))
    cp = nab_corpus_score(files, scores, 0.5, "standard").normalised
    return SkabReport(total, cp, false_alarms, hours, delays)


def write_rows(out_dir: Path, dataset: str, relative: str, outcome: Outcome,
               extra: np.ndarray | None = None) -> None:
    path = out_dir / dataset / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = outcome.as_csv_rows()
    if extra is not None:  # SKAB: the point-wise outcome as well
        lines = [lines[0] + ",alert"] + [f"{ln},{int(a)}" for ln, a in
                                          zip(lines[1:], extra.tolist(), strict=True)]
    path.write_text("\n".join(lines) + "\n")


def stage_speed(cloud: CloudConfig, series: int = 10_000,
                rounds: int = 60) -> tuple[float, float, float, float]:
    """Windows/s of the configured detection stage, 10,000 series (3,334 devices x 3 metrics),
    one window each per batch, after a warm-up that fills the detectors' histories; and, as the
    reference, of formatting the same windows as InfluxDB line protocol (what the worker does
    with every window anyway). Then the milliseconds of one search for silent series (done at
    most once a minute per gateway) with 600 series and 100 device incidents open, and of one
    batch of the stage, its reference."""
    rng = np.random.default_rng(0)
    devices = -(-series // 3)
    dev = [f"d{i // 3}" for i in range(series)]
    met = [("temperature", "humidity", "co2")[i % 3] for i in range(series)]
    stage = build_detection(cloud)
    base = 20 + rng.normal(0, 3, series)

    def batch(k: int) -> EnrichedResults:
        mean = base + rng.normal(0, 1, series)
        n = series
        return EnrichedResults(
            gateway="gw", device=dev, metric=met, site=["s"] * n, unit=[""] * n,
            window=["10s"] * n, known=np.ones(n, bool),
            start=np.full(n, REF_MS + k * 10_000, np.int64), width=np.full(n, 10_000, np.int64),
            rev=np.zeros(n, np.int64), count=np.full(n, 10, np.int64), sum=mean * 10,
            min=mean - 1, max=mean + 1, mean=mean, std=np.full(n, 0.5), first=mean,
            last=mean, low=np.full(n, np.nan), high=np.full(n, np.nan),
            scale_floor=np.full(n, 0.01), rate=np.zeros(n), pct=np.empty((n, 0)),
            pct_names=[], seq_min=None, seq_max=None, seq_sum=None, primary_window="10s")

    batches = [batch(k) for k in range(rounds + 20)]
    for b in batches[:20]:
        stage.run(b)
    t0 = time.perf_counter()
    for b in batches[20:]:
        stage.run(b)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    for b in batches[20:]:
        aggregate_points(b).lines()
    ref = time.perf_counter() - t1
    del devices
    stage.series_policy.state["incident"][:600] = REF_MS  # open, and not silent
    stage.device_policy.state["incident"][:100] = REF_MS
    now = int(time.time() * 1000)
    t2 = time.perf_counter()
    for _ in range(100):
        assert not stage.resolve_silent("gw", now)
    silence = (time.perf_counter() - t2) / 100
    return rounds * series / dt, rounds * series / ref, silence * 1000, dt / rounds * 1000


def white_noise_alarms(cloud: CloudConfig, series: int = 300, windows: int = 8_000,
                       young: int = 1_000) -> tuple[float, float]:
    """Incidents the shipped stage opens on Gaussian white noise (10 readings a window), per
    series and 1,000 windows: during the first ``young`` windows, and after."""
    rng = np.random.default_rng(7)
    stage = build_detection(cloud)
    dev = [f"n{i // 2}" for i in range(series)]
    met = [("temperature", "humidity")[i % 2] for i in range(series)]
    early = late = 0
    n = series
    for k in range(windows):
        x = rng.normal(0.0, 1.0, (10, n))
        mean = x.mean(axis=0)
        b = EnrichedResults(
            gateway="gw", device=dev, metric=met, site=["s"] * n, unit=[""] * n,
            window=["10s"] * n, known=np.ones(n, bool),
            start=np.full(n, REF_MS + k * 10_000, np.int64), width=np.full(n, 10_000, np.int64),
            rev=np.zeros(n, np.int64), count=np.full(n, 10, np.int64), sum=mean * 10,
            min=x.min(axis=0), max=x.max(axis=0), mean=mean, std=x.std(axis=0, ddof=1),
            first=x[0], last=x[-1], low=np.full(n, np.nan), high=np.full(n, np.nan),
            scale_floor=np.full(n, 0.01), rate=np.zeros(n), pct=np.empty((n, 0)), pct_names=[],
            seq_min=None, seq_max=None, seq_sum=None, primary_window="10s")
        opened = sum(1 for e in stage.run(b).alerts if e.state == "open")
        if k < young:
            early += opened
        else:
            late += opened
    return (1000 * early / (series * young), 1000 * late / (series * (windows - young)))


def clean_run_alarms(skab: Path, edge: EdgeConfig,
                     cloud: CloudConfig) -> tuple[float, float, str] | None:
    """Incidents opened on SKAB's anomaly-free run (the pump with no fault: every alert is a
    false one), the real-data counterpart of the white-noise figures: per series and 1,000
    windows of the primary spec, during the run's first hour and after it; and a note."""
    paths = sorted((skab / "data" / "anomaly-free").glob("*.csv"))
    if not paths:
        return None
    recs = [load_skab(skab, f"anomaly-free/{p.name}") for p in paths]
    outs = run_recordings(recs, edge, cloud, ref_ms=REF_MS)
    width = edge.engine.windows[0].size_ms or 10_000  # (a session or count spec: 10 s)
    early = late = 0
    early_w = late_w = 0.0
    for rec, o in zip(recs, outs, strict=True):
        series = len({m for _, values in rec.rows for m in values})
        start, end = int(o.ts[0]) + o.shift_ms, int(o.ts[-1]) + o.shift_ms
        first = min(end - start, HOUR_MS)
        early_w += series * first / width
        late_w += series * (end - start - first) / width
        for _, e in o.alerts:
            if e.state == "open":
                if e.incident - start < HOUR_MS:
                    early += 1
                else:
                    late += 1
    hours = sum((int(o.ts[-1]) - int(o.ts[0])) / HOUR_MS for o in outs)
    note = (f"{early + late} incidents on {len(paths)} run(s), {hours:.1f} h, "
            f"{early} in the first hour")
    return (1000 * early / max(early_w, 1.0), 1000 * late / max(late_w, 1.0), note)


def river_figures(data: Path, cloud: CloudConfig) -> list[Figure]:
    """River's online detectors on the same recordings (``bench.river_compare``)."""
    try:
        from bench import river_compare
    except ImportError:  # pragma: no cover - river is in the bench extra
        print("river is not installed: no comparison (pip install '.[bench]')")
        return []
    try:
        import river  # noqa: F401
    except ImportError:
        print("river is not installed: no comparison (pip install '.[bench]')")
        return []
    out: list[Figure] = []
    if (data / "nab" / "labels").is_dir():
        cases = nab_cases(data / "nab")
        files = [c.nab_file() for c in cases]
        values = [np.array([v["value"] for _, v in c.recording.rows]) for c in cases]
        for name, r in river_compare.compare_nab(files, values, cloud.alerts).items():
            out.append(figure(f"River {name}: NAB standard (its best threshold)",
                              r["nab_standard"], "score"))
            out.append(figure(f"River {name}: windows/s, one model, one stream",
                              r["windows_per_s"], "windows/s"))
    if (data / "skab" / "data").is_dir():
        labels, rows, where = [], [], []
        for c in skab_cases(data / "skab"):
            t = np.array([r[0] for r in c.recording.rows], np.int64)
            win = (t - t[0]) // 10_000
            uniq, inv = np.unique(win, return_inverse=True)
            feats = []
            for k in range(len(uniq)):
                members = np.flatnonzero(inv == k)
                names = c.recording.rows[int(members[0])][1].keys()
                feats.append({m: float(np.mean([c.recording.rows[int(i)][1][m]
                                                 for i in members])) for m in names})
            labels.append(c.anomaly)
            rows.append(feats)
            where.append(inv.reshape(-1))
        for name, r in river_compare.compare_skab(labels, rows, where, cloud.alerts).items():
            out.append(figure(f"River {name}: SKAB F1 (its best threshold)", r["skab_f1"], "F1",
                              note=f"FAR {100 * r['skab_far']:.1f} %, MAR "
                                   f"{100 * r['skab_mar']:.1f} %"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                    help="a directory with nab/ and/or skab/ laid out as ../shared/data")
    ap.add_argument("--out", type=Path, default=RESULTS / "detect",
                    help="where the row-level results go")
    ap.add_argument("--gateway", type=Path, default=ROOT / "deploy" / "gateway.toml")
    ap.add_argument("--cloud", type=Path, default=ROOT / "deploy" / "cloud.toml")
    ap.add_argument("--no-river", dest="river", action="store_false",
                    help="skip the comparison with River's detectors (slow: minutes)")
    args = ap.parse_args(argv)
    edge = bench_edge_config(load_edge_config(args.gateway))
    cloud = load_cloud_config(args.cloud)
    figures: list[Figure] = []
    summary: dict[str, object] = {"data": str(args.data), "gateway": str(args.gateway),
                                  "cloud": str(args.cloud)}
    nab_dir, skab_dir = args.data / "nab", args.data / "skab"
    if (nab_dir / "labels").is_dir():
        t0 = time.perf_counter()
        cases = nab_cases(nab_dir)
        outs = run_recordings([c.recording for c in cases], edge, cloud, ref_ms=REF_MS)
        for c, o in zip(cases, outs, strict=True):
            write_rows(args.out, "nab", c.relative, o)
        r = nab_report([c.nab_file() for c in cases], outs)
        took = time.perf_counter() - t0
        for k, p in enumerate(NAB_PROFILES):
            best = max(v[k] for v in NAB_PUBLISHED.values())
            figures.append(figure(f"NAB {p}, shipped threshold", r.shipped[p], "score", best,
                                  "best published on the development subset"))
            figures.append(figure(f"NAB {p}, NAB's one threshold for the set", r.tuned[p][0],
                                  "score", best, "best published",
                                  note=f"threshold {r.tuned[p][1]:.3f}"))
        figures.append(figure("NAB windows detected (shipped)", r.detected, "windows",
                              note=f"of {r.windows}"))
        figures.append(figure("NAB false alarms per 1,000 stream-hours",
                              1000 * r.false_alarms / r.stream_hours, "alarms",
                              note=f"{r.false_alarms} in {r.stream_hours:,.0f} h"))
        if r.delays_ms:
            d = np.array(r.delays_ms) / HOUR_MS
            figures.append(figure("NAB detection delay after the labelled instant, median",
                                  float(np.median(d)), "h (data time)",
                                  note=f"p90 {np.percentile(d, 90):.1f} h; negative: early"))
        summary["nab"] = {"files": len(cases), "seconds": took, "shipped": r.shipped,
                          "tuned": r.tuned, "windows": r.windows, "detected": r.detected,
                          "false_alarms": r.false_alarms, "stream_hours": r.stream_hours}
    if (skab_dir / "data").is_dir():
        cases_s = skab_cases(skab_dir)
        outs_s = run_recordings([c.recording for c in cases_s], edge, cloud, ref_ms=REF_MS)
        for c, o in zip(cases_s, outs_s, strict=True):
            write_rows(args.out, "skab", c.relative, o, extra=o.active)
        s = skab_report(cases_s, outs_s)
        conv = SKAB_PUBLISHED["Conv-AE"]
        figures.append(figure("SKAB point-wise F1", s.points.f1, "F1", conv[0],
                              "Conv-AE (published)"))
        figures.append(figure("SKAB false-alarm rate", 100 * s.points.far, "%", conv[1],
                              "Conv-AE"))
        figures.append(figure("SKAB missed-alarm rate", 100 * s.points.mar, "%", conv[2],
                              "Conv-AE"))
        figures.append(figure("SKAB changepoints, NAB standard", s.changepoint_nab, "score",
                              23.61, "Conv-AE"))
        figures.append(figure("SKAB false alarms per 1,000 stream-hours",
                              1000 * s.false_alarms / s.stream_hours, "alarms",
                              note=f"{s.false_alarms} in {s.stream_hours:.1f} h"))
        if s.delays_ms:
            d = np.array(s.delays_ms) / 1000
            figures.append(figure("SKAB detection delay after the fault starts, median",
                                  float(np.median(d)), "s (data time)",
                                  note=f"p90 {np.percentile(d, 90):.0f} s"))
        clean = clean_run_alarms(skab_dir, edge, cloud)
        if clean is not None:
            figures.append(figure("alerts on SKAB's anomaly-free run, its first hour", clean[0],
                                  "per series and 1,000 windows", note=clean[2]))
            figures.append(figure("alerts on SKAB's anomaly-free run, after that", clean[1],
                                  "per series and 1,000 windows"))
        summary["skab"] = {"files": len(cases_s), "tp": s.points.tp, "fp": s.points.fp,
                           "fn": s.points.fn, "tn": s.points.tn, "f1": s.points.f1,
                           "far": s.points.far, "mar": s.points.mar,
                           "changepoint_nab": s.changepoint_nab}
    river = river_figures(args.data, cloud) if args.river else []
    figures += river
    early, late = white_noise_alarms(cloud)
    figures.append(figure("alerts on white noise, first 1,000 windows of a series", early,
                          "per series and 1,000 windows"))
    figures.append(figure("alerts on white noise, after that", late,
                          "per series and 1,000 windows",
                          note=f"10 s windows: one alert per series every "
                               f"{10_000 / max(late, 1e-9) / 3600:,.1f} h"))
    fast, ref, silence_ms, batch_ms = stage_speed(cloud)
    figures.append(figure("detection stage, shipped detectors, 10,000 series", fast,
                          "windows/s", ref, "line protocol for the same windows"))
    figures.append(figure("a search for silent series, 10,000 series, 700 incidents open",
                          silence_ms, "ms", batch_ms, "one batch of them through the stage",
                          note="at most once a minute per gateway"))
    report("detect", figures)
    (args.out / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
