"""Issue 12: "the new grant replaces the token record (scopes: the union), every replica sees it".

Two gateways share a Redis store and the session secrets (one public_url: replicas behind one
address). A Lark user signs in with the configured scopes only, consents to A (the calendar, which
a route declares) on one replica and to B (another scope, ``relay.consent_scopes``) on the other.
The record both replicas read holds A and B, and the call that needs A still goes through, on
either replica, without a new consent.

Which provider this applies to (docs/relay.md, "Incremental consent"): Lark reports scopes in its
token answer, and its newest token carries every scope ever granted (sheet: "Grants are
cumulative"); the gateway also keeps the union itself (``TokenManager.save(keep_scopes=True)``,
tests/test_tokens.py has a provider that reports only the added scope). DingTalk's token answer
reports no scopes (its answers decide, tests/test_consent_dingtalk.py), and Tencent Meeting has no
incremental consent (the user authorizes the app's scopes again).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import httpx

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from gateway.tokens import token_key
from plugins.lark import openapi
from plugins.lark.sandbox import EMAIL_SCOPE
from tests.conftest import HTML, ServedLark, echo_app, free_port

CALENDARS = "/_gateway/api/lark/open-apis/calendar/v4/calendars"
A, B = openapi.CALENDAR_SCOPE, EMAIL_SCOPE


@contextlib.asynccontextmanager
async def two_replicas(lark: ServedLark, redis_url: str) -> AsyncIterator[list[tuple[AuthGateway, str]]]:
    """Two gateways on one Redis, each with the address it listens on."""
    port_a, port_b = free_port(), free_port()
    shared = {
        "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
        "store": {"backend": "redis", "url": redis_url, "key_prefix": f"union-{secrets.token_hex(4)}:"},
        "providers": {"lark": lark.settings(scopes=["offline_access"])},
        "relay": {"routes": [{"provider": "lark", "path": "open-apis/calendar/v4/*", "scopes": [A]}],
                  "consent_scopes": [B]},
    }
    gateways = [AuthGateway(echo_app(), GatewayConfig(public_url=f"http://127.0.0.1:{port_a}", **shared))
                for _ in range(2)]
    try:
        async with serve_apps({"a": gateways[0]}, port=port_a), serve_apps({"b": gateways[1]}, port=port_b):
            yield [(gateways[0], f"http://127.0.0.1:{port_a}"), (gateways[1], f"http://127.0.0.1:{port_b}")]
    finally:
        for gateway in gateways:
            await gateway.aclose()


async def consent(client: httpx.AsyncClient, replica: str, scope: str) -> list[str]:
    """One browser consent for ``scope``, started at ``replica``; the scopes the provider's
    authorize page was asked for."""
    asked: list[str] = []

    async def note(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/authen/v1/authorize"):
            asked.extend(parse_qs(response.request.url.query.decode())["scope"][0].split(" "))

    client.event_hooks["response"].append(note)
    try:
        landed = await client.get(f"{replica}/_gateway/consent", params={"provider": "lark", "scopes": scope,
                                                                         "next": "/app"},
                                  headers=HTML, follow_redirects=True)
    finally:
        client.event_hooks["response"].remove(note)
    assert landed.status_code == 200 and landed.json()["path"] == "/app", landed.text
    return asked


async def test_consents_on_two_replicas_add_up_in_the_shared_record(lark: ServedLark, redis_url: str) -> None:
    # One browser: its cookies go to both replicas (a cookie names a host, not a port).
    async with two_replicas(lark, redis_url) as replicas, httpx.AsyncClient(timeout=20) as browser:
        (gateway_a, a), (gateway_b, b) = replicas
        assert (await browser.get(f"{a}/", headers=HTML, follow_redirects=True)).status_code == 200
        me = (await browser.get(f"{a}/_gateway/me")).json()
        key = token_key("lark", me["tenant"], me["user"])
        refused = await browser.get(f"{b}{CALENDARS}")
        assert refused.status_code == 403 and refused.json()["scopes"] == [A]  # the grant lacks A
        assert await consent(browser, a, A) == ["offline_access", A]
        assert (await browser.get(f"{b}{CALENDARS}")).status_code == 200  # the other replica sees it
        assert await consent(browser, b, B) == ["offline_access", B]  # only what is added: not A again
        for gateway in (gateway_a, gateway_b):
            record = await gateway.runtime.tokens.load(key)
            assert record is not None
            assert {"offline_access", A, B} <= set(record.scope.split()), record.scope
        authorized = lark.sandbox.stats["authorize"]
        for replica in (a, b):  # A still works, on both replicas, without a new consent
            answer = await browser.get(f"{replica}{CALENDARS}")
            assert answer.status_code == 200, answer.text
        assert lark.sandbox.stats["authorize"] == authorized
