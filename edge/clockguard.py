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
  so a steady clock is never judged implausible by it; or
* its devices agree it is behind (``devices_say``): a clock set, but from a time saved days ago
  (a Pi booted where a firewall lets MQTT through but not NTP), is past the floor and steps
  back from nothing, yet every device that stamps its readings finds them ``clock_future``.
  When ``AGREE`` devices or more, and more than those in step with it, send readings ahead of
  it by more than ``max_future`` within a minute (and by about as much: within ``max_future``
  of each other), the gateway clock is the wrong one, not each of theirs. It is sane again
  once it has caught up with them (their time carried forward by the monotonic clock). Unless
  the cloud worker said within the last ``CLOUD_SAYS_MS`` that this clock is right
  (``cloud_says``: it tells each gateway once a minute, from the time its health reports take):
  then the devices are wrong (a site's devices set to local time, say), their readings are
  refused as before, and a doubt they raised ends.

A quarantine that outgrows its bound sheds its oldest messages, decoded and counted as rejected
``clock_unsynced``: per device, like every other rejection.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import deque
from typing import NamedTuple

import numpy as np

from devices.readings import grow
from devices.status import CLOCK_OFF_MS, duration

log = logging.getLogger("fieldline.edge.clock")

SLACK_MS = 60_000  # how far a clock may step back (a slewed second, a leap) before it is doubted
AGREE = 3  # devices ahead of the gateway clock that, as the most of those heard, say it is behind
AGREE_MS = 60_000  # ... within this much monotonic time
CLOUD_SAYS_MS = 600_000  # the cloud's word that the clock is right holds this long
NO_MONO = -1  # a held message's monotonic time is unknown (received in an earlier boot)
NEVER_MS = np.iinfo(np.int64).min // 4  # (a device not seen so)


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
        # per device id, the monotonic ms of its last reading in step with the clock, of its
        # last ahead of it by more than max_future, and by how much that was (devices_say)
        self._step_mono = np.zeros(0, np.int64)
        self._lead_mono = np.zeros(0, np.int64)
        self._lead = np.zeros(0, np.int64)
        # the devices' time when they said the clock is behind: (wall ms, monotonic ms)
        self._devices_time: tuple[int, int] | None = None
        self._devices_said = ""
        self._cloud_fine_at: int | None = None  # monotonic ms the cloud last said it is right

    def judge(self, now_ms: int, mono_ms: int) -> str | None:
        """Why the clock reading ``now_ms`` cannot be trusted, or None (and remember it)."""
        if now_ms < self.floor_ms:
            why = (f"the gateway clock reads {iso(now_ms)}, before validate.clock_floor "
                   f"{iso(self.floor_ms)} (no network time yet?)")
        elif self.trusted_ms and now_ms < self.trusted_ms - self.max_future_ms - SLACK_MS:
            why = (f"the gateway clock reads {iso(now_ms)}, {(self.trusted_ms - now_ms) / 1000:.0f}"
                   f" s behind readings it already accepted (up to {iso(self.trusted_ms)}): "
                   f"it went back")
        elif self._devices_time is not None and now_ms < (
                self._devices_time[0] + mono_ms - self._devices_time[1] - self.max_future_ms):
            theirs = self._devices_time[0] + mono_ms - self._devices_time[1]
            why = (f"the gateway clock reads {iso(now_ms)}, {duration(theirs - now_ms)} behind "
                   f"its devices' clocks ({self._devices_said})")
        else:
            why = None
        if why is None:
            self._devices_time = None
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

    def devices_say(self, device: np.ndarray, ts: np.ndarray, recv: np.ndarray, now_ms: int,
                    mono_ms: int) -> bool:
        """Whether the devices of a decoded batch (``device``, event times ``ts``, receive
        times ``recv``) now say the clock reading ``now_ms`` is behind (then it is not trusted
        from here on: ``judge``). Each device's last reading in step with the clock, and its
        last ahead of it (and by how much), are kept per device id: what the last ``AGREE_MS``
        showed is judged, whatever batches it came in. Readings stamped at receipt
        (``ts == recv``) say nothing of the time."""
        if not len(device):
            return False
        n = int(device.max()) + 1  # (the three grow together: one length)
        self._step_mono = grow(self._step_mono, n, NEVER_MS)
        self._lead_mono = grow(self._lead_mono, n, NEVER_MS)
        self._lead = grow(self._lead, n, 0)
        ahead = ts > now_ms + self.max_future_ms
        self._step_mono[device[~ahead & (ts != recv)]] = mono_ms
        if not ahead.any():
            return False
        dev = device[ahead]
        self._lead[dev] = np.iinfo(np.int64).max
        np.minimum.at(self._lead, dev, ts[ahead] - now_ms)  # its least lead in this batch
        self._lead_mono[dev] = mono_ms
        recent = self._lead_mono > mono_ms - AGREE_MS
        leads = np.sort(self._lead[recent])
        in_step = int(np.count_nonzero((self._step_mono > mono_ms - AGREE_MS) & ~recent))
        if len(leads) < AGREE:
            return False
        mid = int(leads[len(leads) // 2])
        agree = int(np.count_nonzero(np.abs(leads - mid) <= self.max_future_ms))
        if agree < AGREE or agree <= in_step:  # fewer than those in step, or each ahead its
            return False  # own way: their clocks are the wrong ones
        if self._cloud_fine_at is not None and mono_ms - self._cloud_fine_at < CLOUD_SAYS_MS:
            return False  # the cloud finds this clock right: the devices' are the wrong ones
        self._devices_said = (f"{agree} devices' readings {duration(mid)} ahead of it, "
                              f"{in_step} in step with it")
        self._devices_time = (now_ms + mid, mono_ms)
        self._lead_mono[:] = NEVER_MS  # (said: gathered afresh next time)
        return True

    def cloud_says(self, offset_ms: int, mono_ms: int) -> None:
        """The cloud worker's word on this clock (``Ack.clock_ms``): right (within
        ``CLOCK_OFF_MS``), devices ahead of it are wrong for the next ``CLOUD_SAYS_MS``, and a
        doubt they raised ends (what it held is released, and judged by the clock)."""
        if abs(offset_ms) < CLOCK_OFF_MS:
            self._cloud_fine_at = mono_ms
            if self._devices_time is not None:  # a doubt the devices raised ends (theirs are
                log.warning("the cloud worker finds the gateway clock right (%d ms off its "
                            "own): the devices ahead of it are the wrong ones; their readings "
                            "are refused as clock_future", offset_ms)
                self._devices_time = None  # wrong: a site's devices set to local time, say)
        else:
            self._cloud_fine_at = None

    def estimate_ms(self, now_ms: int, mono_ms: int) -> int:
        """The best guess of the true time: the clock itself when sane, else the last sane
        reading carried forward by the monotonic clock (else the last accepted event time).
        (Not its devices' time when they doubt it: the health reports stamped with this are
        what the cloud worker tells the clock by, and its word may be that the devices are
        wrong. Stamped with theirs, the cloud would find the clock as far off as they do.)"""
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
