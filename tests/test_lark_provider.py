"""The Lark / Feishu provider plugin, against its emulator mounted in process.

The sandbox's two hosts are served by ``HostRoutingTransport`` (no sockets), except where a real
timeout is the point. Expected classifications come from the fact sheet
(``docs/providers/lark.md`` and the sources it lists), written out here rather than read from the
provider's table, so the test catches a wrong table entry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from gateway.errors import (
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.providers import Grant, LoginContext, ProviderContext, TokenSet
from gateway.sandbox import serve_apps
from gateway.stores.memory import MemoryStore
from plugins.lark.provider import LarkProvider, LarkSettings, classify_answer
from plugins.lark.sandbox import DEFAULT_USERS, SANDBOX_APP_SECRET, LarkSandbox
from tests.conftest import Clock

BASE_URLS = {"open": "http://open.lark.test", "accounts": "http://accounts.lark.test"}
REDIRECT_URI = "https://app.example.com/_gateway/callback/lark"
ZHANG = DEFAULT_USERS[0]  # 张三, first tenant
ALICE = DEFAULT_USERS[2]  # second tenant


@pytest.fixture
def sandbox() -> LarkSandbox:
    return LarkSandbox(clock=Clock())


@pytest.fixture
def sent() -> list[httpx.Request]:
    """Every request the provider sent, in order (to check what went over the wire)."""
    return []


@pytest.fixture
async def client(sandbox: LarkSandbox, sent: list[httpx.Request]) -> AsyncIterator[httpx.AsyncClient]:
    async def record(request: httpx.Request) -> None:
        sent.append(request)

    transport = sandbox.transport(BASE_URLS)
    async with httpx.AsyncClient(transport=transport, event_hooks={"request": [record]}) as http:
        yield http


def make_provider(sandbox: LarkSandbox, http: httpx.AsyncClient, **overrides: Any) -> LarkProvider:
    settings = LarkSettings(**{**sandbox.provider_settings(BASE_URLS), **overrides})
    context = ProviderContext(name="lark", redirect_uri=REDIRECT_URI, http=http, store=MemoryStore())
    return LarkProvider(settings, context)


@pytest.fixture
def provider(sandbox: LarkSandbox, client: httpx.AsyncClient) -> LarkProvider:
    return make_provider(sandbox, client)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def browser_code(provider: LarkProvider, http: httpx.AsyncClient, challenge: str | None) -> str:
    """Follow the provider's authorize URL on the sandbox (auto consent) and read the code."""
    login = LoginContext(state="st4te", redirect_uri=REDIRECT_URI, next_path="/", code_challenge=challenge)
    answer = await http.get(provider.authorize_url(login))
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["st4te"]
    return query["code"][0]


async def browser_login(provider: LarkProvider, http: httpx.AsyncClient) -> Grant:
    verifier, challenge = pkce_pair()
    code = await browser_code(provider, http, challenge)
    return await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI, code_verifier=verifier)


def assert_clean(error: ProviderError, *secrets_: str) -> None:
    """A message names no token or secret (a gateway rule for every error)."""
    for secret in (SANDBOX_APP_SECRET, *secrets_):
        assert secret not in error.message


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("brand", "open_url", "accounts_url", "jssdk", "name"),
    [
        (
            "feishu",
            "https://open.feishu.cn",
            "https://accounts.feishu.cn",
            "https://lf-scm-cn.feishucdn.com/lark/op/h5-js-sdk-1.5.44.js",
            "Feishu",
        ),
        (
            "lark",
            "https://open.larksuite.com",
            "https://accounts.larksuite.com",
            "https://lf-package-sg.larksuitecdn.com/obj/lark-static-sgsaas/lark/op/h5-js-sdk-1.5.44.js",
            "Lark",
        ),
    ],
)
def test_settings_default_to_the_brands_real_hosts(
    brand: str, open_url: str, accounts_url: str, jssdk: str, name: str, client: httpx.AsyncClient
) -> None:
    settings = LarkSettings(plugin="lark", app_id="cli_a", app_secret="s", brand=brand)
    assert settings.open_base_url == open_url
    assert settings.accounts_base_url == accounts_url
    assert settings.jssdk_url == jssdk
    assert settings.token_url == open_url + "/open-apis/authen/v2/oauth/token"
    assert settings.scopes == ["offline_access"]
    assert settings.user_id_field == "open_id"
    context = ProviderContext(name="x", redirect_uri=REDIRECT_URI, http=client, store=MemoryStore())
    assert LarkProvider(settings, context).display_name == name


def test_settings_keep_explicit_values() -> None:
    settings = LarkSettings(
        plugin="lark",
        app_id="cli_a",
        app_secret="very-secret-value",
        brand="lark",
        open_base_url="http://127.0.0.1:9001/",
        accounts_base_url="http://127.0.0.1:9002//",
        jssdk_url="",
        token_url="http://127.0.0.1:9002/oauth/v3/token",
    )
    assert settings.open_base_url == "http://127.0.0.1:9001"  # stored without the trailing slash
    assert settings.accounts_base_url == "http://127.0.0.1:9002"
    assert settings.jssdk_url == ""  # "" means the page already has h5sdk/tt: it must stay ""
    assert settings.token_url == "http://127.0.0.1:9002/oauth/v3/token"
    assert "very-secret-value" not in repr(settings)


def test_settings_null_urls_mean_the_brand_default_and_token_url_follows_open() -> None:
    settings = LarkSettings(
        plugin="lark", app_id="cli_a", app_secret="s", jssdk_url=None, open_base_url="http://open.local/"
    )
    assert settings.jssdk_url.startswith("https://lf-scm-cn.feishucdn.com/")
    assert settings.token_url == "http://open.local/open-apis/authen/v2/oauth/token"


@pytest.mark.parametrize(
    ("field", "value"),
    [("brand", "dingtalk"), ("user_id_field", "email"), ("open_base_url", "open.feishu.cn"), ("scopes", ["a b"])],
)
def test_settings_reject_bad_values_with_the_field_named(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        LarkSettings(plugin="lark", app_id="cli_a", app_secret="s", **{field: value})
    assert [error["loc"][0] for error in caught.value.errors()] == [field]


# -- the browser side -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_agent",
    [
        # The sheet's examples (section 3), both brands, every platform.
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Lark/7.12.7 "
        "Chrome/120.0.6099.71 Safari/537.36 LarkLocale/en_US ChannelName/Lark",
        "Mozilla/5.0 (Linux; Android 13; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 "
        "Chrome/103.0.5060.129 Mobile Safari/537.36 Lark/6.9.9 LarkLocale/zh_CN ChannelName/Feishu "
        "TTWebView/0881130046427",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/15E148 Safari/604.1 Lark/7.24.10 LarkLocale/en_US ChannelName/Feishu LKBrowserIdentifier/E5E0",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 "
        "Safari/537.36 Lark/7.63.7 LarkLocale/zh_CN ttnet SDK-Version/7.63.17",
        "Mozilla/5.0 AppleWebKit/537.36 Chrome/101.0.4951.53 Safari/537.36 Lark/6.7.5 LarkLocale/en_US ttnet",
        LarkSandbox.client_user_agent,
    ],
)
def test_detect_client_recognises_lark_and_feishu_clients(provider: LarkProvider, user_agent: str) -> None:
    assert provider.detect_client(user_agent)


@pytest.mark.parametrize(
    "user_agent",
    [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 Version/17.1 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 13) AppleWebKit/537.36 Chrome/116 Mobile Safari/537.36 DingTalk/7.0.40",
        "SkylarkCrawler/2.1 (+https://skylark.example)",  # a bare "lark" substring is not the client
        "Mozilla/5.0 (compatible; Larkbot/1.0)",
        "",
    ],
)
def test_detect_client_ignores_other_user_agents(provider: LarkProvider, user_agent: str) -> None:
    assert not provider.detect_client(user_agent)


def test_authorize_url_carries_every_oauth_parameter_and_pkce_s256(
    sandbox: LarkSandbox, client: httpx.AsyncClient
) -> None:
    provider = make_provider(sandbox, client, scopes=["offline_access", "contact:user.employee_id:readonly"])
    login = LoginContext(state="abcXYZ09", redirect_uri=REDIRECT_URI, next_path="/x", code_challenge="c" * 43)
    url = urlsplit(provider.authorize_url(login))
    assert f"{url.scheme}://{url.netloc}{url.path}" == BASE_URLS["accounts"] + "/open-apis/authen/v1/authorize"
    assert parse_qs(url.query) == {
        "client_id": [sandbox.app_id],
        "response_type": ["code"],
        "redirect_uri": [REDIRECT_URI],
        "scope": ["offline_access contact:user.employee_id:readonly"],
        "state": ["abcXYZ09"],
        "code_challenge": ["c" * 43],
        "code_challenge_method": ["S256"],
    }


def test_bridge_config_passes_app_id_scopes_and_state(provider: LarkProvider) -> None:
    login = LoginContext(state="s1", redirect_uri=REDIRECT_URI, next_path="/")
    expected = {"appId": "cli_sandbox0000001", "scopeList": ["offline_access"], "state": "s1"}
    assert provider.bridge_config(login) == expected
    assert provider.uses_pkce
    assert provider.bridge_js is not None and provider.bridge_js.is_file()


def test_parse_callback_reads_code_or_denial(provider: LarkProvider) -> None:
    assert provider.parse_callback({"code": "abc", "state": "s"}).code == "abc"
    denied = provider.parse_callback({"error": "access_denied", "state": "s"})
    assert (denied.code, denied.error, denied.state) == (None, "access_denied", "s")


# -- redeem -----------------------------------------------------------------------------------


async def test_browser_redeem_with_pkce_returns_tokens_and_identity(
    provider: LarkProvider, client: httpx.AsyncClient, sent: list[httpx.Request]
) -> None:
    grant = await browser_login(provider, client)
    assert grant.identity.user == ZHANG.open_id
    assert grant.identity.tenant == ZHANG.tenant_key
    assert grant.identity.name == "张三"
    tokens = grant.tokens
    assert tokens.refresh_token and tokens.access_token != tokens.refresh_token
    assert tokens.expires_at - tokens.issued_at == pytest.approx(7200)
    assert tokens.refresh_expires_at is not None
    assert tokens.refresh_expires_at - tokens.issued_at == pytest.approx(604800)
    assert "offline_access" in tokens.scope.split()
    token_call = json.loads(next(r for r in sent if r.url.path.endswith("/oauth/token")).content)
    assert token_call["grant_type"] == "authorization_code"
    assert token_call["redirect_uri"] == REDIRECT_URI
    assert token_call["code_verifier"] and token_call["client_secret"] == SANDBOX_APP_SECRET
    user_info = next(r for r in sent if r.url.path == "/open-apis/authen/v1/user_info")
    assert user_info.headers["authorization"] == f"Bearer {tokens.access_token}"


@pytest.mark.parametrize("api", ["requestAccess", "requestAuthCode"])
async def test_client_redeem_sends_no_redirect_uri(
    sandbox: LarkSandbox, provider: LarkProvider, sent: list[httpx.Request], api: str
) -> None:
    sandbox.set_current_user(ALICE.open_id)
    code = sandbox.mint_client_code(api)  # type: ignore[arg-type]
    grant = await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI)
    assert (grant.identity.user, grant.identity.tenant) == (ALICE.open_id, ALICE.tenant_key)
    body = json.loads(sent[0].content)
    assert body.keys() == {"grant_type", "client_id", "client_secret", "code"}
    # requestAuthCode grants no scope, so only requestAccess(offline_access) yields a refresh token.
    assert (grant.tokens.refresh_token is not None) == (api == "requestAccess")


@pytest.mark.parametrize(
    ("field", "expected"), [("open_id", ZHANG.open_id), ("union_id", ZHANG.union_id), ("user_id", ZHANG.user_id)]
)
async def test_identity_uses_the_configured_id_field(
    sandbox: LarkSandbox, client: httpx.AsyncClient, field: str, expected: str
) -> None:
    provider = make_provider(sandbox, client, user_id_field=field)
    grant = await provider.redeem(sandbox.mint_client_code(), flow="client", redirect_uri=REDIRECT_URI)
    assert grant.identity.user == expected
    assert grant.identity.extra["open_id"] == ZHANG.open_id


async def test_user_id_without_its_scope_is_a_configuration_error() -> None:
    sandbox = LarkSandbox(enabled_scopes=["offline_access"])
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http, user_id_field="user_id")
        with pytest.raises(ProviderMisconfigured) as caught:
            await provider.redeem(sandbox.mint_client_code(), flow="client", redirect_uri=REDIRECT_URI)
    assert "contact:user.employee_id:readonly" in caught.value.message


async def test_v3_token_endpoint_redeems_and_refreshes(sandbox: LarkSandbox, client: httpx.AsyncClient) -> None:
    provider = make_provider(sandbox, client, token_url=BASE_URLS["accounts"] + "/oauth/v3/token")
    grant = await browser_login(provider, client)
    rotated = await provider.refresh(grant.tokens)
    assert rotated.refresh_token not in (None, grant.tokens.refresh_token)
    assert (sandbox.stats["token_v3"], sandbox.stats["token"]) == (2, 0)


async def test_string_zero_code_is_success(client: httpx.AsyncClient) -> None:
    """Lark reportedly sends ``"code": "0"``; the answer must still count as a success."""

    def lark_brand_server(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/oauth/token"):
            return httpx.Response(200, json={"code": "0", "access_token": "u-1", "expires_in": 60, "scope": ""})
        return httpx.Response(200, json={"code": "0", "data": {"open_id": "ou_x", "tenant_key": "t", "name": "n"}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(lark_brand_server)) as http:
        provider = make_provider(LarkSandbox(), http, brand="lark")
        grant = await provider.redeem("c", flow="client", redirect_uri=REDIRECT_URI)
    assert (grant.identity.user, grant.tokens.access_token, grant.tokens.refresh_token) == ("ou_x", "u-1", None)


# -- refresh ----------------------------------------------------------------------------------


async def test_refresh_rotates_and_the_used_token_is_dead(
    sandbox: LarkSandbox, provider: LarkProvider, client: httpx.AsyncClient
) -> None:
    grant = await browser_login(provider, client)
    rotated = await provider.refresh(grant.tokens)
    assert rotated.access_token != grant.tokens.access_token
    assert rotated.refresh_token and rotated.refresh_token != grant.tokens.refresh_token
    again = await provider.refresh(rotated)  # the new one works once too
    assert again.refresh_token != rotated.refresh_token
    with pytest.raises(ReauthRequired) as caught:
        await provider.refresh(grant.tokens)
    assert caught.value.provider_code == 20064
    assert_clean(caught.value, grant.tokens.refresh_token or "", grant.tokens.access_token)
    assert sandbox.stats["refresh_token"] == 3


async def test_refresh_without_refresh_token_needs_reauth_without_a_call(
    sandbox: LarkSandbox, client: httpx.AsyncClient
) -> None:
    provider = make_provider(sandbox, client, scopes=[])  # no offline_access: no refresh token
    grant = await browser_login(provider, client)
    assert grant.tokens.refresh_token is None
    with pytest.raises(ReauthRequired):
        await provider.refresh(grant.tokens)
    assert sandbox.stats["refresh_token"] == 0


async def test_expired_refresh_token_needs_reauth(sandbox: LarkSandbox, provider: LarkProvider) -> None:
    grant = await provider.redeem(sandbox.mint_client_code(), flow="client", redirect_uri=REDIRECT_URI)
    sandbox.clock.now += 604800 + 1  # type: ignore[attr-defined]
    with pytest.raises(ReauthRequired) as caught:
        await provider.refresh(grant.tokens)
    assert caught.value.provider_code == 20037


# -- error classification, end to end through the sandbox -------------------------------------


async def redeem_client(sandbox: LarkSandbox, provider: LarkProvider) -> Grant:
    return await provider.redeem(sandbox.mint_client_code(), flow="client", redirect_uri=REDIRECT_URI)


async def refresh_once(sandbox: LarkSandbox, provider: LarkProvider) -> TokenSet:
    grant = await redeem_client(sandbox, provider)
    return await provider.refresh(grant.tokens)


@pytest.mark.parametrize(
    ("endpoint", "code", "action", "expected", "stable_code"),
    [
        ("token:authorization_code", 20002, redeem_client, ProviderMisconfigured, "provider_misconfigured"),
        ("token:authorization_code", 20003, redeem_client, ReauthRequired, "code_invalid"),
        ("token:authorization_code", 20004, redeem_client, ReauthRequired, "code_expired"),
        ("token:authorization_code", 20065, redeem_client, ReauthRequired, "code_used"),
        ("token:authorization_code", 20049, redeem_client, ReauthRequired, "reauth_required"),
        ("token:authorization_code", 20010, redeem_client, LoginDenied, "user_not_allowed"),
        ("token:authorization_code", 20066, redeem_client, LoginDenied, "user_inactive"),
        ("token:authorization_code", 20071, redeem_client, ProviderMisconfigured, "provider_misconfigured"),
        ("token:authorization_code", 20050, redeem_client, ProviderUnavailable, "provider_unavailable"),
        ("token:authorization_code", 20072, redeem_client, ProviderUnavailable, "provider_unavailable"),
        ("token:refresh_token", 20026, refresh_once, ReauthRequired, "reauth_required"),
        ("token:refresh_token", 20037, refresh_once, ReauthRequired, "reauth_required"),
        ("token:refresh_token", 20064, refresh_once, ReauthRequired, "reauth_required"),
        ("token:refresh_token", 20073, refresh_once, ReauthRequired, "reauth_required"),
        ("token:refresh_token", 20074, refresh_once, ProviderMisconfigured, "provider_misconfigured"),
        ("token:refresh_token", 20050, refresh_once, ProviderUnavailable, "provider_unavailable"),
        ("user_info", 20005, redeem_client, ReauthRequired, "reauth_required"),
        ("user_info", 99991668, redeem_client, ReauthRequired, "reauth_required"),
        ("user_info", 99991677, redeem_client, ReauthRequired, "reauth_required"),
        ("user_info", 20021, redeem_client, LoginDenied, "user_inactive"),
        ("user_info", 20050, redeem_client, ProviderUnavailable, "provider_unavailable"),
        ("user_info", 99991672, redeem_client, ProviderMisconfigured, "provider_misconfigured"),
    ],
)
async def test_sandbox_errors_map_to_gateway_errors(
    sandbox: LarkSandbox,
    provider: LarkProvider,
    endpoint: str,
    code: int,
    action: Callable[[LarkSandbox, LarkProvider], Any],
    expected: type[ProviderError],
    stable_code: str,
) -> None:
    sandbox.inject_fault(endpoint, code)
    with pytest.raises(ProviderError) as caught:
        await action(sandbox, provider)
    assert type(caught.value) is expected
    assert caught.value.code == stable_code
    assert caught.value.provider_code == code
    assert str(code) in caught.value.message
    assert_clean(caught.value)


async def test_rate_limit_waits_the_announced_reset(sandbox: LarkSandbox, provider: LarkProvider) -> None:
    sandbox.inject_fault("user_info", 99991400)  # HTTP 429, x-ogw-ratelimit-reset: 7
    with pytest.raises(ProviderUnavailable) as caught:
        await redeem_client(sandbox, provider)
    assert (caught.value.code, caught.value.retry_after_s) == ("rate_limited", 7)


async def test_missing_scope_is_named_in_the_message(sandbox: LarkSandbox, provider: LarkProvider) -> None:
    sandbox.inject_fault("user_info", 99991672)
    with pytest.raises(ProviderMisconfigured) as caught:
        await redeem_client(sandbox, provider)
    assert "contact:user.base:readonly" in caught.value.message


@pytest.mark.parametrize(("endpoint", "status"), [("token", 502), ("user_info", 504), ("token", 404)])
async def test_non_json_answers_are_transient(
    sandbox: LarkSandbox, provider: LarkProvider, endpoint: str, status: int
) -> None:
    sandbox.inject_fault(endpoint, status=status)  # an HTML page from a load balancer
    with pytest.raises(ProviderUnavailable):
        await redeem_client(sandbox, provider)


async def test_unreachable_provider_is_transient(sandbox: LarkSandbox, client: httpx.AsyncClient) -> None:
    provider = make_provider(sandbox, client, open_base_url="http://nowhere.lark.test")
    with pytest.raises(ProviderUnavailable) as caught:
        await redeem_client(sandbox, provider)
    assert caught.value.code == "provider_unreachable"


async def test_slow_provider_times_out_as_transient() -> None:
    sandbox = LarkSandbox(delay_s=1.0)
    async with serve_apps(sandbox.hosts()) as urls, httpx.AsyncClient(timeout=0.2) as http:
        settings = LarkSettings(**sandbox.provider_settings(urls))
        context = ProviderContext(name="lark", redirect_uri=REDIRECT_URI, http=http, store=MemoryStore())
        with pytest.raises(ProviderUnavailable) as caught:
            await redeem_client(sandbox, LarkProvider(settings, context))
    assert caught.value.code == "provider_timeout"


# -- error classification, every code of the sheet --------------------------------------------

# code -> what the sheet says to do, as a gateway error class.
SHEET: dict[int, type[ProviderError]] = {
    # 5.4 token endpoint
    20001: ProviderMisconfigured, 20002: ProviderMisconfigured, 20003: ReauthRequired, 20004: ReauthRequired,
    20008: LoginDenied, 20009: LoginDenied, 20010: LoginDenied, 20024: ProviderMisconfigured,
    20026: ReauthRequired, 20036: ProviderMisconfigured, 20037: ReauthRequired, 20048: ProviderMisconfigured,
    20049: ReauthRequired, 20050: ProviderUnavailable, 20063: ProviderMisconfigured, 20064: ReauthRequired,
    20065: ReauthRequired, 20066: LoginDenied, 20067: ProviderMisconfigured, 20068: ProviderMisconfigured,
    20069: ProviderMisconfigured, 20070: ProviderMisconfigured, 20071: ProviderMisconfigured,
    20072: ProviderUnavailable, 20073: ReauthRequired, 20074: ProviderMisconfigured,
    20027: ProviderMisconfigured, 20029: ProviderMisconfigured, 21000: LoginDenied, 21001: LoginDenied,
    # 9 user_info
    20005: ReauthRequired, 20021: LoginDenied, 20022: LoginDenied, 20023: LoginDenied,
    # 10 generic
    99991400: ProviderUnavailable, 99991401: ProviderMisconfigured, 99991403: ProviderUnavailable,
    99991543: ProviderMisconfigured, 99991661: ReauthRequired, 99991662: ProviderMisconfigured,
    99991663: ReauthRequired, 99991664: ProviderMisconfigured, 99991665: ProviderMisconfigured,
    99991668: ReauthRequired, 99991669: ReauthRequired, 99991671: ReauthRequired,
    99991672: ProviderMisconfigured, 99991673: ProviderMisconfigured, 99991676: ProviderMisconfigured,
    99991677: ReauthRequired, 99991679: ReauthRequired, 99991681: ReauthRequired, 99991692: ReauthRequired,
    20006: ReauthRequired, 20007: ReauthRequired, 20013: ProviderMisconfigured, 20014: ProviderMisconfigured,
    10003: ProviderMisconfigured, 10014: ProviderMisconfigured, 10015: ProviderMisconfigured,
    # 7 v1 leftovers
    20025: ProviderMisconfigured, 20028: ProviderMisconfigured, 20035: ProviderMisconfigured,
    20038: ReauthRequired, 20039: ReauthRequired, 20042: ProviderMisconfigured, 20046: ProviderMisconfigured,
}


@pytest.mark.parametrize(("code", "expected"), sorted(SHEET.items()))
@pytest.mark.parametrize("status", [200, 400])
def test_every_sheet_code_is_classified(code: int, expected: type[ProviderError], status: int) -> None:
    response = httpx.Response(status, json={"code": code, "msg": "whatever", "error": "x_y"})
    _, error = classify_answer(response, brand="Feishu", operation="code exchange")
    assert type(error) is expected
    assert error.provider_code == code and error.message


def test_99991679_names_the_missing_scopes_from_permission_violations() -> None:
    body = {
        "code": 99991679,
        "msg": "Unauthorized... required one of these privileges: [task:task:read]",
        "error": {"permission_violations": [{"subject": "task:task:read"}, {"subject": "task:task:write"}]},
    }
    _, error = classify_answer(httpx.Response(403, json=body), brand="Lark", operation="user info")
    assert isinstance(error, ReauthRequired)
    assert "task:task:read, task:task:write" in error.message


@pytest.mark.parametrize(
    ("operation", "expected"),
    [("refresh", ReauthRequired), ("code exchange", ProviderError), ("user info", ProviderError)],
)
def test_unknown_codes_end_a_refresh_but_nothing_else(operation: Any, expected: type[ProviderError]) -> None:
    _, error = classify_answer(httpx.Response(400, json={"code": 12345}), brand="Feishu", operation=operation)
    assert type(error) is expected and error.provider_code == 12345


@pytest.mark.parametrize(
    ("error_name", "expected"),
    [
        ("invalid_grant", ReauthRequired),
        ("invalid_client", ProviderMisconfigured),
        ("server_error", ProviderUnavailable),
    ],
)
def test_oauth_error_names_classify_answers_without_a_code(error_name: str, expected: type[ProviderError]) -> None:
    response = httpx.Response(400, json={"error": error_name, "error_description": "d"})
    _, error = classify_answer(response, brand="Feishu", operation="refresh")
    assert type(error) is expected and error.provider_code == error_name


def test_5xx_is_transient_whatever_the_code_says() -> None:
    _, error = classify_answer(httpx.Response(503, json={"code": 20064}), brand="Feishu", operation="refresh")
    assert isinstance(error, ProviderUnavailable)


def test_non_json_200_is_transient() -> None:
    response = httpx.Response(200, text="<html>maintenance</html>")
    _, error = classify_answer(response, brand="Feishu", operation="refresh")
    assert isinstance(error, ProviderUnavailable)


# -- bridge.js --------------------------------------------------------------------------------

BRIDGE = Path(__file__).resolve().parents[1] / "plugins" / "lark" / "bridge.js"


def test_bridge_is_es5() -> None:
    """Old in-client webviews parse ES5 only (plus Promise)."""
    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", BRIDGE.read_text(), flags=re.S)
    for pattern in (r"=>", r"\blet\s", r"\bconst\s", r"\basync\b", r"\bawait\b", r"\?\.", r"`", r"\bclass\s"):
        assert not re.search(pattern, source), pattern


# Each scenario fakes window.h5sdk / window.tt, runs requestCode and prints the outcome.
BRIDGE_HARNESS = r"""
var fs = require("fs");
var scenarios = {
  missing: function () {},
  access_ok: function (log) {
    window.h5sdk = { ready: function (cb) { setTimeout(cb, 0); }, error: function () {} };
    window.tt = { requestAccess: function (o) { log.push(o); o.success({ code: "ACCESS" }); },
                  requestAuthCode: function (o) { o.success({ code: "AUTHCODE" }); } };
  },
  access_103: function (log) {
    window.h5sdk = { ready: function (cb) { cb(); }, error: function () {} };
    window.tt = { requestAccess: function (o) { o.fail({ errno: 103, errString: "feature not support" }); },
                  requestAuthCode: function (o) { log.push(o); o.success({ code: "AUTHCODE" }); } };
  },
  access_refused: function () {
    window.h5sdk = { ready: function (cb) { cb(); }, error: function () {} };
    window.tt = { requestAccess: function (o) { o.fail({ errno: 2700002, errString: "terminated" }); },
                  requestAuthCode: function (o) { o.success({ code: "MUST-NOT-BE-USED" }); } };
  },
  old_sdk: function (log) {
    window.h5sdk = { ready: function (cb) { cb(); }, error: function () {} };
    window.tt = { requestAuthCode: function (o) { log.push(o); o.success({ code: "AUTHCODE" }); } };
  },
  authcode_10236: function () {
    window.h5sdk = { ready: function (cb) { cb(); }, error: function () {} };
    window.tt = { requestAuthCode: function (o) { o.fail({ errCode: 10236, errno: 104 }); } };
  },
  sdk_error: function () {
    window.h5sdk = { ready: function () {},
                     error: function (cb) { setTimeout(function () { cb({ errno: 105 }); }, 5); } };
    window.tt = {};
  },
  never_ready: function () {
    window.h5sdk = { ready: function () {}, error: function () {} };
    window.tt = { requestAccess: function () {} };
  },
  jsapi_hangs: function () {
    window.h5sdk = { ready: function (cb) { cb(); }, error: function () {} };
    window.tt = { requestAccess: function () {} };
  }
};
var tools = {
  withTimeout: function (promise, ms, what) {
    return Promise.race([promise, new Promise(function (resolve, reject) {
      setTimeout(function () { reject({ outcome: "fallback", message: what + " did not answer in time" }); }, ms);
    })]);
  }
};
var name = process.argv[2];
var log = [];
global.window = global;
scenarios[name](log);
eval(fs.readFileSync(process.argv[3], "utf8"));
window.gatewayBridges.lark.requestCode(
  { appId: "cli_a", scopeList: ["offline_access"], state: "S", timeout_ms: 50 }, tools
).then(function (result) {
  console.log(JSON.stringify({ resolved: result, calls: log }));
}, function (error) {
  console.log(JSON.stringify({ rejected: error, calls: log }));
});
"""


def run_bridge(tmp_path: Path, scenario: str) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "harness.js"
    harness.write_text(BRIDGE_HARNESS)
    done = subprocess.run([node, str(harness), scenario, str(BRIDGE)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_bridge_uses_request_access_with_the_config(tmp_path: Path) -> None:
    result = run_bridge(tmp_path, "access_ok")
    assert result["resolved"] == {"code": "ACCESS"}
    call = result["calls"][0]
    assert (call["appID"], call["scopeList"], call["state"]) == ("cli_a", ["offline_access"], "S")


@pytest.mark.parametrize("scenario", ["access_103", "old_sdk"])
def test_bridge_falls_back_to_request_auth_code_when_the_sheet_says_so(tmp_path: Path, scenario: str) -> None:
    result = run_bridge(tmp_path, scenario)
    assert result["resolved"] == {"code": "AUTHCODE"}
    assert result["calls"] == [{"appId": "cli_a"}]  # lower-case d, no scopes


@pytest.mark.parametrize(
    ("scenario", "words"),
    [
        ("missing", "no Feishu JSAPI"),
        ("access_refused", "2700002"),
        ("authcode_10236", "redirect-URL list"),
        ("sdk_error", "errno 105"),
        ("never_ready", "h5sdk.ready did not answer in time"),
        ("jsapi_hangs", "tt.requestAccess did not answer in time"),
    ],
)
def test_bridge_failures_fall_back_with_a_reason(tmp_path: Path, scenario: str, words: str) -> None:
    rejected = run_bridge(tmp_path, scenario)["rejected"]
    assert rejected["outcome"] == "fallback"
    assert words in rejected["message"]
