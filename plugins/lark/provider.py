"""The Lark / Feishu provider: in-client code (``tt.requestAccess``) or browser OAuth, then v2 tokens.

One plugin serves both brands. Feishu (China) and Lark (international) are the same product on
different hosts, and an app registered on one brand only works on that brand's hosts (the old
endpoints even answer 20046 "brand inconsistency"), so ``brand`` is a setting and never a guess.

The flow, as ``docs/providers/lark.md`` describes it (with the public sources):

1. Inside the client, ``bridge.js`` asks ``tt.requestAccess`` (or the older ``tt.requestAuthCode``)
   for a one-time code. Outside it, the browser goes to ``accounts…/open-apis/authen/v1/authorize``
   with PKCE and comes back with ``?code=…&state=…``.
2. ``redeem`` exchanges the code at the token endpoint (v2 on the open host by default; the v3
   endpoint on the accounts host when ``token_url`` says so) and asks ``authen/v1/user_info`` who
   the user is.
3. ``refresh`` rotates the tokens: each refresh token works once, so the core serialises refreshes.

Every failure goes through ``_ERRORS``, the one table that turns a Lark error code into the gateway
error that tells the core what to do (re-run the login, retry later, call an operator...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlencode

import httpx
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.errors import ProviderError, ProviderMisconfigured, ProviderUnavailable, ReauthRequired
from gateway.i18n import register as register_messages
from gateway.providers import (
    APP_SCOPE_MARK,
    PASS,
    ErrorRule,
    Flow,
    Grant,
    LoginContext,
    Provider,
    ProviderContext,
    ProviderSettings,
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

# The brands as their readers know them, on the pages (gateway/i18n.py).
register_messages({
    "name.Feishu": {"en": "Feishu", "zh-Hans": "飞书"},
    "name.Lark": {"en": "Lark", "zh-Hans": "Lark"},
})

Brand = Literal["feishu", "lark"]
UserIdField = Literal["open_id", "union_id", "user_id"]

AUTHORIZE_PATH = "/open-apis/authen/v1/authorize"
V2_TOKEN_PATH = "/open-apis/authen/v2/oauth/token"
V3_TOKEN_PATH = "/oauth/v3/token"
USER_INFO_PATH = "/open-apis/authen/v1/user_info"
TENANT_TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
#: A tenant token is cached until this long before it expires: with less than 30 min left, the
#: endpoint hands out a new one (and both stay valid), so the cache never serves the old one then.
TENANT_TOKEN_EARLY_S = 1800
#: Open API answers the relay reads (docs/relay.md): refresh-and-retry on a dead user token
#: (99991668, 99991677: what the official CLI and lark-oapi do) or tenant token (99991663);
#: consent on 99991679 (with ``error.permission_violations``); 99991400 is a rate limit.
_RELAY_EXPIRED = frozenset({99991663, 99991668, 99991677})
#: A success envelope as Lark writes it, ``{"code":0,...``: read without parsing the whole body
#: (a relayed answer can be tens of kilobytes of data; only ``code`` decides).
_RELAY_SUCCESS = re.compile(rb'\s*\{\s*"code"\s*:\s*0\s*[,}]')

# ``Lark/<version>`` is in the UA of both brands' clients on every platform; ``LarkLocale/`` is the
# UI language. A bare "lark" substring would also match unrelated browsers and crawlers.
_CLIENT_UA = re.compile(r"Lark/\d|LarkLocale/")

# The scope that puts ``user_id`` into user_info (open_id and union_id need none).
USER_ID_SCOPE = "contact:user.employee_id:readonly"


@dataclass(frozen=True)
class BrandDefaults:
    """The real hosts of one brand: what every URL setting falls back to."""

    display_name: str
    open_base_url: str
    accounts_base_url: str
    jssdk_url: str


BRANDS: dict[str, BrandDefaults] = {
    "feishu": BrandDefaults(
        display_name="Feishu",
        open_base_url="https://open.feishu.cn",
        accounts_base_url="https://accounts.feishu.cn",
        jssdk_url="https://lf-scm-cn.feishucdn.com/lark/op/h5-js-sdk-1.5.44.js",
    ),
    "lark": BrandDefaults(
        display_name="Lark",
        open_base_url="https://open.larksuite.com",
        accounts_base_url="https://accounts.larksuite.com",
        jssdk_url="https://lf-package-sg.larksuitecdn.com/obj/lark-static-sgsaas/lark/op/h5-js-sdk-1.5.44.js",
    ),
}


class LarkSettings(ProviderSettings):
    """``providers.<name>`` for ``plugin: lark``.

    Every URL left out (or ``null``) is the real one of ``brand``; set them to point the plugin at
    the sandbox or a proxy. ``jssdk_url: ""`` means the page already has ``h5sdk``/``tt``.
    ``token_url`` defaults to the v2 endpoint on the open host; the v3 endpoint
    (``{accounts_base_url}/oauth/v3/token``, the one the official SDKs call) works the same way.
    """

    app_id: str = Field(min_length=1)
    app_secret: SecretStr
    brand: Brand = "feishu"
    # offline_access is what makes Lark issue a refresh token at all.
    scopes: list[str] = Field(default_factory=lambda: ["offline_access"], max_length=50)
    user_id_field: UserIdField = "open_id"
    # Declared without defaults on purpose: ``_brand_defaults`` always fills them before field
    # validation, so after validation they are plain strings (the base declares jssdk_url a str).
    # token_url "" stands for "the v2 endpoint of open_base_url", filled in after validation.
    open_base_url: str
    accounts_base_url: str
    jssdk_url: str
    token_url: str

    @model_validator(mode="before")
    @classmethod
    def _brand_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        values = dict(data)
        # An unknown brand is reported by the Literal check; fall back so it is the only error.
        brand = BRANDS.get(str(values.get("brand") or "feishu"), BRANDS["feishu"])
        for key in ("open_base_url", "accounts_base_url", "jssdk_url"):
            if values.get(key) is None:  # absent or null; "" is a real value for jssdk_url
                values[key] = getattr(brand, key)
        if values.get("token_url") is None:
            values["token_url"] = ""  # derived from open_base_url once that one is validated
        return values

    @model_validator(mode="after")
    def _default_token_url(self) -> LarkSettings:
        if not self.token_url:
            self.token_url = self.open_base_url + V2_TOKEN_PATH
        return self

    _base_urls = base_url_validator("open_base_url", "accounts_base_url", example="https://open.feishu.cn")
    _other_urls = optional_url_validator("token_url", "jssdk_url", example="https://open.feishu.cn")

    @field_validator("scopes")
    @classmethod
    def _scope_keys(cls, scopes: list[str]) -> list[str]:
        for scope in scopes:
            if not scope or any(char.isspace() for char in scope):
                raise ValueError(f"{scope!r} is not a scope key (no spaces; e.g. offline_access)")
        return list(dict.fromkeys(scopes))  # keep the order, drop duplicates (20067 otherwise)


# -- error classification ---------------------------------------------------------------------


# ``{p}`` in a rule's message is the brand name.

_BUG = "{p} rejected the gateway's request as malformed; this is a bug, please report it."
_SECRET = (
    "{p} rejected the app credentials: check app_id and app_secret against the app's "
    "Credentials & Basic Info page in the developer console (and that brand matches the app)."
)
_TOKEN_DEAD = "{p} no longer accepts this user access token; a new login is needed."
_REFRESH_DEAD = "{p} no longer accepts the refresh token; a new login is needed."
_INACTIVE = "{p} says this account is not active (left the organisation, frozen or not activated)."

#: Every Lark error code the login flow can meet (token endpoints §5.4 and §7, user_info §9,
#: generic OpenAPI codes §10, app tokens §8). Codes absent here go through ``_unknown_rule``.
_ERRORS: dict[int, ErrorRule] = {
    # Authorization codes: the login starts again and mints a new one.
    20003: reauth("The {p} login code is invalid or was already used; please sign in again.", "code_invalid"),
    20004: reauth("The {p} login code has expired; please sign in again.", "code_expired"),
    20065: reauth("The {p} login code was already used; please sign in again.", "code_used"),
    20049: reauth("The {p} login could not be verified (PKCE check failed); please sign in again."),
    20007: reauth("{p} could not issue a token for this code (reused code or old refresh token)."),
    # Refresh tokens: dead for good (rotation: a used one is revoked at once; 365-day cap).
    20026: reauth(_REFRESH_DEAD),
    20037: reauth("The {p} refresh token has expired; a new login is needed."),
    20038: reauth(_REFRESH_DEAD),
    20064: reauth("{p} revoked the refresh token (each one works once); a new login is needed."),
    20073: reauth("The {p} refresh token was already used (a lost rotation race); a new login is needed."),
    99991669: reauth(_REFRESH_DEAD),
    # User access tokens: right after an exchange these mean the grant is unusable; log in again.
    20005: reauth(_TOKEN_DEAD),
    20006: reauth(_TOKEN_DEAD),
    20039: reauth(_TOKEN_DEAD),
    99991661: reauth(_TOKEN_DEAD),
    99991663: reauth(_TOKEN_DEAD),
    99991668: reauth(_TOKEN_DEAD),
    99991671: reauth(_TOKEN_DEAD),
    99991677: reauth("The {p} user access token has expired; a new login is needed."),
    99991681: reauth(_TOKEN_DEAD),
    99991692: reauth(_TOKEN_DEAD),
    99991679: reauth("The user has not granted a scope this app needs{scopes}; a new login asks for it."),
    # Transient: keep every token and try again later.
    20050: transient("{p} had an internal error; please try again."),
    20072: transient("{p} is temporarily unavailable; please try again."),
    99991400: transient("{p} rate-limited the gateway; please try again shortly.", "rate_limited"),
    99991403: transient("The app has used up its monthly {p} API quota.", "rate_limited"),
    # The user (or their organisation) may not use this app.
    20008: denied("{p} says this user does not exist.", "user_inactive"),
    20021: denied(_INACTIVE, "user_inactive"),
    20022: denied(_INACTIVE, "user_inactive"),
    20023: denied(_INACTIVE, "user_inactive"),
    20066: denied(_INACTIVE, "user_inactive"),
    20009: denied("This app is not installed in your {p} organisation; ask its administrator.", "user_not_allowed"),
    20010: denied(
        "You are not in this app's availability scope; ask the administrator to add you "
        "(developer console: Version Management & Release → Availability).",
        "user_not_allowed",
    ),
    21000: denied("Your organisation's {p} access-control policy blocks this sign-in.", "user_not_allowed"),
    21001: denied("Your organisation's {p} access-control policy blocks this sign-in.", "user_not_allowed"),
    # Our configuration: only an operator can fix these, in the developer console or the config.
    20002: misconfigured(_SECRET),
    20025: misconfigured(_SECRET),
    20035: misconfigured(_SECRET),
    10015: misconfigured(_SECRET),
    99991543: misconfigured(_SECRET),
    20028: misconfigured("{p} does not know this app_id; check app_id (and brand) in the gateway config."),
    20048: misconfigured("{p} says the app does not exist; check app_id (and brand) in the gateway config."),
    20024: misconfigured(
        "The code or refresh token belongs to another {p} app than app_id: the JSSDK/authorize page "
        "and the token exchange must use the same app (check app_id)."
    ),
    20046: misconfigured("The app belongs to the other brand: set brand (feishu or lark) to the app's brand."),
    20027: misconfigured(
        "A requested scope is not enabled for the app: enable every entry of scopes under "
        "Permissions & Scopes in the developer console, then release a version."
    ),
    20029: misconfigured(
        "The redirect URL is not registered: add the gateway callback URL under Security Settings "
        "→ Redirect URLs in the developer console."
    ),
    20071: misconfigured(
        "redirect_uri differs from the one used on the authorize page: public_url and path_prefix "
        "must not change during a login."
    ),
    20074: misconfigured(
        "The app may not refresh user tokens: turn on Security Settings → Refresh user_access_token "
        "in the developer console, then release a version."
    ),
    20069: misconfigured("The app is not enabled; enable it in the {p} developer console / admin console."),
    20042: misconfigured("The app is disabled; enable it in the {p} developer console / admin console."),
    99991662: misconfigured("The app is disabled; enable it in the {p} developer console / admin console."),
    99991673: misconfigured("The app is not available (not installed or not enabled) in this {p} organisation."),
    10014: misconfigured("{p} says the app is not authorized; check that it is installed and enabled."),
    99991401: misconfigured("{p} refused the gateway's IP address: check the app's IP allowlist."),
    99991672: misconfigured(
        "The app has not enabled a scope it needs{scopes}: enable it under Permissions & Scopes in "
        "the developer console, then release a version."
    ),
    99991676: misconfigured("The token lacks a permission the API needs; check the app's enabled scopes."),
    20013: misconfigured("{p} rejected the tenant access token the gateway sent."),
    20014: misconfigured("{p} rejected the app access token the gateway sent."),
    99991664: misconfigured("{p} rejected the app access token the gateway sent."),
    99991665: misconfigured("{p} rejected the tenant access token the gateway sent."),
    # Requests the gateway should never build: surface them loudly as configuration/bug errors.
    10003: misconfigured(_BUG),
    20001: misconfigured(_BUG),
    20036: misconfigured(_BUG),
    20063: misconfigured(_BUG),
    20067: misconfigured(_BUG),
    20068: misconfigured(_BUG),
    20070: misconfigured(_BUG),
}

#: RFC 6749 ``error`` names, for answers whose numeric code is missing or unknown (the v3 endpoint's
#: error table is not documented).
_OAUTH_ERRORS: dict[str, ErrorRule] = {
    "invalid_grant": reauth("{p} no longer accepts this grant; a new login is needed."),
    "invalid_client": misconfigured(_SECRET),
    "unauthorized_client": misconfigured("{p} does not allow this app to use this grant; check the console."),
    "invalid_scope": misconfigured(_BUG),
    "invalid_request": misconfigured(_BUG),
    "unsupported_grant_type": misconfigured(_BUG),
    "access_denied": denied("{p} denied the sign-in.", "access_denied"),
    "server_error": transient("{p} had an internal error; please try again."),
    "temporarily_unavailable": transient("{p} is temporarily unavailable; please try again."),
}

Operation = Literal["code exchange", "refresh", "user info", "tenant token"]

_SCOPE_KEY = re.compile(r"[A-Za-z0-9_.:\-]+")


def _unknown_rule(operation: Operation) -> ErrorRule:
    """An error code nobody documented. A refresh that fails that way is treated as dead (what the
    official CLI does); anything else is reported as is, without ending anything."""
    if operation == "refresh":
        return reauth("{p} refused to refresh the token; a new login is needed.")
    return ErrorRule(ProviderError, "{p} answered the " + operation + " with an unexpected error.", "provider_error")


def _scopes_named(body: Mapping[str, Any]) -> str:
    """The scope keys a 99991672/99991679 answer names, as " (a, b)", or ""."""
    found: list[str] = []
    error = body.get("error")
    if isinstance(error, Mapping):
        for violation in error.get("permission_violations") or []:
            if isinstance(violation, Mapping) and isinstance(violation.get("subject"), str):
                found.append(violation["subject"])
    msg = body.get("msg")
    if not found and isinstance(msg, str) and (bracket := re.search(r"\[([^\]]*)\]", msg)):
        found = [part.strip() for part in bracket.group(1).split(",")]
    # Only what looks like a scope key reaches the message; nothing else from the answer does.
    keys = [key for key in found if _SCOPE_KEY.fullmatch(key)]
    return f" ({', '.join(dict.fromkeys(keys))})" if keys else ""


def _retry_after(headers: httpx.Headers) -> int:
    try:
        return max(1, int(float(headers.get("x-ogw-ratelimit-reset", "5"))))
    except ValueError:
        return 5


def _build(
    rule: ErrorRule, *, brand: str, provider_code: int | str | None, body: Mapping[str, Any], headers: httpx.Headers
) -> ProviderError:
    message = rule.message.format(p=brand, scopes=_scopes_named(body))
    log_id = headers.get("x-tt-logid")
    if provider_code is not None:
        message += f" ({brand} error {provider_code}{', log_id ' + log_id if log_id else ''})"
    retry_after_s = _retry_after(headers) if provider_code == 99991400 else None
    return rule.error(message, provider_code, retry_after_s=retry_after_s)


def classify_answer(
    response: httpx.Response, *, brand: str, operation: Operation
) -> tuple[dict[str, Any], ProviderError | None]:
    """Read one Lark answer: its JSON body, and the error it stands for (None on success).

    HTTP 5xx and bodies that are not a JSON object are transient whatever they say; 429 is a rate
    limit. Otherwise the decision rests on ``code`` (the statuses of Lark's errors are not
    reliable), then on the OAuth ``error`` name when the code is missing or unknown.
    """
    body = json_object(response)
    if body is None:
        body = {}
        if response.status_code < 500:
            return body, ProviderUnavailable(
                f"{brand} answered the {operation} with something that is not JSON "
                f"(HTTP {response.status_code}).",
                provider_code=response.status_code,
            )
    code = as_int(body.get("code"))  # Lark sends 0 and, reportedly, "0"
    oauth_error = str_field(body, "error") or None
    if response.status_code < 400 and code in (0, None) and oauth_error is None:
        return body, None
    provider_code: int | str | None = code if code not in (0, None) else (oauth_error or response.status_code)
    if response.status_code >= 500:
        rule = _ERRORS.get(code or 0)
        if rule is None or rule.kind is not ProviderUnavailable:
            rule = transient("{p} failed to answer the " + operation + "; please try again.")
    elif response.status_code == 429:
        rule = _ERRORS[99991400]
        provider_code = code or 99991400
    else:
        rule = _ERRORS.get(code or 0) or _OAUTH_ERRORS.get(oauth_error or "") or _unknown_rule(operation)
    return body, _build(rule, brand=brand, provider_code=provider_code, body=body, headers=response.headers)


# -- the provider -----------------------------------------------------------------------------


class LarkProvider(Provider):
    """Feishu / Lark. See the module docstring for the flow."""

    settings_model = LarkSettings
    bridge_js = Path(__file__).with_name("bridge.js")
    uses_pkce = True

    settings: LarkSettings

    def __init__(self, settings: ProviderSettings, context: ProviderContext) -> None:
        if not isinstance(settings, LarkSettings):
            raise TypeError("LarkProvider needs LarkSettings")
        super().__init__(settings, context)
        self.display_name = BRANDS[settings.brand].display_name

    # -- the browser side ---------------------------------------------------------------------

    def detect_client(self, user_agent: str) -> bool:
        return bool(_CLIENT_UA.search(user_agent))

    def _scopes(self, login: LoginContext) -> list[str]:
        """The configured scopes, plus what an incremental consent asks for (``/consent``). Not
        an administrator's grant (``app:``-marked, ``grant=app``): a tenant token's scopes are
        enabled in the developer console (99991672), no user can grant them."""
        extra = [scope for scope in login.extra_scopes if not scope.startswith(APP_SCOPE_MARK)]
        return list(dict.fromkeys([*self.settings.scopes, *extra]))

    def bridge_config(self, login: LoginContext) -> dict[str, Any]:
        # requestAccess shows the user only the scopes not granted yet; [] would grant just the
        # identity, and no refresh token without offline_access.
        return {"appId": self.settings.app_id, "scopeList": self._scopes(login), "state": login.state}

    def authorize_url(self, login: LoginContext) -> str:
        params = {
            "client_id": self.settings.app_id,
            "response_type": "code",
            "redirect_uri": login.redirect_uri,
        }
        if scopes := self._scopes(login):
            params["scope"] = " ".join(scopes)
        params["state"] = login.state
        if login.code_challenge:
            # Lark's default method is "plain": name S256 explicitly.
            params["code_challenge"] = login.code_challenge
            params["code_challenge_method"] = "S256"
        return f"{self.settings.accounts_base_url}{AUTHORIZE_PATH}?{urlencode(params)}"

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
        body = self._client_body(grant_type="authorization_code", code=code)
        if flow == "browser":
            # The token endpoint compares it with the authorize-time value (20071). In-client codes
            # were never bound to a redirect_uri, and the official example sends none.
            body["redirect_uri"] = redirect_uri
            if code_verifier:
                body["code_verifier"] = code_verifier
        tokens = await self._token_call(body, "code exchange")
        identity = await self._identity(tokens.access_token)
        return Grant(tokens=tokens, identity=identity)

    async def refresh(self, tokens: TokenSet) -> TokenSet:
        if not tokens.refresh_token:
            raise ReauthRequired(
                f"{self.display_name} issued no refresh token (the user did not grant offline_access); "
                "a new login is needed."
            )
        body = self._client_body(grant_type="refresh_token", refresh_token=tokens.refresh_token)
        return await self._token_call(body, "refresh")

    # -- the relay (gateway/relay.py) ---------------------------------------------------------

    def relay_base_url(self, path: str) -> str | None:
        # Every Open API is on the open host under /open-apis/ (user and tenant tokens alike).
        return self.settings.open_base_url if path.startswith("open-apis/") else None

    def _tenant_token_key(self) -> str:
        return f"lark:{self.name}:tenant:{self.settings.app_id}"

    async def relay_app_token(self, tenant: str) -> str:
        """The internal app's tenant_access_token (``Authorization: Bearer`` like a user token),
        from the shared single-flight cache. Store apps (app_ticket) are not supported here."""
        cache = self.context.app_tokens
        if cache is None:
            raise ProviderMisconfigured("No app-token cache: the gateway core sets one.", code="relay_misconfigured")
        return await cache.get(self._tenant_token_key(), self._fetch_tenant_token, early_s=TENANT_TOKEN_EARLY_S)

    async def relay_app_token_rejected(self, tenant: str, token: str) -> None:
        cache = self.context.app_tokens
        # Forgotten only while it is still the cached one: another call may have replaced it already.
        if cache is not None and await cache.get(self._tenant_token_key(), self._fetch_tenant_token) == token:
            await cache.invalidate(self._tenant_token_key())

    async def _fetch_tenant_token(self) -> tuple[str, float]:
        now = self.context.clock()
        answer = await self._send(
            "POST", f"{self.settings.open_base_url}{TENANT_TOKEN_PATH}", "tenant token",
            json={"app_id": self.settings.app_id, "app_secret": self.settings.app_secret.get_secret_value()})
        token, expire = str_field(answer, "tenant_access_token"), as_int(answer.get("expire"))
        if not token or expire is None or expire <= 0:
            raise ProviderUnavailable(f"{self.display_name} answered the tenant token request without a token.")
        return token, now + expire

    def relay_verdict(self, status: int, headers: Mapping[str, str], body: bytes | None) -> RelayVerdict:
        """Lark decides on ``code`` (its HTTP statuses are not reliable: sheet "generic errors")."""
        if body is not None and status < 400 and _RELAY_SUCCESS.match(body):
            return PASS
        data = json_object(body)
        code = as_int(data.get("code")) if data is not None else None
        if code == 99991668 and "not support" in str_field(data or {}, "msg"):
            # "user access token not support": this API takes tenant tokens only. Not an expiry.
            return RelayVerdict("misconfigured", message=(
                f"This {self.display_name} API does not accept user tokens: set token: app on its relay route."))
        if code in _RELAY_EXPIRED:
            return RelayVerdict("expired")
        if code == 99991679 and data is not None:
            named = _scopes_named(data).strip(" ()")
            return RelayVerdict("consent", scopes=tuple(key.strip() for key in named.split(",") if key.strip()))
        if code == 99991400 or status == 429:
            return RelayVerdict("rate_limited", retry_after_s=retry_after_hint(headers, "x-ogw-ratelimit-reset"))
        if status >= 500 or code in (20050, 20072):
            return RelayVerdict("unavailable", message=f"{self.display_name} failed to answer; please try again.")
        return PASS

    # -- helpers ------------------------------------------------------------------------------

    def _client_body(self, **fields: str) -> dict[str, str]:
        # The client authenticates in the body only: adding HTTP Basic as well gives 20070.
        return {
            **fields,
            "client_id": self.settings.app_id,
            "client_secret": self.settings.app_secret.get_secret_value(),
        }

    async def _send(self, method: str, url: str, operation: Operation, **kwargs: Any) -> dict[str, Any]:
        response = await self.send(method, url, **kwargs)
        return unwrap(classify_answer(response, brand=self.display_name, operation=operation))

    async def _token_call(self, body: dict[str, str], operation: Operation) -> TokenSet:
        now = self.context.clock()
        answer = await self._send("POST", self.settings.token_url, operation, json=body)
        access_token = answer.get("access_token")
        expires_in = answer.get("expires_in")
        if not isinstance(access_token, str) or not access_token or not isinstance(expires_in, int | float):
            raise ProviderUnavailable(f"{self.display_name} answered the {operation} without a usable token.")
        refresh_token = str_field(answer, "refresh_token") or None  # absent without offline_access
        refresh_in = answer.get("refresh_token_expires_in")
        return TokenSet(
            access_token=access_token,
            expires_at=now + float(expires_in),
            refresh_token=refresh_token,
            refresh_expires_at=(
                now + float(refresh_in) if refresh_token and isinstance(refresh_in, int | float) else None
            ),
            issued_at=now,
            scope=str_field(answer, "scope"),
        )

    async def _identity(self, access_token: str) -> UserIdentity:
        answer = await self._send(
            "GET",
            f"{self.settings.open_base_url}{USER_INFO_PATH}",
            "user info",
            headers={"Authorization": f"Bearer {access_token}"},
        )
        data = answer.get("data")
        if not isinstance(data, Mapping):
            raise ProviderUnavailable(f"{self.display_name} answered user_info without user data.")
        field = self.settings.user_id_field
        user = data.get(field)
        if not isinstance(user, str) or not user:
            hint = (
                f"enable the {USER_ID_SCOPE} scope under Permissions & Scopes in the developer console "
                "and release a version"
                if field == "user_id"
                else "check user_id_field"
            )
            raise ProviderMisconfigured(
                f"{self.display_name} returned no {field} for the user: {hint} (or use user_id_field: open_id)."
            )
        ids = {key: str_field(data, key) for key in ("open_id", "union_id", "user_id")}
        return UserIdentity(
            user=user,
            tenant=str_field(data, "tenant_key"),
            name=str_field(data, "name"),
            extra={key: value for key, value in ids.items() if value},
        )


