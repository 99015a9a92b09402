"""Issue 13's consent audit trail, and the consent's own links (gateway/consent.py).

``consent.granted`` / ``consent.denied`` / ``consent.failed`` with provider, flow, tenant, user_id,
client_ip and the scopes (names only), for a consent that ends at the callback (the browser), at
``/exchange`` (the client), or in the client's page, which reports it (``POST <prefix>/consent``).
Every line these runs write is scanned for the codes, tokens, cookies and states issued, as
tests/test_log_secrets.py does for sign-ins. And the pages a consent shows (the handshake page's
"try again" and "sign in in the browser", the error page's "try again") ask for the same scopes.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from plugins.lark import openapi
from tests.conftest import FEISHU_UA, HTML, GatewayStarter, RunningGateway, ServedLark, browser_login
from tests.test_log_secrets import issued_values, json_logs_at_debug

CALENDARS = "/_gateway/api/lark/open-apis/calendar/v4/calendars"
ROUTES = [{"provider": "lark", "path": "open-apis/calendar/v4/*", "scopes": [openapi.CALENDAR_SCOPE]}]
CONSENT = {"provider": "lark", "scopes": openapi.CALENDAR_SCOPE, "next": "/app/calendar"}


def audit_events(lines: list[str]) -> list[dict[str, Any]]:
    return [record for record in map(json.loads, lines) if record["logger"] == "gateway.audit"]


def consent_events(lines: list[str]) -> list[dict[str, Any]]:
    return [record for record in audit_events(lines) if record["event"].startswith("consent.")]


def no_leaks(lines: list[str], secrets_: set[str]) -> None:
    leaks = sorted({(value[:12], line[:160]) for value in secrets_ for line in lines if value in line})
    assert not leaks, leaks


def page_config(answer: httpx.Response) -> dict[str, Any]:
    """The handshake page's settings (its gw-config JSON)."""
    match = re.search(r'<script id="gw-config" type="application/json">(.*?)</script>', answer.text, re.S)
    assert match, answer.text[:300]
    return dict(json.loads(match.group(1)))


def cookies_of(client: httpx.AsyncClient) -> set[str]:
    return {cookie.value for cookie in client.cookies.jar if len(cookie.value or "") >= 8}


async def signed_in_user(client: httpx.AsyncClient) -> dict[str, str]:
    assert (await browser_login(client)).status_code == 200
    return dict((await client.get("/_gateway/me")).json())


async def test_a_browser_consent_granted_and_denied_are_audited(start_gateway: GatewayStarter,
                                                                lark: ServedLark) -> None:
    with json_logs_at_debug() as buffer:
        async with start_gateway(relay={"routes": ROUTES}) as running, running.client() as client:
            me = await signed_in_user(client)
            granted = await client.get("/_gateway/consent", params=CONSENT, headers=HTML, follow_redirects=True)
            assert granted.status_code == 200 and granted.json()["path"] == "/app/calendar"
            assert (await client.get(CALENDARS)).status_code == 200
            lark.sandbox.refuse_consent = True  # the user presses Deny this time
            denied = await client.get("/_gateway/consent", params=CONSENT, headers=HTML, follow_redirects=True)
            secrets_ = cookies_of(client) | issued_values(lark.sandbox) | states_of(granted, denied)
    assert denied.status_code == 403
    lines = buffer.getvalue().splitlines()
    who = {"provider": "lark", "flow": "browser", "tenant": me["tenant"], "user_id": me["user"],
           "client_ip": "127.0.0.1", "scopes": openapi.CALENDAR_SCOPE}
    events = consent_events(lines)
    assert [event["event"] for event in events] == ["consent.granted", "consent.denied"]
    assert all(event[key] == value for event in events for key, value in who.items()), events
    assert events[1]["error"] == "access_denied" and "error" not in events[0]
    assert all(re.fullmatch(r"[0-9a-f]{16}", event["request_id"]) for event in events)
    # A consent is a sign-in too: its login.* events are there beside them.
    assert [e["event"] for e in audit_events(lines)].count("login.succeeded") == 2
    no_leaks(lines, secrets_)
    # The denied page's "try again" asks for the same scopes again, not for a plain login.
    (retry,) = re.findall(r'href="([^"]*)"[^>]*>Try again', denied.text)
    assert parse_qs(urlsplit(html.unescape(retry)).query) == {k: [v] for k, v in CONSENT.items()}
    assert urlsplit(html.unescape(retry)).path == "/_gateway/consent"


def states_of(*answers: httpx.Response) -> set[str]:
    found: set[str] = set()
    for answer in answers:
        for item in [*answer.history, answer]:
            found.update(re.findall(r"state=([A-Za-z0-9]{8,})", item.headers.get("location", "") + str(item.url)))
    return found


async def in_client_consent(running: RunningGateway, client: httpx.AsyncClient, **query: str) -> dict[str, Any]:
    page = await client.get("/_gateway/consent", params={**CONSENT, **query}, headers=HTML)
    assert page.status_code == 200, page.text[:300]
    return page_config(page)


async def report(running: RunningGateway, client: httpx.AsyncClient, config: dict[str, Any],
                 outcome: str) -> httpx.Response:
    return await client.post(config.get("consentReportUrl") or "/_gateway/consent", headers={"origin": running.url},
                             json={"provider": "lark", "state": config["state"], "outcome": outcome})


async def test_the_pages_report_of_an_in_client_refusal_is_audited_once(start_gateway: GatewayStarter,
                                                                       lark: ServedLark) -> None:
    with json_logs_at_debug() as buffer:
        async with start_gateway(relay={"routes": ROUTES}) as running, running.client() as browser, \
                running.client(FEISHU_UA) as client:
            me = await signed_in_user(browser)
            client.cookies.update(dict(browser.cookies.items()))  # the same person, now in the client
            denied = await in_client_consent(running, client)
            assert denied["consentReportUrl"] == "/_gateway/consent" and denied["provider"] == "lark"
            answer = await report(running, client, denied, "denied")
            assert answer.status_code == 200 and answer.json() == {"ok": True}
            again = await report(running, client, denied, "denied")  # the state is spent: once only
            assert again.status_code == 400 and again.json()["error"] == "state_invalid"
            pending = await in_client_consent(running, client)
            assert (await report(running, client, pending, "pending")).status_code == 200
            failed = await in_client_consent(running, client)
            assert (await report(running, client, failed, "failed")).status_code == 200
            secrets_ = cookies_of(client) | {denied["state"], pending["state"], failed["state"]}
    lines = buffer.getvalue().splitlines()
    events = consent_events(lines)
    assert [(e["event"], e.get("error"), e.get("outcome")) for e in events] == [
        ("consent.denied", "access_denied", None), ("consent.failed", "approval_pending", "pending_admin"),
        ("consent.failed", "provider_error", None)]
    for event in events:
        assert (event["provider"], event["flow"], event["scopes"]) == ("lark", "in-client", openapi.CALENDAR_SCOPE)
        assert (event["tenant"], event["user_id"], event["client_ip"]) == (me["tenant"], me["user"], "127.0.0.1")
    no_leaks(lines, secrets_)


async def test_a_report_that_is_not_a_consents_is_refused(start_gateway: GatewayStarter, lark: ServedLark) -> None:
    async with start_gateway(relay={"routes": ROUTES}) as running, running.client(FEISHU_UA) as client:
        plain = page_config(await client.get("/_gateway/login", params={"next": "/"}, headers=HTML))
        assert "consentReportUrl" not in plain
        answer = await report(running, client, plain, "denied")
        assert answer.status_code == 400 and answer.json()["error"] == "bad_request"
        config = await in_client_consent(running, client)
        for body, status, code in [
            ({"provider": "lark", "state": config["state"], "outcome": "granted"}, 400, "bad_request"),
            ({"provider": "nope", "state": config["state"], "outcome": "denied"}, 404, "unknown_provider"),
            ({"provider": "lark", "state": "forged", "outcome": "denied"}, 400, "state_invalid"),
            ([1, 2], 400, "invalid_json"),
        ]:
            answer = await client.post("/_gateway/consent", json=body, headers={"origin": running.url})
            assert (answer.status_code, answer.json()["error"]) == (status, code), answer.text
        cross = await client.post("/_gateway/consent", headers={"origin": "https://evil.example"},
                                  json={"provider": "lark", "state": config["state"], "outcome": "denied"})
        assert cross.status_code == 403 and cross.json()["error"] == "cross_origin"
        as_form = await client.post("/_gateway/consent", headers={"origin": running.url},
                                    content=b"outcome=denied")
        assert as_form.status_code == 415
        # None of those spent the consent's state: the page's own report still counts.
        assert (await report(running, client, config, "denied")).status_code == 200


async def test_the_consent_pages_ways_on_ask_for_the_same_scopes(start_gateway: GatewayStarter,
                                                                lark: ServedLark) -> None:
    async with start_gateway(relay={"routes": ROUTES}) as running, running.client(FEISHU_UA) as client:
        config = await in_client_consent(running, client)
        for key, extra in (("retryUrl", {"retry": ["1"]}), ("browserUrl", {"flow": ["browser"]})):
            url = urlsplit(config[key])
            assert url.path == "/_gateway/consent"
            assert parse_qs(url.query) == {**{k: [v] for k, v in CONSENT.items()}, **extra}
        # Following "sign in in the browser" asks the provider's page for the added scope.
        answer = await client.get(config["browserUrl"], headers=HTML)
        assert answer.status_code == 302
        scope = parse_qs(urlsplit(answer.headers["location"]).query)["scope"][0].split(" ")
        assert scope == ["offline_access", openapi.CALENDAR_SCOPE]
        # An administrator's grant keeps grant=app in them.
        app = await in_client_consent(running, client, grant="app")
        assert parse_qs(urlsplit(app["retryUrl"]).query)["grant"] == ["app"]
        assert app["bridge"]["scopeList"] == ["offline_access"]  # Lark: no user grants an app's scopes
        # A plain login's ways on stay plain logins.
        plain = page_config(await client.get("/_gateway/login", params={"next": "/x"}, headers=HTML))
        assert urlsplit(plain["retryUrl"]).path == "/_gateway/login"
