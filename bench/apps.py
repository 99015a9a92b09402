"""The apps the benchmarks serve, one per process: ``python -m bench.apps ROLE --port P [...]``.

Roles:

- ``bare``: a minimal Starlette app (``/`` answers ``hello``; ``/whoami`` echoes X-Auth-User);
- ``gateway``: the same app wrapped in ``AuthGateway`` (``--config``);
- ``floor``: the same app behind the least any authenticating middleware does on the common request
  (a valid session cached in-process): the identity headers stripped, the lone session cookie taken
  out, one dict lookup, the identity headers added; written inline, nothing else (``floor_app``).
  Anything else goes to an ``AuthGateway`` behind it (``--config``). Not a product: it places the
  gateway between the bare app and what this machine allows a Python middleware at all;
- ``handrolled``: the same app behind what users write themselves: Starlette's ``SessionMiddleware``
  (itsdangerous-signed cookie) and a session check in the endpoint; ``/login`` sets the session;
- ``raw``: a raw ASGI app answering ``hello`` to any path (the sidecar's upstream, and the
  "fastest possible Python endpoint" of the forward-auth comparison);
- ``token-echo``: a raw ASGI app answering the X-Auth-Access-Token it received (refresh storm);
- ``sidecar``: what ``gateway serve`` builds (``gateway.cli.build_sidecar``, ``--config``), served
  with the access log off; lets the benchmark try another server (``--server granian``);
- ``aiohttp-proxy``: the minimal aiohttp proxy of ``bench/proxy_client.py`` (``--upstream``), the
  reference point of the issue.

Every server runs one worker on loopback, uvicorn with uvloop and httptools (its defaults when
installed), access log off; ``--server granian`` serves the same app on granian (ASGI, one worker).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

HANDROLLED_SECRET = "bench-handrolled-secret-0123456789abcdef"


async def _home(request: Request) -> Response:
    return PlainTextResponse("hello")


async def _whoami(request: Request) -> Response:
    return PlainTextResponse(request.headers.get("x-auth-user", ""))


def bare_app() -> Starlette:
    return Starlette(routes=[Route("/", _home), Route("/whoami", _whoami), Route("/public/{rest:path}", _home)])


def handrolled_app() -> Starlette:
    """Starlette ``SessionMiddleware`` + a session check: what a team writes without a gateway."""

    def login_required(request: Request) -> Response | None:
        if "user" not in request.session:
            return JSONResponse({"error": "login_required"}, status_code=401)
        return None

    async def home(request: Request) -> Response:
        return login_required(request) or PlainTextResponse("hello")

    async def whoami(request: Request) -> Response:
        return login_required(request) or PlainTextResponse(str(request.session["user"]))

    async def login(request: Request) -> Response:
        request.session["user"] = "ou_bench_user"
        return PlainTextResponse("signed in")

    return Starlette(routes=[Route("/", home), Route("/whoami", whoami), Route("/login", login)],
                     middleware=[Middleware(SessionMiddleware, secret_key=HANDROLLED_SECRET, https_only=False)])


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")]})
    await send({"type": "http.response.body", "body": b"hello\n"})


async def token_echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the provider access token the gateway passed (``identity.pass_access_token``)."""
    if scope["type"] != "http":
        return
    token = next((value for name, value in scope["headers"] if name == b"x-auth-access-token"), b"<none>")
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(token)).encode())]})
    await send({"type": "http.response.body", "body": token})


def make_app(role: str | None = None, config_path: str | None = None, upstream: str | None = None) -> Any:
    role = role or os.environ["BENCH_ROLE"]
    config_path = config_path or os.environ.get("BENCH_CONFIG")
    upstream = upstream or os.environ.get("BENCH_UPSTREAM")
    if role == "bare":
        return bare_app()
    if role == "handrolled":
        return handrolled_app()
    if role == "raw":
        return raw_app
    if role == "token-echo":
        return token_echo_app
    if role == "aiohttp-proxy":
        from bench.proxy_client import aiohttp_proxy

        return aiohttp_proxy(upstream or "http://127.0.0.1:9101")
    from gateway.config import load_config

    if config_path is None:
        raise SystemExit(f"{role} needs --config")
    config = load_config(config_path)
    if role in ("gateway", "floor"):
        from gateway.middleware import AuthGateway

        gateway = AuthGateway(bare_app(), config)
        return gateway if role == "gateway" else floor_app(bare_app(), gateway)
    if role == "sidecar":
        from gateway.cli import build_sidecar

        return build_sidecar(config)
    raise SystemExit(f"unknown role {role!r}")


def floor_app(app: Any, gateway: Any) -> Any:
    """``app`` behind the minimum of the gateway's per-request work, inlined (see ``floor`` above)."""
    import time

    cached = gateway.runtime.authenticator.cached
    spoofable = gateway.runtime.spoofable
    lower = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
    prefix = gateway.config.session.cookie_name.encode() + b"="

    async def floor(scope: Any, receive: Any, send: Any) -> None:
        path = scope["path"] if scope["type"] == "http" else "/_gateway"
        raw_path = scope.get("raw_path") or b""
        if "//" in path or "/." in path or 37 in raw_path or path.startswith("/_gateway"):
            await gateway(scope, receive, send)
            return
        ticket = None
        headers = []
        for item in scope["headers"]:
            key = item[0]
            if key == b"cookie" and item[1].startswith(prefix) and 59 not in item[1]:
                ticket = item[1][len(prefix):]
            elif key.translate(lower, b"-_") not in spoofable:  # folded, as gateway.edge compares names
                headers.append(item)
        entry = cached(ticket.decode("latin-1")) if ticket else None
        if entry is None or time.time() >= entry.renew_at:
            await gateway(scope, receive, send)
            return
        headers.extend(entry.headers)
        await app({**scope, "headers": headers}, receive, send)

    return floor


def granian_factory() -> Any:
    """Granian's ``--factory`` target: the role and config come from the environment."""
    return make_app()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--upstream")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn")
    args = parser.parse_args()
    if args.server == "granian":
        os.environ.update({"BENCH_ROLE": args.role, **({"BENCH_CONFIG": args.config} if args.config else {}),
                           **({"BENCH_UPSTREAM": args.upstream} if args.upstream else {})})
        os.execvp(sys.executable, [
            sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
            "--port", str(args.port), "--workers", "1", "--no-ws", "--log-level", "warning",
            "--no-access-log", "--factory", "bench.apps:granian_factory"])
    import uvicorn

    uvicorn.run(make_app(args.role, args.config, args.upstream), host="127.0.0.1", port=args.port,
                access_log=False, log_level="warning", proxy_headers=False, server_header=False,
                date_header=False, lifespan="on")


if __name__ == "__main__":
    main()
