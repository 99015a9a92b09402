"""The demo tour (``gateway demo``'s ``/demo/``) in real Chromium, against the whole demo served here.

Each test starts the demo as ``gateway demo`` runs it (``running_demo``: the gateway, the demo app
and every emulator on consecutive loopback ports), opens the tour in a plain browser context (the
demo's own cookie makes the gateway see a client's User-Agent for "Open in the simulated client"),
flips a switch and follows the path a user would, to the page that user should see.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from gateway.demo import RunningDemo, running_demo
from plugins.dingtalk.sandbox import DingTalkSandbox
from plugins.wemeet.sandbox import DEFAULT_USERS as WEMEET_USERS
from plugins.wemeet.sandbox import WeMeetSandbox
from tests.conftest import BROWSER_UA, HTML, free_port_block

# One Chromium for the module (conftest's ``module_browser``): the tests and their demo fixture run
# on the module's event loop.
pytestmark = pytest.mark.asyncio(loop_scope="module")

TITLES = {"lark": "Feishu/Lark", "dingtalk": "DingTalk (internal app)", "dingtalk-isv": "DingTalk (third-party app)",
          "wemeet": "Tencent Meeting"}
WAIT_MS = 15000


@pytest_asyncio.fixture(loop_scope="module")
async def demo() -> AsyncIterator[RunningDemo]:
    async with running_demo(port=free_port_block(8)) as running:
        yield running


async def open_tour(browser: Browser, demo: RunningDemo, *, width: int = 1000) -> Page:
    context = await browser.new_context(locale="en-US", viewport={"width": width, "height": 900})
    page = await context.new_page()
    await page.goto(demo.url + "/demo/")
    return page


async def flip(page: Page, provider: str, switch: str, on: bool = True) -> None:
    box = page.locator(f'input[data-provider="{provider}"][data-switch="{switch}"]')
    await box.set_checked(on)
    await expect(page.locator("#tour-message")).to_contain_text(f"{TITLES[provider]}: {'on' if on else 'off'}",
                                                                timeout=WAIT_MS)


async def open_with(page: Page, provider: str, how: str) -> None:
    label = "Open in the browser" if how == "browser" else "Open in the simulated client"
    await page.locator(f"#provider-{provider} a", has_text=label).click()


async def act(page: Page, provider: str, action: str) -> None:
    await page.locator(f'button[data-action="{action}"][data-provider="{provider}"]').click()


async def sign_in(page: Page, demo: RunningDemo, provider: str, how: str = "browser") -> str:
    """Open the app with ``provider``; the app page's greeting once it is there."""
    await open_with(page, provider, how)
    await page.wait_for_url(re.compile(re.escape(demo.url) + r"/(\?.*)?$"), timeout=WAIT_MS)
    greeting = page.locator("h1")
    await expect(greeting).to_contain_text("Hello,", timeout=WAIT_MS)
    return str(await greeting.text_content())


async def back_to_tour(page: Page, demo: RunningDemo) -> None:
    await page.goto(demo.url + "/demo/")


async def test_the_tour_names_every_provider_and_keeps_its_own_policy(demo: RunningDemo) -> None:
    async with httpx.AsyncClient(base_url=demo.url, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        tour = await client.get("/demo/", headers=HTML)
        assert tour.status_code == 200
        for title in TITLES.values():
            assert f"<h2>{title}</h2>" in tour.text
        # Nothing inline: the page's script and style come from the demo's own origin, as its CSP says.
        policy = tour.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "style-src 'self'" in policy and "unsafe-inline" not in policy
        assert not re.search(r"<script(?![^>]*\bsrc=)", tour.text) and "<style" not in tour.text
        assert (await client.get("/demo/static/demo.js")).headers["content-type"].startswith("application/javascript")
        assert (await client.get("/demo/static/../demo.py")).status_code == 404
        icon = await client.get("/favicon.ico")
        assert icon.headers["content-type"] == "image/svg+xml" and icon.text.startswith("<svg")
        # The tour's actions: JSON from its own pages, a stable code and a sentence for anything else.
        switch = {"provider": "lark", "switch": "deny", "on": True}
        foreign = await client.post("/demo/api/switch", json=switch, headers={"origin": "http://evil.example"})
        assert foreign.status_code == 403 and foreign.json()["error"] == "cross_origin"
        form = await client.post("/demo/api/switch", data={"provider": "lark"})
        assert form.status_code == 415 and form.json()["message"]
        unknown = await client.post("/demo/api/switch", json={**switch, "provider": "nope"})
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_provider"
        lark_approval = await client.post("/demo/api/switch", json={**switch, "switch": "approval"})
        assert lark_approval.status_code == 409 and lark_approval.json()["error"] == "not_applicable"
        # Acting on a session needs one, and the gateway in front says so.
        anonymous = await client.post("/demo-api/expire", json={"provider": "lark"})
        assert anonymous.status_code == 401 and anonymous.json()["error"] == "login_required"
        timeline = (await client.get("/demo/api/timeline", params={"after": "x"})).json()
        assert isinstance(timeline["events"], list)


@pytest.mark.parametrize("how", ["browser", "client"])
async def test_the_user_denies_feishu(module_browser: Browser, demo: RunningDemo, how: str) -> None:
    page = await open_tour(module_browser, demo)
    await flip(page, "lark", "deny")
    await open_with(page, "lark", how)
    # In the client the refusal fails requestAccess, and the page continues with the browser
    # sign-in, where the refusal is explicit: both end on the gateway's "declined" page.
    await expect(page.locator("h1")).to_have_text("Sign-in was declined", timeout=WAIT_MS)
    assert "/_gateway/callback/lark" in page.url
    await back_to_tour(page, demo)
    await expect(page.locator("#timeline .ev-refused").first).to_be_visible(timeout=WAIT_MS)


async def test_the_user_denies_in_the_tencent_meeting_client(module_browser: Browser, demo: RunningDemo) -> None:
    page = await open_tour(module_browser, demo)
    await flip(page, "wemeet", "deny")
    await open_with(page, "wemeet", "client")
    await expect(page.locator("#gw-title")).to_have_text("Sign-in was declined", timeout=WAIT_MS)
    await expect(page.locator("#gw-status")).to_contain_text("declined")


@pytest.mark.parametrize("how", ["browser", "client"])
async def test_tencent_meeting_waits_for_the_administrator_then_signs_in(
    module_browser: Browser, demo: RunningDemo, how: str
) -> None:
    page = await open_tour(module_browser, demo)
    await flip(page, "wemeet", "approval")
    await open_with(page, "wemeet", how)
    title = page.locator("h1#gw-title" if how == "client" else "h1")
    await expect(title).to_have_text("Waiting for your administrator", timeout=WAIT_MS)
    await back_to_tour(page, demo)
    await act(page, "wemeet", "approve")
    await expect(page.locator('[data-status="wemeet"]')).to_have_text("administrator: approved", timeout=WAIT_MS)
    assert await sign_in(page, demo, "wemeet", how) == f"Hello, {WEMEET_USERS[0].username}"


@pytest.mark.parametrize("provider", ["dingtalk", "dingtalk-isv"])
async def test_a_dingtalk_member_waits_for_the_administrator_then_signs_in(
    module_browser: Browser, demo: RunningDemo, provider: str
) -> None:
    sandbox = demo.sandboxes["dingtalk"]
    assert isinstance(sandbox, DingTalkSandbox)
    page = await open_tour(module_browser, demo)
    assert await sign_in(page, demo, provider, "client") == "Hello, 张三"  # an administrator: granted at once
    await back_to_tour(page, demo)
    await flip(page, provider, "approval")  # 李四, a member, in an organisation that has not granted the app
    await open_with(page, provider, "client")
    await expect(page.locator("#gw-title")).to_have_text("Waiting for your administrator", timeout=WAIT_MS)
    assert [request.requested_by for request in sandbox.admin_requests] == ["lisi0002"]
    await back_to_tour(page, demo)
    await expect(page.locator(f'[data-status="{provider}"]')).to_have_text("administrator: 1 waiting")
    await act(page, provider, "approve")
    await expect(page.locator(f'[data-status="{provider}"]')).to_have_text("administrator: approved", timeout=WAIT_MS)
    assert await sign_in(page, demo, provider, "client") == "Hello, 李四"  # the approved request goes through


@pytest.mark.parametrize("how", ["browser", "client"])
async def test_an_administrators_refusal_is_not_called_the_users(
    module_browser: Browser, demo: RunningDemo, how: str
) -> None:
    page = await open_tour(module_browser, demo)
    await flip(page, "wemeet", "approval")
    await act(page, "wemeet", "reject")
    await expect(page.locator('[data-status="wemeet"]')).to_have_text("administrator: rejected", timeout=WAIT_MS)
    await open_with(page, "wemeet", how)
    # In the client the dialog's refusal leads to the authorization page: both end on the callback.
    await page.wait_for_url(re.compile(r"/_gateway/callback/wemeet"), timeout=WAIT_MS)
    body = page.locator("body")
    await expect(body).to_contain_text("administrator has not allowed this app")
    await expect(body).to_contain_text("admin_rejected")
    assert "declined" not in (await body.text_content() or "")


@pytest.mark.parametrize("provider", ["lark", "dingtalk", "wemeet"])
async def test_expiring_the_access_token_makes_one_refresh(
    module_browser: Browser, demo: RunningDemo, provider: str
) -> None:
    sandbox = demo.sandboxes["lark" if provider == "lark" else provider]
    page = await open_tour(module_browser, demo)
    await sign_in(page, demo, provider)
    await back_to_tour(page, demo)
    await expect(page.locator("#identity-summary")).to_contain_text(f"Signed in with {TITLES[provider]}",
                                                                    timeout=WAIT_MS)
    assert sandbox.stats["refresh_token"] == 0
    await act(page, provider, "expire")
    await expect(page.locator("#tour-message")).to_contain_text("5 requests answered", timeout=WAIT_MS)
    await expect(page.locator("#timeline .ev-app")).to_have_count(5, timeout=WAIT_MS)
    await expect(page.locator("#timeline .ev-refresh")).to_have_count(1)
    assert sandbox.stats["refresh_token"] == 1
    await expect(page.locator("#identity-summary")).to_contain_text(f"Signed in with {TITLES[provider]}")


async def test_a_second_device_kills_the_old_tencent_meeting_tokens(module_browser: Browser, demo: RunningDemo) -> None:
    sandbox = demo.sandboxes["wemeet"]
    assert isinstance(sandbox, WeMeetSandbox)
    zhang = WEMEET_USERS[0].open_id
    page = await open_tour(module_browser, demo)
    await sign_in(page, demo, "wemeet")
    first_access, first_refresh = sandbox._live[zhang]
    await back_to_tour(page, demo)
    await expect(page.locator("#identity-summary")).to_contain_text("Signed in with Tencent Meeting",
                                                                    timeout=WAIT_MS)
    await act(page, "wemeet", "second-device")
    message = page.locator("#tour-message")
    await expect(message).to_contain_text("The second device is signed in", timeout=WAIT_MS)
    # Tencent Meeting kills the previous pair the moment it issues a new one: the old refresh
    # token is refused, as its documentation says.
    await expect(message).to_contain_text("refused the first device's old refresh token")
    assert not sandbox.is_live(first_access) and not sandbox._refresh[first_refresh].alive
    await expect(page.locator("#timeline .ev-revoked").first).to_be_visible(timeout=WAIT_MS)
    # This browser's session shares the user's one token record: it goes on with the new tokens.
    await page.reload()
    await expect(page.locator("#identity-summary")).to_contain_text("Signed in with Tencent Meeting",
                                                                    timeout=WAIT_MS)


@pytest.mark.parametrize("provider", ["lark", "dingtalk"])
async def test_a_second_device_leaves_the_old_tokens_alone_elsewhere(
    module_browser: Browser, demo: RunningDemo, provider: str
) -> None:
    page = await open_tour(module_browser, demo)
    await sign_in(page, demo, provider)
    await back_to_tour(page, demo)
    await expect(page.locator("#identity-summary")).to_contain_text(f"Signed in with {TITLES[provider]}",
                                                                    timeout=WAIT_MS)
    await act(page, provider, "second-device")
    # Neither documents a revocation on a new login (the emulators keep the earlier grant): the
    # first device's refresh token still works, while the gateway keeps only the newest tokens.
    await expect(page.locator("#tour-message")).to_contain_text("still accepted the first device's old refresh token",
                                                                timeout=WAIT_MS)
    await expect(page.locator("#timeline .ev-revoked")).to_have_count(1)  # the demo's own try rotated it
    await page.reload()
    await expect(page.locator("#identity-summary")).to_contain_text(f"Signed in with {TITLES[provider]}",
                                                                    timeout=WAIT_MS)


async def test_the_tour_and_the_app_page_fit_a_phone(module_browser: Browser, demo: RunningDemo) -> None:
    page = await open_tour(module_browser, demo, width=390)
    width = "() => document.scrollingElement.scrollWidth"
    assert await page.evaluate(width) <= 390
    await sign_in(page, demo, "dingtalk-isv", "client")  # long ids and a JWT among the headers
    await expect(page.locator("#timeline li").first).to_be_visible(timeout=WAIT_MS)
    assert await page.evaluate(width) <= 390
    await back_to_tour(page, demo)
    await expect(page.locator("#identity-claims")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#timeline li").first).to_be_visible(timeout=WAIT_MS)
    assert await page.evaluate(width) <= 390


async def test_the_timeline_tells_an_in_client_sign_in_in_order(module_browser: Browser, demo: RunningDemo) -> None:
    page = await open_tour(module_browser, demo)
    assert await sign_in(page, demo, "lark", "client") == "Hello, 张三"
    # The app page shows the sign-in that led to it, from the "open" on, in the order it happened.
    await expect(page.locator("#timeline .ev-identity", has_text="the app received")).to_be_visible(timeout=WAIT_MS)
    kinds = [kind.split()[-1].removeprefix("ev-") for kind in
             await page.locator("#timeline li").evaluate_all("items => items.map(item => item.className)")]
    steps = [kind for kind in kinds if kind in ("open", "jsapi", "code", "exchange", "tokens", "identity")]
    assert steps == ["open", "jsapi", "code", "exchange", "tokens", "identity", "identity"], kinds
    times = await page.locator("#timeline .when").all_text_contents()
    assert times[0] == "start" and all(re.fullmatch(r"\+\d+(\.\d)? (ms|s|min)", when) for when in times[1:]), times
    async with httpx.AsyncClient(timeout=10) as client:
        timeline = (await client.get(demo.url + "/demo/api/timeline")).json()["events"]
    assert [event["at"] for event in timeline] == sorted(event["at"] for event in timeline)
