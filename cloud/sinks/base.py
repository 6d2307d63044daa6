"""The sink contract and the buffered, retrying writer in front of every sink."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import random
import threading
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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


_TICK_MS = 20  # the writer looks for background points (which do not wake it) this often
# background points (a gateway's ledger, health) are written this many at a time, and only when
# nothing else is queued: a results burst waits behind one such write at most, never behind a
# 10,000-device ledger. Under a load that never lets up (a backlog replayed) they are not held
# longer than BACKGROUND_MAX_WAIT_MS: then all of them go out behind what is queued.
BACKGROUND_SLICE = 1_000
BACKGROUND_MAX_WAIT_MS = 5_000
DEAD_LETTER_MAX_BYTES = 64 << 20  # a dead-letter file past this is moved aside (one kept)


class _Lane:
    """The points of a share of the series (by hash of the series key), written one request at
    a time in the order queued: every version of a point goes this way, so a revision never
    overtakes the value it replaces. Entries are ``(position, rows)``: ``position`` is where the
    rows' chunk began in the writer's queue (every row of the entry was queued at or after it)."""

    def __init__(self) -> None:
        self.queue: deque[tuple[int, Points]] = deque()
        self.queued = 0  # points in queue
        self.sending: list[tuple[int, Points]] = []  # the request on its way

    def mark(self, sharded: int) -> int:
        """Every point of this lane queued before this position is written."""
        if self.sending:
            return self.sending[0][0]
        if self.queue:
            return self.queue[0][0]
        return sharded

    def take(self, limit: int) -> list[Points]:
        """The next request: up to ``limit`` points from the head of the queue."""
        n = 0
        while self.queue and n < limit:
            at, rows = self.queue.popleft()
            if n + len(rows) > limit:
                cut = limit - n
                self.sending.append((at, rows.take(slice(0, cut))))
                self.queue.appendleft((at, rows.take(slice(cut, None))))
                n = limit
                break
            self.sending.append((at, rows))
            n += len(rows)
        self.queued -= n
        return [rows for _, rows in self.sending]

    def sent(self, ok: bool) -> int:
        """The request came back: written (its points are counted off) or given back to the
        head of the queue, to go again. Returns the points it held."""
        entries, self.sending = self.sending, []
        n = sum(len(rows) for _, rows in entries)
        if not ok:
            self.queue.extendleft(reversed(entries))
            self.queued += n
        return n

    def clear(self) -> None:
        self.queue.clear()
        self.queued = 0
        self.sending = []


class BufferedWriter:
    """Batches points, writes them off the event loop, retries with capped jittered backoff.

    ``on_written`` is called (in the event loop) with tokens once the sink confirmed everything
    queued before them: that is the only moment a result counts as written. It is called as
    soon as that holds, not once the whole queue is written, so an edge hears of its batch
    while a backlog is still being replayed.

    Writes go out as ``concurrency`` lanes, each a share of the series written one request
    (``batch_points / concurrency`` points at most) after the other: a lane whose request came
    back sends its next one at once, so the server is never left waiting for the slowest
    request of a round, nor for the next batch to be cut.

    A delete (results the edge withdrew) runs once everything queued before it is written, and
    what is queued after it waits for it, so a withdrawal never removes a later version.

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
        # positions count the points ever queued (``_added``); the queue's head is at
        # ``_sharded``: what is before it went to the lanes
        self._chunks: deque[Points] = deque()
        self._lanes = [_Lane() for _ in range(self.concurrency)]
        self._sharded = 0
        self._buffered = 0  # points queued or on their way, not yet written
        self._later: deque[Points] = deque()  # background points, not yet in _chunks
        self._later_n = 0
        self._later_since: int | None = None  # monotonic ms the oldest of them was queued
        self._generation = 0  # discard() count: a write in flight when it came confirms nothing
        self._deletes: deque[tuple[int, list[Identity]]] = deque()  # (position, identities)
        self._tokens: deque[tuple[int, object]] = deque()  # (position after its points, token)
        self._added = 0
        self._wake = asyncio.Event()  # something to write: the run loop flushes
        self._more = asyncio.Event()  # something was queued: an idle lane may have work
        self.points_written = 0
        self.points_rejected = 0
        self.points_deleted = 0
        self.dead_letters: Counter[str] = Counter()
        self.dead_letter_path = dead_letter_path
        self.dead_letter_max_bytes = DEAD_LETTER_MAX_BYTES  # then it becomes <name>.1
        self.dead_letter_file_errors = 0
        self.write_errors = 0
        self.writes = 0
        self.last_error: str | None = None
        # the sink's state for the operator (`fieldline cloud status`): since when (clock ms)
        # writes have failed without one getting through, and when one last got through
        self.failing_since: int | None = None
        self.last_ok: int | None = None

    @property
    def buffered(self) -> int:
        return self._buffered + self._later_n

    def pending(self) -> list[Points]:
        """What is queued and not yet written (background points last)."""
        lanes = [rows for lane in self._lanes
                 for _, rows in itertools.chain(lane.sending, lane.queue)]
        return [*lanes, *self._chunks, *self._later]

    def delete(self, points: list[Identity]) -> None:
        """Delete these identities once everything queued so far has been written; what is
        queued after this waits for the delete."""
        if not points:
            return
        if self._deletes and self._deletes[-1][0] == self._added:
            self._deletes[-1][1].extend(points)
        else:
            self._deletes.append((self._added, list(points)))
        self._more.set()
        self._wake.set()

    def discard(self) -> int:
        """Drop everything queued and not yet written, tokens unconfirmed (a worker that may
        have lost its partitions must not write what it held); returns the points dropped."""
        n = self._buffered + self._later_n
        self._chunks.clear()
        for lane in self._lanes:
            lane.clear()
        self._buffered = 0
        self._later.clear()
        self._later_n = 0
        self._later_since = None
        self._generation += 1
        self._tokens.clear()
        self._deletes.clear()
        self._sharded = self._added
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
        if n or token is not None:
            self._more.set()
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Write as soon as there is something to write: a free lane sends what is queued for
        it at once, and while every lane is busy, what comes meanwhile gathers into their next
        requests (``batch_points / concurrency`` points at most), so requests grow with the
        load instead of waiting for a timer or a full batch. Background points are looked at
        every ``_TICK_MS``. On stop, flush what is left."""
        tick_s = min(self.flush_interval_ms, _TICK_MS) / 1000
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), tick_s)
            self._wake.clear()
            if not self._idle():
                await self.flush(stop)
        await self.flush(None, attempts=3)

    def _idle(self) -> bool:
        return not (self._chunks or self._later or self._deletes or self._tokens
                    or any(lane.queued or lane.sending for lane in self._lanes))

    async def flush(self, stop: asyncio.Event | None, attempts: int | None = None) -> bool:
        """Write everything queued, including what is added meanwhile, and run the queued
        deletes in their place; True when all is done (or what was queued was discarded),
        False when a write gave up (after ``attempts``, or on ``stop``): what it held stays
        queued, in order."""
        generation = self._generation
        size = -(-max(1, self.batch_points) // len(self._lanes))
        self._more = asyncio.Event()  # this loop's (tests flush under several)
        for lane in self._lanes:  # one flush at a time: a request still marked on its way
            if lane.sending:      # is one a cancelled (or raising) flush left behind; it goes
                lane.sent(False)  # again (a rewrite changes nothing)
        sending: dict[asyncio.Future[Any], _Lane] = {}
        more: asyncio.Future[Any] | None = None
        failed = False
        try:
            while True:
                stale = generation != self._generation  # discarded (fenced): stop writing
                if not (failed or stale):
                    if self._later:
                        self._take_background()
                    self._shard()
                    for lane in self._lanes:
                        if lane.sending or not lane.queued:
                            continue
                        if self.fence is not None and not self.fence():
                            stale = True  # it discarded what was queued
                            break
                        sending[asyncio.ensure_future(
                            self._write_with_retry(lane.take(size), stop, attempts))] = lane
                if not sending:
                    if stale:
                        return True
                    if failed:
                        return False
                    if self._deletes and self._written_up_to() >= self._deletes[0][0]:
                        if not await self._run_delete():
                            return False
                        continue
                    self._confirm()
                    if self._idle():
                        return True
                    continue
                waiting: set[asyncio.Future[Any]] = set(sending)
                if not (failed or stale) and any(not lane.sending for lane in self._lanes):
                    if more is None:  # an idle lane: new points may be for it
                        self._more.clear()
                        more = asyncio.ensure_future(self._more.wait())
                    waiting.add(more)
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if more is not None and more in done:
                    more = None
                for task in done:
                    if task not in sending:
                        continue  # the idle lanes' wake-up
                    lane = sending.pop(task)
                    if generation != self._generation:  # on its way when discarded: it
                        task.exception()  # confirms nothing (an error still surfaces)
                        continue
                    ok = task.result()  # a write that raised stays marked on its way:
                    self._buffered -= lane.sent(ok)  # the next flush sends it again
                    failed |= not ok
                if generation == self._generation:
                    self._confirm()
        finally:
            if more is not None:
                more.cancel()
            for task in sending:  # only when this was cancelled or a write raised: the
                task.cancel()     # threads finish by themselves

    def _shard(self) -> None:
        """Hand the queued chunks to the lanes, by series, up to the next delete."""
        until = self._deletes[0][0] if self._deletes else None
        k = len(self._lanes)
        while self._chunks and (until is None or self._sharded < until):
            rows = self._chunks.popleft()
            at = self._sharded
            self._sharded += len(rows)
            if k == 1:
                self._lanes[0].queue.append((at, rows))
                self._lanes[0].queued += len(rows)
                continue
            which = np.fromiter((hash(s) % k for s in rows.series()), np.int64, len(rows))
            for j, lane in enumerate(self._lanes):
                idx = np.flatnonzero(which == j)
                if len(idx):
                    lane.queue.append((at, rows if len(idx) == len(rows)
                                       else rows.take(idx.tolist())))
                    lane.queued += len(idx)

    def _written_up_to(self) -> int:
        """Every point queued before this position is written."""
        return min(lane.mark(self._sharded) for lane in self._lanes)

    def _confirm(self) -> None:
        """Hand ``on_written`` the tokens whose points are all written and that no delete
        queued with or before them still waits on."""
        upto = self._written_up_to()
        until = self._deletes[0][0] if self._deletes else None
        confirmed: list[object] = []
        while self._tokens and self._tokens[0][0] <= upto and (
                until is None or self._tokens[0][0] < until):
            confirmed.append(self._tokens.popleft()[1])
        if confirmed and self.on_written is not None:
            self.on_written(confirmed)

    async def _run_delete(self) -> bool:
        generation = self._generation
        at, todo = self._deletes.popleft()
        try:
            await asyncio.to_thread(self.sink.delete, todo)
        except SinkError as exc:
            self.write_errors += 1
            if not exc.retryable:
                log.error("sink %s refused to delete %d point(s): %s", self.sink.name,
                          len(todo), exc)
                return True
            log.warning("sink %s delete failed (will retry): %s", self.sink.name, exc)
            if generation == self._generation:  # in its place again, ahead of later ones
                if self._deletes and self._deletes[0][0] == at:
                    todo += self._deletes.popleft()[1]
                self._deletes.appendleft((at, todo))
            return False
        self.points_deleted += len(todo)
        return True

    def _take_background(self) -> None:
        """Queue a slice of the background points when nothing else waits, or all of them
        once the oldest has waited ``BACKGROUND_MAX_WAIT_MS``."""
        now = self.clock.monotonic_ms()
        since = now if self._later_since is None else self._later_since
        overdue = now - since >= BACKGROUND_MAX_WAIT_MS
        if not overdue and (self._buffered or self._tokens):
            return
        head, rest = split(self._later, self._later_n if overdue else BACKGROUND_SLICE)
        self._later = deque(rest)
        self._later_n -= total(head)
        self._later_since = now if rest else None
        self.add(head)

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
        """Counted by reason, kept in the dead-letter file, and logged: one line per reason
        and batch (a backfill older than the database's retention can refuse thousands)."""
        first: dict[str, str] = {}
        counts: Counter[str] = Counter()
        for line, reason in bad:
            self.dead_letters[reason] += 1
            counts[reason] += 1
            first.setdefault(reason, line)
        for reason, n in counts.items():
            if n == 1:
                log.error("dead-lettered a point (%s): %s", reason, first[reason][:200])
            else:
                log.error("dead-lettered %d points (%s), the first: %s", n, reason,
                          first[reason][:200])
        if self.dead_letter_path is not None:
            try:
                self._rotate_dead_letters(self.dead_letter_path)
                with self.dead_letter_path.open("a") as fh:
                    for line, reason in bad:
                        fh.write(json.dumps({"ts": self.clock.now_ms(), "reason": reason,
                                             "line": line}) + "\n")
            except OSError as exc:  # a full disk: the points are in the log above, and counted
                self.dead_letter_file_errors += 1
                log.error("dead-lettered points not written to %s (%s); they are in this log",
                          self.dead_letter_path, exc.strerror or exc)

    def _rotate_dead_letters(self, path: Path) -> None:
        """A dead-letter file past its bound becomes ``<name>.1`` (replacing the one before), so
        the file and its predecessor take at most twice the bound: a backfill older than the
        database's retention, refused point by point, cannot fill the worker's disk."""
        try:
            if path.stat().st_size < self.dead_letter_max_bytes:
                return
        except FileNotFoundError:
            return
        old = path.with_name(path.name + ".1")
        os.replace(path, old)
        log.warning("dead-letter file %s reached %d bytes: moved to %s (the one before it "
                    "dropped)", path, self.dead_letter_max_bytes, old.name)

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
                    self.failing_since, self.last_ok = None, self.clock.now_ms()
                self.points_written += n
                return True
            except SinkError as exc:
                self.write_errors += 1
                self.last_error = str(exc)
                if not exc.retryable:  # the server answers: it is reachable, taking writes
                    self.failing_since, self.last_ok = None, self.clock.now_ms()
                    # The server refused some points for good (1.x keeps the rest): find them by
                    # bisection, dead-letter them with the reason, never resend them forever.
                    bad = await self._isolate(batch, stop)
                    if bad is None:
                        return False
                    self.points_rejected += len(bad)
                    self.points_written += n - len(bad)
                    self._dead_letter(bad)
                    return True
                if self.failing_since is None:
                    self.failing_since = self.clock.now_ms()
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
