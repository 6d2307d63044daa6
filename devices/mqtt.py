"""The one seam to MQTT brokers shared by every process: broker URLs and paho client setup.

``mqtt://[user:pass@]host[:port]`` or ``mqtts://…`` (TLS, optional CA and client certificate).
Clients speak MQTT 5 so PUBACK reason codes (not authorised, no subscribers, quota exceeded) are
visible instead of hidden behind a normal-looking MQTT 3.1.1 PUBACK.

Reading a broker URL does not import paho, and ``ssl`` is imported only for a TLS broker, so
that the edge agent can decide from its configuration whether it loads OpenSSL at all
(``edge.memory.refuse_tls_libraries``).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from devices.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from paho.mqtt.properties import Properties

# MQTT 5 reason codes that mean "your PUBLISH did not get through" (RELIABILITY.md).
NO_MATCHING_SUBSCRIBERS = 0x10


class LinkErrors:
    """Why a link's connections fail: the first failure of each outage logged (a broker's
    name that does not resolve, a refused port, a TLS certificate not trusted...), the latest
    kept for the process's status until the link is up again.

    paho's own reconnect loop (``loop_start``) swallows the error of a failed attempt; it
    calls ``on_connect_fail`` inside its ``except OSError`` block, where the exception is still
    at hand: :meth:`on_connect_fail` is that callback."""

    def __init__(self, what: str, url: str, log: logging.Logger) -> None:
        self.what, self.url, self._log = what, url, log
        self.last: str | None = None
        self.failures = 0  # since the link was last up

    def failed(self, error: str, *, logged: bool = False) -> None:
        """A failed attempt; ``logged``: the caller said so already."""
        self.failures += 1
        self.last = error
        if self.failures == 1 and not logged:
            self._log.warning("%s cannot reach %s: %s (retrying)", self.what, self.url, error)

    def up(self) -> None:
        self.failures, self.last = 0, None

    def on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        exc = sys.exc_info()[1]
        self.failed(describe(exc) if exc is not None else "connection failed")


def describe(exc: BaseException) -> str:
    """An exception as an operator reads it: its text, or its kind when it has none."""
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, kw_only=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str, key: str = "broker", *, ca_file: str | None = None,
                     cert_file: str | None = None, key_file: str | None = None) -> BrokerAddress:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"bad broker URL {url!r}: {exc}") from None
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ConfigError(key, f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise ConfigError(key, f"broker URL has no host: {url!r}")
    if port == 0:
        raise ConfigError(key, f"bad broker URL {url!r}: port 0")
    tls = parts.scheme in ("mqtts", "ssl")
    return BrokerAddress(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )


def tls_context(address: BrokerAddress) -> Any:
    """The ``ssl.SSLContext`` of a TLS broker link: its CA file (else the system's CAs), and
    its own certificate and key if it has one."""
    return ssl_context(address.ca_file, address.cert_file, address.key_file)


def ssl_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> Any:
    """An ``ssl.SSLContext`` trusting ``ca_file`` (else the system's CAs), presenting
    ``cert_file`` with ``key_file`` (or the key in it) when given."""
    import ssl

    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    return ctx


def _no_passphrase() -> bytes:
    # OpenSSL's own prompt would wait on a terminal a service does not have
    raise ValueError("the key is encrypted: give a key file without a passphrase")


def usable_tls(address: BrokerAddress, section: str, source: str | None = None) -> None:
    """A broker link's TLS files checked at start (:func:`usable_tls_files`); files given to a
    link without TLS are a misconfiguration too. Without this, a missing CA file crashed the
    agent with a traceback and kept a worker retrying for ever."""
    files = {"ca_file": address.ca_file, "cert_file": address.cert_file,
             "key_file": address.key_file}
    given = [k for k, v in files.items() if v]
    if not address.tls:
        if given:
            raise ConfigError(f"{section}.{given[0]}", f"is set, but {section}.broker "
                              f"({address.url}) does not use TLS: mqtts://", source=source)
        return
    usable_tls_files(section, source, address.ca_file, address.cert_file, address.key_file)


def usable_tls_files(section: str, source: str | None, ca_file: str | None,
                     cert_file: str | None, key_file: str | None) -> None:
    """TLS files checked at start, each error naming its key (``section.ca_file``,
    ``.cert_file``, ``.key_file``): one that cannot be read, a CA file that is not PEM, a key
    that does not belong to its certificate or is encrypted."""
    files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    if key_file and not cert_file:
        raise ConfigError(f"{section}.key_file", f"needs {section}.cert_file (the certificate "
                          "it is the key of)", source=source)
    for key, path in files.items():
        if not path:
            continue
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(f"{section}.{key}", f"cannot read {path}: {exc.strerror or exc}",
                              source=source) from None
    import ssl

    try:
        ssl.create_default_context(cafile=ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{section}.ca_file", f"{ca_file} holds no CA certificate OpenSSL "
                          f"can read (PEM): {describe(exc)}", source=source) from None
    try:
        ssl_context(ca_file, cert_file, key_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{section}.cert_file", f"{cert_file} with "
                          f"{key_file or 'the key in it'} cannot be loaded (a certificate and "
                          f"its own unencrypted key, PEM): {describe(exc)}",
                          source=source) from None


class _SSLWantReadError(OSError):
    """Stands for ``ssl.SSLWantReadError`` where ``ssl`` is not loaded: nothing raises it."""


class _SSLWantWriteError(OSError):
    """Stands for ``ssl.SSLWantWriteError`` where ``ssl`` is not loaded: nothing raises it."""


def _without_ssl(module: ModuleType) -> None:
    """paho imports ``ssl`` in a ``try`` (``ssl = None`` without it), yet its socket loop names
    ``ssl.SSLWantReadError`` and ``ssl.SSLWantWriteError`` in the ``except`` clauses of every
    ``recv`` and ``send``, evaluated whenever those raise (an empty non-blocking socket does):
    an ``AttributeError`` on ``None`` that kills its network thread. Those two names are all of
    ``ssl`` a plain TCP connection reaches (the rest is ``tls_set`` and the TLS handshake), so
    the agent that runs without OpenSSL (``edge.memory.refuse_tls_libraries``) gives paho
    exactly those two, as exceptions nothing raises."""
    module.ssl = SimpleNamespace(  # type: ignore[attr-defined]
        SSLWantReadError=_SSLWantReadError, SSLWantWriteError=_SSLWantWriteError)


def make_client(address: BrokerAddress, client_id: str, *, session_expiry_s: int = 0,
                manual_ack: bool = False) -> tuple[mqtt.Client, Properties | None]:
    """A paho MQTT 5 client (not yet connected) and the CONNECT properties to pass to connect().

    ``manual_ack``: received QoS 1 messages are acknowledged only by ``client.ack``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    if getattr(mqtt, "ssl", None) is None:
        _without_ssl(mqtt)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set_context(tls_context(address))
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    props: Properties | None = None
    if session_expiry_s > 0:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = session_expiry_s
    return client, props
