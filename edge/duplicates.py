"""Dropping duplicate readings (a device or a broker re-sending what was already delivered).

A reading is identified within its device by its sequence number when it has one, otherwise by
its event time and value. Each device keeps a ring of the codes of its last ``memory`` readings
(default 32): a reading whose code is in its device's ring, or in an earlier row of the same
micro-batch, is a duplicate.

Fast path: most readings carry the next sequence numbers of their device. A reading whose seq is
above its device's high-water mark (by less than ``memory``) cannot be in the ring; repeats of it
within the batch are found by scattering row numbers into a scratch table indexed by (device,
seq offset), O(n) with no sort. Only the other readings pay for the ring comparison and a sort.

Why a ring per device rather than a set of everything within the lateness horizon: memory is
fixed (``devices x memory x 12`` bytes: under 4 MB for 10,000 devices) and a lookup is one
vectorised comparison, with no sorted inserts. The price is documented: a re-delivery is
recognised when its original is among the device's last ``memory`` readings, which covers broker
re-deliveries (they come right after a reconnect) and devices re-sending a short buffer; a
device whose counter restarts after a reboot is not mistaken for a replay unless it reboots
within ``memory`` readings of its previous start.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64, NO_SEQ

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
EMPTY = np.int64(-1)
_HASH_FLAG = np.int64(1 << 62)  # codes of readings without seq; seqs stay below 2^62
_CHUNK = 8_192
_FREE = np.iinfo(np.int32).max  # scratch holds row numbers of one batch (< 2^31)


def _tv_code(ts: I64, value: F64) -> I64:
    """A 61-bit mix of event time and value bits (top bits clear, then the flag set)."""
    with np.errstate(over="ignore"):
        h = ts.astype(np.uint64) * _M1
        h ^= value.view(np.uint64) * _M2
        h ^= h >> np.uint64(31)
        h *= _M3
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(3)).view(np.int64) | _HASH_FLAG


class DuplicateFilter:
    def __init__(self, *, memory: int = 32) -> None:
        if memory < 1:
            raise ValueError("dedup memory must be >= 1 reading per device")
        self.memory = memory
        self.ring: npt.NDArray[np.int64] = np.full((0, memory), EMPTY, np.int64)
        self.pos: I64 = np.zeros(0, np.int64)
        self.high: I64 = np.zeros(0, np.int64)  # highest seq remembered per device (-1: none)
        self._scratch: npt.NDArray[np.int32] = np.full((0, memory), _FREE, np.int32)

    def _ensure(self, n: int) -> None:
        if n > len(self.pos):
            grow = max(n, len(self.pos) * 5 // 4, 64)
            ring = np.full((grow, self.memory), EMPTY, np.int64)
            ring[: len(self.pos)] = self.ring
            pos = np.zeros(grow, np.int64)
            pos[: len(self.pos)] = self.pos
            high = np.full(grow, -1, np.int64)
            high[: len(self.high)] = self.high
            self.ring, self.pos, self.high = ring, pos, high
            self._scratch = np.full((grow, self.memory), _FREE, np.int32)

    def codes(self, ts: I64, value: F64, seq: I64) -> I64:
        code = seq & (_HASH_FLAG - 1)
        no_seq = np.flatnonzero(seq == NO_SEQ)
        if len(no_seq):
            code[no_seq] = _tv_code(ts[no_seq], value[no_seq])
        return code

    def check(self, dev: I64, ts: I64, value: F64, seq: I64) -> npt.NDArray[np.bool_]:
        """Mask of duplicates; the others are remembered."""
        n = len(dev)
        if n == 0:
            return np.zeros(0, bool)
        self._ensure(int(dev.max()) + 1)
        code = self.codes(ts, value, seq)
        dup = np.zeros(n, bool)
        rows = np.arange(n)
        off = seq - self.high[dev] - 1
        # 0 <= off < memory in one unsigned comparison; a reading without seq (NO_SEQ = -1)
        # always has off < 0, as high >= -1
        fast = off.view(np.uint64) < self.memory
        every = bool(fast.all())
        f = rows if every else rows[fast]
        if len(f):
            flat = (dev * self.memory + off) if every else dev[f] * self.memory + off[f]
            scratch = self._scratch.reshape(-1)
            f32 = f.astype(np.int32)
            # repeats within the batch share a scratch slot: after a plain scatter at most one
            # of them reads its own row back, so all reading back their own rows proves there
            # are none, whichever write won; only then is the order-exact minimum needed
            scratch[flat] = f32
            if not (scratch[flat] == f32).all():
                np.minimum.at(scratch, flat, f32)  # the first occurrence keeps its row
                dup[f] = scratch[flat] != f32
            scratch[flat] = _FREE
        slow = np.empty(0, np.int64) if every else rows[~fast]
        if len(slow):
            sd, sc = dev[slow], code[slow]
            for lo in range(0, len(slow), _CHUNK):  # bounded temporary memory
                hi = min(lo + _CHUNK, len(slow))
                dup[slow[lo:hi]] = (self.ring[sd[lo:hi]] == sc[lo:hi, None]).any(axis=1)
            order = np.lexsort((sc, sd))  # stable: equal (device, code) stay in arrival order
            same = np.zeros(len(slow), bool)
            same[1:] = (sd[order][1:] == sd[order][:-1]) & (sc[order][1:] == sc[order][:-1])
            dup[slow[order[same]]] = True
        self._remember(dev, code, seq, off, fast, dup)
        return dup

    def _remember(self, dev: I64, code: I64, seq: I64, off: I64,
                  fast: npt.NDArray[np.bool_], dup: npt.NDArray[np.bool_]) -> None:
        m = self.memory
        keep = fast & ~dup
        new_fast = None if keep.all() else np.flatnonzero(keep)
        if new_fast is None or len(new_fast):  # distinct offsets per device: distinct slots
            fd = dev if new_fast is None else dev[new_fast]
            fo = off if new_fast is None else off[new_fast]
            slot = self.pos[fd] + fo
            slot = slot & (m - 1) if m & (m - 1) == 0 else slot % m
            self.ring.reshape(-1)[fd * m + slot] = code if new_fast is None else code[new_fast]
            adv = np.zeros(len(self.pos), np.int64)
            np.maximum.at(adv, fd, fo + 1)
            self.pos += adv
            self.pos %= m
            np.maximum.at(self.high, fd, seq if new_fast is None else seq[new_fast])
        new_slow = np.flatnonzero(~fast & ~dup)
        if len(new_slow):
            sd = dev[new_slow]
            o = np.argsort(sd, kind="stable")
            sd_s = sd[o]
            first = np.ones(len(sd_s), bool)
            first[1:] = sd_s[1:] != sd_s[:-1]
            rank = np.arange(len(sd_s)) - np.maximum.accumulate(
                np.where(first, np.arange(len(sd_s)), 0))
            self.ring.reshape(-1)[sd_s * m + (self.pos[sd_s] + rank) % m] = code[new_slow[o]]
            np.add.at(self.pos, sd_s, 1)
            self.pos[sd_s] %= m
            s = seq[new_slow]
            with_seq = s != NO_SEQ
            if with_seq.any():
                d2, s2 = sd[with_seq], s[with_seq]
                above = s2 > self.high[d2]
                np.maximum.at(self.high, d2[above], s2[above])
                # a counter far below the high-water mark restarted (a reboot): follow it
                reset = s2 < self.high[d2] - m
                if reset.any():
                    newest = np.full(len(self.high), -1, np.int64)
                    np.maximum.at(newest, d2[reset], s2[reset])
                    moved = newest >= 0
                    self.high[moved] = newest[moved]

    def nbytes(self) -> int:
        return int(self.ring.nbytes + self.pos.nbytes + self.high.nbytes + self._scratch.nbytes)

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"dup_ring": self.ring, "dup_pos": self.pos, "dup_high": self.high}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]]) -> None:
        ring = snap["dup_ring"].astype(np.int64)
        if ring.ndim != 2 or ring.shape[1] != self.memory:
            raise ValueError(f"checkpoint dedup memory {ring.shape[1:]} != configured "
                             f"{self.memory}")
        self.ring = ring
        self.pos = snap["dup_pos"].astype(np.int64)
        self.high = snap["dup_high"].astype(np.int64)
        self._scratch = np.full(ring.shape, _FREE, np.int32)
