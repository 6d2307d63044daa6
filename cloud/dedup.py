"""Dropping duplicate uplink batches, identified by (gateway, sequence number).

QoS 1 delivers at least once and the edge re-sends what was not acknowledged, so the same batch
can arrive twice. Per gateway the highest sequence seen and the sets of sequences within
``horizon`` below it are kept, in two states: *pending* (received, not yet confirmed by
InfluxDB) and *written* (confirmed, acknowledged to the edge). A duplicate of a written batch is
acknowledged again (the first acknowledgement may have been lost); a duplicate of a pending one
waits for its original's acknowledgement. Anything older than the horizon counts as written.

The state is snapshotted to disk by the worker, so a restarted worker still recognises the
batches it wrote (and an old revision re-sent after a newer one cannot overwrite it).

A copy is a copy only if it is the same batch: the digests of each gateway's latest
``DIGESTS`` batch numbers are remembered (in memory: 24 bytes each), and a batch under a taken
number with another digest is a *conflict* (two agents numbering under one gateway and
incarnation: a copied state directory), to be written, not dropped.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger("fieldline.cloud.dedup")


DIGESTS = 512  # batch numbers per gateway (and incarnation) whose digests are remembered


class Seen(Enum):
    NEW = 0
    PENDING = 1
    WRITTEN = 2
    CONFLICT = 3  # a taken number, another digest: not a copy of that batch


class Runs:
    """A set of batch numbers kept as sorted runs of consecutive ones: an agent numbers its
    batches one after another, so a gateway's written numbers are a few runs (a gap where a
    restart skipped the rest of a reserved block, a batch written out of turn), whatever their
    count. (A set of numbers was 8.6 MB for one gateway after 150,000 batches, and its JSON
    1 MB, saved before every round of acks: 0.7 s a gateway.)"""

    def __init__(self, seqs: list[int] | None = None) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for s in sorted(set(seqs or ())):
            self.add(s)

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and self.ends[i] >= seq

    def __len__(self) -> int:
        return sum(e - s + 1 for s, e in zip(self.starts, self.ends, strict=True))

    def add(self, seq: int) -> None:
        starts, ends = self.starts, self.ends
        if ends and seq == ends[-1] + 1:  # the common case: the next number
            ends[-1] = seq
            return
        i = bisect.bisect_right(starts, seq) - 1
        if i >= 0 and ends[i] >= seq:
            return
        joins_left = i >= 0 and ends[i] + 1 == seq
        joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_left and joins_right:
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)

    def drop_through(self, floor: int) -> None:
        """Forget the numbers up to ``floor`` (beyond the horizon: taken as written anyway)."""
        n = bisect.bisect_right(self.ends, floor)
        if n:
            del self.starts[:n], self.ends[:n]
        if self.starts and self.starts[0] <= floor:
            self.starts[0] = floor + 1

    def flat(self) -> list[int]:
        """start, end, start, end, ... (for the snapshot)."""
        return [x for pair in zip(self.starts, self.ends, strict=True) for x in pair]

    @classmethod
    def from_flat(cls, flat: list[int]) -> Runs:
        if len(flat) % 2 or any(type(x) is not int for x in flat):
            raise ValueError("runs must be pairs of integers")
        out = cls()
        for a, b in zip(flat[::2], flat[1::2], strict=True):
            if b < a or (out.ends and a <= out.ends[-1]):
                raise ValueError(f"runs out of order at [{a}, {b}]")
            out.starts.append(a)
            out.ends.append(b)
        return out


RUNS = -1  # the second item of a snapshot entry in the runs format (numbers are >= 0)


@dataclass
class _GatewaySeqs:
    high: int = -1
    pending: set[int] = field(default_factory=set)
    written: Runs = field(default_factory=Runs)
    # ring by number: which number each slot holds, and that batch's digest (16 bytes)
    seqs: npt.NDArray[np.int64] | None = None
    digests: npt.NDArray[np.bytes_] | None = None

    def remember(self, seq: int, digest: str) -> None:
        if self.seqs is None or self.digests is None:
            self.seqs = np.full(DIGESTS, -1, np.int64)
            self.digests = np.zeros(DIGESTS, "S16")
        slot = seq % DIGESTS
        if seq >= self.seqs[slot]:
            self.seqs[slot] = seq
            self.digests[slot] = bytes.fromhex(digest)

    def digest(self, seq: int) -> str | None:
        if self.seqs is None or self.digests is None or self.seqs[seq % DIGESTS] != seq:
            return None
        return bytes(self.digests[seq % DIGESTS]).ljust(16, b"\0").hex()


class BatchDedup:
    def __init__(self, horizon: int = 100_000) -> None:
        self.horizon = horizon
        self._gw: dict[str, _GatewaySeqs] = {}
        self.duplicates = 0
        self.conflicts = 0

    def state(self, gateway: str, seq: int) -> Seen:
        g = self._gw.get(gateway)
        if g is None:
            return Seen.NEW
        if seq in g.written or seq <= g.high - self.horizon:
            return Seen.WRITTEN
        if seq in g.pending:
            return Seen.PENDING
        return Seen.NEW

    def record(self, gateway: str, seq: int) -> None:
        g = self._gw.setdefault(gateway, _GatewaySeqs())
        g.pending.add(seq)
        if seq > g.high:
            g.high = seq
            g.written.drop_through(g.high - self.horizon)

    def mark_written(self, gateway: str, seq: int) -> None:
        g = self._gw.setdefault(gateway, _GatewaySeqs())
        g.pending.discard(seq)
        g.written.add(seq)

    def check_and_record(self, gateway: str, seq: int, digest: str | None = None) -> Seen:
        """NEW (and now pending), or the state of the earlier copy (counted as a duplicate),
        or CONFLICT: the number is taken by a batch with another ``digest`` (counted)."""
        st = self.state(gateway, seq)
        if st is Seen.NEW:
            self.record(gateway, seq)
            if digest is not None:
                self._gw[gateway].remember(seq, digest)
            return st
        g = self._gw.get(gateway)
        known = g.digest(seq) if g is not None and digest is not None else None
        if known is not None and known != digest:
            self.conflicts += 1
            return Seen.CONFLICT
        self.duplicates += 1
        return st

    # ---- durability --------------------------------------------------------------------------

    def snapshot(self, *, pending_as_written: bool = False) -> dict[str, list[int]]:
        """Written sequences only: pending ones will be re-sent by the edge if we crash.
        ``pending_as_written``: for a snapshot published only once they are written.
        Per gateway: ``[high, RUNS, start, end, start, end, ...]``."""
        out = {}
        for gw, g in self._gw.items():
            runs = g.written
            if pending_as_written and g.pending:
                runs = Runs.from_flat(g.written.flat())
                for s in g.pending:
                    runs.add(s)
            out[gw] = [g.high, RUNS, *runs.flat()]
        return out

    def restore(self, snap: dict[str, list[int]]) -> None:
        """What ``snapshot`` wrote, or the format before runs: ``[high, seq, seq, ...]``."""
        gws = {}
        for gw, v in snap.items():
            if not v:
                continue
            if type(v[0]) is not int:
                raise ValueError(f"dedup entry of {gw!r}: {v[:3]}")
            runs = (Runs.from_flat(v[2:]) if len(v) > 1 and v[1] == RUNS
                    else Runs([int(s) for s in v[1:]]))
            gws[gw] = _GatewaySeqs(high=v[0], written=runs)
        self._gw = gws

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as fh:
            json.dump(self.snapshot(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def load(self, path: Path) -> bool:
        """Restore what ``save`` wrote; a file that cannot be read (a damaged disk) is kept
        aside and logged, and the worker starts without it (False) instead of not at all."""
        if not path.exists():
            return False
        try:
            with path.open() as fh:
                doc = json.load(fh)
            BatchDedup(self.horizon).restore(doc)  # all of it readable before any is taken
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = path.with_name(path.name + ".unreadable")
            os.replace(path, aside)
            log.error("batch dedup state %s unreadable (%s: %s), kept as %s: starting without "
                      "it (batches the edges send again are written again, the same points)",
                      path, type(exc).__name__, exc, aside.name)
            return False
        self.restore(doc)
        return True
