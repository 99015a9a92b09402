"""Instructions per request, counted by callgrind: a figure the machine's load cannot move.

``python -m bench.icount [--requests N] [--compare LABEL=PATH ...] [--modes ...]`` runs each
server under ``valgrind --tool=callgrind`` twice, once answering 300 warm-up requests and once
answering N more on the same keep-alive connection (one request at a time, from this process),
and reports (count with N − count without) / N: the instructions the server's process spends per
request, start-up and warm-up cancelled out. Modes:

- ``bare``: the minimal Starlette app of ``bench/apps.py`` on uvicorn (the baseline);
- ``middleware``: ``AuthGateway`` around it, a valid session in the memory store;
- ``sidecar`` / ``sidecar-public``: ``gateway.cli.build_sidecar`` in front of the raw ASGI
  upstream (a native uvicorn, not counted), authenticated and on a public path.

uvicorn runs as ``gateway serve`` runs it (uvloop, httptools, no access log, no Server/Date
headers). Wall-clock ratios on a shared 2-core machine spread by ±10% between runs (see
docs/benchmarks.md); these counts repeat within 0.1%. They count user-space instructions only:
system calls are not in them (``strace -c`` on the same client gives those). ``--compare`` runs
the same servers from other copies of the project (``git archive <commit> | tar -x -C DIR``).
Needs valgrind (``apt-get install valgrind``); about a minute per server, two at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 300
MODES = ("bare", "middleware", "sidecar", "sidecar-public")


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
        elif mode == "middleware":
            from gateway.middleware import AuthGateway

            app = gateway = AuthGateway(bare_app(), hotpath._config())
            cookie = await hotpath.signed_in(gateway)
        else:
            from gateway.cli import build_sidecar

            app = build_sidecar(hotpath._config(upstream={"url": upstream}, access={"public_paths": ["/public/*"]}))
            cookie = await hotpath.signed_in(app)  # type: ignore[arg-type]
        Path(cookie_file).write_text(cookie)  # noqa: ASYNC240 (before serving: nothing else runs yet)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, proxy_headers=False,  # type: ignore[arg-type]
                                server_header=False, date_header=False, access_log=False, log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(main())


def _requests(port: int, cookie: str, path: str, count: int) -> None:
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
               f"Cookie: gw_session={cookie}\r\n\r\n").encode()
    buffered = b""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
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


def count(tree: Path, mode: str, requests: int, port: int, upstream: str) -> int:
    """Instructions of one server process that answered WARM_UP + ``requests`` requests."""
    with tempfile.TemporaryDirectory() as work:
        out, cookie_file = Path(work) / "callgrind.out", Path(work) / "cookie"
        env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
        server = subprocess.Popen(
            # This file as a script, the other tree's gateway (and bench.hotpath) first on the path.
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "serve",
             mode.removesuffix("-public"), str(port), str(cookie_file), upstream],
            cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 600
            while not (cookie_file.exists() and cookie_file.stat().st_size):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode} from {tree} did not start")
                time.sleep(0.2)
            path = "/public/x" if mode.endswith("-public") else "/"
            for _ in range(600):  # the cookie is written just before uvicorn binds
                try:
                    _requests(port, cookie_file.read_text(), path, WARM_UP + requests)
                    break
                except ConnectionRefusedError:
                    time.sleep(0.2)
        finally:
            server.send_signal(2)  # SIGINT: uvicorn shuts down, callgrind writes its counts
            server.wait(timeout=120)
        totals = [line for line in out.read_text().splitlines() if line.startswith(("summary:", "totals:"))]
        return int(totals[0].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        return
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=PATH")
    args = parser.parse_args()
    trees = {"this tree": ROOT, **{item.partition("=")[0]: Path(item.partition("=")[2]).resolve()
                                   for item in args.compare}}
    upstream_port = _free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "uvicorn", "bench.apps:raw_app", "--port", str(upstream_port),
                                 "--no-access-log", "--log-level", "warning"], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    jobs = [(label, mode, n) for label in trees for mode in args.modes
            if mode != "bare" or label == "this tree" for n in (0, args.requests)]
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            counts = dict(zip(jobs, pool.map(
                lambda job: count(trees[job[0]], job[1], job[2], _free_port(), f"http://127.0.0.1:{upstream_port}"),
                jobs), strict=True))
    finally:
        upstream.terminate()
    per_request = {(label, mode): (counts[(label, mode, args.requests)] - counts[(label, mode, 0)]) / args.requests
                   for label, mode, n in jobs if n == 0}
    print("| tree | mode | instructions per request | bare / this |")
    print("|---|---|---|---|")
    bare = per_request.get(("this tree", "bare"))
    for (label, mode), value in per_request.items():
        ratio = f"{bare / value:.3f}" if bare and mode == "middleware" else ""
        print(f"| {label} | {mode} | {value:,.0f} | {ratio} |")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
