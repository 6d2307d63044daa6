"""A cloud broker whose message size limit is below a result batch: the agent names the size
and the limit (issue 15), instead of reconnecting every second or two with a bare "Protocol
error". Real Mosquitto, both of its settings: ``message_size_limit`` (not announced; breaking it
closes with Protocol error) and ``max_packet_size`` (announced in CONNACK; Packet too large)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.common import wait_until
from devices.clock import SystemClock
from edge.uplink import MqttUplink
from fieldline.services import Mosquitto

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(("setting", "announced"), [("message_size_limit", False),
                                                    ("max_packet_size", True)])
def test_a_batch_above_the_brokers_limit_is_named_with_its_size(
        tmp_path: Path, mosquitto_factory: Callable[..., Mosquitto],
        caplog: pytest.LogCaptureFixture, setting: str, announced: bool) -> None:
    broker = mosquitto_factory(extra_conf=f"{setting} 2000\n")
    up = MqttUplink(broker.address, "gw-1", clock=SystemClock(), client_id="gw-1-up",
                    state_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="fieldline"):
        up.start()
        try:
            wait_until(up.connected.is_set, 10, "the uplink to connect")
            assert (up.max_packet == 2000) is announced
            up.publish_results(b"r" * 1500)  # fits: acknowledged
            wait_until(lambda: up.puback_ok + up.no_subscribers == 1, 10,
                       "the small batch's PUBACK")
            up.publish_results(b"R" * 5000)
            wait_until(lambda: up.size_disconnects >= 1, 15, "the broker to close the connection")
        finally:
            up.stop()
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "5,0" in text, text  # the batch's size, in bytes
    assert "message_size_limit or max_packet_size" in text
    assert "max_results_per_batch" in text
    if announced:
        assert up.oversize >= 1
        assert "maximum packet size (2,000 bytes)" in text
