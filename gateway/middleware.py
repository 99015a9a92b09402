"""``AuthGateway``: the ASGI entry point of every mode.

Wrap any ASGI app (middleware mode), or the sidecar's upstream proxy (``gateway serve``)::

    app = AuthGateway(my_app, load_config("gateway.yaml"))

Per request (HTTP and WebSocket alike):

1. the edge (``gateway.edge``) settles the request before anything else: identity headers sent
   by the client removed in every spelling, forwarding headers believed only from trusted
   proxies, the client's Connection header applied to the client's headers only, the body framing
   checked, the path normalised and rewritten so the app routes exactly what is judged here;
2. ``<path_prefix>/*`` is answered by the gateway itself (``gateway.handshake``);
3. public paths pass through without identity;
4. otherwise the session cookie must be valid: the verified identity headers and JWT are added
   and the gateway's own cookies removed before the app sees the request;
5. without a session, a browser navigation is sent to the login page (302) and anything else
   gets 401 JSON ``{"error": "login_required", "login_url": ...}``.
"""

from __future__ import annotations

import logging
import os

import httpx
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.edge import Edge, EdgeRejected, first_header, normalize_target
from gateway.errors import GatewayError
from gateway.handshake import ForwardAuthHeaders, Handshake, login_required_response
from gateway.logs import acceptable_request_id, client_ip, request_client_ip, request_id
from gateway.metrics import AUTHENTICATED, DENIED, ERROR, LOGIN_REQUIRED, PUBLIC, Metrics
from gateway.pages import error_response, gateway_error_response
from gateway.runtime import Runtime
from gateway.stores import Store

log = logging.getLogger("gateway")


# Label values of the request counters (gateway/metrics.py), as the keys the hot path updates.
_AUTHENTICATED, _PUBLIC, _LOGIN_REQUIRED = (AUTHENTICATED,), (PUBLIC,), (LOGIN_REQUIRED,)
_DENIED, _ERROR = (DENIED,), (ERROR,)
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
        self._edge = Edge(
            identity_headers=config.identity.headers.model_dump().values(),
            trusted_proxies=config.access.trusted_proxies, gateway_cookies=self._gateway_cookies,
            session_cookie=self._cookie, forwarding_headers=[config.access.forward_auth_uri_header],
        )
        self._edge_headers = self._edge.headers
        self._auth_path = self._prefix + "/auth"
        self._uri_header = config.access.forward_auth_uri_header.lower().encode("latin-1")
        self._websocket_origins = frozenset(config.access.websocket_origins or [config.origin.lower()])
        self._authenticate = self.runtime.authenticator.authenticate
        self._cached = self.runtime.authenticator.cached
        self._access = self.runtime.access
        self._allowed_tenants = self._access.allowed_tenants
        self._requests = self.runtime.metrics.requests
        self._forward_auths = self.runtime.metrics.forward_auth
        self._forward_auth_headers = ForwardAuthHeaders(config)
        self._trusted = self._edge.trusted
        self._any_trusted = bool(self._trusted)  # once: TrustedProxies.__bool__ is a call per request
        self._set_request_id = request_id.set
        self._set_client_ip = request_client_ip.set

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        # The request id (gateway/logs.py): a trusted proxy's X-Request-Id, else a new one. Set in
        # the request's context (uvicorn runs each request in a task of its own, so it ends with
        # the request) before anything can log or answer an error.
        client = scope.get("client")
        peer = client[0] if client else None
        from_proxy = self._any_trusted and peer in self._trusted
        proxied = self._proxy_request_id(scope["headers"]) if from_proxy else None
        generated = proxied is None
        # gateway.logs.new_request_id, inlined: one call less per request.
        rid = os.urandom(8).hex() if proxied is None else proxied
        self._set_request_id(rid)
        path = scope["path"]
        raw_path = scope.get("raw_path")
        never_public = False
        # Nothing for normalize_target to do without "//", "/." or an escape (37: b"%"): tested
        # inline, a function call less per request.
        if "//" in path or "/." in path or path[:1] != "/" or (raw_path is not None and 37 in raw_path):
            try:
                target = normalize_target(path, raw_path)
            except EdgeRejected as exc:
                self._requests[_DENIED] += 1
                await self._deny(scope, receive, send, gateway_error_response(scope, exc))
                return
            path, never_public = target.path, target.never_public
            # The relay refuses a path the edge had to rewrite (gateway/relay.py): it judges <path> as sent.
            scope = {**scope, "path": path, "raw_path": target.raw_path, "gateway.path_rewritten": target.rewritten}
        own = path == self._prefix or path.startswith(self._prefix_slash)
        try:
            # The gateway's endpoints read its cookies; the app never sees them.
            raw_ticket, headers = self._edge_headers(scope["headers"], peer, strip_cookies=not own)
        except EdgeRejected as exc:
            self._requests[_DENIED] += 1
            await self._deny(scope, receive, send, gateway_error_response(scope, exc))
            return
        if generated:
            # The edge dropped a client's X-Request-Id (any spelling) unless a trusted proxy sent
            # it; a trusted one's unfit value is replaced too. The app sees the id we log.
            if from_proxy:
                headers = [item for item in headers if item[0] != b"x-request-id"]
            headers.append((b"x-request-id", rid.encode("ascii")))
        scope = {**scope, "headers": headers}  # a copy: the server's scope is not ours to change
        if own:
            scope["gateway.session_ticket"] = raw_ticket  # as the edge read it: the relay's caller
            if path == self._auth_path and kind == "http" and \
                    await self._forward_auth(scope, raw_ticket, send, peer, from_proxy):
                return
            self._bind_client_ip(scope, peer, from_proxy)
            await self.handshake(scope, receive, send)
            return
        if self._access.has_public_paths and not never_public and self._access.is_public(path):
            self._requests[_PUBLIC] += 1
            await self.app(scope, receive, send)
            return
        try:
            if raw_ticket:
                ticket = raw_ticket.decode("latin-1")
                authenticated = self._cached(ticket)
                if authenticated is None:  # a store round trip, perhaps a token refresh (audited)
                    self._bind_client_ip(scope, peer, from_proxy)
                    authenticated = await self._authenticate(ticket)
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
        if kind == "websocket" and not self._origin_allowed(headers):
            # A cookie rides along on a cross-site WebSocket too: only our own pages may open one.
            self._requests[_DENIED] += 1
            await send({"type": "websocket.close", "code": 1008})
            return
        self._requests[_AUTHENTICATED] += 1
        headers.extend(authenticated.headers)  # ``headers`` is our own list, already in the scope
        scope["gateway.identity"] = authenticated.identity  # our own copy of the scope (gateway.verify)
        await self.app(scope, receive, send)

    def _bind_client_ip(self, scope: Scope, peer: str | None, from_proxy: bool) -> None:
        """The client's address in the request's context (``gateway.logs.request_client_ip``), for
        the audit events written where no request is at hand (a token refresh in
        gateway/tokens.py). Bound only once the request leaves the fast path (a cached session, a
        public path: nothing there writes an audit event), which saves a context-variable write
        per request (~950 instructions, docs/benchmarks.md)."""
        self._set_client_ip(client_ip(scope, self._trusted) if from_proxy else peer)

    @staticmethod
    def _proxy_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
        """A trusted proxy's X-Request-Id, if it is fit to log (gateway.logs.acceptable_request_id)."""
        value = first_header(headers, b"x-request-id")
        return acceptable_request_id(value) if value is not None else None

    def _origin_allowed(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """A WebSocket's Origin is ours or listed in ``access.websocket_origins`` (browsers always
        send one; a client without one is no browser and carries no one else's cookie)."""
        origin = first_header(headers, b"origin")
        return origin is None or origin.decode("latin-1").rstrip("/").lower() in self._websocket_origins

    async def _forward_auth(self, scope: Scope, raw_ticket: bytes | None, send: Send, peer: str | None,
                            from_proxy: bool) -> bool:
        """``GET <prefix>/auth`` (nginx ``auth_request``, Caddy ``forward_auth``) for a valid
        session: the hot path of forward-auth, answered here without building a Request (every
        app request behind the proxy costs one of these). Anything else (no or bad session, a
        public path, an error, another tenant) returns False and the handshake's ``auth``
        endpoint answers it as always."""
        if scope["method"] not in ("GET", "HEAD") or not raw_ticket:
            return False
        if self._access.has_public_paths:
            # The edge kept this header only if a trusted proxy sent it.
            original = first_header(scope["headers"], self._uri_header)
            if self._access.is_public_uri(original.decode("latin-1") if original else None):
                return False
        try:
            ticket = raw_ticket.decode("latin-1")
            authenticated = self._cached(ticket)
            if authenticated is None:
                self._bind_client_ip(scope, peer, from_proxy)
                authenticated = await self._authenticate(ticket)
        except Exception:  # the handshake asks again and answers the error properly
            return False
        if authenticated is None or not self._access.tenant_allowed(authenticated.identity.tenant):
            return False
        self._forward_auths[_AUTHENTICATED] += 1
        # Every identity header, empty when unknown (ForwardAuthHeaders: what Caddy copies).
        await send({"type": "http.response.start", "status": 200,
                    "headers": self._forward_auth_headers(authenticated.headers)})
        await send({"type": "http.response.body", "body": b""})
        return True

    async def _login_required(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        response = login_required_response(scope, self._prefix, target.decode("latin-1"))
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
