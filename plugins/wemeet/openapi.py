"""The Tencent Meeting emulator's REST API beyond sign-in: the user's profile and meetings.

``GET /v1/users/info/basic`` (获取用户基本信息, S8 in docs/providers/wemeet.md) answers
``basic_info(user)``: every field with the type the official SDK model declares,
``V1UsersInfoBasicGet200Response`` in TencentCloud/wemeet-openapi-sdk-python
``wemeet_openapi/service/user_manager/model.py`` (commit 7903860, 2025-07-15; S10): ``status`` is a
string, ``is_voov``, ``email_status``, ``phone_status`` and the account fields integers (not
booleans), ``enable_ai_account`` the one boolean. The Go SDK's model (wemeet-openapi-sdk-go,
2025-05) is an older spec without ``is_voov`` and ``email_status``; the fields it has carry the same
types. The handler itself (scopes, the OAuth headers) is the emulator's ``_profile``.

``GET /v1/meetings?operator_id=<open_id>&operator_id_type=2&instanceid=1`` (查询用户的会议列表)
with the OAuth headers of every REST call (sheet 4.1: ``AccessToken``, ``OpenId``,
``X-TC-Timestamp``, ``X-TC-Nonce``, ``Content-Type: application/json``), checked by the
emulator's own ``_authenticate``: a dead, expired or rotated token, or another user's OpenId,
answers 400 ``{"error_info": {"error_code": 190303, ...}}``; a skewed timestamp 190300, a replayed
nonce 190301, more than the per-minute limit 190310 (sheet 6.1). The meeting scopes are not
emulated (any grant may list meetings): a missing scope would be 190303 as well ("权限点不足", the
same code as an expired token), so the relay refreshes once and passes a second 190303 on.

The list's field names follow the official SDK's ``V1MeetingsGet200Response`` model (inferred from
its public source, not the fact sheet): ``meeting_number``, ``meeting_info_list`` (``subject``,
``meeting_id``, ``meeting_code``, ``start_time``/``end_time`` as strings of unix seconds),
``remaining``, ``next_pos``, ``next_cursory``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from plugins.wemeet.sandbox import WeMeetSandbox, WeMeetUser


def basic_info(user: WeMeetUser) -> dict[str, Any]:
    """``/v1/users/info/basic``'s answer for ``user``, typed as the SDK model declares (above).

    Values (S8's tables): an enterprise user is paid (``account_type`` 1: "其他值均为会议付费版本"),
    企业版 (``account_version`` 2) and a 高级账号 (``user_account_type`` 1); a personal user is
    个人免费版 (``account_type`` 0), ``account_version`` 0 (其他) and ``user_account_type`` 2 (免费账号:
    the tables name no value for personal accounts, so this one is the sandbox's choice). The phone
    is verified (``phone_status`` 1), the e-mail not (``email_status`` 2), no AI account
    (``enable_ai_account`` false, so no ``ai_account_type``), no add-on licences (``add_on_*``
    absent, as for an account without them), not a VooV account (``is_voov`` 0).
    """
    enterprise = bool(user.open_corp_id)
    return {
        "username": user.username,
        "open_corp_id": user.open_corp_id,
        "open_corp_name": user.open_corp_name,
        "status": user.status,
        "avatar_url": f"https://sandbox.invalid/avatar/{user.open_id}.png",
        "account_type": 1 if enterprise else 0,
        "account_version": 2 if enterprise else 0,
        "user_account_type": 1 if enterprise else 2,
        "email_status": 2,
        "phone_status": 1,
        "enable_ai_account": False,
        "is_voov": 0,
    }


def routes(sandbox: WeMeetSandbox) -> list[BaseRoute]:
    """The api host's meetings route."""
    from plugins.wemeet.sandbox import ApiError, api_error

    async def meetings(request: Request) -> Response:
        if (fault := await sandbox._gate("meetings")) is not None:
            return fault
        try:
            user = sandbox._authenticate(request)
        except ApiError as exc:
            return api_error(exc.code)
        query = request.query_params
        if query.get("operator_id_type") != "2" or not query.get("operator_id") or not query.get("instanceid"):
            return api_error(190004)
        if query["operator_id"] != user.open_id:
            return api_error(190303)  # an OAuth user acts as themselves only
        start = int(sandbox.clock()) // 3600 * 3600 + 3600
        meeting = {"subject": f"{user.username} 的周会", "meeting_id": "1423045678901234567",
                   "meeting_code": "806123456", "type": 0, "status": "MEETING_STATE_INIT",
                   "start_time": str(start), "end_time": str(start + 1800),
                   "join_url": "https://meeting.tencent.com/dm/sandbox"}
        return JSONResponse({"meeting_number": 1, "meeting_info_list": [meeting], "remaining": 0,
                             "next_pos": 0, "next_cursory": 0})

    return [Route("/v1/meetings", meetings, methods=["GET"])]
