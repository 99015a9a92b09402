"""The DingTalk handshake page in real Chromium, with a DingTalk User-Agent and simulated ``dd`` globals.

Each test serves the gateway (``jssdk_url: ""``: the globals are already there) and the emulator on
loopback, and gives Chromium an init script that defines ``window.dd`` the way a case needs: the new
``dd.requestAuthCode``, only the old ``dd.runtime.permission.requestAuthCode``, the authorization
component (``biz.util.callComponent`` on mobile, ``biz.util.openModal`` on PC) with each status.
The codes the fake hands out are minted by the emulator beforehand, so the gateway redeems real ones.
Every JSAPI call is reported to the test through an exposed function.

The last test walks the demo: the gateway with ``demo_settings`` (the emulator's fake
``dingtalk.open.js``) behind the demo's simulated client, as ``gateway demo`` wires it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page

from gateway.config import GatewayConfig
from gateway.demo import SimulatedClient as DemoClient  # the demo's User-Agent app, not conftest's
from gateway.demo import demo_app, demo_config
from gateway.identity import IdentitySigner
from gateway.middleware import AuthGateway
from gateway.sandbox import available_sandboxes, serve_apps
from plugins.dingtalk.sandbox import (
    DEFAULT_USERS,
    OTHER_CORP_ID,
    SANDBOX_APP_KEY,
    SANDBOX_CORP_ID,
    SANDBOX_SUITE_KEY,
    DingTalkSandbox,
)
from tests.conftest import SimulatedClient, echo_app, free_port, open_simulated_client

# One Chromium for the module (conftest's ``module_browser``): every test, and the fixtures that
# serve the emulator and the gateway, run on the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

ZHANG, LISI, ALICE, ZHANG_OTHER = DEFAULT_USERS
ANDROID_UA = (
    "Mozilla/5.0 (Linux; Android 10; VOG-AL10 Build/HUAWEIVOG-AL10; wv) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Version/4.0 Chrome/69.0.3497.100 Mobile Safari/537.36 AliApp(DingTalk/7.8.1) com.alibaba.android.rimet/"
    "13534898 Channel/212200 language/zh-CN UT4Aplus/0.2.25 colorScheme/light"
)
IOS_UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/23E246 AliApp(DingTalk/7.8.1) com.laiwang.DingTalk/46766536 Channel/201200 language/zh-Hans-CN "
    "UT4Aplus/0.0.6 WK"
)
PC_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/108.0.5359.215 "
    "Safari/537.36 dingtalk-win/1.0.0 nw(0.14.7) DingTalk(7.8.10-Release.250724002) Mojo/1.0.0 Native "
    "AppType(release) Channel/201200 Architecture/x86_64"
)

# The simulated client. SPEC: {env, newApi, oldApi, codes: [...], openAuth: {"0": answer, "1": answer}}.
# ES5, like the webviews it stands for.
FAKE_DD = r"""
(function (spec) {
  if (window.location.pathname.indexOf("/_gateway/") !== 0) { return; }
  function nextCode() {
    var index = Number(window.sessionStorage.getItem("fake-dd-index") || "0");
    window.sessionStorage.setItem("fake-dd-index", String(index + 1));
    return spec.codes[index];
  }
  function report(name, options) {
    var copy = {};
    for (var key in options) {
      if (typeof options[key] !== "function") { copy[key] = options[key]; }
    }
    if (window.recordClientCall) { window.recordClientCall(name, copy); }
  }
  function answerFor(query) {
    var type = /(?:^|&)type=(\d)/.exec(query)[1];
    return spec.openAuth[type];
  }
  var dd = { env: spec.env, ready: function (callback) { setTimeout(callback, 0); } };
  if (spec.newApi) {
    dd.requestAuthCode = function (options) {
      report("requestAuthCode", options);
      return Promise.resolve({ code: nextCode() });
    };
  }
  if (spec.oldApi) {
    dd.runtime = { permission: { requestAuthCode: function (options) {
      report("runtime.permission.requestAuthCode", options);
      setTimeout(function () { options.onSuccess({ code: nextCode() }); }, 0);
    } } };
  }
  if (spec.openAuth) {
    dd.biz = { util: {
      callComponent: function (options) {
        report("biz.util.callComponent", options);
        var page = options.params.page;
        return Promise.resolve({ detail: { extraData: answerFor(page.slice(page.indexOf("?") + 1)) } });
      },
      openModal: function (options) {
        report("biz.util.openModal", options);
        setTimeout(function () {
          options.onSuccess(JSON.stringify(answerFor(options.url.slice(options.url.indexOf("?") + 1))));
        }, 0);
      }
    } };
  }
  window.dd = dd;
})(__SPEC__);
"""


@dataclass
class Served:
    sandbox: DingTalkSandbox
    urls: dict[str, str]


@pytest_asyncio.fixture(loop_scope="module")
async def dingtalk() -> AsyncIterator[Served]:
    sandbox = DingTalkSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        yield Served(sandbox, urls)


Starter = Callable[..., AbstractAsyncContextManager[str]]


@pytest.fixture
def start(dingtalk: Served) -> Starter:
    """``async with start(isv=False, **settings) as url``: the gateway, the page's JSSDK "already there"."""

    @asynccontextmanager
    async def run(*, isv: bool = False, **overrides: Any) -> AsyncIterator[str]:
        sandbox = dingtalk.sandbox
        base = sandbox.isv_settings(dingtalk.urls) if isv else sandbox.provider_settings(dingtalk.urls)
        if isv:
            base["suite_ticket"] = sandbox.suite_ticket
        port = free_port()
        config = GatewayConfig(public_url=f"http://127.0.0.1:{port}",
                               session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
                               providers={"dingtalk": {**base, "client_timeout_s": 3, **overrides}})
        gateway = AuthGateway(echo_app(), config)
        try:
            async with serve_apps({"gateway": gateway}, port=port) as urls:
                yield urls["gateway"]
        finally:
            await gateway.aclose()

    return run


ClientFactory = Callable[..., Awaitable[SimulatedClient]]


@pytest.fixture
def new_client(module_browser: Browser) -> ClientFactory:
    """``await new_client(spec, user_agent)``: a fresh browser context simulating one DingTalk client
    (``spec`` None: no ``dd`` at all); ``module_browser`` closes it after the test."""

    async def make(spec: dict[str, Any] | None, user_agent: str = ANDROID_UA) -> SimulatedClient:
        env = {"platform": "android", "version": "7.8.1", "appType": "WEB"}
        script = None if spec is None else FAKE_DD.replace("__SPEC__", json.dumps({"env": env, **spec}))
        return await open_simulated_client(module_browser, user_agent=user_agent, init_script=script)

    return make


async def wait_for_app(page: Page, path: str) -> dict[str, str]:
    """The upstream echo's view of the identity headers, once the page reached ``path``."""
    await page.wait_for_url(re.compile(re.escape(path) + "$"), timeout=15000)
    answer = json.loads(await page.text_content("body") or "{}")
    return {name: value for name, value in answer["headers"] if name.startswith("x-auth-")}


async def wait_for_title(page: Page, title: str) -> str:
    await page.wait_for_function(
        "title => (document.getElementById('gw-title') || {}).textContent === title", arg=title, timeout=15000
    )
    return str(await page.text_content("#gw-status"))


# -- the free-login code ----------------------------------------------------------------------


async def test_new_request_auth_code_gets_corp_and_client(
    start: Starter, dingtalk: Served, new_client: ClientFactory
) -> None:
    codes = [dingtalk.sandbox.mint_client_code()]
    client = await new_client({"newApi": True, "oldApi": True, "codes": codes})
    async with start() as url:
        await client.page.goto(url + "/inbox?tab=1")
        identity = await wait_for_app(client.page, "/inbox?tab=1")
    assert identity["x-auth-user"] == ZHANG.userid and identity["x-auth-tenant"] == SANDBOX_CORP_ID
    assert client.calls == [("requestAuthCode", {"corpId": SANDBOX_CORP_ID, "clientId": SANDBOX_APP_KEY})]
    assert dingtalk.sandbox.stats["authorize"] == 0


async def test_old_request_auth_code_when_the_sdk_lacks_the_new_one(
    start: Starter, dingtalk: Served, new_client: ClientFactory
) -> None:
    codes = [dingtalk.sandbox.mint_client_code(client_id=None)]  # the old API's code carries no clientId
    client = await new_client({"newApi": False, "oldApi": True, "codes": codes}, IOS_UA)
    async with start() as url:
        await client.page.goto(url + "/")
        identity = await wait_for_app(client.page, "/")
    assert identity["x-auth-user"] == ZHANG.userid
    assert client.calls == [("runtime.permission.requestAuthCode", {"corpId": SANDBOX_CORP_ID})]


async def test_the_corp_id_comes_from_the_page_url(start: Starter, dingtalk: Served, new_client: ClientFactory) -> None:
    """A third-party app serves many organisations: the homepage's ?corpid=$CORPID$ says which."""
    sandbox = dingtalk.sandbox
    sandbox.set_current_user(ALICE.userid)
    try:
        codes = [sandbox.mint_client_code(client_id=SANDBOX_SUITE_KEY) for _ in range(2)]
        client = await new_client({"newApi": True, "oldApi": False, "codes": codes})
        async with start(isv=True) as url:
            await client.page.goto(f"{url}/app?corpid={OTHER_CORP_ID}")  # the app path carries it
            identity = await wait_for_app(client.page, f"/app?corpid={OTHER_CORP_ID}")
            assert identity["x-auth-tenant"] == OTHER_CORP_ID and identity["x-auth-user"] == ALICE.userid
            await client.page.context.clear_cookies()
            # A homepage pointing at the login page itself: the page's own parameter.
            await client.page.goto(f"{url}/_gateway/login?corpid={OTHER_CORP_ID}&next=/home")
            identity = await wait_for_app(client.page, "/home")
            assert identity["x-auth-tenant"] == OTHER_CORP_ID
    finally:
        sandbox.set_current_user(ZHANG.userid)
    assert [options for _, options in client.calls] == [{"corpId": OTHER_CORP_ID, "clientId": SANDBOX_SUITE_KEY}] * 2


async def test_outside_dingtalk_the_page_goes_to_the_browser_login(
    start: Starter, dingtalk: Served, new_client: ClientFactory
) -> None:
    not_in = await new_client({"newApi": True, "codes": [], "env": {"platform": "notInDingTalk"}})
    no_dd = await new_client(None)  # a DingTalk-like UA, but no JSAPI on the page
    async with start() as url:
        for client in (not_in, no_dd):
            await client.page.goto(url + "/x")
            identity = await wait_for_app(client.page, "/x")
            assert identity["x-auth-user"] == ZHANG.userid
    assert not_in.calls == [] and dingtalk.sandbox.stats["authorize"] == 2


# -- the authorization component --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "title", "words"),
    [("cancel", "Sign-in was declined", "declined"), ("toAdmin", "Waiting for your administrator", "administrator")],
)
async def test_open_auth_refusals_end_on_a_clear_page(
    start: Starter, new_client: ClientFactory, status: str, title: str, words: str
) -> None:
    client = await new_client({"codes": [], "openAuth": {"0": {"status": status, "result": None}}})
    async with start(scopes=["Contact.User.Read"]) as url:
        await client.page.goto(url + "/x")
        assert words in await wait_for_title(client.page, title)
        assert await client.page.locator("#gw-actions a").count() == 2  # a way forward
    assert client.names() == ["biz.util.callComponent"]


@pytest.mark.parametrize("user_agent", [ANDROID_UA, PC_UA], ids=["android", "pc"])
async def test_open_auth_ok_logs_in_with_a_user_token(
    start: Starter, dingtalk: Served, new_client: ClientFactory, user_agent: str
) -> None:
    code = dingtalk.sandbox.mint_user_code(scopes=["Contact.User.Read"])
    answer = {"status": "ok", "result": {"authCode": code}}
    platform = "pc" if user_agent == PC_UA else "android"
    spec = {"codes": [], "openAuth": {"0": answer}, "env": {"platform": platform, "version": "7.8.10"}}
    client = await new_client(spec, user_agent)
    async with start(scopes=["Contact.User.Read"]) as url:
        await client.page.goto(url + "/docs")
        identity = await wait_for_app(client.page, "/docs")
    assert identity["x-auth-user"] == ZHANG.userid and identity["x-auth-tenant"] == SANDBOX_CORP_ID
    query = f"type=0&clientId={SANDBOX_APP_KEY}&corpId={SANDBOX_CORP_ID}&rpcScope=Contact.User.Read&fieldScope="
    name, options = client.calls[0]
    if platform == "pc":
        assert name == "biz.util.openModal"
        assert options["url"] == "https://n.dingtalk.com/dingding/h5-common-authority/auth/index.html?" + query
    else:
        assert name == "biz.util.callComponent" and options["params"]["page"] == "pages/auth/index?" + query
    assert dingtalk.sandbox.stats["authorization_code"] == 1 and dingtalk.sandbox.stats["getuserinfo"] == 0


async def test_open_auth_failed_falls_back_to_the_browser_login(
    start: Starter, dingtalk: Served, new_client: ClientFactory
) -> None:
    client = await new_client({"codes": [], "openAuth": {"0": {"status": "failed", "result": None}}})
    async with start(scopes=["Contact.User.Read"]) as url:
        await client.page.goto(url + "/x")
        identity = await wait_for_app(client.page, "/x")
    assert identity["x-auth-user"] == ZHANG.userid
    assert dingtalk.sandbox.stats["authorize"] == 1


async def test_admin_consent_then_the_free_login_code(
    start: Starter, dingtalk: Served, new_client: ClientFactory
) -> None:
    waiting = await new_client({"newApi": True, "codes": [],
                                               "openAuth": {"1": {"status": "toAdmin", "result": None}}})
    codes = [dingtalk.sandbox.mint_client_code() for _ in range(2)]
    granted = await new_client({"newApi": True, "codes": codes,
                                               "openAuth": {"1": {"status": "ok", "result": None}}})
    async with start(app_scopes=[".default"]) as url:
        await waiting.page.goto(url + "/x")
        assert "administrator" in await wait_for_title(waiting.page, "Waiting for your administrator")
        assert waiting.names() == ["biz.util.callComponent"]

        await granted.page.goto(url + "/x")
        assert (await wait_for_app(granted.page, "/x"))["x-auth-user"] == ZHANG.userid
        consent_page = granted.calls[0][1]["params"]["page"]
        assert "type=1&" in consent_page and "rpcScope=.default&" in consent_page
        # The grant is remembered: the next sign-in asks the code only.
        await granted.page.context.clear_cookies()
        await granted.page.goto(url + "/y")
        await wait_for_app(granted.page, "/y")
    assert granted.names() == ["biz.util.callComponent", "requestAuthCode", "requestAuthCode"]


# -- the demo ---------------------------------------------------------------------------------


async def test_the_demo_signs_in_through_the_fake_dingtalk_open_js(module_browser: Browser) -> None:
    assert available_sandboxes()["dingtalk"] is DingTalkSandbox
    sandbox = DingTalkSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        port = free_port()
        config = demo_config("127.0.0.1", port, {"dingtalk": sandbox.demo_settings(urls)})
        clients = {"dingtalk": sandbox.client_user_agent}
        holder: dict[str, IdentitySigner] = {}
        gateway = AuthGateway(demo_app(holder, clients, config.path_prefix), config)
        holder["signer"] = gateway.runtime.signer
        try:
            async with serve_apps({"demo": DemoClient(gateway, clients)}, port=port) as served:
                context = await module_browser.new_context()  # a plain browser: the demo adds the DingTalk UA token
                try:
                    page = await context.new_page()
                    await page.goto(served["demo"] + "/demo/client/dingtalk")
                    await page.wait_for_function("() => document.body && document.body.innerText.indexOf('Hello') >= 0",
                                                 timeout=15000)
                    text = await page.text_content("body") or ""
                finally:
                    await context.close()
        finally:
            await gateway.aclose()
    assert "Hello, 张三" in text and "verified with the gateway" in text
    stats = sandbox.stats
    assert (stats["jsapi_code"], stats["getuserinfo"], stats["authorize"]) == (1, 1, 0)
