"""Middleware mode end to end: AuthGateway around a Starlette app, uvicorn on loopback, the Lark
emulator on its own ports. No mocks: every hop is a real HTTP request."""

from __future__ import annotations

import asyncio
import json
import re
from urllib.parse import parse_qs, quote, unquote, urlsplit

import httpx
import jwt
import pytest

from tests.conftest import (
    BROWSER_UA,
    FEISHU_UA,
    HTML,
    GatewayStarter,
    ServedLark,
    browser_login,
    headers_of,
)

ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"
TENANT = "736588c9260f175d"


def page_config(html: str) -> dict[str, object]:
    match = re.search(r'<script id="gw-config" type="application/json">(.*?)</script>', html, re.S)
    assert match, "the handshake page embeds its config"
    return json.loads(match.group(1).replace("<\\/", "</"))  # type: ignore[no-any-return]


async def test_browser_oauth_flow_ends_on_the_app_with_a_verified_identity(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    async with start_gateway() as running, running.client() as client:
        answer = await browser_login(client, "/orders?id=7")
        assert answer.status_code == 200
        assert str(answer.url).endswith("/orders?id=7")
        received = headers_of(answer)
        assert received["x-auth-user"] == [ZHANG]
        assert received["x-auth-provider"] == ["lark"]
        assert received["x-auth-tenant"] == [TENANT]
        assert unquote(received["x-auth-name"][0]) == "张三"
        assert "gw_session" not in answer.json()["cookies"]

        jwks = (await client.get("/_gateway/jwks.json")).json()
        token = received["x-auth-identity"][0]
        key = jwt.PyJWK(jwks["keys"][0])
        assert jwt.get_unverified_header(token)["kid"] == jwks["keys"][0]["kid"]
        claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="upstream", issuer=running.url)
        assert claims["user"] == ZHANG and claims["tenant"] == TENANT and claims["name"] == "张三"
        assert claims["provider"] == "lark" and claims["jti"] and claims["exp"] > claims["iat"]

        me = await client.get("/_gateway/me")
        assert me.json() == {"provider": "lark", "user": ZHANG, "tenant": TENANT, "name": "张三"}
    stats = lark.sandbox.stats
    assert stats["authorization_code"] == 1 and stats["user_info"] == 1


async def test_login_outside_the_client_redirects_to_lark_with_pkce(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        answer = await client.get("/_gateway/login?next=/x", headers=HTML)
        assert answer.status_code == 302
        target = urlsplit(answer.headers["location"])
        query = parse_qs(target.query)
        assert target.path == "/open-apis/authen/v1/authorize"
        assert query["redirect_uri"] == [f"{running.url}/_gateway/callback/lark"]
        assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
        assert "offline_access" in query["scope"][0].split()
        assert re.fullmatch(r"[A-Za-z0-9]{1,64}", query["state"][0])
        assert "gw_session_login" in answer.cookies


async def test_in_client_exchange_logs_in_silently(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        page = await client.get("/_gateway/login?next=/inbox", headers=HTML)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        config = page_config(page.text)
        assert config["plugin"] == "lark" and config["next"] == "/inbox"
        assert config["bridge"] == {"appId": lark.sandbox.app_id, "scopeList": ["offline_access"],
                                    "state": config["state"]}
        code = lark.sandbox.mint_client_code("requestAccess")
        exchange = await client.post("/_gateway/exchange/lark", json={"code": code, "state": config["state"]},
                                     headers={"origin": running.url})
        assert exchange.status_code == 200, exchange.text
        assert exchange.json() == {"next": "/inbox"}
        answer = await client.get("/inbox")
        assert headers_of(answer)["x-auth-user"] == [ZHANG]

        # The state was single use, and the code too.
        again = await client.post("/_gateway/exchange/lark", json={"code": code, "state": config["state"]},
                                  headers={"origin": running.url})
        assert again.status_code == 400 and again.json()["error"] == "state_invalid"


async def test_exchange_rejects_bad_requests_with_stable_codes(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url}

        async def state() -> str:
            page = await client.get("/_gateway/login", headers=HTML)
            return str(page_config(page.text)["state"])

        cases = [
            ({"content": b"code=x", "headers": {**origin, "content-type": "text/plain"}}, 415,
             "unsupported_media_type"),
            ({"content": b"{not json", "headers": {**origin, "content-type": "application/json"}}, 400,
             "invalid_json"),
            ({"json": {"state": "abc"}, "headers": origin}, 400, "code_missing"),
            ({"json": {"code": "x", "state": "not valid!"}, "headers": origin}, 400, "state_invalid"),
            ({"json": {"code": "x", "state": "Unknown1"}, "headers": origin}, 400, "state_invalid"),
            ({"json": {"code": "x", "state": "s"}, "headers": {"origin": "https://evil.example"}}, 403,
             "cross_origin"),
        ]
        for kwargs, status, error in cases:
            answer = await client.post("/_gateway/exchange/lark", **kwargs)  # type: ignore[arg-type]
            assert answer.status_code == status, (kwargs, answer.text)
            assert answer.json()["error"] == error and answer.json()["message"]

        unknown = await client.post("/_gateway/exchange/nope", json={"code": "x", "state": "s"}, headers=origin)
        assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_provider"

        # A state started in another browser (no binding cookie) is refused.
        stolen = await state()
        async with running.client(FEISHU_UA) as other:
            answer = await other.post("/_gateway/exchange/lark",
                                      json={"code": lark.sandbox.mint_client_code(), "state": stolen},
                                      headers=origin)
        assert answer.status_code == 400 and answer.json()["error"] == "state_mismatch"

        # A code Lark says was already used is a clear, stable error, not a 500.
        code = lark.sandbox.mint_client_code()
        first = await client.post("/_gateway/exchange/lark", json={"code": code, "state": await state()},
                                  headers=origin)
        assert first.status_code == 200
        reused = await client.post("/_gateway/exchange/lark", json={"code": code, "state": await state()},
                                   headers=origin)
        assert reused.status_code == 401 and reused.json()["error"] == "code_used"


async def test_spoofed_identity_headers_never_reach_the_app(
    start_gateway: GatewayStarter,
) -> None:
    spoofed = [
        ("X-Auth-User", "admin"), ("x-auth-user", "root"), ("X_AUTH_USER", "u"), ("x_auth_tenant", "t"),
        ("X-AUTH-PROVIDER", "p"), ("X-Auth-Name", "n"), ("X-Auth-Identity", "forged.jwt.token"),
        ("X-Auth-Access-Token", "stolen"), ("X-Other", "kept"),
    ]
    async with start_gateway(access={"public_paths": ["/public/*"]}) as running, running.client() as client:
        public = await client.get("/public/page", headers=httpx.Headers(spoofed))
        received = headers_of(public)
        assert not [name for name in received if name.startswith("x-auth") or name.startswith("x_auth")]
        assert received["x-other"] == ["kept"]

        await browser_login(client)
        private = await client.get("/private", headers=httpx.Headers(spoofed))
        received = headers_of(private)
        assert received["x-auth-user"] == [ZHANG]
        assert received["x-auth-provider"] == ["lark"]
        assert "x-auth-access-token" not in received and "x_auth_user" not in received
        assert received["x-auth-identity"] != ["forged.jwt.token"]


async def test_without_a_session_browsers_are_redirected_and_apis_get_401(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        browser = await client.get("/a/b?c=1&d=%2F", headers=HTML)
        assert browser.status_code == 302
        assert browser.headers["location"] == "/_gateway/login?next=" + quote("/a/b?c=1&d=%2F", safe="")
        api = await client.get("/a/b", headers={"accept": "application/json"})
        assert api.status_code == 401
        assert api.json()["error"] == "login_required" and api.json()["login_url"].startswith("/_gateway/login")
        post = await client.post("/a/b", headers=HTML)
        assert post.status_code == 401
        client.cookies.set("gw_session", "eyJhbGciOiJub25lIn0.e30.")
        forged = await client.get("/a", headers=HTML)
        assert forged.status_code == 302


async def test_other_cookies_reach_the_app_but_not_the_gateways(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        await browser_login(client)
        client.cookies.set("theme", "dark")
        answer = await client.get("/x")
        assert answer.json()["cookies"] == {"theme": "dark"}


async def test_public_paths_are_matched_after_normalization(start_gateway: GatewayStarter) -> None:
    async with start_gateway(access={"public_paths": ["/static/*", "/health"]}) as running, \
            running.client() as client:
        assert (await client.get("/static/app.js")).status_code == 200
        assert (await client.get("/health")).status_code == 200
        escape = await client.get("/static/../private", headers={"accept": "application/json"})
        assert escape.status_code == 401
        encoded = await client.get("/static/%2e%2e/private", headers={"accept": "application/json"})
        assert encoded.status_code == 401


async def test_logout_is_post_same_origin_and_kills_the_old_cookie(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        await browser_login(client)
        cookie = client.cookies.get("gw_session")
        assert cookie

        get = await client.get("/_gateway/logout")
        assert get.status_code == 405
        cross = await client.post("/_gateway/logout", headers={"origin": "https://evil.example"})
        assert cross.status_code == 403 and cross.json()["error"] == "cross_origin"
        no_origin = await client.post("/_gateway/logout")
        assert no_origin.status_code == 403
        assert (await client.get("/still-in")).status_code == 200

        out = await client.post("/_gateway/logout", headers={"origin": running.url})
        assert out.status_code == 200 and out.json() == {"ok": True}
        async with running.client() as replay:
            replay.cookies.set("gw_session", cookie)
            dead = await replay.get("/x", headers={"accept": "application/json"})
            assert dead.status_code == 401


async def test_tenant_outside_allow_list_gets_a_403_page_and_no_upstream_request(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    seen: list[str] = []

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream"})

    async with start_gateway(app=app, access={"allow_tenants": ["someone-else"]}) as running, \
            running.client() as client:
        answer = await browser_login(client, "/secret")
        assert answer.status_code == 403
        assert "not allowed" in answer.text and "<html" in answer.text
        assert "Traceback" not in answer.text
    assert seen == []


async def test_denied_consent_gets_a_clear_page(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway() as running, running.client() as client:
        login = await client.get("/_gateway/login?next=/x", headers=HTML)
        state = parse_qs(urlsplit(login.headers["location"]).query)["state"][0]
        callback = await client.get(f"/_gateway/callback/lark?error=access_denied&state={state}", headers=HTML)
        assert callback.status_code == 403
        assert "declined" in callback.text and "/_gateway/login?" in callback.text
        api = await client.get(f"/_gateway/callback/lark?error=access_denied&state={state}")
        assert api.status_code == 400 and api.json()["error"] == "state_invalid"  # single use


async def test_unknown_provider_and_unsafe_next(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        unknown = await client.get("/_gateway/login?provider=nope", headers=HTML)
        assert unknown.status_code == 404 and "<html" in unknown.text
        answer = await browser_login(client, "/_gateway/login?next=//evil.example/x")
        assert urlsplit(str(answer.url)).netloc == urlsplit(running.url).netloc
        assert answer.json()["path"] == "/"


async def test_session_max_age_is_enforced_server_side(start_gateway: GatewayStarter) -> None:
    async with start_gateway(session={"max_age_s": 1, "cache_ttl_s": 0}) as running, running.client() as client:
        await browser_login(client)
        assert (await client.get("/x")).status_code == 200
        await asyncio.sleep(1.2)
        assert (await client.get("/x", headers={"accept": "application/json"})).status_code == 401


async def test_health_and_readiness(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        assert (await client.get("/_gateway/healthz")).json() == {"status": "ok"}
        assert (await client.get("/_gateway/readyz")).json() == {"status": "ready"}
        missing = await client.get("/_gateway/nothing-here")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"


@pytest.mark.parametrize("requests", [200])
async def test_concurrent_requests_near_expiry_refresh_exactly_once(
    start_gateway: GatewayStarter, lark: ServedLark, requests: int
) -> None:
    lark.sandbox.access_ttl_s = 4  # refresh is due 2 s before expiry (half the lifetime)
    lark.sandbox.delay_s = 0.2  # a provider that takes its time: every waiter piles up
    async with start_gateway(identity={"pass_access_token": True}) as running, running.client() as client:
        await browser_login(client)
        first_token = headers_of(await client.get("/x"))["x-auth-access-token"][0]
        await asyncio.sleep(2.2)
        # The refreshed token lives long: 200 requests on a loaded machine may take more than its
        # 2 s to refresh-due, and a second, legitimate refresh is not what this test is about.
        lark.sandbox.access_ttl_s = 3600
        answers = await asyncio.gather(*(client.get(f"/r/{n}") for n in range(requests)))
    assert [a.status_code for a in answers] == [200] * requests
    tokens = {headers_of(a)["x-auth-access-token"][0] for a in answers}
    assert len(tokens) == 1 and first_token not in tokens
    assert lark.sandbox.stats["refresh_token"] == 1


async def test_a_dead_refresh_token_sends_the_user_through_the_handshake_again(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    lark.sandbox.access_ttl_s = 4
    async with start_gateway() as running, running.client() as client:
        await browser_login(client)
        await asyncio.sleep(2.2)
        lark.sandbox.revoke(ZHANG)
        answer = await client.get("/x", headers=HTML)
        assert answer.status_code == 302 and answer.headers["location"].startswith("/_gateway/login")


async def test_a_transient_refresh_failure_never_logs_anyone_out(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    lark.sandbox.access_ttl_s = 4
    async with start_gateway() as running, running.client() as client:
        await browser_login(client)
        await asyncio.sleep(2.2)
        lark.sandbox.inject_fault("token:refresh_token", 20050, times=1)
        served = await client.get("/x")  # the old token is still valid for ~2 s
        assert served.status_code == 200
        await asyncio.sleep(2.0)
        later = await client.get("/x", headers={"accept": "application/json"})
        # Either the back-off still holds and the token expired (503 + Retry-After), or the retry
        # already succeeded: never a logout.
        assert later.status_code in (200, 503)
        if later.status_code == 503:
            assert later.headers["retry-after"] and later.json()["error"] in ("provider_unavailable",
                                                                             "provider_error")
        await asyncio.sleep(5)
        final = await client.get("/x")
        assert final.status_code == 200
    assert lark.sandbox.stats["refresh_token"] >= 2


async def test_head_and_browser_ua_detection_picks_the_only_provider(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client(BROWSER_UA) as client:
        answer = await client.get("/_gateway/login", headers=HTML)
        assert answer.status_code == 302


async def test_a_second_devices_login_replaces_the_tokens_every_session_uses(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    async with start_gateway(identity={"pass_access_token": True}) as running, \
            running.client() as phone, running.client() as laptop:
        await browser_login(phone)
        first = headers_of(await phone.get("/x"))["x-auth-access-token"]
        await browser_login(laptop)
        second = headers_of(await laptop.get("/x"))["x-auth-access-token"]
        assert first != second
        # The phone's cached session learns of the new record at once, not after cache_ttl_s.
        assert headers_of(await phone.get("/x"))["x-auth-access-token"] == second
    assert lark.sandbox.stats["authorization_code"] == 2
