"""Tencent Meeting end to end: AuthGateway around the echo app and the WeMeet emulator, each on its
own loopback port (uvicorn), and ``gateway demo`` as a subprocess. No mocks: every hop is real HTTP.

Covered: the browser OAuth flow, the in-client exchange, personal users (no tenant header), a grant
without the profile scope, the enterprise administrator's pending approval and a refusal (clear
pages), two devices sharing one rotating token record, and concurrent requests near expiry that
cause exactly one refresh.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
import jwt
import pytest

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from plugins.wemeet.sandbox import DEFAULT_USERS, WeMeetSandbox
from tests.conftest import BROWSER_UA, HTML, RunningGateway, echo_app, free_port, free_port_block, headers_of

ZHANG, LI_SI, WANG, PAT, ZHAO = DEFAULT_USERS
WEMEET_UA = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/77.0.3865.120 "
    "Safari/537.36 arch/x86_64 app/tencent_wemeet os_name/Windows os_version/10.0.19045 app_version/3.26.10.420 "
    "c_district/0"
)
JSON = {"accept": "application/json"}


@dataclass
class ServedWeMeet:
    sandbox: WeMeetSandbox
    urls: dict[str, str]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {**self.sandbox.provider_settings(self.urls), **overrides}


@pytest.fixture
async def wemeet() -> AsyncIterator[ServedWeMeet]:
    """The WeMeet emulator, its two hosts on their own loopback ports."""
    sandbox = WeMeetSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        yield ServedWeMeet(sandbox, urls)


Starter = Callable[..., contextlib.AbstractAsyncContextManager[RunningGateway]]


@pytest.fixture
def start(wemeet: ServedWeMeet) -> Starter:
    """``async with start(**config_sections) as running``: AuthGateway(echo app) for WeMeet only."""

    @contextlib.asynccontextmanager
    async def run(provider: dict[str, Any] | None = None, **sections: Any) -> AsyncIterator[RunningGateway]:
        port = free_port()
        data: dict[str, Any] = {
            "public_url": f"http://127.0.0.1:{port}",
            "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
            "providers": {"wemeet": wemeet.settings(**(provider or {}))},
        }
        for key, value in sections.items():
            data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
        config = GatewayConfig(**data)
        gateway = AuthGateway(echo_app(), config)
        try:
            async with serve_apps({"gateway": gateway}, port=port) as urls:
                yield RunningGateway(urls["gateway"], gateway, config)
        finally:
            await gateway.aclose()

    return run


def identity(answer: httpx.Response) -> dict[str, str | None]:
    """What the upstream received as identity (None: the header was absent)."""
    received = headers_of(answer)
    name = received.get("x-auth-name")
    return {
        "user": received["x-auth-user"][0],
        "provider": received["x-auth-provider"][0],
        "tenant": received["x-auth-tenant"][0] if "x-auth-tenant" in received else None,
        "name": unquote(name[0]) if name else None,
    }


def page_config(html: str) -> dict[str, Any]:
    match = re.search(r'<script id="gw-config" type="application/json">(.*?)</script>', html, re.S)
    assert match, "the handshake page embeds its config"
    config: dict[str, Any] = json.loads(match.group(1).replace("<\\/", "</"))
    return config


async def client_login(client: httpx.AsyncClient, running: RunningGateway, code: str, next_path: str = "/") -> None:
    """What the handshake page does inside the client: read the state, POST the code."""
    page = await client.get(f"/_gateway/login?next={next_path}", headers=HTML)
    assert page.status_code == 200, page.text
    state = page_config(page.text)["state"]
    answer = await client.post("/_gateway/exchange/wemeet", json={"code": code, "state": state},
                               headers={"origin": running.url})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"next": next_path}


# -- the browser OAuth flow ------------------------------------------------------------------------


async def test_browser_oauth_flow_ends_on_the_app_with_a_verified_identity(
    start: Starter, wemeet: ServedWeMeet
) -> None:
    async with start() as running, running.client() as client:
        login = await client.get("/_gateway/login?next=/orders%3Fid%3D7", headers=HTML)
        assert login.status_code == 302
        target = urlsplit(login.headers["location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == wemeet.urls["web"] + "/marketplace/authorize.html"
        query = parse_qs(target.query)
        assert query["corp_id"] == [wemeet.sandbox.corp_id] and query["sdk_id"] == [wemeet.sandbox.sdk_id]
        assert query["redirect_uri"] == [f"{running.url}/_gateway/callback/wemeet"]
        assert re.fullmatch(r"[A-Za-z0-9]{1,64}", query["state"][0])

        answer = await client.get("/orders?id=7", headers=HTML, follow_redirects=True)
        assert answer.status_code == 200 and str(answer.url).endswith("/orders?id=7")
        assert [r.url.path for r in answer.history] == [
            "/orders", "/_gateway/login", "/marketplace/authorize.html", "/_gateway/callback/wemeet"]
        assert identity(answer) == {"user": ZHANG.open_id, "provider": "wemeet", "tenant": ZHANG.open_corp_id,
                                    "name": "张三"}
        token = headers_of(answer)["x-auth-identity"][0]
        jwks = (await client.get("/_gateway/jwks.json")).json()
        claims = jwt.decode(token, jwt.PyJWK(jwks["keys"][0]).key, algorithms=["EdDSA"], audience="upstream",
                            issuer=running.url)
        assert (claims["user"], claims["provider"], claims["tenant"]) == (ZHANG.open_id, "wemeet", ZHANG.open_corp_id)
        me = await client.get("/_gateway/me")
        assert me.json() == {"provider": "wemeet", "user": ZHANG.open_id, "tenant": ZHANG.open_corp_id,
                             "name": "张三"}
    stats = wemeet.sandbox.stats
    assert (stats["authorize"], stats["access_token"], stats["profile"], stats["refresh_token"]) == (1, 1, 1, 0)


async def test_a_personal_user_has_no_tenant_header(start: Starter, wemeet: ServedWeMeet) -> None:
    wemeet.sandbox.set_current_user(PAT.open_id)
    async with start() as running, running.client() as client:
        answer = await client.get("/", headers=HTML, follow_redirects=True)
        assert identity(answer) == {"user": PAT.open_id, "provider": "wemeet", "tenant": None, "name": "Pat Personal"}
        assert "x-auth-tenant" not in headers_of(answer)  # absent, not an empty string
        assert (await client.get("/_gateway/me")).json()["tenant"] == ""


async def test_a_grant_without_the_profile_scope_still_logs_in(start: Starter, wemeet: ServedWeMeet) -> None:
    wemeet.sandbox.set_current_user(ZHAO.open_id)
    async with start() as running, running.client() as client:
        answer = await client.get("/", headers=HTML, follow_redirects=True)
        assert identity(answer) == {"user": ZHAO.open_id, "provider": "wemeet", "tenant": ZHAO.open_corp_id,
                                    "name": None}
    assert wemeet.sandbox.stats["profile"] == 0


async def test_pending_admin_approval_gets_a_clear_page_then_works_once_approved(
    start: Starter, wemeet: ServedWeMeet
) -> None:
    wemeet.sandbox.set_current_user(WANG.open_id)
    async with start() as running, running.client() as client:
        waiting = await client.get("/app", headers=HTML, follow_redirects=True)
        assert waiting.status_code == 403 and waiting.url.path == "/_gateway/callback/wemeet"
        assert "text/html" in waiting.headers["content-type"] and "Traceback" not in waiting.text
        assert "administrator" in waiting.text and "sign in again" in waiting.text
        assert "approval_pending" in waiting.text and "/_gateway/login?" in waiting.text
        assert (await client.get("/_gateway/me")).status_code == 401
        assert wemeet.sandbox.applications == {WANG.open_id}

        wemeet.sandbox.approve(WANG.open_id)
        answer = await client.get("/app", headers=HTML, follow_redirects=True)
        assert answer.status_code == 200
        assert identity(answer) == {"user": WANG.open_id, "provider": "wemeet", "tenant": WANG.open_corp_id,
                                    "name": "王五"}


async def test_a_pending_callback_answers_json_to_api_clients(start: Starter) -> None:
    async with start() as running, running.client() as client:
        login = await client.get("/_gateway/login", headers=HTML)
        state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
        answer = await client.get(f"/_gateway/callback/wemeet?state={state}", headers=JSON)
        assert answer.status_code == 403 and answer.json()["error"] == "approval_pending"


async def test_a_refusal_gets_a_clear_page(start: Starter, wemeet: ServedWeMeet) -> None:
    wemeet.sandbox.auto_consent = False
    wemeet.sandbox.set_current_user(LI_SI.open_id)  # never authorized the app: the consent page
    async with start() as running, running.client() as client:
        consent = await client.get("/app", headers=HTML, follow_redirects=True)
        assert consent.url.path == "/marketplace/authorize.html" and "Deny" in consent.text
        ticket = re.search(r'name="ticket" value="([^"]+)"', consent.text)
        assert ticket is not None
        denied = await client.post(wemeet.urls["web"] + "/_sandbox/consent", headers=HTML, follow_redirects=True,
                                   data={"ticket": ticket.group(1), "decision": "deny"})
        assert denied.status_code == 403 and denied.url.path == "/_gateway/callback/wemeet"
        assert "declined" in denied.text and "Try again" in denied.text and "Traceback" not in denied.text
        # The enterprise administrator refuses instead: a clear page that says so, not "you declined".
        wemeet.sandbox.approve(LI_SI.open_id, "rejected")
        refused = await client.get("/app", headers=HTML, follow_redirects=True)
        assert refused.status_code == 403 and "administrator" in refused.text and "admin_rejected" in refused.text
        assert "declined" not in refused.text


# -- the in-client exchange ------------------------------------------------------------------------------


async def test_in_client_exchange_logs_in_silently(start: Starter, wemeet: ServedWeMeet) -> None:
    async with start() as running, running.client(WEMEET_UA) as client:
        page = await client.get("/_gateway/login?next=/inbox", headers=HTML)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        config = page_config(page.text)
        assert (config["plugin"], config["displayName"], config["jssdkUrl"]) == ("wemeet", "Tencent Meeting", "")
        assert config["bridge"] == {"sdkId": wemeet.sandbox.sdk_id, "corpId": wemeet.sandbox.corp_id,
                                    "redirectUri": f"{running.url}/_gateway/callback/wemeet",
                                    "state": config["state"]}
        assert urlsplit(config["fallbackUrl"]).path == "/marketplace/authorize.html"
        bridge = await client.get("/_gateway/static/bridge/wemeet.js")
        assert bridge.status_code == 200 and "requestAgentAuthCode" in bridge.text

        code = wemeet.sandbox.mint_client_code()
        exchange = await client.post("/_gateway/exchange/wemeet", json={"code": code, "state": config["state"]},
                                     headers={"origin": running.url})
        assert exchange.status_code == 200 and exchange.json() == {"next": "/inbox"}
        assert identity(await client.get("/inbox"))["user"] == ZHANG.open_id

        # A code Tencent Meeting refuses (here: already used) is a stable error, not a 500.
        page = await client.get("/_gateway/login", headers=HTML)
        reused = await client.post("/_gateway/exchange/wemeet",
                                   json={"code": code, "state": page_config(page.text)["state"]},
                                   headers={"origin": running.url})
        assert reused.status_code == 401 and reused.json()["error"] == "code_invalid"
        assert code not in reused.text and wemeet.sandbox.secret not in reused.text


# -- one token record, two devices, rotation -------------------------------------------------------------


async def test_two_devices_share_one_rotating_record(start: Starter, wemeet: ServedWeMeet) -> None:
    sandbox = wemeet.sandbox
    sandbox.access_ttl_s = 4  # refresh is due about 2 s after issue (half the lifetime)
    sections = {"identity": {"pass_access_token": True}, "session": {"cache_ttl_s": 0}}
    async with start(**sections) as running, running.client(WEMEET_UA) as phone, running.client() as laptop:
        await client_login(phone, running, sandbox.mint_client_code())  # device A: in the client
        first = headers_of(await phone.get("/a"))["x-auth-access-token"][0]
        assert sandbox.is_live(first)

        # Device B logs in through the browser: Tencent Meeting rotates, the old pair dies...
        assert identity(await laptop.get("/b", headers=HTML, follow_redirects=True))["user"] == ZHANG.open_id
        second = headers_of(await laptop.get("/b"))["x-auth-access-token"][0]
        assert second != first and sandbox.is_live(second) and not sandbox.is_live(first)
        # ... and device A keeps working, with the new tokens (one record per user).
        phone_answer = await phone.get("/a")
        assert phone_answer.status_code == 200
        assert headers_of(phone_answer)["x-auth-access-token"] == [second]

        # Near expiry, one device's request refreshes; both then use the refreshed pair.
        await asyncio.sleep(2.2)
        sandbox.access_ttl_s = 3600  # the refreshed pair is not due again however slow the machine
        third = headers_of(await phone.get("/a"))["x-auth-access-token"][0]
        assert third not in (first, second) and sandbox.is_live(third) and not sandbox.is_live(second)
        assert headers_of(await laptop.get("/b"))["x-auth-access-token"] == [third]
    assert (sandbox.stats["access_token"], sandbox.stats["refresh_token"]) == (2, 1)


async def test_concurrent_requests_from_two_devices_near_expiry_refresh_exactly_once(
    start: Starter, wemeet: ServedWeMeet
) -> None:
    sandbox = wemeet.sandbox
    sandbox.access_ttl_s = 4
    async with start(identity={"pass_access_token": True}) as running, \
            running.client(WEMEET_UA) as phone, running.client() as laptop:
        await client_login(phone, running, sandbox.mint_client_code())
        await laptop.get("/", headers=HTML, follow_redirects=True)
        await asyncio.sleep(2.2)
        sandbox.access_ttl_s = 3600  # the refreshed pair is not due again however slow the machine
        sandbox.delay_s = 0.2  # a provider that takes its time: every waiter piles up
        answers = await asyncio.gather(*(device.get(f"/r/{n}") for n in range(40) for device in (phone, laptop)))
    assert [a.status_code for a in answers] == [200] * 80
    tokens = {headers_of(a)["x-auth-access-token"][0] for a in answers}
    assert len(tokens) == 1 and sandbox.is_live(tokens.pop())
    assert sandbox.stats["refresh_token"] == 1


async def test_a_dead_refresh_token_sends_the_user_through_the_handshake_again(
    start: Starter, wemeet: ServedWeMeet
) -> None:
    wemeet.sandbox.access_ttl_s = 4
    async with start() as running, running.client() as client:
        await client.get("/", headers=HTML, follow_redirects=True)
        await asyncio.sleep(2.2)
        wemeet.sandbox.revoke(ZHANG.open_id)  # the user cancelled the app: HTTP 400 on refresh
        answer = await client.get("/x", headers=HTML)
        assert answer.status_code == 302 and answer.headers["location"].startswith("/_gateway/login")
        assert (await client.get("/x", headers=JSON)).status_code == 401


async def test_a_transient_refresh_failure_keeps_the_user_in(start: Starter, wemeet: ServedWeMeet) -> None:
    wemeet.sandbox.access_ttl_s = 4
    async with start() as running, running.client() as client:
        await client.get("/", headers=HTML, follow_redirects=True)
        await asyncio.sleep(2.2)
        wemeet.sandbox.inject_fault("refresh_token", status=502)
        assert (await client.get("/x")).status_code == 200  # the old token is still valid
    assert wemeet.sandbox.stats["refresh_token"] == 1


# -- gateway demo ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def demo(port: int, timeout_s: float = 20) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise AssertionError(f"gateway demo exited: {process.stdout.read() if process.stdout else ''}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/demo/", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("gateway demo did not come up")
            time.sleep(0.1)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_gateway_demo_walks_the_wemeet_browser_flow_and_serves_the_simulated_client() -> None:
    port = free_port_block()
    base = f"http://127.0.0.1:{port}"
    with demo(port), httpx.Client(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        home = client.get("/demo/", headers=HTML)
        assert "/demo/client/wemeet" in home.text
        app = client.get("/_gateway/login?provider=wemeet&next=/", headers=HTML, follow_redirects=True)
        assert app.status_code == 200, app.text
        assert "Hello, 张三" in app.text and "verified with the gateway" in app.text
        assert "<td>wemeet</td>" in app.text and ZHANG.open_id in app.text
        assert "/marketplace/authorize.html" in " ".join(str(r.url) for r in app.history)

        client.post("/_gateway/logout", headers={"origin": base})
        client.get("/demo/client/wemeet")
        assert client.cookies.get("demo_client") == "wemeet"
        page = client.get("/_gateway/login?next=/", headers=HTML)
        assert page.status_code == 200
        config = page_config(page.text)
        assert config["plugin"] == "wemeet"
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/_sandbox/wemeet-js-sdk\.js", config["jssdkUrl"])
        sdk = httpx.get(config["jssdkUrl"], timeout=5)
        assert sdk.status_code == 200 and "requestAgentAuthCode" in sdk.text and "window.wemeet" in sdk.text


async def test_a_disabled_account_is_refused_and_the_audit_names_it(start: Starter, wemeet: ServedWeMeet) -> None:
    """The profile says the account is disabled: 403 user_inactive, and ``login.failed`` names the
    account Tencent Meeting refused (the plugin knew it by then), its organisation too."""
    from dataclasses import replace

    from tests.test_request_id import json_lines

    wemeet.sandbox.users[ZHANG.open_id] = replace(ZHANG, status="4")
    async with start() as running, running.client() as client:
        with json_lines("gateway.audit") as buffer:
            answer = await client.get("/", headers=HTML, follow_redirects=True)
    assert answer.status_code == 403 and "user_inactive" in answer.text  # the callback's page
    [event] = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert (event["event"], event["error"]) == ("login.failed", "user_inactive")
    assert (event["tenant"], event["user_id"]) == (ZHANG.open_corp_id, ZHANG.open_id)
