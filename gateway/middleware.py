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
from collections.abc import Iterable
from urllib.parse import quote

import httpx
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.access import normalize_path
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.handshake import AUTH_OK_HEADERS, Handshake
from gateway.identity import Headers, strip_headers
from gateway.metrics import AUTHENTICATED, DENIED, ERROR, LOGIN_REQUIRED, PUBLIC, Metrics
from gateway.pages import error_response, gateway_error_response
from gateway.runtime import Runtime
from gateway.stores import Store

log = logging.getLogger("gateway")


# Label values of the request counters (gateway/metrics.py), as the keys the hot path updates.
_AUTHENTICATED, _PUBLIC, _LOGIN_REQUIRED = (AUTHENTICATED,), (PUBLIC,), (LOGIN_REQUIRED,)
_DENIED, _ERROR = (DENIED,), (ERROR,)
# What ``str.strip()`` removes from a latin-1 cookie part, as bytes (ASCII whitespace plus the
# separators and \x85, \xa0 that latin-1 text counts as whitespace).
_COOKIE_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0"


def _take_cookies(value: bytes, names: frozenset[bytes], found: dict[bytes, bytes]) -> bytes:
    """One Cookie header: the gateway's cookies go to ``found`` (the first of each name wins),
    the rest is returned joined (empty when nothing is left)."""
    kept = []
    for part in value.split(b";"):
        part = part.strip(_COOKIE_SPACE)
        if not part:
            continue
        name = part.partition(b"=")[0]
        if name in names:
            found.setdefault(name, part[len(name) + 1:])
        else:
            kept.append(part)
    return b"; ".join(kept)


def split_cookies(headers: Headers, names: frozenset[str]) -> tuple[dict[str, str], Headers]:
    """Take the gateway's cookies out of the Cookie headers.

    Returns the gateway cookies found and the headers with those cookies removed (a Cookie header
    left empty is dropped), so the upstream never sees the session ticket.
    """
    wanted = frozenset(name.encode("latin-1") for name in names)
    found: dict[bytes, bytes] = {}
    result: Headers = []
    for key, value in headers:
        if key != b"cookie":
            result.append((key, value))
            continue
        kept = _take_cookies(value, wanted, found)
        if kept:
            result.append((b"cookie", kept))
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in found.items()}, result


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
        self._prefix_slash = config.path_prefix + "/"
        self._cookie = config.session.cookie_name
        self._gateway_cookies = frozenset({self._cookie, self.handshake.binding_cookie})
        # Precomputed for the hot path (issue 6: the gateway's own cost per request is measured).
        self._cookie_bytes = self._cookie.encode("latin-1")
        self._cookie_names = frozenset(name.encode("latin-1") for name in self._gateway_cookies)
        # A Cookie header holding none of these substrings holds no gateway cookie: it is kept whole.
        self._cookie_markers = tuple(name for name in self._cookie_names
                                     if not any(other != name and other in name for other in self._cookie_names))
        self._ticket_prefix = self._cookie_bytes + b"="
        self._spoofable = self.runtime.spoofable
        self._auth_path = self._prefix + "/auth"
        self._authenticate = self.runtime.authenticator.authenticate
        self._cached = self.runtime.authenticator.cached
        self._access = self.runtime.access
        self._allowed_tenants = self._access.allowed_tenants
        self._requests = self.runtime.metrics.requests
        self._forward_auths = self.runtime.metrics.forward_auth

    def _inbound(self, raw: Iterable[tuple[bytes, bytes]]) -> tuple[bytes | None, Headers]:
        """One pass over the client's headers: identity headers removed (always), the gateway's
        cookies taken out of Cookie. Returns the session ticket (if any) and the headers to pass on."""
        spoofable = self._spoofable
        markers = self._cookie_markers
        prefix = self._ticket_prefix
        ticket: bytes | None = None
        result: Headers = []
        for item in raw:
            key = item[0]
            if key == b"cookie":
                value = item[1]
                # (``59 in value`` and ``value.find``: a bytes needle with ``in`` costs ~8x more.)
                if value.startswith(prefix) and 59 not in value:  # 59: b";"
                    # The usual case: the session cookie alone in the header.
                    if ticket is None:
                        ticket = value[len(prefix):].strip(_COOKIE_SPACE)
                    continue
                for marker in markers:
                    if value.find(marker) >= 0:
                        break
                else:
                    result.append(item)  # none of ours: kept whole
                    continue
                found: dict[bytes, bytes] = {}
                kept = _take_cookies(value, self._cookie_names, found)
                if kept:
                    result.append((b"cookie", kept))
                if ticket is None:
                    ticket = found.get(self._cookie_bytes)
            elif key.lower() not in spoofable:
                result.append(item)
        return ticket, result

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        # normalize_path's own early return, inlined: a function call less per request.
        if "//" in path or "/." in path or path[:1] != "/":
            path = normalize_path(path)
        if path == self._prefix or path.startswith(self._prefix_slash):
            if path == self._auth_path and kind == "http" and await self._forward_auth(scope, send):
                return
            # The gateway's endpoints read its cookies: only the identity headers are removed.
            stripped = strip_headers(scope["headers"], self._spoofable)
            await self.handshake({**scope, "headers": stripped, "path": path}, receive, send)
            return
        raw_ticket, headers = self._inbound(scope["headers"])
        scope = {**scope, "headers": headers}  # a copy: the server's scope is not ours to change
        if self._access.has_public_paths and self._access.is_public(path):
            self._requests[_PUBLIC] += 1
            await self.app(scope, receive, send)
            return
        try:
            if raw_ticket:
                ticket = raw_ticket.decode("latin-1")
                authenticated = self._cached(ticket) or await self._authenticate(ticket)
            else:
                authenticated = None
        except GatewayError as exc:
            self._requests[Metrics.failure(exc.status_code)] += 1
            await self._deny(scope, receive, send, gateway_error_response(scope, exc))
            return
        except Exception:
            log.exception("unexpected error while authenticating %s", scope["path"])
            self._requests[_ERROR] += 1
            response = error_response(scope, 500, "internal_error",
                                      "Something went wrong in the sign-in gateway. Please try again.")
            await self._deny(scope, receive, send, response)
            return
        if authenticated is None:
            self._requests[_LOGIN_REQUIRED] += 1
            await self._login_required(scope, receive, send)
            return
        if self._allowed_tenants and authenticated.identity.tenant not in self._allowed_tenants:
            self._requests[_DENIED] += 1
            response = error_response(scope, 403, "tenant_not_allowed",
                                      "Your organisation is not allowed to use this app.")
            await self._deny(scope, receive, send, response)
            return
        self._requests[_AUTHENTICATED] += 1
        headers.extend(authenticated.headers)  # ``headers`` is our own list, already in the scope
        await self.app(scope, receive, send)

    async def _forward_auth(self, scope: Scope, send: Send) -> bool:
        """``GET <prefix>/auth`` (nginx ``auth_request``) for a valid session: the hot path of
        forward-auth, answered here without building a Request (every app request behind nginx
        costs one of these). Anything else (no or bad session, a public path, an error, another
        tenant) returns False and the handshake's ``auth`` endpoint answers it as always."""
        if scope["method"] not in ("GET", "HEAD"):
            return False
        raw_ticket, _ = self._inbound(scope["headers"])
        if not raw_ticket:
            return False
        if self._access.has_public_paths:
            original_uri = forwarded_uri = None  # the first of each, as the handshake reads them
            for key, value in scope["headers"]:
                if key == b"x-original-uri" and original_uri is None:
                    original_uri = value
                elif key == b"x-forwarded-uri" and forwarded_uri is None:
                    forwarded_uri = value
            original = (original_uri or forwarded_uri or b"/").decode("latin-1")
            if self._access.is_public_uri(original):
                return False
        try:
            ticket = raw_ticket.decode("latin-1")
            authenticated = self._cached(ticket) or await self._authenticate(ticket)
        except Exception:  # the handshake asks again and answers the error properly
            return False
        if authenticated is None or not self._access.tenant_allowed(authenticated.identity.tenant):
            return False
        self._forward_auths[_AUTHENTICATED] += 1
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*AUTH_OK_HEADERS, *authenticated.headers]})
        await send({"type": "http.response.body", "body": b""})
        return True

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
