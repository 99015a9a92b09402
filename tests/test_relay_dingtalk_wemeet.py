"""The relay against the DingTalk and Tencent Meeting emulators on real sockets: each provider's
way of carrying the token (exact header case included), refresh-and-retry once, DingTalk's
missing-permission answer as consent_required, the corp token on oapi (docs/relay.md)."""

from __future__ import annotations

import asyncio
import json

from plugins.dingtalk.sandbox import SANDBOX_CORP_ID, DingTalkSandbox
from plugins.wemeet.sandbox import WeMeetSandbox
from tests._relay import relay_gateway, served, sign_in

ME = "/_gateway/api/dingtalk/v1.0/contact/users/me"
STAFF = "/_gateway/api/dingtalk/topapi/user/listid"
DINGTALK_ROUTES = [
    {"provider": "dingtalk", "path": "v1.0/contact/users/*"},
    {"provider": "dingtalk", "path": "topapi/user/listid", "methods": ["POST"], "token": "app"},
    {"provider": "dingtalk", "path": "topapi/user/listid-with-a-user-token", "methods": ["POST"]},
]
MEETINGS = "/_gateway/api/wemeet/v1/meetings"
WEMEET_ROUTES = [{"provider": "wemeet", "path": "v1/meetings"}, {"provider": "wemeet", "path": "v1/x", "token": "app"}]


async def test_dingtalk_user_token_rides_in_its_header_and_is_refreshed_once_when_refused() -> None:
    sandbox = DingTalkSandbox()
    async with served(sandbox) as urls, relay_gateway(
            "dingtalk", sandbox.provider_settings(urls), DINGTALK_ROUTES) as running, running.client() as client:
        await sign_in(client)
        running.sent.clear()
        answer = await client.get(ME)
        assert answer.status_code == 200, answer.text
        assert answer.json()["unionId"]
        (call,) = running.to("/v1.0/contact/users/me")
        assert call.headers["x-acs-dingtalk-access-token"] and "access_token" not in call.url.params
        assert "authorization" not in call.headers
        sandbox.expire_access_tokens()  # the emulator now answers 400 accesstoken.expired
        before = sandbox.stats["refresh_token"]
        answers = await asyncio.gather(*(client.get(ME) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert sandbox.stats["refresh_token"] - before == 1


async def test_dingtalk_missing_permission_is_consent_required() -> None:
    sandbox = DingTalkSandbox()
    async with served(sandbox) as urls, relay_gateway(
            "dingtalk", sandbox.provider_settings(urls), DINGTALK_ROUTES) as running, running.client() as client:
        await sign_in(client)
        sandbox.delegated_permissions.discard("Contact.User.Read")  # 403 AccessTokenPermissionDenied
        answer = await client.get(ME)
        assert answer.status_code == 403, answer.text
        body = answer.json()
        assert body["error"] == "consent_required" and body["provider"] == "dingtalk"
        assert body["consent_url"].startswith("/_gateway/consent?provider=dingtalk&scopes=")


async def test_dingtalk_staff_list_with_the_corp_token_on_oapi() -> None:
    sandbox = DingTalkSandbox()
    async with served(sandbox) as urls, relay_gateway(
            "dingtalk", sandbox.provider_settings(urls), DINGTALK_ROUTES) as running, running.client() as client:
        await sign_in(client)
        running.sent.clear()
        answer = await client.post(STAFF, json={"dept_id": 1}, headers={"origin": running.url})
        assert answer.status_code == 200, answer.text
        assert answer.json()["errcode"] == 0 and "zhangsan01" in answer.json()["result"]["userid_list"]
        (call,) = running.to("/topapi/user/listid")
        assert call.url.params["access_token"] and "x-acs-dingtalk-access-token" not in call.headers
        assert json.loads(call.content) == {"dept_id": 1}  # the body passed as sent
        # The corp token expires early: refused (88/42001), fetched again once, the call retried.
        for token in sandbox._app_tokens.values():
            token.expires_at = 0
        fetched = sandbox.stats["accessToken"]
        answer = await client.post(STAFF, json={"dept_id": 1}, headers={"origin": running.url})
        assert answer.status_code == 200 and answer.json()["errcode"] == 0, answer.text
        assert sandbox.stats["accessToken"] - fetched == 1
        assert SANDBOX_CORP_ID  # the internal app's own organisation


async def test_dingtalk_oapi_with_a_user_token_is_a_misconfigured_route() -> None:
    sandbox = DingTalkSandbox()
    async with served(sandbox) as urls, relay_gateway(
            "dingtalk", sandbox.provider_settings(urls), DINGTALK_ROUTES) as running, running.client() as client:
        await sign_in(client)
        running.sent.clear()
        answer = await client.post(f"{STAFF}-with-a-user-token", json={}, headers={"origin": running.url})
        assert answer.status_code == 502 and answer.json()["error"] == "relay_misconfigured"
        assert running.sent == []


async def test_wemeet_headers_in_their_exact_case_and_one_refresh_on_190303() -> None:
    sandbox = WeMeetSandbox()
    async with served(sandbox) as urls, relay_gateway(
            "wemeet", sandbox.provider_settings(urls), WEMEET_ROUTES) as running, running.client() as client:
        await sign_in(client)
        me = (await client.get("/_gateway/me")).json()
        running.sent.clear()
        params = {"operator_id": me["user"], "operator_id_type": "2", "instanceid": "1"}
        answer = await client.get(MEETINGS, params=params, headers={"AccessToken": "the-callers", "OpenId": "x"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["meeting_info_list"][0]["meeting_code"] == "806123456"
        (call,) = running.to("/v1/meetings")
        names = [name for name, _ in call.headers.raw]
        for exact in (b"AccessToken", b"OpenId", b"X-TC-Timestamp", b"X-TC-Nonce"):
            assert names.count(exact) == 1, names  # as the server reads them: case-sensitively
        assert call.headers["accesstoken"] != "the-callers" and call.headers["openid"] == me["user"]
        sandbox.expire_access_tokens()  # 190303 now
        before = sandbox.stats["refresh_token"]
        answer = await client.get(MEETINGS, params=params)
        assert answer.status_code == 200, answer.text
        assert sandbox.stats["refresh_token"] - before == 1
        # WeMeet OAuth apps have no app token: such a route cannot work.
        answer = await client.get("/_gateway/api/wemeet/v1/x")
        assert answer.status_code == 502 and answer.json()["error"] == "relay_misconfigured"
