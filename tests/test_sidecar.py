"""Sidecar mode as users run it: ``gateway serve --config FILE`` in its own process, in front of a
real upstream, with the Lark emulator as the provider."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml

from gateway.sandbox import serve_apps
from tests.conftest import BROWSER_UA, HTML, ServedLark, browser_login, echo_app, free_port, headers_of

ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"


@contextlib.asynccontextmanager
async def gateway_serve(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[str]:
    """Start ``python -m gateway serve`` with ``config``; yields its base URL once /healthz is 200."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = config["listen"]["port"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "GATEWAY_TEST_SECRET": secrets.token_urlsafe(32)},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=1) as probe:
            for _ in range(200):
                if process.returncode is not None:
                    assert process.stderr is not None
                    raise AssertionError((await process.stderr.read()).decode())
                with contextlib.suppress(httpx.HTTPError):
                    if (await probe.get(f"{base}/_gateway/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("gateway serve did not become ready")
        yield base
    finally:
        process.terminate()
        await process.wait()


def sidecar_config(lark: ServedLark, upstream: str) -> dict[str, Any]:
    port = free_port()
    return {
        "public_url": f"http://127.0.0.1:{port}",
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream, "timeout_s": 5},
        "session": {"secrets": ["${GATEWAY_TEST_SECRET}"], "secure": False},
        "access": {"public_paths": ["/public/*"]},
        "providers": {"lark": lark.settings()},
    }


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    async with serve_apps({"upstream": echo_app()}) as urls:
        yield urls["upstream"]


async def test_sidecar_proxies_with_a_verified_identity(
    lark: ServedLark, upstream: str, tmp_path: Path
) -> None:
    async with gateway_serve(sidecar_config(lark, upstream), tmp_path) as base, \
            httpx.AsyncClient(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        answer = await browser_login(client, "/reports?q=1")
        assert answer.status_code == 200 and answer.json()["path"] == "/reports"
        received = headers_of(answer)
        assert received["x-auth-user"] == [ZHANG]
        assert received["x-forwarded-for"] == ["127.0.0.1"]
        # The default (upstream.preserve_host): the app sees the Host the browser used, once.
        assert received["host"] == received["x-forwarded-host"] == [base.removeprefix("http://")]
        assert "gw_session" not in answer.json()["cookies"]

        spoofed = await client.get("/x", headers={"X-Auth-User": "admin", "x_auth_user": "root",
                                                  "X-Forwarded-For": "10.0.0.1"})
        received = headers_of(spoofed)
        assert received["x-auth-user"] == [ZHANG] and received["x-forwarded-for"] == ["127.0.0.1"]
        assert "x_auth_user" not in received

        body = os.urandom(3 * 1024 * 1024)
        upload = await client.post("/upload", content=body)
        assert upload.json()["body_length"] == len(body)

        public = await client.get("/public/logo.png", headers={"X-Auth-User": "admin"})
        assert public.status_code == 200 and "x-auth-user" not in headers_of(public)


async def test_sidecar_websocket_carries_the_identity_and_needs_a_session(
    lark: ServedLark, upstream: str, tmp_path: Path
) -> None:
    async with gateway_serve(sidecar_config(lark, upstream), tmp_path) as base, \
            httpx.AsyncClient(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        ws_url = base.replace("http://", "ws://") + "/ws"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url):
                pass
        assert refused.value.response.status_code == 403

        await browser_login(client)
        cookie = f"gw_session={client.cookies.get('gw_session')}"
        async with websockets.connect(ws_url, additional_headers={"Cookie": cookie, "X-Auth-User": "admin"}) as ws:
            hello = json.loads(await ws.recv())
            received = dict((k, v) for k, v in hello["headers"] if k.startswith("x-auth"))
            assert received["x-auth-user"] == ZHANG
            await ws.send("ping")
            assert await ws.recv() == "ping"


async def test_sidecar_answers_a_clear_502_when_the_upstream_is_down(
    lark: ServedLark, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with gateway_serve(sidecar_config(lark, dead), tmp_path) as base, \
            httpx.AsyncClient(base_url=base, headers={"user-agent": BROWSER_UA}, timeout=10) as client:
        page = await client.get("/_gateway/login?next=/", headers=HTML, follow_redirects=True)
        assert page.status_code == 502 and "<html" in page.text and "Traceback" not in page.text
        api = await client.get("/x")
        assert api.status_code == 502 and api.json()["error"] == "upstream_unavailable"
