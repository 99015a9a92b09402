"""Instructions per request, counted by callgrind: a figure the machine's load cannot move.

``python -m bench.icount [--requests N] [--compare LABEL=PATH ...] [--modes ...]`` runs each
server under ``valgrind --tool=callgrind`` with instrumentation off, sends 300 warm-up requests
on one keep-alive connection (one at a time, from this process), switches instrumentation on
(``callgrind_control -i on``), sends N more and switches it off: the count is what the server's
process executed for those N requests only (start-up, imports and warm-up are never counted, so
their run-to-run variation cannot leak in). Modes:

- ``bare``: the minimal Starlette app of ``bench/apps.py`` on uvicorn (the baseline);
- ``middleware``: ``AuthGateway`` around it, a valid session in the memory store;
- ``sidecar`` / ``sidecar-public``: ``gateway.cli.build_sidecar`` in front of the raw ASGI
  upstream (a native uvicorn, not counted), authenticated and on a public path;
- ``relay``: the same sidecar relaying ``GET open-apis/calendar/v4/calendars`` to the Lark
  emulator (``gateway sandbox`` in its own process, not counted), signed in through the browser
  OAuth; ``emulator``: that emulator itself answering the same call with the user token directly.
  The bench's relay throughput ratio is roughly client+emulator over client+gateway+emulator on
  two cores: these two counts say how far the gateway's share is from it.

``--in-process`` counts the ASGI apps called directly instead (no server, no socket, no event-loop
wake-ups: the gateway's own work only), the scope and no-op ``send`` of ``bench/hotpath.py``:

- ``bare``: the Starlette app alone; ``middleware``: ``AuthGateway`` around it;
- ``gateway``: ``AuthGateway`` around a no-op ASGI app;
- ``sidecar``: ``build_sidecar``'s stack (``AuthGateway`` and every wrapper it puts around the
  proxy, ``TimedUpstream`` included) with a no-op app in the proxy's place; minus ``gateway``, the
  wrappers' cost.

uvicorn runs as ``gateway serve`` runs it (uvloop, httptools, no access log, no Server/Date
headers). Counts are user-space instructions only: system calls are not in them (``strace -c``
around the same client gives those), and work that depends on the clock (the session cache
renewed every ``session.cache_ttl_s``, event-loop wake-ups) still varies a little with how fast
valgrind runs. ``--compare`` runs the same servers from other copies of the project (``git
archive <commit> | tar -x -C DIR``); ``--keep DIR`` keeps each server's dump for ``callgrind_annotate``
(which C functions the count went to: the JSON scanner, regular expressions, the HTTP parsers).
Needs valgrind (``apt-get install valgrind``); about a minute per server, two at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 300
MODES = ("bare", "middleware", "sidecar", "sidecar-public")
RELAY_MODES = ("relay", "emulator")
IN_PROCESS_MODES = ("bare", "middleware", "gateway", "sidecar")


def serve(mode: str, port: int, cookie_file: str, upstream: str) -> None:
    """The server under count (run by valgrind in a child process): writes the session cookie."""
    import uvicorn

    from bench import hotpath
    from bench.apps import bare_app

    async def main() -> None:
        app: object
        cookie = "none"
        if mode == "bare":
            app = bare_app()
        elif mode in RELAY_MODES:
            app = _relay_server(mode, json.loads(upstream), port)
        elif mode == "middleware":
            from gateway.middleware import AuthGateway

            app = gateway = AuthGateway(bare_app(), hotpath._config())
            cookie = await hotpath.signed_in(gateway)
        else:
            from gateway.cli import build_sidecar

            app = build_sidecar(hotpath._config(upstream={"url": upstream}, access={"public_paths": ["/public/*"]}))
            cookie = await hotpath.signed_in(app)  # type: ignore[arg-type]
        if mode in RELAY_MODES:
            cookie = "later"  # the parent signs in (relay) or mints a token (emulator) once this serves
        Path(cookie_file).write_text(cookie)  # noqa: ASYNC240 (before serving: nothing else runs yet)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, proxy_headers=False,  # type: ignore[arg-type]
                                server_header=False, date_header=False, access_log=False, log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(main())


def _relay_server(mode: str, sites: dict[str, Any], port: int) -> object:
    """``relay``: the sidecar with the calendar route open, its Lark the external emulator;
    ``emulator``: a Lark emulator of its own, its open host (the calendar and token endpoints).
    ``sites``: the external emulator's Lark URLs (``lark``) and the app behind the sidecar."""
    from bench.relay import ROUTES, SCOPES
    from plugins.lark.sandbox import LarkSandbox

    sandbox = LarkSandbox()
    if mode == "emulator":
        return sandbox.hosts()["open"]  # its admin API (the code the token is minted from) is there too
    from gateway.cli import build_sidecar
    from gateway.config import GatewayConfig

    config = GatewayConfig(
        public_url=f"http://127.0.0.1:{port}", session={"secrets": ["bench-icount-relay-" + "x" * 24], "secure": False},
        providers={"lark": {**sandbox.provider_settings(sites["lark"]), "scopes": SCOPES}},
        upstream={"url": sites["upstream"]}, relay=ROUTES)
    return build_sidecar(config)


def serve_in_process(mode: str, requests: int) -> None:
    """The apps under count, called directly (run by valgrind): warm up, say ``ready`` on stdout,
    wait for a line on stdin (instrumentation is on by then), run ``requests`` requests, say
    ``done`` and wait for the dump."""
    from bench import hotpath
    from bench.apps import bare_app

    async def noop(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"hello"})  # type: ignore[operator]

    async def main() -> None:
        app: Any
        if mode == "bare":
            app = bare_app()
            from gateway.middleware import AuthGateway

            cookie = await hotpath.signed_in(AuthGateway(bare_app(), hotpath._config()))  # a cookie to send
        elif mode in ("middleware", "gateway"):
            from gateway.middleware import AuthGateway

            app = AuthGateway(bare_app() if mode == "middleware" else noop, hotpath._config())
            cookie = await hotpath.signed_in(app)
        else:
            from gateway.cli import build_sidecar

            app = build_sidecar(hotpath._config(upstream={"url": "http://127.0.0.1:9"}))
            cookie = await hotpath.signed_in(app)
            parent, inner = app, app.app
            while type(inner).__name__ != "UpstreamProxy":  # the wrappers build_sidecar added
                parent, inner = inner, inner.app
            parent.app = noop
        scope = hotpath.scope_for("/", [*hotpath.WRK_HEADERS, (b"cookie", f"gw_session={cookie}".encode())])
        headers = scope["headers"]
        statuses: list[int] = []

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        for _ in range(WARM_UP):
            await app({**scope, "headers": list(headers)}, hotpath._receive, send)
        if set(statuses) != {200}:
            raise RuntimeError(f"{mode} answered {set(statuses)}")
        print("ready", flush=True)
        sys.stdin.readline()
        for _ in range(requests):  # a new scope per request, as a server builds one
            await app({**scope, "headers": list(headers)}, hotpath._receive, hotpath._send)
        print("done", flush=True)
        sys.stdin.readline()

    asyncio.run(main())


def count_in_process(tree: Path, mode: str, requests: int) -> int:
    """Instructions ``requests`` direct calls of the ``mode`` app executed after the warm-up."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        child = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             __file__, "serve-in-process", mode, str(requests)],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdin is not None and child.stdout is not None
        try:
            for step in ("ready", "done"):
                line = child.stdout.readline().strip()
                if line != step:
                    raise RuntimeError(f"{mode} from {tree}: expected {step!r}, got {line!r}")
                _instrumentation(child.pid, "-i on" if step == "ready" else "--dump")
                child.stdin.write("\n")
                child.stdin.flush()
        finally:
            child.stdin.close()
            child.wait(timeout=300)
        dumped = next(Path(work).glob("callgrind.out.*"))
        totals = [line for line in dumped.read_text().splitlines() if line.startswith(("summary:", "totals:"))]
        return int(totals[0].split()[1])


def _requests(sock: socket.socket, credential: str, path: str, count: int) -> None:
    """``credential``: a header line (``Cookie: ...`` or ``Authorization: ...``), or a bare cookie."""
    line = credential if ": " in credential else f"Cookie: gw_session={credential}"
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
               f"{line}\r\n\r\n").encode()
    buffered = b""
    for number in range(count):
        sock.sendall(request)
        while b"\r\n\r\n" not in buffered:
            buffered += sock.recv(65536)
        head, _, buffered = buffered.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.partition(b":")[2]) for line in head.split(b"\r\n")[1:]
                       if line.partition(b":")[0].strip().lower() == b"content-length"), 0)
        while len(buffered) < length:
            buffered += sock.recv(65536)
        buffered = buffered[length:]
        if status != 200:
            raise RuntimeError(f"request {number} answered {status}")


def count(tree: Path, mode: str, requests: int, port: int, upstream: str, keep: Path | None = None) -> int:
    """Instructions one server process executed for ``requests`` requests after the warm-up."""
    with tempfile.TemporaryDirectory() as work:
        out, cookie_file = Path(work) / "callgrind.out", Path(work) / "cookie"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        server = subprocess.Popen(
            # This file as a script, the other tree's gateway (and bench.hotpath) first on the path.
            ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", sys.executable,
             __file__, "serve", mode.removesuffix("-public"), str(port), str(cookie_file), upstream],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while not (cookie_file.exists() and cookie_file.stat().st_size):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode} from {tree} did not start")
                time.sleep(0.2)
            sock = _connect(port)
            path = "/public/x" if mode.endswith("-public") else "/"
            credential = cookie_file.read_text()
            if mode in RELAY_MODES:
                credential, path = _relay_credential(mode, port)
            with sock:
                _requests(sock, credential, path, WARM_UP)
                _instrumentation(server.pid, "-i on")
                _requests(sock, credential, path, requests)
                _instrumentation(server.pid, "--dump")  # written to <out>.1: these requests only
        finally:
            server.send_signal(2)  # SIGINT: uvicorn shuts down, callgrind writes its counts
            server.wait(timeout=120)
        dumped = next(Path(work).glob("callgrind.out.*"))
        if keep is not None:  # for callgrind_annotate: which C functions (JSON, regex, parsers) it was
            shutil.copy(dumped, keep / f"callgrind.{mode}")
        totals = [line for line in dumped.read_text().splitlines() if line.startswith(("summary:", "totals:"))]
        return int(totals[0].split()[1])


def _relay_credential(mode: str, port: int) -> tuple[str, str]:
    """(the header line, the path) of a relay or emulator request, as bench/relay.py sends them."""
    from bench.relay import PATH, RELAYED, user_token
    from bench.site import COOKIE, Emulator, login
    from plugins.lark.sandbox import LarkSandbox

    base = f"http://127.0.0.1:{port}"
    if mode == "relay":
        return f"Cookie: {COOKIE}={asyncio.run(login(base, '/'))}", RELAYED
    token = asyncio.run(user_token(Emulator(LarkSandbox(), {"open": base, "accounts": base})))
    return f"Authorization: Bearer {token}", PATH


def _connect(port: int) -> socket.socket:
    for _ in range(600):  # the cookie is written just before uvicorn binds
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=120)
        except ConnectionRefusedError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port}")


def _instrumentation(pid: int, command: str) -> None:
    subprocess.run(["callgrind_control", *command.split(), str(pid)], check=True, capture_output=True, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "serve-in-process":
        serve_in_process(sys.argv[2], int(sys.argv[3]))
        return
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--modes", nargs="*", choices=sorted({*MODES, *RELAY_MODES, *IN_PROCESS_MODES}),
                        help=f"default: {' '.join(MODES)}; with --in-process: {' '.join(IN_PROCESS_MODES)}")
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=PATH")
    parser.add_argument("--in-process", action="store_true", help="call the apps directly: no server, no socket")
    parser.add_argument("--keep", type=Path, help="copy each server's callgrind dump to this directory")
    args = parser.parse_args()
    trees = {"this tree": ROOT, **{item.partition("=")[0]: Path(item.partition("=")[2]).resolve()
                                   for item in args.compare}}
    if args.in_process:
        _report_in_process(trees, args.modes or list(IN_PROCESS_MODES), args.requests)
        return
    args.modes = args.modes or list(MODES)
    if not set(args.modes) <= {*MODES, *RELAY_MODES}:
        parser.error(f"server modes are {', '.join((*MODES, *RELAY_MODES))} (the others need --in-process)")
    upstream_port = _free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.apps:raw_app", "--port", str(upstream_port),
                                 "--no-access-log", "--log-level", "warning"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    jobs = [(label, mode) for label in trees for mode in args.modes
            if mode not in ("bare", "emulator") or label == "this tree"]
    with contextlib.ExitStack() as stack:
        stack.callback(upstream.terminate)
        upstream_url = f"http://127.0.0.1:{upstream_port}"
        lark = stack.enter_context(_lark_sandbox()) if set(args.modes) & set(RELAY_MODES) else {}
        sites = json.dumps({"lark": lark, "upstream": upstream_url})

        def run(job: tuple[str, str]) -> int:
            target = sites if job[1] in RELAY_MODES else upstream_url
            return count(trees[job[0]], job[1], args.requests, _free_port(), target, args.keep)

        with ThreadPoolExecutor(max_workers=2) as pool:
            counts = dict(zip(jobs, pool.map(run, jobs), strict=True))
    per_request = {job: total / args.requests for job, total in counts.items()}
    print("| tree | mode | instructions per request | bare / this |")
    print("|---|---|---|---|")
    bare = per_request.get(("this tree", "bare"))
    emulator = per_request.get(("this tree", "emulator"))
    for (label, mode), value in per_request.items():
        ratio = f"{bare / value:.3f}" if bare and mode == "middleware" else ""
        if emulator and mode == "relay":
            ratio = f"relay / emulator {value / emulator:.2f}"
        print(f"| {label} | {mode} | {value:,.0f} | {ratio} |")


@contextlib.contextmanager
def _lark_sandbox() -> Iterator[dict[str, str]]:
    """``gateway sandbox`` in a process of its own (not counted); its Lark hosts' URLs."""
    first = _free_port_block(8)
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "sandbox", "--port", str(first)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                out.seek(0)
                printed = out.read().decode(errors="replace")
                found = dict(re.findall(r"# lark (open|accounts) host: (http://\S+)", printed))
                if len(found) == 2:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gateway sandbox did not start")
                time.sleep(0.1)
            yield found
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def _free_port_block(count: int) -> int:
    from bench.relay import _port_block

    return _port_block(count)


def _report_in_process(trees: dict[str, Path], modes: list[str], requests: int) -> None:
    jobs = [(label, mode) for label in trees for mode in modes]
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(jobs, pool.map(lambda job: count_in_process(trees[job[0]], job[1], requests), jobs),
                          strict=True))
    print("| tree | in-process app | instructions per request | bare / middleware |")
    print("|---|---|---|---|")
    for (label, mode), total in counts.items():
        bare = counts.get((label, "bare"))
        ratio = f"{bare / total:.3f}" if bare and mode == "middleware" else ""
        print(f"| {label} | {mode} | {total / requests:,.0f} | {ratio} |")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
