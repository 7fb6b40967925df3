"""A delaying TCP proxy for the benchmark (stdlib only): emulated round-trip time, an optional
bandwidth limit per direction, and a count of the request/response turns each connection takes.

Every chunk read from either side is forwarded to the other side `delay` seconds after it was
read, in order, so a connection through the proxy sees a round-trip time of 2 * delay on top of
loopback. A *turn* is counted each time the traffic flips from client->server to
server->client: one turn is one round trip that the client had to wait for (the TLS 1.3
handshake with CONNECT sent right behind the client's Finished is 2 turns; SUBSCRIBE/SUBACK is
one; a request and its reply is one). The TCP handshake itself carries no data and is not
counted.

With `rate` (bytes per second, each direction on its own, as on a link with separate up and
down capacity) a chunk of n bytes occupies its direction of the link n / rate seconds, queued
behind the chunks before it, and is delivered whole `delay` after its last byte went out:
delivered = max(read, link free) + n / rate + delay. Only the TCP payload is counted against
the rate (no TCP/IP headers, no ACKs).

The TCP handshake is not emulated by default: the proxy accepts locally, so a client's connect()
returns at once. With `tcp_handshake=True` the client's first chunk is held one extra round trip
(2 * delay): the client cannot send before its connect() returns, so for a protocol where the
client speaks first (TLS) this is the time the SYN / SYN-ACK would have cost. Turns and bytes
are the same either way.

Per connection the proxy also keeps the *flights* (runs of chunks in one direction) and the TLS
records each flight carries (content type and size, from the 5-byte record headers), so that a
caller can tell the TLS handshake (the ClientHello flight and the server's first flight) from
what follows.

    proxy = DelayProxy("127.0.0.1", 8883, delay=0.025)   # rate=20_000, tcp_handshake=True
    port = proxy.start()            # runs in a background thread with its own event loop
    ... clients connect to 127.0.0.1:port ...
    stats = proxy.take()            # per-connection statistics since the last take()
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

CHUNK = 65536
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


@dataclass
class ConnStats:
    """What one proxied connection did."""

    opened: float
    turns: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    chunks_up: int = 0
    chunks_down: int = 0
    closed: bool = False
    # [direction, bytes, [[TLS content type, record size with its 5-byte header], ...]] per
    # flight, in order; a record is listed in the flight where its header was read.
    flights: list = field(default_factory=list)
    _last: str = ""  # direction of the last chunk: "up" or "down"
    _tls: dict = field(default_factory=lambda: {"up": [b"", 0], "down": [b"", 0]})

    def saw(self, direction: str, n: int, data: bytes = b"") -> None:
        if direction == "up":
            self.bytes_up += n
            self.chunks_up += 1
        else:
            self.bytes_down += n
            self.chunks_down += 1
            if self._last == "up":
                self.turns += 1
        if direction != self._last:
            self.flights.append([direction, 0, []])
        self.flights[-1][1] += n
        self._records(direction, data, self.flights[-1][2])
        self._last = direction

    def _records(self, direction: str, data: bytes, out: list) -> None:
        """Follows the TLS record headers of one direction across chunks."""
        state = self._tls[direction]  # [partial header, bytes left of the current record]
        i = 0
        while i < len(data):
            if state[1]:
                take = min(state[1], len(data) - i)
                state[1] -= take
                i += take
                continue
            need = 5 - len(state[0])
            state[0] += data[i:i + need]
            i += need
            if len(state[0]) == 5:
                hdr, state[0] = state[0], b""
                length = int.from_bytes(hdr[3:5], "big")
                out.append([hdr[0], 5 + length])
                state[1] = length


@dataclass
class DelayProxy:
    upstream_host: str
    upstream_port: int
    delay: float  # one way, seconds
    rate: float | None = None  # bytes per second, each direction; None: unlimited
    tcp_handshake: bool = False  # hold the client's first chunk one extra round trip
    listen_host: str = "127.0.0.1"
    port: int = 0
    _conns: list[ConnStats] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.base_events.Server | None = None
    _tasks: set = field(default_factory=set)

    # --- control, from any thread ------------------------------------------------------------

    def start(self) -> int:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._serve, self.listen_host, 0)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as e:  # reported to start()
                failure.append(e)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            # stop(): close the listener and every connection, then the loop.
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.run_until_complete(self._server.wait_closed())
            loop.close()

        self._thread = threading.Thread(target=run, name="delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_S):
            raise RuntimeError("the proxy did not start")
        if failure:
            raise failure[0]
        return self.port

    def take(self) -> list[ConnStats]:
        """The statistics of the connections opened since the last take()."""
        with self._lock:
            conns, self._conns = self._conns, []
        return conns

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(STOP_TIMEOUT_S)

    # --- the event loop's side ----------------------------------------------------------------

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        stats = ConnStats(opened=time.monotonic())
        with self._lock:
            self._conns.append(stats)
        try:
            server_r, server_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, stats, "up"),
                self._pump(server_r, client_w, stats, "down"),
            )
        except asyncio.CancelledError:
            pass  # stop(): the connection is closed below; asyncio would log a cancelled handler
        finally:
            stats.closed = True
            for w in (client_w, server_w):
                w.close()
            self._tasks.discard(task)

    async def _pump(self, reader, writer, stats: ConnStats, direction: str) -> None:
        """Reads chunks and hands them to a writer that sends each `delay` after it was read."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the emulated latency itself, not a synchronisation
                if data is None:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        link_free = 0.0  # when this direction of the emulated link has sent all it was given
        first = direction == "up" and self.tcp_handshake
        try:
            while True:
                data = await reader.read(CHUNK)
                now = loop.time()
                if not data:
                    queue.put_nowait((max(now, link_free) + self.delay, None))
                    break
                stats.saw(direction, len(data), data)
                if first:  # the SYN / SYN-ACK round trip the local accept() skipped
                    now += 2 * self.delay
                    first = False
                if self.rate:
                    link_free = max(now, link_free) + len(data) / self.rate
                    due = link_free + self.delay
                else:
                    due = now + self.delay
                queue.put_nowait((due, data))
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
        except asyncio.CancelledError:
            sender.cancel()
            raise
