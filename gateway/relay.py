"""``ANY <prefix>/api/<provider>/<path>``: a provider's Open API, called with the user's (or the
app's) token, so that apps never hold provider tokens (design section 13, docs/relay.md).

One call, in order; every refusal is decided before anything reaches the provider:

1. ``<path>`` is judged as sent: the edge has already normalised the request path, and a path
   it had to rewrite (dot or empty segments, ``%2e%2e``) is refused here, as is one with ``;``,
   ``\\``, an encoded separator or ``%25``, or a first segment with ``@`` or ``:`` (an absolute
   URL, a userinfo): ``400 bad_path``. The URL sent is always the provider's configured base URL
   plus that path, and its host is checked again once built.
2. Only ``relay.routes`` are reachable (glob on ``<path>``, methods): else ``403 relay_forbidden``.
3. The caller: ``Authorization: Bearer <identity JWT>`` is a server call (the upstream passing on
   the ``X-Auth-Identity`` it received; signature, issuer, audience and expiry checked); otherwise
   the session cookie, and a non-GET must come from our own origin (``403 cross_origin``).
4. The token: the user's, from the token record (refreshed first when due), or the app token
   (``token: app``). A route's ``scopes`` the grant lacks (when the provider reports scopes) are
   ``403 consent_required`` before the call.
5. The request goes out with the caller's credentials removed (``Cookie``, ``Authorization``,
   the provider's token headers, an ``access_token`` query parameter) and the plugin's attached
   (``Provider.relay_auth``); hop-by-hop headers are dropped as in the sidecar (gateway/proxy.py).
   The body streams; one up to ``relay.replay_body_bytes`` is kept so the call can be made again.
6. The answer is read by the plugin (``Provider.relay_verdict``) when it is small JSON (error
   envelopes are); anything else streams through unread. A token-expired answer: one
   single-flight refresh (gateway/tokens.py, the same flight as every other refresh of that
   record) and one retry, never more. A missing scope: ``403 consent_required`` with
   ``consent_url``. A rate limit passes through with its hints and ``Retry-After``, never retried.
   A transient failure: ``503 provider_unavailable`` with ``Retry-After``, never a logout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from fnmatch import translate
from typing import Any, Literal, NamedTuple
from urllib.parse import quote, quote_from_bytes, unquote_to_bytes, urlencode, urlsplit

import jwt
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from gateway.config import RelayRoute
from gateway.edge import FORWARDING_HEADERS, first_header
from gateway.errors import GatewayError, ProviderError, ProviderUnavailable, ReauthRequired
from gateway.http1 import (
    HOP_BY_HOP,
    Connection,
    DisconnectWatch,
    HeaderView,
    Pool,
    UpstreamBusy,
    UpstreamFailed,
    declared_length,
    exchange,
    hop_by_hop,
    send_body,
)
from gateway.logs import request_id
from gateway.pages import POLICY_HEADER_NAMES, error_response, gateway_error_response, relay_policy_headers
from gateway.providers import Provider, RelayVerdict, TokenSet
from gateway.runtime import Runtime
from gateway.state import safe_next
from gateway.tokens import token_key

log = logging.getLogger("gateway.relay")

#: How many resolved ``<path>``/method pairs are kept (``Relay._plan``), of paths up to this length.
_PLANS = 1024
_PLAN_PATH_BYTES = 512
#: A JSON answer up to this size is read whole and shown to the plugin (error envelopes are a few
#: hundred bytes); anything larger, or not JSON, streams through without being read.
_CLASSIFY_BYTES = 64 * 1024
#: The first segment of ``<path>`` holding one of these could read as a scheme or a userinfo.
_HOST_LIKE = re.compile(r"[@:]")
#: Escapes that would let a second decoder see another path: ``/``, ``\\``, ``%`` itself, NUL.
_AMBIGUOUS_ESCAPES = re.compile(r"%(2f|5c|25|00)", re.IGNORECASE)
#: Request headers never passed to the provider, besides hop-by-hop ones.
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"cookie", b"authorization", b"content-length", b"expect", b"accept-encoding",
    b"origin", b"referer", b"proxy-authorization", b"x-request-id",  # the gateway's own id goes instead
} | {name.lower().encode() for name in FORWARDING_HEADERS}
#: What may stand in a query as sent (RFC 3986 query characters; ``%`` keeps the caller's escapes).
_QUERY_SAFE = "!$&'()*+,;=:@/?%"
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: Response headers never passed back: hop-by-hop ones, cookies the provider sets (they would
#: land on the app's origin), and the policy headers (the relay's own replace them).
_RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"set-cookie2"} | POLICY_HEADER_NAMES


class RelayRefused(GatewayError):
    status_code = 403
    code = "relay_forbidden"


class ConsentRequired(GatewayError):
    """The grant lacks ``scopes``: the caller (or its user) must consent first."""

    status_code = 403
    code = "consent_required"

    def __init__(self, message: str, *, provider: str, scopes: Sequence[str], consent_url: str) -> None:
        super().__init__(message)
        self.provider, self.scopes, self.consent_url = provider, list(scopes), consent_url


@dataclass(frozen=True)
class _Route:
    pattern: re.Pattern[str]
    methods: frozenset[str]
    token: Literal["user", "app"]
    scopes: tuple[str, ...]


class _Progress:
    """How far the answer has got: begun (an error can no longer be answered), and the watch that
    stops a streamed answer when the caller leaves."""

    __slots__ = ("started", "watch")

    def __init__(self, receive: Receive) -> None:
        self.started = False
        self.watch = DisconnectWatch(receive)


class _Caller(NamedTuple):
    provider: str
    tenant: str
    user: str
    key: str  # the token record
    server: bool  # a server call (identity JWT), not a browser


class _Plan(NamedTuple):
    """A ``<path>`` and method as sent, resolved: the route, and what the request head needs."""

    provider: Provider
    route: _Route
    path: str
    origin: str
    target_path: bytes  # the base URL's path and ``<path>``
    fixed: bytes  # the head's headers that depend on the base URL alone (Host, Accept-Encoding)


class _Body:
    """The request body: kept whole when it is at most ``keep`` bytes (the call can be made again),
    else streamed once, straight from the client. Bounded by ``limit`` either way."""

    def __init__(self, receive: Receive, *, keep: int, limit: int) -> None:
        self._receive = receive
        self._keep, self._limit = keep, limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._more = True
        self.streamed = False

    async def prepare(self) -> None:
        while self._more and self._size <= self._keep:
            await self._read()

    async def _read(self) -> None:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            raise GatewayError("The client went away.", code="client_disconnected", status_code=400)
        chunk = message.get("body", b"")
        self._size += len(chunk)
        if self._size > self._limit:
            raise GatewayError("The request body is too large for the relay.", code="body_too_large",
                               status_code=413)
        if chunk:
            self._chunks.append(chunk)
        self._more = message.get("more_body", False)

    @property
    def replayable(self) -> bool:
        return not self._more and not self.streamed

    def content(self) -> bytes | AsyncIterator[bytes]:
        if not self._more:
            return b"".join(self._chunks)
        self.streamed = True
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        kept, self._chunks = self._chunks, []
        for chunk in kept:
            yield chunk
        while self._more:
            await self._read()
            chunk = self._chunks.pop() if self._chunks else b""
            if chunk:
                yield chunk


class Relay:
    """The ASGI app behind ``<prefix>/api/``; the handshake router hands it those requests."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.prefix = runtime.config.path_prefix
        self._api_prefix = f"{self.prefix}/api/".encode()
        #: The headers on every relay answer (gateway/pages.py ``relay_policy_headers``).
        self.policy = relay_policy_headers(self.config.access.frame_ancestors)
        self._plans: dict[tuple[bytes, str], _Plan] = {}
        self._routes: dict[str, list[_Route]] = {}
        for route in self.config.relay.routes:
            self._routes.setdefault(route.provider, []).append(_compile(route))

    def scopes_allowed(self, provider: str) -> frozenset[str]:
        """The scopes ``/consent`` may ask for: the routes' own and ``relay.consent_scopes``."""
        declared = {scope for route in self._routes.get(provider, ()) for scope in route.scopes}
        return frozenset(declared | set(self.config.relay.consent_scopes))

    def consent_url(self, provider: str, scopes: Sequence[str], next_path: str,
                    grant: Literal["user", "app"] = "user") -> str:
        """Where the user consents (gateway/consent.py); ``grant=app``: an administrator grants
        the app's own token the scopes (DingTalk's openAuth type 1)."""
        query = {"provider": provider, "scopes": ",".join(scopes), "next": next_path}
        if grant == "app":
            query["grant"] = "app"
        return f"{self.prefix}/consent?{urlencode(query)}"

    # -- ASGI ---------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        progress = _Progress(receive)
        try:
            await self._call(scope, receive, send, progress)
        except asyncio.CancelledError:
            watch = progress.watch
            if not watch.gone or watch.task is None:
                raise
            watch.task.uncancel()  # the caller left: nobody to answer, the provider's answer is dropped
        except ConsentRequired as exc:
            await self._answer(_consent_response(scope, exc), scope, receive, send)
        except GatewayError as exc:
            if progress.started:
                raise
            if isinstance(exc, ProviderError) and exc.provider_code is not None:
                log.info("relay: provider answered %s (%s)", exc.code, exc.provider_code)
            login_url = f"{self.prefix}/login?next={quote(_page_path(scope['headers']), safe='')}"
            await self._answer(_json_error(scope, exc, login_url), scope, receive, send)
        except Exception:
            if progress.started:
                raise
            log.exception("unexpected error in the relay")
            await self._answer(error_response({**scope, "headers": _json_accept(scope)}, 500, "internal_error",
                                              "Something went wrong in the sign-in gateway. Please try again."),
                               scope, receive, send)
        finally:
            progress.watch.stop()

    async def _answer(self, response: Response, scope: Scope, receive: Receive, send: Send) -> None:
        """One of the relay's own answers (an error), with the relay's policy headers."""
        response.raw_headers.extend(self.policy)
        await response(scope, receive, send)

    async def _call(self, scope: Scope, receive: Receive, send: Send, progress: _Progress) -> None:
        method = scope["method"]
        plan = self._plan(scope, method)
        provider, route, path, name = plan.provider, plan.route, plan.path, plan.provider.name
        caller = await self._caller(scope, name, method)
        headers = scope["headers"]
        declared = declared_length(headers)
        limit = self.config.relay.max_body_bytes
        if declared is not None and declared > limit:
            raise GatewayError("The request body is too large for the relay.", code="body_too_large",
                               status_code=413)
        query: bytes = scope.get("query_string", b"")
        forwarded = _forward_headers(headers, provider.relay_credential_headers)
        body = _Body(receive, keep=self.config.relay.replay_body_bytes, limit=limit)
        await body.prepare()

        tokens, token = await self._token(provider, caller, route, headers)
        origin, target_path, fixed = plan.origin, plan.target_path, plan.fixed
        pool = self.runtime.relay_http.get(origin)
        rid = request_id.get()
        if rid is not None:
            fixed += b"x-request-id: " + rid.encode("ascii") + b"\r\n"
        for attempt in (1, 2):
            auth = provider.relay_auth(path, token, kind=route.token, tokens=tokens)
            target = target_path + _query(query, provider.relay_credential_params, auth.params)
            content = body.content() if method not in ("GET", "HEAD") or declared or body.streamed else b""
            head = _request_head(method, target, fixed, forwarded, auth.headers, content, declared)
            for observe in self.runtime.relay_http.observers:
                observe(origin, head, content if isinstance(content, bytes) else None)
            answer = _Answer(await self._send(provider, pool, method, head, content, declared), pool)
            try:
                verdict = await answer.verdict(provider)
                if verdict.outcome == "expired" and attempt == 1:
                    renewed = await self._renew(provider, caller, route, token)
                    if not body.replayable:
                        # The body went to the provider and is gone: the next call has the new token.
                        await answer.relay(send, verdict, self.policy, progress)
                        return
                    tokens, token = renewed
                    continue
                if verdict.outcome == "consent":
                    scopes = verdict.scopes or route.scopes
                    raise ConsentRequired(
                        "This needs your permission first: the app asks for access it does not have yet.",
                        provider=name, scopes=scopes,
                        consent_url=self.consent_url(name, scopes, _page_path(headers), route.token))
                if verdict.outcome == "unavailable":
                    raise ProviderUnavailable(
                        verdict.message or f"{provider.display_name or name} is unavailable right now.",
                        retry_after_s=verdict.retry_after_s or 5)
                if verdict.outcome == "misconfigured":
                    raise GatewayError(verdict.message or "This route cannot be called with this token.",
                                       code="relay_misconfigured", status_code=502)
                await answer.relay(send, verdict, self.policy, progress)
                return
            finally:
                answer.close()

    # -- the parts ------------------------------------------------------------------------------

    def _plan(self, scope: Scope, method: str) -> _Plan:
        """Where this call goes, decided once per ``<path>`` and method as sent (a refusal is
        decided again each time: only accepted paths are kept)."""
        if scope.get("gateway.path_rewritten"):
            # Dot or empty segments, resolved by the edge: what was sent is not what would be called.
            raise GatewayError("The API path has '.', '..' or empty segments.", code="bad_path", status_code=400)
        raw: bytes = scope.get("raw_path") or quote(scope["path"]).encode()
        plan = self._plans.get((raw, method))
        if plan is not None:
            return plan
        name, path = self._target(raw)
        provider = self.runtime.providers.get(name)
        if provider is None:
            raise GatewayError(f"No provider named {name!r} is configured.", code="unknown_provider", status_code=404)
        route = self._route(name, path, method)
        base = provider.relay_base_url(path)
        if base is None:
            raise RelayRefused(f"{provider.display_name or name} serves no API at this path through the gateway.")
        if urlsplit(f"{base}/{path}").netloc != urlsplit(base).netloc:  # belt and braces: the path cannot move hosts
            raise GatewayError("The path cannot be relayed.", code="bad_path", status_code=400)
        origin, base_path, fixed = _split_base(base)
        plan = _Plan(provider, route, path, origin, f"{base_path}/{path}".encode("latin-1"), fixed)
        if len(raw) <= _PLAN_PATH_BYTES:  # a long path (anyone can send one, signed in or not) is not kept
            if len(self._plans) >= _PLANS:
                self._plans.clear()  # bounded: many distinct paths just start the cache again
            self._plans[(raw, method)] = plan
        return plan

    def _target(self, raw: bytes) -> tuple[str, str]:
        """(provider name, ``<path>``) of the raw request path, or a 400 for anything ambiguous."""
        if not raw.startswith(self._api_prefix):
            raise RelayRefused("Name a provider and an API path: <prefix>/api/<provider>/<path>.")
        text = raw[len(self._api_prefix):].decode("latin-1")
        name, _, path = text.partition("/")
        segments = path.split("/")
        if (not name or not path or "\\" in text or ";" in text or _AMBIGUOUS_ESCAPES.search(text)
                or any(segment in ("", ".", "..") for segment in segments)
                or _HOST_LIKE.search(segments[0]) or not _visible_ascii(text)):
            raise GatewayError("The API path is not one the gateway relays (no '..', '//', ';', '\\', "
                               "encoded separators or hosts).", code="bad_path", status_code=400)
        return name, path

    def _route(self, provider: str, path: str, method: str) -> _Route:
        wanted = "GET" if method == "HEAD" else method
        for route in self._routes.get(provider, ()):
            if route.pattern.fullmatch(path) and (wanted in route.methods or method in route.methods):
                return route
        raise RelayRefused("This API is not open through the gateway (relay.routes does not list it).")

    async def _caller(self, scope: Scope, provider: str, method: str) -> _Caller:
        headers = scope["headers"]
        authorization = first_header(headers, b"authorization")
        if authorization is not None:
            kind, _, credential = authorization.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and credential.strip().count(".") == 2:
                return self._server_caller(credential.strip(), provider)
            # Any other Authorization is the caller's own business: dropped, never forwarded.
        # The session cookie as the edge read it (gateway/edge.py, every spelling and duplicate).
        ticket: bytes | None = scope.get("gateway.session_ticket")
        authenticated = await self.runtime.authenticator.authenticate(ticket.decode("latin-1")) if ticket else None
        if authenticated is None:
            raise GatewayError("You are not signed in.", code="login_required", status_code=401)
        if method not in ("GET", "HEAD"):
            _require_our_origin(headers, self.config.origin)
        identity = authenticated.identity
        if identity.provider != provider:
            raise RelayRefused("You are signed in with another provider than this API's.")
        if not self.runtime.access.tenant_allowed(identity.tenant):
            raise GatewayError("Your organisation is not allowed to use this app.", code="tenant_not_allowed",
                               status_code=403)
        return _Caller(provider, identity.tenant, identity.user, authenticated.record.token_key, server=False)

    def _server_caller(self, token: str, provider: str) -> _Caller:
        signer = self.runtime.signer
        try:
            claims: dict[str, Any] = jwt.decode(
                token, signer.public_key, algorithms=["EdDSA"], audience=signer.audience, issuer=signer.issuer,
                options={"require": ["exp", "iat", "sub", "aud", "iss"]}, leeway=5)
        except jwt.PyJWTError:
            raise GatewayError("The identity token is invalid or has expired.", code="login_required",
                               status_code=401) from None
        fields = [claims.get(name) for name in ("provider", "tenant", "user")]
        if not all(isinstance(value, str) for value in fields) or not fields[2]:
            raise GatewayError("The identity token is invalid or has expired.", code="login_required", status_code=401)
        name, tenant, user = (str(value) for value in fields)
        if name != provider:
            raise RelayRefused("This identity belongs to another provider than this API's.")
        if not self.runtime.access.tenant_allowed(tenant):
            raise GatewayError("This organisation is not allowed to use this app.", code="tenant_not_allowed",
                               status_code=403)
        return _Caller(name, tenant, user, token_key(name, tenant, user), server=True)

    async def _token(self, provider: Provider, caller: _Caller, route: _Route, headers: Sequence[tuple[bytes, bytes]]
                     ) -> tuple[TokenSet | None, str]:
        if route.token == "app":
            return None, await provider.relay_app_token(caller.tenant)
        try:
            tokens = await self.runtime.tokens.current(caller.key, provider.name)
        except ReauthRequired:
            raise GatewayError("Your sign-in has ended; please sign in again.", code="login_required",
                               status_code=401) from None
        granted = provider.granted_scopes(tokens) if route.scopes else None
        missing = [scope for scope in route.scopes if granted is not None and scope not in granted]
        if missing or not tokens.access_token:
            # No user token at all (e.g. DingTalk's free login gives none): consent gives one.
            scopes = missing or list(route.scopes)
            raise ConsentRequired("This needs your permission first: the app asks for access it does not have yet.",
                                  provider=provider.name, scopes=scopes,
                                  consent_url=self.consent_url(provider.name, scopes, _page_path(headers)))
        return tokens, tokens.access_token

    async def _renew(self, provider: Provider, caller: _Caller, route: _Route, refused: str
                     ) -> tuple[TokenSet | None, str]:
        """Tokens to retry with after ``refused`` was answered as expired: one single-flight refresh."""
        if route.token == "app":
            await provider.relay_app_token_rejected(caller.tenant, refused)
            token = await provider.relay_app_token(caller.tenant)
            tokens = None
        else:
            try:
                tokens = await self.runtime.tokens.refresh_rejected(caller.key, provider.name, refused)
            except ReauthRequired:
                raise GatewayError("Your sign-in has ended; please sign in again.", code="login_required",
                                   status_code=401) from None
            token = tokens.access_token
        if token == refused:
            # Refreshing is being backed off (a transient failure just now): not the same call again.
            raise ProviderUnavailable("The provider refused the token and cannot renew it right now.",
                                      retry_after_s=5)
        return tokens, token

    @staticmethod
    async def _send(provider: Provider, pool: Pool, method: str, head: bytes, content: bytes | AsyncIterator[bytes],
                    declared: int | None) -> Connection:
        """The request written (its body streamed when it is not in hand), the answer's head read."""
        try:
            if isinstance(content, bytes):
                return await exchange(pool, head, method=method, body=content)

            async def stream(connection: Connection) -> None:
                await _stream_body(connection, content, declared, pool.timeout)

            return await exchange(pool, head, method=method, stream=stream)
        except TimeoutError:
            raise ProviderUnavailable(f"{provider.display_name or provider.name} did not answer in time.",
                                      code="provider_unavailable", retry_after_s=5) from None
        except UpstreamBusy:
            raise ProviderUnavailable(f"Too many calls to {provider.display_name or provider.name} are waiting.",
                                      code="provider_unavailable", retry_after_s=5) from None
        except (UpstreamFailed, OSError):
            raise ProviderUnavailable(f"{provider.display_name or provider.name} could not be reached.",
                                      code="provider_unavailable", retry_after_s=5) from None


# -- helpers ------------------------------------------------------------------------------------


def _compile(route: RelayRoute) -> _Route:
    methods = frozenset(route.methods)
    return _Route(re.compile(translate(route.path)), methods, route.token, tuple(route.scopes))


def _require_our_origin(headers: Sequence[tuple[bytes, bytes]], origin: str) -> None:
    """A cookie rides along on a cross-site request too: a non-GET must show it is ours."""
    sent = first_header(headers, b"origin")
    if sent is not None:
        if sent.decode("latin-1").rstrip("/").lower() == origin.lower():
            return
    elif first_header(headers, b"sec-fetch-site") == b"same-origin":
        return
    raise GatewayError("This request must come from the app's own pages.", code="cross_origin", status_code=403)


def _page_path(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """Where consent returns to: the page that made the call (its Referer's path, by the login's
    own rules for ``next``), else ``/``."""
    referer = first_header(headers, b"referer")
    if referer is None:
        return "/"
    parts = urlsplit(referer.decode("latin-1"))
    return safe_next(parts.path + (f"?{parts.query}" if parts.query else ""))


@functools.lru_cache(maxsize=64)
def _split_base(base: str) -> tuple[str, str, bytes]:
    """A provider base URL as (origin, path without its trailing slash, the request head's
    headers that depend on it alone: ``Host`` and the identity ``Accept-Encoding``)."""
    parts = urlsplit(base)
    fixed = b"host: " + parts.netloc.encode("idna") + b"\r\naccept-encoding: identity\r\n"
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}", parts.path.rstrip("/"), fixed


def _visible_ascii(text: str) -> bool:
    """Only visible ASCII (0x21-0x7e): no space, control character or anything beyond ASCII."""
    return text.isascii() and text.isprintable() and " " not in text


def _param_name(piece: bytes) -> str:
    return unquote_to_bytes(piece.partition(b"=")[0].replace(b"+", b" ")).decode("latin-1").lower()


def _query(raw: bytes, credentials: frozenset[str], added: Sequence[tuple[str, str]]) -> bytes:
    """The caller's query as sent, minus any parameter that carries a credential, plus the
    plugin's; ``?...`` or empty."""
    pieces = [piece for piece in raw.split(b"&") if piece and _param_name(piece) not in credentials] if raw else []
    pieces += [f"{quote(str(key), safe='')}={quote(str(value), safe='')}".encode("ascii") for key, value in added]
    return b"?" + quote_from_bytes(b"&".join(pieces), safe=_QUERY_SAFE).encode("ascii") if pieces else b""


@functools.lru_cache(maxsize=16)
def _dropped(credentials: frozenset[str]) -> frozenset[bytes]:
    """The request headers never forwarded to a provider whose token headers are ``credentials``."""
    return _REQUEST_DROP | {name.lower().encode() for name in credentials}


def _forward_headers(headers: Sequence[tuple[bytes, bytes]], credentials: frozenset[str]) -> list[tuple[bytes, bytes]]:
    listed = hop_by_hop(headers)
    drop = _dropped(credentials) if listed is HOP_BY_HOP else _dropped(credentials) | listed
    # X-Forwarded-*: about the path to us, nothing the provider should know. X-Auth-*: the default
    # identity header names (the edge already removed the configured ones in every spelling).
    return [(key, value) for key, value in headers
            if key not in drop and not key.startswith(b"x-forwarded-") and not key.startswith(b"x-auth-")]


def _request_head(method: str, target: bytes, fixed: bytes, forwarded: Sequence[tuple[bytes, bytes]],
                  plugin_headers: Sequence[tuple[str, str]], content: bytes | AsyncIterator[bytes],
                  declared: int | None) -> bytes:
    """The request line and headers as written: the plugin's headers in its own spelling (they
    replace the caller's of the same name), the caller's, and the body's framing (ours)."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n", fixed]
    own: set[bytes] = set()
    for name, value in plugin_headers:
        raw_name, raw_value = name.encode("latin-1"), value.encode("latin-1")
        if not _HEADER_NAME.fullmatch(raw_name) or b"\r" in raw_value or b"\n" in raw_value or b"\0" in raw_value:
            raise GatewayError("The provider plugin made a header that cannot be sent.", code="relay_misconfigured",
                               status_code=502)
        own.add(raw_name.lower())
        parts += [raw_name, b": ", raw_value, b"\r\n"]
    for key, text in forwarded:
        if key not in own:
            parts += [key, b": ", text, b"\r\n"]
    if isinstance(content, bytes):
        if content or method in ("POST", "PUT", "PATCH"):
            parts.append(b"content-length: %d\r\n" % len(content))
    elif declared is None:
        parts.append(b"transfer-encoding: chunked\r\n")
    else:
        parts.append(b"content-length: %d\r\n" % declared)
    parts.append(b"\r\n")
    return b"".join(parts)


async def _stream_body(connection: Connection, chunks: AsyncIterator[bytes], declared: int | None,
                       patience_s: float) -> None:
    """A body not in hand, written as it comes: chunked, or exactly the ``declared`` length."""
    left = declared
    async for chunk in chunks:
        if not chunk:
            continue
        if left is None:
            connection.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            left -= len(chunk)
            if left < 0:
                raise GatewayError("The request body is longer than its Content-Length.",
                                   code="body_length_mismatch", status_code=400)
            connection.write(chunk)
        await connection.drain(patience_s)
    if left is None:
        connection.write(b"0\r\n\r\n")
    elif left:
        raise GatewayError("The request body is shorter than its Content-Length.", code="body_length_mismatch",
                           status_code=400)


class _Answer:
    """The provider's answer on its connection: the head is in; the body is read from it once."""

    def __init__(self, connection: Connection, pool: Pool) -> None:
        self.connection, self.pool = connection, pool

    async def verdict(self, provider: Provider) -> RelayVerdict:
        """The plugin's verdict, shown the body when it is small JSON (error envelopes are)."""
        connection = self.connection
        content_type = length = b""
        for name, value in connection.headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value.strip()
        headers = HeaderView(connection.headers)
        if b"json" not in content_type or (length and not (length.isdigit() and int(length) <= _CLASSIFY_BYTES)):
            return provider.relay_verdict(connection.status, headers, None)
        while not connection.complete and connection.error is None and connection.buffered <= _CLASSIFY_BYTES:
            await connection.wait()
        if connection.error is not None:
            raise ProviderUnavailable(f"{provider.display_name or provider.name} broke off its answer.",
                                      retry_after_s=5)
        body = b"".join(connection.chunks) if connection.complete else None  # kept: relay() sends them
        return provider.relay_verdict(connection.status, headers, body)

    async def relay(self, send: Send, verdict: RelayVerdict, policy: Sequence[tuple[bytes, bytes]],
                    progress: _Progress) -> None:
        """Pass the answer on as it is: status, end-to-end headers (and the relay's ``policy``),
        the body streamed. Broken off midway, the response is left incomplete (the server cuts
        it: the caller sees the cut)."""
        connection = self.connection
        listed = hop_by_hop(connection.headers)
        drop = _RESPONSE_DROP if listed is HOP_BY_HOP else _RESPONSE_DROP | listed
        headers = [item for item in connection.headers if item[0] not in drop]
        names = {name for name, _ in headers}
        if verdict.outcome == "rate_limited" and b"retry-after" not in names:
            headers.append((b"retry-after", str(verdict.retry_after_s or 5).encode()))
        if b"cache-control" not in names:
            headers.append((b"cache-control", b"no-store"))  # a user's data: never cached by the way
        headers += policy
        progress.started = True
        await send({"type": "http.response.start", "status": connection.status, "headers": headers})
        progress.watch.body_sent()  # the request was all read and sent before its answer came
        await send_body(connection, send, progress.watch)

    def close(self) -> None:
        self.pool.release(self.connection)


def _json_error(scope: Scope, exc: GatewayError, login_url: str) -> Response:
    """Relay errors answer JSON (API callers), with the stable code and Retry-After when transient."""
    json_scope = {**scope, "headers": _json_accept(scope)}
    if exc.code == "login_required":
        return error_response(json_scope, 401, exc.code, exc.message, extra={"login_url": login_url})
    return gateway_error_response(json_scope, exc)


def _json_accept(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request's headers with ``Accept: application/json``: an API answer, never a page."""
    return [*((k, v) for k, v in scope["headers"] if k != b"accept"), (b"accept", b"application/json")]


def _consent_response(scope: Scope, exc: ConsentRequired) -> Response:
    return JSONResponse(
        {"error": exc.code, "message": exc.message, "provider": exc.provider, "scopes": exc.scopes,
         "consent_url": exc.consent_url},
        status_code=403, headers={"cache-control": "no-store"})
