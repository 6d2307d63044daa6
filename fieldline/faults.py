"""A fault-injecting TCP proxy for tests and drills (loopback; no netem needed).

Put it between a client and a server and switch its mode at any time:

* ``pass``: forward bytes both ways;
* ``blackhole``: keep connections open but let nothing through until healed (a partition: no
  RST, no FIN; like TCP, bytes are delayed, never silently deleted, so a connection that
  survives the partition resumes intact, and the endpoints notice only through their own
  timeouts, e.g. MQTT keepalive);
* ``reset``: abort every connection (RST) and refuse new ones;
* ``latency``: forward with ``latency_ms`` of delay per chunk;
* ``slow``: a slow link (a congested cellular uplink): each direction carries ``rate_bps``
  bytes per second, each chunk arriving ``latency_ms`` after it was sent (chunks in flight
  overlap, as on a real link; bytes beyond what is in flight wait in TCP's buffers);
* ``http_503``: answer every request with ``503 Service Unavailable`` (an InfluxDB in trouble);
* ``hang``: accept and never answer (a server that times out).

It runs its own asyncio loop in a daemon thread, so synchronous tests can drive it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from concurrent.futures import Future
from typing import Any

MODES = ("pass", "blackhole", "reset", "latency", "slow", "http_503", "hang")


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.listen_port = listen_port
        self.mode = "pass"
        self.latency_ms = 0
        self.rate_bps = 0
        self.connections = 0
        self.bytes_forwarded = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fault-proxy")
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._flowing: asyncio.Event | None = None

    @property
    def port(self) -> int:
        return self.listen_port

    def start(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    def set_mode(self, mode: str, *, latency_ms: int = 0, rate_bps: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if mode == "slow" and rate_bps <= 0:
            raise ValueError("mode slow needs rate_bps > 0")
        self.latency_ms = latency_ms
        self.rate_bps = rate_bps
        self.mode = mode
        self._call(self._set_flow(mode not in ("blackhole", "hang"))).result(10)
        if mode in ("reset", "http_503"):
            # existing (kept-alive) connections are cut, so every client meets the new mode
            self._call(self._abort_all()).result(10)

    async def _set_flow(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _abort_all(self) -> None:
        for w in list(self._writers):
            _abort(w)
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:  # stop() waits for the handlers to wind down
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        self.connections += 1
        if self.mode == "reset":
            _abort(writer)
            return
        if self.mode == "http_503":
            with contextlib.suppress(Exception):
                await reader.read(65536)
                body = b'{"error":"service unavailable (fault proxy)"}'
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/"
                             b"json\r\nContent-Length: " + str(len(body)).encode()
                             + b"\r\nConnection: close\r\n\r\n" + body)
                await writer.drain()
            writer.close()
            return
        if self.mode == "hang":
            self._writers.add(writer)
            with contextlib.suppress(Exception):
                while await reader.read(65536):
                    pass
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        on_link: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)
        deliver = asyncio.ensure_future(self._deliver(on_link, writer))
        try:
            while not deliver.done():
                await self._flowing.wait()  # a partition holds the bytes back, never drops them
                if self.mode == "slow":  # the link's rate: a chunk leaves when serialised
                    data = await reader.read(max(1, min(65536, self.rate_bps // 20)))
                    if data:
                        await asyncio.sleep(len(data) / self.rate_bps)
                else:
                    data = await reader.read(65536)
                await on_link.put((loop.time(), data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()
            with contextlib.suppress(Exception):
                writer.close()

    async def _deliver(self, on_link: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter) -> None:
        """The far end of the link: chunks in the order sent, each after the mode's delay."""
        assert self._flowing is not None
        loop = asyncio.get_running_loop()
        while True:
            sent_at, data = await on_link.get()
            if not data:
                return
            await self._flowing.wait()
            if self.mode == "reset":
                _abort(writer)
                return
            if self.mode == "latency" and self.latency_ms:
                await asyncio.sleep(self.latency_ms / 1000)
            elif self.mode == "slow" and self.latency_ms:
                await asyncio.sleep(max(0.0, sent_at + self.latency_ms / 1000 - loop.time()))
            writer.write(data)
            self.bytes_forwarded += len(data)
            await writer.drain()

    def stop(self) -> None:
        async def close() -> None:
            await self._abort_all()
            if self._server is not None:
                self._server.close()
            if self._handlers:  # aborted connections end their pumps: let the handlers finish
                await asyncio.wait(list(self._handlers), timeout=5)

        with contextlib.suppress(Exception):
            self._call(close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a firewall would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()
