"""Shared machinery of the provider emulators (``plugins/<name>/sandbox.py``).

An emulator is a ``Sandbox`` subclass registered under the entry-point group
``gateway.sandboxes`` (same name as its provider plugin). It serves one ASGI app per real
provider host (Lark: ``open`` and ``accounts``), because official SDKs take a host, not a path.
``gateway sandbox`` gives each host its own loopback port and prints the ``providers:`` YAML.

Every emulator also serves, on each of its hosts, a small admin API under ``/_sandbox/`` that
tests and the demo use: ``GET stats``, ``GET events`` (what happened, with timestamps: the demo's
timeline), ``POST``/``DELETE faults``, ``POST user_consent`` (the simulated user allows, is asked,
or refuses), ``POST tokens/expire`` and ``POST user_grant`` (``{scope, granted}``: the current user
has, or has not, granted a scope; ``Sandbox.set_user_grant``) come from ``Sandbox`` itself, and so do
the tour's administrator-approval endpoints, which each emulator fills in (``GET``/``POST
tour/approval``, ``POST tour/answer``: ``Sandbox.set_tour_approval``); an emulator adds its own
(current user, JSSDK mode, the simulated client's codes, administrator approvals...).

How to write one: see ``Sandbox``. The helpers below (body readers, redirects, the consent
form, CORS headers; ``gateway.providers.str_field`` for body fields) serve every emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal, get_args
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from gateway.providers import str_field
from gateway.sandbox.demo import DemoApiCall as DemoApiCall  # re-exported: emulators build them
from gateway.sandbox.demo import TourEntry as TourEntry

ENTRY_POINT_GROUP = "gateway.sandboxes"
log = logging.getLogger("gateway.sandbox")

#: The headers of the endpoints the fake JSSDKs call from the app's page (another origin).
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "POST, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type",
    "Access-Control-Max-Age": "600",
}


ConsentMode = Literal["allow", "ask", "deny"]
CONSENT_MODES: tuple[ConsentMode, ...] = get_args(ConsentMode)
#: What the tour's administrator answers (``POST /_sandbox/tour/answer``).
AdminAnswer = Literal["approved", "rejected"]
ADMIN_ANSWERS: tuple[AdminAnswer, ...] = get_args(AdminAnswer)
#: How many events an emulator keeps (the oldest go first): enough for a demo's timeline.
EVENT_LOG_SIZE = 500


@dataclass(frozen=True)
class SandboxEvent:
    """One thing that happened at the emulator, for a timeline: a call, a code or tokens issued,
    tokens that died, a refusal, an administrator's answer. ``at`` is wall-clock time (unix
    seconds; not the emulator's ``clock`` knob, which tests move). ``text`` never holds a secret."""

    seq: int
    at: float
    kind: str  # call | jsapi | code | exchange | tokens | refresh | identity | revoked | refused | approval | admin
    text: str
    endpoint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at, "kind": self.kind, "text": self.text, "endpoint": self.endpoint}


@dataclass
class Fault:
    """One injected fault (see ``Sandbox.inject_fault``)."""

    endpoint: str  # an endpoint name, or "<endpoint>:<grant_type>" for one grant type
    code: int | str | None = None
    status: int | None = None
    delay_s: float = 0.0
    remaining: int | None = 1  # None: until cleared
    #: What an emulator's own faults need besides (``Sandbox.fault_extras``, e.g. a sub-code).
    extra: dict[str, Any] = field(default_factory=dict)


class Sandbox:
    """Base class of a provider emulator.

    How to write one:

    1. Subclass it, set ``plugin`` (and ``client_user_agent``), and call
       ``super().__init__(delay_s=delay_s)`` first thing in ``__init__``. Keep all other state on
       the instance too, so that a test can run several emulators side by side.
    2. Implement ``host_routes()`` (the provider's own routes, per host; ``hosts()`` builds one
       Starlette app per host from them once, with ``admin_routes()`` added to each) and
       ``provider_settings()``. An emulator with admin endpoints of its own extends
       ``admin_routes()`` (``[*super().admin_routes(), ...]``).
    3. Start every endpoint handler with ``if (fault := await self._gate("name")) is not None:
       return fault`` (``self._gate("token", grant_type)`` for a token endpoint that counts its
       grant types too; ``await self._cors_gate(request, "name")`` for a CORS endpoint the fake
       JSSDK calls). That counts the call in ``stats``, waits out ``delay_s`` and any injected
       delay, and answers an injected fault. Read the body *before* ``_gate`` when the body
       names the grant type.
    4. Override ``fault_response()`` to render a fault with a ``code`` in the provider's own
       error format (its error body, its status, its error page for HTML endpoints), and fall
       back to ``super().fault_response()`` for the rest. Set ``fault_code_types`` when codes
       are not integers, and ``fault_extras`` for extra string fields of a fault.
    5. A simulated client's JSSDK (served with ``script_response``) has its modes in
       ``jsapi_modes`` and the current one in ``jsapi_mode``.
    6. For a timeline, name each endpoint in ``call_labels`` (``"token:refresh_token"`` for one
       grant type): every call is then recorded as an event of that kind and text. Record what a
       call does with ``record_event`` (a code minted, tokens issued or killed). Honour
       ``auto_consent`` and ``refuse_consent`` wherever the provider asks the user, and implement
       ``expire_access_tokens``.

    Tests then use the same knobs on every emulator: ``stats["name"]``, ``delay_s``,
    ``inject_fault("name", code, times=..., delay_s=..., status=...)`` and ``clear_faults()``,
    or over HTTP ``GET /_sandbox/stats``, ``POST /_sandbox/faults`` with the same fields as JSON
    (or a form) and ``DELETE /_sandbox/faults``.
    """

    #: The provider plugin this emulates (its entry-point name).
    plugin: ClassVar[str] = ""
    #: The provider as people call it ("the <title> emulator" in the demo); the plugin name if "".
    title: ClassVar[str] = ""
    #: Where this emulator's tour entries go on the demo's page: lower first, then by plugin name.
    tour_position: ClassVar[int] = 100
    #: Appended to a browser's User-Agent by the demo to simulate the provider's client.
    client_user_agent: ClassVar[str] = ""
    #: What a fault's ``code`` may be: integers by default; add ``str`` for string error codes.
    fault_code_types: ClassVar[tuple[type, ...]] = (int,)
    #: Extra string fields of a fault that ``POST /_sandbox/faults`` passes to ``inject_fault``.
    fault_extras: ClassVar[tuple[str, ...]] = ()
    #: The modes of the simulated client's JSSDK, when the emulator has one: then
    #: ``POST /_sandbox/jsapi_mode`` ``{"mode": ...}`` sets ``jsapi_mode`` to one of them.
    jsapi_modes: ClassVar[tuple[str, ...]] = ()
    jsapi_mode: str
    #: Endpoint name (or ``"<endpoint>:<grant_type>"``) -> (event kind, text) for the timeline.
    call_labels: ClassVar[Mapping[str, tuple[str, str]]] = {}
    #: The user consents without being asked (True), or sees the provider's consent page/dialog.
    auto_consent: bool = True
    #: The simulated user refuses wherever the provider asks them (consent page, dialog, JSAPI
    #: consent sheet), and counts as not having authorized the app before: the provider's own
    #: answer to a refusal, without a person clicking "Deny".
    refuse_consent: bool = False

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s  # every API call waits this long first: a slow provider
        self._stats: Counter[str] = Counter()
        self._events: deque[SandboxEvent] = deque(maxlen=EVENT_LOG_SIZE)
        self._event_seq = 0
        self._faults: list[Fault] = []
        #: The URLs the hosts are served on, once known (``transport``, ``provider_settings``).
        self._base_urls: dict[str, str] = {}
        self._apps: dict[str, ASGIApp] | None = None

    # -- what an emulator implements --------------------------------------------------------

    def host_routes(self) -> dict[str, list[BaseRoute]]:
        """The provider's own routes, keyed by a short host role (e.g. ``open``, ``accounts``)."""
        raise NotImplementedError

    def provider_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """The ``providers.<name>`` config entry that points the plugin at these hosts.

        ``base_urls`` maps each role of ``hosts()`` to the URL it is served on. The result
        includes the emulator's credentials (``app_id``/``app_secret``...).
        """
        raise NotImplementedError

    def sandbox_providers(self, base_urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The ``providers:`` entries ``gateway sandbox`` prints for this emulator (name ->
        settings, every value literal so the section can be pasted as is). One by default, named
        after the plugin; an emulator of several app kinds returns one entry per kind."""
        return {self.plugin: self.provider_settings(base_urls)}

    def demo_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """Settings for ``gateway demo``: by default the same, with the simulated JSSDK if any."""
        return self.provider_settings(base_urls)

    def demo_providers(self, base_urls: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        """The ``providers:`` entries ``gateway demo`` configures for this emulator (name ->
        settings). One by default, named after the plugin; an emulator of several app kinds
        (DingTalk's internal and ISV apps) returns one entry per kind."""
        return {self.plugin: self.demo_settings(base_urls)}

    def demo_api_calls(self) -> list[DemoApiCall]:
        """The Open API calls ``gateway demo``'s relay page makes for this emulator's demo
        providers (one per provider at most). None by default."""
        return []

    def demo_tour(self) -> list[TourEntry]:
        """The cards of ``gateway demo``'s tour page (``/demo/``) for this emulator, in the order
        shown; none by default (the emulator's providers then work in the demo, without a card).

        How a new plugin joins the tour: return one ``TourEntry`` per provider of
        ``demo_providers`` it wants on the page (title, what refusing and an administrator's
        approval look like there, the provider's answers as codes). The "the user denies" switch
        and "expire the access token now" use what every emulator has (``set_consent``,
        ``expire_access_tokens``); an entry with ``approval_answers`` also needs
        ``set_tour_approval``, ``answer_tour_approval`` and ``tour_approval_status``. Set
        ``tour_position`` for the place on the page and ``title`` for the emulator's name. Several
        entries of one emulator share its switches, and the page says so.
        """
        return []

    def set_tour_approval(self, on: bool) -> None:
        """The tour's "an administrator must approve" switch (``POST /_sandbox/tour/approval``
        ``{"on": bool}``): on, the next sign-in waits for an administrator, as the provider makes
        it wait; off, it does not. Raises ``LookupError`` by default: no approval step."""
        raise LookupError(f"the {self.title or self.plugin or 'sandbox'} emulator has no administrator approval step")

    def answer_tour_approval(self, answer: AdminAnswer) -> None:
        """The administrator answers what waits (``POST /_sandbox/tour/answer``). Raises
        ``LookupError`` without an approval step, ``ValueError`` for an answer the provider's
        administrator cannot give."""
        raise LookupError(f"the {self.title or self.plugin or 'sandbox'} emulator has no administrator approval step")

    def tour_approval_status(self) -> str:
        """What the administrator has answered so far, for the tour page ("" for nothing yet;
        ``GET /_sandbox/tour/approval`` answers ``{"status": ...}``)."""
        raise LookupError(f"the {self.title or self.plugin or 'sandbox'} emulator has no administrator approval step")

    def set_user_grant(self, scope: str, granted: bool) -> None:
        """The current user has granted ``scope`` to the app, or has not (withdrawn it, or never
        asked): the next Open API call needing it answers the provider's missing-scope error, until
        the user grants it again the provider's way. ``POST /_sandbox/user_grant`` calls it; an
        emulator without user scopes raises ``LookupError``."""
        raise LookupError(f"the {self.plugin or 'sandbox'} emulator has no user scopes")

    def expire_access_tokens(self) -> int:
        """Every user access token issued so far expires now (the demo's "expire the access token
        now"): a use of one answers the provider's "expired" error. Returns how many did."""
        return 0

    async def demo_started(self, gateway_url: str, path_prefix: str) -> None:
        """Called once the demo gateway answers: push what a real provider would push (e.g. an
        event callback) to ``gateway_url``. Nothing by default."""

    def fault_response(self, endpoint: str, fault: Fault) -> Response | None:
        """The answer to an injected fault. This default handles what is the same everywhere:
        a ``status`` without a code answers a non-JSON error page, as a load balancer would;
        otherwise None (the call goes on normally after the fault's delay). Emulators render
        a fault with a ``code`` in their provider's format and call this for the rest."""
        if fault.status is None:
            return None
        try:
            reason = HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Error"
        return HTMLResponse(f"<html><body><h1>{fault.status} {reason}</h1></body></html>", status_code=fault.status)

    # -- hosts --------------------------------------------------------------------------------

    def hosts(self) -> dict[str, ASGIApp]:
        """One ASGI app per real host, keyed by role: ``host_routes()`` plus ``admin_routes()``."""
        if self._apps is None:
            admin = self.admin_routes()
            self._apps = {role: Starlette(routes=[*routes, *admin]) for role, routes in self.host_routes().items()}
        return dict(self._apps)

    def transport(self, base_urls: Mapping[str, str]) -> httpx.AsyncBaseTransport:
        """An in-process httpx transport serving ``base_urls`` (role -> URL) from ``hosts()``.

        Tests hand it to the gateway's HTTP client: the provider talks to the emulator with no
        socket at all, through the same URLs a served sandbox would have.
        """
        self._base_urls = dict(base_urls)
        apps = self.hosts()
        return HostRoutingTransport({urlsplit(url).netloc: apps[role] for role, url in base_urls.items()})

    # -- test knobs: call counters, delays, faults --------------------------------------------

    @property
    def stats(self) -> Counter[str]:
        """Calls per endpoint name (and per grant type where an endpoint counts them). A copy:
        missing keys read as 0."""
        return Counter(self._stats)

    def inject_fault(
        self, endpoint: str, code: int | str | None = None, *, times: int | None = 1, delay_s: float = 0.0,
        status: int | None = None, **extra: Any,
    ) -> None:
        """Make the next ``times`` calls of ``endpoint`` fail (``None``: until ``clear_faults``).

        ``endpoint`` is a name from ``stats``, or ``"<endpoint>:<grant_type>"`` for one grant
        type. ``code`` answers that provider error in the provider's own format (see the
        emulator's ``fault_response``; ``status`` overrides its status); no code but a
        ``status`` answers a non-JSON error page; neither only waits ``delay_s`` and then
        answers normally. ``extra``: the emulator's own fault fields (``fault_extras``).
        """
        if not self._code_ok(code):
            raise TypeError(f"a {type(self).__name__} fault code is one of {self._code_kinds()}, not {code!r}")
        self._faults.append(Fault(endpoint, code, status, delay_s, times, dict(extra)))

    def clear_faults(self) -> None:
        self._faults.clear()

    # -- events: what happened, for a timeline ----------------------------------------------

    def record_event(self, kind: str, text: str, endpoint: str = "") -> None:
        """Note one step (never a secret in ``text``: it is shown on pages)."""
        self._event_seq += 1
        self._events.append(SandboxEvent(self._event_seq, time.time(), kind, text, endpoint))

    def events(self, after: int = 0) -> list[SandboxEvent]:
        """The events recorded after sequence number ``after``, oldest first."""
        return [event for event in self._events if event.seq > after]

    def set_consent(self, mode: ConsentMode) -> None:
        """``allow``: consent without asking; ``ask``: the provider's consent page or dialog;
        ``deny``: the user refuses."""
        self.auto_consent = mode == "allow"
        self.refuse_consent = mode == "deny"

    @property
    def consent_mode(self) -> ConsentMode:
        return "deny" if self.refuse_consent else "allow" if self.auto_consent else "ask"

    async def take_call(self, endpoint: str, grant_type: str = "") -> Fault | None:
        """Count one call of ``endpoint`` (and of ``grant_type``), wait out ``delay_s``, and
        take the first fault injected for it; its own delay is waited out too."""
        self._stats[endpoint] += 1
        if grant_type:
            self._stats[grant_type] += 1
        label = self.call_labels.get(f"{endpoint}:{grant_type}") or self.call_labels.get(endpoint)
        if label is not None:
            self.record_event(label[0], label[1], endpoint)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        names = {endpoint, f"{endpoint}:{grant_type}"} if grant_type else {endpoint}
        fault = next((fault for fault in self._faults if fault.endpoint in names), None)
        if fault is None:
            return None
        if fault.remaining is not None:
            fault.remaining -= 1
            if fault.remaining <= 0:
                self._faults.remove(fault)
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        return fault

    async def _gate(self, endpoint: str, grant_type: str = "") -> Response | None:
        """Count the call, wait out any delay, and answer an injected fault if one matches."""
        fault = await self.take_call(endpoint, grant_type)
        return None if fault is None else self.fault_response(endpoint, fault)

    async def _cors_gate(self, request: Request, endpoint: str) -> Response | None:
        """``_gate`` for an endpoint the fake JSSDK calls cross-origin: the preflight is answered
        (and not counted), and a fault carries the CORS headers too."""
        if request.method == "OPTIONS":
            return Response(status_code=204, headers=CORS_HEADERS)
        fault = await self._gate(endpoint)
        if fault is not None:
            fault.headers.update(CORS_HEADERS)
        return fault

    def _code_ok(self, code: object) -> bool:
        return code is None or type(code) in self.fault_code_types

    def _code_kinds(self) -> str:
        return " or ".join(kind.__name__ for kind in self.fault_code_types)

    # -- admin API ----------------------------------------------------------------------------

    def admin_routes(self) -> list[BaseRoute]:
        """The ``/_sandbox/`` routes served on every host; extend with ``super().admin_routes()``."""
        routes: list[BaseRoute] = [
            Route("/_sandbox/stats", self._admin_stats, methods=["GET"]),
            Route("/_sandbox/events", self._admin_events, methods=["GET"]),
            Route("/_sandbox/faults", self._admin_faults, methods=["POST", "DELETE"]),
            Route("/_sandbox/user_consent", self._admin_user_consent, methods=["GET", "POST"]),
            Route("/_sandbox/tokens/expire", self._admin_expire_tokens, methods=["POST"]),
            Route("/_sandbox/user_grant", self._admin_user_grant, methods=["POST"]),
            Route("/_sandbox/tour/approval", self._admin_tour_approval, methods=["GET", "POST"]),
            Route("/_sandbox/tour/answer", self._admin_tour_answer, methods=["POST"]),
        ]
        if self.jsapi_modes:
            routes.append(Route("/_sandbox/jsapi_mode", self._admin_jsapi_mode, methods=["POST"]))
        return routes

    async def _admin_stats(self, request: Request) -> Response:
        return JSONResponse(dict(self._stats))

    async def _admin_events(self, request: Request) -> Response:
        raw = request.query_params.get("after", "0")
        if not raw.isdigit() or len(raw) > 12:
            return JSONResponse({"error": "after must be a sequence number (digits)"}, 400)
        events = self.events(int(raw))
        return JSONResponse({"events": [event.as_dict() for event in events], "last": self._event_seq})

    async def _admin_user_consent(self, request: Request) -> Response:
        if request.method == "POST":
            wanted = str_field(await read_body(request) or {}, "mode")
            mode = next((mode for mode in CONSENT_MODES if mode == wanted), None)
            if mode is None:
                return JSONResponse({"error": f"unknown consent mode {wanted!r}", "modes": list(CONSENT_MODES)}, 400)
            self.set_consent(mode)
            self.record_event("admin", {"allow": "the user will consent without being asked",
                                        "ask": "the user will see the consent page",
                                        "deny": "the user will refuse the authorization"}[mode])
        return JSONResponse({"mode": self.consent_mode})

    async def _admin_user_grant(self, request: Request) -> Response:
        body = await read_body(request) or {}
        scope, granted = str_field(body, "scope"), body.get("granted")
        if not scope or not isinstance(granted, bool):
            return JSONResponse({"error": "give scope (a name) and granted (true or false)"}, 400)
        try:
            self.set_user_grant(scope, granted)
        except LookupError as exc:
            return JSONResponse({"error": str(exc)}, 404)
        self.record_event("admin", f"the user has {'granted' if granted else 'not granted'} {scope}")
        return JSONResponse({"scope": scope, "granted": granted})

    async def _admin_tour_approval(self, request: Request) -> Response:
        try:
            if request.method == "POST":
                on = (await read_body(request) or {}).get("on")
                if not isinstance(on, bool):
                    return _admin_problem(400, "bad_switch", "Send on: true (an administrator must approve) or false.")
                self.set_tour_approval(on)
            return JSONResponse({"status": self.tour_approval_status()})
        except LookupError as exc:
            return _admin_problem(404, "no_approval_step", _sentence(exc))

    async def _admin_tour_answer(self, request: Request) -> Response:
        wanted = (await read_body(request) or {}).get("answer")
        answer = next((answer for answer in ADMIN_ANSWERS if answer == wanted), None)
        if answer is None:
            return _admin_problem(400, "bad_answer", f"Send answer: one of {', '.join(ADMIN_ANSWERS)}.")
        try:
            self.answer_tour_approval(answer)
            return JSONResponse({"status": self.tour_approval_status()})
        except LookupError as exc:
            return _admin_problem(404, "no_approval_step", _sentence(exc))
        except ValueError as exc:
            return _admin_problem(409, "answer_not_possible", _sentence(exc))

    async def _admin_expire_tokens(self, request: Request) -> Response:
        count = self.expire_access_tokens()
        self.record_event("admin", f"{count} access token(s) expired now")
        return JSONResponse({"expired": count})

    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.clear_faults()
            return Response(status_code=204)
        body = await read_body(request) or {}
        endpoint = str_field(body, "endpoint")
        status, times, delay_s = body.get("status"), body.get("times", 1), body.get("delay_s", 0)
        extra = {key: body.get(key) for key in self.fault_extras}
        valid = (
            bool(endpoint)
            and self._code_ok(body.get("code"))
            and all(value is None or type(value) is int for value in (status, times))
            and type(delay_s) in (int, float)
            and all(value is None or isinstance(value, str) for value in extra.values())
        )
        if not valid:
            extras = "".join(f", optional string {key}" for key in self.fault_extras)
            return JSONResponse(
                {"error": f"give endpoint, optional code ({self._code_kinds()}), optional integers status/times, "
                          f"a number delay_s{extras}"},
                400,
            )
        self.inject_fault(endpoint, body.get("code"), times=times, delay_s=float(delay_s), status=status, **extra)
        return Response(status_code=204)

    async def _admin_jsapi_mode(self, request: Request) -> Response:
        wanted = str_field(await read_body(request) or {}, "mode")
        if wanted not in self.jsapi_modes:
            return JSONResponse({"error": f"unknown jsapi mode {wanted!r}", "modes": list(self.jsapi_modes)}, 400)
        self.jsapi_mode = wanted
        return JSONResponse({"mode": wanted})


def _admin_problem(status: int, code: str, message: str) -> JSONResponse:
    """An admin endpoint's refusal as the gateway words its own: a stable code and a sentence."""
    return JSONResponse({"error": code, "message": message}, status)


def _sentence(exc: Exception) -> str:
    """An emulator's exception as a sentence for an admin answer (a KeyError's ``str`` is quoted)."""
    text = str(exc.args[0] if exc.args else exc).rstrip(" .")
    return f"{text[:1].upper()}{text[1:]}."


# -- helpers for emulators ---------------------------------------------------------------------


async def read_json(request: Request) -> dict[str, Any] | None:
    """A JSON object body whatever the Content-Type says (SDKs that send none get the same);
    ``{}`` when the body is empty, None when it is not a JSON object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def read_form(request: Request) -> dict[str, Any] | None:
    """A form-encoded body whatever the Content-Type says; None when it is not UTF-8."""
    try:
        return dict(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        return None


async def read_body(request: Request) -> dict[str, Any] | None:
    """A form body when the Content-Type says so, else a JSON object (``read_json``)."""
    if "application/x-www-form-urlencoded" in request.headers.get("content-type", ""):
        return await read_form(request)
    return await read_json(request)


def without_query(url: str) -> str:
    """``url`` without its query and fragment: how redirect URIs are registered."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def redirect_allowed(redirect_uri: str, registered: Collection[str]) -> bool:
    """An http(s) URL registered for the app (``registered``: ``without_query`` forms; empty
    accepts any http(s) URL)."""
    parts = urlsplit(redirect_uri)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    return not registered or without_query(redirect_uri) in registered


def redirect_to(redirect_uri: str, params: Mapping[str, str | None]) -> RedirectResponse:
    """A 302 to ``redirect_uri`` plus ``params`` (None values left out); its own query is kept
    and a #fragment stays after the query."""
    parts = urlsplit(redirect_uri)
    extra = urlencode({key: value for key, value in params.items() if value is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return RedirectResponse(urlunsplit(parts._replace(query=query)), status_code=302)


def script_response(script: str) -> Response:
    """A fake JSSDK, as the emulators serve it (never cached: its mode changes at run time)."""
    return Response(script, media_type="application/javascript", headers={"cache-control": "no-store"})


def consent_form(ticket: str, allow: str = "Allow", deny: str = "Deny") -> str:
    """The consent page's form: it posts ``ticket`` and ``decision`` (``allow``/``deny``) to
    ``/_sandbox/consent`` on the same host."""
    return (
        '<form method="post" action="/_sandbox/consent">'
        f'<input type="hidden" name="ticket" value="{html.escape(ticket)}">'
        f'<button name="decision" value="allow">{allow}</button> '
        f'<button name="decision" value="deny">{deny}</button></form>'
    )


class HostRoutingTransport(httpx.AsyncBaseTransport):
    """Serves each request from the ASGI app of its host (``netloc`` -> app), in process."""

    def __init__(self, apps: Mapping[str, ASGIApp]) -> None:
        self._transports = {netloc: httpx.ASGITransport(app=app) for netloc, app in apps.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._transports.get(request.url.netloc.decode("ascii"))
        if transport is None:
            raise httpx.ConnectError(f"no sandbox host {request.url.host}", request=request)
        return await transport.handle_async_request(request)


def available_sandboxes() -> dict[str, type[Sandbox]]:
    """Every emulator registered under ``gateway.sandboxes``; one that fails to import is skipped."""
    found: dict[str, type[Sandbox]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except ImportError as exc:
            log.warning("sandbox %s could not be loaded: %s", entry.name, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, Sandbox):
            found[entry.name] = cls
    return found


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the caller owns signals
        pass


@contextlib.asynccontextmanager
async def serve_apps(
    apps: Mapping[str, ASGIApp], host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[dict[str, str]]:
    """Serve each app on its own port (consecutive from ``port``, or free ports when 0).

    Yields the base URL of each app, keyed like ``apps``; stops the servers on exit.
    """
    servers: list[_Server] = []
    tasks: list[asyncio.Task[None]] = []
    urls: dict[str, str] = {}
    try:
        for index, (role, app) in enumerate(apps.items()):
            config = uvicorn.Config(
                app, host=host, port=port + index if port else 0, log_level="warning", lifespan="off",
                # as `gateway serve` runs: the gateway judges X-Forwarded-For itself (trusted_proxies)
                proxy_headers=False,
            )
            server = _Server(config)
            tasks.append(asyncio.create_task(server.serve()))
            servers.append(server)
            while not server.started:
                if tasks[-1].done():
                    tasks[-1].result()
                    raise RuntimeError(f"the {role} server did not start")
                await asyncio.sleep(0.01)
            bound = server.servers[0].sockets[0].getsockname()[1]
            urls[role] = f"http://{host}:{bound}"
        yield urls
    finally:
        for server in servers:
            server.should_exit = True
        for task in tasks:
            with contextlib.suppress(Exception):
                await task
