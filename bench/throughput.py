"""Throughput and latency under wrk: middleware mode, sidecar mode, forward-auth mode.

Every variant of a scenario is a separate server process, all of them up at once, measured in
alternating order (``harness.alternate``); the figures are per-repetition ratios to the baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx

from bench.context import Context, Row
from bench.harness import Series, Spread, WrkResult, alternate, free_port, log, nginx, server_argv, wait_http
from bench.site import COOKIE, check, lark_emulator, login

ROOT = Path(__file__).resolve().parent.parent


def _pids(ctx: Context, url: str) -> list[int]:
    """The server process behind ``url``, when the benchmark started it (its CPU time is measured)."""
    base = url.split("/", 3)
    pid = ctx.pids.get("/".join(base[:3]))
    return [pid] if pid else []


def _runner(ctx: Context, url: str, headers: dict[str, str] | None = None,
            pids: list[int] | None = None) -> Callable[[], Awaitable[WrkResult]]:
    async def run() -> WrkResult:
        return await ctx.wrk.run(url, duration_s=ctx.options.duration_s, headers=headers,
                                 pids=_pids(ctx, url) if pids is None else pids)
    return run


Targets = dict[str, tuple[str, dict[str, str] | None]]


async def _warmup(ctx: Context, runners: Targets) -> Callable[[str], Awaitable[object]]:
    async def warm(name: str) -> object:
        url, headers = runners[name]
        return await ctx.wrk.run(url, duration_s=ctx.options.warmup_s, headers=headers)
    return warm


async def _measure(ctx: Context, targets: dict[str, tuple[str, dict[str, str] | None]],
                   pids: dict[str, list[int]] | None = None) -> Series:
    """Alternating runs of every target; the CPU time of each target's server is measured too
    (the process behind its URL, or ``pids[name]``)."""
    variants = {name: _runner(ctx, url, headers, (pids or {}).get(name)) for name, (url, headers) in targets.items()}
    return await alternate(variants, reps=ctx.options.reps, warmup=await _warmup(ctx, targets))


@contextlib.asynccontextmanager
async def _server(ctx: Context, name: str, role: str, *, config: Path | None = None, ready: str = "/",
                  server: str = "uvicorn", upstream: str | None = None, tree: Path | None = None,
                  ) -> AsyncIterator[str]:
    port = free_port() if config is None else int(_port_of(config))
    proc = ctx.processes.start(name, server_argv(role, port, config=config, server=server, upstream=upstream),
                               tree=tree)
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + ready, proc)
        ctx.pids[url] = proc.process.pid
        yield url
    finally:
        proc.stop()


def _port_of(config: Path) -> int:
    import yaml

    return int(yaml.safe_load(config.read_text())["listen"]["port"])


# -- 1. middleware mode ---------------------------------------------------------------------------


async def middleware(ctx: Context) -> list[Row]:
    """Bare Starlette app vs AuthGateway(app) with a valid cached session vs SessionMiddleware."""
    log("middleware mode: bare app vs AuthGateway vs SessionMiddleware + check")
    async with contextlib.AsyncExitStack() as stack:
        lark = await stack.enter_async_context(lark_emulator())
        config = lark.write_config(ctx.workdir / "middleware.yaml", free_port())
        bare = await stack.enter_async_context(_server(ctx, "mw-bare", "bare"))
        gateway = await stack.enter_async_context(
            _server(ctx, "mw-gateway", "gateway", config=config, ready="/_gateway/healthz"))
        handrolled = await stack.enter_async_context(_server(ctx, "mw-handrolled", "handrolled", ready="/login"))
        floor_config = lark.write_config(ctx.workdir / "middleware-floor.yaml", free_port())
        floor = await stack.enter_async_context(
            _server(ctx, "mw-floor", "floor", config=floor_config, ready="/_gateway/healthz"))
        ticket = await login(gateway, "/whoami")
        gateway_headers = {"Cookie": f"{COOKIE}={ticket}"}
        floor_headers = {"Cookie": f"{COOKIE}={await login(floor, '/whoami')}"}
        await check(floor + "/whoami", headers=floor_headers, body=lark.sandbox.current_user)
        await check(floor + "/", status=401)
        others: Targets = {}
        for label, tree in ctx.options.compare.items():
            other_config = lark.write_config(ctx.workdir / f"middleware-{label}.yaml", free_port())
            other_url = await stack.enter_async_context(
                _server(ctx, f"mw-gateway-{label}", "gateway", config=other_config, ready="/_gateway/healthz",
                        tree=tree))
            other_cookie = {"Cookie": f"{COOKIE}={await login(other_url, '/whoami')}"}
            await check(other_url + "/whoami", headers=other_cookie, body=lark.sandbox.current_user)
            others[f"gateway-{label}"] = (other_url + "/", other_cookie)
        async with httpx.AsyncClient() as client:
            session_cookie = (await client.get(handrolled + "/login")).cookies["session"]
        handrolled_headers = {"Cookie": f"session={session_cookie}"}
        await check(gateway + "/whoami", headers=gateway_headers, body=lark.sandbox.current_user)
        await check(gateway + "/", status=401)
        await check(handrolled + "/whoami", headers=handrolled_headers, body="ou_bench_user")
        await check(handrolled + "/", status=401)
        series = await _measure(ctx, {
            "bare": (bare + "/", gateway_headers),
            "gateway": (gateway + "/", gateway_headers),
            "handrolled": (handrolled + "/", handrolled_headers),
            "floor": (floor + "/", floor_headers),
            **others,
        })
    ctx.raw["middleware"] = series.as_dict()
    extra = []
    for label in ctx.options.compare:
        extra += [Row.ratio("middleware", f"AuthGateway [{label}] / bare, req/s",
                            series.ratio(f"gateway-{label}", "bare"), 0.90),
                  Row.ratio("middleware", f"AuthGateway (this tree) / [{label}], req/s",
                            series.ratio("gateway", f"gateway-{label}"))]
    return [*extra,
        Row("middleware", "bare Starlette app on uvicorn, req/s", series.spread("bare").fmt(0)),
        Row.ratio("middleware", "AuthGateway / bare, req/s", series.ratio("gateway", "bare"), 0.90),
        Row.ratio("middleware", "SessionMiddleware+check / bare, req/s", series.ratio("handrolled", "bare")),
        Row.ratio("middleware", "floor (the same job inlined, bench/apps.py) / bare, req/s",
                  series.ratio("floor", "bare")),
        Row.ratio("middleware", "AuthGateway / floor, req/s", series.ratio("gateway", "floor")),
        Row.ratio("middleware", "AuthGateway / SessionMiddleware+check, req/s",
                  series.ratio("gateway", "handrolled"), 1.00, "target: ahead of the hand-rolled alternative"),
        Row("middleware", "server CPU µs per request: bare · gateway · hand-rolled · floor",
            " · ".join(f"{series.spread(n, 'cpu_us').median:.1f}"
                       for n in ("bare", "gateway", "handrolled", "floor"))),
        Row.ratio("middleware", "bare CPU / floor CPU per request", _cpu_ratio(series, "bare", "floor")),
        Row.ratio("middleware", "bare CPU / AuthGateway CPU per request (the throughput ratio of a CPU-bound "
                  "server; steadier under load)", _cpu_ratio(series, "bare", "gateway"), 0.90),
        *[Row.ratio("middleware", f"bare CPU / AuthGateway [{label}] CPU per request",
                    _cpu_ratio(series, "bare", f"gateway-{label}"), 0.90) for label in ctx.options.compare],
        Row("middleware", "p50 / p99 latency, ms: bare · gateway · hand-rolled",
            " · ".join(f"{series.spread(n, 'p50_ms').median:.2f} / {series.spread(n, 'p99_ms').median:.2f}"
                       for n in ("bare", "gateway", "handrolled"))),
    ]



# -- 2. sidecar mode -------------------------------------------------------------------------------

NGINX_PROXY = """\
upstream bench_app {{
    server 127.0.0.1:{app_port};
    keepalive 32;
}}
server {{
    listen 127.0.0.1:{port};
    location / {{
        proxy_pass http://bench_app;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $http_host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
    }}
}}
"""


def _serve_cmd(config: Path) -> list[str]:
    """``gateway serve`` exactly as users run it (``python -m gateway`` is the same entry point)."""
    from bench.harness import PYTHON

    return [PYTHON, "-m", "gateway", "serve", "--config", str(config)]


@contextlib.asynccontextmanager
async def _gateway_serve(ctx: Context, name: str, config: Path, *, tree: Path | None = None) -> AsyncIterator[str]:
    proc = ctx.processes.start(name, _serve_cmd(config), tree=tree)
    try:
        url = f"http://127.0.0.1:{_port_of(config)}"
        await wait_http(url + "/_gateway/healthz", proc)
        ctx.pids[url] = proc.process.pid
        yield url
    finally:
        proc.stop()


async def sidecar(ctx: Context) -> list[Row]:
    """``gateway serve`` (authenticated, and a public path) vs the upstream alone vs nginx."""
    log("sidecar mode: gateway serve vs upstream directly vs nginx reverse proxy")
    async with contextlib.AsyncExitStack() as stack:
        lark = await stack.enter_async_context(lark_emulator())
        upstream = await stack.enter_async_context(_server(ctx, "upstream", "raw"))
        sections = {"upstream": {"url": upstream}, "access": {"public_paths": ["/public/*"]}}
        config = lark.write_config(ctx.workdir / "sidecar.yaml", free_port(), **sections)
        gateway = await stack.enter_async_context(_gateway_serve(ctx, "gateway-serve", config))
        nginx_port = free_port()
        proxy = await stack.enter_async_context(
            nginx(ctx.processes, "proxy", NGINX_PROXY.format(port=nginx_port, app_port=_port(upstream)), nginx_port))
        minimal = await stack.enter_async_context(_server(ctx, "aiohttp-proxy", "aiohttp-proxy", upstream=upstream))
        ticket = await login(gateway, "/")
        cookie = {"Cookie": f"{COOKIE}={ticket}"}
        await check(gateway + "/", headers=cookie, body="hello")
        await check(gateway + "/", status=401)
        await check(gateway + "/public/x", body="hello")
        targets: dict[str, tuple[str, dict[str, str] | None]] = {
            "upstream": (upstream + "/", cookie),
            "nginx": (proxy + "/", cookie),
            "gateway": (gateway + "/", cookie),
            "gateway-public": (gateway + "/public/x", cookie),
            "aiohttp-minimal": (minimal + "/", cookie),
        }
        extra_rows: list[Row] = []
        for label, tree in ctx.options.compare.items():
            other_config = lark.write_config(ctx.workdir / f"sidecar-{label}.yaml", free_port(), **sections)
            other = await stack.enter_async_context(
                _gateway_serve(ctx, f"gateway-serve-{label}", other_config, tree=tree))
            other_ticket = await login(other, "/")
            targets[f"gateway-{label}"] = (other + "/", {"Cookie": f"{COOKIE}={other_ticket}"})
            targets[f"public-{label}"] = (other + "/public/x", {"Cookie": f"{COOKIE}={other_ticket}"})
        for variant in ctx.options.sidecar_variants:
            server = "granian" if variant == "granian" else "uvicorn"
            variant_config = lark.write_config(ctx.workdir / f"sidecar-{variant}.yaml", free_port(), **sections)
            url = await stack.enter_async_context(
                _server(ctx, f"sidecar-{variant}", "sidecar", config=variant_config, server=server,
                        ready="/_gateway/healthz"))
            variant_ticket = await login(url, "/")
            await check(url + "/", headers={"Cookie": f"{COOKIE}={variant_ticket}"}, body="hello")
            targets[f"sidecar-{variant}"] = (url + "/", {"Cookie": f"{COOKIE}={variant_ticket}"})
        series = await _measure(ctx, targets)
    ctx.raw["sidecar"] = series.as_dict()
    ctx.raw["sidecar_saturation"] = {name: series.spread(name).median for name in targets
                                     if name == "gateway" or name.removeprefix("gateway-") in ctx.options.compare}
    for name in targets:
        if name.startswith("sidecar-") or name.removeprefix("gateway-") in ctx.options.compare:
            label = f"gateway serve [{name.removeprefix('gateway-')}]" if name.startswith("gateway-") else \
                f"the same sidecar on {name.removeprefix('sidecar-')}, access log off"
            extra_rows.append(Row.ratio("sidecar", f"{label} / nginx, req/s", series.ratio(name, "nginx"), 0.35))
        if name.startswith("public-"):
            label = name.removeprefix("public-")
            extra_rows.append(Row.ratio("sidecar", f"[{label}] authenticated / public path, same sidecar, req/s",
                                        series.ratio(f"gateway-{label}", name), 0.90))
    measured = [name for name in targets if name not in ("upstream", "nginx")]
    cpu_rows = [Row("sidecar", "sidecar CPU µs per request", " · ".join(
        f"{name} {series.spread(name, 'cpu_us').median:.0f}" for name in measured))]
    cpu_rows.append(Row.ratio("sidecar", "public path CPU / authenticated CPU per request, same sidecar",
                              _cpu_ratio(series, "gateway-public", "gateway"), 0.90))
    for label in ctx.options.compare:
        cpu_rows.append(Row.ratio("sidecar", f"[{label}] public path CPU / authenticated CPU per request",
                                  _cpu_ratio(series, f"public-{label}", f"gateway-{label}"), 0.90))
    return [
        *cpu_rows,
        Row("sidecar", "upstream alone (raw ASGI on uvicorn), req/s", series.spread("upstream").fmt(0)),
        Row("sidecar", "nginx → upstream, req/s", series.spread("nginx").fmt(0)),
        Row("sidecar", "gateway serve → upstream (authenticated), req/s", series.spread("gateway").fmt(0)),
        Row.ratio("sidecar", "gateway serve / nginx, req/s", series.ratio("gateway", "nginx"), 0.35),
        Row.ratio("sidecar", "minimal aiohttp proxy / nginx, req/s (the issue's reference: 0.28)",
                  series.ratio("aiohttp-minimal", "nginx")),
        Row.ratio("sidecar", "gateway serve / upstream alone, req/s", series.ratio("gateway", "upstream")),
        Row.ratio("sidecar", "authenticated / public path, same sidecar, req/s",
                  series.ratio("gateway", "gateway-public"), 0.90),
        *extra_rows,
    ]


def _cpu_ratio(series: Series, baseline: str, name: str) -> Spread:
    """baseline CPU per request / ``name``'s, per repetition: ``name``'s relative throughput if CPU-bound."""
    pairs = zip(series.runs[baseline], series.runs[name], strict=True)
    return Spread.of([b.cpu_us / n.cpu_us for b, n in pairs])


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


# -- 2b. added latency at half the saturating load ---------------------------------------------------


async def latency(ctx: Context) -> list[Row]:
    """p99 through the sidecar minus p99 of the upstream alone, both paced at half the sidecar's
    saturating throughput (from the sidecar scenario of this run, else measured here first).
    With ``--compare``, the same for each other tree's sidecar, at half of its own saturation."""
    log("sidecar latency at half the saturating load")
    rows: list[Row] = []
    connections = 16
    async with contextlib.AsyncExitStack() as stack:
        lark = await stack.enter_async_context(lark_emulator())
        upstream = await stack.enter_async_context(_server(ctx, "upstream", "raw"))
        gateways: dict[str, tuple[str, dict[str, str]]] = {}
        for label, tree in [("gateway", None), *((f"gateway-{k}", v) for k, v in ctx.options.compare.items())]:
            config = lark.write_config(ctx.workdir / f"latency-{label}.yaml", free_port(), upstream={"url": upstream})
            url = await stack.enter_async_context(_gateway_serve(ctx, f"latency-{label}", config, tree=tree))
            gateways[label] = (url, {"Cookie": f"{COOKIE}={await login(url, '/')}"})
        saturations: dict[str, float] = dict(ctx.raw.get("sidecar_saturation", {}))
        variants: dict[str, Callable[[], Awaitable[WrkResult]]] = {}
        warmups: dict[str, tuple[str, dict[str, str], float]] = {}
        for label, (url, cookie) in gateways.items():
            if label not in saturations:
                runs = [await ctx.wrk.run(url + "/", duration_s=ctx.options.duration_s, headers=cookie)
                        for _ in range(3)]
                saturations[label] = sorted(run.rps for run in runs)[1]
            rate = saturations[label] / 2
            log(f"  {label}: saturation {saturations[label]:,.0f} req/s: pacing at {rate:,.0f} req/s "
                f"over {connections} connections")
            for name, target in ((f"upstream@{label}", upstream), (label, url)):
                warmups[name] = (target + "/", cookie, rate)
                variants[name] = _paced(ctx, target + "/", cookie, connections, rate)

        async def warm(name: str) -> object:
            url, cookie, rate = warmups[name]
            return await ctx.wrk.run(url, duration_s=ctx.options.warmup_s, headers=cookie,
                                     connections=connections, rate=rate)

        series = await alternate(variants, reps=ctx.options.reps, warmup=warm)
    ctx.raw["latency"] = {"saturations": saturations, **series.as_dict()}
    for label in gateways:
        base = f"upstream@{label}"
        added = series.difference(label, base, "p99_ms")
        what = "gateway serve" if label == "gateway" else f"gateway serve [{label.removeprefix('gateway-')}]"
        rows += [
            Row("latency", f"{what}: paced at half of {saturations[label]:,.0f} req/s, achieved req/s",
                series.spread(label, "rps").fmt(0)),
            Row("latency", f"{what}: p50 / p99 ms, upstream alone · through the sidecar",
                f"{series.spread(base, 'p50_ms').median:.2f} / {series.spread(base, 'p99_ms').median:.2f} · "
                f"{series.spread(label, 'p50_ms').median:.2f} / {series.spread(label, 'p99_ms').median:.2f}"),
            Row("latency", f"{what}: p99 added, ms", added.fmt(2), "< 5 ms", added.median < 5.0),
        ]
    return rows


def _paced(ctx: Context, url: str, cookie: dict[str, str], connections: int,
           rate: float) -> Callable[[], Awaitable[WrkResult]]:
    async def run() -> WrkResult:
        return await ctx.wrk.run(url, duration_s=max(ctx.options.duration_s, 8), headers=cookie,
                                 connections=connections, rate=rate)
    return run


# -- 3. forward-auth mode ------------------------------------------------------------------------------

DEPLOY = ROOT / "deploy" / "nginx"
NGINX_ALONE = NGINX_PROXY


def _fill(template: str, **values: object) -> str:
    for name, value in values.items():
        template = template.replace("${" + name + "}", str(value))
    if "${" in template:
        raise RuntimeError(f"unfilled placeholder in an nginx recipe: {template[template.index('${'):][:40]}")
    return template


async def forward_auth(ctx: Context) -> list[Row]:
    """nginx auth_request to /_gateway/auth vs to a trivial ASGI endpoint; the cache recipe vs nginx alone."""
    log("forward-auth: nginx auth_request to the gateway vs to a trivial endpoint; the cache recipe")
    async with contextlib.AsyncExitStack() as stack:
        lark = await stack.enter_async_context(lark_emulator())
        app = await stack.enter_async_context(_server(ctx, "fa-app", "raw"))
        trivial = await stack.enter_async_context(_server(ctx, "fa-trivial", "raw"))
        ports = {name: free_port() for name in ("alone", "trivial", "gateway", "cache")}
        config = lark.write_config(ctx.workdir / "forward-auth.yaml", free_port(),
                                   public_url=f"http://127.0.0.1:{ports['gateway']}", upstream={"url": app})
        gateway = await stack.enter_async_context(_gateway_serve(ctx, "fa-gateway", config))
        plain = (DEPLOY / "forward-auth.conf").read_text()
        cached = (DEPLOY / "forward-auth-cache.conf").read_text()
        cache_dir = ctx.workdir / "nginx-auth-cache"
        sites = {
            "alone": NGINX_ALONE.format(port=ports["alone"], app_port=_port(app)),
            "trivial": _fill(plain, LISTEN_PORT=ports["trivial"], GATEWAY_PORT=_port(trivial), APP_PORT=_port(app)),
            "gateway": _fill(plain, LISTEN_PORT=ports["gateway"], GATEWAY_PORT=_port(gateway), APP_PORT=_port(app)),
            "cache": _fill(cached, LISTEN_PORT=ports["cache"], GATEWAY_PORT=_port(gateway), APP_PORT=_port(app),
                           CACHE_DIR=cache_dir),
        }
        other_gateways: dict[str, str] = {}
        for label, tree in ctx.options.compare.items():
            ports[label] = free_port()
            other_config = lark.write_config(ctx.workdir / f"forward-auth-{label}.yaml", free_port(),
                                             public_url=f"http://127.0.0.1:{ports[label]}", upstream={"url": app})
            other = await stack.enter_async_context(_gateway_serve(ctx, f"fa-gateway-{label}", other_config, tree=tree))
            other_gateways[label] = other
            sites[label] = _fill(plain, LISTEN_PORT=ports[label], GATEWAY_PORT=_port(other), APP_PORT=_port(app))
        urls = {name: await stack.enter_async_context(nginx(ctx.processes, f"fa-{name}", conf, ports[name]))
                for name, conf in sites.items()}
        # The login runs through nginx (public_url is the "gateway" nginx): the cookie serves all.
        ticket = await login(urls["gateway"], "/")
        cookies = {name: {"Cookie": f"{COOKIE}={ticket}"} for name in sites}
        for label in ctx.options.compare:  # its own gateway, its own memory store: its own login
            cookies[label] = {"Cookie": f"{COOKIE}={await login(urls[label], '/')}"}
        for name in sites:
            await check(urls[name] + "/", headers=cookies[name], body="hello")
        await check(urls["gateway"] + "/", status=401)
        await check(urls["cache"] + "/", status=401)
        await check(urls["cache"] + "/", headers={"Cookie": f"{COOKIE}=forged"}, status=401)
        auth_pids = {"trivial": _pids(ctx, trivial), "gateway": _pids(ctx, gateway), "cache": _pids(ctx, gateway),
                     **{label: _pids(ctx, url) for label, url in other_gateways.items()}}
        series = await _measure(ctx, {name: (urls[name] + "/", cookies[name]) for name in sites}, auth_pids)
    ctx.raw["forward_auth"] = series.as_dict()
    extra = [Row.ratio("forward-auth", f"→ /_gateway/auth [{label}] / → trivial endpoint, req/s",
                       series.ratio(label, "trivial"), 0.85) for label in ctx.options.compare]
    extra += [Row.ratio("forward-auth", f"trivial endpoint CPU / gateway{f' [{label}]' if label != 'gateway' else ''} "
                        "CPU per auth request (steadier under load)", _cpu_ratio(series, "trivial", label), 0.85)
              for label in ("gateway", *ctx.options.compare)]
    return [*extra,
        Row("forward-auth", "nginx alone → app, req/s", series.spread("alone").fmt(0)),
        Row("forward-auth", "nginx auth_request → trivial ASGI endpoint, req/s", series.spread("trivial").fmt(0)),
        Row("forward-auth", "nginx auth_request → /_gateway/auth, req/s", series.spread("gateway").fmt(0)),
        Row.ratio("forward-auth", "→ /_gateway/auth / → trivial endpoint, req/s",
                  series.ratio("gateway", "trivial"), 0.85),
        Row.ratio("forward-auth", "cache recipe (5 s) / nginx alone, req/s", series.ratio("cache", "alone"), 0.70),
        Row.ratio("forward-auth", "plain forward-auth / nginx alone, req/s", series.ratio("gateway", "alone")),
    ]
