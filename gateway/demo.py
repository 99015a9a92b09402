"""``gateway demo``: the gateway in front of a small app, every provider emulator, simulated clients.

Nothing to configure and no account anywhere. Open the printed URL: ``/demo/`` is the tour
(``gateway/demo_tour.py``, pages in ``gateway/demo_pages.py``). For each provider:

- "Open in the browser" walks the browser OAuth redirect against the emulator;
- "Open in the simulated client" makes the gateway see that client's User-Agent (a cookie the
  demo reads, as the real client would add its token to the UA) and the page loads the
  emulator's fake JSSDK, so the in-client silent handshake runs as it would in the app;
- switches make the emulator behave as the provider does when the user refuses, when an
  administrator must approve first, when the access token expires, and when the user signs in
  again on a second device; the timeline shows each step as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import jwt
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.demo_pages import app_page, demo_page, favicon, relay_page, static_file, tour_page
from gateway.demo_tour import BURST, Tour, TourError, emulator_title, tour_providers
from gateway.identity import IdentitySigner
from gateway.middleware import AuthGateway
from gateway.sandbox import Sandbox, available_sandboxes, serve_apps

log = logging.getLogger("gateway.demo")

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


def _verified_claims(token: str, signer: IdentitySigner) -> tuple[dict[str, Any], str]:
    """The identity JWT's claims and what the check said (the app verifies, as upstreams should)."""
    try:
        claims = jwt.decode(token, jwt.PyJWK(signer.jwks()["keys"][0]).key, algorithms=["EdDSA"],
                            audience=signer.audience, issuer=signer.issuer)
        return dict(claims), "verified with the gateway's JWKS"
    except jwt.PyJWTError as exc:
        return {}, f"NOT verified: {exc}"


def _same_origin(request: Request, public_url: str) -> bool:
    """A demo action comes from the demo's own pages (a browser always sends Origin on a POST)."""
    origin = request.headers.get("origin")
    return origin is None or origin.rstrip("/") == public_url.rstrip("/")


async def _json_body(request: Request) -> dict[str, Any] | None:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return None
    try:
        body = json.loads(await request.body())
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _problem(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def demo_app(
    signer_holder: dict[str, IdentitySigner], clients: Mapping[str, str], prefix: str, tour: Tour | None = None
) -> Starlette:
    """The app behind the gateway: it shows the identity it received and verifies the JWT. With a
    ``tour``, ``/demo/`` is the tour (switches and timeline) and ``/demo/api/`` drives it."""

    def identity(request: Request) -> tuple[dict[str, str], dict[str, Any], str]:
        headers = {k: v for k, v in request.headers.items() if k.startswith("x-auth-")}
        claims, verdict = _verified_claims(headers.get("x-auth-identity", ""), signer_holder["signer"])
        return headers, claims, verdict

    async def home(request: Request) -> Response:
        headers, claims, verdict = identity(request)
        name = unquote(headers.get("x-auth-name", "")) or headers.get("x-auth-user", "?")
        if tour is not None and claims:
            title = tour.providers[claims["provider"]].title if claims.get("provider") in tour.providers else "?"
            tour.note("identity", f"the app received the identity of {name} ({title}), JWT {verdict}")
        return app_page(name, claims, verdict, headers, prefix)

    async def whoami(request: Request) -> Response:
        headers, claims, verdict = identity(request)
        burst = request.query_params.get("burst", "")
        if tour is not None and burst.isdigit() and int(burst) <= BURST:
            name = claims.get("name") or claims.get("user", "?")
            tour.note("app", f"request {burst} of {BURST}: the app received {name}'s identity")
        return JSONResponse({"claims": claims, "verified": verdict, "headers": sorted(headers)},
                            headers={"cache-control": "no-store"})

    async def demo_home(request: Request) -> Response:
        if tour is None:
            return _plain_home(clients, prefix)
        state = {entry["name"]: entry for entry in (await _tour_state(tour))["providers"]}
        return tour_page(tour.providers.values(), state, prefix, tour.api_calls)

    async def choose_client(request: Request) -> Response:
        """Open the app as a plain browser (``none``) or inside a simulated client; with
        ``?provider=`` straight to that provider's sign-in, else to the app."""
        plugin = request.path_params["plugin"]
        target = "/"
        name = request.query_params.get("provider", "")
        if tour is not None and name in tour.providers:
            provider = tour.providers[name]
            next_path = provider.next_path
            if request.query_params.get("then") == "relay":  # the relay page, with the app's own query
                next_path = urlunsplit(("", "", "/relay", urlsplit(provider.next_path).query, ""))
            target = f"{prefix}/login?{urlencode({'provider': name, 'next': next_path})}"
            how = "in the simulated client" if plugin in clients else "in the browser"
            tour.note("open", f"open the {'relay page' if next_path.startswith('/relay') else 'app'} with "
                              f"{provider.title} {how}")
        response = RedirectResponse(target, status_code=303)
        if plugin in clients:
            response.set_cookie(DEMO_CLIENT_COOKIE, plugin, path="/", httponly=True, samesite="lax")
        else:
            response.delete_cookie(DEMO_CLIENT_COOKIE, path="/")
        return response

    async def relay(request: Request) -> Response:
        """The page that calls one Open API of the signed-in provider through the relay."""
        if tour is None:
            return _problem(404, "no_tour", "This demo app runs without the tour.")
        claims = identity(request)[1]
        in_client = _cookie(request.scope, DEMO_CLIENT_COOKIE) in clients
        return relay_page(tour, claims, in_client=in_client, prefix=prefix)

    async def tour_api(request: Request) -> Response:
        """``/demo/api/<action>`` (public: nothing here needs the identity) and ``/demo-api/<action>``
        (behind the gateway: the actions on the signed-in user's tokens)."""
        if tour is None:
            return _problem(404, "no_tour", "This demo app runs without the tour.")
        action = request.path_params["action"]
        try:
            if action == "timeline" and request.method == "GET":
                after = request.query_params.get("after", "0")
                return JSONResponse(await tour.timeline(int(after) if after.isdigit() and len(after) < 12 else 0),
                                    headers={"cache-control": "no-store"})
            if action == "state" and request.method == "GET":
                return JSONResponse(await _tour_state(tour), headers={"cache-control": "no-store"})
            if request.method != "POST":
                return _problem(405, "method_not_allowed", "Use POST for the tour's actions.")
            if not _same_origin(request, tour.public_url):
                return _problem(403, "cross_origin", "The tour's actions come from the tour page only.")
            body = await _json_body(request)
            if body is None:
                return _problem(415, "unsupported_media_type", "Send a JSON object.")
            return JSONResponse(await _tour_action(tour, action, body, identity(request)[1], request.url.path))
        except TourError as exc:
            return _problem(exc.status, exc.code, exc.message)

    return Starlette(routes=[
        Route("/", home),
        Route("/whoami", whoami),
        Route("/favicon.ico", lambda request: favicon()),
        Route("/relay", relay),
        Route("/demo/", demo_home),
        Route("/demo/static/{name}", lambda request: static_file(request.path_params["name"])),
        Route("/demo/client/{plugin}", choose_client),
        Route("/demo/api/{action}", tour_api, methods=["GET", "POST"]),
        Route("/demo-api/{action}", tour_api, methods=["POST"]),
    ])


async def _tour_state(tour: Tour) -> dict[str, Any]:
    try:
        return await tour.state()
    except TourError as exc:
        log.warning("the tour could not read the emulators' state: %s", exc.message)
        return {"providers": [{"name": name} for name in tour.providers]}


async def _tour_action(tour: Tour, action: str, body: Mapping[str, Any], claims: Mapping[str, Any],
                       path: str) -> dict[str, Any]:
    name = body.get("provider")
    if not isinstance(name, str):
        raise TourError(400, "provider_missing", "Say which provider (provider: a name).")
    if action == "switch":
        switch, on = body.get("switch"), body.get("on")
        if switch not in ("deny", "approval") or not isinstance(on, bool):
            raise TourError(400, "bad_switch", "Send switch (deny or approval) and on (true or false).")
        await tour.set_switch(name, switch, on)
        return await tour.state()
    if action == "grant":
        granted = body.get("granted")
        if not isinstance(granted, bool):
            raise TourError(400, "bad_grant", "Send granted: true (the user has granted the scope) or false.")
        return await tour.set_user_grant(name, granted)
    if action in ("approve", "reject"):
        await tour.answer_approval(name, "approved" if action == "approve" else "rejected")
        return await tour.state()
    if action in ("expire", "second-device"):
        if not path.startswith("/demo-api/"):
            raise TourError(404, "unknown_action", "This action acts on your session: POST it to /demo-api/.")
        if claims.get("provider") != name:
            title = tour.provider(name).title
            raise TourError(409, "not_signed_in_with", f"Sign in with {title} first: this acts on your session.")
        if action == "expire":
            return await tour.expire_access_token(claims)
        return await tour.second_device(claims)
    raise TourError(404, "unknown_action", f"The tour has no action {action!r}.")


def _plain_home(clients: Mapping[str, str], prefix: str) -> Response:
    """``/demo/`` without the tour (an app built with ``demo_app`` alone, as some tests do)."""
    links = '<a class="button" href="/demo/client/none">Open in the browser</a>'
    for plugin in clients:
        links += (f'<a class="button secondary" href="/demo/client/{html.escape(plugin)}">'
                  f"Open in the simulated {html.escape(plugin)} client</a>")
    body = (
        "<h1>In-client SSO gateway: demo</h1>"
        f"<p>{links}</p>"
        f'<form method="post" action="{html.escape(prefix)}/logout"><button>Sign out</button></form>'
    )
    return demo_page("Gateway demo", body, page_kind="plain")


def demo_config(host: str, port: int, providers: dict[str, dict[str, Any]],
                relay_routes: list[dict[str, Any]] | None = None) -> GatewayConfig:
    return GatewayConfig(
        public_url=f"http://{host}:{port}",
        session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
        access={"public_paths": ["/demo/", "/demo/*", "/favicon.ico"]},
        providers=providers,
        relay={"routes": relay_routes or []},
    )


class PortBusy(Exception):
    """A port the demo needs is taken by another program."""

    def __init__(self, port: int, what: str) -> None:
        super().__init__(port)
        self.port, self.what = port, what

    def __str__(self) -> str:
        return f"port {self.port} is busy ({self.what} needs it): stop what uses it, or pick another --port"


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class RunningDemo:
    url: str
    gateway: AuthGateway
    sandboxes: dict[str, Sandbox]
    #: Each emulator's hosts: emulator -> role -> base URL.
    hosts: dict[str, dict[str, str]]
    tour: Tour
    #: The gateway's server task: it ends on Ctrl-C (uvicorn captures the signal, then re-raises it).
    serving: asyncio.Task[None]


@contextlib.asynccontextmanager
async def running_demo(host: str = "127.0.0.1", port: int = 8000) -> AsyncIterator[RunningDemo]:
    """The whole demo, served: the gateway on ``port``, each emulator host on the next ports."""
    sandboxes: dict[str, Sandbox] = {name: cls() for name, cls in sorted(available_sandboxes().items())}
    wanted = {port: "the demo gateway"}
    for sandbox in sandboxes.values():
        for role in sandbox.hosts():
            wanted[port + len(wanted)] = f"the {emulator_title(sandbox)} emulator's {role} host"
    for candidate, what in wanted.items():
        if _port_taken(host, candidate):
            raise PortBusy(candidate, what)
    cards = tour_providers(sandboxes)
    # What the tour adds to the emulators' own demo settings (e.g. a sign-in with a refresh token).
    tour_settings = {card.name: card.entry.settings for card in cards}
    async with contextlib.AsyncExitStack() as stack:
        providers: dict[str, dict[str, Any]] = {}
        hosts: dict[str, dict[str, str]] = {}
        next_port = port + 1
        for name, sandbox in sandboxes.items():
            try:
                urls = await stack.enter_async_context(serve_apps(sandbox.hosts(), host=host, port=next_port))
            except SystemExit:  # uvicorn could not bind after all (taken since the check)
                raise PortBusy(next_port, f"the {emulator_title(sandbox)} emulator") from None
            next_port += len(urls)
            hosts[name] = urls
            for provider_name, settings in sandbox.demo_providers(urls).items():
                providers[provider_name] = {**settings, **tour_settings.get(provider_name, {})}
        # The relay page's calls, one per provider at most, and the routes that let them through.
        api_calls = {call.provider: call for sandbox in sandboxes.values() for call in sandbox.demo_api_calls()
                     if call.provider in providers}
        config = demo_config(host, port, providers, [call.relay_route() for call in api_calls.values()])
        tour = Tour({name: next(iter(urls.values())) for name, urls in hosts.items()}, config.public_url,
                    config.path_prefix, api_calls, providers=cards,
                    titles={name: emulator_title(sandbox) for name, sandbox in sandboxes.items()},
                    origins=[url for urls in hosts.values() for url in urls.values()])
        stack.push_async_callback(tour.aclose)
        clients = {name: sandbox.client_user_agent for name, sandbox in sandboxes.items()}
        holder: dict[str, IdentitySigner] = {}
        gateway = AuthGateway(demo_app(holder, clients, config.path_prefix, tour), config)
        stack.push_async_callback(gateway.aclose)
        holder["signer"] = gateway.runtime.signer
        tour.runtime = gateway.runtime
        # No access log: the tour's timeline shows the steps (and uvicorn's would print the query
        # strings of the suiteTicket push and the callbacks).
        server = uvicorn.Server(uvicorn.Config(SimulatedClient(gateway, clients), host=host, port=port,
                                               log_level="warning", access_log=False, proxy_headers=False))
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn has no "started" event)
            await asyncio.sleep(0.02)
        if not server.started:
            with contextlib.suppress(SystemExit, Exception):
                await serving
            raise PortBusy(port, "the demo gateway")
        try:
            for sandbox in sandboxes.values():
                await sandbox.demo_started(config.public_url, config.path_prefix)
            yield RunningDemo(config.public_url, gateway, sandboxes, hosts, tour, serving)
        finally:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await serving


def startup_lines(demo: RunningDemo) -> list[str]:
    """What ``gateway demo`` prints once everything answers: which emulator is on which port."""
    lines = [f"  {'Demo gateway + app':<28} {demo.url}"]
    for name, urls in demo.hosts.items():
        title = f"{emulator_title(demo.sandboxes[name])} emulator"
        lines.append(f"  {title:<28} " + ", ".join(f"{role} {url}" for role, url in urls.items()))
    return ["", *lines, "", f"  Demo ready: open {demo.url}/demo/", ""]


async def run_demo(host: str = "127.0.0.1", port: int = 8000) -> None:
    """``gateway demo``: serve until interrupted. Raises ``PortBusy`` before serving anything."""
    async with running_demo(host, port) as demo:
        print("\n".join(startup_lines(demo)), flush=True)
        await demo.serving


if __name__ == "__main__":
    asyncio.run(run_demo())
