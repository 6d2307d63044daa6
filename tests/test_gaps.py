"""Sequence gaps (issue 12, item 7): what a device sent and the agent never got is counted."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.gaps import WIDTH, SeqGaps, _distinct_pairs


def feed(g: SeqGaps, arrivals: list[tuple[int, int]], batch: int) -> None:
    for i in range(0, len(arrivals), batch):
        part = arrivals[i:i + batch]
        g.observe(np.array([d for d, _ in part], np.int64),
                  np.array([s for _, s in part], np.int64))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_gaps_are_the_numbers_missing_between_first_and_last(data: st.DataObject) -> None:
    """Whatever the loss, repeats, disorder (within the bitmap) and batching: a device's gap is
    exactly the numbers between its first and highest that never arrived."""
    devices = data.draw(st.integers(1, 4))
    arrivals: list[tuple[int, int]] = []
    for d in range(devices):
        n = data.draw(st.integers(1, 300))
        start = data.draw(st.integers(0, 1000))
        sent = list(range(start, start + n))
        lost = data.draw(st.sets(st.integers(start + 1, start + n - 1), max_size=n // 2)) \
            if n > 2 else set()
        got = [s for s in sent if s not in lost]
        got += data.draw(st.lists(st.sampled_from(got), max_size=20))  # re-deliveries
        # disorder: each reading moves back by less than the bitmap's width
        keyed = sorted((s + data.draw(st.integers(0, WIDTH // 2 - 1)), s) for s in got)
        arrivals += [(d, s) for _, s in keyed]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    # interleave devices while keeping each device's own order
    order = np.argsort(rng.random(len(arrivals)) + 0.0, kind="stable")
    by_dev: dict[int, list[int]] = {}
    for d, s in arrivals:
        by_dev.setdefault(d, []).append(s)
    mixed: list[tuple[int, int]] = []
    cursors = dict.fromkeys(by_dev, 0)
    for k in order.tolist():
        d = arrivals[k][0]
        mixed.append((d, by_dev[d][cursors[d]]))
        cursors[d] += 1
    g = SeqGaps()
    feed(g, mixed, data.draw(st.integers(1, 500)))
    for d, seqs in by_dev.items():
        distinct = set(seqs)
        assert g.gap[d] == max(distinct) - min(distinct) + 1 - len(distinct), d


def test_a_device_that_restarts_its_numbering_is_not_a_gap() -> None:
    g = SeqGaps()
    feed(g, [(0, s) for s in range(1000)], 100)
    feed(g, [(0, s) for s in range(0, 500) if s != 250], 100)  # rebooted; one lost
    assert g.gap[0] == 1
    feed(g, [(0, 250)], 1)  # the straggler arrives after all
    assert g.gap[0] == 0


def test_batches_and_single_readings_agree() -> None:
    rng = np.random.default_rng(5)
    seqs = np.r_[np.arange(0, 400), np.arange(0, 300), np.arange(301, 900)]
    seqs = seqs[rng.random(len(seqs)) > 0.1]
    dev = rng.integers(0, 3, len(seqs))
    a, b = SeqGaps(), SeqGaps()
    feed(a, list(zip(dev.tolist(), seqs.tolist(), strict=True)), 1)
    feed(b, list(zip(dev.tolist(), seqs.tolist(), strict=True)), 97)
    assert a.gap[:3].tolist() == b.gap[:3].tolist()
    assert a.hi[:3].tolist() == b.hi[:3].tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.one_of(st.integers(0, 300),
                                                        st.integers(0, 2**62))), min_size=1))
def test_distinct_pairs_by_either_sort_are_numpys_unique(pairs: list[tuple[int, int]]) -> None:
    """The gap count's (device, seq) pairs, whether the batch's numbers fit one combined sort
    key or need the two-key sort (numbers spread over more than 2**62 / devices)."""
    device = np.array([d for d, _ in pairs], np.int64)
    seq = np.array([s for _, s in pairs], np.int64)
    want = np.unique(np.stack([device, seq]), axis=1)
    d, s = _distinct_pairs(device, seq)
    assert d.tolist() == want[0].tolist()
    assert s.tolist() == want[1].tolist()
