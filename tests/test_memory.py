"""edge.memory: the allocator settings take effect, and the environment keeps precedence.

Run in child processes: mallopt changes the process it runs in for good."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json, sys
from edge.memory import compact_malloc
applied = compact_malloc() if sys.argv[1] == "on" else []
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def rss_kb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4

def touched(size):
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    return p

# a big block freed: glibc's dynamic threshold rises to its size ...
libc.free(touched(4 << 20))
before = rss_kb()
# ... so a busy tick's 500 KiB temporaries come from the heap, and one survivor at its top
# keeps all of them resident after they are freed
blocks = [touched(500 * 1024) for _ in range(20)]
for p in blocks[:-1]:
    libc.free(p)
print(json.dumps({"applied": applied, "kept_kb": rss_kb() - before}))
"""


def probe(env: dict[str, str], mode: str = "on") -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_compact_malloc_pins_the_thresholds_and_leaves_environment_settings_alone() -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    got = probe(clean)
    assert got["applied"] == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                              "MALLOC_ARENA_MAX"]
    default = probe(clean, "off")
    assert int(default["kept_kb"]) > 8_000  # type: ignore[call-overload]  # 19 freed blocks
    assert int(got["kept_kb"]) < 2_000  # type: ignore[call-overload]  # only the survivor
    got = probe({**clean, "MALLOC_ARENA_MAX": "4"})
    assert got["applied"] == ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
