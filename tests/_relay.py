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


def wire_request(origin: str, head: bytes, body: bytes | None) -> httpx.Request:
    """A relayed call as the relay wrote it on the wire (``Pools.observers``), readable as an
    httpx.Request; header names keep the spelling they were sent in."""
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _ = request_line.split(" ")
    headers = [(name, value) for name, _, value in (line.partition(": ") for line in lines if line)]
    request = httpx.Request(method, origin + target, headers=headers)
    if body is not None:
        request._content = body  # as sent: the head already has its Content-Length
    return request


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

    gateway.runtime.http.event_hooks["request"].append(record)  # the plugins' own provider calls
    gateway.runtime.relay_http.observers.append(lambda *wire: running.sent.append(wire_request(*wire)))
    try:
        async with serve_apps({"gateway": gateway}, port=port):
            yield running
    finally:
        await gateway.aclose()


async def sign_in(client: httpx.AsyncClient) -> None:
    """The browser OAuth flow from ``/`` (the emulators consent at once), following every redirect."""
    landed = await client.get("/", headers=HTML, follow_redirects=True)
    assert landed.status_code == 200, landed.text
