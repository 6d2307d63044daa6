"""The faults a simulated fleet can suffer, declared per device or fleet-wide.

Point faults hit single readings, with a probability per reading (``rate``) or at a scheduled
time (``at``, optionally repeating ``every``):

* ``spike``: the value is off by ``magnitude`` (default: the kind's spike size, random sign);
* ``duplicate``: the message is published twice;
* ``malformed``: a payload that is not JSON is sent instead;
* ``out_of_range``: the value is replaced by one outside the kind's physical range;
* ``out_of_order``: the reading is held back one interval (within any sane out-of-orderness);
* ``straggler`` / ``late``: the reading is held back ``offset`` (within / beyond the agent's
  allowed lateness);
* ``reboot``: the device restarts before this reading: its sequence numbers begin again at 0
  (its clock goes on), as a device on a weak supply or with a watchdog does.

Interval faults last ``duration`` from ``at`` (repeating ``every``), or start at random with
probability ``rate`` per device and tick:

* ``level_shift``: ``magnitude`` is added to the values;
* ``stuck``: the value stays at what it was when the fault began;
* ``drift``: ``magnitude`` per hour is added, growing from the start of the fault;
* ``dropout``: the device's messages are lost (its readings are still numbered, so the gap
  shows in the sequence numbers);
* ``burst``: the device reports ``factor`` times per interval;
* ``clock_skew``: the device stamps its readings ``offset`` away from the true time;
* ``clock_jump``: from ``at`` on, the device's clock is ``offset`` away (use two to jump forward
  and back).

Every injection is written to ground truth as it happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from devices.settings import parse_duration_ms

POINT = ("spike", "duplicate", "malformed", "out_of_range", "out_of_order", "straggler", "late",
         "reboot")
INTERVAL = ("level_shift", "stuck", "drift", "dropout", "burst", "clock_skew", "clock_jump")
TYPES = POINT + INTERVAL


@dataclass(frozen=True, kw_only=True)
class FaultSpec:
    type: str
    devices: tuple[str, ...] = ()  # explicit device ids
    fraction: float = 1.0  # of the fleet's devices (chosen by the seed), when none are listed
    rate: float = 0.0  # per reading (point) or per device and tick (interval)
    at_ms: int | None = None  # scheduled start, from the fleet's start
    every_ms: int = 0  # repeat period of a scheduled fault
    duration_ms: int = 0  # interval faults
    magnitude: float | None = None
    offset_ms: int = 0  # clock faults; hold-back of straggler/late
    factor: int = 5  # burst: readings per interval
    after_ms: int = 0  # no random injection before this (detectors need a history)
    spacing_ms: int = 0  # at least this much between two random injections on one device

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"fault type must be one of {', '.join(TYPES)}; got {self.type!r}")
        if not 0.0 <= self.rate <= 1.0 or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"{self.type}: rate and fraction must be within [0, 1]")
        if self.rate == 0 and self.at_ms is None:
            raise ValueError(f"{self.type}: give a rate or a time (at)")
        if self.type in INTERVAL and self.type != "clock_jump" and self.duration_ms <= 0:
            raise ValueError(f"{self.type}: an interval fault needs a duration")
        if self.type == "burst" and self.factor < 2:
            raise ValueError("burst: factor must be >= 2")
        if self.type in ("clock_skew", "clock_jump", "straggler", "late") and not self.offset_ms:
            raise ValueError(f"{self.type}: needs an offset")

    @property
    def point(self) -> bool:
        return self.type in POINT

    @classmethod
    def from_mapping(cls, raw: dict[str, Any], key: str = "faults") -> FaultSpec:
        def dur(name: str) -> int | None:
            return parse_duration_ms(raw[name], f"{key}.{name}") if name in raw else None

        known = {"type", "devices", "fraction", "rate", "at", "every", "duration", "magnitude",
                 "offset", "factor", "after", "spacing"}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)}")
        return cls(
            type=str(raw.get("type")), devices=tuple(raw.get("devices", ())),
            fraction=float(raw.get("fraction", 1.0)), rate=float(raw.get("rate", 0.0)),
            at_ms=dur("at"), every_ms=dur("every") or 0, duration_ms=dur("duration") or 0,
            magnitude=None if raw.get("magnitude") is None else float(raw["magnitude"]),
            offset_ms=_signed_duration(raw.get("offset"), f"{key}.offset"),
            factor=int(raw.get("factor", 5)), after_ms=dur("after") or 0,
            spacing_ms=dur("spacing") or 0,
        )


def _signed_duration(raw: object, key: str) -> int:
    if raw is None:
        return 0
    if isinstance(raw, str) and raw.strip().startswith("-"):
        return -parse_duration_ms(raw.strip()[1:], key)
    return parse_duration_ms(raw, key)
