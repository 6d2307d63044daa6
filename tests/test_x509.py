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


def test_tls_files_that_cannot_work_fail_at_start_naming_their_key(tmp_path: Path) -> None:
    """A link's TLS files are checked when the process starts (`usable_tls`, called by `edge
    run`, `cloud run`, `cloud bridge`): a missing CA file crashed the agent with a traceback
    and kept a worker retrying for ever. Each cause names its key; good files pass."""
    from devices.errors import ConfigError
    from devices.mqtt import parse_broker_url, usable_tls
    from tests.pki import make_pki

    pki = make_pki(tmp_path / "pki", clients=("gw-1", "gw-2"))
    crt, key = pki.cert("gw-1")
    _, other_key = pki.cert("gw-2")
    garbage = tmp_path / "not-a-ca.crt"
    garbage.write_text("this is no certificate\n")
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-aes256", "-passout", "pass:x",
                    "-out", str(locked)], check=True, capture_output=True, timeout=60)

    def check(url: str, **files: Path) -> None:
        address = parse_broker_url(url, "uplink.broker",
                                   **{k: str(v) for k, v in files.items()})
        usable_tls(address, "uplink", "gateway.toml")

    check("mqtts://cloud:8883", ca_file=pki.ca, cert_file=crt, key_file=key)
    check("mqtts://cloud:8883")  # the system's CAs
    for url, files, key_named, words in [
            ("mqtts://cloud:8883", {"ca_file": tmp_path / "nope.crt"}, "ca_file",
             "No such file or directory"),
            ("mqtts://cloud:8883", {"ca_file": garbage}, "ca_file", "no CA certificate"),
            ("mqtts://cloud:8883", {"ca_file": pki.ca, "cert_file": crt, "key_file": other_key},
             "cert_file", "cannot be loaded"),
            ("mqtts://cloud:8883", {"ca_file": pki.ca, "cert_file": crt, "key_file": locked},
             "cert_file", "the key is encrypted"),
            ("mqtts://cloud:8883", {"key_file": key}, "key_file", "needs uplink.cert_file"),
            ("mqtt://cloud:1883", {"ca_file": pki.ca}, "ca_file", "does not use TLS")]:
        with pytest.raises(ConfigError) as err:
            check(url, **files)
        assert err.value.key == f"uplink.{key_named}", err.value
        assert words in str(err.value), err.value
        assert "gateway.toml" in str(err.value)
