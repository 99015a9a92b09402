"""The Tencent Meeting (腾讯会议 / WeMeet) provider: in-client auth code or browser OAuth, then tokens.

For third-party (OAuth 2.0) apps, as ``docs/providers/wemeet.md`` describes them (with the public sources):

1. Inside the client (User-Agent token ``app/tencent_wemeet``), ``bridge.js`` asks
   ``wemeet.permission.requestAgentAuthCode({sdkId})`` for an ``authCode``; when that is missing or
   fails it tries ``permission.authorize`` (client 3.16+), then ``permission.requestAuth`` (which
   navigates to the authorization page), then the plain authorization link. Outside the client
   the browser goes to ``{web_base_url}/marketplace/authorize.html?corp_id&sdk_id&redirect_uri&state``
   and comes back with ``?auth_code=…&state=…``.
2. ``redeem`` posts ``{sdk_id, secret, auth_code}`` (no ``grant_type``, no ``redirect_uri``) to
   ``{web_base_url}/wemeet-webapi/v2/oauth2/oauth/access_token``. The answer is the envelope
   ``{code, message, nonce, data}``; ``data.expires`` is an ABSOLUTE unix time. The user is
   ``open_id``, the tenant ``open_corp_id`` ("" for personal users). The display name comes from
   ``GET {api_base_url}/v1/users/info/basic`` when the granted scopes allow it; without them the
   name stays "" and the login goes on.
3. ``refresh`` posts ``{refresh_token, sdk_id, open_id}`` (no secret) to ``…/refresh_token``;
   ``open_id`` travels in ``TokenSet.extra``. Every exchange and every refresh kills the previous
   tokens of that user, which is why the core keeps one record per user and refreshes it
   single-flight.

Error bodies and codes of the ``wemeet-webapi`` endpoints are undocumented: the doc only says that
auth errors answer HTTP 400. So the decision rests on the HTTP status first (see
``classify_webapi``). The REST API's errors are documented (``{"error_info": {...}}``) and go
through ``_API_ERRORS``. No message ever contains a token, a code or the secret.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from pydantic import Field, SecretStr, field_validator

from gateway.errors import (
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.i18n import register as register_messages
from gateway.providers import (
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
    json_object,
    misconfigured,
    optional_url_validator,
    reauth,
    str_field,
    transient,
    unwrap,
)

log = logging.getLogger("gateway.providers.wemeet")

# Its name and the Chinese of its own error codes, on the pages (gateway/i18n.py).
register_messages({
    "name.Tencent Meeting": {"en": "Tencent Meeting", "zh-Hans": "腾讯会议"},
    "error.token_rejected": {
        "en": "Tencent Meeting rejected the access token; a new sign-in is needed.",
        "zh-Hans": "腾讯会议不再接受此访问令牌，需要重新登录。"},
    "error.admin_rejected": {
        "en": "Your organisation's Tencent Meeting administrator has not allowed this app.",
        "zh-Hans": "你所在组织的腾讯会议管理员没有允许此应用，因此无法登录。请联系管理员批准后再登录。"},
})

DISPLAY_NAME = "Tencent Meeting"

DEFAULT_WEB_BASE_URL = "https://meeting.tencent.com"
DEFAULT_API_BASE_URL = "https://api.meeting.qq.com"
DEFAULT_JSSDK_URL = "https://cdn.meeting.tencent.com/jssdk/wemeet-js-sdk-1.0.70.js"

AUTHORIZE_PATH = "/marketplace/authorize.html"
ACCESS_TOKEN_PATH = "/wemeet-webapi/v2/oauth2/oauth/access_token"
REFRESH_TOKEN_PATH = "/wemeet-webapi/v2/oauth2/oauth/refresh_token"
PROFILE_PATH = "/v1/users/info/basic"

#: The official ``isInWemeet`` check is exactly this substring test (case-sensitive).
CLIENT_UA_TOKEN = "app/tencent_wemeet"

#: Any one of these lets ``/v1/users/info/basic`` answer (sheet 3.1).
PROFILE_SCOPES = frozenset({"VIEW_USER_INFO", "MANAGE_USER_INFO", "VIEW_USER_BASIC_INFO"})

ACCESS_TOKEN_LIFETIME_S = 6 * 3600  # documented; only used when ``expires`` is missing
REFRESH_TOKEN_LIFETIME_S = 30 * 86400  # documented; renewed for 30 days by every refresh
_ABSOLUTE_TIME_FLOOR = 1_000_000_000  # 2001-09-09: anything smaller is not a unix time

#: ``status`` of the profile (a string): "2" 注销 (deregistered), "4" 禁用 (disabled).
_INACTIVE_STATUS = {"2": "deregistered", "4": "disabled"}


_ADMIN_REFUSED = (
    "Your organisation's Tencent Meeting administrator has not allowed this app, so you cannot sign in "
    "with it. Ask them to approve it, then sign in again."
)


class WeMeetSettings(ProviderSettings):
    """``providers.<name>`` for ``plugin: wemeet``.

    ``sdk_id`` is the OAuth app's 应用 ID, ``secret`` its 客户密钥, ``corp_id`` the enterprise ID of
    the company that owns the app (not the users' ``open_corp_id``). The URLs default to the real
    hosts; ``jssdk_url: ""`` means the page already has the ``wemeet`` global.
    """

    sdk_id: str = Field(min_length=1)
    secret: SecretStr
    corp_id: str = Field(min_length=1)
    web_base_url: str = DEFAULT_WEB_BASE_URL
    api_base_url: str = DEFAULT_API_BASE_URL
    jssdk_url: str = DEFAULT_JSSDK_URL

    @field_validator("sdk_id", "corp_id", mode="before")
    @classmethod
    def _numeric_ids_asstr_field(cls, value: Any) -> Any:
        # Both IDs are digits; an unquoted YAML number must not be an error.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value.strip() if isinstance(value, str) else value

    @field_validator("secret")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("must not be empty (the OAuth app's 客户密钥)")
        return value

    _base_urls = base_url_validator("web_base_url", "api_base_url", example="https://meeting.tencent.com")
    _jssdk_url = optional_url_validator("jssdk_url", example="https://meeting.tencent.com")


# -- error classification ---------------------------------------------------------------------

Operation = Literal["code exchange", "refresh", "profile"]

_CODE_REFUSED = (
    "Tencent Meeting refused the authorization code: it is invalid, already used or expired "
    "(a code works once, for 5 minutes). Please sign in again. If every sign-in ends here, check "
    "sdk_id and secret in the gateway config against the OAuth app in the Tencent Meeting console."
)
_REFRESH_REFUSED = (
    "Tencent Meeting no longer accepts the refresh token (it expired, a newer login or refresh "
    "replaced it, or the app's authorization was cancelled); a new login is needed."
)
_TOKEN_REJECTED = (
    "Tencent Meeting rejected the access token (190303: expired, replaced by a newer one, or a "
    "scope is missing)."
)


#: The REST API's documented codes (sheet 6.1). ``new_error_code`` values such as 100190303 or
#: 143001012 carry the old code in their last six digits.
_API_ERRORS: dict[int, ErrorRule] = {
    190303: reauth(_TOKEN_REJECTED, "token_rejected"),
    9042: reauth("Tencent Meeting refused the request (9042: permission denied or auth failure)."),
    1012: reauth("Tencent Meeting says the user has not authorized this app (1012); a new authorization is needed."),
    190300: misconfigured(
        "Tencent Meeting says the gateway's clock is more than 5 minutes off (190300): synchronise "
        "the server clock (NTP).",
    ),
    190301: transient("Tencent Meeting refused a repeated request nonce (190301); try again."),
    190004: misconfigured(
        "Tencent Meeting rejected the request parameters (190004); this is a bug, please report it.",
    ),
    200003: misconfigured(
        "Tencent Meeting asked for a request signature (200003), which OAuth apps do not send: "
        "check that the app is a third-party OAuth app, not a self-built (JWT) one.",
    ),
    190310: transient("Tencent Meeting rate-limited the gateway (190310).", "rate_limited", 60),
    190311: transient("Tencent Meeting's daily call limit is used up (190311).", "rate_limited", 3600),
    190313: transient("Tencent Meeting rate-limited the gateway (190313).", "rate_limited", 60),
}


def _trace(body: Mapping[str, Any] | None) -> str:
    """The envelope's ``nonce`` (Tencent's request trace id), when it looks like one."""
    nonce = body.get("nonce") if body else None
    return nonce if isinstance(nonce, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", nonce) else ""


def classify_webapi(response: httpx.Response, *, operation: Operation) -> tuple[dict[str, Any], ProviderError | None]:
    """Read a ``wemeet-webapi`` answer: the envelope's ``data`` and the error it stands for.

    The error codes and bodies are undocumented [?]; only "auth errors answer HTTP 400" is. So:
    5xx, 408 and 429 are transient; 404/405 and redirects mean ``web_base_url`` points at
    something else; any other 4xx, and a 2xx whose ``code`` is not 0, is a definitive refusal of
    the code or refresh token; a 2xx that is not a JSON envelope with ``data.access_token`` is
    transient.
    """
    status = response.status_code
    body = json_object(response)
    provider_code: int | str = status
    code = as_int(body.get("code")) if body else None
    if body and code not in (0, None):
        provider_code = code
    parts = [f"HTTP {status}"]
    if code not in (0, None):
        parts.append(f"code {code}")
    if trace := _trace(body):
        parts.append(f"nonce {trace}")
    detail = f" ({', '.join(parts)})"
    if status >= 500 or status in (408, 429):
        kind_code = "rate_limited" if status == 429 else None
        return {}, ProviderUnavailable(
            f"Tencent Meeting failed to answer the {operation}; please try again{detail}.",
            code=kind_code,
            provider_code=provider_code,
            retry_after_s=30 if status == 429 else 5,
        )
    if status in (404, 405) or 300 <= status < 400:
        return {}, ProviderMisconfigured(
            f"There is no Tencent Meeting OAuth endpoint at the configured web_base_url{detail}: "
            "check web_base_url (normally https://meeting.tencent.com).",
            provider_code=provider_code,
        )
    if status >= 400 or (body is not None and code not in (0, None)):
        if operation == "refresh":
            return {}, ReauthRequired(_REFRESH_REFUSED + detail, provider_code=provider_code)
        return {}, ReauthRequired(_CODE_REFUSED + detail, code="code_invalid", provider_code=provider_code)
    data = body.get("data") if body else None
    if not isinstance(data, dict) or not isinstance(data.get("access_token"), str) or not data["access_token"]:
        return {}, ProviderUnavailable(
            f"Tencent Meeting answered the {operation} without a usable token{detail}.", provider_code=provider_code
        )
    return data, None


def classify_api(response: httpx.Response) -> tuple[dict[str, Any], ProviderError | None]:
    """Read a REST API answer (``api.meeting.qq.com``): its JSON body and the error it stands for.

    Errors are HTTP 400/500 with ``{"error_info": {"error_code", "new_error_code", "message"}}``.
    """
    status = response.status_code
    body = json_object(response)
    info = body.get("error_info") if body else None
    if 200 <= status < 300 and body is not None and not isinstance(info, Mapping):
        return body, None
    code = new_code = None
    if isinstance(info, Mapping):
        code, new_code = as_int(info.get("error_code")), as_int(info.get("new_error_code"))
    rule = _API_ERRORS.get(code or 0) or (_API_ERRORS.get(new_code % 1_000_000) if new_code else None)
    provider_code: int = code or new_code or status
    shown = f" (HTTP {status}, error {provider_code})" if code or new_code else f" (HTTP {status})"
    if rule is not None and not (status >= 500 and rule.kind is not ProviderUnavailable):
        return {}, rule.error(rule.message + shown, provider_code)
    if status >= 500 or status == 429 or body is None:
        return {}, ProviderUnavailable(
            f"Tencent Meeting's API failed to answer; please try again{shown}.", provider_code=provider_code
        )
    return {}, ProviderError(
        f"Tencent Meeting's API answered with an unexpected error{shown}.", provider_code=provider_code
    )


def _string_list(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def new_nonce(now: float) -> str:
    """``X-TC-Nonce`` as the official SDK 1.0.10 makes it: ms timestamp x 10^6 + 6 random digits."""
    return str(int(now * 1000) * 1_000_000 + secrets.randbelow(1_000_000))


# -- the provider -----------------------------------------------------------------------------


class WeMeetProvider(Provider):
    """Tencent Meeting third-party OAuth apps. See the module docstring for the flow."""

    settings_model = WeMeetSettings
    bridge_js = Path(__file__).with_name("bridge.js")
    uses_pkce = False  # Tencent Meeting's OAuth has no PKCE
    display_name = DISPLAY_NAME

    settings: WeMeetSettings

    def __init__(self, settings: ProviderSettings, context: ProviderContext) -> None:
        if not isinstance(settings, WeMeetSettings):
            raise TypeError("WeMeetProvider needs WeMeetSettings")
        super().__init__(settings, context)

    # -- the browser side ---------------------------------------------------------------------

    def detect_client(self, user_agent: str) -> bool:
        return CLIENT_UA_TOKEN in user_agent

    def bridge_config(self, login: LoginContext) -> dict[str, Any]:
        # requestAuth (the navigating fallback) needs the same values as the authorization link.
        config: dict[str, Any] = {
            "sdkId": self.settings.sdk_id,
            "corpId": self.settings.corp_id,
            "redirectUri": login.redirect_uri,
            "state": login.state,
        }
        if login.extra_scopes:
            # An incremental consent (/consent): Tencent Meeting has no JSAPI that asks for more
            # scopes, and the silent agent code would hand back the same grant. The user authorizes
            # the app again on its authorization page (the scopes its console lists now).
            config["consent"] = True
        return config

    def authorize_url(self, login: LoginContext) -> str:
        params = {
            "corp_id": self.settings.corp_id,
            "sdk_id": self.settings.sdk_id,
            "redirect_uri": login.redirect_uri,  # urlencode() encodes it, as the doc requires
            "state": login.state,
        }
        return f"{self.settings.web_base_url}{AUTHORIZE_PATH}?{urlencode(params)}"

    def parse_callback(self, params: Mapping[str, str]) -> CallbackResult:
        """``?auth_code=…&state=…``. What Tencent Meeting sends on a refusal or while an enterprise
        administrator has not approved the app yet is undocumented [?]: an ``error`` parameter is
        passed on, and a redirect with neither ``auth_code`` nor ``error`` is read as "waiting for
        the administrator" (the first authorization of an enterprise account needs approval)."""
        state = params.get("state", "")
        code = params.get("auth_code") or None
        if code:
            return CallbackResult(state=state, code=code)
        error = params.get("error") or None
        if error == "unauthorized_client":
            # The enterprise administrator refused the app (how the real redirect says so is
            # undocumented; the emulator sends RFC 6749's unauthorized_client): not "you declined".
            raise LoginDenied(_ADMIN_REFUSED, code="admin_rejected")
        if error:
            return CallbackResult(state=state, error=error, error_description=params.get("error_description", ""))
        return CallbackResult(
            state=state,
            error="approval_pending",
            error_description=(
                "Your request to use this app is waiting for your organisation's Tencent Meeting "
                "administrator: the first authorization of an enterprise account needs their approval. "
                "Once they approve it, come back and sign in again. (Tencent Meeting returned without "
                "an authorization code.)"
            ),
        )

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
        # The same exchange for in-client and browser codes: no redirect_uri, no grant_type.
        body = {"sdk_id": self.settings.sdk_id, "secret": self.settings.secret.get_secret_value(), "auth_code": code}
        now = self.context.clock()
        data = await self._webapi(ACCESS_TOKEN_PATH, body, "code exchange")
        open_id = str_field(data, "open_id")
        if not open_id:
            raise ProviderUnavailable("Tencent Meeting answered the code exchange without an open_id.")
        tokens = self._tokens(data, now, open_id, previous_refresh=None)
        identity = await self._identity(data, tokens.access_token, open_id)
        return Grant(tokens=tokens, identity=identity)

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        open_id = tokens.extra.get("open_id", "")
        if not tokens.refresh_token or not open_id:
            raise ReauthRequired("The Tencent Meeting token record cannot be refreshed; a new login is needed.")
        body = {"refresh_token": tokens.refresh_token, "sdk_id": self.settings.sdk_id, "open_id": open_id}
        now = self.context.clock()
        data = await self._webapi(REFRESH_TOKEN_PATH, body, "refresh")
        answered = str_field(data, "open_id")
        if answered and answered != open_id:
            raise ReauthRequired("Tencent Meeting refreshed the tokens of another user; a new login is needed.")
        return self._tokens(data, now, open_id, previous_refresh=tokens.refresh_token)

    # -- the relay (gateway/relay.py) ---------------------------------------------------------

    #: The OAuth headers of a REST call (sheet 4.1) and the JWT-mode ones: a caller's never pass.
    relay_credential_headers = frozenset({"accesstoken", "openid", "x-tc-timestamp", "x-tc-nonce", "x-tc-key",
                                          "x-tc-signature", "x-tc-registered", "appid", "sdkid"})

    def _rest_headers(self, access_token: str, open_id: str) -> tuple[tuple[str, str], ...]:
        """The OAuth headers of one REST call, as the official SDK's OAuth2Authenticator sets them."""
        now = self.context.clock()
        return (
            # Exact case: the server reads these names case-sensitively (httpx sends them as given).
            ("Content-Type", "application/json"),
            ("AccessToken", access_token),
            ("OpenId", open_id),
            ("X-TC-Timestamp", str(int(now))),
            ("X-TC-Nonce", new_nonce(now)),
        )

    def relay_base_url(self, path: str) -> str | None:
        return self.settings.api_base_url if path.startswith("v1/") else None

    def relay_auth(self, path: str, token: str, *, kind: Literal["user", "app"], tokens: TokenSet | None) -> RelayAuth:
        # OAuth apps have no app token (sheet: "App-level tokens: none"): relay_app_token refuses.
        open_id = tokens.extra.get("open_id", "") if tokens is not None else ""
        return RelayAuth(headers=self._rest_headers(token, open_id))

    def relay_verdict(self, status: int, headers: Mapping[str, str], body: bytes | None) -> RelayVerdict:
        """Errors are HTTP 400/500 with ``{"error_info": {"error_code", ...}}`` (sheet 6.1)."""
        if status < 500 and (body is None or b'"error_info"' not in body):
            return PASS  # nothing to read: not parsed (answers can be tens of kilobytes)
        data = json_object(body)
        info = data.get("error_info") if data is not None else None
        code = as_int(info.get("error_code")) if isinstance(info, dict) else None
        if code == 190303:
            # Expired or rotated, or a scope missing: the same code. Refreshed once; a retry that
            # still gets 190303 is passed on (no incremental consent is documented for WeMeet).
            return RelayVerdict("expired")
        if code in (190310, 190311, 190313):
            return RelayVerdict("rate_limited", retry_after_s=60)
        if status >= 500:
            return RelayVerdict("unavailable", message="Tencent Meeting failed to answer; please try again.")
        return PASS

    # -- helpers ------------------------------------------------------------------------------

    async def _webapi(self, path: str, body: dict[str, str], operation: Operation) -> dict[str, Any]:
        response = await self.send("POST", f"{self.settings.web_base_url}{path}", json=body)
        return unwrap(classify_webapi(response, operation=operation))

    def _tokens(self, data: Mapping[str, Any], now: float, open_id: str, *, previous_refresh: str | None) -> TokenSet:
        # "Store what comes back" (sheet S2 rule); should a refresh ever answer without a refresh
        # token (whether it always returns a new value is unconfirmed [?]), the old one is kept.
        refresh_token = str_field(data, "refresh_token") or previous_refresh
        return TokenSet(
            access_token=data["access_token"],
            expires_at=self._expires_at(data.get("expires"), now),
            refresh_token=refresh_token,
            refresh_expires_at=now + REFRESH_TOKEN_LIFETIME_S if refresh_token else None,
            issued_at=now,
            scope=" ".join(_string_list(data.get("scopes"))),
            extra={"open_id": open_id},
        )

    @staticmethod
    def _expires_at(raw: Any, now: float) -> float:
        """``expires`` is the ABSOLUTE expiry (unix seconds), not a duration."""
        value = raw if isinstance(raw, int | float) and not isinstance(raw, bool) else as_int(raw)
        if value is None:
            log.warning("Tencent Meeting sent no usable 'expires'; assuming the documented 6 hours")
            return now + ACCESS_TOKEN_LIFETIME_S
        if value < _ABSOLUTE_TIME_FLOOR:
            # Not a unix time: read as a duration rather than as a token that expired in 1970.
            log.warning("Tencent Meeting's 'expires' looks like a duration; reading it as one")
            return now + float(value)
        return float(value)

    async def _identity(self, data: Mapping[str, Any], access_token: str, open_id: str) -> UserIdentity:
        corp_known = isinstance(data.get("open_corp_id"), str)
        tenant = str_field(data, "open_corp_id")
        scopes = set(_string_list(data.get("scopes")))
        # The profile API names its scopes in the v1 list. When that list is there and lacks
        # them, the call would only answer 190303. ``scopes`` is "to be deprecated", and how
        # ``scopes_v2`` maps onto the profile API is unknown: without the v1 list, try the call.
        if scopes and not scopes & PROFILE_SCOPES:
            return UserIdentity(user=open_id, tenant=tenant, extra={"open_id": open_id})
        profile = await self._profile(access_token, open_id)
        status = str_field(profile, "status")
        if status in _INACTIVE_STATUS:
            raise LoginDenied(
                f"Tencent Meeting says this account is {_INACTIVE_STATUS[status]}.", code="user_inactive",
                tenant=tenant or str_field(profile, "open_corp_id"), user=open_id,
            )
        if not corp_known:
            tenant = str_field(profile, "open_corp_id")  # older exchange answers have no open_corp_id
        return UserIdentity(user=open_id, tenant=tenant, name=str_field(profile, "username").strip(),
                            extra={"open_id": open_id})

    async def _profile(self, access_token: str, open_id: str) -> dict[str, Any]:
        """``/v1/users/info/basic``, best effort: a missing scope (190303) or a transient failure
        leaves the name empty; only errors an operator must fix (clock, signature, a malformed
        request) stop the login."""
        headers = dict(self._rest_headers(access_token, open_id))
        params = {"operator_id": open_id, "operator_id_type": "2"}
        try:
            response = await self.http.get(f"{self.settings.api_base_url}{PROFILE_PATH}", params=params,
                                           headers=headers)
        except httpx.HTTPError as exc:
            log.warning("Tencent Meeting profile unavailable (%s); the name stays empty", type(exc).__name__)
            return {}
        body, error = classify_api(response)
        if error is None:
            return body
        if isinstance(error, ProviderMisconfigured):
            raise error
        log.warning("Tencent Meeting profile not available (%s, %s); the name stays empty",
                    error.code, error.provider_code)
        return {}
