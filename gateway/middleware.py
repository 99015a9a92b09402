"""``AuthGateway``: the ASGI entry point of every mode.

Wrap any ASGI app (middleware mode), or the sidecar's upstream proxy (``gateway serve``)::

    app = AuthGateway(my_app, load_config("gateway.yaml"))

Per request (HTTP and WebSocket alike):

1. identity headers sent by the client are removed, always, before anything else;
2. ``<path_prefix>/*`` is answered by the gateway itself (``gateway.handshake``);
3. public paths pass through without identity;
4. otherwise the session cookie must be valid: the verified identity headers and JWT are added
   and the gateway's own cookies removed before the app sees the request;
5. without a session, a browser navigation is sent to the login page (302) and anything else
   gets 401 JSON ``{"error": "login_required", "login_url": ...}``.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import httpx
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access import normalize_path
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.handshake import Handshake
from gateway.identity import Headers, strip_headers
from gateway.pages import error_response, gateway_error_response
from gateway.runtime import Runtime
from gateway.stores import Store

log = logging.getLogger("gateway")


def split_cookies(headers: Headers, names: frozenset[str]) -> tuple[dict[str, str], Headers]:
    """Take the gateway's cookies out of the Cookie headers.

    Returns the gateway cookies found and the headers with those cookies removed (a Cookie header
    left empty is dropped), so the upstream never sees the session ticket.
    """
    found: dict[str, str] = {}
    result: Headers = []
    for key, value in headers:
        if key != b"cookie":
            result.append((key, value))
            continue
        kept = []
        for part in value.decode("latin-1").split(";"):
            name, _, cookie_value = part.strip().partition("=")
            if name in names:
                found.setdefault(name, cookie_value)
            elif part.strip():
                kept.append(part.strip())
        if kept:
            result.append((b"cookie", "; ".join(kept).encode("latin-1")))
    return found, result


class AuthGateway:
    """Authenticates every request to ``app`` and hands it a verified identity."""

    def __init__(
        self,
        app: ASGIApp,
        config: GatewayConfig,
        *,
        store: Store | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.runtime = Runtime(config, store=store, http_client=http_client)
        self.handshake = Handshake(self.runtime)
        self._prefix = config.path_prefix
        self._cookie = config.session.cookie_name
        self._gateway_cookies = frozenset({self._cookie, self.handshake.binding_cookie})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        scope = dict(scope)
        stripped = strip_headers(scope["headers"], self.runtime.spoofable)
        path = normalize_path(scope["path"])
        if path == self._prefix or path.startswith(self._prefix + "/"):
            scope["headers"] = stripped  # the gateway's endpoints read its cookies
            scope["path"] = path
            await self.handshake(scope, receive, send)
            return
        cookies, headers = split_cookies(stripped, self._gateway_cookies)
        scope["headers"] = headers
        if self.runtime.access.is_public(path):
            await self.app(scope, receive, send)
            return
        try:
            ticket = cookies.get(self._cookie)
            authenticated = await self.runtime.authenticator.authenticate(ticket) if ticket else None
        except GatewayError as exc:
            await self._deny(scope, receive, send, gateway_error_response(scope, exc))
            return
        except Exception:
            log.exception("unexpected error while authenticating %s", scope["path"])
            response = error_response(scope, 500, "internal_error",
                                      "Something went wrong in the sign-in gateway. Please try again.")
            await self._deny(scope, receive, send, response)
            return
        if authenticated is None:
            await self._login_required(scope, receive, send)
            return
        if not self.runtime.access.tenant_allowed(authenticated.identity.tenant):
            response = error_response(scope, 403, "tenant_not_allowed",
                                      "Your organisation is not allowed to use this app.")
            await self._deny(scope, receive, send, response)
            return
        scope["headers"] = headers + authenticated.headers
        await self.app(scope, receive, send)

    async def _login_required(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        login_url = f"{self._prefix}/login?next={quote(target.decode('latin-1'), safe='')}"
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        accept = next((value for key, value in scope["headers"] if key == b"accept"), b"")
        if scope["method"] in ("GET", "HEAD") and b"text/html" in accept:
            await send({"type": "http.response.start", "status": 302,
                        "headers": [(b"location", login_url.encode()), (b"cache-control", b"no-store"),
                                    (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        response = error_response(scope, 401, "login_required", "You are not signed in.",
                                  extra={"login_url": login_url}, actions={"Sign in": login_url})
        await response(scope, receive, send)

    async def _deny(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await response(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan to the app, closing the gateway's resources at shutdown."""

        async def receive_and_close() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.runtime.aclose()
            return message

        await self.app(scope, receive_and_close, send)

    async def aclose(self) -> None:
        await self.runtime.aclose()
