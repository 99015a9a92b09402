"""Shared by the relay tests: a gateway with relay routes around any emulator, on real sockets,
with every request the gateway sent to a provider recorded from its HTTP client's own hook."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import Sandbox, serve_apps
from tests.conftest import BROWSER_UA, HTML, echo_app, free_port


@dataclass
class Relayed:
    url: str
    gateway: AuthGateway
    sent: list[httpx.Request] = field(default_factory=list)

    def client(self, user_agent: str = BROWSER_UA) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": user_agent}, timeout=15)

    def to(self, path: str) -> list[httpx.Request]:
        """What reached the provider at ``path``."""
        return [request for request in self.sent if request.url.path == path]


@contextlib.asynccontextmanager
async def served(sandbox: Sandbox) -> AsyncIterator[dict[str, str]]:
    async with serve_apps(sandbox.hosts()) as urls:
        yield urls


@contextlib.asynccontextmanager
async def relay_gateway(name: str, settings: dict[str, Any], routes: list[dict[str, Any]], *, app: Any = None,
                        **sections: Any) -> AsyncIterator[Relayed]:
    """``app``: the upstream (default: the echo app)."""
    port = free_port()
    config = GatewayConfig(
        public_url=f"http://127.0.0.1:{port}",
        session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
        providers={name: settings}, relay={"routes": routes, **sections.pop("relay", {})}, **sections)
    gateway = AuthGateway(app if app is not None else echo_app(), config)
    running = Relayed(f"http://127.0.0.1:{port}", gateway)

    async def record(request: httpx.Request) -> None:
        running.sent.append(request)

    gateway.runtime.http.event_hooks["request"].append(record)
    try:
        async with serve_apps({"gateway": gateway}, port=port):
            yield running
    finally:
        await gateway.aclose()


async def sign_in(client: httpx.AsyncClient) -> None:
    """The browser OAuth flow from ``/`` (the emulators consent at once), following every redirect."""
    landed = await client.get("/", headers=HTML, follow_redirects=True)
    assert landed.status_code == 200, landed.text
