"""The outbox: encoded result batches on disk until the cloud confirms they are in InfluxDB.

Records are appended to segment files (``<first seq>.seg``), each ``[length, crc32, seq,
windows, readings, appended ms] + payload``; an append is fsynced before it counts (group commit:
one fsync per ``sync()``). A batch leaves the outbox only through ``ack`` (the cloud worker's
application-level acknowledgement, sent after InfluxDB confirmed the write), never on PUBACK.
Every batch's fate is appended to a journal, ``acked.log`` (stored, acknowledged, shed, or
acknowledged after it was shed), fsynced with the data it describes; a segment whose records
are all acknowledged or shed is deleted, and the journal is compacted into a totals header. So
the outbox's counters are durable: ``stored = acked + shed + pending`` holds across crashes and
restarts, and is what the gateway's ledger reports (its second law).

Bounded in bytes and in age, with a named overflow policy:

* ``drop_oldest``: the oldest unacknowledged batches are shed to make room (and batches older
  than ``max_age_ms`` are shed as expired); every shed batch is counted with the windows and
  readings it held, so the gateway's ledger still balances.
* ``refuse_newest``: ``append`` refuses (returns False) and the agent applies back-pressure:
  it stops emitting results and stops acknowledging intake, so data waits upstream instead.

Recovery: segments are scanned on open; a record with a short read or a bad CRC ends its segment
(a torn tail from a crash mid-write): the tail is truncated and counted, never half-read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from devices.contract import batch_digest
from edge.records import first_number, next_record

log = logging.getLogger("fieldline.edge.outbox")

HEADER = struct.Struct("<IIQIIq")  # length, crc32(payload), seq, windows, readings, appended ms
ACK = struct.Struct("<Q")  # the journal's format before it carried counts (still read)
JOURNAL_MAGIC = b"FLOBJ2\x00\x00"
# a compacted journal starts with its totals: stored, acked and shed batches/windows/readings
TOTALS = struct.Struct("<8s9Q")
EVENT = struct.Struct("<BQII")  # kind, seq, windows, readings
# RECOVERED: a shed batch the cloud acknowledged after all; WAITING: stored, already counted in
# the totals before it (a compacted journal lists the batches still waiting that way)
# GONE: acknowledged or shed, already counted in the totals (its segment still holds others)
STORED, ACKED, SHED, RECOVERED, WAITING, GONE = 1, 2, 3, 4, 5, 6
COMPACT_BYTES = 1 << 20
POLICIES = ("drop_oldest", "refuse_newest")


@dataclass
class Entry:
    seq: int
    segment: Path
    offset: int  # of the payload
    length: int
    windows: int
    readings: int
    appended_ms: int
    digest: str  # of the payload: what an ack for it must name (devices.contract.batch_digest)


class Outbox:
    def __init__(self, directory: Path, *, max_bytes: int = 256 * 2**20,
                 max_age_ms: int = 7 * 86_400_000, policy: str = "drop_oldest",
                 segment_bytes: int = 8 * 2**20, fsync: bool = True) -> None:
        if policy not in POLICIES:
            raise ValueError(f"outbox policy must be one of {', '.join(POLICIES)}")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_age_ms = max_age_ms
        self.policy = policy
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # unacknowledged, by seq
        self.bytes = 0
        self._live: dict[Path, int] = {}  # segment -> unacknowledged records in it
        self._gone: dict[Path, list[int]] = {}  # segment -> its batches that left (kept)
        self._writer: tuple[Path, BinaryIO] | None = None
        self._dirty = False
        # counters (monotonic since start)
        self.appended = 0  # since this start (the rest: durable, from the journal)
        self.stored_batches = 0
        self.stored_windows = 0
        self.stored_readings = 0
        self.acked = 0
        self.acked_windows = 0
        self.acked_readings = 0
        self.refused = 0
        self.shed_batches = 0
        self.shed_windows = 0
        self.shed_readings = 0
        self.expired_batches = 0
        self.torn_records = 0
        self.corrupt_records = 0  # damaged records in the middle of a segment (batches lost)
        self.recovered_batches = 0
        self.unproven_acks = 0  # acks that did not name the batch's digest: ignored
        self.journal_unreadable = False  # acked.log was damaged and set aside at start
        # shed batches the MQTT client may still deliver: seq -> (windows, readings, digest)
        self._shed_recently: OrderedDict[int, tuple[int, int, str]] = OrderedDict()
        self._recover()

    # ---- recovery -----------------------------------------------------------------------------

    def _recover(self) -> None:
        done = self._read_journal()
        stored: set[int] = set()
        corrupt: set[int] = set()  # numbers of batches a damaged record took with it
        for seg in sorted(self.dir.glob("*.seg")):
            data = seg.read_bytes()
            pos = 0
            last = first_number(seg) - 1
            while pos + HEADER.size <= len(data):
                length, crc, seq, windows, readings, appended = HEADER.unpack_from(data, pos)
                start = pos + HEADER.size
                if length == 0 or start + length > len(data) or \
                        zlib.crc32(data[start:start + length]) != crc:
                    # (an empty payload: zeroed blocks, whose CRC of nothing is 0.) A crash
                    # tail ends here; damage in the middle (a bad SD card block) does not: the
                    # records after it are kept, what it covered is counted as lost
                    again = next_record(data, pos + 1, last, HEADER, 8,
                                        lambda h: (h[2], h[0], h[1]))  # seq, length, crc
                    if again is None:
                        break
                    pos, lost = again
                    corrupt.update(range(last + 1, lost))
                    self.corrupt_records += 1
                    log.error("outbox segment %s: a damaged record; batches %d..%d are lost, "
                              "the rest of the segment is kept", seg.name, last + 1, lost - 1)
                    continue
                last = seq
                if seq not in done:
                    self._index(Entry(seq, seg, start, length, windows, readings, appended,
                                      batch_digest(data[start:start + length])))
                    stored.add(seq)
                else:
                    self._gone.setdefault(seg, []).append(seq)
                pos = start + length
            if pos < len(data):
                self.torn_records += 1
                log.warning("outbox segment %s: torn tail of %d bytes truncated", seg.name,
                            len(data) - pos)
                with seg.open("r+b") as fh:
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())
            if self._live.get(seg, 0) == 0:
                seg.unlink()
                self._gone.pop(seg, None)
        # a crash between two syncs: a STORED event whose data never reached the disk was
        # never stored (the intake log replays what made it); a batch on disk whose STORED
        # event did not make it is stored all the same (it will be sent)
        for seq in sorted(corrupt - stored - done):  # stored once, then lost on the disk: shed
            w, r = self._stored_events.pop(seq, (0, 0))
            if seq in self._journal_stored or (w, r) != (0, 0):
                self._count(SHED, seq, w, r)
        for seq, (windows, readings) in self._stored_events.items():
            if seq not in stored and seq not in done:
                self.stored_batches -= 1
                self.stored_windows -= windows
                self.stored_readings -= readings
        for seq in stored - self._journal_stored:
            e = self.entries[seq]
            self.stored_batches += 1
            self.stored_windows += e.windows
            self.stored_readings += e.readings
        self._rewrite_journal()
        if self.entries:
            log.info("outbox: %d unacknowledged batches (%d bytes) recovered", len(self.entries),
                     self.bytes)

    def _read_journal(self) -> set[int]:
        """Totals and per-batch events from the journal; returns the batches that left."""
        self._journal_stored: set[int] = set()
        self._stored_events: dict[int, tuple[int, int]] = {}
        done: set[int] = set()
        path = self.dir / "acked.log"
        if not path.exists():
            return done
        data = path.read_bytes()
        if not data.startswith(JOURNAL_MAGIC):  # the old format: acknowledged seqs only
            usable = len(data) - len(data) % ACK.size
            seqs = [ACK.unpack_from(data, i)[0] for i in range(0, usable, ACK.size)]
            if len(set(seqs)) == len(seqs):
                return set(seqs)
            # each batch is acknowledged once: this is damage (zeroed blocks), not a journal.
            # Nothing counts as gone: every batch on disk is sent again, and the cloud, which
            # knows which it has, acknowledges those at once without writing them twice
            aside = path.with_name(f"acked.log.unreadable-{len(data)}")
            os.replace(path, aside)
            log.error("outbox journal %s is unreadable (kept as %s): every batch still on disk "
                      "is treated as unacknowledged; the outbox's totals restart at zero",
                      path, aside.name)
            self.journal_unreadable = True
            return done
        pos = len(JOURNAL_MAGIC)
        if pos + TOTALS.size <= len(data):
            (_, self.stored_batches, self.stored_windows, self.stored_readings,
             self.acked, self.acked_windows, self.acked_readings, self.shed_batches,
             self.shed_windows, self.shed_readings) = TOTALS.unpack_from(data, pos)
            pos += TOTALS.size
        while pos + EVENT.size <= len(data):  # a torn last event is simply not there
            kind, seq, windows, readings = EVENT.unpack_from(data, pos)
            pos += EVENT.size
            self._count(kind, seq, windows, readings)
            if kind in (STORED, WAITING):
                self._journal_stored.add(seq)
            if kind == STORED:
                self._stored_events[seq] = (windows, readings)
            elif kind in (ACKED, SHED, GONE):
                done.add(seq)
        return done

    def _count(self, kind: int, seq: int, windows: int, readings: int) -> None:
        if kind == STORED:
            self.stored_batches += 1
            self.stored_windows += windows
            self.stored_readings += readings
        elif kind == ACKED:
            self.acked += 1
            self.acked_windows += windows
            self.acked_readings += readings
        elif kind == SHED:
            self.shed_batches += 1
            self.shed_windows += windows
            self.shed_readings += readings
        elif kind == RECOVERED:
            self.shed_batches -= 1
            self.shed_windows -= windows
            self.shed_readings -= readings
            self.acked += 1
            self.acked_windows += windows
            self.acked_readings += readings

    def _journal(self, kind: int, seq: int, windows: int, readings: int) -> None:
        self._count(kind, seq, windows, readings)
        self._acks.write(EVENT.pack(kind, seq, windows, readings))
        self._dirty = True

    def _index(self, e: Entry) -> None:
        self.entries[e.seq] = e
        self.bytes += e.length
        self._live[e.segment] = self._live.get(e.segment, 0) + 1

    def _rewrite_journal(self) -> None:
        """Compaction: the totals, then STORED events of the batches still waiting (so a
        crash before their data is synced cannot count them twice)."""
        body = JOURNAL_MAGIC + TOTALS.pack(
            JOURNAL_MAGIC, self.stored_batches, self.stored_windows, self.stored_readings,
            self.acked, self.acked_windows, self.acked_readings, self.shed_batches,
            self.shed_windows, self.shed_readings) + b"".join(
            EVENT.pack(WAITING, seq, 0, 0) for seq in self.entries) + b"".join(
            EVENT.pack(GONE, seq, 0, 0) for seqs in self._gone.values() for seq in seqs)
        self._journal_stored = set(self.entries)
        tmp = self.dir / "acked.tmp"
        with tmp.open("wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "acked.log")
        self._acks: BinaryIO = (self.dir / "acked.log").open("ab")

    # ---- appending ----------------------------------------------------------------------------

    def _segment(self, seq: int, size: int) -> tuple[Path, BinaryIO]:
        if self._writer is not None:
            path, fh = self._writer
            if fh.tell() + size <= self.segment_bytes:
                return self._writer
            self._close_writer()
        path = self.dir / f"{seq:020d}.seg"
        fh = path.open("ab")
        self._writer = (path, fh)
        self._live.setdefault(path, 0)
        return self._writer

    def _close_writer(self) -> None:
        if self._writer is not None:
            path, fh = self._writer
            self._sync_file(fh)
            fh.close()
            self._writer = None
            if self._live.get(path, 0) == 0:
                path.unlink(missing_ok=True)
                self._live.pop(path, None)
                self._gone.pop(path, None)

    def _sync_file(self, fh: BinaryIO) -> None:
        fh.flush()
        if self.fsync:
            os.fsync(fh.fileno())

    def append(self, seq: int, payload: bytes, *, windows: int, readings: int,
               now_ms: int) -> bool:
        """Queue a batch (durable after the next ``sync``). False: refused by policy."""
        self.expire(now_ms)
        size = len(payload)
        if self.bytes + size > self.max_bytes:
            if self.policy == "refuse_newest":
                self.refused += 1
                return False
            while self.entries and self.bytes + size > self.max_bytes:
                self._shed(next(iter(self.entries)), "full")
        path, fh = self._segment(seq, HEADER.size + size)
        offset = fh.tell() + HEADER.size
        fh.write(HEADER.pack(size, zlib.crc32(payload), seq, windows, readings, now_ms) + payload)
        self._index(Entry(seq, path, offset, size, windows, readings, now_ms,
                          batch_digest(payload)))
        self.appended += 1
        self._journal(STORED, seq, windows, readings)
        return True

    def has_room(self, size: int) -> bool:
        return self.policy != "refuse_newest" or self.bytes + size <= self.max_bytes

    def sync(self) -> None:
        """Group commit: everything appended so far is on disk when this returns (the data
        first, then the journal that counts it)."""
        if self._dirty and self._writer is not None:
            self._sync_file(self._writer[1])
        if self._dirty:
            self._sync_file(self._acks)
            if self._acks.tell() > COMPACT_BYTES:
                self._acks.close()
                self._rewrite_journal()
        self._dirty = False

    # ---- leaving --------------------------------------------------------------------------------

    def ack(self, seqs: list[int], proofs: dict[int, str] | None = None) -> int:
        """The cloud confirmed these batches; returns how many were still waiting.

        With ``proofs`` (the cloud's ack), a batch leaves only if its proof is the digest of
        its payload: an ack from anyone who never received the batch, or about another batch
        under the same number, is counted (``unproven_acks``) and changes nothing.

        A batch shed from the outbox may still have been on the wire (the MQTT client
        retransmits what it holds); if the cloud confirms it, it was not lost after all: its
        counts move from shed back to acknowledged, so the ledger reports only real losses."""
        n = 0
        for seq in seqs:
            e = self.entries.get(seq)
            gone = self._shed_recently.get(seq) if e is None else None
            digest = e.digest if e is not None else gone[2] if gone is not None else None
            if digest is None:
                continue  # acknowledged before (a repeated ack), or never ours
            if proofs is not None and proofs.get(seq) != digest:
                self.unproven_acks += 1
                if self.unproven_acks <= 5 or self.unproven_acks % 1000 == 0:
                    log.warning("an ack for batch seq=%d does not name its digest: ignored "
                                "(%d so far; who else may publish on the ack topic?)", seq,
                                self.unproven_acks)
                continue
            if e is None:
                assert gone is not None
                del self._shed_recently[seq]
                self._journal(RECOVERED, seq, gone[0], gone[1])
                self.recovered_batches += 1
                if self.recovered_batches <= 5 or self.recovered_batches % 1000 == 0:
                    log.warning("batch seq=%d, shed from the outbox, reached the cloud after all "
                                "(it was on the wire): its %d windows are counted acknowledged, "
                                "not shed (%d such batches)", seq, gone[0],
                                self.recovered_batches)
                continue
            del self.entries[seq]
            n += 1
            self._journal(ACKED, seq, e.windows, e.readings)
            self._forget(e)
        if n:
            self._acks.flush()  # fsync at the next sync(): a lost ack only means a resend
        return n

    def _forget(self, e: Entry) -> None:
        self.bytes -= e.length
        left = self._live.get(e.segment, 1) - 1
        self._live[e.segment] = left
        self._gone.setdefault(e.segment, []).append(e.seq)
        if left == 0 and (self._writer is None or self._writer[0] != e.segment):
            self._sync_file(self._acks)  # the journal says why, before the data goes
            e.segment.unlink(missing_ok=True)
            del self._live[e.segment]
            self._gone.pop(e.segment, None)
            if not self.entries:
                self.sync()
                self._acks.close()
                self._rewrite_journal()

    def _shed(self, seq: int, why: str) -> None:
        e = self.entries.pop(seq)
        self._journal(SHED, seq, e.windows, e.readings)
        self._forget(e)
        self._shed_recently[seq] = (e.windows, e.readings, e.digest)
        while len(self._shed_recently) > 100_000:
            self._shed_recently.popitem(last=False)
        if why == "expired":
            self.expired_batches += 1
        if self.shed_batches <= 5 or self.shed_batches % 1000 == 0:
            log.warning("outbox %s: batch seq=%d with %d windows shed (total %d; lost unless "
                        "it is on the wire and the cloud acknowledges it)", why, seq,
                        e.windows, self.shed_batches)

    def expire(self, now_ms: int) -> None:
        while self.entries:
            e = next(iter(self.entries.values()))
            if now_ms - e.appended_ms <= self.max_age_ms:
                break
            self._shed(e.seq, "expired")

    def read(self, seq: int) -> bytes:
        e = self.entries[seq]
        if self._writer is not None and self._writer[0] == e.segment:
            self._writer[1].flush()
        with e.segment.open("rb") as fh:
            fh.seek(e.offset)
            return fh.read(e.length)

    def pending(self) -> list[int]:
        """Unacknowledged sequence numbers, oldest first."""
        return list(self.entries)

    @property
    def depth(self) -> int:
        return len(self.entries)

    def oldest_age_ms(self, now_ms: int) -> int:
        if not self.entries:
            return 0
        return now_ms - next(iter(self.entries.values())).appended_ms

    def close(self) -> None:
        self.sync()
        self._close_writer()
        self._acks.close()

    def abandon(self) -> None:
        """Let go of the files without another write that counts (after a failed write: a
        full disk). What is on disk is what a new ``Outbox`` on the directory recovers, as
        after a crash: torn tails cut, the journal reconciled with the segments."""
        for fh in ((self._writer[1] if self._writer else None), self._acks):
            if fh is not None:
                with contextlib.suppress(OSError):
                    fh.close()
        self._writer = None
