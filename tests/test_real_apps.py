"""Real third-party servers behind the sidecar (issue 11), each with the DEFAULT upstream settings.

``gateway serve`` runs in its own process in front of an app in its own process: a Tornado app on
Tornado's own HTTP server (``tests/_apps/tornado_app.py``: ``xsrf_cookies=True``, a WebSocket with
Tornado's default ``check_origin``) and a Django app under uvicorn (``tests/_apps/django_app.py``:
the CSRF middleware, ``ALLOWED_HOSTS`` and ``CSRF_TRUSTED_ORIGINS`` set to the public host and
origin as a deployment sets them). Real Chromium signs in through the Lark emulator's browser OAuth
and uses the app as a person would: the page's own script opens the WebSocket, the form is typed
into and submitted, so Origin, Referer and cookies are the browser's own.

The public URL is ``http://localhost:<port>`` and the app listens on ``127.0.0.1``: the Host the
browser uses and the upstream's own address differ, as they do in any real deployment. The
``preserve_host: false`` cases show the breakage docs/deployment.md ("Apps behind the sidecar")
warns of, with the app's own words for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import websockets
from playwright.async_api import Browser, Page, expect

from tests.conftest import ServedLark, free_port, wait_listening
from tests.test_sidecar import gateway_serve

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "_apps"
ZHANG = "ou_7dab8a3d3cdcc9da365777c7ad535d62"
WAIT_MS = 15_000  # bounded waits for the browser (a shared 2-core machine), never asserted on


@dataclass
class RunningApp:
    url: str
    log: Path  # the app's stdout and stderr

    def logged(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.asynccontextmanager
async def app_process(name: str, argv: list[str], port: int, tmp_path: Path,
                      env: dict[str, str] | None = None) -> AsyncIterator[RunningApp]:
    """Run ``argv`` (a server listening on 127.0.0.1:``port``) until the block ends; its output
    goes to a file (a pipe nobody reads could fill and stall it)."""
    log = tmp_path / f"{name}.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=output, stderr=asyncio.subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=ROOT)
    try:
        if not await wait_listening(port, process, 20):
            raise AssertionError(f"{name} did not listen on {port} (exit status {process.returncode}):\n"
                                 f"{log.read_text(errors='replace')}")
        yield RunningApp(f"http://127.0.0.1:{port}", log)
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def tornado_app(tmp_path: Path) -> AsyncIterator[RunningApp]:
    port = free_port()
    async with app_process("tornado", [sys.executable, str(APPS / "tornado_app.py"), str(port)], port,
                           tmp_path) as app:
        yield app


@contextlib.asynccontextmanager
async def django_app(tmp_path: Path, allowed_hosts: str, trusted_origins: str) -> AsyncIterator[RunningApp]:
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "--app-dir", str(APPS), "django_app:application",
            "--host", "127.0.0.1", "--port", str(port), "--lifespan", "off", "--log-level", "warning"]
    env = {"DJANGO_ALLOWED_HOSTS": allowed_hosts, "DJANGO_CSRF_TRUSTED_ORIGINS": trusted_origins}
    async with app_process("django", argv, port, tmp_path, env) as app:
        yield app


def sidecar_config(lark: ServedLark, port: int, upstream: str, **upstream_settings: Any) -> dict[str, Any]:
    """A user's config for a gateway on ``port``: only ``upstream.url`` unless the test says
    otherwise (the defaults)."""
    return {
        "public_url": f"http://localhost:{port}",
        "listen": {"host": "127.0.0.1", "port": port},
        "upstream": {"url": upstream, **upstream_settings},
        "session": {"secrets": ["${GATEWAY_TEST_SECRET}"], "secure": False},
        "providers": {"lark": lark.settings()},
    }


async def signed_in(browser: Browser, public_url: str) -> Page:
    """A fresh browser that opened the app: sent to sign in, through the emulator, back on the app."""
    page = await (await browser.new_context()).new_page()
    await page.goto(public_url + "/")
    await page.wait_for_url(public_url + "/", timeout=WAIT_MS)
    return page


async def save_note(page: Page, text: str) -> str:
    """Type into the app's form and submit it as a person would; the page's answer as text."""
    await page.fill("#text", text)
    async with page.expect_navigation(timeout=WAIT_MS) as navigation:
        await page.click("#save")
    answer = await navigation.value
    assert answer is not None
    return f"{answer.status} {await page.content()}"


def session_cookie(cookies: list[Any]) -> str:
    return next(f"gw_session={cookie['value']}" for cookie in cookies if cookie["name"] == "gw_session")


# -- Tornado ------------------------------------------------------------------------------------


async def test_tornado_app_works_behind_the_sidecar_with_the_defaults(
    browser: Browser, lark: ServedLark, tmp_path: Path
) -> None:
    port = free_port()
    public_url = f"http://localhost:{port}"
    async with tornado_app(tmp_path) as app, gateway_serve(sidecar_config(lark, port, app.url), tmp_path):
        page = await signed_in(browser, public_url)
        await expect(page.locator("#user")).to_have_text(ZHANG)
        await expect(page.locator("#host")).to_have_text(f"localhost:{port}")
        # Tornado's check_origin: the browser's Origin names the Host the app sees.
        await expect(page.locator("#ws")).to_have_text("echo ping", timeout=WAIT_MS)
        saved = await save_note(page, "hello")  # xsrf_cookies=True: the form's token is checked
        assert saved.startswith("200 ") and f"saved hello for {ZHANG}" in saved
    assert "Cross origin websockets not allowed" not in app.logged()


async def test_tornado_websockets_are_refused_when_the_upstream_gets_its_own_host(
    browser: Browser, lark: ServedLark, tmp_path: Path
) -> None:
    """``preserve_host: false``: Tornado's default check_origin refuses every browser WebSocket
    (Origin ``localhost:<port>`` against Host ``127.0.0.1:<port>``); XSRF-protected forms go on
    working (Tornado compares a cookie with a form field, not hosts)."""
    port = free_port()
    public_url = f"http://localhost:{port}"
    async with tornado_app(tmp_path) as app, \
            gateway_serve(sidecar_config(lark, port, app.url, preserve_host=False), tmp_path) as base:
        page = await signed_in(browser, public_url)
        await expect(page.locator("#host")).to_have_text(app.url.removeprefix("http://"))
        await expect(page.locator("#ws")).to_have_text("closed 1006", timeout=WAIT_MS)
        saved = await save_note(page, "hello")
        assert saved.startswith("200 ") and f"saved hello for {ZHANG}" in saved

        cookie = session_cookie(await page.context.cookies())
        ws_url = base.replace("http://", "ws://") + "/ws"
        # The same WebSocket with the browser's Origin: the app refuses it and the gateway says so.
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(ws_url, origin=websockets.Origin(public_url),
                                          additional_headers={"Cookie": cookie}):
                pass
        assert refused.value.response.status_code == 403
        assert json.loads(refused.value.response.body)["error"] == "upstream_refused"
        # Without an Origin (no browser) Tornado lets it through: Origin against Host is the cause.
        async with websockets.connect(ws_url, additional_headers={"Cookie": cookie}) as socket:
            await socket.send("ping")
            assert await socket.recv() == "ping"
    assert "Cross origin websockets not allowed" in app.logged()


# -- Django -------------------------------------------------------------------------------------


async def test_django_app_works_behind_the_sidecar_with_the_defaults(
    browser: Browser, lark: ServedLark, tmp_path: Path
) -> None:
    port = free_port()
    public_url = f"http://localhost:{port}"
    async with django_app(tmp_path, allowed_hosts="localhost", trusted_origins=public_url) as app, \
            gateway_serve(sidecar_config(lark, port, app.url), tmp_path):
        page = await signed_in(browser, public_url)
        await expect(page.locator("#user")).to_have_text(ZHANG)
        await expect(page.locator("#host")).to_have_text(f"localhost:{port}")
        await expect(page.locator("#absolute")).to_have_text(f"{public_url}/notes")
        saved = await save_note(page, "hello")  # csrfmiddlewaretoken and the browser's Origin
        assert saved.startswith("200 ") and f"saved hello for {ZHANG}" in saved
    assert "Forbidden" not in app.logged() and "Invalid HTTP_HOST" not in app.logged()


@pytest.mark.parametrize(("allowed_hosts", "trusted", "breakage"), [
    # ALLOWED_HOSTS names the public host, as Django's docs ask: every page is a 400.
    ("localhost", True, "disallowed_host"),
    # The upstream's address allowed too, CSRF_TRUSTED_ORIGINS not set (same-origin needs none):
    # pages load, links point past the gateway, every POST is a 403.
    ("localhost,127.0.0.1", False, "csrf_origin"),
])
async def test_django_breaks_when_the_upstream_gets_its_own_host(
    browser: Browser, lark: ServedLark, tmp_path: Path, allowed_hosts: str, trusted: bool, breakage: str
) -> None:
    port = free_port()
    public_url = f"http://localhost:{port}"
    trusted_origins = public_url if trusted else ""
    async with django_app(tmp_path, allowed_hosts=allowed_hosts, trusted_origins=trusted_origins) as app, \
            gateway_serve(sidecar_config(lark, port, app.url, preserve_host=False), tmp_path):
        upstream_host = app.url.removeprefix("http://")
        page = await (await browser.new_context()).new_page()
        answer = await page.goto(public_url + "/")
        await page.wait_for_url(public_url + "/", timeout=WAIT_MS)
        assert answer is not None
        if breakage == "disallowed_host":
            assert answer.status == 400 and "Bad Request (400)" in await page.content()
            expected_log = f"Invalid HTTP_HOST header: '{upstream_host}'"
        else:
            assert answer.status == 200
            await expect(page.locator("#host")).to_have_text(upstream_host)
            await expect(page.locator("#absolute")).to_have_text(f"{app.url}/notes")
            saved = await save_note(page, "hello")
            assert saved.startswith("403 ") and "CSRF verification failed" in saved
            expected_log = f"Origin checking failed - {public_url} does not match any trusted origins"
    assert expected_log in app.logged()
