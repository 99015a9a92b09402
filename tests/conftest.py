"""Shared fixtures: the Lark emulator on real loopback sockets, an upstream app, gateway builders."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from gateway.config import GatewayConfig
from gateway.sandbox import serve_apps
from plugins.lark.sandbox import LarkSandbox

if TYPE_CHECKING:  # Playwright is loaded only by the tests that drive a browser
    from playwright.async_api import Browser, Page
    from playwright.async_api import Request as PageRequest

FEISHU_UA = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36 Lark/7.12.7 LarkLocale/en_US ChannelName/Feishu"
)
BROWSER_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
)
HTML = {"accept": "text/html,application/xhtml+xml"}


class Clock:
    """A clock tests move instead of sleeping (``clock.now += 60`` or ``clock.advance(60)``): pass it
    where the code takes a ``clock``, or monkeypatch ``time.time`` / ``time.monotonic`` with it."""

    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ServedLark:
    sandbox: LarkSandbox
    urls: dict[str, str]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {**self.sandbox.provider_settings(self.urls), **overrides}


@pytest.fixture
async def lark() -> AsyncIterator[ServedLark]:
    """The Lark emulator, its two hosts on their own loopback ports."""
    sandbox = LarkSandbox()
    async with serve_apps(sandbox.hosts()) as urls:
        yield ServedLark(sandbox, urls)


def echo_app() -> Starlette:
    """The upstream app: it answers with what it received (headers, cookies, path)."""

    async def echo(request: Request) -> Response:
        body = await request.body()
        return JSONResponse({
            "path": request.url.path,
            "query": request.url.query,
            "method": request.method,
            "headers": [[k, v] for k, v in request.headers.items()],
            "cookies": dict(request.cookies),
            "body_length": len(body),
        })

    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"headers": [[k, v] for k, v in websocket.headers.items()]})
        async for message in websocket.iter_text():
            await websocket.send_text(message)

    return Starlette(routes=[
        Route("/{path:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "HEAD"]),
        WebSocketRoute("/ws", ws_echo),
    ])


def headers_of(answer: httpx.Response) -> dict[str, list[str]]:
    """The upstream's received headers (from ``echo_app``), lower-case name -> values."""
    result: dict[str, list[str]] = {}
    for name, value in answer.json()["headers"]:
        result.setdefault(name, []).append(value)
    return result


ConfigFactory = Callable[..., GatewayConfig]


@pytest.fixture
def make_config(lark: ServedLark) -> ConfigFactory:
    """A gateway config for the served Lark emulator; keyword arguments override sections."""

    def build(public_url: str = "http://127.0.0.1", provider: dict[str, Any] | None = None,
              **sections: Any) -> GatewayConfig:
        data: dict[str, Any] = {
            "public_url": public_url,
            "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
            "providers": {"lark": lark.settings(**(provider or {}))},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return GatewayConfig(**data)

    return build


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_listening(port: int, process: asyncio.subprocess.Process, timeout_s: float) -> bool:
    """Whether ``process`` accepts connections on 127.0.0.1:``port`` within ``timeout_s``
    (False as soon as it exits): every test that starts a server process waits with this."""
    deadline = time.monotonic() + timeout_s
    while process.returncode is None and time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


def free_port_block(count: int = 10) -> int:
    """The first of ``count`` consecutive free ports (``gateway demo``/``sandbox`` take a block)."""
    import random
    import socket

    for _ in range(200):
        first = random.randint(20_000, 60_000 - count)
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports")


@dataclass
class RunningGateway:
    url: str
    gateway: Any  # AuthGateway
    config: GatewayConfig

    def client(self, user_agent: str = BROWSER_UA, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"user-agent": user_agent}, timeout=10, **kwargs)


GatewayStarter = Callable[..., Any]


@pytest.fixture
async def start_gateway(make_config: ConfigFactory) -> AsyncIterator[GatewayStarter]:
    """``async with start_gateway(**config_sections) as running``: AuthGateway(echo_app) on a real port."""
    from gateway.middleware import AuthGateway

    @contextlib.asynccontextmanager
    async def start(app: Any = None, **sections: Any) -> AsyncIterator[RunningGateway]:
        port = free_port()
        config = make_config(public_url=f"http://127.0.0.1:{port}", **sections)
        gateway = AuthGateway(app if app is not None else echo_app(), config)
        try:
            async with serve_apps({"gateway": gateway}, port=port) as urls:
                yield RunningGateway(urls["gateway"], gateway, config)
        finally:
            await gateway.aclose()

    yield start


async def browser_login(client: httpx.AsyncClient, path: str = "/") -> httpx.Response:
    """Walk the browser OAuth flow from ``path`` (no client in the UA), following every redirect."""
    return await client.get(path, headers=HTML, follow_redirects=True)


# -- real Chromium and real nginx, for the integration tests -------------------------------------

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]


def _executable(variable: str, default: str, what: str) -> str:
    """The path in ``variable`` (else ``default``); a clear failure, not a skip, when it is missing."""
    import os

    path = os.environ.get(variable, default)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{what} is needed at {path}: install it (apt-get install {what.lower()}) or set {variable}")
    return path


@contextlib.asynccontextmanager
async def _chromium() -> AsyncIterator[Browser]:
    """Headless Chromium (the system's, never a downloaded one) driven by Playwright."""
    from playwright.async_api import async_playwright

    chromium_path = _executable("GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium", "Chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                                    args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """A Chromium of the test's own: nothing a test leaves open can reach the next one."""
    async with _chromium() as chromium:
        yield chromium


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def _module_chromium() -> AsyncIterator[Browser]:
    async with _chromium() as chromium:
        yield chromium


@pytest_asyncio.fixture(loop_scope="module")
async def module_browser(_module_chromium: Browser) -> AsyncIterator[Browser]:
    """One Chromium for the whole module, the contexts a test opened closed after it.

    A launch costs over half a second, paid once instead of per test where a module has many
    browser tests (the DingTalk ones). Playwright's objects belong to the event loop that made
    them, so only for a module whose tests all run on its loop:
    ``pytestmark = pytest.mark.asyncio(loop_scope="module")``.
    """
    yield _module_chromium
    for context in _module_chromium.contexts:
        await context.close()


# The simulated clients' JSAPI calls reach the test through this page function: a simulator's
# init script calls ``window.recordClientCall(api, args)`` (``args`` without the callbacks).
CLIENT_RECORDER = "recordClientCall"


@dataclass
class SimulatedClient:
    """One browser context standing for a client's webview (Feishu, Tencent Meeting, DingTalk), and
    what its page did, for the test to assert on."""

    page: Page
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (JSAPI, non-function arguments)
    exchanges: list[dict[str, Any]] = field(default_factory=list)  # bodies POSTed to /_gateway/exchange/*
    errors: list[str] = field(default_factory=list)  # uncaught script errors

    def called(self, api: str) -> list[dict[str, Any]]:
        """The arguments of each call to ``api``, in order."""
        return [args for name, args in self.calls if name == api]

    def names(self) -> list[str]:
        """The JSAPIs called, in order."""
        return [name for name, _ in self.calls]


async def open_simulated_client(browser: Browser, *, user_agent: str, init_script: str | None) -> SimulatedClient:
    """A fresh context with the client's ``user_agent``; ``init_script`` (run before every page's
    own scripts) defines the client's JSAPI globals, None leaves them out as a page whose SDK did
    not load. The page starts blank: the test navigates it."""
    context = await browser.new_context(user_agent=user_agent)
    calls: list[tuple[str, dict[str, Any]]] = []
    await context.expose_function(CLIENT_RECORDER, lambda api, args: calls.append((api, args)))
    if init_script is not None:
        await context.add_init_script(script=init_script)
    client = SimulatedClient(await context.new_page(), calls)
    client.page.on("pageerror", lambda error: client.errors.append(str(error)))

    def on_request(request: PageRequest) -> None:
        if request.method == "POST" and "/_gateway/exchange/" in request.url:
            client.exchanges.append(request.post_data_json)

    client.page.on("request", on_request)
    return client


NGINX_MAIN = """\
worker_processes 1;
{user}
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/site.conf;
}}
"""

NginxStarter = Callable[[str, int], Any]


@pytest.fixture
def start_nginx(tmp_path: Any) -> NginxStarter:
    """``async with start_nginx(site_conf, port) as url``: a real nginx in the foreground, every
    path under ``tmp_path``, serving ``site_conf`` (an http-level snippet listening on ``port``)."""
    import asyncio
    import os

    nginx = _executable("GATEWAY_TEST_NGINX", "/usr/sbin/nginx", "nginx")

    @contextlib.asynccontextmanager
    async def start(site_conf: str, port: int) -> AsyncIterator[str]:
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "site.conf").write_text(site_conf)
        # A root master runs its worker as "nobody", which cannot enter pytest's 0700 tmp dirs.
        user = "user root;" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(NGINX_MAIN.format(prefix=prefix, user=user))
        error_log = prefix / "error.log"
        process = await asyncio.create_subprocess_exec(
            nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
            "-g", f"daemon off; pid {prefix}/nginx.pid; error_log {error_log};",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            if not await wait_listening(port, process, 10):
                stderr = (await process.communicate())[1] if process.returncode is not None else b""
                logged = error_log.read_text() if error_log.exists() else ""
                pytest.fail(f"nginx did not start:\n{stderr.decode(errors='replace')}\n{logged}")
            yield f"http://127.0.0.1:{port}"
        finally:
            if process.returncode is None:
                process.terminate()  # SIGTERM: nginx's fast shutdown, workers included
                try:
                    await asyncio.wait_for(process.communicate(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()

    return start


# -- a real Redis, for the store contract suite and the multi-replica tests -----------------------

class RedisProcess:
    """One ``redis-server`` on a loopback port, started and stopped by the test (``extra`` adds
    arguments, e.g. ``--appendonly yes`` so the data survives a restart)."""

    def __init__(self, workdir: Any, port: int | None = None, *extra: str) -> None:
        import os
        import shutil

        self.binary = os.environ.get("GATEWAY_TEST_REDIS_SERVER") or shutil.which("redis-server") or \
            "/usr/bin/redis-server"
        if not os.access(self.binary, os.X_OK):
            pytest.fail("redis-server is needed for these tests: install it (apt-get install redis-server), "
                        "or set GATEWAY_TEST_REDIS_SERVER to its path")
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = extra
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10) -> RedisProcess:
        import subprocess
        import time

        import redis

        log = open(self.workdir / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - kept open while it runs
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--dbfilename", f"dump-{self.port}.rdb", *self.extra],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    logged = (self.workdir / f"redis-{self.port}.log").read_text(errors="replace")
                    pytest.fail(f"redis-server did not start on port {self.port}:\n{logged}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, *, hard: bool = False) -> None:
        import subprocess

        if self.process is None or self.process.poll() is not None:
            return
        if hard:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _reachable_or_fail(url: str, what: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"{what} is not reachable ({type(exc).__name__}: {exc}); the Redis tests need one")
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A Redis for the whole session: ``GATEWAY_TEST_REDIS_URL`` if set, else a ``redis-server``
    started here on a free port. Never skipped: without a Redis these tests fail."""
    import os

    url = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if url:
        _reachable_or_fail(url, "GATEWAY_TEST_REDIS_URL")
        yield url
        return
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A master and one Sentinel watching it (service ``mymaster``): yields the Sentinel's
    ``host:port``."""
    import subprocess
    import time

    import redis

    workdir = tmp_path_factory.mktemp("sentinel")
    master = RedisProcess(workdir).start()
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
                    "sentinel down-after-milliseconds mymaster 60000\n")
    log = open(workdir / "sentinel.log", "ab")  # noqa: SIM115
    process = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"):
                    break
            except redis.RedisError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis sentinel did not start:\n{(workdir / 'sentinel.log').read_text()}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
        master.stop()


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A one-node Redis Cluster (every slot on one node): a real cluster protocol, MOVED-ready
    clients, hash-tag rules, in a second."""
    import time

    import redis

    workdir = tmp_path_factory.mktemp("cluster")
    port = free_port()
    node = RedisProcess(workdir, port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-port", str(free_port())).start()  # not port + 10000: may be > 65535
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("the one-node Redis Cluster did not become ready")
            time.sleep(0.05)
        yield node.url
    finally:
        client.close()
        node.stop()
