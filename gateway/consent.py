"""``GET <prefix>/consent?provider=&scopes=a,b&next=[&grant=app]``: incremental consent.

A relayed call answered ``403 consent_required`` (the grant lacks scopes: Lark 99991679, DingTalk
``Forbidden.AccessDenied.AccessTokenPermissionDenied``, or a route's declared ``scopes``) hands its
caller a ``consent_url`` to this endpoint. It is a sign-in that asks for more: the same login
(state, the login cookie, the handshake page in the client, the browser authorize URL outside it)
with the added scopes in ``LoginContext.extra_scopes``, so in the client the page asks the JSAPI
for exactly those scopes (Lark ``tt.requestAccess({scopeList})``, DingTalk ``openAuth`` type 0
with ``rpcScope``, or type 1, the administrator's grant, for an app-token route: ``grant=app``),
and outside it the browser authorize URL carries them. The pending login (sealed in the login
cookie) keeps the added scopes too, so the callback and ``/exchange`` know the login was a
consent: the new grant replaces the user's token record with the union of the old record's scopes
and the new grant's (``TokenManager.save(..., keep_scopes=True)``), every replica sees it, the
``consent.*`` audit events name the scopes, and the pages' "try again" and "sign in in the
browser" links come back here with the same scopes (a plain login would not ask for them).

Denied, pending an administrator (``toAdmin``) and failed end on the login's own pages. In the
client those happen in the page, out of the gateway's sight: the handshake page reports them with
``POST <prefix>/consent`` ``{provider, state, outcome}`` (``consent_outcome``), which spends the
login's state (one report per ``/consent``, which is rate limited) and writes the audit event.

Only scopes some route declares (``relay.routes[].scopes``) or ``relay.consent_scopes`` lists can
be asked for: anything else is ``400 scope_not_allowed``, so a link cannot make the app ask users
for access its operator never meant it to have.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import GatewayError
from gateway.providers import APP_SCOPE_MARK

if TYPE_CHECKING:
    from gateway.handshake import Handshake

MAX_SCOPES = 20
#: Scope keys are short (Lark `contact:user.employee_id:readonly`, DingTalk `Contact.User.Read`); at
#: most 20 of this length still fit in the login cookie beside the rest of a login (state.py).
MAX_SCOPE_CHARS = 100
_SCOPE = re.compile(rf"[A-Za-z0-9_.:\-]{{1,{MAX_SCOPE_CHARS}}}")
#: What the handshake page may report about an in-client consent that gave no code.
Outcome = Literal["denied", "pending", "failed"]
_OUTCOMES: tuple[Outcome, ...] = ("denied", "pending", "failed")


def requested_scopes(raw: str | None) -> list[str]:
    """``scopes=a,b`` (commas or spaces) as a list, or a 400 for a malformed one."""
    scopes = [scope for scope in re.split(r"[,\s]+", raw or "") if scope]
    if not scopes or len(scopes) > MAX_SCOPES or not all(_SCOPE.fullmatch(scope) for scope in scopes):
        raise GatewayError("Name the scopes to ask for: scopes=a,b.", code="scope_not_allowed", status_code=400)
    return list(dict.fromkeys(scopes))


def consent_query(provider: str, extra_scopes: Sequence[str], next_path: str) -> dict[str, str]:
    """The ``/consent`` query that asks again for ``extra_scopes`` (as ``LoginContext`` holds them:
    an administrator's grant marked ``app:``), for the pages' retry and browser links."""
    app = [scope[len(APP_SCOPE_MARK):] for scope in extra_scopes if scope.startswith(APP_SCOPE_MARK)]
    user = [scope for scope in extra_scopes if not scope.startswith(APP_SCOPE_MARK)]
    query = {"provider": provider, "scopes": ",".join(app or user), "next": next_path}
    if app:
        query["grant"] = "app"
    return query


def consent_url(prefix: str, provider: str, extra_scopes: Sequence[str], next_path: str, **more: str) -> str:
    return f"{prefix}/consent?{urlencode({**consent_query(provider, extra_scopes, next_path), **more})}"


def scopes_field(extra_scopes: Sequence[str]) -> str:
    """The audit events' ``scopes``: the names, comma-joined (``app:`` kept: an administrator's grant)."""
    return ",".join(extra_scopes)


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


async def consent_outcome(handshake: Handshake, request: Request, rest: str) -> Response:
    """``POST <prefix>/consent`` ``{provider, state, outcome}``: the handshake page's word that an
    in-client consent ended without a code (the user declined, an administrator must approve, the
    client's authorization failed). Written as ``consent.denied`` / ``consent.failed``; the state
    is spent, so each ``/consent`` is reported at most once, and only by the browser that holds
    its sealed login (a forged report names a state this browser's cookie does not hold)."""
    body = await handshake._json_object(request, what="the outcome", fields="provider, state and outcome")
    provider = handshake._provider(str(body.get("provider") or ""))
    outcome, state = body.get("outcome"), body.get("state")
    if outcome not in _OUTCOMES or not isinstance(state, str):
        raise GatewayError("outcome is denied, pending or failed, with the login's state.", code="bad_request",
                           status_code=400)
    pending = await handshake._take_pending(request, state, provider)
    if not pending.is_consent:
        raise GatewayError("This sign-in was not a consent.", code="bad_request", status_code=400)
    await handshake.audit_consent(request, provider.name, "client", pending,
                                  error={"denied": "access_denied", "pending": "approval_pending",
                                         "failed": "provider_error"}[outcome])
    response = JSONResponse({"ok": True}, headers={"cache-control": "no-store"})
    logins = handshake.logins.open(request.cookies.get(handshake.binding_cookie))
    logins.pop(pending.state, None)
    handshake._set_logins(response, logins)
    return response
