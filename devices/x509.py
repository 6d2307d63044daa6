"""When the certificates in a PEM file stop being valid, read without a TLS library.

A gateway's MQTT links use certificates (its client certificate, the CA it trusts) that expire;
once one has, the link fails its handshake and the gateway goes silent. The agent reads their
``notAfter`` to warn beforehand (its health and ``fieldline edge status``). X.509 is DER: only the
few elements before the validity are walked (RFC 5280, 4.1), so no OpenSSL binding is loaded on
a gateway that runs without one (``edge.memory``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
SEQUENCE, INTEGER, UTC_TIME, GENERALIZED_TIME, VERSION = 0x30, 0x02, 0x17, 0x18, 0xA0
CERT_WARN_DAYS = 30  # a certificate expiring sooner is warned about (log, status, alert rule)
DAY_MS = 86_400_000


class CertificateError(ValueError):
    """Not a certificate this reader can make sense of."""


def _element(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of contents, end of contents) of the DER element at ``at``."""
    if at + 2 > len(der):
        raise CertificateError("truncated")
    tag, n = der[at], der[at + 1]
    at += 2
    if n & 0x80:
        k = n & 0x7F
        if not 0 < k <= 4 or at + k > len(der):
            raise CertificateError("bad length")
        n = int.from_bytes(der[at:at + k], "big")
        at += k
    if at + n > len(der):
        raise CertificateError("truncated")
    return tag, at, at + n


def _time_ms(tag: int, text: bytes) -> int:
    s = text.decode("ascii")
    if tag == UTC_TIME and len(s) == 13 and s.endswith("Z"):  # YYMMDDHHMMSSZ (RFC 5280)
        year = int(s[:2])
        s = f"{1900 + year if year >= 50 else 2000 + year}{s[2:]}"
    elif not (tag == GENERALIZED_TIME and len(s) == 15 and s.endswith("Z")):
        raise CertificateError(f"unreadable time {s!r}")
    when = datetime.strptime(s[:14], "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def not_after_ms(der: bytes) -> int:
    """The end of a DER certificate's validity, epoch ms."""
    tag, at, _ = _element(der, 0)  # Certificate
    if tag != SEQUENCE:
        raise CertificateError("not a certificate")
    tag, at, _ = _element(der, at)  # tbsCertificate
    if tag != SEQUENCE:
        raise CertificateError("not a certificate")
    tag, start, end = _element(der, at)
    if tag == VERSION:
        tag, start, end = _element(der, end)
    for want in (INTEGER, SEQUENCE, SEQUENCE):  # serial, signature algorithm, issuer
        if tag != want:
            raise CertificateError("not a certificate")
        tag, start, end = _element(der, end)
    if tag != SEQUENCE:  # validity
        raise CertificateError("no validity")
    tag, start, end = _element(der, start)  # notBefore
    tag, start, end = _element(der, end)  # notAfter
    return _time_ms(tag, der[start:end])


def earliest_expiry(path: Path) -> int:
    """The soonest ``notAfter`` of the certificates in a PEM file (a CA file may hold several),
    epoch ms. Raises OSError or CertificateError."""
    blocks = _PEM.findall(path.read_bytes())
    if not blocks:
        raise CertificateError(f"{path} holds no PEM certificate")
    try:
        return min(not_after_ms(base64.b64decode(b"".join(b.split()))) for b in blocks)
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise CertificateError(f"{path}: {exc}") from None


def expiry_or_warn(path: str, log: logging.Logger) -> int | None:
    """``earliest_expiry`` of a configured file, or None when it cannot be read (said in
    ``log``: the link that uses it fails anyway, with its own error)."""
    try:
        return earliest_expiry(Path(path))
    except (OSError, CertificateError) as exc:
        log.warning("cannot read when the certificates in %s expire (%s)", path, exc)
        return None


def link_certificate(url: str, files: tuple[str | None, ...],
                     log: logging.Logger) -> dict[str, Any] | None:
    """The soonest-expiring certificate of the files a TLS link to ``url`` loaded (its CA, its
    own), as a status file carries it (``what``, ``not_after``): None when none is readable."""
    named = [f for f in files if f]
    soonest = min((t for f in named if (t := expiry_or_warn(f, log)) is not None), default=None)
    if soonest is None:
        return None
    return {"what": f"of the link to {url} ({', '.join(named)})", "not_after": soonest}
