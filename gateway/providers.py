"""The provider plugin interface and its entry-point registry.

A provider plugin teaches the gateway one identity provider (Lark/Feishu, DingTalk, Tencent
Meeting...). The core never knows which one it talks to: everything provider-specific lives in a
``Provider`` subclass, registered under the entry-point group ``gateway.providers``::

    # pyproject.toml of a plugin package
    [project.entry-points."gateway.providers"]
    acme = "acme_gateway.provider:AcmeProvider"

How to write one (see ``plugins/lark/provider.py`` for a complete example):

1. Subclass ``ProviderSettings`` with the plugin's own config keys (``client_id``, base URLs with
   the real hosts as defaults, ``jssdk_url``...). Mark secrets ``SecretStr`` so they are masked.
   ``base_url_validator`` / ``optional_url_validator`` check and normalise the URL settings.
2. Subclass ``Provider``, set ``settings_model`` and ``bridge_js`` (the path of the JavaScript
   adapter that asks the client's JSAPI for a code), and implement:

   - ``detect_client(user_agent)``: does this User-Agent belong to the provider's client?
   - ``bridge_config(login)``: the JSON the bridge needs (app id, JSSDK URL, scopes...).
   - ``authorize_url(login)``: the browser OAuth URL.
   - ``parse_callback(params)``: the code (or the error) from the OAuth redirect.
   - ``redeem(code, ...)``: code -> ``Grant`` (tokens and identity).
   - ``refresh(tokens)``: rotate the tokens. Only refresh tokens that rotate need care here: the
     core guarantees one refresh at a time per token record.

3. For the provider-API relay (``<prefix>/api/<name>/<path>``, gateway/relay.py), override the
   ``relay_*`` hooks: ``relay_base_url(path)`` (which host serves ``<path>``; None refuses it),
   ``relay_auth`` (how the token rides: headers, query), ``relay_verdict`` (what an answer means:
   expired token, missing scope, rate limit, transient), ``relay_app_token`` for ``token: app``
   routes, and ``relay_credential_headers`` (the token headers a caller must never pass through).
   The core does the rest: routes, callers, streaming, one refresh and one retry, consent.

4. Raise the ``gateway.errors`` provider errors to classify every failure: ``ReauthRequired``
   (definitive), ``ProviderUnavailable`` (transient), ``ProviderMisconfigured``, ``LoginDenied``,
   ``LoginPending``. ``classify_http_error`` below turns network failures into the transient one.

The shared defaults (PKCE off, no extra routes, no app-level token) live in ``Provider`` itself,
and so does ``Provider.send`` (one HTTP request, network failures classified). The helpers at the
end serve every plugin's answer reading: ``json_object``, ``str_field``, ``as_int``, ``unwrap``,
and ``ErrorRule`` (with ``reauth``/``transient``/``misconfigured``/``denied``) for the table that
maps a provider's error codes to the gateway's errors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, get_args
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.routing import BaseRoute

from gateway.errors import (
    ConfigError,
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.stores import Store

if TYPE_CHECKING:
    from gateway.tokens import AppTokenCache

ENTRY_POINT_GROUP = "gateway.providers"

T = TypeVar("T")
Flow = Literal["client", "browser"]


class ProviderSettings(BaseModel):
    """Base of every plugin's settings model: ``plugin`` names the entry point."""

    model_config = ConfigDict(extra="forbid")

    plugin: str
    jssdk_url: str = ""
    # Bounded waits of the handshake page (seconds): SDK load, ready hook, each JSAPI call.
    client_timeout_s: float = 8.0


def http_url(value: str, example: str) -> str:
    """``value`` when it is an http(s) URL with a host; else a ValueError that shows ``example``."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL such as {example}")
    return value


def base_url_validator(*fields: str, example: str) -> Any:
    """A validator for settings that name a provider host: an http(s) URL, without its trailing
    slash (the plugin appends paths). In a settings model::

        _base_urls = base_url_validator("api_base_url", "login_base_url", example="https://api.acme.com")
    """

    def base_url(value: str) -> str:
        return http_url(value, example).rstrip("/")

    return field_validator(*fields)(base_url)


def optional_url_validator(*fields: str, example: str) -> Any:
    """Like ``base_url_validator`` for a URL setting that may be "" (e.g. ``jssdk_url``: the page
    already has the SDK), and kept as written."""

    def optional_url(value: str) -> str:
        return http_url(value, example) if value else value

    return field_validator(*fields)(optional_url)


@dataclass(frozen=True)
class UserIdentity:
    """Who the provider says the user is. ``tenant`` is "" for users outside any organisation."""

    user: str
    tenant: str = ""
    name: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSet:
    """A user's provider tokens. Times are absolute unix seconds.

    ``extra`` holds what a provider needs to refresh besides the refresh token (e.g. WeMeet's
    ``open_id``); it is stored with the record, so keep it small and non-secret.

    ``flow`` is how the sign-in that produced these tokens ran, ``client`` or ``browser`` (the
    handshake stamps it; a refresh keeps it), for the ``token.*`` audit events. None: unknown (a
    record stored before it was kept), and then omitted from the record and from the events.
    """

    access_token: str
    expires_at: float
    refresh_token: str | None = None
    refresh_expires_at: float | None = None
    issued_at: float = field(default_factory=time.time)
    scope: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)
    flow: Flow | None = None

    @property
    def lifetime_s(self) -> float:
        return max(0.0, self.expires_at - self.issued_at)

    def refresh_at(self, margin_s: float) -> float:
        """When to refresh: ``min(margin, half the lifetime)`` before expiry."""
        return self.expires_at - min(margin_s, self.lifetime_s / 2)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "at": self.access_token,
            "exp": self.expires_at,
            "rt": self.refresh_token,
            "rexp": self.refresh_expires_at,
            "iat": self.issued_at,
            "scope": self.scope,
            "extra": dict(self.extra),
        }
        if self.flow is not None:
            data["flow"] = self.flow
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TokenSet:
        return cls(
            access_token=data["at"],
            expires_at=data["exp"],
            refresh_token=data.get("rt"),
            refresh_expires_at=data.get("rexp"),
            issued_at=data.get("iat", 0.0),
            scope=data.get("scope", ""),
            extra=data.get("extra") or {},
            # Absent in a record stored before the flow was kept; anything else unknown is too.
            flow=flow if (flow := data.get("flow")) in get_args(Flow) else None,
        )


@dataclass(frozen=True)
class Grant:
    """What a redeemed code yields: fresh tokens and the identity they belong to."""

    tokens: TokenSet
    identity: UserIdentity


#: ``LoginContext.extra_scopes`` entries for an app-token route (``/consent?grant=app``) carry it.
APP_SCOPE_MARK = "app:"


@dataclass(frozen=True)
class LoginContext:
    """One login attempt, as the handshake page and the authorize URL need it."""

    state: str
    redirect_uri: str
    next_path: str
    code_challenge: str | None = None  # PKCE S256, when ``Provider.uses_pkce``
    #: Scopes asked for beyond the configured ones (``<prefix>/consent``: incremental consent).
    #: A plugin adds them to its authorize URL and to what its bridge asks the JSAPI for; those
    #: marked ``APP_SCOPE_MARK`` are for the app's own token, granted by an administrator.
    extra_scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallbackResult:
    """The OAuth redirect, read: a code, or the provider's error.

    ``error`` values the core understands: ``access_denied`` (the user declined: a "declined"
    page) and ``approval_pending`` (an administrator must approve first: a "waiting for your
    admin" page, with ``error_description`` as its text). Any other value is a provider error.
    """

    state: str
    code: str | None = None
    error: str | None = None
    error_description: str = ""
    context: Mapping[str, str] = field(default_factory=dict)


@dataclass
class ProviderContext:
    """What the core hands every provider: its HTTP client, the store, its callback URL."""

    name: str
    redirect_uri: str
    http: httpx.AsyncClient
    store: Store
    path_prefix: str = "/_gateway"
    #: The time source for token lifetimes (tests move it forward).
    clock: Callable[[], float] = time.time
    #: App-level tokens (tenant/app/corp access tokens), cached and single-flight; set by the core.
    app_tokens: AppTokenCache | None = None


RelayOutcome = Literal["pass", "expired", "consent", "rate_limited", "unavailable", "misconfigured"]


@dataclass(frozen=True)
class RelayVerdict:
    """What a provider's answer to a relayed call means (``Provider.relay_verdict``).

    - ``pass``: hand it to the caller as it is (success, or an error that is the caller's own);
    - ``expired``: the token was refused as expired or invalid: refresh once and retry once;
    - ``consent``: the grant lacks ``scopes``: the caller gets ``403 consent_required``;
    - ``rate_limited``: passed on with its hints and ``Retry-After: retry_after_s``, never retried;
    - ``unavailable``: transient: ``503 provider_unavailable`` with ``Retry-After``;
    - ``misconfigured``: only the operator can fix it (e.g. a user-token route on an API that
      takes only app tokens): ``relay_misconfigured``, ``message`` says what.
    """

    outcome: RelayOutcome = "pass"
    scopes: tuple[str, ...] = ()
    retry_after_s: int | None = None
    message: str = ""


PASS = RelayVerdict()


@dataclass(frozen=True)
class RelayAuth:
    """How a relayed call carries its token: headers to set and query parameters to add."""

    headers: Sequence[tuple[str, str]] = ()
    params: Sequence[tuple[str, str]] = ()


class Provider:
    """Base class of every provider plugin. Subclass it; see the module docstring."""

    settings_model: ClassVar[type[ProviderSettings]] = ProviderSettings
    #: The JavaScript adapter served to the handshake page (registers ``gatewayBridges[<plugin>]``).
    bridge_js: ClassVar[Path | None] = None
    #: Whether ``authorize_url`` uses a PKCE S256 challenge; the core then keeps the verifier.
    uses_pkce: ClassVar[bool] = False
    #: The human name shown on pages ("Feishu", "DingTalk"...); an instance may set its own.
    display_name: str = ""

    def __init__(self, settings: ProviderSettings, context: ProviderContext) -> None:
        self.settings = settings
        self.context = context

    @property
    def name(self) -> str:
        return self.context.name

    @property
    def plugin(self) -> str:
        return self.settings.plugin

    @property
    def http(self) -> httpx.AsyncClient:
        return self.context.http

    # -- the browser side -------------------------------------------------------------------

    def detect_client(self, user_agent: str) -> bool:
        """True when the User-Agent shows this provider's client (the page can try its JSAPI)."""
        return False

    def bridge_config(self, login: LoginContext) -> dict[str, Any]:
        """JSON for the bridge script. ``jssdk_url`` and timeouts are added by the core."""
        return {}

    def authorize_url(self, login: LoginContext) -> str:
        """The browser OAuth URL that comes back to ``login.redirect_uri`` with ``state``."""
        raise NotImplementedError

    def parse_callback(self, params: Mapping[str, str]) -> CallbackResult:
        """Read the OAuth redirect. The default reads ``code``/``error``/``state``."""
        return CallbackResult(
            state=params.get("state", ""),
            code=params.get("code") or None,
            error=params.get("error") or None,
            error_description=params.get("error_description", ""),
        )

    def routes(self) -> Sequence[BaseRoute]:
        """Extra endpoints, mounted under ``<prefix>/providers/<name>`` (e.g. event callbacks)."""
        return ()

    # -- the server side --------------------------------------------------------------------

    async def redeem(
        self,
        code: str,
        *,
        flow: Flow,
        redirect_uri: str,
        code_verifier: str | None = None,
        client_context: Mapping[str, str] | None = None,
    ) -> Grant:
        """Exchange a one-time code for tokens and the user's identity.

        ``flow`` is ``"client"`` for a JSAPI code and ``"browser"`` for an OAuth redirect code.
        ``client_context`` carries what the bridge reported besides the code (e.g. a corpId).
        """
        raise NotImplementedError

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        """Rotate the tokens. Raise ``ReauthRequired`` when the refresh token is dead."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release what the provider holds (the HTTP client belongs to the core)."""

    # -- the relay: <prefix>/api/<name>/<path> (gateway/relay.py, docs/relay.md) -----------------
    #
    # The core decides who may call what (relay.routes), removes the caller's credentials, streams
    # the bodies and runs refresh-and-retry; the plugin only says where ``<path>`` goes, how the
    # token rides on it, and what the provider's answers mean. The defaults fit an OAuth API that
    # takes ``Authorization: Bearer`` and answers 401 to a dead token: a plugin without an Open
    # API leaves ``relay_base_url`` returning None and every relayed call is refused.

    #: Request headers that carry a provider credential (lower case): a caller's are dropped,
    #: never forwarded (``Authorization`` and ``Cookie`` are always dropped by the core).
    relay_credential_headers: ClassVar[frozenset[str]] = frozenset()
    #: Query parameters that carry a credential: a caller's are dropped, never forwarded.
    relay_credential_params: ClassVar[frozenset[str]] = frozenset({"access_token"})

    def relay_base_url(self, path: str) -> str | None:
        """The base URL ``<path>`` is appended to (no trailing slash), or None when this provider
        serves no such API (the call is refused with ``relay_forbidden``)."""
        return None

    def relay_auth(self, path: str, token: str, *, kind: Literal["user", "app"], tokens: TokenSet | None) -> RelayAuth:
        """Attach ``token`` (the user's access token, or the app token when ``kind == "app"``).
        ``tokens`` is the user's record (None for an app call without a user). Raise
        ``ProviderMisconfigured`` when this token cannot be used on this path."""
        return RelayAuth(headers=(("Authorization", f"Bearer {token}"),))

    async def relay_app_token(self, tenant: str) -> str:
        """The app-level token for ``tenant`` (the organisation the caller belongs to), from the
        shared, single-flight cache (``ProviderContext.app_tokens``)."""
        raise ProviderMisconfigured(
            f"{self.display_name or self.name} has no app-level token: use token: user for this route.",
            code="relay_misconfigured",
        )

    async def relay_app_token_rejected(self, tenant: str, token: str) -> None:
        """The provider refused the app token ``token`` before its time: forget it (once), so the
        retry fetches a new one. The default forgets nothing."""

    def relay_verdict(self, status: int, headers: Mapping[str, str], body: bytes | None) -> RelayVerdict:
        """Read a provider's answer. ``body`` is the whole body when it is small and JSON (error
        envelopes are), else None (a download streams through unread). The default: 401 is an
        expired token, 429 a rate limit, a 5xx transient, anything else passes."""
        if status == 401:
            return RelayVerdict("expired")
        if status == 429:
            return RelayVerdict("rate_limited", retry_after_s=retry_after_hint(headers, "retry-after"))
        if status >= 500:
            return RelayVerdict("unavailable")
        return PASS

    def granted_scopes(self, tokens: TokenSet) -> frozenset[str] | None:
        """The scopes the user's grant holds, or None when the provider does not say (then a
        route's ``scopes`` are not checked before the call: the provider's answer decides)."""
        names = scope_names(tokens.scope)
        return frozenset(names) if names else None

    # -- helpers for subclasses ---------------------------------------------------------------

    async def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request to the provider with the core's client. A network failure or a timeout
        raises the transient error of ``classify_http_error`` (never a raw httpx error)."""
        try:
            return await self.http.request(method, url, **kwargs)
        except httpx.HTTPError as exc:
            raise classify_http_error(exc, provider=self.display_name or self.name) from None


def scope_names(scope: str) -> list[str]:
    """The scopes of a grant's scope string: space-separated as OAuth writes them, commas accepted
    too (some providers answer a comma-separated list)."""
    return scope.replace(",", " ").split()


def retry_after_hint(headers: Mapping[str, str], *names: str) -> int | None:
    """The first of ``names`` that holds a whole number of seconds (0-3600), e.g. Lark's
    ``x-ogw-ratelimit-reset``; None when none does."""
    for name in names:
        value = as_int(headers.get(name, "").strip())
        if value is not None and 0 <= value <= 3600:
            return max(1, value)
    return None


def classify_http_error(exc: httpx.HTTPError, *, provider: str) -> ProviderUnavailable:
    """A network failure talking to a provider is always transient."""
    if isinstance(exc, httpx.TimeoutException):
        return ProviderUnavailable(f"{provider} did not answer in time.", code="provider_timeout")
    return ProviderUnavailable(f"{provider} could not be reached.", code="provider_unreachable")


# -- reading answers ---------------------------------------------------------------------------


def json_object(answer: httpx.Response | bytes | None) -> dict[str, Any] | None:
    """The answer's body (a response, or a relayed answer's bytes) when it is a JSON object;
    None otherwise (empty, not JSON, or another type)."""
    if not answer:
        return None
    try:
        body = answer.json() if isinstance(answer, httpx.Response) else json.loads(answer)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def str_field(data: Mapping[str, Any], key: str) -> str:
    """A string field of an answer (or a request body), or "" when it is absent or not a string."""
    value = data.get(key)
    return value if isinstance(value, str) else ""


def as_int(value: Any) -> int | None:
    """An integer, or a string of one (providers send codes both ways); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def unwrap(answer: tuple[T, ProviderError | None]) -> T:
    """The body of a classified answer ``(body, error)``; raises the error when there is one."""
    body, error = answer
    if error is not None:
        raise error
    return body


@dataclass(frozen=True)
class ErrorRule:
    """What one provider error means for the gateway: the error class to raise, its message (a
    plugin may format it), the gateway's stable error ``code`` (None keeps the class default)
    and, for transient errors, when to retry."""

    kind: type[ProviderError]
    message: str
    code: str | None = None
    retry_after_s: int = 5

    def error(
        self, message: str, provider_code: int | str | None, *, retry_after_s: int | None = None
    ) -> ProviderError:
        """The error to raise: ``message`` (this rule's, as the plugin completed it) and the
        provider's own code; ``retry_after_s`` overrides the rule's (a provider's own hint)."""
        if self.kind is ProviderUnavailable:
            retry = self.retry_after_s if retry_after_s is None else retry_after_s
            return ProviderUnavailable(message, code=self.code, provider_code=provider_code, retry_after_s=retry)
        return self.kind(message, code=self.code, provider_code=provider_code)


def reauth(message: str, code: str | None = None) -> ErrorRule:
    """Definitive: the grant is dead, a new login is needed."""
    return ErrorRule(ReauthRequired, message, code)


def transient(message: str, code: str | None = None, retry_after_s: int = 5) -> ErrorRule:
    """Transient: keep every token and try again later."""
    return ErrorRule(ProviderUnavailable, message, code, retry_after_s)


def misconfigured(message: str) -> ErrorRule:
    """Only an operator can fix it (the config or the provider's console)."""
    return ErrorRule(ProviderMisconfigured, message)


def denied(message: str, code: str) -> ErrorRule:
    """This user (or their organisation) may not use the app."""
    return ErrorRule(LoginDenied, message, code)


_registered: dict[str, type[Provider]] = {}


def register_plugin(name: str, cls: type[Provider]) -> None:
    """Register a provider class in-process (tests, apps that embed a private provider).

    Installed packages should use the ``gateway.providers`` entry point instead.
    """
    _registered[name] = cls


def available_plugins() -> dict[str, type[Provider]]:
    """Every provider class registered under ``gateway.providers``, plus in-process ones."""
    found: dict[str, type[Provider]] = dict(_registered)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(entry.name, _load(entry.name, entry.load()))
    return found


def _load(name: str, cls: object) -> type[Provider]:
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(f"The plugin {name!r} does not name a Provider subclass.")
    return cls


def load_plugin(name: str) -> type[Provider]:
    """The provider class of one plugin; only that plugin is imported."""
    if name in _registered:
        return _registered[name]
    entries = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not entries:
        known = sorted({*_registered, *(entry.name for entry in entry_points(group=ENTRY_POINT_GROUP))})
        raise ConfigError(
            f"No provider plugin named {name!r} is installed (installed: {', '.join(known) or 'none'})."
        )
    return _load(name, next(iter(entries)).load())
