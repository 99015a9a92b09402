"""gateway.js in real Chromium: gateway.fetch re-runs the in-client handshake without leaving the
page on 401 login_required, runs the consent the same way on 403 consent_required, each once, and
outside the client rejects with the URL to navigate to. Lark in the simulated Feishu client; the
Tencent Meeting client, where the re-login is the same but no JSAPI asks for scopes, so a consent
rejects with the consent URL (the app's authorization page again); DingTalk in
tests/test_consent_dingtalk.py."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from plugins.lark import openapi
from plugins.wemeet.sandbox import WeMeetSandbox
from tests._relay import relay_gateway, served
from tests.conftest import BROWSER_UA, FEISHU_UA, GatewayStarter, RunningGateway, ServedLark, open_simulated_client
from tests.test_wemeet_e2e import WEMEET_UA

CALENDARS = "/_gateway/api/lark/open-apis/calendar/v4/calendars"
GRANTED = {"scopes": ["offline_access", openapi.CALENDAR_SCOPE]}
ROUTES = [{"provider": "lark", "path": "open-apis/calendar/v4/*", "scopes": [openapi.CALENDAR_SCOPE]}]
# What the page's test hooks return: the status, or the rejection gateway.fetch gave.
CALL = ("gateway.fetch('" + CALENDARS + "').then("
        "function (r) { return {status: r.status}; }, function (e) { return {rejected: e}; })")


def spa() -> Starlette:
    """The app: one page that loads gateway.js (and marks itself, to see it was never reloaded)."""

    async def page(request: Request) -> Response:
        return HTMLResponse('<!doctype html><title>SPA</title><script src="/_gateway/static/gateway.js"></script>'
                            "<script>window.pageId = Math.random();</script>")

    return Starlette(routes=[Route("/app", page)])


async def open_app(browser: Browser, running: RunningGateway, user_agent: str) -> Any:
    client = await open_simulated_client(browser, user_agent=user_agent, init_script=None)
    await client.page.goto(f"{running.url}/app", wait_until="commit")
    await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)
    await client.page.wait_for_function("window.gateway && window.pageId", timeout=10_000)
    return client


async def test_a_lapsed_session_is_renewed_in_place_and_the_call_retried(
        browser: Browser, start_gateway: GatewayStarter, lark: ServedLark) -> None:
    jssdk_url = lark.sandbox.demo_settings(lark.urls)["jssdk_url"]
    async with start_gateway(spa(), relay={"routes": ROUTES},
                             provider={**GRANTED, "jssdk_url": jssdk_url}) as running:
        client = await open_app(browser, running, FEISHU_UA)
        page_id = await client.page.evaluate("window.pageId")
        assert (await client.page.evaluate(CALL)) == {"status": 200}
        await client.page.context.clear_cookies(name="gw_session")  # the session is gone
        assert (await client.page.evaluate(CALL)) == {"status": 200}
        assert await client.page.evaluate("window.pageId") == page_id  # no navigation happened
        assert client.page.url == f"{running.url}/app"
    assert len(client.exchanges) == 2 and not client.errors


async def test_consent_runs_in_place_once_then_the_call_goes_through(
        browser: Browser, start_gateway: GatewayStarter, lark: ServedLark) -> None:
    jssdk_url = lark.sandbox.demo_settings(lark.urls)["jssdk_url"]
    requested: list[Any] = []
    async with start_gateway(spa(), relay={"routes": ROUTES}, provider={"jssdk_url": jssdk_url}) as running:
        client = await open_app(browser, running, FEISHU_UA)
        client.page.on("request", lambda request: requested.append(request.post_data_json)
                       if request.url.endswith("/_sandbox/jsapi/code") else None)
        page_id = await client.page.evaluate("window.pageId")
        assert (await client.page.evaluate(CALL)) == {"status": 200}
        assert await client.page.evaluate("window.pageId") == page_id
    assert [body["scopeList"] for body in requested] == [["offline_access", openapi.CALENDAR_SCOPE]]


async def test_a_refused_consent_rejects_with_the_consent_url(
        browser: Browser, start_gateway: GatewayStarter, lark: ServedLark) -> None:
    jssdk_url = lark.sandbox.demo_settings(lark.urls)["jssdk_url"]
    async with start_gateway(spa(), relay={"routes": ROUTES}, provider={"jssdk_url": jssdk_url}) as running:
        client = await open_app(browser, running, FEISHU_UA)
        lark.sandbox.set_consent("deny")  # the user closes the consent sheet
        answer = await client.page.evaluate(CALL)
        rejected = answer["rejected"]
        assert rejected["error"] == "consent_required"
        assert rejected["consentUrl"].startswith("/_gateway/consent?provider=lark&scopes=")
        assert rejected["scopes"] == [openapi.CALENDAR_SCOPE]


async def test_outside_the_client_it_rejects_with_the_login_url(
        browser: Browser, start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway(spa(), relay={"routes": ROUTES}, provider=GRANTED) as running:
        client = await open_app(browser, running, BROWSER_UA)  # signed in through the browser OAuth
        assert (await client.page.evaluate(CALL)) == {"status": 200}
        await client.page.context.clear_cookies(name="gw_session")
        rejected = (await client.page.evaluate(CALL))["rejected"]
        assert rejected["error"] == "login_required"
        assert rejected["loginUrl"].startswith("/_gateway/login?next=")
        assert lark.sandbox.stats["authorize"] == 1  # nothing was tried behind the user's back


# -- inside the Tencent Meeting client (the emulator's wemeet-js-sdk and the plugin's bridge) ------

WEMEET_ROUTES = [{"provider": "wemeet", "path": "v1/meetings"},
                 {"provider": "wemeet", "path": "v1/users/info/basic", "scopes": ["VIEW_USER_INFO"]}]
# The page learns who it is once (``/me``), then calls with that operator (Tencent Meeting's REST
# calls name the user in the query).
AS_USER = ("fetch('/_gateway/me').then(function (r) { return r.json(); })"
           ".then(function (me) { window.operator = me.user; return me.user; })")


def wemeet_call(path: str) -> str:
    return ("gateway.fetch('/_gateway/api/wemeet/" + path + "?operator_id=' + window.operator + "
            "'&operator_id_type=2&instanceid=1').then(function (r) { return {status: r.status}; },"
            " function (e) { return {rejected: e}; })")


async def test_in_tencent_meeting_a_lapsed_session_is_renewed_in_place(browser: Browser) -> None:
    sandbox = WeMeetSandbox()
    async with served(sandbox) as urls, relay_gateway("wemeet", sandbox.demo_settings(urls), WEMEET_ROUTES,
                                                      app=spa()) as running:
        client = await open_app(browser, running, WEMEET_UA)  # signed in by the silent agent code
        await client.page.evaluate(AS_USER)
        page_id = await client.page.evaluate("window.pageId")
        assert (await client.page.evaluate(wemeet_call("v1/meetings"))) == {"status": 200}
        await client.page.context.clear_cookies(name="gw_session")
        assert (await client.page.evaluate(wemeet_call("v1/meetings"))) == {"status": 200}
        assert await client.page.evaluate("window.pageId") == page_id  # no navigation happened
        assert client.page.url == f"{running.url}/app"
    assert len(client.exchanges) == 2 and sandbox.stats["authorize"] == 0 and not client.errors
    assert sandbox.stats["jsapi_code"] == 2  # requestAgentAuthCode, each time in the page


async def test_in_tencent_meeting_consent_rejects_with_the_consent_url_which_reauthorizes(browser: Browser) -> None:
    """No JSAPI asks Tencent Meeting for more scopes: gateway.fetch rejects (nothing is tried in
    the page), and the consent URL, navigated to, is the app's authorization page again."""
    sandbox = WeMeetSandbox()
    async with served(sandbox) as urls, relay_gateway("wemeet", sandbox.demo_settings(urls), WEMEET_ROUTES,
                                                      app=spa()) as running:
        client = await open_app(browser, running, WEMEET_UA)
        await client.page.evaluate(AS_USER)
        assert (await client.page.evaluate(wemeet_call("v1/users/info/basic"))) == {"status": 200}
        # The app asks for VIEW_USER_INFO since the user authorized it: their grant lacks it now.
        sandbox.set_user_grant("VIEW_USER_INFO", False)
        sandbox.expire_access_tokens()  # the refresh then reports the grant as it is
        assert (await client.page.evaluate(wemeet_call("v1/meetings"))) == {"status": 200}
        page_id = await client.page.evaluate("window.pageId")
        rejected = (await client.page.evaluate(wemeet_call("v1/users/info/basic")))["rejected"]
        assert rejected["error"] == "consent_required" and rejected["scopes"] == ["VIEW_USER_INFO"]
        assert rejected["outcome"] == "fallback"  # the provider's own page is needed
        assert rejected["consentUrl"].startswith("/_gateway/consent?provider=wemeet&scopes=VIEW_USER_INFO")
        assert await client.page.evaluate("window.pageId") == page_id and sandbox.stats["authorize"] == 0
        exchanged = len(client.exchanges)
        # The app navigates there: the authorization page, then back to the calling page.
        await client.page.goto(running.url + rejected["consentUrl"], wait_until="commit")
        await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)
        await client.page.wait_for_function("window.gateway && window.pageId", timeout=10_000)
        await client.page.evaluate(AS_USER)
        assert (await client.page.evaluate(wemeet_call("v1/users/info/basic"))) == {"status": 200}
    assert sandbox.stats["authorize"] == 1 and len(client.exchanges) == exchanged and not client.errors
