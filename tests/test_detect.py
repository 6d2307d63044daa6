"""The detector framework: one contract suite over every registered detector, then what each
detector is for, and the alert policy."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud.detect import DETECTORS, AlertEvent, PolicyConfig, build_stage
from cloud.detect.policy import AlertPolicy
from cloud.detect.robust import robust_scale
from cloud.detect.stage import DetectionStage, rounds, subject_of, write_snapshot
from tests.detectkit import T0, Win, noisy_fleet, rows

WIDTH = 300_000
FLEET = noisy_fleet(1300, seed=3, width=WIDTH)  # 4.5 days of 5-minute windows, 3 x 3 series
SMALL = {  # options that let every detector speak within the test stream
    "novelty": {"history": 600, "blocks": 8, "min_history": 60},
    "seasonal": {"history": 600, "blocks": 8, "min_history": 30, "memory_days": 2.0},
    "spike": {"history": 60, "min_history": 20},
    "shift": {"min_history": 30},
    "stuck": {"windows": 15, "min_history": 60},
    "multivariate": {"min_history": 60, "memory": 500},
}


PLAIN = PolicyConfig(likelihood=0.0)  # detectors alone; the policy has tests of its own


def stage_of(name: str) -> DetectionStage:
    # the worker's clock, which only says when a series was last seen (for forgetting), held
    # still: states are compared array by array
    return build_stage([name], SMALL, policy=PLAIN, clock=lambda: T0 / 1000)


def drive(stage: DetectionStage, batches: list[list[Win]]
          ) -> tuple[dict[tuple[str, str, int], float], set[tuple[object, ...]]]:
    """Severity per (device, metric, start) and every alert event, by identity."""
    sev: dict[tuple[str, str, int], float] = {}
    alerts: set[tuple[object, ...]] = set()
    for b in batches:
        r = rows(b, width=WIDTH)
        det = stage.run(r)
        for i in range(len(r)):
            s = float(det.severity[i])
            if not math.isnan(s):
                sev[(r.device[i], r.metric[i], int(r.start[i]))] = s
        for e in det.alerts:
            _, device, metric, _ = subject_of(r, e)
            alerts.add((device, metric if e.level == "series" else "*",
                        e.name, e.state, e.incident, e.until, round(e.severity, 9)))
    return sev, alerts


def chunks(windows: list[list[Win]], sizes: list[int]) -> list[list[Win]]:
    """The same stream cut into batches of ``sizes`` window times (cycled)."""
    out, i, k = [], 0, 0
    while i < len(windows):
        step = sizes[k % len(sizes)]
        out.append([w for ws in windows[i:i + step] for w in ws])
        i += step
        k += 1
    return out


# ---- the contract suite: every registered detector ----------------------------------------


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_batch_cut_does_not_change_the_result(name: str) -> None:
    one = drive(stage_of(name), chunks(FLEET, [1]))
    cut = drive(stage_of(name), chunks(FLEET, [7, 1, 30, 3, 120]))
    assert one[0] == cut[0]
    assert one[1] == cut[1]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_detector_speaks_on_the_faults_and_stays_finite(name: str) -> None:
    sev, alerts = drive(stage_of(name), chunks(FLEET, [10]))
    values = np.array(list(sev.values()))
    assert np.isfinite(values).all()
    assert (values >= 0).all()
    if name != "threshold":  # the fleet has no registry limits
        assert values.max() >= 1.0, f"{name} never reached its threshold on the faults"
        assert alerts


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_snapshot_and_restore_give_identical_output(name: str) -> None:
    half = len(FLEET) // 2
    first, second = chunks(FLEET[:half], [5]), chunks(FLEET[half:], [5])
    straight = stage_of(name)
    drive(straight, first)
    snap = straight.snapshot()
    restored = stage_of(name)
    restored.restore(snap)
    assert drive(straight, second) == drive(restored, second)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_a_revision_replaces_rather_than_adds(name: str) -> None:
    """Re-sent windows (revisions, with other values) are judged, never learned twice: the
    state, and everything judged after, is as if they had not come."""
    plain = stage_of(name)
    revised = stage_of(name)
    batches = chunks(FLEET, [10])
    for k, b in enumerate(batches):
        drive(plain, [b])
        drive(revised, [b])
        if k % 3 == 1:  # revisions of windows already learned, values moved
            drive(revised, [[replace(w, rev=1, mean=w.mean + 0.7) for w in batches[k - 1]]])
    a, b = plain.snapshot(), revised.snapshot()
    assert a["series"] == b["series"]
    for key, arr in a["arrays"].items():
        np.testing.assert_array_equal(arr, b["arrays"][key], err_msg=key)


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_contract_nan_and_empty_windows_are_skipped(name: str) -> None:
    clean = stage_of(name)
    dirty = stage_of(name)
    batches = chunks(FLEET[:400], [4])
    for k, b in enumerate(batches):
        drive(clean, [b])
        junk = [replace(b[0], mean=float("nan"), lo=float("nan"), hi=float("nan")),
                replace(b[1], count=0, metric="b"), replace(b[2], mean=float("inf"))]
        sev, _ = drive(dirty, [b + junk] if k % 5 == 0 else [b])
        assert all(math.isfinite(v) for v in sev.values())
    a, b_ = clean.snapshot(), dirty.snapshot()
    for key, arr in a["arrays"].items():
        np.testing.assert_array_equal(arr, b_["arrays"][key], err_msg=key)
    assert dirty.counters["windows_not_finite"] > 0


def test_rounds_take_several_windows_of_one_series_oldest_first() -> None:
    key = np.array([5, 5, 7, 5], np.int64)
    start = np.array([30, 10, 10, 20], np.int64)
    assert [r.tolist() for r in rounds(key, start)] == [[1, 2], [3], [0]]


# ---- what each detector is for ------------------------------------------------------------


def series(values: list[float], *, device: str = "d", metric: str = "m",
           spreads: list[float] | None = None, his: list[float] | None = None) -> list[list[Win]]:
    out = []
    for k, v in enumerate(values):
        spread = spreads[k] if spreads else 1.0
        hi = his[k] if his else None
        out.append([Win(device, metric, T0 + k * WIDTH, v, spread=spread, hi=hi)])
    return out


def alerts_of(name: str, values: list[float], **kw: object) -> list[tuple[object, ...]]:
    _, alerts = drive(build_stage([name], SMALL, policy=PLAIN),
                      series(values, **kw))  # type: ignore[arg-type]
    return sorted(alerts, key=lambda a: (a[4], a[3]))  # type: ignore[arg-type,return-value]


def cycle(n: int, seed: int, noise: float = 0.05) -> list[float]:
    """A periodic signal (period 50 windows) with a little noise: once a period has been seen,
    nothing in it is new."""
    rng = np.random.default_rng(seed)
    k = np.arange(n)
    return list(50 + 2 * np.sin(2 * np.pi * k / 50) + rng.uniform(-noise, noise, n))


def test_novelty_fires_once_on_a_new_extreme_and_not_on_its_repetition() -> None:
    v = cycle(900, 1)
    v[600] = 80.0  # new
    v[800] = 79.0  # as high as what the history already holds: not new
    got = alerts_of("novelty", v)
    opened = [a[4] for a in got if a[3] == "open" and a[4] >= T0 + 400 * WIDTH]  # type: ignore[operator]
    assert opened == [T0 + 600 * WIDTH]


def test_novelty_holds_a_lasting_change_and_lets_a_spike_go() -> None:
    """A spike's incident resolves with the next windows; a level that moves out of the range
    keeps its incident open while it stays out (up to ``hold`` windows)."""
    base = cycle(700, 3)
    spike = base.copy()
    spike[600] = 80.0
    got = alerts_of("novelty", spike)
    span = [(a[4], a[5]) for a in got if a[3] == "resolved" and a[4] == T0 + 600 * WIDTH]
    assert span
    assert span[0][1] <= T0 + 602 * WIDTH
    moved = base[:600] + [x + 10 for x in base[600:]]
    got = alerts_of("novelty", moved)
    opened = [a for a in got if a[3] == "open" and a[4] >= T0 + 400 * WIDTH]  # type: ignore[operator]
    assert [a[4] for a in opened] == [T0 + 600 * WIDTH]
    resolved = [a for a in got if a[3] == "resolved" and a[4] == T0 + 600 * WIDTH]
    assert resolved
    assert resolved[0][5] >= T0 + 615 * WIDTH


def test_novelty_sees_a_level_shift_inside_the_usual_range() -> None:
    """A noisy series whose level moves by less than its window-to-window noise: single windows
    stay in range, the smoothed level does not."""
    pattern = [3.1, -4.0, 0.5, 4.8, -2.2, 1.7, -4.9, 2.9, -0.8, -1.1]  # repeats: nothing new
    v = [50 + pattern[k % 10] for k in range(700)] + [
        51.5 + pattern[k % 10] * 0.7 for k in range(100)]  # the level moves, values stay in range
    opened = [a for a in alerts_of("novelty", v) if a[3] == "open"
              and a[4] >= T0 + 400 * WIDTH]  # type: ignore[operator]
    assert opened
    assert all(a[4] >= T0 + 700 * WIDTH for a in opened)


def test_spike_scale_floor_on_quantised_flat_data() -> None:
    """Mostly equal values stepping by one quantum: MAD 0, yet a one-quantum excursion scores
    low and a twenty-quantum one high."""
    ring = np.full((1, 60), 0.0)
    ring[0, ::7] = 0.5  # excursions of one quantum now and then
    _, scale = robust_scale(ring, np.array([1e-6]))
    assert scale[0] >= 0.5
    flat = [10.0] * 300
    his = [10.0] * 300
    for k in range(0, 300, 9):
        his[k] = 10.5  # one quantum
    his[250] = 20.0  # twenty quanta
    opened = [a for a in alerts_of("spike", flat, spreads=[0.0] * 300, his=his)
              if a[3] == "open"]
    assert [a[4] for a in opened] == [T0 + 250 * WIDTH]


def test_seasonal_baseline_sees_a_missing_peak_and_ignores_replay_shift_by_weeks() -> None:
    rng = np.random.default_rng(4)
    width = 600_000  # 10-minute windows, 144 a day
    days = 9
    vals = []
    for k in range(days * 144):
        t = T0 + k * width
        phase = (t % 86_400_000) / 86_400_000
        peak = 30.0 if 0.4 < phase < 0.6 else 0.0
        if k // 144 == 7 and peak:
            peak = 0.0  # day 8: the daily peak does not come
        vals.append(10 + peak + rng.normal(0, 0.5))

    def run(shift: int) -> list[tuple[object, ...]]:
        st = build_stage(["seasonal"], SMALL, policy=PLAIN)
        out = []
        for k, v in enumerate(vals):
            r = rows([Win("d", "m", T0 + shift + k * width, v)], width=width, window="10m")
            out += [(e.state, e.incident - shift) for e in st.run(r).alerts]
        return out

    got = run(0)
    opened = [t for s, t in got if s == "open"]
    assert opened, "the missing peak was not seen"
    assert all(T0 + 7 * 86_400_000 <= t < T0 + 8 * 86_400_000 for t in opened)  # type: ignore[operator]
    assert run(3 * 7 * 86_400_000) == got  # data time: three weeks later, same slots


def test_stuck_sensor_is_reported_but_a_naturally_flat_one_is_not() -> None:
    rng = np.random.default_rng(5)
    v = list(20 + rng.normal(0, 1, 200)) + [20.0] * 40 + list(20 + rng.normal(0, 1, 40))
    spreads = [1.0] * 200 + [0.0] * 40 + [1.0] * 40
    opened = [a for a in alerts_of("stuck", v, spreads=spreads) if a[3] == "open"]
    assert [a[4] for a in opened] == [T0 + (200 + 14) * WIDTH]
    assert alerts_of("stuck", [0.0] * 300, spreads=[0.0] * 300) == []


def test_shift_detects_a_sustained_small_shift_not_the_noise() -> None:
    rng = np.random.default_rng(6)
    noise = list(rng.normal(0, 1, 300))
    assert [a for a in alerts_of("shift", noise) if a[3] == "open"] == []
    shifted = noise[:200] + [x + 1.5 for x in noise[200:]]
    opened = [a for a in alerts_of("shift", shifted) if a[3] == "open"]
    assert opened
    assert T0 + 200 * WIDTH <= opened[0][4] <= T0 + 230 * WIDTH


def test_multivariate_sees_a_broken_relation_each_sensor_alone_does_not() -> None:
    rng = np.random.default_rng(7)
    batches = []
    for k in range(400):
        base = 20 + 5 * math.sin(k / 15) + rng.normal(0, 0.2)
        a = base + rng.normal(0, 0.1)
        b = 2 * base + rng.normal(0, 0.1)
        if 300 <= k < 330:
            b = 2 * (40 - base)  # inside b's range, against a
        t = T0 + k * WIDTH
        batches.append([Win("pump", "a", t, a), Win("pump", "b", t, b)])
    st = build_stage(["novelty", "multivariate"], SMALL, policy=PLAIN)
    _, alerts = drive(st, batches)
    device = sorted(a for a in alerts if a[1] == "*" and a[3] == "open")
    assert device
    assert T0 + 300 * WIDTH <= device[0][4] <= T0 + 305 * WIDTH
    resolved = [a for a in alerts if a[1] == "*" and a[3] == "resolved"]
    assert resolved
    assert all(a[5] <= T0 + 336 * WIDTH for a in resolved)


def test_threshold_uses_registry_limits() -> None:
    st = build_stage(["threshold"], {}, policy=PLAIN)
    r = rows([Win("d", "m", T0, 30.0, high=45.0), Win("d", "m", T0 + WIDTH, 50.0, hi=50.0,
                                                     high=45.0)])
    det = st.run(r)
    assert [(a.row, a.direction, a.value) for a in det.anomalies] == [(1, "high", 50.0)]


# ---- the alert policy ---------------------------------------------------------------------


def step_all(policy: AlertPolicy, sev: list[float]) -> list[tuple[int, bool, bool]]:
    out = []
    for k, s in enumerate(sev):
        ps = policy.step(np.array([0]), np.array([k]), np.array([s]), np.array([0]))
        out.append((int(ps.incident[0]), bool(ps.opened[0]), bool(ps.resolved[0])))
    return out


def test_policy_opens_once_holds_with_hysteresis_and_resolves() -> None:
    p = AlertPolicy(PolicyConfig(open_at=1.0, hold_at=0.5, clear=2, suppress=0, likelihood=0))
    got = step_all(p, [0, 1.2, 0.6, 0.9, 0.4, 0.6, 0.1, 0.1, 0.2])
    assert [o for _, o, _ in got] == [False, True] + [False] * 7
    assert [r for _, _, r in got] == [False] * 7 + [True, False]
    assert {i for i, _, _ in got[1:8]} == {1}  # one incident, identified by its first window


def test_policy_suppresses_a_new_incident_right_after_one_resolved() -> None:
    p = AlertPolicy(PolicyConfig(clear=1, suppress=5, likelihood=0))
    got = step_all(p, [2, 0, 2, 0, 0, 0, 0, 2, 0])
    assert [k for k, (_, o, _) in enumerate(got) if o] == [0, 7]


def test_policy_likelihood_quietens_a_subject_that_is_always_over_threshold() -> None:
    """The same severity opens an incident on a quiet series, not on one that crosses its
    threshold all the time: what is unusual is judged against the subject's own past."""
    quiet = [0.0] * 300 + [2.0]
    noisy = [1.5 + 0.5 * math.sin(k) for k in range(300)] + [2.0]
    cfg = PolicyConfig(clear=1, suppress=0, likelihood=3.0)
    assert step_all(AlertPolicy(cfg), quiet)[-1][1]
    got = step_all(AlertPolicy(cfg), noisy)
    assert not got[-1][1]
    assert sum(o for _, o, _ in got[50:]) == 0  # after learning what is usual, silence


def test_stuck_fault_is_one_alert_not_one_per_window() -> None:
    v = [float(x) for x in np.random.default_rng(8).normal(0, 1, 300)] + [0.0] * 200
    opened = [a for a in alerts_of("stuck", v, spreads=[1.0] * 300 + [0.0] * 200)
              if a[3] == "open"]
    assert len(opened) == 1


def test_river_bench_policy_loop_agrees_with_the_policy() -> None:
    """bench/river_compare.py replays the alert policy as a plain loop (one series, many
    thresholds): it must make the same incidents as AlertPolicy."""
    from bench.river_compare import _policy_runs

    rng = np.random.default_rng(9)
    sev = np.where(rng.random(3000) < 0.03, rng.uniform(0, 3, 3000), rng.uniform(0, 0.7, 3000))
    cfg = PolicyConfig(clear=3, suppress=20, likelihood=0.0)
    opened, active = _policy_runs(sev, 1.0, cfg)
    p = AlertPolicy(cfg)
    for k, s in enumerate(sev.tolist()):
        st = p.step(np.array([0]), np.array([k]), np.array([s]), np.array([0]))
        assert bool(st.opened[0]) == opened[k]
        assert (int(st.incident[0]) != np.iinfo(np.int64).min) == active[k]


def test_detector_state_survives_a_restart_through_a_file(tmp_path: Path) -> None:
    """What a cloud worker writes to its state_dir at stop (and every few minutes) brings the
    detectors back exactly; a file written by other detectors is refused, not half-loaded."""
    half = len(FLEET) // 2
    first, second = chunks(FLEET[:half], [5]), chunks(FLEET[half:], [5])
    names = ["novelty", "seasonal", "spike", "multivariate"]
    straight = build_stage(names, SMALL)
    drive(straight, first)
    straight.save(tmp_path / "detect.npz")
    restarted = build_stage(names, SMALL)
    assert restarted.load(tmp_path / "detect.npz")
    assert drive(straight, second) == drive(restarted, second)
    other = build_stage(["novelty"], {"novelty": {"blocks": 4, "history": 400}})
    assert not other.load(tmp_path / "detect.npz")
    assert len(other.series) == 0
    assert not other.load(tmp_path / "absent.npz")


SMALL_FLEET = noisy_fleet(500, seed=11, width=WIDTH, devices=2)
SHIPPED = ["threshold", "spike", "novelty", "seasonal", "stuck", "multivariate"]
BASELINE = drive(build_stage(SHIPPED, SMALL), chunks(SMALL_FLEET, [1]))


@settings(max_examples=12, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8))
def test_property_any_batch_cut_gives_the_same_detections(sizes: list[int]) -> None:
    """The shipped ensemble with the shipped policy: whatever the batch boundaries (an outage
    that buffers minutes, a busy tick), the same severities and the same incidents."""
    assert drive(build_stage(SHIPPED, SMALL), chunks(SMALL_FLEET, sizes)) == BASELINE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=300),
       st.integers(1, 5), st.integers(0, 30), st.floats(0.1, 1.0))
def test_property_policy_incidents(sev: list[float], clear: int, suppress: int,
                                   hold: float) -> None:
    """Incidents open only at open_at, never overlap, resolve after ``clear`` quiet windows and
    keep ``suppress`` windows apart; each is identified by the window that opened it."""
    cfg = PolicyConfig(open_at=1.0, hold_at=hold, clear=clear, suppress=suppress,
                       likelihood=0.0)
    got = step_all(AlertPolicy(cfg), sev)
    is_open, quiet, last_resolved = False, 0, -10**9
    for k, (incident, opened_here, resolved_here) in enumerate(got):
        if opened_here:
            assert not is_open
            assert sev[k] >= 1.0
            assert k - last_resolved > suppress
            assert incident == k
            is_open, quiet = True, 0
        elif is_open:
            quiet = 0 if sev[k] >= hold else quiet + 1
        assert resolved_here == (is_open and not opened_here and quiet >= clear)
        if resolved_here:
            is_open, last_resolved = False, k
        if is_open or resolved_here:
            assert incident >= 0


def test_an_on_off_state_alerts_on_its_limits_not_on_every_change(tmp_path: Path) -> None:
    """A door contact or a leak sensor reads 1 and 0: its window means jump between them at
    every change, which the detectors of quantities took for spikes and new extremes (in a
    /tmp experiment with the shipped detectors, 37 alerts for 46 door openings in 4 days).
    Such a series is left to its limits (a leak sensor's high = 0.5 alerts once wet); its
    device's other metrics, and a series that reads 0 and 1 only at first, are judged as
    before. A detector snapshot from before keeps judging every series it holds."""
    rng = np.random.default_rng(5)
    door = np.zeros(400 * 10, bool)
    for s in rng.choice(400 * 10 - 60, 12, replace=False):
        door[s:s + int(rng.integers(5, 40))] = True
    leak = np.zeros(400 * 10, bool)
    leak[2500:2600] = True
    fleet = []
    for k in range(400):
        d, w = door[k * 10:(k + 1) * 10], leak[k * 10:(k + 1) * 10]
        fleet.append([
            Win("door-1", "contact", T0 + k * WIDTH, float(d.mean()), lo=float(d.min()),
                hi=float(d.max())),
            Win("door-1", "battery", T0 + k * WIDTH, 90 + float(rng.normal(0, 0.2))),
            Win("leak-1", "water_leak", T0 + k * WIDTH, float(w.mean()), lo=float(w.min()),
                hi=float(w.max()), high=0.5),
            # a quantity that idles at 0: judged from its first window with another extreme
            Win("flow-1", "flow", T0 + k * WIDTH, 0.0 if k < 100 else
                (5.0 + float(rng.normal(0, 0.1)) if k != 360 else 50.0))])
    stage = build_stage(SHIPPED, SMALL)
    _, alerts = drive(stage, chunks(fleet[:300], [1]))
    opened = {(a[0], a[1], a[2]) for a in alerts if a[3] == "open" and a[0] != "flow-1"}
    assert int((np.diff(door.astype(int)) == 1).sum()) >= 10  # the door opened, often
    assert opened == {("leak-1", "water_leak", "threshold")}
    stage.save(tmp_path / "detect.npz")
    restarted = build_stage(SHIPPED, SMALL)
    assert restarted.load(tmp_path / "detect.npz")
    _, later = drive(restarted, chunks(fleet[300:], [1]))
    assert ("flow-1", "flow", "open") in {(a[0], a[1], a[3]) for a in later}
    assert not {a for a in later if a[1] == "contact" and a[3] == "open"}
    # a snapshot without the marks (written before): every series judged, as it was then
    snap = stage.snapshot()
    del snap["arrays"]["marks.on_off"]
    old = build_stage(SHIPPED, SMALL)
    old.restore(snap)
    assert not old.on_off["on_off"][: len(old.series)].any()


def test_a_change_of_a_few_steps_of_the_sensor_is_no_anomaly_a_larger_one_is() -> None:
    """A room thermometer in 0.1 degC steps wandering 0.3 degC over hours: in its first hours each
    new high or low by a step is a record the detectors of quantities flag. A verdict within
    ``resolution_steps`` steps of the series' own resolution (learned from its readings) is no
    anomaly; a 3 degC step of the same series, and a sensor stuck at one value, still are; so
    is a burst of a series of few levels (0 or 20), whose step is what it has to say, and the
    failure of a battery whose single steps down (97, 96, ... far from zero) are none. A
    series without a grid (continuous readings) learns a tiny step: its metric's
    ``min_change`` is what keeps its wandering quiet."""
    rng = np.random.default_rng(11)
    fleet = []
    for k in range(400):
        drift = 21.0 + 0.3 * math.sin(k / 60) + 0.1 * ((k * 7919) % 5 - 2)
        jump = 3.0 if 300 <= k < 330 else 0.0
        fleet.append([Win("room-1", "temperature", T0 + k * WIDTH, round(drift, 1) + jump,
                          spread=0.2),
                      Win("room-2", "temperature", T0 + k * WIDTH,
                          21.0 + 0.1 * ((k * 31) % 7) if k < 200 else 21.4,
                          spread=0.2 if k < 200 else 0.0),
                      Win("room-3", "temperature", T0 + k * WIDTH,
                          drift + float(rng.normal(0, 0.01)) + jump, spread=0.2037),
                      Win("pump-1", "starts", T0 + k * WIDTH,
                          12.0 if jump else 2.0 if k % 40 == 5 else 0.0,
                          lo=0.0, hi=20.0 if jump or k % 40 == 5 else 0.0),
                      # a battery in whole percent losing one every 60 windows, failing at 300
                      Win("door-1", "battery", T0 + k * WIDTH,
                          70.0 if jump else 97.0 - k // 60, spread=0.0)])

    def opened(steps: float, min_change: dict[str, float] | None = None
               ) -> set[tuple[object, ...]]:
        stage = build_stage(SHIPPED, SMALL, policy=PLAIN, min_change=min_change,
                            resolution_steps=steps)
        _, alerts = drive(stage, chunks(fleet, [1]))
        return {(a[0], a[2], a[5] // WIDTH * WIDTH) for a in alerts if a[3] == "open"}

    def early(alerts: set[tuple[object, ...]], device: str) -> list[tuple[object, ...]]:
        return [a for a in alerts if a[0] == device and a[2] < T0 + 300 * WIDTH]  # type: ignore[operator]

    def only_at_the_jump(alerts: set[tuple[object, ...]], device: str) -> None:
        got = [a for a in alerts if a[0] == device]
        assert got, device
        assert all(T0 + 300 * WIDTH <= a[2] < T0 + 331 * WIDTH for a in got), got  # type: ignore[operator]

    bare = opened(0)
    assert early(bare, "room-1")  # a drift's record by a step
    assert early(bare, "room-3")
    shipped = opened(3)
    only_at_the_jump(shipped, "room-1")
    assert ("room-2", "stuck") in {(a[0], a[1]) for a in shipped}
    assert [a for a in shipped if a[0] == "room-3" and a[2] >= T0 + 300 * WIDTH]  # type: ignore[operator]
    # a series of few levels (readings of 0 or 20): its step is its signal, not a resolution
    only_at_the_jump(shipped, "pump-1")
    # a fine measurement far from zero: its first steps down are no anomaly, its failure is
    assert early(bare, "door-1")
    only_at_the_jump(shipped, "door-1")
    floored = opened(3, {"temperature": 0.5})
    assert not early(floored, "room-3")
    assert [a for a in floored if a[0] == "room-3"]  # its jump
    # the resolutions ride in the snapshot; one from before them learns them anew
    stage = build_stage(SHIPPED, SMALL, policy=PLAIN)
    drive(stage, chunks(fleet[:100], [1]))
    snap = stage.snapshot()
    assert math.isclose(float(snap["arrays"]["grain.step"][0]), 0.1)  # room-1's 0.1 degC
    for key in ("grain.step", "grain.lo", "grain.hi", "grain.least", "grain.most"):
        del snap["arrays"][key]
    old = build_stage(SHIPPED, SMALL, policy=PLAIN)
    old.restore(snap)
    assert np.isinf(old.grain["step"][: len(old.series)]).all()
    drive(old, chunks(fleet[100:110], [1]))
    assert math.isclose(float(old.grain["step"][0]), 0.1)


def churned(windows: list[list[Win]], *, gone_after: int, back_at: int) -> list[list[Win]]:
    """The fleet plus two devices that stop after ``gone_after`` window times (replaced
    sensors, tags that left); one of them ("old-1") comes back at ``back_at``."""
    out = []
    for k, ws in enumerate(windows):
        extra = []
        for d in ("old-0", "old-1"):
            if k < gone_after or (d == "old-1" and k >= back_at):
                extra += [Win(d, w.metric, w.start, w.mean + 3, spread=w.spread)
                          for w in ws if w.device == "dev0"]
        out.append(extra + ws)  # first seen: their ids come before the fleet's
    return out


def only(result: tuple[dict[tuple[str, str, int], float], set[tuple[object, ...]]],
         keep: Callable[[str, int], bool]
         ) -> tuple[dict[tuple[str, str, int], float], set[tuple[object, ...]]]:
    sev, alerts = result
    return ({k: v for k, v in sev.items() if keep(k[0], k[2])},
            {a for a in alerts if keep(str(a[0]), int(a[4]))})  # type: ignore[call-overload]


def test_series_silent_past_forget_after_are_forgotten_and_the_rest_continue_exactly() -> None:
    """Device ids churn. A series with no window for ``forget_after`` of the worker's time is
    forgotten with its device (its state, ~9 KB a series with the shipped detectors, would
    otherwise stay for good, in memory and in every snapshot); the other series continue
    exactly as in a stage that never forgets, and one that comes back starts afresh, as a
    device never seen."""
    stream = churned(FLEET, gone_after=300, back_at=900)
    batches = chunks(stream, [5])
    hour = 3_600_000
    now = [T0 / 1000]

    def clock() -> float:
        return now[0]

    forgetful = build_stage(SHIPPED, SMALL, forget_after_ms=48 * hour, clock=clock)
    keeper = build_stage(SHIPPED, SMALL, forget_after_ms=0)
    sizes = []
    got_f: tuple[dict[tuple[str, str, int], float], set[tuple[object, ...]]] = ({}, set())
    got_k: tuple[dict[tuple[str, str, int], float], set[tuple[object, ...]]] = ({}, set())
    for b in batches:  # an hour of the worker's time between two batches
        now[0] += hour / 1000
        for stage, got in ((forgetful, got_f), (keeper, got_k)):
            sev, alerts = drive(stage, [b])
            got[0].update(sev)
            got[1].update(alerts)
        sizes.append(len(forgetful.series))
    n_series = len(keeper.series)  # 3 devices x 3 metrics + 2 x 3, never forgotten
    assert n_series == 15
    # gone at batch 60; forgotten 48 h (batches) later, at the first sweep past that
    assert sizes[59] == 15
    assert min(sizes) == 9
    assert forgetful.counters["series_forgotten"] == 6
    assert sizes[-1] == 12  # old-1 came back, as new series
    assert len(forgetful.devices) == 4
    assert forgetful.state_bytes() < keeper.state_bytes()
    # the fleet's own series: exactly as if nothing had been forgotten
    last = stream[-1][0].start

    def fleet(d: str, _t: int) -> bool:
        return d.startswith("dev")

    assert only(got_f, fleet) == only(got_k, fleet)
    # the returning device: judged as a device never seen before
    back = stream[900][0].start
    fresh = build_stage(SHIPPED, SMALL, forget_after_ms=0)
    newcomer = drive(fresh, chunks([[w for w in ws if w.device == "old-1"]
                                    for ws in stream[900:]], [5]))

    def returned(d: str, t: int) -> bool:
        return d == "old-1" and back <= t <= last

    assert only(got_f, returned) == newcomer
    assert only(got_k, returned) != newcomer  # (the keeper judged it against its past)


def test_a_series_with_an_open_incident_is_not_forgotten() -> None:
    """An incident open on a series (or its device) keeps it: forgetting it would leave the
    alert open for good with nothing left that could resolve it."""
    hour = 3_600_000
    stage = build_stage(["spike"], SMALL, forget_after_ms=48 * hour, clock=lambda: T0 / 1000)
    drive(stage, chunks([[w for w in ws if w.device in ("dev0", "dev1")] for ws in FLEET[:50]],
                        [5]))
    assert len(stage.series) == 6
    sid = stage.series.get(("gw", "dev1", "b", "1m"))
    assert sid is not None
    stage.series_policy.state["incident"][sid] = T0  # as if open
    assert stage.forget_silent(T0 + 49 * hour) == 5
    assert stage.series.keys == [("gw", "dev1", "b", "1m")]
    assert int(stage.series_policy.state["incident"][0]) == T0
    assert stage.devices.keys == [("gw", "dev1", "1m")]


def test_detector_state_from_before_forgetting_loads_with_every_series_seen_now(
        tmp_path: Path) -> None:
    """An upgrade: a worker's detect.npz (or a partition snapshot) written before series were
    forgotten has no last-seen times. It is taken, not thrown away, each series counted as seen
    at the load (so forgotten ``forget_after`` later if it never comes back)."""
    stage = build_stage(SHIPPED, SMALL, clock=lambda: T0 / 1000)
    drive(stage, chunks(FLEET[:100], [5]))
    snap = stage.snapshot()
    for k in ("seen.at", "seen.end", "seen.gap"):  # none of them was kept then
        del snap["arrays"][k]
    write_snapshot(snap, tmp_path / "detect.npz")
    later = build_stage(SHIPPED, SMALL, clock=lambda: T0 / 1000 + 86_400)
    assert later.load(tmp_path / "detect.npz")
    assert later.series.keys == stage.series.keys
    assert (later.seen["at"][: len(later.series)] == T0 + 86_400_000).all()
    n = len(later.series)  # the end of each series' newest window: at least its start
    assert (later.seen["end"][:n] == stage.marks["learned"][:n]).all()
    assert drive(later, chunks(FLEET[100:200], [5])) == drive(stage, chunks(FLEET[100:200], [5]))


# ---- incidents of series that fall silent ------------------------------------------------

MINUTE = 60_000


class WorkerClock:
    """The worker's own clock (seconds), moved by the test."""

    def __init__(self, t_ms: int) -> None:
        self.t_ms = t_ms

    def __call__(self) -> float:
        return self.t_ms / 1000


def limited(device: str, k: int, value: float, *, at: int = T0) -> Win:
    """Window ``k`` of a device whose registry limit is 30: a value over it is an incident."""
    return Win(device, "m", at + k * MINUTE, value, high=30.0)


def silence_stage(clock: WorkerClock, **kw: int) -> DetectionStage:
    return build_stage(["threshold"], {}, policy=PLAIN, clock=clock, **kw)  # type: ignore[arg-type]


def run_minutes(stage: DetectionStage, clock: WorkerClock, wins: list[list[Win]], *,
                step_ms: int = MINUTE) -> list[tuple[int, AlertEvent]]:
    """One batch per window time, ``step_ms`` of the worker's time apart: (batch, event)."""
    out = []
    for k, ws in enumerate(wins):
        clock.t_ms += step_ms
        det = stage.run(rows(ws, width=MINUTE))
        out += [(k, e) for e in det.alerts]
    return out


def test_an_incident_of_a_series_that_falls_silent_resolves_once_its_gateway_sends_others(
        ) -> None:
    """A device dies in the middle of an incident: nothing would resolve it (the policy needs
    windows below the limit), the view would count it open for good and the series could never
    be forgotten. Once its gateway has sent others' windows for ``resolve_silent_after`` (in the
    worker's time and in event time) without one of it, the incident resolves: the same
    identity, its last window over the limit as its end, the reason in its message."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    hot = [[limited("a", k, 20.0), limited("b", k, 40.0 if k >= 5 else 20.0)] for k in range(10)]
    opened = run_minutes(stage, clock, hot)
    assert [(k, e.state, e.incident) for k, e in opened] == [(5, "open", T0 + 5 * MINUTE)]
    # b falls silent in its incident; a goes on, a window a minute
    quiet = [[limited("a", k, 20.0)] for k in range(10, 130)]
    got = run_minutes(stage, clock, quiet)
    assert len(got) == 1
    k, e = got[0]
    # b's last window ended at minute 10; its gateway's newest passes minute 70 at k = 69
    assert k == 69 - 10
    assert (e.state, e.level, e.name, e.incident) == ("resolved", "series", "threshold",
                                                      T0 + 5 * MINUTE)
    assert e.until == T0 + 10 * MINUTE  # the end of its last window over the limit
    assert e.subject == ("gw", "b", "m", "1m")
    assert "no window for 60 min" in e.message
    assert "resolved as silent" in e.message
    assert e.row == -1
    assert stage.counters["alerts_resolved_silent"] == 1
    assert not len(stage.series_policy.open_incidents())
    # a series whose incident is resolved can be forgotten like any other
    assert stage.forget_silent(clock.t_ms + stage.forget_after_ms) == 1
    assert stage.series.keys == [("gw", "a", "m", "1m")]


def test_a_backlog_after_an_outage_is_not_silence() -> None:
    """The gateway's link is down for three hours; its agent keeps every window and sends them
    all at once when it is back. The worker heard nothing of the series for three hours, but
    nothing of its gateway either: the backlog carries b's windows (still over its limit)
    right behind a's, so b's incident stays open, and resolves by its windows when they say
    so. Nor does a gateway quiet for longer than ``resolve_silent_after`` resolve anything."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    run_minutes(stage, clock, [[limited("a", k, 20.0), limited("b", k, 40.0 if k >= 5 else 20.0)]
                               for k in range(10)])
    clock.t_ms += 3 * 3_600_000
    backlog = [[limited("a", k, 20.0), limited("b", k, 40.0 if k < 200 else 20.0)]
               for k in range(10, 220)]
    got = run_minutes(stage, clock, backlog, step_ms=200)  # five batches a second
    assert [(k + 10, e.state, e.incident) for k, e in got] == [
        (202, "resolved", T0 + 5 * MINUTE)]  # its third window under the limit
    assert "back to normal" in got[0][1].message
    assert stage.counters["alerts_resolved_silent"] == 0


def test_recordings_of_other_years_on_one_gateway_are_not_silence() -> None:
    """``fieldline replay --event-time recorded``: one gateway carries a recording of 2014 and
    one of 2026, live. In event time b (2014) is twelve years behind its gateway's newest window
    from the first batch on; it is not silent while its windows keep coming in the worker's
    time. Once they stop (its recording ended), its incident resolves like any other."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    old = T0 - 12 * 365 * 86_400_000
    both = [[limited("a", k, 20.0), limited("b", k, 40.0 if k >= 5 else 20.0, at=old)]
            for k in range(200)]
    assert [(k, e.state) for k, e in run_minutes(stage, clock, both)] == [(5, "open")]
    got = run_minutes(stage, clock, [[limited("a", k, 20.0)] for k in range(200, 300)])
    assert [(k, e.state, e.subject) for k, e in got] == [(59, "resolved", ("gw", "b", "m", "1m"))]


def test_a_device_that_reports_seldom_is_not_silent_between_its_reports() -> None:
    """A battery sensor sends one window every 30 minutes: an hour between two of them is its
    usual pace, not silence. Silence is also at least ``clear + 1`` of its usual gaps (here
    4 x 30 min) of event time; past that its incident resolves."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    wins: list[list[Win]] = []
    for k in range(450):
        ws = [limited("a", k, 20.0)]
        if k % 30 == 0 and k <= 300:
            ws.append(limited("b", k, 40.0 if k >= 150 else 20.0))
        wins.append(ws)
    got = run_minutes(stage, clock, wins)
    # its last window ends at minute 301: 4 x 30 min later its gateway's newest window ends at
    # minute 421 (batch 420); an hour of the worker's time had passed at batch 360 already
    assert [(k, e.state) for k, e in got] == [(150, "open"), (420, "resolved")]
    assert "no window for 2.0 h" in got[1][1].message


def test_an_incident_of_a_gateway_gone_for_good_resolves_after_forget_after() -> None:
    """A gateway is never heard again: nothing of it can say its series are silent. After
    ``forget_after`` of the worker's time without a window their incidents resolve anyway
    (with any gateway's next batch), and the series are forgotten at the next sweep."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock, forget_after_ms=2 * 3_600_000)
    stage.run(rows([limited("b", 0, 40.0)], width=MINUTE, gateway="gone"))
    assert len(stage.series_policy.open_incidents()) == 1
    got = run_minutes(stage, clock, [[limited("a", k, 20.0)] for k in range(1, 200)],
                      step_ms=MINUTE)
    assert [(k, e.subject) for k, e in got] == [(120, ("gone", "b", "m", "1m"))]
    clock.t_ms += 3_600_000
    stage.run(rows([limited("a", 200, 20.0)], width=MINUTE))
    assert stage.series.keys == [("gw", "a", "m", "1m")]


def health_reports(stage: DetectionStage, clock: WorkerClock, minutes: int, *,
                   idle: bool = True, running: int = 1) -> list[tuple[int, AlertEvent]]:
    """Its gateway's health reports, every 10 s for ``minutes``, its agent's clock set:
    (report, event)."""
    out = []
    for k in range(minutes * 6):
        clock.t_ms += 10_000
        out += [(k, e) for e in stage.heard("gw", clock.t_ms, idle=idle, running=running)]
    return out


def test_incidents_of_a_gateway_whose_devices_all_fall_silent_resolve_by_its_health() -> None:
    """Every device of a gateway falls silent at once (their network or their broker gone, the
    agent alive): no window comes to say so. Its health reports do: once it has reported
    nothing waiting for the cloud for ``resolve_silent_after``, without a restart, its series
    without a window since are silent. An agent that restarted starts its run again (its
    devices' broker may hold a backlog for it); so does one with something waiting."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    run_minutes(stage, clock, [[limited("a", k, 20.0), limited("b", k, 40.0 if k >= 5 else 20.0)]
                               for k in range(10)])
    assert not health_reports(stage, clock, 50, running=500)
    assert not health_reports(stage, clock, 50, running=3)  # restarted: a run of 50 min again
    assert not health_reports(stage, clock, 240, idle=False)  # its outbox holds batches
    got = health_reports(stage, clock, 70)
    assert [(k // 6, e.state, e.subject) for k, e in got] == [
        (60, "resolved", ("gw", "b", "m", "1m"))]
    e = got[0][1]
    assert e.incident == T0 + 5 * MINUTE
    assert e.until == T0 + 10 * MINUTE
    assert "resolved as silent" in e.message
    assert stage.counters["alerts_resolved_silent"] == 1
    assert not len(stage.series_policy.open_incidents())


@pytest.mark.parametrize("down_min", [2, 20])
def test_a_run_of_idle_reports_goes_on_across_a_restart(down_min: int) -> None:
    """The run of idle health reports is in the detectors' snapshot: a worker restarted (or a
    partition's next owner) 40 minutes into it resolves the silent incident 20 minutes on, as
    without the restart, not an hour later; down longer than IDLE_REPORT_GAP_MS between two
    reports, the run starts again (a backlog may be on its way). A forgetting sweep keeps it."""
    from cloud.detect.stage import IDLE_REPORT_GAP_MS

    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    run_minutes(stage, clock, [[limited("a", k, 20.0), limited("b", k, 40.0 if k >= 5 else 20.0)]
                               for k in range(10)])
    assert not health_reports(stage, clock, 40)
    stage._keep(np.ones(len(stage.series), bool))  # what a forgetting sweep does
    snap = stage.snapshot_bytes()
    clock.t_ms += down_min * MINUTE
    again = silence_stage(clock)
    assert again.load_bytes(snap)
    got = health_reports(again, clock, 80)
    restart_gap = down_min * MINUTE + 10_000 > IDLE_REPORT_GAP_MS
    assert [(k // 6, e.state) for k, e in got] == [(60 if restart_gap else 20 - down_min,
                                                    "resolved")]


def test_an_idle_gateway_does_not_make_a_live_series_silent() -> None:
    """Idle health reports count only for series without a window since: a device that keeps
    sending (over its limit) keeps its incident open however long its gateway reports idle,
    even with its windows' event time falling behind its agent's clock (a window every 2 min
    of the agent's time, each a minute on from the last)."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    got = []
    for k in range(300):
        got += [(k, e.state) for _, e in run_minutes(stage, clock, [[limited("b", k, 40.0)]])]
        got += [(k, e.state) for _, e in health_reports(stage, clock, 1)]
    assert got == [(0, "open")]


def test_resolve_silent_after_zero_keeps_the_incident_open() -> None:
    clock = WorkerClock(T0)
    stage = silence_stage(clock, resolve_silent_after_ms=0)
    run_minutes(stage, clock, [[limited("a", k, 20.0), limited("b", k, 40.0)] for k in range(5)])
    assert not run_minutes(stage, clock, [[limited("a", k, 20.0)] for k in range(5, 400)])
    assert len(stage.series_policy.open_incidents()) == 1


def test_incidents_written_are_reopened_even_on_a_series_never_seen() -> None:
    """``reconcile``: an incident the rules' state has open on a series the detectors' snapshot
    never saw (first seen after the last save) is reopened on a new series, counted as seen
    now (not silent since for ever), and resolves by its windows; one the snapshot holds open
    that is not written open is closed."""
    clock = WorkerClock(T0)
    stage = silence_stage(clock)
    run_minutes(stage, clock, [[limited("a", k, 40.0)] for k in range(3)])
    have = stage.open_by_subject()
    assert list(have) == [("gw", "a", "m", "1m")]
    inc, name, _, until = have[("gw", "a", "m", "1m")]
    assert (inc, name, until) == (T0, "threshold", T0 + 3 * MINUTE)
    written = {("gw", "b", "m", "1m"): [T0 + 2 * MINUTE, "threshold", 2.0, T0 + 3 * MINUTE]}
    assert stage.reconcile(written) == (1, 1)
    assert stage.open_by_subject() == {("gw", "b", "m", "1m"): [T0 + 2 * MINUTE, "threshold",
                                                               2.0, T0 + 3 * MINUTE]}
    clock.t_ms += 2 * 3_600_000  # nothing is silent yet: b was seen at the restart
    assert stage.resolve_silent("gw", clock.t_ms) == []
    got = run_minutes(stage, clock, [[limited("a", k, 20.0), limited("b", k, 20.0)]
                                     for k in range(3, 6)])
    assert [(k, e.state, e.subject, e.incident) for k, e in got] == [
        (2, "resolved", None, T0 + 2 * MINUTE)]
    assert "back to normal" in got[0][1].message
