"""Sequence gaps: readings a device sent that never reached the agent.

A device numbers its readings (``seq``, per device, across its metrics). Whatever is lost
upstream of the agent (a broker that shed its queue, a device's own radio) leaves a hole in that
numbering, and a hole is all the agent can ever see of it: this counts them per device, so the
ledger says what was lost before the agent and the oracle's ``lost`` has a number to match.

Per device: the highest ``seq`` seen (``hi``) and which of the 64 numbers up to it were seen (a
bitmap). A reading above ``hi`` opens a gap of the numbers it skipped; one that fills a hole later
(reordered, delayed) closes one; a repeat of a number seen is nothing new. A number far below
``hi`` (more than half of it, and beyond the bitmap) is a device that restarted its numbering:
its count starts again, and nothing is counted for it. The gap count is what is missing *now*:
it goes down again as stragglers arrive. Readings without a number (``seq`` < 0) are not
tracked. All of it is columnar: one batch at a time, whatever its size.
"""

from __future__ import annotations

import numpy as np

from devices.readings import capacity

WIDTH = 64  # how far behind the highest number a late reading is still told from a repeat


def _distinct_of_sorted(a: np.ndarray) -> np.ndarray:
    """The distinct values of an already sorted array."""
    keep = np.ones(len(a), bool)
    keep[1:] = a[1:] != a[:-1]
    return a[keep]


def _sorted_distinct(a: np.ndarray) -> np.ndarray:
    """``np.unique`` by one sort (numpy 2's hashing ``unique`` is several times slower on the
    batch sizes here)."""
    return _distinct_of_sorted(np.sort(a))


def _distinct_pairs(device: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct (device, seq) pairs, ordered by device then seq: one sort of a combined key
    when the numbers of the batch span a range that fits beside the device ids (always, in
    practice), else a two-key sort."""
    lo = int(seq.min())
    span = int(seq.max()) - lo + 1
    if span * (int(device.max()) + 1) < 2**62:
        key = _sorted_distinct(device * span + (seq - lo))
        return key // span, key % span + lo
    order = np.lexsort((seq, device))
    device, seq = device[order], seq[order]
    first = np.ones(len(device), bool)
    first[1:] = (device[1:] != device[:-1]) | (seq[1:] != seq[:-1])
    return device[first], seq[first]


class SeqGaps:
    def __init__(self) -> None:
        self.hi = np.zeros(0, np.int64)  # highest seq seen per device (-1: none yet)
        self.lo = np.zeros(0, np.int64)  # lowest seq seen since it (re)started counting
        self.seen = np.zeros(0, np.uint64)  # bit k: seq hi - k was seen
        self.gap = np.zeros(0, np.int64)  # numbers skipped and not (yet) arrived

    def _grow(self, n: int) -> None:
        if n > len(self.hi):
            size = capacity(n)
            for name, fill in (("hi", -1), ("lo", 0), ("seen", 0), ("gap", 0)):
                old = getattr(self, name)
                new = np.full(size, fill, old.dtype)
                new[: len(old)] = old
                setattr(self, name, new)

    def observe(self, device: np.ndarray, seq: np.ndarray) -> np.ndarray:
        """Take one batch of (device, seq) in arrival order (repeats already judged duplicates
        left out, or not: a repeat inside the bitmap is recognised). Returns the change of each
        device's gap count (indexed by device; length: devices known)."""
        keep = seq >= 0
        device = device[keep].astype(np.int64)
        seq = seq[keep].astype(np.int64)
        n_dev = int(device.max()) + 1 if len(device) else 0
        self._grow(n_dev)
        before = self.gap.copy()
        if not len(device):
            return self.gap - before
        hi_old = self.hi[device]
        restart = (hi_old >= 0) & (seq <= hi_old - WIDTH) & (seq < hi_old // 2)
        if restart.any():  # rare: in arrival order, one reading at a time
            for d in np.unique(device[restart]).tolist():
                mine = device == d
                for s in seq[mine].tolist():
                    self._one(d, s)
            rest = ~np.isin(device, device[restart])
            device, seq = device[rest], seq[rest]
            if not len(device):
                return self.gap - before
        # distinct (device, seq) pairs of the batch
        device, seq = _distinct_pairs(device, seq)
        hi_old = self.hi[device]
        fresh = hi_old < 0
        # numbers within the bitmap that were already seen are repeats
        behind = hi_old - seq
        near = ~fresh & (behind >= 0) & (behind < WIDTH)
        bit = np.left_shift(np.uint64(1), np.where(near, behind, 0).astype(np.uint64))
        repeat = near & ((self.seen[device] & bit) != 0)
        device, seq = device[~repeat], seq[~repeat]
        if not len(device):
            return self.gap - before
        devs = _distinct_of_sorted(device)  # the pairs came sorted by device
        new_count = np.bincount(device, minlength=n_dev)[devs]
        top = np.full(n_dev, np.iinfo(np.int64).min, np.int64)
        np.maximum.at(top, device, seq)
        low = np.full(n_dev, np.iinfo(np.int64).max, np.int64)
        np.minimum.at(low, device, seq)
        old = self.hi[devs]
        # a device seen for the first time: what came before its first number is not known
        base = np.where(old < 0, low[devs] - 1, old)
        base_lo = np.where(old < 0, low[devs], self.lo[devs])
        new_hi = np.maximum(base, top[devs])
        new_lo = np.minimum(base_lo, low[devs])  # a straggler from before the first seen
        gap = self.gap[devs] + (new_hi - base) + (base_lo - new_lo) - new_count
        self.lo[devs] = new_lo
        self.gap[devs] = np.maximum(gap, 0)
        shift = np.where(old < 0, WIDTH, new_hi - old)
        kept = np.where(shift >= WIDTH, np.uint64(0),
                        np.left_shift(self.seen[devs], np.minimum(shift, WIDTH - 1)
                                      .astype(np.uint64)))
        self.seen[devs] = kept
        self.hi[devs] = new_hi
        back = self.hi[device] - seq
        inside = back < WIDTH
        bits = np.left_shift(np.uint64(1), back[inside].astype(np.uint64))
        np.bitwise_or.at(self.seen, device[inside], bits)
        return self.gap - before

    def _one(self, d: int, s: int) -> None:
        hi = int(self.hi[d])
        if hi < 0:
            self.hi[d], self.lo[d], self.seen[d] = s, s, np.uint64(1)
        elif s > hi:
            self.gap[d] += s - hi - 1
            shift = s - hi
            self.seen[d] = (np.uint64(0) if shift >= WIDTH else
                            np.left_shift(self.seen[d], np.uint64(shift))) | np.uint64(1)
            self.hi[d] = s
        elif hi - s < WIDTH:
            bit = np.left_shift(np.uint64(1), np.uint64(hi - s))
            if not self.seen[d] & bit:
                self.seen[d] |= bit
                self._fill(d, s)
        elif s < hi // 2:  # the device started counting again
            self.hi[d], self.lo[d], self.seen[d] = s, s, np.uint64(1)
        else:  # a straggler from far behind
            self._fill(d, s)

    def _fill(self, d: int, s: int) -> None:
        lo = int(self.lo[d])
        if s < lo:  # from before the first number seen: the numbers between are missing too
            self.gap[d] += lo - s - 1
            self.lo[d] = s
        else:
            self.gap[d] = max(0, int(self.gap[d]) - 1)

    def reset(self, ids: np.ndarray) -> int:
        """Ids released for other devices: as if never seen; returns the gaps they had."""
        mine = ids[ids < len(self.hi)]
        had = int(self.gap[mine].sum())
        self.hi[mine] = -1
        self.lo[mine] = 0
        self.seen[mine] = 0
        self.gap[mine] = 0
        return had

    def snapshot(self) -> dict[str, np.ndarray]:
        return {"gaps_hi": self.hi, "gaps_lo": self.lo, "gaps_seen": self.seen,
                "gaps_gap": self.gap}

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        if "gaps_hi" in snap:
            self.hi = snap.pop("gaps_hi").astype(np.int64)
            self.lo = snap.pop("gaps_lo").astype(np.int64)
            self.seen = snap.pop("gaps_seen").astype(np.uint64)
            self.gap = snap.pop("gaps_gap").astype(np.int64)
