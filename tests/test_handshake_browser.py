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
from playwright.async_api import Browser, expect

from tests.conftest import (
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
