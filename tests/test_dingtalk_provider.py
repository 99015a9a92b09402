"""The DingTalk provider plugin, against its emulator mounted in process.

The sandbox's three hosts are served by ``HostRoutingTransport`` (no sockets), except where a real
timeout is the point. Expected classifications come from the fact sheet
(``docs/providers/dingtalk.md`` and the sources it lists), written out here rather than read from the
provider's tables, so a wrong table entry shows up.
"""

from __future__ import annotations

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
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.errors import (
    LoginDenied,
    ProviderError,
    ProviderMisconfigured,
    ProviderUnavailable,
    ReauthRequired,
)
from gateway.providers import Grant, LoginContext, ProviderContext, TokenSet
from gateway.sandbox import serve_apps
from gateway.stores import Store, Versioned
from gateway.stores.memory import MemoryStore
from gateway.tokens import AppTokenCache
from plugins.dingtalk.provider import (
    DingTalkProvider,
    DingTalkSettings,
    classify_api,
    classify_oapi,
    corp_from_path,
)
from plugins.dingtalk.sandbox import (
    DEFAULT_USERS,
    OTHER_CORP_ID,
    SANDBOX_APP_KEY,
    SANDBOX_APP_SECRET,
    SANDBOX_CORP_ID,
    SANDBOX_SUITE_KEY,
    SANDBOX_SUITE_SECRET,
    DingTalkSandbox,
)
from tests.conftest import Clock

BASE_URLS = {"api": "http://api.dingtalk.test", "oapi": "http://oapi.dingtalk.test",
             "login": "http://login.dingtalk.test"}
REDIRECT_URI = "https://app.example.com/_gateway/callback/dingtalk"
ZHANG, LISI, ALICE, ZHANG_OTHER = DEFAULT_USERS


class ClockedStore(Store):
    """A store whose TTLs follow the test clock (the memory store's follow the real one)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.data: dict[str, tuple[float, int, bytes]] = {}

    def _live(self, key: str) -> tuple[float, int, bytes] | None:
        entry = self.data.get(key)
        if entry is not None and entry[0] <= self.clock():
            del self.data[key]
            return None
        return entry

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return entry[2] if entry else None

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        entry = self._live(key)
        self.data[key] = (self.clock() + ttl_s, entry[1] + 1 if entry else 1, value)

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def pop(self, key: str) -> bytes | None:
        entry = self._live(key)
        self.data.pop(key, None)
        return entry[2] if entry else None

    async def get_versioned(self, key: str) -> Versioned | None:
        entry = self._live(key)
        return Versioned(entry[1], entry[2]) if entry else None

    async def set_versioned(
        self, key: str, value: bytes, ttl_s: float, *, expected_version: int | None = None
    ) -> int | None:
        entry = self._live(key)
        current = entry[1] if entry else 0
        if expected_version is not None and expected_version != current:
            return None
        self.data[key] = (self.clock() + ttl_s, current + 1, value)
        return current + 1

    async def ping(self) -> None:
        return None


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sandbox(clock: Clock) -> DingTalkSandbox:
    return DingTalkSandbox(clock=clock)


@pytest.fixture
def sent() -> list[httpx.Request]:
    return []


@pytest.fixture
async def client(sandbox: DingTalkSandbox, sent: list[httpx.Request]) -> AsyncIterator[httpx.AsyncClient]:
    async def record(request: httpx.Request) -> None:
        sent.append(request)

    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS), event_hooks={"request": [record]}) as http:
        yield http


def make_provider(sandbox: DingTalkSandbox, http: httpx.AsyncClient, *, isv: bool = False,
                  store: Store | None = None, name: str = "dingtalk", **overrides: Any) -> DingTalkProvider:
    base = sandbox.isv_settings(BASE_URLS) if isv else sandbox.provider_settings(BASE_URLS)
    settings = DingTalkSettings(**{**base, **overrides})
    store = store or ClockedStore(sandbox.clock)
    context = ProviderContext(name=name, redirect_uri=REDIRECT_URI, http=http, store=store, clock=sandbox.clock,
                              app_tokens=AppTokenCache(store, clock=sandbox.clock))
    return DingTalkProvider(settings, context)


@pytest.fixture
def provider(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> DingTalkProvider:
    return make_provider(sandbox, client)


@pytest.fixture
def isv(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> DingTalkProvider:
    """The third-party app, with the sandbox's current suiteTicket seeded."""
    return make_provider(sandbox, client, isv=True, suite_ticket=sandbox.suite_ticket)


def login_context(next_path: str = "/") -> LoginContext:
    return LoginContext(state="st4te", redirect_uri=REDIRECT_URI, next_path=next_path)


async def browser_code(provider: DingTalkProvider, http: httpx.AsyncClient, next_path: str = "/") -> str:
    """Follow the authorize URL on the sandbox's login host (auto consent) and read the code."""
    answer = await http.get(provider.authorize_url(login_context(next_path)))
    assert answer.status_code == 302, answer.text
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["st4te"]
    return query["authCode"][0]


async def browser_login(provider: DingTalkProvider, http: httpx.AsyncClient) -> Grant:
    code = await browser_code(provider, http)
    return await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)


async def client_login(sandbox: DingTalkSandbox, provider: DingTalkProvider, **context: str) -> Grant:
    """A free-login code minted for the provider's app (dd.requestAuthCode with its clientId)."""
    code = sandbox.mint_client_code(client_id=provider.settings.client_id)
    return await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI,
                                 client_context={"kind": "auth_code", **context})


def assert_clean(error: ProviderError, *secrets_: str) -> None:
    for secret in (SANDBOX_APP_SECRET, SANDBOX_SUITE_SECRET, *secrets_):
        assert secret not in error.message


# -- settings ---------------------------------------------------------------------------------


def test_settings_default_to_the_real_hosts() -> None:
    settings = DingTalkSettings(plugin="dingtalk", client_id="dingapp", client_secret="s", corp_id="dingcorp")
    assert settings.api_base_url == "https://api.dingtalk.com"
    assert settings.oapi_base_url == "https://oapi.dingtalk.com"
    assert settings.login_base_url == "https://login.dingtalk.com"
    assert settings.jssdk_url == "https://g.alicdn.com/dingding/dingtalk-jsapi/3.1.0/dingtalk.open.js"
    assert (settings.app_type, settings.user_id_field, settings.client_login_ttl_s) == ("internal", "userid", 7200)
    assert settings.scopes == [] and settings.app_scopes == []


def test_settings_null_means_default_and_empty_jssdk_stays_empty() -> None:
    settings = DingTalkSettings(plugin="dingtalk", client_id="a", client_secret="s", corp_id="c",
                                api_base_url=None, jssdk_url="", oapi_base_url="http://127.0.0.1:9/")
    assert settings.api_base_url == "https://api.dingtalk.com"
    assert settings.jssdk_url == ""
    assert settings.oapi_base_url == "http://127.0.0.1:9"
    null_sdk = DingTalkSettings(plugin="dingtalk", client_id="a", client_secret="s", corp_id="c", jssdk_url=None)
    assert null_sdk.jssdk_url.startswith("https://g.alicdn.com/")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"corp_id": None}, "corp_id is required"),
        ({"callback_token": "tok123"}, "both callback_token and callback_aes_key"),
        ({"callback_token": "tok123", "callback_aes_key": "short"}, "43 letters"),
        ({"callback_token": "t!", "callback_aes_key": "a" * 43}, "3 to 32"),
        ({"scopes": [".default"]}, "app_scopes"),
        ({"scopes": ["Contact.User.Read,x"]}, "permission code"),
        ({"suite_ticket": "T"}, "app_type: isv"),
        ({"user_id_field": "openid"}, "userid"),
        ({"app_type": "personal"}, "internal"),
        ({"corp_id": "ding corp"}, "corpId"),
        ({"api_base_url": "api.dingtalk.com"}, "http(s) URL"),
    ],
)
def test_settings_reject_bad_values(overrides: dict[str, Any], words: str) -> None:
    values = {"plugin": "dingtalk", "client_id": "a", "client_secret": "s", "corp_id": "dingcorp", **overrides}
    with pytest.raises(ValidationError) as caught:
        DingTalkSettings(**values)
    assert words in str(caught.value)


def test_isv_settings_need_no_corp_and_mask_every_secret() -> None:
    settings = DingTalkSettings(plugin="dingtalk", client_id="suite1", client_secret="very-secret-value",
                                app_type="isv", suite_ticket="ticket-value", callback_token="tokenvalue9",
                                callback_aes_key="k" * 43, app_scopes=[".default"])
    shown = repr(settings)
    for secret in ("very-secret-value", "ticket-value", "tokenvalue9", "k" * 43):
        assert secret not in shown


# -- the browser side -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user_agent",
    [
        # The sheet's real fragments (section 2.2) on full UAs.
        "Mozilla/5.0 (Linux; Android 10; VOG-AL10 Build/HUAWEIVOG-AL10; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Version/4.0 Chrome/69.0.3497.100 Mobile Safari/537.36 AliApp(DingTalk/5.1.5) com.alibaba.android.rimet/"
        "13534898 Channel/212200 language/zh-CN UT4Aplus/0.2.25 colorScheme/light",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 18_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Mobile/23E246 AliApp(DingTalk/7.8.1) com.laiwang.DingTalk/46766536 Channel/201200 language/zh-Hans-CN "
        "UT4Aplus/0.0.6 WK",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0.5359.215 "
        "Safari/537.36 dingtalk-win/1.0.0 nw(0.14.7) DingTalk(7.8.10-Release.250724002) Mojo/1.0.0 Native "
        "AppType(release) Channel/201200 Architecture/x86_64",
        "Mozilla/5.0 (Linux; Android 13) Mobile Safari/537.36 DingTalk/7.0.40",
        DingTalkSandbox.client_user_agent,
    ],
)
def test_detect_client_recognises_dingtalk(provider: DingTalkProvider, user_agent: str) -> None:
    assert provider.detect_client(user_agent)


@pytest.mark.parametrize(
    "user_agent",
    [
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 Chrome/120 Safari/537.36 Lark/7.12.7 "
        "LarkLocale/en_US ChannelName/Feishu",
        "DingTalkBot/1.0 (+https://bot.example)",  # a name, not the client's version token
        # 浙政钉 (TaurusApp): a separate deployment whose codes this plugin cannot redeem.
        "Mozilla/5.0 (Windows NT 10.0) AppleWebKit/537.36 Chrome/91 DingTalk(2.13.2-Release.27) "
        "TaurusApp(tauruszjd/2.13.2.27)",
        "",
    ],
)
def test_detect_client_ignores_other_user_agents(provider: DingTalkProvider, user_agent: str) -> None:
    assert not provider.detect_client(user_agent)


def test_authorize_url_carries_the_documented_parameters(provider: DingTalkProvider) -> None:
    url = provider.authorize_url(login_context("/orders?corpid=dingelsewhere"))
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == BASE_URLS["login"] + "/oauth2/auth"
    assert "scope=openid%20corpid&" in url  # a space as %20, as the sheet spells it
    assert parse_qs(parts.query) == {
        "redirect_uri": [REDIRECT_URI],
        "response_type": ["code"],
        "client_id": [SANDBOX_APP_KEY],
        "scope": ["openid corpid"],
        "state": ["st4te"],
        "prompt": ["consent"],
        "corpId": [SANDBOX_CORP_ID],  # an internal app belongs to one organisation, whatever the path says
    }


def test_isv_authorize_url_preselects_the_corp_of_the_app_path(isv: DingTalkProvider) -> None:
    with_corp = parse_qs(urlsplit(isv.authorize_url(login_context(f"/a?corpid={OTHER_CORP_ID}"))).query)
    assert with_corp["corpId"] == [OTHER_CORP_ID] and with_corp["client_id"] == [SANDBOX_SUITE_KEY]
    assert "corpId" not in parse_qs(urlsplit(isv.authorize_url(login_context("/a"))).query)


def test_scopes_reach_the_authorize_url_and_the_bridge(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> None:
    provider = make_provider(sandbox, client, scopes=["Contact.User.Read"], app_scopes=[".default"])
    query = parse_qs(urlsplit(provider.authorize_url(login_context())).query)
    assert query["scope"] == ["openid corpid Contact.User.Read"]
    config = provider.bridge_config(login_context())
    assert (config["scopes"], config["appScopes"], config["fieldScopes"]) == ("Contact.User.Read", ".default", "")


def test_bridge_config_names_the_app_and_the_corp(provider: DingTalkProvider, isv: DingTalkProvider) -> None:
    assert provider.bridge_config(login_context("/x?corpid=dingelse")) == {
        "clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "corpIdFromPage": False,
        "scopes": "", "fieldScopes": "", "appScopes": "",
    }
    config = isv.bridge_config(login_context(f"/x?a=1&corpid={OTHER_CORP_ID}"))
    assert (config["clientId"], config["corpId"], config["corpIdFromPage"]) == (SANDBOX_SUITE_KEY, OTHER_CORP_ID, True)
    assert isv.bridge_config(login_context("/x?corpid=bad%20corp"))["corpId"] == ""
    assert provider.bridge_js is not None and provider.bridge_js.is_file()


def test_corp_from_path() -> None:
    assert corp_from_path("/app?corpid=ding123") == "ding123"
    assert corp_from_path("/app?corpId=ding456&x=1") == "ding456"
    assert corp_from_path("/app?corpid=$CORPID$") is None  # the placeholder left unreplaced
    assert corp_from_path("/app") is None


def test_parse_callback_accepts_auth_code_or_code_and_reads_errors(provider: DingTalkProvider) -> None:
    assert provider.parse_callback({"authCode": "A", "state": "s"}).code == "A"
    assert provider.parse_callback({"code": "C", "state": "s"}).code == "C"
    assert provider.parse_callback({"authCode": "A", "code": "C", "state": "s"}).code == "A"
    denied = provider.parse_callback({"error": "access_denied", "state": "s"})
    assert (denied.code, denied.error, denied.state) == (None, "access_denied", "s")
    assert provider.parse_callback({"error": "user_cancel", "state": "s"}).error == "access_denied"
    assert provider.parse_callback({"error": "server_error", "state": "s"}).error == "server_error"


# -- in-client free login ---------------------------------------------------------------------


async def test_free_login_code_gives_the_userid_without_a_user_token(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, sent: list[httpx.Request]
) -> None:
    grant = await client_login(sandbox, provider, corpId=SANDBOX_CORP_ID)
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == (ZHANG.userid, SANDBOX_CORP_ID, "张三")
    assert grant.identity.extra == {"userid": ZHANG.userid, "unionid": ZHANG.unionid}
    tokens = grant.tokens
    assert tokens.refresh_token is None and tokens.access_token == ""
    assert tokens.expires_at - tokens.issued_at == 7200
    token_call, exchange = sent
    assert token_call.url.path == "/v1.0/oauth2/accessToken"
    assert json.loads(token_call.content) == {"appKey": SANDBOX_APP_KEY, "appSecret": SANDBOX_APP_SECRET}
    assert exchange.url.path == "/topapi/v2/user/getuserinfo"
    assert exchange.url.params["access_token"] and json.loads(exchange.content) == {"code": ANY_CODE(exchange)}
    with pytest.raises(ReauthRequired):  # no refresh token: the silent handshake runs again
        await provider.refresh(tokens)
    assert sandbox.stats["userAccessToken"] == 0


def ANY_CODE(request: httpx.Request) -> str:
    return str(json.loads(request.content)["code"])


async def test_old_api_codes_work_too_and_unionid_can_be_the_user(
    sandbox: DingTalkSandbox, client: httpx.AsyncClient
) -> None:
    provider = make_provider(sandbox, client, user_id_field="unionid", client_login_ttl_s=600)
    code = sandbox.mint_client_code(client_id=None)  # dd.runtime.permission.requestAuthCode: no clientId
    grant = await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI, client_context={})
    assert grant.identity.user == ZHANG.unionid
    assert grant.tokens.expires_at - grant.tokens.issued_at == 600


async def test_a_used_code_is_40078_and_asks_for_the_plain_reauth(
    sandbox: DingTalkSandbox, provider: DingTalkProvider
) -> None:
    code = sandbox.mint_client_code()
    await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI)
    with pytest.raises(ReauthRequired) as caught:
        await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI)
    # "reauth_required" is the code the handshake page retries once; a custom one would not be.
    assert (caught.value.code, caught.value.provider_code) == ("reauth_required", 40078)
    assert "40078" in caught.value.message
    expired = sandbox.mint_client_code()
    sandbox.clock.now += 301  # type: ignore[attr-defined]
    with pytest.raises(ReauthRequired):
        await provider.redeem(expired, flow="client", redirect_uri=REDIRECT_URI)


async def test_the_app_token_is_cached_until_shortly_before_expiry(
    sandbox: DingTalkSandbox, provider: DingTalkProvider
) -> None:
    for _ in range(3):
        await client_login(sandbox, provider)
    assert sandbox.stats["accessToken"] == 1
    sandbox.clock.now += 7200 - 301  # type: ignore[attr-defined]
    await client_login(sandbox, provider)
    assert sandbox.stats["accessToken"] == 1
    sandbox.clock.now += 2  # type: ignore[attr-defined]
    await client_login(sandbox, provider)
    assert sandbox.stats["accessToken"] == 2


async def test_concurrent_logins_fetch_the_app_token_once(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> None:
    import asyncio

    sandbox.delay_s = 0.02
    provider = make_provider(sandbox, client)
    codes = [sandbox.mint_client_code() for _ in range(8)]
    grants = await asyncio.gather(*(provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI) for code in codes))
    assert {grant.identity.user for grant in grants} == {ZHANG.userid}
    assert sandbox.stats["accessToken"] == 1


async def test_a_rejected_app_token_is_forgotten_and_fetched_again_once(
    sandbox: DingTalkSandbox, provider: DingTalkProvider
) -> None:
    await client_login(sandbox, provider)
    sandbox.inject_fault("getuserinfo", 88, sub_code="40014")
    grant = await client_login(sandbox, provider)
    assert grant.identity.user == ZHANG.userid
    assert (sandbox.stats["accessToken"], sandbox.stats["getuserinfo"]) == (2, 3)
    sandbox.inject_fault("getuserinfo", 42001, times=2)
    with pytest.raises(ProviderUnavailable):  # rejected twice: not a retry loop
        await client_login(sandbox, provider)


async def test_a_token_another_replica_already_replaced_is_not_forgotten(sandbox: DingTalkSandbox) -> None:
    calls: list[str] = []
    provider: DingTalkProvider

    async def server(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path == "/v1.0/oauth2/accessToken":
            return httpx.Response(200, json={"accessToken": "T1", "expireIn": 7200})
        if request.url.params["access_token"] == "T1":
            # Meanwhile another replica found T1 dead and cached T2.
            key = provider._app_token_key(SANDBOX_CORP_ID)
            await provider.app_tokens.invalidate(key)

            async def fetched() -> tuple[str, float]:
                return "T2", sandbox.clock() + 7200

            await provider.app_tokens.get(key, fetched)
            return httpx.Response(200, json={"errcode": 88, "sub_code": "40014", "errmsg": "x"})
        result = {"userid": "u2", "unionid": "n2", "name": "n"}
        return httpx.Response(200, json={"errcode": 0, "result": result})

    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        provider = make_provider(sandbox, http)
        grant = await provider.redeem("code", flow="client", redirect_uri=REDIRECT_URI)
    assert grant.identity.user == "u2"
    assert calls.count("/v1.0/oauth2/accessToken") == 1  # T2 was used as is, not forgotten


async def test_a_user_outside_the_visible_range_is_denied(client: httpx.AsyncClient, clock: Clock) -> None:
    from dataclasses import replace

    sandbox = DingTalkSandbox(users=[replace(LISI, visible=False)], clock=clock)
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http)
        with pytest.raises(LoginDenied) as caught:
            await client_login(sandbox, provider)
    assert (caught.value.code, caught.value.provider_code) == ("user_not_allowed", 50002)


# -- ISV apps ---------------------------------------------------------------------------------


async def test_isv_exchanges_with_the_corp_token_of_the_reported_corp(
    sandbox: DingTalkSandbox, isv: DingTalkProvider, sent: list[httpx.Request]
) -> None:
    sandbox.set_current_user(ALICE.userid)
    grant = await client_login(sandbox, isv, corpId=OTHER_CORP_ID)
    assert (grant.identity.user, grant.identity.tenant) == (ALICE.userid, OTHER_CORP_ID)
    body = json.loads(next(r for r in sent if r.url.path == "/v1.0/oauth2/corpAccessToken").content)
    assert body == {"suiteKey": SANDBOX_SUITE_KEY, "suiteSecret": SANDBOX_SUITE_SECRET,
                    "authCorpId": OTHER_CORP_ID, "suiteTicket": sandbox.suite_ticket}
    sandbox.set_current_user(ZHANG.userid)
    await client_login(sandbox, isv, corpId=SANDBOX_CORP_ID)
    await client_login(sandbox, isv, corpId=SANDBOX_CORP_ID)
    assert sandbox.stats["corpAccessToken"] == 2  # one token per authorizing corp, each cached


async def test_isv_codes_of_another_corp_are_40078(sandbox: DingTalkSandbox, isv: DingTalkProvider) -> None:
    code = sandbox.mint_client_code()  # 张三's code in the first corp
    with pytest.raises(ReauthRequired) as caught:
        await isv.redeem(code, flow="client", redirect_uri=REDIRECT_URI, client_context={"corpId": OTHER_CORP_ID})
    assert caught.value.provider_code == 40078


async def test_isv_without_a_corp_or_with_a_bad_one_is_a_clear_error(isv: DingTalkProvider) -> None:
    with pytest.raises(ProviderError) as caught:
        await isv.redeem("code", flow="client", redirect_uri=REDIRECT_URI, client_context={})
    assert (caught.value.code, caught.value.status_code) == ("corp_unknown", 400)
    with pytest.raises(ProviderError) as caught:
        await isv.redeem("code", flow="client", redirect_uri=REDIRECT_URI, client_context={"corpId": "a b"})
    assert caught.value.code == "bad_request"
    with pytest.raises(ProviderError) as caught:
        await isv.redeem("code", flow="client", redirect_uri=REDIRECT_URI, client_context={"kind": "magic"})
    assert caught.value.code == "bad_request"


async def test_isv_without_any_suite_ticket_says_how_to_get_one(
    sandbox: DingTalkSandbox, client: httpx.AsyncClient
) -> None:
    provider = make_provider(sandbox, client, isv=True)
    with pytest.raises(ProviderMisconfigured) as caught:
        await client_login(sandbox, provider, corpId=SANDBOX_CORP_ID)
    assert "重新推送" in caught.value.message and sandbox.stats["corpAccessToken"] == 0


async def test_isv_with_a_stale_ticket_is_misconfigured_and_an_unauthorized_corp_denied(
    sandbox: DingTalkSandbox, isv: DingTalkProvider
) -> None:
    sandbox.rotate_suite_ticket()  # the seeded ticket is now dead
    with pytest.raises(ProviderMisconfigured) as caught:
        await client_login(sandbox, isv, corpId=SANDBOX_CORP_ID)
    assert caught.value.provider_code == "invalidSuiteTicket"
    await isv.save_suite_ticket(sandbox.suite_ticket, None)
    sandbox.authorized_corps.discard(SANDBOX_CORP_ID)
    with pytest.raises(LoginDenied) as caught_denied:
        await client_login(sandbox, isv, corpId=SANDBOX_CORP_ID)
    assert (caught_denied.value.code, caught_denied.value.provider_code) == ("app_not_installed", "invalidAuthInfo")


async def test_custom_apps_accept_any_seeded_ticket(clock: Clock) -> None:
    sandbox = DingTalkSandbox(custom_app=True, clock=clock)
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http, isv=True, suite_ticket="Test")
        grant = await client_login(sandbox, provider, corpId=SANDBOX_CORP_ID)
    assert grant.identity.user == ZHANG.userid


async def test_a_corp_token_revoked_by_a_reissue_is_replaced(clock: Clock) -> None:
    """The sheet: an ISV re-fetch returns a NEW token; if that kills the older one (unconfirmed),
    the provider forgets its cached token and fetches again, once."""
    sandbox = DingTalkSandbox(corp_token_reissue_revokes=True, clock=clock)
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http, isv=True, suite_ticket=sandbox.suite_ticket)
        await client_login(sandbox, provider, corpId=SANDBOX_CORP_ID)
        # Someone else (another deployment of the same suite) fetches a corp token.
        other = await http.post(BASE_URLS["api"] + "/v1.0/oauth2/corpAccessToken", json={
            "suiteKey": SANDBOX_SUITE_KEY, "suiteSecret": SANDBOX_SUITE_SECRET, "authCorpId": SANDBOX_CORP_ID,
            "suiteTicket": sandbox.suite_ticket})
        assert other.status_code == 200
        grant = await client_login(sandbox, provider, corpId=SANDBOX_CORP_ID)
    assert grant.identity.user == ZHANG.userid
    assert sandbox.stats["corpAccessToken"] == 3


# -- user tokens: browser OAuth and openAuth type 0 -------------------------------------------


async def test_browser_login_resolves_the_userid_through_the_corp(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, client: httpx.AsyncClient, sent: list[httpx.Request]
) -> None:
    grant = await browser_login(provider, client)
    assert (grant.identity.user, grant.identity.tenant, grant.identity.name) == (ZHANG.userid, SANDBOX_CORP_ID, "张三")
    assert grant.identity.extra["unionid"] == ZHANG.unionid
    tokens = grant.tokens
    assert tokens.refresh_token and tokens.expires_at - tokens.issued_at == 7200
    assert tokens.refresh_expires_at is not None and tokens.refresh_expires_at - tokens.issued_at == 30 * 86400
    exchange = json.loads(next(r for r in sent if r.url.path == "/v1.0/oauth2/userAccessToken").content)
    assert exchange["grantType"] == "authorization_code" and exchange["clientId"] == SANDBOX_APP_KEY
    me = next(r for r in sent if r.url.path == "/v1.0/contact/users/me")
    assert me.headers["x-acs-dingtalk-access-token"] == tokens.access_token and not me.url.query
    assert sandbox.stats["getbyunionid"] == 1


async def test_unionid_mode_trusts_the_corp_dingtalk_names(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> None:
    provider = make_provider(sandbox, client, user_id_field="unionid")
    grant = await browser_login(provider, client)
    assert (grant.identity.user, grant.identity.tenant) == (ZHANG.unionid, SANDBOX_CORP_ID)
    assert sandbox.stats["getbyunionid"] == 0


async def test_internal_browser_login_in_another_corp_is_refused(
    sandbox: DingTalkSandbox, client: httpx.AsyncClient
) -> None:
    sandbox.set_current_user(ALICE.userid)
    provider = make_provider(sandbox, client)
    code = sandbox.mint_user_code(with_corp=True)  # Alice picked her own organisation
    with pytest.raises(LoginDenied) as caught:
        await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)
    assert caught.value.code == "tenant_mismatch"


async def test_isv_browser_login_takes_the_corp_the_user_chose(
    sandbox: DingTalkSandbox, isv: DingTalkProvider, client: httpx.AsyncClient
) -> None:
    sandbox.set_current_user(ZHANG_OTHER.userid)
    code = await browser_code(isv, client, next_path=f"/?corpid={OTHER_CORP_ID}")
    grant = await isv.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)
    assert (grant.identity.user, grant.identity.tenant) == (ZHANG_OTHER.userid, OTHER_CORP_ID)


async def test_open_auth_code_proves_membership_of_the_reported_corp(
    sandbox: DingTalkSandbox, client: httpx.AsyncClient
) -> None:
    provider = make_provider(sandbox, client, isv=True, suite_ticket=sandbox.suite_ticket, user_id_field="unionid",
                             scopes=["Contact.User.Read"])
    code = sandbox.mint_user_code(client_id=SANDBOX_SUITE_KEY, scopes=["Contact.User.Read"])
    context = {"kind": "open_auth", "corpId": SANDBOX_CORP_ID}
    grant = await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI, client_context=context)
    assert (grant.identity.user, grant.identity.tenant) == (ZHANG.unionid, SANDBOX_CORP_ID)
    assert sandbox.stats["getbyunionid"] == 1  # no corpId in the answer: membership checked anyway
    # 李四 claiming the other organisation (where he is no member) is refused.
    sandbox.set_current_user(LISI.userid)
    code = sandbox.mint_user_code(client_id=SANDBOX_SUITE_KEY, scopes=["Contact.User.Read"])
    with pytest.raises(LoginDenied) as caught:
        await provider.redeem(code, flow="client", redirect_uri=REDIRECT_URI,
                              client_context={"kind": "open_auth", "corpId": OTHER_CORP_ID})
    assert (caught.value.code, caught.value.provider_code) == ("user_not_member", 60121)


async def test_a_used_user_code_needs_a_new_login(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, client: httpx.AsyncClient
) -> None:
    code = await browser_code(provider, client)
    await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)
    with pytest.raises(ReauthRequired) as caught:
        await provider.redeem(code, flow="browser", redirect_uri=REDIRECT_URI)
    assert caught.value.code == "reauth_required"


async def test_refresh_keeps_the_newest_refresh_token(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, client: httpx.AsyncClient
) -> None:
    grant = await browser_login(provider, client)
    sandbox.clock.now += 3600  # type: ignore[attr-defined]
    rotated = await provider.refresh(grant.tokens)
    assert rotated.access_token != grant.tokens.access_token
    assert rotated.refresh_token not in (None, grant.tokens.refresh_token)
    assert rotated.refresh_expires_at == sandbox.clock() + 30 * 86400
    assert rotated.extra == grant.tokens.extra  # the ids stay with the record
    with pytest.raises(ReauthRequired) as caught:
        await provider.refresh(grant.tokens)  # the sandbox rotates: the used one is dead
    assert caught.value.provider_code == "invalidParameter.refreshToken.notFound"
    assert_clean(caught.value, grant.tokens.refresh_token or "", grant.tokens.access_token)
    assert sandbox.stats["refresh_token"] == 2


async def test_refresh_without_rotation_keeps_the_token_and_its_expiry(clock: Clock) -> None:
    sandbox = DingTalkSandbox(rotate_refresh_tokens=False, clock=clock)
    async with httpx.AsyncClient(transport=sandbox.transport(BASE_URLS)) as http:
        provider = make_provider(sandbox, http)
        grant = await browser_login(provider, http)
        clock.now += 3600
        again = await provider.refresh(grant.tokens)
    assert again.refresh_token == grant.tokens.refresh_token
    assert again.refresh_expires_at == grant.tokens.refresh_expires_at


async def test_refresh_with_an_unknown_4xx_ends_the_record() -> None:
    def server(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"code": "invalidParameter.whatever", "message": "m", "requestid": "R1"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as http:
        provider = make_provider(DingTalkSandbox(), http)
        tokens = TokenSet(access_token="a", expires_at=1.0, refresh_token="r")
        with pytest.raises(ReauthRequired) as caught:
            await provider.refresh(tokens)
    assert "requestid R1" in caught.value.message


# -- error classification, end to end through the sandbox -------------------------------------


async def do_client(sandbox: DingTalkSandbox, provider: DingTalkProvider, http: httpx.AsyncClient) -> Grant:
    return await client_login(sandbox, provider)


async def do_browser(sandbox: DingTalkSandbox, provider: DingTalkProvider, http: httpx.AsyncClient) -> Grant:
    return await browser_login(provider, http)


@pytest.mark.parametrize(
    ("endpoint", "code", "action", "expected", "stable_code"),
    [
        ("accessToken", "invalidClientIdOrSecret", do_client, ProviderMisconfigured, "provider_misconfigured"),
        ("accessToken", "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", do_client, ProviderUnavailable,
         "rate_limited"),
        ("accessToken", "Forbidden.AccessDenied.IpNotInWhiteList", do_client, ProviderMisconfigured,
         "provider_misconfigured"),
        ("accessToken", "server.error", do_client, ProviderUnavailable, "provider_unavailable"),
        ("getuserinfo", 90002, do_client, ProviderUnavailable, "rate_limited"),
        ("getuserinfo", 90018, do_client, ProviderUnavailable, "rate_limited"),
        ("getuserinfo", -1, do_client, ProviderUnavailable, "provider_unavailable"),
        ("getuserinfo", 15, do_client, ProviderUnavailable, "provider_unavailable"),
        ("getuserinfo", 60011, do_client, ProviderMisconfigured, "provider_misconfigured"),
        ("getuserinfo", 60020, do_client, ProviderMisconfigured, "provider_misconfigured"),
        ("getuserinfo", 40078, do_client, ReauthRequired, "reauth_required"),
        ("getuserinfo", 22, do_client, ProviderMisconfigured, "provider_misconfigured"),
        ("userAccessToken:authorization_code", "invalidClientIdOrSecret", do_browser, ProviderMisconfigured,
         "provider_misconfigured"),
        ("userAccessToken:authorization_code", "Forbidden.AccessDenied.QpsLimitForApi", do_browser,
         ProviderUnavailable, "rate_limited"),
        ("users_me", "Forbidden.AccessDenied.AccessTokenPermissionDenied", do_browser, ProviderMisconfigured,
         "provider_misconfigured"),
        ("users_me", "InvalidAuthentication", do_browser, ReauthRequired, "reauth_required"),
        ("users_me", "Forbidden.AccessDenied.ApiCountLimitForOrg", do_browser, ProviderUnavailable, "rate_limited"),
        ("getbyunionid", 60011, do_browser, ProviderMisconfigured, "provider_misconfigured"),
        ("getbyunionid", 60121, do_browser, LoginDenied, "user_not_member"),
        ("getbyunionid", 90019, do_browser, ProviderUnavailable, "rate_limited"),
    ],
)
async def test_sandbox_errors_map_to_gateway_errors(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, client: httpx.AsyncClient, endpoint: str,
    code: str | int, action: Any, expected: type[ProviderError], stable_code: str,
) -> None:
    sandbox.inject_fault(endpoint, code)
    with pytest.raises(ProviderError) as caught:
        await action(sandbox, provider, client)
    assert type(caught.value) is expected
    assert caught.value.code == stable_code
    assert caught.value.provider_code == code
    assert str(code) in caught.value.message
    assert_clean(caught.value)


async def test_the_ip_block_is_transient_for_five_minutes(sandbox: DingTalkSandbox, provider: DingTalkProvider) -> None:
    sandbox.inject_fault("getuserinfo", "ip_block")
    with pytest.raises(ProviderUnavailable) as caught:
        await client_login(sandbox, provider)
    assert (caught.value.code, caught.value.retry_after_s) == ("rate_limited", 300)


@pytest.mark.parametrize(("endpoint", "status"), [("accessToken", 502), ("getuserinfo", 504), ("users_me", 404)])
async def test_non_json_answers_are_transient(
    sandbox: DingTalkSandbox, provider: DingTalkProvider, client: httpx.AsyncClient, endpoint: str, status: int
) -> None:
    sandbox.inject_fault(endpoint, status=status)
    with pytest.raises(ProviderUnavailable):
        if endpoint == "users_me":
            await browser_login(provider, client)
        else:
            await client_login(sandbox, provider)


async def test_unreachable_provider_is_transient(sandbox: DingTalkSandbox, client: httpx.AsyncClient) -> None:
    provider = make_provider(sandbox, client, api_base_url="http://nowhere.dingtalk.test")
    with pytest.raises(ProviderUnavailable) as caught:
        await client_login(sandbox, provider)
    assert caught.value.code == "provider_unreachable"


async def test_slow_provider_times_out_as_transient() -> None:
    sandbox = DingTalkSandbox(delay_s=1.0)
    async with serve_apps(sandbox.hosts()) as urls, httpx.AsyncClient(timeout=0.2) as http:
        settings = DingTalkSettings(**sandbox.provider_settings(urls))
        context = ProviderContext(name="dingtalk", redirect_uri=REDIRECT_URI, http=http, store=MemoryStore())
        with pytest.raises(ProviderUnavailable) as caught:
            await client_login(sandbox, DingTalkProvider(settings, context))
    assert caught.value.code == "provider_timeout"


# -- error classification, every code of the sheet --------------------------------------------

# New-style (section 9.1): code -> what the sheet says to do.
API_SHEET: dict[str, type[ProviderError]] = {
    "invalidClientIdOrSecret": ProviderMisconfigured, "invalidSuiteKey": ProviderMisconfigured,
    "invalidSuiteTicket": ProviderMisconfigured, "invalidAuthInfo": LoginDenied,
    "invalid.client": ProviderMisconfigured,
    "unsupported.grant.type": ProviderMisconfigured, "unauthorized.client": ProviderMisconfigured,
    "InvalidAuthentication": ReauthRequired, "AuthenticationFailed.MissingParameter": ProviderMisconfigured,
    "MissingBody": ProviderMisconfigured, "InvalidAction.NotFound": ProviderMisconfigured,
    "Forbidden.AccessDenied.AccessTokenPermissionDenied": ProviderMisconfigured,
    "Forbidden.AccessDenied.IpNotInWhiteList": ProviderMisconfigured,
    "Forbidden.AccessDenied.QpsLimitForApi": ProviderUnavailable,
    "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi": ProviderUnavailable,
    "Forbidden.AccessDenied.QpmLimitForAppkeyAndApi": ProviderUnavailable,
    "Forbidden.AccessDenied.QpsLimitForSuitekeyAndOrgAndApi": ProviderUnavailable,
    "Forbidden.AccessDenied.ApiCountLimitForOrg": ProviderUnavailable, "accesstoken.expired": ReauthRequired,
    "invalidParameter.authCode.notFound": ReauthRequired,
}

# Old-style (section 9.2): errcode -> what the sheet says to do.
OAPI_SHEET: dict[int, type[ProviderError]] = {
    -1: ProviderUnavailable, 15: ProviderUnavailable, 22: ProviderMisconfigured, 40001: ProviderMisconfigured,
    40014: ProviderUnavailable, 42001: ProviderUnavailable, 40078: ReauthRequired, 40029: ReauthRequired,
    42003: ReauthRequired, 42002: ReauthRequired, 42008: ReauthRequired, 42009: ProviderUnavailable,
    40080: ProviderMisconfigured, 40082: ProviderMisconfigured, 40083: ProviderMisconfigured,
    40088: ProviderMisconfigured, 40085: ProviderMisconfigured, 40089: ProviderMisconfigured,
    40096: ProviderMisconfigured, 41001: ProviderMisconfigured, 41023: ProviderMisconfigured,
    41027: ProviderMisconfigured, 43007: LoginDenied, 48003: ProviderUnavailable, 48004: LoginDenied,
    50002: LoginDenied, 60011: ProviderMisconfigured, 60020: ProviderMisconfigured, 70003: LoginDenied,
    **{code: ProviderUnavailable for code in range(90001, 90015)}, 90018: ProviderUnavailable,
    90019: ProviderUnavailable, 90020: ProviderUnavailable,
}


@pytest.mark.parametrize(("code", "expected"), sorted(API_SHEET.items()))
def test_every_new_style_code_of_the_sheet_is_classified(code: str, expected: type[ProviderError]) -> None:
    status = 403 if code.startswith("Forbidden") else 400
    response = httpx.Response(status, json={"code": code, "message": "m", "requestid": "REQ1"})
    _, error = classify_api(response, operation="code exchange")
    assert type(error) is expected
    assert error.provider_code == code and "REQ1" in error.message
    if code.startswith("Forbidden.AccessDenied.Q"):
        assert error.code == "rate_limited"


@pytest.mark.parametrize(("code", "expected"), sorted(OAPI_SHEET.items()))
def test_every_old_style_code_of_the_sheet_is_classified(code: int, expected: type[ProviderError]) -> None:
    response = httpx.Response(200, json={"errcode": code, "errmsg": "m", "request_id": "r1"})
    _, error = classify_oapi(response, operation="code exchange")
    assert type(error) is expected and error.provider_code == code and error.message
    if 90001 <= code <= 90020:
        assert error.code == "rate_limited"


@pytest.mark.parametrize(
    ("sub_code", "expected"),
    [("40014", ProviderUnavailable), ("40078", ReauthRequired), ("", ProviderUnavailable),
     ("60011", ProviderMisconfigured)],
)
def test_errcode_88_is_read_through_its_sub_code(sub_code: str, expected: type[ProviderError]) -> None:
    body = {"errcode": 88, "errmsg": "鉴权异常", "sub_code": sub_code, "sub_msg": "x"}
    _, error = classify_oapi(httpx.Response(200, json=body), operation="code exchange")
    assert type(error) is expected


def test_errcode_0_and_string_zero_are_success_and_bodies_without_errcode_are_not() -> None:
    assert classify_oapi(httpx.Response(200, json={"errcode": 0, "result": {}}), operation="user lookup")[1] is None
    assert classify_oapi(httpx.Response(200, json={"errcode": "0"}), operation="user lookup")[1] is None
    _, error = classify_oapi(httpx.Response(200, json={"result": {}}), operation="user lookup")
    assert isinstance(error, ProviderError)


@pytest.mark.parametrize(
    ("operation", "expected"),
    [("code exchange", ReauthRequired), ("refresh", ReauthRequired), ("user info", ProviderError),
     ("app token", ProviderError)],
)
def test_unknown_new_style_codes_end_a_grant_but_nothing_else(operation: Any, expected: type[ProviderError]) -> None:
    _, error = classify_api(httpx.Response(400, json={"code": "somethingNew"}), operation=operation)
    assert type(error) is expected and error.provider_code == "somethingNew"


def test_5xx_429_ip_block_and_non_json_are_transient() -> None:
    for response in (
        httpx.Response(504, text=""),
        httpx.Response(503, json={"code": "invalidClientIdOrSecret"}),
        httpx.Response(429, json={"code": "x"}),
        httpx.Response(200, json={"status": 1111, "wait": 5, "source": "x5", "punish": "deny", "uuid": "u"}),
        httpx.Response(403, text="<html>blocked</html>"),
    ):
        _, error = classify_api(response, operation="user info")
        assert isinstance(error, ProviderUnavailable), response
        _, error = classify_oapi(response, operation="code exchange")
        assert isinstance(error, ProviderUnavailable), response


# -- the suiteTicket callback endpoint --------------------------------------------------------


@pytest.fixture
async def gateway_http(isv: DingTalkProvider) -> AsyncIterator[httpx.AsyncClient]:
    """The provider's routes mounted as the core mounts them, reachable in process."""
    app = Starlette(routes=[Mount("/_gateway/providers/dingtalk", routes=list(isv.routes()))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw.test") as http:
        yield http


EVENTS_URL = "http://gw.test/_gateway/providers/dingtalk/events"


async def test_a_pushed_suite_ticket_is_stored_and_acknowledged(
    sandbox: DingTalkSandbox, isv: DingTalkProvider, gateway_http: httpx.AsyncClient
) -> None:
    result = await sandbox.push_suite_ticket(EVENTS_URL, client=gateway_http)
    assert result.ok, result.error
    assert await isv.suite_ticket() == sandbox.suite_ticket  # the push replaced the seed
    sandbox.set_current_user(ALICE.userid)
    grant = await client_login(sandbox, isv, corpId=OTHER_CORP_ID)
    assert grant.identity.tenant == OTHER_CORP_ID
    check = await sandbox.check_callback_url(EVENTS_URL, client=gateway_http)
    assert check.ok and sandbox.stats["callback_ok"] == 2


async def test_an_older_push_does_not_replace_a_newer_ticket(
    sandbox: DingTalkSandbox, isv: DingTalkProvider, gateway_http: httpx.AsyncClient
) -> None:
    await sandbox.push_suite_ticket(EVENTS_URL, client=gateway_http)
    newest = sandbox.suite_ticket
    late = {"SuiteKey": SANDBOX_SUITE_KEY, "EventType": "suite_ticket", "TimeStamp": 1, "SuiteTicket": "old-retry"}
    result = await sandbox.deliver_event(late, EVENTS_URL, client=gateway_http)
    assert result.ok  # acknowledged, so DingTalk stops re-pushing it
    assert await isv.suite_ticket() == newest


async def test_callbacks_with_a_wrong_signature_or_owner_are_refused(
    sandbox: DingTalkSandbox, isv: DingTalkProvider, gateway_http: httpx.AsyncClient
) -> None:
    seeded = await isv.suite_ticket()
    forger = DingTalkSandbox(callback_token="anotherToken1")
    wrong_token = await forger.push_suite_ticket(EVENTS_URL, client=gateway_http)
    assert (wrong_token.ok, wrong_token.status) == (False, 403)
    wrong_owner = await sandbox.deliver_event({"EventType": "suite_ticket", "SuiteTicket": "x"}, EVENTS_URL,
                                              client=gateway_http, owner_key="suiteSomeoneElse")
    assert (wrong_owner.ok, wrong_owner.status) == (False, 403)
    answer = await gateway_http.post(EVENTS_URL + "?signature=x&timestamp=1&nonce=n", json={"encrypt": "AAAA"})
    assert answer.status_code == 403 and answer.json()["errcode"] == 900005
    not_json = await gateway_http.post(EVENTS_URL + "?signature=x&timestamp=1&nonce=n", content=b"encrypt=x")
    assert not_json.status_code == 400
    assert await isv.suite_ticket() == seeded


def test_the_callback_route_exists_only_when_configured(provider: DingTalkProvider, isv: DingTalkProvider) -> None:
    assert list(provider.routes()) == []
    assert [getattr(route, "path", None) for route in isv.routes()] == ["/events"]


# -- bridge.js --------------------------------------------------------------------------------

BRIDGE = Path(__file__).resolve().parents[1] / "plugins" / "dingtalk" / "bridge.js"


def test_bridge_is_es5() -> None:
    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", BRIDGE.read_text(), flags=re.S)
    for pattern in (r"=>", r"\blet\s", r"\bconst\s", r"\basync\b", r"\bawait\b", r"\?\.", r"`", r"\bclass\s",
                    r"\.\.\.", r"\bURLSearchParams\b"):
        assert not re.search(pattern, source), pattern


# Each scenario fakes window.dd, runs requestCode and prints the outcome and the JSAPI calls.
BRIDGE_HARNESS = r"""
var fs = require("fs");
function ok(value) { return function (o) { log.push(o); return Promise.resolve(value); }; }
function fail(err) { return function (o) { log.push(o); return Promise.reject(err); }; }
function cb(value) { return function (o) { log.push(o); setTimeout(function () { o.onSuccess(value); }, 0); }; }
function never() { return function (o) { log.push(o); return new Promise(function () {}); }; }
function env(platform, version) { return { platform: platform, version: version || "7.8.1" }; }
function ready(cb) { setTimeout(cb, 0); }
function component(answer) {
  return { callComponent: function (o) { log.push(o); return Promise.resolve({ detail: { extraData: answer } }); },
           openModal: function (o) { log.push(o); return Promise.resolve(JSON.stringify(answer)); } };
}
var scenarios = {
  missing: function () {},
  not_in_dingtalk: function () { window.dd = { env: env("notInDingTalk"), ready: function () {} }; },
  government: function () { window.dd = { env: env("gdtAndroid"), ready: ready, requestAuthCode: ok({ code: "G" }) }; },
  new_api: function () { window.dd = { env: env("android"), ready: ready, requestAuthCode: ok({ code: "NEW" }),
                                       runtime: { permission: { requestAuthCode: ok({ code: "OLD" }) } } }; },
  callbacks_only: function () { window.dd = { env: env("ios"), ready: ready, requestAuthCode: cb({ code: "CB" }) }; },
  old_sdk: function () { window.dd = { env: env("ios"), ready: ready,
                                       runtime: { permission: { requestAuthCode: ok({ code: "OLD" }) } } }; },
  new_fails: function () { window.dd = { env: env("android"), ready: ready,
                                         requestAuthCode: fail({ errorCode: "1", errorMessage: "not_exist" }),
                                         runtime: { permission: { requestAuthCode: ok({ code: "OLD" }) } } }; },
  both_fail: function () { window.dd = { env: env("android"), ready: ready,
                                         requestAuthCode: fail({ errorCode: "1", errorMessage: "not_exist" }),
                                         runtime: { permission: { requestAuthCode: fail({ errorCode: "7" }) } } }; },
  never_ready: function () { window.dd = { env: env("android"), ready: function () {}, requestAuthCode: ok({}) }; },
  jsapi_hangs: function () { window.dd = { env: env("android"), ready: ready, requestAuthCode: never() }; },
  no_api: function () { window.dd = { env: env("android"), ready: ready }; },
  user_ok_mobile: function () {
    window.dd = { env: env("android"), ready: ready,
                  biz: { util: component({ status: "ok", result: { authCode: "OA" } }) } };
  },
  user_ok_pc: function () { window.dd = { env: env("pc"), ready: ready,
                                          biz: { util: component({ status: "ok", result: { authCode: "PC" } }) } }; },
  user_cancel: function () { window.dd = { env: env("android"), ready: ready,
                                           biz: { util: component({ status: "cancel", result: null }) } }; },
  user_to_admin: function () { window.dd = { env: env("android"), ready: ready,
                                             biz: { util: component({ status: "toAdmin", result: null }) } }; },
  user_failed: function () {
    window.dd = { env: env("android"), ready: ready,
                  biz: { util: component({ status: "failed", result: { code: 500104 } }) } };
  },
  user_closed: function () { window.dd = { env: env("android"), ready: ready, biz: { util: component(null) } }; },
  user_old_client: function () { window.dd = { env: env("android", "6.3.0"), ready: ready,
                                                biz: { util: component({ status: "ok" }) } }; },
  admin_to_admin: function () { window.dd = { env: env("android"), ready: ready, requestAuthCode: ok({ code: "N" }),
                                              biz: { util: component({ status: "toAdmin", result: null }) } }; },
  admin_failed: function () { window.dd = { env: env("android"), ready: ready, requestAuthCode: ok({ code: "N" }),
                                            biz: { util: component({ status: "failed", result: null }) } }; },
  admin_ok: function () { window.dd = { env: env("android"), ready: ready, requestAuthCode: ok({ code: "N" }),
                                        biz: { util: component({ status: "ok", result: null }) } }; }
};
var tools = {
  withTimeout: function (promise, ms, what) {
    return Promise.race([promise, new Promise(function (resolve, reject) {
      setTimeout(function () { reject({ outcome: "fallback", message: what + " did not answer in time" }); }, ms);
    })]);
  }
};
var name = process.argv[2];
var config = JSON.parse(process.argv[4]);
var log = [];
global.window = global;
window.location = { search: process.argv[5] || "" };
window.console = console;
var storage = {};
window.localStorage = { getItem: function (k) { return storage[k] || null; },
                        setItem: function (k, v) { storage[k] = v; } };
scenarios[name]();
eval(fs.readFileSync(process.argv[3], "utf8"));
window.gatewayBridges.dingtalk.requestCode(config, tools).then(function (result) {
  console.log(JSON.stringify({ resolved: result, calls: log }));
}, function (error) {
  console.log(JSON.stringify({ rejected: error, calls: log }));
});
"""

BASE_CONFIG = {"clientId": "dingapp", "corpId": "dingcorp", "corpIdFromPage": False, "scopes": "",
               "fieldScopes": "", "appScopes": "", "timeout_ms": 50}


def run_bridge(tmp_path: Path, scenario: str, search: str = "", **config: Any) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "harness.js"
    harness.write_text(BRIDGE_HARNESS)
    args = [node, str(harness), scenario, str(BRIDGE), json.dumps({**BASE_CONFIG, **config}), search]
    done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_bridge_uses_the_new_api_with_corp_and_client(tmp_path: Path) -> None:
    result = run_bridge(tmp_path, "new_api")
    assert result["resolved"] == {"code": "NEW", "context": {"kind": "auth_code", "corpId": "dingcorp"}}
    assert result["calls"][0]["corpId"] == "dingcorp" and result["calls"][0]["clientId"] == "dingapp"


def test_bridge_takes_the_page_corpid_only_for_isv_apps(tmp_path: Path) -> None:
    isv = run_bridge(tmp_path, "new_api", "?next=%2F&corpid=dingpage", corpIdFromPage=True)
    assert isv["resolved"]["context"]["corpId"] == "dingpage"
    internal = run_bridge(tmp_path, "new_api", "?corpid=dingpage")
    assert internal["resolved"]["context"]["corpId"] == "dingcorp"


@pytest.mark.parametrize(("scenario", "code"), [("callbacks_only", "CB"), ("old_sdk", "OLD"), ("new_fails", "OLD")])
def test_bridge_reaches_a_code_through_either_api(tmp_path: Path, scenario: str, code: str) -> None:
    result = run_bridge(tmp_path, scenario)
    assert result["resolved"]["code"] == code
    if code == "OLD":
        assert result["calls"][-1] == {"corpId": "dingcorp"}  # the old API takes no clientId


@pytest.mark.parametrize(
    ("scenario", "config", "outcome", "words"),
    [
        ("missing", {}, "fallback", "window.dd is missing"),
        ("not_in_dingtalk", {}, "fallback", "not running inside DingTalk"),
        ("government", {}, "fallback", "not the public DingTalk client (gdtAndroid)"),
        ("new_api", {"corpId": ""}, "fallback", "no corpid"),
        ("both_fail", {}, "fallback", "errorCode 1, not_exist; then errorCode 7"),
        ("never_ready", {}, "fallback", "dd.ready did not answer in time"),
        ("jsapi_hangs", {}, "fallback", "dd.requestAuthCode did not answer in time"),
        ("no_api", {}, "fallback", "no requestAuthCode"),
        ("user_cancel", {"scopes": "Contact.User.Read"}, "denied", "declined"),
        ("user_closed", {"scopes": "Contact.User.Read"}, "denied", "declined"),
        ("user_to_admin", {"scopes": "Contact.User.Read"}, "pending", "administrator"),
        ("user_failed", {"scopes": "Contact.User.Read"}, "fallback", "code 500104"),
        ("user_old_client", {"scopes": "Contact.User.Read"}, "fallback", "older than 6.3.35"),
        ("admin_to_admin", {"appScopes": ".default"}, "pending", "administrator"),
    ],
)
def test_bridge_outcomes(tmp_path: Path, scenario: str, config: dict[str, str], outcome: str, words: str) -> None:
    rejected = run_bridge(tmp_path, scenario, **config)["rejected"]
    assert rejected["outcome"] == outcome
    assert words in rejected["message"]


@pytest.mark.parametrize(("scenario", "code"), [("user_ok_mobile", "OA"), ("user_ok_pc", "PC")])
def test_bridge_open_auth_type_0_gives_a_user_code(tmp_path: Path, scenario: str, code: str) -> None:
    result = run_bridge(tmp_path, scenario, scopes="Contact.User.Read", fieldScopes="Contact.User.mobile")
    assert result["resolved"] == {"code": code, "context": {"kind": "open_auth", "corpId": "dingcorp"}}
    call = result["calls"][0]
    query = "type=0&clientId=dingapp&corpId=dingcorp&rpcScope=Contact.User.Read&fieldScope=Contact.User.mobile"
    if scenario == "user_ok_pc":
        assert call["url"] == "https://n.dingtalk.com/dingding/h5-common-authority/auth/index.html?" + query
    else:
        assert call["componentType"] == "miniProgram"
        assert call["params"]["miniAppId"] == "5000000000174977"
        assert call["params"]["page"] == "pages/auth/index?" + query


@pytest.mark.parametrize("scenario", ["admin_ok", "admin_failed"])
def test_bridge_admin_consent_then_the_free_login_code(tmp_path: Path, scenario: str) -> None:
    result = run_bridge(tmp_path, scenario, appScopes=".default")
    assert result["resolved"]["code"] == "N"
    page = result["calls"][0]["params"]["page"]
    assert "type=1&clientId=dingapp&corpId=dingcorp&rpcScope=.default&fieldScope=" in page
