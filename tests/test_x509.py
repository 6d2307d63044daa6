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
