"""Runs a fieldline command whose wall clock is shifted by the offset (ms) in the file named by
``FIELDLINE_TEST_WALLCLOCK``, re-read every 50 ms: a gateway clock that a test can set to 1970
and step forward and back. A fake, because the machine's real clock cannot be stepped here (it
is everyone's clock: the brokers', InfluxDB's, the test's); the monotonic clock is left alone,
as network time leaves it alone.

    python -m tests.wallclock edge run --config gateway.toml
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from devices import clock

_FILE = Path(os.environ["FIELDLINE_TEST_WALLCLOCK"])
_state = {"offset": 0, "next": 0}


def _now_ms(self: clock.SystemClock) -> int:
    t = time.monotonic_ns()
    if t >= _state["next"]:
        _state["next"] = t + 50_000_000
        with contextlib.suppress(OSError, ValueError):  # being rewritten: keep the last one
            _state["offset"] = int(_FILE.read_text().strip() or 0)
    return time.time_ns() // 1_000_000 + _state["offset"]


clock.SystemClock.now_ms = _now_ms  # type: ignore[method-assign]

if __name__ == "__main__":
    from fieldline.cli import main

    sys.exit(main())
