"""The Lark / Feishu emulator is strict: each rule of the fact sheet, checked over real HTTP.

The two hosts are served by uvicorn on loopback (as ``gateway sandbox`` serves them); the clock
knob moves time instead of sleeping. Status codes and error codes are the provider's documented
ones (``docs/providers/lark.md`` and the sources it lists).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import shutil
import subprocess
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
from plugins.lark.provider import LarkProvider, LarkSettings
from plugins.lark.sandbox import DEFAULT_USERS, LarkSandbox
from tests.conftest import Clock

REDIRECT_URI = "https://app.example.com/_gateway/callback/lark"
ZHANG = DEFAULT_USERS[0]


@dataclass
class Lab:
    """One served sandbox: its object, clock, base URLs and an HTTP client."""

    sandbox: LarkSandbox
    clock: Clock
    urls: dict[str, str]
    http: httpx.AsyncClient

    @property
    def token_url(self) -> str:
        return self.urls["open"] + "/open-apis/authen/v2/oauth/token"

    @property
    def v3_token_url(self) -> str:
        return self.urls["accounts"] + "/oauth/v3/token"

    def client_fields(self) -> dict[str, str]:
        return {"client_id": self.sandbox.app_id, "client_secret": self.sandbox.app_secret}

    async def exchange(self, code: str, url: str | None = None, **extra: str) -> httpx.Response:
        body = {"grant_type": "authorization_code", "code": code, **self.client_fields(), **extra}
        return await self.http.post(url or self.token_url, json=body)

    async def refresh(self, refresh_token: str, url: str | None = None) -> httpx.Response:
        body = {"grant_type": "refresh_token", "refresh_token": refresh_token, **self.client_fields()}
        return await self.http.post(url or self.token_url, json=body)

    async def authorize(self, **params: str) -> httpx.Response:
        query = {
            "client_id": self.sandbox.app_id,
            "response_type": "code",
            "redirect_uri": REDIRECT_URI,
            "scope": "offline_access",
            "state": "st4te",
            **params,
        }
        return await self.http.get(self.urls["accounts"] + "/open-apis/authen/v1/authorize", params=query)

    async def browser_code(self, **params: str) -> str:
        answer = await self.authorize(**params)
        assert answer.status_code == 302, answer.text
        return parse_qs(urlsplit(answer.headers["location"]).query)["code"][0]

    async def user_info(self, access_token: str) -> httpx.Response:
        headers = {"Authorization": f"Bearer {access_token}"}
        return await self.http.get(self.urls["open"] + "/open-apis/authen/v1/user_info", headers=headers)


LabFactory = Callable[..., AbstractAsyncContextManager[Lab]]


@pytest.fixture
async def make_lab() -> AsyncIterator[LabFactory]:
    """Serve a sandbox built with the given knobs; everything stops at the end of the test."""
    async with contextlib.AsyncExitStack() as stack:

        @contextlib.asynccontextmanager
        async def build(**knobs: Any) -> AsyncIterator[Lab]:
            clock = Clock()
            sandbox = LarkSandbox(clock=clock, **knobs)
            urls = await stack.enter_async_context(serve_apps(sandbox.hosts()))
            sandbox.provider_settings(urls)  # tells the fake JSSDK where the accounts host is
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
            yield Lab(sandbox, clock, urls, http)

        yield build


@pytest.fixture
async def lab(make_lab: LabFactory) -> AsyncIterator[Lab]:
    async with make_lab() as built:
        yield built


def assert_lark_error(answer: httpx.Response, code: int, status: int = 400) -> dict[str, Any]:
    """The token endpoint's error shape: ``{code, error, error_description}`` with its status."""
    assert answer.status_code == status, answer.text
    body: dict[str, Any] = answer.json()
    assert body["code"] == code
    assert body["error"] and body["error_description"]
    return body


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


# -- authorization codes -----------------------------------------------------------------------


async def test_codes_are_single_use(lab: Lab) -> None:
    code = await lab.browser_code()
    first = await lab.exchange(code, redirect_uri=REDIRECT_URI)
    assert first.status_code == 200 and first.json()["code"] == 0
    assert_lark_error(await lab.exchange(code, redirect_uri=REDIRECT_URI), 20065)
    assert_lark_error(await lab.exchange("never-issued", redirect_uri=REDIRECT_URI), 20003)


@pytest.mark.parametrize(("api", "ttl"), [("browser", 300), ("requestAccess", 180), ("requestAuthCode", 300)])
async def test_codes_expire_after_their_documented_lifetime(lab: Lab, api: str, ttl: int) -> None:
    async def new_code() -> str:
        return await lab.browser_code() if api == "browser" else lab.sandbox.mint_client_code(api)  # type: ignore[arg-type]

    extra = {"redirect_uri": REDIRECT_URI} if api == "browser" else {}
    still_fresh, too_late = await new_code(), await new_code()
    lab.clock.advance(ttl - 1)
    assert (await lab.exchange(still_fresh, **extra)).status_code == 200
    lab.clock.advance(1)
    assert_lark_error(await lab.exchange(too_late, **extra), 20004)


async def test_pkce_is_verified_and_a_failed_check_does_not_burn_the_code(lab: Lab) -> None:
    verifier, challenge = pkce_pair()
    code = await lab.browser_code(code_challenge=challenge, code_challenge_method="S256")
    assert_lark_error(await lab.exchange(code, redirect_uri=REDIRECT_URI, code_verifier="x" * 43), 20049)
    assert_lark_error(await lab.exchange(code, redirect_uri=REDIRECT_URI), 20049)  # verifier missing
    assert (await lab.exchange(code, redirect_uri=REDIRECT_URI, code_verifier=verifier)).status_code == 200


async def test_pkce_method_defaults_to_plain(lab: Lab) -> None:
    verifier = "v" * 43
    code = await lab.browser_code(code_challenge=verifier)  # no method: Lark's default is plain
    assert (await lab.exchange(code, redirect_uri=REDIRECT_URI, code_verifier=verifier)).status_code == 200


async def test_browser_codes_are_bound_to_their_redirect_uri(lab: Lab) -> None:
    code = await lab.browser_code()
    assert_lark_error(await lab.exchange(code, redirect_uri=REDIRECT_URI + "/other"), 20071)
    assert_lark_error(await lab.exchange(code), 20071)
    assert (await lab.exchange(code, redirect_uri=REDIRECT_URI)).status_code == 200
    # In-client codes were never bound to a redirect_uri.
    assert (await lab.exchange(lab.sandbox.mint_client_code())).status_code == 200


async def test_client_authentication_rules(lab: Lab) -> None:
    code = lab.sandbox.mint_client_code()
    basic = base64.b64encode(f"{lab.sandbox.app_id}:{lab.sandbox.app_secret}".encode()).decode()
    both = await lab.http.post(
        lab.token_url,
        json={"grant_type": "authorization_code", "code": code, **lab.client_fields()},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert_lark_error(both, 20070)
    wrong = await lab.http.post(
        lab.token_url,
        json={"grant_type": "authorization_code", "code": code, "client_id": lab.sandbox.app_id, "client_secret": "x"},
    )
    assert_lark_error(wrong, 20002)
    basic_only = await lab.http.post(
        lab.token_url,
        json={"grant_type": "authorization_code", "code": code},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert basic_only.status_code == 200
    assert_lark_error(await lab.http.post(lab.token_url, json={"grant_type": "password", **lab.client_fields()}), 20036)
    assert_lark_error(await lab.http.post(lab.token_url, content=b"{not json"), 20063)


async def test_form_encoded_token_requests_work(lab: Lab) -> None:
    body = {"grant_type": "authorization_code", "code": lab.sandbox.mint_client_code(), **lab.client_fields()}
    answer = await lab.http.post(lab.token_url, data=body)
    assert answer.status_code == 200 and answer.json()["token_type"] == "Bearer"


# -- refresh tokens ------------------------------------------------------------------------------


async def test_refresh_tokens_rotate_and_a_used_one_is_revoked(lab: Lab) -> None:
    first = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    second = await lab.refresh(first["refresh_token"])
    assert second.status_code == 200
    rotated = second.json()
    assert rotated["refresh_token"] != first["refresh_token"]
    assert rotated["access_token"] != first["access_token"]
    reused = assert_lark_error(await lab.refresh(first["refresh_token"]), 20064)
    assert reused["error"] == "invalid_grant" and "only be used once" in reused["error_description"]
    assert (await lab.refresh(rotated["refresh_token"])).status_code == 200
    assert (lab.sandbox.stats["refresh_token"], lab.sandbox.stats["authorization_code"]) == (3, 1)


async def test_replaced_access_token_keeps_60_seconds_of_grace(lab: Lab) -> None:
    first = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    rotated = (await lab.refresh(first["refresh_token"])).json()
    lab.clock.advance(59)
    assert (await lab.user_info(first["access_token"])).json()["code"] == 0
    lab.clock.advance(1)
    dead = await lab.user_info(first["access_token"])
    assert (dead.status_code, dead.json()["code"]) == (200, 20005)
    assert (await lab.user_info(rotated["access_token"])).json()["code"] == 0


async def test_access_tokens_expire(make_lab: LabFactory) -> None:
    async with make_lab(access_ttl_s=600) as lab:
        tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
        assert tokens["expires_in"] == 600
        lab.clock.advance(600)
        assert (await lab.user_info(tokens["access_token"])).json()["code"] == 99991677


async def test_refresh_tokens_expire_and_stop_a_year_after_authorization(make_lab: LabFactory) -> None:
    async with make_lab(refresh_ttl_s=300 * 86400) as lab:
        tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
        lab.clock.advance(200 * 86400)
        tokens = (await lab.refresh(tokens["refresh_token"])).json()
        assert tokens["refresh_token_expires_in"] == 165 * 86400  # capped by the 365-day rule
        lab.clock.advance(165 * 86400)
        body = assert_lark_error(await lab.refresh(tokens["refresh_token"]), 20037)
        assert body["error"] == "invalid_grant"


async def test_no_offline_access_no_refresh_token(lab: Lab) -> None:
    code = await lab.browser_code(scope="")
    tokens = (await lab.exchange(code, redirect_uri=REDIRECT_URI)).json()
    assert "refresh_token" not in tokens and "refresh_token_expires_in" not in tokens
    assert tokens["access_token"] and tokens["expires_in"] == 7200


async def test_refresh_switch_off_answers_20074(make_lab: LabFactory) -> None:
    async with make_lab(refresh_enabled=False) as lab:
        tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
        assert_lark_error(await lab.refresh(tokens["refresh_token"]), 20074)


async def test_v3_endpoint_accepts_v2_tokens_but_not_the_reverse(lab: Lab) -> None:
    from_v2 = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    from_v3 = (await lab.refresh(from_v2["refresh_token"], url=lab.v3_token_url)).json()
    assert from_v3["code"] == 0 and from_v3["refresh_token"]
    assert_lark_error(await lab.refresh(from_v3["refresh_token"]), 20026)  # v2 takes v2-issued tokens only
    code = await lab.browser_code()
    assert (await lab.exchange(code, url=lab.v3_token_url, redirect_uri=REDIRECT_URI)).json()["code"] == 0
    assert lab.sandbox.stats["token_v3"] == 2


# -- user_info -----------------------------------------------------------------------------------


async def test_user_info_fields_and_errors(make_lab: LabFactory) -> None:
    async with make_lab(enabled_scopes=["offline_access"]) as lab:
        tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
        data = (await lab.user_info(tokens["access_token"])).json()["data"]
        assert (data["open_id"], data["union_id"], data["tenant_key"], data["name"]) == (
            ZHANG.open_id, ZHANG.union_id, ZHANG.tenant_key, "张三",
        )
        assert "user_id" not in data and "email" not in data  # their scopes are not enabled
        missing = await lab.http.get(lab.urls["open"] + "/open-apis/authen/v1/user_info")
        assert missing.json()["code"] == 99991661 and missing.status_code == 400
        bogus = await lab.user_info("u-bogus")
        assert (bogus.status_code, bogus.json()["code"]) == (200, 20005)


async def test_user_info_has_user_id_when_its_scope_is_enabled(lab: Lab) -> None:
    tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    assert (await lab.user_info(tokens["access_token"])).json()["data"]["user_id"] == ZHANG.user_id


async def test_users_outside_the_availability_scope_or_inactive_are_refused(make_lab: LabFactory) -> None:
    hidden = dataclasses.replace(DEFAULT_USERS[1], visible=False)
    async with make_lab(users=[ZHANG, hidden]) as lab:
        assert_lark_error(await lab.exchange(lab.sandbox.mint_client_code(open_id=hidden.open_id)), 20010)
        url = lab.urls["accounts"] + "/_sandbox/jsapi/code"
        lab.sandbox.set_current_user(hidden.open_id)
        not_visible = await lab.http.post(url, json={"api": "requestAuthCode", "appId": lab.sandbox.app_id})
        assert not_visible.json()["errCode"] == 10228
        # Zhang leaves the company after signing in: user_info and the token endpoint both notice.
        tokens = (await lab.exchange(lab.sandbox.mint_client_code(open_id=ZHANG.open_id))).json()
        lab.sandbox.users[ZHANG.open_id] = dataclasses.replace(ZHANG, status="resigned")
        assert (await lab.user_info(tokens["access_token"])).json()["code"] == 20021
        assert_lark_error(await lab.refresh(tokens["refresh_token"]), 20066)


async def test_revoke_kills_every_token_of_the_user(lab: Lab) -> None:
    tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    lab.sandbox.revoke(ZHANG.open_id)
    assert_lark_error(await lab.refresh(tokens["refresh_token"]), 20064)
    assert (await lab.user_info(tokens["access_token"])).json()["code"] == 20005


# -- app and tenant tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["app", "tenant"])
async def test_app_tokens_accept_json_without_content_type_and_follow_the_reissue_rule(lab: Lab, kind: str) -> None:
    url = f"{lab.urls['open']}/open-apis/auth/v3/{kind}_access_token/internal"
    payload = json.dumps({"app_id": lab.sandbox.app_id, "app_secret": lab.sandbox.app_secret}).encode()

    async def call() -> dict[str, Any]:
        answer = await lab.http.post(url, content=payload)  # bytes: httpx sends no Content-Type
        assert "content-type" not in answer.request.headers
        assert answer.status_code == 200
        body: dict[str, Any] = answer.json()
        assert body["code"] == 0
        return body

    first = await call()
    assert first["expire"] == 7200
    lab.clock.advance(5400)  # 30 min left: still the same token
    again = await call()
    assert again[f"{kind}_access_token"] == first[f"{kind}_access_token"] and again["expire"] == 1800
    lab.clock.advance(1)  # under 30 min left: a new one
    fresh = await call()
    assert fresh[f"{kind}_access_token"] != first[f"{kind}_access_token"] and fresh["expire"] == 7200
    if kind == "app":
        assert fresh["tenant_access_token"].startswith("t-")


async def test_app_token_errors(lab: Lab) -> None:
    url = lab.urls["open"] + "/open-apis/auth/v3/tenant_access_token/internal"
    wrong = await lab.http.post(url, json={"app_id": lab.sandbox.app_id, "app_secret": "nope"})
    assert wrong.json()["code"] == 10015
    assert (await lab.http.post(url, json={"app_id": lab.sandbox.app_id})).json()["code"] == 10003
    assert (await lab.http.post(url, json={"app_id": "cli_other", "app_secret": "x"})).json()["code"] == 10014


# -- the authorize page --------------------------------------------------------------------------


async def test_consent_page_deny_and_allow(make_lab: LabFactory) -> None:
    async with make_lab(auto_consent=False) as lab:
        page = await lab.authorize(state="abc")
        assert page.status_code == 200 and "Allow" in page.text and "Deny" in page.text
        ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
        assert ticket is not None
        consent = lab.urls["accounts"] + "/_sandbox/consent"
        denied = await lab.http.post(consent, data={"ticket": ticket.group(1), "decision": "deny"})
        assert denied.status_code == 302
        assert parse_qs(urlsplit(denied.headers["location"]).query) == {"error": ["access_denied"], "state": ["abc"]}
        replay = await lab.http.post(consent, data={"ticket": ticket.group(1), "decision": "allow"})
        assert replay.status_code == 400  # a ticket is used once

        page = await lab.authorize(state="def")
        ticket = re.search(r'name="ticket" value="([^"]+)"', page.text)
        assert ticket is not None
        allowed = await lab.http.post(consent, data={"ticket": ticket.group(1), "decision": "allow"})
        query = parse_qs(urlsplit(allowed.headers["location"]).query)
        assert query["state"] == ["def"]
        assert (await lab.exchange(query["code"][0], redirect_uri=REDIRECT_URI)).status_code == 200


async def test_authorize_page_errors(make_lab: LabFactory) -> None:
    async with make_lab(redirect_uris=[REDIRECT_URI], enabled_scopes=["offline_access"]) as lab:
        unregistered = await lab.authorize(redirect_uri="https://evil.example/cb")
        assert unregistered.status_code == 400 and "20029" in unregistered.text
        assert "location" not in unregistered.headers
        assert "20027" in (await lab.authorize(scope="offline_access calendar:calendar")).text
        assert "20048" in (await lab.authorize(client_id="cli_unknown")).text
        assert (await lab.authorize(redirect_uri=REDIRECT_URI + "?x=1")).status_code == 302  # query ignored


async def test_a_redirect_uri_fragment_ends_up_after_the_query(lab: Lab) -> None:
    answer = await lab.authorize(redirect_uri="https://app.example.com/cb#/route")
    location = urlsplit(answer.headers["location"])
    assert location.fragment == "/route" and "code=" in location.query


# -- the simulated client -------------------------------------------------------------------------


async def test_jsapi_code_endpoint_speaks_cors(lab: Lab) -> None:
    url = lab.urls["accounts"] + "/_sandbox/jsapi/code"
    preflight = await lab.http.options(
        url,
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    answer = await lab.http.post(
        url,
        json={"api": "requestAccess", "appID": lab.sandbox.app_id, "scopeList": ["offline_access"], "state": "s"},
        headers={"Origin": "https://app.example.com"},
    )
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.json()["state"] == "s"
    assert (await lab.exchange(answer.json()["code"])).json()["refresh_token"]


async def test_jsapi_failures_look_like_the_clients(lab: Lab) -> None:
    url = lab.urls["accounts"] + "/_sandbox/jsapi/code"
    wrong_app = await lab.http.post(url, json={"api": "requestAuthCode", "appId": "cli_other"})
    assert wrong_app.json()["errCode"] == 10200
    lab.sandbox.jsapi_mode = "old_client"
    too_old = await lab.http.post(url, json={"api": "requestAccess", "appID": lab.sandbox.app_id, "scopeList": []})
    assert too_old.json()["errno"] == 103
    # requestAuthCode still works on a client too old for requestAccess.
    fallback = await lab.http.post(url, json={"api": "requestAuthCode", "appId": lab.sandbox.app_id})
    assert fallback.json()["code"]


async def test_admin_api(lab: Lab) -> None:
    admin = lab.urls["open"] + "/_sandbox"
    assert (await lab.http.post(admin + "/faults", json={"endpoint": "token", "code": 20050})).status_code == 204
    failing = await lab.exchange(lab.sandbox.mint_client_code())
    assert_lark_error(failing, 20050, status=500)
    assert failing.json()["error"] == "server_error"
    assert (await lab.exchange(lab.sandbox.mint_client_code())).status_code == 200  # times=1
    stats = (await lab.http.get(admin + "/stats")).json()
    assert stats["token"] == 2 and stats["authorization_code"] == 2
    alice = {"open_id": DEFAULT_USERS[2].open_id}
    switched = await lab.http.post(lab.urls["accounts"] + "/_sandbox/current_user", json=alice)
    assert switched.json()["name"] == "Alice Smith"
    tokens = (await lab.exchange(await lab.browser_code(), redirect_uri=REDIRECT_URI)).json()
    assert (await lab.user_info(tokens["access_token"])).json()["data"]["tenant_key"] == DEFAULT_USERS[2].tenant_key
    assert (await lab.http.post(admin + "/current_user", json={"open_id": "ou_nobody"})).status_code == 404


async def test_rate_limit_fault_carries_the_reset_header(lab: Lab) -> None:
    lab.sandbox.inject_fault("user_info", 99991400)
    answer = await lab.user_info("anything")
    assert answer.status_code == 429 and answer.json()["code"] == 99991400
    assert answer.headers["x-ogw-ratelimit-reset"].isdigit()


# -- the fake JSSDK + the real bridge, run by node against the served sandbox -----------------------

ROOT = Path(__file__).resolve().parents[1]

PAGE_HARNESS = r"""
var fs = require("fs");
global.window = global;
window.confirm = function () { return true; };
var sdk = process.argv[2], bridge = process.argv[3];
fetch(sdk).then(function (r) { return r.text(); }).then(function (source) {
  eval(source);
  eval(fs.readFileSync(bridge, "utf8"));
  var tools = { withTimeout: function (promise, ms, what) {
    return Promise.race([promise, new Promise(function (resolve, reject) {
      setTimeout(function () { reject({ outcome: "fallback", message: what + " did not answer in time" }); }, ms);
    })]);
  } };
  return window.gatewayBridges.lark.requestCode(
    { appId: process.argv[4], scopeList: ["offline_access"], state: "S", timeout_ms: 500 }, tools);
}).then(function (result) { console.log(JSON.stringify({ resolved: result })); },
        function (error) { console.log(JSON.stringify({ rejected: error })); });
"""


def test_fake_jssdk_is_es5() -> None:
    from plugins.lark.sandbox import _FAKE_JSSDK

    source = re.sub(r"/\*.*?\*/|//[^\n]*", "", _FAKE_JSSDK, flags=re.S)
    for pattern in (r"=>", r"\blet\s", r"\bconst\s", r"\basync\b", r"\bawait\b", r"\?\.", r"`", r"\bclass\s"):
        assert not re.search(pattern, source), pattern


async def run_page(lab: Lab, tmp_path: Path) -> dict[str, Any]:
    """Load the sandbox's JSSDK from its URL and the real bridge.js in node; ask for a code."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = tmp_path / "page.js"
    harness.write_text(PAGE_HARNESS)
    sdk_url = lab.urls["open"] + "/_sandbox/h5-js-sdk.js"
    bridge = str(ROOT / "plugins" / "lark" / "bridge.js")
    process = await asyncio.create_subprocess_exec(
        node, str(harness), sdk_url, bridge, lab.sandbox.app_id, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    result: dict[str, Any] = json.loads(stdout)
    return result


@pytest.mark.parametrize(
    ("mode", "api"), [("current", "requestAccess"), ("old_client", "requestAuthCode"), ("old_sdk", "requestAuthCode")]
)
async def test_fake_jssdk_and_bridge_hand_the_provider_a_working_code(
    lab: Lab, tmp_path: Path, mode: str, api: str
) -> None:
    lab.sandbox.jsapi_mode = mode  # type: ignore[assignment]
    result = await run_page(lab, tmp_path)
    assert "resolved" in result, result
    settings = LarkSettings(**lab.sandbox.provider_settings(lab.urls))
    context = ProviderContext(name="lark", redirect_uri=REDIRECT_URI, http=lab.http, store=MemoryStore())
    grant = await LarkProvider(settings, context).redeem(result["resolved"]["code"], flow="client", redirect_uri="")
    assert grant.identity.user == ZHANG.open_id
    assert lab.sandbox.stats["jsapi_code"] >= 1
    # requestAccess asked for offline_access; requestAuthCode grants nothing, so no refresh token.
    assert (grant.tokens.refresh_token is not None) == (api == "requestAccess")


@pytest.mark.parametrize(
    ("mode", "message"),
    [("hang", "h5sdk.ready did not answer in time"), ("sdk_error", "the Feishu JSSDK reported an error")],
)
async def test_fake_jssdk_failures_make_the_bridge_fall_back(
    lab: Lab, tmp_path: Path, mode: str, message: str
) -> None:
    lab.sandbox.jsapi_mode = mode  # type: ignore[assignment]
    rejected = (await run_page(lab, tmp_path))["rejected"]
    assert rejected["outcome"] == "fallback" and rejected["message"].startswith(message)
    assert lab.sandbox.stats["jsapi_code"] == 0


# -- what the demo tour drives: consent, expiry, the timeline --------------------------------


async def test_a_refusing_user_says_no_on_the_page_and_in_the_client(lab: Lab) -> None:
    consent = lab.urls["open"] + "/_sandbox/user_consent"
    assert (await lab.http.post(consent, json={"mode": "deny"})).json() == {"mode": "deny"}
    refused = await lab.authorize()
    assert refused.status_code == 302
    assert parse_qs(urlsplit(refused.headers["location"]).query) == {"error": ["access_denied"], "state": ["st4te"]}
    answer = await lab.http.post(lab.urls["accounts"] + "/_sandbox/jsapi/code", json={
        "api": "requestAccess", "appID": lab.sandbox.app_id, "scopeList": ["offline_access"]})
    assert answer.json()["errno"] == 2700002 and "access_denied" in answer.json()["errString"]
    assert (await lab.http.post(consent, json={"mode": "ask"})).json() == {"mode": "ask"}
    assert "Allow" in (await lab.authorize()).text  # the consent page itself
    await lab.http.post(consent, json={"mode": "allow"})
    assert await lab.browser_code()


async def test_expiring_the_access_tokens_now(lab: Lab) -> None:
    tokens = (await lab.exchange(lab.sandbox.mint_client_code())).json()
    assert (await lab.user_info(tokens["access_token"])).json()["code"] == 0
    assert (await lab.http.post(lab.urls["accounts"] + "/_sandbox/tokens/expire")).json() == {"expired": 1}
    assert (await lab.user_info(tokens["access_token"])).json()["code"] == 99991677  # "token expire"
    fresh = (await lab.refresh(tokens["refresh_token"])).json()
    assert (await lab.user_info(fresh["access_token"])).json()["code"] == 0


async def test_the_events_tell_each_step_without_secrets(lab: Lab) -> None:
    code = await lab.browser_code()
    tokens = (await lab.exchange(code, redirect_uri=REDIRECT_URI)).json()
    await lab.refresh(tokens["refresh_token"])
    answer = (await lab.http.get(lab.urls["open"] + "/_sandbox/events")).json()
    assert [event["kind"] for event in answer["events"]] == [
        "call", "code", "exchange", "tokens", "refresh", "revoked", "tokens"]
    text = " ".join(event["text"] for event in answer["events"])
    assert code not in text and tokens["access_token"] not in text and tokens["refresh_token"] not in text
    assert "2 h" in text and "7 d" in text  # the documented lifetimes, as the sandbox issues them


async def test_the_user_grant_switch_answers_99991679_until_the_user_consents_again(lab: Lab) -> None:
    """``POST /_sandbox/user_grant``: the demo's relay page withdraws the calendar scope; Lark's own
    missing-scope answer follows, and a requestAccess for the scope grants it again."""
    calendars = lab.urls["open"] + "/open-apis/calendar/v4/calendars"
    scope = "calendar:calendar:readonly"
    code = (await lab.http.post(lab.urls["accounts"] + "/_sandbox/jsapi/code", json={
        "api": "requestAccess", "appID": lab.sandbox.app_id, "scopeList": ["offline_access", scope]})).json()["code"]
    token = (await lab.exchange(code)).json()["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await lab.http.get(calendars, headers=bearer)).json()["code"] == 0
    withdrawn = await lab.http.post(lab.urls["open"] + "/_sandbox/user_grant", json={"scope": scope, "granted": False})
    assert withdrawn.json() == {"scope": scope, "granted": False}
    refused = (await lab.http.get(calendars, headers=bearer)).json()
    assert refused["code"] == 99991679 and refused["error"]["permission_violations"][0]["subject"] == scope
    again = (await lab.http.post(lab.urls["accounts"] + "/_sandbox/jsapi/code", json={
        "api": "requestAccess", "appID": lab.sandbox.app_id, "scopeList": [scope]})).json()["code"]
    fresh = (await lab.exchange(again)).json()["access_token"]
    assert (await lab.http.get(calendars, headers={"Authorization": f"Bearer {fresh}"})).json()["code"] == 0
    bad = await lab.http.post(lab.urls["open"] + "/_sandbox/user_grant", json={"scope": scope, "granted": "no"})
    assert bad.status_code == 400 and bad.json()["error"]


async def test_the_tour_has_no_approval_step_here(lab: Lab) -> None:
    """Lark's administrator makes the app available in the console: the tour's approval endpoints
    say there is no such step, with a code."""
    tour = lab.urls["open"] + "/_sandbox/tour"
    for answer in (await lab.http.get(tour + "/approval"),
                   await lab.http.post(tour + "/approval", json={"on": True}),
                   await lab.http.post(tour + "/answer", json={"answer": "approved"})):
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"] == "no_approval_step" and "Feishu/Lark" in answer.json()["message"]
    bad = await lab.http.post(tour + "/answer", json={"answer": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_answer"
    (entry,) = lab.sandbox.demo_tour()
    assert (entry.provider, entry.title, entry.has_approval) == ("lark", "Feishu/Lark", False)
