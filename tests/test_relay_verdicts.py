"""Each plugin's reading of a relayed answer (``Provider.relay_verdict``), straight from the hook:
the answers that must refresh, ask for consent, back off or pass, including errors that arrive on
HTTP 200 and successes the plugin passes without parsing them (a large answer is not parsed just
to find that it is not an error)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from gateway.providers import Provider
from tests.test_consent_relay_misconfigured import providers  # noqa: F401 (the fixture)

BIG = [{"id": f"item-{n}", "summary": "日程" * 20, "code": n} for n in range(300)]  # ~30 kB, "code" inside


def body(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


CASES = [
    # Lark: decided on code, whatever the status (errors come on 200 and on 4xx alike).
    ("lark", 200, {"code": 0, "msg": "success", "data": {"items": BIG}}, "pass"),
    ("lark", 200, {"code": 99991677, "msg": "token expired"}, "expired"),
    ("lark", 400, {"code": 99991668, "msg": "Invalid access token for authorization."}, "expired"),
    ("lark", 200, {"msg": "success", "code": 0}, "pass"),  # not in Lark's order: parsed, still a success
    ("lark", 200, {"code": 99991400, "msg": "request trigger frequency limit"}, "rate_limited"),
    ("lark", 500, {"code": 0, "msg": "success"}, "unavailable"),
    ("lark", 200, {"code": 99991679, "msg": "Unauthorized. You do not have permission [calendar:calendar]",
                   "error": {"permission_violations": [{"subject": "calendar:calendar"}]}}, "consent"),
    # DingTalk: oapi errors on 200 with errcode; api host errors on 4xx with code.
    ("dingtalk", 200, {"userid": "zhangsan01", "items": BIG}, "pass"),  # "code" inside the data: parsed, passes
    ("dingtalk", 200, {"nick": "张三", "unionId": "u1"}, "pass"),
    ("dingtalk", 200, {"errcode": 0, "errmsg": "ok", "result": {}}, "pass"),
    ("dingtalk", 200, {"errcode": 42001, "errmsg": "access_token expired"}, "expired"),
    ("dingtalk", 401, {"code": "InvalidAuthentication", "message": "不合法的access_token"}, "expired"),
    ("dingtalk", 403, {"code": "Forbidden.AccessDenied.AccessTokenPermissionDenied", "message": "no",
                       "accessdenieddetail": {"requiredScopes": ["Contact.User.Read"]}}, "consent"),
    ("dingtalk", 429, {"code": "Throttling", "message": "slow down"}, "rate_limited"),
    # Tencent Meeting: errors on 4xx/5xx with error_info.
    ("wemeet", 200, {"userid": "u1", "items": BIG}, "pass"),
    ("wemeet", 400, {"error_info": {"error_code": 190303, "message": "invalid token"}}, "expired"),
    ("wemeet", 400, {"error_info": {"error_code": 190310, "message": "rate"}}, "rate_limited"),
    ("wemeet", 503, {"message": "busy"}, "unavailable"),
]


@pytest.mark.parametrize(("plugin", "status", "data", "outcome"), CASES,
                         ids=[f"{case[0]}-{case[1]}-{case[3]}-{n}" for n, case in enumerate(CASES)])
def test_each_plugin_reads_the_answer(providers: dict[str, Provider],  # noqa: F811
                                      plugin: str, status: int, data: Any, outcome: str) -> None:
    verdict = providers[plugin].relay_verdict(status, httpx.Headers(), body(data))
    assert verdict.outcome == outcome
    if outcome == "consent":
        assert verdict.scopes


@pytest.mark.parametrize("plugin", ["lark", "dingtalk", "wemeet"])
def test_a_large_success_is_passed_without_being_parsed(providers: dict[str, Provider],  # noqa: F811
                                                         plugin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain success of each provider is recognised from its bytes: no JSON parse at all."""
    parsed: list[bytes] = []
    original = json.loads
    monkeypatch.setattr(json, "loads", lambda data, *a, **k: parsed.append(data) or original(data, *a, **k))
    success = {"lark": {"code": 0, "msg": "success", "data": {"n": 1}}, "dingtalk": {"nick": "张三"},
               "wemeet": {"userid": "u1"}}[plugin]
    assert providers[plugin].relay_verdict(200, httpx.Headers(), body(success)).outcome == "pass"
    assert parsed == []
