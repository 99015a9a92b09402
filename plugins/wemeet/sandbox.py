"""A strict emulator of Tencent Meeting's OAuth side, for tests, the demo and ``gateway sandbox``.

It follows the provider's documentation (``docs/providers/wemeet.md`` lists the sources)
and is deliberately picky, so that a client which works
against it has a fair chance against the real thing:

- ``auth_code``: single use, 5 minutes; exchanged with exactly ``{sdk_id, secret, auth_code}`` as
  JSON. A bad, used or expired code, a wrong ``sdk_id`` or ``secret``, a missing field, an unknown
  field (``grant_type``, ``redirect_uri``...) or a body that is not JSON answers **HTTP 400**;
- the answer is the envelope ``{code, message, nonce, data}``; ``data.expires`` is the ABSOLUTE
  expiry of the access token (unix seconds, 6 hours ahead);
- rotation: every exchange and every refresh issues a new access and refresh token for the user
  and kills the previous pair at once (no grace); the refresh token lives 30 days and each
  refresh renews it; refresh takes exactly ``{refresh_token, sdk_id, open_id}`` (no secret);
- the REST API (``/v1/users/info/basic``) checks ``AccessToken``/``OpenId`` (a dead, expired or
  foreign token, or a grant without a profile scope, answers 190303), ``X-TC-Timestamp`` (more
  than 5 minutes off: 190300), ``X-TC-Nonce`` (a timestamp+nonce pair seen in the last 5 minutes:
  190301) and the per-user limit (300 calls a minute: 190310);
- enterprise accounts whose administrator has not approved the app yet get no code: the
  authorize page redirects with ``state`` only (or, with ``pending_redirect=False``, stays on a
  "request submitted" page), ``authorize`` answers bizCode 1; personal users have no corp.

What the sheet leaves open is filled in here, and marked as the sandbox's own choice: the bodies of
the ``wemeet-webapi`` errors (``{"code": 400, "message", "nonce"}``), the rejection objects of the
fake JS-SDK (``{errCode, errMsg}``), the user's refusal redirect (``error=access_denied``), the
administrator's refusal redirect (``error=unauthorized_client``, RFC 6749's "the client is not
authorized": the enterprise does not allow the app), the pending redirect (``state`` only) and the
mapping of ``scopes`` to ``scopes_v2``. Header names reach an
ASGI app lower-cased, so the exact case of ``AccessToken``/``OpenId`` cannot be checked here; the
provider's tests check it on the wire.

Two hosts, as in production: ``web`` (meeting.tencent.com: authorize page, ``/wemeet-webapi``,
the fake JS-SDK at ``/_sandbox/wemeet-js-sdk.js``) and ``api`` (api.meeting.qq.com). Both serve the
admin API under ``/_sandbox/``: ``GET stats``, ``GET events``, ``GET users``, ``POST faults``
(``DELETE`` clears), ``POST user_consent``, ``POST tokens/expire``, ``POST current_user``, ``POST
approve`` (the administrator's answer: approved, pending or rejected), the tour's ``GET``/``POST
tour/approval`` and ``POST tour/answer`` (the same, for the current user), ``POST jsapi_mode`` and ``POST
jsapi/code`` (CORS: the fake JS-SDK mints its codes there). Paths are spelled out here rather than imported from the
provider, so a typo on one side cannot hide behind the same typo on the other.

All state lives on the instance; the ``clock`` knob lets a test move time forward.
"""

from __future__ import annotations

import hmac
import html
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.providers import str_field
from gateway.sandbox import (
    CORS_HEADERS,
    AdminAnswer,
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
from plugins.wemeet import openapi

Approval = Literal["approved", "pending", "rejected"]
JsapiMode = Literal["current", "no_authorize", "hang"]
JSAPI_MODES: tuple[JsapiMode, ...] = get_args(JsapiMode)
APPROVALS: tuple[Approval, ...] = get_args(Approval)

CODE_TTL_S = 300  # auth_code: 5 minutes
ACCESS_TTL_S = 6 * 3600  # access_token: 6 hours
REFRESH_TTL_S = 30 * 86400  # refresh_token: 30 days, renewed by each refresh
SKEW_LIMIT_S = 300  # X-TC-Timestamp tolerance, and the nonce replay window
CONSENT_TTL_S = 600
RATE_LIMIT_PER_MIN = 300  # third-party apps: 300 calls a minute per user

SANDBOX_SDK_ID = "21800001"
SANDBOX_SECRET = "sandbox-wemeet-secret-0123456789abcdef"  # not a secret: the sandbox's fixed default
SANDBOX_CORP_ID = "200000001"  # the enterprise that owns the app
PROFILE_SCOPES = frozenset({"VIEW_USER_INFO", "MANAGE_USER_INFO", "VIEW_USER_BASIC_INFO"})
APP_SCOPES: tuple[str, ...] = ("VIEW_USER_INFO", "VIEW_VIDEO", "MANAGE_VIDEO")
#: The sandbox's own mapping of the v1 scope names to ``scopes_v2`` (the sheet gives examples only).
SCOPES_V2 = {
    "VIEW_USER_INFO": "personal-user-view",
    "VIEW_VIDEO": "personal-recording-view",
    "MANAGE_VIDEO": "personal-recording-edit",
}
CLIENT_UA = "arch/x86_64 app/tencent_wemeet os_name/Mac os_version/10.15.7 app_version/3.26.10.420 c_district/0"
_STATE = re.compile(r"[A-Za-z0-9]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class WeMeetUser:
    """One account. ``open_corp_id`` is "" for personal (free-tier) users. ``scopes`` None means
    every scope the app asks for. ``approval`` is the enterprise administrator's answer to the
    app (``pending`` until they approve it). ``authorized``: the user has authorized the app
    before, so ``requestAgentAuthCode`` hands out codes at once."""

    open_id: str
    username: str
    open_corp_id: str = ""
    open_corp_name: str = ""
    status: str = "1"  # "1" 正常, "2" 注销, "3" 未激活, "4" 禁用, "5" 预注册 (a string, as the API sends it)
    scopes: tuple[str, ...] | None = None
    approval: Approval = "approved"
    authorized: bool = False


CORP_A, CORP_B = "wc6f0d2a91e4b7c3a5", "wc93b1e07d5c2a8f46"
DEFAULT_USERS: tuple[WeMeetUser, ...] = (
    WeMeetUser("ow8Zq2LrT4vN6pXc1sKd9mFh", "张三", CORP_A, "示例科技有限公司", authorized=True),
    WeMeetUser("owB3nH7yQ1kW5tRz8cVj2gLp", "Li Si", CORP_A, "示例科技有限公司"),
    WeMeetUser("owM5dF9sA2xC6vBn1qZr4tYe", "王五", CORP_B, "待审批集团", approval="pending"),
    WeMeetUser("owP1aT8kE4wS7uGi3oLm6nJb", "Pat Personal"),
    WeMeetUser("owR7cX3vN9bQ2mK5jH8fD1sA", "Zhao Liu", CORP_A, "示例科技有限公司", scopes=("VIEW_VIDEO",),
               authorized=True),
)


class WebapiError(Exception):
    """Raised inside a wemeet-webapi handler: HTTP 400 with the sandbox's error envelope."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ApiError(Exception):
    """Raised inside a REST handler: one of the documented ``error_code`` values."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


#: REST API errors (sheet 6.1): HTTP status, message, observed ``new_error_code`` (0: none known).
API_ERRORS: dict[int, tuple[int, str, int]] = {
    190004: (400, "请求参数错误 (bad request parameters)", 0),
    190300: (400, "X-TC-Timestamp 与服务器时间相差超过5分钟 (timestamp out of range)", 0),
    190301: (400, "请求重放 (replayed timestamp and nonce)", 0),
    190303: (
        400,
        "鉴权失败 1.AK/SK鉴权时请检查AppId/X-TC-Key/SdkId 2.OAuth2.0鉴权时请检查AccessToken是否过期或权限点不足",
        200190303,
    ),
    190310: (400, "超过每分钟调用总次数限制 (per-minute limit)", 0),
    9042: (400, "权限不足或鉴权失败", 0),
}


@dataclass
class _Code:
    open_id: str
    expires_at: float
    used: bool = False


@dataclass
class _Access:
    open_id: str
    expires_at: float
    alive: bool = True


@dataclass
class _Refresh:
    open_id: str
    expires_at: float
    alive: bool = True


@dataclass
class _Consent:
    open_id: str
    redirect_uri: str
    state: str
    expires_at: float


def _token(nbytes: int = 48) -> str:
    return secrets.token_urlsafe(nbytes)


def _trace() -> str:
    return secrets.token_hex(8)


def envelope(data: Mapping[str, Any]) -> JSONResponse:
    """The documented success envelope."""
    return JSONResponse({"nonce": _trace(), "data": dict(data), "message": "SUCCESS", "code": 0})


def webapi_error(message: str, *, code: int = 400, status: int = 400) -> JSONResponse:
    """The sandbox's error body for the wemeet-webapi endpoints (undocumented upstream: only
    "auth errors answer HTTP 400" is): the envelope shape with ``code`` set to the status."""
    return JSONResponse({"nonce": _trace(), "message": message, "code": code}, status_code=status)


def api_error(code: int, status: int | None = None) -> JSONResponse:
    """The REST API's error body: ``{"error_info": {error_code, new_error_code?, message}}``."""
    default_status, message, new_code = API_ERRORS.get(code, (400, "request failed", 0))
    info: dict[str, Any] = {"error_code": code, "message": message}
    if new_code:
        info["new_error_code"] = new_code
    return JSONResponse({"error_info": info}, status_code=status or default_status)


async def _json_body(request: Request) -> dict[str, Any] | None:
    """A JSON object sent as ``application/json``; None otherwise."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        return None
    try:
        data = json.loads(await request.body())
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class WeMeetSandbox(Sandbox):
    """The emulator. Knobs are constructor arguments; the rest of the API is for tests and demos.

    ``auto_consent`` skips the consent page and dialog (an unauthorized user accepts at once).
    ``pending_redirect`` chooses what the authorize page does for a user whose administrator has
    not approved the app: redirect with ``state`` and no ``auth_code`` (True), or stay on a
    "request submitted" page (False). ``redirect_uris`` is a whitelist (empty accepts any http(s)
    URL). ``strict_fields`` answers 400 to unknown body fields. ``jsapi_mode`` shapes the fake
    JS-SDK: ``current`` (all permission APIs), ``no_authorize`` (a client before 3.16), ``hang``
    (a client bridge that never answers). ``corp_in_exchange=False`` drops ``open_corp_id`` from
    the exchange answer, as the older doc describes it.

    ``stats`` counts calls per endpoint: ``authorize``, ``consent``, ``access_token``,
    ``refresh_token``, ``user_info``, ``profile``, ``jsapi_code``; ``inject_fault`` takes those
    names (see ``fault_response``).
    """

    plugin = "wemeet"
    title = "Tencent Meeting"
    tour_position = 30
    client_user_agent = CLIENT_UA
    jsapi_modes = JSAPI_MODES
    call_labels: ClassVar[Mapping[str, tuple[str, str]]] = {
        "authorize": ("call", "the browser opened the authorization page (marketplace/authorize.html)"),
        "jsapi_code": ("jsapi", "JSAPI: the page asked the client for a code (wemeet.permission)"),
        "access_token": ("exchange", "the gateway exchanged the auth_code (oauth/access_token)"),
        "refresh_token": ("refresh", "the gateway refreshed the user token (oauth/refresh_token)"),
        "user_info": ("identity", "the gateway checked the token (oauth/user_info)"),
        "profile": ("identity", "the gateway read the user (v1/users/info/basic)"),
    }

    def __init__(
        self,
        *,
        sdk_id: str = SANDBOX_SDK_ID,
        secret: str = SANDBOX_SECRET,
        corp_id: str = SANDBOX_CORP_ID,
        users: Sequence[WeMeetUser] = DEFAULT_USERS,
        app_scopes: Sequence[str] = APP_SCOPES,
        access_ttl_s: int = ACCESS_TTL_S,
        refresh_ttl_s: int = REFRESH_TTL_S,
        auto_consent: bool = True,
        pending_redirect: bool = True,
        redirect_uris: Sequence[str] = (),
        strict_fields: bool = True,
        corp_in_exchange: bool = True,
        jsapi_mode: JsapiMode = "current",
        rate_limit_per_min: int = RATE_LIMIT_PER_MIN,
        delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not users:
            raise ValueError("the sandbox needs at least one user")
        super().__init__(delay_s=delay_s)
        self.sdk_id = sdk_id
        self.secret = secret
        self.corp_id = corp_id
        self.users: dict[str, WeMeetUser] = {user.open_id: user for user in users}
        self.app_scopes = tuple(app_scopes)
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.auto_consent = auto_consent
        self.pending_redirect = pending_redirect
        self.redirect_uris = [without_query(uri) for uri in redirect_uris]
        self.strict_fields = strict_fields
        self.corp_in_exchange = corp_in_exchange
        self.jsapi_mode: JsapiMode = jsapi_mode
        self.rate_limit_per_min = rate_limit_per_min
        self.clock = clock
        self.current_user = users[0].open_id
        self.approval: dict[str, Approval] = {user.open_id: user.approval for user in users}
        self.applications: set[str] = set()  # users whose request awaits their administrator
        self._authorized: set[str] = {user.open_id for user in users if user.authorized}
        self._codes: dict[str, _Code] = {}
        self._access: dict[str, _Access] = {}
        self._refresh: dict[str, _Refresh] = {}
        self._live: dict[str, tuple[str, str]] = {}  # open_id -> its one live (access, refresh) pair
        self._consents: dict[str, _Consent] = {}
        self._nonces: dict[tuple[str, str], float] = {}
        self._calls: dict[str, deque[float]] = {}
        #: open_id -> app scopes the user has not authorized (the app asked for them after the
        #: user's authorization): left out of every grant until the user authorizes the app again.
        self._withheld: dict[str, set[str]] = {}

    # -- the Python API ------------------------------------------------------------------------

    def set_current_user(self, open_id: str) -> None:
        """The user the authorize page and the fake JS-SDK act for."""
        if open_id not in self.users:
            raise KeyError(f"no sandbox user {open_id!r}")
        self.current_user = open_id

    def approve(self, open_id: str, answer: Approval = "approved") -> None:
        """The enterprise administrator answers the user's request to use the app."""
        if open_id not in self.users:
            raise KeyError(f"no sandbox user {open_id!r}")
        self.approval[open_id] = answer
        self.applications.discard(open_id)
        name = self.users[open_id].username
        self.record_event("approval", {"approved": f"the administrator approved the app for {name}",
                                       "pending": f"{name}'s enterprise has not approved the app yet",
                                       "rejected": f"the administrator refused the app for {name}"}[answer])

    def is_authorized(self, open_id: str) -> bool:
        return open_id in self._authorized

    def mint_client_code(self, open_id: str | None = None) -> str:
        """An ``authCode`` as the client hands it to the page (``requestAgentAuthCode`` for a user
        who authorized the app, or the ``authorize`` dialog accepted). The user must be allowed
        to authorize: a pending or refused enterprise approval raises ``ValueError``."""
        user = open_id or self.current_user
        if user not in self.users:
            raise KeyError(f"no sandbox user {user!r}")
        if self.approval[user] != "approved":
            raise ValueError(f"{user} cannot authorize the app: the administrator's answer is {self.approval[user]}")
        self._authorize_user(user)
        return self._mint(user)

    def is_live(self, access_token: str) -> bool:
        """Whether the REST API would still accept this access token (ignoring scopes)."""
        access = self._access.get(access_token)
        return access is not None and access.alive and self.clock() < access.expires_at

    def expire_access_tokens(self) -> int:
        now = self.clock()
        live = [access for access in self._access.values() if access.alive and access.expires_at > now]
        for access in live:
            access.expires_at = now  # the REST API now answers 190303
        return len(live)

    def demo_api_calls(self) -> list[DemoApiCall]:
        """The user's profile (``v1/users/info/basic``): without a profile scope it is 190303, the
        code of an expired token too, so the relay refreshes once and passes the second one on.
        Tencent Meeting has no JSAPI that adds scopes: the user authorizes the app again."""
        note = ("Tencent Meeting has no in-client JSAPI that asks for more scopes, and answers a missing scope "
                "with 190303, the code of an expired token: the gateway refreshes once, gets 190303 again and "
                "passes it on (no consent_required). The user must authorize the app again, with the scopes "
                "its console now lists: a new sign-in, which leaves this page.")
        profile = "v1/users/info/basic?operator_id={user}&operator_id_type=2"
        return [DemoApiCall(self.plugin, "the user's profile", profile, "VIEW_USER_INFO",
                            route={"path": "v1/users/info/basic"}, in_client_consent=False, consent_note=note,
                            shows="username")]

    def demo_tour(self) -> list[TourEntry]:
        return [TourEntry(
            self.plugin, "Tencent Meeting",
            deny_help="The authorization page or dialog is refused.", deny_answers=("access_denied", "bizCode 3"),
            approval_help="The first authorization of an enterprise account waits for its administrator. Approve "
                          "(or refuse) below, then open again.",
            approval_answers=("bizCode 1", "a redirect without auth_code"), admin_can_refuse=True)]

    def set_tour_approval(self, on: bool) -> None:
        """The first authorization of the current user's enterprise account waits for its
        administrator (on), or was approved (off)."""
        self.approve(self.current_user, "pending" if on else "approved")

    def answer_tour_approval(self, answer: AdminAnswer) -> None:
        self.approve(self.current_user, answer)

    def tour_approval_status(self) -> str:
        return self.approval[self.current_user]

    def set_user_grant(self, scope: str, granted: bool) -> None:
        """Not granted: the app asks for ``scope`` since the user authorized it, so the user must
        authorize it again (``requestAgentAuthCode`` refuses until then); granted: as if they had."""
        if scope not in self.app_scopes:
            raise LookupError(f"{scope!r} is not a scope of the emulated app")
        open_id = self.current_user
        if granted:
            self._withheld.get(open_id, set()).discard(scope)
            return
        self._withheld.setdefault(open_id, set()).add(scope)
        self._authorized.discard(open_id)

    def revoke(self, open_id: str) -> None:
        """The user (or their administrator) cancels the app's authorization: every token dies."""
        self._kill(open_id)
        self._authorized.discard(open_id)

    # -- Sandbox ------------------------------------------------------------------------------

    def host_routes(self) -> dict[str, list[BaseRoute]]:
        return {
            "web": [
                Route("/marketplace/authorize.html", self._authorize, methods=["GET"]),
                Route("/_sandbox/consent", self._consent, methods=["POST"]),
                Route("/wemeet-webapi/v2/oauth2/oauth/access_token", self._access_token, methods=["POST"]),
                Route("/wemeet-webapi/v2/oauth2/oauth/refresh_token", self._refresh_token, methods=["POST"]),
                Route("/wemeet-webapi/v2/oauth2/oauth/user_info", self._user_info, methods=["POST"]),
                Route("/_sandbox/wemeet-js-sdk.js", self._jssdk, methods=["GET"]),
            ],
            # The meetings list the relay calls: plugins/wemeet/openapi.py.
            "api": [Route("/v1/users/info/basic", self._profile, methods=["GET"]), *openapi.routes(self)],
        }

    def provider_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        # Remembered so the fake JS-SDK knows the authorize page's and the code endpoint's host.
        self._base_urls = dict(base_urls)
        return {
            "plugin": "wemeet",
            "sdk_id": self.sdk_id,
            "secret": self.secret,
            "corp_id": self.corp_id,
            "web_base_url": base_urls["web"],
            "api_base_url": base_urls["api"],
            "jssdk_url": "",
        }

    def demo_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        return {**self.provider_settings(base_urls), "jssdk_url": base_urls["web"] + "/_sandbox/wemeet-js-sdk.js"}

    # -- shared plumbing -----------------------------------------------------------------------

    def fault_response(self, endpoint: str, fault: Fault) -> Response | None:
        """A fault's ``code`` answers the endpoint's own error shape: wemeet-webapi the envelope
        with that ``code``, HTTP 400 unless ``status`` says otherwise (so ``status=200`` gives a
        "success" status with a non-zero code); REST ``error_info``; jsapi ``errCode``; the
        authorize and consent pages an error page."""
        if not isinstance(fault.code, int):
            return super().fault_response(endpoint, fault)
        if endpoint == "profile":
            return api_error(fault.code, fault.status)
        if endpoint == "jsapi_code":
            body = {"errCode": fault.code, "errMsg": "injected fault"}
            return JSONResponse(body, status_code=fault.status or 400)
        if endpoint in ("authorize", "consent"):
            return self._error_page(f"Error {fault.code}", fault.status or 400)
        return webapi_error("injected fault", code=fault.code, status=fault.status or 400)

    def _mint(self, open_id: str) -> str:
        code = _token(24)
        self._codes[code] = _Code(open_id, self.clock() + CODE_TTL_S)
        self.record_event("code", f"auth_code issued for {self.users[open_id].username} (single use, 5 min)")
        return code

    def _granted(self, user: WeMeetUser) -> list[str]:
        withheld = self._withheld.get(user.open_id, set())
        return [scope for scope in self.app_scopes
                if (user.scopes is None or scope in user.scopes) and scope not in withheld]

    def _authorize_user(self, open_id: str) -> None:
        """The user authorizes the app (the authorize page, the dialog): every scope it asks for."""
        self._authorized.add(open_id)
        self._withheld.pop(open_id, None)

    def _kill(self, open_id: str) -> None:
        live = self._live.pop(open_id, None)
        if live is not None:
            self._access[live[0]].alive = False
            self._refresh[live[1]].alive = False
            self.record_event("revoked", f"{self.users[open_id].username}'s previous access and refresh "
                                         "tokens are dead now (no grace)")

    def _issue(self, open_id: str) -> tuple[str, str, int]:
        """A new token pair for the user; the previous pair dies now (rotation, sheet section 5)."""
        self._kill(open_id)
        now = self.clock()
        access, refresh = _token(), _token()
        expires = int(now + self.access_ttl_s)
        self._access[access] = _Access(open_id, float(expires))
        self._refresh[refresh] = _Refresh(open_id, now + self.refresh_ttl_s)
        self._live[open_id] = (access, refresh)
        self.record_event("tokens", f"tokens issued to {self.users[open_id].username}: access token "
                                    f"{self.access_ttl_s // 3600} h, refresh token {self.refresh_ttl_s // 86400} d")
        return access, refresh, expires

    def _check_fields(self, body: Mapping[str, Any], expected: tuple[str, ...]) -> None:
        missing = [key for key in expected if not str_field(body, key)]
        if missing:
            raise WebapiError(f"missing parameter: {', '.join(missing)}")
        unknown = sorted(set(body) - set(expected))
        if unknown and self.strict_fields:
            raise WebapiError(f"unexpected parameter: {', '.join(unknown)}")

    # -- wemeet-webapi (web host) --------------------------------------------------------------

    async def _webapi(self, request: Request, endpoint: str, handler: Callable[[dict[str, Any]], Response]) -> Response:
        body = await _json_body(request)
        if (fault := await self._gate(endpoint)) is not None:
            return fault
        if body is None:
            return webapi_error("the body must be a JSON object sent as application/json")
        try:
            # No await from here on: each call is atomic, so two uses of one code or refresh
            # token are strictly ordered and exactly one wins.
            return handler(body)
        except WebapiError as exc:
            return webapi_error(exc.message)

    async def _access_token(self, request: Request) -> Response:
        return await self._webapi(request, "access_token", self._exchange)

    async def _refresh_token(self, request: Request) -> Response:
        return await self._webapi(request, "refresh_token", self._rotate)

    async def _user_info(self, request: Request) -> Response:
        return await self._webapi(request, "user_info", self._check_token)

    def _exchange(self, body: dict[str, Any]) -> Response:
        self._check_fields(body, ("sdk_id", "secret", "auth_code"))
        if body["sdk_id"] != self.sdk_id:
            raise WebapiError("invalid sdk_id")
        if not hmac.compare_digest(body["secret"].encode(), self.secret.encode()):
            raise WebapiError("invalid secret")
        code = self._codes.get(body["auth_code"])
        if code is None:
            raise WebapiError("invalid auth_code")
        if code.used:
            raise WebapiError("auth_code already used")
        if self.clock() >= code.expires_at:
            raise WebapiError("auth_code expired")
        code.used = True
        user = self.users[code.open_id]
        access, refresh, expires = self._issue(user.open_id)
        scopes = self._granted(user)
        data: dict[str, Any] = {
            "access_token": access,
            "refresh_token": refresh,
            "expires": expires,
            "open_id": user.open_id,
            "scopes": scopes,
            "scopes_v2": [SCOPES_V2[scope] for scope in scopes if scope in SCOPES_V2],
        }
        if self.corp_in_exchange:
            data["open_corp_id"] = user.open_corp_id
        return envelope(data)

    def _rotate(self, body: dict[str, Any]) -> Response:
        self._check_fields(body, ("refresh_token", "sdk_id", "open_id"))
        if body["sdk_id"] != self.sdk_id:
            raise WebapiError("invalid sdk_id")
        refresh = self._refresh.get(body["refresh_token"])
        if refresh is None or not refresh.alive:
            raise WebapiError("invalid refresh_token")
        if refresh.open_id != body["open_id"]:
            raise WebapiError("refresh_token does not belong to open_id")
        if self.clock() >= refresh.expires_at:
            raise WebapiError("refresh_token expired")
        user = self.users[refresh.open_id]
        access, new_refresh, expires = self._issue(user.open_id)
        return envelope({
            "access_token": access,
            "refresh_token": new_refresh,
            "expires": expires,
            "open_id": user.open_id,
            "scopes": self._granted(user),
        })

    def _check_token(self, body: dict[str, Any]) -> Response:
        self._check_fields(body, ("access_token", "open_id"))
        access = self._access.get(body["access_token"])
        if access is None or not self.is_live(body["access_token"]) or access.open_id != body["open_id"]:
            raise WebapiError("invalid access_token")
        return envelope({
            "expires": int(access.expires_at),
            "open_id": access.open_id,
            "scopes": self._granted(self.users[access.open_id]),
        })

    # -- the REST API (api host) --------------------------------------------------------------

    async def _profile(self, request: Request) -> Response:
        if (fault := await self._gate("profile")) is not None:
            return fault
        try:
            user = self._authenticate(request)
        except ApiError as exc:
            return api_error(exc.code)
        query = request.query_params
        if query.get("operator_id_type") != "2" or not query.get("operator_id"):
            return api_error(190004)
        if query["operator_id"] != user.open_id:
            return api_error(190303)  # an OAuth user acts as themselves only
        if not PROFILE_SCOPES & set(self._granted(user)):
            return api_error(190303)  # "权限点不足": the grant lacks every profile scope
        return JSONResponse(openapi.basic_info(user))  # typed as the official SDK model declares

    def _authenticate(self, request: Request) -> WeMeetUser:
        """The OAuth headers of a REST call (sheet 4.1): the user they stand for, or ApiError."""
        headers = request.headers
        if not headers.get("content-type", "").lower().startswith("application/json"):
            raise ApiError(190004)
        timestamp, nonce = headers.get("x-tc-timestamp", ""), headers.get("x-tc-nonce", "")
        if not _DIGITS.fullmatch(timestamp) or not _DIGITS.fullmatch(nonce) or int(nonce) == 0:
            raise ApiError(190004)
        now = self.clock()
        if abs(int(timestamp) - now) > SKEW_LIMIT_S:
            raise ApiError(190300)
        self._nonces = {key: seen for key, seen in self._nonces.items() if now - seen < SKEW_LIMIT_S}
        if (timestamp, nonce) in self._nonces:
            raise ApiError(190301)
        self._nonces[(timestamp, nonce)] = now
        token, open_id = headers.get("accesstoken", ""), headers.get("openid", "")
        access = self._access.get(token)
        if access is None or not self.is_live(token) or access.open_id != open_id:
            raise ApiError(190303)  # unknown, expired or rotated token, or another user's OpenId
        calls = self._calls.setdefault(open_id, deque())
        while calls and now - calls[0] >= 60:
            calls.popleft()
        if len(calls) >= self.rate_limit_per_min:
            raise ApiError(190310)
        calls.append(now)
        return self.users[open_id]

    # -- the authorize page (web host) --------------------------------------------------------

    @staticmethod
    def _error_page(text: str, status: int = 400) -> HTMLResponse:
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>腾讯会议 授权失败</title>"
            f"<h1>Authorization failed</h1><p>{html.escape(text)}</p>",
            status_code=status,
        )

    async def _authorize(self, request: Request) -> Response:
        if (fault := await self._gate("authorize")) is not None:
            return fault
        query = request.query_params
        missing = [key for key in ("corp_id", "sdk_id", "redirect_uri", "state") if not query.get(key)]
        if missing:
            return self._error_page(f"Missing parameter: {', '.join(missing)}.")
        if query["sdk_id"] != self.sdk_id:
            return self._error_page("Unknown sdk_id: this application does not exist.")
        if query["corp_id"] != self.corp_id:
            return self._error_page("corp_id is not the enterprise that owns this application.")
        redirect_uri = query["redirect_uri"]
        if not redirect_allowed(redirect_uri, self.redirect_uris):
            return self._error_page("redirect_uri is not a registered http(s) address of this application.")
        state = query["state"]
        if not _STATE.fullmatch(state):
            return self._error_page("state must be 1 to 64 characters of a-z, A-Z and 0-9.")
        return self._decide(self.current_user, redirect_uri, state)

    def _decide(self, open_id: str, redirect_uri: str, state: str) -> Response:
        approval = self.approval[open_id]
        if approval == "rejected":
            # The administrator said no: not the user's refusal (the sandbox's own wire choice).
            return redirect_to(redirect_uri, {"error": "unauthorized_client", "state": state,
                                              "error_description": "the enterprise administrator refused the app"})
        if approval == "pending":
            # The first authorization of an enterprise account asks its administrator first.
            self.applications.add(open_id)
            self.record_event("approval", "first authorization of an enterprise account: the request went to "
                                          "its administrator (no auth_code)")
            if self.pending_redirect:
                return redirect_to(redirect_uri, {"state": state})
            return HTMLResponse(
                "<!doctype html><meta charset=utf-8><title>腾讯会议 申请已提交</title>"
                "<h1>申请已提交 Request submitted</h1>"
                "<p>Your enterprise administrator must approve this application first.</p>"
            )
        if self.refuse_consent:  # what pressing "Deny" on the authorization page answers
            self.record_event("refused", "the user refused on the authorization page: access_denied")
            return redirect_to(redirect_uri, {"error": "access_denied", "state": state})
        if open_id in self._authorized or self.auto_consent:
            self._authorize_user(open_id)
            return redirect_to(redirect_uri, {"auth_code": self._mint(open_id), "state": state})
        ticket = _token(16)
        self._consents[ticket] = _Consent(open_id, redirect_uri, state, self.clock() + CONSENT_TTL_S)
        user = self.users[open_id]
        scopes = "".join(f"<li><code>{html.escape(scope)}</code></li>" for scope in self._granted(user))
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>腾讯会议 应用授权</title>"
            f"<h1>Authorize application {html.escape(self.sdk_id)}</h1>"
            f"<p>Signed in as {html.escape(user.username)}. The application asks for:</p><ul>{scopes}</ul>"
            + consent_form(ticket)
        )

    async def _consent(self, request: Request) -> Response:
        form = await read_body(request) or {}
        if (fault := await self._gate("consent")) is not None:
            return fault
        consent = self._consents.pop(str_field(form, "ticket"), None)
        if consent is None or self.clock() >= consent.expires_at:
            return self._error_page("This authorization request has expired.")
        if str_field(form, "decision") != "allow":
            self.record_event("refused", "the user pressed Deny on the authorization page: access_denied")
            return redirect_to(consent.redirect_uri, {"error": "access_denied", "state": consent.state})
        self._authorize_user(consent.open_id)
        return redirect_to(consent.redirect_uri, {"auth_code": self._mint(consent.open_id), "state": consent.state})

    # -- the simulated client: fake JS-SDK and its code endpoint --------------------------------

    async def _jsapi_code(self, request: Request) -> Response:
        if (early := await self._cors_gate(request, "jsapi_code")) is not None:
            return early
        answer = self._jsapi_answer(await read_body(request) or {})
        return JSONResponse(answer, headers=CORS_HEADERS)

    def _jsapi_answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """What the client hands the page, as JSON: ``{authCode}``; for requestAgentAuthCode a
        rejection ``{errCode, errMsg}`` (the sandbox's own shape: the real one is undocumented);
        for authorize ``{bizCode, bizMessage}`` or ``{consent_required: true}``."""
        open_id = self.current_user
        api = str_field(body, "api")
        if api == "requestAgentAuthCode":
            if str_field(body, "sdkId") != self.sdk_id:
                return {"errCode": 10001, "errMsg": "requestAgentAuthCode:fail invalid sdkId"}
            if open_id not in self._authorized or self.approval[open_id] != "approved" or self.refuse_consent:
                return {"errCode": 10002, "errMsg": "requestAgentAuthCode:fail the user has not authorized the app"}
            return {"authCode": self._mint(open_id)}
        if api == "authorize":
            approval = self.approval[open_id]
            if approval == "pending":
                self.applications.add(open_id)
                self.record_event("approval", "authorize: the request went to the enterprise administrator (bizCode 1)")
                return {"bizCode": 1, "bizMessage": "申请授权成功"}
            if approval == "rejected":
                return {"bizCode": 4, "bizMessage": "the enterprise administrator refused the application"}
            consent = body.get("consent")
            if self.refuse_consent:
                self.record_event("refused", "the user refused in the authorization dialog (bizCode 3)")
                return {"bizCode": 3, "bizMessage": "用户拒绝授权"}
            if open_id in self._authorized or self.auto_consent or consent is True:
                self._authorize_user(open_id)
                return {"authCode": self._mint(open_id)}
            if consent is False:
                return {"bizCode": 3, "bizMessage": "用户拒绝授权"}
            return {"consent_required": True, "scopes": self._granted(self.users[open_id])}
        return {"errCode": 10000, "errMsg": f"unknown api {api!r}"}

    async def _jssdk(self, request: Request) -> Response:
        web = self._base_urls.get("web") or str(request.base_url).rstrip("/")
        script = (
            _FAKE_JSSDK.replace("__WEB__", json.dumps(web))
            .replace("__MODE__", json.dumps(self.jsapi_mode))
            .replace("__VERSION__", json.dumps(CLIENT_UA.split("app_version/")[1].split(" ")[0]))
        )
        return script_response(script)

    # -- admin API -----------------------------------------------------------------------------

    def admin_routes(self) -> list[BaseRoute]:
        return [
            *super().admin_routes(),
            Route("/_sandbox/users", self._admin_users, methods=["GET"]),
            Route("/_sandbox/current_user", self._admin_current_user, methods=["POST"]),
            Route("/_sandbox/approve", self._admin_approve, methods=["POST"]),
            Route("/_sandbox/jsapi/code", self._jsapi_code, methods=["POST", "OPTIONS"]),
        ]

    async def _admin_users(self, request: Request) -> Response:
        return JSONResponse([
            {"open_id": user.open_id, "username": user.username, "open_corp_id": user.open_corp_id,
             "approval": self.approval[user.open_id], "authorized": user.open_id in self._authorized,
             "current": user.open_id == self.current_user}
            for user in self.users.values()
        ])

    async def _admin_current_user(self, request: Request) -> Response:
        open_id = str_field(await read_body(request) or {}, "open_id")
        if open_id not in self.users:
            return JSONResponse({"error": f"no sandbox user {open_id!r}", "users": list(self.users)}, 404)
        self.set_current_user(open_id)
        return JSONResponse({"open_id": open_id, "username": self.users[open_id].username})

    async def _admin_approve(self, request: Request) -> Response:
        body = await read_body(request) or {}
        open_id, wanted = str_field(body, "open_id"), str_field(body, "answer") or "approved"
        if open_id not in self.users:
            return JSONResponse({"error": f"no sandbox user {open_id!r}", "users": list(self.users)}, 404)
        answer = next((answer for answer in APPROVALS if answer == wanted), None)
        if answer is None:
            return JSONResponse({"error": f"unknown answer {wanted!r}", "answers": list(APPROVALS)}, 400)
        self.approve(open_id, answer)
        return JSONResponse({"open_id": open_id, "approval": answer})


# The simulated client's JS-SDK. ES5 only: the Windows client runs Chrome 77. It defines the
# ``wemeet`` global the real SDK defines and mints codes from the sandbox instead of the client.
_FAKE_JSSDK = r"""/* Tencent Meeting sandbox JS-SDK: a stand-in for wemeet-js-sdk, for demos and tests. */
(function () {
  "use strict";
  var WEB = __WEB__;
  var MODE = __MODE__;
  var VERSION = __VERSION__;

  function post(payload) {
    return fetch(WEB + "/_sandbox/jsapi/code", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload)
    }).then(function (response) { return response.json(); });
  }

  function never() {
    return new Promise(function () {});
  }

  function compare(a, b) {
    var x = String(a).split("."), y = String(b).split(".");
    for (var i = 0; i < Math.max(x.length, y.length); i++) {
      var p = parseInt(x[i] || "0", 10), q = parseInt(y[i] || "0", 10);
      if (p !== q) { return p < q ? -1 : 1; }
    }
    return 0;
  }

  var permission = {
    requestAgentAuthCode: function (params) {
      if (MODE === "hang") { return never(); }
      return post({ api: "requestAgentAuthCode", sdkId: params && params.sdkId }).then(function (res) {
        if (res.authCode) { return { authCode: res.authCode }; }
        throw { errCode: res.errCode, errMsg: res.errMsg };
      });
    },
    requestAuth: function (params) {
      if (MODE === "hang") { return; }
      var query = "corp_id=" + encodeURIComponent(params.corpId) + "&sdk_id=" + encodeURIComponent(params.sdkId) +
        "&redirect_uri=" + encodeURIComponent(params.redirectURI) + "&state=" + encodeURIComponent(params.state || "");
      window.location.href = WEB + "/marketplace/authorize.html?" + query;
    }
  };

  if (MODE !== "no_authorize") {
    permission.authorize = function (options) {
      options = options || {};
      var fail = options.fail || options.failure;
      if (MODE === "hang") { return never(); }
      function ask(consent) {
        var payload = { api: "authorize" };
        if (consent !== undefined) { payload.consent = consent; }
        return post(payload).then(function (res) {
          if (res.consent_required) {
            return ask(window.confirm("Allow this application to access: " + res.scopes.join(", ") + "?"));
          }
          if (res.authCode) {
            if (options.success) { options.success({ authCode: res.authCode }); }
          } else if (fail) {
            fail({ bizCode: res.bizCode === undefined ? 4 : res.bizCode, bizMessage: res.bizMessage || res.errMsg });
          }
        });
      }
      return ask(undefined).then(null, function (err) {
        if (fail) { fail({ bizCode: 4, bizMessage: String(err) }); }
      });
    };
  }

  window.wemeet = {
    permission: permission,
    app: {
      version: function () { return VERSION; },
      compare: function (other) { return compare(VERSION, other); }
    }
  };
})();
"""
