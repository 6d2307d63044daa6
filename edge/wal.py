"""The intake write-ahead log: raw device messages on disk before they are acknowledged.

With ``intake.durable = true`` the agent acknowledges a device message to its broker only after
the message is in this log and the log is fsynced (group commit: one record and one fsync per
tick). Window state is checkpointed every ``checkpoint_interval`` together with the number of the
last tick it covers; on start the agent loads the checkpoint and replays the ticks logged after
it, in their original groups, so the state is exactly what it was before the crash. Segments
wholly covered by a checkpoint are deleted.

A record is one tick: ``[tick, body length, crc32(body), messages]`` then, per message,
``[receive ms, topic length, payload length]``, topic, payload; then the MQTT packet id each
message came with (``qos << 16 | id``, 0 for QoS 0, as 32-bit words; records of an earlier
version have none, and a reader of that version stops before them). A record that is short or
fails its CRC ends the log (a torn tail: that tick was never acknowledged, so the broker still
has it).

The packet ids let a restarted agent recognise what the broker re-delivers of the messages it
logged whose acknowledgements never left (it stopped or crashed first): ``EdgeAgent._recover``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edge.records import first_number, next_record

log = logging.getLogger("fieldline.edge.wal")

RECORD = struct.Struct("<QIII")  # tick, body length, crc32, message count
MESSAGE = struct.Struct("<qII")  # receive ms, topic length, payload length

Message = tuple[str, bytes, int]  # topic, payload, receive ms
Logged = tuple[int, list[Message], list[int] | None]  # tick, its messages, their packet ids


class IntakeLog:
    def __init__(self, directory: Path, *, segment_bytes: int = 32 * 2**20,
                 fsync: bool = True) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self._fh: BinaryIO | None = None
        self._path: Path | None = None
        self.last_tick = 0
        self.bytes_written = 0
        self.torn = 0
        self.corrupt = 0  # damaged records in the middle of a segment (their ticks lost)
        # (checked, torn tail cut, last tick found; nothing decoded: the agent replays it)
        for _ in self._scan(1 << 64, truncate=True):
            pass
        # what is known durable: (segment, its size) and the tick, as of the last sync
        self._synced: tuple[Path | None, int, int] = (None, 0, self.last_tick)

    def _segments(self) -> list[Path]:
        return sorted(self.dir.glob("*.wal"))

    def _scan(self, after: int, *, truncate: bool = False) -> Iterator[Logged]:
        for seg in self._segments():
            data = seg.read_bytes()
            pos = 0
            last = first_number(seg) - 1
            while pos + RECORD.size <= len(data):
                tick, length, crc, count = RECORD.unpack_from(data, pos)
                body = data[pos + RECORD.size: pos + RECORD.size + length]
                if len(body) < length or zlib.crc32(body) != crc or length == 0 or tick <= last:
                    # a torn tail ends the log; damage in the middle loses only its own ticks
                    # (they were acknowledged: say so), the ticks after it are replayed
                    again = next_record(data, pos + 1, last, RECORD, 0,
                                        lambda h: (h[0], h[1], h[2]))  # tick, length, crc
                    if again is None:
                        break
                    pos = again[0]
                    if truncate:
                        self.corrupt += 1
                        log.error("intake log %s: a damaged record; the messages of tick(s) "
                                  "%d..%d are lost", seg.name, last + 1, again[1] - 1)
                    continue
                last = tick
                pos += RECORD.size + length
                self.last_tick = max(self.last_tick, tick)
                if tick > after:
                    yield (tick, *_decode(body, count))
            if pos < len(data) and truncate:
                self.torn += 1
                log.warning("intake log %s: torn tail of %d bytes truncated (never acknowledged)",
                            seg.name, len(data) - pos)
                with seg.open("r+b") as fh:
                    fh.truncate(pos)
                    fh.flush()
                    os.fsync(fh.fileno())

    def replay(self, after: int) -> Iterator[Logged]:
        """The ticks logged after ``after``, oldest first, each with its messages and their
        packet ids (None: logged by a version that did not keep them)."""
        yield from self._scan(after)

    def append(self, messages: list[Message], ids: list[int] | None = None) -> int:
        """Log one tick's messages, with the packet id each came with (``qos << 16 | id``);
        returns its tick number. Durable after ``sync``."""
        self.last_tick += 1
        parts = []
        for topic, payload, recv in messages:
            tb = topic.encode()
            parts += [MESSAGE.pack(recv, len(tb), len(payload)), tb, payload]
        if ids is not None:
            parts.append(struct.pack(f"<{len(ids)}I", *ids))
        body = b"".join(parts)
        record = RECORD.pack(self.last_tick, len(body), zlib.crc32(body), len(messages)) + body
        fh = self._writer(len(record))
        fh.write(record)
        self.bytes_written += len(record)
        return self.last_tick

    def _writer(self, size: int) -> BinaryIO:
        if self._fh is not None and self._fh.tell() + size > self.segment_bytes:
            self.sync()
            self._fh.close()
            self._fh = None
        if self._fh is None:
            self._path = self.dir / f"{self.last_tick:020d}.wal"
            self._fh = self._path.open("ab")
        return self._fh

    def sync(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
            self._synced = (self._path, self._fh.tell(), self.last_tick)

    def rollback(self) -> None:
        """After a failed ``append`` or ``sync`` (a full disk): forget everything since the
        last sync, on disk too, so the log ends with whole records. Those messages were never
        acknowledged; the caller keeps them and logs them again later."""
        path, size, tick = self._synced
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()  # (what it still flushes is cut off below)
        if self._path is not None and self._path != path:
            self._path.unlink(missing_ok=True)  # a segment begun since
        if path is not None:
            with contextlib.suppress(OSError), path.open("r+b") as fh:
                fh.truncate(size)
        self._fh, self._path = None, None
        self.last_tick = tick

    def truncate_through(self, tick: int) -> None:
        """Delete segments whose every record is covered by a checkpoint at ``tick``."""
        segs = self._segments()
        for seg, nxt in itertools.pairwise(segs):
            if int(nxt.stem) <= tick + 1 and seg != self._path:
                seg.unlink(missing_ok=True)

    def close(self) -> None:
        self.sync()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _decode(body: bytes, count: int) -> tuple[list[Message], list[int] | None]:
    out = []
    pos = 0
    for _ in range(count):
        recv, tl, pl = MESSAGE.unpack_from(body, pos)
        pos += MESSAGE.size
        topic = body[pos:pos + tl].decode()
        pos += tl
        out.append((topic, body[pos:pos + pl], recv))
        pos += pl
    if len(body) - pos != 4 * count:
        return out, None
    return out, list(struct.unpack_from(f"<{count}I", body, pos))
