"""The edge (gateway/edge.py) alone and in front of an app, called as ASGI with hostile scopes:
every spelling of every identity and forwarding header, Connection tricks, conflicting framing,
paths that mean one thing to the gateway and another to the app (issue 10, findings 1-4, 13).

The same attacks over real sockets, under uvicorn's httptools and h11, behind the sidecar and
behind nginx: tests/test_edge_servers.py."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any
from urllib.parse import quote, unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.access import AccessRules
from gateway.config import Access, GatewayConfig
from gateway.edge import Edge, EdgeRejected, fold, normalize_target
from gateway.middleware import AuthGateway
from gateway.providers import TokenSet

IDENTITY = ["X-Auth-User", "X-Auth-Provider", "X-Auth-Tenant", "X-Auth-Name", "X-Auth-Identity",
            "X-Auth-Access-Token"]
FORWARDING = ["X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Uri", "X-Forwarded-Prefix",
              "Forwarded", "X-Real-IP", "X-Original-URI", "X-Original-URL", "X-Rewrite-URL", "True-Client-IP"]


def spellings(name: str) -> list[str]:
    """The ways a client can spell ``name`` so that some upstream reads it as ``name``."""
    lower = name.lower()
    return sorted({
        lower, name, name.upper(), lower.replace("-", "_"), name.replace("-", "_"),
        lower.replace("-", "_", 1), "_".join(lower.rsplit("-", 1)),  # X-Auth_User, x_auth-user
        lower + "_", "_" + lower, lower + "-", lower.replace("-", "__"), lower.replace("-", ""),
        lower.replace("-", "-_"),
    })


def edge(trusted: list[str] | None = None) -> Edge:
    return Edge(identity_headers=IDENTITY, trusted_proxies=trusted or [], gateway_cookies=["gw_session_login"])


# -- headers --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", IDENTITY)
def test_every_spelling_of_an_identity_header_is_removed_even_from_a_trusted_proxy(name: str) -> None:
    raw = [(spelling.encode(), b"admin") for spelling in spellings(name)] + [(b"x-other", b"kept")]
    for peer in ("203.0.113.9", "127.0.0.1"):
        _, headers = edge(["127.0.0.1/32"]).headers(raw, peer)
        assert headers == [(b"x-other", b"kept")], (peer, headers)


@pytest.mark.parametrize("name", FORWARDING)
def test_forwarding_headers_pass_only_from_a_trusted_proxy_and_only_in_their_standard_spelling(name: str) -> None:
    raw = [(spelling.encode(), b"10.9.9.9") for spelling in spellings(name)]
    _, untrusted = edge(["127.0.0.1/32"]).headers(raw, "203.0.113.9")
    assert untrusted == []
    _, trusted = edge(["127.0.0.1/32"]).headers(raw, "127.0.0.1")
    assert trusted == [(name.lower().encode(), b"10.9.9.9")]
    _, mapped = edge(["127.0.0.1/32"]).headers(raw, "::ffff:127.0.0.1")
    assert mapped == trusted


def test_a_connection_header_cannot_remove_what_the_gateway_adds_and_still_removes_what_it_names() -> None:
    raw = [
        (b"connection", b"close, X-Auth-User, x-auth-tenant, X-Auth-Identity, x_forwarded_for, x-custom, Host"),
        (b"connection", b"keep-alive, content-length, cookie, Transfer-Encoding"),
        (b"x-auth_user", b"admin"), (b"x_auth_tenant", b"victim-corp"),
        (b"x-custom", b"hop"), (b"x_custom", b"hop too"), (b"host", b"app"), (b"content-length", b"0"),
        (b"cookie", b"theme=dark"), (b"x-other", b"kept"),
    ]
    _, headers = edge().headers(raw, "203.0.113.9")
    # Identity spellings gone by rule; x-custom gone because the client named it; the names that
    # the gateway controls were ignored as Connection tokens; only harmless options go on.
    assert headers == [(b"host", b"app"), (b"content-length", b"0"), (b"cookie", b"theme=dark"),
                       (b"x-other", b"kept"), (b"connection", b"close, keep-alive")]


@pytest.mark.parametrize(("raw", "code", "status"), [
    ([(b"content-length", b"4"), (b"transfer-encoding", b"chunked")], "bad_framing", 400),
    ([(b"transfer-encoding", b"chunked"), (b"content-length", b"0")], "bad_framing", 400),
    ([(b"content-length", b"4"), (b"content-length", b"5")], "bad_framing", 400),
    ([(b"content-length", b"4, 5")], "bad_framing", 400),
    ([(b"content-length", b"-1")], "bad_framing", 400),
    ([(b"content-length", b"0x10")], "bad_framing", 400),
    ([(b"content-length", b"")], "bad_framing", 400),
    ([(b"content-length", b"1" * 19)], "bad_framing", 400),
    ([(b"transfer-encoding", b"gzip, chunked")], "unsupported_transfer_encoding", 501),
    ([(b"transfer-encoding", b"chunked, identity")], "unsupported_transfer_encoding", 501),
    ([(b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], "unsupported_transfer_encoding", 501),
    ([(b"host", b"a"), (b"host", b"b")], "bad_host", 400),
])
def test_framing_and_host_that_can_be_read_two_ways_are_refused(
    raw: list[tuple[bytes, bytes]], code: str, status: int
) -> None:
    with pytest.raises(EdgeRejected) as refused:
        edge().headers(raw, "203.0.113.9")
    assert (refused.value.code, refused.value.status_code) == (code, status)


def test_one_framing_passes_and_odd_spellings_of_framing_never_do() -> None:
    _, headers = edge().headers([(b"content-length", b"4"), (b"content-length", b"4, 4"),
                                 (b"content_length", b"99"), (b"transfer_encoding", b"chunked"),
                                 (b"con-nection", b"x-other"), (b"x-other", b"kept")], None)
    assert headers == [(b"content-length", b"4"), (b"content-length", b"4, 4"), (b"x-other", b"kept")]
    _, chunked = edge().headers([(b"transfer-encoding", b"Chunked")], None)
    assert chunked == [(b"transfer-encoding", b"Chunked")]


def test_gateway_cookies_are_taken_out_for_the_app_and_kept_for_the_gateway() -> None:
    raw = [(b"cookie", b"a=1; gw_session=T1; gw_session_login=B"), (b"cookie", b"gw_session=T2"),
           (b"co_okie", b"gw_session=leak")]
    ticket, for_app = edge().headers(raw, None)
    assert ticket == b"T1" and for_app == [(b"cookie", b"a=1")]
    ticket, for_gateway = edge().headers(raw, None, strip_cookies=False)
    assert ticket == b"T1" and for_gateway == raw[:2]


def test_fold_is_what_cgi_and_friends_would_read_as_one_name() -> None:
    assert {fold(s.encode()) for s in spellings("X-Auth-User")} == {b"xauthuser"}


# -- the path ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "path", "rewritten", "separator"), [
    ("/public/x", "/public/x", False, False),
    ("/admin/../public/x", "/public/x", True, False),
    ("/admin/%2e%2e/public/x", "/public/x", True, False),
    ("/admin/%2E%2E/public/x", "/public/x", True, False),
    ("/admin/x//../../public/y", "/public/y", True, False),  # "//" collapsed first, as nginx does: rewritten
    ("//public/x", "/public/x", True, False),
    ("/a/./b/", "/a/b/", True, False),
    ("/a/b/..", "/a/", True, False),
    ("/../../x", "/x", True, False),
    ("/files/My%20Doc", "/files/My Doc", False, False),
    ("/%7Euser/%41", "/~user/A", False, False),
    ("/projects/group%2Fname", "/projects/group/name", False, True),
    ("/a%5Cb", "/a\\b", False, True),
])
def test_normalize_target(raw: str, path: str, rewritten: bool, separator: bool) -> None:
    target = normalize_target(unquote(raw), raw.encode())
    assert (target.path, target.rewritten, target.encoded_separator) == (path, rewritten, separator)
    assert unquote(target.raw_path.decode()) == target.path


@pytest.mark.parametrize("raw", [
    "/admin/..%2fpublic/x", "/admin/..%2F..%2Fpublic/x", "/admin/.%2e%2fpublic", "/admin%2f..%2fpublic/x",
    "/a/%2e%2e%5c..%5cpublic", "/x%00y", "/x%0ay", "/x%zz", "/x%", "/x%2", "x/y", "*",
])
def test_paths_that_mean_different_things_to_different_servers_are_refused(raw: str) -> None:
    with pytest.raises(EdgeRejected) as refused:
        normalize_target(unquote(raw), raw.encode())
    assert refused.value.code == "bad_path" and refused.value.status_code == 400


_SEGMENT = st.sampled_from(["admin", "public", "x", ".", "..", "", "%2e", "%2E%2e", "%2f", "%2F", "%5c", "..%2f",
                            ".%2e", "%252e", ";", "a;b", "%20", "%41", "\\", "%00", "%"])


def _routes_as(path_segments: list[str]) -> str:
    """What an app routing on these segments serves: admin, public, or neither."""
    resolved: list[str] = []
    for segment in path_segments:
        if segment == "..":
            if resolved:
                resolved.pop()
        elif segment not in ("", "."):
            resolved.append(segment)
    return resolved[0] if resolved and resolved[0] in ("admin", "public") else "other"


@settings(max_examples=400, deadline=None)
@given(st.lists(_SEGMENT, min_size=1, max_size=7))
def test_property_a_path_judged_public_is_public_to_every_kind_of_app(segments: list[str]) -> None:
    """For any path: refused, or the app receives (path, raw_path) such that an app routing on
    the decoded path (Starlette, Django), on the raw path (Node), and either one resolving dot
    segments itself, all route it where the gateway judged it, when the gateway judged it public."""
    raw = "/" + "/".join(segments)
    rules = AccessRules(Access(public_paths=["/public/*"]))
    try:
        target = normalize_target(unquote(raw), raw.encode())
    except EdgeRejected:
        return
    decoded_reading = target.path.split("/")[1:]
    raw_reading = [unquote(segment) for segment in target.raw_path.decode().split("/")[1:]]
    assert "." not in decoded_reading and ".." not in decoded_reading and "" not in decoded_reading[:-1]
    assert unquote(target.raw_path.decode()) == target.path
    if not target.encoded_separator and rules.is_public(target.path):
        assert _routes_as(decoded_reading) == "public"
        assert _routes_as(raw_reading) == "public"
        assert _routes_as(target.path.replace("\\", "/").split("/")[1:]) == "public"


# -- in front of an app (middleware mode, ASGI called directly) ---------------------------------------

def recording_app() -> tuple[Starlette, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    async def record(request: Request) -> JSONResponse:
        body = await request.body()
        entry = {"route": request.scope["route"].path, "path": request.scope["path"],
                 "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
                 "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
                 "body": body.decode("latin-1")}
        seen.append(entry)
        return JSONResponse(entry)

    async def socket(websocket: WebSocket) -> None:
        seen.append({"route": "ws", "path": websocket.scope["path"]})
        await websocket.accept()
        await websocket.close()

    routes = [Route(path, record, methods=["GET", "POST"]) for path in ("/admin/{rest:path}", "/public/{rest:path}",
                                                                         "/{rest:path}")]
    return Starlette(routes=[WebSocketRoute("/ws", socket), *routes]), seen


def gateway_config(**access: Any) -> GatewayConfig:
    return GatewayConfig(
        public_url="http://app.test", session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
        access={"public_paths": ["/public/*"], **access},
        providers={"lark": {"plugin": "lark", "app_id": "cli_test", "app_secret": "s" * 16}},
    )


async def sign_in(gateway: AuthGateway, user: str = "mallory", tenant: str = "corp-m") -> str:
    """A session for ``user`` straight in the store (no provider involved): its cookie value."""
    runtime = gateway.runtime
    await runtime.tokens.save("lark", tenant, user, TokenSet(access_token="at", expires_at=time.time() + 3600))
    ticket, _ = await runtime.sessions.create(provider="lark", user=user, tenant=tenant, name="Mallory")
    return ticket


async def call(app: Any, method: str, raw_path: bytes, headers: list[tuple[bytes, bytes]], *,
               body: bytes = b"", client: tuple[str, int] = ("203.0.113.9", 5000)) -> tuple[int, dict[str, Any]]:
    """One HTTP request through ``app`` as uvicorn would hand it over (path decoded once)."""
    path, _, query = raw_path.partition(b"?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": unquote(path.decode("latin-1")), "raw_path": path, "query_string": query,
             "root_path": "", "headers": headers, "client": client, "server": ("127.0.0.1", 80)}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(message for message in sent if message["type"] == "http.response.start")
    content = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    try:
        data = json.loads(content)
    except ValueError:
        data = {"text": content.decode("latin-1")}
    return start["status"], data


def identity_values(entry: dict[str, Any]) -> dict[bytes, list[str]]:
    """The headers the app sees that fold onto an identity name, as a CGI/WSGI app would merge them."""
    names = {fold(name.encode()) for name in IDENTITY}
    merged: dict[bytes, list[str]] = {}
    for key, value in entry["headers"]:
        folded = fold(key.encode())
        if folded in names:
            merged.setdefault(folded, []).append(value)
    return merged


async def test_a_signed_in_user_cannot_forge_another_identity_in_any_spelling() -> None:
    app, _ = recording_app()
    gateway = AuthGateway(app, gateway_config())
    ticket = await sign_in(gateway)
    forged = [(spelling.encode(), b"admin") for name in IDENTITY for spelling in spellings(name)]
    headers = [(b"host", b"app.test"), (b"cookie", f"gw_session={ticket}".encode()), *forged,
               (b"connection", b"close, X-Auth-User, X-Auth-Tenant, X-Auth-Identity")]
    status, entry = await call(gateway, "GET", b"/orders", headers)
    assert status == 200, entry
    merged = identity_values(entry)
    assert merged[b"xauthuser"] == ["mallory"] and merged[b"xauthtenant"] == ["corp-m"]
    assert "admin" not in str(merged)
    assert ["connection", "close"] in entry["headers"]
    await gateway.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([s for name in IDENTITY for s in spellings(name)] +
                                          ["x-other", "connection", "accept", "x-forwarded-for"]),
                          st.sampled_from(["admin", "close, x-auth-user", "x-auth-identity, x-other", "v"])),
                max_size=12))
async def test_property_no_identity_header_the_app_sees_came_from_the_client(
    forged: list[tuple[str, str]]
) -> None:
    app, _ = recording_app()
    gateway = AuthGateway(app, gateway_config())
    ticket = await sign_in(gateway)
    headers = [(b"cookie", f"gw_session={ticket}".encode())] + [(k.encode(), v.encode()) for k, v in forged]
    for path in (b"/orders", b"/public/page"):
        status, entry = await call(gateway, "GET", path, headers)
        assert status == 200, entry
        merged = identity_values(entry)
        if path == b"/public/page":
            assert merged == {}
        else:
            assert merged[b"xauthuser"] == ["mallory"] and len(merged[b"xauthidentity"]) == 1
            assert all(value != "admin" and "x-auth" not in value for values in merged.values() for value in values)
    await gateway.aclose()




@pytest.mark.parametrize("raw", ["/public/%c0%ae%c0%ae/admin/x", "/public/%C0%AE%C0%AE%C0%AFadmin",
                                 "/public/%e0%80%ae%e0%80%ae/admin", "/public/%ff/x"])
async def test_escapes_that_are_not_utf8_are_never_public(raw: str) -> None:
    """``%c0%ae`` is an overlong UTF-8 ``.``: a lenient decoder (old IIS, some Java servlet
    containers) reads ``/public/../admin``, while the gateway's decoded path holds U+FFFD."""
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    status, _ = await call(gateway, "GET", raw.encode(), [(b"host", b"app.test")])
    assert status == 401 and seen == []
    assert normalize_target(unquote(raw), raw.encode()).never_public
    await gateway.aclose()
@pytest.mark.parametrize("raw", ["/admin/../public/x", "/admin/%2e%2e/public/x", "/admin/x/../../public/y",
                                 "/admin/..%2fpublic/x", "/admin/..%2F..%2Fpublic/x", "/admin/x//../../public/y",
                                 "/public/../admin/x", "/public/%2e%2e/admin/x", "/public/..;/admin/x",
                                 "/public%2f..%2fadmin/x", "/public/%2fadmin"])
async def test_an_anonymous_request_never_reaches_a_protected_route_through_a_public_path(raw: str) -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    status, entry = await call(gateway, "GET", raw.encode(), [(b"host", b"app.test")])
    if status == 200:
        # Served as public: the app routed exactly the path the gateway judged, and it is public.
        assert entry["route"] == "/public/{rest:path}" and entry["path"].startswith("/public/"), entry
        assert unquote(entry["raw_path"]) == entry["path"]
    else:
        assert status in (400, 401), (status, entry)
        assert seen == []
    await gateway.aclose()


async def test_the_app_receives_the_path_that_was_judged_and_the_gateway_paths_are_normalised_too() -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    ticket = await sign_in(gateway)
    cookie = (b"cookie", f"gw_session={ticket}".encode())
    status, entry = await call(gateway, "GET", b"/admin/x/../y//z", [cookie])
    assert status == 200 and (entry["path"], entry["raw_path"]) == ("/admin/y/z", "/admin/y/z")
    status, entry = await call(gateway, "GET", b"/files/group%2Fname", [cookie])
    assert status == 200 and (entry["path"], entry["raw_path"]) == ("/files/group/name", "/files/group%2Fname")
    status, _ = await call(gateway, "GET", b"/public/../_gateway/healthz", [])
    assert status == 200 and len(seen) == 2  # answered by the gateway itself
    status, body = await call(gateway, "GET", b"/admin/..%2fpublic/x", [cookie, (b"accept", b"application/json")])
    assert status == 400 and body["error"] == "bad_path"
    await gateway.aclose()


@pytest.mark.parametrize("framing", [
    [(b"content-length", b"4"), (b"transfer-encoding", b"chunked")],
    [(b"transfer-encoding", b"gzip, chunked")],
    [(b"content-length", b"4"), (b"content-length", b"40")],
])
async def test_conflicting_framing_is_refused_before_the_app_or_the_gateway_sees_it(
    framing: list[tuple[bytes, bytes]]
) -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config())
    for path in (b"/public/x", b"/_gateway/exchange/lark"):
        status, body = await call(gateway, "POST", path, [*framing, (b"accept", b"application/json")],
                                  body=b"0\r\n\r\nGET /admin HTTP/1.1\r\nx-auth-user: admin\r\n\r\n")
        assert status in (400, 501) and body["error"] in ("bad_framing", "unsupported_transfer_encoding")
    assert seen == []
    await gateway.aclose()


async def test_forwarding_headers_reach_the_app_only_from_trusted_proxies() -> None:
    app, _ = recording_app()
    gateway = AuthGateway(app, gateway_config(trusted_proxies=["10.0.0.0/8"]))
    headers = [(b"x-forwarded-for", b"1.2.3.4"), (b"x_forwarded_for", b"6.6.6.6"), (b"x-real-ip", b"1.2.3.4"),
               (b"x-original-url", b"/admin")]
    # (The gateway's own X-Request-Id is added to every request: tests/test_request_id.py.)
    _, entry = await call(gateway, "GET", b"/public/x", headers, client=("203.0.113.9", 1))
    assert [k for k, _ in entry["headers"] if k != "x-request-id"] == []
    _, entry = await call(gateway, "GET", b"/public/x", headers, client=("10.1.2.3", 1))
    assert [item for item in entry["headers"] if item[0] != "x-request-id"] == [
        ["x-forwarded-for", "1.2.3.4"], ["x-real-ip", "1.2.3.4"], ["x-original-url", "/admin"]]
    await gateway.aclose()


# -- forward-auth: one URI header, from a trusted proxy ----------------------------------------------

async def forward_auth(gateway: AuthGateway, headers: list[tuple[bytes, bytes]],
                       client: str = "127.0.0.1") -> int:
    status, _ = await call(gateway, "GET", b"/_gateway/auth", [(b"accept", b"application/json"), *headers],
                           client=(client, 1))
    return status


async def test_forward_auth_believes_only_the_configured_uri_header_and_only_from_a_trusted_proxy() -> None:
    app, _ = recording_app()
    gateway = AuthGateway(app, gateway_config(trusted_proxies=["127.0.0.1/32"],
                                              forward_auth_uri_header="X-Forwarded-Uri"))
    # Traefik sets X-Forwarded-Uri and passes the client's X-Original-URI through (finding 3).
    spoofed = [(b"x-forwarded-uri", b"/admin/secret"), (b"x-original-uri", b"/public/x")]
    assert await forward_auth(gateway, spoofed) == 401
    assert await forward_auth(gateway, [(b"x-forwarded-uri", b"/public/x")]) == 200
    assert await forward_auth(gateway, [(b"x-forwarded-uri", b"/public/x")], client="203.0.113.9") == 401
    assert await forward_auth(gateway, [(b"x_forwarded_uri", b"/public/x")]) == 401
    for escape in (b"/admin/../public/x", b"/admin/%2e%2e/public/x", b"/admin/..%2fpublic/x",
                   b"/admin/x//../../public/y", b"/public//x", b"/public%2fx", b"/public/x%00",
                   b"/public/%c0%ae%c0%ae/admin"):
        assert await forward_auth(gateway, [(b"x-forwarded-uri", escape)]) == 401, escape
    ticket = await sign_in(gateway)
    signed_in = [(b"cookie", f"gw_session={ticket}".encode()), (b"x-forwarded-uri", b"/admin/..%2fpublic/x")]
    assert await forward_auth(gateway, signed_in) == 200  # a session needs no public path
    await gateway.aclose()


# -- WebSockets ---------------------------------------------------------------------------------------

async def open_socket(app: Any, headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": "/ws", "raw_path": b"/ws",
             "query_string": b"", "root_path": "", "headers": headers, "client": ("203.0.113.9", 1),
             "server": ("127.0.0.1", 80), "subprotocols": []}
    incoming = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_an_authenticated_websocket_opens_only_from_an_allowed_origin() -> None:
    app, seen = recording_app()
    gateway = AuthGateway(app, gateway_config(websocket_origins=["https://tools.example.com"]))
    ticket = await sign_in(gateway)
    cookie = (b"cookie", f"gw_session={ticket}".encode())
    evil = await open_socket(gateway, [cookie, (b"origin", b"https://evil.example")])
    assert evil == [{"type": "websocket.close", "code": 1008}] and seen == []
    for origin in (b"https://tools.example.com", b"HTTPS://TOOLS.EXAMPLE.COM/"):
        ok = await open_socket(gateway, [cookie, (b"origin", origin)])
        assert ok[0]["type"] == "websocket.accept"
    assert (await open_socket(gateway, [cookie]))[0]["type"] == "websocket.accept"  # no browser, no Origin
    await gateway.aclose()
    default = AuthGateway(app, gateway_config())
    ticket = await sign_in(default)
    cookie = (b"cookie", f"gw_session={ticket}".encode())
    assert (await open_socket(default, [cookie, (b"origin", b"http://app.test")]))[0]["type"] == "websocket.accept"
    assert (await open_socket(default, [cookie, (b"origin", b"http://app.test.evil")]))[0]["code"] == 1008
    await default.aclose()


def test_quote_roundtrip_of_rewritten_paths() -> None:
    target = normalize_target("/a/../b c", quote("/a/../b c").encode())
    assert target.raw_path == b"/b%20c" and target.path == "/b c"
