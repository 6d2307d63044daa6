"""When certificates expire, read as the agent reads them (no TLS library), against openssl."""

from __future__ import annotations

import base64
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from devices.x509 import CertificateError, earliest_expiry, not_after_ms


def make_cert(d: Path, name: str, days: int, key: str = "rsa:2048") -> Path:
    args = ["-newkey", key] if key.startswith("rsa") else [
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "req", "-x509", *args, "-nodes", "-keyout", str(d / f"{name}.key"),
                    "-out", str(d / f"{name}.crt"), "-subj", f"/CN={name}", "-days", str(days)],
                   check=True, capture_output=True, timeout=60)
    return d / f"{name}.crt"


def openssl_not_after_ms(path: Path) -> int:
    out = subprocess.run(["openssl", "x509", "-in", str(path), "-noout", "-enddate"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    when = datetime.strptime(out.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z")
    return int(when.replace(tzinfo=UTC).timestamp() * 1000)


def test_expiry_is_what_openssl_says_for_both_time_forms_and_the_soonest_of_a_bundle(
        tmp_path: Path) -> None:
    soon = make_cert(tmp_path, "soon", 10)  # UTCTime (before 2050)
    late = make_cert(tmp_path, "late", 40_000, key="ec")  # GeneralizedTime (2050 and after)
    for path in (soon, late):
        assert earliest_expiry(path) == openssl_not_after_ms(path)
    assert datetime.fromtimestamp(earliest_expiry(late) / 1000, UTC).year > 2100
    bundle = tmp_path / "ca-bundle.crt"
    bundle.write_bytes(late.read_bytes() + b"\n" + soon.read_bytes())
    assert earliest_expiry(bundle) == openssl_not_after_ms(soon)


def test_what_is_no_certificate_is_said_to_be_none(tmp_path: Path) -> None:
    key = tmp_path / "k.pem"
    make_cert(tmp_path, "k", 1)
    (tmp_path / "k.key").rename(key)
    with pytest.raises(CertificateError, match="holds no PEM certificate"):
        earliest_expiry(key)
    der = base64.b64decode(b"".join(make_cert(tmp_path, "c", 1).read_bytes().split(b"\n")[1:-2]))
    for cut in (1, 10, 40, 120):
        with pytest.raises(CertificateError):
            not_after_ms(der[:cut])
    with pytest.raises(CertificateError):
        not_after_ms(b"\x02\x01\x00")  # an integer, not a certificate
    with pytest.raises(FileNotFoundError):
        earliest_expiry(tmp_path / "missing.crt")


def test_a_certificate_renewed_on_disk_counts_once_the_agent_restarts(tmp_path: Path) -> None:
    """The links load their certificates when the agent starts: a file renewed while it runs
    changes nothing until a restart. So the agent keeps reporting the expiry of what it loaded
    (10 days left), says the file was replaced and that a restart uses it; the restarted agent
    reports the renewed one."""
    from devices.mqtt import BrokerAddress
    from edge.agent import EdgeAgent
    from tests.test_agent import config

    certs = tmp_path / "certs"
    certs.mkdir()
    crt = make_cert(certs, "gw", 10)
    tls = BrokerAddress(host="127.0.0.1", port=1, tls=True, ca_file=str(crt), cert_file=str(crt),
                        key_file=str(certs / "gw.key"))
    cfg = config(tmp_path / "state", uplink_broker=tls)
    agent = EdgeAgent(cfg)
    agent._check_certificates()
    assert 9.9 < agent.stats()["cert_days_left"] <= 10
    make_cert(certs, "gw", 400)  # renewed in place, key and certificate
    agent._next_cert_check = 0
    agent._check_certificates()
    assert 9.9 < agent.stats()["cert_days_left"] <= 10  # still what the links use
    assert agent._cert_expiry is not None
    assert "replaced on disk: restart the agent" in agent._cert_expiry[1]
    agent.outbox.close()
    restarted = EdgeAgent(cfg)
    restarted._check_certificates()
    assert 399 < restarted.stats()["cert_days_left"] <= 400
    restarted.outbox.close()
