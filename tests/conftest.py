"""Shared fixtures: the Lark emulator on real loopback sockets, an upstream app, gateway builders."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.config import GatewayConfig
from gateway.sandbox import serve_apps
from plugins.lark.sandbox import LarkSandbox

FEISHU_UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36 Lark/7.12.7 LarkLocale/en_US ChannelName/Feishu"
)
BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)
HTML = {"accept": "text/html,application/xhtml+xml"}


@dataclass
class ServedLark:
    sandbox: LarkSandbox
    urls: dict[str, str]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {**self.sandbox.provider_settings(self.urls), **overrides}


@pytest.fixture
async def lark() -> AsyncIterator[ServedLark]:
    """The Lark emulator, its two hosts on their own loopback ports."""
    sandbox = LarkSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        yield ServedLark(sandbox, urls)


def echo_app() -> Starlette:
    """The upstream app: it answers with what it received (headers, cookies, path)."""

    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({
            "path": request.url.path,
            "query": request.url.query,
            "method": request.method,
            "headers": [[k, v] for k, v in request.headers.items()],
            "cookies": dict(request.cookies),
            "body_length": len(body),
        })

    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"headers": [[k, v] for k, v in websocket.headers.items()]})
        async for message in websocket.iter_text():
            await websocket.send_text(message)

    return Starlette(routes=[
        Route("/{path:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "HEAD"]),
        WebSocketRoute("/ws", ws_echo),
    ])


def headers_of(answer: httpx.Response) -> dict[str, list[str]]:
    """The upstream's received headers (from ``echo_app``), lower-case name -> values."""
    result: dict[str, list[str]] = {}
    for name, value in answer.json()["headers"]:
        result.setdefault(name, []).append(value)
    return result


ConfigFactory = Callable[..., GatewayConfig]


@pytest.fixture
def make_config(lark: ServedLark) -> ConfigFactory:
    """A gateway config for the served Lark emulator; keyword arguments override sections."""

    def build(public_url: str = "http://127.0.0.1", provider: dict[str, Any] | None = None,
              **sections: Any) -> GatewayConfig:
        data: dict[str, Any] = {
            "public_url": public_url,
            "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
            "providers": {"lark": lark.settings(**(provider or {}))},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return GatewayConfig(**data)

    return build


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningGateway:
    url: str
    gateway: Any  # AuthGateway
    config: GatewayConfig

    def client(self, user_agent: str = BROWSER_UA, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": user_agent}, timeout=10, **kwargs)


GatewayStarter = Callable[..., Any]


@pytest.fixture
async def start_gateway(make_config: ConfigFactory) -> AsyncIterator[GatewayStarter]:
    """``async with start_gateway(**config_sections) as running``: AuthGateway(echo_app) on a real port."""
    import contextlib

    from gateway.middleware import AuthGateway

    @contextlib.asynccontextmanager
    async def start(app: Any = None, **sections: Any) -> AsyncIterator[RunningGateway]:
        port = free_port()
        config = make_config(public_url=f"http://127.0.0.1:{port}", **sections)
        gateway = AuthGateway(app if app is not None else echo_app(), config)
        try:
            async with serve_apps({"gateway": gateway}, port=port) as urls:
                yield RunningGateway(urls["gateway"], gateway, config)
        finally:
            await gateway.aclose()

    yield start


async def browser_login(client: httpx.AsyncClient, path: str = "/") -> httpx.Response:
    """Walk the browser OAuth flow from ``path`` (no client in the UA), following every redirect."""
    return await client.get(path, headers=HTML, follow_redirects=True)
