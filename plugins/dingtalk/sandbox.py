"""A strict emulator of DingTalk's server side, for tests, the demo and ``gateway sandbox``.

It follows the provider's documentation (``docs/providers/dingtalk.md`` lists the sources)
and is picky on purpose, so a client that works against
it has a fair chance against the real thing. One instance emulates an internal app (AppKey, owned
by the first organisation) and a third-party suite (SuiteKey, authorized by both organisations)
side by side. Three hosts, as in production:

- ``api`` (api.dingtalk.com): ``POST /v1.0/oauth2/accessToken`` (internal app token; the same
  token while it is valid, its expiry renewed), ``POST /v1.0/oauth2/corpAccessToken`` (ISV corp
  token: a **new** token on every call, the older ones stay valid unless
  ``corp_token_reissue_revokes``), ``POST /v1.0/oauth2/userAccessToken`` (JSON only, else
  ``MissingBody``; ``corpId`` answered only when the login asked for the ``corpid`` scope) and
  ``GET /v1.0/contact/users/me`` (token in ``x-acs-dingtalk-access-token`` only); errors are HTTP
  4xx/5xx with ``{code, message, requestid}``;
- ``oapi`` (oapi.dingtalk.com): ``GET /gettoken``, ``POST /topapi/v2/user/getuserinfo`` and
  ``POST /topapi/user/getbyunionid``; HTTP 200 with ``errcode`` even on errors;
- ``login`` (login.dingtalk.com): ``GET /oauth2/auth`` (``response_type=code``, ``prompt=consent``
  and the ``openid`` scope required), then ``redirect_uri?authCode=…&state=…``, or
  ``?error=access_denied&state=…`` when the user refuses on the consent page.

Rules kept: free-login codes live 5 minutes, are single use and bound to their organisation (and
to the app when ``dd.requestAuthCode`` minted them with a clientId): anything else is 40078;
a new suiteTicket invalidates the previous one (``invalidSuiteTicket``); an organisation that has
not authorized the suite gets ``invalidAuthInfo``; user refresh tokens live 30 days and rotate (the
used one dies) unless ``rotate_refresh_tokens`` is off.

Guesses, where the sheet marks the real behaviour unconfirmed: a bad or used ``code`` on
userAccessToken answers ``invalidParameter.authCode.notFound`` (seen only in third-party fixtures),
a bad refresh token ``invalidParameter.refreshToken.notFound`` (made up on the same pattern); codes
of openAuth and the browser login live 5 minutes; getbyunionid's "not a member" is errcode 60121.

The emulator also plays DingTalk's HTTP event callback: ``push_suite_ticket`` encrypts a
``suite_ticket`` event with the callback Token and EncodingAESKey, POSTs it to ``callback_url``
and checks the encrypted ``success`` reply, as DingTalk does (it counts a wrong reply as 71009).

Every host serves the admin API under ``/_sandbox/``: ``GET stats``, ``GET events``, ``POST faults``
(``DELETE`` clears), ``POST user_consent``, ``POST tokens/expire``, ``POST current_user``, ``POST
jsapi_mode``, ``POST open_auth_status``, ``POST suite_ticket`` (rotate and push), ``POST check_url``,
``GET admin_requests``, ``POST admin_requests/approve``, ``POST app_grants/revoke`` (the
organisations forget the app permissions their administrators granted), the tour's ``GET``/``POST
tour/approval`` and ``POST tour/answer`` (``Sandbox``'s, filled in by ``set_tour_approval``), the
CORS endpoints the fake JSSDK calls (``jsapi/code``, ``jsapi/open_auth``) and the fake
``dingtalk.open.js`` itself. Paths are spelled out here rather than imported from the provider,
so a typo on one side cannot hide behind the same typo on the other.

All state lives on the instance; the ``clock`` knob moves time forward in tests.
"""

from __future__ import annotations

import hmac
import html
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import urlencode, urlsplit

import httpx
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
    read_form,
    read_json,
    redirect_allowed,
    redirect_to,
    script_response,
    without_query,
)
from plugins.dingtalk import openapi
from plugins.dingtalk.crypto import CallbackCrypto, CallbackCryptoError, random_nonce

log = logging.getLogger("plugins.dingtalk.sandbox")

JsapiMode = Literal["current", "old_sdk", "old_client", "hang", "not_in_dingtalk"]
JSAPI_MODES: tuple[JsapiMode, ...] = get_args(JsapiMode)
OpenAuthStatus = Literal["ok", "cancel", "toAdmin", "failed"]
OPEN_AUTH_STATUSES: tuple[OpenAuthStatus, ...] = get_args(OpenAuthStatus)

SANDBOX_CORP_ID = "dingsandbox0a1b2c3d4e5f"
OTHER_CORP_ID = "dingother9f8e7d6c5b4a3"
SANDBOX_APP_KEY = "dingsandboxappkey0001"
SANDBOX_APP_SECRET = "sandbox-app-secret-0123456789abcdefXYZ"  # not a secret: the sandbox's fixed default
SANDBOX_SUITE_KEY = "suitesandbox00000001"
SANDBOX_SUITE_SECRET = "sandbox-suite-secret-9876543210zyxwvu"  # idem
SANDBOX_CALLBACK_TOKEN = "sandboxToken2024"
SANDBOX_CALLBACK_AES_KEY = "SandboxEncodingAESKey0123456789abcdefghijkl"  # 43 characters

CODE_TTL_S = 300  # free-login codes: 5 minutes (sheet §3); openAuth / browser codes: a guess, the same
APP_TOKEN_TTL_S = 7200
USER_TOKEN_TTL_S = 7200
REFRESH_TOKEN_TTL_S = 30 * 86400
CONSENT_TTL_S = 600
DELEGATED_PERMISSIONS = ("Contact.User.Read", "Contact.User.mobile")
#: The tour's administrator and member of the app's organisation (its approval switch signs in as
#: the member, whose openAuth type 1 answers toAdmin until an administrator approves).
TOUR_ADMIN, TOUR_MEMBER = "zhangsan01", "lisi0002"
#: What plugins/dingtalk/bridge.js remembers of an administrator's grant in the browser
#: (``localStorage`` keys with this prefix, its CONSENT_KEY): the tour forgets them when a member
#: who was never granted the app signs in.
BRIDGE_CONSENT_KEY_PREFIX = "gw-dingtalk-app-consent:"
APP_PERMISSIONS = ("qyapi_base", "Contact.User.Read", "Pro.HrmDismission.ReadWrite")


@dataclass(frozen=True)
class DingUser:
    """One membership: a person (``unionid``, the same in every organisation) in one organisation
    (``userid`` is per organisation). ``admin`` decides openAuth type 1 (ok or toAdmin);
    ``visible`` is the app's 可见范围 (50002 outside it)."""

    userid: str
    unionid: str
    corp_id: str
    name: str
    admin: bool = False
    visible: bool = True
    mobile: str = ""
    email: str = ""

    @property
    def open_id(self) -> str:
        return "oid" + self.unionid[5:]


DEFAULT_USERS: tuple[DingUser, ...] = (
    DingUser("zhangsan01", "union7dab8a3d3cdcc9da", SANDBOX_CORP_ID, "张三", admin=True, mobile="13800000001"),
    DingUser("lisi0002", "union1f2d3c4b5a697887", SANDBOX_CORP_ID, "李四"),
    DingUser("alice0003", "unionc99c5f35d542efc7", OTHER_CORP_ID, "Alice Smith", email="alice@other.example"),
    # 张三 belongs to the second organisation too: same unionid, another userid.
    DingUser("zs-other-9", "union7dab8a3d3cdcc9da", OTHER_CORP_ID, "张三"),
)

# New-style errors (sheet §9.1): code -> (HTTP status, message).
API_ERRORS: dict[str, tuple[int, str]] = {
    "invalidClientIdOrSecret": (400, "无效的clientId或者clientSecret"),
    "invalidSuiteKey": (400, "suitekey不合法"),
    "invalidSuiteTicket": (400, "suiteTicket无效"),
    "invalidAuthInfo": (400, "授权关系不存在"),
    "MissingBody": (400, "body is mandatory for this action."),
    "AuthenticationFailed.MissingParameter": (400, "x-acs-dingtalk-access-token is mandatory for this action."),
    "InvalidAuthentication": (400, "不合法的access_token"),
    "accesstoken.expired": (400, "accesstoken is expired"),
    "InvalidAction.NotFound": (404, "Specified api is not found, please check your url and method."),
    "Forbidden.AccessDenied.AccessTokenPermissionDenied": (403, "没有调用该接口的权限，接口权限申请参考"),
    "Forbidden.AccessDenied.IpNotInWhiteList": (403, "访问ip不在白名单之中"),
    "Forbidden.AccessDenied.QpsLimitForApi": (403, "该接口全局调用QPS超过上限"),
    "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi": (403, "应用调用该接口的QPS超过上限"),
    "Forbidden.AccessDenied.QpmLimitForAppkeyAndApi": (403, "应用调用该接口的QPM超过上限"),
    "Forbidden.AccessDenied.QpsLimitForSuitekeyAndOrgAndApi": (403, "应用在该企业调用该接口的QPS超过上限"),
    "Forbidden.AccessDenied.ApiCountLimitForOrg": (403, "企业调用该接口的月度总量超过上限"),
    "invalidParameter.authCode.notFound": (400, "不合法的临时授权码"),  # a guess: sheet §9.1 [?]
    "invalidParameter.refreshToken.notFound": (400, "不合法的refreshToken"),  # made up: sheet §11.2
    "unsupported.grant.type": (400, "不支持的grantType"),
    "server.error": (500, "服务器内部错误"),
    "unknownError": (500, "未知错误"),
}

# Old-style errors (sheet §9.2): errcode -> errmsg.
OAPI_ERRORS: dict[int, str] = {
    -1: "系统繁忙",
    15: "isp.top-remote-connection-timeout",
    22: "不合法的ApiName",
    40001: "获取access_token时Secret错误，或者access_token无效",
    40014: "不合法的access_token",
    40078: "不存在的临时授权码",
    40096: "不合法的appKey或appSecret",
    41001: "缺少access_token参数",
    42001: "access_token超时",
    50002: "员工不在权限范围",
    60011: "没有调用该接口的权限",
    60020: "访问ip不在白名单之中",
    60121: "找不到该用户",  # not in the sheet: what getbyunionid is reported to answer
    88: "鉴权异常",
    90002: "接口调用超过全局限流",
    90018: "应用调用该接口超过限流",
    90019: "应用在该企业调用该接口超过限流",
}

# The login page's own errors, shown to the user (the redirect_uri is not trusted yet).
PAGE_ERRORS: dict[str, str] = {
    "client": "The client_id is not a DingTalk app (AppKey or SuiteKey).",
    "redirect": "The redirect_uri is missing or not registered for this app.",
    "request": "Invalid request: response_type must be code, prompt must be consent, scope must include openid.",
    "scope": "The app has not applied for a requested permission.",
    "corp": "You do not belong to the organisation this login asks for.",
}


@dataclass
class _FreeLoginCode:
    userid: str
    corp_id: str
    client_id: str | None  # None: minted by the old API, which takes no clientId
    expires_at: float
    used: bool = False


@dataclass
class _UserCode:
    unionid: str
    corp_id: str
    client_id: str
    scopes: frozenset[str]
    with_corp: bool  # the login asked for the corpid scope: userAccessToken answers corpId
    expires_at: float
    used: bool = False


@dataclass
class _AppToken:
    app: str  # AppKey or SuiteKey
    corp_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class _UserAccess:
    unionid: str
    client_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class _UserRefresh:
    unionid: str
    corp_id: str
    client_id: str
    scopes: frozenset[str]
    expires_at: float
    access_token: str
    state: Literal["active", "used", "revoked"] = "active"


@dataclass
class _Consent:
    unionid: str
    corp_id: str
    client_id: str
    redirect_uri: str
    state: str | None
    scopes: frozenset[str]
    with_corp: bool
    expires_at: float


@dataclass
class AdminRequest:
    """A non-admin's openAuth type 1 request, waiting for an administrator (``toAdmin``)."""

    corp_id: str
    client_id: str
    scopes: frozenset[str]
    requested_by: str
    approved: bool = False


@dataclass
class PushResult:
    """What happened to one HTTP callback delivery."""

    ok: bool
    status: int
    error: str = ""
    event: dict[str, Any] = field(default_factory=dict)


def _token(prefix: str, nbytes: int = 24) -> str:
    return prefix + secrets.token_hex(nbytes)


def api_error(code: str, status: int | None = None) -> JSONResponse:
    """A new-style error: HTTP status and ``{code, message, requestid}``."""
    default_status, message = API_ERRORS.get(code, (400, "request failed"))
    return JSONResponse({"code": code, "message": message, "requestid": _token("", 8).upper()},
                        status_code=status or default_status)


def oapi_error(errcode: int, sub_code: str | None = None) -> JSONResponse:
    """An old-style error: HTTP 200, ``{errcode, errmsg, request_id}`` (+ ``sub_code`` under 88)."""
    body: dict[str, Any] = {"errcode": errcode, "errmsg": OAPI_ERRORS.get(errcode, "error"),
                            "request_id": _token("", 6)}
    if errcode == 88:
        body["sub_code"] = sub_code or ""
        body["sub_msg"] = OAPI_ERRORS.get(int(sub_code), "") if sub_code and sub_code.isdigit() else ""
    return JSONResponse(body)


def ip_block() -> JSONResponse:
    """The per-IP block (sheet §10): not a DingTalk error body at all."""
    return JSONResponse({"status": 1111, "wait": 5, "source": "x5", "punish": "deny", "uuid": _token("", 8)})


class SandboxError(Exception):
    """Raised inside a handler to answer a documented error."""

    def __init__(self, code: str | int, sub_code: str | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.sub_code = sub_code


class DingTalkSandbox(Sandbox):
    """The emulator. Knobs are constructor arguments; the rest of the API is for tests and demos.

    ``authorized_corps``: organisations that installed the suite (``invalidAuthInfo`` otherwise).
    ``custom_app``: a 定制应用, whose corpAccessToken takes any non-empty suiteTicket.
    ``delegated_permissions`` / ``app_permissions``: what the app applied for in its console
    (``Contact.User.Read`` missing makes ``/contact/users/me`` answer 403).
    ``member_lookup``: getbyunionid permission (60011 when off). ``redirect_uris``: the registered
    redirect URLs (empty accepts any http(s) URL). ``auto_consent``: the login page and openAuth
    type 0 consent without asking. ``jsapi_mode`` shapes the fake JSSDK: ``current``, ``old_sdk``
    (no ``dd.requestAuthCode``), ``old_client`` (``dd.requestAuthCode`` fails: the native call does
    not exist), ``hang`` (``dd.ready`` never fires), ``not_in_dingtalk``. ``open_auth_status`` forces
    the authorization component's answer. ``callback_url``: where suiteTicket pushes go.

    ``stats`` counts calls per endpoint (``accessToken``, ``corpAccessToken``, ``userAccessToken``,
    ``users_me``, ``gettoken``, ``getuserinfo``, ``getbyunionid``, ``authorize``, ``jsapi_code``,
    ``open_auth``), per grant type (``authorization_code``, ``refresh_token``) and callback
    deliveries (``callback_push``, ``callback_ok``, ``callback_failed``). ``inject_fault`` takes
    a string or an int ``code`` and a ``sub_code`` (see ``fault_response``).
    """

    plugin = "dingtalk"
    title = "DingTalk"
    tour_position = 20
    client_user_agent = "AliApp(DingTalk/7.8.1) com.laiwang.DingTalk/46766536 Channel/201200 language/zh-Hans-CN"
    jsapi_modes = JSAPI_MODES
    call_labels: ClassVar[Mapping[str, tuple[str, str]]] = {
        "authorize": ("call", "the browser opened the DingTalk login page (login.dingtalk.com/oauth2/auth)"),
        "jsapi_code": ("jsapi", "JSAPI: the page asked the client for a free-login code (dd.requestAuthCode)"),
        "open_auth": ("jsapi", "JSAPI: the page opened the authorization component (openAuth)"),
        "userAccessToken:authorization_code": ("exchange", "the gateway exchanged the authCode (userAccessToken)"),
        "userAccessToken:refresh_token": ("refresh", "the gateway refreshed the user token (grantType=refresh_token)"),
        "users_me": ("identity", "the gateway read the user (contact/users/me)"),
        "getuserinfo": ("exchange", "the gateway exchanged the free-login code (topapi/v2/user/getuserinfo)"),
        "getbyunionid": ("identity", "the gateway looked up the member's userid (topapi/user/getbyunionid)"),
        "accessToken": ("call", "the gateway fetched the internal app's token (oauth2/accessToken)"),
        "corpAccessToken": ("call", "the gateway fetched the suite's corp token (oauth2/corpAccessToken)"),
        "gettoken": ("call", "the gateway fetched the app token (gettoken)"),
        "user_listid": ("call", "an app read the staff list with the corp token (topapi/user/listid)"),
    }
    fault_code_types = (int, str)
    fault_extras = ("sub_code",)

    def __init__(
        self,
        *,
        app_key: str = SANDBOX_APP_KEY,
        app_secret: str = SANDBOX_APP_SECRET,
        suite_key: str = SANDBOX_SUITE_KEY,
        suite_secret: str = SANDBOX_SUITE_SECRET,
        app_corp_id: str = SANDBOX_CORP_ID,
        authorized_corps: Sequence[str] = (SANDBOX_CORP_ID, OTHER_CORP_ID),
        users: Sequence[DingUser] = DEFAULT_USERS,
        callback_token: str = SANDBOX_CALLBACK_TOKEN,
        callback_aes_key: str = SANDBOX_CALLBACK_AES_KEY,
        callback_url: str | None = None,
        custom_app: bool = False,
        corp_token_reissue_revokes: bool = False,
        rotate_refresh_tokens: bool = True,
        delegated_permissions: Sequence[str] = DELEGATED_PERMISSIONS,
        app_permissions: Sequence[str] = APP_PERMISSIONS,
        member_lookup: bool = True,
        redirect_uris: Sequence[str] = (),
        auto_consent: bool = True,
        jsapi_mode: JsapiMode = "current",
        open_auth_status: OpenAuthStatus | None = None,
        access_ttl_s: int = USER_TOKEN_TTL_S,
        delay_s: float = 0.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not users:
            raise ValueError("the sandbox needs at least one user")
        super().__init__(delay_s=delay_s)
        self.app_key = app_key
        self.app_secret = app_secret
        self.suite_key = suite_key
        self.suite_secret = suite_secret
        self.app_corp_id = app_corp_id
        self.authorized_corps = set(authorized_corps)
        self.users: dict[str, DingUser] = {user.userid: user for user in users}
        self.callback_token = callback_token
        self.callback_aes_key = callback_aes_key
        self.callback_url = callback_url
        self.custom_app = custom_app
        self.corp_token_reissue_revokes = corp_token_reissue_revokes
        self.rotate_refresh_tokens = rotate_refresh_tokens
        self.delegated_permissions = set(delegated_permissions)
        self.app_permissions = set(app_permissions)
        self.member_lookup = member_lookup
        self.redirect_uris = [without_query(uri) for uri in redirect_uris]
        self.auto_consent = auto_consent
        self.jsapi_mode: JsapiMode = jsapi_mode
        self.open_auth_status: OpenAuthStatus | None = open_auth_status
        self.access_ttl_s = access_ttl_s
        self.clock = clock
        self.current_user = users[0].userid
        self.suite_ticket = _token("ticket", 16)
        self.admin_requests: list[AdminRequest] = []
        self._free_codes: dict[str, _FreeLoginCode] = {}
        self._user_codes: dict[str, _UserCode] = {}
        self._app_tokens: dict[str, _AppToken] = {}
        self._internal_token: str | None = None
        self._access: dict[str, _UserAccess] = {}
        self._refresh: dict[str, _UserRefresh] = {}
        self._app_grants: dict[str, set[str]] = {}  # corp -> app permissions an admin granted
        self._consents: dict[str, _Consent] = {}
        #: unionid -> delegated permissions the person has not granted (withdrawn since their token
        #: was issued): their user tokens are refused those APIs until an authorization asks again.
        self._withheld: dict[str, set[str]] = {}

    # -- the Python API ------------------------------------------------------------------------

    @property
    def user(self) -> DingUser:
        return self.users[self.current_user]

    def set_current_user(self, userid: str) -> None:
        """The membership the simulated client and the login page sign in as."""
        if userid not in self.users:
            raise KeyError(f"no sandbox user {userid!r}")
        self.current_user = userid

    def mint_client_code(
        self, userid: str | None = None, *, client_id: str | None = "", corp_id: str | None = None
    ) -> str:
        """A free-login code as ``dd.requestAuthCode`` hands it to the page. ``client_id`` "" means
        the internal app (or the suite when the user's organisation is not the app's); None
        mints an old-API code (``dd.runtime.permission.requestAuthCode``, no clientId)."""
        user = self.users[userid or self.current_user]
        if client_id == "":
            client_id = self.app_key if user.corp_id == self.app_corp_id else self.suite_key
        return self._mint_free(user, corp_id or user.corp_id, client_id)

    def mint_user_code(
        self, userid: str | None = None, *, client_id: str | None = None, scopes: Sequence[str] = (),
        with_corp: bool = False,
    ) -> str:
        """An openAuth type 0 ``authCode`` (or, ``with_corp``, a browser login's) for userAccessToken."""
        user = self.users[userid or self.current_user]
        return self._mint_user(user, client_id or self.app_key, frozenset(scopes), with_corp)

    def rotate_suite_ticket(self) -> str:
        """A new suiteTicket; the previous one stops working at once."""
        self.suite_ticket = _token("ticket", 16)
        return self.suite_ticket

    def approve_admin_requests(self) -> int:
        """An administrator approves every pending type 1 request; returns how many. The next
        openAuth type 1 of that organisation answers ``ok``: the permissions are granted."""
        count = 0
        for request in self.admin_requests:
            if not request.approved:
                request.approved = True
                self._app_grants.setdefault(request.corp_id, set()).update(request.scopes)
                count += 1
        self.record_event("approval", f"an administrator approved {count} request(s) for the app's permissions")
        return count

    def revoke_app_grants(self) -> None:
        """Every organisation forgets the app permissions its administrators granted (and the
        requests waiting for them): the next non-admin's openAuth type 1 answers ``toAdmin``."""
        self._app_grants.clear()
        self.admin_requests.clear()
        self.record_event("admin", "the organisations' administrators have not granted the app's permissions yet")

    def expire_access_tokens(self) -> int:
        now = self.clock()
        live = [access for access in self._access.values() if not access.revoked and access.expires_at > now]
        for access in live:
            access.expires_at = now  # contact/users/me now answers accesstoken.expired
        return len(live)

    def app_permissions_granted(self, corp_id: str) -> set[str]:
        return set(self._app_grants.get(corp_id, set()))

    def revoke_user(self, unionid: str) -> None:
        """Kill every user token of a person (they removed the authorization)."""
        for refresh in self._refresh.values():
            if refresh.unionid == unionid and refresh.state == "active":
                refresh.state = "revoked"
        for access in self._access.values():
            if access.unionid == unionid:
                access.revoked = True

    def callback_crypto(self, owner_key: str | None = None) -> CallbackCrypto:
        return CallbackCrypto(self.callback_token, self.callback_aes_key, owner_key or self.suite_key)

    async def deliver_event(
        self, event: Mapping[str, Any], url: str | None = None, *, client: httpx.AsyncClient | None = None,
        owner_key: str | None = None,
    ) -> PushResult:
        """POST one encrypted event to the callback URL and check the encrypted ``success`` reply."""
        target = url or self.callback_url
        if not target:
            raise ValueError("no callback URL: set callback_url or pass url")
        crypto = self.callback_crypto(owner_key)
        timestamp = str(int(self.clock() * 1000))
        nonce = random_nonce(8)
        encrypted = crypto.encrypt(json.dumps(dict(event), ensure_ascii=False, separators=(",", ":")))
        query = {"signature": crypto.sign(timestamp, nonce, encrypted), "timestamp": timestamp, "nonce": nonce}
        self._stats["callback_push"] += 1
        separator = "&" if urlsplit(target).query else "?"
        owned = client is None
        http = client or httpx.AsyncClient(timeout=10)
        try:
            response = await http.post(f"{target}{separator}{urlencode(query)}", json={"encrypt": encrypted})
        except httpx.HTTPError as exc:
            self._stats["callback_failed"] += 1
            return PushResult(False, 0, f"unreachable: {exc.__class__.__name__}", dict(event))
        finally:
            if owned:
                await http.aclose()
        error = self._check_reply(crypto, response)
        self._stats["callback_ok" if not error else "callback_failed"] += 1
        return PushResult(not error, response.status_code, error, dict(event))

    @staticmethod
    def _check_reply(crypto: CallbackCrypto, response: httpx.Response) -> str:
        """"" when the reply is the encrypted ``success``; otherwise why not (DingTalk: 71009)."""
        try:
            reply = response.json()
        except ValueError:
            return f"71009: the reply is not JSON (HTTP {response.status_code})"
        if response.status_code != 200 or not isinstance(reply, dict):
            return f"71009: HTTP {response.status_code}"
        fields = [reply.get(name) for name in ("msg_signature", "timeStamp", "nonce", "encrypt")]
        if not all(isinstance(value, str) and value for value in fields):
            return "71009: the reply lacks msg_signature/timeStamp/nonce/encrypt"
        signature, stamp, nonce, encrypted = (str(value) for value in fields)
        try:
            text = crypto.open(signature, stamp, nonce, encrypted)
        except CallbackCryptoError as exc:
            return f"71009: {exc.message} ({exc.code})"
        return "" if text == "success" else f"71009: the reply says {text!r}, not success"

    async def push_suite_ticket(
        self, url: str | None = None, *, rotate: bool = True, client: httpx.AsyncClient | None = None
    ) -> PushResult:
        """DingTalk's suite_ticket push (``rotate``: a new ticket first, killing the old one)."""
        if rotate:
            self.rotate_suite_ticket()
        event = {
            "SuiteKey": self.suite_key,
            "EventType": "suite_ticket",
            "TimeStamp": int(self.clock() * 1000),
            "SuiteTicket": self.suite_ticket,
        }
        return await self.deliver_event(event, url, client=client)

    async def check_callback_url(
        self, url: str | None = None, *, client: httpx.AsyncClient | None = None
    ) -> PushResult:
        """The console's check when a callback URL is saved (``check_url``)."""
        return await self.deliver_event({"EventType": "check_url"}, url, client=client)

    # -- Sandbox ------------------------------------------------------------------------------

    def host_routes(self) -> dict[str, list[BaseRoute]]:
        return {
            "api": [
                Route("/v1.0/oauth2/accessToken", self._access_token, methods=["POST"]),
                Route("/v1.0/oauth2/corpAccessToken", self._corp_access_token, methods=["POST"]),
                Route("/v1.0/oauth2/userAccessToken", self._user_access_token, methods=["POST"]),
                Route("/v1.0/contact/users/{union_id}", self._users_me, methods=["GET"]),
            ],
            "oapi": [
                Route("/gettoken", self._gettoken, methods=["GET"]),
                Route("/topapi/v2/user/getuserinfo", self._getuserinfo, methods=["POST"]),
                Route("/topapi/user/getbyunionid", self._getbyunionid, methods=["POST"]),
                *openapi.routes(self),  # the staff list the relay calls (plugins/dingtalk/openapi.py)
            ],
            "login": [
                Route("/oauth2/auth", self._authorize, methods=["GET"]),
                Route("/_sandbox/consent", self._consent, methods=["POST"]),
            ],
        }

    def provider_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """The internal app (the simplest setup): AppKey/AppSecret of the first organisation."""
        return {
            "plugin": "dingtalk",
            "client_id": self.app_key,
            "client_secret": self.app_secret,
            "corp_id": self.app_corp_id,
            "app_type": "internal",
            "api_base_url": base_urls["api"],
            "oapi_base_url": base_urls["oapi"],
            "login_base_url": base_urls["login"],
            "jssdk_url": "",
        }

    def isv_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """The third-party suite: SuiteKey/SuiteSecret and the event-callback crypto settings
        (the suiteTicket arrives by push; call ``push_suite_ticket`` once the gateway is up)."""
        return {
            **self.provider_settings(base_urls),
            "client_id": self.suite_key,
            "client_secret": self.suite_secret,
            "corp_id": None,
            "app_type": "isv",
            "callback_token": self.callback_token,
            "callback_aes_key": self.callback_aes_key,
        }

    def demo_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        return {**self.provider_settings(base_urls), "jssdk_url": base_urls["api"] + "/_sandbox/dingtalk.open.js"}

    #: The second DingTalk provider of the demo and of ``gateway sandbox``: the third-party (ISV) suite.
    DEMO_ISV = "dingtalk-isv"

    def sandbox_providers(self, base_urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Both app kinds. Nobody pushes a suiteTicket to a gateway pasted from this output, so the
        ISV entry seeds the emulator's current one (``suite_ticket``, the ticket the demo pushes):
        it stays valid until the emulator rotates it (``POST /_sandbox/suite_ticket``)."""
        return {self.plugin: self.provider_settings(base_urls),
                self.DEMO_ISV: {**self.isv_settings(base_urls), "suite_ticket": self.suite_ticket}}

    def demo_providers(self, base_urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """Both app kinds: the internal app, and the ISV suite (its suiteTicket is pushed once the
        demo gateway is up, as DingTalk does)."""
        jssdk = {"jssdk_url": base_urls["api"] + "/_sandbox/dingtalk.open.js"}
        return {self.plugin: self.demo_settings(base_urls), self.DEMO_ISV: {**self.isv_settings(base_urls), **jssdk}}

    def demo_api_calls(self) -> list[DemoApiCall]:
        """The signed-in person (``v1.0/contact/users/me``) with the user token, for both app kinds:
        a missing ``Contact.User.Read`` is 403 ``Forbidden.AccessDenied.AccessTokenPermissionDenied``,
        consent_required at the relay; in the client the authorization component (openAuth type 0
        with that ``rpcScope``) asks for it."""
        note = ("Outside the client the gateway sends the browser to DingTalk's login page with the added "
                "permission; the user comes back here.")
        return [DemoApiCall(name, "the signed-in person", "v1.0/contact/users/me", openapi.STAFF_PERMISSION,
                            route={"path": "v1.0/contact/users/me", "scopes": [openapi.STAFF_PERMISSION]},
                            consent_note=note, shows="unionId")
                for name in (self.plugin, self.DEMO_ISV)]

    def demo_tour(self) -> list[TourEntry]:
        """Both app kinds, signing in through the authorization component (a user token to refresh,
        and the administrator's approval of the app's permissions first) instead of the silent
        free-login code. The third-party app's homepage URL says which organisation
        (``?corpid=$CORPID$``)."""
        member = self.users[TOUR_MEMBER].name if TOUR_MEMBER in self.users else TOUR_MEMBER
        common: dict[str, Any] = {
            "deny_help": "The login page or the authorization component is refused.",
            "deny_answers": ("access_denied", "cancel"),
            "approval_help": f"Signs in as {member}, a member (not an administrator): the authorization component "
                             "sends the app's permissions to an administrator. Approve below, then open again.",
            "approval_answers": ("toAdmin",),
            "settings": {"scopes": [openapi.STAFF_PERMISSION], "app_scopes": [".default"]},
            "forget_storage": (BRIDGE_CONSENT_KEY_PREFIX,),
        }
        return [TourEntry(self.plugin, "DingTalk (internal app)", **common),
                TourEntry(self.DEMO_ISV, "DingTalk (third-party app)", next_path=f"/?corpid={self.app_corp_id}",
                          **common)]

    def set_tour_approval(self, on: bool) -> None:
        """On: a member (not an administrator) of an organisation that has not granted the app's
        permissions signs in, so openAuth type 1 answers toAdmin until an administrator approves.
        Off: the administrator signs in (granted at once)."""
        self.set_current_user(TOUR_MEMBER if on else TOUR_ADMIN)
        if on:
            self.revoke_app_grants()

    def answer_tour_approval(self, answer: AdminAnswer) -> None:
        """DingTalk's administrator approves only: a refusal there is a toAdmin left unanswered."""
        if answer != "approved":
            raise ValueError("a DingTalk administrator approves a request or leaves it waiting; there is no refusal")
        self.approve_admin_requests()

    def tour_approval_status(self) -> str:
        waiting = sum(1 for request in self.admin_requests if not request.approved)
        approved = len(self.admin_requests) - waiting
        return f"{waiting} waiting" if waiting else "approved" if approved else ""

    def set_user_grant(self, scope: str, granted: bool) -> None:
        """Withdrawn: every user token of the current person is refused ``scope`` until an
        authorization (openAuth, the login page) asks for it again."""
        if scope not in self.delegated_permissions:
            raise LookupError(f"{scope!r} is not a delegated permission of the emulated app")
        withheld = self._withheld.setdefault(self.user.unionid, set())
        if granted:
            withheld.discard(scope)
        else:
            withheld.add(scope)

    async def demo_started(self, gateway_url: str, path_prefix: str) -> None:
        result = await self.push_suite_ticket(f"{gateway_url}{path_prefix}/providers/{self.DEMO_ISV}/events")
        if not result.ok:
            log.warning("the demo's suiteTicket push was not accepted: %s", result)

    # -- shared request plumbing -------------------------------------------------------------

    def fault_response(self, endpoint: str, fault: Fault) -> Response | None:
        """A string ``code`` is a new-style code (its documented status unless ``status``), an int
        an old-style errcode (HTTP 200; the fault's ``sub_code`` under 88), ``"ip_block"`` the
        per-IP block answer."""
        if fault.code == "ip_block":
            return ip_block()
        if isinstance(fault.code, str):
            return api_error(fault.code, fault.status)
        if isinstance(fault.code, int):
            return oapi_error(fault.code, fault.extra.get("sub_code"))
        return super().fault_response(endpoint, fault)

    def _mint_free(self, user: DingUser, corp_id: str, client_id: str | None) -> str:
        code = _token("", 16)
        self._free_codes[code] = _FreeLoginCode(user.userid, corp_id, client_id, self.clock() + CODE_TTL_S)
        self.record_event("code", f"free-login code issued for {user.name} (single use, 5 min)")
        return code

    def _mint_user(self, user: DingUser, client_id: str, scopes: frozenset[str], with_corp: bool) -> str:
        self._withheld.get(user.unionid, set()).difference_update(scopes)  # granted again by this authorization
        code = _token("", 16)
        self._user_codes[code] = _UserCode(user.unionid, user.corp_id, client_id, scopes, with_corp,
                                           self.clock() + CODE_TTL_S)
        self.record_event("code", f"authCode issued for {user.name} (single use, 5 min)")
        return code

    def _client_ok(self, client_id: str, client_secret: str) -> bool:
        known = {self.app_key: self.app_secret, self.suite_key: self.suite_secret}
        secret = known.get(client_id)
        return secret is not None and hmac.compare_digest(client_secret.encode(), secret.encode())

    def _app_available(self, client_id: str, corp_id: str) -> bool:
        """Is the app (AppKey or SuiteKey) usable in that organisation?"""
        if client_id == self.app_key:
            return corp_id == self.app_corp_id
        return client_id == self.suite_key and corp_id in self.authorized_corps

    def _issue_app_token(self, app: str, corp_id: str) -> tuple[str, int]:
        token = _token("", 16)
        self._app_tokens[token] = _AppToken(app, corp_id, self.clock() + APP_TOKEN_TTL_S)
        return token, APP_TOKEN_TTL_S

    def _internal_app_token(self) -> tuple[str, int]:
        """"有效期内重复获取会返回相同结果并自动续期": the same token, its expiry renewed."""
        now = self.clock()
        current = self._app_tokens.get(self._internal_token or "")
        if current is not None and not current.revoked and now < current.expires_at:
            current.expires_at = now + APP_TOKEN_TTL_S
            return self._internal_token or "", APP_TOKEN_TTL_S
        token, ttl = self._issue_app_token(self.app_key, self.app_corp_id)
        self._internal_token = token
        return token, ttl

    def _resolve_app_token(self, request: Request) -> _AppToken:
        value = request.query_params.get("access_token", "")
        if not value:
            raise SandboxError(41001)
        token = self._app_tokens.get(value)
        if token is None or token.revoked:
            raise SandboxError(88, "40014")  # topapi reports auth failures under errcode 88
        if self.clock() >= token.expires_at:
            raise SandboxError(88, "42001")
        return token

    # -- api host: app and corp tokens ---------------------------------------------------------

    async def _access_token(self, request: Request) -> Response:
        body = await read_json(request)
        if (fault := await self._gate("accessToken")) is not None:
            return fault
        if body is None or "application/json" not in request.headers.get("content-type", ""):
            return api_error("MissingBody")
        app_key, app_secret = str_field(body, "appKey"), str_field(body, "appSecret")
        # Internal apps only: a SuiteKey here is refused like a wrong secret ("第三方企业应用暂不支持").
        if app_key != self.app_key or not self._client_ok(app_key, app_secret):
            return api_error("invalidClientIdOrSecret")
        token, expire = self._internal_app_token()
        return JSONResponse({"accessToken": token, "expireIn": expire})

    async def _corp_access_token(self, request: Request) -> Response:
        body = await read_json(request)
        if (fault := await self._gate("corpAccessToken")) is not None:
            return fault
        if body is None or "application/json" not in request.headers.get("content-type", ""):
            return api_error("MissingBody")
        suite_key, suite_secret = str_field(body, "suiteKey"), str_field(body, "suiteSecret")
        corp_id, ticket = str_field(body, "authCorpId"), str_field(body, "suiteTicket")
        if suite_key != self.suite_key or not self._client_ok(suite_key, suite_secret):
            return api_error("invalidSuiteKey")
        ticket_ok = bool(ticket) and (self.custom_app or hmac.compare_digest(ticket, self.suite_ticket))
        if not ticket_ok:
            return api_error("invalidSuiteTicket")
        if corp_id not in self.authorized_corps:
            return api_error("invalidAuthInfo")
        if self.corp_token_reissue_revokes:
            for issued in self._app_tokens.values():
                if issued.app == suite_key and issued.corp_id == corp_id:
                    issued.revoked = True
        token, expire = self._issue_app_token(suite_key, corp_id)  # "重复获取会返回新的accessToken"
        return JSONResponse({"accessToken": token, "expireIn": expire})

    # -- api host: user tokens -----------------------------------------------------------------

    async def _user_access_token(self, request: Request) -> Response:
        body = await read_json(request)
        grant_type = str_field(body or {}, "grantType")
        counted = grant_type if grant_type in ("authorization_code", "refresh_token") else ""
        if (fault := await self._gate("userAccessToken", counted)) is not None:
            return fault
        if body is None or not body or "application/json" not in request.headers.get("content-type", ""):
            return api_error("MissingBody")
        client_id, client_secret = str_field(body, "clientId"), str_field(body, "clientSecret")
        if not self._client_ok(client_id, client_secret):
            return api_error("invalidClientIdOrSecret")
        try:
            # No await from here on: each exchange is atomic, so of two uses exactly one wins.
            if grant_type == "authorization_code":
                return JSONResponse(self._redeem_user_code(client_id, str_field(body, "code")))
            if grant_type == "refresh_token":
                return JSONResponse(self._rotate(client_id, str_field(body, "refreshToken")))
        except SandboxError as exc:
            return api_error(str(exc.code))
        return api_error("unsupported.grant.type")

    def _redeem_user_code(self, client_id: str, value: str) -> dict[str, Any]:
        code = self._user_codes.get(value)
        if code is None or code.used or self.clock() >= code.expires_at or code.client_id != client_id:
            raise SandboxError("invalidParameter.authCode.notFound")
        code.used = True
        answer = self._issue_user_tokens(code.unionid, code.corp_id, client_id, code.scopes)
        if code.with_corp:
            answer["corpId"] = code.corp_id
        return answer

    def _rotate(self, client_id: str, value: str) -> dict[str, Any]:
        refresh = self._refresh.get(value)
        now = self.clock()
        if (refresh is None or refresh.state != "active" or now >= refresh.expires_at
                or refresh.client_id != client_id):
            raise SandboxError("invalidParameter.refreshToken.notFound")
        old = self._access.get(refresh.access_token)
        if old is not None:
            old.revoked = True
        if not self.rotate_refresh_tokens:
            access_token = _token("", 16)
            self._access[access_token] = _UserAccess(refresh.unionid, client_id, now + self.access_ttl_s)
            refresh.access_token = access_token
            return {"accessToken": access_token, "refreshToken": value, "expireIn": self.access_ttl_s}
        refresh.state = "used"
        self.record_event("revoked", "the used refresh token and the access token it replaced are dead now")
        return self._issue_user_tokens(refresh.unionid, refresh.corp_id, client_id, refresh.scopes)

    def _issue_user_tokens(self, unionid: str, corp_id: str, client_id: str, scopes: frozenset[str]) -> dict[str, Any]:
        now = self.clock()
        access_token, refresh_token = _token("", 16), _token("", 16)
        self._access[access_token] = _UserAccess(unionid, client_id, now + self.access_ttl_s)
        self._refresh[refresh_token] = _UserRefresh(unionid, corp_id, client_id, scopes,
                                                    now + REFRESH_TOKEN_TTL_S, access_token)
        self.record_event("tokens", f"user token issued: access token {self.access_ttl_s // 60} min, "
                                    "refresh token 30 d")
        return {"accessToken": access_token, "refreshToken": refresh_token, "expireIn": self.access_ttl_s}

    async def _users_me(self, request: Request) -> Response:
        if (fault := await self._gate("users_me")) is not None:
            return fault
        value = request.headers.get("x-acs-dingtalk-access-token", "")
        if not value:  # ?access_token= and Authorization: Bearer are not accepted
            return api_error("AuthenticationFailed.MissingParameter")
        access = self._access.get(value)
        if access is None or access.revoked:
            return api_error("InvalidAuthentication")
        if self.clock() >= access.expires_at:
            return api_error("accesstoken.expired")
        granted = self.delegated_permissions - self._withheld.get(access.unionid, set())
        if "Contact.User.Read" not in granted:
            return api_error("Forbidden.AccessDenied.AccessTokenPermissionDenied")
        union_id = request.path_params["union_id"]
        if union_id not in ("me", access.unionid):
            return api_error("Forbidden.AccessDenied.AccessTokenPermissionDenied")
        person = next(user for user in self.users.values() if user.unionid == access.unionid)
        answer: dict[str, Any] = {
            "nick": person.name,
            "avatarUrl": f"https://sandbox.invalid/avatar/{person.unionid}",
            "openId": person.open_id,
            "unionId": person.unionid,
            "stateCode": "86",
            "visitor": False,
        }
        if person.email:
            answer["email"] = person.email
        if person.mobile and "Contact.User.mobile" in self.delegated_permissions:
            answer["mobile"] = person.mobile
        return JSONResponse(answer)

    # -- oapi host -----------------------------------------------------------------------------

    async def _gettoken(self, request: Request) -> Response:
        if (fault := await self._gate("gettoken")) is not None:
            return fault
        query = request.query_params
        app_key, app_secret = query.get("appkey", ""), query.get("appsecret", "")
        if app_key != self.app_key or not self._client_ok(app_key, app_secret):
            return oapi_error(40096)
        token, expire = self._internal_app_token()
        return JSONResponse({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": expire})

    async def _getuserinfo(self, request: Request) -> Response:
        body = await read_json(request)
        if (fault := await self._gate("getuserinfo")) is not None:
            return fault
        try:
            token = self._resolve_app_token(request)
            value = str_field(body or {}, "code")
            code = self._free_codes.get(value)
            # Used, expired, unknown, of another organisation or app, or a browser code: all 40078.
            if (code is None or code.used or self.clock() >= code.expires_at or code.corp_id != token.corp_id
                    or (code.client_id is not None and code.client_id != token.app)):
                raise SandboxError(40078)
            user = self.users[code.userid]
            if not user.visible:
                raise SandboxError(50002)
            code.used = True
        except SandboxError as exc:
            return oapi_error(int(exc.code), exc.sub_code)
        sys_level = 1 if user.admin else 0
        return JSONResponse({
            "errcode": 0, "errmsg": "ok", "request_id": _token("", 6),
            "result": {"userid": user.userid, "unionid": user.unionid, "associated_unionid": user.unionid,
                       "name": user.name, "device_id": _token("", 8), "sys": user.admin, "sys_level": sys_level},
        })

    async def _getbyunionid(self, request: Request) -> Response:
        body = await read_json(request)
        if (fault := await self._gate("getbyunionid")) is not None:
            return fault
        try:
            token = self._resolve_app_token(request)
            if not self.member_lookup:
                raise SandboxError(60011)
            unionid = str_field(body or {}, "unionid")
            member = next((user for user in self.users.values()
                           if user.unionid == unionid and user.corp_id == token.corp_id), None)
            if member is None:
                raise SandboxError(60121)
        except SandboxError as exc:
            return oapi_error(int(exc.code), exc.sub_code)
        return JSONResponse({"errcode": 0, "errmsg": "ok", "request_id": _token("", 6),
                             "result": {"contact_type": 0, "userid": member.userid}})

    # -- login host: browser OAuth --------------------------------------------------------------

    def _error_page(self, kind: str, status: int = 400) -> HTMLResponse:
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>DingTalk login</title><h1>登录失败</h1>"
            f"<p>{html.escape(PAGE_ERRORS.get(kind, 'The request failed.'))}</p>",
            status_code=status,
        )

    async def _authorize(self, request: Request) -> Response:
        if (fault := await self._gate("authorize")) is not None:
            return fault
        query = request.query_params
        client_id = query.get("client_id", "")
        if client_id not in (self.app_key, self.suite_key):
            return self._error_page("client")
        redirect_uri = query.get("redirect_uri", "")
        if not redirect_allowed(redirect_uri, self.redirect_uris):
            return self._error_page("redirect")
        scopes = [scope for scope in query.get("scope", "").split(" ") if scope]
        if query.get("response_type") != "code" or query.get("prompt") != "consent" or "openid" not in scopes:
            return self._error_page("request")
        delegated = frozenset(scope for scope in scopes if scope not in ("openid", "corpid"))
        if delegated - self.delegated_permissions:
            return self._error_page("scope")
        person = self.user
        corp_id = person.corp_id
        wanted = query.get("corpId")
        if wanted and "corpid" in scopes:
            membership = next((user for user in self.users.values()
                               if user.unionid == person.unionid and user.corp_id == wanted), None)
            if membership is None:
                return self._error_page("corp")
            corp_id = wanted
        consent = _Consent(person.unionid, corp_id, client_id, redirect_uri, query.get("state"), delegated,
                           "corpid" in scopes, self.clock() + CONSENT_TTL_S)
        if self.refuse_consent:  # what pressing 取消 (Deny) on the login page answers
            self.record_event("refused", "the user refused on the DingTalk login page: access_denied")
            return redirect_to(redirect_uri, {"error": "access_denied", "state": consent.state})
        if self.auto_consent:
            return self._grant_consent(consent)
        ticket = _token("", 12)
        self._consents[ticket] = consent
        return HTMLResponse(
            "<!doctype html><meta charset=utf-8><title>钉钉登录</title>"
            f"<h1>Sign in to {html.escape(client_id)}</h1><p>Signed in as {html.escape(person.name)}.</p>"
            + consent_form(ticket, allow="同意 Allow", deny="取消 Deny")
        )

    def _grant_consent(self, consent: _Consent) -> Response:
        person = next(user for user in self.users.values()
                      if user.unionid == consent.unionid and user.corp_id == consent.corp_id)
        code = self._mint_user(person, consent.client_id, consent.scopes, consent.with_corp)
        return redirect_to(consent.redirect_uri, {"authCode": code, "state": consent.state})

    async def _consent(self, request: Request) -> Response:
        form = await read_form(request) or {}  # parsed here so the sandbox needs no python-multipart
        ticket, decision = str_field(form, "ticket"), form.get("decision")
        consent = self._consents.pop(ticket, None)
        if consent is None or self.clock() >= consent.expires_at:
            return HTMLResponse("<!doctype html><p>This login request has expired.</p>", status_code=400)
        if decision != "allow":
            self.record_event("refused", "the user pressed 取消 (Deny) on the login page: access_denied")
            return redirect_to(consent.redirect_uri, {"error": "access_denied", "state": consent.state})
        return self._grant_consent(consent)

    # -- the simulated client: JSSDK, free-login codes, the authorization component -------------

    async def _jsapi_code(self, request: Request) -> Response:
        if (early := await self._cors_gate(request, "jsapi_code")) is not None:
            return early
        answer, status = self._jsapi_answer(await read_json(request) or {})
        return JSONResponse(answer, status_code=status, headers=CORS_HEADERS)

    def _jsapi_answer(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """What requestAuthCode hands the page: ``{code}`` or the native failure
        ``{errorCode, errorMessage}`` (sheet 2.4: "1" not_exist, "7" no_permission)."""
        user = self.user
        api = str_field(body, "api")
        corp_id = str_field(body, "corpId")
        if api == "requestAuthCode" and self.jsapi_mode == "old_client":
            return {"errorCode": "1", "errorMessage": "not_exist: runtime.permission.requestAuthCodeV2"}, 400
        if not corp_id or corp_id != user.corp_id:
            return {"errorCode": "7", "errorMessage": "no_permission: corpId is not the user's organisation"}, 400
        client_id: str | None = None
        if api == "requestAuthCode":
            client_id = str_field(body, "clientId")
            if not self._app_available(client_id, corp_id):
                return {"errorCode": "7", "errorMessage": "no_permission: the clientId is not an app of this "
                                                          "organisation"}, 400
        elif api != "runtime.permission.requestAuthCode":
            return {"errorCode": "1", "errorMessage": f"not_exist: {api}"}, 400
        return {"code": self._mint_free(user, corp_id, client_id)}, 200

    async def _open_auth(self, request: Request) -> Response:
        if (early := await self._cors_gate(request, "open_auth")) is not None:
            return early
        answer = self._open_auth_answer(await read_json(request) or {})
        return JSONResponse(answer, headers=CORS_HEADERS)

    def _open_auth_answer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The authorization component's answer ``{status, result}`` (sheet 2.5)."""
        kind = str(body.get("type", ""))
        client_id, corp_id = str_field(body, "clientId"), str_field(body, "corpId")
        rpc = [scope for scope in str_field(body, "rpcScope").split(",") if scope]
        fields = [scope for scope in str_field(body, "fieldScope").split(",") if scope]
        user = self.user
        forced = self.open_auth_status
        if forced is not None and forced != "ok":
            return {"status": forced, "result": None}
        if kind not in ("0", "1") or not client_id or not corp_id or corp_id != user.corp_id:
            return {"status": "failed", "result": None}  # 400006 / 400007 and the like
        if not self._app_available(client_id, corp_id):
            return {"status": "failed", "result": None}  # 500101 应用不存在
        if kind == "1":
            scopes = self.app_permissions if rpc == [".default"] else set(rpc)
            if not scopes or scopes - self.app_permissions or fields:
                return {"status": "failed", "result": None}  # 500104 / 500204
            granted = self._app_grants.get(corp_id, set())
            if user.admin or forced == "ok" or scopes <= granted:
                # An administrator grants at once; a member gets ok once an administrator has
                # approved these permissions for the organisation (approve_admin_requests).
                self._app_grants.setdefault(corp_id, set()).update(scopes)
                return {"status": "ok", "result": None}
            if not any(not request.approved and request.corp_id == corp_id and request.scopes == scopes
                       for request in self.admin_requests):
                self.admin_requests.append(AdminRequest(corp_id, client_id, frozenset(scopes), user.userid))
            self.record_event("approval", f"{user.name} is not an administrator: the request went to one (toAdmin)")
            return {"status": "toAdmin", "result": None}
        requested = frozenset(rpc + fields)
        if not requested or requested - self.delegated_permissions:
            return {"status": "failed", "result": None}  # 500104 应用未添加该权限点
        if self.refuse_consent and forced is None:  # the panel is shown and the user closes it
            self.record_event("refused", "the user refused in the authorization component: cancel")
            return {"status": "cancel", "result": None}
        if not self.auto_consent and forced is None and body.get("consent") is not True:
            if body.get("consent") is False:
                self.record_event("refused", "the user refused in the authorization component: cancel")
                return {"status": "cancel", "result": None}
            return {"consent_required": True, "scopes": sorted(requested)}
        return {"status": "ok", "result": {"authCode": self._mint_user(user, client_id, requested, False)}}

    async def _jssdk(self, request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        script = (
            _FAKE_JSSDK.replace("__CODE_ENDPOINT__", json.dumps(base + "/_sandbox/jsapi/code"))
            .replace("__AUTH_ENDPOINT__", json.dumps(base + "/_sandbox/jsapi/open_auth"))
            .replace("__MODE__", json.dumps(self.jsapi_mode))
        )
        return script_response(script)

    # -- admin API -----------------------------------------------------------------------------

    def admin_routes(self) -> list[BaseRoute]:
        return [
            *super().admin_routes(),
            Route("/_sandbox/current_user", self._admin_current_user, methods=["POST"]),
            Route("/_sandbox/open_auth_status", self._admin_open_auth_status, methods=["POST"]),
            Route("/_sandbox/suite_ticket", self._admin_suite_ticket, methods=["POST"]),
            Route("/_sandbox/check_url", self._admin_check_url, methods=["POST"]),
            Route("/_sandbox/admin_requests", self._admin_requests, methods=["GET"]),
            Route("/_sandbox/admin_requests/approve", self._admin_approve, methods=["POST"]),
            Route("/_sandbox/app_grants/revoke", self._admin_revoke_grants, methods=["POST"]),
            Route("/_sandbox/jsapi/code", self._jsapi_code, methods=["POST", "OPTIONS"]),
            Route("/_sandbox/jsapi/open_auth", self._open_auth, methods=["POST", "OPTIONS"]),
            Route("/_sandbox/dingtalk.open.js", self._jssdk, methods=["GET"]),
        ]

    async def _admin_current_user(self, request: Request) -> Response:
        userid = str_field(await read_json(request) or {}, "userid")
        if userid not in self.users:
            return JSONResponse({"error": f"no sandbox user {userid!r}", "users": list(self.users)}, 404)
        self.set_current_user(userid)
        return JSONResponse({"userid": userid, "name": self.users[userid].name, "corp_id": self.user.corp_id})

    async def _admin_open_auth_status(self, request: Request) -> Response:
        wanted = (await read_json(request) or {}).get("status")
        if wanted is None:
            self.open_auth_status = None
            return JSONResponse({"status": None})
        status = next((status for status in OPEN_AUTH_STATUSES if status == wanted), None)
        if status is None:
            return JSONResponse({"error": f"unknown status {wanted!r}", "statuses": list(OPEN_AUTH_STATUSES)}, 400)
        self.open_auth_status = status
        return JSONResponse({"status": status})

    async def _admin_suite_ticket(self, request: Request) -> Response:
        body = await read_json(request) or {}
        url = str_field(body, "url") or self.callback_url
        if not url:
            return JSONResponse({"error": "no callback URL: give url or set callback_url"}, 400)
        result = await self.push_suite_ticket(url, rotate=body.get("rotate", True) is not False)
        return JSONResponse({"ok": result.ok, "status": result.status, "error": result.error})

    async def _admin_check_url(self, request: Request) -> Response:
        url = str_field(await read_json(request) or {}, "url") or self.callback_url
        if not url:
            return JSONResponse({"error": "no callback URL: give url or set callback_url"}, 400)
        result = await self.check_callback_url(url)
        return JSONResponse({"ok": result.ok, "status": result.status, "error": result.error})

    async def _admin_approve(self, request: Request) -> Response:
        return JSONResponse({"approved": self.approve_admin_requests()})

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse([
            {"corp_id": item.corp_id, "client_id": item.client_id, "scopes": sorted(item.scopes),
             "requested_by": item.requested_by, "approved": item.approved}
            for item in self.admin_requests
        ])

    async def _admin_revoke_grants(self, request: Request) -> Response:
        self.revoke_app_grants()
        return JSONResponse({"revoked": True})


# The simulated client's dingtalk.open.js. ES5 only: it runs in old webviews too. It defines what the
# real SDK defines (window.dd: env, ready, requestAuthCode, runtime.permission.requestAuthCode,
# biz.util.callComponent / openModal) with the same two calling styles (Promise and
# onSuccess/onFail), minting codes from the sandbox instead of the client.
_FAKE_JSSDK = r"""/* DingTalk sandbox JSSDK: a stand-in for dingtalk.open.js, for demos and tests. */
(function () {
  "use strict";
  var CODE_ENDPOINT = __CODE_ENDPOINT__;
  var AUTH_ENDPOINT = __AUTH_ENDPOINT__;
  var MODE = __MODE__;
  var ua = navigator.userAgent;
  var platform = "pc";
  if (MODE === "not_in_dingtalk") { platform = "notInDingTalk"; }
  else if (/iPhone|iPad|iPod|iOS/i.test(ua)) { platform = "ios"; }
  else if (/Android/i.test(ua)) { platform = "android"; }

  function post(url, payload) {
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload)
    }).then(function (response) { return response.json(); });
  }

  // Both calling styles of the real SDK: a Promise, and onSuccess/onFail callbacks.
  function settle(options, promise) {
    return promise.then(function (res) {
      if (options && typeof options.onSuccess === "function") { options.onSuccess(res); }
      return res;
    }, function (err) {
      if (options && typeof options.onFail === "function") { options.onFail(err); }
      throw err;
    });
  }

  function mint(api, payload, options) {
    payload.api = api;
    return settle(options, post(CODE_ENDPOINT, payload).then(function (res) {
      if (res.code) { return { code: res.code }; }
      throw res;
    }));
  }

  function parseQuery(query) {
    var out = {};
    var parts = query.split("&");
    for (var i = 0; i < parts.length; i += 1) {
      var pair = parts[i].split("=");
      out[pair[0]] = pair.slice(1).join("=");
    }
    return out;
  }

  function authorize(query) {
    var payload = parseQuery(query);
    return post(AUTH_ENDPOINT, payload).then(function (res) {
      if (res.consent_required) {
        payload.consent = window.confirm("Allow this app to access: " + res.scopes.join(", ") + "?");
        return post(AUTH_ENDPOINT, payload);
      }
      return res;
    });
  }

  var dd = {
    env: { platform: platform, platformSub: "", version: "7.8.1", appType: "WEB", language: "zh_CN" },
    ready: function (callback) {
      if (MODE !== "hang" && MODE !== "not_in_dingtalk") { setTimeout(callback, 0); }
    },
    error: function () {},
    config: function () {},
    runtime: {
      permission: {
        requestAuthCode: function (options) {
          return mint("runtime.permission.requestAuthCode", { corpId: options.corpId }, options);
        }
      }
    },
    biz: {
      util: {
        callComponent: function (options) {
          var page = options.params.page;
          return settle(options, authorize(page.slice(page.indexOf("?") + 1)).then(function (res) {
            return { detail: { extraData: res } };
          }));
        },
        openModal: function (options) {
          var url = options.url;
          return settle(options, authorize(url.slice(url.indexOf("?") + 1)).then(function (res) {
            return JSON.stringify(res);
          }));
        }
      }
    }
  };
  if (MODE !== "old_sdk") {
    dd.requestAuthCode = function (options) {
      return mint("requestAuthCode", { corpId: options.corpId, clientId: options.clientId }, options);
    };
  }
  window.dd = dd;
})();
"""
