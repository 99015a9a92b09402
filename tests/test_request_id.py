"""Issue 13: a request id on every request, end to end.

Taken from ``X-Request-Id`` only when the peer is in ``access.trusted_proxies`` (a client's own, in
any spelling, is dropped like the other forwarding headers), else generated; the app sees it (the
middleware and the sidecar), provider calls carry it, every log line of the request has it, and
error answers show it (``request_id`` in JSON, a labelled detail on a page)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from gateway.cli import build_sidecar
from gateway.config import GatewayConfig
from gateway.logs import JsonFormatter
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from plugins.lark.sandbox import LarkSandbox
from tests.conftest import (
    BROWSER_UA,
    HTML,
    ConfigFactory,
    GatewayStarter,
    ServedLark,
    browser_login,
    echo_app,
    free_port,
    headers_of,
)
from tests.test_metrics import samples
from tests.test_proxy import serve

GENERATED = re.compile(r"[0-9a-f]{16}")
TRUSTED = {"access": {"trusted_proxies": ["127.0.0.1/32"]}}


@contextlib.contextmanager
def json_lines(logger: str = "gateway") -> Iterator[io.StringIO]:
    """What ``logger`` writes, as the gateway's JSON formatter writes it at emit time."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    target = logging.getLogger(logger)
    saved = target.level
    target.addHandler(handler)
    target.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        target.removeHandler(handler)
        target.setLevel(saved)


async def test_a_clients_request_id_is_replaced_in_every_spelling(start_gateway: GatewayStarter) -> None:
    async with start_gateway(access={"public_paths": ["/public/*"]}) as running, running.client() as client:
        answer = await client.get("/public/x", headers=[("X-Request-Id", "forged-1"), ("x_request_id", "forged-2"),
                                                        ("X-Request_ID", "forged-3")])
        again = await client.get("/public/x")
    received = headers_of(answer)
    assert len(received["x-request-id"]) == 1 and "x_request_id" not in received
    [ours] = received["x-request-id"]
    assert GENERATED.fullmatch(ours)
    assert not any("forged" in value for values in received.values() for value in values)
    assert headers_of(again)["x-request-id"] != [ours]  # one per request


async def test_a_trusted_proxys_request_id_is_kept_and_an_unfit_one_replaced(start_gateway: GatewayStarter) -> None:
    async with start_gateway(access={**TRUSTED["access"], "public_paths": ["/public/*"]}) as running, \
            running.client() as client:
        kept = await client.get("/public/x", headers={"X-Request-Id": "edge-7f3a.42"})
        other_spelling = await client.get("/public/x", headers={"x_request_id": "edge-underscore"})
        too_long = await client.get("/public/x", headers={"X-Request-Id": "a" * 129})
        with_space = await client.get("/public/x", headers={"X-Request-Id": "two words"})
    assert headers_of(kept)["x-request-id"] == ["edge-7f3a.42"]
    received = headers_of(other_spelling)
    assert "x_request_id" not in received and GENERATED.fullmatch(received["x-request-id"][0])
    for answer in (too_long, with_space):
        [value] = headers_of(answer)["x-request-id"]
        assert GENERATED.fullmatch(value)


async def test_errors_show_the_request_id_in_json_and_on_the_page(start_gateway: GatewayStarter) -> None:
    async with start_gateway(**TRUSTED) as running, running.client() as client:
        as_json = await client.get("/_gateway/no-such-endpoint", headers={"X-Request-Id": "rid-json-1",
                                                                          "accept": "application/json"})
        as_page = await client.get("/_gateway/no-such-endpoint", headers={**HTML, "X-Request-Id": "rid-page-1"})
        generated = await client.get("/_gateway/no-such-endpoint", headers={"accept": "application/json"})
        chinese = await client.get("/_gateway/no-such-endpoint", headers={**HTML, "accept-language": "zh-CN",
                                                                          "X-Request-Id": "rid-zh-1"})
    assert as_json.status_code == 404
    assert as_json.json() == {"error": "not_found", "message": as_json.json()["message"], "request_id": "rid-json-1"}
    assert as_page.status_code == 404
    assert re.search(r"Request ID: </?\w*[^>]*><code class=request-id>rid-page-1</code>|"
                     r"Request ID: <code class=request-id>rid-page-1</code>", as_page.text), as_page.text
    assert GENERATED.fullmatch(generated.json()["request_id"])
    assert "请求编号：<code class=request-id>rid-zh-1</code>" in chinese.text


async def test_every_log_line_of_a_request_carries_its_id(start_gateway: GatewayStarter) -> None:
    async with start_gateway(**TRUSTED) as running, running.client() as client:
        with json_lines() as buffer:
            failed = await client.get("/_gateway/callback/lark?code=forged&state=nope",
                                      headers={"X-Request-Id": "rid-audit-1"})
            await client.get("/_gateway/callback/lark?code=forged&state=again", headers={"X-Request-Id": "rid-2"})
    assert failed.status_code == 400 and failed.json()["request_id"] == "rid-audit-1"
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    audit = [line for line in lines if line["logger"] == "gateway.audit"]
    assert [(line["event"], line["request_id"]) for line in audit] == [("login.failed", "rid-audit-1"),
                                                                       ("login.failed", "rid-2")]
    assert audit[0]["error"] == "state_invalid" and audit[0]["flow"] == "browser"
    assert audit[0]["provider"] == "lark" and audit[0]["client_ip"] == "127.0.0.1"
    assert "tenant" not in audit[0] and "user_id" not in audit[0]  # nobody named yet: nobody guessed
    assert all(line["request_id"] in ("rid-audit-1", "rid-2") for line in lines)


class Recorder:
    """An emulator host that notes the X-Request-Id of each call."""

    def __init__(self, app: Any, seen: list[tuple[str, str | None]]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            value = dict(scope["headers"]).get(b"x-request-id")
            self.seen.append((scope["path"], value.decode() if value else None))
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def recorded_lark() -> AsyncIterator[tuple[ServedLark, list[tuple[str, str | None]]]]:
    seen: list[tuple[str, str | None]] = []
    sandbox = LarkSandbox()
    async with serve_apps({role: Recorder(app, seen) for role, app in sandbox.hosts().items()}) as urls:
        yield ServedLark(sandbox, urls), seen


async def test_provider_calls_carry_the_request_id() -> None:
    async with recorded_lark() as (lark, seen):
        port = free_port()
        config = GatewayConfig(public_url=f"http://127.0.0.1:{port}", access=TRUSTED["access"],
                               session={"secrets": ["Kd83-vQz1LmX0pR7sTfW2yHc9BnE4aGj6uYo5iN"], "secure": False},
                               providers={"lark": lark.settings()})
        gateway = AuthGateway(echo_app(), config)
        try:
            headers = {"user-agent": BROWSER_UA, "x-request-id": "rid-login-9"}
            async with serve_apps({"gateway": gateway}, port=port) as urls, \
                    httpx.AsyncClient(base_url=urls["gateway"], timeout=10, headers=headers) as client:
                assert (await browser_login(client, "/x")).status_code == 200
        finally:
            await gateway.aclose()
    by_gateway = [value for path, value in seen if path.endswith("/oauth/token") or path.endswith("/user_info")]
    assert by_gateway and all(value == "rid-login-9" for value in by_gateway), seen


async def test_the_sidecar_passes_the_id_on_and_times_the_upstream(make_config: Any) -> None:
    async with serve_apps({"upstream": echo_app()}) as upstream:
        config = make_config(upstream={"url": upstream["upstream"]}, access={"public_paths": ["/public/*"]},
                             metrics={"allow_from": ["127.0.0.1"]})
        sidecar = build_sidecar(config)
        try:
            async with serve_apps({"sidecar": sidecar}) as urls, \
                    httpx.AsyncClient(base_url=urls["sidecar"], timeout=10) as client:
                answer = await client.get("/public/a", headers={"X-Request-Id": "client-made"})
                missing = await client.get("/public/missing-on-upstream")
                scrape = await client.get("/_gateway/metrics")
        finally:
            await sidecar.aclose()  # type: ignore[attr-defined]
    [value] = headers_of(answer)["x-request-id"]
    assert GENERATED.fullmatch(value)  # no trusted proxy: the client's was dropped
    assert missing.status_code == 200  # the echo app answers every path
    found = samples(scrape.text)
    assert found['gateway_upstream_duration_seconds_count{status_class="2xx"}'] == 2


@pytest.mark.parametrize("path", ["/r", "/_gateway/auth"])
async def test_a_token_refresh_logs_the_client_ip_of_the_request_that_made_it(
        make_config: Any, lark: ServedLark, path: str) -> None:
    """token.refreshed / token.refresh_failed are written in gateway/tokens.py, which is handed no
    request: the address comes from the request's context (gateway.logs.request_client_ip), bound
    by AuthGateway once the session is not in its cache, by the trusted-proxy rule (X-Forwarded-For
    believed from 127.0.0.1); for an app request and for a forward-auth check alike. uvicorn
    without proxy_headers, as ``gateway serve`` runs it: the gateway reads the header."""
    lark.sandbox.access_ttl_s = 4  # a refresh is due 2 s after each token
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = make_config(public_url=f"http://127.0.0.1:{sock.getsockname()[1]}", **TRUSTED)
    gateway = AuthGateway(echo_app(), config)
    try:
        async with serve(gateway, sock) as url, \
                httpx.AsyncClient(base_url=url, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
            await browser_login(client, "/x")
            with json_lines("gateway.audit") as buffer:
                await asyncio.sleep(2.2)
                refreshed = await client.get(path, headers={"x-forwarded-for": "198.51.100.7",
                                                            "x-request-id": "rid-r1"})
                lark.sandbox.revoke(lark.sandbox.current_user)  # the next refresh is refused for good
                await asyncio.sleep(2.2)
                ended = await client.get(path, headers={"x-forwarded-for": "203.0.113.9, 127.0.0.1"})
    finally:
        await gateway.aclose()
    assert refreshed.status_code == 200 and ended.status_code in (302, 401)
    if path == "/r":
        assert headers_of(refreshed)["x-forwarded-for"] == ["198.51.100.7"]  # a trusted peer's, kept
    events = [json.loads(line) for line in buffer.getvalue().splitlines()]
    by_event = {event["event"]: event for event in events}
    assert by_event["token.refreshed"]["client_ip"] == "198.51.100.7"
    assert by_event["token.refreshed"]["request_id"] == "rid-r1"
    failed = by_event["token.refresh_failed"]
    assert failed["client_ip"] == "203.0.113.9"  # the right-most hop that is not a trusted proxy
    assert failed["outcome"] == "definitive" and failed["provider"] == "lark"
    # The flow of the sign-in that produced the tokens (the record keeps it: TokenSet.flow).
    assert by_event["token.refreshed"]["flow"] == failed["flow"] == "browser"


async def test_an_audit_event_outside_a_request_has_no_client_ip(caplog: Any) -> None:
    """The context variable is the request's: an event written by no request has no address
    (rather than the last request's), and an explicit one wins over the request's."""
    from gateway.logs import audit, request_client_ip

    with caplog.at_level(logging.INFO, logger="gateway.audit"):
        audit("token.refreshed", provider="lark")
        token = request_client_ip.set("192.0.2.1")
        try:
            audit("token.refreshed", provider="lark")
            audit("logout", provider="lark", client_ip="192.0.2.2")
        finally:
            request_client_ip.reset(token)
    fields = [record.event_fields for record in caplog.records]  # type: ignore[attr-defined]
    assert "client_ip" not in fields[0]
    assert fields[1]["client_ip"] == "192.0.2.1" and fields[2]["client_ip"] == "192.0.2.2"


async def test_a_refused_tenant_s_login_failed_names_who_the_provider_said_signed_in(
        start_gateway: GatewayStarter, lark: ServedLark) -> None:
    """The code was redeemed, so the provider has said who this is; the gateway then refuses the
    organisation (``tenant_not_allowed``): the event names that tenant and user."""
    user = lark.sandbox.users[lark.sandbox.current_user]
    async with start_gateway(access={"allow_tenants": ["someone-else"]}) as running, running.client() as client:
        with json_lines("gateway.audit") as buffer:
            refused = await browser_login(client, "/x")
    assert refused.status_code == 403
    [event] = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert (event["event"], event["error"], event["flow"]) == ("login.failed", "tenant_not_allowed", "browser")
    assert (event["tenant"], event["user_id"]) == (user.tenant_key, user.open_id)


@pytest.fixture(params=["memory", "redis"])
def store_section(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {"backend": "memory"}
    return {"backend": "redis", "url": request.getfixturevalue("redis_url"),
            "key_prefix": f"t:{uuid.uuid4().hex[:10]}:"}


async def test_logout_names_the_flow_of_the_user_s_token_record_and_a_later_version_s_session_logs_out(
        make_config: ConfigFactory, lark: ServedLark, store_section: dict[str, Any]) -> None:
    """``logout`` takes the flow from the user's token record (TokenSet.flow: the latest sign-in's),
    not from the session record, whose stored form stays the previous version's six fields. A
    session record a later version wrote (a field more), in memory or in Redis, still
    authenticates and logs out. A token record with no flow (stored before it was kept), or none
    at all: the event has no flow, and the logout succeeds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = make_config(public_url=f"http://127.0.0.1:{sock.getsockname()[1]}", store=store_section)
    gateway = AuthGateway(echo_app(), config)
    cookie_name = config.session.cookie_name
    runtime = gateway.runtime
    logouts: list[dict[str, Any]] = []
    try:
        async with serve(gateway, sock) as url, \
                httpx.AsyncClient(base_url=url, headers={"user-agent": BROWSER_UA}, timeout=10) as client, \
                httpx.AsyncClient(base_url=url, headers={"user-agent": BROWSER_UA}, timeout=10) as other:
            assert (await browser_login(client, "/x")).status_code == 200
            record = await runtime.sessions.load(client.cookies[cookie_name])
            assert record is not None
            stored = json.loads(await runtime.store.get(f"sess:{record.sid}") or b"null")
            assert len(stored) == 6  # the form a replica of the previous version reads

            async def log_out(ticket: str) -> None:
                other.cookies.set(cookie_name, ticket)
                with json_lines("gateway.audit") as buffer:
                    assert (await other.post("/_gateway/logout", headers={"origin": url})).status_code == 200
                logouts.extend(json.loads(line) for line in buffer.getvalue().splitlines())

            # Another session of the same user, written by a later version with a field more.
            now = int(time.time())
            later = [record.provider, record.user, record.tenant, record.name, now, now + 3600, "a later field"]
            await runtime.store.set("sess:later-sid-1", json.dumps(later).encode(), 3600)
            ticket = runtime.sessions.codec.encode("later-sid-1", issued_at=now, expires_at=now + 3600)
            other.cookies.set(cookie_name, ticket)
            seen = await other.get("/later", headers=HTML)
            await log_out(client.cookies[cookie_name])
            await log_out(ticket)
            # The same cookie sent again (the logout answer deleted it from the client).
            after = await other.get("/later", headers={"accept": "application/json",
                                                       "cookie": f"{cookie_name}={ticket}"})
            # The token record as a gateway before TokenSet.flow stored it, then no record at all.
            tokens = await runtime.tokens.load(record.token_key)
            assert tokens is not None and tokens.flow == "browser"
            await runtime.tokens.save(record.provider, record.tenant, record.user, replace(tokens, flow=None))
            ticket, _ = await runtime.sessions.create(provider=record.provider, user=record.user,
                                                      tenant=record.tenant, name=record.name)
            await log_out(ticket)
            await runtime.store.delete(record.token_key)
            ticket, _ = await runtime.sessions.create(provider=record.provider, user=record.user,
                                                      tenant=record.tenant, name=record.name)
            await log_out(ticket)
    finally:
        await gateway.aclose()
    assert seen.status_code == 200 and headers_of(seen)["x-auth-user"] == [record.user]
    assert after.status_code == 401  # ended server-side, not only forgotten by the client
    assert [event["event"] for event in logouts] == ["logout"] * 4
    assert [event.get("flow") for event in logouts] == ["browser", "browser", None, None]
    assert all((event["provider"], event["tenant"], event["user_id"]) == (record.provider, record.tenant, record.user)
               for event in logouts)
