"""The handshake page in a real browser: headless Chromium (the system's) with a Feishu desktop
User-Agent opens an app page behind the gateway (middleware mode, echo app, Lark emulator on its own
ports). The client's JSAPI is simulated by an init script that defines ``window.h5sdk`` and
``window.tt`` (the provider's ``jssdk_url`` is "", so the page expects those globals) and hands out
codes minted beforehand by the emulator; every JSAPI call is reported back to the test.

Each scenario starts at ``/inbox?x=1``, is sent to ``/_gateway/login``, lets the page run and must
end on the app again with the right identity, or (a code the exchange rejects) on a readable page
that offers a way on. Nothing here waits longer than the page's own bounded timeouts.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, ViewportSize, expect
from playwright.async_api import Request as PageRequest

from tests.conftest import (
    CLIENT_RECORDER,
    FEISHU_UA,
    GatewayStarter,
    RunningGateway,
    ServedLark,
    SimulatedClient,
    open_simulated_client,
)

TARGET = "/inbox?x=1"
ZHANG = {"user": "ou_7dab8a3d3cdcc9da365777c7ad535d62", "tenant": "736588c9260f175d", "name": "张三"}
LI_SI = {"user": "ou_1f2d3c4b5a69788796a5b4c3d2e1f0a9", "tenant": "736588c9260f175d", "name": "Li Si"}
ALICE = {"user": "ou_c99c5f35d542efc7ee492afe11af19ef", "tenant": "2ed263bf32cf1651", "name": "Alice Smith"}
STATE = re.compile(r"[A-Za-z0-9]{1,64}")
SCREENSHOT = "/tmp/handshake-failure.png"

# The simulated client. ``setup``: {"ready": bool, "requestAccess": answer | null,
# "requestAuthCode": answer | null}, an answer being {"code": "..."} or {"fail": {errno, ...}};
# a null answer leaves that JSAPI undefined (an old SDK). ES5, as the real webviews need.
JSAPI_SIMULATOR = r"""
(function (setup) {
  "use strict";
  function record(api, options) {
    var args = {};
    Object.keys(options || {}).forEach(function (key) {
      if (typeof options[key] !== "function") { args[key] = options[key]; }
    });
    (window.__jsapiCalls = window.__jsapiCalls || []).push({ api: api, args: args });
    if (typeof window.recordClientCall === "function") { window.recordClientCall(api, args); }
  }
  function jsapi(api) {
    return function (options) {
      record(api, options);
      var answer = setup[api];
      setTimeout(function () {
        if (answer.code) { options.success({ code: answer.code, errMsg: api + ":ok" }); }
        else { options.fail(answer.fail); }
      }, 0);
    };
  }
  window.h5sdk = {
    ready: function (callback) { if (setup.ready) { setTimeout(callback, 0); } },
    error: function () {}
  };
  var tt = {};
  ["requestAccess", "requestAuthCode"].forEach(function (api) {
    if (setup[api]) { tt[api] = jsapi(api); }
  });
  window.tt = tt;
})(__SETUP__);
"""


async def feishu(browser: Browser, jsapi: dict[str, Any] | None) -> SimulatedClient:
    """A Feishu webview; ``jsapi`` configures the simulated h5sdk/tt (None: no globals at all)."""
    script = None if jsapi is None else JSAPI_SIMULATOR.replace("__SETUP__", json.dumps(jsapi))
    return await open_simulated_client(browser, user_agent=FEISHU_UA, init_script=script)


def simulated(ready: bool = True, request_access: dict[str, Any] | None = None,
              request_auth_code: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"ready": ready, "requestAccess": request_access, "requestAuthCode": request_auth_code}


async def open_app(client: SimulatedClient, running: RunningGateway, timeout_ms: float = 15_000) -> dict[str, Any]:
    """Open ``TARGET`` (sent to the login page), wait until the page lands on the app again and
    return what the echo app received."""
    page = client.page
    await page.goto(running.url + TARGET, wait_until="commit")
    await page.wait_for_url(running.url + TARGET, timeout=timeout_ms)
    echoed: dict[str, Any] = json.loads(await page.locator("pre").first.text_content() or "{}")
    assert echoed["path"] == "/inbox" and echoed["query"] == "x=1"
    assert client.errors == []
    return echoed


def identity_of(echoed: dict[str, Any]) -> dict[str, str]:
    headers = {name: value for name, value in echoed["headers"]}
    assert headers["x-auth-provider"] == "lark" and headers["x-auth-identity"]
    assert "gw_session" not in echoed["cookies"]
    return {"user": headers["x-auth-user"], "tenant": headers["x-auth-tenant"],
            "name": unquote(headers["x-auth-name"])}


def assert_bridge_args(client: SimulatedClient, lark: ServedLark) -> None:
    """requestAccess gets appID (capital ID), scopeList and state; requestAuthCode gets appId."""
    for args in client.called("requestAccess"):
        assert set(args) == {"appID", "scopeList", "state"}
        assert args["appID"] == lark.sandbox.app_id and args["scopeList"] == ["offline_access"]
        assert STATE.fullmatch(args["state"])
    for args in client.called("requestAuthCode"):
        assert args == {"appId": lark.sandbox.app_id}


# -- the in-client handshake ---------------------------------------------------------------------


async def test_request_access_logs_in_silently(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = lark.sandbox.mint_client_code("requestAccess")
    unused = lark.sandbox.mint_client_code("requestAuthCode")
    client = await feishu(browser, simulated(request_access={"code": code}, request_auth_code={"code": unused}))
    async with start_gateway() as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == ZHANG
    assert len(client.called("requestAccess")) == 1 and client.called("requestAuthCode") == []
    assert_bridge_args(client, lark)
    # The page POSTed the code it got, with the state it gave requestAccess.
    assert client.exchanges == [{"code": code, "state": client.called("requestAccess")[0]["state"]}]
    stats = lark.sandbox.stats
    assert stats["authorization_code"] == 1 and stats["user_info"] == 1 and stats["authorize"] == 0


async def test_errno_103_falls_back_to_request_auth_code(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = lark.sandbox.mint_client_code("requestAuthCode", open_id=ALICE["user"])
    old_client = {"errno": 103, "errString": "feature not support", "errMsg": "requestAccess:fail"}
    client = await feishu(browser, simulated(request_access={"fail": old_client}, request_auth_code={"code": code}))
    async with start_gateway() as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == ALICE
    assert [name for name, _ in client.calls] == ["requestAccess", "requestAuthCode"]
    assert_bridge_args(client, lark)
    assert [body["code"] for body in client.exchanges] == [code]
    stats = lark.sandbox.stats
    assert stats["authorization_code"] == 1 and stats["authorize"] == 0


async def test_an_sdk_without_request_access_uses_request_auth_code(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = lark.sandbox.mint_client_code("requestAuthCode", open_id=LI_SI["user"])
    client = await feishu(browser, simulated(request_auth_code={"code": code}))
    async with start_gateway() as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == LI_SI
    assert [name for name, _ in client.calls] == ["requestAuthCode"]
    assert_bridge_args(client, lark)
    stats = lark.sandbox.stats
    assert stats["authorization_code"] == 1 and stats["authorize"] == 0


# -- falling back to the browser OAuth -----------------------------------------------------------


async def test_without_jsapi_globals_the_page_falls_back_to_browser_oauth(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    client = await feishu(browser, None)
    async with start_gateway() as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == ZHANG
    assert client.calls == [] and client.exchanges == []
    stats = lark.sandbox.stats
    assert stats["authorize"] == 1 and stats["authorization_code"] == 1 and stats["user_info"] == 1


async def test_a_ready_hook_that_never_fires_falls_back_in_bounded_time(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = lark.sandbox.mint_client_code("requestAccess")
    client = await feishu(browser, simulated(ready=False, request_access={"code": code}))
    async with start_gateway(provider={"client_timeout_s": 1.0}) as running:
        started = time.monotonic()
        echoed = await open_app(client, running, timeout_ms=8_000)
        elapsed = time.monotonic() - started
    assert identity_of(echoed) == ZHANG
    assert client.calls == [] and client.exchanges == []
    assert 0.9 <= elapsed < 6, elapsed  # the 1 s ready timeout, not the page's 4x safety net or a hang
    stats = lark.sandbox.stats
    assert stats["authorize"] == 1 and stats["authorization_code"] == 1


async def test_a_refused_request_access_falls_back_to_browser_oauth(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    refused = {"errno": 2700002, "errString": "Authorization terminated unexpectedly. Error code: access_denied"}
    fallback_code = lark.sandbox.mint_client_code("requestAuthCode")
    client = await feishu(browser, simulated(request_access={"fail": refused},
                                             request_auth_code={"code": fallback_code}))
    async with start_gateway() as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == ZHANG
    # 2700002 is a refusal or a failure, not an old client: no requestAuthCode, the browser OAuth.
    assert [name for name, _ in client.calls] == ["requestAccess"] and client.exchanges == []
    assert_bridge_args(client, lark)
    stats = lark.sandbox.stats
    assert stats["authorize"] == 1 and stats["authorization_code"] == 1


# -- the demo's simulated client: the emulator's fake JSSDK --------------------------------------


async def test_the_sandbox_jssdk_logs_in_silently(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    jssdk_url = lark.sandbox.demo_settings(lark.urls)["jssdk_url"]
    client = await feishu(browser, None)
    async with start_gateway(provider={"jssdk_url": jssdk_url}) as running:
        echoed = await open_app(client, running)
    assert identity_of(echoed) == ZHANG
    assert len(client.exchanges) == 1 and STATE.fullmatch(client.exchanges[0]["state"])
    stats = lark.sandbox.stats
    assert stats["jsapi_code"] == 1 and stats["authorization_code"] == 1 and stats["authorize"] == 0


# -- a code the exchange rejects -----------------------------------------------------------------


async def used_code(lark: ServedLark) -> str:
    """A requestAccess code that has already been redeemed (Lark answers 20065 to a second use)."""
    code = lark.sandbox.mint_client_code("requestAccess")
    async with httpx.AsyncClient(base_url=lark.urls["open"]) as http:
        answer = await http.post("/open-apis/authen/v2/oauth/token", json={
            "grant_type": "authorization_code", "client_id": lark.sandbox.app_id,
            "client_secret": lark.sandbox.app_secret, "code": code,
        })
    assert answer.status_code == 200 and answer.json()["access_token"]
    return code


async def fail_with_a_used_code(client: SimulatedClient, running: RunningGateway) -> None:
    await client.page.goto(running.url + TARGET, wait_until="commit")
    await expect(client.page.locator("#gw-title")).to_have_text("Sign-in did not complete", timeout=10_000)


async def test_a_rejected_code_is_retried_once_then_explained(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = await used_code(lark)
    client = await feishu(browser, simulated(request_access={"code": code}))
    async with start_gateway() as running:
        await fail_with_a_used_code(client, running)
        page = client.page
        # One silent retry (a fresh login page, a new state), then a page that says what happened.
        assert len(client.called("requestAccess")) == 2 and len(client.exchanges) == 2
        assert client.exchanges[0]["state"] != client.exchanges[1]["state"]
        assert "retry=1" in urlsplit(page.url).query
        await expect(page.locator("#gw-status")).to_contain_text("already used")
        buttons = page.locator("#gw-actions a.button")
        await expect(buttons).to_have_text(["Try again", "Sign in in the browser"])
        assert await buttons.nth(0).get_attribute("href") == page.url
        fallback = urlsplit(await buttons.nth(1).get_attribute("href") or "")
        assert fallback.path == "/_gateway/login"
        assert parse_qs(fallback.query) == {"provider": ["lark"], "next": [TARGET], "flow": ["browser"]}
        for locator in (page.locator("#gw-title"), page.locator("#gw-status"), buttons.nth(0), buttons.nth(1)):
            await expect(locator).to_be_visible()
        await page.screenshot(path=SCREENSHOT)
        # Not signed in: no session cookie.
        assert "gw_session" not in {cookie["name"] for cookie in await page.context.cookies()}
        assert client.errors == []
    stats = lark.sandbox.stats
    assert stats["authorization_code"] == 3 and stats["user_info"] == 0 and stats["authorize"] == 0


async def test_the_failure_pages_browser_sign_in_button_works(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    code = await used_code(lark)
    client = await feishu(browser, simulated(request_access={"code": code}))
    async with start_gateway() as running:
        await fail_with_a_used_code(client, running)
        page = client.page
        await page.locator("#gw-actions a.button", has_text="Sign in in the browser").click()
        # A fresh login forced to the browser OAuth: it must not reuse the spent state.
        await page.wait_for_url(re.compile(r"/inbox\?x=1$|/_gateway/callback/"), timeout=5_000)
        assert page.url == running.url + TARGET
        echoed = json.loads(await page.locator("pre").first.text_content() or "{}")
    assert identity_of(echoed) == ZHANG


# -- in the reader's language, on a phone --------------------------------------------------------

PHONE: ViewportSize = {"width": 390, "height": 844}
PHONE_BROWSER_UA = (
    "Mozilla/5.0 (Linux; Android 13; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 "
    "Mobile Safari/537.36"
)
FITS = """() => {
  var visible = Array.prototype.filter.call(document.querySelectorAll("main *"), function (node) {
    return node.getClientRects().length > 0 && node.textContent.trim() !== "";
  });
  return {
    innerWidth: window.innerWidth,
    scrollWidth: document.scrollingElement.scrollWidth,
    bodyFont: parseFloat(getComputedStyle(document.body).fontSize),
    smallestFont: Math.min.apply(null, visible.map(function (node) {
      return parseFloat(getComputedStyle(node).fontSize);
    })),
    mainRadius: getComputedStyle(document.querySelector("main")).borderTopLeftRadius,
    lang: document.documentElement.lang
  };
}"""


async def phone(browser: Browser, *, locale: str, user_agent: str = FEISHU_UA,
                jsapi: dict[str, Any] | None = None) -> tuple[SimulatedClient, list[str]]:
    """A phone webview (390 px, mobile viewport rules, ``locale``'s Accept-Language): the context of
    conftest's ``open_simulated_client``, which takes no viewport or locale, with those added; and
    the console's Content-Security-Policy complaints, which must stay empty."""
    context = await browser.new_context(user_agent=user_agent, locale=locale, viewport=PHONE, is_mobile=True,
                                        has_touch=True, device_scale_factor=3)
    calls: list[tuple[str, dict[str, Any]]] = []
    await context.expose_function(CLIENT_RECORDER, lambda api, args: calls.append((api, args)))
    if jsapi is not None:
        await context.add_init_script(script=JSAPI_SIMULATOR.replace("__SETUP__", json.dumps(jsapi)))
    client = SimulatedClient(await context.new_page(), calls)
    client.page.on("pageerror", lambda error: client.errors.append(str(error)))
    refused: list[str] = []

    def on_request(request: PageRequest) -> None:
        if request.method == "POST" and "/_gateway/exchange/" in request.url:
            client.exchanges.append(request.post_data_json or {})

    def on_console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            refused.append(message.text)

    client.page.on("request", on_request)
    client.page.on("console", on_console)
    return client, refused


async def assert_fits_a_phone(page: Page, lang: str) -> None:
    """Nothing wider than the 390 px screen, readable sizes, our style applied (under the CSP)."""
    measured = await page.evaluate(FITS)
    assert measured["innerWidth"] == 390, measured  # the meta viewport is honoured (not 980 px)
    assert measured["scrollWidth"] <= 390, measured
    assert measured["bodyFont"] >= 16 and measured["smallestFont"] >= 12, measured
    assert measured["mainRadius"] == "12px", measured  # the hashed inline style did apply
    assert measured["lang"] == lang, measured


@pytest.mark.parametrize(
    ("locale", "lang", "title", "status", "buttons"),
    [
        ("zh-CN", "zh-Hans", "登录未完成", "登录码已被使用", ["重试", "在浏览器中登录"]),
        ("en-US", "en", "Sign-in did not complete", "already used", ["Try again", "Sign in in the browser"]),
    ],
)
async def test_the_handshake_page_speaks_the_language_and_fits_a_phone(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark,
    locale: str, lang: str, title: str, status: str, buttons: list[str],
) -> None:
    code = await used_code(lark)
    client, refused = await phone(browser, locale=locale, jsapi=simulated(request_access={"code": code}))
    async with start_gateway() as running:
        page = client.page
        await page.goto(running.url + TARGET, wait_until="commit")
        await expect(page.locator("#gw-title")).to_have_text(title, timeout=10_000)
        await expect(page.locator("#gw-status")).to_contain_text(status)
        await expect(page.locator("#gw-actions a.button")).to_have_text(buttons)
        await assert_fits_a_phone(page, lang)
        await page.screenshot(path=f"/tmp/handshake-phone-{lang}.png")
    assert client.errors == [] and refused == []


@pytest.mark.parametrize(
    ("locale", "lang", "pending_title", "error_title"),
    [("zh-CN", "zh-Hans", "等待管理员审批", "找不到页面"),
     ("en-US", "en", "Waiting for your administrator", "Not found")],
)
async def test_the_pending_and_error_pages_speak_the_language_and_fit_a_phone(
    browser: Browser, start_gateway: GatewayStarter, locale: str, lang: str, pending_title: str, error_title: str,
) -> None:
    client, refused = await phone(browser, locale=locale, user_agent=PHONE_BROWSER_UA)
    page = client.page
    async with start_gateway() as running:
        await page.goto(f"{running.url}/_gateway/callback/lark?error=approval_pending")
        await expect(page.locator("h1")).to_have_text(pending_title)
        await assert_fits_a_phone(page, lang)
        # An error whose text holds a 300-character word (the unknown provider's name): it wraps.
        await page.goto(f"{running.url}/_gateway/login?provider={'x' * 300}")
        await expect(page.locator("h1")).to_have_text(error_title)
        if lang != "en":
            await page.locator("summary").click()  # the English detail, unfolded
            await expect(page.locator("details p")).to_contain_text("x" * 300)
        await expect(page.locator("code:not(.request-id)")).to_have_text("unknown_provider")
        await assert_fits_a_phone(page, lang)
        await page.screenshot(path=f"/tmp/error-phone-{lang}.png")
    assert client.errors == [] and refused == []


async def test_a_public_url_host_the_browser_does_not_use_is_explained(
    browser: Browser, start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    # public_url says 127.0.0.1; the user opens localhost. The login cookie belongs to localhost,
    # the provider returns to 127.0.0.1: the page says so, not "started in another browser".
    client, refused = await phone(browser, locale="zh-CN", user_agent=PHONE_BROWSER_UA)
    page = client.page
    async with start_gateway() as running:
        at_localhost = running.url.replace("127.0.0.1", "localhost")
        await page.goto(at_localhost + TARGET)
        await page.wait_for_url(re.compile(r"/_gateway/callback/lark\?"), timeout=10_000)
        await expect(page.locator("h1")).to_have_text("请通过应用的正式地址打开")
        await expect(page.locator("main > p").first).to_contain_text(
            f"此应用配置的地址是 {running.url}，但此页面是通过 {at_localhost} 打开的")
        await expect(page.locator("code:not(.request-id)")).to_have_text("public_url_mismatch")
        await assert_fits_a_phone(page, "zh-Hans")
        await page.screenshot(path="/tmp/public-url-mismatch-phone.png")
        # Its button opens the sign-in at the configured address, which then works.
        await page.locator("a.button").click()
        await page.wait_for_url(running.url + TARGET, timeout=10_000)
        echoed = json.loads(await page.locator("pre").first.text_content() or "{}")
    assert identity_of(echoed) == ZHANG
    assert client.errors == [] and refused == []
