"""The Lark/Feishu emulator's Open API: a few user and tenant resources to call through the relay.

Strict as the real open platform is about what the relay depends on:

- the token travels as ``Authorization: Bearer <token>`` only; none: 99991661;
- ``GET /open-apis/calendar/v4/calendars`` (the user's calendars) takes a **user** access token:
  unknown or revoked 99991668, expired 99991677 (what the official CLI and lark-oapi refresh and
  retry on), a tenant token 99991663; without the scope ``calendar:calendar:readonly`` granted by
  this user, 99991679 with ``error.permission_violations`` naming it (the incremental-consent
  answer, open.feishu.cn "how to resolve error 99991679");
- ``GET /open-apis/tenant/v2/tenant/query`` (the organisation) takes a **tenant** access token
  only: a user token is 99991668 with msg "user access token not support" (the API does not
  accept user tokens), an expired or unknown tenant token 99991663;
- every answer carries ``X-Tt-Logid`` (and ``error.log_id`` in errors), a rate limit 99991400 with
  ``x-ogw-ratelimit-limit``/``x-ogw-ratelimit-reset`` (HTTP 429), as the generic-error docs say.

Grants accumulate per user (the consent sheet asks only for what is new): ``grant_scopes`` and
``revoke_scopes`` (and ``POST /_sandbox/openapi/scopes``) choose what the user has granted.
"""

from __future__ import annotations

import re
import secrets
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from gateway.providers import str_field
from gateway.sandbox import read_body

if TYPE_CHECKING:
    from plugins.lark.sandbox import LarkSandbox

CALENDAR_SCOPE = "calendar:calendar:readonly"
#: The scopes these APIs use: enabled in the emulated app's console by default.
SCOPES = (CALENDAR_SCOPE,)
_BEARER = re.compile(r"Bearer (\S+)")


@dataclass
class _Switches:
    rate_limited: bool = False  # every Open API call answers 99991400


_switches: weakref.WeakKeyDictionary[Any, _Switches] = weakref.WeakKeyDictionary()


def switches(sandbox: LarkSandbox) -> _Switches:
    """This emulator's Open API switches (a test or the admin API sets them)."""
    return _switches.setdefault(sandbox, _Switches())


def _logid() -> str:
    return "sandbox" + secrets.token_hex(9)


def answer(code: int, msg: str, status: int, *, data: Any = None, error: dict[str, Any] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    """The Open API envelope ``{code, msg, data | error}`` with its ``X-Tt-Logid``."""
    logid = _logid()
    body: dict[str, Any] = {"code": code, "msg": msg}
    if code == 0:
        body["data"] = data if data is not None else {}
    else:
        body["error"] = {"log_id": logid, **(error or {})}
    return JSONResponse(body, status_code=status, headers={"x-tt-logid": logid, **(headers or {})})


def _invalid(code: int, msg: str = "Invalid access token for authorization. Please make a request with token "
             "attached.") -> JSONResponse:
    return answer(code, msg, 400)


def grant_scopes(sandbox: LarkSandbox, open_id: str, scopes: Iterable[str]) -> None:
    """What the user has granted the app grows (as a consent would make it)."""
    sandbox._grants.setdefault(open_id, set()).update(scopes)


def revoke_scopes(sandbox: LarkSandbox, open_id: str, scopes: Iterable[str]) -> None:
    """The user withdrew some scopes (their tokens keep working for the others)."""
    sandbox._grants.get(open_id, set()).difference_update(scopes)


def routes(sandbox: LarkSandbox) -> list[BaseRoute]:
    """The open host's Open API routes."""

    def user_of(request: Request) -> tuple[str | None, Response | None]:
        """The open_id behind the request's user access token, or the error answer."""
        match = _BEARER.fullmatch(request.headers.get("authorization", ""))
        if match is None:
            return None, _invalid(99991661, "Missing access token for authorization. Please make a request with "
                                            "token attached.")
        token, now = match.group(1), sandbox.clock()
        if any(token == issued for issued, _ in sandbox._app_tokens["tenant"]):
            return None, _invalid(99991663)
        access = sandbox._access.get(token)
        if access is None or (access.dies_at is not None and now >= access.dies_at):
            return None, _invalid(99991668)
        if now >= access.expires_at:
            return None, answer(99991677, "token expire", 400)
        return access.open_id, None

    def limited() -> JSONResponse | None:
        if switches(sandbox).rate_limited:
            return answer(99991400, "request trigger frequency limit", 429,
                          headers={"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "7"})
        return None

    async def calendars(request: Request) -> Response:
        if (fault := await sandbox._gate("calendars")) is not None:
            return fault
        if (busy := limited()) is not None:
            return busy
        open_id, error = user_of(request)
        if error is not None or open_id is None:
            return error or _invalid(99991668)
        if CALENDAR_SCOPE not in sandbox._grants.get(open_id, set()):
            return answer(
                99991679,
                "Unauthorized. You do not have permission to perform the requested operation on the resource. "
                f"Please request user re-authorization and try again. required one of these privileges: "
                f"[{CALENDAR_SCOPE}]", 400,
                error={"permission_violations": [{"type": "action_privilege_required", "subject": CALENDAR_SCOPE,
                                                  "description": "the user has not granted this scope"}]})
        user = sandbox.users[open_id]
        calendar = {"calendar_id": f"feishu.cn_{user.user_id}@group.calendar.feishu.cn", "summary": user.name,
                    "description": "", "permissions": "private", "color": -1, "type": "primary",
                    "summary_alias": "", "is_deleted": False, "is_third_party": False, "role": "owner"}
        return answer(0, "success", 200, data={"has_more": False, "page_token": "", "sync_token": "",
                                               "calendar_list": [calendar]})

    async def tenant(request: Request) -> Response:
        if (fault := await sandbox._gate("tenant_query")) is not None:
            return fault
        if (busy := limited()) is not None:
            return busy
        match = _BEARER.fullmatch(request.headers.get("authorization", ""))
        if match is None:
            return _invalid(99991661, "Missing access token for authorization. Please make a request with token "
                                      "attached.")
        token, now = match.group(1), sandbox.clock()
        if token in sandbox._access:
            return _invalid(99991668, "user access token not support")
        issued = dict(sandbox._app_tokens["tenant"])
        if token not in issued or now >= issued[token]:
            return _invalid(99991663)
        tenant_key = next(iter(sandbox.users.values())).tenant_key
        return answer(0, "success", 200, data={"tenant": {
            "name": "Sandbox Org", "display_id": "F0000001", "tenant_tag": 0, "tenant_key": tenant_key,
            "avatar": {"avatar_origin": "https://sandbox.invalid/org.png"}}})

    return [
        Route("/open-apis/calendar/v4/calendars", calendars, methods=["GET"]),
        Route("/open-apis/tenant/v2/tenant/query", tenant, methods=["GET"]),
    ]


def admin_routes(sandbox: LarkSandbox) -> list[BaseRoute]:
    """``POST /_sandbox/openapi/scopes {open_id?, grant?: [...], revoke?: [...], rate_limited?}``."""

    async def scopes(request: Request) -> Response:
        body = await read_body(request) or {}
        open_id = str_field(body, "open_id") or sandbox.current_user
        if open_id not in sandbox.users:
            return JSONResponse({"error": f"no sandbox user {open_id!r}"}, status_code=404)
        for key, change in (("grant", grant_scopes), ("revoke", revoke_scopes)):
            values = body.get(key) or []
            if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
                return JSONResponse({"error": f"{key} must be a list of scope names"}, status_code=400)
            change(sandbox, open_id, values)
        if isinstance(body.get("rate_limited"), bool):
            switches(sandbox).rate_limited = body["rate_limited"]
        return JSONResponse({"open_id": open_id, "granted": sorted(sandbox._grants.get(open_id, set())),
                             "rate_limited": switches(sandbox).rate_limited})

    return [Route("/_sandbox/openapi/scopes", scopes, methods=["POST"])]
