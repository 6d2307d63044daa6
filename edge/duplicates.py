"""Dropping duplicate readings (a device or a broker re-sending what was already delivered).

A reading is identified within its device by its sequence number when it has one (``seq >= 0``),
otherwise by its metric, event time and value. Each device remembers ``memory`` readings or more
of each kind:

* **readings with a seq**: a bitmap. The seqs of a device are cut into blocks of 64; each device
  has ``words`` 64-bit words (a power of two, enough for ``memory`` consecutive seqs), word
  ``block % words`` holding one bit per seq of the newest block that landed there, with that
  block's number as its tag. A seq was seen iff its word's tag is its block and its bit is set:
  one comparison per reading, with no search, and 16 bytes per 64 seqs (a slot per seq of 8
  bytes each was 32 times that: 10 MB of a 10,000-device gateway's memory). A reading of an
  older block than its word holds is forgotten, never mistaken for a repeat: the filter never
  calls a reading a duplicate that it did not see. Per batch, O(n) with no sort in the common
  case: the words are read only for rows at or below their device's high-water mark (in the
  steady state of a fleet every seq is above it: never seen); the bits each word gets from the
  batch are summed (a scatter of row numbers into a scratch table of the words, read back,
  picks a row to stand for each word), and when every row of a word is of one block and the
  sum has one bit per row (equal powers of two would carry, losing one) no (device, seq) came
  twice and the words take the sums. Otherwise a sort finds the repeats. A counter far below
  its mark (a reboot) moves the mark down and clears the device's words.
* **readings without seq**: a ring of hashes of (event time, value), filled in arrival order and
  compared whole; repeats within the batch by a sort. Allocated on the first such reading, so a
  fleet that numbers its readings pays nothing for it. A reading with neither a seq nor a time
  of its own (placed at its receipt, ``STAMPED_SEQ``) is never a duplicate: two of the same
  value received in the same millisecond are two readings.

Why per-device memory rather than a set of everything within the lateness horizon: a lookup is
one vectorised comparison, with no sorted inserts, and memory is ``devices x memory x 20`` bytes
at most (less than one of them for numbered readings). The width is not a guess left to the
operator: the filter learns how many readings the busiest device sends within the horizon (the
engine's out-of-orderness + lateness + longest window, the time within which a reading can
still change a window) and widens every device's memory to twice that, before judging the batch
that showed it, up to ``MAX_BYTES`` in all. Readings the engine will drop as late anyway are not
shown to it at all, so a replay of old data neither counts as a duplicate nor washes the recent
readings out of the memory (RELIABILITY R8: an hour replayed twice leaves InfluxDB unchanged).
A device whose counter restarts after a reboot is followed: when its newest seq falls far below
its mark, or (given each device's newest event time so far, as the engine does where device
clocks are trusted) when a seq 0 or 1 it already sent in its current count comes again with an
event time newer than any it sent: a re-send carries the time of the reading it repeats, which
was seen, so only a new reading can be newer (a re-send stamped anew is still a repeat, unless
it is of seq 0 or 1); a seq 0 or 1 not seen before is no sign of a reboot, however new its time
(its sensor's reading arriving after later-numbered ones of the device's other sensors). A
device that crash-loops every minute re-uses the same few seqs at every boot: before this, each
boot's readings were taken for repeats of the last boot's.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from devices.readings import F64, I64, NO_SEQ, capacity
from edge.eventtime import NEVER, running_max_before

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
EMPTY = np.int64(-1)
_HASH_FLAG = np.int64(1 << 62)  # set in every hash code (as in checkpoints of the shared ring)
_CHUNK = 8_192
MAX_BYTES = 32 * 2**20  # what the duplicate memory may grow to, for all devices together
_POW2 = np.left_shift(np.uint64(1), np.arange(64, dtype=np.uint64))
_popcount = getattr(np, "bitwise_count", None)  # numpy >= 2.0
_LOW6 = np.int64(63)


def words_for(memory: int) -> int:
    """Bitmap words per device that hold at least ``memory`` consecutive seqs, whatever the
    newest seq's place in its block: a power of two (the word of a block is ``block & (w-1)``)."""
    need = -(-(memory - 1) // 64) + 1
    return 1 << (need - 1).bit_length()


def _bitmaps_from_seqs(held: I64, rows: I64, devices: int, words: int
                       ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]]:
    """Tags and bits of ``devices`` rows remembering the seqs ``held`` of devices ``rows``:
    where two blocks of a device want one word, the newer keeps it."""
    tags = np.full((devices, words), EMPTY, np.int64)
    bits = np.zeros((devices, words), np.uint64)
    if len(held):
        blk = held >> 6
        flat = rows * words + (blk & (words - 1))
        np.maximum.at(tags.reshape(-1), flat, blk)
        won = tags.reshape(-1)[flat] == blk
        np.bitwise_or.at(bits.reshape(-1), flat[won], _POW2[held[won] & _LOW6])
    return tags, bits


def _tv_code(ts: I64, value: F64, metric: I64 | None = None) -> I64:
    """A 61-bit mix of metric, event time and value bits, flagged (never EMPTY): two sensors
    of one device reading the same value at the same time are two readings, not a repeat."""
    with np.errstate(over="ignore"):
        h = ts.astype(np.uint64) * _M1
        h ^= value.view(np.uint64) * _M2
        if metric is not None:
            h ^= (metric.astype(np.uint64) + np.uint64(1)) * _M3
            h ^= h >> np.uint64(27)
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
    """``memory`` is where it starts: with ``horizon_ms`` (how far behind a device's newest
    reading one can still change a window), it grows, up to ``max_memory``, to twice the most
    readings any device sends within that horizon, so that every reading that could still be
    folded a second time is remembered (a device at 3 metrics x 1 Hz with a minute of windows
    and 30 s of lateness: some 280). Readings beyond the horizon never reach it (the engine
    drops them as late without asking), so a replay of old data cannot wash out the memory."""

    def __init__(self, *, memory: int = 32, horizon_ms: int = 0,
                 max_memory: int = 8_192) -> None:
        if memory < 1:
            raise ValueError("dedup memory must be >= 1 reading per device")
        self.memory = memory
        self.horizon_ms = horizon_ms
        self.max_memory = max(max_memory, memory)
        self.need = 0  # the most readings a device sent within one horizon (estimated)
        self.grown = 0  # times the memory grew
        self.anchor_seq: I64 = np.zeros(0, np.int64)  # per device: (seq, event time) a
        self.anchor_ts: I64 = np.zeros(0, np.int64)  # horizon ago, for the rate estimate
        self._counted: I64 = np.zeros(0, np.int64)  # readings since the anchor (no seq)
        self.devices = 0
        # seq bitmaps: (devices, words) tags (block numbers) and bits, or (0, words) until the
        # first numbered reading; the hash ring: (devices, memory), or (0, memory) until the
        # first reading without a seq
        self.words = words_for(memory)
        self.seq_tag: npt.NDArray[np.int64] = np.full((0, self.words), EMPTY, np.int64)
        self.seq_bits: npt.NDArray[np.uint64] = np.zeros((0, self.words), np.uint64)
        self.hash_ring: npt.NDArray[np.int64] = np.full((0, memory), EMPTY, np.int64)
        self.pos: I64 = np.zeros(0, np.int64)  # next hash slot per device
        self.high: I64 = np.zeros(0, np.int64)  # highest seq per device since its counter started

    def _ensure(self, n: int, *, seq: bool, hashed: bool) -> None:
        if n > self.devices:
            self.devices = capacity(n)
        rows = self.devices

        def grown(a: npt.NDArray[np.int64], used: bool) -> npt.NDArray[np.int64] | None:
            if not (len(a) or used) or len(a) >= rows:
                return None
            out = np.full((rows, a.shape[1]), EMPTY, np.int64)
            out[: len(a)] = a
            return out

        if (tag := grown(self.seq_tag, seq)) is not None:
            bits = np.zeros(tag.shape, np.uint64)
            bits[: len(self.seq_bits)] = self.seq_bits
            self.seq_tag, self.seq_bits = tag, bits
            high = np.full(rows, -1, np.int64)
            high[: len(self.high)] = self.high
            self.high = high
        if (ring := grown(self.hash_ring, hashed)) is not None:
            self.hash_ring = ring
            pos = np.zeros(rows, np.int64)
            pos[: len(self.pos)] = self.pos
            self.pos = pos

    def reset(self, ids: I64) -> None:
        """Ids released for other devices: nothing remembered of them."""
        for arr, fill in ((self.seq_tag, EMPTY), (self.seq_bits, 0), (self.hash_ring, EMPTY),
                          (self.pos, 0), (self.high, -1), (self.anchor_ts, -1),
                          (self.anchor_seq, 0), (self._counted, 0)):
            mine = ids[ids < len(arr)]
            if len(mine):
                arr[mine] = fill

    def check(self, dev: I64, ts: I64, value: F64, seq: I64, metric: I64 | None = None,
              newest_ts: I64 | None = None) -> npt.NDArray[np.bool_]:
        """Mask of duplicates; the others are remembered. ``newest_ts``: per device, the
        newest event time of what it sent so far (``NEVER``: none known), or None where event
        times are not the devices' own (a re-sent reading then has a new time)."""
        n = len(dev)
        if n == 0:
            return np.zeros(0, bool)
        numbered = seq >= 0
        every = bool(numbered.all())
        s = None if every else np.flatnonzero(numbered)
        h = None if every else np.flatnonzero(seq == NO_SEQ)  # (not those stamped at receipt)
        self._ensure(int(dev.max()) + 1, seq=s is None or len(s) > 0,
                     hashed=h is not None and len(h) > 0)
        if self.horizon_ms:
            self._learn_rate(dev, ts, seq, numbered)
        if s is None or h is None:
            return self._check_seq(dev, seq, ts, newest_ts)
        dup = np.zeros(n, bool)
        if len(s):
            dup[s] = self._check_seq(dev[s], seq[s], ts[s], newest_ts)
        if len(h):
            dup[h] = self._check_hashed(dev[h], _tv_code(ts[h], value[h],
                                                         None if metric is None else metric[h]))
        return dup

    def _learn_rate(self, dev: I64, ts: I64, seq: I64, numbered: npt.NDArray[np.bool_]) -> None:
        """Readings per device per horizon (from each device's numbering, or for readings
        without one, from their count); grow the memory before it falls short."""
        if len(self.anchor_ts) < self.devices:
            grow = self.devices - len(self.anchor_ts)
            self.anchor_ts = np.concatenate([self.anchor_ts, np.full(grow, -1, np.int64)])
            self.anchor_seq = np.concatenate([self.anchor_seq, np.zeros(grow, np.int64)])
            self._counted = np.concatenate([self._counted, np.zeros(grow, np.int64)])
        newest_ts = np.full(self.devices, -1, np.int64)
        np.maximum.at(newest_ts, dev, ts)
        newest_seq = np.full(self.devices, -1, np.int64)
        np.maximum.at(newest_seq, dev[numbered], seq[numbered])
        d = np.flatnonzero(newest_ts >= 0)
        fresh = d[self.anchor_ts[d] < 0]
        if len(fresh):  # a device's first readings count from just before them
            oldest_ts = np.full(self.devices, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(oldest_ts, dev, ts)
            oldest_seq = np.full(self.devices, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(oldest_seq, dev[numbered], seq[numbered])
            self.anchor_ts[fresh] = oldest_ts[fresh]
            self.anchor_seq[fresh] = np.where(newest_seq[fresh] >= 0, oldest_seq[fresh] - 1, -1)
            self._counted[fresh] = 0
        np.add.at(self._counted, dev, 1)
        by_seq = newest_seq[d] - self.anchor_seq[d]
        sent_d = np.where((newest_seq[d] >= 0) & (by_seq > 0), by_seq, self._counted[d])
        span = newest_ts[d] - self.anchor_ts[d]
        # a quarter of the horizon seen, or half the memory sent in less (a fast device):
        # the memory grows before this batch is judged, so nothing it holds is pushed out
        quarter = max(self.horizon_ms // 4, 1)
        ready = (span >= quarter) | (2 * sent_d >= self.memory)
        if not ready.any():
            return
        due, sent = d[ready], sent_d[ready]
        per_horizon = np.maximum(sent * self.horizon_ms // np.maximum(span[ready], quarter),
                                 sent)
        self.need = max(self.need, int(per_horizon.max()))
        self.anchor_ts[due] = newest_ts[due]
        self.anchor_seq[due] = newest_seq[due]
        self._counted[due] = 0
        # bounded in all: at most MAX_BYTES for every device's slots (seq, hash, and a batch's
        # scratch while it is judged)
        cap = min(self.max_memory, MAX_BYTES // (20 * max(self.devices, 1)))
        cap = 1 << (cap.bit_length() - 1) if cap >= 1 else 1
        if 2 * self.need > self.memory and self.memory < cap:
            self._resize(min(cap, 1 << (2 * self.need - 1).bit_length()))

    def _resize(self, m: int) -> None:
        """Widen every device's memory to ``m`` slots, keeping what each remembers."""
        old_m = self.memory
        words = words_for(m)
        if words != self.words:
            dev, seq = self.seqs_held()
            self.seq_tag, self.seq_bits = _bitmaps_from_seqs(seq, dev, len(self.seq_tag), words)
            self.words = words
        if not len(self.hash_ring):
            self.hash_ring = np.full((0, m), EMPTY, np.int64)
        else:
            ring = np.full((len(self.hash_ring), m), EMPTY, np.int64)
            order = (self.pos[:, None] + np.arange(old_m)) % old_m  # oldest first
            ring[:, :old_m] = np.take_along_axis(self.hash_ring, order, axis=1)
            self.hash_ring = ring
            self.pos = np.full(len(ring), old_m, np.int64)
        self.memory = m
        self.grown += 1

    def seqs_held(self) -> tuple[I64, I64]:
        """(device, seq) of every numbered reading remembered."""
        d, k = np.nonzero(self.seq_tag != EMPTY)
        bits = self.seq_bits[d, k]
        set_ = (bits[:, None] & _POW2[None, :]) != 0
        r, b = np.nonzero(set_)
        return d[r], self.seq_tag[d[r], k[r]] * 64 + b

    def _check_seq(self, dev: I64, seq: I64, ts: I64 | None = None,
                   newest_ts: I64 | None = None) -> npt.NDArray[np.bool_]:
        n = len(seq)
        w = self.words
        blk = seq >> 6
        bit = _POW2[seq & _LOW6]
        flat = dev * w + (blk & (w - 1))
        tags = self.seq_tag.reshape(-1)
        words = self.seq_bits.reshape(-1)
        steady = bool((seq > self.high[dev]).all())  # the steady state: nothing seen before
        if ts is not None and newest_ts is not None:  # (looks only where seqs are 0 or 1)
            epoch = self._reboots(dev, seq, ts, newest_ts, (blk, bit, flat))
            if epoch is not None:
                return self._check_rebooted(dev, seq, epoch, (blk, bit, flat))
        if steady:
            dup = np.zeros(n, bool)
            np.maximum.at(self.high, dev, seq)
        else:
            newest = np.full(len(self.high), -1, np.int64)
            np.maximum.at(newest, dev, seq)
            # a counter far below its high-water mark restarted (a reboot): follow it,
            # forgetting the blocks of the old count (they would hold the words against it)
            restart = (newest >= 0) & (newest < self.high - self.memory)
            if restart.any():
                self.seq_tag[restart] = EMPTY
                self.seq_bits[restart] = 0
            self.high = np.where(restart, newest, np.maximum(self.high, newest))
            dup = self._held(flat, blk, bit)
        # the words the batch touches, each with a row standing for it: after a plain scatter
        # of row numbers, the row each word reads back (scratch: one cell per word, only for
        # this batch)
        scratch = np.empty(tags.size, np.int32)
        rows = np.arange(n, dtype=np.int32)
        scratch[flat] = rows
        rep = scratch[flat]
        u_rows = np.flatnonzero(rep == rows)
        u = flat[u_rows]
        # the bits of each word's rows summed: with every row of a word in one block (it has
        # the block of the row standing for it) and no (device, seq) twice, each row adds a bit
        # of its own (equal powers of two would carry, losing one)
        sums = np.empty(tags.size, np.uint64)
        sums[u] = 0
        np.add.at(sums, flat, bit)
        got = sums[u]
        if _popcount is not None and bool((blk[rep] == blk).all()) and \
                int(_popcount(got).sum()) == n:
            b = blk[u_rows]
            held = tags[u]
            newer = b > held  # the word's old block is forgotten
            tags[u[newer]] = b[newer]
            words[u[newer]] = got[newer]
            same = b == held
            words[u[same]] |= got[same]
        else:  # repeats within the batch, or a device across more blocks than it has words
            dup |= _repeats((dev, seq))
            self._remember(tags, words, flat, blk, bit)
        return dup

    def _reboots(self, dev: I64, seq: I64, ts: I64, newest_ts: I64,
                 where: tuple[I64, npt.NDArray[np.uint64], I64]) -> I64 | None:
        """Per row, how many times its device's counter restarted before it in this batch (a
        reboot: seq 0 or 1 again, with a time newer than all the device sent, as no re-send
        can be, and of a seq already seen in the device's current count), or None when none
        did. A seq 0 or 1 that was not seen is a first arrival (late, out of order: a device's
        sensors' times need not follow its numbering), however new its time: the count goes
        on. Sequential over the few rows of seq 0 or 1 of the devices that have such a row,
        in arrival order. ``where``: each row's block, bit and word (as ``_check_seq`` found
        them)."""
        first_seqs = seq <= 1
        if not first_seqs.any():
            return None
        before = running_max_before(dev, ts, newest_ts)
        newer = first_seqs & (before != NEVER) & (ts > before)
        if not newer.any():
            return None
        n = len(dev)
        rows = np.flatnonzero(first_seqs & np.isin(dev, dev[newer]))
        blk, bit, flat = where
        held = self._held(flat[rows], blk[rows], bit[rows])  # in the memory's (current) count
        seen: dict[tuple[int, int], bool] = {}
        point = np.zeros(n, bool)
        for r, d, q, new, mem in zip(rows.tolist(), dev[rows].tolist(), seq[rows].tolist(),
                                     newer[rows].tolist(), held.tolist(), strict=True):
            seen.setdefault((d, q), mem)
            if new and seen[(d, q)]:
                point[r] = True
                seen[(d, 0)] = seen[(d, 1)] = False  # a new count: nothing of it seen yet
            seen[(d, q)] = True
        if not point.any():
            return None
        order = np.argsort(dev, kind="stable")
        d_s = dev[order]
        start = np.empty(n, bool)
        start[0] = True
        np.not_equal(d_s[1:], d_s[:-1], out=start[1:])
        p_s = point[order].astype(np.int64)
        upto = np.cumsum(p_s)
        heads = np.flatnonzero(start)
        base = np.repeat(upto[heads] - p_s[heads], np.diff(np.append(heads, n)))
        epoch = np.empty(n, np.int64)
        epoch[order] = upto - base
        return epoch

    def _check_rebooted(self, dev: I64, seq: I64, epoch: I64,
                        where: tuple[I64, npt.NDArray[np.uint64], I64]
                        ) -> npt.NDArray[np.bool_]:
        """A batch in which counters restarted (rare: the slow path). A device's rows before
        its first restart are judged by the memory, as ever; after it, only by the rows of the
        same count in the batch; the memory then holds its last count only. ``where``: each
        row's block, bit and word (as ``_check_seq`` found them)."""
        blk, bit, flat = where
        tags = self.seq_tag.reshape(-1)
        words = self.seq_bits.reshape(-1)
        dup: npt.NDArray[np.bool_] = (epoch == 0) & self._held(flat, blk, bit)
        dup |= _repeats((dev, epoch, seq))
        last = np.zeros(len(self.high), np.int64)
        np.maximum.at(last, dev, epoch)
        restarted = last > 0
        self.seq_tag[restarted] = EMPTY
        self.seq_bits[restarted] = 0
        self.high[restarted] = -1
        keep = epoch == last[dev]
        self._remember(tags, words, flat[keep], blk[keep], bit[keep])
        np.maximum.at(self.high, dev[keep], seq[keep])
        return dup

    def _held(self, flat: I64, blk: I64, bit: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
        """Per row (its word, block and bit), whether the memory holds its seq."""
        held: npt.NDArray[np.bool_] = (self.seq_tag.reshape(-1)[flat] == blk) & (
            (self.seq_bits.reshape(-1)[flat] & bit) != 0)
        return held

    @staticmethod
    def _remember(tags: I64, words: npt.NDArray[np.uint64], flat: I64, blk: I64,
                  bit: npt.NDArray[np.uint64]) -> None:
        """Set the bits of the rows; a word that a newer block reaches forgets its old one,
        a row of an older block than its word holds is not remembered."""
        newer = blk > tags[flat]
        if newer.any():
            f = flat[newer]
            np.maximum.at(tags, f, blk[newer])
            words[f] = 0
        keep = blk == tags[flat]
        np.bitwise_or.at(words, flat[keep], bit[keep])

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
        return int(self.seq_tag.nbytes + self.seq_bits.nbytes + self.hash_ring.nbytes
                   + self.pos.nbytes + self.high.nbytes)

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"dup_seq_tag": self.seq_tag, "dup_seq_bits": self.seq_bits,
                "dup_hash_ring": self.hash_ring, "dup_pos": self.pos, "dup_high": self.high,
                "dup_memory": np.array([self.memory], np.int64)}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]]) -> None:
        """From a checkpoint of this layout or of the two before it (seq slots and a ring of
        hashes; one ring of both), whose remembered seqs become bitmaps."""
        configured = m = self.memory
        seq_ring: npt.NDArray[np.int64] | None = None
        if "dup_seq_tag" in snap:
            tags = snap["dup_seq_tag"].astype(np.int64)
            bits = snap["dup_seq_bits"].astype(np.uint64)
            hash_ring = snap["dup_hash_ring"].astype(np.int64)
            m = self.memory = int(snap["dup_memory"][0]) if "dup_memory" in snap else m
            w = tags.shape[1] if tags.ndim == 2 else 0
            if tags.shape != bits.shape or w < 1 or w & (w - 1):
                raise ValueError(f"checkpoint dedup bitmaps {tags.shape} / {bits.shape}: "
                                 "not (devices, words) with words a power of two")
            if hash_ring.ndim == 2 and len(hash_ring) == 0:
                hash_ring = np.full((0, m), EMPTY, np.int64)
        elif "dup_seq_ring" in snap:  # seq slots (before 2026-12-02)
            seq_ring = snap["dup_seq_ring"].astype(np.int64)
            hash_ring = snap["dup_hash_ring"].astype(np.int64)
            if seq_ring.ndim == 2 and hash_ring.ndim == 2:
                m = self.memory = max(seq_ring.shape[1], hash_ring.shape[1])  # as grown
                if len(hash_ring) == 0:
                    hash_ring = np.full((0, m), EMPTY, np.int64)
            if seq_ring.ndim != 2:
                raise ValueError(f"checkpoint dedup memory {seq_ring.shape}: not (devices, slots)")
        else:  # written before the split: one ring of seqs and flagged hashes in arrival order
            old = snap["dup_ring"].astype(np.int64)
            if old.ndim != 2 or old.shape[1] != m:
                raise ValueError(f"checkpoint dedup memory {old.shape[1:]} != configured {m}")
            flagged = old >= _HASH_FLAG
            hash_ring = np.where(flagged, old, EMPTY)
            seq_ring = np.where((old >= 0) & ~flagged, old, EMPTY)
        if hash_ring.ndim != 2 or hash_ring.shape[1] != m:
            raise ValueError(f"checkpoint dedup memory {hash_ring.shape[1:]} != configured {m} "
                             "(hash slots)")
        if seq_ring is not None:
            d, k = np.nonzero(seq_ring >= 0)
            tags, bits = _bitmaps_from_seqs(seq_ring[d, k], d, len(seq_ring), words_for(m))
        self.seq_tag, self.seq_bits, self.hash_ring = tags, bits, hash_ring
        self.words = tags.shape[1]
        self.pos = snap["dup_pos"].astype(np.int64)
        if len(self.hash_ring) == 0:
            self.pos = np.zeros(0, np.int64)
        self.devices = max(len(self.seq_tag), len(self.hash_ring))
        # the high-water marks (derived from what is held for checkpoints that lack them)
        high = snap["dup_high"].astype(np.int64) if "dup_high" in snap else np.zeros(0, np.int64)
        if len(high) != len(self.seq_tag):
            high = np.full(len(self.seq_tag), -1, np.int64)
            dev, seq = self.seqs_held()
            np.maximum.at(high, dev, seq)
        self.high = high
        if m < configured:
            self._resize(configured)
