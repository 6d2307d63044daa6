"""Finding the next intact record after a damaged one, in the agent's append-only files.

The intake log and the outbox write numbered records (ticks, batch numbers) one after another,
each with its length and the CRC of its payload. A record that fails its check at the end of a
file is a crash's torn tail; one in the middle is damage (a bad SD card block), and the intact
records after it must not be thrown away with it. The next record is found by the number it
must carry: the numbers after the last good one are looked for where a header holds them, and a
candidate counts only if its payload's CRC matches.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

# a header's fields -> (record number, payload length, payload CRC)
Fields = Callable[[tuple[int, ...]], tuple[int, int, int]]


def next_record(data: bytes, after: int, last: int, header: struct.Struct, number_at: int,
                fields: Fields, *, reach: int = 64) -> tuple[int, int] | None:
    """(offset, number) of the first intact record numbered ``last`` + 1 .. ``last`` + ``reach``
    whose header starts after ``after``; None when there is none (a torn tail)."""
    for want in range(last + 1, last + 1 + reach):
        needle = struct.pack("<Q", want)
        at = data.find(needle, after + number_at)
        while at != -1:
            pos = at - number_at
            if pos + header.size > len(data):
                break
            number, length, crc = fields(header.unpack_from(data, pos))
            start = pos + header.size
            if length > 0 and start + length <= len(data) and \
                    zlib.crc32(data[start:start + length]) == crc:
                return pos, number
            at = data.find(needle, at + 1)
    return None


def first_number(segment: Path) -> int:
    """A segment file is named after the number of its first record (0 when it is not)."""
    try:
        return int(segment.stem)
    except ValueError:
        return 0
