"""Pattern rules on hand-built window streams: what each kind raises, its identity, and that a
replay or a revision does not raise it twice."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cloud.detect.stage import AlertEvent, Detections
from cloud.rules import RuleAlert, RuleEngine, parse_rules, save_rules
from devices.errors import ConfigError
from tests.detectkit import T0, Win, rows

W = 60_000


def engine(*specs: dict[str, object]) -> RuleEngine:
    return RuleEngine(parse_rules(list(specs)))


def feed(eng: RuleEngine, wins: list[Win], alerts: list[AlertEvent] | None = None,
         site: str = "s") -> list[RuleAlert]:
    r = rows(wins, width=W)
    r = replace(r, site=[site] * len(wins))
    return eng.run(r, Detections(alerts=alerts or []))


def opened(alerts: list[RuleAlert]) -> list[tuple[str, str, int]]:
    return [(a.rule, a.device, a.opened) for a in alerts if a.state == "open"]


def test_consecutive_windows_beyond_a_limit() -> None:
    eng = engine({"name": "hot", "kind": "consecutive", "metric": "t", "field": "max",
                  "above": 80, "count": 3})
    means = [70, 85, 86, 70, 85, 86, 87, 88, 70]
    got = []
    for k, m in enumerate(means):
        got += feed(eng, [Win("d", "t", T0 + k * W, m, spread=0.0)])
    assert opened(got) == [("hot", "d", T0 + 4 * W)]  # the run that reached 3 began at 4
    resolved = [a for a in got if a.state == "resolved"]
    assert [(a.opened, a.until) for a in resolved] == [(T0 + 4 * W, T0 + 9 * W)]


def test_rate_of_change_per_unit_of_time() -> None:
    eng = engine({"name": "fast", "kind": "rate", "metric": "t", "above": 2.0, "per": "1m"})
    means = [20, 21, 22, 30, 31, 32]  # +8 per minute at window 3
    got = []
    for k, m in enumerate(means):
        got += feed(eng, [Win("d", "t", T0 + k * W, m)])
    assert opened(got) == [("fast", "d", T0 + 3 * W)]
    assert got[0].value == pytest.approx(8.0)


def test_absence_of_data_in_event_time() -> None:
    eng = engine({"name": "silent", "kind": "absence", "after": "5m"})
    got = []
    for k in range(12):
        wins = [Win("a", "t", T0 + k * W, 1.0)]
        if k < 3 or k > 9:
            wins.append(Win("b", "t", T0 + k * W, 1.0))
        got += feed(eng, wins)
    assert opened(got) == [("silent", "b", T0 + 3 * W)]  # its last window ended at 3
    res = [a for a in got if a.state == "resolved"]
    assert [(a.device, a.opened) for a in res] == [("b", T0 + 3 * W)]


def alert(row: int, t: int, level: str = "series") -> AlertEvent:
    return AlertEvent(row=row, level=level, source="detector", name="novelty", state="open",
                      incident=t, until=0, severity=2.0, direction="high", value=1.0,
                      reference=0.0, message="")


def test_a_followed_by_b_within_t_on_one_device() -> None:
    eng = engine({"name": "press_then_temp", "kind": "sequence", "first": "anomaly:p",
                  "then": "anomaly:t", "within": "10m"})
    w = [Win("d", "p", T0, 1.0), Win("d", "t", T0, 1.0)]
    assert feed(eng, w, [alert(0, T0)]) == []
    w2 = [Win("d", "p", T0 + 5 * W, 1.0), Win("d", "t", T0 + 5 * W, 1.0)]
    got = feed(eng, w2, [alert(1, T0 + 5 * W)])
    assert opened(got) == [("press_then_temp", "d", T0 + 5 * W)]
    w3 = [Win("d", "p", T0 + 30 * W, 1.0), Win("d", "t", T0 + 30 * W, 1.0)]
    assert feed(eng, w3, [alert(1, T0 + 30 * W)]) == []  # too long after


def test_k_of_n_devices_of_a_site_at_once() -> None:
    eng = engine({"name": "site_wide", "kind": "site", "event": "anomaly", "devices": 3,
                  "within": "1m"})
    wins = [Win(f"d{i}", "t", T0, 1.0) for i in range(4)]
    got = feed(eng, wins, [alert(0, T0), alert(1, T0 + 10_000)])
    assert got == []
    got = feed(eng, wins, [alert(2, T0 + 20_000)])
    assert [(a.rule, a.device, a.site, a.opened) for a in got] == [
        ("site_wide", "(site)", "s", T0)]
    assert feed(eng, wins, [alert(3, T0 + 30_000)]) == []  # one alert for that minute
    # another site is another subject
    assert feed(eng, wins, [alert(0, T0), alert(1, T0), alert(2, T0)], site="other") != []


def test_replay_and_revisions_do_not_raise_twice() -> None:
    spec = {"name": "hot", "kind": "consecutive", "metric": "t", "above": 80, "count": 2}
    eng = engine(spec)
    stream = [Win("d", "t", T0 + k * W, m) for k, m in enumerate([70, 85, 90, 95, 70])]
    first = []
    for w in stream:
        first += feed(eng, [w])
    again = []
    for w in stream:  # the same results again (a replay after the dedup state was lost)
        again += feed(eng, [w])
        again += feed(eng, [replace(w, rev=1, mean=w.mean + 1)])  # and revised
    assert opened(first) == [("hot", "d", T0 + W)]
    assert again == []
    fresh = engine(spec)  # another worker replaying from scratch opens the same identity
    replay = []
    for w in stream:
        replay += feed(fresh, [w])
    assert opened(replay) == opened(first)


@pytest.mark.parametrize(("spec", "key"), [
    ({"kind": "consecutive", "above": 1}, "rules[0].name"),
    ({"name": "x", "kind": "magic"}, "rules[0].kind"),
    ({"name": "x", "kind": "consecutive"}, "rules[0].above"),
    ({"name": "x", "kind": "consecutive", "above": 1, "count": 0}, "rules[0].count"),
    ({"name": "x", "kind": "rate", "above": 1, "per": "soon"}, "rules[0].per"),
    ({"name": "x", "kind": "sequence", "first": "anomaly", "then": "rule:y"}, "rules[0].then"),
    ({"name": "x", "kind": "site", "event": "anomaly", "devices": 1}, "rules[0].devices"),
    ({"name": "x", "kind": "absence", "afterr": "5m"}, "rules[0].afterr"),
])
def test_misconfigured_rules_name_the_key(spec: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_rules([spec])
    assert info.value.key == key


def test_the_rules_go_on_after_a_restart_from_their_saved_state(tmp_path: Path) -> None:
    """Their state outlives the process (a worker restarted, a partition's next owner): an
    alert open when the worker stopped resolves afterwards, a silence and a sequence go on,
    exactly as without the stop; a file that cannot be read is kept aside, the rules start
    afresh."""
    specs: list[dict[str, object]] = [
        {"name": "hot", "kind": "consecutive", "metric": "t", "field": "max", "above": 80,
         "count": 2},
        {"name": "silent", "kind": "absence", "after": "3m"},
        {"name": "p_then_t", "kind": "sequence", "first": "anomaly:p", "then": "anomaly:t",
         "within": "10m"},
        {"name": "site_wide", "kind": "site", "event": "anomaly", "devices": 2,
         "within": "10m"}]
    means = [70, 85, 86, 87, 70, 70, 85, 86, 70]

    def batch(k: int) -> tuple[list[Win], list[AlertEvent]]:
        wins = [Win("a", "t", T0 + k * W, means[k], spread=0.0), Win("a", "p", T0 + k * W, 1.0)]
        if k < 2 or k > 6:
            wins.append(Win("b", "t", T0 + k * W, 1.0))
        alerts = [alert(1, T0 + k * W)] if k == 2 else []  # a's p at 2 ...
        if k == 4:
            alerts = [alert(0, T0 + k * W)]  # ... then a's t at 4
        return wins, alerts

    def run(eng: RuleEngine, ks: range) -> list[RuleAlert]:
        out: list[RuleAlert] = []
        for k in ks:
            out += feed(eng, *batch(k))
        return out

    whole = run(engine(*specs), range(len(means)))
    kinds = {a.rule for a in whole}
    assert kinds == {"hot", "silent", "p_then_t"}, whole  # every kind left state behind
    assert [a.state for a in whole if a.rule == "hot"] == ["open", "resolved"] * 2
    before = engine(*specs)
    first = run(before, range(3))
    path = tmp_path / "rules.json"
    save_rules(before.snapshot(), path)
    after = engine(*specs)
    assert after.load(path)
    assert first + run(after, range(3, len(means))) == whole
    assert run(engine(*specs), range(3, len(means))) != whole[len(first):]  # (state matters)
    path.write_text('{"v": 1, "series": [["hot"]]}')
    fresh = engine(*specs)
    assert not fresh.load(path)
    assert not path.exists()
    assert (tmp_path / "rules.json.unreadable").exists()
    assert not fresh.load(path)  # no file: nothing to restore


def test_the_state_of_a_rule_no_longer_configured_is_dropped_and_said(
        caplog: pytest.LogCaptureFixture) -> None:
    """A rule removed from the config between two runs: its state is not carried on for good,
    and the alerts it had open (which nothing will resolve now) are named in the log."""
    hot = {"name": "hot", "kind": "consecutive", "metric": "t", "above": 80, "count": 1}
    silent = {"name": "silent", "kind": "absence", "after": "5m"}
    before = engine(hot, silent)
    got: list[RuleAlert] = []
    for k in range(3):
        got += feed(before, [Win("d", "t", T0 + k * W, 90.0)])
    assert opened(got) == [("hot", "d", T0)]
    after = engine(silent)
    with caplog.at_level("WARNING"):
        after.restore(before.snapshot())
    assert "hot no longer configured" in caplog.text
    assert "1 alert(s) it had open stay open" in caplog.text
    assert [k[0] for k in after.series] == []
    assert list(after.last_end) == ["silent"]
    same = engine(hot, silent)
    caplog.clear()
    with caplog.at_level("WARNING"):
        same.restore(before.snapshot())
    assert caplog.text == ""
    assert same.snapshot() == before.snapshot()
