"""A down upstream is visible (issue 11): one WARNING per failure burst naming the upstream and the
cause, one line when it answers again, ``gateway_upstream_failures_total{cause}``, and readyz 503
``upstream_unavailable`` with ``upstream.check_ready: true`` (200 when it is off, the default).

The sidecar is the one ``gateway serve`` builds (``gateway.cli.build_sidecar``) on uvicorn over
real sockets; the upstreams are real servers: the echo app on uvicorn, and raw asyncio servers for
the failures an app server would not stage (an upstream that accepts and never answers, or
closes every connection at once). ``/public/*`` is public, so the requests need no sign-in."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
import websockets

from gateway.cli import build_sidecar
from gateway.middleware import AuthGateway
from gateway.proxy import UpstreamProxy
from gateway.sandbox import serve_apps
from gateway.upstream_health import os_error_cause
from tests.conftest import ConfigFactory, echo_app, free_port

FAILURES = "gateway_upstream_failures_total"


@dataclass
class Sidecar:
    url: str
    gateway: AuthGateway

    def failures(self, cause: str) -> float:
        return self.gateway.runtime.metrics.value(FAILURES, cause)

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=10)


@contextlib.asynccontextmanager
async def sidecar(make_config: ConfigFactory, upstream_url: str, **upstream: Any) -> AsyncIterator[Sidecar]:
    """What ``gateway serve`` runs (``build_sidecar``), served on a real port."""
    port = free_port()
    config = make_config(public_url=f"http://127.0.0.1:{port}",
                         upstream={"url": upstream_url, "timeout_s": 2, **upstream},
                         access={"public_paths": ["/public/*"]}, metrics={"allow_from": ["127.0.0.1/32"]})
    gateway = cast(AuthGateway, build_sidecar(config))
    try:
        async with serve_apps({"gateway": gateway}, port=port) as urls:
            yield Sidecar(urls["gateway"], gateway)
    finally:
        await cast(UpstreamProxy, gateway.app).aclose()
        await gateway.aclose()


@contextlib.asynccontextmanager
async def raw_upstream(behaviour: str) -> AsyncIterator[str]:
    """An upstream that accepts connections and then ``silent``: never answers, or ``close``:
    closes each at once."""
    held: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "close":
            writer.close()
            return
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()


def upstream_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name == "gateway.upstream" and record.levelno == logging.WARNING]


def scraped(text: str, cause: str) -> float:
    found = re.search(rf'^{FAILURES}{{cause="{cause}"}} (\S+)$', text, re.M)
    assert found, text
    return float(found.group(1))


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])  # localhost: ::1 and 127.0.0.1 both refused
async def test_a_refusing_upstream_logs_once_per_burst_and_once_when_it_answers_again(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture, host: str
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    port = free_port()
    async with sidecar(make_config, f"http://{host}:{port}") as gateway, \
            gateway.client() as client:
        for _ in range(5):
            answer = await client.get("/public/x")
            assert answer.status_code == 502 and answer.json()["error"] == "upstream_unavailable"
        lines = upstream_lines(caplog)
        assert len(lines) == 1, lines  # the burst, not each request
        assert f"upstream {host}:{port} is failing: connection refused" in lines[0]
        assert gateway.failures("refused") == 5 and gateway.failures("timeout") == 0

        async with serve_apps({"upstream": echo_app()}, port=port):
            assert (await client.get("/public/x")).status_code == 200
            assert (await client.get("/public/y")).status_code == 200
        lines = upstream_lines(caplog)
        assert len(lines) == 2, lines  # one line when it answers again, none for the request after
        assert lines[1].startswith(f"upstream {host}:{port} answers again, after 5 failed attempts in ")
        assert lines[1].endswith("(refused 5)")

        assert (await client.get("/public/x")).status_code == 502  # down again: a new burst, a new line
        assert len(upstream_lines(caplog)) == 3 and "is failing: connection refused" in upstream_lines(caplog)[2]
        exposition = (await client.get("/_gateway/metrics")).text
    assert scraped(exposition, "refused") == 6 and scraped(exposition, "reset") == 0


async def test_an_upstream_that_never_answers_is_a_timeout(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    async with raw_upstream("silent") as url, sidecar(make_config, url, timeout_s=0.3) as gateway, \
            gateway.client() as client:
        for _ in range(2):
            answer = await client.get("/public/x")
            assert answer.status_code == 504 and answer.json()["error"] == "upstream_timeout"
        lines = upstream_lines(caplog)
        assert len(lines) == 1 and f"upstream {url.removeprefix('http://')} is failing: no answer in time" in lines[0]
        assert gateway.failures("timeout") == 2


async def test_an_upstream_that_closes_the_connection_is_a_reset(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    async with raw_upstream("close") as url, sidecar(make_config, url) as gateway, \
            gateway.client() as client:
        answer = await client.get("/public/x")
        assert answer.status_code == 502 and answer.json()["error"] == "upstream_unavailable"
        lines = upstream_lines(caplog)
        assert len(lines) == 1 and "is failing: connection reset or closed before the answer" in lines[0]
        assert gateway.failures("reset") == 1


async def test_a_websocket_to_a_down_upstream_is_counted(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    port = free_port()
    async with sidecar(make_config, f"http://127.0.0.1:{port}") as gateway:
        ws_url = gateway.url.replace("http://", "ws://") + "/public/ws"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url):
                pass
        assert refused.value.response.status_code == 502
        assert gateway.failures("refused") == 1
        assert len(upstream_lines(caplog)) == 1 and "connection refused" in upstream_lines(caplog)[0]


async def test_readyz_includes_the_upstream_only_with_check_ready(
    make_config: ConfigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.upstream")
    port = free_port()
    dead = f"http://127.0.0.1:{port}"
    async with sidecar(make_config, dead) as gateway, \
            gateway.client() as client:
        assert (await client.get("/_gateway/readyz")).json() == {"status": "ready"}  # off by default
    assert upstream_lines(caplog) == []  # nothing probed, nothing logged

    async with sidecar(make_config, dead, check_ready=True) as gateway, \
            gateway.client() as client:
        answer = await client.get("/_gateway/readyz")
        assert answer.status_code == 503 and answer.headers["retry-after"] == "5"
        body = answer.json()
        assert body["status"] == "unavailable" and body["error"] == "upstream_unavailable"
        assert body["message"] == "The upstream service cannot be reached: connection refused."
        assert str(port) not in answer.text  # readyz is public: the address is for the log only
        assert (await client.get("/_gateway/readyz")).status_code == 503
        assert len(upstream_lines(caplog)) == 1 and f"127.0.0.1:{port}" in upstream_lines(caplog)[0]

        async with serve_apps({"upstream": echo_app()}, port=port):
            answer = await client.get("/_gateway/readyz")
        assert answer.status_code == 200 and answer.json() == {"status": "ready"}
        assert len(upstream_lines(caplog)) == 2 and "answers again" in upstream_lines(caplog)[1]


@pytest.mark.parametrize(("error", "cause"), [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('127.0.0.1', 9)"), "refused"),
    # A name with two addresses, both refused: asyncio's combined OSError has no errno of its own.
    (OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 9, 0, 0), "
             "[Errno 111] Connect call failed ('127.0.0.1', 9)"), "refused"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "reset"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), "reset"),
    (TimeoutError(), "timeout"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "unreachable"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"), "invalid"),
])
def test_each_connection_error_has_its_cause(error: BaseException, cause: str) -> None:
    assert os_error_cause(error) == cause
