"""UpstreamProxy over real sockets: uvicorn serves a Starlette upstream and the proxy on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway.proxy import UpstreamProxy


class UpstreamState:
    def __init__(self) -> None:
        self.release = asyncio.Event()  # /stream waits on it between its two chunks
        self.stream_closed = asyncio.Event()  # /forever's generator has ended
        self.upload_aborted = asyncio.Event()  # /upload saw its client leave mid-body
        self.ws_closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()


def upstream_app(state: UpstreamState) -> Starlette:
    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({
            "method": request.method,
            "raw_path": request.scope["raw_path"].decode(),
            "query": request.scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in request.scope["headers"]],
            "body": body.decode(errors="replace"),
        })

    async def upload(request: Request) -> Response:
        digest, size = hashlib.sha256(), 0
        try:
            async for chunk in request.stream():
                digest.update(chunk)
                size += len(chunk)
        except ClientDisconnect:
            state.upload_aborted.set()
            raise
        return JSONResponse({"size": size, "sha256": digest.hexdigest(),
                             "chunked": request.headers.get("transfer-encoding") == "chunked"})

    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"first;"
            await state.release.wait()
            yield b"second"
        return StreamingResponse(chunks(), media_type="text/plain")

    async def forever(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                yield b"tick;"
                await asyncio.Event().wait()  # never set: only the client leaving ends this
            finally:
                state.stream_closed.set()
        return StreamingResponse(chunks())

    async def headers(request: Request) -> Response:
        response = Response("ok", headers={"Connection": "X-Hop-Named", "X-Hop-Named": "secret",
                                           "Keep-Alive": "timeout=5", "Proxy-Authenticate": "Basic", "X-Kept": "yes"})
        response.set_cookie("a", "1", httponly=True)
        response.set_cookie("b", "2, with comma", path="/x")
        return response

    async def gzipped(request: Request) -> Response:
        return Response(gzip.compress(b"squeezed " * 100), headers={"content-encoding": "gzip"})

    async def slow(request: Request) -> Response:
        await asyncio.sleep(2)
        return Response("late")

    async def dies(scope: Scope, receive: Receive, send: Send) -> None:
        sized = scope["query_string"] == b"sized"  # else chunked: a cut must not look like the final chunk
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"100")] if sized else []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("upstream dies mid-response (expected in this test)")

    async def ws_echo(websocket: WebSocket) -> None:
        offered = websocket.scope["subprotocols"]
        await websocket.accept(subprotocol="chat.v2" if "chat.v2" in offered else None)
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    state.ws_closed.set_result((message["code"], message.get("reason") or ""))
                    return
                if message.get("text") == "close-please":
                    await websocket.close(code=4001, reason="bye")
                    return
                if message.get("text") == "headers":
                    await websocket.send_json(dict(websocket.headers))
                elif message.get("text") is not None:
                    await websocket.send_text("echo:" + message["text"])
                else:
                    await websocket.send_bytes(b"echo:" + message["bytes"])
        except WebSocketDisconnect:
            pass

    async def ws_refuse(websocket: WebSocket) -> None:
        await websocket.close(code=1008)

    return Starlette(routes=[
        Route("/echo/{rest:path}", echo, methods=["GET", "POST", "PUT", "DELETE"]),
        Route("/upload", upload, methods=["POST"]),
        Route("/stream", stream), Route("/forever", forever), Route("/headers", headers), Route("/slow", slow),
        Route("/gzipped", gzipped),
        Mount("/dies", app=dies), WebSocketRoute("/ws/echo", ws_echo), WebSocketRoute("/ws/refuse", ws_refuse),
    ])


@contextlib.asynccontextmanager
async def serve(app: Any, sock: socket.socket | None = None) -> AsyncIterator[str]:
    """uvicorn on a loopback socket bound here (no port race), stopped on exit."""
    if sock is None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
    # proxy_headers=False: uvicorn would otherwise rewrite the client address from X-Forwarded-For itself
    config = uvicorn.Config(app, log_level="critical", lifespan="off", ws="websockets-sansio", proxy_headers=False)
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


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, UpstreamState]]:
    state = UpstreamState()
    async with serve(upstream_app(state)) as url:
        yield url, state


@contextlib.asynccontextmanager
async def proxied(
    upstream_url: str, app_wrapper: Any = None, **options: Any
) -> AsyncIterator[tuple[str, UpstreamProxy]]:
    proxy = UpstreamProxy(url=upstream_url, **options)
    try:
        async with serve(app_wrapper(proxy) if app_wrapper else proxy) as url:
            yield url, proxy
    finally:
        await proxy.aclose()


@pytest.fixture
async def gateway(upstream: tuple[str, UpstreamState]) -> AsyncIterator[tuple[str, UpstreamState]]:
    async with proxied(upstream[0]) as (url, _):
        yield url, upstream[1]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def header_values(echoed: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echoed["headers"] if k == name]


# --- HTTP -------------------------------------------------------------------------------------

async def test_get_and_post_round_trip(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        got = await client.get(url + "/echo/a", params={"q": "1"})
        posted = await client.post(url + "/echo/b", content=b"hello", headers={"content-type": "text/plain"})
    assert got.status_code == 200
    assert got.json()["method"] == "GET" and got.json()["query"] == "q=1"
    assert posted.json()["method"] == "POST" and posted.json()["body"] == "hello"
    assert header_values(posted.json(), "content-type") == ["text/plain"]
    assert header_values(posted.json(), "content-length") == ["5"]
    async with httpx.AsyncClient() as client:
        head = await client.head(url + "/echo/a")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


async def test_compressed_body_passes_untouched(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client, client.stream("GET", url + "/gzipped") as response:
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert int(response.headers["content-length"]) == len(raw)
    assert gzip.decompress(raw) == b"squeezed " * 100


async def test_no_client_headers_are_invented(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        echoed = (await client.post(url + "/echo/x", content=b"x",
                                    headers={"user-agent": "my-agent/1", "accept-encoding": "br"})).json()
    names = [k for k, _ in echoed["headers"]]
    assert header_values(echoed, "user-agent") == ["my-agent/1"]
    assert header_values(echoed, "accept-encoding") == ["br"]
    assert "content-type" not in names  # the client sent none; nothing made one up


async def test_large_request_body_is_streamed(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    chunk, count = bytes(range(256)) * 4096, 20  # 1 MiB x 20, generated lazily
    expected = hashlib.sha256(chunk * count).hexdigest()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(url + "/upload", content=body())  # no length: chunked
    assert response.json() == {"size": len(chunk) * count, "sha256": expected, "chunked": True}


async def test_client_abort_mid_upload_reaches_upstream(upstream: tuple[str, UpstreamState]) -> None:
    upstream_url, state = upstream
    async with proxied(upstream_url, max_connections=1) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.close()  # gone before the last chunk
        await asyncio.wait_for(state.upload_aborted.wait(), 3)
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(url + "/echo/after")).status_code == 200


async def test_response_is_streamed_before_upstream_finishes(gateway: tuple[str, UpstreamState]) -> None:
    url, state = gateway
    async with httpx.AsyncClient(timeout=5) as client, client.stream("GET", url + "/stream") as response:
        chunks = response.aiter_raw()
        first = await asyncio.wait_for(chunks.__anext__(), 2)
        assert first == b"first;" and not state.release.is_set()  # upstream still blocked
        state.release.set()
        rest = b"".join([c async for c in chunks])
    assert rest == b"second"


async def test_client_disconnect_stops_upstream_and_frees_connection(upstream: tuple[str, UpstreamState]) -> None:
    upstream_url, state = upstream
    async with proxied(upstream_url, max_connections=1) as (url, _), httpx.AsyncClient(timeout=5) as client:
        async with client.stream("GET", url + "/forever") as response:
            assert await response.aiter_raw().__anext__() == b"tick;"
        await asyncio.wait_for(state.stream_closed.wait(), 3)  # the upstream saw the proxy leave
        # the only pooled connection was freed: the next request goes through
        assert (await client.get(url + "/echo/again")).status_code == 200


async def test_hop_by_hop_headers_dropped_both_ways(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        echoed = (await client.get(url + "/echo/h", headers={
            "Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "1", "Keep-Alive": "timeout=5",
            "TE": "trailers", "Proxy-Authorization": "Basic eA==", "Upgrade": "h2c", "X-Kept": "yes"})).json()
        response = await client.get(url + "/headers")
    names = {k for k, _ in echoed["headers"]}
    assert not names & {"keep-alive", "te", "proxy-authorization", "upgrade", "transfer-encoding", "connection"}
    # The names a client's Connection header lists are the edge's to drop (gateway/edge.py, before the
    # gateway adds its own headers); the proxy alone never drops by them (tests/test_proxy_hostile.py).
    assert header_values(echoed, "x-client-hop") == ["1"]
    assert header_values(echoed, "x-kept") == ["yes"]
    assert "x-hop-named" not in response.headers and "keep-alive" not in response.headers
    assert "proxy-authenticate" not in response.headers
    assert response.headers["x-kept"] == "yes"


async def test_multiple_set_cookie_preserved(upstream: tuple[str, UpstreamState]) -> None:
    async with proxied(upstream[0]) as (url, _), httpx.AsyncClient() as client:
        cookies = (await client.get(url + "/headers")).headers.get_list("set-cookie")
        direct = (await client.get(upstream[0] + "/headers")).headers.get_list("set-cookie")
    assert cookies == direct and len(cookies) == 2  # two headers, byte for byte, never folded
    assert cookies[0].startswith("a=1;") and "HttpOnly" in cookies[0]
    assert cookies[1].startswith('b="2\\054 with comma";') and "Path=/x" in cookies[1]


async def test_forwarded_headers_untrusted_peer(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        echoed = (await client.get(url + "/echo/f", headers={
            "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"})).json()
    proxy_host = url.removeprefix("http://")
    assert header_values(echoed, "x-forwarded-for") == ["127.0.0.1"]
    assert header_values(echoed, "x-forwarded-proto") == ["http"]
    assert header_values(echoed, "x-forwarded-host") == [proxy_host]
    assert header_values(echoed, "forwarded") == [] and header_values(echoed, "x-real-ip") == []


@pytest.mark.parametrize("preserve_host", [None, True, False])  # None: the default
async def test_host_is_the_browsers_unless_preserve_host_is_off(
    upstream: tuple[str, UpstreamState], preserve_host: bool | None
) -> None:
    upstream_url, _ = upstream
    options = {} if preserve_host is None else {"preserve_host": preserve_host}
    async with proxied(upstream_url, **options) as (url, _), httpx.AsyncClient() as client:
        echoed = (await client.get(url + "/echo/h", headers={"host": "app.example.com"})).json()
    expected = upstream_url.removeprefix("http://") if preserve_host is False else "app.example.com"
    assert header_values(echoed, "host") == [expected]  # exactly one Host, never both
    assert header_values(echoed, "x-forwarded-host") == ["app.example.com"]


async def test_forwarded_headers_trusted_peer(upstream: tuple[str, UpstreamState]) -> None:
    async with proxied(upstream[0], trusted_proxies=["127.0.0.1/32"]) as (url, _), httpx.AsyncClient() as client:
        echoed = (await client.get(url + "/echo/f", headers={
            "X-Forwarded-For": "203.0.113.7, 10.0.0.2", "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "app.example.com"})).json()
    assert header_values(echoed, "x-forwarded-for") == ["203.0.113.7, 10.0.0.2, 127.0.0.1"]
    assert header_values(echoed, "x-forwarded-proto") == ["https"]
    assert header_values(echoed, "x-forwarded-host") == ["app.example.com"]


async def test_raw_path_and_query_preserved(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        raw = httpx.URL(url + "/echo/a%2Fb/%7Ec;p=1", query=b"x=%2F&y=a+b&z=%E4%BD%A0&&flag")
        echoed = (await client.get(raw)).json()
    assert echoed["raw_path"] == "/echo/a%2Fb/%7Ec;p=1"
    assert echoed["query"] == "x=%2F&y=a+b&z=%E4%BD%A0&&flag"


async def test_502_when_upstream_is_down() -> None:
    async with proxied(f"http://127.0.0.1:{closed_port()}") as (url, _), httpx.AsyncClient() as client:
        api = await client.get(url + "/anything", headers={"accept": "application/json"})
        page = await client.get(url + "/anything", headers={"accept": "text/html,*/*"})
    assert api.status_code == 502
    assert api.json()["error"] == "upstream_unavailable"
    assert "127.0.0.1" not in api.json()["message"] and "upstream service" in api.json()["message"]
    assert page.status_code == 502 and page.headers["content-type"].startswith("text/html")
    assert "upstream_unavailable" in page.text and "127.0.0.1" not in page.text


async def test_504_on_slow_upstream(upstream: tuple[str, UpstreamState]) -> None:
    async with proxied(upstream[0], timeout_s=0.3) as (url, _), httpx.AsyncClient() as client:
        response = await client.get(url + "/slow")
        assert response.status_code == 504
        assert response.json()["error"] == "upstream_timeout"
        assert (await client.get(url + "/echo/ok")).status_code == 200  # the proxy itself is fine


@pytest.mark.parametrize("query", ["sized", "chunked"])
async def test_upstream_dying_mid_response_truncates(gateway: tuple[str, UpstreamState], query: str) -> None:
    url, _ = gateway
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url + "/dies/?" + query)  # a visible cut, never a complete-looking short body
        assert (await client.get(url + "/echo/ok")).status_code == 200


async def test_lifespan_completes_and_shutdown_closes_the_pool() -> None:
    proxy = UpstreamProxy(url="http://127.0.0.1:9")
    session = proxy._client()  # the pool exists once a request has needed it
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await proxy({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert session.closed


async def test_unknown_scope_types_are_refused() -> None:
    proxy = UpstreamProxy(url="http://127.0.0.1:9")

    async def nothing() -> Any:
        raise AssertionError

    with pytest.raises(RuntimeError, match="does not handle"):
        await proxy({"type": "telepathy"}, nothing, nothing)


# --- WebSocket --------------------------------------------------------------------------------

def ws_url(url: str, path: str) -> str:
    return "ws://" + url.removeprefix("http://") + path


async def test_websocket_echo_text_and_binary(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with websockets.connect(ws_url(url, "/ws/echo"), subprotocols=["chat.v1", "chat.v2"]) as ws:
        assert ws.subprotocol == "chat.v2"  # the one the upstream chose
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await ws.send(b"\x00\x01")
        assert await ws.recv() == b"echo:\x00\x01"
        await ws.send("headers")
        seen = json.loads(await ws.recv())
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"


@pytest.mark.parametrize("preserve_host", [None, False])  # None: the default
async def test_websocket_host_and_origin_as_the_app_checks_them(
    upstream: tuple[str, UpstreamState], preserve_host: bool | None
) -> None:
    """The WebSocket relay (aiohttp) sends the same Host as the HTTP path: by default the browser's,
    so an app comparing Origin with Host (Tornado's check_origin) finds them one origin; the
    browser's Origin always passes through unchanged."""
    upstream_url, _ = upstream
    options = {} if preserve_host is None else {"preserve_host": preserve_host}
    async with proxied(upstream_url, **options) as (url, _):
        browser_host = url.removeprefix("http://")
        async with websockets.connect(ws_url(url, "/ws/echo"), origin=websockets.Origin(url)) as ws:
            await ws.send("headers")
            seen = json.loads(await ws.recv())
    assert seen["origin"] == url
    assert seen["host"] == (upstream_url.removeprefix("http://") if preserve_host is False else browser_host)
    assert seen["x-forwarded-host"] == browser_host


async def test_websocket_close_from_upstream_propagates(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    async with websockets.connect(ws_url(url, "/ws/echo")) as ws:
        await ws.send("close-please")
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 4001 and ws.close_reason == "bye"


async def test_websocket_close_from_client_propagates(gateway: tuple[str, UpstreamState]) -> None:
    url, state = gateway
    async with websockets.connect(ws_url(url, "/ws/echo")) as ws:
        await ws.send("hi")
        assert await ws.recv() == "echo:hi"
        await ws.close(code=4002, reason="done")
    assert await asyncio.wait_for(state.ws_closed, 3) == (4002, "done")


async def test_websocket_idle_longer_than_timeout(upstream: tuple[str, UpstreamState]) -> None:
    async with proxied(upstream[0], timeout_s=0.3) as (url, _), websockets.connect(ws_url(url, "/ws/echo")) as ws:
        await asyncio.sleep(0.8)
        await ws.send("still there?")
        assert await ws.recv() == "echo:still there?"


async def test_websocket_refused_by_upstream(gateway: tuple[str, UpstreamState]) -> None:
    url, _ = gateway
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url(url, "/ws/refuse")):
            pass
    assert refused.value.response.status_code == 403
    assert json.loads(refused.value.response.body)["error"] == "upstream_refused"


async def test_websocket_upstream_down() -> None:
    async with proxied(f"http://127.0.0.1:{closed_port()}") as (url, _):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(url, "/ws/echo")):
                pass
    assert refused.value.response.status_code == 502
    assert json.loads(refused.value.response.body)["error"] == "upstream_unavailable"


async def test_websocket_refusal_without_denial_extension(upstream: tuple[str, UpstreamState]) -> None:
    def without_extensions(app: Any) -> Any:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            await app({**scope, "extensions": {}}, receive, send)
        return wrapped

    async with proxied(upstream[0], app_wrapper=without_extensions) as (url, _):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url(url, "/ws/refuse")):
                pass
    assert refused.value.response.status_code == 403  # closed before accept: the server says 403
