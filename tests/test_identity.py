"""Identities survive the trip to InfluxDB: a device id the codec accepts comes back from the
real server unchanged, so two devices never merge into one series (issue 12, item 9)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cloud.sinks.influx_v1 import InfluxV1Client
from cloud.sinks.lineproto import line
from devices.codecs import PayloadDecoder
from devices.readings import Interner

pytestmark = pytest.mark.integration

T = 1_767_225_600_000
ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",))


def accepted(device: str) -> bool:
    dec = PayloadDecoder(Interner(), Interner())
    payload = orjson.dumps({"device": device, "metric": "temperature", "ts": T, "value": 1.0})
    cols, _bad, _ = dec.decode([("devices/x/readings", payload, T)])
    return len(cols) == 1


def test_an_id_ending_in_a_backslash_is_not_the_id_without_it() -> None:
    assert not (accepted("lp\\") and accepted("lp"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(ALPHABET, min_size=1, max_size=12), min_size=1, max_size=8,
                unique=True))
@example(["lp\\", "lp", "a\\b", "a,b", "a=b", 'a"b', "tab\t", "é", "x\x00y", "a\rb", "'q'"])
def test_accepted_device_ids_round_trip_through_influxdb(influx_db: InfluxV1Client,
                                                         ids: list[str]) -> None:
    ok = [d for d in ids if accepted(d)]
    if not ok:
        return
    influx_db.request("POST", "/query", {"q": 'DROP SERIES FROM "rt"', "db": influx_db.database})
    body = "\n".join(x for i, d in enumerate(ok)
                     if (x := line("rt", {"device": d}, {"v": i}, T)) is not None)
    status, text = influx_db.request("POST", "/write", {"db": influx_db.database,
                                                       "precision": "ms"}, body.encode())
    assert status == 204, text
    doc = influx_db.query('SELECT "v" FROM "rt" GROUP BY "device"')
    assert isinstance(doc, dict)
    back = {int(s["values"][0][1]): s["tags"]["device"]
            for s in doc["results"][0].get("series", [])}
    assert back == dict(enumerate(ok))
