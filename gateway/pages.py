"""What a person sees: error pages for browsers, JSON errors for everything else.

Every error the gateway answers goes through ``error_response``: browsers (Accept admits
text/html) get a small readable page with a way forward, API clients get
``{"error": code, "message": message}``. Nothing here ever prints a traceback or a secret.

Pages and messages are in Simplified Chinese or English by ``Accept-Language`` (gateway/i18n.py),
and laid out for a 390 px phone webview: nothing is wider than the screen, long codes and URLs wrap.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import Scope

from gateway.errors import GatewayError, ProviderUnavailable, StoreUnavailable
from gateway.i18n import (
    EN,
    MESSAGES,
    Locale,
    error_message,
    error_title,
    language_headers,
    locale_of,
    text,
)
from gateway.logs import request_id

_STYLE = """
html{-webkit-text-size-adjust:100%;text-size-adjust:100%}
body{font-family:system-ui,-apple-system,"PingFang SC","Microsoft YaHei","Noto Sans CJK SC","Segoe UI",sans-serif;
margin:0;padding:0 .75rem;background:#f5f6f7;color:#1f2329;font-size:16px;line-height:1.55}
main{box-sizing:border-box;max-width:34rem;margin:8vh auto;padding:1.5rem 1.25rem;background:#fff;border-radius:12px;
box-shadow:0 2px 12px rgba(0,0,0,.08);word-wrap:break-word;overflow-wrap:break-word;word-break:break-word}
h1{font-size:1.3rem;line-height:1.35;margin:0 0 .8rem}p{margin:.6rem 0}
a.button,button{display:inline-block;box-sizing:border-box;max-width:100%;margin:.4rem .4rem 0 0;padding:.6rem 1rem;
border-radius:8px;border:0;background:#3370ff;color:#fff;text-decoration:none;font-size:1rem;cursor:pointer;
white-space:normal;text-align:center}
a.secondary{background:#e8eaed;color:#1f2329}
.meta{font-size:.85rem;color:#646a73}code{font-size:.85rem;color:#646a73;word-break:break-all}
details{font-size:.85rem;color:#646a73;margin-top:.6rem}
"""


# The one inline style of every page, allowed by its hash: no 'unsafe-inline' even for styles.
STYLE_SOURCE = "'sha256-" + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode() + "'"


def content_security_policy(
    frame_ancestors: Iterable[str], *, scripts: Iterable[str] = (), connect: Iterable[str] = ()
) -> str:
    """The CSP of a gateway response: nothing is loaded but the page's own style, plus ``scripts``
    (sources such as "'self'" or a JSSDK origin) and ``connect`` (fetch targets) when given."""
    directives = {"default-src": ["'none'"], "style-src": [STYLE_SOURCE], "base-uri": ["'none'"],
                  "form-action": ["'self'"], "frame-ancestors": list(frame_ancestors) or ["'none'"]}
    if scripts:
        directives["script-src"] = list(dict.fromkeys(scripts))
    if connect:
        directives["connect-src"] = list(dict.fromkeys(connect))
    return "; ".join(f"{name} {' '.join(sources)}" for name, sources in directives.items())


def policy_headers(csp: str) -> list[tuple[bytes, bytes]]:
    """The headers every gateway response carries (added where the response set none of its own)."""
    return [(b"content-security-policy", csp.encode("latin-1")), (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer")]


#: The names ``policy_headers`` sets.
POLICY_HEADER_NAMES = frozenset({b"content-security-policy", b"x-content-type-options", b"referrer-policy"})


def relay_policy_headers(frame_ancestors: Iterable[str]) -> list[tuple[bytes, bytes]]:
    """The policy headers of a relayed answer (gateway/relay.py), in place of the provider's: it
    is a provider's data served from the app's origin, so a document among them (an HTML file, an
    SVG) runs nothing and is sandboxed (an opaque origin: no access to the app's cookies or
    pages); framing follows ``access.frame_ancestors`` as the gateway's pages do."""
    ancestors = " ".join(frame_ancestors) or "'none'"
    return policy_headers(f"default-src 'none'; frame-ancestors {ancestors}; sandbox")


def script_json(value: Any) -> str:
    """``value`` as JSON safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&``
    escaped (``</script>``, ``<!--`` and ``<script`` change the HTML parser's state even there),
    and U+2028/U+2029 (line terminators to older JavaScript parsers)."""
    return (json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def wants_html(headers: Headers) -> bool:
    """A browser navigation: the Accept header admits text/html."""
    accept = headers.get("accept", "")
    return "text/html" in accept or "application/xhtml+xml" in accept


def page(
    title: str,
    body_html: str,
    *,
    status_code: int = 200,
    headers: Mapping[str, str] | None = None,
    locale: Locale | None = None,
) -> HTMLResponse:
    """A complete, self-contained HTML page. ``body_html`` must already be escaped. ``locale``:
    the language the page is written in (``<html lang>``, Content-Language, Vary); None for a page
    whose words do not depend on the request (English)."""
    document = (
        f"<!doctype html><html lang={locale or EN}><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body_html}</main></body></html>"
    )
    all_headers = {**(language_headers(locale) if locale else {}), **(headers or {})}
    response = HTMLResponse(document, status_code=status_code, headers=all_headers)
    response.headers["cache-control"] = "no-store"
    return response


def label(key: str, locale: Locale) -> str:
    """An action's label: ``key`` is a message id (``action.try_again``) or already the text."""
    return text(key, locale) if key in MESSAGES else key


def message_page(
    title: str,
    message: str,
    *,
    status_code: int,
    code: str,
    actions: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    locale: Locale = EN,
    detail: str | None = None,
    request: str | None = None,
) -> HTMLResponse:
    """A page that says what happened and offers links (label or label's message id -> URL) as
    the way forward; the stable ``code`` is shown as a small labelled detail (and the request id
    ``request`` beside it, for the user to quote), and ``detail`` (the English original of a
    translated message) folded away below it."""
    links = "".join(
        f'<a class="button{" secondary" if index else ""}" href="{html.escape(url)}">'
        f"{html.escape(label(key, locale))}</a>"
        for index, (key, url) in enumerate((actions or {}).items())
    )
    folded = (f"<details><summary>{html.escape(text('label.details', locale))}</summary>"
              f"<p>{html.escape(detail)}</p></details>") if detail else ""
    body = (
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        + (f"<p>{links}</p>" if links else "")
        + f'<p class=meta>{html.escape(text("label.code", locale))}<code>{html.escape(code)}</code></p>'
        + (f'<p class=meta>{html.escape(text("label.request_id", locale))}<code class=request-id>'
           f'{html.escape(request)}</code></p>' if request else "")
        + folded
    )
    return page(title, body, status_code=status_code, headers=headers, locale=locale)


def error_response(
    scope: Scope,
    status_code: int,
    code: str,
    message: str,
    *,
    actions: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
    fields: Mapping[str, object] | None = None,
    message_id: str | None = None,
) -> Response:
    """The one way the gateway answers an error: a page for browsers, JSON otherwise, in the
    request's language. ``message`` is the English sentence; the Chinese one comes from the
    catalogue by ``code`` or ``message_id`` (``fields`` fill its blanks). The JSON ``error`` is the
    stable code; ``request_id`` (page and JSON) is the id every log line of this request carries."""
    locale = locale_of(scope)
    current = request_id.get()
    sentence, detail = error_message(code, message, locale, message_id=message_id, **(fields or {}))
    all_headers = {"cache-control": "no-store", **language_headers(locale), **(headers or {})}
    if wants_html(Headers(scope=scope)):
        return message_page(
            error_title(code, status_code, locale), sentence, status_code=status_code, code=code,
            actions=actions, headers=all_headers, locale=locale, detail=detail, request=current,
        )
    body: dict[str, object] = {"error": code, "message": sentence, **(extra or {})}
    if current is not None:
        body["request_id"] = current
    return JSONResponse(body, status_code=status_code, headers=all_headers)


def gateway_error_response(scope: Scope, exc: GatewayError, *, actions: Mapping[str, str] | None = None) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, ProviderUnavailable | StoreUnavailable):
        headers["retry-after"] = str(exc.retry_after_s)
    return error_response(scope, exc.status_code, exc.code, exc.message, actions=actions, headers=headers,
                          fields=exc.fields)
