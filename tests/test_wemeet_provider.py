"""The Tencent Meeting (WeMeet) provider plugin, against its emulator mounted in process.

The sandbox's two hosts are served by ``HostRoutingTransport`` (no sockets) except where a real
socket is the point (timeouts, header case on the wire). Expectations come from the fact sheet
(``docs/providers/wemeet.md`` and its sources) and are written out here rather than read from the provider, so
a wrong table entry shows up.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from gateway.errors import (
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.providers import Grant, LoginContext, ProviderContext, TokenSet, load_plugin
from gateway.sandbox import available_sandboxes, serve_apps
from gateway.stores.memory import MemoryStore
from plugins.wemeet.provider import WeMeetProvider, WeMeetSettings, classify_api, classify_webapi
from plugins.wemeet.sandbox import DEFAULT_USERS, SANDBOX_SECRET, WeMeetSandbox
from tests.conftest import Clock

BASE_URLS = {"web": "http://meeting.wemeet.test", "api": "http://api.wemeet.test"}
REDIRECT_URI = "https://app.example.com/_gateway/callback/wemeet"
ZHANG, LI_SI, WANG, PAT, ZHAO = DEFAULT_USERS  # 张三 (authorized), Li Si, 王五 (pending), personal, no profile scope
SIX_HOURS, THIRTY_DAYS = 6 * 3600, 30 * 86400


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(clock: Clock) -> WeMeetSandbox:
    return WeMeetSandbox(clock=clock)


@pytest.fixture
def sent() -> list[httpx.Request]:
    """Every request the provider sent, in order."""
    return []


@pytest.fixture
async def client(sandbox: WeMeetSandbox, sent: list[httpx.Request]) -> AsyncIterator[httpx.AsyncClient]:
    async def record(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS), event_hooks={"request": [record]}) as http:
        yield http


def make_provider(
    sandbox: WeMeetSandbox, http: httpx.AsyncClient, *, clock: Callable[[], float] | None = None, **overrides: Any
) -> WeMeetProvider:
    settings = WeMeetSettings(**{**sandbox.provider_settings(BASE_URLS), **overrides})
    context = ProviderContext(name="wemeet", redirect_uri=REDIRECT_URI, http=http, store=MemoryStore(),
                              clock=clock or sandbox.clock)
    return WeMeetProvider(settings, context)


@pytest.fixture
def provider(sandbox: WeMeetSandbox, client: httpx.AsyncClient) -> WeMeetProvider:
    return make_provider(sandbox, client)


def login(state: str = "St4te") -> LoginContext:
    return LoginContext(state=state, redirect_uri=REDIRECT_URI, next_path="/")


async def browser_code(provider: WeMeetProvider, http: httpx.AsyncClient) -> str:
    """Follow the authorization link on the sandbox (auto consent) and read ``auth_code``."""
    answer = await http.get(provider.authorize_url(login()))
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["St4te"]
    return query["auth_code"][0]


async def redeem_client(sandbox: WeMeetSandbox, provider: WeMeetProvider, open_id: str | None = None) -> Grant:
    return await provider.redeem(sandbox.mint_client_code(open_id), flow="client", redirect_uri=REDIRECT_URI)


def bodies(sent: list[httpx.Request], path_end: str) -> list[dict[str, Any]]:
    return [json.loads(request.content) for request in sent if request.url.path.endswith(path_end)]


def assert_clean(error: ProviderError, *values: str) -> None:
    """A message names no token, code or secret (a gateway rule for every error)."""
    for value in (SANDBOX_SECRET, *values):
        assert value not in error.message


# -- settings and registration ------------------------------------------------------------------


def test_settings_default_to_the_real_hosts_and_mask_the_secret() -> None:
    settings = WeMeetSettings(plugin="wemeet", sdk_id="123456", secret="very-secret-value", corp_id="200000001")
    assert settings.web_base_url == "https://meeting.tencent.com"
    assert settings.api_base_url == "https://api.meeting.qq.com"
    assert settings.jssdk_url == "https://cdn.meeting.tencent.com/jssdk/wemeet-js-sdk-1.0.70.js"
    assert settings.client_timeout_s == 8.0
    assert isinstance(settings.secret, SecretStr)
    assert "very-secret-value" not in repr(settings) and "very-secret-value" not in str(settings.model_dump())


def test_settings_accept_numeric_ids_strip_slashes_and_keep_an_empty_jssdk_url() -> None:
    settings = WeMeetSettings(plugin="wemeet", sdk_id=123456, secret="s", corp_id=200000001,
                              web_base_url="http://127.0.0.1:9001/", api_base_url="http://127.0.0.1:9002//",
                              jssdk_url="")
    assert (settings.sdk_id, settings.corp_id) == ("123456", "200000001")
    assert settings.web_base_url == "http://127.0.0.1:9001"
    assert settings.api_base_url == "http://127.0.0.1:9002"
    assert settings.jssdk_url == ""  # "" = the page already has the wemeet global


@pytest.mark.parametrize(
    ("field", "value"),
    [("web_base_url", "meeting.tencent.com"), ("api_base_url", "ftp://api"), ("jssdk_url", "cdn/x.js"),
     ("secret", " "), ("sdk_id", ""), ("corp_id", ""), ("grant_type", "authorization_code")],
)
def test_settings_reject_bad_values_with_the_field_named(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        WeMeetSettings(**{"plugin": "wemeet", "sdk_id": "1", "secret": "s", "corp_id": "2", field: value})
    assert [error["loc"][0] for error in caught.value.errors()] == [field]


def test_corp_id_is_required() -> None:
    with pytest.raises(ValidationError) as caught:
        WeMeetSettings(plugin="wemeet", sdk_id="1", secret="s")  # type: ignore[call-arg]
    assert [error["loc"][0] for error in caught.value.errors()] == ["corp_id"]


def test_entry_points_name_the_plugin_and_its_sandbox() -> None:
    assert load_plugin("wemeet") is WeMeetProvider
    assert available_sandboxes()["wemeet"] is WeMeetSandbox


# -- the browser side ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_agent",
    [
        # The sheet's example (section 2.3), then the Windows client's Chrome 77 engine.
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) arch/x86_64 "
        "app/tencent_wemeet os_name/Mac os_version/10.15.7 app_version/2.19.0.5 c_district/0",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/77.0.3865.120 "
        "Safari/537.36 app/tencent_wemeet os_name/Windows os_version/10.0.19045 app_version/3.26.10.420 c_district/1",
        WeMeetSandbox.client_user_agent,
    ],
)
def test_detect_client_is_the_official_is_in_wemeet_check(provider: WeMeetProvider, user_agent: str) -> None:
    assert provider.detect_client(user_agent)


@pytest.mark.parametrize(
    "user_agent",
    [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        # Tokens that no source shows: never guessed.
        "Mozilla/5.0 TencentMeeting/3.26.0", "Mozilla/5.0 WeMeet/3.2", "Mozilla/5.0 wemeetapp/1.0",
        "Mozilla/5.0 APP/TENCENT_WEMEET",  # the official check is case-sensitive
        "Mozilla/5.0 Lark/7.12.7 LarkLocale/en_US",
        "",
    ],
)
def test_detect_client_ignores_other_user_agents(provider: WeMeetProvider, user_agent: str) -> None:
    assert not provider.detect_client(user_agent)


def test_authorize_url_is_the_marketplace_page_with_the_four_documented_parameters(
    provider: WeMeetProvider, sandbox: WeMeetSandbox
) -> None:
    url = provider.authorize_url(login("abcXYZ09"))
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == BASE_URLS["web"] + "/marketplace/authorize.html"
    assert [pair.split("=")[0] for pair in parts.query.split("&")] == ["corp_id", "sdk_id", "redirect_uri", "state"]
    assert parse_qs(parts.query) == {
        "corp_id": [sandbox.corp_id], "sdk_id": [sandbox.sdk_id], "redirect_uri": [REDIRECT_URI], "state": ["abcXYZ09"],
    }
    assert "redirect_uri=https%3A%2F%2Fapp.example.com%2F_gateway%2Fcallback%2Fwemeet" in parts.query  # urlEncoded


def test_bridge_config_and_class_attributes(provider: WeMeetProvider, sandbox: WeMeetSandbox) -> None:
    assert provider.bridge_config(login("s1")) == {
        "sdkId": sandbox.sdk_id, "corpId": sandbox.corp_id, "redirectUri": REDIRECT_URI, "state": "s1",
    }
    assert not provider.uses_pkce
    assert provider.display_name == "Tencent Meeting"
    assert provider.bridge_js is not None and provider.bridge_js.is_file()


def test_parse_callback_reads_auth_code_refusal_and_the_pending_redirect(provider: WeMeetProvider) -> None:
    result = provider.parse_callback({"auth_code": "abc", "state": "s"})
    assert (result.code, result.error, result.state) == ("abc", None, "s")
    denied = provider.parse_callback({"error": "access_denied", "state": "s"})
    assert (denied.code, denied.error) == (None, "access_denied")
    # No auth_code and no error: the sheet's reading of an enterprise's first authorization.
    for params in ({"state": "s"}, {"state": "s", "auth_code": ""}, {"state": "s", "code": "lark-style"}):
        pending = provider.parse_callback(params)
        assert (pending.code, pending.error, pending.state) == (None, "approval_pending", "s")
        assert "administrator" in pending.error_description


# -- redeem ---------------------------------------------------------------------------------------


async def test_browser_redeem_sends_exactly_the_documented_body_and_reads_an_absolute_expiry(
    provider: WeMeetProvider, client: httpx.AsyncClient, sandbox: WeMeetSandbox, clock: Clock,
    sent: list[httpx.Request],
) -> None:
    code = await browser_code(provider, client)
    grant = await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)
    assert grant.identity.user == ZHANG.open_id
    assert grant.identity.tenant == ZHANG.open_corp_id
    assert grant.identity.name == "张三"
    tokens = grant.tokens
    assert tokens.expires_at == int(clock.now + SIX_HOURS)  # ``expires`` is a unix time, not a duration
    assert tokens.issued_at == clock.now and tokens.lifetime_s == pytest.approx(SIX_HOURS)
    assert tokens.refresh_expires_at == clock.now + THIRTY_DAYS
    assert tokens.extra == {"open_id": ZHANG.open_id}
    assert tokens.scope.split() == ["VIEW_USER_INFO", "VIEW_VIDEO", "MANAGE_VIDEO"]
    exchange = next(r for r in sent if r.url.path == "/wemeet-webapi/v2/oauth2/oauth/access_token")
    assert exchange.method == "POST" and exchange.headers["content-type"] == "application/json"
    assert json.loads(exchange.content) == {"sdk_id": sandbox.sdk_id, "secret": SANDBOX_SECRET, "auth_code": code}


async def test_client_codes_use_the_same_exchange(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, sent: list[httpx.Request]
) -> None:
    code = sandbox.mint_client_code(LI_SI.open_id)
    grant = await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI, client_context={"x": "y"})
    assert (grant.identity.user, grant.identity.name) == (LI_SI.open_id, "Li Si")
    assert bodies(sent, "/access_token") == [{"sdk_id": sandbox.sdk_id, "secret": SANDBOX_SECRET, "auth_code": code}]


async def test_profile_request_carries_the_documented_oauth_headers_in_exact_case(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, sent: list[httpx.Request], clock: Clock
) -> None:
    grant = await redeem_client(sandbox, provider)
    profile = next(r for r in sent if r.url.path == "/v1/users/info/basic")
    assert profile.method == "GET"
    assert dict(profile.url.params) == {"operator_id": ZHANG.open_id, "operator_id_type": "2"}
    raw = {name.decode(): value.decode() for name, value in profile.headers.raw}
    assert raw["AccessToken"] == grant.tokens.access_token
    assert raw["OpenId"] == ZHANG.open_id
    assert raw["X-TC-Timestamp"] == str(int(clock.now))
    assert re.fullmatch(r"[1-9][0-9]*", raw["X-TC-Nonce"])
    assert raw["Content-Type"] == "application/json"
    assert not {"X-TC-Signature", "X-TC-Key", "AppId", "SdkId", "Authorization"} & set(raw)


async def test_header_case_survives_on_the_wire() -> None:
    """The server reads header names case-sensitively; ASGI lower-cases them, so a raw socket checks
    what httpx really sends (HTTP/1.1)."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        body = b'{"username": "Wire", "status": "1"}'
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def webapi(request: httpx.Request) -> httpx.Response:
        data = {"access_token": "AT", "refresh_token": "RT", "expires": 1_900_000_000, "open_id": "ow1",
                "scopes": ["VIEW_USER_INFO"], "open_corp_id": ""}
        return httpx.Response(200, json={"code": 0, "message": "SUCCESS", "nonce": "n1", "data": data})

    async with server, httpx.AsyncClient(mounts={
        "http://web.test": httpx.MockTransport(webapi), "all://": httpx.AsyncHTTPTransport(),
    }) as http:
        provider = make_provider(WeMeetSandbox(), http, web_base_url="http://web.test",
                                 api_base_url=f"http://127.0.0.1:{port}")
        grant = await provider.redeem("c", flow="client", redirect_uri=REDIRECT_URI)
    assert grant.identity.name == "Wire"
    head = received[0].decode()
    assert head.startswith("GET /v1/users/info/basic?operator_id=ow1&operator_id_type=2 HTTP/1.1\r\n")
    for line in ("\r\nAccessToken: AT\r\n", "\r\nOpenId: ow1\r\n", "\r\nX-TC-Timestamp: ", "\r\nX-TC-Nonce: ",
                 "\r\nContent-Type: application/json\r\n"):
        assert line in head


async def test_a_personal_user_has_no_tenant(sandbox: WeMeetSandbox, provider: WeMeetProvider) -> None:
    grant = await redeem_client(sandbox, provider, PAT.open_id)
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == (PAT.open_id, "", "Pat Personal")


async def test_a_grant_without_a_profile_scope_logs_in_with_an_empty_name_and_no_profile_call(
    sandbox: WeMeetSandbox, provider: WeMeetProvider
) -> None:
    grant = await redeem_client(sandbox, provider, ZHAO.open_id)
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == (ZHAO.open_id, ZHAO.open_corp_id, "")
    assert grant.tokens.scope == "VIEW_VIDEO"
    assert sandbox.stats["profile"] == 0


async def test_older_exchange_answers_take_the_tenant_from_the_profile(clock: Clock) -> None:
    sandbox = WeMeetSandbox(clock=clock, corp_in_exchange=False)
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http)
        enterprise = await redeem_client(sandbox, provider, LI_SI.open_id)
        personal = await redeem_client(sandbox, provider, PAT.open_id)
        no_scope = await redeem_client(sandbox, provider, ZHAO.open_id)
    assert enterprise.identity.tenant == LI_SI.open_corp_id
    assert personal.identity.tenant == ""
    assert no_scope.identity.tenant == ""  # unknown: neither the exchange nor a profile says


def fake_wemeet(data: dict[str, Any], profile: httpx.Response | None = None) -> httpx.MockTransport:
    """A Tencent Meeting that answers the exchange with ``data`` and the profile with ``profile``."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/access_token"):
            return httpx.Response(200, json={"code": 0, "message": "SUCCESS", "nonce": "n", "data": data})
        assert profile is not None, "no profile call expected"
        return profile

    return httpx.MockTransport(handle)


BASIC = {"access_token": "AT", "refresh_token": "RT", "open_id": "ow1", "open_corp_id": "wc1"}


@pytest.mark.parametrize(
    ("expires", "expected_lifetime"),
    [(1_750_000_000 + 7200, 7200), ("1750021600", SIX_HOURS), (21600, SIX_HOURS), (None, SIX_HOURS)],
)
async def test_expires_is_absolute_and_odd_values_do_not_break_the_login(
    clock: Clock, expires: Any, expected_lifetime: int
) -> None:
    data = {**BASIC, "scopes": ["VIEW_VIDEO"], **({"expires": expires} if expires is not None else {})}
    async with httpx.AsyncClient(transport=fake_wemeet(data)) as http:
        grant = await make_provider(WeMeetSandbox(), http, clock=clock).redeem("c", flow="client", redirect_uri="")
    # An absolute time as int or digit string; a duration-looking value (or none) is not "1970".
    assert grant.tokens.expires_at == clock.now + expected_lifetime


async def test_without_scopes_in_the_answer_the_profile_is_tried_and_190303_only_empties_the_name(
    clock: Clock,
) -> None:
    denied = httpx.Response(400, json={"error_info": {"error_code": 190303, "new_error_code": 200190303,
                                                      "message": "鉴权失败"}})
    async with httpx.AsyncClient(transport=fake_wemeet({**BASIC, "expires": 1_760_000_000}, denied)) as http:
        grant = await make_provider(WeMeetSandbox(), http, clock=clock).redeem("c", flow="client", redirect_uri="")
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == ("ow1", "wc1", "")


@pytest.mark.parametrize(("status", "word"), [("2", "deregistered"), ("4", "disabled")])
async def test_a_deregistered_or_disabled_account_is_refused(clock: Clock, status: str, word: str) -> None:
    profile = httpx.Response(200, json={"username": "X", "status": status})
    data = {**BASIC, "expires": 1_760_000_000, "scopes": ["VIEW_USER_INFO"]}
    async with httpx.AsyncClient(transport=fake_wemeet(data, profile)) as http:
        with pytest.raises(LoginDenied) as caught:
            await make_provider(WeMeetSandbox(), http, clock=clock).redeem("c", flow="client", redirect_uri="")
    assert caught.value.code == "user_inactive" and word in caught.value.message


async def test_a_gateway_clock_off_by_more_than_5_minutes_is_an_operator_error(
    sandbox: WeMeetSandbox, client: httpx.AsyncClient
) -> None:
    skewed = make_provider(sandbox, client, clock=lambda: sandbox.clock() + 301)
    with pytest.raises(ProviderMisconfigured) as caught:
        await redeem_client(sandbox, skewed)
    assert caught.value.provider_code == 190300 and "clock" in caught.value.message


@pytest.mark.parametrize(("code", "status"), [(None, 502), (190310, None), (190301, None), (9999, 400)])
async def test_a_failing_profile_only_empties_the_name(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, code: int | None, status: int | None
) -> None:
    sandbox.inject_fault("profile", code, status=status)
    grant = await redeem_client(sandbox, provider)
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == (ZHANG.open_id, ZHANG.open_corp_id, "")


# -- refresh and rotation -------------------------------------------------------------------------


async def test_refresh_sends_refresh_token_sdk_id_and_open_id_only_and_rotates(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, sent: list[httpx.Request], clock: Clock
) -> None:
    grant = await redeem_client(sandbox, provider)
    clock.now += 3600
    rotated = await provider.refresh(grant.tokens)
    assert bodies(sent, "/refresh_token") == [
        {"refresh_token": grant.tokens.refresh_token, "sdk_id": sandbox.sdk_id, "open_id": ZHANG.open_id}
    ]
    assert rotated.access_token != grant.tokens.access_token
    assert rotated.refresh_token not in (None, grant.tokens.refresh_token)
    assert rotated.expires_at == int(clock.now + SIX_HOURS) and rotated.issued_at == clock.now
    assert rotated.refresh_expires_at == clock.now + THIRTY_DAYS  # renewed by the refresh
    assert rotated.extra == {"open_id": ZHANG.open_id} and rotated.scope == grant.tokens.scope
    # The previous pair died the moment the new one was issued.
    assert not sandbox.is_live(grant.tokens.access_token) and sandbox.is_live(rotated.access_token)
    with pytest.raises(ReauthRequired) as caught:
        await provider.refresh(grant.tokens)
    assert_clean(caught.value, grant.tokens.refresh_token or "", grant.tokens.access_token)
    again = await provider.refresh(rotated)
    assert sandbox.is_live(again.access_token) and not sandbox.is_live(rotated.access_token)


async def test_a_second_login_kills_the_first_logins_tokens(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, client: httpx.AsyncClient
) -> None:
    first = await redeem_client(sandbox, provider)  # device A, in the client
    second = await provider.redeem(await browser_code(provider, client), flow="browser", redirect_uri=REDIRECT_URI)
    assert first.identity == second.identity
    assert not sandbox.is_live(first.tokens.access_token) and sandbox.is_live(second.tokens.access_token)
    with pytest.raises(ReauthRequired):
        await provider.refresh(first.tokens)
    assert (await provider.refresh(second.tokens)).access_token


async def test_refresh_without_open_id_or_refresh_token_needs_reauth_without_a_call(
    sandbox: WeMeetSandbox, provider: WeMeetProvider
) -> None:
    for tokens in (TokenSet(access_token="a", expires_at=1, refresh_token="r"),
                   TokenSet(access_token="a", expires_at=1, refresh_token=None, extra={"open_id": "ow"})):
        with pytest.raises(ReauthRequired):
            await provider.refresh(tokens)
    assert sandbox.stats["refresh_token"] == 0


async def test_refresh_tokens_live_30_days_and_each_refresh_renews_them(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, clock: Clock
) -> None:
    grant = await redeem_client(sandbox, provider)
    clock.now += THIRTY_DAYS - 1
    renewed = await provider.refresh(grant.tokens)
    clock.now += THIRTY_DAYS - 1
    renewed = await provider.refresh(renewed)
    clock.now += THIRTY_DAYS
    with pytest.raises(ReauthRequired):
        await provider.refresh(renewed)


async def test_a_refresh_answer_for_another_user_is_refused(clock: Clock) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        data = {"access_token": "A2", "refresh_token": "R2", "expires": 1_760_000_000, "open_id": "someone-else"}
        return httpx.Response(200, json={"code": 0, "data": data})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        provider = make_provider(WeMeetSandbox(), http, clock=clock)
        with pytest.raises(ReauthRequired):
            await provider.refresh(TokenSet("A1", 1_750_000_100, "R1", extra={"open_id": "ow1"}))


async def test_a_refresh_answer_without_a_refresh_token_keeps_the_old_one(clock: Clock) -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 0, "data": {"access_token": "A2", "expires": 1_760_000_000}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handle)) as http:
        provider = make_provider(WeMeetSandbox(), http, clock=clock)
        fresh = await provider.refresh(TokenSet("A1", 1_750_000_100, "R1", extra={"open_id": "ow1"}))
    assert (fresh.access_token, fresh.refresh_token, fresh.extra) == ("A2", "R1", {"open_id": "ow1"})


# -- error classification, end to end through the sandbox ---------------------------------------


async def used_code(sandbox: WeMeetSandbox, provider: WeMeetProvider) -> str:
    code = sandbox.mint_client_code()
    await provider.redeem(code, flow="client", redirect_uri="")
    return code


async def expired_code(sandbox: WeMeetSandbox, provider: WeMeetProvider) -> str:
    code = sandbox.mint_client_code()
    sandbox.clock.now += 300  # type: ignore[attr-defined]
    return code


async def fresh_code(sandbox: WeMeetSandbox, provider: WeMeetProvider) -> str:
    return sandbox.mint_client_code()


async def unknown_code(sandbox: WeMeetSandbox, provider: WeMeetProvider) -> str:
    return "never-issued"


@pytest.mark.parametrize(
    ("make_code", "overrides"),
    [(unknown_code, {}), (used_code, {}), (expired_code, {}), (fresh_code, {"secret": "wrong-secret"}),
     (fresh_code, {"sdk_id": "99999"})],
)
async def test_refused_codes_and_credentials_need_a_new_login_and_say_so_cleanly(
    sandbox: WeMeetSandbox, client: httpx.AsyncClient, make_code: Any, overrides: dict[str, Any]
) -> None:
    provider = make_provider(sandbox, client, **overrides)
    code = await make_code(sandbox, make_provider(sandbox, client))
    with pytest.raises(ReauthRequired) as caught:
        await provider.redeem(code, flow="client", redirect_uri="")
    assert caught.value.code == "code_invalid" and caught.value.provider_code == 400
    assert "HTTP 400" in caught.value.message and "secret" in caught.value.message
    assert_clean(caught.value, code, "wrong-secret")


@pytest.mark.parametrize(
    ("fault", "expected", "stable_code"),
    [
        ({"status": 502}, ProviderUnavailable, "provider_unavailable"),
        ({"status": 503}, ProviderUnavailable, "provider_unavailable"),
        ({"status": 429}, ProviderUnavailable, "rate_limited"),
        ({"status": 404}, ProviderMisconfigured, "provider_misconfigured"),
        ({"code": 70001, "status": 200}, ReauthRequired, "code_invalid"),  # HTTP 200, code != 0
        ({"code": 70001}, ReauthRequired, "code_invalid"),
    ],
)
async def test_exchange_failures_are_classified_by_status_first(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, fault: dict[str, Any], expected: type[ProviderError],
    stable_code: str,
) -> None:
    sandbox.inject_fault("access_token", fault.get("code"), status=fault.get("status"))
    with pytest.raises(ProviderError) as caught:
        await redeem_client(sandbox, provider)
    assert type(caught.value) is expected and caught.value.code == stable_code
    assert_clean(caught.value)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [({"status": 500}, ProviderUnavailable), ({"code": 70002}, ReauthRequired),
     ({"code": 70002, "status": 200}, ReauthRequired), ({"status": 404}, ProviderMisconfigured)],
)
async def test_refresh_failures_are_classified(
    sandbox: WeMeetSandbox, provider: WeMeetProvider, fault: dict[str, Any], expected: type[ProviderError]
) -> None:
    grant = await redeem_client(sandbox, provider)
    sandbox.inject_fault("refresh_token", fault.get("code"), status=fault.get("status"))
    with pytest.raises(ProviderError) as caught:
        await provider.refresh(grant.tokens)
    assert type(caught.value) is expected
    assert_clean(caught.value, grant.tokens.refresh_token or "", grant.tokens.access_token)
    # A transient failure did not rotate anything: the same refresh token still works.
    if expected is ProviderUnavailable:
        assert (await provider.refresh(grant.tokens)).access_token


async def test_unreachable_and_slow_providers_are_transient(sandbox: WeMeetSandbox, client: httpx.AsyncClient) -> None:
    nowhere = make_provider(sandbox, client, web_base_url="http://nowhere.wemeet.test")
    with pytest.raises(ProviderUnavailable) as caught:
        await redeem_client(sandbox, nowhere)
    assert caught.value.code == "provider_unreachable"
    slow = WeMeetSandbox(delay_s=1.0)
    async with serve_apps(slow.hosts()) as urls, httpx.AsyncClient(timeout=0.2) as http:
        settings = WeMeetSettings(**slow.provider_settings(urls))
        context = ProviderContext(name="wemeet", redirect_uri=REDIRECT_URI, http=http, store=MemoryStore())
        with pytest.raises(ProviderUnavailable) as caught:
            await redeem_client(slow, WeMeetProvider(settings, context))
    assert caught.value.code == "provider_timeout"


# -- the classifiers on their own ----------------------------------------------------------------


def ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"code": 0, "message": "SUCCESS", "nonce": "98187ecdebca4846", "data": data}


@pytest.mark.parametrize(
    ("response", "operation", "expected"),
    [
        (httpx.Response(200, json=ok({"access_token": "a"})), "code exchange", None),
        (httpx.Response(200, json={"data": {"access_token": "a"}}), "refresh", None),  # no code at all: fine
        (httpx.Response(200, json=ok({})), "code exchange", ProviderUnavailable),  # no access_token
        (httpx.Response(200, json=ok({"access_token": ""})), "refresh", ProviderUnavailable),
        (httpx.Response(200, text="<html>maintenance</html>"), "refresh", ProviderUnavailable),
        (httpx.Response(200, json={"code": "1001", "message": "x"}), "refresh", ReauthRequired),
        (httpx.Response(400, text="bad request"), "code exchange", ReauthRequired),  # the body is undocumented
        (httpx.Response(401, json={}), "refresh", ReauthRequired),
        (httpx.Response(403, json={"code": 0}), "code exchange", ReauthRequired),
        (httpx.Response(408, text=""), "refresh", ProviderUnavailable),
        (httpx.Response(405, text=""), "refresh", ProviderMisconfigured),
        (httpx.Response(301, headers={"location": "https://x"}), "code exchange", ProviderMisconfigured),
        (httpx.Response(504, json={"code": 1}), "code exchange", ProviderUnavailable),
    ],
)
def test_classify_webapi(response: httpx.Response, operation: Any, expected: type[ProviderError] | None) -> None:
    data, error = classify_webapi(response, operation=operation)
    if expected is None:
        assert error is None and data["access_token"] == "a"
    else:
        assert type(error) is expected and error.message


def test_classify_webapi_names_the_trace_nonce_and_never_the_message() -> None:
    body = {"code": 4001, "message": "auth_code SECRETCODE invalid", "nonce": "98187ecdebca4846"}
    _, error = classify_webapi(httpx.Response(400, json=body), operation="code exchange")
    assert error is not None and "98187ecdebca4846" in error.message and "4001" in error.message
    assert "SECRETCODE" not in error.message


def api_answer(status: int, code: int | None = None, new_code: int | None = None) -> httpx.Response:
    info: dict[str, Any] = {"message": "m"}
    if code is not None:
        info["error_code"] = code
    if new_code is not None:
        info["new_error_code"] = new_code
    return httpx.Response(status, json={"error_info": info})


@pytest.mark.parametrize(
    ("response", "expected", "stable_code"),
    [
        (api_answer(400, 190303, 100190303), ReauthRequired, "token_rejected"),
        (api_answer(400, None, 200190303), ReauthRequired, "token_rejected"),
        (api_answer(400, 9042), ReauthRequired, "reauth_required"),
        (api_answer(400, None, 143001012), ReauthRequired, "reauth_required"),
        (api_answer(400, 190300), ProviderMisconfigured, "provider_misconfigured"),
        (api_answer(400, 190004), ProviderMisconfigured, "provider_misconfigured"),
        (api_answer(400, 200003), ProviderMisconfigured, "provider_misconfigured"),
        (api_answer(400, 190301), ProviderUnavailable, "provider_unavailable"),
        (api_answer(400, 190310), ProviderUnavailable, "rate_limited"),
        (api_answer(400, 190311), ProviderUnavailable, "rate_limited"),
        (api_answer(400, 190313), ProviderUnavailable, "rate_limited"),
        (api_answer(500, 190303), ProviderUnavailable, "provider_unavailable"),  # a 5xx is never definitive
        (api_answer(500), ProviderUnavailable, "provider_unavailable"),
        (httpx.Response(502, text="<html>"), ProviderUnavailable, "provider_unavailable"),
        (api_answer(400, 123456), ProviderError, "provider_error"),
    ],
)
def test_classify_api(response: httpx.Response, expected: type[ProviderError], stable_code: str) -> None:
    _, error = classify_api(response)
    assert type(error) is expected and error.code == stable_code


def test_classify_api_success_and_rate_limit_retry() -> None:
    body, error = classify_api(httpx.Response(200, json={"username": "u"}))
    assert error is None and body == {"username": "u"}
    _, limited = classify_api(api_answer(400, 190310))
    assert isinstance(limited, ProviderUnavailable) and limited.retry_after_s == 60


# -- bridge.js --------------------------------------------------------------------------------------

BRIDGE = Path(__file__).resolve().parents[1] / "plugins" / "wemeet" / "bridge.js"
# What Chrome 77 cannot parse (or what is not ES5): the page must run on the Windows client.
NOT_ES5 = (r"=>", r"\blet\s", r"\bconst\s", r"\basync\b", r"\bawait\b", r"\?\.", r"\?\?", r"`", r"\bclass\s",
           r"\.\.\.", r"\bfor\s*\([^)]*\bof\b", r"\bimport\b", r"\bexport\b")


def es5_violations(source: str) -> list[str]:
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.S)
    code = re.sub(r'"(?:[^"\\\n]|\\.)*"', '""', code)  # string contents may say anything
    return [pattern for pattern in NOT_ES5 if re.search(pattern, code)]


def test_bridge_is_es5() -> None:
    assert es5_violations(BRIDGE.read_text()) == []


# Each scenario fakes window.wemeet, runs requestCode and prints the outcome and the calls.
BRIDGE_HARNESS = r"""
var fs = require("fs");
global.window = global;
var listeners = {};
window.addEventListener = function (type, fn) { (listeners[type] = listeners[type] || []).push(fn); };
window.removeEventListener = function (type, fn) {
  listeners[type] = (listeners[type] || []).filter(function (f) { return f !== fn; });
};
function unload() { (listeners.beforeunload || []).slice().forEach(function (fn) { fn({}); }); }
var log = [];
function rec(api, args) {
  var copy = {};
  Object.keys(args || {}).forEach(function (k) { if (typeof args[k] !== "function") { copy[k] = args[k]; } });
  log.push([api, copy]);
}
function agent(answer) {
  return function (args) {
    rec("requestAgentAuthCode", args);
    if (answer === "hang") { return new Promise(function () {}); }
    if (answer === "throw") { throw new Error("boom"); }
    if (answer === "void") { return undefined; }
    return answer.reject ? Promise.reject(answer.reject) : Promise.resolve(answer.resolve);
  };
}
function authorize(answer, failName) {
  return function (options) {
    rec("authorize", options);
    setTimeout(function () {
      if (answer.success) { options.success(answer.success); } else { options[failName || "fail"](answer.fail); }
    }, 0);
    return Promise.resolve();
  };
}
function requestAuth(behaviour) {
  return function (args) {
    rec("requestAuth", args);
    if (behaviour === "navigate") { setTimeout(unload, 5); }
    if (behaviour === "throw") { throw new Error("not supported"); }
  };
}
var scenarios = {
  missing: function () {},
  no_permission: function () { window.wemeet = { app: {} }; },
  iframe: function () { window.top = {}; window.self = window;
    window.wemeet = { permission: { requestAgentAuthCode: agent({ resolve: { authCode: "X" } }) } }; },
  agent_ok: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ resolve: { authCode: "AGENT" } }),
    authorize: authorize({ success: { authCode: "MUST-NOT" } }), requestAuth: requestAuth("navigate") } }; },
  agent_rejects_authorize_ok: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: { errCode: 10002, errMsg: "not authorized" } }),
    authorize: authorize({ success: { authCode: "DIALOG" } }), requestAuth: requestAuth("navigate") } }; },
  agent_no_code_authorize_ok: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ resolve: {} }), authorize: authorize({ success: { authCode: "DIALOG" } }) } }; },
  agent_void_authorize_failure_name: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent("void"),
    authorize: authorize({ fail: { bizCode: 1, bizMessage: "申请授权成功" } }, "failure") } }; },
  agent_throws_no_authorize_request_auth: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent("throw"), requestAuth: requestAuth("navigate") } }; },
  no_agent_authorize_ok: function () { window.wemeet = { permission: {
    authorize: authorize({ success: { authCode: "DIALOG" } }) } }; },
  pending: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: {} }), authorize: authorize({ fail: { bizCode: 1 } }),
    requestAuth: requestAuth("navigate") } }; },
  refused: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: {} }), authorize: authorize({ fail: { bizCode: 3, bizMessage: "no" } }),
    requestAuth: requestAuth("navigate") } }; },
  closed: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: {} }), authorize: authorize({ fail: { bizCode: 2 } }) } }; },
  other_then_request_auth: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: "x" }), authorize: authorize({ fail: { bizCode: 4, bizMessage: "odd" } }),
    requestAuth: requestAuth("navigate") } }; },
  request_auth_does_nothing: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: {} }), requestAuth: requestAuth("nothing") } }; },
  request_auth_throws: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: {} }), requestAuth: requestAuth("throw") } }; },
  nothing_works: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent({ reject: { errMsg: "not authorized" } }) } }; },
  agent_hangs: function () { window.wemeet = { permission: {
    requestAgentAuthCode: agent("hang"), authorize: authorize({ success: { authCode: "MUST-NOT" } }),
    requestAuth: requestAuth("navigate") } }; }
};
var tools = {
  withTimeout: function (promise, ms, what) {
    return Promise.race([promise, new Promise(function (resolve, reject) {
      setTimeout(function () { reject({ outcome: "fallback", message: what + " did not answer in time" }); }, ms);
    })]);
  }
};
scenarios[process.argv[2]]();
eval(fs.readFileSync(process.argv[3], "utf8"));
window.gatewayBridges.wemeet.requestCode(
  { sdkId: "218", corpId: "200", redirectUri: "https://app.example.com/_gateway/callback/wemeet", state: "S",
    timeout_ms: 80 }, tools
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


def names(result: dict[str, Any]) -> list[str]:
    return [call[0] for call in result["calls"]]


REQUEST_AUTH_ARGS = {"corpId": "200", "sdkId": "218", "redirectURI": "https://app.example.com/_gateway/callback/wemeet",
                     "state": "S"}


def test_bridge_request_agent_auth_code_first(tmp_path: Path) -> None:
    result = run_bridge(tmp_path, "agent_ok")
    assert result["resolved"] == {"code": "AGENT"}
    assert result["calls"] == [["requestAgentAuthCode", {"sdkId": "218"}]]


@pytest.mark.parametrize(
    ("scenario", "calls"),
    [
        ("agent_rejects_authorize_ok", ["requestAgentAuthCode", "authorize"]),
        ("agent_no_code_authorize_ok", ["requestAgentAuthCode", "authorize"]),
        ("no_agent_authorize_ok", ["authorize"]),
    ],
)
def test_bridge_falls_back_to_the_authorize_dialog(tmp_path: Path, scenario: str, calls: list[str]) -> None:
    result = run_bridge(tmp_path, scenario)
    assert result["resolved"] == {"code": "DIALOG"} and names(result) == calls


@pytest.mark.parametrize(
    ("scenario", "outcome", "words"),
    [
        ("pending", "pending", "administrator"),
        ("agent_void_authorize_failure_name", "pending", "administrator"),  # the doc table's "failure" callback
        ("refused", "denied", "declined"),
        ("closed", "denied", "closed"),
    ],
)
def test_bridge_reports_the_authorize_dialogs_biz_codes(
    tmp_path: Path, scenario: str, outcome: str, words: str
) -> None:
    result = run_bridge(tmp_path, scenario)
    assert result["rejected"]["outcome"] == outcome and words in result["rejected"]["message"]
    assert "requestAuth" not in names(result)


@pytest.mark.parametrize(
    ("scenario", "calls"),
    [
        ("other_then_request_auth", ["requestAgentAuthCode", "authorize", "requestAuth"]),
        ("agent_throws_no_authorize_request_auth", ["requestAgentAuthCode", "requestAuth"]),
    ],
)
def test_bridge_falls_back_to_request_auth_which_navigates(tmp_path: Path, scenario: str, calls: list[str]) -> None:
    result = run_bridge(tmp_path, scenario)
    assert result["rejected"]["outcome"] == "navigating"
    assert names(result) == calls and result["calls"][-1][1] == REQUEST_AUTH_ARGS


@pytest.mark.parametrize(
    ("scenario", "words"),
    [
        ("missing", "wemeet global is missing"),
        ("no_permission", "wemeet global is missing"),
        ("iframe", "iframe"),
        ("request_auth_does_nothing", "requestAuth did not open the authorization page"),
        ("request_auth_throws", "requestAuth threw"),
        ("nothing_works", "not authorized"),
        ("agent_hangs", "requestAgentAuthCode did not answer in time"),
    ],
)
def test_bridge_otherwise_falls_back_to_the_authorization_link(tmp_path: Path, scenario: str, words: str) -> None:
    result = run_bridge(tmp_path, scenario)
    rejected = result["rejected"]
    assert rejected["outcome"] == "fallback" and words in rejected["message"]
    assert "tryNext" not in rejected
    if scenario == "agent_hangs":
        assert names(result) == ["requestAgentAuthCode"]  # a hung client bridge: straight to the link
    if scenario == "nothing_works":
        assert "no authorize dialog" in rejected["message"] and "no requestAuth" in rejected["message"]
