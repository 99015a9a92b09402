"""The hostile-client battery over real sockets (issue 10, findings 1, 2, 4 and 16's TE coding).

Raw bytes from the client, so nothing is tidied on the way: the gateway is served by uvicorn with
its httptools parser and with h11 (middleware users run any server), in middleware mode (in front
of a Starlette app) and in sidecar mode (in front of a raw upstream that parses every request it
receives on a connection, as a keep-alive server does, and routes on the raw path as Node does).
Each case asserts what the app or upstream received, not only the status the client saw."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pytest
import uvicorn

from gateway.edge import fold
from gateway.middleware import AuthGateway
from gateway.proxy import UpstreamProxy
from tests.test_edge import IDENTITY, gateway_config, recording_app, sign_in

SERVERS = ["httptools", "h11"]


@contextlib.asynccontextmanager
async def serve(app: Any, http: str) -> AsyncIterator[int]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, http=http, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (every request here says Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def body_of(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def cgi_identity(headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """What a CGI/WSGI app reads as identity: ``HTTP_X_AUTH_USER`` and friends, duplicates merged."""
    names = {fold(name.encode()) for name in IDENTITY}
    merged: dict[str, list[str]] = {}
    for key, value in headers:
        if fold(key.encode()) in names:
            merged.setdefault("HTTP_" + key.upper().replace("-", "_").strip("_"), []).append(value)
    return merged


@dataclass
class RawUpstream:
    """A keep-alive HTTP/1.1 upstream that parses every request on each connection and records it."""

    requests: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = [(k.strip(), v.strip()) for k, _, v in (item.partition(":") for item in lines)]
                lowered = {k.lower(): v for k, v in headers}
                body = b""
                if lowered.get("transfer-encoding", "").lower() == "chunked":
                    while True:
                        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                        body += await reader.readexactly(size + 2)
                        if size == 0:
                            break
                elif "content-length" in lowered:
                    body = await reader.readexactly(int(lowered["content-length"]))
                raw_path = target.partition("?")[0]
                first = raw_path.split("/")[1] if raw_path.count("/") >= 1 else ""
                entry = {"method": method, "raw_path": raw_path, "headers": headers, "body": body.decode("latin-1"),
                         "route": first if first in ("admin", "public") else "other"}  # routed as Node would
                self.requests.append(entry)
                payload = json.dumps(entry).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b"
                             % (len(payload), payload))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def sidecar(http: str, **access: Any) -> AsyncIterator[tuple[int, AuthGateway, RawUpstream]]:
    upstream = RawUpstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    gateway = AuthGateway(UpstreamProxy(url=f"http://127.0.0.1:{port}", timeout_s=5), gateway_config(**access))
    try:
        async with serve(gateway, http) as gateway_port:
            yield gateway_port, gateway, upstream
    finally:
        await gateway.aclose()
        server.close()


FORGED = (b"X-Auth_User: admin\r\nx_auth-tenant: victim-corp\r\nx-auth-user_: root\r\nX_AUTH_IDENTITY: forged\r\n"
          b"x-auth-name-: Admin\r\nConnection: close, X-Auth-User, X-Auth-Tenant, X-Auth-Identity\r\n")


@pytest.mark.parametrize("http", SERVERS)
async def test_middleware_a_signed_in_user_cannot_forge_an_identity_over_a_real_socket(http: str) -> None:
    app, _ = recording_app()
    gateway = AuthGateway(app, gateway_config())
    ticket = await sign_in(gateway)
    try:
        async with serve(gateway, http) as port:
            answer = await exchange(port, b"GET /orders HTTP/1.1\r\nHost: app.test\r\nCookie: gw_session=%b\r\n%b\r\n"
                                    % (ticket.encode(), FORGED))
    finally:
        await gateway.aclose()
    assert status_of(answer) == 200, answer
    seen = cgi_identity([tuple(pair) for pair in body_of(answer)["headers"]])
    assert seen["HTTP_X_AUTH_USER"] == ["mallory"] and seen["HTTP_X_AUTH_TENANT"] == ["corp-m"]
    assert len(seen["HTTP_X_AUTH_IDENTITY"]) == 1 and seen["HTTP_X_AUTH_IDENTITY"] != ["forged"]
    assert "HTTP_X_AUTH_NAME" in seen and seen["HTTP_X_AUTH_NAME"] == ["Mallory"]


@pytest.mark.parametrize("http", SERVERS)
async def test_sidecar_a_signed_in_user_cannot_forge_an_identity_or_make_the_proxy_drop_ours(http: str) -> None:
    async with sidecar(http) as (port, gateway, upstream):
        ticket = await sign_in(gateway)
        answer = await exchange(port, b"GET /orders HTTP/1.1\r\nHost: app.test\r\nCookie: gw_session=%b\r\n"
                                b"X_Forwarded_For: 6.6.6.6\r\nX-Real_IP: 6.6.6.6\r\n"
                                b"X-Request-Id: forged-rid\r\nX_Request_Id: forged-rid\r\nConnection: X-Request-Id\r\n"
                                b"%b\r\n" % (ticket.encode(), FORGED))
    assert status_of(answer) == 200, answer
    [received] = upstream.requests
    seen = cgi_identity(received["headers"])
    assert seen["HTTP_X_AUTH_USER"] == ["mallory"] and seen["HTTP_X_AUTH_TENANT"] == ["corp-m"]
    assert len(seen["HTTP_X_AUTH_IDENTITY"]) == 1 and seen["HTTP_X_AUTH_IDENTITY"] != ["forged"]
    forwarded = [(k, v) for k, v in received["headers"] if fold(k.encode()) in (b"xforwardedfor", b"xrealip")]
    assert forwarded == [("x-forwarded-for", "127.0.0.1")], forwarded
    # The request id is the gateway's own (the peer is no trusted proxy): one, never the client's.
    request_ids = [v for k, v in received["headers"] if fold(k.encode()) == b"xrequestid"]
    assert len(request_ids) == 1 and request_ids != ["forged-rid"], request_ids
    # upstream.preserve_host (the default): the client's Host, exactly once, never beside the upstream's.
    assert [v for k, v in received["headers"] if k.lower() == "host"] == ["app.test"]


SMUGGLED = b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: app.test\r\nx-auth-user: admin\r\n\r\n"


@pytest.mark.parametrize("http", SERVERS)
@pytest.mark.parametrize("framing", [
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
])
async def test_sidecar_a_body_framed_two_ways_never_becomes_a_second_request_upstream(
    http: str, framing: bytes
) -> None:
    async with sidecar(http, public_paths=["/public/*"]) as (port, _, upstream):
        body = b"%x\r\n%b\r\n" % (len(SMUGGLED), SMUGGLED) + b"0\r\n\r\n"
        answer = await exchange(port, b"POST /public/x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n%b\r\n%b"
                                % (framing, body))
    # Refused by the server's own parser (httptools, h11 for codings) or by the edge: never forwarded.
    assert status_of(answer) in (400, 501), answer
    assert upstream.requests == []


@pytest.mark.parametrize("http", SERVERS)
async def test_middleware_a_body_framed_two_ways_is_refused_before_the_app(http: str) -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    try:
        async with serve(gateway, http) as port:
            answer = await exchange(port, b"POST /public/x HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n"
                                    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + b"0\r\n\r\n")
    finally:
        await gateway.aclose()
    assert status_of(answer) == 400 and seen == []


ESCAPES = ["/admin/../public/x", "/admin/%2e%2e/public/x", "/admin/..%2fpublic/x", "/admin/..%2F..%2Fpublic/x",
           "/admin/x//../../public/y", "/admin/.%2E/public/x", "//admin/../public/x", "/public/../admin/x",
           "/public/%2e%2e/admin/x", "/public/..%2fadmin", "/public%2f..%2fadmin", "/public/..;/admin",
           "/public/..\\admin"]


@pytest.mark.parametrize("http", SERVERS)
async def test_sidecar_an_anonymous_request_never_reaches_a_protected_route_in_any_encoding(http: str) -> None:
    async with sidecar(http, public_paths=["/public/*"]) as (port, _, upstream):
        answers = {}
        for path in ESCAPES:
            answers[path] = await exchange(port, b"GET %b HTTP/1.1\r\nHost: app.test\r\nAccept: application/json\r\n"
                                           b"Connection: close\r\n\r\n" % path.encode())
    for path, answer in answers.items():
        assert status_of(answer) in (200, 400, 401), (path, answer)
    assert all(entry["route"] == "public" for entry in upstream.requests), upstream.requests
    for entry in upstream.requests:
        # What the upstream routed is a plain public path: what the gateway judged.
        assert "/." not in unquote(entry["raw_path"]) and "//" not in entry["raw_path"], entry
    served = [path for path, answer in answers.items() if status_of(answer) == 200]
    assert served == ["/admin/../public/x", "/admin/%2e%2e/public/x", "/admin/x//../../public/y",
                      "/admin/.%2E/public/x", "//admin/../public/x"]


@pytest.mark.parametrize("http", SERVERS)
async def test_middleware_an_anonymous_request_never_reaches_a_protected_route_in_any_encoding(http: str) -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    try:
        async with serve(gateway, http) as port:
            for path in ESCAPES:
                answer = await exchange(port, b"GET %b HTTP/1.1\r\nHost: app.test\r\nAccept: application/json\r\n"
                                        b"Connection: close\r\n\r\n" % path.encode())
                assert status_of(answer) in (200, 400, 401), (path, answer)
    finally:
        await gateway.aclose()
    assert seen, "some escapes resolve to a public path and are served as such"
    for entry in seen:
        assert entry["route"] == "/public/{rest:path}", entry
        assert unquote(entry["raw_path"]) == entry["path"] and "/." not in entry["path"], entry
