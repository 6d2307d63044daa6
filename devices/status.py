"""What ``fieldline edge status`` and ``fieldline cloud status`` share.

A long-running fieldline process (the gateway's agent, a cloud worker) sends its health to
where it is least useful when something is wrong: over the uplink, into InfluxDB. So at every
health report it also replaces a status file in its state directory, and a command run beside
it reads that file, tells whether the process runs, and names what needs attention, with an
exit code monitoring can use (0 ok, 1 warning, 2 critical, 3 unknown: the Nagios convention).
The file is replaced whole and never fsynced: it says how old it is, and a reader that meets a
torn one says so.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from devices.x509 import CERT_WARN_DAYS, DAY_MS

VERSION = 1
OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
LEVELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
STALE_INTERVALS = 3  # reports missed before the process counts as not running
STALE_MIN_MS = 15_000
DISK_FULL_BYTES = 1 << 20  # less free under the state directory: full for the process


def write_status(path: Path, doc: Mapping[str, Any]) -> None:
    """Replace the status file at ``path`` whole (a reader sees the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps({"v": VERSION, **doc}))
    os.replace(tmp, path)


class StatusUnreadableError(Exception):
    """No status to judge (exit 3), with the reason."""


def read_status(path: Path, who: str) -> dict[str, Any]:
    """The status ``who`` ("the agent", "the worker") wrote at ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StatusUnreadableError(
            f"no {path}: {who} has not run with this state directory yet (or is a "
            "version that wrote none)") from None
    except PermissionError:
        raise StatusUnreadableError(f"{path}: permission denied ({who}'s state is "
                                    "readable by its user only: run as root)") from None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise StatusUnreadableError(f"{path} is unreadable (cut short: written as the machine "
                                    f"lost power?); {who} replaces it at its next "
                                    "report") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ts"), int):
        raise StatusUnreadableError(f"{path} is not a status {who} wrote")
    return doc


def pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def plural(n: int, one: str, many: str) -> str:
    return f"{n:,} {one if n == 1 else many}"


CLOCK_OFF_MS = 60_000  # a gateway's clock this far off the cloud worker's (or its peers') is off


def told(offset_ms: int) -> str:
    """``3.0 days behind``, ``2 min ahead``: how a clock stands to another."""
    return f"{duration(abs(offset_ms))} {'ahead' if offset_ms > 0 else 'behind'}"


def duration(ms: float) -> str:
    s = max(0.0, ms / 1000)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    m = s / 60
    if m < 120:
        return f"{m:.0f} min"
    h = m / 60
    return f"{h:.1f} h" if h < 48 else f"{h / 24:.1f} days"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def at(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@dataclass
class Verdict:
    code: int
    running: bool
    attention: list[tuple[int, str]] = field(default_factory=list)

    def add(self, level: int, text: str) -> None:
        self.attention.append((level, text))
        self.code = max(self.code, level)

    def sort(self) -> None:
        """Worst first (stable: in the order they were added within a level)."""
        self.attention.sort(key=lambda a: -a[0])


@dataclass(frozen=True)
class Disk:
    """The filesystem under the state directory, as the process's user sees it."""

    path: Path
    free: int
    total: int
    read_only: bool = False

    @classmethod
    def of(cls, path: Path) -> Disk | None:
        try:
            du = shutil.disk_usage(path)
        except OSError:
            return None
        return cls(path, du.free, du.total, read_only=takes_no_writes(path))

    @property
    def full(self) -> bool:
        return self.free < DISK_FULL_BYTES

    def as_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "free": self.free, "total": self.total,
                "read_only": self.read_only}


def takes_no_writes(path: Path) -> bool:
    """Whether the filesystem under ``path`` is read-only: mounted so, or remounted so by the
    kernel after errors (ext4's ``errors=remount-ro``, what a failing SD card meets), which
    ``statvfs`` does not always show: so an unnamed file is made there (``O_TMPFILE``: nothing
    is left behind). A user who may not write there learns nothing from it: not read-only."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
        fd = os.open(path, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    return False


def read_only_text(disk: Disk, who: str, loses: str) -> str:
    """What a read-only state directory means for ``who``, and what repairs it."""
    return (f"the filesystem under {disk.path} is read-only (the kernel remounts a disk "
            f"read-only after errors, a failing SD card for one): {who} {loses}. Stop it, "
            "check the filesystem (fsck) or replace the card, and start it again")


def running(doc: Mapping[str, Any], now_ms: int, alive: bool) -> bool:
    """Whether the process that wrote ``doc`` runs: its pid alive, reporting, not stopped."""
    age = now_ms - int(doc["ts"])
    stale_ms = max(STALE_MIN_MS, STALE_INTERVALS * int(doc.get("health_interval_ms", 5_000)))
    return doc.get("state") == "running" and alive and age <= stale_ms


def why_not_running(doc: Mapping[str, Any], now_ms: int, who: str, *, alive: bool,
                    disk: Disk | None) -> str:
    """Why ``who`` ("the agent", "the worker") does not run, as far as its status tells."""
    age = now_ms - int(doc["ts"])
    if doc.get("state") == "stopped":
        return f"{who} stopped at {at(int(doc['ts']))}"
    if not alive:
        return f"{who} (pid {doc.get('pid')}) is gone: killed or crashed"
    if disk is not None and disk.full:
        return f"{who} has written no status for {duration(age)}: its disk is full (or it hung)"
    if disk is not None and disk.read_only:
        return (f"{who} has written no status for {duration(age)}: its filesystem is "
                "read-only")
    return f"{who} has written no status for {duration(age)}: hung or stopped"


def judge_certificate(v: Verdict, cert: Mapping[str, Any] | None, now_ms: int) -> None:
    """The soonest-expiring TLS certificate a process's links use (``what``, ``not_after``)."""
    if not cert:
        return
    left = (int(cert["not_after"]) - now_ms) / DAY_MS
    if left < 0:
        v.add(CRITICAL, f"the TLS certificate {cert['what']} expired at "
                        f"{at(int(cert['not_after']))}: the link using it fails its "
                        "handshake until it is renewed")
    elif left < CERT_WARN_DAYS:
        v.add(WARNING, f"the TLS certificate {cert['what']} expires in {left:.0f} "
                       f"days ({at(int(cert['not_after']))}): renew it before, or the "
                       "link using it fails")


class Links:
    """Each link's state and since when it has been in it, as seen at each report."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[bool, int]] = {}

    def state(self, name: str, up: bool, now_ms: int) -> dict[str, Any]:
        was = self._seen.get(name)
        if was is None or was[0] != up:
            self._seen[name] = was = (up, now_ms)
        return {"connected": up, "since": was[1]}


def link_text(d: Mapping[str, Any], default_since: int) -> str:
    state = "connected" if d.get("connected") else "DOWN"
    return (f"{d.get('url')} {state} since {at(int(d.get('since', default_since)))}"
            + because(d))


def because(link: Mapping[str, Any]) -> str:
    """`` (why)`` a link that is down failed its last attempt, if it knows; else nothing."""
    return f" ({link['error']})" if not link.get("connected") and link.get("error") else ""
