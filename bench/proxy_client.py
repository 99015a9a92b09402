"""Which HTTP client should the sidecar's data plane use? Measure it.

Three processes on loopback: a trivial upstream, a proxy in front of it, and wrk against the proxy.

    python bench/proxy_client.py upstream --port 9101 &
    python bench/proxy_client.py proxy --client aiohttp --port 9102 --upstream http://127.0.0.1:9101 &
    wrk -t2 -c32 -d10s http://127.0.0.1:9102/

``--client`` is ``httpx`` or ``aiohttp`` (a minimal streaming proxy built on that client, nothing
else) or ``gateway`` (the real ``gateway.proxy.UpstreamProxy``, whose HTTP client is now its own:
see its docstring). ``python -m bench --only sidecar`` measures the aiohttp one against nginx and
``gateway serve`` in the same run; this script stays for quick manual comparisons. Every server is uvicorn with its
defaults (uvloop + httptools when installed), access log off, one worker. Run from the project
root with ``PYTHONPATH=.`` for ``gateway``; wrk at the upstream's own port gives the no-proxy ceiling.
"""

from __future__ import annotations

import argparse
from typing import Any

import uvicorn

Scope = dict[str, Any]


async def upstream_app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b"hello from upstream\n"
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _target(scope: Scope, upstream: str) -> str:
    query = scope["query_string"].decode("latin-1")
    return upstream + scope["raw_path"].decode("latin-1") + ("?" + query if query else "")


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k != b"host"]


def httpx_proxy(upstream: str) -> Any:
    import httpx

    client = httpx.AsyncClient(limits=httpx.Limits(max_connections=100), timeout=30)

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await receive()
        request = client.build_request(scope["method"], _target(scope, upstream), headers=_headers(scope))
        response = await client.send(request, stream=True)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(k, v) for k, v in response.headers.raw
                                    if k.lower() not in (b"connection", b"transfer-encoding")]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


def aiohttp_proxy(upstream: str) -> Any:
    import aiohttp

    session: aiohttp.ClientSession | None = None

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] != "http":
            return
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100), auto_decompress=False)
        await receive()
        async with session.request(scope["method"], _target(scope, upstream), headers=_headers(scope),
                                   allow_redirects=False) as response:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k.lower(), v) for k, v in response.raw_headers
                                    if k.lower() not in (b"connection", b"transfer-encoding")]})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["upstream", "proxy"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--client", choices=["httpx", "aiohttp", "gateway"], default="aiohttp")
    parser.add_argument("--upstream", default="http://127.0.0.1:9101")
    args = parser.parse_args()
    if args.role == "upstream":
        app: Any = upstream_app
    elif args.client == "httpx":
        app = httpx_proxy(args.upstream)
    elif args.client == "aiohttp":
        app = aiohttp_proxy(args.upstream)
    else:
        from gateway.proxy import UpstreamProxy

        app = UpstreamProxy(url=args.upstream)
    uvicorn.run(app, host="127.0.0.1", port=args.port, access_log=False, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
