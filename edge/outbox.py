"""The outbox: encoded result batches on disk until the cloud confirms they are in InfluxDB.

Records are appended to segment files (``<first seq>.seg``), each ``[length, crc32, seq,
windows, readings, appended ms] + payload``; an append is fsynced before it counts (group commit:
one fsync per ``sync()``). A batch leaves the outbox only through ``ack`` (the cloud worker's
application-level acknowledgement, sent after InfluxDB confirmed the write), never on PUBACK.
Acknowledged sequence numbers are appended to ``acked.log``; a segment whose records are all
acknowledged is deleted.

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

import logging
import os
import struct
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger("fieldline.edge.outbox")

HEADER = struct.Struct("<IIQIIq")  # length, crc32(payload), seq, windows, readings, appended ms
ACK = struct.Struct("<Q")
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
        self._writer: tuple[Path, BinaryIO] | None = None
        self._dirty = False
        # counters (monotonic since start)
        self.appended = 0
        self.acked = 0
        self.acked_windows = 0
        self.acked_readings = 0
        self.refused = 0
        self.shed_batches = 0
        self.shed_windows = 0
        self.shed_readings = 0
        self.expired_batches = 0
        self.torn_records = 0
        self.recovered_batches = 0
        # shed batches the MQTT client may still deliver: seq -> (windows, readings)
        self._shed_recently: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._recover()

    # ---- recovery -----------------------------------------------------------------------------

    def _recover(self) -> None:
        acked: set[int] = set()
        ack_path = self.dir / "acked.log"
        if ack_path.exists():
            data = ack_path.read_bytes()
            usable = len(data) - len(data) % ACK.size  # a torn last ack is simply not an ack
            acked = {ACK.unpack_from(data, i)[0] for i in range(0, usable, ACK.size)}
        for seg in sorted(self.dir.glob("*.seg")):
            data = seg.read_bytes()
            pos = 0
            while pos + HEADER.size <= len(data):
                length, crc, seq, windows, readings, appended = HEADER.unpack_from(data, pos)
                start = pos + HEADER.size
                if start + length > len(data) or zlib.crc32(data[start:start + length]) != crc:
                    break
                if seq not in acked:
                    self._index(Entry(seq, seg, start, length, windows, readings, appended))
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
        self._rewrite_acks()
        if self.entries:
            log.info("outbox: %d unacknowledged batches (%d bytes) recovered", len(self.entries),
                     self.bytes)

    def _index(self, e: Entry) -> None:
        self.entries[e.seq] = e
        self.bytes += e.length
        self._live[e.segment] = self._live.get(e.segment, 0) + 1

    def _rewrite_acks(self) -> None:
        """Acks only matter for records still on disk: keep those (compaction)."""
        on_disk = set()
        ack_path = self.dir / "acked.log"
        if ack_path.exists():
            data = ack_path.read_bytes()
            usable = len(data) - len(data) % ACK.size
            on_disk = {ACK.unpack_from(data, i)[0] for i in range(0, usable, ACK.size)}
        keep = sorted(s for s in on_disk if s not in self.entries and self._on_disk(s))
        tmp = self.dir / "acked.tmp"
        with tmp.open("wb") as fh:
            fh.write(b"".join(ACK.pack(s) for s in keep))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ack_path)
        self._acks: BinaryIO = ack_path.open("ab")

    def _on_disk(self, seq: int) -> bool:
        # an acknowledged seq still matters while a segment that may hold it exists
        return any(int(seg.stem) <= seq for seg in self._live)

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
        self._index(Entry(seq, path, offset, size, windows, readings, now_ms))
        self.appended += 1
        self._dirty = True
        return True

    def has_room(self, size: int) -> bool:
        return self.policy != "refuse_newest" or self.bytes + size <= self.max_bytes

    def sync(self) -> None:
        """Group commit: everything appended so far is on disk when this returns."""
        if self._dirty and self._writer is not None:
            self._sync_file(self._writer[1])
        if self._dirty:
            self._sync_file(self._acks)
        self._dirty = False

    # ---- leaving --------------------------------------------------------------------------------

    def ack(self, seqs: list[int]) -> int:
        """The cloud confirmed these batches; returns how many were still waiting.

        A batch shed from the outbox may still have been on the wire (the MQTT client
        retransmits what it holds); if the cloud confirms it, it was not lost after all: its
        counts move from shed back to acknowledged, so the ledger reports only real losses."""
        n = 0
        for seq in seqs:
            e = self.entries.pop(seq, None)
            if e is None:
                gone = self._shed_recently.pop(seq, None)
                if gone is not None:
                    self.shed_batches -= 1
                    self.shed_windows -= gone[0]
                    self.shed_readings -= gone[1]
                    self.acked_windows += gone[0]
                    self.acked_readings += gone[1]
                    self.recovered_batches += 1
                continue
            n += 1
            self.acked_windows += e.windows
            self.acked_readings += e.readings
            self._forget(e)
            self._acks.write(ACK.pack(seq))
        if n:
            self.acked += n
            self._acks.flush()  # fsync at the next sync(): a lost ack only means a resend
            self._dirty = True
        return n

    def _forget(self, e: Entry) -> None:
        self.bytes -= e.length
        left = self._live.get(e.segment, 1) - 1
        self._live[e.segment] = left
        if left == 0 and (self._writer is None or self._writer[0] != e.segment):
            e.segment.unlink(missing_ok=True)
            del self._live[e.segment]
            if not self.entries:
                self._acks.close()
                self._rewrite_acks()

    def _shed(self, seq: int, why: str) -> None:
        e = self.entries.pop(seq)
        self._forget(e)
        self._acks.write(ACK.pack(seq))
        self._shed_recently[seq] = (e.windows, e.readings)
        while len(self._shed_recently) > 100_000:
            self._shed_recently.popitem(last=False)
        self.shed_batches += 1
        self.shed_windows += e.windows
        self.shed_readings += e.readings
        if why == "expired":
            self.expired_batches += 1
        if self.shed_batches <= 5 or self.shed_batches % 1000 == 0:
            log.warning("outbox %s: batch seq=%d with %d windows shed (total %d)", why, seq,
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
