"""DingTalk's incremental consent in real Chromium, in the simulated DingTalk client (the
emulator's own dingtalk.open.js): a user signed in by the free login has no user token; a relayed
call that needs one answers consent_required, and gateway.fetch runs the authorization component
(openAuth type 0 with the route's rpcScope) in the page, then the call goes through."""

from __future__ import annotations

from typing import Any

from playwright.async_api import Browser

from plugins.dingtalk.sandbox import DingTalkSandbox
from tests._relay import relay_gateway, served
from tests.conftest import open_simulated_client
from tests.test_gateway_js import spa

DINGTALK_UA = (
    "Mozilla/5.0 (Linux; Android 13; Pixel 7 Build/TQ3A; wv) AppleWebKit/537.36 (KHTML, like Gecko) Version/4.0 "
    "Chrome/120.0.6099.230 Mobile Safari/537.36 AliApp(DingTalk/7.8.1) com.alibaba.android.rimet/13534898 "
    "Channel/212200 language/zh-CN UT4Aplus/0.2.25 colorScheme/light"
)
ME = "/_gateway/api/dingtalk/v1.0/contact/users/me"
ROUTES = [{"provider": "dingtalk", "path": "v1.0/contact/users/*", "scopes": ["Contact.User.Read"]}]
CALL = ("gateway.fetch('" + ME + "').then(function (r) { return r.json().then(function (b) {"
        " return {status: r.status, body: b}; }); }, function (e) { return {rejected: e}; })")


async def test_free_login_then_consent_in_the_page_gives_a_user_token(browser: Browser) -> None:
    sandbox = DingTalkSandbox()
    opened: list[Any] = []
    async with served(sandbox) as urls:
        settings = {**sandbox.provider_settings(urls), "jssdk_url": urls["api"] + "/_sandbox/dingtalk.open.js"}
        async with relay_gateway("dingtalk", settings, ROUTES, app=spa()) as running:  # a page with gateway.js
            client = await open_simulated_client(browser, user_agent=DINGTALK_UA, init_script=None)
            client.page.on("request", lambda request: opened.append(request.post_data_json)
                           if request.url.endswith("/_sandbox/jsapi/open_auth") else None)
            await client.page.goto(f"{running.url}/app", wait_until="commit")
            await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)
            await client.page.wait_for_function("window.gateway && window.pageId", timeout=10_000)
            assert sandbox.stats["jsapi_code"] == 1 and sandbox.stats["open_auth"] == 0  # the free login
            page_id = await client.page.evaluate("window.pageId")
            answer = await client.page.evaluate(CALL)
            assert answer.get("status") == 200, answer
            assert answer["body"]["unionId"]
            assert await client.page.evaluate("window.pageId") == page_id  # no navigation
    assert [(body["type"], body["rpcScope"]) for body in opened] == [("0", "Contact.User.Read")]
    assert sandbox.stats["authorization_code"] == 1 and not client.errors


async def test_a_refused_authorization_component_rejects_with_the_consent_url(browser: Browser) -> None:
    sandbox = DingTalkSandbox()
    async with served(sandbox) as urls:
        settings = {**sandbox.provider_settings(urls), "jssdk_url": urls["api"] + "/_sandbox/dingtalk.open.js"}
        async with relay_gateway("dingtalk", settings, ROUTES, app=spa()) as running:
            client = await open_simulated_client(browser, user_agent=DINGTALK_UA, init_script=None)
            await client.page.goto(f"{running.url}/app", wait_until="commit")
            await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)
            await client.page.wait_for_function("window.gateway && window.pageId", timeout=10_000)
            sandbox.open_auth_status = "cancel"
            rejected = (await client.page.evaluate(CALL))["rejected"]
            assert rejected["error"] == "consent_required"
            assert rejected["consentUrl"].startswith("/_gateway/consent?provider=dingtalk&scopes=Contact.User.Read")
