"""A gateway's clock against the worker's, told from the time its health reports take.

A gateway whose clock is set (after ``validate.clock_floor``, never stepped back) can still be
wrong: a Pi booted from its last saved time on a network that lets MQTT through but not NTP (a
factory's firewall) runs hours or days behind, one with a drifting clock and no sync minutes
off. Nothing at the gateway can tell: its agent judges every reading by that clock, stamps
readings without a time of their own with it, and its health reports carry it, so they are
filed in the past (or the future) and the gateway looks as if it had stopped reporting.

The worker can tell. A report stamped ``sent`` by the gateway comes at ``at`` by the worker's
clock: ``at - sent`` is the time it took plus how far the gateway's clock is behind. Delays
only ever add, so the least of the reports of the last minutes is the truest; only reports
that come as they were sent count (``LIVE``: the worker's time since the gateway's previous
one at least 0.8 of the gateway's: reports queued in the broker while the worker was down,
drained faster than they were sent, each look far behind), and it is judged only on reports
spread over at least 2 minutes of the worker's time.

The worker's own clock can be the wrong one (its host's time sync broken), or it can stay
minutes behind everything its gateways send, at their pace (short of CPU, or of InfluxDB):
then every gateway looks off by the same amount, and the alert would send someone to each of
them. With ``FLEET`` gateways or more told, the median of their clocks is the reference: the
worker is said to be off when that median is (``worker_off``), and each gateway is judged
against it, the one clock off its peers' found as before.
"""

from __future__ import annotations

import logging

from devices.status import CLOCK_OFF_MS, told

__all__ = ["CLOCK_OFF_MS", "CLOCK_TELL_MS", "GatewayClocks", "told"]

log = logging.getLogger("fieldline.cloud")

BUCKET_MS = 30_000  # the least delay is kept per this much of the worker's time ...
SPAN_BUCKETS = 4  # ... judged on reports spread over at least this many (2 minutes)
KEEP_BUCKETS = 5  # ... of the last this many (a clock set right is seen so 2.5 minutes on)
CLOCK_TELL_MS = 60_000  # each gateway is told its clock in an ack of its own this often
FLEET = 3  # with this many gateways told, each is judged against their median clock
LIVE = 0.8  # a report counts when the worker's time since the previous one is this share of
# the gateway's, or more (a backlog drained faster than it was sent does not)


class GatewayClocks:
    """Each gateway's clock minus the worker's, from its health reports."""

    def __init__(self) -> None:
        # gateway -> [[bucket of the worker's time, least (at - sent) in it]], oldest first
        self._seen: dict[str, list[list[int]]] = {}
        self.off: dict[str, int] = {}  # the gateways whose clock is off now: by how much
        self._last: dict[str, tuple[int, int]] = {}  # gateway -> (at, sent) of its last report
        self._told: dict[str, tuple[int, int]] = {}  # gateway -> (bucket, offset) last told
        # the gateways' median clock minus the worker's when it is off itself (the worker's
        # clock, or its lag): what each gateway is judged against then; 0 when it is not
        self.worker_off = 0
        self._fleet_at = -1  # the bucket ``worker_off`` was reckoned in
        self._first: dict[str, int] = {}  # gateway -> the bucket it was first told in

    def report(self, gateway: str, sent_ms: int, at_ms: int) -> int | None:
        """A health report ``gateway`` stamped ``sent_ms`` came at ``at_ms`` (the worker's
        time): its clock minus the worker's (positive: ahead), or None while its reports
        known do not span ``SPAN_BUCKETS`` buckets yet. Its being off (``off``) is logged
        when it begins and when it ends."""
        b, d = at_ms // BUCKET_MS, at_ms - sent_ms
        seen = self._seen.setdefault(gateway, [])
        prev = self._last.get(gateway)
        self._last[gateway] = (at_ms, sent_ms)
        if prev is not None and sent_ms > prev[1] and at_ms - prev[0] >= LIVE * (sent_ms - prev[1]):
            if seen and b <= seen[-1][0]:  # (a replayed report may come after a newer one)
                seen[-1][1] = min(seen[-1][1], d)
            else:
                seen.append([b, d])
        while seen and seen[0][0] <= b - KEEP_BUCKETS:
            seen.pop(0)
        if not seen or b - seen[0][0] < SPAN_BUCKETS:
            return None
        offset = -min(x[1] for x in seen)
        new = gateway not in self._told
        self._told[gateway] = (b, offset)
        if new:
            self._first[gateway] = b
        if new or b != self._fleet_at:
            self._reckon_fleet(b)
        self._judge(gateway, offset, b)
        return offset

    def against(self, gateway: str) -> int | None:
        """``gateway``'s clock minus the reference (the worker's, or its gateways' median
        when the worker is off that), as last told; None when not told (lately)."""
        t = self._told.get(gateway)
        return None if t is None else t[1] - self.worker_off

    def _judge(self, gateway: str, offset: int, b: int) -> None:
        """Whether ``gateway``'s clock is off (against the worker's, or its peers'), logged
        when that begins and when it ends. Not before ``FLEET`` gateways are told, or a minute
        after it was (a fleet starting together is judged together: none is said to be off
        the worker's before its peers can say whether it is the worker that is off)."""
        if len(self._told) < FLEET and b < self._first[gateway] + 2:
            return
        rel = offset - self.worker_off
        against = "the worker's" if not self.worker_off else "its peers' (their median)"
        if abs(rel) >= CLOCK_OFF_MS:
            if gateway not in self.off:
                log.warning("gateway %s's clock is %s%s %s (by the time its health reports "
                            "take): what it stamps with its own time (readings without a time "
                            "of their own, its health) is misplaced by as much; its health is "
                            "filed at the worker's time. Check its time sync (NTP, UDP 123 "
                            "through the site's firewall)", gateway, told(rel),
                            " of" if rel > 0 else "", against)
            self.off[gateway] = rel
        elif self.off.pop(gateway, None) is not None:
            log.info("gateway %s's clock agrees with %s again (%s ms)", gateway, against, rel)

    def _reckon_fleet(self, b: int) -> None:
        """At each bucket's first report, and when a gateway is told the first time: the
        median clock of the gateways told in the last ``KEEP_BUCKETS`` (those gone quiet are
        forgotten, and not said to be off any more), and whether the worker is off it. When
        that changes, each gateway is judged again against it."""
        turn, self._fleet_at = b != self._fleet_at, b
        for gw in [gw for gw, (tb, _) in self._told.items() if tb <= b - KEEP_BUCKETS]:
            del self._told[gw], self._first[gw]
            self.off.pop(gw, None)
        offsets = sorted(o for _, o in self._told.values())
        was = self.worker_off
        median = offsets[len(offsets) // 2] if len(offsets) >= FLEET else 0
        self.worker_off = median if abs(median) >= CLOCK_OFF_MS else 0
        if self.worker_off and not was:
            log.warning("the gateways' clocks are %s the worker's (the median of %d): the "
                        "worker's own clock is off, or it stays that far behind what they "
                        "send; each gateway is judged against its peers until it is not. "
                        "Check this host's time sync (timedatectl) and the worker's lag",
                        told(median), len(offsets))
        elif was and not self.worker_off:
            log.info("the gateways' clocks agree with the worker's again (the median of %d: "
                     "%s ms)", len(offsets), median)
        if self.worker_off != was:  # those off only against the old reference are not said
            # one by one (the line above says why)
            for gw in [gw for gw in self.off
                       if abs(self._told[gw][1] - self.worker_off) < CLOCK_OFF_MS]:
                del self.off[gw]
        if turn or self.worker_off != was:
            for gw, (_, o) in self._told.items():
                self._judge(gw, o, b)
