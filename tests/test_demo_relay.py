"""The demo's relay page (``/relay``) in real Chromium, against the whole demo served here.

For each provider the page calls one Open API through ``/_gateway/api/<provider>/...`` with
``gateway.fetch``, after the tour's switch made the emulator's user not have granted the scope:
inside the simulated client, Feishu/Lark and DingTalk answer 403 consent_required and gateway.fetch
runs the client's consent JSAPI in the page, then the call goes through, without any navigation.
Tencent Meeting has no such JSAPI and answers a missing scope with 190303 (its expired-token code):
the page shows that answer, passed on after one refresh, and the user authorizes the app again (a
navigation, said so on the page). Outside the client, gateway.fetch hands back the consent URL.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from gateway.demo import RunningDemo, running_demo
from tests.conftest import BROWSER_UA, HTML, free_port_block

pytestmark = pytest.mark.asyncio(loop_scope="module")

WAIT_MS = 15000
#: What each provider's answer shows once the call went through (a key of its JSON).
SHOWS = {"lark": "calendar_list", "dingtalk": "unionId", "dingtalk-isv": "unionId", "wemeet": "username"}
EMULATOR = {"lark": "lark", "dingtalk": "dingtalk", "dingtalk-isv": "dingtalk", "wemeet": "wemeet"}


@pytest_asyncio.fixture(loop_scope="module")
async def demo() -> AsyncIterator[RunningDemo]:
    async with running_demo(port=free_port_block(8)) as running:
        yield running


async def open_relay(browser: Browser, demo: RunningDemo, provider: str, how: str) -> Page:
    """From the tour, the provider's "through the relay" link: the sign-in, then the relay page."""
    context = await browser.new_context(locale="en-US", viewport={"width": 390, "height": 844})
    page = await context.new_page()
    await page.goto(demo.url + "/demo/")
    label = "in the simulated client" if how == "client" else "in the browser"
    await page.locator(f"#provider-{provider} p.relay a", has_text=label).click()
    await page.wait_for_url(re.compile(re.escape(demo.url) + r"/relay(\?.*)?$"), timeout=WAIT_MS)
    await expect(page.locator("#relay-call")).to_be_visible(timeout=WAIT_MS)
    return page


async def withhold_the_scope(page: Page) -> None:
    await page.locator("#relay-withhold").click()
    await expect(page.locator("#tour-message")).to_contain_text("has not granted", timeout=WAIT_MS)


def watch_navigations(page: Page) -> list[str]:
    """Every navigation of the page's main frame from now on (a reload counts)."""
    seen: list[str] = []
    page.on("framenavigated", lambda frame: seen.append(frame.url) if frame == page.main_frame else None)
    return seen


async def call(page: Page) -> list[str]:
    """Press the call button, wait for the answer; the steps gateway.fetch took."""
    await page.locator("#relay-call").click()
    await expect(page.locator("#relay-status")).to_contain_text("HTTP ", timeout=WAIT_MS)
    await expect(page.locator("#relay-call")).to_be_enabled(timeout=WAIT_MS)
    return await page.locator("#relay-steps li").all_text_contents()


async def answer_of(page: Page) -> object:
    return json.loads(await page.locator("#relay-answer").text_content() or "null")


@pytest.mark.parametrize("provider", ["lark", "dingtalk", "dingtalk-isv"])
async def test_the_in_client_consent_round_trip_then_the_data(
        module_browser: Browser, demo: RunningDemo, provider: str) -> None:
    page = await open_relay(module_browser, demo, provider, "client")
    sandbox = demo.sandboxes[EMULATOR[provider]]
    await withhold_the_scope(page)
    await page.evaluate("window.notReloaded = true")
    at, navigations = page.url, watch_navigations(page)
    consents_before = sandbox.stats["jsapi_code" if provider == "lark" else "open_auth"]

    steps = await call(page)

    await expect(page.locator("#relay-status")).to_contain_text("HTTP 200")
    assert f'"{SHOWS[provider]}"' in (await page.locator("#relay-answer").text_content() or "")
    # The round trip, as gateway.fetch made it: refused for the scope, the consent page's settings,
    # the client's code exchanged for the new grant, the same call again.
    assert "403 consent_required" in steps[0] and f"/api/{provider}/" in steps[0], steps
    assert any("/_gateway/consent?" in step and "→ 200" in step for step in steps), steps
    assert any(f"/_gateway/exchange/{provider}" in step and "→ 200" in step for step in steps), steps
    assert f"/api/{provider}/" in steps[-1] and "→ 200" in steps[-1], steps
    assert sandbox.stats["jsapi_code" if provider == "lark" else "open_auth"] == consents_before + 1
    # No navigation: the same page, never reloaded.
    assert navigations == [] and page.url == at and await page.evaluate("window.notReloaded") is True
    await page.context.close()


async def test_tencent_meeting_answers_190303_then_the_user_authorizes_again(
        module_browser: Browser, demo: RunningDemo) -> None:
    page = await open_relay(module_browser, demo, "wemeet", "client")
    sandbox = demo.sandboxes["wemeet"]
    await expect(page.locator("#relay-how")).to_contain_text("no in-client JSAPI")
    await withhold_the_scope(page)
    refreshes = sandbox.stats["refresh_token"]
    navigations = watch_navigations(page)

    steps = await call(page)

    await expect(page.locator("#relay-status")).to_contain_text("HTTP 400")
    await expect(page.locator("#relay-status .code")).to_have_text("error code: 190303")
    answer = await answer_of(page)
    assert isinstance(answer, dict) and answer["error_info"]["error_code"] == 190303
    assert len(steps) == 1 and "400 error_code 190303" in steps[0], steps  # no consent_required to act on
    assert sandbox.stats["refresh_token"] == refreshes + 1  # the gateway refreshed once, then passed it on
    assert navigations == []

    # What really happens: the user authorizes the app again, a new sign-in (the page says it leaves).
    reauthorize = page.locator("#relay-reauthorize a")
    await expect(reauthorize).to_be_visible()
    await reauthorize.click()
    await page.wait_for_url(re.compile(re.escape(demo.url) + r"/relay$"), timeout=WAIT_MS)
    await expect(page.locator("#relay-call")).to_be_visible(timeout=WAIT_MS)
    assert navigations  # it did leave the page
    steps = await call(page)
    await expect(page.locator("#relay-status")).to_contain_text("HTTP 200")
    answer = await answer_of(page)
    assert isinstance(answer, dict) and answer["username"] and type(answer["is_voov"]) is int
    assert len(steps) == 1 and "→ 200" in steps[0], steps
    await page.context.close()


async def test_outside_the_client_gateway_fetch_hands_back_the_consent_url(
        module_browser: Browser, demo: RunningDemo) -> None:
    page = await open_relay(module_browser, demo, "lark", "browser")
    await withhold_the_scope(page)
    navigations = watch_navigations(page)
    await page.locator("#relay-call").click()
    link = page.locator("#relay-consent-link")
    await expect(link).to_be_visible(timeout=WAIT_MS)
    assert (await link.get_attribute("href") or "").startswith("/_gateway/consent?provider=lark&scopes=")
    assert navigations == []  # nothing was tried behind the user's back
    await link.click()  # the browser consent at the emulator, then back to the relay page
    await page.wait_for_url(re.compile(re.escape(demo.url) + r"/relay$"), timeout=WAIT_MS)
    await expect(page.locator("#relay-call")).to_be_visible(timeout=WAIT_MS)
    await call(page)
    await expect(page.locator("#relay-status")).to_contain_text("HTTP 200")
    await page.context.close()


async def test_the_relay_page_and_its_switch_refuse_bad_input(demo: RunningDemo) -> None:
    async with httpx.AsyncClient(base_url=demo.url, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        tour = await client.get("/demo/", headers=HTML)
        for provider in SHOWS:
            assert f"/demo/client/{EMULATOR[provider]}?provider={provider}&amp;then=relay" in tour.text
        anonymous = await client.get("/relay", headers=HTML)
        assert anonymous.status_code == 302 and anonymous.headers["location"].startswith("/_gateway/login?next=")
        grant = {"provider": "lark", "granted": True}
        assert (await client.post("/demo/api/grant", json={**grant, "granted": "yes"})).json()["error"] == "bad_grant"
        unknown = await client.post("/demo/api/grant", json={**grant, "provider": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_provider"
        foreign = await client.post("/demo/api/grant", json=grant, headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"] == "cross_origin"
        # Signed in, the page loads gateway.js and allows the emulators' fake JSSDKs, nothing inline.
        await client.get("/_gateway/login?provider=lark&next=/relay", headers=HTML, follow_redirects=True)
        page = await client.get("/relay", headers=HTML)
        assert page.status_code == 200 and '<script src="/_gateway/static/gateway.js"></script>' in page.text
        policy = page.headers["content-security-policy"]
        assert "unsafe-inline" not in policy and not re.search(r"<script(?![^>]*\bsrc=)", page.text)
        for url in demo.hosts["lark"].values():
            assert url in policy.split("script-src")[1].split(";")[0]
