"""Keeping a long-running agent's resident memory close to what it actually holds.

glibc's malloc raises its mmap threshold every time a large block is freed (up to 32 MiB), so
after the agent's first few state reallocations every later numpy temporary of a micro-batch is
carved from the heap instead of being mapped and unmapped, and the heap keeps the high-water
mark of the busiest tick for good. Measured on a 10,000-device gateway (``make bench``, agent
RSS): 80.6 MiB with glibc's defaults, 72.5 MiB with the threshold pinned at 64 KiB, the heap
trimmed above 64 KiB and two malloc arenas (the agent's MQTT threads otherwise get one each).

``compact_malloc`` applies those three settings through ``mallopt``. It does nothing where
``mallopt`` does not exist (musl, macOS) and leaves alone any of them the environment already
sets (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_ARENA_MAX``).

``refuse_tls_libraries``: OpenSSL is 5.4 MiB of an agent's RSS (``ssl`` 1.9, and ``_hashlib``
3.5, which paho pulls in through ``hashlib`` and which initialises all of libcrypto), loaded by
paho and asyncio whether or not a connection uses TLS. An agent whose brokers are all plain
``mqtt://`` (a gateway's local broker, a cloud reached through a VPN or an SSH tunnel) refuses
those imports before anything asks for them: paho and asyncio run without ``ssl`` (both import
it in a ``try``; paho's socket loop still names two of its exceptions, which
``devices.mqtt.make_client`` gives it), ``hashlib`` falls back to CPython's own digests (the
agent's batch digest is BLAKE2, CPython's own anyway). With an ``mqtts://`` broker nothing
changes.

``defer_imports``: paho imports ``urllib.request`` (and with it ``http.client`` and the
``email`` package: 21 modules, 1.0 MiB of the agent's RSS) for one thing, reading proxy
settings from the environment, which it does only when PySocks is installed and a connection
is made. A deferred module is a stand-in that imports the real one at the first attribute
anybody reads, so the agent pays for it only if that path runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

SETTINGS = (
    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, 64 * 1024),
    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, 64 * 1024),
    ("MALLOC_ARENA_MAX", M_ARENA_MAX, 2),
)


def compact_malloc() -> list[str]:
    """Apply the settings above; returns the environment names of those applied."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no mallopt in this C library: allocator left as it is")
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = []
    for env, param, value in SETTINGS:
        if env in os.environ:
            continue
        if mallopt(param, value) == 1:
            applied.append(env)
        else:
            log.debug("mallopt(%d, %d) refused", param, value)
    return applied


TLS_MODULES = ("ssl", "_ssl", "_hashlib")


class _RefuseTLS(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in TLS_MODULES:
            raise ImportError(f"{fullname} is not loaded in this agent: none of its brokers uses "
                              "TLS (mqtts://)", name=fullname)
        return None


def refuse_tls_libraries() -> bool:
    """Make ``import ssl`` (and OpenSSL's ``_hashlib``) fail from now on in this process, until
    ``allow_tls_libraries``. Returns False, changing nothing, when one of them is already loaded."""
    if any(m in sys.modules for m in TLS_MODULES):
        return False
    if not any(isinstance(f, _RefuseTLS) for f in sys.meta_path):
        sys.meta_path.insert(0, _RefuseTLS())
    return True


def allow_tls_libraries() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RefuseTLS)]


DEFERRED = ("urllib.request",)


class _Deferred(ModuleType):
    """Stands in ``sys.modules`` for a module not imported yet; the first attribute read
    imports the real module (which takes the stand-in's place) and answers from it."""

    def __getattr__(self, attr: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)  # binds itself on its parent package
        return getattr(real, attr)


def defer_imports(names: Sequence[str] = DEFERRED) -> list[str]:
    """Put a stand-in for each of ``names`` not imported yet (see above); returns those
    deferred. ``import x.y`` of a deferred module then costs nothing until ``x.y.attr`` is
    read."""
    done = []
    for name in names:
        if name in sys.modules:
            continue
        parent, _, child = name.rpartition(".")
        stub = _Deferred(name)
        stub.__spec__ = None  # read by the import statement: must not load the real module
        sys.modules[name] = stub
        if parent:
            setattr(importlib.import_module(parent), child, stub)
        done.append(name)
    return done
