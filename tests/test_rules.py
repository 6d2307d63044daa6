"""Pattern rules on hand-built window streams: what each kind raises, its identity, and that a
replay or a revision does not raise it twice."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cloud.detect.stage import AlertEvent, Detections
from cloud.enrich import EnrichedResults
from cloud.rules import RuleAlert, RuleEngine, append_rules, parse_rules, save_rules
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


def resolved(row: int, t: int, until: int) -> AlertEvent:
    return replace(alert(row, t), state="resolved", until=until)


def test_a_followed_by_b_within_t_on_one_device() -> None:
    eng = engine({"name": "press_then_temp", "kind": "sequence", "first": "anomaly:p",
                  "then": "anomaly:t", "within": "10m"})
    w = [Win("d", "p", T0, 1.0), Win("d", "t", T0, 1.0)]
    assert feed(eng, w, [alert(0, T0)]) == []
    w2 = [Win("d", "p", T0 + 5 * W, 1.0), Win("d", "t", T0 + 5 * W, 1.0)]
    got = feed(eng, w2, [alert(1, T0 + 5 * W)])
    assert opened(got) == [("press_then_temp", "d", T0 + 5 * W)]
    # it resolves with the incident that completed it (t back to normal), not with p's
    w4 = [Win("d", "p", T0 + 7 * W, 1.0), Win("d", "t", T0 + 7 * W, 1.0)]
    assert feed(eng, w4, [resolved(0, T0 + 5 * W, T0 + 7 * W)]) == []
    got = feed(eng, w4, [resolved(1, T0 + 5 * W, T0 + 8 * W)])
    assert [(a.rule, a.state, a.device, a.metric, a.opened, a.until) for a in got] == [
        ("press_then_temp", "resolved", "d", "t", T0 + 5 * W, T0 + 8 * W)]
    assert feed(eng, w4, [resolved(1, T0 + 5 * W, T0 + 8 * W)]) == []  # once
    w3 = [Win("d", "p", T0 + 30 * W, 1.0), Win("d", "t", T0 + 30 * W, 1.0)]
    assert feed(eng, w3, [alert(1, T0 + 30 * W)]) == []  # too long after


def sequence_and_site_open() -> tuple[RuleEngine, list[AlertEvent]]:
    """A sequence rule (p then t on one device) and a site rule (t on 2 devices), each with
    its alert open: d's p, then d's and e's t (the batch that opened both, returned)."""
    eng = engine({"name": "press_then_temp", "kind": "sequence", "first": "anomaly:p",
                  "then": "anomaly:t", "within": "10m"},
                 {"name": "site_wide", "kind": "site", "event": "anomaly:t", "devices": 2,
                  "within": "1m"})
    w = [Win("d", "p", T0, 1.0), Win("d", "t", T0, 1.0), Win("e", "t", T0, 1.0)]
    feed(eng, w, [alert(0, T0)])
    batch = [alert(1, T0 + 10_000), alert(2, T0 + 20_000)]
    got = feed(eng, w, batch)
    assert sorted(opened(got)) == [("press_then_temp", "d", T0 + 10_000),
                                   ("site_wide", "(site)", T0)]
    return eng, batch


@pytest.mark.parametrize("with_rows", ["others' windows", "none"])
def test_a_sequence_alert_resolves_with_its_incident_resolved_as_silent(with_rows: str) -> None:
    """The device of a sequence alert dies in its incident: the detection stage resolves the
    incident as silent in a batch that holds none of its windows (the event names its
    subject), or with no rows at all (a gateway all of whose devices fell silent, by its
    health reports); the sequence alert resolves with it, and a site alert's count of devices
    in incident drops."""
    eng, _ = sequence_and_site_open()
    silent = replace(resolved(-1, T0 + 10_000, T0 + W), subject=("gw", "d", "t", "1m"))
    got = (feed(eng, [Win("other", "t", T0 + 90 * W, 1.0)], [silent]) if with_rows != "none"
           else eng.run(EnrichedResults.none("gw"), Detections(alerts=[silent])))
    assert sorted((a.rule, a.state, a.device, a.until) for a in got) == [
        ("press_then_temp", "resolved", "d", T0 + W), ("site_wide", "resolved", "(site)", T0 + W)]
    assert not eng.open


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
    other = [alert(k, T0 + 1_000) for k in range(3)]  # (incidents of their own)
    assert feed(eng, wins, other, site="other") != []
    # it resolves once fewer than 3 of the devices that raised it are still in incident
    assert feed(eng, wins, [resolved(0, T0, T0 + 2 * W)]) == []  # 3 of 4 still
    got = feed(eng, wins, [resolved(1, T0 + 10_000, T0 + 3 * W)])
    assert [(a.rule, a.state, a.device, a.site, a.opened, a.until) for a in got] == [
        ("site_wide", "resolved", "(site)", "s", T0, T0 + 3 * W)]
    assert feed(eng, wins, [resolved(2, T0 + 20_000, T0 + 4 * W)]) == []
    got = feed(eng, wins, [resolved(k, T0 + 1_000, T0 + 5 * W) for k in range(2)],
               site="other")
    assert [(a.state, a.site) for a in got] == [("resolved", "other")]


def test_a_site_rule_forgets_its_old_minutes_but_not_an_open_alert() -> None:
    """A site rule keeps what it counted per minute (bucket) of event time: for a fleet whose
    anomalies go on for weeks that grew without end, and with it every snapshot of the rules'
    state. Minutes more than SITE_HORIZON_MS behind the newest event go, but one whose alert
    is still open stays until it resolves."""
    from cloud.rules import SITE_HORIZON_MS

    eng = engine({"name": "site_wide", "kind": "site", "event": "anomaly", "devices": 2,
                  "within": "1m"})
    wins = [Win(f"d{i}", "t", T0, 1.0) for i in range(3)]
    assert feed(eng, wins, [alert(0, T0), alert(1, T0)]) != []  # open, stays open
    hours = 2 * SITE_HORIZON_MS // 3_600_000
    for h in range(1, hours + 1):  # one anomaly an hour, one device: nothing opens
        assert feed(eng, wins, [alert(2, T0 + h * 3_600_000)]) == []
    kept = sorted(k[2] for k in eng.site_hits)
    assert kept[0] == T0  # its alert is open
    assert len(kept) <= SITE_HORIZON_MS // 3_600_000 + 3, len(kept)
    assert len(eng.snapshot()["d"]) < 4 * len(kept) + 10
    # the open one resolves, and its minute goes at the next hour's pruning
    got = feed(eng, wins, [resolved(0, T0, T0 + 2 * W)])
    assert [a.state for a in got] == ["resolved"]
    feed(eng, wins, [alert(2, T0 + (hours + 1) * 3_600_000)])
    assert min(k[2] for k in eng.site_hits) > T0


def test_a_rule_that_matches_no_result_says_what_it_waits_for() -> None:
    """A metric or window spec misspelt in a rule, or a percentile the windows do not
    compute: the rule judges nothing and can never fire, which nothing showed. The rules
    that judged no window name what in them matched none of the results, and what came."""
    eng = engine(
        {"name": "typo", "kind": "consecutive", "metric": "temprature", "above": 1},
        {"name": "spec", "kind": "rate", "above": 1, "windows": ["60s"]},
        {"name": "pct", "kind": "consecutive", "field": "p95", "above": 1},
        {"name": "gone", "kind": "absence", "metric": "humidity"},
        {"name": "fine", "kind": "consecutive", "metric": "t", "windows": ["1m"], "above": 1},
        {"name": "quiet", "kind": "absence"},
        {"name": "site", "kind": "site", "event": "anomaly"})  # events: rare by nature
    assert [r["rule"] for r in eng.idle()] == ["typo", "spec", "pct", "gone", "fine", "quiet"]
    for k in range(3):
        feed(eng, [Win("d", "t", T0 + k * W, 1.0), Win("d", "p", T0 + k * W, 1.0)])
    why = {r["rule"]: r["why"] for r in eng.idle()}
    assert why == {
        "typo": "no result has metric 'temprature' (seen: p, t)",
        "spec": "no result is of window spec '60s' (seen: 1m; without `windows`, the "
                "gateway's first)",
        "pct": "no window spec computes 'p95' (a percentile of its `percentiles`)",
        "gone": "no result has metric 'humidity' (seen: p, t)"}, why


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


def test_an_incident_opened_again_by_a_replay_is_counted_once() -> None:
    """A batch taken twice with its detections (its dedup mark not saved while the rules'
    journal was, then the batch re-delivered after a restart): the incidents it opened are the
    same incidents, not new ones. A site rule that counted them twice kept its alert open
    after they all resolved; a sequence alert was raised again."""
    eng, batch = sequence_and_site_open()
    w = [Win("d", "p", T0, 1.0), Win("d", "t", T0, 1.0), Win("e", "t", T0, 1.0)]
    assert feed(eng, w, batch) == []  # the same batch again: nothing new
    assert all(len(v) == len({tuple(x) for x in v}) for v in eng.waits.values())
    later = [Win("d", "t", T0 + 5 * W, 1.0), Win("e", "t", T0 + 5 * W, 1.0)]
    got = feed(eng, later, [resolved(0, T0 + 10_000, T0 + 4 * W)])  # d's t
    assert sorted((a.rule, a.state, a.until) for a in got) == [
        ("press_then_temp", "resolved", T0 + 4 * W), ("site_wide", "resolved", T0 + 4 * W)]
    assert feed(eng, later, [resolved(1, T0 + 20_000, T0 + 5 * W)]) == []  # e's t
    assert eng.open == eng.site_live == eng.waits == {}


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


def stateful_rules(hot_count: int) -> list[dict[str, object]]:
    """A rule of each kind that carries state from one batch to the next (a run, a silence,
    a first event, a site's devices)."""
    return [
        {"name": "hot", "kind": "consecutive", "metric": "t", "field": "max", "above": 80,
         "count": hot_count},
        {"name": "silent", "kind": "absence", "after": "3m"},
        {"name": "p_then_t", "kind": "sequence", "first": "anomaly:p", "then": "anomaly:t",
         "within": "10m"},
        {"name": "site_wide", "kind": "site", "event": "anomaly", "devices": 2,
         "within": "10m"}]


def test_the_rules_go_on_after_a_restart_from_their_saved_state(tmp_path: Path) -> None:
    """Their state outlives the process (a worker restarted, a partition's next owner): an
    alert open when the worker stopped resolves afterwards, a silence and a sequence go on,
    exactly as without the stop; a file that cannot be read is kept aside, the rules start
    afresh."""
    specs = stateful_rules(hot_count=2)
    means = [70, 85, 86, 87, 70, 70, 85, 86, 70]

    def batch(k: int) -> tuple[list[Win], list[AlertEvent]]:
        wins = [Win("a", "t", T0 + k * W, means[k], spread=0.0), Win("a", "p", T0 + k * W, 1.0)]
        if k < 2 or k > 6:
            wins.append(Win("b", "t", T0 + k * W, 1.0))
        alerts = {1: [alert(2, T0 + W)],  # b's t at 1 (with a's p: the site's two devices)
                  2: [alert(1, T0 + 2 * W)],  # a's p at 2 ...
                  4: [alert(0, T0 + 4 * W)],  # ... then a's t at 4
                  6: [resolved(0, T0 + 4 * W, T0 + 7 * W)],  # a's t back: the sequence too
                  7: [resolved(2, T0 + W, T0 + 8 * W)],  # b's back: one device left
                  }.get(k, [])
        return wins, alerts

    def run(eng: RuleEngine, ks: range) -> list[RuleAlert]:
        out: list[RuleAlert] = []
        for k in ks:
            out += feed(eng, *batch(k))
        return out

    whole = run(engine(*specs), range(len(means)))
    kinds = {a.rule for a in whole}
    assert kinds == {"hot", "silent", "p_then_t", "site_wide"}, whole  # each left state behind
    assert [a.state for a in whole if a.rule == "hot"] == ["open", "resolved"] * 2
    for rule in ("silent", "p_then_t", "site_wide"):
        assert [a.state for a in whole if a.rule == rule] == ["open", "resolved"], rule
    path = tmp_path / "rules.json"
    for cut in range(1, len(means)):
        before = engine(*specs)
        first = run(before, range(cut))
        save_rules(before.snapshot(), path)
        after = engine(*specs)
        assert after.load(path)
        assert first + run(after, range(cut, len(means))) == whole, cut
    assert run(engine(*specs), range(3, len(means))) != whole[len(run(engine(*specs),
                                                                      range(3))):]  # (state)
    path.write_text('{"v": 1, "series": [["hot"]]}')
    fresh = engine(*specs)
    assert not fresh.load(path)
    assert not path.exists()
    assert (tmp_path / "rules.json.unreadable").exists()
    assert not fresh.load(path)  # no file: nothing to restore


def test_the_detectors_open_incidents_are_kept_with_the_rules_state(tmp_path: Path) -> None:
    """Rules or none, the state keeps which detector incidents are open (opened: in; resolved:
    out), in each batch's delta and in snapshots, and says that it keeps them: a state from
    before (no such mark) adopts those of the detectors' snapshot once."""
    eng = RuleEngine([], journaled=True)
    w = [Win("d", "t", T0, 1.0), Win("e", "t", T0, 1.0)]
    assert eng.adopt_incidents({}) == 0
    feed(eng, w, [alert(0, T0), alert(1, T0 + 5 * W, level="device")])
    assert eng.incidents == {("gw", "d", "t", "1m"): [T0, "novelty", 2.0, 0],
                             ("gw", "e", "(device)", "1m"): [T0 + 5 * W, "novelty", 2.0, 0]}
    first = eng.take_delta()
    assert first is not None
    feed(eng, w, [resolved(0, T0, T0 + 9 * W)])
    second = eng.take_delta()
    path = tmp_path / "rules.json"
    save_rules({"v": 2, "n": 0, "d": []}, path)
    append_rules([first, second], path)
    back = RuleEngine([])
    assert back.load(path)
    assert back.incidents == {("gw", "e", "(device)", "1m"): [T0 + 5 * W, "novelty", 2.0, 0]}
    assert back.keeps_incidents  # (the adoption's mark rode in the first delta)
    save_rules(back.snapshot(), path)
    again = RuleEngine([])
    assert again.load(path)
    assert (again.incidents, again.keeps_incidents) == (back.incidents, True)
    old = RuleEngine([])  # a state from before: nothing says it keeps them
    old.restore({"v": 2, "n": 0, "d": []})
    assert not old.keeps_incidents
    assert old.adopt_incidents({("gw", "f", "t", "1m"): [T0, "spike", 3.0, T0 + W]}) == 1


def test_rules_read_again_go_on_start_or_close_what_they_had_open(tmp_path: Path) -> None:
    """The rules read again (a SIGHUP) or changed between two runs: one unchanged goes on
    (its run, its open alert), one added starts, one removed or changed has its open alert
    resolved with the next batch (the changed one counted its run against another limit) and
    starts afresh."""
    keep = {"name": "keep", "kind": "consecutive", "metric": "t", "above": 80, "count": 2}
    edit = {"name": "edit", "kind": "consecutive", "metric": "t", "above": 80, "count": 1}
    drop = {"name": "drop", "kind": "consecutive", "metric": "t", "above": 80, "count": 1}
    new = {"name": "new", "kind": "consecutive", "metric": "t", "above": 80, "count": 1}
    edited = {**edit, "count": 3}
    hot = [Win("d", "t", T0 + k * W, 90.0) for k in range(6)]

    live = engine(keep, edit, drop)
    got = feed(live, [hot[0]]) + feed(live, [hot[1]])
    assert sorted(opened(got)) == [("drop", "d", T0), ("edit", "d", T0), ("keep", "d", T0)]
    path = tmp_path / "rules.json"
    save_rules(live.snapshot(), path)
    restarted = engine(keep, edited, new)  # the config edited while the worker was down
    assert restarted.load(path)
    live.reconfigure(parse_rules([keep, edited, new]))  # the same edit, read at a SIGHUP
    for eng in (live, restarted):
        got = feed(eng, [hot[2]])
        assert sorted((a.rule, a.state, a.opened) for a in got) == [
            ("drop", "resolved", T0), ("edit", "resolved", T0), ("new", "open", T0 + 2 * W)]
        assert "(removed, or changed)" in got[0].message
        got = feed(eng, [hot[3]]) + feed(eng, [hot[4]])
        assert opened(got) == [("edit", "d", T0 + 2 * W)]  # 3 in a row from the edit on
        assert "keep" in {k[0] for k in eng.series}  # it went on: no second alert of it


def test_the_journal_of_each_batch_restores_the_rules_exactly_where_they_were(
        tmp_path: Path) -> None:
    """The worker's single path: each batch's changes go to the journal before its ack, a
    snapshot every few minutes (which empties the journal). Cut anywhere, the rules go on
    from the snapshot and the journal exactly as without the cut, however few batches the
    snapshot saw: runs, silences, sequences, sites. A crash between a snapshot and emptying
    the journal (its older records replayed on top) changes nothing; a torn last line (a crash
    while it was written) is left out, and its batch, never acknowledged, comes again."""
    from cloud.rules import append_rules, journal_path

    specs = stateful_rules(hot_count=3)
    means = [70, 85, 86, 70, 85, 86, 87, 88, 70, 90, 91, 92, 93, 70]

    def batch(k: int) -> tuple[list[Win], list[AlertEvent]]:
        wins = [Win("a", "t", T0 + k * W, means[k], spread=0.0), Win("a", "p", T0 + k * W, 1.0)]
        if k < 2 or k > 6:
            wins.append(Win("b", "t", T0 + k * W, 1.0))
        return wins, {1: [alert(2, T0 + W)], 2: [alert(1, T0 + 2 * W)],
                      4: [alert(0, T0 + 4 * W)], 6: [resolved(0, T0 + 4 * W, T0 + 7 * W)],
                      8: [resolved(2, T0 + W, T0 + 9 * W)]}.get(k, [])

    whole: list[RuleAlert] = []
    plain = engine(*specs)
    for k in range(len(means)):
        whole += feed(plain, *batch(k))
    assert {a.rule for a in whole} == {"hot", "silent", "p_then_t", "site_wide"}
    path = tmp_path / "rules.json"
    for snap_at in (0, 3):
        for cut in range(1, len(means)):
            for f in (path, journal_path(path)):
                f.unlink(missing_ok=True)
            live = engine(*specs)
            live.journaled = True
            got: list[RuleAlert] = []
            for k in range(cut):
                got += feed(live, *batch(k))
                if k == snap_at:  # written once its batch is: the journal empties
                    old = journal_path(path).read_bytes() if journal_path(path).exists() else b""
                    save_rules(live.snapshot(), path)
                    journal_path(path).write_bytes(old)  # a crash before it was emptied
                elif (delta := live.take_delta()) is not None:
                    append_rules([delta], path)
            with journal_path(path).open("ab") as fh:
                fh.write(b'{"n": 99999, "d": [["series", ["hot", "gw"')  # torn
            after = engine(*specs)
            after.journaled = True
            assert after.load(path)
            # the torn line is gone before anything is appended after it
            assert b"99999" not in journal_path(path).read_bytes()
            for k in range(cut, len(means)):
                got += feed(after, *batch(k))
                append_rules([after.take_delta() or b'{"n": 0, "d": []}'], path)
                if k == cut:  # and a second restart reads what came after it
                    after = engine(*specs)
                    after.journaled = True
                    assert after.load(path)
            assert got == whole, (snap_at, cut)


def test_the_state_of_a_rule_no_longer_configured_is_dropped_and_its_alerts_closed(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """A rule removed from the config between two runs: its state is not carried on for good,
    and the alerts it had open (which nothing would judge again) are resolved with the next
    batch, overwriting the points that opened them; with every rule removed too."""
    hot = {"name": "hot", "kind": "consecutive", "metric": "t", "above": 80, "count": 1}
    silent = {"name": "silent", "kind": "absence", "after": "5m"}
    before = engine(hot, silent)
    got: list[RuleAlert] = []
    for k in range(3):
        got += feed(before, [Win("d", "t", T0 + k * W, 90.0)], site="hall")
    assert opened(got) == [("hot", "d", T0)]
    for rules in ([silent], []):
        after = engine(*rules)
        caplog.clear()
        with caplog.at_level("WARNING"):
            after.restore(before.snapshot())
        assert f"{'hot' if rules else 'hot, silent'} no longer configured" in caplog.text
        assert "1 alert(s) " in caplog.text
        assert "had open are resolved with the next batch" in caplog.text
        assert [k[0] for k in after.series] == []
        assert list(after.last_end) == (["silent"] if rules else [])
        again = engine(*rules)  # a restart before that batch closes them all the same
        again.restore(after.snapshot())
        for eng in (after, again):
            closed = feed(eng, [Win("d", "t", T0 + 3 * W, 90.0)], site="yard")
            assert [(a.rule, a.state, a.site, a.device, a.metric, a.opened, a.until)
                    for a in closed if a.rule == "hot"] == [
                ("hot", "resolved", "hall", "d", "t", T0, T0 + 4 * W)], closed
            assert "no longer configured" in closed[0].message
            assert feed(eng, [Win("d", "t", T0 + 4 * W, 90.0)]) == []  # once
            assert "hot" not in json.dumps(eng.snapshot())
    # journaled (the worker's single path): once closed, the next restart closes none again
    from cloud.rules import append_rules

    path = tmp_path / "rules.json"
    for rules in ([silent], []):
        save_rules(before.snapshot(), path)
        live = engine(*rules)
        live.journaled = True
        assert live.load(path)
        got = feed(live, [Win("d", "t", T0 + 3 * W, 90.0)])
        assert [a.state for a in got] == ["resolved"]
        append_rules([live.take_delta() or b"{}"], path)
        back = engine(*rules)
        assert back.load(path)
        assert back.orphans == []
        assert feed(back, [Win("d", "t", T0 + 4 * W, 90.0)]) == []
    same = engine(hot, silent)
    caplog.clear()
    with caplog.at_level("WARNING"):
        same.restore(before.snapshot())
    assert caplog.text == ""
    assert same.snapshot() == before.snapshot()
