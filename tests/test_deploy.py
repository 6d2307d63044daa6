"""The shipped Mosquitto configs as an operator installs them: dropped into the conf.d of
Debian's package (whose main config already sets persistence), read verbatim."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from bench.broker import Subscriber, gateway_broker, publishers

ROOT = Path(__file__).resolve().parent.parent
DROPINS = sorted((ROOT / "deploy" / "mosquitto").glob("*.conf"))


@pytest.mark.parametrize("conf", DROPINS, ids=lambda p: p.name)
def test_dropins_are_what_mosquitto_reads(conf: Path) -> None:
    """Mosquitto takes the rest of a line as the value (no end-of-line comments); Debian's
    main config sets persistence_location (a second one stops Mosquitto); and the store is
    saved by time, not after every message (autosave_on_changes with autosave_interval 1 saved
    the whole store per message: a gateway topped out near 150-2,000 messages/s)."""
    settings: dict[str, str] = {}
    for n, raw in enumerate(conf.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert "#" not in line, f"{conf.name}:{n}: a comment after a value is part of it"
        key, _, value = line.partition(" ")
        settings[key] = value
    assert "persistence_location" not in settings
    assert settings.get("autosave_on_changes", "false") == "false"
    assert int(settings.get("autosave_interval", "1800")) <= 5


@pytest.mark.integration
def test_gateway_dropin_runs_and_its_acl_binds_devices_to_their_topics(tmp_path: Path) -> None:
    broker = gateway_broker(tmp_path)
    try:
        sub = Subscriber(broker.port)
        got: list[str] = []
        lock = threading.Lock()

        def on_message(_c: object, _u: object, m: object) -> None:
            with lock:
                got.append(m.topic)  # type: ignore[attr-defined]

        sub.c.on_message = on_message
        sub.connect()
        d0 = publishers(broker.port)[0]  # user d0
        d0.publish_many([("devices/d0/readings", b"{}"), ("devices/d1/readings", b"{}")], 1)
        d0.flush(10)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert got == ["devices/d0/readings"]  # d0 may not speak for d1
        log = (broker.workdir / "mosquitto.log").read_text()
        assert not re.search(r"[Ee]rror", log), log
    finally:
        broker.stop()
