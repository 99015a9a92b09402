"""``gateway serve | demo | sandbox | check-config`` (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
import yaml

from gateway.config import ConfigFileError, GatewayConfig, Logging, load_config, masked_dict
from gateway.errors import ConfigError
from gateway.logs import configure as configure_logging
from gateway.logs import uvicorn_log_config


def redact_query(target: str) -> str:
    """A request target as the access log may show it: every query value replaced by ``***``.

    Not a list of sensitive names: the callbacks carry ``code``, ``authCode``, ``auth_code``,
    ``state``, DingTalk ISV pushes a ``suiteTicket``, and the app's own URLs may hold tokens. The
    names are kept (``/_gateway/callback/lark?code=***&state=***``), a part without ``=`` is a
    value too."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = (name + "=***" if equals else "***"
             for name, equals, _ in (part.partition("=") for part in query.split("&")))
    return f"{path}?{'&'.join(parts)}"


class RedactQuery(logging.Filter):
    """On ``uvicorn.access``: the logged target goes through ``redact_query``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn logs (client_addr, method, full_path, http_version, status_code).
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


def _log_config(settings: Logging | None = None) -> dict[str, Any]:
    """uvicorn's logging setup: its own lines and its access log in the gateway's format
    (``logging.format``, gateway/logs.py), with ``RedactQuery`` on its access logger."""
    settings = settings or Logging()
    config = uvicorn_log_config(settings.format, settings.level)
    config.setdefault("filters", {})["redact_query"] = {"()": RedactQuery}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_query"]
    return config


def _serve_app(app: object, host: str, port: int, *, access_log: bool = False,
               logging_settings: Logging | None = None) -> None:
    settings = logging_settings or Logging()
    configure_logging(settings.format, settings.level)  # the gateway's own loggers, same format
    uvicorn.run(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        # X-Forwarded-* are the gateway's business (access.trusted_proxies), not uvicorn's.
        proxy_headers=False,
        server_header=False,  # the upstream's own Server and Date headers pass through
        date_header=False,
        log_level=settings.level.lower(),
        access_log=access_log,
        log_config=_log_config(settings),
        lifespan="on",
    )


def build_sidecar(config: GatewayConfig) -> object:
    from gateway.metrics import TimedUpstream
    from gateway.middleware import AuthGateway
    from gateway.proxy import UpstreamProxy

    proxy = UpstreamProxy(
        url=config.upstream.url,
        timeout_s=config.upstream.timeout_s,
        max_connections=config.upstream.max_connections,
        trusted_proxies=config.access.trusted_proxies,
        preserve_host=config.upstream.preserve_host,
        pool_timeout_s=config.upstream.pool_timeout_s,
        body_timeout_s=config.upstream.body_timeout_s,
        keepalive_s=config.upstream.keepalive_s,
    )
    gateway = AuthGateway(proxy, config)
    proxy.health.count_into(gateway.runtime.metrics)  # gateway_upstream_failures_total
    gateway.app = TimedUpstream(proxy, gateway.runtime.metrics)  # gateway_upstream_duration_seconds
    if config.upstream.check_ready:
        gateway.handshake.ready_checks.append(proxy.ready_problem)
    return gateway


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load_or_report(args.config)
    if config is None:
        return 2
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    configure_logging(config.logging.format, config.logging.level)  # what start-up logs is in the format too
    try:
        app = build_sidecar(config)
    except ConfigError as exc:
        # What the file cannot say by itself (a key file that cannot be created, a missing
        # package): one line that names it, not a traceback.
        print(f"{args.config}: the gateway cannot start: {exc.message}", file=sys.stderr)
        return 2
    _serve_app(app, host, port, access_log=config.listen.access_log, logging_settings=config.logging)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load_or_report(args.file)
    if config is None:
        return 2
    if config.store.backend == "redis" and not args.no_connect:
        problem = asyncio.run(_store_problem(config))
        if problem is not None:
            print(f"{args.file}: the store cannot be used:", file=sys.stderr)
            print(f"  {problem[0]}: {problem[1]}", file=sys.stderr)
            return 2
    print(yaml.safe_dump(masked_dict(config), sort_keys=False, allow_unicode=True), end="")
    from gateway.config_checks import config_warnings

    for where, message in config_warnings(config):  # valid but insecure: said, exit 0 all the same
        print(f"{args.file}: warning: {where}: {message}", file=sys.stderr)
    return 0


async def _store_problem(config: GatewayConfig) -> tuple[str, str] | None:
    """Connect to the configured Redis once: None when it answers, else (YAML path, reason)."""
    from gateway.errors import GatewayError
    from gateway.runtime import make_store

    where = {"sentinel": "store.sentinels", "cluster": "store.urls" if config.store.urls else "store.url"}.get(
        config.store.mode, "store.url")
    logging.getLogger("gateway.stores").setLevel(logging.CRITICAL)  # the reason is printed below
    try:
        store = make_store(config)
    except GatewayError as exc:
        return "store.backend", exc.message
    except Exception as exc:  # a URL redis-py cannot use (ValueError, its RedisClusterException...)
        return where, f"redis cannot use it ({type(exc).__name__})"  # the text may hold the password
    try:
        await asyncio.wait_for(store.ping(), config.store.connect_timeout_s * 2 + 5)
    except (GatewayError, TimeoutError):
        reason = getattr(store, "last_error", None) or "no answer"
        description = getattr(store, "description", "redis")
        return where, f"cannot reach {description}: {reason}"
    finally:
        await store.aclose()
    return None


def _load_or_report(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigFileError as exc:
        print(f"{path}: the configuration is invalid:", file=sys.stderr)
        for where, message in exc.errors:
            print(f"  {where}: {message}", file=sys.stderr)
        return None


def cmd_sandbox(args: argparse.Namespace) -> int:
    from gateway.sandbox import available_sandboxes, serve_apps

    async def run() -> None:
        port = args.port
        providers = {}
        async with contextlib.AsyncExitStack() as stack:
            for name, cls in sorted(available_sandboxes().items()):
                sandbox = cls()
                urls = await stack.enter_async_context(serve_apps(sandbox.hosts(), host=args.host, port=port))
                port += len(urls)
                providers.update(sandbox.sandbox_providers(urls))
                for role, url in urls.items():
                    print(f"# {name} {role} host: {url}")
            print(yaml.safe_dump({"providers": providers}, sort_keys=False, allow_unicode=True), flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import PortBusy, run_demo

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_demo(host=args.host, port=args.port))
    except PortBusy as exc:
        print(f"gateway demo: {exc}", file=sys.stderr)  # one line: which port, and what to do
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="In-client single sign-on gateway.")
    from gateway import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the sidecar reverse proxy")
    serve.add_argument("--config", required=True, help="YAML configuration file")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.set_defaults(handler=cmd_serve)

    demo = commands.add_parser(
        "demo", help="gateway + demo app + provider emulators, no accounts needed",
        description="The gateway in front of a demo app, with every provider emulator and the simulated "
                    "clients. Open http://HOST:PORT/demo/ for the tour.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    demo.add_argument("--port", type=int, default=8000,
                      help="the first of a block of consecutive ports: the demo gateway listens on PORT, the "
                           "emulators' hosts on the next ones (8 ports in all; printed at start-up; "
                           "default: %(default)s)")
    demo.set_defaults(handler=cmd_demo)

    sandbox = commands.add_parser("sandbox", help="the provider emulators alone, one port per provider host")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=9100)
    sandbox.set_defaults(handler=cmd_sandbox)

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.add_argument("--no-connect", action="store_true",
                       help="validate only; do not try the store connection (store.backend: redis)")
    check.set_defaults(handler=cmd_check_config)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs each provider call's URL at INFO, query included (DingTalk's access_token=...).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
