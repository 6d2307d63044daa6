"""Fixtures that start real services: Mosquitto and InfluxDB 1.x on free loopback ports."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cloud.sinks.influx_v1 import InfluxV1Client
from fieldline.services import InfluxDB, Mosquitto, ServiceError, find_binary

if TYPE_CHECKING:
    from tests.rig import Rig


def _have(name: str) -> bool:
    try:
        find_binary(name)
    except ServiceError:
        return False
    return True


HAVE_MOSQUITTO = _have("mosquitto")
HAVE_INFLUXD = _have("influxd")


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start as many brokers as a test needs; all are stopped at the end."""
    if not HAVE_MOSQUITTO:
        pytest.fail("mosquitto is not installed (make setup installs it)")
    started: list[Mosquitto] = []

    def start(**kwargs: object) -> Mosquitto:
        b = Mosquitto(tmp_path / f"mosquitto-{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(b)
        return b.start()

    yield start
    for b in started:
        b.stop()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    """One InfluxDB 1.x server per test session; tests use their own databases."""
    if not HAVE_INFLUXD:
        pytest.fail("influxd is not installed (make setup installs it)")
    server = InfluxDB(tmp_path_factory.mktemp("influxdb")).start()
    yield server
    server.stop()


@pytest.fixture
def influx_db(influxdb: InfluxDB) -> Iterator[InfluxV1Client]:
    """A fresh, empty database on the session's InfluxDB."""
    name = "t_" + uuid.uuid4().hex[:12]
    client = InfluxV1Client(influxdb.url, name)
    client.create_database()
    yield client
    client.query(f'DROP DATABASE "{name}"', database="")
    client.close()


@pytest.fixture
def rig(tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        influx_db: InfluxV1Client) -> Iterator[Rig]:
    """The whole deployment on loopback of the fault tests (``tests/rig.py``), stopped after."""
    from tests.rig import Rig

    r = Rig(tmp_path, mosquitto_factory, influx_db)
    yield r
    r.stop()
