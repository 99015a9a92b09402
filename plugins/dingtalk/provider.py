"""The DingTalk (钉钉) provider: in-client free-login codes, the authorization component, browser OAuth.

It follows ``docs/providers/dingtalk.md`` (with the public sources), for both internal apps (企业内部应用,
``app_type: internal``, ``client_id`` = AppKey) and third-party enterprise apps (ISV,
``app_type: isv``, ``client_id`` = SuiteKey). The flows:

1. **In the client, free login** (the default): ``bridge.js`` asks ``dd.requestAuthCode({corpId,
   clientId})`` (or the old ``dd.runtime.permission.requestAuthCode({corpId})``) for a 5-minute,
   single-use code; ``redeem`` exchanges it at ``oapi /topapi/v2/user/getuserinfo`` with the app
   token of the user's organisation (``userid``, ``unionid``, ``name``). A used or expired code is
   40078: ``ReauthRequired`` with the plain ``reauth_required`` code, which makes the handshake page
   try once more and then show a clear page. This flow yields no user token: the record lives
   ``client_login_ttl_s`` and then the (silent) handshake runs again.
2. **In the client, the authorization component** (when ``scopes`` is set): ``openAuth`` type 0
   gives an ``authCode`` for ``/v1.0/oauth2/userAccessToken``; type 1 (``app_scopes``) asks an
   administrator to grant app permissions first. ``toAdmin`` ends on a "waiting for your
   administrator" page, ``cancel`` on a "declined" page (both decided in the bridge).
3. **Outside the client**: ``login.dingtalk.com/oauth2/auth`` (scope ``openid corpid``, ``prompt=
   consent``); the callback carries ``authCode`` (``code`` is accepted too) → ``userAccessToken`` →
   ``/v1.0/contact/users/me`` (a ``unionId``, never a userid) → the organisation's
   ``/topapi/user/getbyunionid``, so ``user_id_field: userid`` is the same id in every flow.

User tokens (flows 2 and 3) are refreshed at the same endpoint with ``grantType: refresh_token``;
whether DingTalk rotates refresh tokens is unconfirmed, so the newest one answered is always kept.

App tokens: internal apps ``POST /v1.0/oauth2/accessToken``; ISV apps ``POST
/v1.0/oauth2/corpAccessToken`` per authorizing organisation with the newest suiteTicket. Both go
through the core's ``AppTokenCache`` (cached until shortly before ``expireIn``, single flight,
shared through the store); a token DingTalk rejects is forgotten and fetched again once.

The suiteTicket reaches the gateway through DingTalk's encrypted HTTP event callback, served at
``<prefix>/providers/<name>/events`` (``crypto.py``: signature, AES-256-CBC, owner key, the
encrypted ``success`` reply). The newest ticket is kept in the store; ``suite_ticket`` seeds one.

Every DingTalk answer goes through ``classify_api`` (``api.dingtalk.com``: HTTP status and
``{code, message, requestid}``) or ``classify_oapi`` (``oapi.dingtalk.com``: HTTP 200 and
``errcode``/``sub_code``), the tables that turn DingTalk's errors into the gateway's.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.bodies import read_json
from gateway.errors import (
    GatewayError,
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.i18n import register as register_messages
from gateway.providers import (
    APP_SCOPE_MARK,
    PASS,
    CallbackResult,
    ErrorRule,
    Flow,
    Grant,
    LoginContext,
    Provider,
    ProviderContext,
    ProviderSettings,
    RelayAuth,
    RelayVerdict,
    TokenSet,
    UserIdentity,
    as_int,
    base_url_validator,
    denied,
    json_object,
    misconfigured,
    optional_url_validator,
    reauth,
    retry_after_hint,
    str_field,
    transient,
    unwrap,
)
from gateway.tokens import AppTokenCache
from plugins.dingtalk.crypto import CallbackCrypto, CallbackCryptoError, valid_aes_key, valid_token

log = logging.getLogger("gateway.providers.dingtalk")

# Its name and the Chinese of its own error codes, on the pages (gateway/i18n.py).
register_messages({
    "name.DingTalk": {"en": "DingTalk", "zh-Hans": "钉钉"},
    "error.corp_unknown": {
        "en": "DingTalk did not say which organisation you are in; open the app from the DingTalk workbench.",
        "zh-Hans": "钉钉没有告知你所在的组织：请从钉钉工作台打开此应用。"},
    "error.tenant_mismatch": {
        "en": "You chose another organisation at the DingTalk login; this app belongs to a different one.",
        "zh-Hans": "你在钉钉登录时选择了另一个组织，而此应用属于其他组织。请重新登录，并选择拥有此应用的组织。"},
    "error.user_not_member": {
        "en": "DingTalk says you are not a member of this organisation.",
        "zh-Hans": "钉钉显示你不是该组织的成员。"},
    "error.app_not_installed": {
        "en": "Your DingTalk organisation has not installed this app.",
        "zh-Hans": "你所在的钉钉组织尚未安装（授权）此应用，请联系组织管理员添加。"},
})

AppType = Literal["internal", "isv"]
UserIdField = Literal["userid", "unionid"]

DEFAULT_API_BASE_URL = "https://api.dingtalk.com"
DEFAULT_OAPI_BASE_URL = "https://oapi.dingtalk.com"
DEFAULT_LOGIN_BASE_URL = "https://login.dingtalk.com"
DEFAULT_JSSDK_URL = "https://g.alicdn.com/dingding/dingtalk-jsapi/3.1.0/dingtalk.open.js"

APP_TOKEN_PATH = "/v1.0/oauth2/accessToken"
CORP_TOKEN_PATH = "/v1.0/oauth2/corpAccessToken"
USER_TOKEN_PATH = "/v1.0/oauth2/userAccessToken"
USERS_ME_PATH = "/v1.0/contact/users/me"
GETUSERINFO_PATH = "/topapi/v2/user/getuserinfo"
GETBYUNIONID_PATH = "/topapi/user/getbyunionid"
AUTHORIZE_PATH = "/oauth2/auth"
EVENTS_PATH = "/events"

USER_TOKEN_HEADER = "x-acs-dingtalk-access-token"
REFRESH_TOKEN_TTL_S = 30 * 86400  # "有效期为 30 天" (sheet §6)
APP_TOKEN_EARLY_S = 300  # re-fetch app/corp tokens this long before expireIn (the doc: cache < 7200 s)
SUITE_TICKET_TTL_S = 365 * 86400  # "do not let it expire": kept until a newer push replaces it

# S1 (lib/env.js): the version is read from ``AliApp(DingTalk/x)``, ``DingTalk/x`` or the PC's
# ``DingTalk(x)``; ``dingtalk-win/`` is the Windows client. A bare "dingtalk" substring is not enough
# (an app's own name, a bot), so a version separator must follow.
_CLIENT_UA = re.compile(r"DingTalk[/(][0-9A-Za-z]|dingtalk-win/", re.IGNORECASE)
# 政务钉钉 / 专有钉钉 (S1: ``TaurusApp`` → the ``gdt*`` platforms) is a separate deployment with its
# own open platform: this plugin's codes cannot come from there.
_GOVERNMENT_UA = re.compile(r"TaurusApp", re.IGNORECASE)
_CORP_ID = re.compile(r"[A-Za-z0-9_\-]{1,64}")
# Permission codes such as ``Contact.User.Read``; openAuth puts them in a query it does not encode.
_SCOPE = re.compile(r"[A-Za-z0-9_.\-]+")


class DingTalkSettings(ProviderSettings):
    """``providers.<name>`` for ``plugin: dingtalk``.

    ``scopes`` are delegated permission codes (e.g. ``Contact.User.Read``): when set, the in-client
    login uses the authorization component (``openAuth`` type 0, a user token) instead of the
    free-login code, and the browser login asks for them too. ``app_scopes`` are app permission
    codes an administrator grants with ``openAuth`` type 1 (``.default``: every one the app applied
    for). ``jssdk_url: ""`` means the page already has ``window.dd``; ``null`` is the real CDN URL.
    """

    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    corp_id: str | None = None
    app_type: AppType = "internal"
    suite_ticket: SecretStr | None = None
    callback_token: SecretStr | None = None
    callback_aes_key: SecretStr | None = None
    user_id_field: UserIdField = "userid"
    api_base_url: str = DEFAULT_API_BASE_URL
    oapi_base_url: str = DEFAULT_OAPI_BASE_URL
    login_base_url: str = DEFAULT_LOGIN_BASE_URL
    jssdk_url: str = DEFAULT_JSSDK_URL
    scopes: list[str] = Field(default_factory=list, max_length=50)
    field_scopes: list[str] = Field(default_factory=list, max_length=50)
    app_scopes: list[str] = Field(default_factory=list, max_length=50)
    # The free-login flow has no user token; its record (and so the session's provider check)
    # lasts this long, then the silent handshake runs again. Default: a user token's 7200 s.
    client_login_ttl_s: int = Field(7200, ge=60, le=30 * 86400)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            values = dict(data)
            defaults = {
                "api_base_url": DEFAULT_API_BASE_URL,
                "oapi_base_url": DEFAULT_OAPI_BASE_URL,
                "login_base_url": DEFAULT_LOGIN_BASE_URL,
                "jssdk_url": DEFAULT_JSSDK_URL,
            }
            for key, default in defaults.items():
                if key in values and values[key] is None:
                    values[key] = default
            return values
        return data

    _base_urls = base_url_validator(
        "api_base_url", "oapi_base_url", "login_base_url", example="https://api.dingtalk.com"
    )
    _jssdk_url = optional_url_validator("jssdk_url", example="https://api.dingtalk.com")

    @field_validator("corp_id")
    @classmethod
    def _corp_id(cls, value: str | None) -> str | None:
        if value is not None and not _CORP_ID.fullmatch(value):
            raise ValueError("a corpId is letters, digits, '_' and '-' (e.g. ding1234abcd)")
        return value

    @field_validator("scopes", "field_scopes")
    @classmethod
    def _delegated_scopes(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if scope == ".default":
                raise ValueError("'.default' only works for app permissions: put it in app_scopes")
        return cls._scope_codes(scopes)

    @field_validator("app_scopes")
    @classmethod
    def _app_scopes(cls, scopes: list[str]) -> list[str]:
        return cls._scope_codes(scopes)

    @staticmethod
    def _scope_codes(scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not _SCOPE.fullmatch(scope):
                raise ValueError(f"{scope!r} is not a permission code (e.g. Contact.User.Read)")
        return list(dict.fromkeys(scopes))

    @field_validator("callback_token")
    @classmethod
    def _callback_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not valid_token(value.get_secret_value()):
            raise ValueError("the callback Token is 3 to 32 letters and digits (developer console)")
        return value

    @field_validator("callback_aes_key")
    @classmethod
    def _callback_aes_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not valid_aes_key(value.get_secret_value()):
            raise ValueError("the EncodingAESKey is exactly 43 letters and digits (developer console)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DingTalkSettings:
        if self.app_type == "internal" and not self.corp_id:
            raise ValueError("corp_id is required for app_type: internal (the organisation that owns the app)")
        if (self.callback_token is None) != (self.callback_aes_key is None):
            raise ValueError("set both callback_token and callback_aes_key (the event callback), or neither")
        if self.suite_ticket is not None and self.app_type != "isv":
            raise ValueError("suite_ticket is only used by app_type: isv")
        return self


# -- error classification ---------------------------------------------------------------------

# ``reauth`` rules here keep the plain "reauth_required" code on purpose: the handshake page
# retries exactly that once.

_BUG = "DingTalk rejected the gateway's request as malformed; this is a bug, please report it."
_SECRET = (
    "DingTalk rejected the app credentials: check client_id (AppKey / SuiteKey) and client_secret "
    "against the app's 凭证与基础信息 page in the developer console, and app_type."
)
_SUITE = (
    "DingTalk rejected the suite credentials: for app_type: isv, client_id is the SuiteKey and "
    "client_secret the SuiteSecret (developer console, 凭证与基础信息)."
)
_TICKET = (
    "DingTalk rejected the suiteTicket: the newest pushed ticket has not reached the gateway. Check "
    "the event callback URL (<path_prefix>/providers/<name>/events), callback_token and "
    "callback_aes_key in the developer console, then press 重新推送 (push again) there."
)
_NOT_INSTALLED = (
    "Your DingTalk organisation has not installed (authorized) this app; ask its administrator to add it."
)
_RATE = "DingTalk rate-limited the gateway; please try again shortly."
_APP_TOKEN_DEAD = "DingTalk no longer accepts the app access token."
_USER_TOKEN_DEAD = "DingTalk no longer accepts this user access token; a new login is needed."
_CODE_DEAD = "This DingTalk sign-in code was already used or has expired; please sign in again."
_NOT_DINGTALK = (
    "{url} answered like something other than DingTalk's API (wrong path); check api_base_url / oapi_base_url."
)

#: New-style answers (``api.dingtalk.com``), by ``code`` (sheet §9.1). Rate limits (every
#: ``Forbidden.AccessDenied.Qps*``/``Qpm*``) are matched by prefix in ``_api_rule``.
_API_ERRORS: dict[str, ErrorRule] = {
    "invalidClientIdOrSecret": misconfigured(_SECRET),
    "invalid.client": misconfigured(_SECRET),
    "invalidSuiteKey": misconfigured(_SUITE),
    "invalidSuiteTicket": misconfigured(_TICKET),
    "invalidAuthInfo": denied(_NOT_INSTALLED, "app_not_installed"),
    "unauthorized.client": misconfigured("DingTalk says the app is not authorized for this call; check the console."),
    "unsupported.grant.type": misconfigured(_BUG),
    "MissingBody": misconfigured(_BUG),
    "AuthenticationFailed.MissingParameter": misconfigured(_BUG),
    "InvalidAction.NotFound": misconfigured(_NOT_DINGTALK),
    "InvalidAuthentication": reauth(_USER_TOKEN_DEAD),
    "accesstoken.expired": reauth("The DingTalk user access token has expired; a new login is needed."),
    "invalidParameter.authCode.notFound": reauth(_CODE_DEAD),
    "Forbidden.AccessDenied.AccessTokenPermissionDenied": misconfigured(
        "The app lacks a DingTalk permission this sign-in needs: grant 个人信息读权限 (Contact.User.Read) "
        "under 权限管理 in the developer console, then publish the app again."
    ),
    "Forbidden.AccessDenied.IpNotInWhiteList": misconfigured(
        "DingTalk refused the gateway's IP address: add the gateway's egress IP to the app's "
        "服务器出口IP whitelist (developer console, 开发配置 › 安全设置)."
    ),
    "Forbidden.AccessDenied.ApiCountLimitForOrg": transient(
        "The organisation has used up its monthly DingTalk API quota.", "rate_limited", 3600
    ),
    "server.error": transient("DingTalk had an internal error; please try again."),
    "unknownError": transient("DingTalk had an internal error; please try again."),
}

#: Old-style answers (``oapi.dingtalk.com``), by ``errcode`` (sheet §9.2).
_OAPI_ERRORS: dict[int, ErrorRule] = {
    -1: transient("DingTalk is busy (系统繁忙); please try again."),
    15: transient("DingTalk did not answer in time; please try again."),
    22: misconfigured(_NOT_DINGTALK),
    40001: misconfigured(_SECRET),
    40014: transient(_APP_TOKEN_DEAD + " Please try again."),
    42001: transient(_APP_TOKEN_DEAD + " Please try again."),
    42009: transient(_APP_TOKEN_DEAD + " Please try again."),
    48003: transient(_APP_TOKEN_DEAD + " Please try again."),
    40078: reauth(_CODE_DEAD),
    40029: reauth(_CODE_DEAD),
    42003: reauth(_CODE_DEAD),
    42008: reauth(_CODE_DEAD),
    42002: reauth("The DingTalk refresh token has expired; a new login is needed."),
    40080: misconfigured(_SUITE),
    40082: misconfigured(_SUITE),
    40083: misconfigured(_SUITE),
    40088: misconfigured(_SUITE),
    40085: misconfigured(_TICKET),
    40089: misconfigured(_SECRET),
    40096: misconfigured(_SECRET),
    41001: misconfigured(_BUG),
    41023: misconfigured(_BUG),
    41027: misconfigured(_BUG),
    43007: denied(_NOT_INSTALLED, "app_not_installed"),
    48004: denied(_NOT_INSTALLED, "app_not_installed"),
    70003: denied(_NOT_INSTALLED, "app_not_installed"),
    50002: denied(
        "You are not in this app's visible range (可见范围); ask the organisation's administrator to add you.",
        "user_not_allowed",
    ),
    60011: misconfigured(
        "The app lacks the DingTalk API permission this sign-in needs: grant 通讯录 / 成员信息读权限 under "
        "权限管理 in the developer console (or use user_id_field: unionid)."
    ),
    60020: misconfigured(
        "DingTalk refused the gateway's IP address: add the gateway's egress IP to the app's "
        "服务器出口IP whitelist (developer console, 开发配置 › 安全设置)."
    ),
    # Not in the sheet's tables: getbyunionid's "找不到该用户", as DingTalk answers it (unconfirmed).
    60121: denied("DingTalk says you are not a member of this organisation.", "user_not_member"),
}
for _code in [*range(90001, 90015), 90018, 90019]:
    _OAPI_ERRORS[_code] = transient(_RATE, "rate_limited", 2)
_OAPI_ERRORS[90020] = transient("The organisation has used up its monthly DingTalk API quota.", "rate_limited", 3600)

#: Old-style codes (``errcode``, or ``sub_code`` under errcode 88) that mean "this app token is dead".
APP_TOKEN_REJECTED_OAPI = frozenset({40001, 40014, 42001, 42009, 48003})

Operation = Literal["app token", "corp token", "code exchange", "refresh", "user info", "user lookup"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _is_ip_block(body: Mapping[str, Any]) -> bool:
    """The per-IP block answer (sheet §10): ``{"status":1111,"wait":5,"source":"x5","punish":"deny"}``."""
    return body.get("punish") == "deny" or (body.get("source") == "x5" and "wait" in body)


def _ip_block_error(body: Mapping[str, Any]) -> ProviderUnavailable:
    wait = _number(body.get("wait"))
    minutes = wait if wait is not None and 0 < wait <= 60 else 5
    return ProviderUnavailable(
        "DingTalk blocked the gateway's IP address for making too many calls; it lifts the block by itself "
        f"(about {minutes:g} minutes).",
        code="rate_limited",
        provider_code="ip_block",
        retry_after_s=int(minutes * 60),
    )


def _read_answer(response: httpx.Response, operation: Operation) -> tuple[dict[str, Any], ProviderError | None]:
    """What both answer styles share: a body that is not a JSON object is transient, and so is
    the per-IP block; otherwise the body and no error yet."""
    body = json_object(response)
    if body is None:
        return {}, ProviderUnavailable(
            f"DingTalk answered the {operation} with something that is not JSON (HTTP {response.status_code}).",
            provider_code=response.status_code,
        )
    if _is_ip_block(body):
        return body, _ip_block_error(body)
    return body, None


def _build(rule: ErrorRule, provider_code: int | str, request_id: str, **fmt: str) -> ProviderError:
    message = rule.message.format(**fmt) if fmt else rule.message
    message += f" (DingTalk error {provider_code}{', requestid ' + request_id if request_id else ''})"
    return rule.error(message, provider_code)


def _api_rule(code: str, operation: Operation) -> ErrorRule:
    if code.startswith(("Forbidden.AccessDenied.Qps", "Forbidden.AccessDenied.Qpm")):
        return transient(_RATE, "rate_limited", 2)
    rule = _API_ERRORS.get(code)
    if rule is not None:
        return rule
    # The official pages list no error table for userAccessToken (sheet §9.1 [?]): an unknown
    # refusal of a code or a refresh token means that grant is unusable; a new login mints another.
    if operation == "code exchange":
        return reauth("DingTalk refused the sign-in code; please sign in again.")
    if operation == "refresh":
        return reauth("DingTalk refused to refresh the token; a new login is needed.")
    return ErrorRule(ProviderError, f"DingTalk answered the {operation} with an unexpected error.", "provider_error")


def classify_api(response: httpx.Response, *, operation: Operation) -> tuple[dict[str, Any], ProviderError | None]:
    """Read one ``api.dingtalk.com`` answer: its JSON body and the error it stands for (None: success).

    5xx (504 is the 3-second server budget) and bodies that are not a JSON object are transient;
    so are the IP block and every rate limit. Otherwise the decision rests on ``code`` (also
    ``Code``, as the official SDK reads it).
    """
    body, error = _read_answer(response, operation)
    if error is not None:
        return body, error
    if response.status_code < 400:
        return body, None
    code = str_field(body, "code") or str_field(body, "Code")
    request_id = str_field(body, "requestid") or str_field(body, "requestId") or str_field(body, "RequestId")
    provider_code: int | str = code or response.status_code
    if response.status_code >= 500:
        rule = _API_ERRORS.get(code)
        if rule is None or rule.kind is not ProviderUnavailable:
            rule = transient(f"DingTalk failed to answer the {operation}; please try again.")
    elif response.status_code == 429:
        rule = transient(_RATE, "rate_limited", 2)
    else:
        rule = _api_rule(code, operation)
    return body, _build(rule, provider_code, request_id, url="api_base_url")


#: oapi rate limits (sheet 9: 90001-90014 [C], 90018/90019 [3P]).
_RELAY_RATE_OAPI = frozenset({*range(90001, 90015), 90018, 90019})
#: The fields a relayed answer's verdict reads (oapi ``errcode``, api host ``code``/``Code``):
#: an answer under 400 with none of them anywhere passes without being parsed.
_RELAY_ERROR_KEYS = (b'"errcode"', b'"code"', b'"Code"')




def _required_scopes(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The permission codes a 403 AccessTokenPermissionDenied names, when it names any: its
    ``accessdenieddetail`` (the SDK reads that field; its ``requiredScopes`` /
    ``requiredPermissions`` keys are inferred, not documented), else none (the route's own)."""
    detail = body.get("accessdenieddetail")
    found: list[str] = []
    if isinstance(detail, Mapping):
        for key in ("requiredScopes", "requiredPermissions"):
            values = detail.get(key)
            if isinstance(values, list):
                found += [value for value in values if isinstance(value, str) and _SCOPE.fullmatch(value)]
    return tuple(dict.fromkeys(found))


def oapi_error_code(body: Mapping[str, Any]) -> int | None:
    """The effective old-style code: ``errcode``, or the numeric ``sub_code`` under errcode 88."""
    errcode = as_int(body.get("errcode"))
    if errcode == 88:
        sub = as_int(body.get("sub_code"))
        return sub if sub is not None else 88
    return errcode


def oapi_app_token_rejected(body: Mapping[str, Any]) -> bool:
    return oapi_error_code(body) in APP_TOKEN_REJECTED_OAPI


def classify_oapi(response: httpx.Response, *, operation: Operation) -> tuple[dict[str, Any], ProviderError | None]:
    """Read one ``oapi.dingtalk.com`` answer (HTTP 200 even on errors; ``errcode`` 0 is success).

    ``errcode 88`` is an authentication failure whose ``sub_code`` says which (e.g. ``"40014"``);
    an empty ``sub_code`` is the auth service timing out, so transient.
    """
    body, error = _read_answer(response, operation)
    if error is not None:
        return body, error
    errcode = as_int(body.get("errcode"))
    if response.status_code < 400 and errcode == 0:
        return body, None
    request_id = str_field(body, "request_id")
    if response.status_code >= 500 or response.status_code == 429:
        rule = (transient(_RATE, "rate_limited", 2) if response.status_code == 429
                else transient(f"DingTalk failed to answer the {operation}; please try again."))
        return body, _build(rule, errcode if errcode is not None else response.status_code, request_id)
    if errcode is None:
        rule = ErrorRule(ProviderError, f"DingTalk answered the {operation} without an errcode.", "provider_error")
        return body, _build(rule, response.status_code, request_id)
    provider_code: int | str = errcode
    if errcode == 88:
        sub_code = str_field(body, "sub_code") or str(body.get("sub_code") or "")
        if not sub_code:
            rule = transient("DingTalk's authentication service did not answer in time; please try again.")
            return body, _build(rule, 88, request_id)
        provider_code = f"88/{sub_code}"
        code = as_int(sub_code)
        found = _OAPI_ERRORS.get(code) if code is not None else None
    else:
        found = _OAPI_ERRORS.get(errcode)
    rule = found or ErrorRule(
        ProviderError, f"DingTalk answered the {operation} with an unexpected error.", "provider_error"
    )
    return body, _build(rule, provider_code, request_id, url="oapi_base_url")


# -- the provider -----------------------------------------------------------------------------


def corp_from_path(path: str) -> str | None:
    """The ``corpid`` query parameter of an app path (the homepage's ``$CORPID$`` placeholder)."""
    query = parse_qs(urlsplit(path).query)
    for key in ("corpid", "corpId"):
        for value in query.get(key, []):
            if _CORP_ID.fullmatch(value):
                return value
    return None


class DingTalkProvider(Provider):
    """DingTalk, internal or third-party app. See the module docstring for the flows."""

    settings_model = DingTalkSettings
    bridge_js = Path(__file__).with_name("bridge.js")
    display_name = "DingTalk"

    settings: DingTalkSettings

    def __init__(self, settings: ProviderSettings, context: ProviderContext) -> None:
        if not isinstance(settings, DingTalkSettings):
            raise TypeError("DingTalkProvider needs DingTalkSettings")
        super().__init__(settings, context)
        # The core sets app_tokens; a provider built by hand (tests, scripts) gets its own cache.
        self.app_tokens = context.app_tokens or AppTokenCache(context.store, clock=context.clock)
        self.crypto: CallbackCrypto | None = None
        if settings.callback_token is not None and settings.callback_aes_key is not None:
            self.crypto = CallbackCrypto(
                settings.callback_token.get_secret_value(),
                settings.callback_aes_key.get_secret_value(),
                owner_key=settings.client_id,  # suiteKey (ISV) or appKey (internal event subscription)
            )

    @property
    def is_isv(self) -> bool:
        return self.settings.app_type == "isv"

    # -- the browser side ---------------------------------------------------------------------

    def detect_client(self, user_agent: str) -> bool:
        return bool(_CLIENT_UA.search(user_agent)) and not _GOVERNMENT_UA.search(user_agent)

    def _page_corp(self, next_path: str) -> str:
        """The organisation to ask the client about: internal apps have one; ISV apps take the
        ``corpid`` the homepage URL carries (``$CORPID$``), else the configured default."""
        if self.is_isv:
            return corp_from_path(next_path) or self.settings.corp_id or ""
        return self.settings.corp_id or ""

    def _scopes(self, login: LoginContext) -> list[str]:
        """The delegated permissions to ask for: configured, plus an incremental consent's."""
        extra = [scope for scope in login.extra_scopes if not scope.startswith(APP_SCOPE_MARK)]
        return list(dict.fromkeys([*self.settings.scopes, *extra]))

    def _app_scopes(self, login: LoginContext) -> list[str]:
        """The app permissions an administrator grants (openAuth type 1), plus a consent's for an
        app-token route (``/consent?grant=app`` marks them ``app:``)."""
        extra = [scope[len(APP_SCOPE_MARK):] for scope in login.extra_scopes if scope.startswith(APP_SCOPE_MARK)]
        return list(dict.fromkeys([*self.settings.app_scopes, *extra]))

    def bridge_config(self, login: LoginContext) -> dict[str, Any]:
        config = {
            "clientId": self.settings.client_id,
            "corpId": self._page_corp(login.next_path),
            # ISV apps serve many organisations: the page's own ?corpid= (a homepage pointing at
            # the login page) wins over the one derived from ``next``.
            "corpIdFromPage": self.is_isv,
            "scopes": ",".join(self._scopes(login)),
            "fieldScopes": ",".join(self.settings.field_scopes),
            "appScopes": ",".join(self._app_scopes(login)),
        }
        if any(scope.startswith(APP_SCOPE_MARK) for scope in login.extra_scopes):
            # /consent?grant=app: the administrator's grant is what this sign-in is for, so it is
            # asked even when this browser remembers an earlier one (the provider just refused the
            # app token), and a failed one ends the page instead of signing in without it.
            config["appConsent"] = True
        return config

    def authorize_url(self, login: LoginContext) -> str:
        params = {
            "redirect_uri": login.redirect_uri,
            "response_type": "code",
            "client_id": self.settings.client_id,
            # corpid: userAccessToken then names the organisation the user picked.
            "scope": " ".join(["openid", "corpid", *self._scopes(login)]),
            "state": login.state,
            "prompt": "consent",
        }
        corp = self._page_corp(login.next_path)
        if corp:
            params["corpId"] = corp  # pre-selects the organisation (the user must belong to it)
        return f"{self.settings.login_base_url}{AUTHORIZE_PATH}?{urlencode(params, quote_via=quote)}"

    def parse_callback(self, params: Mapping[str, str]) -> CallbackResult:
        error = params.get("error") or None
        if error is not None:
            lowered = error.lower()
            # DingTalk's failure values are not documented beyond ``?error=xxx``.
            if "denied" in lowered or "cancel" in lowered or "reject" in lowered:
                error = "access_denied"
        return CallbackResult(
            state=params.get("state", ""),
            code=params.get("authCode") or params.get("code") or None,
            error=error,
            error_description=params.get("error_description", ""),
        )

    def routes(self) -> Sequence[BaseRoute]:
        if self.crypto is None:
            return ()
        return [Route(EVENTS_PATH, self._events, methods=["POST"])]

    # -- the server side ----------------------------------------------------------------------

    async def redeem(
        self,
        code: str,
        *,
        flow: Flow,
        redirect_uri: str,
        code_verifier: str | None = None,
        client_context: Mapping[str, str] | None = None,
    ) -> Grant:
        context = client_context or {}
        if flow == "browser":
            return await self._redeem_user_code(code, reported_corp=None)
        kind = context.get("kind", "auth_code")
        if kind == "open_auth":
            return await self._redeem_user_code(code, reported_corp=self._reported_corp(context))
        if kind != "auth_code":
            raise ProviderError("The handshake page sent an unknown kind of DingTalk code.", code="bad_request",
                                status_code=400)
        return await self._redeem_auth_code(code, self._client_corp(context))

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        if not tokens.refresh_token:
            # The free-login flow has no user token to refresh: the handshake (silent inside the
            # client) runs again.
            raise ReauthRequired("The DingTalk sign-in needs renewing; signing in again.")
        now = self.context.clock()
        answer = await self._api(
            "POST", USER_TOKEN_PATH, "refresh",
            json={
                "clientId": self.settings.client_id,
                "clientSecret": self.settings.client_secret.get_secret_value(),
                "refreshToken": tokens.refresh_token,
                "grantType": "refresh_token",
            },
        )
        fresh = self._user_tokens(answer, now, "refresh", previous=tokens)
        return replace(fresh, extra=dict(tokens.extra))

    # -- in-client free login -----------------------------------------------------------------

    def _reported_corp(self, context: Mapping[str, str]) -> str | None:
        reported = context.get("corpId") or ""
        if not reported:
            return None
        if not _CORP_ID.fullmatch(reported):
            raise ProviderError("The DingTalk client reported a malformed corpId.", code="bad_request",
                                status_code=400)
        return reported

    def _client_corp(self, context: Mapping[str, str]) -> str:
        """The organisation whose app token exchanges a free-login code."""
        if not self.is_isv:
            return self.settings.corp_id or ""  # validated: internal apps always have one
        corp = self._reported_corp(context) or self.settings.corp_id
        if not corp:
            raise ProviderError(
                "DingTalk did not say which organisation you are in: open the app from the DingTalk "
                "workbench (its homepage URL must carry ?corpid=$CORPID$).",
                code="corp_unknown", status_code=400,
            )
        return corp

    async def _redeem_auth_code(self, code: str, corp: str) -> Grant:
        now = self.context.clock()
        answer = await self._oapi_with_app_token(corp, GETUSERINFO_PATH, {"code": code}, "code exchange")
        result = answer.get("result")
        if not isinstance(result, Mapping):
            raise ProviderUnavailable("DingTalk answered the code exchange without a result.")
        userid, unionid = str_field(result, "userid"), str_field(result, "unionid")
        user = userid if self.settings.user_id_field == "userid" else unionid
        if not user:
            raise ProviderUnavailable(f"DingTalk answered the code exchange without a {self.settings.user_id_field}.")
        ids = {"corp_id": corp, "userid": userid, "unionid": unionid}
        tokens = TokenSet(
            access_token="",  # no user token in this flow (use ``scopes`` for one)
            expires_at=now + self.settings.client_login_ttl_s,
            issued_at=now,
            extra={**ids, "flow": "auth_code"},
        )
        identity = UserIdentity(user=user, tenant=corp, name=str_field(result, "name"),
                                extra={k: v for k, v in ids.items() if v and k != "corp_id"})
        return Grant(tokens=tokens, identity=identity)

    # -- user tokens: openAuth type 0 and browser OAuth ----------------------------------------

    async def _redeem_user_code(self, code: str, *, reported_corp: str | None) -> Grant:
        now = self.context.clock()
        answer = await self._api(
            "POST", USER_TOKEN_PATH, "code exchange",
            json={
                "clientId": self.settings.client_id,
                "clientSecret": self.settings.client_secret.get_secret_value(),
                "code": code,
                "grantType": "authorization_code",
            },
        )
        tokens = self._user_tokens(answer, now, "code exchange", previous=None)
        me = await self._api("GET", USERS_ME_PATH, "user info", headers={USER_TOKEN_HEADER: tokens.access_token})
        unionid = str_field(me, "unionId")
        if not unionid:
            raise ProviderUnavailable("DingTalk answered the user info without a unionId.")
        corp, verified = self._user_corp(str_field(answer, "corpId"), reported_corp)
        userid = ""
        # /users/me gives a unionId, never a userid: the organisation's own lookup gives it, and
        # proves membership when DingTalk did not name the organisation itself.
        if self.settings.user_id_field == "userid" or not verified:
            userid = await self._userid_for(corp, unionid)
        user = userid if self.settings.user_id_field == "userid" else unionid
        ids = {"corp_id": corp, "userid": userid, "unionid": unionid, "openid": str_field(me, "openId")}
        tokens = replace(tokens, extra={**{k: v for k, v in ids.items() if v}, "flow": "user_token"})
        identity = UserIdentity(user=user, tenant=corp, name=str_field(me, "nick"),
                                extra={k: v for k, v in ids.items() if v and k != "corp_id"})
        return Grant(tokens=tokens, identity=identity)

    def _user_corp(self, answered: str, reported: str | None) -> tuple[str, bool]:
        """The user's organisation and whether DingTalk itself named it."""
        if not self.is_isv:
            own = self.settings.corp_id or ""
            if answered and answered != own:
                raise LoginDenied(
                    "You chose another organisation at the DingTalk login; this app belongs to a different "
                    "one. Sign in again and choose the organisation that owns the app.",
                    code="tenant_mismatch",
                )
            return own, answered == own
        if answered:
            return answered, True
        corp = reported or self.settings.corp_id
        if not corp:
            raise ProviderError(
                "DingTalk did not say which organisation you signed in with; sign in again and choose one.",
                code="corp_unknown",
            )
        return corp, False

    async def _userid_for(self, corp: str, unionid: str) -> str:
        answer = await self._oapi_with_app_token(corp, GETBYUNIONID_PATH, {"unionid": unionid}, "user lookup")
        result = answer.get("result")
        if not isinstance(result, Mapping):
            raise ProviderUnavailable("DingTalk answered the user lookup without a result.")
        contact_type = as_int(result.get("contact_type"))
        if contact_type not in (None, 0):  # 1: an external contact of the organisation, not a member
            raise LoginDenied("DingTalk says you are not a member of this organisation.", code="user_not_member")
        userid = str_field(result, "userid")
        if not userid:
            raise ProviderUnavailable("DingTalk answered the user lookup without a userid.")
        return userid

    def _user_tokens(
        self, answer: Mapping[str, Any], now: float, operation: Operation, *, previous: TokenSet | None
    ) -> TokenSet:
        access_token = str_field(answer, "accessToken")
        expire_in = _number(answer.get("expireIn"))
        if not access_token or expire_in is None or expire_in <= 0:
            raise ProviderUnavailable(f"DingTalk answered the {operation} without a usable token.")
        # Whether a refresh rotates the refresh token is unconfirmed (sheet §11.1): keep the newest
        # one DingTalk answers, and the previous one when it answers none.
        refresh_token = str_field(answer, "refreshToken") or (previous.refresh_token if previous else None)
        if previous is not None and refresh_token == previous.refresh_token:
            refresh_expires_at = previous.refresh_expires_at
        else:
            refresh_expires_at = now + REFRESH_TOKEN_TTL_S if refresh_token else None
        return TokenSet(
            access_token=access_token,
            expires_at=now + expire_in,
            refresh_token=refresh_token or None,
            refresh_expires_at=refresh_expires_at,
            issued_at=now,
            extra=dict(previous.extra) if previous else {},
        )

    # -- app tokens ---------------------------------------------------------------------------

    def _app_token_key(self, corp: str) -> str:
        if self.is_isv:
            return f"dingtalk:{self.name}:corp:{self.settings.client_id}:{corp}"
        return f"dingtalk:{self.name}:app:{self.settings.client_id}"

    async def app_token(self, corp: str) -> str:
        """The app token for ``corp``: the internal app's own, or the ISV corp token of ``corp``."""
        fetch: Callable[[], Awaitable[tuple[str, float]]]
        if self.is_isv:
            async def fetch() -> tuple[str, float]:
                return await self._fetch_corp_token(corp)
        else:
            fetch = self._fetch_app_token
        return await self.app_tokens.get(self._app_token_key(corp), fetch, early_s=APP_TOKEN_EARLY_S)

    async def _fetch_app_token(self) -> tuple[str, float]:
        now = self.context.clock()
        answer = await self._api(
            "POST", APP_TOKEN_PATH, "app token",
            json={"appKey": self.settings.client_id, "appSecret": self.settings.client_secret.get_secret_value()},
        )
        return self._app_token_from(answer, now, "app token")

    async def _fetch_corp_token(self, corp: str) -> tuple[str, float]:
        ticket = await self.suite_ticket()
        if not ticket:
            raise ProviderMisconfigured(
                "No suiteTicket has reached the gateway yet: configure the event callback URL "
                "(<path_prefix>/providers/<name>/events) with callback_token and callback_aes_key and press "
                "重新推送 in the developer console, or set suite_ticket (any string works for custom apps)."
            )
        now = self.context.clock()
        answer = await self._api(
            "POST", CORP_TOKEN_PATH, "corp token",
            json={
                "suiteKey": self.settings.client_id,
                "suiteSecret": self.settings.client_secret.get_secret_value(),
                "authCorpId": corp,
                "suiteTicket": ticket,
            },
        )
        return self._app_token_from(answer, now, "corp token")

    @staticmethod
    def _app_token_from(answer: Mapping[str, Any], now: float, operation: Operation) -> tuple[str, float]:
        token = str_field(answer, "accessToken")
        expire_in = _number(answer.get("expireIn"))
        if not token or expire_in is None or expire_in <= 0:
            raise ProviderUnavailable(f"DingTalk answered the {operation} request without a usable token.")
        return token, now + expire_in

    # -- suiteTicket --------------------------------------------------------------------------

    def _ticket_key(self) -> str:
        return f"dingtalk:suite_ticket:{self.settings.client_id}"

    async def suite_ticket(self) -> str | None:
        """The newest pushed suiteTicket, else the seeded one."""
        data = await self.context.store.get(self._ticket_key())
        if data is not None:
            try:
                stored = json.loads(data)
            except ValueError:
                stored = None
            if isinstance(stored, dict) and isinstance(stored.get("ticket"), str) and stored["ticket"]:
                return str(stored["ticket"])
        seed = self.settings.suite_ticket
        return seed.get_secret_value() if seed is not None else None

    async def save_suite_ticket(self, ticket: str, pushed_at: float | None) -> bool:
        """Keep ``ticket`` unless a newer push is already stored (retries can arrive late).
        Compare-and-set, so two replicas receiving two pushes keep the newer one."""
        key = self._ticket_key()
        record = json.dumps({"ticket": ticket, "ts": pushed_at}).encode()
        for _ in range(5):
            current = await self.context.store.get_versioned(key)
            if current is not None:
                try:
                    stored_ts = _number(json.loads(current.value).get("ts"))
                except (ValueError, AttributeError):
                    stored_ts = None
                if stored_ts is not None and pushed_at is not None and pushed_at < stored_ts:
                    return False
            expected = current.version if current is not None else 0
            written = await self.context.store.set_versioned(key, record, SUITE_TICKET_TTL_S,
                                                             expected_version=expected)
            if written is not None:
                return True
        return False

    async def _events(self, request: Request) -> Response:
        """DingTalk's HTTP event callback: verify, decrypt, act, answer the encrypted ``success``."""
        crypto = self.crypto
        if crypto is None:  # pragma: no cover - the route exists only with a crypto
            return JSONResponse({"error": "not_found"}, status_code=404)
        query = request.query_params
        msg_signature = query.get("msg_signature") or query.get("signature") or ""
        timestamp = query.get("timestamp") or query.get("timeStamp") or ""
        nonce = query.get("nonce") or ""
        try:
            body = await read_json(request)  # unauthenticated until the signature is checked: bounded
        except GatewayError as exc:
            return JSONResponse({"error": exc.code, "message": exc.message}, status_code=exc.status_code)
        encrypt = body.get("encrypt") if isinstance(body, dict) else None
        if not isinstance(encrypt, str) or not encrypt:
            return JSONResponse({"error": "bad_request", "message": "The body must be JSON {\"encrypt\": ...}."},
                                status_code=400)
        try:
            event = crypto.open_json(msg_signature, timestamp, nonce, encrypt)
        except CallbackCryptoError as exc:
            log.warning("rejected a DingTalk callback: %s (%s)", exc.message, exc.code,
                        extra={"provider": self.name})
            return JSONResponse({"error": "callback_rejected", "message": exc.message, "errcode": exc.code},
                                status_code=403)
        event_type = str_field(event, "EventType")
        if event_type == "suite_ticket":
            suite_key = str_field(event, "SuiteKey")
            ticket = str_field(event, "SuiteTicket")
            if suite_key and suite_key != self.settings.client_id:
                return JSONResponse({"error": "callback_rejected", "message": "The event names another SuiteKey."},
                                    status_code=403)
            if not ticket:
                return JSONResponse({"error": "bad_request", "message": "The suite_ticket event has no ticket."},
                                    status_code=400)
            stored = await self.save_suite_ticket(ticket, _number(event.get("TimeStamp")))
            log.info("DingTalk suite_ticket %s", "stored" if stored else "ignored (an older push)",
                     extra={"provider": self.name})
        else:
            # check_url / check_create_suite_url / check_update_suite_url want the reply only;
            # tmp_auth_code and every other event are acknowledged so DingTalk stops re-pushing.
            log.info("DingTalk callback event %s acknowledged", event_type or "?", extra={"provider": self.name})
        return JSONResponse(crypto.encrypted_map("success", timestamp=timestamp or None))

    # -- the relay (gateway/relay.py) ---------------------------------------------------------

    relay_credential_headers = frozenset({"x-acs-dingtalk-access-token"})

    def relay_base_url(self, path: str) -> str | None:
        # New-style APIs are versioned paths on the api host; everything else (topapi/..., the
        # old user/department calls) is on oapi (sheet sections 4 and 5).
        if path.startswith(("v1.0/", "v2.0/")):
            return self.settings.api_base_url
        return self.settings.oapi_base_url

    def relay_auth(self, path: str, token: str, *, kind: Literal["user", "app"], tokens: TokenSet | None) -> RelayAuth:
        if path.startswith(("v1.0/", "v2.0/")):
            # The header only: ?access_token= and Authorization: Bearer are refused there (sheet 4).
            return RelayAuth(headers=(("x-acs-dingtalk-access-token", token),))
        if kind == "user":
            raise ProviderMisconfigured(
                "DingTalk's oapi host takes only the organisation's app token: set token: app on this relay route.",
                code="relay_misconfigured")
        return RelayAuth(params=(("access_token", token),))

    def _relay_corp(self, tenant: str) -> str:
        return tenant or self.settings.corp_id or ""

    async def relay_app_token(self, tenant: str) -> str:
        """The internal app's token, or the ISV corp token of the caller's organisation."""
        corp = self._relay_corp(tenant)
        if self.is_isv and not corp:
            raise ProviderMisconfigured("The caller's DingTalk organisation is unknown.", code="relay_misconfigured")
        return await self.app_token(corp)

    async def relay_app_token_rejected(self, tenant: str, token: str) -> None:
        corp = self._relay_corp(tenant)
        # Only while it is still the cached one (as _oapi_with_app_token: replicas must not
        # invalidate each other's fresh tokens).
        if await self.app_token(corp) == token:
            await self.app_tokens.invalidate(self._app_token_key(corp))

    def relay_verdict(self, status: int, headers: Mapping[str, str], body: bytes | None) -> RelayVerdict:
        if status < 400 and (body is None or not any(key in body for key in _RELAY_ERROR_KEYS)):
            return PASS  # no error field anywhere in it: not parsed (answers can be tens of kilobytes)
        data = json_object(body)
        if data is not None and "errcode" in data:  # oapi: HTTP 200 with errcode (sheet 5)
            oapi_code = oapi_error_code(data)
            if oapi_code in APP_TOKEN_REJECTED_OAPI:
                return RelayVerdict("expired")
            if oapi_code in _RELAY_RATE_OAPI:
                return RelayVerdict("rate_limited", retry_after_s=2)
            if oapi_code in (-1, 15) or (as_int(data.get("errcode")) == 88 and not str(data.get("sub_code") or "")):
                return RelayVerdict("unavailable", message="DingTalk is busy; please try again shortly.")
            return PASS
        code = (str_field(data, "code") or str_field(data, "Code")) if data is not None else ""
        if code in ("InvalidAuthentication", "accesstoken.expired"):
            return RelayVerdict("expired")
        if code == "Forbidden.AccessDenied.AccessTokenPermissionDenied":
            return RelayVerdict("consent", scopes=_required_scopes(data or {}))
        if status == 429 or code.startswith(("Forbidden.AccessDenied.Qps", "Forbidden.AccessDenied.Qpm")):
            return RelayVerdict("rate_limited", retry_after_s=retry_after_hint(headers, "retry-after") or 2)
        if status >= 500:
            return RelayVerdict("unavailable", message="DingTalk failed to answer; please try again.")
        return PASS

    # -- HTTP plumbing ------------------------------------------------------------------------

    async def _api(self, method: str, path: str, operation: Operation, **kwargs: Any) -> dict[str, Any]:
        response = await self.send(method, f"{self.settings.api_base_url}{path}", **kwargs)
        return unwrap(classify_api(response, operation=operation))

    async def _oapi_with_app_token(
        self, corp: str, path: str, payload: dict[str, str], operation: Operation
    ) -> dict[str, Any]:
        """An oapi call with the organisation's app token; a token DingTalk rejects is forgotten
        and fetched again, once (ISV re-fetches may invalidate older corp tokens). When the cache
        already holds another token (a concurrent request or replica replaced it), that one is
        used as is: forgetting it would make replicas invalidate each other's fresh tokens."""
        for attempt in (1, 2):
            token = await self.app_token(corp)
            response = await self.send("POST", f"{self.settings.oapi_base_url}{path}",
                                       params={"access_token": token}, json=payload)
            body, error = classify_oapi(response, operation=operation)
            if error is None:
                return body
            if attempt == 1 and oapi_app_token_rejected(body):
                if await self.app_token(corp) == token:
                    await self.app_tokens.invalidate(self._app_token_key(corp))
                continue
            raise error
        raise AssertionError("unreachable")  # pragma: no cover
