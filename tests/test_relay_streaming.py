"""Bodies stream through the relay both ways: an upload reaches the provider before the client has
sent all of it, a download reaches the client before the provider has sent all of it (each side
waits for the other, bounded, so a relay that buffered would fail here). Over the replay bound an
expired-token answer is passed on after the refresh, not retried (the body is spent).

The provider is a small test plugin whose Open API is a real uvicorn server."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.config import GatewayConfig
from gateway.identity import Identity
from gateway.middleware import AuthGateway
from gateway.providers import Provider, ProviderSettings, TokenSet, register_plugin
from gateway.sandbox import serve_apps
from tests.conftest import echo_app, free_port

CHUNK = 64 * 1024
WAIT_S = 10.0
#: The "endless" download's length: 5 s of parts, far more than a caller who left lets through.
ENDLESS_PARTS = 500


class StreamSettings(ProviderSettings):
    api_base_url: str = ""


class StreamProvider(Provider):
    """An Open API at ``api_base_url``: the relay's defaults (Bearer token, 401 is expired)."""

    settings_model = StreamSettings
    settings: StreamSettings
    refreshes = 0

    def relay_base_url(self, path: str) -> str | None:
        return self.settings.api_base_url

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        type(self).refreshes += 1
        return TokenSet(access_token="fresh", expires_at=time.time() + 3600)


register_plugin("unit-stream", StreamProvider)


class Api:
    """The provider's side, with the events each direction waits on."""

    def __init__(self) -> None:
        self.upload_started = asyncio.Event()
        self.download_started = asyncio.Event()
        self.endless_stopped = asyncio.Event()
        self.endless_parts = 0

    def app(self) -> Starlette:
        async def upload(request: Request) -> Response:
            if request.headers.get("authorization") != "Bearer fresh":
                await request.body()
                return JSONResponse({"error": "expired"}, status_code=401)
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size >= CHUNK:
                    self.upload_started.set()  # the first part is here while the client waits
            return JSONResponse({"received": size})

        async def download(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                yield b"a" * CHUNK
                await asyncio.wait_for(self.download_started.wait(), WAIT_S)
                for _ in range(15):
                    yield b"b" * CHUNK

            return StreamingResponse(body(), media_type="application/octet-stream",
                                     headers={"x-request-id": "prov-1"})

        async def endless(request: Request) -> Response:
            async def body() -> AsyncIterator[bytes]:
                try:
                    while self.endless_parts < ENDLESS_PARTS:  # a download nobody should read to its end
                        self.endless_parts += 1
                        yield b"e" * CHUNK
                        await asyncio.sleep(0.01)
                finally:
                    self.endless_stopped.set()  # the gateway closed its connection

            return StreamingResponse(body(), media_type="application/octet-stream")

        async def broken(request: Request) -> Response:
            return Response("upstream exploded", status_code=502)

        async def page(request: Request) -> Response:
            # A provider's document with lax policies of its own: served from the app's origin.
            return Response("<script>parent.steal(document.cookie)</script>", media_type="text/html", headers={
                "content-security-policy": "script-src * 'unsafe-inline'", "referrer-policy": "unsafe-url",
                "x-content-type-options": "sniff-please"})

        return Starlette(routes=[Route("/files/upload", upload, methods=["POST"]),
                                 Route("/files/download", download, methods=["GET"]),
                                 Route("/files/broken", broken, methods=["GET"]),
                                 Route("/files/page", page, methods=["GET"]),
                                 Route("/files/endless", endless, methods=["GET"])])


async def with_gateway(api: Api, body: Any) -> Any:
    async with serve_apps({"api": api.app()}) as urls:
        port = free_port()
        config = GatewayConfig(
            public_url=f"http://127.0.0.1:{port}",
            session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
            providers={"acme": {"plugin": "unit-stream", "api_base_url": urls["api"]}},
            relay={"routes": [{"provider": "acme", "path": "files/*", "methods": ["GET", "POST"]}],
                   "replay_body_bytes": 1024})
        gateway = AuthGateway(echo_app(), config)
        runtime = gateway.runtime
        await runtime.tokens.save("acme", "t1", "u1", TokenSet(access_token="fresh", expires_at=time.time() + 3600))
        token, _ = runtime.signer.sign(Identity(provider="acme", user="u1", tenant="t1", name=""))
        try:
            async with serve_apps({"gateway": gateway}, port=port), httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}", headers={"authorization": f"Bearer {token}"},
                    timeout=WAIT_S * 2) as client:
                return await body(client, runtime)
        finally:
            await gateway.aclose()


async def test_an_upload_streams_to_the_provider() -> None:
    api = Api()

    async def upload(client: httpx.AsyncClient, runtime: Any) -> None:
        async def parts() -> AsyncIterator[bytes]:
            yield b"x" * CHUNK
            # Not one more byte until the provider has the first part: a buffering relay never gets there.
            await asyncio.wait_for(api.upload_started.wait(), WAIT_S)
            for _ in range(15):
                yield b"y" * CHUNK

        answer = await client.post("/_gateway/api/acme/files/upload", content=parts())
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"received": 16 * CHUNK}

    await with_gateway(api, upload)


async def test_a_download_streams_to_the_client() -> None:
    api = Api()

    async def download(client: httpx.AsyncClient, runtime: Any) -> None:
        size = 0
        async with client.stream("GET", "/_gateway/api/acme/files/download") as answer:
            assert answer.status_code == 200
            assert answer.headers["x-request-id"] == "prov-1"
            async for chunk in answer.aiter_raw():
                size += len(chunk)
                if size >= CHUNK:
                    api.download_started.set()  # the first part arrived while the provider waits
        assert size == 16 * CHUNK

    await with_gateway(api, download)


async def test_a_streamed_body_is_not_sent_twice_after_an_expired_answer() -> None:
    api = Api()

    async def expired(client: httpx.AsyncClient, runtime: Any) -> None:
        await runtime.tokens.save("acme", "t1", "u1", TokenSet(access_token="stale", expires_at=time.time() + 3600))
        before = StreamProvider.refreshes
        big = await client.post("/_gateway/api/acme/files/upload", content=b"z" * (4 * CHUNK))
        assert big.status_code == 401  # the provider's own answer: the body cannot be sent again
        assert StreamProvider.refreshes - before == 1  # but the token is fresh for the next call
        again = await client.post("/_gateway/api/acme/files/upload", content=b"z" * (4 * CHUNK))
        assert again.status_code == 200 and again.json() == {"received": 4 * CHUNK}
        await runtime.tokens.save("acme", "t1", "u1", TokenSet(access_token="stale", expires_at=time.time() + 3600))
        small = await client.post("/_gateway/api/acme/files/upload", content=b"s" * 512)  # kept: retried
        assert small.status_code == 200 and small.json() == {"received": 512}
        assert StreamProvider.refreshes - before == 2

    await with_gateway(api, expired)


async def test_a_provider_5xx_is_503_provider_unavailable_by_default() -> None:
    async def broken(client: httpx.AsyncClient, runtime: Any) -> None:
        answer = await client.get("/_gateway/api/acme/files/broken")
        assert answer.status_code == 503 and answer.json()["error"] == "provider_unavailable"
        assert int(answer.headers["retry-after"]) >= 1

    await with_gateway(Api(), broken)


async def test_relayed_answers_carry_the_relays_policy_in_place_of_the_providers() -> None:
    """A relayed document runs nothing and is sandboxed (no access to the app's origin), whatever
    policy the provider sent; the relay's own error answers carry the same headers."""

    async def policies(client: httpx.AsyncClient, runtime: Any) -> None:
        for path, status in (("/files/page", 200), ("/files/broken", 503), ("/files/a;b", 400)):
            answer = await client.get(f"/_gateway/api/acme{path}")
            assert answer.status_code == status, answer.text
            assert answer.headers.get_list("content-security-policy") == [
                "default-src 'none'; frame-ancestors 'none'; sandbox"], path
            assert answer.headers.get_list("referrer-policy") == ["no-referrer"], path
            assert answer.headers.get_list("x-content-type-options") == ["nosniff"], path

    await with_gateway(Api(), policies)


async def test_a_download_whose_caller_leaves_is_not_read_on() -> None:
    """The caller takes a part of a streamed download and hangs up: the gateway stops reading the
    provider's answer and closes that connection (it is not read to its end for nobody)."""
    api = Api()

    async def leave(client: httpx.AsyncClient, runtime: Any) -> None:
        async with client.stream("GET", "/_gateway/api/acme/files/endless") as answer:
            assert answer.status_code == 200
            async for _ in answer.aiter_raw():
                break  # one part, then the caller is gone (the stream is closed on exit)
        await asyncio.wait_for(api.endless_stopped.wait(), WAIT_S)
        assert api.endless_parts < ENDLESS_PARTS / 5  # stopped soon after the caller left, not read to the end
        assert (await client.get("/_gateway/api/acme/files/page")).status_code == 200  # the relay goes on

    await with_gateway(api, leave)
