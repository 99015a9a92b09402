"""The gateway's own endpoints against anonymous clients (issue 10, findings 7, 8, 10, 11).

- 7: ``/login`` writes nothing to the store (the pending login is sealed into the browser's
  cookie), so calling it in a loop evicts no session; several tabs can sign in at once.
- 8: a ``next`` cannot break the handshake page's embedded JSON; every gateway response carries
  a Content-Security-Policy, ``nosniff`` and a Referrer-Policy.
- 10: one ``/login`` buys at most one provider token call.
- 11: without a state our pages show our own words only; an unknown provider error is a 400.
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, urlsplit

import httpx

from tests.conftest import FEISHU_UA, HTML, GatewayStarter, ServedLark, browser_login, headers_of

ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"
CONFIG = re.compile(r'<script id="gw-config" type="application/json">(.*?)</script>', re.S)


def page_config(html: str) -> dict[str, object]:
    match = CONFIG.search(html)
    assert match, html
    return dict(json.loads(match.group(1)))


def callback_state(answer: httpx.Response) -> str:
    return parse_qs(urlsplit(answer.headers["location"]).query)["state"][0]


# -- 7: /login fills nothing shared --------------------------------------------------------------


async def test_anonymous_logins_do_not_log_anyone_out(start_gateway: GatewayStarter) -> None:
    """Before: each /login stored a state; 120 of them evicted a live session (max_entries=100)."""
    async with start_gateway(store={"max_entries": 100}) as running, running.client() as alice:
        # Every client here is 127.0.0.1: without the per-client limit (tested below) for this one.
        running.gateway.handshake._limiter = SimpleNamespace(take=lambda key: 0)
        assert (await browser_login(alice, "/x")).json()["headers"]
        store = running.gateway.runtime.store
        entries = len(store)
        async with running.client() as anonymous:
            for index in range(120):
                method = anonymous.get if index % 2 else anonymous.head
                answer = await method(f"/_gateway/login?next=/n{index}", headers=HTML)
                assert answer.status_code == 302
        assert len(store) == entries  # not one entry more
        still = await alice.get("/x", headers={"accept": "application/json"})
        assert still.status_code == 200 and headers_of(still)["x-auth-user"] == [ZHANG]


async def test_several_tabs_sign_in_at_once(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url}
        pages = [page_config((await client.get(f"/_gateway/login?next=/tab{i}", headers=HTML)).text)
                 for i in range(3)]
        cookie = client.cookies.get("gw_session_login")
        assert cookie and len(cookie) < 4000
        for config in (pages[0], pages[2], pages[1]):  # in any order
            answer = await client.post("/_gateway/exchange/lark", headers=origin,
                                       json={"code": lark.sandbox.mint_client_code(), "state": config["state"]})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"next": config["next"]}


async def test_a_sealed_login_is_single_use_and_bound_to_its_browser(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url}
        state = page_config((await client.get("/_gateway/login", headers=HTML)).text)["state"]
        cookie = client.cookies.get("gw_session_login")
        assert cookie and str(state) not in cookie  # sealed, not readable
        first = await client.post("/_gateway/exchange/lark", headers=origin,
                                  json={"code": lark.sandbox.mint_client_code(), "state": state})
        assert first.status_code == 200
        # The same cookie and state again (a copy kept from before): used.
        async with running.client(FEISHU_UA, cookies={"gw_session_login": cookie}) as replay:
            again = await replay.post("/_gateway/exchange/lark", headers=origin,
                                      json={"code": lark.sandbox.mint_client_code(), "state": state})
        assert again.status_code == 400 and again.json()["error"] == "state_invalid"
        # A cookie made up by the client holds nothing.
        async with running.client(FEISHU_UA, cookies={"gw_session_login": "AQ" + "A" * 80}) as forged:
            other = page_config((await client.get("/_gateway/login", headers=HTML)).text)["state"]
            answer = await forged.post("/_gateway/exchange/lark", headers=origin,
                                       json={"code": lark.sandbox.mint_client_code(), "state": other})
        assert answer.status_code == 400 and answer.json()["error"] == "state_mismatch"


async def test_sign_in_endpoints_are_rate_limited_per_client(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        for _ in range(60):  # the default burst
            assert (await client.get("/_gateway/login", headers=HTML)).status_code == 302
        page = await client.get("/_gateway/login", headers=HTML)
        assert page.status_code == 429 and "<html" in page.text and "rate_limited" in page.text
        assert int(page.headers["retry-after"]) >= 1
        api = await client.post("/_gateway/exchange/lark", json={"code": "x", "state": "s"},
                                headers={"origin": running.url})
        assert api.status_code == 429 and api.json()["error"] == "rate_limited" and api.json()["message"]
        callback = await client.get("/_gateway/callback/lark?code=x&state=s")
        assert callback.status_code == 429
        # Other endpoints are not limited (X-Forwarded-For: tests/test_ratelimit.py; uvicorn in
        # this harness believes it from loopback itself).
        assert (await client.get("/_gateway/healthz")).status_code == 200


# -- 8: the handshake page and the policy headers ------------------------------------------------


async def test_next_cannot_break_the_handshake_page(start_gateway: GatewayStarter) -> None:
    """Before: only "</" was escaped; "<!--<script>" put the parser in script-data-escaped state."""
    hostile = "/x<!--<script>&\u2028\u2029</script>"
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        page = await client.get(f"/_gateway/login?next={quote(hostile)}", headers=HTML)
        assert page.status_code == 200
        embedded = CONFIG.search(page.text)
        assert embedded
        raw = embedded.group(1)
        assert not set(raw) & set("<>&\u2028\u2029")
        assert json.loads(raw)["next"] == hostile
        # The scripts after it are still elements of the page.
        tail = page.text[embedded.end():]
        assert '<script src="/_gateway/static/bridge/lark.js"></script>' in tail
        assert '<script src="/_gateway/static/handshake.js"></script>' in tail


def csp(answer: httpx.Response) -> dict[str, list[str]]:
    policy = answer.headers.get("content-security-policy")
    assert policy, (answer.request.url, dict(answer.headers))
    directives = [part.strip().split() for part in policy.split(";") if part.strip()]
    return {parts[0]: parts[1:] for parts in directives}


async def test_every_gateway_response_has_policy_headers(start_gateway: GatewayStarter) -> None:
    sdk = "https://sdk.example.com/lark/h5-js-sdk.js"
    async with start_gateway(provider={"jssdk_url": sdk}) as running, running.client(FEISHU_UA) as client:
        handshake = await client.get("/_gateway/login?next=/x", headers=HTML)
        answers = [
            handshake,
            await client.get("/_gateway/login?flow=browser", headers=HTML),
            await client.get("/_gateway/me"),
            await client.get("/_gateway/nope", headers=HTML),
            await client.get("/_gateway/nope"),
            await client.get("/_gateway/healthz"),
            await client.get("/_gateway/jwks.json"),
            await client.get("/_gateway/static/handshake.js"),
            await client.get("/_gateway/callback/lark?code=x&state=bad", headers=HTML),
            await client.post("/_gateway/logout", headers={**HTML, "origin": running.url}),
            await client.post("/_gateway/exchange/lark", content=b"{", headers={"origin": running.url,
                                                                                "content-type": "application/json"}),
        ]
        for answer in answers:
            policy = csp(answer)
            assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
            assert policy["default-src"] == ["'none'"] and policy["form-action"] == ["'self'"]
            assert len(policy["style-src"]) == 1 and policy["style-src"][0].startswith("'sha256-")
            assert "'unsafe-inline'" not in answer.headers["content-security-policy"]
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["referrer-policy"] == "no-referrer"
        page = csp(handshake)
        assert page["script-src"] == ["'self'", "https://sdk.example.com"]
        assert "'self'" in page["connect-src"]
        assert "script-src" not in csp(answers[3])  # an error page runs no script at all
        assert handshake.headers.get_list("content-security-policy") == [handshake.headers["content-security-policy"]]


async def test_the_rate_limit_is_configurable(start_gateway: GatewayStarter) -> None:
    async with start_gateway(limits={"login_rate_per_min": 1, "login_burst": 2}) as running, \
            running.client() as client:
        statuses = [(await client.get("/_gateway/login", headers=HTML)).status_code for _ in range(3)]
        assert statuses == [302, 302, 429]
    async with start_gateway(limits={"login_rate_per_min": 0}) as running, running.client() as client:
        statuses = [(await client.get("/_gateway/login", headers=HTML)).status_code for _ in range(100)]
        assert set(statuses) == {302}


async def test_frame_ancestors_is_configurable(start_gateway: GatewayStarter) -> None:
    async with start_gateway(access={"frame_ancestors": ["'self'", "https://portal.example.com"]}) as running, \
            running.client() as client:
        answer = await client.get("/_gateway/healthz")
        assert csp(answer)["frame-ancestors"] == ["'self'", "https://portal.example.com"]


# -- 10: provider calls cost a /login ------------------------------------------------------------


async def test_junk_exchanges_cost_at_most_one_provider_call_per_login(
    start_gateway: GatewayStarter, lark: ServedLark
) -> None:
    """Before: each anonymous /login + junk /exchange was one Lark token call (50 -> 50)."""
    async with start_gateway() as running, running.client(FEISHU_UA) as client:
        origin = {"origin": running.url}
        before = lark.sandbox.stats["authorization_code"]
        # One state, junk codes: the first one is tried at Lark, the state is then used up.
        state = page_config((await client.get("/_gateway/login", headers=HTML)).text)["state"]
        statuses = []
        for _ in range(3):
            answer = await client.post("/_gateway/exchange/lark", json={"code": "junk", "state": state}, headers=origin)
            statuses.append((answer.status_code, answer.json()["error"]))
        assert statuses[0][0] in (400, 401) and statuses[1:] == [(400, "state_invalid")] * 2
        assert lark.sandbox.stats["authorization_code"] - before == 1
        # States nobody issued never reach Lark.
        for junk in ("Unknown1", "a" * 43, "A" * 64):
            answer = await client.post("/_gateway/exchange/lark", json={"code": "junk", "state": junk}, headers=origin)
            assert answer.status_code == 400 and answer.json()["error"] == "state_invalid"
        assert lark.sandbox.stats["authorization_code"] - before == 1
        # And a loop of /login + junk /exchange is bounded by the per-client limit (default burst 60).
        for _ in range(50):
            page = await client.get("/_gateway/login", headers=HTML)
            if page.status_code != 200:
                assert page.status_code == 429
                continue
            junk = {"code": "junk", "state": page_config(page.text)["state"]}
            await client.post("/_gateway/exchange/lark", json=junk, headers=origin)
        assert lark.sandbox.stats["authorization_code"] - before <= 31


# -- 11: our pages say our words -----------------------------------------------------------------


async def test_a_pending_callback_without_state_shows_only_our_text(start_gateway: GatewayStarter) -> None:
    hostile = "Your account is locked. Call +1 555 0100 and read out your password."
    async with start_gateway() as running, running.client() as client:
        answer = await client.get(
            f"/_gateway/callback/lark?error=approval_pending&error_description={quote(hostile)}", headers=HTML)
        assert answer.status_code == 403 and "approval_pending" in answer.text
        assert "Call +1" not in answer.text and "password" not in answer.text
        assert "administrator" in answer.text
        api = await client.get(f"/_gateway/callback/lark?error=approval_pending&error_description={quote(hostile)}")
        assert api.json()["error"] == "approval_pending" and "Call" not in api.json()["message"]


async def test_an_unknown_provider_error_is_a_client_error(start_gateway: GatewayStarter) -> None:
    async with start_gateway() as running, running.client() as client:
        state = callback_state(await client.get("/_gateway/login", headers=HTML))
        answer = await client.get(f"/_gateway/callback/lark?error=weird_thing&state={state}", headers=HTML)
        assert answer.status_code == 400 and "provider_error" in answer.text and "<html" in answer.text
        assert "Try again" in answer.text
        state = callback_state(await client.get("/_gateway/login", headers=HTML))
        hostile = await client.get(f"/_gateway/callback/lark?error={quote('<b>Call us</b> now')}&state={state}")
        assert hostile.status_code == 400 and hostile.json()["error"] == "provider_error"
        assert "Call us" not in hostile.json()["message"]
