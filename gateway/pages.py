"""What a person sees: error pages for browsers, JSON errors for everything else.

Every error the gateway answers goes through ``error_response``: browsers (Accept admits
text/html) get a small readable page with a way forward, API clients get
``{"error": code, "message": message}``. Nothing here ever prints a traceback or a secret.
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

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f5f6f7;color:#1f2329}
main{max-width:34rem;margin:12vh auto;padding:2rem;background:#fff;border-radius:12px;
box-shadow:0 2px 12px rgba(0,0,0,.08)}
h1{font-size:1.3rem;margin:0 0 .8rem}p{line-height:1.5}a.button,button{display:inline-block;margin:.4rem .4rem 0 0;
padding:.55rem 1rem;border-radius:8px;border:0;background:#3370ff;color:#fff;text-decoration:none;font-size:1rem;
cursor:pointer}a.secondary{background:#e8eaed;color:#1f2329}code{font-size:.85rem;color:#646a73}
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
    title: str, body_html: str, *, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> HTMLResponse:
    """A complete, self-contained HTML page. ``body_html`` must already be escaped."""
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body_html}</main></body></html>"
    )
    response = HTMLResponse(document, status_code=status_code, headers=dict(headers or {}))
    response.headers["cache-control"] = "no-store"
    return response


def message_page(
    title: str,
    message: str,
    *,
    status_code: int,
    code: str,
    actions: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> HTMLResponse:
    """A page that says what happened and offers links (label -> URL) as the way forward."""
    links = "".join(
        f'<a class="button{" secondary" if index else ""}" href="{html.escape(url)}">{html.escape(label)}</a>'
        for index, (label, url) in enumerate((actions or {}).items())
    )
    body = (
        f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>"
        f"<p>{links}</p><p><code>{html.escape(code)}</code></p>"
    )
    return page(title, body, status_code=status_code, headers=headers)


# A title by error code first (what happened), else by status.
_CODE_TITLES = {
    "approval_pending": "Waiting for your administrator",
    "access_denied": "Sign-in was declined",
    "tenant_not_allowed": "Your organisation cannot use this app",
    "login_required": "Please sign in",
}
_TITLES = {
    400: "This request could not be used",
    401: "Please sign in again",
    403: "Access denied",
    404: "Not found",
    405: "Method not allowed",
    413: "This request is too large",
    429: "Too many attempts",
    502: "The service behind this page is unavailable",
    503: "Temporarily unavailable",
    504: "The service behind this page did not answer in time",
}


def error_response(
    scope: Scope,
    status_code: int,
    code: str,
    message: str,
    *,
    actions: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, str] | None = None,
) -> Response:
    """The one way the gateway answers an error: a page for browsers, JSON otherwise."""
    all_headers = {"cache-control": "no-store", **(headers or {})}
    if wants_html(Headers(scope=scope)):
        title = _CODE_TITLES.get(code) or _TITLES.get(status_code, "Something went wrong")
        return message_page(
            title, message, status_code=status_code, code=code, actions=actions, headers=all_headers
        )
    return JSONResponse({"error": code, "message": message, **(extra or {})}, status_code=status_code,
                        headers=all_headers)


def gateway_error_response(scope: Scope, exc: GatewayError, *, actions: Mapping[str, str] | None = None) -> Response:
    headers: dict[str, str] = {}
    if isinstance(exc, ProviderUnavailable | StoreUnavailable):
        headers["retry-after"] = str(exc.retry_after_s)
    return error_response(scope, exc.status_code, exc.code, exc.message, actions=actions, headers=headers)
