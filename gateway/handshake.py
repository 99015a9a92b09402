"""The gateway's own endpoints under ``path_prefix``: login, exchange, callback, logout, me, auth...

``/login`` either answers 302 straight to the provider's browser OAuth (no client in the
User-Agent) or serves the handshake page, whose script asks the client's JSAPI for a code and POSTs
it to ``/exchange/<provider>``. Both paths end in ``complete_login``: the token record is saved
(replacing the user's previous one), a session is created, the cookie is set.

Every page here speaks the request's language (gateway/i18n.py). A ``public_url`` whose host is not
the one browsers use (``localhost`` vs ``127.0.0.1``) breaks every sign-in: the login cookie is set
on the host the browser used and the provider comes back to ``public_url``'s. That is detected at
the callback and at ``/exchange`` and said as such (``public_url_mismatch``), in the page and once
in the log, instead of "started in another browser".
"""

from __future__ import annotations

import contextlib
import hmac
import html
import logging
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Router
from starlette.types import Message, Receive, Scope, Send

from gateway.bodies import read_json
from gateway.config import GatewayConfig
from gateway.consent import consent, consent_outcome, consent_url, scopes_field
from gateway.edge import TrustedProxies
from gateway.errors import GatewayError, LoginDenied, LoginPending, ProviderError, ReauthRequired, StoreUnavailable
from gateway.i18n import EN, Locale, display_name, error_message, language_headers, locale_of, text
from gateway.identity import Headers
from gateway.logs import audit, client_ip
from gateway.metrics import AUTHENTICATED, DENIED, ERROR, LOGIN_REQUIRED, PUBLIC, Metrics
from gateway.pages import (
    content_security_policy,
    error_response,
    gateway_error_response,
    message_page,
    page,
    policy_headers,
    script_json,
    wants_html,
)
from gateway.providers import Flow, Grant, LoginContext, Provider
from gateway.ratelimit import RateLimiter, client_key
from gateway.relay import Relay
from gateway.runtime import Runtime
from gateway.sessions import SessionRecord
from gateway.state import STATE_TTL_S, LoginCookie, PendingLogin, is_valid_state, pkce_pair, safe_next

log = logging.getLogger("gateway.handshake")

_STATIC = Path(__file__).with_name("static")
_MAX_CODE = 4096
_PENDING_MESSAGE = (
    "Your authorization is waiting for an administrator's approval. "
    "Come back and sign in again once it is approved."
)
_PROVIDER_ERROR_CODE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Logins started at a host other than public_url's, remembered (state -> host) so that their
#: callback can say what went wrong; bounded, in-process (a hint, not a security decision).
_FOREIGN_LOGINS_KEPT = 1024
#: The endpoints that start or finish a sign-in: each costs a cookie, a store write or a provider
#: call, so each is limited per client (``limits.login_rate_per_min``).
_LIMITED = frozenset({"login", "exchange", "callback", "consent"})
Handler = Callable[[Request, str], Awaitable[Response]]
#: A readiness check beyond the store's (``Handshake.ready_checks``): None when ready, else the
#: (stable code, sentence) readyz answers 503 with. The sidecar adds its upstream's
#: (``upstream.check_ready``), so this module never imports the proxy.
ReadyCheck = Callable[[], Awaitable[tuple[str, str] | None]]

#: The forward-auth 200 before the identity headers. The middleware answers the common case itself
#: (a cached valid session, ``AuthGateway._forward_auth``) with these same bytes.
AUTH_OK_HEADERS = ((b"cache-control", b"no-store"), (b"content-length", b"0"),
                   (b"content-type", b"text/plain; charset=utf-8"))


#: Identity header lists whose forward-auth answer ForwardAuthHeaders keeps (then it starts over).
_ANSWERS_KEPT = 4096


class ForwardAuthHeaders:
    """The forward-auth 200's headers for an identity: ``AUTH_OK_HEADERS``, the identity headers,
    and every other identity header name (``identity.headers``) with an empty value.

    A proxy told to copy a header the answer lacks does not send nothing: Caddy 2.6 sends its
    literal placeholder (``{http.reverse_proxy.header.X-Auth-Tenant}``, caddy#6610), Caddy 2.9 to
    2.11.1 keep the client's own copy (GHSA-7r4p-vjf4-gxv4). So the answer names them all, empty
    when unknown (a public path, no tenant, no name, no access token passed). Only here: the
    middleware and the sidecar add the known ones alone, as before.

    On the hot path of forward-auth, so the answer is built once per identity header list: the
    authenticator caches one list per session (``Authenticated.headers``, never changed once
    built, a new one at each renewal), and the answer is kept beside a reference to that list, so
    the ``id`` it is found by cannot name another list while it is kept."""

    def __init__(self, config: GatewayConfig) -> None:
        # user, provider, tenant, name, jwt, access token: each name once.
        names = (name.lower().encode("latin-1") for name in config.identity.headers.model_dump().values())
        self._names = tuple(dict.fromkeys(names))
        self._anonymous = self._build([])
        self._answers: dict[int, tuple[Headers, tuple[tuple[bytes, bytes], ...]]] = {}

    def __call__(self, identity: Headers) -> list[tuple[bytes, bytes]]:
        if not identity:
            return list(self._anonymous)
        kept = self._answers.get(id(identity))
        if kept is not None and kept[0] is identity:
            return list(kept[1])
        answer = self._build(identity)
        if len(self._answers) >= _ANSWERS_KEPT:
            self._answers.clear()
        self._answers[id(identity)] = (identity, answer)
        return list(answer)

    def _build(self, identity: Headers) -> tuple[tuple[bytes, bytes], ...]:
        present = {key for key, _ in identity}
        return (*AUTH_OK_HEADERS, *identity, *((name, b"") for name in self._names if name not in present))


def login_required_response(scope: Scope, prefix: str, target: str, *, method: str | None = None) -> Response:
    """No session (design §3, step 5): a browser navigation (GET/HEAD whose Accept admits HTML) is
    sent to the login page with ``target`` (path and query) as ``next``; anything else gets 401
    JSON ``{"error": "login_required", "login_url"}``. ``method``: the original request's, when
    the request at hand only speaks for it (forward-auth)."""
    login_url = f"{prefix}/login?next={quote(target, safe='')}"
    accept = next((value for key, value in scope["headers"] if key == b"accept"), b"")
    if (method or scope["method"]) in ("GET", "HEAD") and b"text/html" in accept:
        return RedirectResponse(login_url, status_code=302, headers={"cache-control": "no-store"})
    return error_response(scope, 401, "login_required", "You are not signed in.",
                          extra={"login_url": login_url}, actions={"action.sign_in": login_url})


class BadRequest(GatewayError):
    status_code = 400
    code = "bad_request"


class PublicUrlMismatch(BadRequest):
    """public_url is not the address the browser used; ``next_path``: where the sign-in was going."""

    code = "public_url_mismatch"

    def __init__(self, message: str, *, expected: str, actual: str, next_path: str | None) -> None:
        super().__init__(message, fields={"expected": expected, "actual": actual})
        self.next_path = next_path


class Handshake:
    """The ASGI app behind ``path_prefix``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = runtime.config
        self.prefix = runtime.config.path_prefix
        self.binding_cookie = runtime.config.session.binding_cookie_name
        self.logins = LoginCookie([s.get_secret_value() for s in self.config.session.secrets], self.binding_cookie)
        limits = self.config.limits
        self._limiter = RateLimiter(limits.login_rate_per_min, limits.login_burst)
        self._trusted = TrustedProxies(self.config.access.trusted_proxies)
        self._forward_auth_headers = ForwardAuthHeaders(self.config)
        self.ready_checks: list[ReadyCheck] = []
        self._public_host = _host_key(urlsplit(self.config.public_url).netloc)
        self._foreign_logins: OrderedDict[str, tuple[str, str]] = OrderedDict()  # state -> (host, next)
        self._mismatch_logged = False
        frame_ancestors = self.config.access.frame_ancestors
        self._policy = policy_headers(content_security_policy(frame_ancestors))
        # The handshake page runs our scripts and the provider's JSSDK (its origin), POSTs the
        # code to /exchange, and lets the SDK reach the provider's hosts (an emulator's fake
        # JSSDK asks its accounts host for the code; a real one may report to its own).
        self._page_policy: dict[str, str] = {}
        for name, provider in runtime.providers.items():
            settings = provider.settings
            hosts = [_origin(value) for value in settings.model_dump().values() if isinstance(value, str)]
            self._page_policy[name] = content_security_policy(
                frame_ancestors, scripts=["'self'", *_origin(settings.jssdk_url)],
                connect=["'self'", *(origin for found in hosts for origin in found)])
        self._routes: dict[tuple[str, str], Handler] = {
            ("GET", "login"): self.login,
            ("POST", "exchange"): self.exchange,
            ("GET", "callback"): self.callback,
            ("POST", "logout"): self.logout,
            ("GET", "me"): self.me,
            ("GET", "auth"): self.auth,
            ("GET", "jwks.json"): self.jwks,
            ("GET", "healthz"): self.healthz,
            ("GET", "readyz"): self.readyz,
            ("GET", "metrics"): self.metrics,
            ("GET", "static"): self.static,
            ("GET", "consent"): self.consent,  # incremental consent (gateway/consent.py)
            ("POST", "consent"): self.consent_outcome,  # the page's report of an in-client refusal
        }
        self._scripts = {"handshake.js": (_STATIC / "handshake.js").read_bytes(),
                         "gateway.js": (_STATIC / "gateway.js").read_bytes()}
        self.relay = Relay(runtime)
        for provider in runtime.providers.values():
            if provider.bridge_js is not None:
                self._scripts[f"bridge/{provider.plugin}.js"] = provider.bridge_js.read_bytes()
        self._provider_routes = Router(
            routes=[
                Mount(f"{self.prefix}/providers/{name}", routes=list(provider.routes()))
                for name, provider in runtime.providers.items()
                if provider.routes()
            ]
        )

    # -- dispatch ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            return
        sub = scope["path"][len(self.prefix) :].strip("/")
        head, _, rest = sub.partition("/")
        if head == "api":  # the provider-API relay: any method, bodies streamed, its own policy headers
            await self.relay(scope, receive, send)
            return
        send = self._with_policy(send)
        if sub.startswith("providers/"):
            await self._provider_routes(scope, receive, send)
            return
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        handler = self._routes.get((method, head))
        request = Request(scope, receive)
        try:
            wait_s = self._limiter.take(client_key(scope, self._trusted)) if head in _LIMITED else 0
            if wait_s:
                response = error_response(
                    scope, 429, "rate_limited",
                    f"Too many sign-in attempts from your network. Please wait {wait_s} seconds and try again.",
                    headers={"retry-after": str(wait_s)}, message_id="error.rate_limited_login",
                    fields={"seconds": wait_s})
            elif handler is None:
                response = self._no_route(scope, head)
            else:
                response = await handler(request, rest)
        except GatewayError as exc:
            response = self._error(request, exc)
        except Exception:
            # A bug of ours or a plugin's: logged with its traceback, never shown to the user.
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            response = error_response(scope, 500, "internal_error",
                                      "Something went wrong in the sign-in gateway. Please try again.")
        await response(scope, receive, send)

    def _with_policy(self, send: Send) -> Send:
        """``send`` that adds the policy headers (CSP, nosniff, Referrer-Policy) to every response
        start that lacks them: our pages, JSON answers and the plugins' own routes alike."""
        policy = self._policy

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers.extend(item for item in policy if item[0] not in present)
                message = {**message, "headers": headers}
            await send(message)

        return send_with_policy

    def _no_route(self, scope: Scope, head: str) -> Response:
        if any(key[1] == head for key in self._routes):
            allowed = ", ".join(sorted(key[0] for key in self._routes if key[1] == head))
            return error_response(scope, 405, "method_not_allowed", f"Use {allowed} for this endpoint.",
                                  headers={"allow": allowed})
        return error_response(scope, 404, "not_found", "There is no such gateway endpoint.")

    def _error(
        self, request: Request, exc: GatewayError, provider: str | None = None, next_path: str | None = None
    ) -> Response:
        if isinstance(exc, ProviderError) and exc.provider_code is not None:
            log.info("provider answered %s (%s)", exc.code, exc.provider_code)
        actions = None
        if wants_html(request.headers) and isinstance(exc, ProviderError | BadRequest):
            query = {"next": next_path or safe_next(request.query_params.get("next"))}
            if provider:
                query["provider"] = provider
            if isinstance(exc, PublicUrlMismatch):
                # The way on is the configured address, where the login cookie will be found.
                query["next"] = exc.next_path or query["next"]
                url = self.config.public_url
                actions = {text("action.open_app", locale_of(request.scope), url=url):
                           f"{url}{self.prefix}/login?{urlencode(query)}"}
            else:
                pending: PendingLogin | None = getattr(request.state, "pending", None)
                if pending is not None and pending.is_consent:
                    # Trying a consent again asks for the same scopes, not for a plain login.
                    retry = consent_url(self.prefix, pending.provider, pending.extra_scopes, query["next"])
                else:
                    retry = f"{self.prefix}/login?{urlencode(query)}"
                actions = {"action.try_again": retry}
        return gateway_error_response(request.scope, exc, actions=actions)

    def _provider(self, name: str) -> Provider:
        provider = self.runtime.providers.get(name)
        if provider is None:
            raise GatewayError(f"No provider named {name!r} is configured.", code="unknown_provider", status_code=404)
        return provider

    # -- login ------------------------------------------------------------------------------

    async def consent(self, request: Request, rest: str) -> Response:
        return await consent(self, request, rest)

    async def consent_outcome(self, request: Request, rest: str) -> Response:
        return await consent_outcome(self, request, rest)

    async def login(self, request: Request, rest: str, *, extra_scopes: tuple[str, ...] = ()) -> Response:
        next_path = safe_next(request.query_params.get("next"))
        user_agent = request.headers.get("user-agent", "")
        requested = request.query_params.get("provider")
        providers = self.runtime.providers
        if requested:
            provider = self._provider(requested)
        else:
            detected = [p for p in providers.values() if p.detect_client(user_agent)]
            if detected:
                provider = detected[0]
            elif len(providers) == 1:
                provider = next(iter(providers.values()))
            elif not providers:
                raise GatewayError("No identity provider is configured.", code="no_providers", status_code=503)
            else:
                return self._chooser(next_path, locale_of(request.scope))

        # Finishing a login needs the store (single use, the session): say so now, before the
        # user goes through the provider's consent for nothing. A ping: nothing is written.
        await self.runtime.store.ping()
        # The login goes into this browser's login cookie, beside its other logins in progress
        # (other tabs): nothing is written to the store (gateway/state.py).
        logins = self.logins.open(request.cookies.get(self.binding_cookie))
        state = self.logins.new_state()
        verifier, challenge = pkce_pair() if provider.uses_pkce else (None, None)
        logins[state] = PendingLogin(state, provider.name, next_path, verifier, time.time(), extra_scopes)
        self._note_foreign_host(request, state, next_path)
        context = LoginContext(
            state=state, redirect_uri=self.config.redirect_uri(provider.name), next_path=next_path,
            code_challenge=challenge, extra_scopes=extra_scopes,
        )
        fallback_url = provider.authorize_url(context)
        # flow=browser: the page's "sign in in the browser" way out, even inside the client.
        if provider.detect_client(user_agent) and request.query_params.get("flow") != "browser":
            response: Response = self._handshake_page(provider, context, fallback_url, request)
        else:
            response = RedirectResponse(fallback_url, status_code=302, headers={"cache-control": "no-store"})
        self._set_logins(response, logins)
        return response

    def _set_logins(self, response: Response, logins: dict[str, PendingLogin]) -> None:
        """The login cookie with ``logins`` (the newest that fit), or none when none is left."""
        value = self.logins.seal(logins)
        if not value:
            response.delete_cookie(self.binding_cookie, path=self.prefix)
            return
        # Lax at most: the provider's redirect back to the callback is a cross-site navigation.
        same_site: Literal["lax", "none"] = "none" if self.config.session.same_site == "none" else "lax"
        response.set_cookie(
            self.binding_cookie, value, max_age=STATE_TTL_S, path=self.prefix, httponly=True,
            secure=self.config.session.secure, samesite=same_site,
        )

    def _chooser(self, next_path: str, locale: Locale) -> Response:
        links = "".join(
            f'<a class="button" href="{html.escape(self.prefix)}/login?'
            f'{html.escape(urlencode({"provider": name, "next": next_path}))}">'
            f"{html.escape(display_name(provider.display_name or name, locale))}</a>"
            for name, provider in self.runtime.providers.items()
        )
        title = text("title.sign_in", locale)
        return page(title, f"<h1>{html.escape(title)}</h1><p>{html.escape(text('page.choose', locale))}</p>"
                           f"<p>{links}</p>", locale=locale)

    def _note_foreign_host(self, request: Request, state: str, next_path: str) -> None:
        """Remember a login started at a host other than public_url's (see the module docstring)."""
        host = _browser_host(request)
        if host and _host_key(host) != self._public_host:
            self._foreign_logins[state] = (host, next_path)
            while len(self._foreign_logins) > _FOREIGN_LOGINS_KEPT:
                self._foreign_logins.popitem(last=False)

    def _public_url_mismatch(self, actual: str, next_path: str | None = None) -> PublicUrlMismatch:
        """The error that says public_url is not the address the browser used; logged once."""
        expected = self.config.origin
        if not self._mismatch_logged:
            self._mismatch_logged = True
            log.warning("public_url is %s but a browser reached the gateway at %s: the login cookie is set on "
                        "the address the browser used and the provider returns to public_url, so sign-ins "
                        "fail there; set public_url to the address people open (or open the app at %s)",
                        expected, actual, expected)
        return PublicUrlMismatch(f"This app is configured for {expected}, but this page was opened at {actual}. "
                                 f"Open the app at {expected}, or ask its operator to set public_url to the address "
                                 "people use.", expected=expected, actual=actual, next_path=next_path)

    def _handshake_page(
        self, provider: Provider, login: LoginContext, fallback_url: str, request: Request
    ) -> Response:
        if login.extra_scopes:
            # A consent's ways on ask for the same scopes again: a plain login would not.
            retry_url = consent_url(self.prefix, provider.name, login.extra_scopes, login.next_path, retry="1")
            browser_url = consent_url(self.prefix, provider.name, login.extra_scopes, login.next_path,
                                      flow="browser")
        else:
            plain = {"provider": provider.name, "next": login.next_path}
            retry_url = f"{self.prefix}/login?{urlencode({**plain, 'retry': '1'})}"
            browser_url = f"{self.prefix}/login?{urlencode({**plain, 'flow': 'browser'})}"
        settings = provider.settings
        page_config: dict[str, Any] = {
            "plugin": provider.plugin,
            "displayName": provider.display_name or provider.name,
            "state": login.state,
            "next": login.next_path,
            "exchangeUrl": f"{self.prefix}/exchange/{provider.name}",
            "fallbackUrl": fallback_url,
            "retryUrl": retry_url,
            "browserUrl": browser_url,
            "fresh": request.query_params.get("retry") != "1",
            "timeoutMs": int(settings.client_timeout_s * 1000),
            "jssdkUrl": settings.jssdk_url,
            "bridge": provider.bridge_config(login),
        }
        if login.extra_scopes:
            # Where the page reports a consent that ended in the client without a code (the audit trail).
            page_config["consentReportUrl"] = f"{self.prefix}/consent"
            page_config["provider"] = provider.name
        locale = locale_of(request.scope)
        name = display_name(provider.display_name or provider.name, locale)
        page_config["displayName"] = name
        page_config["lang"] = locale
        page_config["messages"] = _script_messages(locale, name)
        config_json = script_json(page_config)
        title = html.escape(text("page.signing_in_with", locale, name=name))
        body = (
            f'<h1 id="gw-title">{title}</h1>'
            f'<p id="gw-status">{html.escape(text("page.connecting", locale))}</p><p id="gw-actions"></p>'
            f'<noscript><p><a class="button" href="{html.escape(fallback_url)}">'
            f'{html.escape(text("action.continue", locale))}</a></p></noscript>'
            f'<script id="gw-config" type="application/json">{config_json}</script>'
            f'<script src="{self.prefix}/static/bridge/{html.escape(provider.plugin)}.js"></script>'
            f'<script src="{self.prefix}/static/handshake.js"></script>'
        )
        return page(text("page.signing_in_with", locale, name=name), body, locale=locale,
                    headers={"content-security-policy": self._page_policy[provider.name]})

    # -- completing a login -----------------------------------------------------------------

    async def _take_pending(self, request: Request, state: str, provider: Provider) -> PendingLogin:
        """Check the state belongs to this browser and provider, then consume it (single use).

        Everything is checked before any provider call: a state must come from this browser's
        login cookie (one ``/login``, limited per client), and it is used up even when the code
        that comes with it is junk, so one ``/login`` buys at most one provider call.
        """
        if not is_valid_state(state):
            raise BadRequest("The sign-in link is malformed; please start again.", code="state_invalid")
        if not self.logins.issued(state):
            raise BadRequest("This sign-in link has expired or was already used; please start again.",
                             code="state_invalid")
        used = self.logins.used_key(state)
        pending = self.logins.open(request.cookies.get(self.binding_cookie)).get(state)
        if pending is None:
            if await self.runtime.store.get(used) is not None:  # e.g. replayed after signing in
                raise BadRequest("This sign-in link was already used; please start again.", code="state_invalid")
            foreign = self._foreign_logins.pop(state, None)
            if foreign is not None:  # started at another host: public_url is not the browser's address
                raise self._public_url_mismatch(f"{request.url.scheme}://{foreign[0]}", foreign[1])
            raise BadRequest("This sign-in was started in another browser, or long ago; please start again here.",
                             code="state_mismatch")
        if pending.expired() or pending.provider != provider.name:
            raise BadRequest("This sign-in link is not valid here; please start again.", code="state_invalid")
        # Written only now, by a request that holds a sealed login: anonymous clients cannot fill
        # the store with these; atomic, so two requests racing with one state cannot both win.
        if await self.runtime.store.set_versioned(used, b"1", STATE_TTL_S, expected_version=0) is None:
            raise BadRequest("This sign-in link was already used; please start again.", code="state_invalid")
        request.state.pending = pending  # a consent? (its audit event, its pages' links)
        return pending

    async def _complete_login(
        self, request: Request, provider: Provider, pending: PendingLogin, grant: Grant, flow: Flow,
        response: Response,
    ) -> Response:
        identity = grant.identity
        # From here the provider has said who this is: a failure still names them (login.failed).
        request.state.granted = identity
        if not self.runtime.access.tenant_allowed(identity.tenant):
            raise LoginDenied("Your organisation is not allowed to use this app.", code="tenant_not_allowed")
        # A consent adds to the grant: the record keeps the scopes it had (TokenManager.save). The
        # record keeps this sign-in's flow, for its refreshes' audit events (TokenSet.flow).
        key = await self.runtime.tokens.save(provider.name, identity.tenant, identity.user,
                                             replace(grant.tokens, flow=flow), keep_scopes=pending.is_consent)
        await self.runtime.authenticator.tokens_replaced(key)
        previous = request.cookies.get(self.config.session.cookie_name)
        if previous:
            await self._end_session(previous)
        ticket, _ = await self.runtime.sessions.create(
            provider=provider.name, user=identity.user, tenant=identity.tenant, name=identity.name
        )
        request.state.signed_in = identity  # for the login.succeeded audit event (_login_attempt)
        session = self.config.session
        response.set_cookie(
            session.cookie_name, ticket, max_age=session.max_age_s, path="/", httponly=True,
            secure=session.secure, samesite=session.same_site,
        )
        # The other tabs' logins in progress stay; this one is done.
        logins = self.logins.open(request.cookies.get(self.binding_cookie))
        logins.pop(pending.state, None)
        self._set_logins(response, logins)
        return response

    @contextlib.asynccontextmanager
    async def _login_attempt(self, provider: Provider, flow: str, request: Request) -> AsyncIterator[None]:
        """Counts a sign-in attempt by its result, ``ok`` or the error code that ended it, and
        writes its audit event (``login.succeeded`` / ``login.failed``), and a consent's
        (``consent.*``, ``audit_consent``) when the login was one."""
        try:
            yield
        except Exception as exc:
            code = exc.code if isinstance(exc, GatewayError) else "internal_error"
            self.runtime.metrics.inc("gateway_logins_total", provider.name, flow, code)
            # Who, only when the provider already said (a grant redeemed, then refused: e.g.
            # tenant_not_allowed); a failure before that knows no one, and nobody is guessed.
            granted = getattr(request.state, "granted", None)
            tenant, user = (granted.tenant, granted.user) if granted else (None, None)
            if isinstance(exc, LoginDenied) and exc.user:  # a plugin's refusal that names who it refused
                tenant, user = exc.tenant, exc.user
            audit("login.failed", provider=provider.name, flow=flow, error=code,
                  client_ip=client_ip(request.scope, self._trusted), tenant=tenant, user_id=user)
            pending: PendingLogin | None = getattr(request.state, "pending", None)
            if pending is not None and pending.is_consent:
                await self.audit_consent(request, provider.name, flow, pending, error=code)
            raise
        self.runtime.metrics.inc("gateway_logins_total", provider.name, flow, "ok")
        identity = getattr(request.state, "signed_in", None)
        audit("login.succeeded", provider=provider.name, flow=flow, client_ip=client_ip(request.scope, self._trusted),
              tenant=identity.tenant if identity else None, user_id=identity.user if identity else None)
        pending = getattr(request.state, "pending", None)
        if pending is not None and pending.is_consent:
            await self.audit_consent(request, provider.name, flow, pending)

    async def audit_consent(self, request: Request, provider: str, flow: str, pending: PendingLogin, *,
                            error: str | None = None) -> None:
        """``consent.granted`` (no ``error``), ``consent.denied`` (``access_denied``: the user said
        no) or ``consent.failed`` (any other code; ``approval_pending``, an administrator must
        approve first, with outcome ``pending_admin``: nothing was refused yet, nothing granted).
        Who: the new grant's identity, else the session the consent was asked from."""
        identity = getattr(request.state, "signed_in", None)
        if identity is None:
            ticket = request.cookies.get(self.config.session.cookie_name)
            with contextlib.suppress(GatewayError):  # the audit line must not fail the answer
                authenticated = await self.runtime.authenticator.authenticate(ticket) if ticket else None
                identity = authenticated.identity if authenticated is not None else None
        tenant, user = (identity.tenant, identity.user) if identity is not None else (None, None)
        fields: dict[str, Any] = {"provider": provider, "flow": flow, "tenant": tenant, "user_id": user,
                                  "client_ip": client_ip(request.scope, self._trusted),
                                  "scopes": scopes_field(pending.extra_scopes)}
        if error is None:
            audit("consent.granted", **fields)
        elif error == "access_denied":
            audit("consent.denied", error=error, **fields)
        else:
            audit("consent.failed", error=error, outcome="pending_admin" if error == "approval_pending" else None,
                  **fields)

    async def exchange(self, request: Request, rest: str) -> Response:
        provider = self._provider(rest)
        async with self._login_attempt(provider, "client", request):
            return await self._exchange(request, provider)

    async def _exchange(self, request: Request, provider: Provider) -> Response:
        body = await self._json_object(request, what="the code", fields="code and state")
        code, state, context = body.get("code"), body.get("state"), body.get("context") or {}
        if not isinstance(code, str) or not code or len(code) > _MAX_CODE:
            raise BadRequest("The request has no usable code.", code="code_missing")
        if not isinstance(state, str):
            raise BadRequest("The request has no state.", code="state_invalid")
        if not isinstance(context, dict) or not all(isinstance(v, str) for v in context.values()):
            raise BadRequest("context must be an object of strings.", code="invalid_json")
        pending = await self._take_pending(request, state, provider)
        grant = await provider.redeem(
            code, flow="client", redirect_uri=self.config.redirect_uri(provider.name), client_context=context
        )
        return await self._complete_login(request, provider, pending, grant, "client",
                                          JSONResponse({"next": pending.next_path}))

    async def callback(self, request: Request, rest: str) -> Response:
        provider = self._provider(rest)
        next_path: str | None = None
        try:
            async with self._login_attempt(provider, "browser", request):
                result = provider.parse_callback(dict(request.query_params))
                if result.error == "approval_pending" and not result.state:
                    # Some providers come back from a pending approval without any state; nothing
                    # is signed in either way, so say what happens next, in our words only: without
                    # a state, the description is whatever the link's author wrote.
                    raise LoginPending(_PENDING_MESSAGE)
                pending = await self._take_pending(request, result.state, provider)
                next_path = pending.next_path
                if result.error:
                    if result.error == "access_denied":
                        raise LoginDenied("You declined the authorization, so you are not signed in.")
                    if result.error == "approval_pending":
                        raise LoginPending(result.error_description or _PENDING_MESSAGE)
                    # Unknown values: the sign-in failed, but it is no fault of ours (no 5xx).
                    shown = f" ({result.error})" if _PROVIDER_ERROR_CODE.fullmatch(result.error) else ""
                    raise ProviderError(f"Sign-in did not complete: the provider reported an error{shown}.",
                                        code="provider_error", status_code=400)
                if not result.code:
                    raise BadRequest("The provider sent no authorization code.", code="code_missing")
                grant = await provider.redeem(
                    result.code, flow="browser", redirect_uri=self.config.redirect_uri(provider.name),
                    code_verifier=pending.code_verifier, client_context=result.context,
                )
                redirect = RedirectResponse(pending.next_path, status_code=302, headers={"cache-control": "no-store"})
                return await self._complete_login(request, provider, pending, grant, "browser", redirect)
        except (LoginDenied, LoginPending, ReauthRequired, BadRequest, ProviderError) as exc:
            return self._error(request, exc, provider=provider.name, next_path=next_path)

    # -- session endpoints ------------------------------------------------------------------

    async def _json_object(self, request: Request, *, what: str, fields: str) -> dict[str, Any]:
        """A page's JSON POST (``/exchange``, ``/consent``): from our own origin, sent as JSON, within
        the body limits, one object; else 403 / 415 / 413 / 400 with a sentence naming ``what``."""
        self._require_same_origin(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise GatewayError(f"Send {what} as JSON.", code="unsupported_media_type", status_code=415)
        limits = self.config.limits
        body = await read_json(request, limit=limits.max_body_bytes, max_depth=limits.max_json_depth)
        if not isinstance(body, dict):
            raise BadRequest(f"Send a JSON object with {fields}.", code="invalid_json")
        return body

    def _require_same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is not None:
            if origin.rstrip("/") != self.config.origin:
                origin_host = _host_key(urlsplit(origin).netloc)
                if origin_host and origin_host == _host_key(_browser_host(request)):
                    # Our own page, served at the browser's address, which is not public_url's.
                    raise self._public_url_mismatch(origin.rstrip("/"))
                raise GatewayError("This request must come from the app's own pages.", code="cross_origin",
                                   status_code=403)
        elif request.headers.get("sec-fetch-site") not in (None, "same-origin", "none"):
            raise GatewayError("This request must come from the app's own pages.", code="cross_origin",
                               status_code=403)

    async def _end_session(self, ticket: str) -> SessionRecord | None:
        """End the session behind ``ticket`` everywhere; the session there was, if any."""
        record = await self.runtime.sessions.load(ticket)
        if record is not None:
            await self.runtime.sessions.end(record.sid)
            await self.runtime.authenticator.session_ended(record.sid)  # every replica's cache
        self.runtime.authenticator.forget(ticket)
        return record

    async def _sign_in_flow(self, record: SessionRecord) -> Flow | None:
        """The flow of the user's latest sign-in, for ``logout``: their token record's (one per user,
        shared by their sessions, TokenSet.flow), not the session's own, which is not stored (a
        replica of an earlier version reads exactly six fields in it). None when the record is
        gone, has no flow, or cannot be read: the session is already ended, the logout succeeds."""
        try:
            tokens = await self.runtime.tokens.load(record.token_key)
        except StoreUnavailable:
            return None
        return tokens.flow if tokens is not None else None

    async def logout(self, request: Request, rest: str) -> Response:
        origin = request.headers.get("origin")
        if origin is None and request.headers.get("sec-fetch-site") != "same-origin":
            raise GatewayError("Sign out from the app's own pages.", code="cross_origin", status_code=403)
        self._require_same_origin(request)
        ticket = request.cookies.get(self.config.session.cookie_name)
        ended = await self._end_session(ticket) if ticket else None
        if ended is not None:
            self.runtime.metrics.inc("gateway_logouts_total")
            audit("logout", provider=ended.provider, flow=await self._sign_in_flow(ended), tenant=ended.tenant,
                  user_id=ended.user, client_ip=client_ip(request.scope, self._trusted))
        response: Response
        if wants_html(request.headers):
            locale = locale_of(request.scope)
            response = message_page(text("title.signed_out", locale), text("page.signed_out", locale),
                                    status_code=200, code="signed_out", locale=locale,
                                    headers=language_headers(locale),
                                    actions={"action.sign_in_again": f"{self.prefix}/login"})
        else:
            response = JSONResponse({"ok": True})
        response.delete_cookie(self.config.session.cookie_name, path="/")
        return response

    def login_url(self, next_path: str) -> str:
        return f"{self.prefix}/login?next={quote(next_path, safe='')}"

    async def me(self, request: Request, rest: str) -> Response:
        ticket = request.cookies.get(self.config.session.cookie_name)
        authenticated = await self.runtime.authenticator.authenticate(ticket) if ticket else None
        if authenticated is None:
            locale = locale_of(request.scope)
            return JSONResponse({"error": "login_required",
                                 "message": error_message("login_required", "You are not signed in.", locale)[0],
                                 "login_url": self.login_url("/")}, status_code=401,
                                headers={"cache-control": "no-store", **language_headers(locale)})
        return JSONResponse(authenticated.identity.as_json(), headers={"cache-control": "no-store"})

    async def auth(self, request: Request, rest: str) -> Response:
        """Forward-auth (nginx ``auth_request``, Caddy ``forward_auth``, Traefik ForwardAuth): 200
        with every identity header (``ForwardAuthHeaders``), or the answer for no session.

        No session, and the proxy said which method the original request had
        (``X-Forwarded-Method``: Caddy and Traefik send it, and the edge keeps it only from a
        trusted proxy): the answer the gateway gives in front of an app, 302 to the login page
        for a navigation (GET/HEAD whose Accept admits HTML), 401 otherwise; those proxies hand
        it to the client as it is (oauth2-proxy and Authelia answer them so too). Otherwise a 401
        JSON: nginx's ``auth_request`` takes 2xx, 401 and 403 only (a 302 would be a 500), so its
        recipes ask with ``?answer=status`` (always that 401, whatever the client's headers say)
        and then, at ``?answer=login``, for the answer in front of an app."""
        counts = self.runtime.metrics.forward_auth
        # One header, configured (access.forward_auth_uri_header): the edge removed it unless a
        # trusted proxy sent it, so a client cannot name a public path for a protected request.
        original = request.headers.get(self.config.access.forward_auth_uri_header)
        if self.runtime.access.is_public_uri(original):
            counts[(PUBLIC,)] += 1
            response = Response(b"")
            response.raw_headers = self._forward_auth_headers([])
            return response
        ticket = request.cookies.get(self.config.session.cookie_name)
        try:
            authenticated = await self.runtime.authenticator.authenticate(ticket) if ticket else None
        except GatewayError as exc:
            counts[Metrics.failure(exc.status_code)] += 1
            raise
        except Exception:
            counts[(ERROR,)] += 1
            raise
        if authenticated is None:
            answer = request.query_params.get("answer")
            method = request.headers.get("x-forwarded-method")
            target = safe_next(original or "/")
            if answer == "login":
                # The nginx recipe's second hop (@login_required, after this endpoint said 401):
                # the answer the gateway gives in front of an app, for the original request.
                return login_required_response(request.scope, self.prefix, target, method=method)
            counts[(LOGIN_REQUIRED,)] += 1
            if method is not None and answer != "status":
                return login_required_response(request.scope, self.prefix, target, method=method)
            return JSONResponse({"error": "login_required", "message": "You are not signed in.",
                                 "login_url": self.login_url(target)}, status_code=401,
                                headers={"cache-control": "no-store"})
        if not self.runtime.access.tenant_allowed(authenticated.identity.tenant):
            counts[(DENIED,)] += 1
            raise LoginDenied("Your organisation is not allowed to use this app.", code="tenant_not_allowed")
        counts[(AUTHENTICATED,)] += 1
        response = Response(b"")
        response.raw_headers = self._forward_auth_headers(authenticated.headers)
        return response

    async def jwks(self, request: Request, rest: str) -> Response:
        return JSONResponse(self.runtime.signer.jwks(), headers={"cache-control": "public, max-age=300"})

    async def healthz(self, request: Request, rest: str) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request, rest: str) -> Response:
        try:
            await self.runtime.store.ping()
        except GatewayError as exc:
            return JSONResponse({"status": "unavailable", "error": exc.code, "message": exc.message},
                                status_code=503, headers={"retry-after": "5"})
        for check in self.ready_checks:
            problem = await check()
            if problem is not None:
                return JSONResponse({"status": "unavailable", "error": problem[0], "message": problem[1]},
                                    status_code=503, headers={"retry-after": "5"})
        return JSONResponse({"status": "ready"})

    async def metrics(self, request: Request, rest: str) -> Response:
        settings = self.config.metrics
        if not settings.enabled:
            return error_response(request.scope, 404, "not_found", "There is no such gateway endpoint.")
        # Not public by default: the endpoint sits on the app's public origin (docs/deployment.md).
        if not settings.allows_peer(request.client.host if request.client else None):
            if settings.bearer_token is None:
                return error_response(request.scope, 403, "metrics_forbidden",
                                      "The metrics are served only with metrics.bearer_token or to a peer "
                                      "listed in metrics.allow_from.")
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            expected = settings.bearer_token.get_secret_value().encode()
            # compare_digest on bytes: constant time, and no error on a non-ASCII header value.
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected):
                return error_response(request.scope, 401, "metrics_unauthorized",
                                      "The metrics need the bearer token set in metrics.bearer_token.",
                                      headers={"www-authenticate": 'Bearer realm="gateway metrics"'})
        return PlainTextResponse(await self.runtime.metrics.scrape(), headers={"cache-control": "no-store"},
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def static(self, request: Request, rest: str) -> Response:
        script = self._scripts.get(rest)
        if script is None:
            return error_response(request.scope, 404, "not_found", "There is no such file.")
        return Response(script, media_type="application/javascript",
                        headers={"cache-control": "public, max-age=300", "x-content-type-options": "nosniff"})


def _script_messages(locale: Locale, name: str) -> dict[str, str]:
    """The strings the handshake script shows, in ``locale`` (the script has no catalogue)."""
    return {
        "tryAgain": text("action.try_again", locale),
        "browserSignIn": text("action.sign_in_in_browser", locale),
        # "{reason}" is replaced by the script (English only: the reasons are the bridges' English).
        "toBrowser": (text("page.browser_sign_in", locale)[:-1] + "{reason}…") if locale == EN
        else text("page.browser_sign_in", locale),
        "signingYouIn": text("page.signing_you_in", locale),
        "connectingTo": text("page.connecting_to", locale, name=name),
        "continuingWith": text("page.continuing_with", locale, name=name),
        "pendingTitle": text("title.approval_pending", locale),
        "pending": text("page.pending", locale),
        "deniedTitle": text("title.access_denied", locale),
        "declined": text("page.declined", locale),
        "notCompleted": text("page.not_completed", locale),
        "notCompletedDenied": text("page.not_completed_denied", locale),
        "accessWasDenied": text("page.access_was_denied", locale),
        "codeUnusable": text("page.code_unusable", locale),
        "exchangeFailed": text("page.exchange_failed", locale),
        "providerFailed": text("error.provider_error", locale),
        "approvalNeeded": text("error.approval_pending", locale),
        "networkFailed": text("page.network_failed", locale),
        "gatewayTimeout": text("page.gateway_timeout", locale),
    }


def _browser_host(request: Request) -> str:
    """The host the browser used: a trusted proxy's X-Forwarded-Host (the edge removed any other
    sender's), else Host."""
    forwarded = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    return forwarded or request.headers.get("host", "")


def _host_key(host: str) -> str:
    """A Host (or netloc) as compared with public_url's: lower case, without a default port."""
    host = host.strip().lower().rpartition("@")[2]
    return host[:-3] if host.endswith(":80") else host[:-4] if host.endswith(":443") else host


def _origin(url: str) -> list[str]:
    """The origin of an http(s) ``url`` as a CSP source; none for anything else ("" for
    ``jssdk_url``: the page already has the SDK)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or any(c in url for c in " ;,'\""):
        return []
    return [f"{parts.scheme}://{parts.netloc}"]
