"""Injected clocks: nothing on a core path calls ``time.time()`` directly.

Two readings are offered: wall-clock epoch milliseconds (UTC), used for event-time plausibility and
for stamping what leaves the process, and a monotonic millisecond counter for intervals (timeouts,
flush periods), which never jumps when NTP steps the wall clock of a gateway without an RTC.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """What the core needs to know about time."""

    def now_ms(self) -> int:
        """Wall-clock epoch milliseconds, UTC."""
        ...

    def monotonic_ms(self) -> int:
        """A counter in milliseconds that never goes backwards."""
        ...


class SystemClock:
    """The real clocks of the machine."""

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


class ManualClock:
    """A test clock that only moves when told to."""

    def __init__(self, now_ms: int = 1_700_000_000_000, monotonic_ms: int = 0) -> None:
        self._now = now_ms
        self._mono = monotonic_ms

    def now_ms(self) -> int:
        return self._now

    def monotonic_ms(self) -> int:
        return self._mono

    def advance(self, ms: int) -> None:
        """Move both clocks forward by ``ms``."""
        if ms < 0:
            raise ValueError(f"a clock cannot be advanced by a negative amount ({ms} ms)")
        self._now += ms
        self._mono += ms

    def set_wall(self, now_ms: int) -> None:
        """Step the wall clock (as NTP would); the monotonic clock is untouched."""
        self._now = now_ms
