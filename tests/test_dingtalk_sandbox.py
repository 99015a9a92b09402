"""The DingTalk emulator is strict: each rule of the fact sheet, checked over real HTTP.

The three hosts are served by uvicorn on loopback (as ``gateway sandbox`` serves them); the clock
knob moves time instead of sleeping. Error codes are the provider's documented ones
(``docs/providers/dingtalk.md`` and the sources it lists).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.sandbox import serve_apps
from plugins.dingtalk.crypto import CallbackCrypto
from plugins.dingtalk.sandbox import (
    _FAKE_JSSDK,
    APP_PERMISSIONS,
    BRIDGE_CONSENT_KEY_PREFIX,
    DEFAULT_USERS,
    OTHER_CORP_ID,
    SANDBOX_APP_KEY,
    SANDBOX_APP_SECRET,
    SANDBOX_CORP_ID,
    SANDBOX_SUITE_KEY,
    SANDBOX_SUITE_SECRET,
    DingTalkSandbox,
)
from tests.conftest import BROWSER_UA, HTML, Clock, echo_app, free_port, free_port_block, headers_of

ZHANG, LISI, ALICE, ZHANG_OTHER = DEFAULT_USERS
REDIRECT = "https://app.example.com/_gateway/callback/dingtalk"


@dataclass
class Lab:
    sandbox: DingTalkSandbox
    clock: Clock
    urls: dict[str, str]
    http: httpx.AsyncClient

    async def app_token(self) -> str:
        answer = await self.http.post(self.urls["api"] + "/v1.0/oauth2/accessToken",
                                      json={"appKey": SANDBOX_APP_KEY, "appSecret": SANDBOX_APP_SECRET})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["accessToken"])

    async def corp_token(self, corp: str = SANDBOX_CORP_ID, ticket: str | None = None) -> httpx.Response:
        return await self.http.post(self.urls["api"] + "/v1.0/oauth2/corpAccessToken", json={
            "suiteKey": SANDBOX_SUITE_KEY, "suiteSecret": SANDBOX_SUITE_SECRET, "authCorpId": corp,
            "suiteTicket": self.sandbox.suite_ticket if ticket is None else ticket})

    async def getuserinfo(self, token: str, code: str) -> dict[str, Any]:
        answer = await self.http.post(self.urls["oapi"] + "/topapi/v2/user/getuserinfo",
                                      params={"access_token": token}, json={"code": code})
        assert answer.status_code == 200  # old style: HTTP 200 even on errors
        return dict(answer.json())

    async def user_token(self, **body: Any) -> httpx.Response:
        payload = {"clientId": SANDBOX_APP_KEY, "clientSecret": SANDBOX_APP_SECRET, **body}
        return await self.http.post(self.urls["api"] + "/v1.0/oauth2/userAccessToken", json=payload)

    async def me(self, token: str) -> httpx.Response:
        return await self.http.get(self.urls["api"] + "/v1.0/contact/users/me",
                                   headers={"x-acs-dingtalk-access-token": token})


LabFactory = Callable[..., AbstractAsyncContextManager[Lab]]


@pytest.fixture
def make_lab() -> LabFactory:
    @asynccontextmanager
    async def build(**knobs: Any) -> AsyncIterator[Lab]:
        clock = Clock()
        sandbox = DingTalkSandbox(clock=clock, **knobs)
        async with serve_apps(sandbox.hosts()) as urls, httpx.AsyncClient(timeout=10) as http:
            yield Lab(sandbox, clock, urls, http)

    return build


@pytest.fixture
async def lab(make_lab: LabFactory) -> AsyncIterator[Lab]:
    async with make_lab() as built:
        yield built


# -- free-login codes and getuserinfo ---------------------------------------------------------


async def test_free_login_codes_are_single_use_expire_and_stay_in_their_corp_and_app(lab: Lab) -> None:
    token = await lab.app_token()
    code = lab.sandbox.mint_client_code()
    first = await lab.getuserinfo(token, code)
    assert first["errcode"] == 0
    assert first["result"] | {"device_id": "x"} == {
        "userid": ZHANG.userid, "unionid": ZHANG.unionid, "associated_unionid": ZHANG.unionid, "name": "张三",
        "device_id": "x", "sys": True, "sys_level": 1}
    assert (await lab.getuserinfo(token, code))["errcode"] == 40078  # single use
    expired = lab.sandbox.mint_client_code()
    lab.clock.now += 300
    assert (await lab.getuserinfo(token, expired))["errcode"] == 40078  # 5 minutes
    token = await lab.app_token()
    suite_code = lab.sandbox.mint_client_code(client_id=SANDBOX_SUITE_KEY)  # minted for the suite
    assert (await lab.getuserinfo(token, suite_code))["errcode"] == 40078
    old_api = lab.sandbox.mint_client_code(client_id=None)  # no clientId: any app of the corp
    assert (await lab.getuserinfo(token, old_api))["errcode"] == 0
    other = lab.sandbox.mint_client_code(ALICE.userid, client_id=None)  # another organisation's code
    assert (await lab.getuserinfo(token, other))["errcode"] == 40078


async def test_getuserinfo_checks_the_app_token(lab: Lab) -> None:
    code = lab.sandbox.mint_client_code()
    answer = await lab.http.post(lab.urls["oapi"] + "/topapi/v2/user/getuserinfo", json={"code": code})
    assert answer.json()["errcode"] == 41001
    unknown = await lab.getuserinfo("nope", code)
    assert (unknown["errcode"], unknown["sub_code"]) == (88, "40014")
    token = await lab.app_token()
    lab.clock.now += 7200
    expired = await lab.getuserinfo(token, code)
    assert (expired["errcode"], expired["sub_code"]) == (88, "42001")


async def test_the_internal_app_token_is_the_same_until_it_expires(lab: Lab) -> None:
    first = await lab.app_token()
    lab.clock.now += 7000
    assert await lab.app_token() == first  # "重复获取会返回相同结果并自动续期"
    lab.clock.now += 7000
    assert await lab.app_token() == first  # renewed by the previous fetch
    lab.clock.now += 7201
    assert await lab.app_token() != first
    legacy = await lab.http.get(lab.urls["oapi"] + "/gettoken",
                                params={"appkey": SANDBOX_APP_KEY, "appsecret": SANDBOX_APP_SECRET})
    assert legacy.json()["errcode"] == 0 and legacy.json()["expires_in"] == 7200


async def test_app_token_requests_are_checked(lab: Lab) -> None:
    url = lab.urls["api"] + "/v1.0/oauth2/accessToken"
    wrong = await lab.http.post(url, json={"appKey": SANDBOX_APP_KEY, "appSecret": "wrong"})
    assert (wrong.status_code, wrong.json()["code"]) == (400, "invalidClientIdOrSecret")
    assert set(wrong.json()) == {"code", "message", "requestid"}
    suite = await lab.http.post(url, json={"appKey": SANDBOX_SUITE_KEY, "appSecret": SANDBOX_SUITE_SECRET})
    assert suite.json()["code"] == "invalidClientIdOrSecret"  # third-party apps: not supported here
    form = await lab.http.post(url, data={"appKey": SANDBOX_APP_KEY, "appSecret": SANDBOX_APP_SECRET})
    assert (form.status_code, form.json()["code"]) == (400, "MissingBody")
    legacy = await lab.http.get(lab.urls["oapi"] + "/gettoken", params={"appkey": SANDBOX_APP_KEY, "appsecret": "x"})
    assert (legacy.status_code, legacy.json()["errcode"]) == (200, 40096)


# -- ISV: suiteTicket and corp tokens ---------------------------------------------------------


async def test_corp_tokens_are_new_on_every_fetch_and_need_the_current_ticket(lab: Lab) -> None:
    first, second = await lab.corp_token(), await lab.corp_token()
    assert first.json()["accessToken"] != second.json()["accessToken"]
    assert first.json()["expireIn"] == 7200
    old_ticket = lab.sandbox.suite_ticket
    lab.sandbox.rotate_suite_ticket()
    stale = await lab.corp_token(ticket=old_ticket)
    assert (stale.status_code, stale.json()["code"]) == (400, "invalidSuiteTicket")
    assert (await lab.corp_token()).status_code == 200
    # Tokens issued with the old ticket keep working (the ticket, not the token, is replaced).
    code = lab.sandbox.mint_client_code(client_id=SANDBOX_SUITE_KEY)
    assert (await lab.getuserinfo(first.json()["accessToken"], code))["errcode"] == 0


async def test_corp_token_errors(make_lab: LabFactory) -> None:
    async with make_lab(authorized_corps=[SANDBOX_CORP_ID]) as lab:
        unauthorized = await lab.corp_token(OTHER_CORP_ID)
        assert unauthorized.json()["code"] == "invalidAuthInfo"
        bad_key = await lab.http.post(lab.urls["api"] + "/v1.0/oauth2/corpAccessToken", json={
            "suiteKey": SANDBOX_SUITE_KEY, "suiteSecret": "x", "authCorpId": SANDBOX_CORP_ID,
            "suiteTicket": lab.sandbox.suite_ticket})
        assert bad_key.json()["code"] == "invalidSuiteKey"
        assert (await lab.corp_token(ticket="Test")).json()["code"] == "invalidSuiteTicket"
    async with make_lab(custom_app=True) as lab:
        assert (await lab.corp_token(ticket="Test")).status_code == 200  # 定制应用: any ticket


async def test_a_corp_token_reissue_can_revoke_the_older_one(make_lab: LabFactory) -> None:
    async with make_lab(corp_token_reissue_revokes=True) as lab:
        first = (await lab.corp_token()).json()["accessToken"]
        await lab.corp_token()
        answer = await lab.getuserinfo(first, lab.sandbox.mint_client_code(client_id=SANDBOX_SUITE_KEY))
        assert (answer["errcode"], answer["sub_code"]) == (88, "40014")


# -- user tokens ------------------------------------------------------------------------------


async def test_user_codes_refresh_rotation_and_users_me(lab: Lab) -> None:
    code = lab.sandbox.mint_user_code(scopes=["Contact.User.Read"])
    granted = await lab.user_token(code=code, grantType="authorization_code")
    assert granted.status_code == 200
    body = granted.json()
    assert set(body) == {"accessToken", "refreshToken", "expireIn"}  # no corpId without the corpid scope
    again = await lab.user_token(code=code, grantType="authorization_code")
    assert (again.status_code, again.json()["code"]) == (400, "invalidParameter.authCode.notFound")
    me = await lab.me(body["accessToken"])
    assert me.json()["unionId"] == ZHANG.unionid and me.json()["nick"] == "张三" and "openId" in me.json()
    rotated = await lab.user_token(refreshToken=body["refreshToken"], grantType="refresh_token")
    assert rotated.status_code == 200 and rotated.json()["refreshToken"] != body["refreshToken"]
    reused = await lab.user_token(refreshToken=body["refreshToken"], grantType="refresh_token")
    assert reused.json()["code"] == "invalidParameter.refreshToken.notFound"
    assert (await lab.me(body["accessToken"])).json()["code"] == "InvalidAuthentication"  # replaced
    lab.clock.now += 7200
    assert (await lab.me(rotated.json()["accessToken"])).json()["code"] == "accesstoken.expired"
    lab.clock.now += 30 * 86400
    late = await lab.user_token(refreshToken=rotated.json()["refreshToken"], grantType="refresh_token")
    assert late.status_code == 400
    assert lab.sandbox.stats["authorization_code"] == 2 and lab.sandbox.stats["refresh_token"] == 3


async def test_user_token_requests_are_checked(lab: Lab) -> None:
    code = lab.sandbox.mint_user_code(with_corp=True)
    form = await lab.http.post(lab.urls["api"] + "/v1.0/oauth2/userAccessToken",
                               data={"clientId": SANDBOX_APP_KEY, "code": code, "grantType": "authorization_code"})
    assert form.json()["code"] == "MissingBody"
    wrong = await lab.user_token(code=code, grantType="authorization_code", clientSecret="x")
    assert wrong.json()["code"] == "invalidClientIdOrSecret"
    suite = await lab.user_token(code=code, grantType="authorization_code", clientId=SANDBOX_SUITE_KEY,
                                 clientSecret=SANDBOX_SUITE_SECRET)
    assert suite.json()["code"] == "invalidParameter.authCode.notFound"  # minted for the internal app
    grant = await lab.user_token(code=code, grantType="client_credentials")
    assert grant.json()["code"] == "unsupported.grant.type"
    ok = await lab.user_token(code=code, grantType="authorization_code")
    assert ok.json()["corpId"] == SANDBOX_CORP_ID  # the login asked for the corpid scope


async def test_users_me_takes_the_token_in_its_header_only(make_lab: LabFactory) -> None:
    async with make_lab(delegated_permissions=["Contact.User.mobile"]) as lab:
        token = (await lab.user_token(code=lab.sandbox.mint_user_code(), grantType="authorization_code")).json()
        url = lab.urls["api"] + "/v1.0/contact/users/me"
        for kwargs in ({"params": {"access_token": token["accessToken"]}},
                       {"headers": {"authorization": f"Bearer {token['accessToken']}"}}):
            answer = await lab.http.get(url, **kwargs)
            assert (answer.status_code, answer.json()["code"]) == (400, "AuthenticationFailed.MissingParameter")
        denied = await lab.me(token["accessToken"])  # the app has not applied for Contact.User.Read
        expected = (403, "Forbidden.AccessDenied.AccessTokenPermissionDenied")
        assert (denied.status_code, denied.json()["code"]) == expected


async def test_getbyunionid_finds_the_member_of_the_tokens_corp(make_lab: LabFactory) -> None:
    async with make_lab() as lab:
        url = lab.urls["oapi"] + "/topapi/user/getbyunionid"
        token = await lab.app_token()
        found = await lab.http.post(url, params={"access_token": token}, json={"unionid": ZHANG.unionid})
        assert found.json()["result"] == {"contact_type": 0, "userid": ZHANG.userid}
        corp = (await lab.corp_token(OTHER_CORP_ID)).json()["accessToken"]
        other = await lab.http.post(url, params={"access_token": corp}, json={"unionid": ZHANG.unionid})
        assert other.json()["result"]["userid"] == ZHANG_OTHER.userid  # same person, the other corp's userid
        missing = await lab.http.post(url, params={"access_token": corp}, json={"unionid": LISI.unionid})
        assert missing.json()["errcode"] == 60121
    async with make_lab(member_lookup=False) as lab:
        answer = await lab.http.post(lab.urls["oapi"] + "/topapi/user/getbyunionid",
                                     params={"access_token": await lab.app_token()}, json={"unionid": ZHANG.unionid})
        assert answer.json()["errcode"] == 60011


# -- the login page ---------------------------------------------------------------------------


def auth_params(**overrides: str) -> dict[str, str]:
    return {"redirect_uri": REDIRECT, "response_type": "code", "client_id": SANDBOX_APP_KEY,
            "scope": "openid corpid", "state": "S1", "prompt": "consent", **overrides}


async def test_login_page_redirects_with_auth_code_and_state(lab: Lab) -> None:
    answer = await lab.http.get(lab.urls["login"] + "/oauth2/auth", params=auth_params())
    assert answer.status_code == 302
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["state"] == ["S1"] and "code" not in query
    granted = await lab.user_token(code=query["authCode"][0], grantType="authorization_code")
    assert granted.json()["corpId"] == SANDBOX_CORP_ID
    lab.sandbox.set_current_user(ZHANG_OTHER.userid)
    other = await lab.http.get(lab.urls["login"] + "/oauth2/auth", params=auth_params(corpId=SANDBOX_CORP_ID))
    code = parse_qs(urlsplit(other.headers["location"]).query)["authCode"][0]
    assert (await lab.user_token(code=code, grantType="authorization_code")).json()["corpId"] == SANDBOX_CORP_ID


@pytest.mark.parametrize(
    "overrides",
    [{"client_id": "nope"}, {"redirect_uri": "javascript:alert(1)"}, {"prompt": "none"}, {"response_type": "token"},
     {"scope": "corpid"}, {"scope": "openid Contact.Secret.Read"}, {"corpId": "dingnotmine"}],
)
async def test_login_page_errors_do_not_redirect(lab: Lab, overrides: dict[str, str]) -> None:
    answer = await lab.http.get(lab.urls["login"] + "/oauth2/auth", params=auth_params(**overrides))
    assert answer.status_code == 400 and "text/html" in answer.headers["content-type"]


async def test_login_page_consent_deny_and_allow(make_lab: LabFactory) -> None:
    async with make_lab(auto_consent=False, redirect_uris=[REDIRECT]) as lab:
        unregistered = await lab.http.get(lab.urls["login"] + "/oauth2/auth",
                                          params=auth_params(redirect_uri="https://evil.example/cb"))
        assert unregistered.status_code == 400
        for decision, key in (("deny", "error"), ("allow", "authCode")):
            page = await lab.http.get(lab.urls["login"] + "/oauth2/auth", params=auth_params())
            ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
            assert ticket, page.text
            answer = await lab.http.post(lab.urls["login"] + "/_sandbox/consent",
                                         data={"ticket": ticket.group(1), "decision": decision})
            query = parse_qs(urlsplit(answer.headers["location"]).query)
            assert key in query and query["state"] == ["S1"]
            if key == "error":
                assert query["error"] == ["access_denied"]


# -- the simulated client ---------------------------------------------------------------------


async def test_jsapi_code_endpoint_speaks_cors_and_fails_like_the_client(lab: Lab) -> None:
    url = lab.urls["api"] + "/_sandbox/jsapi/code"
    preflight = await lab.http.options(url, headers={"origin": "http://app.test",
                                                     "access-control-request-method": "POST"})
    assert preflight.status_code == 204 and preflight.headers["access-control-allow-origin"] == "*"
    minted = await lab.http.post(url, json={"api": "requestAuthCode", "corpId": SANDBOX_CORP_ID,
                                            "clientId": SANDBOX_APP_KEY})
    assert minted.headers["access-control-allow-origin"] == "*"
    assert (await lab.getuserinfo(await lab.app_token(), minted.json()["code"]))["errcode"] == 0
    wrong_corp = await lab.http.post(url, json={"api": "requestAuthCode", "corpId": OTHER_CORP_ID,
                                                "clientId": SANDBOX_APP_KEY})
    assert wrong_corp.json()["errorCode"] == "7"
    lab.sandbox.jsapi_mode = "old_client"
    old_client = await lab.http.post(url, json={"api": "requestAuthCode", "corpId": SANDBOX_CORP_ID,
                                                "clientId": SANDBOX_APP_KEY})
    assert old_client.json()["errorCode"] == "1"
    old_api = await lab.http.post(url, json={"api": "runtime.permission.requestAuthCode", "corpId": SANDBOX_CORP_ID})
    assert old_api.json()["code"]


async def test_the_authorization_component(lab: Lab) -> None:
    url = lab.urls["api"] + "/_sandbox/jsapi/open_auth"

    async def ask(**body: Any) -> dict[str, Any]:
        payload = {"clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "rpcScope": "", "fieldScope": "", **body}
        return dict((await lab.http.post(url, json=payload)).json())

    user = await ask(type="0", rpcScope="Contact.User.Read")
    assert user["status"] == "ok"
    token = await lab.user_token(code=user["result"]["authCode"], grantType="authorization_code")
    assert token.status_code == 200
    assert (await ask(type="0", rpcScope="Unknown.Scope"))["status"] == "failed"
    assert (await ask(type="0"))["status"] == "failed"  # neither rpcScope nor fieldScope
    assert (await ask(type="1", rpcScope=".default")) == {"status": "ok", "result": None}  # 张三 is an admin
    assert lab.sandbox.app_permissions_granted(SANDBOX_CORP_ID) == {"qyapi_base", "Contact.User.Read",
                                                                     "Pro.HrmDismission.ReadWrite"}
    lab.sandbox.set_current_user(LISI.userid)
    # The organisation's administrator granted them already: a member's request goes through.
    assert (await ask(type="1", rpcScope="Pro.HrmDismission.ReadWrite"))["status"] == "ok"
    lab.sandbox.revoke_app_grants()
    assert (await ask(type="1", rpcScope="Pro.HrmDismission.ReadWrite"))["status"] == "toAdmin"
    assert lab.sandbox.approve_admin_requests() == 1
    for status in ("cancel", "failed", "toAdmin"):
        lab.sandbox.open_auth_status = status  # type: ignore[assignment]
        assert await ask(type="0", rpcScope="Contact.User.Read") == {"status": status, "result": None}


async def test_open_auth_asks_for_consent_when_not_automatic(make_lab: LabFactory) -> None:
    async with make_lab(auto_consent=False) as lab:
        url = lab.urls["api"] + "/_sandbox/jsapi/open_auth"
        body = {"type": "0", "clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "rpcScope": "Contact.User.Read"}
        assert (await lab.http.post(url, json=body)).json() == {"consent_required": True,
                                                                "scopes": ["Contact.User.Read"]}
        assert (await lab.http.post(url, json={**body, "consent": False})).json()["status"] == "cancel"
        assert (await lab.http.post(url, json={**body, "consent": True})).json()["status"] == "ok"


def test_fake_jssdk_is_es5() -> None:
    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", _FAKE_JSSDK, flags=re.S)
    for pattern in (r"=>", r"\blet\s", r"\bconst\s", r"\basync\b", r"\bawait\b", r"`", r"\bclass\s"):
        assert not re.search(pattern, source), pattern


async def test_fake_jssdk_is_served_with_its_endpoints_and_mode(lab: Lab) -> None:
    lab.sandbox.jsapi_mode = "old_sdk"
    script = await lab.http.get(lab.urls["api"] + "/_sandbox/dingtalk.open.js")
    assert script.headers["content-type"].startswith("application/javascript")
    assert f'"{lab.urls["api"]}/_sandbox/jsapi/code"' in script.text and '"old_sdk"' in script.text


# -- HTTP event callbacks ---------------------------------------------------------------------


def receiver(reply: Callable[[CallbackCrypto, dict[str, Any]], Any], seen: list[dict[str, Any]]) -> Starlette:
    """A callback endpoint that decrypts what it gets and answers ``reply(crypto, event)``."""
    crypto = CallbackCrypto(DingTalkSandbox().callback_token, DingTalkSandbox().callback_aes_key, SANDBOX_SUITE_KEY)

    async def events(request: Request) -> JSONResponse:
        query = request.query_params
        body = await request.json()
        event = crypto.open_json(query["signature"], query["timestamp"], query["nonce"], body["encrypt"])
        seen.append(event)
        return JSONResponse(reply(crypto, event))

    return Starlette(routes=[Route("/events", events, methods=["POST"])])


async def test_suite_ticket_pushes_are_encrypted_and_the_reply_is_checked(lab: Lab) -> None:
    seen: list[dict[str, Any]] = []
    good = receiver(lambda crypto, event: crypto.encrypted_map("success"), seen)
    bad = receiver(lambda crypto, event: crypto.encrypted_map("ok"), seen)
    plain = receiver(lambda crypto, event: {"result": "success"}, seen)
    async with serve_apps({"good": good, "bad": bad, "plain": plain}) as urls:
        before = lab.sandbox.suite_ticket
        result = await lab.sandbox.push_suite_ticket(urls["good"] + "/events")
        assert result.ok and lab.sandbox.suite_ticket != before
        assert seen[-1]["EventType"] == "suite_ticket" and seen[-1]["SuiteTicket"] == lab.sandbox.suite_ticket
        assert seen[-1]["SuiteKey"] == SANDBOX_SUITE_KEY and isinstance(seen[-1]["TimeStamp"], int)
        for name in ("bad", "plain"):
            failed = await lab.sandbox.push_suite_ticket(urls[name] + "/events", rotate=False)
            assert not failed.ok and failed.error.startswith("71009")
        # Through the admin API, as the console's "重新推送" button.
        lab.sandbox.callback_url = urls["good"] + "/events"
        pushed = await lab.http.post(lab.urls["api"] + "/_sandbox/suite_ticket", json={})
        assert pushed.json()["ok"] is True
        checked = await lab.http.post(lab.urls["oapi"] + "/_sandbox/check_url", json={})
        assert checked.json()["ok"] is True and seen[-1] == {"EventType": "check_url"}
    stats = lab.sandbox.stats
    assert (stats["callback_push"], stats["callback_ok"], stats["callback_failed"]) == (5, 3, 2)
    unreachable = await lab.sandbox.push_suite_ticket("http://127.0.0.1:9/events")
    assert not unreachable.ok and unreachable.error.startswith("unreachable")


# -- faults and the admin API -----------------------------------------------------------------


async def test_faults_take_every_documented_shape(lab: Lab) -> None:
    token = await lab.app_token()
    lab.sandbox.inject_fault("getuserinfo", 90002)
    assert (await lab.getuserinfo(token, "x"))["errcode"] == 90002
    lab.sandbox.inject_fault("getuserinfo", 88, sub_code="")
    assert (await lab.getuserinfo(token, "x"))["sub_code"] == ""
    lab.sandbox.inject_fault("getuserinfo", "ip_block")
    assert (await lab.getuserinfo(token, "x"))["punish"] == "deny"
    lab.sandbox.inject_fault("accessToken", "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    limited = await lab.http.post(lab.urls["api"] + "/v1.0/oauth2/accessToken", json={})
    assert (limited.status_code, limited.json()["code"]) == (403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
    lab.sandbox.inject_fault("accessToken", status=504)
    timeout = await lab.http.post(lab.urls["api"] + "/v1.0/oauth2/accessToken", json={})
    assert timeout.status_code == 504 and "text/html" in timeout.headers["content-type"]
    assert (await lab.getuserinfo(token, "x"))["errcode"] == 40078  # faults were used up


async def test_admin_api(lab: Lab) -> None:
    base = lab.urls["oapi"] + "/_sandbox"
    assert (await lab.http.post(base + "/faults", json={"endpoint": "getuserinfo", "code": 90018,
                                                        "times": 2})).status_code == 204
    assert (await lab.getuserinfo("x", "y"))["errcode"] == 90018
    assert (await lab.http.delete(base + "/faults")).status_code == 204
    assert (await lab.http.post(base + "/faults", json={"code": 1})).status_code == 400
    stats = (await lab.http.get(base + "/stats")).json()
    assert stats["getuserinfo"] == 1
    user = await lab.http.post(base + "/current_user", json={"userid": ALICE.userid})
    assert user.json() == {"userid": ALICE.userid, "name": "Alice Smith", "corp_id": OTHER_CORP_ID}
    assert (await lab.http.post(base + "/current_user", json={"userid": "nobody"})).status_code == 404
    assert (await lab.http.post(base + "/jsapi_mode", json={"mode": "hang"})).json() == {"mode": "hang"}
    assert (await lab.http.post(base + "/jsapi_mode", json={"mode": "x"})).status_code == 400
    assert (await lab.http.post(base + "/open_auth_status", json={"status": "toAdmin"})).json() == {"status": "toAdmin"}
    assert lab.sandbox.open_auth_status == "toAdmin"
    assert (await lab.http.post(base + "/open_auth_status", json={"status": None})).json() == {"status": None}
    assert (await lab.http.post(base + "/open_auth_status", json={"status": "maybe"})).status_code == 400
    assert (await lab.http.post(base + "/suite_ticket", json={})).status_code == 400  # no callback URL yet
    assert (await lab.http.post(base + "/admin_requests/approve")).json() == {"approved": 0}


def test_settings_point_the_plugin_at_the_hosts() -> None:
    sandbox = DingTalkSandbox()
    urls = {"api": "http://a", "oapi": "http://o", "login": "http://l"}
    internal = sandbox.provider_settings(urls)
    assert (internal["client_id"], internal["corp_id"], internal["app_type"]) == (SANDBOX_APP_KEY, SANDBOX_CORP_ID,
                                                                                  "internal")
    assert internal["jssdk_url"] == "" and internal["login_base_url"] == "http://l"
    isv = sandbox.isv_settings(urls)
    assert (isv["client_id"], isv["app_type"], isv["corp_id"]) == (SANDBOX_SUITE_KEY, "isv", None)
    assert len(isv["callback_aes_key"]) == 43
    assert sandbox.demo_settings(urls)["jssdk_url"] == "http://a/_sandbox/dingtalk.open.js"


@contextmanager
def gateway_sandbox_printout() -> Iterator[dict[str, Any]]:
    """Run ``gateway sandbox`` as a user would and yield the ``providers:`` section it printed
    (the YAML comes once every host is up, and ends with a blank line); it runs until the end."""
    process = subprocess.Popen([sys.executable, "-m", "gateway", "sandbox", "--port", str(free_port_block())],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        lines: list[str] = []
        while True:
            line = process.stdout.readline()
            assert line, "gateway sandbox exited before printing its providers section"
            if not line.strip() and any(not seen.startswith("#") for seen in lines):
                break
            lines.append(line)
        yield dict(yaml.safe_load("".join(line for line in lines if not line.startswith("#")))["providers"])
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_gateway_sandbox_prints_an_isv_entry_that_signs_in_as_printed() -> None:
    with gateway_sandbox_printout() as providers:
        isv = providers["dingtalk-isv"]
        assert (isv["plugin"], isv["app_type"], isv["corp_id"]) == ("dingtalk", "isv", None)
        # Literal values, nothing to fill in: the SuiteKey, SuiteSecret, a seed ticket and the callback crypto.
        assert (isv["client_id"], isv["client_secret"]) == (SANDBOX_SUITE_KEY, SANDBOX_SUITE_SECRET)
        assert isinstance(isv["suite_ticket"], str) and isv["suite_ticket"] and "$" not in isv["suite_ticket"]
        assert len(isv["callback_aes_key"]) == 43 and isv["callback_token"]
        assert providers["dingtalk"]["app_type"] == "internal"  # the internal app stays as it was

        async with httpx.AsyncClient(timeout=10) as http:
            # The printed values get a corp token from the running emulator...
            corp = await http.post(isv["api_base_url"] + "/v1.0/oauth2/corpAccessToken", json={
                "suiteKey": isv["client_id"], "suiteSecret": isv["client_secret"], "authCorpId": SANDBOX_CORP_ID,
                "suiteTicket": isv["suite_ticket"]})
            assert corp.status_code == 200 and corp.json()["accessToken"], corp.text

            # ...and a gateway configured with the entry exactly as printed signs a user in (the
            # browser OAuth of a third-party app: the organisation from the app's URL, the corp token).
            port = free_port()
            config = GatewayConfig(public_url=f"http://127.0.0.1:{port}",
                                   session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
                                   providers={"dingtalk-isv": isv})
            gateway = AuthGateway(echo_app(), config)
            try:
                async with serve_apps({"gateway": gateway}, port=port) as urls, httpx.AsyncClient(
                        base_url=urls["gateway"], headers={"user-agent": BROWSER_UA}, timeout=10) as browser:
                    answer = await browser.get(f"/app?corpid={SANDBOX_CORP_ID}", headers=HTML, follow_redirects=True)
                    assert answer.status_code == 200, answer.text
                    received = headers_of(answer)
                    assert received["x-auth-provider"] == ["dingtalk-isv"]
                    assert received["x-auth-user"] == [ZHANG.userid] and received["x-auth-tenant"] == [SANDBOX_CORP_ID]
            finally:
                await gateway.aclose()
            stats = (await http.get(isv["api_base_url"] + "/_sandbox/stats")).json()
            assert stats["corpAccessToken"] >= 2  # the gateway's own, with the seeded ticket


# -- what the demo tour drives: approvals, consent, expiry, the timeline ------------------------


async def test_an_approved_to_admin_request_goes_through_on_the_next_sign_in(lab: Lab) -> None:
    base = lab.urls["login"] + "/_sandbox"
    url = lab.urls["api"] + "/_sandbox/jsapi/open_auth"
    body = {"type": "1", "clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "rpcScope": ".default",
            "fieldScope": ""}
    lab.sandbox.set_current_user(LISI.userid)  # a member, not an administrator
    assert (await lab.http.post(base + "/app_grants/revoke")).json() == {"revoked": True}
    for _ in range(2):  # asking again before anyone answers: still waiting, one request
        assert (await lab.http.post(url, json=body)).json() == {"status": "toAdmin", "result": None}
    waiting = (await lab.http.get(base + "/admin_requests")).json()
    assert [(item["requested_by"], item["approved"]) for item in waiting] == [(LISI.userid, False)]
    assert (await lab.http.post(base + "/admin_requests/approve")).json() == {"approved": 1}
    assert (await lab.http.post(url, json=body)).json() == {"status": "ok", "result": None}
    assert lab.sandbox.app_permissions_granted(SANDBOX_CORP_ID) == set(APP_PERMISSIONS)
    # Another organisation has granted nothing: its members still wait.
    lab.sandbox.set_current_user(ALICE.userid)
    other = {**body, "clientId": SANDBOX_SUITE_KEY, "corpId": OTHER_CORP_ID}
    assert (await lab.http.post(url, json=other)).json()["status"] == "toAdmin"
    kinds = [event["kind"] for event in (await lab.http.get(base + "/events")).json()["events"]]
    assert kinds.count("approval") == 4  # three toAdmin answers and one approval


async def test_a_refusing_user_says_no_on_the_login_page_and_in_the_component(lab: Lab) -> None:
    base = lab.urls["api"] + "/_sandbox"
    assert (await lab.http.post(base + "/user_consent", json={"mode": "deny"})).json() == {"mode": "deny"}
    login = await lab.http.get(lab.urls["login"] + "/oauth2/auth", params={
        "client_id": SANDBOX_APP_KEY, "redirect_uri": REDIRECT, "response_type": "code", "scope": "openid",
        "prompt": "consent", "state": "s1"})
    assert login.status_code == 302
    assert parse_qs(urlsplit(login.headers["location"]).query) == {"error": ["access_denied"], "state": ["s1"]}
    user = {"type": "0", "clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "rpcScope": "Contact.User.Read"}
    assert (await lab.http.post(base + "/jsapi/open_auth", json=user)).json() == {"status": "cancel", "result": None}
    kinds = [event["kind"] for event in (await lab.http.get(base + "/events")).json()["events"]]
    assert kinds.count("refused") == 2


async def test_expiring_the_user_tokens_now(lab: Lab) -> None:
    code = lab.sandbox.mint_user_code(scopes=["Contact.User.Read"])
    tokens = (await lab.user_token(code=code, grantType="authorization_code")).json()
    assert (await lab.me(tokens["accessToken"])).status_code == 200
    assert (await lab.http.post(lab.urls["oapi"] + "/_sandbox/tokens/expire")).json() == {"expired": 1}
    assert (await lab.me(tokens["accessToken"])).json()["code"] == "accesstoken.expired"
    refreshed = await lab.user_token(refreshToken=tokens["refreshToken"], grantType="refresh_token")
    assert refreshed.status_code == 200 and (await lab.me(refreshed.json()["accessToken"])).status_code == 200
    events = (await lab.http.get(lab.urls["api"] + "/_sandbox/events")).json()["events"]
    assert [event["kind"] for event in events if event["kind"] in ("exchange", "refresh", "tokens")] == [
        "exchange", "tokens", "refresh", "tokens"]


async def test_a_withdrawn_permission_is_access_denied_until_an_authorization_asks_again(lab: Lab) -> None:
    """``POST /_sandbox/user_grant`` (the demo's relay page): the person's user tokens are refused
    ``Contact.User.Read`` (403 Forbidden.AccessDenied.AccessTokenPermissionDenied) until openAuth
    or the login page asks for it again."""
    first = (await lab.user_token(code=lab.sandbox.mint_user_code(scopes=["Contact.User.Read"]),
                                  grantType="authorization_code")).json()["accessToken"]
    assert (await lab.me(first)).status_code == 200
    grant = lab.urls["api"] + "/_sandbox/user_grant"
    assert (await lab.http.post(grant, json={"scope": "Contact.User.Read", "granted": False})).status_code == 200
    refused = await lab.me(first)
    assert refused.status_code == 403 and refused.json()["code"] == "Forbidden.AccessDenied.AccessTokenPermissionDenied"
    other = (await lab.user_token(code=lab.sandbox.mint_user_code(scopes=["Contact.User.mobile"]),
                                  grantType="authorization_code")).json()["accessToken"]
    assert (await lab.me(other)).status_code == 403  # an authorization for something else does not give it back
    again = (await lab.user_token(code=lab.sandbox.mint_user_code(scopes=["Contact.User.Read"]),
                                  grantType="authorization_code")).json()["accessToken"]
    assert (await lab.me(again)).status_code == 200 and (await lab.me(first)).status_code == 200
    unknown = await lab.http.post(grant, json={"scope": "Mail.Read", "granted": False})
    assert unknown.status_code == 404 and "Mail.Read" in unknown.json()["error"]


async def test_the_tours_approval_endpoints_make_a_member_wait_for_an_administrator(lab: Lab) -> None:
    """``/_sandbox/tour/approval`` on: the member 李四 signs in, in an organisation that has not
    granted the app's permissions, so openAuth type 1 answers toAdmin; ``tour/answer`` approves
    (DingTalk's administrator cannot refuse: 409 with a code); off: the administrator again."""
    tour = lab.urls["oapi"] + "/_sandbox/tour"
    url = lab.urls["api"] + "/_sandbox/jsapi/open_auth"
    body = {"type": "1", "clientId": SANDBOX_APP_KEY, "corpId": SANDBOX_CORP_ID, "rpcScope": ".default",
            "fieldScope": ""}
    assert (await lab.http.get(tour + "/approval")).json() == {"status": ""}
    assert (await lab.http.post(tour + "/approval", json={"on": True})).json() == {"status": ""}
    assert lab.sandbox.current_user == LISI.userid
    assert (await lab.http.post(url, json=body)).json() == {"status": "toAdmin", "result": None}
    assert (await lab.http.get(tour + "/approval")).json() == {"status": "1 waiting"}
    refused = await lab.http.post(tour + "/answer", json={"answer": "rejected"})
    assert refused.status_code == 409 and refused.json()["error"] == "answer_not_possible"
    assert (await lab.http.post(tour + "/answer", json={"answer": "approved"})).json() == {"status": "approved"}
    assert (await lab.http.post(url, json=body)).json() == {"status": "ok", "result": None}
    assert (await lab.http.post(tour + "/approval", json={"on": False})).status_code == 200
    assert lab.sandbox.current_user == ZHANG.userid


@pytest.mark.parametrize(("path", "body", "code"), [
    ("approval", {"on": 1}, "bad_switch"), ("approval", "on", "bad_switch"),
    ("answer", {"answer": "approve"}, "bad_answer"), ("answer", {"answer": None}, "bad_answer"),
])
async def test_the_tours_approval_endpoints_refuse_bad_input(lab: Lab, path: str, body: Any, code: str) -> None:
    answer = await lab.http.post(lab.urls["login"] + f"/_sandbox/tour/{path}", json=body)
    assert answer.status_code == 400 and answer.json()["error"] == code and answer.json()["message"]
    assert lab.sandbox.current_user == ZHANG.userid


def test_the_tour_entries_and_the_bridges_consent_key() -> None:
    entries = DingTalkSandbox().demo_tour()
    assert [(entry.provider, entry.next_path) for entry in entries] == [
        ("dingtalk", "/"), ("dingtalk-isv", f"/?corpid={SANDBOX_CORP_ID}")]
    assert all(entry.has_approval and not entry.admin_can_refuse for entry in entries)
    # The tour forgets what the bridge remembers: the prefix is the bridge's own.
    bridge = (Path(__file__).parents[1] / "plugins" / "dingtalk" / "bridge.js").read_text()
    assert f'CONSENT_KEY = "{BRIDGE_CONSENT_KEY_PREFIX}"' in bridge
    assert all(entry.forget_storage == (BRIDGE_CONSENT_KEY_PREFIX,) for entry in entries)
