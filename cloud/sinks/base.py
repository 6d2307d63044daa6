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

from cloud.sinks.lineproto import parse_line
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
    """Writes line-protocol points; returns once the server confirmed them."""

    name: str

    def write(self, lines: list[str]) -> None: ...

    def delete(self, points: list[Identity]) -> None:
        """Delete points by identity (results the edge withdrew)."""
        ...

    def close(self) -> None: ...


class MemorySink:
    """Keeps lines in memory (tests and dry runs). ``strict``: behaves as a store, as InfluxDB
    does (``points`` by identity, a rewrite merges field by field, a delete removes; a line that
    is not line protocol is refused for good and the rest of the batch kept)."""

    name = "memory"

    def __init__(self, *, strict: bool = False) -> None:
        self.lines: list[str] = []
        self.deleted: list[Identity] = []
        self.strict = strict
        self.points: dict[tuple[str, tuple[tuple[str, str], ...], int], dict[str, object]] = {}
        self._lock = threading.Lock()  # the writer sends several batches at once

    def write(self, lines: list[str]) -> None:
        bad: list[str] = []
        with self._lock:
            self.lines.extend(lines)
            if not self.strict:
                return
            for ln in lines:
                try:
                    meas, tags, fields, ts = parse_line(ln)
                except ValueError as exc:
                    bad.append(f"unable to parse {ln[:80]!r}: {exc}")
                    continue
                self.points.setdefault((meas, tuple(sorted(tags.items())), ts), {}).update(
                    fields)
        if bad:
            raise SinkError(f"partial write: {bad[0]} dropped={len(bad)}", retryable=False,
                            rejected=len(bad))

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


class BufferedWriter:
    """Batches lines, writes them off the event loop, retries with capped jittered backoff.

    ``on_written`` is called (in the event loop) with each batch's tokens once the sink confirmed
    it: that is the only moment a result counts as written.
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
        self._lines: deque[str] = deque()
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
        return len(self._lines)

    def delete(self, points: list[Identity]) -> None:
        """Delete these identities after everything queued so far has been written."""
        self._deletes.extend(points)
        self._wake.set()

    def discard(self) -> int:
        """Drop everything queued and not yet written, tokens unconfirmed (a worker that may
        have lost its partitions must not write what it held); returns the lines dropped."""
        n = len(self._lines)
        self._lines.clear()
        self._tokens.clear()
        self._deletes.clear()
        self._confirmed.clear()
        self._done = self._added
        return n

    def add(self, lines: list[str], token: object = None) -> None:
        """Queue points; ``token`` is handed to ``on_written`` once they are confirmed."""
        self._lines.extend(lines)
        self._added += len(lines)
        if token is not None:
            self._tokens.append((self._added, token))
        if len(self._lines) >= self.batch_points:
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
        while self._lines or self._tokens:  # the writes; deletes follow them
            if self.fence is not None and not self.fence():
                return True
            n = min(self.batch_points, len(self._lines))
            lines = list(itertools.islice(self._lines, n))
            ok = await self._write_sharded(lines, stop, attempts)
            if not ok:
                return False
            for _ in range(n):
                self._lines.popleft()
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

    async def _write_sharded(self, lines: list[str], stop: asyncio.Event | None,
                             attempts: int | None) -> bool:
        """Write a batch as ``concurrency`` requests at once (InfluxDB ingests them in parallel),
        split by series: every version of a point lands in the same request, in the order it
        was queued, so a revision can never be overtaken by the value it replaces."""
        k = self.concurrency
        if k == 1 or len(lines) < 2 * k:
            return await self._write_with_retry(lines, stop, attempts)
        shards: list[list[str]] = [[] for _ in range(k)]
        for ln in lines:  # the measurement and tags: everything before the first space
            shards[hash(ln[:ln.find(" ")]) % k].append(ln)
        done = await asyncio.gather(*(self._write_with_retry(s, stop, attempts)
                                      for s in shards if s))
        return all(done)

    async def _isolate(self, lines: list[str], stop: asyncio.Event | None
                       ) -> list[tuple[str, str]] | None:
        """The lines the sink refuses for good, with the reason; the others are written
        (writes are idempotent, so re-sending the good ones is harmless). None: gave up."""
        if len(lines) == 1:
            try:
                await asyncio.to_thread(self.sink.write, lines)
                return []
            except SinkError as exc:
                if exc.retryable:
                    ok = await self._write_with_retry(lines, stop, 5)
                    return [] if ok else None
                return [(lines[0], classify(str(exc)))]
        mid = len(lines) // 2
        out: list[tuple[str, str]] = []
        for half in (lines[:mid], lines[mid:]):
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

    async def _write_with_retry(self, lines: list[str], stop: asyncio.Event | None,
                                attempts: int | None) -> bool:
        backoff = 200
        tries = 0
        while True:
            tries += 1
            try:
                if lines:
                    await asyncio.to_thread(self.sink.write, lines)
                    self.writes += 1
                self.points_written += len(lines)
                return True
            except SinkError as exc:
                self.write_errors += 1
                self.last_error = str(exc)
                if not exc.retryable:
                    # The server refused some points for good (1.x keeps the rest): find them by
                    # bisection, dead-letter them with the reason, never resend them forever.
                    bad = await self._isolate(lines, stop)
                    if bad is None:
                        return False
                    self.points_rejected += len(bad)
                    self.points_written += len(lines) - len(bad)
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
