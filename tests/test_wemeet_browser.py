"""The handshake page inside a simulated Tencent Meeting client: headless Chromium (the system's)
with a WeMeet desktop User-Agent (``app/tencent_wemeet``) opens an app page behind the gateway
(middleware mode, echo app, WeMeet emulator on its own ports).

Two kinds of client: an init script that defines ``window.wemeet.permission`` with exactly the
APIs a scenario needs (``jssdk_url`` is "", so the page expects the global) and reports each call
back to the test; and the emulator's own fake JS-SDK (``demo_settings``), as ``gateway demo``
serves it. Each scenario starts at ``/inbox?x=1`` and must end on the app with the right identity,
or on a readable page that says what happens next.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any
from urllib.parse import unquote

from playwright.async_api import Browser, expect

from plugins.wemeet.sandbox import DEFAULT_USERS
from tests import test_wemeet_e2e as e2e
from tests.conftest import RunningGateway, SimulatedClient, open_simulated_client
from tests.test_wemeet_e2e import WEMEET_UA, ServedWeMeet, Starter

# The gateway and emulator fixtures of the end-to-end tests, shared (not redefined) here.
wemeet = e2e.wemeet
start = e2e.start

TARGET = "/inbox?x=1"
ZHANG, LI_SI, WANG, PAT, ZHAO = DEFAULT_USERS
STATE = re.compile(r"[A-Za-z0-9]{1,64}")

# The simulated client. ``setup``: {"agent": {"code"} | {"reject"} | null, "authorize": {"success"} |
# {"fail"} | null, "requestAuth": web base URL | null}; null leaves that API undefined (an older
# client). requestAuth navigates like the real one: to the authorization page. ES5 (Chrome 77).
WEMEET_SIMULATOR = r"""
(function (setup) {
  "use strict";
  function record(api, options) {
    var args = {};
    Object.keys(options || {}).forEach(function (key) {
      if (typeof options[key] !== "function") { args[key] = options[key]; }
    });
    if (typeof window.recordClientCall === "function") { window.recordClientCall(api, args); }
  }
  var permission = {};
  if (setup.agent) {
    permission.requestAgentAuthCode = function (params) {
      record("requestAgentAuthCode", params);
      return setup.agent.code ? Promise.resolve({ authCode: setup.agent.code }) : Promise.reject(setup.agent.reject);
    };
  }
  if (setup.authorize) {
    permission.authorize = function (options) {
      record("authorize", options);
      setTimeout(function () {
        if (setup.authorize.success) { options.success(setup.authorize.success); }
        else { options.fail(setup.authorize.fail); }
      }, 0);
      return Promise.resolve();
    };
  }
  if (setup.requestAuth) {
    permission.requestAuth = function (params) {
      record("requestAuth", params);
      var query = "corp_id=" + encodeURIComponent(params.corpId) + "&sdk_id=" + encodeURIComponent(params.sdkId) +
        "&redirect_uri=" + encodeURIComponent(params.redirectURI) + "&state=" + encodeURIComponent(params.state);
      var target = setup.requestAuth + "/marketplace/authorize.html?" + query;
      setTimeout(function () { window.location.href = target; }, 50);
    };
  }
  window.wemeet = { permission: permission, app: { version: function () { return "3.26.10.420"; } } };
})(__SETUP__);
"""


async def open_client(browser: Browser, setup: dict[str, Any] | None) -> SimulatedClient:
    """A Tencent Meeting webview; ``setup`` configures the simulated ``wemeet`` (None: no global)."""
    script = None if setup is None else WEMEET_SIMULATOR.replace("__SETUP__", json.dumps(setup))
    return await open_simulated_client(browser, user_agent=WEMEET_UA, init_script=script)


def simulated(agent: dict[str, Any] | None = None, authorize: dict[str, Any] | None = None,
              request_auth: str | None = None) -> dict[str, Any]:
    return {"agent": agent, "authorize": authorize, "requestAuth": request_auth}


async def open_app(
    client: SimulatedClient, running: RunningGateway, timeout_ms: float = 15_000
) -> dict[str, str | None]:
    """Open ``TARGET``, wait until the page lands on the app again; the identity it received."""
    page = client.page
    await page.goto(running.url + TARGET, wait_until="commit")
    await page.wait_for_url(running.url + TARGET, timeout=timeout_ms)
    echoed = json.loads(await page.locator("pre").first.text_content() or "{}")
    assert echoed["path"] == "/inbox" and echoed["query"] == "x=1"
    assert client.errors == []
    headers = dict(echoed["headers"])
    assert headers["x-auth-provider"] == "wemeet" and headers["x-auth-identity"]
    return {"user": headers["x-auth-user"], "tenant": headers.get("x-auth-tenant"),
            "name": unquote(headers["x-auth-name"]) if "x-auth-name" in headers else None}


def who(user: Any) -> dict[str, str | None]:
    return {"user": user.open_id, "tenant": user.open_corp_id or None, "name": user.username}


def assert_bridge_args(client: SimulatedClient, wemeet: ServedWeMeet, running: RunningGateway) -> None:
    for name, args in client.calls:
        if name == "requestAgentAuthCode":
            assert args == {"sdkId": wemeet.sandbox.sdk_id}
        if name == "requestAuth":
            assert set(args) == {"corpId", "sdkId", "redirectURI", "state"}
            assert (args["corpId"], args["sdkId"]) == (wemeet.sandbox.corp_id, wemeet.sandbox.sdk_id)
            assert args["redirectURI"] == f"{running.url}/_gateway/callback/wemeet"
            assert STATE.fullmatch(args["state"])


# -- the simulated wemeet global -------------------------------------------------------------------


async def test_request_agent_auth_code_logs_in_silently(browser: Browser, start: Starter, wemeet: ServedWeMeet) -> None:
    code = wemeet.sandbox.mint_client_code()
    client = await open_client(browser, simulated(agent={"code": code}, authorize={"success": {"authCode": "NO"}},
                                                  request_auth=wemeet.urls["web"]))
    async with start() as running:
        assert await open_app(client, running) == who(ZHANG)
        assert_bridge_args(client, wemeet, running)
    assert client.names() == ["requestAgentAuthCode"]
    assert len(client.exchanges) == 1 and client.exchanges[0]["code"] == code
    assert STATE.fullmatch(client.exchanges[0]["state"])
    stats = wemeet.sandbox.stats
    assert (stats["access_token"], stats["profile"], stats["authorize"]) == (1, 1, 0)


async def test_fallbacks_request_auth_where_present_else_the_authorization_link(
    browser: Browser, start: Starter, wemeet: ServedWeMeet
) -> None:
    refused = {"errCode": 1, "errMsg": "not authorized"}
    with_request_auth = await open_client(browser, simulated(agent={"reject": refused},
                                                             request_auth=wemeet.urls["web"]))
    without = await open_client(browser, simulated(agent={"reject": refused}))
    no_global = await open_client(browser, None)
    sandbox = wemeet.sandbox
    async with start() as running:
        # requestAgentAuthCode fails and requestAuth exists: it opens the authorization page,
        # whose redirect comes back to the callback (no exchange POST).
        sandbox.set_current_user(LI_SI.open_id)
        assert await open_app(with_request_auth, running) == who(LI_SI)
        assert_bridge_args(with_request_auth, wemeet, running)
        assert with_request_auth.names() == ["requestAgentAuthCode", "requestAuth"]
        assert (sandbox.stats["authorize"], sandbox.stats["access_token"]) == (1, 1)
        # No requestAuth: the page takes the gateway's authorization link (a personal user here).
        sandbox.set_current_user(PAT.open_id)
        assert await open_app(without, running) == who(PAT)
        assert without.names() == ["requestAgentAuthCode"]
        assert sandbox.stats["authorize"] == 2
        # No wemeet global at all (the SDK did not load): the link as well.
        sandbox.set_current_user(ZHANG.open_id)
        assert await open_app(no_global, running) == who(ZHANG)
        assert no_global.calls == [] and sandbox.stats["authorize"] == 3
    for client in (with_request_auth, without, no_global):
        assert client.exchanges == [] and client.errors == []


async def test_the_authorize_dialog_logs_in_or_explains_a_pending_approval(
    browser: Browser, start: Starter, wemeet: ServedWeMeet
) -> None:
    code = wemeet.sandbox.mint_client_code(ZHAO.open_id)
    accepted = await open_client(browser, simulated(agent={"reject": {}}, authorize={"success": {"authCode": code}}))
    pending = await open_client(browser, simulated(agent={"reject": {}}, authorize={"fail": {"bizCode": 1}},
                                                   request_auth=wemeet.urls["web"]))
    async with start() as running:
        assert await open_app(accepted, running) == {**who(ZHAO), "name": None}  # no profile scope: no name
        page = pending.page
        await page.goto(running.url + TARGET, wait_until="commit")
        await expect(page.locator("#gw-title")).to_have_text("Waiting for your administrator", timeout=10_000)
        await expect(page.locator("#gw-status")).to_contain_text("administrator")
        await expect(page.locator("#gw-actions a.button")).to_have_text(["Try again", "Sign in in the browser"])
    assert accepted.names() == ["requestAgentAuthCode", "authorize"]
    assert pending.names() == ["requestAgentAuthCode", "authorize"] and pending.exchanges == []
    assert pending.errors == []


# -- the emulator's fake JS-SDK (what gateway demo serves) ------------------------------------------


def fake_sdk(wemeet: ServedWeMeet) -> dict[str, Any]:
    return {"jssdk_url": wemeet.sandbox.demo_settings(wemeet.urls)["jssdk_url"]}


async def test_the_sandbox_jssdk_logs_in_silently(browser: Browser, start: Starter, wemeet: ServedWeMeet) -> None:
    client = await open_client(browser, None)
    async with start(provider=fake_sdk(wemeet)) as running:
        assert await open_app(client, running) == who(ZHANG)
    assert len(client.exchanges) == 1
    stats = wemeet.sandbox.stats
    assert (stats["jsapi_code"], stats["access_token"], stats["authorize"]) == (1, 1, 0)


async def test_the_sandbox_jssdk_on_a_client_before_3_16_uses_request_auth(
    browser: Browser, start: Starter, wemeet: ServedWeMeet
) -> None:
    wemeet.sandbox.jsapi_mode = "no_authorize"
    wemeet.sandbox.set_current_user(LI_SI.open_id)  # not authorized yet: requestAgentAuthCode refuses
    client = await open_client(browser, None)
    async with start(provider=fake_sdk(wemeet)) as running:
        assert await open_app(client, running) == who(LI_SI)
    assert client.exchanges == []
    stats = wemeet.sandbox.stats
    assert (stats["jsapi_code"], stats["authorize"], stats["access_token"]) == (1, 1, 1)


async def test_the_sandbox_jssdk_reports_a_pending_enterprise_approval(
    browser: Browser, start: Starter, wemeet: ServedWeMeet
) -> None:
    wemeet.sandbox.set_current_user(WANG.open_id)
    client = await open_client(browser, None)
    async with start(provider=fake_sdk(wemeet)) as running:
        await client.page.goto(running.url + TARGET, wait_until="commit")
        await expect(client.page.locator("#gw-title")).to_have_text("Waiting for your administrator",
                                                                      timeout=10_000)
        # The way on once approved: "Try again" runs the handshake again, silently this time.
        wemeet.sandbox.approve(WANG.open_id)
        await client.page.locator("#gw-actions a.button", has_text="Try again").click()
        await client.page.wait_for_url(running.url + TARGET, timeout=10_000)
    assert client.errors == []
    assert wemeet.sandbox.stats["access_token"] == 1


async def test_a_hung_client_falls_back_in_bounded_time(browser: Browser, start: Starter, wemeet: ServedWeMeet) -> None:
    wemeet.sandbox.jsapi_mode = "hang"
    client = await open_client(browser, None)
    async with start(provider={**fake_sdk(wemeet), "client_timeout_s": 1.0}) as running:
        started = time.monotonic()
        assert await open_app(client, running, timeout_ms=8_000) == who(ZHANG)
        elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 4, elapsed  # one 1 s JSAPI timeout, then the link: not the 4x safety net
    assert client.exchanges == [] and wemeet.sandbox.stats["authorize"] == 1
