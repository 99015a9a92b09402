"""DingTalk end to end: AuthGateway around an app, uvicorn on loopback, the emulator on its own ports.

No mocks: every hop is a real HTTP request. The in-client handshake runs twice over: as HTTP calls
(the page's exchange, with a code the emulator mints as the client would) and in real Chromium
loading the emulator's fake ``dingtalk.open.js``, for what only the page decides (the 40078 retry,
the authorization component's toAdmin / cancel / failed).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from plugins.dingtalk.provider import DingTalkProvider
from plugins.dingtalk.sandbox import DEFAULT_USERS, OTHER_CORP_ID, SANDBOX_CORP_ID, DingTalkSandbox
from tests.conftest import BROWSER_UA, HTML, echo_app, free_port, headers_of, open_simulated_client

# One Chromium for the module (conftest's ``module_browser``): its tests and their fixtures share
# the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

ZHANG, LISI, ALICE, ZHANG_OTHER = DEFAULT_USERS
DINGTALK_UA = (
    "Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 "
    "Chrome/120.0.6099.230 Mobile Safari/537.36 AliApp(DingTalk/7.8.1) com.alibaba.android.rimet/13534898 "
    "Channel/212200 language/zh-CN UT4Aplus/0.2.25 colorScheme/light"
)
DINGTALK_PC_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0.5359.215 "
    "Safari/537.36 dingtalk-win/1.0.0 nw(0.14.7) DingTalk(7.8.10-Release.250724002) Mojo/1.0.0 Native "
    "AppType(release) Channel/201200 Architecture/x86_64"
)


@dataclass
class Served:
    sandbox: DingTalkSandbox
    urls: dict[str, str]


@pytest_asyncio.fixture(loop_scope="module")
async def dingtalk() -> AsyncIterator[Served]:
    sandbox = DingTalkSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        yield Served(sandbox, urls)


@dataclass
class Running:
    url: str
    gateway: AuthGateway

    @property
    def events_url(self) -> str:
        return f"{self.url}/_gateway/providers/dingtalk/events"

    @property
    def provider(self) -> DingTalkProvider:
        provider = self.gateway.runtime.providers["dingtalk"]
        assert isinstance(provider, DingTalkProvider)
        return provider

    def client(self, user_agent: str = BROWSER_UA) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": user_agent}, timeout=10)


Starter = Callable[..., AbstractAsyncContextManager[Running]]


@pytest.fixture
def start(dingtalk: Served) -> Starter:
    """``async with start(isv=False, **settings) as running``: the gateway for the served emulator."""

    @asynccontextmanager
    async def run(*, isv: bool = False, **overrides: Any) -> AsyncIterator[Running]:
        sandbox = dingtalk.sandbox
        base = sandbox.isv_settings(dingtalk.urls) if isv else sandbox.provider_settings(dingtalk.urls)
        port = free_port()
        config = GatewayConfig(
            public_url=f"http://127.0.0.1:{port}",
            session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
            providers={"dingtalk": {**base, **overrides}},
        )
        gateway = AuthGateway(echo_app(), config)
        try:
            async with serve_apps({"gateway": gateway}, port=port) as urls:
                yield Running(urls["gateway"], gateway)
        finally:
            await gateway.aclose()

    return run


def page_config(html: str) -> dict[str, Any]:
    match = re.search(r'<script id="gw-config" type="application/json">(.*?)</script>', html, re.S)
    assert match, "the handshake page embeds its config"
    return dict(json.loads(match.group(1).replace("<\\/", "</")))


async def in_client_login(running: Running, client: httpx.AsyncClient, code: str, path: str = "/inbox",
                          corp: str | None = None) -> httpx.Response:
    """What the handshake page does inside DingTalk: GET the page, POST the client's code."""
    page = await client.get(path, headers=HTML, follow_redirects=True)
    assert page.status_code == 200 and "gw-config" in page.text, page.text
    config = page_config(page.text)
    bridge = config["bridge"]
    context = {"kind": "auth_code", "corpId": corp or bridge["corpId"]}
    return await client.post("/_gateway/exchange/dingtalk", json={"code": code, "state": config["state"],
                                                                   "context": context},
                             headers={"origin": running.url})


# -- internal app -----------------------------------------------------------------------------


async def test_internal_app_logs_in_through_both_flows_as_the_same_user(start: Starter, dingtalk: Served) -> None:
    async with start() as running:
        async with running.client() as client:
            answer = await client.get("/orders?id=7", headers=HTML, follow_redirects=True)
            assert answer.status_code == 200 and str(answer.url).endswith("/orders?id=7")
            received = headers_of(answer)
            assert received["x-auth-user"] == [ZHANG.userid]
            assert received["x-auth-tenant"] == [SANDBOX_CORP_ID]
            assert received["x-auth-provider"] == ["dingtalk"]
            assert unquote(received["x-auth-name"][0]) == "张三"
            me = await client.get("/_gateway/me")
            expected = {"provider": "dingtalk", "user": ZHANG.userid, "tenant": SANDBOX_CORP_ID, "name": "张三"}
            assert me.json() == expected

        async with running.client(DINGTALK_UA) as client:
            exchange = await in_client_login(running, client, dingtalk.sandbox.mint_client_code())
            assert exchange.status_code == 200, exchange.text
            assert exchange.json() == {"next": "/inbox"}
            inbox = await client.get("/inbox")
            assert headers_of(inbox)["x-auth-user"] == [ZHANG.userid]  # the same id as the browser flow
    stats = dingtalk.sandbox.stats
    assert (stats["authorization_code"], stats["getbyunionid"], stats["getuserinfo"]) == (1, 1, 1)
    assert stats["accessToken"] == 1  # one app token served both flows


async def test_a_used_code_answers_reauth_and_the_next_handshake_succeeds(start: Starter, dingtalk: Served) -> None:
    async with start() as running, running.client(DINGTALK_UA) as client:
        code = dingtalk.sandbox.mint_client_code()
        assert (await in_client_login(running, client, code)).status_code == 200
        await client.post("/_gateway/logout", headers={"origin": running.url})
        reused = await in_client_login(running, client, code)
        # The page retries exactly this error once (its retryUrl), then shows a page.
        assert reused.status_code == 401 and reused.json()["error"] == "reauth_required"
        assert "already used or has expired" in reused.json()["message"]
        again = await in_client_login(running, client, dingtalk.sandbox.mint_client_code(), path="/inbox")
        assert again.status_code == 200


async def test_declined_browser_consent_ends_on_a_clear_page(dingtalk: Served, start: Starter) -> None:
    dingtalk.sandbox.auto_consent = False
    async with start() as running, running.client() as client:
        consent = await client.get("/x", headers=HTML, follow_redirects=True)
        ticket = re.search(r'name="ticket" value="([^"]+)"', consent.text)
        assert ticket, consent.text
        denied = await client.post(f"{dingtalk.urls['login']}/_sandbox/consent",
                                   data={"ticket": ticket.group(1), "decision": "deny"}, follow_redirects=True,
                                   headers=HTML)
        assert denied.status_code == 403 and "text/html" in denied.headers["content-type"]
        assert "declined" in denied.text and "/_gateway/login?" in denied.text  # a way forward


async def test_a_user_outside_the_apps_corp_is_refused_in_the_browser(start: Starter, dingtalk: Served) -> None:
    dingtalk.sandbox.set_current_user(ALICE.userid)
    async with start() as running, running.client() as client:
        answer = await client.get("/x", headers=HTML, follow_redirects=True)
    assert answer.status_code == 400  # the login page refuses the internal app's corpId for Alice
    dingtalk.sandbox.set_current_user(ZHANG.userid)


# -- ISV app ----------------------------------------------------------------------------------


async def test_isv_app_survives_a_suite_ticket_rotation(start: Starter, dingtalk: Served) -> None:
    sandbox = dingtalk.sandbox
    async with start(isv=True) as running:
        sandbox.callback_url = running.events_url
        assert (await sandbox.check_callback_url()).ok  # the console's check when the URL is saved
        first = await sandbox.push_suite_ticket()
        assert first.ok, first.error

        sandbox.set_current_user(ALICE.userid)
        async with running.client(DINGTALK_UA) as client:
            answer = await in_client_login(running, client, sandbox.mint_client_code(client_id=sandbox.suite_key),
                                           path=f"/app?corpid={OTHER_CORP_ID}")
            assert answer.status_code == 200, answer.text
            assert headers_of(await client.get("/app"))["x-auth-tenant"] == [OTHER_CORP_ID]
        assert sandbox.stats["corpAccessToken"] == 1

        # DingTalk pushes a new ticket: the old one dies, the gateway keeps the new one.
        rotated = await sandbox.push_suite_ticket()
        assert rotated.ok and await running.provider.suite_ticket() == sandbox.suite_ticket
        sandbox.set_current_user(ZHANG.userid)
        async with running.client(DINGTALK_UA) as client:  # another corp: a corp token with the new ticket
            answer = await in_client_login(running, client, sandbox.mint_client_code(client_id=sandbox.suite_key),
                                           path=f"/app?corpid={SANDBOX_CORP_ID}")
            assert answer.status_code == 200, answer.text
        assert sandbox.stats["corpAccessToken"] == 2

        # A push that never reaches the gateway: once a corp token must be fetched, the login
        # fails with the operator's hint; DingTalk's next push (重新推送) repairs it.
        sandbox.rotate_suite_ticket()
        await running.provider.app_tokens.invalidate(running.provider._app_token_key(OTHER_CORP_ID))
        sandbox.set_current_user(ALICE.userid)
        async with running.client(DINGTALK_UA) as client:
            failed = await in_client_login(running, client, sandbox.mint_client_code(client_id=sandbox.suite_key),
                                           path=f"/app?corpid={OTHER_CORP_ID}")
            assert failed.status_code == 502 and failed.json()["error"] == "provider_misconfigured"
            assert "重新推送" in failed.json()["message"]
            assert (await sandbox.push_suite_ticket(rotate=False)).ok
            recovered = await in_client_login(running, client, sandbox.mint_client_code(client_id=sandbox.suite_key),
                                              path=f"/app?corpid={OTHER_CORP_ID}")
            assert recovered.status_code == 200, recovered.text
    sandbox.set_current_user(ZHANG.userid)


async def test_isv_browser_login_uses_the_corp_of_the_app_path(start: Starter, dingtalk: Served) -> None:
    sandbox = dingtalk.sandbox
    sandbox.set_current_user(ZHANG_OTHER.userid)
    try:
        async with start(isv=True, suite_ticket=sandbox.suite_ticket) as running, running.client() as client:
            answer = await client.get(f"/app?corpid={OTHER_CORP_ID}", headers=HTML, follow_redirects=True)
            assert answer.status_code == 200, answer.text
            received = headers_of(answer)
            assert received["x-auth-user"] == [ZHANG_OTHER.userid] and received["x-auth-tenant"] == [OTHER_CORP_ID]
    finally:
        sandbox.set_current_user(ZHANG.userid)


async def test_isv_callback_refuses_forgeries(start: Starter, dingtalk: Served) -> None:
    async with start(isv=True) as running:
        forger = DingTalkSandbox(callback_aes_key="F" * 43)
        forged = await forger.push_suite_ticket(running.events_url)
        assert not forged.ok and forged.status == 403
        assert await running.provider.suite_ticket() is None
        async with running.client() as client:
            wrong_method = await client.get("/_gateway/providers/dingtalk/events")
            assert wrong_method.status_code == 405


# -- the page, in real Chromium with the emulator's dingtalk.open.js ---------------------------


Opener = Callable[..., Awaitable[Page]]


@pytest.fixture
def open_app(module_browser: Browser) -> Opener:
    """``await open_app(running, path, user_agent)``: a page of a fresh DingTalk client on ``path``;
    no simulator script, as the page loads the emulator's own ``dingtalk.open.js``."""

    async def open_page(running: Running, path: str, user_agent: str = DINGTALK_UA) -> Page:
        client = await open_simulated_client(module_browser, user_agent=user_agent, init_script=None)
        await client.page.goto(running.url + path)
        return client.page

    return open_page


async def wait_for_app(page: Page, path: str) -> dict[str, Any]:
    await page.wait_for_url(re.compile(re.escape(path) + "$"), timeout=15000)
    return dict(json.loads(await page.text_content("body") or "{}"))


async def wait_for_title(page: Page, title: str) -> str:
    await page.wait_for_function(
        "title => document.getElementById('gw-title') && document.getElementById('gw-title').textContent === title",
        arg=title, timeout=15000,
    )
    return str(await page.text_content("#gw-status"))


def received_user(answer: dict[str, Any]) -> str:
    return next(value for name, value in answer["headers"] if name == "x-auth-user")


async def test_chromium_signs_in_silently_and_retries_a_40078_once(
    start: Starter, dingtalk: Served, open_app: Opener
) -> None:
    sdk = dingtalk.urls["api"] + "/_sandbox/dingtalk.open.js"
    async with start(jssdk_url=sdk) as running:
        page = await open_app(running, "/inbox")
        assert received_user(await wait_for_app(page, "/inbox")) == ZHANG.userid
        assert dingtalk.sandbox.stats["authorization_code"] == 0  # no browser OAuth involved

        dingtalk.sandbox.inject_fault("getuserinfo", 40078)  # the first code is "already used"
        page = await open_app(running, "/retry")
        assert received_user(await wait_for_app(page, "/retry")) == ZHANG.userid
        assert dingtalk.sandbox.stats["jsapi_code"] == 3  # one, then one more after the retry

        dingtalk.sandbox.inject_fault("getuserinfo", 40078, times=2)
        page = await open_app(running, "/twice")
        status = await wait_for_title(page, "Sign-in did not complete")
        assert "already used or has expired" in status
        assert await page.locator("#gw-actions a").count() == 2  # try again, or the browser sign-in


@pytest.mark.parametrize(
    ("status", "title", "words"),
    [
        ("toAdmin", "Waiting for your administrator", "administrator"),
        ("cancel", "Sign-in was declined", "declined"),
    ],
)
async def test_chromium_shows_the_authorization_components_answer(
    start: Starter, dingtalk: Served, open_app: Opener, status: str, title: str, words: str
) -> None:
    dingtalk.sandbox.open_auth_status = status  # type: ignore[assignment]
    sdk = dingtalk.urls["api"] + "/_sandbox/dingtalk.open.js"
    async with start(jssdk_url=sdk, scopes=["Contact.User.Read"]) as running:
        page = await open_app(running, "/x")
        assert words in await wait_for_title(page, title)
    dingtalk.sandbox.open_auth_status = None


async def test_chromium_open_auth_ok_gives_a_user_token_and_failed_falls_back(
    start: Starter, dingtalk: Served, open_app: Opener
) -> None:
    sdk = dingtalk.urls["api"] + "/_sandbox/dingtalk.open.js"
    async with start(jssdk_url=sdk, scopes=["Contact.User.Read"]) as running:
        page = await open_app(running, "/mobile")  # Android: biz.util.callComponent
        assert received_user(await wait_for_app(page, "/mobile")) == ZHANG.userid
        page = await open_app(running, "/pc", DINGTALK_PC_UA)  # PC: biz.util.openModal
        assert received_user(await wait_for_app(page, "/pc")) == ZHANG.userid
        stats = dingtalk.sandbox.stats
        assert (stats["open_auth"], stats["authorization_code"], stats["authorize"]) == (2, 2, 0)

        dingtalk.sandbox.open_auth_status = "failed"
        page = await open_app(running, "/failed")
        # "failed" falls back to the browser OAuth, which asks the same consent and succeeds.
        assert received_user(await wait_for_app(page, "/failed")) == ZHANG.userid
        assert dingtalk.sandbox.stats["authorize"] == 1
    dingtalk.sandbox.open_auth_status = None
