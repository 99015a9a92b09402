"""The relay against the Lark emulator on real sockets: user and tenant tokens, refresh-and-retry
once (single flight), consent_required, rate limits passed on, transient failures, and the bad
inputs that must never reach the provider (docs/relay.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest

from gateway.identity import Identity
from plugins.lark import openapi
from tests._relay import wire_request
from tests.conftest import GatewayStarter, RunningGateway, ServedLark, browser_login

API = "/_gateway/api/lark"
CALENDARS = f"{API}/open-apis/calendar/v4/calendars"
TENANT = f"{API}/open-apis/tenant/v2/tenant/query"
USER_ROUTES = [
    {"provider": "lark", "path": "open-apis/calendar/v4/*", "methods": ["GET", "POST"]},
    {"provider": "lark", "path": "open-apis/tenant/v2/tenant/user-token-by-mistake", "methods": ["GET"]},
]
APP_ROUTE = {"provider": "lark", "path": "open-apis/tenant/v2/*", "token": "app"}
GRANTED = {"scopes": ["offline_access", openapi.CALENDAR_SCOPE]}


@contextlib.asynccontextmanager
async def signed_in(start_gateway: GatewayStarter, *, routes: list[dict[str, Any]] | None = None,
                    provider: dict[str, Any] | None = None, **sections: Any
                    ) -> AsyncIterator[tuple[RunningGateway, httpx.AsyncClient, list[httpx.Request]]]:
    """A gateway with relay routes, a browser signed in to it, and every request the gateway sent
    to a provider (what really went out, from the HTTP client's own hook)."""
    relay = {"routes": routes if routes is not None else [*USER_ROUTES, APP_ROUTE], **sections.pop("relay", {})}
    sent: list[httpx.Request] = []
    async with start_gateway(relay=relay, provider=provider, **sections) as running:
        async def record(request: httpx.Request) -> None:
            sent.append(request)

        running.gateway.runtime.http.event_hooks["request"].append(record)  # the plugins' own provider calls
        running.gateway.runtime.relay_http.observers.append(lambda *wire: sent.append(wire_request(*wire)))
        async with running.client() as client:
            landed = await browser_login(client)
            assert landed.status_code == 200, landed.text
            sent.clear()
            yield running, client, sent


def relayed(sent: list[httpx.Request], path: str) -> list[httpx.Request]:
    return [request for request in sent if request.url.path == path]


async def test_a_user_call_carries_the_users_token_and_comes_back_as_the_provider_answered(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, sent):
        answer = await client.get(CALENDARS, params={"page_size": "50"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["calendar_list"][0]["type"] == "primary"
        assert answer.headers["x-tt-logid"].startswith("sandbox")  # the provider's request id is kept
        (call,) = relayed(sent, "/open-apis/calendar/v4/calendars")
        assert call.url.params["page_size"] == "50"
        assert call.headers["authorization"].startswith("Bearer eyJ")
        assert "cookie" not in call.headers


async def test_the_callers_credentials_never_reach_the_provider(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, sent):
        answer = await client.get(CALENDARS, params={"access_token": "the-callers", "x": "1"},
                                  headers={"authorization": "Basic Y2FsbGVyOnNlY3JldA==", "x-app-trace": "t1"})
        assert answer.status_code == 200, answer.text
        (call,) = relayed(sent, "/open-apis/calendar/v4/calendars")
        assert "access_token" not in call.url.params and call.url.params["x"] == "1"
        assert call.headers["authorization"] != "Basic Y2FsbGVyOnNlY3JldA=="
        assert call.headers.get("x-app-trace") == "t1"  # ordinary headers pass
        assert "gw_session" not in str(call.headers)


async def test_an_expired_token_is_refreshed_once_and_the_call_retried_once(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, _sent):
        assert (await client.get(CALENDARS)).status_code == 200
        lark.sandbox.expire_access_tokens()  # the emulator now answers 99991677 "token expire"
        before = lark.sandbox.stats
        calls = await asyncio.gather(*(client.get(CALENDARS) for _ in range(12)))
        assert [call.status_code for call in calls] == [200] * 12
        after = lark.sandbox.stats
        assert after["refresh_token"] - before["refresh_token"] == 1
        # Each call was refused at most once: at most 12 refused + 12 retried.
        assert 12 < after["calendars"] - before["calendars"] <= 24


async def test_a_token_that_stays_refused_after_the_refresh_is_not_retried_again(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, _sent):
        lark.sandbox.inject_fault("calendars", 99991677, times=2)
        before = lark.sandbox.stats
        answer = await client.get(CALENDARS)
        assert answer.json()["code"] == 99991677  # the provider's own answer, passed on
        after = lark.sandbox.stats
        assert after["calendars"] - before["calendars"] == 2
        assert after["refresh_token"] - before["refresh_token"] == 1


async def test_a_missing_scope_is_consent_required_with_the_scopes_and_a_consent_url(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider={"scopes": ["offline_access"]}) as (_, client, _sent):
        answer = await client.get(CALENDARS, headers={"referer": "http://127.0.0.1/app/cal?x=1"})
        assert answer.status_code == 403
        body = answer.json()
        assert body["error"] == "consent_required" and body["provider"] == "lark"
        assert body["scopes"] == [openapi.CALENDAR_SCOPE]
        assert body["consent_url"] == ("/_gateway/consent?provider=lark&scopes=calendar%3Acalendar%3Areadonly"
                                       "&next=%2Fapp%2Fcal%3Fx%3D1")


async def test_a_route_that_declares_scopes_asks_for_consent_before_calling(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    routes = [{"provider": "lark", "path": "open-apis/calendar/v4/*", "scopes": [openapi.CALENDAR_SCOPE]}]
    async with signed_in(start_gateway, routes=routes, provider={"scopes": ["offline_access"]}) as (_, client, sent):
        answer = await client.get(CALENDARS)
        assert answer.status_code == 403 and answer.json()["scopes"] == [openapi.CALENDAR_SCOPE]
        assert relayed(sent, "/open-apis/calendar/v4/calendars") == []


async def test_an_app_route_uses_the_tenant_token_fetched_once(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway) as (_, client, sent):
        answers = await asyncio.gather(*(client.get(TENANT) for _ in range(5)))
        assert [answer.status_code for answer in answers] == [200] * 5, answers[0].text
        assert answers[0].json()["data"]["tenant"]["tenant_key"]
        assert lark.sandbox.stats["tenant_access_token"] == 1
        calls = relayed(sent, "/open-apis/tenant/v2/tenant/query")
        assert all(call.headers["authorization"].startswith("Bearer t-") for call in calls)


async def test_a_rejected_tenant_token_is_fetched_again_once(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway) as (_, client, _sent):
        assert (await client.get(TENANT)).status_code == 200
        lark.sandbox.inject_fault("tenant_query", 99991663)
        lark.sandbox._app_tokens["tenant"].clear()  # the provider forgot it: the next one is new
        answer = await client.get(TENANT)
        assert answer.status_code == 200, answer.text
        assert lark.sandbox.stats["tenant_access_token"] == 2


async def test_a_user_token_on_a_tenant_only_api_is_a_misconfigured_route(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    routes = [{"provider": "lark", "path": "open-apis/tenant/v2/*"}]
    async with signed_in(start_gateway, routes=routes) as (_, client, _sent):
        before = lark.sandbox.stats["refresh_token"]
        answer = await client.get(TENANT)
        assert answer.status_code == 502 and answer.json()["error"] == "relay_misconfigured"
        assert lark.sandbox.stats["refresh_token"] == before  # no refresh for that


async def test_a_rate_limit_passes_through_with_its_hints_and_is_not_retried(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, sent):
        openapi.switches(lark.sandbox).rate_limited = True
        answer = await client.get(CALENDARS)
        assert answer.status_code == 429
        assert answer.json()["code"] == 99991400
        assert answer.headers["x-ogw-ratelimit-reset"] == "7" and answer.headers["retry-after"] == "7"
        assert len(relayed(sent, "/open-apis/calendar/v4/calendars")) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_a_transient_failure_is_503_with_retry_after_and_the_session_lives(
        start_gateway: GatewayStarter, lark: ServedLark, status: int) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (_, client, _sent):
        lark.sandbox.inject_fault("calendars", status=status)
        answer = await client.get(CALENDARS)
        assert answer.status_code == 503 and answer.json()["error"] == "provider_unavailable"
        assert int(answer.headers["retry-after"]) >= 1
        assert (await client.get("/_gateway/me")).status_code == 200
        assert (await client.get(CALENDARS)).status_code == 200


async def test_an_unreachable_provider_is_503(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED, relay={"timeout_s": 0.5}) as (_, client, _sent):
        lark.sandbox.inject_fault("calendars", delay_s=30)
        answer = await client.get(CALENDARS)
        assert answer.status_code == 503 and answer.json()["error"] == "provider_unavailable"


# -- callers --------------------------------------------------------------------------------


def identity_jwt(running: RunningGateway, **overrides: Any) -> str:
    record = next(iter(running.gateway.runtime.authenticator._entries.values())).identity
    token, _ = running.gateway.runtime.signer.sign(Identity(**{**record.__dict__, **overrides}))
    return str(token)


async def test_the_upstream_server_calls_with_the_identity_jwt(start_gateway: GatewayStarter,
                                                                lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (running, client, _sent):
        assert (await client.get("/_gateway/me")).status_code == 200
        token = identity_jwt(running)
        async with httpx.AsyncClient(base_url=running.url) as server:
            answer = await server.post(CALENDARS, headers={"authorization": f"Bearer {token}"})
            # A server call needs no Origin; POST is listed on this route (the emulator has only GET).
            assert answer.status_code in (404, 405)
            answer = await server.get(CALENDARS, headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text


async def test_a_bad_identity_jwt_is_login_required(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (running, client, sent):
        assert (await client.get("/_gateway/me")).status_code == 200
        good = identity_jwt(running)
        header, payload, signature = good.split(".")
        forged = f"{header}.{payload}.{signature[:-4]}AAAA"
        claims = jwt.decode(good, options={"verify_signature": False})
        other_key = jwt.encode({**claims, "aud": "someone-else"}, "x" * 32, algorithm="HS256")
        signer = running.gateway.runtime.signer
        wrong_audience = jwt.encode({**claims, "aud": "someone-else"}, signer._key, algorithm="EdDSA")
        expired = jwt.encode({**claims, "iat": int(time.time()) - 600, "exp": int(time.time()) - 300},
                             signer._key, algorithm="EdDSA")
        other_provider = identity_jwt(running, provider="dingtalk")
        async with httpx.AsyncClient(base_url=running.url) as server:
            for token, status in ((forged, 401), (other_key, 401), (wrong_audience, 401), (expired, 401),
                                  (other_provider, 403)):
                answer = await server.get(CALENDARS, headers={"authorization": f"Bearer {token}"})
                assert answer.status_code == status, (token, answer.text)
                assert answer.json()["error"] == ("login_required" if status == 401 else "relay_forbidden")
        assert relayed(sent, "/open-apis/calendar/v4/calendars") == []


async def test_without_a_session_it_is_login_required(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway(relay={"routes": USER_ROUTES}) as running, running.client() as client:
        answer = await client.get(CALENDARS, headers={"accept": "text/html"})
        assert answer.status_code == 401 and answer.json()["error"] == "login_required"
        assert answer.json()["login_url"].startswith("/_gateway/login?next=")


async def test_a_cross_origin_post_with_a_valid_cookie_is_refused(start_gateway: GatewayStarter,
                                                                  lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (running, client, sent):
        for headers in ({"origin": "https://evil.example"}, {"sec-fetch-site": "cross-site"}, {}):
            answer = await client.post(CALENDARS, json={}, headers=headers)
            assert answer.status_code == 403 and answer.json()["error"] == "cross_origin", headers
        answer = await client.post(CALENDARS, json={}, headers={"origin": running.url})
        assert answer.status_code != 403  # our own page: relayed (the emulator has no POST here)
        assert len(relayed(sent, "/open-apis/calendar/v4/calendars")) == 1


@pytest.mark.parametrize("path,status,code", [
    ("open-apis/contact/v3/users", 403, "relay_forbidden"),  # not listed
    ("open-apis/calendar/v4/../../contact/v3/users", 400, "bad_path"),
    ("open-apis/calendar/v4/%2e%2e/%2e%2e/contact/v3/users", 400, "bad_path"),
    ("open-apis/calendar/v4/a%2f..%2f..%2fx", 400, "bad_path"),
    ("open-apis/calendar/v4//calendars", 400, "bad_path"),
    ("open-apis/calendar/v4/x/../calendars", 400, "bad_path"),  # resolves to the listed path just called
    ("open-apis/calendar/v4/./calendars", 400, "bad_path"),
    ("open-apis/calendar/v4/calendars;x=1", 400, "bad_path"),
    ("open-apis/calendar/v4/a%5cb", 400, "bad_path"),
    ("open-apis/calendar/v4/a%252fb", 400, "bad_path"),
    ("@evil.example/open-apis/calendar/v4/x", 400, "bad_path"),
    ("https:/evil.example/open-apis/calendar/v4/x", 400, "bad_path"),
])
async def test_paths_that_are_not_plainly_a_listed_route_are_refused_before_anything_is_sent(
        start_gateway: GatewayStarter, lark: ServedLark, path: str, status: int, code: str) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (running, _client, sent):
        # The listed path first: what the relay keeps of an accepted path never admits another.
        assert (await _client.get(CALENDARS)).status_code == 200
        sent.clear()
        # A raw socket: httpx would resolve the dot segments itself.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(running.url.rsplit(":", 1)[1]))
        cookie = "; ".join(f"{c.name}={c.value}" for c in _client.cookies.jar)
        writer.write(f"GET {API}/{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n"
                     "Connection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ")[1] == str(status).encode(), raw
        assert code.encode() in body
        assert not [request for request in sent if "open-apis" in request.url.path]


async def test_an_unknown_provider_and_an_unlisted_method(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED) as (running, client, _sent):
        answer = await client.get("/_gateway/api/nope/open-apis/calendar/v4/calendars")
        assert answer.status_code == 404 and answer.json()["error"] == "unknown_provider"
        assert (await client.get(CALENDARS)).status_code == 200  # the same path, a listed method
        answer = await client.delete(CALENDARS, headers={"origin": running.url})
        assert answer.status_code == 403 and answer.json()["error"] == "relay_forbidden"


async def test_an_oversized_body_is_413_before_anything_is_sent(start_gateway: GatewayStarter,
                                                                lark: ServedLark) -> None:
    async with signed_in(start_gateway, provider=GRANTED, relay={"max_body_bytes": 4096}) as (running, client, sent):
        answer = await client.post(CALENDARS, content=b"x" * 5000, headers={"origin": running.url})
        assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b"y" * 1000

        answer = await client.post(CALENDARS, content=chunks(), headers={"origin": running.url})
        assert answer.status_code == 413 and answer.json()["error"] == "body_too_large"
        assert relayed(sent, "/open-apis/calendar/v4/calendars") == []


async def test_two_replicas_on_redis_refresh_a_refused_token_once(lark: ServedLark, redis_url: str) -> None:
    """Single flight across replicas: two gateways sharing a Redis store and the session secrets;
    calls refused as expired on both at once make one refresh call, and every call succeeds."""
    import secrets as _secrets

    from gateway.config import GatewayConfig
    from gateway.middleware import AuthGateway
    from gateway.sandbox import serve_apps
    from tests.conftest import echo_app, free_port

    port_a, port_b = free_port(), free_port()
    shared = {
        "session": {"secrets": [_secrets.token_urlsafe(32)], "secure": False},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": f"relay-{_secrets.token_hex(4)}:"},
        "providers": {"lark": lark.settings(**GRANTED)},
        "relay": {"routes": USER_ROUTES},
    }
    # One public_url: the replicas stand behind one address (the cookie is the same on both).
    gateways = [AuthGateway(echo_app(), GatewayConfig(public_url=f"http://127.0.0.1:{port_a}", **shared))
                for _ in range(2)]
    try:
        async with (serve_apps({"a": gateways[0]}, port=port_a), serve_apps({"b": gateways[1]}, port=port_b),
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_a}", timeout=20) as a):
            assert (await browser_login(a)).status_code == 200
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port_b}", cookies=dict(a.cookies.items()),
                                         timeout=20) as b:
                assert (await b.get(CALENDARS)).status_code == 200
                lark.sandbox.expire_access_tokens()
                before = lark.sandbox.stats["refresh_token"]
                calls = await asyncio.gather(*(client.get(CALENDARS) for client in (a, b) * 20))
                assert [call.status_code for call in calls] == [200] * 40
                assert lark.sandbox.stats["refresh_token"] - before == 1
    finally:
        for gateway in gateways:
            await gateway.aclose()


async def test_long_paths_are_relayed_but_not_kept(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    """The relay keeps what it resolved of short accepted paths only: a caller (signed in or not)
    sending many long distinct paths under a listed route cannot make it hold them."""
    async with signed_in(start_gateway, provider=GRANTED) as (running, client, _sent):
        relay = running.gateway.handshake.relay
        assert (await client.get(CALENDARS)).status_code == 200
        long_path = f"{CALENDARS}/{'x' * 600}"
        answer = await client.get(long_path)
        assert answer.status_code == 404 and answer.text == "Not Found"  # relayed: the emulator's own 404
        kept = {raw for raw, _ in relay._plans}
        assert CALENDARS.encode() in kept and not any(len(raw) > 512 for raw in kept)
