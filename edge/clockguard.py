"""Whether the gateway's own clock can be trusted, and what waits until it can.

A Raspberry Pi has no battery-backed clock: it boots at 1970 (or at whatever time fake-hwclock
saved) and is right only once network time has set it. Judged against such a clock, correct
device readings look decades ahead (``clock_future``) and readings without a time of their own
are stamped in 1970. So while the gateway clock is implausible the agent judges nothing by it:
raw messages are held (in memory, bounded by ``validate.quarantine_max``, and in the
checkpoint), counted as quarantined, and re-judged once the clock is sane again, their receive
times restamped from the monotonic clock, which network time never steps.

The clock is implausible when

* it reads before ``validate.clock_floor`` (default 2020-01-01: no gateway runs earlier), or
* it is behind event times the agent already accepted by more than ``max_future`` and a minute:
  those were accepted as at most ``max_future`` ahead of the clock of that moment, so a clock
  now behind them went back (a step of the network time, a reboot without network, an RTC
  with a flat battery). Readings only ever move this mark forward if they passed ``max_future``,
  so a steady clock is never judged implausible by it.

A quarantine that outgrows its bound sheds its oldest messages, decoded and counted as rejected
``clock_unsynced``: per device, like every other rejection.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from typing import NamedTuple

import numpy as np

log = logging.getLogger("fieldline.edge.clock")

SLACK_MS = 60_000  # how far a clock may step back (a slewed second, a leap) before it is doubted
NO_MONO = -1  # a held message's monotonic time is unknown (received in an earlier boot)


def boot_id() -> str:
    """This boot of the machine (monotonic times compare only within one)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


class Held(NamedTuple):
    topic: str
    payload: bytes
    recv_ms: int  # as stamped by the (implausible) wall clock
    mono_ms: int  # the monotonic clock at receipt, or NO_MONO


class ClockGuard:
    """Judges the gateway clock and keeps what arrives while it cannot be trusted."""

    def __init__(self, *, floor_ms: int, max_future_ms: int, max_bytes: int) -> None:
        self.floor_ms = floor_ms
        self.max_future_ms = max_future_ms
        self.max_bytes = max_bytes
        self.trusted_ms = 0  # the latest event time accepted (by a sane clock)
        self.held: deque[Held] = deque()
        self.held_bytes = 0
        self.reason: str | None = None  # why the clock is implausible now (None: it is sane)
        self.quarantined = 0  # messages ever held
        self.released = 0  # messages re-judged once the clock was sane
        self.shed = 0  # messages the bound pushed out (their readings: clock_unsynced)
        self.episodes = 0  # times the clock turned implausible
        self._sane: tuple[int, int] | None = None  # (wall, monotonic) last seen sane this run
        self.boot = boot_id()

    def judge(self, now_ms: int, mono_ms: int) -> str | None:
        """Why the clock reading ``now_ms`` cannot be trusted, or None (and remember it)."""
        if now_ms < self.floor_ms:
            why = (f"the gateway clock reads {iso(now_ms)}, before validate.clock_floor "
                   f"{iso(self.floor_ms)} (no network time yet?)")
        elif self.trusted_ms and now_ms < self.trusted_ms - self.max_future_ms - SLACK_MS:
            why = (f"the gateway clock reads {iso(now_ms)}, {(self.trusted_ms - now_ms) / 1000:.0f}"
                   f" s behind readings it already accepted (up to {iso(self.trusted_ms)}): "
                   f"it went back")
        else:
            why = None
        if why is None:
            self._sane = (now_ms, mono_ms)
            if self.reason is not None:
                log.warning("the gateway clock is sane again (%s): re-judging %d held messages",
                            iso(now_ms), len(self.held))
        elif self.reason is None:
            self.episodes += 1
            log.error("%s: holding device messages until it is sane (validate.quarantine_max "
                      "%d bytes), nothing is judged by it", why, self.max_bytes)
        self.reason = why
        return why

    def estimate_ms(self, now_ms: int, mono_ms: int) -> int:
        """The best guess of the true time: the clock itself when sane, else the last sane
        reading carried forward by the monotonic clock (else the last accepted event time)."""
        if self.reason is None:
            return now_ms
        if self._sane is not None:
            return self._sane[0] + mono_ms - self._sane[1]
        return max(self.trusted_ms, self.floor_ms)

    def accepted(self, ts: np.ndarray) -> None:
        """Event times accepted under a sane clock move the mark a later clock is held to."""
        if len(ts):
            self.trusted_ms = max(self.trusted_ms, int(ts.max()))

    def hold(self, messages: list[tuple[str, bytes, int]], now_ms: int, mono_ms: int
             ) -> list[tuple[str, bytes, int]]:
        """Keep ``messages``; returns the oldest ones the bound no longer has room for."""
        for topic, payload, recv in messages:
            mono = mono_ms - min(max(now_ms - recv, 0), mono_ms)
            self.held.append(Held(topic, payload, recv, mono))
            self.held_bytes += len(payload) + len(topic)
        self.quarantined += len(messages)
        out: list[tuple[str, bytes, int]] = []
        while self.held_bytes > self.max_bytes and self.held:
            h = self.held.popleft()
            self.held_bytes -= len(h.payload) + len(h.topic)
            out.append((h.topic, h.payload, h.recv_ms))
        self.shed += len(out)
        return out

    def release(self, now_ms: int, mono_ms: int) -> list[tuple[str, bytes, int]]:
        """Everything held, with receive times restamped by the sane clock."""
        out = [(h.topic, h.payload,
                h.recv_ms if h.mono_ms == NO_MONO else now_ms - (mono_ms - h.mono_ms))
               for h in self.held]
        self.released += len(out)
        self.held.clear()
        self.held_bytes = 0
        return out

    # ---- checkpoint ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, np.ndarray]:
        h = self.held
        return {
            "clk_trusted": np.array([self.trusted_ms], np.int64),
            "clk_counts": np.array([self.quarantined, self.released, self.shed, self.episodes],
                                   np.int64),
            "clk_boot": np.array([self.boot], dtype=str),
            "clk_topic": np.array([x.topic for x in h], dtype=str),
            "clk_payload": np.frombuffer(b"".join(x.payload for x in h), np.uint8),
            "clk_len": np.array([len(x.payload) for x in h], np.int64),
            "clk_recv": np.array([x.recv_ms for x in h], np.int64),
            "clk_mono": np.array([x.mono_ms for x in h], np.int64),
        }

    def restore(self, snap: dict[str, np.ndarray]) -> None:
        if "clk_trusted" not in snap:
            return
        self.trusted_ms = int(snap.pop("clk_trusted")[0])
        self.quarantined, self.released, self.shed, self.episodes = (
            int(x) for x in snap.pop("clk_counts"))
        same_boot = str(snap.pop("clk_boot")[0]) == self.boot
        data = snap.pop("clk_payload").tobytes()
        ends = np.cumsum(snap.pop("clk_len")).tolist()
        topics = snap.pop("clk_topic").tolist()
        recv = snap.pop("clk_recv").tolist()
        mono = snap.pop("clk_mono").tolist()
        self.held.clear()
        self.held_bytes = 0
        start = 0
        for topic, end, r, m in zip(topics, ends, recv, mono, strict=True):
            payload = data[start:end]
            start = end
            self.held.append(Held(str(topic), payload, int(r), int(m) if same_boot else NO_MONO))
            self.held_bytes += len(payload) + len(topic)
