"""The Tencent Meeting emulator is strict: each rule of the fact sheet, checked over HTTP.

The two hosts are mounted in process (``HostRoutingTransport``: the same ASGI apps ``gateway
sandbox`` serves); where node must reach them they run on loopback sockets. The clock knob moves
time instead of sleeping. The rules are the provider's documented ones
(``docs/providers/wemeet.md`` and its sources); where the documentation says nothing, the test
checks the sandbox's documented choice and the plugin must not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from gateway.providers import ProviderContext
from gateway.sandbox import serve_apps
from gateway.stores.memory import MemoryStore
from plugins.wemeet.provider import WeMeetProvider, WeMeetSettings
from plugins.wemeet.sandbox import _FAKE_JSSDK, DEFAULT_USERS, WeMeetSandbox, WeMeetUser
from tests.conftest import Clock
from tests.test_wemeet_provider import es5_violations

REDIRECT_URI = "https://app.example.com/_gateway/callback/wemeet"
ZHANG, LI_SI, WANG, PAT, ZHAO = DEFAULT_USERS
TOKEN_PATH = "/wemeet-webapi/v2/oauth2/oauth/access_token"
REFRESH_PATH = "/wemeet-webapi/v2/oauth2/oauth/refresh_token"
USER_INFO_PATH = "/wemeet-webapi/v2/oauth2/oauth/user_info"
PROFILE_PATH = "/v1/users/info/basic"


@dataclass
class Lab:
    """One served sandbox: its object, clock, base URLs and an HTTP client."""

    sandbox: WeMeetSandbox
    clock: Clock
    urls: dict[str, str]
    http: httpx.AsyncClient
    nonce: int = 0

    async def exchange(self, code: str, **overrides: Any) -> httpx.Response:
        body = {"sdk_id": self.sandbox.sdk_id, "secret": self.sandbox.secret, "auth_code": code, **overrides}
        sent = {key: value for key, value in body.items() if value is not None}
        return await self.http.post(self.urls["web"] + TOKEN_PATH, json=sent)

    async def tokens(self, open_id: str | None = None) -> dict[str, Any]:
        answer = await self.exchange(self.sandbox.mint_client_code(open_id))
        assert answer.status_code == 200, answer.text
        data: dict[str, Any] = answer.json()["data"]
        return data

    async def refresh(self, refresh_token: str, open_id: str, **overrides: Any) -> httpx.Response:
        body = {"refresh_token": refresh_token, "sdk_id": self.sandbox.sdk_id, "open_id": open_id, **overrides}
        sent = {key: value for key, value in body.items() if value is not None}
        return await self.http.post(self.urls["web"] + REFRESH_PATH, json=sent)

    async def profile(self, access_token: str, open_id: str, *, timestamp: float | None = None,
                      nonce: str | None = None, operator_id: str | None = None, operator_id_type: str = "2",
                      headers: dict[str, str] | None = None) -> httpx.Response:
        self.nonce += 1
        sent = {
            "Content-Type": "application/json",
            "AccessToken": access_token,
            "OpenId": open_id,
            "X-TC-Timestamp": str(int(self.clock() if timestamp is None else timestamp)),
            "X-TC-Nonce": nonce or str(self.nonce),
            **(headers or {}),
        }
        params = {"operator_id": operator_id or open_id, "operator_id_type": operator_id_type}
        return await self.http.get(self.urls["api"] + PROFILE_PATH, params=params,
                                   headers={k: v for k, v in sent.items() if v})

    async def authorize(self, **params: str) -> httpx.Response:
        query = {"corp_id": self.sandbox.corp_id, "sdk_id": self.sandbox.sdk_id, "redirect_uri": REDIRECT_URI,
                 "state": "St4te", **params}
        return await self.http.get(self.urls["web"] + "/marketplace/authorize.html",
                                   params={k: v for k, v in query.items() if v})

    async def jsapi(self, **body: Any) -> dict[str, Any]:
        answer = await self.http.post(self.urls["web"] + "/_sandbox/jsapi/code", json=body)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
        result: dict[str, Any] = answer.json()
        return result


LabFactory = Callable[..., AbstractAsyncContextManager[Lab]]
IN_PROCESS = {"web": "http://meeting.wemeet.test", "api": "http://api.wemeet.test"}


@pytest.fixture
async def make_lab() -> AsyncIterator[LabFactory]:
    """Serve a sandbox built with the given knobs; everything stops at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        @contextlib.asynccontextmanager
        async def build(served: bool = False, **knobs: Any) -> AsyncIterator[Lab]:
            clock = Clock()
            sandbox = WeMeetSandbox(clock=clock, **knobs)
            if served:  # on loopback sockets, for node
                urls = await stack.enter_async_context(serve_apps(sandbox.hosts()))
                http = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            else:  # in process: the same ASGI apps, no server to start and stop
                urls = dict(IN_PROCESS)
                http = await stack.enter_async_context(httpx.AsyncClient(transport=sandbox.transport(urls)))
            sandbox.provider_settings(urls)  # tells the fake JS-SDK where the web host is
            yield Lab(sandbox, clock, urls, http)

        yield build


@pytest.fixture
async def lab(make_lab: LabFactory) -> AsyncIterator[Lab]:
    async with make_lab() as built:
        yield built


@pytest.fixture
async def served(make_lab: LabFactory) -> AsyncIterator[Lab]:
    async with make_lab(served=True) as built:
        yield built


def assert_400(answer: httpx.Response, words: str) -> None:
    """A wemeet-webapi refusal: HTTP 400 (the documented part) and the sandbox's own body."""
    assert answer.status_code == 400, answer.text
    body = answer.json()
    assert body["code"] == 400 and words in body["message"] and re.fullmatch(r"[0-9a-f]{16}", body["nonce"])
    assert "data" not in body


def assert_api_error(answer: httpx.Response, code: int) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text
    info: dict[str, Any] = answer.json()["error_info"]
    assert info["error_code"] == code and info["message"]
    return info


# -- auth codes and the exchange ------------------------------------------------------------------


async def test_the_exchange_answers_the_documented_envelope_with_an_absolute_expiry(lab: Lab) -> None:
    answer = await lab.exchange(lab.sandbox.mint_client_code())
    assert answer.status_code == 200
    body = answer.json()
    assert (body["code"], body["message"]) == (0, "SUCCESS") and re.fullmatch(r"[0-9a-f]{16}", body["nonce"])
    data = body["data"]
    assert set(data) == {"access_token", "refresh_token", "expires", "open_id", "scopes", "open_corp_id", "scopes_v2"}
    assert data["expires"] == int(lab.clock.now) + 6 * 3600 and isinstance(data["expires"], int)
    assert (data["open_id"], data["open_corp_id"]) == (ZHANG.open_id, ZHANG.open_corp_id)
    assert data["scopes"] == ["VIEW_USER_INFO", "VIEW_VIDEO", "MANAGE_VIDEO"]
    assert data["scopes_v2"] == ["personal-user-view", "personal-recording-view", "personal-recording-edit"]


async def test_codes_are_single_use_and_unknown_codes_fail(lab: Lab) -> None:
    code = lab.sandbox.mint_client_code()
    assert (await lab.exchange(code)).status_code == 200
    assert_400(await lab.exchange(code), "already used")
    assert_400(await lab.exchange("never-issued"), "invalid auth_code")


async def test_codes_expire_after_5_minutes(lab: Lab) -> None:
    still_fresh, too_late = lab.sandbox.mint_client_code(), lab.sandbox.mint_client_code()
    lab.clock.advance(299)
    assert (await lab.exchange(still_fresh)).status_code == 200
    lab.clock.advance(1)
    assert_400(await lab.exchange(too_late), "expired")


async def test_bad_credentials_fail_without_burning_the_code(lab: Lab) -> None:
    code = lab.sandbox.mint_client_code()
    assert_400(await lab.exchange(code, secret="wrong"), "invalid secret")
    assert_400(await lab.exchange(code, sdk_id="99999"), "invalid sdk_id")
    assert (await lab.exchange(code)).status_code == 200


async def test_the_body_is_exactly_the_documented_json(lab: Lab) -> None:
    code = lab.sandbox.mint_client_code()
    assert_400(await lab.exchange(code, grant_type="authorization_code"), "unexpected parameter: grant_type")
    assert_400(await lab.exchange(code, redirect_uri=REDIRECT_URI), "unexpected parameter: redirect_uri")
    assert_400(await lab.exchange(code, secret=None), "missing parameter: secret")
    form = {"sdk_id": lab.sandbox.sdk_id, "secret": lab.sandbox.secret, "auth_code": code}
    assert_400(await lab.http.post(lab.urls["web"] + TOKEN_PATH, data=form), "JSON")
    not_json = await lab.http.post(lab.urls["web"] + TOKEN_PATH, content=b"{nope",
                                   headers={"content-type": "application/json"})
    assert_400(not_json, "JSON")
    assert (await lab.exchange(code)).status_code == 200  # none of that burned the code


async def test_extra_fields_pass_when_strictness_is_off(make_lab: LabFactory) -> None:
    async with make_lab(strict_fields=False) as lab:
        assert (await lab.exchange(lab.sandbox.mint_client_code(), grant_type="x")).status_code == 200


async def test_the_older_exchange_answer_has_no_open_corp_id(make_lab: LabFactory) -> None:
    async with make_lab(corp_in_exchange=False) as lab:
        assert "open_corp_id" not in await lab.tokens()


async def test_pending_users_get_no_code(lab: Lab) -> None:
    with pytest.raises(ValueError, match="pending"):
        lab.sandbox.mint_client_code(WANG.open_id)


# -- rotation ---------------------------------------------------------------------------------------


async def test_a_new_exchange_kills_the_previous_tokens_at_once(lab: Lab) -> None:
    first = await lab.tokens()
    assert (await lab.profile(first["access_token"], ZHANG.open_id)).status_code == 200
    second = await lab.tokens()  # another device, same user
    info = assert_api_error(await lab.profile(first["access_token"], ZHANG.open_id), 190303)
    assert info["new_error_code"] == 200190303
    assert_400(await lab.refresh(first["refresh_token"], ZHANG.open_id), "invalid refresh_token")
    assert (await lab.profile(second["access_token"], ZHANG.open_id)).status_code == 200
    assert lab.sandbox.is_live(second["access_token"]) and not lab.sandbox.is_live(first["access_token"])


async def test_refresh_rotates_both_tokens_and_answers_the_documented_fields(lab: Lab) -> None:
    first = await lab.tokens()
    lab.clock.advance(60)
    answer = await lab.refresh(first["refresh_token"], ZHANG.open_id)
    assert answer.status_code == 200 and answer.json()["code"] == 0
    rotated = answer.json()["data"]
    assert set(rotated) == {"access_token", "refresh_token", "expires", "open_id", "scopes"}
    assert rotated["expires"] == int(lab.clock.now) + 6 * 3600
    assert rotated["refresh_token"] != first["refresh_token"] and rotated["access_token"] != first["access_token"]
    assert_api_error(await lab.profile(first["access_token"], ZHANG.open_id), 190303)  # no grace period
    assert_400(await lab.refresh(first["refresh_token"], ZHANG.open_id), "invalid refresh_token")
    assert (await lab.profile(rotated["access_token"], ZHANG.open_id)).status_code == 200
    assert lab.sandbox.stats["refresh_token"] == 2 and lab.sandbox.stats["access_token"] == 1


async def test_refresh_takes_exactly_refresh_token_sdk_id_and_open_id(lab: Lab) -> None:
    tokens = await lab.tokens()
    assert_400(await lab.refresh(tokens["refresh_token"], ZHANG.open_id, secret=lab.sandbox.secret),
               "unexpected parameter: secret")
    assert_400(await lab.refresh(tokens["refresh_token"], ZHANG.open_id, grant_type="refresh_token"),
               "unexpected parameter: grant_type")
    assert_400(await lab.refresh(tokens["refresh_token"], LI_SI.open_id), "does not belong")
    assert_400(await lab.refresh(tokens["refresh_token"], ZHANG.open_id, sdk_id="1"), "invalid sdk_id")
    assert_400(await lab.refresh(tokens["refresh_token"], ""), "missing parameter: open_id")
    assert (await lab.refresh(tokens["refresh_token"], ZHANG.open_id)).status_code == 200


async def test_tokens_expire_and_refresh_renews_the_refresh_token(lab: Lab) -> None:
    tokens = await lab.tokens()
    lab.clock.advance(6 * 3600)
    assert_api_error(await lab.profile(tokens["access_token"], ZHANG.open_id), 190303)
    lab.clock.advance(30 * 86400 - 6 * 3600 - 1)
    renewed = (await lab.refresh(tokens["refresh_token"], ZHANG.open_id)).json()["data"]
    lab.clock.advance(30 * 86400 - 1)
    renewed = (await lab.refresh(renewed["refresh_token"], ZHANG.open_id)).json()["data"]
    lab.clock.advance(30 * 86400)
    assert_400(await lab.refresh(renewed["refresh_token"], ZHANG.open_id), "expired")


async def test_revoke_kills_every_token(lab: Lab) -> None:
    tokens = await lab.tokens()
    lab.sandbox.revoke(ZHANG.open_id)
    assert_api_error(await lab.profile(tokens["access_token"], ZHANG.open_id), 190303)
    assert_400(await lab.refresh(tokens["refresh_token"], ZHANG.open_id), "invalid refresh_token")
    assert not lab.sandbox.is_authorized(ZHANG.open_id)


async def test_user_info_checks_a_token(lab: Lab) -> None:
    tokens = await lab.tokens()
    url = lab.urls["web"] + USER_INFO_PATH
    answer = await lab.http.post(url, json={"access_token": tokens["access_token"], "open_id": ZHANG.open_id})
    assert answer.json()["data"] == {"expires": tokens["expires"], "open_id": ZHANG.open_id,
                                     "scopes": tokens["scopes"]}  # no name, no avatar
    await lab.tokens()
    dead = await lab.http.post(url, json={"access_token": tokens["access_token"], "open_id": ZHANG.open_id})
    assert_400(dead, "invalid access_token")


# -- the REST API -------------------------------------------------------------------------------------


async def test_the_profile_of_enterprise_and_personal_users(lab: Lab) -> None:
    tokens = await lab.tokens()
    profile = (await lab.profile(tokens["access_token"], ZHANG.open_id)).json()
    assert (profile["username"], profile["open_corp_id"], profile["open_corp_name"]) == (
        "张三", ZHANG.open_corp_id, "示例科技有限公司")
    assert profile["status"] == "1"  # a string, as the SDK models declare it
    personal = await lab.tokens(PAT.open_id)
    profile = (await lab.profile(personal["access_token"], PAT.open_id)).json()
    assert (profile["username"], profile["open_corp_id"], profile["open_corp_name"]) == ("Pat Personal", "", "")


#: ``V1UsersInfoBasicGet200Response`` as the official SDK declares it (TencentCloud/wemeet-openapi-sdk-python,
#: ``wemeet_openapi/service/user_manager/model.py``, commit 7903860): every field is optional, each of one type.
SDK_BASIC_INFO_TYPES: dict[str, type] = {
    "account_type": int, "account_version": int, "add_on_largemeeting": int, "add_on_webinar": int,
    "ai_account_type": int, "avatar_url": str, "email_status": int, "enable_ai_account": bool, "is_voov": int,
    "open_corp_id": str, "open_corp_name": str, "phone_status": int, "status": str, "user_account_type": int,
    "username": str,
}


@pytest.mark.parametrize("user", [ZHANG, PAT], ids=["enterprise", "personal"])
async def test_the_profile_answers_the_types_of_the_official_sdk_model(lab: Lab, user: WeMeetUser) -> None:
    tokens = await lab.tokens(user.open_id)
    profile = (await lab.profile(tokens["access_token"], user.open_id)).json()
    assert set(profile) <= set(SDK_BASIC_INFO_TYPES), set(profile) - set(SDK_BASIC_INFO_TYPES)
    # type(), not isinstance(): a bool is an int in Python, and is_voov must not be true/false.
    wrong = {name: type(value).__name__ for name, value in profile.items()
             if type(value) is not SDK_BASIC_INFO_TYPES[name]}
    assert not wrong, wrong
    assert profile["is_voov"] == 0 and profile["enable_ai_account"] is False
    # Values the official doc's tables list (S8): 1/2 for e-mail and phone, the account kinds.
    assert profile["email_status"] in (1, 2) and profile["phone_status"] in (0, 1, 2)
    assert profile["account_version"] in (0, 1, 2, 3) and profile["user_account_type"] in range(1, 10)
    assert profile["account_type"] == (1 if user.open_corp_id else 0)  # 0: 个人免费版


async def test_the_profile_needs_a_profile_scope(lab: Lab) -> None:
    tokens = await lab.tokens(ZHAO.open_id)
    assert tokens["scopes"] == ["VIEW_VIDEO"]
    assert_api_error(await lab.profile(tokens["access_token"], ZHAO.open_id), 190303)


async def test_timestamp_nonce_and_replay_rules(lab: Lab) -> None:
    token = (await lab.tokens())["access_token"]
    now = lab.clock.now
    assert_api_error(await lab.profile(token, ZHANG.open_id, timestamp=now - 301), 190300)
    assert_api_error(await lab.profile(token, ZHANG.open_id, timestamp=now + 301), 190300)
    assert (await lab.profile(token, ZHANG.open_id, timestamp=now + 300, nonce="42")).status_code == 200
    assert_api_error(await lab.profile(token, ZHANG.open_id, timestamp=now + 300, nonce="42"), 190301)
    assert (await lab.profile(token, ZHANG.open_id, timestamp=now + 300, nonce="43")).status_code == 200
    lab.clock.advance(300)  # the pair may come again once 5 minutes have passed
    assert (await lab.profile(token, ZHANG.open_id, timestamp=now + 300, nonce="42")).status_code == 200
    for bad in ("0", "-1", "abc"):
        assert_api_error(await lab.profile(token, ZHANG.open_id, nonce=bad), 190004)
    assert_api_error(await lab.profile(token, ZHANG.open_id, headers={"X-TC-Timestamp": "soon"}), 190004)
    assert_api_error(await lab.profile(token, ZHANG.open_id, headers={"Content-Type": "text/plain"}), 190004)


async def test_the_token_must_match_open_id_and_operator(lab: Lab) -> None:
    token = (await lab.tokens())["access_token"]
    assert_api_error(await lab.profile(token, LI_SI.open_id), 190303)
    assert_api_error(await lab.profile(token, ZHANG.open_id, operator_id=LI_SI.open_id), 190303)
    assert_api_error(await lab.profile(token, ZHANG.open_id, operator_id_type="1"), 190004)
    assert_api_error(await lab.profile("", ZHANG.open_id), 190303)


async def test_per_user_rate_limit(make_lab: LabFactory) -> None:
    async with make_lab(rate_limit_per_min=3) as lab:
        token = (await lab.tokens())["access_token"]
        for _ in range(3):
            assert (await lab.profile(token, ZHANG.open_id)).status_code == 200
        assert_api_error(await lab.profile(token, ZHANG.open_id), 190310)
        lab.clock.advance(60)
        assert (await lab.profile(token, ZHANG.open_id)).status_code == 200


# -- the authorize page --------------------------------------------------------------------------------


def location_query(answer: httpx.Response) -> dict[str, list[str]]:
    assert answer.status_code == 302, answer.text
    return parse_qs(urlsplit(answer.headers["location"]).query)


async def test_auto_consent_redirects_with_auth_code_and_state_keeping_the_query(lab: Lab) -> None:
    lab.sandbox.set_current_user(LI_SI.open_id)
    answer = await lab.authorize(redirect_uri=REDIRECT_URI + "?tab=1")
    location = urlsplit(answer.headers["location"])
    assert location.path == "/_gateway/callback/wemeet"
    query = parse_qs(location.query)
    assert query["tab"] == ["1"] and query["state"] == ["St4te"]
    assert location.query.startswith("tab=1&auth_code=")
    assert (await lab.exchange(query["auth_code"][0])).json()["data"]["open_id"] == LI_SI.open_id
    assert lab.sandbox.is_authorized(LI_SI.open_id)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"state": ""}, "Missing parameter: state"),
        ({"corp_id": ""}, "Missing parameter: corp_id"),
        ({"sdk_id": "42"}, "Unknown sdk_id"),
        ({"corp_id": "1"}, "corp_id"),
        ({"redirect_uri": "javascript:alert(1)"}, "redirect_uri"),
        ({"state": "a" * 65}, "64 characters"),
        ({"state": "not-alnum"}, "64 characters"),
    ],
)
async def test_authorize_page_errors_never_redirect(lab: Lab, params: dict[str, str], words: str) -> None:
    answer = await lab.authorize(**params)
    assert answer.status_code == 400 and "location" not in answer.headers
    assert words in answer.text


async def test_a_redirect_uri_whitelist(make_lab: LabFactory) -> None:
    async with make_lab(redirect_uris=[REDIRECT_URI]) as lab:
        assert (await lab.authorize(redirect_uri="https://evil.example/cb")).status_code == 400
        assert (await lab.authorize(redirect_uri=REDIRECT_URI + "?x=1")).status_code == 302
        assert (await lab.authorize(state="a" * 64)).status_code == 302


async def test_consent_page_allow_and_deny(make_lab: LabFactory) -> None:
    async with make_lab(auto_consent=False) as lab:
        lab.sandbox.set_current_user(LI_SI.open_id)
        consent_url = lab.urls["web"] + "/_sandbox/consent"

        async def ticket(state: str) -> str:
            page = await lab.authorize(state=state)
            assert page.status_code == 200 and "Allow" in page.text and "VIEW_USER_INFO" in page.text
            found = re.search(r'name="ticket" value="([^"]+)"', page.text)
            assert found is not None
            return found.group(1)

        denied_ticket = await ticket("abc")
        denied = await lab.http.post(consent_url, data={"ticket": denied_ticket, "decision": "deny"})
        assert location_query(denied) == {"error": ["access_denied"], "state": ["abc"]}
        replay = await lab.http.post(consent_url, data={"ticket": denied_ticket, "decision": "allow"})
        assert replay.status_code == 400  # a ticket works once
        allowed = await lab.http.post(consent_url, data={"ticket": await ticket("def"), "decision": "allow"})
        query = location_query(allowed)
        assert query["state"] == ["def"] and (await lab.exchange(query["auth_code"][0])).status_code == 200
        # Authorized once: the next visit needs no consent.
        assert "auth_code" in location_query(await lab.authorize())


async def test_an_enterprise_users_first_authorization_waits_for_the_administrator(make_lab: LabFactory) -> None:
    async with make_lab() as lab:
        lab.sandbox.set_current_user(WANG.open_id)
        # The sheet's working assumption: back to redirect_uri with state and no auth_code.
        assert location_query(await lab.authorize()) == {"state": ["St4te"]}
        assert lab.sandbox.applications == {WANG.open_id}
        assert (await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id))["errCode"]
        assert (await lab.jsapi(api="authorize")) == {"bizCode": 1, "bizMessage": "申请授权成功"}
        approved = await lab.http.post(lab.urls["web"] + "/_sandbox/approve", json={"open_id": WANG.open_id})
        assert approved.json() == {"open_id": WANG.open_id, "approval": "approved"}
        assert lab.sandbox.applications == set()
        query = location_query(await lab.authorize())
        assert (await lab.exchange(query["auth_code"][0])).json()["data"]["open_corp_id"] == WANG.open_corp_id
        # An administrator who refuses: not the user's access_denied (the sandbox's own wire choice).
        await lab.http.post(lab.urls["api"] + "/_sandbox/approve", json={"open_id": WANG.open_id, "answer": "rejected"})
        refused = location_query(await lab.authorize())
        assert refused["error"] == ["unauthorized_client"] and refused["state"] == ["St4te"]
        assert "administrator" in refused["error_description"][0]
        assert (await lab.jsapi(api="authorize"))["bizCode"] == 4  # "other": the bridge goes on to the page
        bad = await lab.http.post(lab.urls["web"] + "/_sandbox/approve", json={"open_id": WANG.open_id, "answer": "x"})
        assert bad.status_code == 400


async def test_the_pending_page_instead_of_a_redirect(make_lab: LabFactory) -> None:
    async with make_lab(pending_redirect=False) as lab:
        lab.sandbox.set_current_user(WANG.open_id)
        answer = await lab.authorize()
        assert answer.status_code == 200 and "申请已提交" in answer.text and "location" not in answer.headers


# -- the simulated client: code endpoint and fake JS-SDK ---------------------------------------------


async def test_jsapi_code_endpoint_speaks_cors_and_follows_the_authorization_rules(make_lab: LabFactory) -> None:
    async with make_lab(auto_consent=False) as lab:
        url = lab.urls["web"] + "/_sandbox/jsapi/code"
        preflight = await lab.http.options(url, headers={
            "Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"
        assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
        # 张三 authorized the app before: requestAgentAuthCode answers at once.
        code = (await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id))["authCode"]
        assert (await lab.exchange(code)).status_code == 200
        assert "errCode" in await lab.jsapi(api="requestAgentAuthCode", sdkId="1")
        # Li Si has not: requestAgentAuthCode fails, the authorize dialog asks.
        lab.sandbox.set_current_user(LI_SI.open_id)
        assert "errCode" in await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id)
        assert (await lab.jsapi(api="authorize"))["consent_required"] is True
        assert (await lab.jsapi(api="authorize", consent=False))["bizCode"] == 3
        assert (await lab.jsapi(api="authorize", consent=True))["authCode"]
        assert (await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id))["authCode"]
        assert lab.sandbox.stats["jsapi_code"] == 7


async def test_admin_api(lab: Lab) -> None:
    web, api = lab.urls["web"] + "/_sandbox", lab.urls["api"] + "/_sandbox"
    assert (await lab.http.post(web + "/faults", json={"endpoint": "access_token", "status": 503})).status_code == 204
    failing = await lab.exchange(lab.sandbox.mint_client_code())
    assert failing.status_code == 503 and "text/html" in failing.headers["content-type"]
    assert (await lab.exchange(lab.sandbox.mint_client_code())).status_code == 200  # times=1
    await lab.http.post(api + "/faults", json={"endpoint": "profile", "code": 190310, "times": None})
    token = (await lab.tokens())["access_token"]
    for _ in range(2):
        assert_api_error(await lab.profile(token, ZHANG.open_id), 190310)
    assert (await lab.http.delete(api + "/faults")).status_code == 204
    assert (await lab.profile(token, ZHANG.open_id)).status_code == 200
    assert (await lab.http.post(web + "/faults", json={"endpoint": "x", "code": "1"})).status_code == 400
    stats = (await lab.http.get(api + "/stats")).json()
    assert stats["access_token"] == 3 and stats["profile"] == 3
    users = (await lab.http.get(web + "/users")).json()
    assert [user["username"] for user in users] == ["张三", "Li Si", "王五", "Pat Personal", "Zhao Liu"]
    assert users[0]["current"] and users[0]["authorized"] and users[2]["approval"] == "pending"
    switched = await lab.http.post(web + "/current_user", json={"open_id": PAT.open_id})
    assert switched.json() == {"open_id": PAT.open_id, "username": "Pat Personal"}
    assert (await lab.http.post(web + "/current_user", json={"open_id": "nobody"})).status_code == 404
    assert (await lab.http.post(web + "/jsapi_mode", json={"mode": "hang"})).json() == {"mode": "hang"}
    assert (await lab.http.post(web + "/jsapi_mode", json={"mode": "x"})).status_code == 400


async def test_webapi_fault_with_a_code_and_a_200_status(lab: Lab) -> None:
    lab.sandbox.inject_fault("refresh_token", 1234, status=200)
    tokens = await lab.tokens()
    answer = await lab.refresh(tokens["refresh_token"], ZHANG.open_id)
    assert answer.status_code == 200 and answer.json()["code"] == 1234


def test_sandbox_settings_and_client_user_agent() -> None:
    sandbox = WeMeetSandbox()
    urls = {"web": "http://127.0.0.1:1", "api": "http://127.0.0.1:2"}
    settings = sandbox.provider_settings(urls)
    assert WeMeetSettings(**settings).jssdk_url == ""
    assert settings["web_base_url"] == urls["web"] and settings["api_base_url"] == urls["api"]
    assert sandbox.demo_settings(urls)["jssdk_url"] == "http://127.0.0.1:1/_sandbox/wemeet-js-sdk.js"
    ua = sandbox.client_user_agent
    assert "app/tencent_wemeet" in ua and "c_district/0" in ua and "arch/x86_64" in ua
    assert re.search(r"os_name/(Mac|Windows|Android|iOS|Linux) os_version/\S+ app_version/\d+\.\d+\.\d+\.\d+", ua)
    with pytest.raises(ValueError):
        WeMeetSandbox(users=[])


def test_fake_jssdk_is_es5() -> None:
    assert es5_violations(_FAKE_JSSDK) == []


async def test_fake_jssdk_is_served_with_the_web_host_and_mode(lab: Lab) -> None:
    lab.sandbox.jsapi_mode = "no_authorize"
    answer = await lab.http.get(lab.urls["web"] + "/_sandbox/wemeet-js-sdk.js")
    assert answer.headers["content-type"].startswith("application/javascript")
    assert json.dumps(lab.urls["web"]) in answer.text and '"no_authorize"' in answer.text
    assert "__WEB__" not in answer.text and "__MODE__" not in answer.text


# -- the fake JS-SDK + the real bridge, run by node against the served sandbox ----------------------

ROOT = Path(__file__).resolve().parents[1]

PAGE_HARNESS = r"""
var fs = require("fs");
global.window = global;
var listeners = {};
window.addEventListener = function (type, fn) { (listeners[type] = listeners[type] || []).push(fn); };
window.removeEventListener = function () {};
window.confirm = function () { return true; };
var navigatedTo = null;
window.location = {};
Object.defineProperty(window.location, "href", { set: function (url) {
  navigatedTo = url;
  (listeners.beforeunload || []).forEach(function (fn) { fn({}); });
}, get: function () { return "https://app.example.com/_gateway/login"; } });
var args = JSON.parse(process.argv[4]);
fetch(process.argv[2]).then(function (r) { return r.text(); }).then(function (source) {
  eval(source);
  eval(fs.readFileSync(process.argv[3], "utf8"));
  var tools = { withTimeout: function (promise, ms, what) {
    return Promise.race([promise, new Promise(function (resolve, reject) {
      setTimeout(function () { reject({ outcome: "fallback", message: what + " did not answer in time" }); }, ms);
    })]);
  } };
  return window.gatewayBridges.wemeet.requestCode(args, tools);
}).then(function (result) { console.log(JSON.stringify({ resolved: result, navigatedTo: navigatedTo })); },
        function (error) { console.log(JSON.stringify({ rejected: error, navigatedTo: navigatedTo })); });
"""


async def run_page(lab: Lab, tmp_path: Path, state: str = "Pg1") -> dict[str, Any]:
    """Load the sandbox's JS-SDK from its URL and the real bridge.js in node; ask for a code."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "page.js"
    harness.write_text(PAGE_HARNESS)
    config = {"sdkId": lab.sandbox.sdk_id, "corpId": lab.sandbox.corp_id, "redirectUri": REDIRECT_URI,
              "state": state, "timeout_ms": 400}
    process = await asyncio.create_subprocess_exec(
        node, str(harness), lab.urls["web"] + "/_sandbox/wemeet-js-sdk.js", str(ROOT / "plugins/wemeet/bridge.js"),
        json.dumps(config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


async def redeem(lab: Lab, code: str) -> Any:
    settings = WeMeetSettings(**lab.sandbox.provider_settings(lab.urls))
    context = ProviderContext(name="wemeet", redirect_uri=REDIRECT_URI, http=lab.http, store=MemoryStore(),
                              clock=lab.clock)
    return await WeMeetProvider(settings, context).redeem(code, flow="client", redirect_uri=REDIRECT_URI)


@pytest.mark.parametrize(("user", "calls"), [(ZHANG, 1), (LI_SI, 2)])
async def test_fake_jssdk_and_bridge_hand_the_provider_a_working_code(
    served: Lab, tmp_path: Path, user: WeMeetUser, calls: int
) -> None:
    lab = served
    lab.sandbox.set_current_user(user.open_id)
    result = await run_page(lab, tmp_path)
    assert "resolved" in result, result
    grant = await redeem(lab, result["resolved"]["code"])
    assert (grant.identity.user, grant.identity.name) == (user.open_id, user.username)
    # 张三 authorized before (requestAgentAuthCode); Li Si goes through the authorize dialog.
    assert lab.sandbox.stats["jsapi_code"] == calls


async def test_fake_jssdk_reports_a_pending_approval(served: Lab, tmp_path: Path) -> None:
    lab = served
    lab.sandbox.set_current_user(WANG.open_id)
    rejected = (await run_page(lab, tmp_path))["rejected"]
    assert rejected["outcome"] == "pending" and "administrator" in rejected["message"]


async def test_an_old_client_uses_request_auth_which_opens_the_authorize_page(served: Lab, tmp_path: Path) -> None:
    lab = served
    lab.sandbox.jsapi_mode = "no_authorize"
    lab.sandbox.set_current_user(LI_SI.open_id)  # not authorized yet: requestAgentAuthCode fails
    result = await run_page(lab, tmp_path, state="Nav42")
    assert result["rejected"]["outcome"] == "navigating"
    target = urlsplit(result["navigatedTo"])
    assert target.path == "/marketplace/authorize.html"
    expected = {"corp_id": lab.sandbox.corp_id, "sdk_id": lab.sandbox.sdk_id, "redirect_uri": REDIRECT_URI,
                "state": "Nav42"}
    assert parse_qs(target.query) == {key: [value] for key, value in expected.items()}
    answer = await lab.http.get(result["navigatedTo"])
    assert location_query(answer)["state"] == ["Nav42"]


async def test_a_hung_client_falls_back_in_bounded_time(served: Lab, tmp_path: Path) -> None:
    lab = served
    lab.sandbox.jsapi_mode = "hang"
    started = time.monotonic()
    result = await run_page(lab, tmp_path)
    assert result["rejected"]["outcome"] == "fallback" and result["navigatedTo"] is None
    assert "did not answer in time" in result["rejected"]["message"]
    assert time.monotonic() - started < 5
    assert lab.sandbox.stats["jsapi_code"] == 0



# -- what the demo tour drives: consent, expiry, the timeline ---------------------------------------


async def test_a_refusing_user_is_asked_and_says_no_everywhere(lab: Lab) -> None:
    consent = lab.urls["web"] + "/_sandbox/user_consent"
    assert (await lab.http.post(consent, json={"mode": "deny"})).json() == {"mode": "deny"}
    assert location_query(await lab.authorize()) == {"error": ["access_denied"], "state": ["St4te"]}
    # 张三 authorized the app before, but a refusing user counts as not having done so.
    assert (await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id))["errCode"] == 10002
    assert await lab.jsapi(api="authorize") == {"bizCode": 3, "bizMessage": "用户拒绝授权"}
    assert (await lab.http.post(consent, json={"mode": "maybe"})).status_code == 400
    assert (await lab.http.post(consent, json={"mode": "allow"})).json() == {"mode": "allow"}
    assert "auth_code" in location_query(await lab.authorize())
    assert (await lab.http.get(consent)).json() == {"mode": "allow"}


async def test_expiring_the_access_tokens_now(lab: Lab) -> None:
    data = (await lab.exchange(lab.sandbox.mint_client_code())).json()["data"]
    assert lab.sandbox.is_live(data["access_token"])
    expired = await lab.http.post(lab.urls["api"] + "/_sandbox/tokens/expire")
    assert expired.json() == {"expired": 1}
    assert not lab.sandbox.is_live(data["access_token"])
    # The refresh token still works: that is how the gateway gets a new access token.
    refreshed = await lab.http.post(lab.urls["web"] + "/wemeet-webapi/v2/oauth2/oauth/refresh_token", json={
        "refresh_token": data["refresh_token"], "sdk_id": lab.sandbox.sdk_id, "open_id": data["open_id"]})
    assert refreshed.status_code == 200 and lab.sandbox.is_live(refreshed.json()["data"]["access_token"])


async def test_the_events_tell_each_step_in_order_without_secrets(lab: Lab) -> None:
    query = location_query(await lab.authorize())
    data = (await lab.exchange(query["auth_code"][0])).json()["data"]
    second = location_query(await lab.authorize())
    await lab.exchange(second["auth_code"][0])  # a new exchange kills the previous pair
    answer = (await lab.http.get(lab.urls["web"] + "/_sandbox/events")).json()
    kinds = [event["kind"] for event in answer["events"]]
    assert kinds == ["call", "code", "exchange", "tokens", "call", "code", "exchange", "revoked", "tokens"]
    assert answer["last"] == answer["events"][-1]["seq"]
    assert all(event["at"] > 0 for event in answer["events"])
    text = " ".join(event["text"] for event in answer["events"])
    assert data["access_token"] not in text and data["refresh_token"] not in text and query["auth_code"][0] not in text
    later = (await lab.http.get(lab.urls["web"] + "/_sandbox/events", params={"after": answer["last"] - 1})).json()
    assert [event["kind"] for event in later["events"]] == ["tokens"]
    assert (await lab.http.get(lab.urls["web"] + "/_sandbox/events", params={"after": "x"})).status_code == 400


async def test_a_withheld_scope_is_190303_until_the_user_authorizes_again(lab: Lab) -> None:
    """``POST /_sandbox/user_grant`` (the demo's relay page): the app asks for a scope the user has
    not authorized, so the profile answers 190303 (no distinct missing-scope code), the silent
    requestAgentAuthCode refuses, and the authorization dialog grants every scope again."""
    tokens = await lab.tokens()
    assert (await lab.profile(tokens["access_token"], ZHANG.open_id)).status_code == 200
    grant = lab.urls["api"] + "/_sandbox/user_grant"
    assert (await lab.http.post(grant, json={"scope": "VIEW_USER_INFO", "granted": False})).status_code == 200
    assert_api_error(await lab.profile(tokens["access_token"], ZHANG.open_id), 190303)
    refused = await lab.jsapi(api="requestAgentAuthCode", sdkId=lab.sandbox.sdk_id)
    assert refused["errCode"] == 10002  # the user must authorize the app again
    code = (await lab.jsapi(api="authorize", sdkId=lab.sandbox.sdk_id))["authCode"]
    answer = (await lab.exchange(code)).json()["data"]
    assert "VIEW_USER_INFO" in answer["scopes"]
    assert (await lab.profile(answer["access_token"], ZHANG.open_id)).status_code == 200
    unknown = await lab.http.post(grant, json={"scope": "MANAGE_USER_INFO", "granted": False})
    assert unknown.status_code == 404


async def test_the_tours_approval_endpoints_drive_the_current_users_administrator(lab: Lab) -> None:
    """``/_sandbox/tour/approval`` and ``/_sandbox/tour/answer`` (the demo tour's switch and its
    administrator's buttons): the current user's first authorization waits, then is answered."""
    tour = lab.urls["web"] + "/_sandbox/tour"
    assert (await lab.http.get(tour + "/approval")).json() == {"status": "approved"}
    assert (await lab.http.post(tour + "/approval", json={"on": True})).json() == {"status": "pending"}
    with pytest.raises(ValueError, match="pending"):
        lab.sandbox.mint_client_code()  # the client hands out no code while the administrator has not answered
    assert (await lab.http.post(tour + "/answer", json={"answer": "rejected"})).json() == {"status": "rejected"}
    assert lab.sandbox.approval[ZHANG.open_id] == "rejected"
    assert (await lab.http.post(tour + "/answer", json={"answer": "approved"})).json() == {"status": "approved"}
    assert lab.sandbox.mint_client_code()
    await lab.http.post(tour + "/approval", json={"on": True})
    assert (await lab.http.post(tour + "/approval", json={"on": False})).json() == {"status": "approved"}
    kinds = [event["kind"] for event in (await lab.http.get(lab.urls["web"] + "/_sandbox/events")).json()["events"]]
    assert kinds.count("approval") == 5


@pytest.mark.parametrize(("path", "body", "code"), [
    ("approval", {"on": "yes"}, "bad_switch"), ("approval", {}, "bad_switch"), ("approval", [True], "bad_switch"),
    ("answer", {"answer": "pending"}, "bad_answer"), ("answer", {}, "bad_answer"),
])
async def test_the_tours_approval_endpoints_refuse_bad_input(lab: Lab, path: str, body: Any, code: str) -> None:
    answer = await lab.http.post(lab.urls["api"] + f"/_sandbox/tour/{path}", json=body)
    assert answer.status_code == 400 and answer.json()["error"] == code and answer.json()["message"]
    assert lab.sandbox.approval[ZHANG.open_id] == "approved"


def test_the_tour_entry() -> None:
    (entry,) = WeMeetSandbox().demo_tour()
    assert (entry.provider, entry.title, entry.has_approval, entry.admin_can_refuse) == (
        "wemeet", "Tencent Meeting", True, True)
