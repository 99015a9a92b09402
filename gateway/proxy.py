"""The sidecar's data plane: a streaming reverse proxy (HTTP and WebSocket) to one upstream.

``UpstreamProxy`` is the auth middleware's inner ASGI app. It forwards the request as it is (method,
raw path and query untouched, bodies streamed both ways, never buffered), drops hop-by-hop headers
and sets ``X-Forwarded-*`` (a client's own are believed only from a trusted proxy). Upstream
unreachable or reset: 502 ``upstream_unavailable``; silent for ``timeout_s`` (connect, or between
reads once the request body is sent): 504 ``upstream_timeout``. A failure after the response has
started leaves it incomplete, so the server cuts the connection and the client sees a truncated
response, never a complete-looking one. A client that leaves stops the upstream read and frees the
pooled connection.

Why aiohttp, not httpx (uvicorn serving everything on loopback, 2 cores, three 10 s runs each)::

    python bench/proxy_client.py upstream --port 9101 &
    python bench/proxy_client.py proxy --client httpx   --port 9102 &  # minimal proxy on httpx
    python bench/proxy_client.py proxy --client aiohttp --port 9103 &  # minimal proxy on aiohttp
    PYTHONPATH=. python bench/proxy_client.py proxy --client gateway --port 9104 &  # this module
    wrk -t2 -c32 -d10s http://127.0.0.1:PORT/
    # httpx 470-805 req/s (mean latency 44-76 ms); aiohttp 4,550-8,200 (4-7 ms);
    # UpstreamProxy 3,400-6,600 (5-10 ms); the upstream alone (9101) 30,800-35,800.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable, Sequence
from urllib.parse import quote, urlsplit

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from gateway.pages import error_response

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
                        b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# Headers about the path to us: believed only from a trusted proxy, otherwise replaced by our own.
_FORWARDING = (b"x-forwarded-", b"forwarded", b"x-real-ip")
_UNAVAILABLE = "The upstream service is unavailable right now. Please try again in a moment."
_TIMEOUT = "The upstream service did not answer in time. Please try again in a moment."
_REFUSED = "The upstream service refused the WebSocket connection."
_UNSENDABLE_CLOSE = {1005: 1000, 1006: 1001, 1015: 1011}  # codes that never travel in a close frame


def _hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """The fixed hop-by-hop names plus every name the Connection header lists."""
    listed = [token.strip().lower() for name, value in headers if name.lower() == b"connection"
              for token in value.split(b",")]
    return HOP_BY_HOP.union(listed) if listed else HOP_BY_HOP


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


class UpstreamProxy:
    def __init__(self, *, url: str, timeout_s: float = 30, max_connections: int = 100,
                 trusted_proxies: Sequence[str] = (), preserve_host: bool = False) -> None:
        split = urlsplit(url)
        base = f"{split.netloc}{split.path.rstrip('/')}"
        self._http_base = f"{split.scheme}://{base}"
        self._ws_base = f"{'wss' if split.scheme == 'https' else 'ws'}://{base}"
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._max_connections = max_connections
        self._trusted = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in trusted_proxies)
        self._preserve_host = preserve_host
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:  # created lazily, in the serving loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                timeout=self._timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        return self._session

    async def aclose(self) -> None:
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
        raw_path: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        query: bytes = scope.get("query_string", b"")
        target = base + raw_path.partition(b"?")[0].decode("latin-1")
        return URL(target + "?" + query.decode("latin-1") if query else target, encoded=True)

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._trusted)

    def _request_headers(self, scope: Scope) -> list[tuple[str, str]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = _hop_by_hop(raw) | {b"expect"}  # the server already answered any 100-continue
        peer = scope["client"][0] if scope.get("client") else None
        trusted = bool(self._trusted) and peer is not None and self._is_trusted(peer)
        websocket = scope["type"] == "websocket"
        headers: list[tuple[str, str]] = []
        forwarded: dict[bytes, str] = {}
        host = ""
        for name, value in raw:
            if name in drop or (websocket and name.startswith(b"sec-websocket-")):
                continue
            text = value.decode("latin-1")
            if name == b"host":
                host = text
                if not self._preserve_host:
                    continue
            elif name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
                if trusted:
                    seen = forwarded.get(name)
                    forwarded[name] = f"{seen}, {text}" if seen and name == b"x-forwarded-for" else seen or text
                continue
            elif not trusted and name.startswith(_FORWARDING):
                continue
            headers.append((name.decode("latin-1"), text))
        chain = ", ".join(filter(None, (forwarded.get(b"x-forwarded-for"), peer)))
        if chain:
            headers.append(("x-forwarded-for", chain))
        scheme: str = scope.get("scheme", "http")
        scheme = {"ws": "http", "wss": "https"}.get(scheme, scheme)
        headers.append(("x-forwarded-proto", forwarded.get(b"x-forwarded-proto") or scheme))
        if forwarded.get(b"x-forwarded-host") or host:
            headers.append(("x-forwarded-host", forwarded.get(b"x-forwarded-host") or host))
        return headers

    async def _body(self, message: Message, receive: Receive, watch: _DisconnectWatch) -> AsyncIterator[bytes]:
        while True:
            if message["type"] == "http.disconnect":
                raise ConnectionAbortedError("the client left before sending its whole request body")
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                break
            message = await receive()
        watch.arm(body_read=True)

    async def _http(self, scope: Scope, receive: Receive, send: Send, watch: _DisconnectWatch) -> None:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        data: bytes | AsyncIterator[bytes] | None
        if message.get("more_body"):
            data = self._body(message, receive, watch)
        else:
            data = message.get("body") or None
            watch.arm(body_read=True)
        try:
            response = await self._client().request(
                scope["method"], self._target(scope, self._http_base),
                headers=self._request_headers(scope), data=data, allow_redirects=False)
        except TimeoutError:
            status, code, text = 504, "upstream_timeout", _TIMEOUT
        except aiohttp.ClientError:
            status, code, text = 502, "upstream_unavailable", _UNAVAILABLE
        else:
            return await self._stream(response, send, watch)
        watch.finished = True
        await error_response(scope, status, code, text)(scope, receive, send)

    @staticmethod
    async def _stream(response: aiohttp.ClientResponse, send: Send, watch: _DisconnectWatch) -> None:
        try:
            drop = _hop_by_hop(response.raw_headers)
            headers = [(name.lower(), value) for name, value in response.raw_headers if name.lower() not in drop]
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            if not response.content.is_eof():
                watch.arm(streaming=True)
            try:
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (aiohttp.ClientError, TimeoutError):
                return  # leave the response incomplete: the server aborts it, the client sees the cut
            watch.finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            response.release()  # back to the pool when fully read, closed otherwise

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        try:
            upstream = await self._client().ws_connect(
                self._target(scope, self._ws_base), headers=self._request_headers(scope),
                protocols=scope.get("subprotocols") or (), max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            status = exc.status if 400 <= exc.status < 600 else 502
            return await self._refuse(scope, receive, send, status, "upstream_refused", _REFUSED)
        except TimeoutError:
            return await self._refuse(scope, receive, send, 504, "upstream_timeout", _TIMEOUT)
        except aiohttp.ClientError:
            return await self._refuse(scope, receive, send, 502, "upstream_unavailable", _UNAVAILABLE)
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
