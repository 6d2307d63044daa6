"""Dropping duplicate readings: the same device and sequence number, or the same device, event
time and value (a device or a broker re-sending what was already delivered).

Two sorted code arrays remember recent readings, vectorised like the window state:

* ``(device, seq)``: a match counts as a duplicate only if its event time is within
  ``seq_tolerance_ms`` of the remembered one, so a device that reboots and restarts its counter
  is not mistaken for a replay.
* ``hash(device, event time, value bits)``: a 64-bit mix; a collision between two different
  readings needs ~2^32 readings in the retention horizon of one gateway.

Entries are forgotten once their reading would be beyond allowed lateness anyway (their event time
is older than the device's watermark minus the horizon), so memory is bounded by the readings of
the last ``horizon_ms``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64, NO_SEQ

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(dev: I64, ts: I64, value: F64) -> I64:
    with np.errstate(over="ignore"):
        h = dev.astype(np.uint64) * _M1
        h ^= ts.astype(np.uint64) * _M2
        h ^= value.view(np.uint64) * _M3
        h ^= h >> np.uint64(31)
        h *= _M2
        h ^= h >> np.uint64(29)
    return h.view(np.int64)


class _CodeSet:
    """A sorted set of int64 codes with the event time and device of each."""

    def __init__(self) -> None:
        self.codes: I64 = np.empty(0, np.int64)
        self.ts: I64 = np.empty(0, np.int64)
        self.dev: I64 = np.empty(0, np.int64)

    def lookup(self, codes: I64) -> tuple[npt.NDArray[np.bool_], I64]:
        pos = np.searchsorted(self.codes, codes)
        pos = np.minimum(pos, max(len(self.codes) - 1, 0))
        if len(self.codes) == 0:
            return np.zeros(len(codes), bool), np.zeros(len(codes), np.int64)
        hit = self.codes[pos] == codes
        return hit, self.ts[pos]

    def upsert(self, codes: I64, ts: I64, dev: I64) -> None:
        if len(codes) == 0:
            return
        uniq, first = np.unique(codes, return_index=True)
        pos = np.searchsorted(self.codes, uniq)
        hit = pos < len(self.codes)
        hit[hit] = self.codes[pos[hit]] == uniq[hit]
        self.ts[pos[hit]] = ts[first[hit]]
        miss = ~hit
        self.codes = np.insert(self.codes, pos[miss], uniq[miss])
        self.ts = np.insert(self.ts, pos[miss], ts[first[miss]])
        self.dev = np.insert(self.dev, pos[miss], dev[first[miss]])

    def expire(self, older_than: I64) -> None:
        """Forget entries whose event time is below ``older_than[device]``."""
        if len(self.codes):
            keep = self.ts >= older_than[self.dev]
            self.codes, self.ts, self.dev = self.codes[keep], self.ts[keep], self.dev[keep]

    def __len__(self) -> int:
        return len(self.codes)


class DuplicateFilter:
    def __init__(self, *, seq_tolerance_ms: int = 60_000) -> None:
        self.seq_tolerance_ms = seq_tolerance_ms
        self._seq = _CodeSet()
        self._tv = _CodeSet()

    def __len__(self) -> int:
        return len(self._seq) + len(self._tv)

    def check(self, dev: I64, ts: I64, value: F64, seq: I64) -> npt.NDArray[np.bool_]:
        """Mask of duplicates (of remembered readings or of earlier rows of this batch);
        remembers the others."""
        n = len(dev)
        dup = np.zeros(n, bool)
        if n == 0:
            return dup
        has_seq = seq != NO_SEQ
        seq_codes = (dev << 43) | (seq & ((1 << 43) - 1))
        tv_codes = _mix(dev, ts, value)
        # against what was remembered
        hit, seen_ts = self._seq.lookup(seq_codes)
        dup |= has_seq & hit & (np.abs(seen_ts - ts) <= self.seq_tolerance_ms)
        hit, _ = self._tv.lookup(tv_codes)
        dup |= hit
        # within the batch: a later row repeating an earlier one
        for codes, use in ((seq_codes, has_seq), (tv_codes, np.ones(n, bool))):
            idx = np.flatnonzero(use & ~dup)
            if len(idx) < 2:
                continue
            c = codes[idx]
            order = np.argsort(c, kind="stable")
            cs = c[order]
            same = np.zeros(len(cs), bool)
            same[1:] = cs[1:] == cs[:-1]
            if not same.any():
                continue
            first_of = np.maximum.accumulate(np.where(~same, np.arange(len(cs)), 0))
            rep = idx[order]
            first_rows = rep[first_of]
            close = np.abs(ts[rep] - ts[first_rows]) <= self.seq_tolerance_ms
            dup[rep[same & (close | (codes is tv_codes))]] = True
        keep = ~dup
        self._seq.upsert(seq_codes[keep & has_seq], ts[keep & has_seq], dev[keep & has_seq])
        self._tv.upsert(tv_codes[keep], ts[keep], dev[keep])
        return dup

    def expire(self, older_than: I64) -> None:
        self._seq.expire(older_than)
        self._tv.expire(older_than)

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"dup_seq_codes": self._seq.codes, "dup_seq_ts": self._seq.ts,
                "dup_seq_dev": self._seq.dev, "dup_tv_codes": self._tv.codes,
                "dup_tv_ts": self._tv.ts, "dup_tv_dev": self._tv.dev}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]]) -> None:
        for name, store in (("seq", self._seq), ("tv", self._tv)):
            store.codes = snap[f"dup_{name}_codes"].astype(np.int64)
            store.ts = snap[f"dup_{name}_ts"].astype(np.int64)
            store.dev = snap[f"dup_{name}_dev"].astype(np.int64)
