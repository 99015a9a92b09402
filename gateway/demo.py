"""``gateway demo``: the gateway in front of a small app, every provider emulator, simulated clients.

Nothing to configure and no account anywhere. Open the printed URL:

- "Open in the browser" walks the browser OAuth redirect against the emulator;
- "Open in the simulated <client>" makes the gateway see that client's User-Agent (a cookie the
  demo reads, as the real client would add its token to the UA) and the page loads the
  emulator's fake JSSDK, so the in-client silent handshake runs as it would in the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.identity import IdentitySigner
from gateway.middleware import AuthGateway
from gateway.pages import page
from gateway.sandbox import Sandbox, available_sandboxes, serve_apps

DEMO_CLIENT_COOKIE = "demo_client"


class SimulatedClient:
    """Appends a provider client's User-Agent token when the demo's client cookie says so."""

    def __init__(self, app: ASGIApp, user_agents: Mapping[str, str]) -> None:
        self.app = app
        self.user_agents = dict(user_agents)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        client = _cookie(scope, DEMO_CLIENT_COOKIE)
        suffix = self.user_agents.get(client or "")
        if suffix:
            headers = [(k, v) for k, v in scope["headers"] if k != b"user-agent"]
            original = next((v for k, v in scope["headers"] if k == b"user-agent"), b"")
            headers.append((b"user-agent", original + b" " + suffix.encode()))
            scope = dict(scope, headers=headers)
        await self.app(scope, receive, send)


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope["headers"]:
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                cookie_name, _, cookie_value = part.strip().partition("=")
                if cookie_name == name:
                    return str(cookie_value)
    return None


def demo_app(signer_holder: dict[str, IdentitySigner], clients: Mapping[str, str], prefix: str) -> Starlette:
    """The app behind the gateway: it shows the identity it received and verifies the JWT."""

    async def home(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.startswith("x-auth-")}
        token = headers.get("x-auth-identity", "")
        signer = signer_holder["signer"]
        try:
            claims = jwt.decode(token, jwt.PyJWK(signer.jwks()["keys"][0]).key, algorithms=["EdDSA"],
                                audience=signer.audience, issuer=signer.issuer)
            verdict = "verified with the gateway's JWKS"
        except jwt.PyJWTError as exc:
            claims, verdict = {}, f"NOT verified: {exc}"
        rows = "".join(
            f"<tr><td><code>{html.escape(k)}</code></td><td>{html.escape(v[:80])}</td></tr>"
            for k, v in sorted(headers.items())
        )
        name = unquote(headers.get("x-auth-name", ""))
        body = (
            f"<h1>Hello, {html.escape(name or headers.get('x-auth-user', '?'))}</h1>"
            "<p>This page is the demo app behind the gateway. It received these headers:</p>"
            f"<table>{rows}</table><p>Identity JWT: {html.escape(verdict)}</p>"
            f"<pre>{html.escape(str(claims))}</pre>"
            f'<form method="post" action="{prefix}/logout"><button>Sign out</button></form>'
            '<p><a class="button secondary" href="/demo/">Demo home</a></p>'
        )
        return page("Demo app", body)

    async def demo_home(request: Request) -> Response:
        links = '<a class="button" href="/demo/client/none">Open in the browser</a>'
        for plugin in clients:
            links += (f'<a class="button secondary" href="/demo/client/{html.escape(plugin)}">'
                      f"Open in the simulated {html.escape(plugin)} client</a>")
        body = (
            "<h1>In-client SSO gateway: demo</h1>"
            "<p>The app at <code>/</code> sits behind the gateway. Pick how to open it: in a plain browser "
            "(OAuth redirect to the provider emulator) or inside a simulated client (silent JSAPI handshake).</p>"
            f"<p>{links}</p>"
            f'<form method="post" action="{prefix}/logout"><button>Sign out</button></form>'
        )
        return page("Gateway demo", body)

    async def choose_client(request: Request) -> Response:
        plugin = request.path_params["plugin"]
        response = RedirectResponse("/", status_code=303)
        if plugin in clients:
            response.set_cookie(DEMO_CLIENT_COOKIE, plugin, path="/", httponly=True, samesite="lax")
        else:
            response.delete_cookie(DEMO_CLIENT_COOKIE, path="/")
        return response

    return Starlette(routes=[
        Route("/", home),
        Route("/demo/", demo_home),
        Route("/demo/client/{plugin}", choose_client),
    ])


def demo_config(host: str, port: int, providers: dict[str, dict[str, Any]]) -> GatewayConfig:
    return GatewayConfig(
        public_url=f"http://{host}:{port}",
        session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
        access={"public_paths": ["/demo/", "/demo/*", "/favicon.ico"]},
        providers=providers,
    )


async def run_demo(host: str = "127.0.0.1", port: int = 8000) -> None:
    sandboxes: dict[str, Sandbox] = {name: cls() for name, cls in sorted(available_sandboxes().items())}
    async with contextlib.AsyncExitStack() as stack:
        providers: dict[str, dict[str, Any]] = {}
        next_port = port + 1
        for sandbox in sandboxes.values():
            urls = await stack.enter_async_context(serve_apps(sandbox.hosts(), host=host, port=next_port))
            next_port += len(urls)
            providers.update(sandbox.demo_providers(urls))
        config = demo_config(host, port, providers)
        clients = {name: sandbox.client_user_agent for name, sandbox in sandboxes.items()}
        holder: dict[str, IdentitySigner] = {}
        gateway = AuthGateway(demo_app(holder, clients, config.path_prefix), config)
        holder["signer"] = gateway.runtime.signer
        server = uvicorn.Server(uvicorn.Config(SimulatedClient(gateway, clients), host=host, port=port,
                                               log_level="info", proxy_headers=False))
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
            await asyncio.sleep(0.02)
        if server.started:
            for sandbox in sandboxes.values():
                await sandbox.demo_started(config.public_url, config.path_prefix)
            print(f"\n  Demo ready: open http://{host}:{port}/demo/\n", flush=True)
        await serving
        await gateway.aclose()


if __name__ == "__main__":
    asyncio.run(run_demo())
