"""``GET <prefix>/consent?provider=&scopes=a,b&next=[&grant=app]``: incremental consent.

A relayed call answered ``403 consent_required`` (the grant lacks scopes: Lark 99991679, DingTalk
``Forbidden.AccessDenied.AccessTokenPermissionDenied``, or a route's declared ``scopes``) hands its
caller a ``consent_url`` to this endpoint. It is a sign-in that asks for more: the same login
(state, the login cookie, the handshake page in the client, the browser authorize URL outside it)
with the added scopes in ``LoginContext.extra_scopes``, so in the client the page asks the JSAPI
for exactly those scopes (Lark ``tt.requestAccess({scopeList})``, DingTalk ``openAuth`` type 0
with ``rpcScope``, or type 1, the administrator's grant, for an app-token route: ``grant=app``),
and outside it the browser authorize URL carries them. The new grant replaces the user's token
record, as every login does, and every replica sees it; the browser returns to ``next`` (the
login's own rules, ``gateway.state.safe_next``). Denied, pending an administrator (``toAdmin``)
and failed end on the login's own pages.

Only scopes some route declares (``relay.routes[].scopes``) or ``relay.consent_scopes`` lists can
be asked for: anything else is ``400 scope_not_allowed``, so a link cannot make the app ask users
for access its operator never meant it to have.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.providers import APP_SCOPE_MARK

if TYPE_CHECKING:
    from gateway.handshake import Handshake

_SCOPE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_MAX_SCOPES = 20


def requested_scopes(raw: str | None) -> list[str]:
    """``scopes=a,b`` (commas or spaces) as a list, or a 400 for a malformed one."""
    scopes = [scope for scope in re.split(r"[,\s]+", raw or "") if scope]
    if not scopes or len(scopes) > _MAX_SCOPES or not all(_SCOPE.fullmatch(scope) for scope in scopes):
        raise GatewayError("Name the scopes to ask for: scopes=a,b.", code="scope_not_allowed", status_code=400)
    return list(dict.fromkeys(scopes))


async def consent(handshake: Handshake, request: Request, rest: str) -> Response:
    """The consent endpoint: checks, then the login with the added scopes."""
    name = request.query_params.get("provider") or ""
    handshake._provider(name)  # 404 unknown_provider
    scopes = requested_scopes(request.query_params.get("scopes"))
    allowed = handshake.relay.scopes_allowed(name)
    refused = [scope for scope in scopes if scope not in allowed]
    if refused:
        raise GatewayError(f"The app may not ask for {', '.join(refused)}: no relay route declares it.",
                           code="scope_not_allowed", status_code=400)
    grant = request.query_params.get("grant")
    if grant not in (None, "", "user", "app"):
        raise GatewayError("grant is user or app.", code="bad_request", status_code=400)
    extra = tuple(f"{APP_SCOPE_MARK}{scope}" if grant == "app" else scope for scope in scopes)
    return await handshake.login(request, "", extra_scopes=extra)
