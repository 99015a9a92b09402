"""Issue 13: no token, code, secret, cookie or ``state`` in any log line.

A full run with ``logging: {format: json, level: DEBUG}`` as ``gateway serve`` sets it up: a sign-in
through each emulator (Lark in the browser, DingTalk and Tencent Meeting in the client), a token
refresh, failed sign-ins, logouts. Every line written is kept; then every value the emulators
issued (codes, access and refresh tokens, app tokens), the app secrets, the session secret, the
cookies and the states are looked for in them. The audit events that must be there are checked
too, so a run that logged nothing cannot pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import re
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from gateway.config import GatewayConfig
from gateway.logs import configure
from gateway.middleware import AuthGateway
from gateway.sandbox import Sandbox, serve_apps
from plugins.dingtalk.sandbox import DingTalkSandbox
from plugins.lark.sandbox import LarkSandbox
from plugins.wemeet.sandbox import WeMeetSandbox
from tests.conftest import HTML, RunningGateway, browser_login, echo_app, free_port
from tests.test_audit_docs import documented_audit_events
from tests.test_dingtalk_e2e import DINGTALK_UA, in_client_login
from tests.test_wemeet_e2e import WEMEET_UA, client_login

# Where an emulator keeps what it issued: dicts keyed by the code or token, or holding it.
_ISSUED = ("_codes", "_access", "_refresh", "_free_codes", "_user_codes", "_app_tokens")
_SECRET_FIELD = re.compile(r"token|code|secret|ticket", re.I)


def issued_values(sandbox: Sandbox) -> set[str]:
    """Every code and token ``sandbox`` handed out so far (keys and token-named fields)."""
    found: set[str] = set()

    def add(value: Any) -> None:
        if isinstance(value, str) and len(value) >= 8:
            found.add(value)

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                add(key)
                walk(item)
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item) if not isinstance(item, str) else add(item)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for field in dataclasses.fields(value):
                if _SECRET_FIELD.search(field.name):
                    add(getattr(value, field.name))

    for name in _ISSUED:
        walk(getattr(sandbox, name, None))
    return found


@contextlib.contextmanager
def json_logs_at_debug() -> Iterator[io.StringIO]:
    """The process's logging as ``gateway serve`` configures it (json, DEBUG), into a buffer."""
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    buffer = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = buffer  # configure() binds its handler to sys.stderr as it is now
    try:
        configure("json", "DEBUG")
    finally:
        sys.stderr = real_stderr
    try:
        yield buffer
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


@contextlib.asynccontextmanager
async def gateway_for(name: str, settings: dict[str, Any], secret: str) -> AsyncIterator[RunningGateway]:
    port = free_port()
    config = GatewayConfig(public_url=f"http://127.0.0.1:{port}", session={"secrets": [secret], "secure": False},
                           providers={name: settings})
    gateway = AuthGateway(echo_app(), config)
    try:
        async with serve_apps({"gateway": gateway}, port=port) as urls:
            yield RunningGateway(urls["gateway"], gateway, config)
    finally:
        await gateway.aclose()


def _cookie_values(client: httpx.AsyncClient) -> set[str]:
    return {cookie.value for cookie in client.cookies.jar if cookie.value and len(cookie.value) >= 8}


def _states(answer: httpx.Response) -> set[str]:
    found = set(re.findall(r"state=([A-Za-z0-9_\-.~%]{8,})", str(answer.url) + answer.text))
    for item in answer.history:
        found.update(re.findall(r"state=([A-Za-z0-9_\-.~%]{8,})", item.headers.get("location", "")))
    found.update(re.findall(r'"state":\s*"([^"]{8,})"', answer.text))
    return found


async def test_no_issued_value_appears_in_any_log_line() -> None:
    # Lark and Tencent Meeting: a refresh soon (one after a browser sign-in, one after an in-client one).
    lark, dingtalk, wemeet = LarkSandbox(access_ttl_s=4), DingTalkSandbox(), WeMeetSandbox(access_ttl_s=4)
    session_secret = secrets.token_urlsafe(32)
    secret_values: set[str] = {session_secret}
    audit: list[dict[str, Any]] = []
    with json_logs_at_debug() as buffer:
        async with serve_apps(lark.hosts()) as lark_urls, serve_apps(dingtalk.hosts()) as dingtalk_urls, \
                serve_apps(wemeet.hosts()) as wemeet_urls:
            settings = {"lark": lark.provider_settings(lark_urls),
                        "dingtalk": dingtalk.provider_settings(dingtalk_urls),
                        "wemeet": wemeet.provider_settings(wemeet_urls)}
            for provider_settings in settings.values():
                secret_values.update(value for key, value in provider_settings.items()
                                     if "secret" in key and isinstance(value, str))

            # Lark, in the browser: sign in, a refresh, a forged callback, a logout.
            async with gateway_for("lark", settings["lark"], session_secret) as running, \
                    running.client() as client:
                signed_in = await browser_login(client, "/x")
                assert signed_in.status_code == 200, signed_in.text
                secret_values |= _states(signed_in) | _cookie_values(client)
                await asyncio.sleep(2.2)  # the refresh is due 2 s after the login
                assert (await client.get("/after-refresh")).status_code == 200
                secret_values |= _cookie_values(client)
                forged = await client.get("/_gateway/callback/lark?code=forgedCODE123456&state=forgedSTATE123456")
                assert forged.status_code == 400
                secret_values |= {"forgedCODE123456", "forgedSTATE123456"}
                logout = await client.post("/_gateway/logout", headers={"origin": running.url})
                assert logout.status_code == 200

            # DingTalk, in the client: a code the emulator mints as dd.requestAuthCode would.
            async with gateway_for("dingtalk", settings["dingtalk"], session_secret) as running, \
                    running.client(DINGTALK_UA) as client:
                code = dingtalk.mint_client_code()
                answer = await in_client_login(running, client, code)  # type: ignore[arg-type]
                assert answer.status_code == 200, answer.text
                secret_values |= {code} | _cookie_values(client)
                page = await client.get("/inbox", headers=HTML)
                assert page.status_code == 200
                async with running.client(DINGTALK_UA) as other:  # a code works once: a failed sign-in
                    used_again = await in_client_login(running, other, code)  # type: ignore[arg-type]
                    assert used_again.status_code >= 400, used_again.text
                    secret_values |= _cookie_values(other)

            # Tencent Meeting, in the client.
            async with gateway_for("wemeet", settings["wemeet"], session_secret) as running, \
                    running.client(WEMEET_UA) as client:
                code = wemeet.mint_client_code()
                page = await client.get("/_gateway/login?next=/", headers=HTML)
                secret_values |= _states(page)
                await client_login(client, running, code)
                secret_values |= {code} | _cookie_values(client)
                assert (await client.get("/", headers=HTML)).status_code == 200
                await asyncio.sleep(2.2)  # the refresh is due 2 s after the login
                assert (await client.get("/after-refresh", headers=HTML)).status_code == 200
                secret_values |= _cookie_values(client)
                logout = await client.post("/_gateway/logout", headers={"origin": running.url})
                assert logout.status_code == 200

        for sandbox in (lark, dingtalk, wemeet):
            secret_values |= issued_values(sandbox)
    lines = buffer.getvalue().splitlines()
    for line in lines:
        record = json.loads(line)  # every line is one JSON event
        if record["logger"] == "gateway.audit":
            audit.append(record)
    events = [(record["event"], record.get("provider")) for record in audit]
    # The run did what it must, and said so: a scan of nothing would prove nothing.
    for expected in [("login.succeeded", "lark"), ("token.refreshed", "lark"), ("login.failed", "lark"),
                     ("logout", "lark"), ("login.succeeded", "dingtalk"), ("login.failed", "dingtalk"),
                     ("login.succeeded", "wemeet"), ("token.refreshed", "wemeet"), ("logout", "wemeet")]:
        assert expected in events, (expected, events)
    # Every sign-in's, refresh's and logout's event says which flow it was (a refresh, a logout:
    # the sign-in's).
    flows = {(record["event"], record["provider"], record.get("flow")) for record in audit
             if record["event"].startswith(("login.", "token.", "logout"))}
    assert {("token.refreshed", "lark", "browser"), ("token.refreshed", "wemeet", "in-client"),
            ("logout", "lark", "browser"), ("logout", "wemeet", "in-client")} <= flows, flows
    assert all(flow in ("browser", "in-client") for _, _, flow in flows), flows
    documented = documented_audit_events()  # docs/deployment.md's table: each line as it says
    for record in audit:
        level, fields = documented[record["event"]]
        assert record["level"] == level, record
        assert set(record) - {"time", "level", "logger", "message", "request_id", "event"} <= fields, record
    assert all(re.fullmatch(r"[0-9a-f]{16}", record["request_id"]) for record in audit)
    assert len(lines) > len(audit)  # DEBUG on: more than the audit events
    assert any(len(value) > 100 for value in secret_values)  # the emulators' long tokens are in the set
    assert sum(1 for value in secret_values if value in lark.__dict__.get("_refresh", {})) >= 2  # rotated
    leaks = sorted({(value[:12] + "...", line[:160]) for value in secret_values for line in lines if value in line})
    assert not leaks, leaks


@pytest.mark.parametrize("value", ["at-1", "code-1"])
def test_the_audit_api_has_no_place_for_a_secret(value: str) -> None:
    from gateway.logs import audit

    with pytest.raises(TypeError):
        audit("login.succeeded", token=value)  # type: ignore[call-arg]
