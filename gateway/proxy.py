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

HTTP goes over a small HTTP/1.1 client of its own (``Connection``, ``Pool``): keep-alive
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
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from starlette.types import Message, Receive, Scope, Send

if TYPE_CHECKING:  # aiohttp serves WebSockets only: imported on the first one (start-up time)
    import aiohttp
    from yarl import URL

from gateway.edge import TrustedProxies
from gateway.http1 import (
    HOP_BY_HOP,
    Connection,
    DisconnectWatch,
    Pool,
    UpstreamBusy,
    UpstreamFailed,
    UpstreamInvalid,
    declared_length,
    exchange,
    hop_by_hop,
    send_body,
)
from gateway.pages import error_response
from gateway.upstream_health import CAUSES, UpstreamHealth, os_error_cause

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



def _close_code(code: object) -> int:
    if not isinstance(code, int) or not 1000 <= code < 5000:
        return 1011
    return _UNSENDABLE_CLOSE.get(code, code)


class _SlowBody(Exception):
    """The client was silent ``body_timeout_s`` in the middle of its request body (408)."""


class _BadLength(Exception):
    """The client's body does not match the Content-Length it declared (400)."""




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
        self._pool: Pool | None = None

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

    def _connections(self) -> Pool:
        if self._pool is None:  # created lazily, in the serving loop
            context = ssl.create_default_context() if self._tls else None
            self._pool = Pool(self._host, self._port, context, self._host if self._tls else None,
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
            watch = DisconnectWatch(receive)
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
            declared = declared_length(scope["headers"])
            if declared is None:
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                parts += [b"content-length: ", b"%d" % declared, b"\r\n"]
        elif body or scope["method"] in ("POST", "PUT", "PATCH"):
            parts += [b"content-length: ", b"%d" % len(body), b"\r\n"]
        parts.append(b"\r\n")
        return b"".join(parts), declared

    async def _send_body(self, connection: Connection, message: Message, receive: Receive,
                         declared: int | None, watch: DisconnectWatch) -> None:
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
        watch.body_sent()

    async def _exchange(self, scope: Scope, receive: Receive, message: Message,
                        watch: DisconnectWatch) -> Connection:
        """Send the request; returns the connection once the response headers are in (or raises)."""
        pool = self._connections()
        streaming = bool(message.get("more_body"))
        body: bytes = b"" if streaming else message.get("body", b"")
        head, declared = self._request_head(scope, body, streaming)
        if streaming:
            async def stream(connection: Connection) -> None:
                await self._send_body(connection, message, receive, declared, watch)

            return await exchange(pool, head, method=scope["method"], stream=stream)
        return await exchange(pool, head, method=scope["method"], body=body, sent=watch.body_sent)

    async def _http(self, scope: Scope, receive: Receive, send: Send, watch: DisconnectWatch) -> None:
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
    async def _stream(connection: Connection, send: Send, watch: DisconnectWatch) -> None:
        raw = connection.headers
        drop = hop_by_hop(raw)
        headers = [item for item in raw if item[0] not in drop]
        await send({"type": "http.response.start", "status": connection.status, "headers": headers})
        await send_body(connection, send, watch)

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
