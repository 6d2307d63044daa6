"""Uplink: ship result batches from the outbox to the cloud broker, MQTT 5, QoS 1.

The chain of custody on this side:

* every batch is in the fsynced outbox (``edge.outbox``) before it is published;
* it is published with QoS 1 on a persistent session (session expiry), and PUBACK reason codes are
  checked: a broker that refuses (not authorised, quota) or has nobody subscribed is counted;
* it leaves the outbox only when the cloud worker's **application-level ack** arrives on
  ``fieldline/v1/<gw>/ack``, sent after InfluxDB confirmed the write. A batch not acknowledged
  within ``ack_timeout`` is published again (the cloud drops the duplicate and acknowledges it);
* at most ``max_inflight`` batches are unacknowledged on the wire at once, oldest first, so a
  replay after an outage is ordered and paced by the cloud's acknowledgements.

Batch sequence numbers are reserved on disk a block at a time (fsynced), so a restarted agent
never reuses one. A retained status message (online/offline, outbox depth and age, watermark) is
refreshed with every health report; the broker publishes the Last Will (offline) when the agent
vanishes. Reconnects back off exponentially with jitter.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from devices.clock import Clock
from devices.contract import (
    Ack,
    ack_topic,
    decode_ack,
    health_topic,
    late_topic,
    results_topic,
    status_topic,
)
from devices.errors import ContractError
from devices.mqtt import NO_MATCHING_SUBSCRIBERS, BrokerAddress, LinkErrors, make_client
from devices.status import CLOCK_OFF_MS, told
from devices.x509 import not_after_ms

log = logging.getLogger("fieldline.edge.uplink")

SEQ_BLOCK = 1024
SEQ_FILE, READS_FILE = "uplink.seq", "uplink.reads"  # in the gateway's state directory


PROTOCOL_ERROR = 0x82  # MQTT 5 reason codes a broker closes with
PACKET_TOO_LARGE = 0x95
RENEW_EVERY_MS = 600_000  # a new incarnation at most this often (Shipper)
SHORT_SESSION_MS = 5_000  # a connection the broker closes sooner is a short one...
SHORT_SESSIONS = 5  # ...and this many in a row are worth saying why they might be
PUBLISH_OVERHEAD = 16  # fixed header, topic length, packet id, properties (upper bound)


def new_incarnation() -> int:
    """A random positive 62-bit number: two states never draw the same one in practice."""
    return secrets.randbits(62) | 1


class SequenceAllocator:
    """Per-gateway batch sequence numbers that survive restarts (reserved in fsynced blocks),
    and the agent's *incarnation*: a random number drawn when the state directory is new and
    kept in the same file, so when the state is lost (an SD card replaced) the numbers that
    start again at 0 belong to a new incarnation and the cloud takes them as new batches."""

    def __init__(self, state_dir: Path, clock: Clock) -> None:
        self._path = state_dir / SEQ_FILE
        self._path.parent.mkdir(parents=True, exist_ok=True)
        # the file was unreadable and set aside: a new incarnation, whose numbers the agent
        # moves past those still in its outbox (``skip_to``)
        self.recovered = False
        try:
            fields = self._path.read_text().split()
        except FileNotFoundError:
            fields = []
        except UnicodeDecodeError:
            fields = ["?", "?", "?"]
        try:
            if len(fields) == 2:
                self.incarnation, self._next = int(fields[0]), int(fields[1])
            elif len(fields) == 1:  # written before incarnations (or cut short): its numbers
                self.incarnation, self._next = new_incarnation(), int(fields[0])
                self.recovered = True  # and the acks of what the outbox holds from before
            elif not fields:
                self.incarnation, self._next = new_incarnation(), 0
            else:
                raise ValueError(fields)
            if self.incarnation < 0 or self._next < 0:
                raise ValueError(fields)
        except ValueError:
            aside = self._path.with_name(f"uplink.seq.unreadable-{clock.now_ms()}")
            os.replace(self._path, aside)
            log.error("the batch sequence file %s is unreadable (kept as %s): batches go on "
                      "under a new incarnation, so the cloud cannot take one for a batch it "
                      "already has", self._path, aside.name)
            self.incarnation, self._next = new_incarnation(), 0
            self.recovered = True
        self._ceiling = self._next
        self._reserve()

    def skip_to(self, n: int) -> None:
        """Hand out nothing below ``n`` (numbers still held by the outbox)."""
        if n > self._next:
            self._next = n
            if self._next >= self._ceiling:
                self._reserve()

    def _reserve(self) -> None:
        """Reserve the next block on disk first: a number is handed out only once it is
        durably below the ceiling (a full disk raises here, and nothing is handed out)."""
        ceiling = self._next + SEQ_BLOCK
        tmp = self._path.with_suffix(".tmp")
        try:
            with tmp.open("w") as fh:
                fh.write(f"{self.incarnation} {ceiling}\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._ceiling = ceiling

    @property
    def handed_out(self) -> int:
        """Every number below this has been handed out (or skipped); none at or above it."""
        return self._next

    def renew(self) -> int:
        """A new incarnation for the numbers from here on (another agent numbers batches under
        this one: a copied state directory); returns the one before. On disk before any number
        of it is handed out; if that write fails, nothing changes and OSError is raised."""
        old = self.incarnation
        self.incarnation = new_incarnation()
        try:
            self._reserve()
        except OSError:
            self.incarnation = old
            raise
        return old

    def next(self) -> int:
        if self._next >= self._ceiling:
            self._reserve()
        n = self._next
        self._next += 1
        return n


class CloudReads:
    """The compressed encodings the cloud said (in its latest ack) it reads, kept in the state
    directory so an agent restarted during an outage stores compressed batches from the start.
    An ack without them (an older worker) turns compression off again for what is stored next.
    """

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / READS_FILE
        try:
            self.reads = tuple(self._path.read_text().split())
        except (OSError, UnicodeDecodeError):
            self.reads = ()

    def update(self, reads: tuple[str, ...]) -> None:
        if reads == self.reads:
            return
        self.reads = reads
        log.info("the cloud reads %s: result batches are stored %s", ", ".join(reads) or
                 "JSON only", "compressed" if "zlib" in reads else "as JSON")
        tmp = self._path.with_suffix(".tmp")
        try:  # an optimisation: a failed write only means JSON again after a restart
            tmp.write_text(" ".join(reads) + "\n")
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("could not keep what the cloud reads in %s: %s", self._path, exc)


def _peer_not_after_ms(client: mqtt.Client) -> int | None:
    """The end of the validity of the certificate the broker showed on this connection (TLS
    only; None otherwise): the one certificate every gateway of a fleet depends on."""
    sock = client.socket()
    getpeercert = getattr(sock, "getpeercert", None)
    if getpeercert is None:  # plain TCP
        return None
    try:
        der = getpeercert(binary_form=True)  # read as the agent reads its own certificates
        return not_after_ms(der) if der else None
    except (OSError, ValueError):  # (CertificateError is a ValueError)
        return None


class MqttUplink:
    """The MQTT side of the uplink. The agent's thread decides what to send; paho's thread
    only records acknowledgements and connection changes (no application locks held there)."""

    def __init__(
        self,
        address: BrokerAddress,
        gateway: str,
        *,
        clock: Clock,
        client_id: str,
        state_dir: Path,
        session_expiry_s: int = 3600,
        keepalive_s: int = 5,
    ) -> None:
        self.address = address
        self.keepalive_s = keepalive_s
        self.gateway = gateway
        self._clock = clock
        self.seq = SequenceAllocator(state_dir, clock)
        self._client, self._props = make_client(address, client_id,
                                                session_expiry_s=session_expiry_s)
        self._client.max_queued_messages_set(0)  # bounded by the agent's in-flight window
        self._client.max_inflight_messages_set(100)
        self._client.on_publish = self._on_publish
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.will_set(status_topic(gateway), self._status({"state": "offline"}), qos=1,
                              retain=True)
        self.connected = threading.Event()
        self.acks: deque[Ack] = deque()  # filled by paho's thread
        self.connects = 0  # incremented by paho's thread on every (re)connect (for tests)
        self.client_id = client_id
        self._connected_at: int | None = None  # monotonic ms of the last connect
        self.short_sessions = 0  # connections the broker closed within seconds, in a row
        self._tracked: set[int] = set()  # mids of result publishes awaiting PUBACK
        self._lock = threading.Lock()  # guards _tracked and the counters (short sections)
        self.sent = 0
        self.puback_ok = 0
        self.refused = 0
        self.no_subscribers = 0
        self.bytes_sent = 0
        self.bad_acks = 0
        # a broker's message size limit: Mosquitto's max_packet_size is announced in CONNACK
        # (and breaking it closes with "Packet too large"); its message_size_limit is not
        # announced and breaking it closes with a bare "Protocol error". Either way the batch
        # stays in the outbox and is sent again, so the agent must say what is wrong.
        self.max_packet: int | None = None  # the broker's, from CONNACK
        # when the certificate the cloud broker showed (TLS) stops being valid, epoch ms
        self.server_cert_expiry: int | None = None
        self.largest_sent = 0  # the largest publish since the last (re)connect, in bytes
        self.size_disconnects = 0  # closed by the broker after a publish it may find too large
        self.errors = LinkErrors("uplink", self.address.url, log)  # why it cannot connect
        self.oversize = 0  # batches larger than the broker's announced maximum

    def _status(self, extra: dict[str, Any]) -> bytes:
        return orjson.dumps({"gw": self.gateway, "ts": self._clock.now_ms(), **extra})

    # paho thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                    _p: Any = None) -> None:
        if rc.is_failure:
            log.error("uplink connect to %s refused: %s", self.address.url, rc)
            self.errors.failed(f"refused: {rc}", logged=True)
            return
        self.errors.up()
        announced = getattr(_p, "MaximumPacketSize", None) if _p is not None else None
        self.max_packet = int(announced) if announced else None
        self.largest_sent = 0
        client.subscribe(ack_topic(self.gateway), qos=1)
        client.publish(status_topic(self.gateway), self._status({"state": "online"}), qos=1,
                       retain=True)
        self.connects += 1
        self._connected_at = self._clock.monotonic_ms()
        self.server_cert_expiry = _peer_not_after_ms(client)
        self.connected.set()
        log.info("uplink connected to %s", self.address.url)

    def _on_disconnect(self, client: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode,
                       _p: Any = None) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        # exponential backoff with jitter, so a fleet does not reconnect in lockstep
        client.reconnect_delay_set(min_delay=1 + int(random.random() * 2),
                                   max_delay=20 + int(random.random() * 20))
        if not was_up:
            # paho reports a keepalive timeout twice (eclipse-paho/paho.mqtt.python#870), and
            # an attempt that never had its CONNACK once: neither is a session that ended
            log.debug("uplink to %s: %s (not connected)", self.address.url, rc)
            return
        if rc.value in (PROTOCOL_ERROR, PACKET_TOO_LARGE) and self.largest_sent:
            self.size_disconnects += 1
            limit = (f"it announced a maximum packet size of {self.max_packet:,} bytes"
                     if self.max_packet else "it announced no maximum packet size")
            log.error(
                "uplink: the cloud broker %s closed the connection (%s) after this agent "
                "published a message of %s bytes (%s): most likely its message size limit is "
                "below that (Mosquitto: message_size_limit or max_packet_size). Raise it above "
                "the largest result batch, or lower uplink.max_results_per_batch. The batch "
                "stays in the outbox and is sent again.", self.address.url, rc,
                f"{self.largest_sent:,}", limit)
        elif rc.value != 0:
            log.warning("uplink disconnected from %s: %s (reconnecting)", self.address.url, rc)
            at = self._connected_at
            short = at is not None and self._clock.monotonic_ms() - at < SHORT_SESSION_MS
            self.short_sessions = self.short_sessions + 1 if short else 0
            if self.short_sessions in (SHORT_SESSIONS, 10 * SHORT_SESSIONS):
                # what a broker does when another client connects with the same client id:
                # it closes the older connection (Mosquitto without a word), and back and forth
                log.error("uplink: the cloud broker %s closed this agent's connection within "
                          "%d s of connecting, %d times in a row. If another client uses the "
                          "client id %r (a second agent with gateway id %r), each connection "
                          "takes over the other's: give each gateway its own [gateway] id",
                          self.address.url, SHORT_SESSION_MS // 1000, self.short_sessions,
                          self.client_id, self.gateway)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.acks.append(decode_ack(bytes(msg.payload)))
        except ContractError as exc:
            self.bad_acks += 1
            log.warning("unusable ack on %s: %s", msg.topic, exc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode,
                    _p: Any = None) -> None:
        with self._lock:
            if mid not in self._tracked:
                return
            self._tracked.discard(mid)
            if rc.is_failure:
                self.refused += 1
            elif rc.value == NO_MATCHING_SUBSCRIBERS:
                self.no_subscribers += 1
            else:
                self.puback_ok += 1
        if rc.is_failure or rc.value == NO_MATCHING_SUBSCRIBERS:
            log.warning("broker did not deliver a result batch (mid %d): %s; it stays in the "
                        "outbox and will be sent again", mid, rc)

    # agent side ----------------------------------------------------------------------------

    def start(self) -> None:
        self._client.on_connect_fail = self.errors.on_connect_fail
        # a short keepalive: a silently dead connection (a partition) is noticed within about
        # two keepalives, and paho then reconnects and retransmits what it holds
        self._client.connect_async(self.address.host, self.address.port,
                                   keepalive=self.keepalive_s, clean_start=False,
                                   properties=self._props)
        self._client.loop_start()

    def publish_results(self, payload: bytes) -> int:
        """Publish a batch; returns its MQTT message id."""
        topic = results_topic(self.gateway)
        size = len(payload) + len(topic) + PUBLISH_OVERHEAD
        if self.max_packet is not None and size > self.max_packet:
            self.oversize += 1
            log.error("uplink: a result batch of %s bytes is larger than the cloud broker's "
                      "maximum packet size (%s bytes): raise the broker's max_packet_size or "
                      "lower uplink.max_results_per_batch", f"{size:,}", f"{self.max_packet:,}")
        self.largest_sent = max(self.largest_sent, size)
        info = self._client.publish(topic, payload, qos=1)
        with self._lock:
            self._tracked.add(info.mid)
            self.sent += 1
            self.bytes_sent += len(payload)
        return info.mid

    def connected_since_ms(self) -> int | None:
        """Monotonic ms of the current connection's start (None: never connected)."""
        return self._connected_at

    def on_the_wire(self, mid: int) -> bool:
        """True while paho still holds this publish (not PUBACKed): it retransmits it itself
        after a reconnect, so publishing it again would only queue a second copy."""
        with self._lock:
            return mid in self._tracked

    def publish_health(self, payload: bytes) -> None:
        self._client.publish(health_topic(self.gateway), payload, qos=1)

    def publish_status(self, extra: dict[str, Any]) -> None:
        self._client.publish(status_topic(self.gateway), self._status(
            {"state": "online", **extra}), qos=1, retain=True)

    def publish_late(self, payload: bytes) -> None:
        self._client.publish(late_topic(self.gateway), payload, qos=1)

    def stop(self) -> None:
        if self.connected.is_set():
            info = self._client.publish(status_topic(self.gateway),
                                        self._status({"state": "offline"}), qos=1, retain=True)
            info.wait_for_publish(timeout=2.0)
        self._client.disconnect()
        self._client.loop_stop()


class Shipper:
    """Moves batches from the outbox to the uplink and back out on acknowledgement.

    Runs in the agent's thread: decides what to (re)send, applies acks, counts."""

    def __init__(self, outbox: Any, uplink: MqttUplink, clock: Clock, *, state_dir: Path,
                 max_inflight: int = 32, ack_timeout_ms: int = 30_000) -> None:
        self.outbox = outbox
        self.uplink = uplink
        self.cloud = CloudReads(state_dir)  # what the cloud reads besides JSON
        self.clock = clock
        self.max_inflight = max_inflight
        self.ack_timeout_ms = ack_timeout_ms
        self.inflight: dict[int, tuple[int, int]] = {}  # seq -> (ms of the last send, mid)
        self.resent = 0
        self.acked = 0
        self.rejected = 0
        self.foreign_acks = 0  # acks for another incarnation of this gateway (a lost state)
        # earlier incarnations whose batches the outbox still holds (an unreadable sequence
        # file replaced): their acks count too, checked against each batch's digest
        self.earlier: set[int] = set()
        self.first_sent: dict[int, int] = {}  # seq -> ms of its first send (ack overdue?)
        self.overdue_warned = 0
        # acks of this incarnation about batches it never sent: another agent numbers under it
        self.identity_conflicts = 0
        self._renewed_at: int | None = None  # monotonic ms of the last new incarnation drawn
        # how the cloud finds this gateway's clock (``Ack.clock_ms``), and when it said so
        # (this gateway's time): (offset ms, told at ms), or None until an ack says
        self.cloud_clock: tuple[int, int] | None = None
        self.on_clock: Callable[[int], None] | None = None  # told each offset the cloud says

    def apply_acks(self) -> None:
        mine = self.uplink.seq.incarnation
        while self.uplink.acks:
            ack = self.uplink.acks.popleft()
            self.cloud.update(ack.reads)
            if ack.clock_ms is not None:
                self._cloud_clock(ack.clock_ms)
            if ack.incarnation not in (mine, 0) and ack.incarnation not in self.earlier:
                self.foreign_acks += 1
                continue
            acked, rejected = ack.acked, ack.rejected
            unproven = self.outbox.unproven_acks
            # only what the ack proves it received leaves (a digest of each batch)
            self.acked += self.outbox.ack(acked, ack.proofs)
            if rejected:  # the cloud cannot use them: keep them no longer
                n = self.outbox.ack(rejected, ack.proofs)
                self.rejected += n
                if n:
                    log.error("cloud rejected %d batch(es) %s as unusable", n, rejected[:10])
            for s in acked + rejected:
                if s not in self.outbox.entries:
                    self.inflight.pop(s, None)
                    self.first_sent.pop(s, None)
            if ack.incarnation == mine and (
                    ack.conflicts or self.outbox.unproven_acks > unproven
                    or any(s >= self.uplink.seq.handed_out for s in acked + rejected)):
                self._another_agent_numbers_as_this_one(acked + rejected)
                mine = self.uplink.seq.incarnation

    def _cloud_clock(self, offset: int) -> None:
        """The cloud worker tells how this gateway's clock stands to its own (or to its
        gateways' median), from the time the gateway's health reports take: the one way a
        clock set but wrong (a Pi booted from its saved time where a firewall lets MQTT
        through but not NTP) is found here. Said when it begins and when it ends, and by
        `fieldline edge status`. It changes one thing the agent does (``on_clock``): while
        the cloud finds the clock right, devices ahead of it are refused as theirs being
        wrong instead of making it untrusted (``ClockGuard.devices_say``): what an ack forged
        by anyone who may publish on the ack topic could do is what the agent did before."""
        was = self.cloud_clock is not None and abs(self.cloud_clock[0]) >= CLOCK_OFF_MS
        self.cloud_clock = (offset, self.clock.now_ms())
        if self.on_clock is not None:
            self.on_clock(offset)
        if abs(offset) >= CLOCK_OFF_MS and not was:
            log.warning("the cloud worker finds this gateway's clock %s (from the time its "
                        "health reports take): what the agent stamps with it (readings without "
                        "a time of their own, its health) is misplaced by as much. Check the "
                        "time sync (timedatectl; NTP, UDP 123 through the site's firewall)",
                        told(offset))
        elif was and abs(offset) < CLOCK_OFF_MS:
            log.info("the cloud worker finds this gateway's clock right again (%d ms)", offset)

    def _another_agent_numbers_as_this_one(self, seqs: list[int]) -> None:
        """An ack of this agent's incarnation about a batch it never sent (a number it has not
        handed out yet, or another digest under one it holds), or one where the cloud says two
        batches came under one number (``Ack.conflicts``): a second agent runs with the
        same gateway id and a copy of this state directory (an SD card image made after the
        agent ran). The cloud would take the later of two batches under one number for a
        re-send of the first and drop it. So this agent numbers its batches from now on under
        a new incarnation of its own (at most once in ``RENEW_EVERY_MS``: a forger who can
        publish on the ack topic cannot make it churn); what its outbox holds stays under the
        old one, whose acks it still takes (each checked against the batch's digest)."""
        self.identity_conflicts += 1
        now = self.clock.monotonic_ms()
        if self._renewed_at is not None and now - self._renewed_at < RENEW_EVERY_MS:
            return
        try:
            old = self.uplink.seq.renew()
        except OSError as exc:  # a full disk: the next such ack tries again
            log.error("a new incarnation could not be stored (%s); still numbering under the "
                      "one another agent uses", exc)
            return
        self._renewed_at = now
        self.earlier.add(old)
        log.error("gateway %s: an ack of this agent's incarnation names batches it never sent "
                  "or two batches under one number (%s): another agent runs as this gateway "
                  "from a copy of its state directory "
                  "(an SD card image?). Batches from now on go under a new incarnation; give "
                  "each gateway its own [gateway] id and a state directory of its own",
                  self.uplink.gateway, seqs[:5])

    def pump(self) -> int:
        """Send what fits in the window, oldest first; resend what timed out. Returns sends."""
        if not self.uplink.connected.is_set():
            return 0
        now = self.clock.monotonic_ms()
        sent = 0
        for seq, (when, mid) in list(self.inflight.items()):
            if seq not in self.outbox.entries:
                del self.inflight[seq]
            elif now - when >= self.ack_timeout_ms:
                if self.uplink.on_the_wire(mid):
                    continue  # paho retransmits it after a reconnect; no second copy
                # the broker has it but no acknowledgement came (a worker died holding it, or
                # the worker's acks do not reach us)
                self.inflight[seq] = (now, self.uplink.publish_results(self.outbox.read(seq)))
                self.resent += 1
                sent += 1
                self._overdue(seq, now)
        if len(self.inflight) >= self.max_inflight:
            return sent
        for seq in self.outbox.pending():
            if len(self.inflight) >= self.max_inflight:
                break
            if seq in self.inflight:
                continue
            self.inflight[seq] = (now, self.uplink.publish_results(self.outbox.read(seq)))
            self.first_sent.setdefault(seq, now)
            sent += 1
        for seq in [s for s in self.first_sent if s not in self.outbox.entries]:
            del self.first_sent[seq]  # shed meanwhile
        return sent

    def _overdue(self, seq: int, now: int) -> None:
        waited = now - self.first_sent.setdefault(seq, now)
        # the worker is to blame only for the time the uplink was up: after an outage the
        # batch is simply sent again (the outage has its own log lines)
        up_since = self.uplink.connected_since_ms()
        if waited >= 3 * self.ack_timeout_ms and (
                up_since is None or now - up_since >= 3 * self.ack_timeout_ms):
            self.overdue_warned += 1
            if self.overdue_warned <= 3 or self.overdue_warned % 100 == 0:
                log.warning("batch %d sent %.0f s ago is still not acknowledged: is a cloud "
                            "worker running, and may it publish on %s (and this gateway read "
                            "it)? See deploy/mosquitto/cloud.acl", seq, waited / 1000,
                            ack_topic(self.uplink.gateway))

    def oldest_unacked_ms(self) -> int:
        """How long the oldest batch on the wire has waited for its acknowledgement."""
        if not self.first_sent:
            return 0
        return self.clock.monotonic_ms() - min(self.first_sent.values())

    def overdue(self) -> int:
        """Batches waiting longer than three ack timeouts for their acknowledgement."""
        now = self.clock.monotonic_ms()
        return sum(1 for t in self.first_sent.values() if now - t >= 3 * self.ack_timeout_ms)
