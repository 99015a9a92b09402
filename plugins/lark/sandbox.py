"""A strict emulator of Lark / Feishu's server side, for tests, the demo and ``gateway sandbox``.

It follows the provider's documentation (``docs/providers/lark.md`` lists the sources)
and is deliberately picky, so that a client which works
against it has a fair chance against the real thing:

- one-time codes: browser codes live 5 min, ``requestAccess`` codes 3 min, ``requestAuthCode``
  codes 5 min; a second use answers 20065, an unknown code 20003, an expired one 20004;
- browser codes are bound to their ``redirect_uri`` (20071) and PKCE challenge (20049, S256 or
  plain); in-client codes need no redirect_uri;
- refresh tokens exist only with ``offline_access``, rotate on every use, and a used one answers
  **20064** ("revoked ... a refresh token can only be used once", the answer observed from the real
  server; 20073 is only reachable through ``inject_fault``); they die 365 days after the
  authorization at the latest (20037); the access token they replace keeps 60 s of grace;
- the v2 endpoint takes only v2-issued refresh tokens (20026), the v3 endpoint takes both;
- HTTP Basic auth together with ``client_secret`` answers 20070;
- grants accumulate: a user's newest token carries every scope they ever granted the app.

Two hosts, as in production (official SDKs take a host, not a path):

- ``open``: ``/open-apis/authen/v2/oauth/token``, ``/open-apis/authen/v1/user_info``,
  ``/open-apis/auth/v3/{app,tenant}_access_token/internal`` and the fake JSSDK at
  ``/_sandbox/h5-js-sdk.js``;
- ``accounts``: ``/open-apis/authen/v1/authorize`` (plus its consent form) and ``/oauth/v3/token``.

Both serve the admin API under ``/_sandbox/``: ``GET stats``, ``GET events``, ``POST faults``
(``DELETE`` clears), ``POST user_consent``, ``POST tokens/expire``, ``POST current_user``, ``POST
jsapi_mode`` and ``POST jsapi/code`` (CORS-enabled: the fake JSSDK mints in-client codes there).
Paths are spelled out here rather than imported from the provider,
so a typo on one side cannot hide behind the same typo on the other.

All state lives on the instance; the ``clock`` knob lets a test move time forward.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import html
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.providers import str_field
from gateway.sandbox import (
    CORS_HEADERS,
    DemoApiCall,
    Fault,
    Sandbox,
    TourEntry,
    consent_form,
    read_body,
    redirect_allowed,
    redirect_to,
    script_response,
    without_query,
)
from plugins.lark import openapi

CodeApi = Literal["browser", "requestAccess", "requestAuthCode"]
JsapiMode = Literal["current", "old_client", "old_sdk", "hang", "sdk_error"]
JSAPI_MODES: tuple[JsapiMode, ...] = get_args(JsapiMode)

# Lifetimes from the sheet (seconds).
CODE_TTL_S: dict[CodeApi, float] = {"browser": 300, "requestAccess": 180, "requestAuthCode": 300}
ROTATION_GRACE_S = 60  # the replaced user_access_token still works this long after a refresh
AUTHORIZATION_CAP_S = 365 * 86400  # refresh stops working this long after the user authorized
APP_TOKEN_TTL_S = 7200
APP_TOKEN_REISSUE_S = 1800  # with less than this left, a call mints a new app/tenant token
CONSENT_TTL_S = 600

SANDBOX_APP_ID = "cli_sandbox0000001"
SANDBOX_APP_SECRET = "sandbox-app-secret-0123456789abcdefXYZ"  # not a secret: the sandbox's fixed default
USER_ID_SCOPE = "contact:user.employee_id:readonly"
EMAIL_SCOPE = "contact:user.email:readonly"
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
_CLIENT_UA = re.compile(r"Lark/\d|LarkLocale/")


@dataclass(frozen=True)
class LarkUser:
    """One account of the emulated organisation(s). ``status`` and ``visible`` drive the errors:
    an inactive user gets 20066 at the token endpoint and 20021-20023 at user_info; a user outside
    the app's availability scope gets 20010 (and 10228 from requestAuthCode)."""

    open_id: str
    union_id: str
    user_id: str
    tenant_key: str
    name: str
    en_name: str = ""
    email: str = ""
    status: Literal["active", "resigned", "frozen", "not_registered"] = "active"
    visible: bool = True


DEFAULT_USERS: tuple[LarkUser, ...] = (
    LarkUser(
        open_id="ou_7dab8a3d3cdcc9da365777c7ad535d62",
        union_id="on_94a1ee5551019f18cd73d9f111898cf2",
        user_id="3e3cf96b",
        tenant_key="736588c9260f175d",
        name="张三",
        en_name="San Zhang",
        email="zhangsan@example.com",
    ),
    LarkUser(
        open_id="ou_1f2d3c4b5a69788796a5b4c3d2e1f0a9",
        union_id="on_0a1b2c3d4e5f60718293a4b5c6d7e8f9",
        user_id="5d9bdxxa",
        tenant_key="736588c9260f175d",
        name="Li Si",
        en_name="Si Li",
    ),
    LarkUser(
        open_id="ou_c99c5f35d542efc7ee492afe11af19ef",
        union_id="on_2d6f0ab1e4c3e5a7f9b8c1d0e2f3a4b5",
        user_id="ab12cd34",
        tenant_key="2ed263bf32cf1651",
        name="Alice Smith",
        en_name="Alice Smith",
        email="alice@other.example",
    ),
)

# Token endpoint errors (sheet 5.4): HTTP status, OAuth ``error``, ``error_description``. Only
# server_error (20050) and invalid_grant (20064, 20037) are known names; the rest follow RFC 6749.
TOKEN_ERRORS: dict[int, tuple[int, str, str]] = {
    20001: (400, "invalid_request", "The request is missing a required parameter."),
    20002: (400, "invalid_client", "The client secret is invalid."),
    20003: (400, "invalid_grant", "The authorization code is not found. Please note that an authorization code can only be used once."),  # noqa: E501
    20004: (400, "invalid_grant", "The authorization code has expired."),
    20008: (400, "invalid_grant", "The user does not exist."),
    20009: (400, "unauthorized_client", "The app is not installed by the tenant."),
    20010: (400, "invalid_grant", "The user does not have permission to use this app."),
    20024: (400, "invalid_grant", "The provided authorization code or refresh token does not match the client."),
    20026: (400, "invalid_grant", "The refresh token is invalid."),
    20036: (400, "unsupported_grant_type", "The grant type is not supported."),
    20037: (400, "invalid_grant", "The refresh token has expired."),
    20048: (400, "invalid_client", "The app does not exist."),
    20049: (400, "invalid_grant", "PKCE code challenge failed."),
    20050: (500, "server_error", "An unexpected server error occurred. Please retry your request."),
    20063: (400, "invalid_request", "The request is malformed."),
    20064: (400, "invalid_grant", "The refresh token has been revoked. Please note that a refresh token can only be used once."),  # noqa: E501
    20065: (400, "invalid_grant", "The authorization code has been used."),
    20066: (400, "invalid_grant", "The user status is invalid."),
    20067: (400, "invalid_scope", "The scope contains duplicates."),
    20068: (400, "invalid_scope", "The scope has not been granted."),
    20069: (400, "unauthorized_client", "The app is not enabled."),
    20070: (400, "invalid_request", "Both HTTP Basic authentication and client_secret were provided."),
    20071: (400, "invalid_grant", "The redirect_uri does not match the one used for authorization."),
    20072: (503, "temporarily_unavailable", "The server is temporarily unavailable. Please retry your request."),
    20073: (400, "invalid_grant", "The refresh token has been used."),
    20074: (400, "unauthorized_client", "The app is not allowed to refresh user access tokens."),
}

# Other OpenAPI answers ``{code, msg}``: HTTP status and msg. user_info's own errors are HTTP 200
# (sheet 9); the generic 9999xxxx ones have no documented status, 400 is what older APIs use.
API_ERRORS: dict[int, tuple[int, str]] = {
    10003: (200, "invalid param"),
    10014: (200, "app unauthorized"),
    10015: (200, "app secret invalid"),
    20001: (200, "invalid request"),
    20005: (200, "invalid access_token"),
    20008: (200, "user not exist"),
    20021: (200, "user resigned"),
    20022: (200, "user frozen"),
    20023: (200, "user not registered"),
    20050: (500, "system error"),
    99991400: (429, "request trigger frequency limit"),
    99991543: (200, "login_user invalid"),
    99991661: (400, "Missing access token for authorization. Please make a request with token attached."),
    99991663: (400, "Invalid access token for authorization. Please make a request with token attached."),
    99991668: (400, "Invalid access token for authorization. Please make a request with token attached."),
    99991672: (400, "Access denied. One of the following scopes is required: [contact:user.base:readonly]."),
    99991677: (400, "token expire"),
    99991679: (400, "Unauthorized. You do not have permission to perform the requested operation on the resource. Please request user re-authorization and try again. required one of these privileges: [contact:user.base:readonly]"),  # noqa: E501
}

# The authorize page's own errors, shown to the user (no redirect: the redirect_uri is not trusted).
PAGE_ERRORS: dict[int, str] = {
    20001: "Invalid request: a required parameter is missing or malformed.",
    20027: "The app has not enabled a requested scope.",
    20029: "Invalid redirect_uri: it is missing or not registered for this app.",
    20048: "The app does not exist.",
}


class LarkApiError(Exception):
    """Raised inside a handler to answer one of the documented error codes."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@dataclass
class _Code:
    open_id: str
    api: CodeApi
    scopes: frozenset[str]
    expires_at: float
    redirect_uri: str | None = None  # browser codes only
    challenge: str | None = None
    challenge_method: str = "plain"
    used: bool = False


@dataclass
class _AccessToken:
    open_id: str
    expires_at: float
    dies_at: float | None = None  # set when a refresh replaced it: the end of its grace minute


@dataclass
class _RefreshToken:
    open_id: str
    scopes: frozenset[str]
    expires_at: float
    authorized_at: float
    issuer: Literal["v2", "v3"]
    access_token: str
    state: Literal["active", "used", "revoked"] = "active"


@dataclass
class _Consent:
    open_id: str
    redirect_uri: str
    state: str | None
    scopes: frozenset[str]
    challenge: str | None
    challenge_method: str
    expires_at: float


def _token(prefix: str, nbytes: int) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def _duration(seconds: float) -> str:
    """``7200`` -> "2 h", for the timeline."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _pkce_ok(verifier: str, challenge: str, method: str) -> bool:
    if not _PKCE_VERIFIER.fullmatch(verifier):
        return False
    if method == "S256":
        digest = hashlib.sha256(verifier.encode("ascii")).digest()
        verifier = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return hmac.compare_digest(verifier, challenge)


def _basic_auth(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        client_id, _, client_secret = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    return client_id, client_secret


def token_error(code: int, status: int | None = None) -> JSONResponse:
    """The token endpoint's error shape: ``{code, error, error_description}``."""
    default_status, error, description = TOKEN_ERRORS.get(code, (400, "invalid_request", "Request failed."))
    return JSONResponse(
        {"code": code, "error": error, "error_description": description}, status_code=status or default_status
    )


def api_error(code: int, status: int | None = None) -> JSONResponse:
    """The OpenAPI error shape ``{code, msg, error: {log_id}}``, with the rate-limit headers."""
    default_status, msg = API_ERRORS.get(code, (400, "request failed"))
    headers = {"x-tt-logid": _token("sandbox", 9)}
    if code == 99991400:
        headers.update({"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "7"})
    body = {"code": code, "msg": msg, "error": {"log_id": headers["x-tt-logid"]}}
    return JSONResponse(body, status_code=status or default_status, headers=headers)


class LarkSandbox(Sandbox):
    """The emulator. Knobs are constructor arguments; the rest of the API is for tests and demos.

    ``enabled_scopes`` are the scopes the app enabled in its console: requesting another one is
    20027 on the authorize page; ``user_id`` (``contact:user.employee_id:readonly``) and ``email``
    (``contact:user.email:readonly``) only appear in user_info when enabled. ``refresh_enabled``
    is the console's refresh switch (20074 when off). ``redirect_uris`` is the console's redirect
    URL list (empty accepts any http(s) URL). ``jsapi_mode`` shapes the fake JSSDK: ``current``,
    ``old_client`` (requestAccess fails with errno 103), ``old_sdk`` (no ``tt.requestAccess``),
    ``hang`` (``h5sdk.ready`` never fires), ``sdk_error`` (``h5sdk.error`` fires instead).

    ``stats`` counts calls per endpoint (``token``, ``token_v3``, ``user_info``, ``authorize``,
    ``jsapi_code``, ``app_access_token``, ``tenant_access_token``) and per grant type
    (``authorization_code``, ``refresh_token``); ``inject_fault`` takes those names, or
    ``token:refresh_token``-style for one grant type (see ``fault_response``).
    """

    plugin = "lark"
    title = "Feishu/Lark"
    tour_position = 10
    client_user_agent = "Lark/7.30.8 LarkLocale/en_US ChannelName/Feishu"
    jsapi_modes = JSAPI_MODES
    call_labels: ClassVar[Mapping[str, tuple[str, str]]] = {
        "authorize": ("call", "the browser opened the authorization page (accounts host)"),
        "jsapi_code": ("jsapi", "JSAPI: the page asked the client for a code (tt.requestAccess)"),
        "token:authorization_code": ("exchange", "the gateway exchanged the code (authen/v2/oauth/token)"),
        "token_v3:authorization_code": ("exchange", "the gateway exchanged the code (oauth/v3/token)"),
        "token:refresh_token": ("refresh", "the gateway refreshed the user token (grant_type=refresh_token)"),
        "token_v3:refresh_token": ("refresh", "the gateway refreshed the user token (v3, refresh_token)"),
        "user_info": ("identity", "the gateway read the user (authen/v1/user_info)"),
        "app_access_token": ("call", "the gateway fetched an app_access_token"),
        "tenant_access_token": ("call", "the gateway fetched a tenant_access_token"),
        "calendars": ("call", "an app read the user's calendars through the relay (calendar/v4/calendars)"),
        "tenant_query": ("call", "an app read the organisation with the tenant token (tenant/v2/tenant/query)"),
    }

    def __init__(
        self,
        *,
        app_id: str = SANDBOX_APP_ID,
        app_secret: str = SANDBOX_APP_SECRET,
        users: Sequence[LarkUser] = DEFAULT_USERS,
        access_ttl_s: int = 7200,
        refresh_ttl_s: int = 604800,
        auto_consent: bool = True,
        redirect_uris: Sequence[str] = (),
        enabled_scopes: Sequence[str] = ("offline_access", USER_ID_SCOPE, EMAIL_SCOPE, *openapi.SCOPES),
        refresh_enabled: bool = True,
        jsapi_mode: JsapiMode = "current",
        delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not users:
            raise ValueError("the sandbox needs at least one user")
        super().__init__(delay_s=delay_s)
        self.app_id = app_id
        self.app_secret = app_secret
        self.users: dict[str, LarkUser] = {user.open_id: user for user in users}
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.auto_consent = auto_consent
        self.redirect_uris = [without_query(uri) for uri in redirect_uris]
        self.enabled_scopes = set(enabled_scopes)
        self.refresh_enabled = refresh_enabled
        self.jsapi_mode: JsapiMode = jsapi_mode
        self.clock = clock
        self.current_user = users[0].open_id
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _AccessToken] = {}
        self._refresh: dict[str, _RefreshToken] = {}
        self._grants: dict[str, set[str]] = {}  # open_id -> every scope the user ever granted
        self._consents: dict[str, _Consent] = {}
        self._app_tokens: dict[str, list[tuple[str, float]]] = {"app": [], "tenant": []}

    # -- the Python API ------------------------------------------------------------------------

    def set_current_user(self, open_id: str) -> None:
        """The user the authorize page and the fake JSAPI log in as."""
        if open_id not in self.users:
            raise KeyError(f"no sandbox user {open_id!r}")
        self.current_user = open_id

    def mint_client_code(
        self, api: Literal["requestAccess", "requestAuthCode"] = "requestAccess", open_id: str | None = None,
        scopes: Sequence[str] = ("offline_access",),
    ) -> str:
        """A code as the client's JSAPI would hand it to the page (``scopes``: requestAccess's
        scopeList; requestAuthCode grants nothing new)."""
        user = open_id or self.current_user
        if user not in self.users:
            raise KeyError(f"no sandbox user {user!r}")
        return self._mint(user, api, frozenset(scopes) if api == "requestAccess" else frozenset())

    def expire_access_tokens(self) -> int:
        now = self.clock()
        live = [access for access in self._access.values()
                if access.expires_at > now and (access.dies_at is None or access.dies_at > now)]
        for access in live:
            access.expires_at = now  # user_info now answers 99991677 "token expire"
        return len(live)

    def revoke(self, open_id: str) -> None:
        """Revoke every token of a user (an admin or the user removed the authorization)."""
        for refresh in self._refresh.values():
            if refresh.open_id == open_id and refresh.state == "active":
                refresh.state = "revoked"
        now = self.clock()
        for access in self._access.values():
            if access.open_id == open_id:
                access.dies_at = now
        self._grants.pop(open_id, None)

    # -- Sandbox ------------------------------------------------------------------------------

    def host_routes(self) -> dict[str, list[BaseRoute]]:
        return {
            "open": [
                Route("/open-apis/authen/v2/oauth/token", self._token_v2, methods=["POST"]),
                Route("/open-apis/authen/v1/user_info", self._user_info, methods=["GET"]),
                Route("/open-apis/auth/v3/app_access_token/internal", self._app_token, methods=["POST"]),
                Route("/open-apis/auth/v3/tenant_access_token/internal", self._tenant_token, methods=["POST"]),
                Route("/_sandbox/h5-js-sdk.js", self._jssdk, methods=["GET"]),
                *openapi.routes(self),  # the Open API the relay calls (plugins/lark/openapi.py)
            ],
            "accounts": [
                Route("/open-apis/authen/v1/authorize", self._authorize, methods=["GET"]),
                Route("/_sandbox/consent", self._consent, methods=["POST"]),
                Route("/oauth/v3/token", self._token_v3, methods=["POST"]),
            ],
        }

    def provider_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        # Remembered so the fake JSSDK (served by the open host) knows where the accounts host is.
        self._base_urls = dict(base_urls)
        return {
            "plugin": "lark",
            "app_id": self.app_id,
            "app_secret": self.app_secret,
            "brand": "feishu",
            "open_base_url": base_urls["open"],
            "accounts_base_url": base_urls["accounts"],
            "jssdk_url": "",
        }

    def demo_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        return {**self.provider_settings(base_urls), "jssdk_url": base_urls["open"] + "/_sandbox/h5-js-sdk.js"}

    def demo_api_calls(self) -> list[DemoApiCall]:
        """The user's calendars: a missing ``calendar:calendar:readonly`` is 99991679, which the
        relay turns into consent_required; in the client ``tt.requestAccess`` asks for it."""
        return [DemoApiCall(
            self.plugin, "the user's calendars", "open-apis/calendar/v4/calendars", openapi.CALENDAR_SCOPE,
            route={"path": "open-apis/calendar/v4/calendars", "scopes": [openapi.CALENDAR_SCOPE]},
            consent_note="Outside the client the gateway sends the browser to Feishu's authorize page with the "
                            "added scope; the user comes back here.",
            shows="calendar_list")]

    def demo_tour(self) -> list[TourEntry]:
        """No approval step: Lark's administrator makes an app available in the console, before any
        user signs in."""
        return [TourEntry(
            self.plugin, "Feishu/Lark",
            deny_help="The consent page or the client's consent sheet is refused.",
            deny_answers=("access_denied", "errno 2700002"),
            approval_help="Feishu/Lark has no approval step for a user: an administrator makes the app available "
                          "in the console.")]

    def set_user_grant(self, scope: str, granted: bool) -> None:
        (openapi.grant_scopes if granted else openapi.revoke_scopes)(self, self.current_user, [scope])

    # -- shared request plumbing -------------------------------------------------------------

    def fault_response(self, endpoint: str, fault: Fault) -> Response | None:
        """A fault's ``code`` answers that Lark error code with its documented status and body
        (``status`` overrides the status): the token endpoints' shape, the authorize page's, or
        the OpenAPI one."""
        if not isinstance(fault.code, int):
            return super().fault_response(endpoint, fault)
        if endpoint.startswith("token"):
            return token_error(fault.code, fault.status)
        if endpoint == "authorize":
            return self._error_page(fault.code, fault.status or 400)
        return api_error(fault.code, fault.status)

    def _active_user(self, open_id: str) -> LarkUser:
        """The user a grant is for, as the token endpoint checks them."""
        user = self.users.get(open_id)
        if user is None:
            raise LarkApiError(20008)
        if user.status != "active":
            raise LarkApiError(20066)
        if not user.visible:
            raise LarkApiError(20010)
        return user

    def _mint(
        self, open_id: str, api: CodeApi, requested: frozenset[str], *, redirect_uri: str | None = None,
        challenge: str | None = None, challenge_method: str = "plain",
    ) -> str:
        granted = self._grants.setdefault(open_id, set())
        granted |= requested
        code = _token("", 32)  # [A-Za-z0-9_-], 43 chars
        self._codes[code] = _Code(
            open_id=open_id,
            api=api,
            scopes=frozenset(granted),
            expires_at=self.clock() + CODE_TTL_S[api],
            redirect_uri=redirect_uri,
            challenge=challenge,
            challenge_method=challenge_method,
        )
        minutes = int(CODE_TTL_S[api] // 60)
        self.record_event("code", f"{api} code issued for {self.users[open_id].name} (single use, {minutes} min)")
        return code

    # -- token endpoints (v2 on open, v3 on accounts) -----------------------------------------

    async def _token_v2(self, request: Request) -> Response:
        return await self._token_endpoint(request, "token", "v2")

    async def _token_v3(self, request: Request) -> Response:
        return await self._token_endpoint(request, "token_v3", "v3")

    async def _token_endpoint(self, request: Request, endpoint: str, issuer: Literal["v2", "v3"]) -> Response:
        body = await read_body(request)
        grant_type = str_field(body or {}, "grant_type")
        counted = grant_type if grant_type in ("authorization_code", "refresh_token") else ""
        if (fault := await self._gate(endpoint, counted)) is not None:
            return fault
        try:
            # No await from here on: each exchange is atomic, so two uses of one code or refresh
            # token are strictly ordered and exactly one wins.
            return JSONResponse(self._grant(body, _basic_auth(request), issuer))
        except LarkApiError as exc:
            return token_error(exc.code)

    def _grant(
        self, body: dict[str, Any] | None, basic: tuple[str, str] | None, issuer: Literal["v2", "v3"]
    ) -> dict[str, Any]:
        if body is None:
            raise LarkApiError(20063)
        client_id, client_secret = str_field(body, "client_id"), str_field(body, "client_secret")
        if basic is not None:
            if client_secret:
                raise LarkApiError(20070)
            client_id, client_secret = basic
        grant_type = str_field(body, "grant_type")
        if not grant_type or not client_id or not client_secret:
            raise LarkApiError(20001)
        if grant_type not in ("authorization_code", "refresh_token"):
            raise LarkApiError(20036)
        if client_id != self.app_id or not hmac.compare_digest(client_secret.encode(), self.app_secret.encode()):
            raise LarkApiError(20002)
        if grant_type == "authorization_code":
            return self._redeem(body, issuer)
        return self._rotate(body, issuer)

    def _redeem(self, body: dict[str, Any], issuer: Literal["v2", "v3"]) -> dict[str, Any]:
        value = str_field(body, "code")
        if not value:
            raise LarkApiError(20001)
        code = self._codes.get(value)
        if code is None:
            raise LarkApiError(20003)
        if code.used:
            raise LarkApiError(20065)
        if self.clock() >= code.expires_at:
            raise LarkApiError(20004)
        # A failed check below does not burn the code: the client may retry with the right value.
        if code.redirect_uri is not None and str_field(body, "redirect_uri") != code.redirect_uri:
            raise LarkApiError(20071)  # absent counts as different: the browser flow requires it
        if code.challenge is not None and not _pkce_ok(
            str_field(body, "code_verifier"), code.challenge, code.challenge_method
        ):
            raise LarkApiError(20049)
        self._active_user(code.open_id)
        code.used = True
        return self._issue(code.open_id, code.scopes, authorized_at=self.clock(), issuer=issuer)

    def _rotate(self, body: dict[str, Any], issuer: Literal["v2", "v3"]) -> dict[str, Any]:
        value = str_field(body, "refresh_token")
        if not value:
            raise LarkApiError(20001)
        if not self.refresh_enabled:
            raise LarkApiError(20074)
        refresh = self._refresh.get(value)
        # v2 accepts only v2-issued refresh tokens; v3 reportedly accepts both.
        if refresh is None or (issuer == "v2" and refresh.issuer != "v2"):
            raise LarkApiError(20026)
        if refresh.state != "active":
            raise LarkApiError(20064)
        now = self.clock()
        if now >= refresh.expires_at:
            raise LarkApiError(20037)
        self._active_user(refresh.open_id)
        refresh.state = "used"
        replaced = self._access.get(refresh.access_token)
        if replaced is not None:
            replaced.dies_at = min(replaced.expires_at, now + ROTATION_GRACE_S)
        self.record_event("revoked", "the used refresh token is dead now; the replaced access token "
                                     f"works {ROTATION_GRACE_S} s more")
        return self._issue(refresh.open_id, refresh.scopes, authorized_at=refresh.authorized_at, issuer=issuer)

    def _issue(
        self, open_id: str, scopes: frozenset[str], *, authorized_at: float, issuer: Literal["v2", "v3"]
    ) -> dict[str, Any]:
        now = self.clock()
        # Real tokens are JWT-like and 1-2 KB long; so are these, so size bugs show up here too.
        access_token = _token("eyJ", 900)
        self._access[access_token] = _AccessToken(open_id, expires_at=now + self.access_ttl_s)
        answer: dict[str, Any] = {
            "code": 0,
            "access_token": access_token,
            "expires_in": self.access_ttl_s,
            "token_type": "Bearer",
            "scope": " ".join(sorted(scopes)),
        }
        if "offline_access" in scopes:
            refresh_token = _token("eyJ", 900)
            expires_at = min(now + self.refresh_ttl_s, authorized_at + AUTHORIZATION_CAP_S)
            self._refresh[refresh_token] = _RefreshToken(
                open_id, scopes, expires_at, authorized_at, issuer, access_token
            )
            answer["refresh_token"] = refresh_token
            answer["refresh_token_expires_in"] = max(0, int(expires_at - now))
        lifetimes = f"access token {_duration(self.access_ttl_s)}"
        if "refresh_token" in answer:
            lifetimes += f", refresh token {_duration(answer['refresh_token_expires_in'])}"
        self.record_event("tokens", f"tokens issued to {self.users[open_id].name}: {lifetimes}")
        return answer

    # -- user_info ----------------------------------------------------------------------------

    async def _user_info(self, request: Request) -> Response:
        if (fault := await self._gate("user_info")) is not None:
            return fault
        match = re.fullmatch(r"Bearer (\S+)", request.headers.get("authorization", ""))
        if match is None:
            return api_error(99991661)
        access = self._access.get(match.group(1))
        now = self.clock()
        if access is None or (access.dies_at is not None and now >= access.dies_at):
            return api_error(20005)
        if now >= access.expires_at:
            return api_error(99991677)
        user = self.users.get(access.open_id)
        if user is None:
            return api_error(20008)
        inactive = {"resigned": 20021, "frozen": 20022, "not_registered": 20023}
        if user.status in inactive:
            return api_error(inactive[user.status])
        avatar = f"https://sandbox.invalid/avatar/{user.open_id}"
        data: dict[str, str] = {
            "name": user.name,
            "en_name": user.en_name,
            "avatar_url": avatar,
            "avatar_thumb": avatar + "?s=72",
            "avatar_middle": avatar + "?s=240",
            "avatar_big": avatar + "?s=640",
            "open_id": user.open_id,
            "union_id": user.union_id,
            "tenant_key": user.tenant_key,
        }
        # Fields behind a scope appear only when the app has enabled it (modelled as app-level).
        if USER_ID_SCOPE in self.enabled_scopes:
            data["user_id"] = user.user_id
        if EMAIL_SCOPE in self.enabled_scopes and user.email:
            data["email"] = user.email
        return JSONResponse({"code": 0, "msg": "success", "data": data})

    # -- app and tenant tokens ----------------------------------------------------------------

    async def _app_token(self, request: Request) -> Response:
        return await self._internal_token(request, "app")

    async def _tenant_token(self, request: Request) -> Response:
        return await self._internal_token(request, "tenant")

    async def _internal_token(self, request: Request, kind: Literal["app", "tenant"]) -> Response:
        body = await read_body(request)  # JSON even without a Content-Type, as lark-oapi sends it
        if (fault := await self._gate(f"{kind}_access_token")) is not None:
            return fault
        app_id, app_secret = str_field(body or {}, "app_id"), str_field(body or {}, "app_secret")
        if not app_id or not app_secret:
            return api_error(10003)
        if app_id != self.app_id:
            return api_error(10014)
        if not hmac.compare_digest(app_secret.encode(), self.app_secret.encode()):
            return api_error(10015)
        token, expire = self._reuse_or_mint(kind)
        answer: dict[str, Any] = {"code": 0, "msg": "ok", f"{kind}_access_token": token, "expire": expire}
        if kind == "app":  # the documented example carries the tenant token too
            answer["tenant_access_token"] = self._reuse_or_mint("tenant")[0]
        return JSONResponse(answer)

    def _reuse_or_mint(self, kind: Literal["app", "tenant"]) -> tuple[str, int]:
        """The 2 h / 30 min rule: hand out the newest token while it has 30 min or more left;
        after that mint a new one (the older one stays valid until it expires)."""
        now = self.clock()
        issued = self._app_tokens[kind]
        if issued and issued[-1][1] - now >= APP_TOKEN_REISSUE_S:
            token, expires_at = issued[-1]
        else:
            token, expires_at = _token("t-" if kind == "tenant" else "a-", 30), now + APP_TOKEN_TTL_S
            issued.append((token, expires_at))
        return token, int(expires_at - now)

    # -- the authorize page (accounts host) ---------------------------------------------------

    def _error_page(self, code: int, status: int = 400) -> HTMLResponse:
        text = PAGE_ERRORS.get(code, "The request failed.")
        return HTMLResponse(
            f"<!doctype html><title>Error {code}</title><h1>Authorization failed</h1>"
            f"<p>{html.escape(text)}</p><p>Error code: {code}</p>",
            status_code=status,
        )

    async def _authorize(self, request: Request) -> Response:
        if (fault := await self._gate("authorize")) is not None:
            return fault
        query = request.query_params
        if query.get("client_id") != self.app_id:
            return self._error_page(20048)
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_allowed(redirect_uri, self.redirect_uris):
            return self._error_page(20029)
        scopes = [scope for scope in query.get("scope", "").split(" ") if scope]
        method = query.get("code_challenge_method") or "plain"  # Lark's default is plain
        if query.get("response_type") != "code" or len(scopes) > 50 or method not in ("S256", "plain"):
            return self._error_page(20001)
        if any(scope not in self.enabled_scopes for scope in scopes):
            return self._error_page(20027)
        consent = _Consent(
            open_id=self.current_user,
            redirect_uri=redirect_uri,
            state=query.get("state"),
            scopes=frozenset(scopes),
            challenge=query.get("code_challenge") or None,
            challenge_method=method,
            expires_at=self.clock() + CONSENT_TTL_S,
        )
        if self.refuse_consent:  # what pressing "Deny" on the consent page answers
            self.record_event("refused", "the user refused on the consent page: access_denied")
            return redirect_to(consent.redirect_uri, {"error": "access_denied", "state": consent.state})
        if self.auto_consent:
            return self._grant_consent(consent)
        ticket = _token("", 16)
        self._consents[ticket] = consent
        return self._consent_page(ticket, consent)

    def _grant_consent(self, consent: _Consent) -> Response:
        code = self._mint(
            consent.open_id, "browser", consent.scopes, redirect_uri=consent.redirect_uri,
            challenge=consent.challenge, challenge_method=consent.challenge_method,
        )
        return redirect_to(consent.redirect_uri, {"code": code, "state": consent.state})

    def _consent_page(self, ticket: str, consent: _Consent) -> HTMLResponse:
        user = self.users[consent.open_id]
        scopes = "".join(f"<li><code>{html.escape(scope)}</code></li>" for scope in sorted(consent.scopes))
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>Authorize</title>"
            f"<h1>Sign in to {html.escape(self.app_id)}</h1>"
            f"<p>Signed in as {html.escape(user.name)}. The app asks for:</p>"
            f"<ul>{scopes or '<li>your identity</li>'}</ul>" + consent_form(ticket)
        )

    async def _consent(self, request: Request) -> Response:
        form = await read_body(request) or {}
        consent = self._consents.pop(str_field(form, "ticket"), None)
        if consent is None or self.clock() >= consent.expires_at:
            return HTMLResponse("<!doctype html><p>This authorization request has expired.</p>", status_code=400)
        if str_field(form, "decision") != "allow":
            self.record_event("refused", "the user pressed Deny on the consent page: access_denied")
            return redirect_to(consent.redirect_uri, {"error": "access_denied", "state": consent.state})
        return self._grant_consent(consent)

    # -- the simulated client: JSSDK and code minting ------------------------------------------

    async def _jsapi_code(self, request: Request) -> Response:
        if (early := await self._cors_gate(request, "jsapi_code")) is not None:
            return early
        body = await read_body(request) or {}
        answer, status = self._jsapi_answer(body)
        return JSONResponse(answer, status_code=status, headers=CORS_HEADERS)

    def _jsapi_answer(self, body: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """What ``tt.requestAccess`` / ``tt.requestAuthCode`` hand the page, as JSON: ``{code}``,
        a fail object ``{errno, errCode?, errString}``, or ``{consent_required, scopes}``."""
        open_id = self.current_user
        if str_field(body, "api") == "requestAuthCode":
            if str_field(body, "appId") != self.app_id:
                return {"errCode": 10200, "errno": 104, "errString": "invalid appid"}, 400
            if not self.users[open_id].visible:
                return {"errCode": 10228, "errno": 106, "errString": "app not visible to this user"}, 403
            return {"code": self._mint(open_id, "requestAuthCode", frozenset())}, 200
        if self.jsapi_mode == "old_client":
            return {"errno": 103, "errString": "feature not support"}, 400
        if str_field(body, "appID") != self.app_id:
            return {"errno": 104, "errString": "invalid parameter: appID"}, 400
        scope_list = body.get("scopeList")
        if not isinstance(scope_list, list) or not all(isinstance(scope, str) for scope in scope_list):
            return {"errno": 104, "errString": "invalid parameter: scopeList"}, 400
        requested = frozenset(scope_list)
        if requested - self.enabled_scopes:
            return self._auth_failed("20027", "the app has not enabled a requested scope"), 400
        if self.refuse_consent:  # the consent sheet is shown (nothing counts as granted) and refused
            self.record_event("refused", "the user refused the consent sheet: requestAccess failed (errno 2700002)")
            return self._auth_failed("access_denied", "the user denied the authorization"), 400
        new = requested - self._grants.get(open_id, set())
        if new and not self.auto_consent and body.get("consent") is not True:
            if body.get("consent") is False:  # the user closed the consent sheet
                return self._auth_failed("access_denied", "the user denied the authorization"), 400
            return {"consent_required": True, "scopes": sorted(new)}, 200
        answer = {"code": self._mint(open_id, "requestAccess", requested)}
        if isinstance(body.get("state"), str):
            answer["state"] = body["state"]
        return answer, 200

    @staticmethod
    def _auth_failed(code: str, message: str) -> dict[str, Any]:
        """requestAccess's one failure for refusals and server errors alike (errno 2700002)."""
        return {
            "errno": 2700002,
            "errString": f"Authorization terminated unexpectedly. Error code: {code}; error message: {message}",
        }

    async def _jssdk(self, request: Request) -> Response:
        accounts = self._base_urls.get("accounts") or str(request.base_url).rstrip("/")
        script = (
            _FAKE_JSSDK.replace("__ENDPOINT__", json.dumps(accounts + "/_sandbox/jsapi/code"))
            .replace("__MODE__", json.dumps(self.jsapi_mode))
            .replace("__APP__", json.dumps(self.app_id))
        )
        return script_response(script)

    # -- admin API -----------------------------------------------------------------------------

    def admin_routes(self) -> list[BaseRoute]:
        return [
            *super().admin_routes(),
            Route("/_sandbox/current_user", self._admin_current_user, methods=["POST"]),
            Route("/_sandbox/jsapi/code", self._jsapi_code, methods=["POST", "OPTIONS"]),
            *openapi.admin_routes(self),
        ]

    async def _admin_current_user(self, request: Request) -> Response:
        open_id = str_field(await read_body(request) or {}, "open_id")
        if open_id not in self.users:
            return JSONResponse({"error": f"no sandbox user {open_id!r}", "users": list(self.users)}, 404)
        self.set_current_user(open_id)
        return JSONResponse({"open_id": open_id, "name": self.users[open_id].name})


# The simulated client's JSSDK. ES5 only: it runs in old webviews too. It defines the two
# globals the real SDK defines and mints codes from the sandbox instead of the client.
_FAKE_JSSDK = r"""/* Lark/Feishu sandbox JSSDK: a stand-in for h5-js-sdk, for demos and tests. */
(function () {
  "use strict";
  var ENDPOINT = __ENDPOINT__;
  var MODE = __MODE__;
  var APP = __APP__;
  var errorHooks = [];

  function finish(options, kind, res) {
    if (options && typeof options[kind] === "function") { options[kind](res); }
    if (options && typeof options.complete === "function") { options.complete(res); }
  }

  function mint(api, payload, options) {
    payload.api = api;
    fetch(ENDPOINT, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload)
    }).then(function (response) {
      return response.json();
    }).then(function (res) {
      if (res.consent_required) {
        payload.consent = window.confirm("Allow " + APP + " to access: " + res.scopes.join(", ") + "?");
        mint(api, payload, options);
      } else if (res.code) {
        res.errMsg = api + ":ok";
        finish(options, "success", res);
      } else {
        res.errMsg = api + ":fail " + res.errString;
        finish(options, "fail", res);
      }
    }, function (err) {
      finish(options, "fail", { errno: 102, errString: "internal error", errMsg: api + ":fail " + err });
    });
  }

  window.h5sdk = {
    ready: function (callback) {
      if (MODE !== "hang" && MODE !== "sdk_error") { setTimeout(callback, 0); }
    },
    error: function (callback) {
      errorHooks.push(callback);
      if (MODE === "sdk_error") {
        setTimeout(function () { callback({ errno: 105, errString: "authentication fail" }); }, 0);
      }
    },
    config: function (options) {
      setTimeout(function () { if (options && options.onSuccess) { options.onSuccess({}); } }, 0);
    }
  };

  var tt = {
    requestAuthCode: function (options) {
      mint("requestAuthCode", { appId: options.appId }, options);
    }
  };
  if (MODE !== "old_sdk") {
    tt.requestAccess = function (options) {
      mint("requestAccess", { appID: options.appID, scopeList: options.scopeList, state: options.state }, options);
    };
  }
  window.tt = tt;
})();
"""
