"""``502 relay_misconfigured``: every plugin verdict that yields it (docs/relay.md, "When the route
is the operator's mistake"), read from the plugin hooks themselves, beside the end-to-end tests that
see it through the relay (tests/test_relay_lark.py, tests/test_relay_dingtalk_wemeet.py).

It is the operator's mistake, not the caller's: the route asks for a token the provider's API does
not take (a user token on an app-only API, an app token where none exists), so no request the
caller can make would work. Hence a 5xx, the gateway's side, with a sentence saying which setting
to change, and never a refresh (the token is not expired) nor a consent (no scope is missing).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.config import GatewayConfig
from gateway.errors import ProviderMisconfigured
from gateway.middleware import AuthGateway
from gateway.providers import Provider
from plugins.dingtalk.sandbox import DingTalkSandbox
from plugins.lark.sandbox import LarkSandbox
from plugins.wemeet.sandbox import WeMeetSandbox
from tests.conftest import echo_app

# Nothing is called: the hooks decide from the route and the answer alone.
NOWHERE = {name: "http://127.0.0.1:9" for name in ("open", "accounts", "api", "oapi", "login", "web")}


@pytest.fixture
async def providers() -> AsyncIterator[dict[str, Provider]]:
    dingtalk = DingTalkSandbox()
    config = GatewayConfig(
        public_url="http://127.0.0.1:8080", session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
        providers={"lark": LarkSandbox().provider_settings(NOWHERE),
                   "dingtalk": dingtalk.provider_settings(NOWHERE),
                   "dingtalk-isv": {**dingtalk.isv_settings(NOWHERE), "suite_ticket": "seed"},
                   "wemeet": WeMeetSandbox().provider_settings(NOWHERE)})
    gateway = AuthGateway(echo_app(), config)
    yield dict(gateway.runtime.providers)
    await gateway.aclose()


def lark_answer(code: int, msg: str) -> bytes:
    return json.dumps({"code": code, "msg": msg}).encode()


def test_lark_a_user_token_on_a_tenant_only_api(providers: dict[str, Provider]) -> None:
    lark = providers["lark"]
    verdict = lark.relay_verdict(400, httpx.Headers(), lark_answer(99991668, "user access token not support"))
    assert verdict.outcome == "misconfigured" and "token: app" in verdict.message
    # The same code with any other message is an expired token: refreshed once, not the operator's.
    expired = lark.relay_verdict(400, httpx.Headers(), lark_answer(99991668, "Invalid access token for authorization."))
    assert expired.outcome == "expired"


def test_dingtalk_a_user_token_on_the_oapi_host(providers: dict[str, Provider]) -> None:
    dingtalk = providers["dingtalk"]
    with pytest.raises(ProviderMisconfigured) as raised:
        dingtalk.relay_auth("topapi/user/listid", "user-token", kind="user", tokens=None)
    assert raised.value.code == "relay_misconfigured" and raised.value.status_code == 502
    assert "token: app" in raised.value.message
    # The app token rides in the query there; on the api host a user token is fine.
    assert dingtalk.relay_auth("topapi/user/listid", "app-token", kind="app", tokens=None).params == (
        ("access_token", "app-token"),)
    assert dingtalk.relay_auth("v1.0/contact/users/me", "t", kind="user", tokens=None).headers == (
        ("x-acs-dingtalk-access-token", "t"),)


async def test_dingtalk_isv_an_app_token_for_no_known_organisation(providers: dict[str, Provider]) -> None:
    with pytest.raises(ProviderMisconfigured) as raised:
        await providers["dingtalk-isv"].relay_app_token("")  # a third-party app serves many: which one?
    assert raised.value.code == "relay_misconfigured" and raised.value.status_code == 502


async def test_tencent_meeting_has_no_app_token(providers: dict[str, Provider]) -> None:
    with pytest.raises(ProviderMisconfigured) as raised:
        await providers["wemeet"].relay_app_token("200000001")
    assert raised.value.code == "relay_misconfigured" and raised.value.status_code == 502
    assert "token: user" in raised.value.message
