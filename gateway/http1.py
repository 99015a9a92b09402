"""A small HTTP/1.1 client: keep-alive connections to one origin, strict about what it is answered.

The sidecar's data plane (gateway/proxy.py) and the provider-API relay (gateway/relay.py) both send
their requests with it. A ``Pool`` holds the connections to one origin (reused last-in first-out, at
most ``limit`` in use); ``exchange`` writes one request and returns the ``Connection`` once the
response headers are in; the caller reads the body from it (``chunks``/``take``/``wait``) and gives
it back with ``Pool.release``. The response is parsed by httptools (llhttp, the parser uvicorn
uses). Why not a general-purpose client: measured in docs/benchmarks.md ("Reference: the data-plane
client choice"), httpx and aiohttp cost several times what this does per request.

Strict on what the peer says (a buggy or hostile server must not desync the pool): bytes after a
complete response, conflicting or unsupported framing, or an unrequested 101 fail the connection
(``UpstreamInvalid``), and it is never reused. Tests: tests/test_proxy_hostile.py (through the
sidecar), tests/test_relay_*.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

import httptools
from starlette.types import Receive, Send

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"te", b"trailer", b"transfer-encoding", b"upgrade"})


def hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names plus every name the Connection header lists (names lower-case,
    as ASGI servers and ``Connection`` give them)."""
    listed: list[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            if listed is None:
                listed = []
            listed += [token.strip().lower() for token in value.split(b",")]
    return HOP_BY_HOP.union(listed) if listed else HOP_BY_HOP


class DisconnectWatch:
    """Cancels the request's task when the ASGI client leaves, so a streamed answer is not read on
    for nobody (the sidecar's, gateway/proxy.py, and the relay's, gateway/relay.py). Armed once
    the request body is read (receive is free then) and only if the response is still streaming
    (no extra task for small responses). The caller catches the cancellation when ``gone``
    (``task.uncancel()``) and always calls ``stop()``."""

    def __init__(self, receive: Receive) -> None:
        self.receive, self.task = receive, asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.body_read = self.streaming = self.gone = self.finished = False

    def body_sent(self) -> None:
        self.arm(body_read=True)

    def arm(self, *, body_read: bool = False, streaming: bool = False) -> None:
        self.body_read, self.streaming = self.body_read or body_read, self.streaming or streaming
        if self.body_read and self.streaming and self.watcher is None and not self.finished:
            self.watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        if not self.finished and self.task is not None:
            self.gone = True
            self.task.cancel()

    def stop(self) -> None:
        self.finished = True
        if self.watcher is not None:
            self.watcher.cancel()


async def send_body(connection: Connection, send: Send, watch: DisconnectWatch) -> None:
    """The answer's body to ``send`` (the response start already sent): in one message when it is
    all here (the usual small answer), else as it arrives with ``watch`` armed, so a caller who
    leaves stops the reading. Broken off midway, the response is left incomplete: the server
    aborts it and the client sees the cut."""
    if connection.complete and connection.error is None:
        watch.finished = True
        await send({"type": "http.response.body", "body": connection.take() if connection.chunks else b""})
        return
    watch.arm(streaming=True)
    while True:
        if connection.chunks:
            await send({"type": "http.response.body", "body": connection.take(), "more_body": True})
            continue
        if connection.error is not None:
            return
        if connection.complete:
            break
        await connection.wait()
    watch.finished = True  # all of it is here: leaving now cancels nothing
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class HeaderView(Mapping[str, str]):
    """Raw header pairs read as a mapping: names case-insensitive, several values joined with
    ", " (as ``httpx.Headers`` reads them). Decoded on the first lookup only: most answers are
    never asked."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._raw = raw
        self._decoded: dict[str, str] | None = None

    def _names(self) -> dict[str, str]:
        if self._decoded is None:
            decoded: dict[str, str] = {}
            for name, value in self._raw:
                key, text = name.decode("latin-1").lower(), value.decode("latin-1")
                decoded[key] = f"{decoded[key]}, {text}" if key in decoded else text
            self._decoded = decoded
        return self._decoded

    def __getitem__(self, name: str) -> str:
        return self._names()[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The client's Content-Length if it is exactly one plain number and no Transfer-Encoding came
    with it; else None (the body goes chunked)."""
    found: int | None = None
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and found is not None):
            return None
        if name == b"content-length":
            value = value.strip()
            if not value.isdigit() or len(value) > 18:
                return None
            found = int(value)
    return found


class UpstreamFailed(Exception):
    """The upstream connection failed or broke before the response was complete (502)."""


class UpstreamInvalid(UpstreamFailed):
    """The upstream's answer is not HTTP we can pass on safely: conflicting or unsupported framing,
    bytes after a complete response, an unrequested 101 (502 ``upstream_invalid``, never retried)."""


class UpstreamBusy(Exception):
    """Every pooled connection stayed in use for ``pool_timeout_s`` (503 ``upstream_busy``)."""


HIGH_WATER = 256 * 1024  # response bytes buffered from the upstream before reading pauses
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # idempotent: retried once


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the upstream, one exchange at a time.

    The httptools callbacks fill the response state; the proxy's task waits on ``wait()``, which
    returns whenever something new arrived (headers, body, the end, an error)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keepalive: float) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.keepalive = keepalive  # idle longer than this: closed, not reused (Keep-Alive: timeout= lowers it)
        self.wrote = False  # some byte of the current request was handed to the transport
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.parser: httptools.HttpResponseParser | None = None
        self.waiting = False  # the request is sent; the upstream owes an answer (timed by the pool)
        self.last_read = 0.0
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.read_paused = False
        self.headers_done = self.complete = self.keep_alive = self.received = self.head = False
        self.until_eof = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def start(self, head: bool) -> None:
        """A new exchange on this connection."""
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = []
        self.chunks.clear()
        self.buffered = 0
        self.headers_done = self.complete = self.keep_alive = self.received = self.wrote = False
        self.until_eof = False
        self.head = head
        self.error = None

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        parser = self.parser
        if parser is None or self.complete:
            self._fail(UpstreamFailed("the upstream sent data outside any exchange"))
            return
        self.received = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # one of our callbacks refused the answer
            reason = exc.__context__
            self._fail(reason if isinstance(reason, UpstreamFailed) else UpstreamInvalid(str(exc)))
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # llhttp refuses duplicate or non-numeric Content-Length, CL with TE, bad chunks, data
            # after Connection: close. HttpParserUpgrade is not an HttpParserError: uncaught, it
            # escaped data_received ("Fatal error: protocol.data_received() call failed").
            self._fail(UpstreamInvalid(f"unreadable upstream response: {exc!r}"))

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.parser is not None and not self.complete and self.error is None:
            if self.headers_done and self.until_eof:
                self.complete = True  # a body delimited by the end of the connection ends here
                self._wake()
            else:
                self._fail(UpstreamFailed("the upstream closed the connection"), close=False)
        self.waiting = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ------------------------------------------------------------------
    # llhttp goes on parsing after a complete message: a second response in the same segment would
    # start a new message in this parser and overwrite the status and headers. A callback that
    # raises stops the parser there (feed_data raises HttpParserCallbackError, our reason as its
    # __context__). Only CR/LF between messages is skipped without a callback (RFC 9112 2.2): it
    # cannot start a message; in a later segment it fails the connection like any other byte.

    def on_message_begin(self) -> None:
        if self.complete:
            raise UpstreamInvalid("the upstream sent more than one response")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            # A trailer field after a chunked body: dropped (RFC 9110 6.5.1 lets a proxy discard
            # what it does not process). Kept, it would join the head read after the body (a small
            # answer is sent whole): a provider's trailing Content-Length or Location in our head.
            return
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        status = self.parser.get_status_code()
        if status == 101:  # we never ask for an upgrade on this client (WebSockets go via aiohttp)
            raise UpstreamInvalid("the upstream switched protocols unasked")
        if status < 200:  # an interim answer (100 Continue, 103 Early Hints...): the real one follows
            self.headers = []
            return
        # One pass over the headers: framing checks llhttp leaves to us, and Keep-Alive: timeout=.
        length = b""
        codings = 0
        chunked = False
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                # Only plain "chunked" in one header: "chunked, identity" or "gzip, chunked" would be
                # read to the connection's end or lose their coding once de-chunked (RFC 9112 6.1).
                codings += 1
                chunked = value.strip().lower() == b"chunked"
            elif name == b"keep-alive":
                self._keep_alive_timeout(value)
        if codings > 1 or (codings and not chunked):
            raise UpstreamInvalid("unsupported or conflicting Transfer-Encoding in the upstream's answer")
        self.status = status
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        if self.head or status in (204, 304):
            self.complete = True  # no body, whatever the headers say
            # A body announced here may still come (a HEAD or 204 answered as if it had one): the
            # connection is not reused, or those bytes would become the next exchange's answer.
            if codings or length.strip(b"0 \t"):
                self.keep_alive = False
        else:
            self.until_eof = not length and not codings
            self.keep_alive = self.keep_alive and not self.until_eof
        self._wake()

    def _keep_alive_timeout(self, value: bytes) -> None:
        for param in value.split(b","):
            key, _, number = param.partition(b"=")
            number = number.strip()
            if key.strip().lower() == b"timeout" and number.isdigit():
                seconds = int(number)  # stop reusing a second early (half of it if it is tiny)
                self.keepalive = min(self.keepalive, max(seconds - 1.0, seconds / 2))

    def on_body(self, body: bytes) -> None:
        if self.complete:  # body bytes after an answer that has none (HEAD, 204, 304)
            raise UpstreamInvalid("the upstream sent a body after a complete response")
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.read_paused and self.transport is not None:
            self.transport.pause_reading()  # the client reads slower than the upstream sends
            self.read_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.headers_done:
            self.complete = True
            self._wake()

    # -- used by the proxy --------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException, *, close: bool = True) -> None:
        if self.error is None:
            self.error = error
        self.keep_alive = False
        if close and self.transport is not None:
            self.transport.close()
        self._wake()

    async def wait(self) -> None:
        """Until something new happened (call only while the exchange is still going on)."""
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        """Every body byte received so far (reading resumes if it was paused)."""
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamFailed("the upstream closed the connection")
        self.wrote = True
        self.transport.write(data)

    async def drain(self, patience_s: float) -> None:
        """Until the upstream takes more of the request (silent ``patience_s``: TimeoutError)."""
        if self._write_paused and not self.closed:
            self._drain = self.loop.create_future()
            try:
                async with asyncio.timeout(patience_s):
                    await self._drain
            finally:
                self._drain = None
        if self.closed:
            raise UpstreamFailed("the upstream closed the connection")

    def timed_out(self, now: float, timeout: float) -> bool:
        """Whether the upstream has been silent ``timeout`` seconds (never while we are the slow side)."""
        if self.read_paused:
            self.last_read = now
            return False
        if now - self.last_read >= timeout:
            self._fail(TimeoutError())
            return True
        return False

    def finish(self) -> bool:
        """End the exchange; whether the connection can serve another one."""
        self.waiting = False
        self.parser = None
        reusable = (self.complete and self.keep_alive and self.error is None and not self.closed
                    and not self.read_paused)
        if not reusable:
            self.close()
        return reusable

    def close(self) -> None:
        self.waiting = False
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class Pool:
    """Keep-alive connections to one upstream, at most ``limit`` in use (the rest wait in turn, at
    most ``pool_timeout`` seconds: then ``UpstreamBusy``). A connection idle ``keepalive`` seconds
    is not reused: shorter than common upstream keep-alives (uvicorn and Node 5 s), so we seldom
    write to a connection the upstream is closing."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None, server_hostname: str | None,
                 limit: int, timeout: float, pool_timeout: float = 10.0, keepalive: float = 4.0) -> None:
        self.host, self.port = host, port
        self.ssl, self.server_hostname = ssl_context, server_hostname
        self.limit = limit
        self.timeout = timeout
        self.pool_timeout = pool_timeout
        self.keepalive = keepalive
        # One sweep every ``_tick`` checks every exchange for silence, instead of a timer each.
        self._tick = min(max(timeout / 8, 0.01), 1.0)
        self._sweep: asyncio.TimerHandle | None = None
        self.active: set[Connection] = set()
        self.idle: collections.deque[Connection] = collections.deque()
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection and whether it was reused (a reused one may have been closed meanwhile)."""
        if self.in_use >= self.limit or self.waiters:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(self.pool_timeout):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._hand_over()  # we were given the slot: pass it on
                else:
                    with contextlib.suppress(ValueError):
                        self.waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise UpstreamBusy() from None
                raise
        else:
            self.in_use += 1
        try:
            loop = asyncio.get_running_loop()
            now = loop.time()
            while self.idle and not fresh:
                connection = self.idle.pop()
                if not connection.closed and now - connection.idle_since < connection.keepalive:
                    return connection, True
                connection.close()
            async with asyncio.timeout(self.timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(loop, self.keepalive), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.server_hostname)
            return connection, False
        except BaseException:
            self._hand_over()
            raise

    def watch(self, connection: Connection) -> None:
        """The request is sent: time the upstream's silence from now on."""
        connection.waiting = True
        connection.last_read = connection.loop.time()
        self.active.add(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(self._tick, self._check)

    def _check(self) -> None:
        self._sweep = None
        if not self.active:
            return
        loop = next(iter(self.active)).loop
        now = loop.time()
        for connection in [c for c in self.active if not c.waiting or c.complete or c.error is not None]:
            self.active.discard(connection)
        for connection in [c for c in self.active if c.timed_out(now, self.timeout)]:
            self.active.discard(connection)
        if self.active:
            self._sweep = loop.call_later(self._tick, self._check)

    def release(self, connection: Connection) -> None:
        self.active.discard(connection)
        if connection.finish():
            connection.idle_since = connection.loop.time()
            self.idle.append(connection)
        self._hand_over()

    def _hand_over(self) -> None:
        """A slot is free: give it to the first waiter still waiting, else count it free."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: in_use is unchanged
                return
        self.in_use -= 1

    def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        while self.idle:
            self.idle.pop().close()


async def exchange(pool: Pool, head: bytes, *, method: str, body: bytes = b"",
                   stream: Callable[[Connection], Awaitable[None]] | None = None,
                   sent: Callable[[], None] | None = None) -> Connection:
    """Send one request (``head``: its request line and headers, ready to write) and return the
    connection once the response headers are in, or raise (``UpstreamFailed``, ``UpstreamBusy``,
    ``TimeoutError``, ``OSError``). ``body`` is written with the head; ``stream`` instead writes the
    body itself once the head is out. ``sent`` is called when the whole request is written.

    A kept-alive connection the server closed meanwhile: once more on a new one, when nothing of an
    answer came and either nothing of the request was written (it cannot have been processed: any
    method) or it is idempotent and still in hand (RFC 9110 9.2.2). A request that was written and
    may have been processed (a POST, a streamed body) is never sent twice."""
    fresh = False
    while True:
        connection, reused = await pool.acquire(fresh=fresh)
        try:
            connection.start(head=method == "HEAD")
            if stream is not None:
                connection.write(head)
                await stream(connection)
            else:
                connection.write(head + body if body else head)
            if sent is not None:
                sent()
            pool.watch(connection)
            while not connection.headers_done and connection.error is None:
                await connection.wait()
            if connection.error is not None:
                raise connection.error
            return connection
        except UpstreamFailed as exc:
            pool.release(connection)
            if (reused and not connection.received and not isinstance(exc, UpstreamInvalid)
                    and (not connection.wrote or (stream is None and method in REPLAYABLE))):
                fresh = True
                continue
            raise
        except BaseException:
            pool.release(connection)
            raise


class Pools:
    """A ``Pool`` per origin (``https://host:port``), created on first use: the relay's provider
    hosts. ``observers`` see every request head as written (and its body when it was sent whole,
    else None): the tests read what really went out from there."""

    def __init__(self, *, limit: int = 100, timeout_s: float = 10.0, pool_timeout_s: float = 10.0,
                 keepalive_s: float = 4.0) -> None:
        self.limit, self.timeout_s = limit, timeout_s
        self.pool_timeout_s, self.keepalive_s = pool_timeout_s, keepalive_s
        self.observers: list[Callable[[str, bytes, bytes | None], None]] = []
        self._pools: dict[str, Pool] = {}
        self._tls: ssl.SSLContext | None = None  # one CA store load for every https origin

    def get(self, origin: str) -> Pool:
        pool = self._pools.get(origin)
        if pool is None:
            scheme, _, netloc = origin.partition("://")
            host, _, port = netloc.rpartition(":") if netloc.rpartition(":")[2].isdigit() else (netloc, "", "")
            host = host.strip("[]")
            tls = None
            if scheme == "https":
                if self._tls is None:
                    self._tls = ssl.create_default_context()
                tls = self._tls
            pool = Pool(host, int(port) if port else (443 if tls else 80), tls, host if tls else None,
                        self.limit, self.timeout_s, self.pool_timeout_s, self.keepalive_s)
            self._pools[origin] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
