"""The sidecar's data plane: a streaming reverse proxy (HTTP and WebSocket) to one upstream.

``UpstreamProxy`` is the auth middleware's inner ASGI app. It forwards the request as it is (method,
raw path and query untouched, bodies streamed both ways, never buffered), drops hop-by-hop headers
and sets ``X-Forwarded-*`` (a client's own are believed only from a trusted proxy). The app sees the
Host the browser used (``preserve_host``, the default, on HTTP and WebSockets alike), so an app that
compares the browser's Origin with Host (Tornado's WebSocket ``check_origin``, Django, Grafana)
finds them consistent; ``preserve_host=False`` sends the upstream's own Host instead. The request
body's framing is always its own (``_request_head``), never the client's. Upstream unreachable or
reset: 502 ``upstream_unavailable``; silent for ``timeout_s`` (connect, taking the request body, or
between reads once it is sent): 504 ``upstream_timeout``. A failure after the response has started
leaves it incomplete, so the server cuts the connection and the client sees a truncated response,
never a complete-looking one. A client that leaves stops the upstream read and frees the pooled
connection. Every failure to reach the upstream goes to ``health`` (gateway/upstream_health.py: one
log line per burst, a counter by cause); ``ready_problem`` is readyz's check (``upstream.check_ready``).

Strict on what the upstream says (a buggy or hostile upstream must not desync the pool): bytes after
a complete response, conflicting or unsupported framing, or an unrequested 101 fail the connection:
502 ``upstream_invalid`` when known before the answer is sent, else the connection is closed (never
reused). Bounded waits: a free pooled connection (``pool_timeout_s``: 503 ``upstream_busy``), the
client's body (``body_timeout_s`` of silence: 408 ``request_timeout``). Tests:
tests/test_proxy_hostile.py.

HTTP goes over a small HTTP/1.1 client of its own (``_Connection``, ``_Pool``): keep-alive
connections reused last-in first-out, the request head written as one buffer, the response parsed
by httptools (llhttp, the parser uvicorn uses), no per-request objects beyond what the exchange
needs. WebSockets go through aiohttp's client. Why not a general-purpose client: measured with
``python -m bench --only sidecar`` (docs/benchmarks.md), aiohttp's ``ClientSession.request`` was a
third of the sidecar's CPU time per request; this client costs a fraction of it. Earlier
measurements (uvicorn serving everything on loopback, 2 cores, three 10 s runs each)::

    python bench/proxy_client.py upstream --port 9101 &
    python bench/proxy_client.py proxy --client httpx   --port 9102 &  # minimal proxy on httpx
    python bench/proxy_client.py proxy --client aiohttp --port 9103 &  # minimal proxy on aiohttp
    wrk -t2 -c32 -d10s http://127.0.0.1:PORT/
    # httpx 470-805 req/s (mean latency 44-76 ms); aiohttp 4,550-8,200 (4-7 ms);
    # the upstream alone (9101) 30,800-35,800.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import httptools
from starlette.types import Message, Receive, Scope, Send

if TYPE_CHECKING:  # aiohttp serves WebSockets only: imported on the first one (start-up time)
    import aiohttp
    from yarl import URL

from gateway.edge import TrustedProxies
from gateway.pages import error_response
from gateway.upstream_health import CAUSES, UpstreamHealth, os_error_cause

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# Request side: the fixed set only, never names the client's Connection header lists (a client's
# ``Connection: X-Auth-User`` would drop the identity the gateway added: the CVE-2024-45410 class).
# Expect: the server already answered any 100-continue. Content-Length: the body framing is ours.
_REQUEST_DROP = HOP_BY_HOP | {b"expect", b"content-length"}
# Headers about the path to us: believed only from a trusted proxy, otherwise replaced by our own.
_FORWARDING = (b"x-forwarded-", b"forwarded", b"x-real-ip")
_UNAVAILABLE = "The upstream service is unavailable right now. Please try again in a moment."
_TIMEOUT = "The upstream service did not answer in time. Please try again in a moment."
_INVALID = "The upstream service sent an answer the gateway cannot pass on safely."
_BUSY = "The upstream service is busy right now. Please try again in a moment."
_SLOW_BODY = "The request body arrived too slowly."
_BAD_LENGTH = "The request body did not match its declared length."
_REFUSED = "The upstream service refused the WebSocket connection."
_UNSENDABLE_CLOSE = {1005: 1000, 1006: 1001, 1015: 1011}  # codes that never travel in a close frame
_PROBE_TIMEOUT_S = 5.0  # readyz's connect to the upstream waits at most this (or timeout_s if shorter)


def _hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names plus every name the Connection header lists (names lower-case,
    as ASGI servers and ``_Connection`` give them)."""
    listed: list[bytes] | None = None
    for name, value in headers:
        if name == b"connection":
            if listed is None:
                listed = []
            listed += [token.strip().lower() for token in value.split(b",")]
    return HOP_BY_HOP.union(listed) if listed else HOP_BY_HOP


def _declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
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


def _close_code(code: object) -> int:
    if not isinstance(code, int) or not 1000 <= code < 5000:
        return 1011
    return _UNSENDABLE_CLOSE.get(code, code)


class _DisconnectWatch:
    """Cancels the request's task when the client leaves. Armed once the request body is read (receive
    is free then) and only if the response is still streaming (no extra task for small responses)."""

    def __init__(self, receive: Receive) -> None:
        self.receive, self.task = receive, asyncio.current_task()
        self.watcher: asyncio.Task[None] | None = None
        self.body_read = self.streaming = self.gone = self.finished = False

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


class UpstreamFailed(Exception):
    """The upstream connection failed or broke before the response was complete (502)."""


class UpstreamInvalid(UpstreamFailed):
    """The upstream's answer is not HTTP we can pass on safely: conflicting or unsupported framing,
    bytes after a complete response, an unrequested 101 (502 ``upstream_invalid``, never retried)."""


class UpstreamBusy(Exception):
    """Every pooled connection stayed in use for ``pool_timeout_s`` (503 ``upstream_busy``)."""


class _SlowBody(Exception):
    """The client was silent ``body_timeout_s`` in the middle of its request body (408)."""


class _BadLength(Exception):
    """The client's body does not match the Content-Length it declared (400)."""


_HIGH_WATER = 256 * 1024  # response bytes buffered from the upstream before reading pauses
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})  # idempotent: retried once


class _Connection(asyncio.Protocol):
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
        if self.buffered > _HIGH_WATER and not self.read_paused and self.transport is not None:
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


class _Pool:
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
        self.active: set[_Connection] = set()
        self.idle: collections.deque[_Connection] = collections.deque()
        self.in_use = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self, *, fresh: bool = False) -> tuple[_Connection, bool]:
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
                    lambda: _Connection(loop, self.keepalive), self.host, self.port, ssl=self.ssl,
                    server_hostname=self.server_hostname)
            return connection, False
        except BaseException:
            self._hand_over()
            raise

    def watch(self, connection: _Connection) -> None:
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

    def release(self, connection: _Connection) -> None:
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


class UpstreamProxy:
    def __init__(self, *, url: str, timeout_s: float = 30, max_connections: int = 100,
                 trusted_proxies: Sequence[str] = (), preserve_host: bool = True,
                 pool_timeout_s: float = 10, body_timeout_s: float = 30, keepalive_s: float = 4) -> None:
        split = urlsplit(url)
        base = f"{split.netloc}{split.path.rstrip('/')}"
        self._http_base = f"{split.scheme}://{base}"
        self._ws_base = f"{'wss' if split.scheme == 'https' else 'ws'}://{base}"
        self._base_path = split.path.rstrip("/").encode("latin-1")
        netloc = split.netloc.rpartition("@")[2]
        self._host_header = netloc.encode("idna") if not netloc.isascii() else netloc.encode("ascii")
        self._host = split.hostname or "127.0.0.1"
        self._port = split.port or (443 if split.scheme == "https" else 80)
        self._tls = split.scheme == "https"
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._pool_timeout_s = pool_timeout_s
        self._body_timeout_s = body_timeout_s
        self._keepalive_s = keepalive_s
        self._retry_after = str(max(1, round(pool_timeout_s)))
        self._trusted = TrustedProxies(trusted_proxies)
        self._preserve_host = preserve_host
        self.health = UpstreamHealth(netloc)  # the address only: credentials in the URL stay out of logs
        self._session: aiohttp.ClientSession | None = None
        self._pool: _Pool | None = None

    def _client(self) -> aiohttp.ClientSession:
        """aiohttp, for WebSockets only."""
        import aiohttp

        if self._session is None or self._session.closed:  # created lazily, in the serving loop
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._timeout_s, sock_read=self._timeout_s)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        return self._session

    def _connections(self) -> _Pool:
        if self._pool is None:  # created lazily, in the serving loop
            context = ssl.create_default_context() if self._tls else None
            self._pool = _Pool(self._host, self._port, context, self._host if self._tls else None,
                               self._max_connections, self._timeout_s, self._pool_timeout_s, self._keepalive_s)
        return self._pool

    async def ready_problem(self) -> tuple[str, str] | None:
        """readyz's upstream check (``upstream.check_ready``): a fresh connection (TCP, and TLS for
        https) within ``min(timeout_s, 5 s)``. None when it opens, else the (code, sentence) readyz
        answers 503 with. The sentence names the cause, never the upstream's address (readyz is
        public); the log line (``health``) has the address."""
        loop = asyncio.get_running_loop()
        pool = self._connections()  # its TLS context: loading the CA store once, not per probe
        try:
            async with asyncio.timeout(min(self._timeout_s, _PROBE_TIMEOUT_S)):
                transport, _ = await loop.create_connection(
                    asyncio.Protocol, pool.host, pool.port, ssl=pool.ssl, server_hostname=pool.server_hostname)
        except (OSError, TimeoutError) as exc:
            cause = os_error_cause(exc)
            self.health.failed(cause, exc)
            return "upstream_unavailable", f"The upstream service cannot be reached: {CAUSES[cause]}."
        transport.close()
        self.health.answered()
        return None

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            watch = _DisconnectWatch(receive)
            try:
                await self._http(scope, receive, send, watch)
            except asyncio.CancelledError:
                if not watch.gone or watch.task is None:
                    raise
                watch.task.uncancel()  # the client left: nobody to answer, the upstream read is dropped
            finally:
                watch.stop()
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"UpstreamProxy does not handle {scope['type']!r} scopes")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """The pool is created lazily; shutdown closes it."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _target(self, scope: Scope, base: str) -> URL:
        from yarl import URL

        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        target = base + raw_path.partition(b"?")[0].decode("latin-1")
        return URL(target + "?" + query.decode("latin-1") if query else target, encoded=True)

    def _forward_headers(self, scope: Scope) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The client's headers as the upstream gets them, and the client's Host (b"" if none).

        The fixed hop-by-hop set, Expect and Content-Length dropped (``_REQUEST_DROP``: never the
        names the client's Connection header lists; the edge applied those to the client's own
        headers before the gateway added its identity); Host kept only with ``preserve_host``;
        ``X-Forwarded-*`` (and Forwarded, X-Real-IP) believed only from a trusted peer, then ours
        added. No header is invented: Host (the upstream's) and the body framing are the client's
        job (``_request_head``) or aiohttp's."""
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = _REQUEST_DROP
        peer = scope["client"][0] if scope.get("client") else None
        trusted = peer in self._trusted
        websocket = scope["type"] == "websocket"
        headers: list[tuple[bytes, bytes]] = []
        forwarded: dict[bytes, bytes] = {}
        host = b""
        for item in raw:
            name = item[0]
            if name in drop or (websocket and name.startswith(b"sec-websocket-")):
                continue
            if name == b"host":
                host = item[1]
                if not self._preserve_host:
                    continue
            elif name.startswith(_FORWARDING):
                if trusted and name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                    seen = forwarded.get(name)
                    forwarded[name] = (seen + b", " + item[1] if seen and name == b"x-forwarded-for"
                                       else seen or item[1])
                    continue
                if not trusted or name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                    continue
            headers.append(item)
        chain = b", ".join(filter(None, (forwarded.get(b"x-forwarded-for"), peer.encode("latin-1") if peer else b"")))
        if chain:
            headers.append((b"x-forwarded-for", chain))
        scheme: str = scope.get("scheme", "http")
        proto = forwarded.get(b"x-forwarded-proto") or (b"https" if scheme in ("https", "wss") else b"http")
        headers.append((b"x-forwarded-proto", proto))
        forwarded_host = forwarded.get(b"x-forwarded-host") or host
        if forwarded_host:
            headers.append((b"x-forwarded-host", forwarded_host))
        return headers, host

    def _request_headers(self, scope: Scope) -> list[tuple[str, str]]:
        """``_forward_headers`` as text, for aiohttp (WebSockets)."""
        return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in self._forward_headers(scope)[0]]

    def _request_head(self, scope: Scope, body: bytes, streaming: bool) -> tuple[bytes, int | None]:
        """The request line and headers, ready to write; and the length a streamed body must have
        (None: it goes chunked).

        The body's framing is ours, never copied from the client (a server that de-chunked the body
        may leave the client's Content-Length in the scope: forwarded beside the body, it let the
        upstream read a smuggled second request). A body read whole gets its length (POST/PUT/PATCH
        an explicit 0); a streamed one keeps the client's Content-Length when it is one plain number
        and no Transfer-Encoding came with it (WSGI upstreams prefer it; ``_send_body`` then writes
        exactly that many bytes or cuts the connection), else goes chunked."""
        headers, _ = self._forward_headers(scope)
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        target = self._base_path + raw_path.partition(b"?")[0] + (b"?" + query if query else b"")
        parts = [scope["method"].encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        if not self._preserve_host or not any(name == b"host" for name, _ in headers):
            parts += [b"host: ", self._host_header, b"\r\n"]
        for name, value in headers:
            parts += [name, b": ", value, b"\r\n"]
        declared: int | None = None
        if streaming:
            declared = _declared_length(scope["headers"])
            if declared is None:
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                parts += [b"content-length: ", b"%d" % declared, b"\r\n"]
        elif body or scope["method"] in ("POST", "PUT", "PATCH"):
            parts += [b"content-length: ", b"%d" % len(body), b"\r\n"]
        parts.append(b"\r\n")
        return b"".join(parts), declared

    async def _send_body(self, connection: _Connection, message: Message, receive: Receive,
                         declared: int | None, watch: _DisconnectWatch) -> None:
        """Stream the rest of the request body (the first message is ``message``) to the upstream:
        chunked, or exactly ``declared`` bytes (a body that would go past it, or ends short, raises
        ``_BadLength`` before a byte too many is written: the caller cuts the upstream connection,
        so the upstream never takes the cut body as a request). The client silent
        ``body_timeout_s`` between two parts: ``_SlowBody``."""
        left = declared
        while True:
            if message["type"] == "http.disconnect":
                raise ConnectionAbortedError("the client left before sending its whole request body")
            chunk: bytes = message.get("body", b"")
            if chunk:
                if left is None:
                    connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    left -= len(chunk)
                    if left < 0:
                        raise _BadLength()
                    connection.write(chunk)
                await connection.drain(self._timeout_s)
            if not message.get("more_body"):
                break
            try:
                async with asyncio.timeout(self._body_timeout_s):
                    message = await receive()
            except TimeoutError:
                raise _SlowBody() from None
        if left is None:
            connection.write(b"0\r\n\r\n")
        elif left:
            raise _BadLength()
        watch.arm(body_read=True)

    async def _exchange(self, scope: Scope, receive: Receive, message: Message,
                        watch: _DisconnectWatch) -> _Connection:
        """Send the request; returns the connection once the response headers are in (or raises)."""
        pool = self._connections()
        streaming = bool(message.get("more_body"))
        body: bytes = b"" if streaming else message.get("body", b"")
        head, declared = self._request_head(scope, body, streaming)
        method: str = scope["method"]
        fresh = False
        while True:
            connection, reused = await pool.acquire(fresh=fresh)
            try:
                connection.start(head=method == "HEAD")
                if streaming:
                    connection.write(head)
                    await self._send_body(connection, message, receive, declared, watch)
                else:
                    connection.write(head + body if body else head)
                    watch.arm(body_read=True)
                pool.watch(connection)
                while not connection.headers_done and connection.error is None:
                    await connection.wait()
                if connection.error is not None:
                    raise connection.error
                return connection
            except UpstreamFailed as exc:
                pool.release(connection)
                # A kept-alive connection the upstream closed meanwhile: once more on a new one, when
                # nothing of an answer came and either nothing of the request was written (it cannot
                # have been processed: any method) or it is idempotent and still in hand (RFC 9110
                # 9.2.2). A POST that was written may have been processed: never sent twice.
                if (reused and not connection.received and not isinstance(exc, UpstreamInvalid)
                        and (not connection.wrote or (not streaming and method in _REPLAYABLE))):
                    fresh = True
                    continue
                raise
            except BaseException:
                pool.release(connection)
                raise

    async def _http(self, scope: Scope, receive: Receive, send: Send, watch: _DisconnectWatch) -> None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        headers: dict[str, str] | None = None
        try:
            connection = await self._exchange(scope, receive, message, watch)
        except TimeoutError as exc:
            self.health.failed("timeout", exc)
            status, code, text = 504, "upstream_timeout", _TIMEOUT
        except ConnectionAbortedError:
            return  # the client left mid-upload: nobody to answer; the upstream connection is closed
        except UpstreamInvalid as exc:
            self.health.failed("invalid", exc)
            status, code, text = 502, "upstream_invalid", _INVALID
        except (UpstreamFailed, OSError) as exc:
            self.health.failed("reset" if isinstance(exc, UpstreamFailed) else os_error_cause(exc), exc)
            status, code, text = 502, "upstream_unavailable", _UNAVAILABLE
        except UpstreamBusy:
            status, code, text = 503, "upstream_busy", _BUSY
            headers = {"retry-after": self._retry_after}
        except (_SlowBody, _BadLength) as exc:
            # The rest of the client's body is unread: that connection is not reused either.
            headers = {"connection": "close"}
            if isinstance(exc, _SlowBody):
                status, code, text = 408, "request_timeout", _SLOW_BODY
            else:
                status, code, text = 400, "body_length_mismatch", _BAD_LENGTH
        else:
            if self.health.down:  # one attribute read per request while all is well
                self.health.answered()
            try:
                return await self._stream(connection, send, watch)
            finally:
                self._connections().release(connection)
        watch.finished = True
        await error_response(scope, status, code, text, headers=headers)(scope, receive, send)

    @staticmethod
    async def _stream(connection: _Connection, send: Send, watch: _DisconnectWatch) -> None:
        raw = connection.headers
        drop = _hop_by_hop(raw)
        headers = [item for item in raw if item[0] not in drop]
        await send({"type": "http.response.start", "status": connection.status, "headers": headers})
        if connection.complete:  # the usual small answer: all of it is here already
            watch.finished = True
            await send({"type": "http.response.body", "body": connection.take() if connection.chunks else b""})
            return
        watch.arm(streaming=True)
        while True:
            if connection.chunks:
                await send({"type": "http.response.body", "body": connection.take(), "more_body": True})
                continue
            if connection.error is not None:
                return  # leave the response incomplete: the server aborts it, the client sees the cut
            if connection.complete:
                break
            await connection.wait()
        watch.finished = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        import aiohttp

        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await self._client().ws_connect(
                self._target(scope, self._ws_base), headers=self._request_headers(scope),
                protocols=scope.get("subprotocols") or (), max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            self.health.answered()  # it answered: refusing is the app's decision (check_origin...)
            status = exc.status if 400 <= exc.status < 600 else 502
            return await self._refuse(scope, receive, send, status, "upstream_refused", _REFUSED)
        except TimeoutError as exc:
            self.health.failed("timeout", exc)
            return await self._refuse(scope, receive, send, 504, "upstream_timeout", _TIMEOUT)
        except aiohttp.ClientError as exc:
            cause = (os_error_cause(exc) if isinstance(exc, OSError)
                     else "reset" if isinstance(exc, aiohttp.ServerDisconnectedError) else "invalid")
            self.health.failed(cause, exc)
            return await self._refuse(scope, receive, send, 502, "upstream_unavailable", _UNAVAILABLE)
        self.health.answered()
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            to_upstream = asyncio.create_task(self._to_upstream(receive, upstream))
            try:
                if not await self._to_client(upstream, send):
                    to_upstream.cancel()  # the upstream ended: the client has been sent its close
                await asyncio.gather(to_upstream, return_exceptions=True)  # else: finishing the close
            finally:
                to_upstream.cancel()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str) -> None:
        if "websocket.http.response" in scope.get("extensions", {}):
            await error_response(scope, status, code, message)(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1011})  # before accept: the server answers 403

    @staticmethod
    async def _to_upstream(receive: Receive, upstream: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(code=_close_code(message.get("code", 1000)),
                                     message=(message.get("reason") or "").encode())
                return
            if message.get("text") is not None:
                await upstream.send_str(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send_bytes(message["bytes"])

    @staticmethod
    async def _to_client(upstream: aiohttp.ClientWebSocketResponse, send: Send) -> bool:
        """Upstream → client until the upstream ends (False) or the client closed first (True)."""
        import aiohttp

        while True:
            message = await upstream.receive()
            if message.type is aiohttp.WSMsgType.TEXT:
                await send({"type": "websocket.send", "text": message.data})
            elif message.type is aiohttp.WSMsgType.BINARY:
                await send({"type": "websocket.send", "bytes": message.data})
            elif message.type is aiohttp.WSMsgType.CLOSING:
                return True  # the client closed first; _to_upstream is finishing the close handshake
            else:  # CLOSE from the upstream, or the connection broke (CLOSED / ERROR)
                closed = message.type is aiohttp.WSMsgType.CLOSE
                await send({"type": "websocket.close", "code": _close_code(message.data if closed else 1011),
                            "reason": (message.extra or "") if closed else ""})
                return False
