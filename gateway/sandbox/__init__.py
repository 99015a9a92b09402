"""Shared machinery of the provider emulators (``plugins/<name>/sandbox.py``).

An emulator is a ``Sandbox`` subclass registered under the entry-point group
``gateway.sandboxes`` (same name as its provider plugin). It serves one ASGI app per real
provider host (Lark: ``open`` and ``accounts``), because official SDKs take a host, not a path.
``gateway sandbox`` gives each host its own loopback port and prints the ``providers:`` YAML.

Every emulator also serves, on each of its hosts, a small admin API under ``/_sandbox/`` that
tests and the demo use: fault knobs, call counters, and the simulated client's code minting.

How to write one: subclass ``Sandbox``, set ``plugin``, implement ``hosts()`` and
``provider_settings()``; keep all state in the instance so a test can run several side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from importlib.metadata import entry_points
from typing import Any, ClassVar
from urllib.parse import urlsplit

import httpx
import uvicorn
from starlette.types import ASGIApp

ENTRY_POINT_GROUP = "gateway.sandboxes"
log = logging.getLogger("gateway.sandbox")


class Sandbox:
    """Base class of a provider emulator."""

    #: The provider plugin this emulates (its entry-point name).
    plugin: ClassVar[str] = ""
    #: Appended to a browser's User-Agent by the demo to simulate the provider's client.
    client_user_agent: ClassVar[str] = ""

    def hosts(self) -> dict[str, ASGIApp]:
        """One ASGI app per real host, keyed by a short role name (e.g. ``open``, ``accounts``)."""
        raise NotImplementedError

    def provider_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """The ``providers.<name>`` config entry that points the plugin at these hosts.

        ``base_urls`` maps each role of ``hosts()`` to the URL it is served on. The result
        includes the emulator's credentials (``app_id``/``app_secret``...).
        """
        raise NotImplementedError

    def demo_settings(self, base_urls: Mapping[str, str]) -> dict[str, Any]:
        """Settings for ``gateway demo``: by default the same, with the simulated JSSDK if any."""
        return self.provider_settings(base_urls)

    def transport(self, base_urls: Mapping[str, str]) -> httpx.AsyncBaseTransport:
        """An in-process httpx transport serving ``base_urls`` (role -> URL) from ``hosts()``.

        Tests hand it to the gateway's HTTP client: the provider talks to the emulator with no
        socket at all, through the same URLs a served sandbox would have.
        """
        apps = self.hosts()
        return HostRoutingTransport({urlsplit(url).netloc: apps[role] for role, url in base_urls.items()})


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
                app, host=host, port=port + index if port else 0, log_level="warning", lifespan="off"
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
