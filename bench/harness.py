"""The machinery every scenario shares: processes, wrk, nginx, alternating runs, statistics.

Rules this module enforces for every figure (issue 6):

- every load run is bounded in time (wrk ``-d``) and, for bursts, in count; loopback only;
- variants of one scenario are measured in alternating order (the order rotates every
  repetition), so the noise of a shared 2-core machine falls on every variant alike;
- each figure is reported as a ratio against the baseline measured in the same repetition, and
  the median, minimum and maximum of those per-repetition ratios are kept (the spread is the noise);
- every process started here is stopped here (terminate, then kill after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
WRK = shutil.which("wrk") or "/usr/bin/wrk"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- processes ----------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    started_at: float

    def stop(self, grace_s: float = 10) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Processes:
    """Starts processes and stops every one of them (by its own pid) on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              tree: Path | None = None) -> Proc:
        """Start ``argv`` (its output to ``<workdir>/<name>.log``); ``tree``: run the project's code
        from that copy instead of this one (working directory and PYTHONPATH)."""
        log_path = self.workdir / f"{name}.log"
        root = tree or ROOT
        full_env = {**os.environ, "PYTHONPATH": str(root), **(env or {})}
        with open(log_path, "ab") as out:
            process = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                       cwd=root, stdin=subprocess.DEVNULL)
        proc = Proc(name, process, log_path, time.perf_counter())
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


async def wait_http(url: str, proc: Proc | None = None, *, timeout_s: float = 30, status: int = 200,
                    interval_s: float = 0.02) -> float:
    """Poll ``url`` until it answers ``status``; returns the seconds waited."""
    started = time.perf_counter()
    deadline = started + timeout_s
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            if proc is not None and proc.process.poll() is not None:
                raise RuntimeError(f"{proc.name} exited ({proc.process.returncode}):\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == status:
                    return time.perf_counter() - started
            if time.perf_counter() > deadline:
                tail = proc.tail() if proc is not None else ""
                raise RuntimeError(f"{url} did not answer {status} within {timeout_s} s\n{tail}")
            await asyncio.sleep(interval_s)


def server_argv(role: str, port: int, *, config: Path | None = None, server: str = "uvicorn",
                upstream: str | None = None) -> list[str]:
    """``python -m bench.apps ROLE``: one of the apps of ``bench/apps.py`` on one server."""
    argv = [PYTHON, "-m", "bench.apps", role, "--port", str(port), "--server", server]
    if config is not None:
        argv += ["--config", str(config)]
    if upstream is not None:
        argv += ["--upstream", upstream]
    return argv


# -- wrk ----------------------------------------------------------------------------------------

_WRK_LUA = """
local headers_file = os.getenv("BENCH_WRK_HEADERS")
if headers_file then
  for line in io.lines(headers_file) do
    local name, value = line:match("^([^:]+):%s*(.*)$")
    if name then wrk.headers[name] = value end
  end
end
local delay_ms = tonumber(os.getenv("BENCH_WRK_DELAY_MS") or "0")
if delay_ms > 0 then
  function delay()
    return math.floor(delay_ms * (0.5 + math.random()))
  end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time the processes ``pids`` have used so far (from /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    cpu_us: float = float("nan")  # CPU time of the server process(es) per request, when given

    def as_dict(self) -> dict[str, float]:
        return {"rps": self.rps, "p50_ms": self.p50_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms,
                "requests": self.requests, "errors": self.errors, "cpu_us": self.cpu_us}


class Wrk:
    def __init__(self, workdir: Path, *, threads: int = 2, connections: int = 32) -> None:
        if not os.access(WRK, os.X_OK):
            raise RuntimeError("wrk is needed (apt-get install wrk); bench/run installs it")
        self.workdir = workdir
        self.threads = threads
        self.connections = connections
        self.script = workdir / "bench.lua"
        self.script.write_text(_WRK_LUA)
        self._headers_files: dict[tuple[tuple[str, str], ...], Path] = {}

    def _headers_file(self, headers: Mapping[str, str]) -> Path:
        key = tuple(sorted(headers.items()))
        if key not in self._headers_files:
            path = self.workdir / f"headers-{len(self._headers_files)}.txt"
            path.write_text("".join(f"{name}: {value}\n" for name, value in key))
            self._headers_files[key] = path
        return self._headers_files[key]

    async def run(self, url: str, *, duration_s: float, headers: Mapping[str, str] | None = None,
                  connections: int | None = None, threads: int | None = None, rate: float | None = None,
                  allow_errors: bool = False, pids: Sequence[int] = ()) -> WrkResult:
        """One wrk run (bounded by ``duration_s``). ``rate`` (requests/s over all connections)
        paces each connection with a randomised think time, so the load is about that rate."""
        conns = connections or self.connections
        env = {**os.environ, "BENCH_WRK_HEADERS": str(self._headers_file(headers or {}))}
        if rate:
            env["BENCH_WRK_DELAY_MS"] = str(max(1.0, conns / rate * 1000.0))
        argv = [WRK, f"-t{min(threads or self.threads, conns)}", f"-c{conns}", f"-d{max(1, round(duration_s))}s",
                "--latency", "--timeout", "10s", "-s", str(self.script), url]
        cpu_before = cpu_seconds(pids)
        process = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                       stderr=asyncio.subprocess.STDOUT, env=env)
        try:
            output, _ = await asyncio.wait_for(process.communicate(), duration_s + 30)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        cpu = cpu_seconds(pids) - cpu_before
        text = output.decode(errors="replace")
        line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no summary for {url}:\n{text}")
        data = json.loads(line.removeprefix("BENCH_JSON "))
        errors = sum(int(data[key]) for key in ("connect", "read", "write", "status", "timeout"))
        seconds = data["duration_us"] / 1e6
        result = WrkResult(rps=data["requests"] / seconds, p50_ms=data["p50_us"] / 1000,
                           p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
                           requests=int(data["requests"]), errors=errors,
                           cpu_us=cpu / data["requests"] * 1e6 if pids and data["requests"] else float("nan"))
        if errors and not allow_errors:
            raise RuntimeError(f"wrk saw {errors} errors on {url} ({data}); every request must succeed")
        return result


# -- alternating runs and their statistics ------------------------------------------------------


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def fmt(self, digits: int = 2, scale: float = 1.0) -> str:
        return (f"{self.median * scale:.{digits}f} ({self.min * scale:.{digits}f}–"
                f"{self.max * scale:.{digits}f})")

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max}


@dataclass
class Series:
    """Per-variant results of alternating repetitions."""

    runs: dict[str, list[WrkResult]] = field(default_factory=dict)

    def add(self, name: str, result: WrkResult) -> None:
        self.runs.setdefault(name, []).append(result)

    def spread(self, name: str, metric: str = "rps") -> Spread:
        return Spread.of([getattr(run, metric) for run in self.runs[name]])

    def ratio(self, name: str, baseline: str, metric: str = "rps") -> Spread:
        """The per-repetition ratio ``name / baseline`` (same repetition), as a spread."""
        pairs = zip(self.runs[name], self.runs[baseline], strict=True)
        return Spread.of([getattr(a, metric) / getattr(b, metric) for a, b in pairs])

    def difference(self, name: str, baseline: str, metric: str) -> Spread:
        pairs = zip(self.runs[name], self.runs[baseline], strict=True)
        return Spread.of([getattr(a, metric) - getattr(b, metric) for a, b in pairs])

    def as_dict(self) -> dict[str, Any]:
        return {name: [run.as_dict() for run in runs] for name, runs in self.runs.items()}


async def alternate(variants: Mapping[str, Callable[[], Awaitable[WrkResult]]], *, reps: int,
                    warmup: Callable[[str], Awaitable[object]] | None = None) -> Series:
    """Run every variant ``reps`` times, the order rotating each repetition."""
    names = list(variants)
    if warmup is not None:
        for name in names:
            await warmup(name)
    series = Series()
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            result = await variants[name]()
            series.add(name, result)
            log(f"  rep {rep + 1}/{reps} {name}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                f"p99 {result.p99_ms:.2f} ms")
    return series


# -- nginx --------------------------------------------------------------------------------------

NGINX_MAIN = """\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
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


@contextlib.asynccontextmanager
async def nginx(processes: Processes, name: str, site_conf: str, port: int) -> AsyncIterator[str]:
    """A foreground nginx (one worker) serving ``site_conf`` (an http-level snippet) on ``port``."""
    if not os.access(NGINX, os.X_OK):
        raise RuntimeError("nginx is needed (apt-get install nginx-light or nginx); bench/run installs it")
    prefix = processes.workdir / f"nginx-{name}"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "site.conf").write_text(site_conf)
    user = "user root;" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(NGINX_MAIN.format(prefix=prefix, user=user))
    proc = processes.start(f"nginx-{name}", [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                             "-g", "daemon off;"])
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.process.poll() is not None or time.monotonic() > deadline:
                error_log = prefix / "error.log"
                logged = error_log.read_text() if error_log.exists() else ""
                raise RuntimeError(f"nginx {name} did not start:\n{proc.tail()}\n{logged}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("uvicorn", "uvloop", "httptools", "starlette", "aiohttp", "granian", "PyJWT"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            continue
    wrk_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([WRK, "-v"], capture_output=True, text=True, timeout=5)
        wrk_version = (out.stdout or out.stderr).splitlines()[0]
    nginx_version = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, timeout=5)
        nginx_version = (out.stderr or out.stdout).strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": sys.version.split()[0],
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "wrk": wrk_version,
        "nginx": nginx_version,
        **{f"pkg:{k}": v for k, v in versions.items()},
    }
