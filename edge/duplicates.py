"""Dropping duplicate readings (a device or a broker re-sending what was already delivered).

A reading is identified within its device by its sequence number when it has one (``seq >= 0``),
otherwise by its event time and value. Each device has ``memory`` slots (default 32) of each kind:

* **readings with a seq**: slot ``seq % memory`` holds the last seq that landed there, so the
  device's last ``memory`` sequence numbers are remembered and a lookup is one comparison per
  reading, with no search. Fast path, the steady state of a fleet: every seq of the batch is
  above its device's high-water mark (never seen) and none comes twice, which a per-device sum of
  ``2^(seq - mark)`` proves (equal powers of two would carry, losing a bit); the slots are then
  only written. Otherwise the slots are read, and repeats within the batch found by scattering
  row numbers into a scratch table of the same shape and reading them back: when every row reads
  its own number no two rows share a slot; only the rows of shared slots are sorted. O(n), no
  sort in the common case. A counter far below its mark (a reboot) moves the mark down.
* **readings without seq**: a ring of hashes of (event time, value), filled in arrival order and
  compared whole; repeats within the batch by a sort. Allocated on the first such reading, so a
  fleet that numbers its readings pays nothing for it.

Why slots per device rather than a set of everything within the lateness horizon: memory is
fixed (``devices x memory x 12`` bytes per kind: under 4 MB for 10,000 devices) and a lookup is
one vectorised comparison, with no sorted inserts. The price is documented: a re-delivery is
recognised when its original is among the device's last ``memory`` sequence numbers (or, without
seq, its last ``memory`` readings), which covers broker re-deliveries (they come right after a
reconnect) and devices re-sending a short buffer; a device whose counter restarts after a reboot
is not mistaken for a replay unless it reboots within ``memory`` readings of its previous start.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
EMPTY = np.int64(-1)
_HASH_FLAG = np.int64(1 << 62)  # set in every hash code (as in checkpoints of the shared ring)
_CHUNK = 8_192
_FREE = np.iinfo(np.int32).max  # scratch holds row numbers of one batch (< 2^31)
_POW2 = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
_popcount = getattr(np, "bitwise_count", None)  # numpy >= 2.0


def _tv_code(ts: I64, value: F64) -> I64:
    """A 61-bit mix of event time and value bits, flagged (never EMPTY)."""
    with np.errstate(over="ignore"):
        h = ts.astype(np.uint64) * _M1
        h ^= value.view(np.uint64) * _M2
        h ^= h >> np.uint64(31)
        h *= _M3
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(3)).view(np.int64) | _HASH_FLAG


def _repeats(keys: tuple[I64, ...]) -> npt.NDArray[np.bool_]:
    """Rows equal in every key to an earlier row (the first occurrence is not a repeat)."""
    out = np.zeros(len(keys[0]), bool)
    if len(out) < 2:
        return out
    order = np.lexsort(keys[::-1])  # stable: equal rows stay in arrival order
    same = np.ones(len(order), bool)
    same[0] = False
    for k in keys:
        s = k[order]
        same[1:] &= s[1:] == s[:-1]
    out[order[same]] = True
    return out


class DuplicateFilter:
    def __init__(self, *, memory: int = 32) -> None:
        if memory < 1:
            raise ValueError("dedup memory must be >= 1 reading per device")
        self.memory = memory
        self.devices = 0
        # (devices, memory) each, or (0, memory) until the first reading of that kind
        self.seq_ring: npt.NDArray[np.int64] = np.full((0, memory), EMPTY, np.int64)
        self.hash_ring: npt.NDArray[np.int64] = np.full((0, memory), EMPTY, np.int64)
        self.pos: I64 = np.zeros(0, np.int64)  # next hash slot per device
        self.high: I64 = np.zeros(0, np.int64)  # highest seq per device since its counter started
        self._scratch: npt.NDArray[np.int32] = np.full((0, memory), _FREE, np.int32)

    def _ensure(self, n: int, *, seq: bool, hashed: bool) -> None:
        if n > self.devices:
            self.devices = max(n, self.devices * 5 // 4, 64)
        rows = self.devices

        def grown(a: npt.NDArray[np.int64], used: bool) -> npt.NDArray[np.int64] | None:
            if not (len(a) or used) or len(a) >= rows:
                return None
            out = np.full((rows, self.memory), EMPTY, np.int64)
            out[: len(a)] = a
            return out

        if (ring := grown(self.seq_ring, seq)) is not None:
            self.seq_ring = ring
            self._scratch = np.full((rows, self.memory), _FREE, np.int32)
            high = np.full(rows, -1, np.int64)
            high[: len(self.high)] = self.high
            self.high = high
        if (ring := grown(self.hash_ring, hashed)) is not None:
            self.hash_ring = ring
            pos = np.zeros(rows, np.int64)
            pos[: len(self.pos)] = self.pos
            self.pos = pos

    def check(self, dev: I64, ts: I64, value: F64, seq: I64) -> npt.NDArray[np.bool_]:
        """Mask of duplicates; the others are remembered."""
        n = len(dev)
        if n == 0:
            return np.zeros(0, bool)
        numbered = seq >= 0
        every = bool(numbered.all())
        s = None if every else np.flatnonzero(numbered)
        self._ensure(int(dev.max()) + 1, seq=s is None or len(s) > 0, hashed=s is not None)
        if s is None:
            return self._check_seq(dev, seq)
        dup = np.zeros(n, bool)
        if len(s):
            dup[s] = self._check_seq(dev[s], seq[s])
        h = np.flatnonzero(~numbered)
        dup[h] = self._check_hashed(dev[h], _tv_code(ts[h], value[h]))
        return dup

    def _check_seq(self, dev: I64, seq: I64) -> npt.NDArray[np.bool_]:
        m = self.memory
        slot = seq & (m - 1) if m & (m - 1) == 0 else seq % m
        flat = dev * m + slot
        ring = self.seq_ring.reshape(-1)
        if _popcount is not None:
            # fast path: every seq is above its device's high-water mark (so never seen), by
            # less than 64, and no (device, seq) comes twice: the sum per device of 2^offset
            # then has one bit per row, as adding equal powers of two carries
            off = seq - self.high[dev] - 1
            if bool((off.view(np.uint64) < 64).all()):
                bits = np.zeros(len(self.high), np.uint64)
                np.add.at(bits, dev, _POW2[off])
                if int(_popcount(bits).sum()) == len(seq):
                    ring[flat] = seq
                    np.maximum.at(self.high, dev, seq)
                    return np.zeros(len(seq), bool)
        dup: npt.NDArray[np.bool_] = ring[flat] == seq
        # repeats within the batch: rows sharing a slot. After a plain scatter of row numbers
        # every row reads its own back only if no two rows share one, whichever write won.
        scratch = self._scratch.reshape(-1)
        rows = np.arange(len(flat), dtype=np.int32)
        scratch[flat] = rows
        shared = scratch[flat] != rows
        if shared.any():  # the rows of shared slots, sorted by (device, seq) in arrival order
            involved = np.zeros(len(flat), bool)
            involved[shared] = True
            involved[scratch[flat[shared]]] = True
            r = np.flatnonzero(involved)
            dup[r] |= _repeats((dev[r], seq[r]))
            keep = ~involved
            ring[flat[keep]] = seq[keep]
            ring[flat[r]] = EMPTY  # a shared slot remembers its highest seq of the batch
            np.maximum.at(ring, flat[r], seq[r])
        else:
            ring[flat] = seq
        newest = np.full(len(self.high), -1, np.int64)
        np.maximum.at(newest, dev, seq)
        # a counter far below its high-water mark restarted (a reboot): follow it
        restart = (newest >= 0) & (newest < self.high - m)
        self.high = np.where(restart, newest, np.maximum(self.high, newest))
        return dup

    def _check_hashed(self, dev: I64, code: I64) -> npt.NDArray[np.bool_]:
        m = self.memory
        dup = np.zeros(len(dev), bool)
        for lo in range(0, len(dev), _CHUNK):  # bounded temporary memory
            hi = min(lo + _CHUNK, len(dev))
            dup[lo:hi] = (self.hash_ring[dev[lo:hi]] == code[lo:hi, None]).any(axis=1)
        dup |= _repeats((dev, code))
        new = np.flatnonzero(~dup)
        if len(new):  # appended in arrival order, each device from its ring position on
            sd = dev[new]
            o = np.argsort(sd, kind="stable")
            sd_s = sd[o]
            first = np.ones(len(sd_s), bool)
            first[1:] = sd_s[1:] != sd_s[:-1]
            rank = np.arange(len(sd_s)) - np.maximum.accumulate(
                np.where(first, np.arange(len(sd_s)), 0))
            self.hash_ring.reshape(-1)[sd_s * m + (self.pos[sd_s] + rank) % m] = code[new[o]]
            np.add.at(self.pos, sd_s, 1)
            self.pos[sd_s] %= m
        return dup

    def nbytes(self) -> int:
        return int(self.seq_ring.nbytes + self.hash_ring.nbytes + self.pos.nbytes
                   + self.high.nbytes + self._scratch.nbytes)

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"dup_seq_ring": self.seq_ring, "dup_hash_ring": self.hash_ring,
                "dup_pos": self.pos, "dup_high": self.high}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]]) -> None:
        m = self.memory
        if "dup_seq_ring" in snap:
            seq_ring = snap["dup_seq_ring"].astype(np.int64)
            hash_ring = snap["dup_hash_ring"].astype(np.int64)
        else:  # written before the split: one ring of seqs and flagged hashes in arrival order
            old = snap["dup_ring"].astype(np.int64)
            if old.ndim != 2 or old.shape[1] != m:
                raise ValueError(f"checkpoint dedup memory {old.shape[1:]} != configured {m}")
            flagged = old >= _HASH_FLAG
            hash_ring = np.where(flagged, old, EMPTY)
            seq_ring = np.full(old.shape, EMPTY, np.int64)
            numbered = (old >= 0) & ~flagged
            d = np.nonzero(numbered)[0]
            np.maximum.at(seq_ring.reshape(-1), d * m + old[numbered] % m, old[numbered])
        for name, ring in (("seq", seq_ring), ("hash", hash_ring)):
            if ring.ndim != 2 or ring.shape[1] != m:
                raise ValueError(f"checkpoint dedup memory {ring.shape[1:]} != configured {m} "
                                 f"({name} slots)")
        self.seq_ring, self.hash_ring = seq_ring, hash_ring
        self.pos = snap["dup_pos"].astype(np.int64)
        if len(self.hash_ring) == 0:
            self.pos = np.zeros(0, np.int64)
        self.devices = max(len(self.seq_ring), len(self.hash_ring))
        self._scratch = np.full((len(self.seq_ring), m), _FREE, np.int32)
        # the high-water marks (derived from the slots for checkpoints that lack them)
        high = snap["dup_high"].astype(np.int64) if "dup_high" in snap else np.zeros(0, np.int64)
        if len(high) != len(self.seq_ring):
            high = self.seq_ring.max(axis=1, initial=-1)
        self.high = high
