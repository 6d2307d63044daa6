"""Reference data that changes: the device registry reloaded without a restart, joined as-of.

The worker watches the registry file (and reloads on SIGHUP). A reload that fails (a broken row,
an unknown kind) keeps the registry in force and says why, naming the file and row. What a
reload changes takes effect from that moment *in event time*: a window that started before it is
joined with the record that was in force then, so a device moved to another site keeps its old
site on its old windows (late data and revisions included), and its new site from then on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from devices.catalog import Catalog
from devices.errors import ConfigError
from devices.registry import Device, Registry

log = logging.getLogger("fieldline.cloud.refdata")

MAX_VERSIONS = 16  # earlier records kept per device


class ReferenceData:
    def __init__(self, registry: Registry, *, path: Path | None = None,
                 catalog: Catalog | None = None) -> None:
        self.current = registry
        self.path = path
        self.catalog = catalog
        # device -> [(until_ms, the record in force before until_ms)], oldest first
        self._history: dict[str, list[tuple[int, Device | None]]] = {}
        self._stamp = self._file_stamp()
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    # ---- lookups ------------------------------------------------------------------------

    def get(self, device_id: str) -> Device | None:
        """The record in force now."""
        return self.current.get(device_id)

    def changed(self, device_id: str) -> int | None:
        """The last moment the device's record changed (None: never since start)."""
        hist = self._history.get(device_id)
        return hist[-1][0] if hist else None

    def as_of(self, device_id: str, ts_ms: int) -> Device | None:
        """The record in force at event time ``ts_ms``."""
        for until, dev in self._history.get(device_id, ()):
            if ts_ms < until:
                return dev
        return self.current.get(device_id)

    # ---- changes ------------------------------------------------------------------------

    def maybe_reload(self, now_ms: int) -> bool:
        """Reload when the file changed since the last look; True if a new registry is in force."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        return self.reload(now_ms)

    def reload(self, now_ms: int) -> bool:
        if self.path is None:
            return False
        self._stamp = self._file_stamp()
        try:
            new = Registry.load(self.path)
            if self.catalog is not None:
                new.check_kinds(self.catalog, source=str(self.path))
        except (ConfigError, ValueError, OSError) as exc:
            self.reload_errors += 1
            self.last_error = str(exc)
            log.error("registry %s not reloaded, the one loaded before stays in force: %s",
                      self.path, exc)
            return False
        self.replace(new, now_ms)
        return True

    def replace(self, new: Registry, now_ms: int) -> int:
        """Put ``new`` in force from ``now_ms`` on; returns how many devices changed."""
        changed = 0
        ids = {d.device_id for d in self.current} | {d.device_id for d in new}
        for name in ids:
            old, rec = self.current.get(name), new.get(name)
            if old != rec:
                hist = self._history.setdefault(name, [])
                hist.append((now_ms, old))
                del hist[:-MAX_VERSIONS]
                changed += 1
        self.current = new
        self.reloads += 1
        log.info("registry reloaded from %s: %d device(s), %d changed", self.path, len(new),
                 changed)
        return changed
