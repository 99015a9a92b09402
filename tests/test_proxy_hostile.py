"""The sidecar's data plane against a hostile upstream (issue 10, findings 4, 5, 6, 12, 16).

Each case scripts a raw ``asyncio.start_server`` upstream byte for byte and records what it
received (every request, as parsed by a strict little reader, and every connection). The proxy runs
under uvicorn on a real loopback socket, alone or behind ``AuthGateway`` (public paths, no login);
a few cases call ``UpstreamProxy`` directly as an ASGI app with a hand-made scope. Every test
asserts both what the upstream received and what the client received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.proxy import UpstreamProxy
from tests.conftest import ConfigFactory

Item = bytes | float | None  # bytes: written (one segment); float: a pause; None: close the connection
Script = Callable[[int, int, "Received"], list[Item]]  # (connection no., request no. on it, request) → what to do


@dataclass
class Received:
    head: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def method(self) -> bytes:
        return self.head.split(b" ", 1)[0]

    @property
    def target(self) -> bytes:
        return self.head.split(b" ", 2)[1]

    def values(self, name: bytes) -> list[bytes]:
        return [value for key, value in self.headers if key == name]


@dataclass
class Upstream:
    url: str
    requests: list[Received] = field(default_factory=list)
    connections: int = 0
    incomplete: list[bytes] = field(default_factory=list)  # bytes of requests cut before their end
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # some connection ended


async def _read_request(reader: asyncio.StreamReader, upstream: Upstream) -> Received | None:
    """One request, framed strictly (Content-Length or chunked, never both); None at a clean EOF."""
    head = b""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        headers = [(name.strip().lower(), value.strip())
                   for name, _, value in (line.partition(b":") for line in lines[1:])]
        received = Received(lines[0], headers, b"")
        lengths, codings = received.values(b"content-length"), received.values(b"transfer-encoding")
        assert not (lengths and codings), f"the upstream got both framings: {head!r}"
        if codings:
            body = b""
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                body += (await reader.readexactly(size + 2))[:-2]
                if size == 0:
                    break
            received.body = body
        elif lengths:
            received.body = await reader.readexactly(int(lengths[0]))
        return received
    except asyncio.IncompleteReadError as exc:
        if head or exc.partial:
            upstream.incomplete.append(head + exc.partial)
        return None
    except (ConnectionError, ValueError):
        upstream.incomplete.append(head)
        return None


@contextlib.asynccontextmanager
async def scripted_upstream(script: Script) -> AsyncIterator[Upstream]:
    upstream = Upstream("")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream.connections += 1
        number, count = upstream.connections, 0
        try:
            while (request := await _read_request(reader, upstream)) is not None:
                upstream.requests.append(request)
                count += 1
                for item in script(number, count, request):
                    if item is None:
                        return
                    if isinstance(item, float):
                        await asyncio.sleep(item)
                    else:
                        writer.write(item)
                        await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            upstream.closed.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    upstream.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield upstream
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


def answer(*items: Item) -> Script:
    """The same answer to every request."""
    return lambda number, count, request: list(items)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
FORGED = b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\r\nSet-Cookie: x=y\r\nContent-Length: 0\r\n\r\n"


@contextlib.asynccontextmanager
async def serve(app: Any, http: str = "httptools") -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="critical", lifespan="off", http=http, proxy_headers=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


Starter = Callable[..., contextlib.AbstractAsyncContextManager[str]]


@pytest.fixture(params=["proxy", "sidecar"])
def start(request: pytest.FixtureRequest, make_config: ConfigFactory) -> Starter:
    """``async with start(upstream_url, http=..., **proxy_options) as url``: the proxy under uvicorn,
    alone ("proxy") or as the sidecar runs it, behind AuthGateway ("sidecar", paths under /public/)."""

    @contextlib.asynccontextmanager
    async def run(upstream_url: str, http: str = "httptools", **options: Any) -> AsyncIterator[str]:
        proxy = UpstreamProxy(url=upstream_url, timeout_s=3, **options)
        app: Any = proxy
        if request.param == "sidecar":
            from gateway.middleware import AuthGateway

            app = AuthGateway(proxy, make_config(access={"public_paths": ["/public/*"]}))
        try:
            async with serve(app, http) as url:
                yield url
        finally:
            await (app.aclose() if request.param == "sidecar" else proxy.aclose())

    return run


async def raw_exchange(url: str, data: bytes, *, wait: float = 1.0) -> bytes:
    """Write ``data`` on one connection; everything the gateway answers until it closes or ``wait`` s pass."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    received = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(wait):
            while chunk := await reader.read(65536):
                received += chunk
    writer.close()
    return received


# --- finding 5: bytes after a complete response ---------------------------------------------------
# Chosen: bytes after the answer in the same segment make it a 502 upstream_invalid (the upstream's
# framing disagrees with ours, so neither message can be trusted); arriving later, they close the
# connection. Either way the connection is never reused.

@pytest.mark.parametrize(("method", "first"), [
    ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
    ("GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
], ids=["after-204", "after-HEAD", "after-content-length", "after-chunked"])
async def test_extra_response_in_the_same_segment_is_refused(start: Starter, method: str, first: bytes) -> None:
    async with scripted_upstream(answer(first + FORGED)) as upstream, start(upstream.url) as url, \
            httpx.AsyncClient(timeout=5) as client:
        response = await client.request(method, url + "/public/x")
        assert response.status_code == 502
        assert "location" not in response.headers and "set-cookie" not in response.headers
        if method != "HEAD":
            assert response.json()["error"] == "upstream_invalid"
        await asyncio.wait_for(upstream.closed.wait(), 3)  # the proxy closed that connection
        assert [r.method for r in upstream.requests] == [method.encode()]


async def test_late_bytes_after_a_complete_response_close_the_connection(start: Starter) -> None:
    def script(number: int, count: int, request: Received) -> list[Item]:
        if number == 1:
            return [OK, 0.2, FORGED]
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"]

    async with scripted_upstream(script) as upstream, start(upstream.url, max_connections=1) as url, \
            httpx.AsyncClient(timeout=5) as client:
        first = await client.get(url + "/public/1")
        assert (first.status_code, first.content) == (200, b"ok")
        await asyncio.wait_for(upstream.closed.wait(), 3)  # the late 302 made the proxy close it
        second = await client.get(url + "/public/2")
        assert (second.status_code, second.content) == (200, b"second") and "location" not in second.headers
        assert upstream.connections == 2 and [r.target for r in upstream.requests] == [b"/public/1", b"/public/2"]


@pytest.mark.parametrize(("method", "first"), [
    ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"),
    ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 6\r\n\r\n"),
    ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
], ids=["HEAD", "204", "304"])
async def test_no_reuse_after_an_answer_that_announced_a_body_it_must_not_have(
    start: Starter, method: str, first: bytes
) -> None:
    """The late "body" of a HEAD/204/304 answer must never become the next client's response: the
    upstream sends it only once the next request has arrived on the same connection (pool of 1)."""
    def script(number: int, count: int, request: Received) -> list[Item]:
        if (number, count) == (1, 1):
            return [first]
        if number == 1:  # the connection was reused: the late body first, then the real answer
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged", 0.05, OK]
        return [OK]

    async with scripted_upstream(script) as upstream, start(upstream.url, max_connections=1) as url, \
            httpx.AsyncClient(timeout=5) as client:
        response = await client.request(method, url + "/public/first")
        assert response.status_code == int(first[9:12]) and response.content == b""
        nxt = await client.get(url + "/public/next")
        assert (nxt.status_code, nxt.content) == (200, b"ok")
        assert upstream.connections == 2  # the second request went on a new connection
        assert [r.target for r in upstream.requests] == [b"/public/first", b"/public/next"]


async def test_reuse_after_a_clean_head_and_204(start: Starter) -> None:
    """Strictness costs nothing in the usual case: bodiless answers that announce no body keep the connection."""
    def script(number: int, count: int, request: Received) -> list[Item]:
        return [b"HTTP/1.1 204 No Content\r\n\r\n" if request.method == b"GET" else
                b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"]

    async with scripted_upstream(script) as upstream, start(upstream.url, max_connections=1) as url, \
            httpx.AsyncClient(timeout=5) as client:
        assert (await client.head(url + "/public/a")).status_code == 200
        assert (await client.get(url + "/public/b")).status_code == 204
        assert (await client.get(url + "/public/c")).status_code == 204
        assert upstream.connections == 1 and len(upstream.requests) == 3


# --- findings 5 and 12: duplicate, conflicting or unsupported framing -------------------------------

@pytest.mark.parametrize("headers", [
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
    b"Content-Length: 2\r\nContent-Length: 3\r\n",
    b"Content-Length: 2\r\nContent-Length: 2\r\n",
    b"Content-Length: 2, 2\r\n",
    b"Content-Length: abc\r\n",
    b"Content-Length: -2\r\n",
    b"Content-Length: +2\r\n",
    b"Transfer-Encoding: chunked, identity\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
], ids=["CL+TE", "TE+CL", "two-CL", "same-CL-twice", "CL-list", "CL-abc", "CL-negative", "CL-plus",
        "chunked-identity", "gzip-chunked", "two-TE", "TE-identity"])
async def test_conflicting_or_unsupported_framing_is_refused(start: Starter, headers: bytes) -> None:
    body = b"2\r\nhi\r\n0\r\n\r\n" if b"chunked" in headers else b"hi"
    response_bytes = b"HTTP/1.1 200 OK\r\n" + headers + b"\r\n" + body
    async with scripted_upstream(answer(response_bytes, 0.5, None)) as upstream, start(upstream.url) as url, \
            httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url + "/public/x")
        assert response.status_code == 502 and response.json()["error"] == "upstream_invalid"
        assert b"hi" not in response.content
        assert len(upstream.requests) == 1


# --- finding 12: 1xx -----------------------------------------------------------------------------

@pytest.mark.parametrize("switch", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
], ids=["with-upgrade", "bare"])
async def test_101_without_an_upgrade_is_a_clean_502(
    start: Starter, switch: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async with scripted_upstream(answer(switch + b"\x00raw bytes")) as upstream, start(upstream.url) as url, \
            httpx.AsyncClient(timeout=5) as client:
        with caplog.at_level(logging.DEBUG):
            response = await client.get(url + "/public/x")
            assert response.status_code == 502 and response.json()["error"] == "upstream_invalid"
            await asyncio.wait_for(upstream.closed.wait(), 3)
            assert (await client.get(url + "/public/y")).status_code == 502  # still answering, still clean
        assert len(upstream.requests) == 2 and upstream.connections == 2
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage() or r.exc_info]


async def test_100_continue_and_103_early_hints_before_the_answer(start: Starter) -> None:
    interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
    real = b"HTTP/1.1 201 Created\r\nX-Real: yes\r\nContent-Length: 4\r\n\r\ndone"
    async with scripted_upstream(answer(interim, 0.05, real)) as upstream, \
            start(upstream.url, max_connections=1) as url, httpx.AsyncClient(timeout=5) as client:
        first = await client.post(url + "/public/x", content=b"data")
        second = await client.post(url + "/public/y", content=b"more")
        for response in (first, second):
            assert (response.status_code, response.content) == (201, b"done")
            assert response.headers["x-real"] == "yes" and "link" not in response.headers
        assert [r.body for r in upstream.requests] == [b"data", b"more"] and upstream.connections == 1


# --- finding 6: bounded waits --------------------------------------------------------------------

async def test_slow_upload_gets_408_and_others_503_meanwhile(start: Starter) -> None:
    async with scripted_upstream(answer(OK)) as upstream, \
            start(upstream.url, max_connections=1, pool_timeout_s=0.3, body_timeout_s=1.5) as url:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /public/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()  # ... and the rest never comes
        await asyncio.sleep(0.3)  # the slow upload holds the only connection
        slow = asyncio.create_task(reader.read(65536))
        async with httpx.AsyncClient(timeout=10) as client:
            busy = await client.get(url + "/public/other")
            assert not slow.done()  # answered before the slow upload's fate was decided
            assert busy.status_code == 503 and busy.json()["error"] == "upstream_busy"
            assert int(busy.headers["retry-after"]) >= 1
            answer_408 = await asyncio.wait_for(slow, 10)
            assert answer_408.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer_408
            await asyncio.wait_for(upstream.closed.wait(), 3)  # the cut upload's connection was closed
            after = await client.get(url + "/public/after")  # the slot is free again
            assert (after.status_code, after.content) == (200, b"ok")
        writer.close()
        assert upstream.incomplete and upstream.incomplete[0].endswith(b"abc")
        assert [r.target for r in upstream.requests] == [b"/public/after"]


# --- finding 4: the request's framing is the proxy's ---------------------------------------------

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: x\r\nx-auth-user: admin\r\n\r\n"


@pytest.mark.parametrize("http", ["h11", "httptools"])
async def test_client_content_length_beside_chunked_never_smuggles(start: Starter, http: str) -> None:
    body = b"abcd" + SMUGGLED
    request = (b"POST /public/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    async with scripted_upstream(answer(OK)) as upstream, start(upstream.url, http=http) as url:
        received = await raw_exchange(url, request)
        await asyncio.sleep(0.2)
    # The server may refuse the request (400: httptools, or the edge); if it went through, the upstream
    # got exactly one request with our framing and the whole body.
    assert received.count(b"HTTP/1.1 ") == 1 and b"/admin" not in received
    assert all(r.target != b"/admin" for r in upstream.requests) and len(upstream.requests) <= 1
    if upstream.requests:
        (got,) = upstream.requests
        assert got.body == body and received.startswith(b"HTTP/1.1 200")
        assert got.values(b"content-length") in ([str(len(body)).encode()], [])
    else:
        assert received.startswith(b"HTTP/1.1 400")


def asgi_call(messages: list[dict[str, Any]]) -> tuple[Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]],
                                                       list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client is still there

    async def send(message: Any) -> None:
        sent.append(message)

    return receive, send, sent


def http_scope(headers: list[tuple[bytes, bytes]], method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/public/x", "raw_path": b"/public/x", "query_string": b"",
            "headers": [(b"host", b"gw.example"), *headers], "client": ("127.0.0.1", 5555),
            "scheme": "http", "http_version": "1.1"}


@pytest.mark.parametrize(("messages", "framing"), [
    ([{"type": "http.request", "body": b"0123456789"}], b"content-length: 10"),
    ([{"type": "http.request", "body": b"01234", "more_body": True},
      {"type": "http.request", "body": b"56789"}], b"transfer-encoding: chunked"),
], ids=["whole", "streamed"])
async def test_proxy_frames_the_body_itself_whatever_the_scope_says(
    messages: list[dict[str, Any]], framing: bytes
) -> None:
    """A stale Content-Length (and Transfer-Encoding) in the scope, as an ASGI server that de-chunked
    the body leaves it: the upstream gets one request, framed by the proxy, with the whole body."""
    async with scripted_upstream(answer(OK)) as upstream:
        proxy = UpstreamProxy(url=upstream.url, timeout_s=3)
        receive, send, sent = asgi_call(messages)
        scope = http_scope([(b"content-length", b"4"), (b"transfer-encoding", b"chunked")])
        try:
            await asyncio.wait_for(proxy(scope, receive, send), 5)
        finally:
            await proxy.aclose()
        await asyncio.sleep(0.1)
    assert sent[0]["status"] == 200 and b"".join(m.get("body", b"") for m in sent[1:]) == b"ok"
    (got,) = upstream.requests
    assert got.body == b"0123456789" and not upstream.incomplete
    name, _, value = framing.partition(b": ")
    assert got.values(name) == [value]
    assert got.values(b"content-length" if name == b"transfer-encoding" else b"transfer-encoding") == []


@pytest.mark.parametrize("declared", [b"4", b"20"], ids=["body-longer", "body-shorter"])
async def test_streamed_body_never_crosses_its_declared_length(declared: bytes) -> None:
    async with scripted_upstream(answer(OK)) as upstream:
        proxy = UpstreamProxy(url=upstream.url, timeout_s=3)
        receive, send, sent = asgi_call([{"type": "http.request", "body": b"01234", "more_body": True},
                                         {"type": "http.request", "body": b"56789"}])
        try:
            await asyncio.wait_for(proxy(http_scope([(b"content-length", declared)]), receive, send), 5)
        finally:
            await proxy.aclose()
        await asyncio.wait_for(upstream.closed.wait(), 3)
    assert sent[0]["status"] == 400 and b"body_length_mismatch" in sent[1]["body"]
    assert upstream.requests == []  # never a complete request: the cut body is not taken for one
    (cut,) = upstream.incomplete
    head, _, body_part = cut.partition(b"\r\n\r\n")
    assert b"content-length: " + declared in head.lower() and len(body_part) <= int(declared)


async def test_streamed_body_keeps_a_valid_declared_length() -> None:
    async with scripted_upstream(answer(OK)) as upstream:
        proxy = UpstreamProxy(url=upstream.url, timeout_s=3)
        receive, send, sent = asgi_call([{"type": "http.request", "body": b"01234", "more_body": True},
                                         {"type": "http.request", "body": b"56789"}])
        try:
            await asyncio.wait_for(proxy(http_scope([(b"content-length", b"10")]), receive, send), 5)
        finally:
            await proxy.aclose()
    assert sent[0]["status"] == 200
    (got,) = upstream.requests
    assert got.body == b"0123456789" and got.values(b"content-length") == [b"10"]
    assert got.values(b"transfer-encoding") == []


async def test_client_connection_header_never_drops_gateway_headers() -> None:
    """The CVE-2024-45410 class: Connection-listed names are applied to the client's headers at the
    edge; the proxy drops only the fixed hop-by-hop set on the request side."""
    async with scripted_upstream(answer(OK)) as upstream:
        proxy = UpstreamProxy(url=upstream.url, timeout_s=3)
        receive, send, sent = asgi_call([{"type": "http.request", "body": b""}])
        scope = http_scope([(b"connection", b"close, x-auth-user, x-auth-identity"), (b"x-auth-user", b"alice"),
                            (b"x-auth-identity", b"jwt"), (b"keep-alive", b"timeout=5"), (b"te", b"trailers")],
                           method="GET")
        try:
            await asyncio.wait_for(proxy(scope, receive, send), 5)
        finally:
            await proxy.aclose()
    assert sent[0]["status"] == 200
    (got,) = upstream.requests
    assert got.values(b"x-auth-user") == [b"alice"] and got.values(b"x-auth-identity") == [b"jwt"]
    assert not got.values(b"connection") and not got.values(b"keep-alive") and not got.values(b"te")


async def test_response_connection_header_still_drops_what_it_names(start: Starter) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nConnection: x-upstream-hop\r\nX-Upstream-Hop: secret\r\nX-Kept: 1\r\n"
             b"Content-Length: 2\r\n\r\nok")
    async with scripted_upstream(answer(reply)) as upstream, start(upstream.url) as url, \
            httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url + "/public/x")
    assert response.status_code == 200 and response.headers["x-kept"] == "1"
    assert "x-upstream-hop" not in response.headers and len(upstream.requests) == 1


async def test_trailer_fields_never_reach_the_response_head(start: Starter) -> None:
    """A chunked answer's trailers are dropped: a small answer's head is read after its body, and a
    trailing Location must not join it (a trailing Content-Length llhttp refuses itself: 502)."""
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Injected, Location\r\n\r\n"
             b"2\r\nhi\r\n0\r\nX-Injected: yes\r\nLocation: https://evil.example/\r\n\r\n")
    async with scripted_upstream(answer(reply)) as upstream, start(upstream.url) as url, \
            httpx.AsyncClient(timeout=5) as client:
        response = await client.get(url + "/public/x")
    assert response.status_code == 200 and response.content == b"hi"
    assert "x-injected" not in response.headers and "location" not in response.headers
    assert len(upstream.requests) == 1


# --- finding 16: idle keep-alive and the retry -----------------------------------------------------

def test_default_idle_limit_is_below_common_upstream_keep_alives() -> None:
    from gateway.config import Upstream as UpstreamSettings

    assert UpstreamSettings().keepalive_s < 5  # uvicorn and Node close idle connections after 5 s


@pytest.mark.parametrize(("options", "keep_alive"), [
    ({"keepalive_s": 0.2}, b""),
    ({"keepalive_s": 30}, b"Keep-Alive: timeout=1\r\n"),
], ids=["keepalive_s", "Keep-Alive-header"])
async def test_idle_connections_are_not_reused_past_the_limit(
    start: Starter, options: dict[str, Any], keep_alive: bytes
) -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + keep_alive + b"Content-Length: 2\r\n\r\nok"
    async with scripted_upstream(answer(reply)) as upstream, start(upstream.url, **options) as url, \
            httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(url + "/public/1")).status_code == 200
        assert (await client.get(url + "/public/2")).status_code == 200  # at once: reused
        assert upstream.connections == 1
        await asyncio.sleep(0.8)
        assert (await client.get(url + "/public/3")).status_code == 200  # idle too long: a new one
        assert upstream.connections == 2 and len(upstream.requests) == 3


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("PUT", True), ("POST", False)])
async def test_request_on_a_connection_the_upstream_closed_is_retried_only_when_safe(
    start: Starter, method: str, retried: bool
) -> None:
    """The upstream takes the request on a kept-alive connection and closes it unanswered (its
    keep-alive ran out just then): idempotent requests go once more on a new connection; a POST that
    reached the wire may have been processed, so it is never sent twice."""
    def script(number: int, count: int, request: Received) -> list[Item]:
        return [None] if number == 1 and count == 2 else [OK]

    async with scripted_upstream(script) as upstream, start(upstream.url, max_connections=1) as url, \
            httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(url + "/public/warm")).status_code == 200
        response = await client.request(method, url + "/public/x", content=b"body" if method != "GET" else None)
    targets = [r.target for r in upstream.requests]
    if retried:
        assert (response.status_code, response.content) == (200, b"ok")
        assert targets == [b"/public/warm", b"/public/x", b"/public/x"] and upstream.connections == 2
    else:
        assert response.status_code == 502 and response.json()["error"] == "upstream_unavailable"
        assert targets == [b"/public/warm", b"/public/x"] and upstream.connections == 1
