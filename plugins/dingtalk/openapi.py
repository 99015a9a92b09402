"""The DingTalk emulator's Open API beyond sign-in: the organisation's staff list with the corp token.

``POST /topapi/user/listid?access_token=<app or corp token>`` with ``{"dept_id": 1}`` answers the
userids of the token's organisation (HTTP 200 even on errors, ``errcode`` 0 on success, the
``request_id`` topapi adds; sheet section 5). Strict about the token as topapi is: none 41001,
unknown or revoked ``errcode 88`` / ``sub_code "40014"``, expired 88 / ``"42001"`` (what the relay
refreshes on); the app without the permission in its console 60011. The token must be in the
query: a ``x-acs-dingtalk-access-token`` header means nothing on the oapi host.

The user side (``GET /v1.0/contact/users/me`` with ``x-acs-dingtalk-access-token``) is the
emulator's own sign-in endpoint (plugins/dingtalk/sandbox.py): 400 ``InvalidAuthentication``
(unknown), 400 ``accesstoken.expired``, 403 ``Forbidden.AccessDenied.AccessTokenPermissionDenied``
without ``Contact.User.Read``.

Which staff API and body: ``topapi/user/listid`` is DingTalk's documented "获取部门用户userid列表"
(not in the project's fact sheet: its shape here is from DingTalk's public docs, inferred).
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.providers import as_int
from gateway.sandbox import read_json

if TYPE_CHECKING:
    from plugins.dingtalk.sandbox import DingTalkSandbox

#: The app permission the staff list needs in the emulated console.
STAFF_PERMISSION = "Contact.User.Read"
#: The root department of every organisation.
ROOT_DEPT = 1


def routes(sandbox: DingTalkSandbox) -> list[BaseRoute]:
    """The oapi host's staff-list route."""
    from plugins.dingtalk.sandbox import SandboxError, oapi_error

    async def listid(request: Request) -> Response:
        body = await read_json(request)
        if (fault := await sandbox._gate("user_listid")) is not None:
            return fault
        try:
            token = sandbox._resolve_app_token(request)
            if STAFF_PERMISSION not in sandbox.app_permissions:
                raise SandboxError(60011)
            if as_int((body or {}).get("dept_id")) != ROOT_DEPT:
                raise SandboxError(60003)  # 部门不存在
        except SandboxError as exc:
            return oapi_error(int(exc.code), exc.sub_code)
        staff = [user.userid for user in sandbox.users.values() if user.corp_id == token.corp_id]
        return JSONResponse({"errcode": 0, "errmsg": "ok", "request_id": secrets.token_hex(6),
                             "result": {"userid_list": staff}})

    return [Route("/topapi/user/listid", listid, methods=["POST"])]
