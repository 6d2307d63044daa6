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
spread over at least 2 minutes of the worker's time. (A worker that stays over a minute
behind everything its gateways send, at their pace, takes their clocks for behind too: its
"End-to-end lag high" rule fires then.)
"""

from __future__ import annotations

import logging

from devices.status import duration

log = logging.getLogger("fieldline.cloud")

CLOCK_OFF_MS = 60_000  # a gateway's clock this far from the worker's is off
BUCKET_MS = 30_000  # the least delay is kept per this much of the worker's time ...
SPAN_BUCKETS = 4  # ... judged on reports spread over at least this many (2 minutes)
KEEP_BUCKETS = 5  # ... of the last this many (a clock set right is seen so 2.5 minutes on)
LIVE = 0.8  # a report counts when the worker's time since the previous one is this share of
# the gateway's, or more (a backlog drained faster than it was sent does not)


def told(offset_ms: int) -> str:
    """``3.0 days behind``, ``2 min ahead``: how a gateway's clock stands to the worker's."""
    return f"{duration(abs(offset_ms))} {'ahead' if offset_ms > 0 else 'behind'}"


class GatewayClocks:
    """Each gateway's clock minus the worker's, from its health reports."""

    def __init__(self) -> None:
        # gateway -> [[bucket of the worker's time, least (at - sent) in it]], oldest first
        self._seen: dict[str, list[list[int]]] = {}
        self.off: dict[str, int] = {}  # the gateways whose clock is off now: by how much
        self._last: dict[str, tuple[int, int]] = {}  # gateway -> (at, sent) of its last report

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
        if abs(offset) >= CLOCK_OFF_MS:
            if gateway not in self.off:
                log.warning("gateway %s's clock is %s%s the worker's (by the time its health "
                            "reports take): what it stamps with its own time (readings without "
                            "a time of their own, its health) is misplaced by as much; its "
                            "health is filed at the worker's time. Check its time sync (NTP, "
                            "UDP 123 through the site's firewall)", gateway, told(offset),
                            " of" if offset > 0 else "")
            self.off[gateway] = offset
        elif self.off.pop(gateway, None) is not None:
            log.info("gateway %s's clock agrees with the worker's again (%s ms)", gateway,
                     offset)
        return offset
