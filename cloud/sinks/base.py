"""The sink contract and the buffered, retrying writer in front of every sink."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import threading
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from cloud.sinks.points import Points, encode, split, total
from devices.clock import Clock

log = logging.getLogger("fieldline.cloud.sink")


_REASONS = (
    ("field type conflict", "field_type_conflict"),
    ("beyond retention", "beyond_retention"),
    ("unable to parse", "unparseable"),
    ("invalid", "invalid"),
    ("too large", "too_large"),
    ("max-values-per-tag", "too_many_tag_values"),
    ("max-series-per-database", "too_many_series"),
)


def classify(message: str) -> str:
    """A short, countable reason for a point InfluxDB refused."""
    low = message.lower()
    for needle, reason in _REASONS:
        if needle in low:
            return reason
    return "refused"


class SinkError(Exception):
    """A write failed. ``retryable`` says whether sending the same lines again may succeed;
    ``rejected`` counts points the server refused for good (the rest were written)."""

    def __init__(self, message: str, *, retryable: bool, rejected: int = 0,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.rejected = rejected
        self.retry_after_s = retry_after_s


Identity = tuple[str, dict[str, str], int]  # measurement, tag set, time (ms)


class Sink(Protocol):
    """Writes typed points (``cloud.sinks.points``); returns once the server confirmed them,
    or raises ``SinkError`` saying whether trying again may help. Retries, splitting, several
    requests at once and dead letters are the ``BufferedWriter``'s, the same for every sink."""

    name: str

    def write(self, batch: list[Points]) -> None: ...

    def delete(self, points: list[Identity]) -> None:
        """Delete points by identity (results the edge withdrew)."""
        ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps what it is given (tests and dry runs: ``batches``). ``strict``: behaves as a store,
    as InfluxDB does: ``points`` by identity, a rewrite merges field by field, a delete removes,
    and a field keeps the type of its first write (a point that changes it is refused for good,
    the rest of the batch kept)."""

    name = "memory"

    def __init__(self, *, strict: bool = False) -> None:
        self.batches: list[Points] = []
        self.deleted: list[Identity] = []
        self.strict = strict
        self.points: dict[tuple[str, tuple[tuple[str, str], ...], int], dict[str, object]] = {}
        self.types: dict[tuple[str, str], type] = {}
        self._lock = threading.Lock()  # the writer sends several batches at once

    def write(self, batch: list[Points]) -> None:
        refused: list[str] = []
        with self._lock:
            self.batches.extend(batch)
            if not self.strict:
                return
            for p in batch:
                for i in range(len(p)):
                    tags, fields, ts = p.row(i)
                    kinds = {(p.measurement, k): type(v) for k, v in fields.items()}
                    clash = [k for k, t in kinds.items() if self.types.setdefault(k, t) is not t]
                    if clash or not fields:
                        refused.append(f"field type conflict: {clash[0][1]!r}" if clash
                                       else "invalid: a point without fields")
                        continue
                    self.points.setdefault(
                        (p.measurement, tuple(sorted(tags.items())), ts), {}).update(fields)
        if refused:
            raise SinkError(f"partial write: {refused[0]} dropped={len(refused)}",
                            retryable=False, rejected=len(refused))

    def delete(self, points: list[Identity]) -> None:
        with self._lock:
            self.deleted.extend(points)
            for meas, tags, ts in points:
                self.points.pop((meas, tuple(sorted((k, v) for k, v in tags.items() if v)), ts),
                                None)

    def close(self) -> None:
        pass

    @classmethod
    def from_config(cls, _ix: object) -> MemorySink:
        return cls()


_QUIET_MS = 20  # input that paused this long is written without waiting for the interval
# background points (a gateway's ledger, health) are written this many at a time, and only when
# nothing else is queued: a results burst waits behind one such write at most, never behind a
# 10,000-device ledger. Under a load that never lets up (a backlog replayed) they are not held
# longer than BACKGROUND_MAX_WAIT_MS: then all of them go out behind what is queued.
BACKGROUND_SLICE = 1_000
BACKGROUND_MAX_WAIT_MS = 5_000


class BufferedWriter:
    """Batches lines, writes them off the event loop, retries with capped jittered backoff.

    ``on_written`` is called (in the event loop) with each batch's tokens once the sink confirmed
    it: that is the only moment a result counts as written.

    Points added with ``background=True`` (telemetry: ledgers, health) carry no token and are
    written after everything else queued, ``BACKGROUND_SLICE`` at a time, so they never hold up
    results on their way to being queryable.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        clock: Clock,
        batch_points: int = 5_000,
        flush_interval_ms: int = 1_000,
        max_backoff_ms: int = 30_000,
        on_written: Callable[[list[object]], None] | None = None,
        dead_letter_path: Path | None = None,
        fence: Callable[[], bool] | None = None,
        concurrency: int = 1,
    ) -> None:
        self.sink = sink
        self.concurrency = max(1, concurrency)
        self.fence = fence  # asked before each write: False = write nothing (see discard)
        self.clock = clock
        self.batch_points = batch_points
        self.flush_interval_ms = flush_interval_ms
        self.max_backoff_ms = max_backoff_ms
        self.on_written = on_written
        self._chunks: deque[Points] = deque()
        self._buffered = 0  # points in _chunks
        self._later: deque[Points] = deque()  # background points, not yet in _chunks
        self._later_n = 0
        self._later_since: int | None = None  # monotonic ms the oldest of them was queued
        self._generation = 0  # discard() count: a write in flight when it came confirms nothing
        self._deletes: list[Identity] = []
        self._tokens: deque[tuple[int, object]] = deque()  # (lines added when queued, token)
        self._added = 0
        self._done = 0
        self._confirmed: list[object] = []
        self._wake = asyncio.Event()
        self.points_written = 0
        self.points_rejected = 0
        self.points_deleted = 0
        self.dead_letters: Counter[str] = Counter()
        self.dead_letter_path = dead_letter_path
        self.write_errors = 0
        self.writes = 0
        self.last_error: str | None = None

    @property
    def buffered(self) -> int:
        return self._buffered + self._later_n

    def pending(self) -> list[Points]:
        """What is queued and not yet written (background points last)."""
        return [*self._chunks, *self._later]

    def delete(self, points: list[Identity]) -> None:
        """Delete these identities after everything queued so far has been written."""
        self._deletes.extend(points)
        self._wake.set()

    def discard(self) -> int:
        """Drop everything queued and not yet written, tokens unconfirmed (a worker that may
        have lost its partitions must not write what it held); returns the points dropped."""
        n = self._buffered + self._later_n
        self._chunks.clear()
        self._buffered = 0
        self._later.clear()
        self._later_n = 0
        self._later_since = None
        self._generation += 1
        self._tokens.clear()
        self._deletes.clear()
        self._confirmed.clear()
        self._done = self._added
        return n

    def add(self, points: Points | list[Points], token: object = None, *,
            background: bool = False) -> None:
        """Queue points; ``token`` is handed to ``on_written`` once they are confirmed.
        ``background``: written once nothing else waits (no token: nothing waits on them)."""
        given = [p for p in ([points] if isinstance(points, Points) else points) if len(p)]
        if background:
            if token is not None:
                raise ValueError("background points carry no token")
            if given and self._later_since is None:
                self._later_since = self.clock.monotonic_ms()
            self._later.extend(given)
            self._later_n += total(given)
            return
        n = total(given)
        self._chunks.extend(given)
        self._buffered += n
        self._added += n
        if token is not None:
            self._tokens.append((self._added, token))
        if self._buffered >= self.batch_points:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Flush whenever a batch is full, the input went quiet (nothing added for a short
        tick: no reason to sit on what is there) or the interval passed; on stop, flush what is
        left."""
        tick_s = min(self.flush_interval_ms, _QUIET_MS) / 1000
        seen = self._added
        waited_s = 0.0
        while not stop.is_set():
            woken = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick_s)
                woken = True
            self._wake.clear()
            waited_s += tick_s
            quiet = self._added == seen
            seen = self._added
            if woken or quiet or waited_s * 1000 >= self.flush_interval_ms:
                waited_s = 0.0
                await self.flush(stop)
        await self.flush(None, attempts=3)

    async def flush(self, stop: asyncio.Event | None, attempts: int | None = None) -> bool:
        """Write everything buffered, then run the queued deletes; True when all is done.

        A token is confirmed (``on_written``) only once its lines *and* every delete queued
        before the flush are done, so an acknowledgement never precedes a withdrawal.
        """
        while self._chunks or self._tokens or self._later:  # the writes; deletes follow them
            if self.fence is not None and not self.fence():
                return True
            if self._later:
                self._take_background()
            n = min(self.batch_points, self._buffered)
            queued = len(self._chunks)
            generation = self._generation
            batch, rest = split(self._chunks, n)
            ok = await self._write_sharded(batch, stop, attempts)
            if generation != self._generation:
                return True  # discarded while it was on its way: nothing of it is confirmed
            if not ok:
                return False
            # what was added while the batch was on its way stays queued behind the rest
            self._chunks = deque(rest + list(itertools.islice(self._chunks, queued, None)))
            self._buffered -= n
            self._done += n
            while self._tokens and self._tokens[0][0] <= self._done:
                self._confirmed.append(self._tokens.popleft()[1])
        if self._deletes:
            todo, self._deletes = self._deletes, []
            try:
                await asyncio.to_thread(self.sink.delete, todo)
                self.points_deleted += len(todo)
            except SinkError as exc:
                self.write_errors += 1
                if exc.retryable:
                    self._deletes = todo + self._deletes
                    log.warning("sink %s delete failed (will retry): %s", self.sink.name, exc)
                    return False
                log.error("sink %s refused to delete %d point(s): %s", self.sink.name,
                          len(todo), exc)
        if self._confirmed:
            confirmed, self._confirmed = self._confirmed, []
            if self.on_written is not None:
                self.on_written(confirmed)
        return True

    def _take_background(self) -> None:
        """Queue a slice of the background points when nothing else waits, or all of them
        once the oldest has waited ``BACKGROUND_MAX_WAIT_MS``."""
        now = self.clock.monotonic_ms()
        since = now if self._later_since is None else self._later_since
        overdue = now - since >= BACKGROUND_MAX_WAIT_MS
        if not overdue and (self._chunks or self._tokens):
            return
        head, rest = split(self._later, self._later_n if overdue else BACKGROUND_SLICE)
        self._later = deque(rest)
        self._later_n -= total(head)
        self._later_since = now if rest else None
        self.add(head)

    async def _write_sharded(self, batch: list[Points], stop: asyncio.Event | None,
                             attempts: int | None) -> bool:
        """Write a batch as ``concurrency`` requests at once (InfluxDB ingests them in parallel),
        split by series: every version of a point lands in the same request, in the order it
        was queued, so a revision can never be overtaken by the value it replaces."""
        k = self.concurrency
        if k == 1 or total(batch) < 2 * k:
            return await self._write_with_retry(batch, stop, attempts)
        shards: list[list[Points]] = [[] for _ in range(k)]
        for p in batch:
            which = np.fromiter((hash(s) % k for s in p.series()), np.int64, len(p))
            for j in range(k):
                rows = np.flatnonzero(which == j)
                if len(rows):
                    shards[j].append(p if len(rows) == len(p) else p.take(rows.tolist()))
        done = await asyncio.gather(*(self._write_with_retry(s, stop, attempts)
                                      for s in shards if s))
        return all(done)

    async def _isolate(self, batch: list[Points], stop: asyncio.Event | None
                       ) -> list[tuple[str, str]] | None:
        """The points the sink refuses for good (as line protocol, for the dead-letter file),
        with the reason; the others are written (writes are idempotent, so re-sending the good
        ones is harmless). None: gave up."""
        n = total(batch)
        if n == 1:
            try:
                await asyncio.to_thread(self.sink.write, batch)
                return []
            except SinkError as exc:
                if exc.retryable:
                    ok = await self._write_with_retry(batch, stop, 5)
                    return [] if ok else None
                text = encode(batch)  # the dead-letter file keeps line protocol
                return [(text[0] if text else repr(batch[0].row(0)), classify(str(exc)))]
        out: list[tuple[str, str]] = []
        for half in split(batch, n // 2):
            try:
                await asyncio.to_thread(self.sink.write, half)
                self.writes += 1
            except SinkError as exc:
                if exc.retryable and not await self._write_with_retry(half, stop, 5):
                    return None
                if not exc.retryable:
                    sub = await self._isolate(half, stop)
                    if sub is None:
                        return None
                    out += sub
        return out

    def _dead_letter(self, bad: list[tuple[str, str]]) -> None:
        for line, reason in bad:
            self.dead_letters[reason] += 1
            log.error("dead-lettered a point (%s): %s", reason, line[:200])
        if self.dead_letter_path is not None:
            with self.dead_letter_path.open("a") as fh:
                for line, reason in bad:
                    fh.write(json.dumps({"ts": self.clock.now_ms(), "reason": reason,
                                         "line": line}) + "\n")

    async def _write_with_retry(self, batch: list[Points], stop: asyncio.Event | None,
                                attempts: int | None) -> bool:
        backoff = 200
        tries = 0
        n = total(batch)
        while True:
            tries += 1
            try:
                if n:
                    await asyncio.to_thread(self.sink.write, batch)
                    self.writes += 1
                self.points_written += n
                return True
            except SinkError as exc:
                self.write_errors += 1
                self.last_error = str(exc)
                if not exc.retryable:
                    # The server refused some points for good (1.x keeps the rest): find them by
                    # bisection, dead-letter them with the reason, never resend them forever.
                    bad = await self._isolate(batch, stop)
                    if bad is None:
                        return False
                    self.points_rejected += len(bad)
                    self.points_written += n - len(bad)
                    self._dead_letter(bad)
                    return True
                log.warning("sink %s write failed (attempt %d, retrying): %s",
                            self.sink.name, tries, exc)
                if attempts is not None and tries >= attempts:
                    return False
                delay = exc.retry_after_s * 1000 if exc.retry_after_s else backoff
                delay = min(delay, self.max_backoff_ms) * (0.5 + random.random() / 2)
                backoff = min(backoff * 2, self.max_backoff_ms)
                if stop is not None:
                    try:
                        await asyncio.wait_for(stop.wait(), delay / 1000)
                        if attempts is None:
                            attempts = tries + 2  # stopping: a couple more tries, then give up
                    except TimeoutError:
                        pass
                else:
                    await asyncio.sleep(delay / 1000)
