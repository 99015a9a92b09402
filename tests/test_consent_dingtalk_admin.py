"""DingTalk's administrator grant end to end, in real Chromium inside the simulated DingTalk client
(the emulator's own dingtalk.open.js and the plugin's bridge): ``/consent?grant=app`` runs the
authorization component with type 1 (``openAuth``, sheet 2.5) and each answer ends where it must:

- ``ok`` (an administrator grants at once): signed in again, back at ``next``, and the app-token
  route goes through;
- ``cancel`` (the panel closed): the "declined" page, code ``access_denied``;
- ``toAdmin`` (a member asked; the request went to an administrator): the "waiting for your
  administrator" page, code ``approval_pending``;
- ``failed`` (here: a permission the app never applied for in its console, 500104): the "did not
  complete" page, code ``provider_error`` (no browser page can ask for an app permission).

Each ending is in the audit trail (``consent.granted`` / ``consent.denied`` / ``consent.failed``,
the last two reported by the page), flow in-client, with the scopes as ``app:<name>``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest
from playwright.async_api import Browser

from plugins.dingtalk.sandbox import DEFAULT_USERS, DingTalkSandbox
from tests._relay import relay_gateway, served
from tests.conftest import open_simulated_client
from tests.test_consent_dingtalk import DINGTALK_UA
from tests.test_gateway_js import spa

pytestmark = pytest.mark.asyncio(loop_scope="module")

ZHANG, LISI = DEFAULT_USERS[0], DEFAULT_USERS[1]  # an administrator, a member of the same organisation
STAFF = "/_gateway/api/dingtalk/topapi/user/listid"
UNAPPLIED = "Calendar.Event.Read"  # not among the emulated app's console permissions: 500104, failed
ROUTES = [{"provider": "dingtalk", "path": "topapi/user/listid", "methods": ["POST"], "token": "app",
           "scopes": ["Contact.User.Read", UNAPPLIED]}]
LIST_STAFF = ("fetch('" + STAFF + "', {method: 'POST', headers: {'Content-Type': 'application/json'},"
              " body: JSON.stringify({dept_id: 1})}).then(function (r) { return r.json().then(function (b) {"
              " return {status: r.status, body: b}; }); })")


@pytest.mark.parametrize(("status", "person", "scope", "title", "code"), [
    ("ok", ZHANG, "Contact.User.Read", None, None),
    ("cancel", ZHANG, "Contact.User.Read", "Sign-in was declined", "access_denied"),
    ("toAdmin", LISI, "Contact.User.Read", "Waiting for your administrator", "approval_pending"),
    ("failed", ZHANG, UNAPPLIED, "Sign-in did not complete", "provider_error"),
])
async def test_the_administrators_grant_ends_on_the_right_page(
        module_browser: Browser, caplog: pytest.LogCaptureFixture, status: str, person: Any, scope: str,
        title: str | None, code: str | None) -> None:
    sandbox = DingTalkSandbox()
    sandbox.set_current_user(person.userid)
    opened: list[Any] = []
    async with served(sandbox) as urls:
        settings = {**sandbox.provider_settings(urls), "jssdk_url": urls["api"] + "/_sandbox/dingtalk.open.js"}
        async with relay_gateway("dingtalk", settings, ROUTES, app=spa()) as running:
            client = await open_simulated_client(module_browser, user_agent=DINGTALK_UA, init_script=None)
            client.page.on("request", lambda request: opened.append(request.post_data_json)
                           if request.url.endswith("/_sandbox/jsapi/open_auth") else None)
            await client.page.goto(f"{running.url}/app", wait_until="commit")
            await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)  # the free login
            if status == "cancel":
                sandbox.open_auth_status = "cancel"  # the panel is closed: what openAuth() answers then
            # An ending in the page is reported to the gateway (POST /consent): waited for, then read.
            reported = client.page.expect_response(
                lambda response: response.request.method == "POST" and response.url.endswith("/_gateway/consent"),
                timeout=15_000) if title else contextlib.nullcontext()
            with caplog.at_level(logging.INFO, logger="gateway.audit"):
                async with reported:
                    await client.page.goto(f"{running.url}/_gateway/consent?provider=dingtalk&scopes={scope}"
                                           "&grant=app&next=/app", wait_until="commit")
                if title is None:
                    await client.page.wait_for_url(f"{running.url}/app", timeout=15_000)
                    await client.page.wait_for_function("window.pageId", timeout=10_000)
                    answer = await client.page.evaluate(LIST_STAFF)
                    assert answer["status"] == 200 and answer["body"]["errcode"] == 0, answer
                    assert person.userid in answer["body"]["result"]["userid_list"]
                else:
                    await client.page.wait_for_function(
                        "t => (document.getElementById('gw-title') || {}).textContent === t", arg=title,
                        timeout=15_000)
                    assert await client.page.text_content("#gw-code") == code
                    assert await client.page.locator("#gw-actions a").count() == 2  # a way forward
    assert [(body["type"], body["rpcScope"]) for body in opened] == [("1", scope)]
    if status == "toAdmin":
        assert [(item.requested_by, sorted(item.scopes)) for item in sandbox.admin_requests] == [(LISI.userid, [scope])]
    events = [record.event_fields for record in caplog.records  # type: ignore[attr-defined]
              if record.getMessage().startswith("consent.")]
    expected = {"ok": ("consent.granted", None), "cancel": ("consent.denied", "access_denied"),
                "toAdmin": ("consent.failed", "approval_pending"), "failed": ("consent.failed", "provider_error")}
    assert [(event["event"], event.get("error")) for event in events] == [expected[status]]
    (event,) = events
    assert (event["provider"], event["flow"], event["scopes"]) == ("dingtalk", "in-client", f"app:{scope}")
    assert event["user_id"] == person.userid and event["tenant"] == person.corp_id
    assert event.get("outcome") == ("pending_admin" if status == "toAdmin" else None)
    assert not client.errors
