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


WITHOUT_TLS = """
import json, sys, threading, time
from edge.memory import refuse_tls_libraries
assert refuse_tls_libraries()
from devices.mqtt import BrokerAddress, make_client
address = BrokerAddress(host="127.0.0.1", port=int(sys.argv[1]))
n = 3000
got, acked, done = set(), set(), threading.Event()
sub, props = make_client(address, "probe-sub")
sub.on_message = lambda _c, _u, m: (got.add(m.payload), len(got) == n and done.set())
sub.on_connect = lambda c, *_: c.subscribe("probe/#", qos=1)
sub.connect(address.host, address.port, properties=props)
sub.loop_start()
pub, props = make_client(address, "probe-pub")
pub.on_publish = lambda _c, _u, mid, *_: acked.add(mid)
pub.connect(address.host, address.port, properties=props)
pub.loop_start()
time.sleep(0.5)
for i in range(n):  # a burst of QoS 1: both network threads read and write until EAGAIN
    pub.publish("probe/x", str(i).encode(), qos=1)
done.wait(60)
deadline = time.monotonic() + 10
while len(acked) < n and time.monotonic() < deadline:
    time.sleep(0.05)
names = [t.name for t in threading.enumerate()]
maps = open("/proc/self/maps").read()
print(json.dumps({"got": len(got), "acked": len(acked), "ssl": "ssl" in sys.modules,
                  "openssl": "libssl" in maps or "libcrypto" in maps,
                  "threads": sum("paho" in t for t in names)}))
pub.loop_stop(); sub.loop_stop()
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")
def test_mqtt_without_openssl_carries_a_qos1_burst(mosquitto: object) -> None:
    """An agent with no TLS broker refuses ``ssl`` (edge.memory.refuse_tls_libraries); paho then
    runs with ``ssl = None`` and names ``ssl.SSLWantReadError`` whenever a non-blocking read
    finds nothing, which devices.mqtt answers. A burst both ways through a real Mosquitto, in a
    child process: everything delivered and acknowledged, no OpenSSL mapped."""
    out = subprocess.run([sys.executable, "-c", WITHOUT_TLS, str(mosquitto.port)],  # type: ignore[attr-defined]
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert "AttributeError" not in out.stderr, out.stderr[-3000:]
    assert got == {"got": 3000, "acked": 3000, "ssl": False, "openssl": False, "threads": 2}


DEFERRED = """
import json, sys, urllib
from edge.memory import defer_imports
assert defer_imports() == ["urllib.request"]
assert defer_imports() == []  # idempotent
import paho.mqtt.client  # imports urllib.request: the stand-in is enough
loaded_at_import = "http.client" in sys.modules
import urllib.request
proxies = urllib.request.getproxies()  # the first real use loads it
print(json.dumps({"at_import": loaded_at_import, "proxies": proxies,
                  "real": "http.client" in sys.modules,
                  "bound": type(sys.modules["urllib.request"]).__name__,
                  "same": urllib.request is sys.modules["urllib.request"]}))
"""


def test_a_deferred_module_loads_at_its_first_use_and_not_before() -> None:
    """paho's ``import urllib.request`` costs nothing until paho reads a proxy setting; that
    read gets the real module (http.client and all) as if nothing had been deferred."""
    env = {**os.environ, "mqtt_proxy": "socks://10.0.0.1:1080"}
    out = subprocess.run([sys.executable, "-c", DEFERRED], env=env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["at_import"] is False
    assert got["proxies"].get("mqtt") == "socks://10.0.0.1:1080"
    assert got["real"] is True
    assert got["bound"] == "module"
    assert got["same"] is True
