"""Reading TOML configuration so that every mistake names its key.

``Section`` wraps one table of a config file. Each accessor checks type and range and raises
``ConfigError`` with the dotted key; ``done()`` rejects keys nobody read, so a typo such as
``windw_size`` fails at start-up instead of being silently ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from devices.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# a health report at least this often: the shipped alert rules (cloud/panels.py) take a gateway
# or worker with none in 10 minutes for one that is down
MAX_HEALTH_INTERVAL_MS = 300_000
HEALTH_WHY = (" (the shipped alert rules take a gateway or worker with no health report in 10 "
              "minutes for one that is down)")
_MISSING: Any = object()


def parse_duration_ms(raw: object, key: str, source: str | None = None) -> int:
    """``"10s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or an integer number of milliseconds; ``"0"``
    is 0 (the only length without a unit that means one thing)."""
    if type(raw) is int:
        return raw
    if isinstance(raw, str):
        if raw.strip() == "0":
            return 0
        m = _DURATION.match(raw)
        if m:
            return round(float(m.group(1)) * _UNIT_MS[m.group(2)])
    raise ConfigError(key, f"not a duration: {raw!r} (use e.g. 500ms, 10s, 5m or an integer of ms)",
                      source=source)


def duration_label(ms: int) -> str:
    """The shortest whole-unit name of a duration: 60,000 -> "1m", 1,500 -> "1500ms"."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def window_label(text: str, key: str, source: str | None = None) -> str:
    """The label a window spec goes by in results and InfluxDB's ``window`` tag, from its
    config form or its label: "60s" and "tumbling:1m" are "1m", "hopping:1m/10s" is "1m/10s",
    "session:30s/10m" and "count:100" stay as they are."""
    kind, _, arg = text.partition(":")
    if not arg:
        kind, arg = ("hopping" if "/" in text else "tumbling"), text
    try:
        if kind == "tumbling":
            return duration_label(parse_duration_ms(arg, key, source))
        if kind == "hopping":
            size, step = arg.split("/")
            return (f"{duration_label(parse_duration_ms(size, key, source))}/"
                    f"{duration_label(parse_duration_ms(step, key, source))}")
        if kind == "session":
            gap, _, cap = arg.partition("/")
            return "session:" + duration_label(parse_duration_ms(gap, key, source)) + (
                "/" + duration_label(parse_duration_ms(cap, key, source)) if cap else "")
        if kind == "count" and arg.isdigit():
            return f"count:{int(arg)}"
    except (ConfigError, ValueError):
        pass
    raise ConfigError(key, f"not a window spec: {text!r} (e.g. \"10s\", \"hopping:1m/10s\", "
                      "\"session:30s\", \"count:100\")", source=source)


def time_aligned(label: str) -> bool:
    """Whether windows of this spec (a ``window_label``) start at the same times for every
    device: tumbling and hopping ("10s", "1m/10s"), not sessions or count windows."""
    return ":" not in label


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$")
_SIZE_UNIT = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2,
              "GiB": 1024**3}


def parse_size(raw: object, key: str, source: str | None = None) -> int:
    """``"256MiB"``, ``"1GB"``, ``"500KB"`` or an integer number of bytes."""
    if type(raw) is int and raw >= 0:
        return raw
    if isinstance(raw, str):
        m = _SIZE.match(raw)
        if m:
            return round(float(m.group(1)) * _SIZE_UNIT[m.group(2)])
    raise ConfigError(key, f"not a size: {raw!r} (use e.g. 500KB, 256MiB, 1GB or bytes)",
                      source=source)


def usable_dir(path: Path, key: str, source: str | None = None, *,
               lock: str | None = None, files: Iterable[str] = (),
               dirs: Iterable[str] = ()) -> None:
    """Create ``path`` if need be and check this process may write there, and read and write
    everything in it: a state directory that cannot be used fails at start naming its key,
    not at the first write (or with a traceback at the first read: files left by a run as
    another user, say ``sudo fieldline edge run`` before the service's). ``lock``: and take it
    for this process alone under that file name (``_lock_dir``). ``files``, ``dirs``: the
    names the process keeps there as files and as directories; one there of the other kind
    (a ``mkdir`` by hand, a restore from a backup gone wrong) fails at start too, not with a
    traceback at its first read or a save failing at every interval."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fieldline-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        whose = f" ({path} is {_owner(path)}; this process runs as {_me()})" if (
            exc.errno in (errno.EACCES, errno.EPERM) and path.exists()) else ""
        raise ConfigError(key, f"{path} cannot be used: {exc.strerror or exc}{whose}",
                          source=source) from None
    bad = _not_usable(path)
    if bad:
        me = _me()
        raise ConfigError(key, f"{path} holds {len(bad):,}{'+' if len(bad) >= 100 else ''} "
                          f"file(s) this process (user {me}) cannot read and write, e.g. "
                          f"{bad[0]} ({_owner(bad[0])}): left by a run as another user? "
                          f"`chown -R {me}: {path}`", source=source)
    for names, want_dir in ((files, False), (dirs, True)):
        for name in names:
            p = path / name
            if p.exists() and p.is_dir() != want_dir:
                raise ConfigError(key, f"{p} is {'not ' if want_dir else ''}a directory, where "
                                  f"fieldline keeps a {'directory' if want_dir else 'file'}: "
                                  f"move it away (`mv {p} {p}.aside`)", source=source)
    if lock is not None:
        _lock_dir(path, key, source, lock)


def _not_usable(path: Path, most: int = 100, scan: int = 100_000) -> list[Path]:
    """Up to ``most`` entries under ``path`` this process may not read and write (directories:
    and enter), of the first ``scan``. (As root, every one may.) The ``lost+found`` of a state
    directory that is a file system of its own (a partition or a disk for the outbox) is the
    file system's, not ours."""
    eff = os.access in os.supports_effective_ids
    bad: list[Path] = []
    seen = 0
    for top, dirs, files in os.walk(path):
        if top == str(path) and "lost+found" in dirs:
            dirs.remove("lost+found")
        for names, mode in ((dirs, os.R_OK | os.W_OK | os.X_OK), (files, os.R_OK | os.W_OK)):
            for name in names:
                p = Path(top, name)
                if not os.access(p, mode, effective_ids=eff) and not p.is_symlink():
                    bad.append(p)
                    if len(bad) >= most:
                        return bad
        seen += len(dirs) + len(files)
        if seen >= scan:
            break
    return bad


def _user(uid: int) -> str:
    """The user's name, or its number when it has none."""
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(uid).pw_name
    return str(uid)


def _me() -> str:
    return _user(os.geteuid())


def _owner(p: Path) -> str:
    """``owned by root, mode 0600``."""
    try:
        st = p.stat()
    except OSError as exc:
        return exc.strerror or str(exc)
    return f"owned by {_user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


log = logging.getLogger("fieldline.settings")

_HELD: dict[Path, IO[str]] = {}  # directory locks this process holds, for its whole life


def _lock_dir(path: Path, key: str, source: str | None, name: str) -> None:
    """Take ``path`` for this process alone, until it exits: a second agent (or worker) on the
    same state directory (say, one started by hand beside the systemd service) fails at start
    naming the key and the process that holds it, instead of both writing the same outbox,
    sequence file and checkpoints. The lock is the kernel's (``flock``): it goes with the
    process, however it ends, so a crash leaves nothing to clean up. The file holds the pid of
    its holder, for the message. Where the filesystem has no locks, a warning and no lock."""
    lock = (path / name).resolve()
    if lock in _HELD:
        return
    try:
        fh = lock.open("a+")
    except OSError as exc:
        raise ConfigError(key, f"{path} cannot be used: {exc.strerror or exc}",
                          source=source) from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        who = f"process {holder}" if holder.isdigit() else "another process"
        raise ConfigError(key, f"{path} is in use by {who}, another fieldline run on the same "
                          "state directory: two would overwrite each other's state. Stop that "
                          f"one (a systemd service?) or give this one a {key} of its own",
                          source=source) from None
    except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        log.warning("%s could not be locked (%s): make sure no other fieldline process uses it",
                    path, exc.strerror or exc)
        fh.close()
        return
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD[lock] = fh


def load_toml(path: str | Path) -> Section:
    p = Path(path)
    if not p.is_file():
        raise ConfigError("config", f"file not found: {p}")
    try:
        with p.open("rb") as fh:
            return Section(tomllib.load(fh), "", str(p))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"invalid TOML: {exc}", source=str(p)) from None


class Section:
    """One table of a configuration, read with checks."""

    def __init__(self, data: Mapping[str, Any], path: str = "", source: str | None = None) -> None:
        self._data = dict(data)
        self._path = path
        self.source = source
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def keys(self) -> list[str]:
        return list(self._data)

    def has(self, name: str) -> bool:
        return name in self._data

    def _get(self, name: str, default: Any) -> Any:
        self._read.add(name)
        if name in self._data:
            return self._data[name]
        if default is _MISSING:
            raise ConfigError(self.key(name), "is required", source=self.source)
        return default

    def _fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.key(name), problem, source=self.source)

    def text(self, name: str, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if v is not None and not isinstance(v, str):
            raise self._fail(name, f"must be a string, got {v!r}")
        return v

    def integer(self, name: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        v = self._get(name, default)
        if v is None:
            return v
        if type(v) is not int:
            raise self._fail(name, f"must be an integer, got {v!r}")
        if minimum is not None and v < minimum:
            raise self._fail(name, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise self._fail(name, f"must be <= {maximum}, got {v}")
        return v

    def number(self, name: str, default: Any = _MISSING, *, minimum: float | None = None,
              maximum: float | None = None) -> Any:
        v = self._get(name, default)
        if v is None:
            return v
        if type(v) not in (int, float):
            raise self._fail(name, f"must be a number, got {v!r}")
        v = float(v)
        if minimum is not None and v < minimum:
            raise self._fail(name, f"must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise self._fail(name, f"must be <= {maximum}, got {v}")
        return v

    def flag(self, name: str, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if not isinstance(v, bool):
            raise self._fail(name, f"must be true or false, got {v!r}")
        return v

    def duration_ms(self, name: str, default: Any = _MISSING, *, minimum: int = 0,
                    maximum: int | None = None, why: str = "") -> Any:
        v = self._get(name, default)
        if v is None:
            return v
        ms = parse_duration_ms(v, self.key(name), self.source)
        if ms < minimum:
            raise self._fail(name, f"must be at least {minimum} ms, got {ms} ms")
        if maximum is not None and ms > maximum:
            raise self._fail(name, f"must be at most {maximum} ms{why}, got {ms} ms")
        return ms

    def size(self, name: str, default: Any = _MISSING, *, minimum: int = 0) -> Any:
        v = self._get(name, default)
        n = parse_size(v, self.key(name), self.source)
        if n < minimum:
            raise self._fail(name, f"must be at least {minimum} bytes")
        return n

    def choice(self, name: str, choices: tuple[str, ...], default: Any = _MISSING) -> Any:
        v = self.text(name, default)
        if v not in choices:
            raise self._fail(name, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def str_list(self, name: str, default: Any = _MISSING) -> Any:
        v = self._get(name, default)
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise self._fail(name, f"must be a list of strings, got {v!r}")
        return list(v)

    def section(self, name: str, *, required: bool = False) -> Section:
        v = self._get(name, _MISSING if required else {})
        if not isinstance(v, Mapping):
            raise self._fail(name, "must be a table")
        return Section(v, self.key(name), self.source)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        return self._get(name, default)

    def done(self) -> None:
        """Fail on any key that no accessor asked for (a typo, or an option that does not exist)."""
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key (typo?)", source=self.source)
