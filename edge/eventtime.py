"""Event time per device: watermarks, idle devices, and clock skew.

* ``watermark(d) = max(event time seen from d) - out_of_orderness``, raised by idle handling.
  The watermark a reading is judged against is the one *before* it, in arrival order per
  device; it is computed for a whole micro-batch at once with a segmented cumulative maximum, so
  results never depend on how the stream was cut into micro-batches.
* A device silent for ``idle_timeout`` (processing time) is *silent*: its watermark is lifted past
  every window it could still be in, so they close, and it no longer holds back the gateway
  watermark (the minimum over active devices). After a further ``allowed_lateness`` its retained
  state is purged.
* What the agent *reports* silent is judged against each device's own pace: a device heard
  from every 5 minutes (a battery sensor) is idle between its readings, not silent. Each
  device's typical interval between arrivals is learned (``interval``, processing time), and a
  device is reported silent once quiet for ``SILENT_INTERVALS`` of them, and at least
  ``idle_timeout``.
* Clock skew: for every device the minimum of ``receive time - event time`` over a period of
  processing time estimates its clock offset (plus the smallest transport delay): a device whose
  clock runs ahead shows a negative offset at once; buffered old data (a backfill) shows a large
  offset only until live readings come in, which is why estimates are used once a full period
  has been observed.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from devices.readings import I64, grow

NEVER = np.iinfo(np.int64).min // 4  # "no event time seen yet"
UNKNOWN_SKEW = np.iinfo(np.int64).max // 4

ACTIVE, SILENT, PURGED = 0, 1, 2
SILENT_INTERVALS = 3  # a device quiet for this many of its usual intervals is reported silent
INTERVAL_UNKNOWN, INTERVAL_ONE = 0, -1  # no arrival yet in this process; one arrival so far


@dataclass(frozen=True, kw_only=True)
class EventTimeSpec:
    out_of_orderness_ms: int = 2_000
    allowed_lateness_ms: int = 30_000
    idle_timeout_ms: int = 30_000

    def __post_init__(self) -> None:
        if self.out_of_orderness_ms < 0 or self.allowed_lateness_ms < 0:
            raise ValueError("out_of_orderness and allowed_lateness must be >= 0")
        if self.idle_timeout_ms <= 0:
            raise ValueError("idle_timeout must be > 0")


def running_max_before(dev: I64, ts: I64, prior: I64) -> I64:
    """For each row, the max of ``prior[dev]`` and the ``ts`` of earlier rows of the same device.

    Rows are in arrival order. Vectorised: stable sort by device, lift each device's segment
    above the previous one, cumulative maximum, shift by one within segments.
    """
    n = len(dev)
    if n == 0:
        return np.empty(0, np.int64)
    order = np.argsort(dev, kind="stable")
    d_s = dev[order]
    t_s = ts[order]
    new_seg = np.empty(n, bool)
    new_seg[0] = True
    np.not_equal(d_s[1:], d_s[:-1], out=new_seg[1:])
    seg = np.cumsum(new_seg) - 1
    tmin = int(t_s.min())
    span = int(t_s.max()) - tmin + 1
    if int(seg[-1]) * span >= (1 << 62):  # cannot lift safely: fall back per segment
        inclusive = t_s.copy()
        bounds = [*np.flatnonzero(new_seg).tolist(), n]
        for lo, hi in itertools.pairwise(bounds):
            inclusive[lo:hi] = np.maximum.accumulate(t_s[lo:hi])
    else:
        lifted = (t_s - tmin) + seg * span
        inclusive = np.maximum.accumulate(lifted) - seg * span + tmin
    exclusive = np.empty(n, np.int64)
    exclusive[0] = NEVER
    exclusive[1:] = inclusive[:-1]
    exclusive[new_seg] = NEVER
    out = np.empty(n, np.int64)
    out[order] = np.maximum(prior[d_s], exclusive)
    return out


class DeviceTime:
    """Per-device event-time state, indexed by interned device id."""

    def __init__(self, spec: EventTimeSpec, *, reach_ms: int, skew_period_ms: int = 60_000
                 ) -> None:
        self.spec = spec
        self.reach_ms = reach_ms  # how far past its newest reading a device's windows can end
        self.skew_period_ms = skew_period_ms
        self.max_ts: I64 = np.empty(0, np.int64)
        self.wm_floor: I64 = np.empty(0, np.int64)
        self.last_seen: I64 = np.empty(0, np.int64)
        self.interval: I64 = np.empty(0, np.int64)  # usual ms between arrivals (or a code)
        self.state: I64 = np.empty(0, np.int64)
        self.skew_cur: I64 = np.empty(0, np.int64)  # min(recv - ts) in the current period
        self.skew_est: I64 = np.empty(0, np.int64)  # ... over the last complete period
        self.skew_period_start: int | None = None

    def ensure(self, n: int) -> None:
        self.max_ts = grow(self.max_ts, n, NEVER)
        self.wm_floor = grow(self.wm_floor, n, NEVER)
        self.last_seen = grow(self.last_seen, n, 0)
        self.interval = grow(self.interval, n, INTERVAL_UNKNOWN)
        self.state = grow(self.state, n, ACTIVE)
        self.skew_cur = grow(self.skew_cur, n, UNKNOWN_SKEW)
        self.skew_est = grow(self.skew_est, n, UNKNOWN_SKEW)

    def reset(self, ids: I64) -> None:
        """Ids released for other devices: as if never seen."""
        self.ensure(int(ids.max()) + 1 if len(ids) else 0)
        self.max_ts[ids] = NEVER
        self.wm_floor[ids] = NEVER
        self.last_seen[ids] = 0
        self.interval[ids] = INTERVAL_UNKNOWN
        self.state[ids] = ACTIVE
        self.skew_cur[ids] = UNKNOWN_SKEW
        self.skew_est[ids] = UNKNOWN_SKEW

    # ---- watermarks ---------------------------------------------------------------------

    def watermarks(self) -> I64:
        raw = np.where(self.max_ts == NEVER, NEVER, self.max_ts - self.spec.out_of_orderness_ms)
        return np.maximum(raw, self.wm_floor)

    def advance(self, dev: I64, ts: I64, now_mono_ms: int, first_end: I64 | None = None
                ) -> I64:
        """The watermark each reading is judged against (the one before it, in arrival order
        per device); then the readings are observed: the devices' newest event times move on
        and they count as active, seen at ``now_mono_ms``.

        With ``first_end`` (the earliest event time at which each reading could count as late,
        e.g. the end of its first window), rows whose device cannot reach it within this batch
        get an upper bound instead of the exact value (both are below ``first_end``, which is
        all that callers compare): only the others pay for the per-device running maximum.
        """
        ooo = self.spec.out_of_orderness_ms
        floor = self.wm_floor[dev]
        batch_max = self.max_ts.copy()
        np.maximum.at(batch_max, dev, ts)
        out = None
        if first_end is not None:
            # a row's own event time is in its device's batch maximum: never NEVER
            bound = np.maximum(batch_max[dev] - ooo, floor)
            exact = bound >= first_end
            if not exact.any():
                out = bound
            elif exact.mean() < 0.5:
                # only the devices of rows that may be late need the exact running maximum
                devs = np.zeros(len(batch_max), bool)
                devs[dev[exact]] = True
                rows = np.flatnonzero(devs[dev])
                out = bound.copy()
                seen = running_max_before(dev[rows], ts[rows], self.max_ts)
                wm = np.where(seen == NEVER, NEVER, seen - ooo)
                out[rows] = np.maximum(wm, floor[rows])
        if out is None:
            seen = running_max_before(dev, ts, self.max_ts)
            out = np.maximum(np.where(seen == NEVER, NEVER, seen - ooo), floor)
        self.max_ts = batch_max
        present = np.zeros(len(self.state), bool)
        present[dev] = True
        self._learn_interval(present, now_mono_ms)
        self.last_seen[present] = now_mono_ms
        self.state[present] = ACTIVE
        return out

    def _learn_interval(self, present: npt.NDArray[np.bool_], now_mono_ms: int) -> None:
        """Each arriving device's usual interval: a moving average of the gaps between its
        arrivals (a quarter weight to the newest), a gap counted at most 4 times the usual one,
        so that one outage does not make a device look slow for long."""
        prev = self.interval[present]
        gap = np.maximum(now_mono_ms - self.last_seen[present], 1)
        learned = (3 * prev + np.minimum(gap, 4 * prev)) // 4
        self.interval[present] = np.where(prev == INTERVAL_UNKNOWN, INTERVAL_ONE,
                                          np.where(prev == INTERVAL_ONE, gap,
                                                   np.maximum(learned, 1)))

    def gateway_watermark(self) -> int | None:
        wm = self.watermarks()
        active = (self.state == ACTIVE) & (wm != NEVER)
        return int(wm[active].min()) if active.any() else None

    @property
    def active_devices(self) -> int:
        return int(((self.state == ACTIVE) & (self.max_ts != NEVER)).sum())

    def silent_devices(self, now_mono_ms: int) -> I64:
        """The devices reported silent: quiet for ``SILENT_INTERVALS`` of their usual interval,
        and at least ``idle_timeout`` (which is also how long a device unheard from since the
        agent started, or heard once, may be quiet)."""
        quiet = now_mono_ms - self.last_seen
        usual = np.where(self.interval > 0, SILENT_INTERVALS * self.interval, 0)
        after = np.maximum(usual, self.spec.idle_timeout_ms)
        return np.flatnonzero((self.state != ACTIVE) & (self.max_ts != NEVER) & (quiet >= after))

    def idle_step(self, now_mono_ms: int) -> npt.NDArray[np.bool_]:
        """Apply idle transitions; returns the mask of devices that went silent just now."""
        seen = self.max_ts != NEVER
        quiet = now_mono_ms - self.last_seen
        to_silent = seen & (self.state == ACTIVE) & (quiet >= self.spec.idle_timeout_ms)
        to_purge = seen & (self.state == SILENT) & (
            quiet >= self.spec.idle_timeout_ms + self.spec.allowed_lateness_ms)
        if to_silent.any():
            self.wm_floor = np.where(to_silent, np.maximum(
                self.wm_floor, self.max_ts + self.reach_ms), self.wm_floor)
            self.state[to_silent] = SILENT
        if to_purge.any():
            self.wm_floor = np.where(to_purge, np.maximum(
                self.wm_floor, self.max_ts + self.reach_ms + self.spec.allowed_lateness_ms),
                self.wm_floor)
            self.state[to_purge] = PURGED
        return np.asarray(to_silent, dtype=bool)

    # ---- clock skew ---------------------------------------------------------------------

    def observe_skew(self, dev: I64, ts: I64, recv: I64, now_mono_ms: int) -> None:
        if self.skew_period_start is None:
            self.skew_period_start = now_mono_ms
        elif now_mono_ms - self.skew_period_start >= self.skew_period_ms:
            done = self.skew_cur != UNKNOWN_SKEW
            self.skew_est = np.where(done, self.skew_cur, self.skew_est)
            self.skew_cur = np.full(len(self.skew_cur), UNKNOWN_SKEW, np.int64)
            self.skew_period_start = now_mono_ms
        np.minimum.at(self.skew_cur, dev, recv - ts)

    def skew(self) -> I64:
        """Estimated offset ``receive - event`` time per device (UNKNOWN_SKEW if none yet).

        Negative: the device clock runs ahead. The current period counts once the previous one
        has completed, so a device's estimate settles after one full period.
        """
        both = np.minimum(self.skew_est, self.skew_cur)
        return np.where(self.skew_est == UNKNOWN_SKEW, UNKNOWN_SKEW, both)

    # ---- durability ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, npt.NDArray[np.generic]]:
        return {"dt_max_ts": self.max_ts, "dt_wm_floor": self.wm_floor,
                "dt_state": self.state, "dt_skew_est": self.skew_est,
                "dt_skew_cur": self.skew_cur, "dt_interval": self.interval}

    def restore(self, snap: dict[str, npt.NDArray[np.generic]], now_mono_ms: int) -> None:
        self.max_ts = snap["dt_max_ts"].astype(np.int64)
        self.wm_floor = snap["dt_wm_floor"].astype(np.int64)
        self.state = snap["dt_state"].astype(np.int64)
        self.skew_est = snap["dt_skew_est"].astype(np.int64)
        self.skew_cur = snap["dt_skew_cur"].astype(np.int64)
        self.last_seen = np.full(len(self.max_ts), now_mono_ms, np.int64)
        # (a checkpoint from before: each device's pace learned again)
        self.interval = (snap["dt_interval"].astype(np.int64) if "dt_interval" in snap
                         else np.full(len(self.max_ts), INTERVAL_UNKNOWN, np.int64))
