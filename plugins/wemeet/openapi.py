"""The Tencent Meeting emulator's REST API beyond sign-in: the user's meetings, to call through the relay.

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

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from plugins.wemeet.sandbox import WeMeetSandbox


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
