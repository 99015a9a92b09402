"""A provider for the benchmarks: the Lark emulator on loopback, configs that use it, and a login.

The emulator runs in the benchmark's own process (its hosts on free loopback ports); gateways in
other processes are configured to use it; a session cookie is obtained the way a browser gets one,
by walking the OAuth redirect flow (as ``tests/conftest.py:browser_login`` does).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.sandbox import serve_apps
from plugins.lark.sandbox import LarkSandbox

BROWSER_UA = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36"
COOKIE = "gw_session"


@dataclass
class Emulator:
    sandbox: LarkSandbox
    urls: dict[str, str]
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))

    def config(self, port: int, **sections: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "public_url": f"http://127.0.0.1:{port}",
            "listen": {"host": "127.0.0.1", "port": port},
            "session": {"secrets": [self.secret], "secure": False},
            "providers": {"lark": self.sandbox.provider_settings(self.urls)},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return data

    def write_config(self, path: Path, port: int, **sections: Any) -> Path:
        path.write_text(yaml.safe_dump(self.config(port, **sections), sort_keys=False))
        return path


@contextlib.asynccontextmanager
async def lark_emulator(**options: Any) -> AsyncIterator[Emulator]:
    sandbox = LarkSandbox(**options)
    async with serve_apps(sandbox.hosts()) as urls:
        yield Emulator(sandbox, urls)


async def login(base_url: str, path: str = "/") -> str:
    """Walk the browser OAuth flow through the gateway at ``base_url``; returns the session cookie."""
    async with httpx.AsyncClient(base_url=base_url, headers={"user-agent": BROWSER_UA}, timeout=20) as client:
        answer = await client.get(path, headers={"accept": "text/html"}, follow_redirects=True)
        if answer.status_code != 200:
            raise RuntimeError(f"login through {base_url} ended with {answer.status_code}: {answer.text[:300]}")
        ticket = client.cookies.get(COOKIE)
        if not ticket:
            raise RuntimeError(f"login through {base_url} set no {COOKIE} cookie")
        return ticket


async def check(url: str, *, headers: dict[str, str] | None = None, status: int = 200,
                body: str | None = None) -> None:
    """A sanity check before a load run: the variant answers what it must (200 with identity...)."""
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(url, headers=headers or {})
    if answer.status_code != status or (body is not None and answer.text.strip() != body):
        raise RuntimeError(f"{url} answered {answer.status_code} {answer.text[:200]!r}; "
                           f"expected {status} {body!r}")
