"""gateway.js in real Chromium: gateway.fetch re-runs the in-client handshake without leaving the
page on 401 login_required, runs the consent the same way on 403 consent_required, each once, and
outside the client rejects with the URL to navigate to."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from plugins.lark import openapi
from tests.conftest import BROWSER_UA, FEISHU_UA, GatewayStarter, RunningGateway, ServedLark, open_simulated_client

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
