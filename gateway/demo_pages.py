"""The demo's own pages: the tour (``/demo/``) and the app page (``/``), laid out for a 390 px webview.

The demo app sits behind the gateway but is its own app, so it sets its own Content-Security-Policy
the way the gateway's pages do (``gateway/pages.py``): nothing inline, its script and stylesheet
from its own origin (``/demo/static/``), fetches to itself only. Everything shown is escaped here;
error codes appear as a small labelled detail, never as if they were text.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from starlette.responses import HTMLResponse, Response

from gateway.demo_tour import Tour, TourProvider
from gateway.sandbox import DemoApiCall

STATIC = Path(__file__).with_name("static")
#: The files under /demo/static/ (name -> media type); nothing else is served from there.
STATIC_FILES = {"demo.js": "application/javascript", "demo.css": "text/css"}

DEMO_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")

# A key on a blue tile: the favicon, inline SVG (no binary file to keep).
FAVICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 64 64">'
    '<rect width="64" height="64" rx="14" fill="#3370ff"/>'
    '<circle cx="24" cy="32" r="11" fill="none" stroke="#fff" stroke-width="6"/>'
    '<path d="M34 32h20M46 32v9M53 32v6" stroke="#fff" stroke-width="6" stroke-linecap="round"/></svg>'
)

#: The steps of a sign-in, as the timeline marks them.
STEPS = (("jsapi", "JSAPI call"), ("code", "code"), ("exchange", "exchange"), ("tokens", "tokens"),
         ("identity", "identity"))


def favicon() -> Response:
    return Response(FAVICON_SVG, media_type="image/svg+xml", headers={"cache-control": "max-age=86400"})


def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return Response("Not found", status_code=404, media_type="text/plain")
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers={"cache-control": "no-cache"})


def demo_page(title: str, body_html: str, *, page_kind: str, status_code: int = 200, scripts: tuple[str, ...] = (),
              csp: str = DEMO_CSP, referrer_policy: str = "no-referrer") -> HTMLResponse:
    """A complete demo page (``body_html`` already escaped); ``page_kind`` tells demo.js what to run.
    ``scripts``: same-origin scripts loaded before demo.js (the relay page's gateway.js)."""
    extra = "".join(f'<script src="{html.escape(src)}"></script>' for src in scripts)
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel=icon href="/favicon.ico" type="image/svg+xml">'
        '<link rel=stylesheet href="/demo/static/demo.css">'
        f'{extra}<script src="/demo/static/demo.js" defer></script></head>'
        f'<body data-page="{html.escape(page_kind)}"><main>{body_html}</main></body></html>'
    )
    return HTMLResponse(document, status_code=status_code, headers={
        "cache-control": "no-store", "content-security-policy": csp,
        "x-content-type-options": "nosniff", "referrer-policy": referrer_policy,
    })


def _timeline_panel() -> str:
    legend = " → ".join(f'<span class="kind k-{kind}">{html.escape(label)}</span>' for kind, label in STEPS)
    return (
        '<section class="panel" id="timeline-panel"><h2>Timeline</h2>'
        f'<p class="legend">{legend}</p>'
        '<p class="hint">Every step the emulators and the app see, as it happens (time since the step before).</p>'
        '<ol id="timeline" aria-live="polite"></ol>'
        '<p><button type="button" class="secondary small" id="timeline-clear">Clear</button></p></section>'
    )


def _switch(provider: TourProvider, switch: str, label: str, help_text: str, *, on: bool,
            applicable: bool = True, answers: tuple[str, ...] = (), forget_storage: tuple[str, ...] = ()) -> str:
    """A switch, what it makes happen, and the provider's answers as labelled codes.
    ``forget_storage``: the localStorage key prefixes demo.js removes when the switch goes on."""
    checked = " checked" if on else ""
    disabled = "" if applicable else " disabled"
    forget = f' data-forget-storage="{html.escape(json.dumps(list(forget_storage)))}"' if forget_storage else ""
    codes = ""
    if answers:
        codes = ' <small class="code">provider answers: ' + ", ".join(
            f"<code>{html.escape(answer)}</code>" for answer in answers) + "</small>"
    return (
        f'<label class="switch{" off" if not applicable else ""}">'
        f'<input type="checkbox" data-provider="{html.escape(provider.name)}" data-switch="{switch}"'
        f"{forget}{checked}{disabled}>"
        f' <span>{html.escape(label)}</span></label><p class="hint">{html.escape(help_text)}{codes}</p>'
    )


def _shared_note(provider: TourProvider) -> str:
    """Said on each card of an emulator that serves several: its switches apply to all of them."""
    count = provider.shared_with
    if count < 2:
        return ""
    together = "Both" if count == 2 else f"All {count}"
    applies = "both" if count == 2 else "all of them"
    return (f'<p class="hint">{together} {html.escape(provider.emulator_title)} apps share one emulator: '
            f"a switch applies to {applies}.</p>")


def _provider_card(provider: TourProvider, state: Mapping[str, Any], relay_call: DemoApiCall | None = None) -> str:
    name = html.escape(provider.name)
    entry = provider.entry
    approve = ""
    if provider.approval:
        approve = (f'<p class="admin"><button type="button" class="small" data-action="approve" data-provider="{name}">'
                   "Approve as the administrator</button>")
        if entry.admin_can_refuse:
            approve += (f' <button type="button" class="small secondary" data-action="reject" data-provider="{name}">'
                        "Refuse as the administrator</button>")
        answered = str(state.get("approval_status") or "")
        status = html.escape(f"administrator: {answered}" if answered else "")  # as demo.js writes it
        approve += f' <span class="status" data-status="{name}">{status}</span></p>'
    return (
        f'<section class="panel provider" id="provider-{name}"><h2>{html.escape(provider.title)}</h2>'
        f'<p class="open"><a class="button" href="/demo/client/none?provider={name}">Open in the browser</a>'
        f'<a class="button secondary" href="/demo/client/{html.escape(provider.emulator)}?provider={name}">'
        "Open in the simulated client</a></p>"
        + _relay_links(provider, relay_call)
        + _switch(provider, "deny", "The user denies", entry.deny_help, on=bool(state.get("deny")),
                  answers=entry.deny_answers)
        + _switch(provider, "approval", "The admin must approve", entry.approval_help,
                  on=bool(state.get("approval")), applicable=provider.approval,
                  answers=entry.approval_answers or (), forget_storage=entry.forget_storage)
        + approve
        + f'<p class="actions"><button type="button" class="small" data-action="expire" data-provider="{name}">'
        "Expire the access token now</button>"
        f'<button type="button" class="small" data-action="second-device" data-provider="{name}">'
        "Sign in again on a second device</button></p>"
        '<p class="hint">These two act on your session: sign in with this provider first. Expiring sends '
        "5 requests at once: watch one refresh in the timeline. A second device gets new tokens: watch what "
        "happens to the old ones.</p>"
        + _shared_note(provider) + "</section>"
    )


def _relay_links(provider: TourProvider, call: DemoApiCall | None) -> str:
    if call is None:
        return ""
    name = html.escape(provider.name)
    return (f'<p class="relay">Call {html.escape(call.title)} through the relay: '
            f'<a href="/demo/client/{html.escape(provider.emulator)}?provider={name}&amp;then=relay">in the simulated '
            f'client</a> · <a href="/demo/client/none?provider={name}&amp;then=relay">in the browser</a></p>')


def _shortened(value: str, limit: int = 80) -> str:
    return value if len(value) <= limit else value[:limit] + "…"


def tour_page(providers: Iterable[TourProvider], states: Mapping[str, Mapping[str, Any]], prefix: str,
              relay_calls: Mapping[str, DemoApiCall] | None = None) -> HTMLResponse:
    calls = relay_calls or {}
    cards = "".join(_provider_card(provider, states.get(provider.name, {}), calls.get(provider.name))
                    for provider in providers)
    body = (
        "<h1>In-client SSO gateway: the tour</h1>"
        "<p>The app at <code>/</code> sits behind the gateway. Open it with a provider, in a plain browser "
        "(the OAuth redirect to the provider's emulator) or inside a simulated client (the silent JSAPI "
        "handshake), and use the switches to see what real users meet.</p>"
        '<section class="panel" id="identity-panel"><h2>Your session</h2>'
        '<p id="identity-summary">Not signed in.</p><pre id="identity-claims" class="json" hidden></pre>'
        f'<form method="post" action="{html.escape(prefix)}/logout"><button class="secondary small">Sign out</button>'
        "</form></section>"
        '<p id="tour-message" class="message" role="status" hidden></p>'
        + cards + _timeline_panel()
    )
    return demo_page("Gateway demo: the tour", body, page_kind="tour")


def app_page(
    name: str, claims: Mapping[str, Any], verdict: str, headers: Mapping[str, str], prefix: str
) -> HTMLResponse:
    """The app behind the gateway: the identity it received, readable on a phone."""
    rows = "".join(
        f"<tr><th><code>{html.escape(key)}</code></th><td>{html.escape(_shortened(value))}</td></tr>"
        for key, value in sorted(headers.items())
    )
    body = (
        f"<h1>Hello, {html.escape(name)}</h1>"
        "<p>This page is the demo app behind the gateway. It received these headers:</p>"
        f'<table class="headers">{rows}</table>'
        f"<p>Identity JWT: {html.escape(verdict)}</p>"
        f'<pre class="json">{html.escape(json.dumps(dict(claims), indent=2, ensure_ascii=False))}</pre>'
        f'<p><a class="button" href="/demo/">Back to the tour</a></p>'
        f'<form method="post" action="{html.escape(prefix)}/logout"><button class="secondary">Sign out</button></form>'
        + _timeline_panel()
    )
    return demo_page("Demo app", body, page_kind="app")


def _relay_policy(origins: Iterable[str]) -> str:
    """The demo's CSP, plus what gateway.fetch needs inside a simulated client: the emulators'
    fake JSSDKs (scripts from their hosts) and the calls those make to their hosts."""
    hosts = " ".join(dict.fromkeys(origins))
    return (DEMO_CSP.replace("script-src 'self'", f"script-src 'self' {hosts}")
            .replace("connect-src 'self'", f"connect-src 'self' {hosts}"))


def _relay_card(tour: Tour, name: str, user: str, *, in_client: bool, prefix: str) -> str:
    provider = tour.providers[name]
    call = tour.api_calls[name]
    url = f"{prefix}/api/{name}/{call.url_path(user)}"
    if call.in_client_consent:
        how = ("A missing scope is <code>403 consent_required</code>: inside the client, gateway.fetch runs the "
               "consent in this page (the client's JSAPI asks the user for exactly that scope) and calls again, "
               "without reloading the page. ")
    else:
        how = ""
    reauthorize = ""
    if not call.in_client_consent:
        where = provider.emulator if in_client else "none"
        reauthorize = (f'<p id="relay-reauthorize" hidden><a class="button secondary" '
                       f'href="/demo/client/{html.escape(where)}?provider={html.escape(name)}&amp;then=relay">'
                       "Authorize the app again (a new sign-in: this page is left, then reopened)</a></p>")
    return (
        f'<section class="panel" id="relay-panel" data-provider="{html.escape(name)}">'
        f"<h2>{html.escape(provider.title)}: {html.escape(call.title)}</h2>"
        f'<p><code>GET {html.escape(url)}</code></p>'
        f'<p><button type="button" class="small secondary" id="relay-withhold" data-provider="{html.escape(name)}">'
        f"Withdraw the user's grant of {html.escape(call.scope)}</button></p>"
        "<p class=\"hint\">At the emulator: the user has not granted that scope now (as if they had withdrawn "
        "it, or the app asked for it after they authorized); the next call needs it again.</p>"
        f'<p class="hint" id="relay-how">{how}{html.escape(call.consent_note)}</p>'
        f'<p><button type="button" id="relay-call" data-url="{html.escape(url)}" data-shows="{html.escape(call.shows)}"'
        f' data-consent="{"in-client" if call.in_client_consent else "none"}">Call it with gateway.fetch</button></p>'
        '<p id="relay-status" class="message" role="status" hidden></p>'
        '<ol id="relay-steps" class="steps"></ol>'
        '<pre id="relay-answer" class="json" hidden></pre>'
        '<p id="relay-consent" hidden><a class="button secondary" id="relay-consent-link" href="/demo/">'
        "Continue on the provider's consent page</a></p>"
        + reauthorize
        + '<p class="hint">This page was loaded at <span id="relay-loaded"></span>; the time stays while the page '
          "is not reloaded.</p></section>"
    )


def relay_page(tour: Tour, claims: Mapping[str, Any], *, in_client: bool, prefix: str) -> HTMLResponse:
    """One Open API of the signed-in provider, called through ``<prefix>/api/...`` with gateway.fetch."""
    name = str(claims.get("provider", ""))
    who = str(claims.get("name") or claims.get("user") or "?")
    if name in tour.api_calls and name in tour.providers:
        card = _relay_card(tour, name, str(claims.get("user", "")), in_client=in_client, prefix=prefix)
        title = tour.providers[name].title
        intro = (f"<p>Signed in with {html.escape(title)} as {html.escape(who)}, "
                 f"{'inside the simulated client' if in_client else 'in a plain browser'}. The button calls the "
                 "provider's Open API through the gateway: the page never holds a token, the gateway attaches "
                 "the user's and refreshes it.</p>")
    else:
        card = '<section class="panel" id="relay-panel"><p>The demo calls no API of this provider.</p></section>'
        intro = f"<p>Signed in as {html.escape(who)}.</p>"
    others = "".join(
        f'<li>{html.escape(provider.title)}: <a href="/demo/client/{html.escape(provider.emulator)}?provider='
        f'{html.escape(provider.name)}&amp;then=relay">in the simulated client</a> · '
        f'<a href="/demo/client/none?provider={html.escape(provider.name)}&amp;then=relay">in the browser</a></li>'
        for provider in tour.providers.values() if provider.name in tour.api_calls)
    body = (
        "<h1>Provider APIs through the relay</h1>" + intro
        + '<p id="tour-message" class="message" role="status" hidden></p>'
        + card
        + f'<section class="panel"><h2>Another provider</h2><ul class="others">{others}</ul>'
          '<p><a class="button secondary" href="/demo/">Back to the tour</a></p></section>'
        + _timeline_panel()
    )
    return demo_page("Demo: provider APIs through the relay", body, page_kind="relay",
                     scripts=(f"{prefix}/static/gateway.js",), csp=_relay_policy(tour.origins),
                     referrer_policy="same-origin")
