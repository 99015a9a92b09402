"""By hand, not in CI: JupyterLab behind ``gateway serve``, used from Chromium, with the default
upstream settings and with ``preserve_host: false``.

JupyterLab is too heavy for the dev extra; install it on its own and point ``JUPYTER`` at it::

    python3 -m venv /tmp/jvenv && /tmp/jvenv/bin/pip install jupyterlab ipykernel
    JUPYTER=/tmp/jvenv/bin/jupyter .venv/bin/python tests/_apps/try_jupyter.py

For each setting it signs in through the Lark emulator's browser OAuth, waits for the Lab UI, then
does from the page what the Lab frontend does: creates a kernel (POST with the ``_xsrf`` token),
runs ``print(6*7)`` over the kernel's WebSocket, opens a terminal and runs a command over its
WebSocket, downloads a file. It prints what happened as JSON; Jupyter's log is in the work dir.
Jupyter's own token login is off (``--IdentityProvider.token=``) and it listens on loopback only,
as behind the sidecar it should.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from gateway.sandbox import serve_apps  # noqa: E402
from plugins.lark.sandbox import LarkSandbox  # noqa: E402
from tests.conftest import CHROMIUM_ARGS, free_port  # noqa: E402

IN_THE_PAGE = r"""
async () => {
  const cookie = document.cookie.split('; ').find(c => c.startsWith('_xsrf='));
  const xsrf = cookie ? decodeURIComponent(cookie.slice(6)) : '';
  const out = {xsrf_cookie: !!cookie};
  const socket = (path, onopen, done) => new Promise((resolve) => {
    const ws = new WebSocket('ws://' + location.host + path);
    const timer = setTimeout(() => resolve('no answer in 30 s'), 30000);
    const finish = (what) => { clearTimeout(timer); resolve(what); ws.close(); };
    ws.onopen = () => onopen(ws);
    ws.onmessage = (event) => { const found = done(JSON.parse(event.data)); if (found) finish(found); };
    ws.onclose = (event) => finish('closed ' + event.code);
  });
  const kernel = await fetch('/api/kernels', {method: 'POST', body: '{"name": "python3"}',
    headers: {'X-XSRFToken': xsrf, 'Content-Type': 'application/json'}});
  out.create_kernel = kernel.status;
  if (kernel.status === 201) {
    const id = (await kernel.json()).id;
    out.kernel_websocket = await socket('/api/kernels/' + id + '/channels', (ws) => ws.send(JSON.stringify({
      header: {msg_id: 'run-1', username: '', session: 'try', msg_type: 'execute_request', version: '5.3'},
      parent_header: {}, metadata: {}, channel: 'shell', buffers: [],
      content: {code: 'print(6*7)', silent: false, store_history: false, user_expressions: {}, allow_stdin: false,
                stop_on_error: true}})),
      (message) => message.msg_type === 'stream' ? 'printed ' + message.content.text.trim() : null);
  }
  const terminal = await fetch('/api/terminals', {method: 'POST', headers: {'X-XSRFToken': xsrf}});
  out.create_terminal = terminal.status;
  if (terminal.status === 200) {
    const name = (await terminal.json()).name;
    let seen = '';
    out.terminal_websocket = await socket('/terminals/websocket/' + name,
      (ws) => ws.send(JSON.stringify(['stdin', 'echo gw-$((6*7))\r'])),
      (message) => { if (message[0] === 'stdout') seen += message[1]; return seen.includes('gw-42') ? 'ran' : null; });
  }
  out.download = (await fetch('/files/hello.txt')).status;
  return out;
}
"""


async def trial(jupyter: str, workdir: Path, preserve_host: bool | None) -> dict[str, Any]:
    sandbox = LarkSandbox()
    name = "default" if preserve_host is None else f"preserve_host_{str(preserve_host).lower()}"
    async with serve_apps(sandbox.hosts()) as urls:
        jupyter_port, gateway_port = free_port(), free_port()
        notebooks = workdir / "notebooks"
        notebooks.mkdir(exist_ok=True)
        (notebooks / "hello.txt").write_text("hello\n")
        upstream: dict[str, Any] = {"url": f"http://127.0.0.1:{jupyter_port}"}
        if preserve_host is not None:
            upstream["preserve_host"] = preserve_host
        public_url = f"http://localhost:{gateway_port}"
        config = {"public_url": public_url, "listen": {"host": "127.0.0.1", "port": gateway_port},
                  "upstream": upstream, "session": {"secrets": [secrets.token_urlsafe(32)], "secure": False},
                  "providers": {"lark": sandbox.provider_settings(urls)}}
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        processes = []
        with (workdir / f"jupyter-{name}.log").open("wb") as jupyter_log, \
                (workdir / f"gateway-{name}.log").open("wb") as gateway_log:
            processes.append(await asyncio.create_subprocess_exec(
                jupyter, "lab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
                f"--ServerApp.port={jupyter_port}", "--IdentityProvider.token=", f"--ServerApp.root_dir={notebooks}",
                stdout=jupyter_log, stderr=jupyter_log))
            processes.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", "--config", str(workdir / "gateway.yaml"),
                stdout=gateway_log, stderr=gateway_log, cwd=ROOT))
        try:
            async with httpx.AsyncClient() as probe:
                for _ in range(600):
                    with contextlib.suppress(httpx.HTTPError):
                        if ((await probe.get(f"http://127.0.0.1:{jupyter_port}/api/status")).status_code == 200
                                and (await probe.get(f"{public_url}/_gateway/healthz")).status_code == 200):
                            break
                    await asyncio.sleep(0.2)
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = await browser.new_page()
                errors: list[str] = []
                page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
                started = time.monotonic()
                answer = await page.goto(public_url + "/lab")
                await page.wait_for_url(public_url + "/lab*", timeout=30_000)
                with contextlib.suppress(Exception):
                    await page.wait_for_selector("#jp-main-dock-panel", timeout=60_000)
                result = {"upstream": name, "lab_page": answer.status if answer else None,
                          "lab_ui": await page.locator("#jp-main-dock-panel").count() == 1,
                          "signed_in_and_loaded_s": round(time.monotonic() - started, 1),
                          **await page.evaluate(IN_THE_PAGE), "console_errors": sorted(set(errors))[:5]}
                await browser.close()
        finally:
            for process in processes:
                if process.returncode is None:
                    process.terminate()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(process.wait(), 15)
        blocked = [line for line in (workdir / f"jupyter-{name}.log").read_text(errors="replace").splitlines()
                   if "Blocking Cross Origin" in line]
        result["jupyter_blocked_cross_origin"] = blocked[:2]
        return result


async def main() -> None:
    jupyter = os.environ.get("JUPYTER", "jupyter")
    with tempfile.TemporaryDirectory() as directory:
        for preserve_host in (None, False):
            print(json.dumps(await trial(jupyter, Path(directory), preserve_host), indent=1), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
