"""The hot path in-process: CPU time one request costs, no server and no socket in the way.

``python -m bench.hotpath [--profile]`` calls the ASGI apps directly with a prepared scope (the
headers wrk sends plus the session cookie) and a no-op ``send``, in alternating batches:

- ``bare``: the minimal Starlette app of ``bench/apps.py``;
- ``gateway``: ``AuthGateway`` around it, a valid session in the memory store (session cached,
  token fresh: the common case);
- ``gateway-only``: ``AuthGateway`` around a no-op ASGI app, i.e. the gateway's own cost;
- ``sidecar-front``: ``AuthGateway`` around a no-op app with the sidecar's header work
  (``UpstreamProxy._request_headers``) on top.

It reports CPU microseconds per request (``time.process_time``: the process's own CPU time,
so other processes on the machine matter less; median of the batches, min–max), which is what the
throughput ratios are made of: at ~50 µs per request for the bare app on this machine, the
gateway may add at most ~5 µs to keep 0.90 of its throughput. ``--profile`` writes a cProfile of
the gateway's batches (``--profile-out``), the tool used to find the per-request work to remove.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

from bench.apps import bare_app
from gateway.config import GatewayConfig
from gateway.middleware import AuthGateway
from gateway.providers import TokenSet
from plugins.lark.sandbox import LarkSandbox

WRK_HEADERS = [(b"host", b"127.0.0.1:8080")]


def _config(**sections: Any) -> GatewayConfig:
    sandbox = LarkSandbox()
    urls = {"open": "http://127.0.0.1:9", "accounts": "http://127.0.0.1:9"}
    return GatewayConfig(public_url="http://127.0.0.1:8080",
                         session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
                         providers={"lark": sandbox.provider_settings(urls)}, **sections)


async def signed_in(gateway: AuthGateway) -> str:
    """A session created through the gateway's runtime, as the code exchange does: the cookie."""
    runtime = gateway.runtime
    now = time.time()
    tokens = TokenSet(access_token="u-" + secrets.token_urlsafe(24), refresh_token="ur-" + secrets.token_urlsafe(24),
                      expires_at=now + 7200, refresh_expires_at=now + 30 * 86400)
    await runtime.tokens.save("lark", "tenant-1", "ou_bench_user", tokens)
    ticket, _ = await runtime.sessions.create(provider="lark", user="ou_bench_user", tenant="tenant-1",
                                              name="Bench User")
    return ticket


def scope_for(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 40000), "scheme": "http", "method": "GET",
            "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers,
            "state": {}}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def _noop_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


class _SidecarFront:
    """The per-request header work of the sidecar, without the network."""

    def __init__(self) -> None:
        from gateway.proxy import UpstreamProxy

        self.proxy = UpstreamProxy(url="http://127.0.0.1:9")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.proxy._request_headers(scope)
        self.proxy._target(scope, "http://127.0.0.1:9")
        await _noop_app(scope, receive, send)


async def measure(batch: int = 5000, batches: int = 9, profile: str | None = None) -> dict[str, list[float]]:
    apps: dict[str, Any] = {"bare": bare_app()}
    gateways = {"gateway": AuthGateway(bare_app(), _config()), "gateway-only": AuthGateway(_noop_app, _config()),
                "sidecar-front": AuthGateway(_SidecarFront(), _config())}
    scopes: dict[str, dict[str, Any]] = {}
    for name, gateway in gateways.items():
        ticket = await signed_in(gateway)
        apps[name] = gateway
        scopes[name] = scope_for("/", [*WRK_HEADERS, (b"cookie", f"gw_session={ticket}".encode())])
    scopes["bare"] = scopes["gateway"]
    for name, app in apps.items():  # check each one answers 200 (a 401 would be measured too fast)
        statuses: list[int] = []

        async def record(message: dict[str, Any], statuses: list[int] = statuses) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scopes[name], headers=list(scopes[name]["headers"])), _receive, record)
        if statuses != [200]:
            raise RuntimeError(f"{name} answered {statuses}")
    results: dict[str, list[float]] = {name: [] for name in apps}
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    for round_ in range(batches):
        names = list(apps)
        names = names[round_ % len(names):] + names[: round_ % len(names)]
        for name in names:
            app, scope = apps[name], scopes[name]
            headers = scope["headers"]
            if profiler is not None and name == "gateway":
                profiler.enable()
            started = time.process_time()
            for _ in range(batch):
                # A new scope per request, as a server builds one (the gateway must not mutate ours).
                await app({**scope, "headers": list(headers)}, _receive, _send)
            elapsed = time.process_time() - started
            if profiler is not None and name == "gateway":
                profiler.disable()
            results[name].append(elapsed / batch * 1e6)
    for gateway in gateways.values():
        await gateway.aclose()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    return results


def summary(results: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    return {name: (statistics.median(v), min(v), max(v)) for name, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=9)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-out", default="/tmp/gateway-hotpath.prof")
    args = parser.parse_args()
    results = asyncio.run(measure(args.batch, args.batches, args.profile_out if args.profile else None))
    for name, (median, low, high) in summary(results).items():
        print(f"{name:14s} {median:7.2f} µs/request ({low:.2f}–{high:.2f})")
    bare = statistics.median(results["bare"])
    added = [g - b for g, b in zip(results["gateway"], results["bare"], strict=True)]
    print(f"gateway adds  {statistics.median(added):7.2f} µs/request ({min(added):.2f}–{max(added):.2f}) "
          f"to the bare app's {bare:.2f}")
    if args.profile:
        import pstats

        pstats.Stats(args.profile_out).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
