"""The provider-API relay (issue 12): its cost per call, and an expiry storm through it.

Throughput: the same aiohttp closed loop (``connections`` concurrent callers for ``duration_s``)
calls the Lark emulator's ``GET open-apis/calendar/v4/calendars`` directly with a user token, and
through one ``gateway serve`` at ``/_gateway/api/lark/...`` with a session cookie; repetitions
alternate, the ratio is per repetition. Added latency: the p99 of the relay minus the direct p99,
each measured with half the connections (a closed loop: "half load" as half the callers).

Expiry storm: the emulator expires every access token (its calendar API then answers 99991677),
and ``storm_size`` relayed calls start at once. Counted: refresh calls that reached the provider
(must be 1), failed calls (must be 0), calendar calls that reached the provider (each relayed call
is refused at most once and retried at most once: between N and 2N). One process on the memory
store, and three replicas on one Redis, the burst spread round-robin over them.

The emulators run in a process of their own (``gateway sandbox``), driven over their admin API
(``/_sandbox/stats``, ``/_sandbox/tokens/expire``, ``/_sandbox/jsapi/code``): in this process they
would compete with the 1,000 callers for one core and time out, which measures nothing about the
relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

from bench.context import Context, Row
from bench.harness import PYTHON, Proc, Spread, cpu_seconds, free_port, log, server_argv, wait_http
from bench.site import COOKIE, Emulator, login
from bench.storm import _redis
from plugins.lark import openapi
from plugins.lark.sandbox import LarkSandbox

PATH = "/open-apis/calendar/v4/calendars"
RELAYED = "/_gateway/api/lark" + PATH
SCOPES = ["offline_access", openapi.CALENDAR_SCOPE]
ROUTES = {"routes": [{"provider": "lark", "path": "open-apis/calendar/v4/*"}]}


@dataclass
class Loop:
    calls: int = 0
    failures: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(url: str, headers: dict[str, str], connections: int, duration_s: float) -> Loop:
    """``connections`` callers, each calling again as soon as its answer is read."""
    result = Loop()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        deadline = time.perf_counter() + duration_s

        async def caller() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                try:
                    async with session.get(url, headers=headers) as answer:
                        await answer.read()
                        ok = answer.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    ok = False
                result.latencies_ms.append((time.perf_counter() - began) * 1000)
                result.calls += 1
                result.failures += 0 if ok else 1

        began = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(connections)))
        result.seconds = time.perf_counter() - began
    return result


def _port_block(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (``gateway sandbox`` takes a block)."""
    for first in range(free_port(), 65000 - count, 97):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


@contextlib.asynccontextmanager
async def external_lark(ctx: Context) -> AsyncIterator[Emulator]:
    """``gateway sandbox`` in its own process; its Lark hosts read from what it prints."""
    first = _port_block(8)
    proc = ctx.processes.start(f"relay-sandbox-{first}", [PYTHON, "-m", "gateway", "sandbox", "--port", str(first)])
    try:
        deadline = time.monotonic() + 30
        urls: dict[str, str] = {}
        while len(urls) < 2:
            if proc.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway sandbox did not start:\n{proc.tail()}")
            found = re.findall(r"# lark (open|accounts) host: (http://\S+)", proc.log_path.read_text(errors="replace"))
            urls = dict(found)
            await asyncio.sleep(0.1)
        await wait_http(urls["open"] + "/_sandbox/stats", proc)
        ctx.pids[urls["open"]] = proc.process.pid
        yield Emulator(LarkSandbox(), urls)  # the local instance only names the app (the same defaults)
    finally:
        proc.stop()


async def stats(lark: Emulator) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=10) as client:
        return dict((await client.get(lark.urls["open"] + "/_sandbox/stats")).json())


async def expire_tokens(lark: Emulator) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        (await client.post(lark.urls["open"] + "/_sandbox/tokens/expire")).raise_for_status()


async def user_token(lark: Emulator) -> str:
    """A user access token straight from the emulator (a grant of its own, beside the gateway's):
    a code as the client's requestAccess would get it, then the token endpoint."""
    async with httpx.AsyncClient(timeout=10) as client:
        minted = await client.post(lark.urls["accounts"] + "/_sandbox/jsapi/code", json={
            "api": "requestAccess", "appID": lark.sandbox.app_id, "scopeList": SCOPES})
        answer = await client.post(lark.urls["open"] + "/open-apis/authen/v2/oauth/token", json={
            "grant_type": "authorization_code", "client_id": lark.sandbox.app_id,
            "client_secret": lark.sandbox.app_secret, "code": minted.json()["code"]})
    return str(answer.json()["access_token"])


async def _gateways(ctx: Context, lark: Emulator, name: str, replicas: int,
                    store: dict[str, Any] | None) -> tuple[list[str], list[Proc]]:
    upstream_port = free_port()
    procs = [ctx.processes.start(f"relay-{name}-upstream", server_argv("token-echo", upstream_port))]
    await wait_http(f"http://127.0.0.1:{upstream_port}/", procs[0])
    ports = [free_port() for _ in range(replicas)]
    sections: dict[str, Any] = {"upstream": {"url": f"http://127.0.0.1:{upstream_port}"}, "relay": ROUTES,
                                "providers": {"lark": {**lark.sandbox.provider_settings(lark.urls), "scopes": SCOPES}}}
    if store:
        sections["store"] = store
    config = lark.write_config(ctx.workdir / f"relay-{name}.yaml", ports[0], **sections)
    urls = []
    for port in ports:
        proc = ctx.processes.start(f"relay-{name}-{port}", [PYTHON, "-m", "gateway", "serve", "--config",
                                                            str(config), "--port", str(port)])
        procs.append(proc)
        urls.append(f"http://127.0.0.1:{port}")
        await wait_http(urls[-1] + "/_gateway/healthz", proc)
    return urls, procs


async def _throughput(ctx: Context) -> list[Row]:
    options = ctx.options
    async with external_lark(ctx) as lark:
        urls, procs = await _gateways(ctx, lark, "throughput", 1, None)
        try:
            ticket = await login(urls[0], "/")
            token = await user_token(lark)
            direct = (lark.urls["open"] + PATH, {"Authorization": f"Bearer {token}"})
            relayed = (urls[0] + RELAYED, {"Cookie": f"{COOKIE}={ticket}"})
            await closed_loop(*relayed, options.connections, options.warmup_s)
            ratios, added, base_p99 = [], [], []
            # CPU per call of each process (gateway, emulator, this client), for each loop.
            pids = (procs[-1].process.pid, ctx.pids[lark.urls["open"]])
            per_call: dict[str, list[tuple[float, ...]]] = {"relay": [], "direct": []}
            for rep in range(options.reps):
                spent = _cpu(pids)
                via = await closed_loop(*relayed, options.connections, options.duration_s)
                spent, was = _cpu(pids), spent
                per_call["relay"].append(_per_call(spent, was, via.calls))
                to = await closed_loop(*direct, options.connections, options.duration_s)
                spent, was = _cpu(pids), spent
                per_call["direct"].append(_per_call(spent, was, to.calls))
                half_via = await closed_loop(*relayed, max(1, options.connections // 2), options.duration_s)
                half_to = await closed_loop(*direct, max(1, options.connections // 2), options.duration_s)
                if via.failures or to.failures or half_via.failures or half_to.failures:
                    raise RuntimeError(f"failed calls: relay {via.failures}, direct {to.failures}")
                ratios.append(via.rps / to.rps)
                added.append(half_via.pct(0.99) - half_to.pct(0.99))
                base_p99.append(half_to.pct(0.99))
                log(f"  relay rep {rep + 1}: relay {via.rps:.0f} req/s, direct {to.rps:.0f} req/s "
                    f"(ratio {ratios[-1]:.2f}); half load p99 relay {half_via.pct(0.99):.1f} ms, "
                    f"direct {half_to.pct(0.99):.1f} ms")
            ctx.raw["relay-throughput"] = {"ratio": ratios, "added_p99_ms": added, "direct_p99_ms": base_p99,
                                           "cpu_us_per_call": per_call}
            relay_cpu = [statistics.median(part[i] for part in per_call["relay"]) for i in range(3)]
            direct_cpu = [statistics.median(part[i] for part in per_call["direct"]) for i in range(3)]
            return [
                Row.ratio("relay", "relay req/s ÷ direct to the emulator with the token (same client)",
                          Spread.of(ratios), 0.5),
                Row("relay", "p99 added by the relay at half the connections, ms", Spread.of(added).fmt(1),
                    "< 5", statistics.median(added) < 5,
                    note=f"direct p99 {statistics.median(base_p99):.1f} ms"),
                Row("relay", "CPU per call, µs (user + system): gateway / emulator / client",
                    " / ".join(f"{value:.0f}" for value in relay_cpu),
                    note="direct: — / {:.0f} / {:.0f} (the three share two cores)".format(*direct_cpu[1:])),
            ]
        finally:
            for proc in reversed(procs):
                proc.stop()


def _cpu(pids: tuple[int, int]) -> tuple[float, float, float]:
    """CPU seconds used so far by the gateway, the emulator and this process (the client)."""
    mine = os.times()
    return cpu_seconds([pids[0]]), cpu_seconds([pids[1]]), mine.user + mine.system


def _per_call(now: tuple[float, ...], then: tuple[float, ...], calls: int) -> tuple[float, ...]:
    """Microseconds of CPU per call of each process between two ``_cpu`` readings."""
    return tuple(1e6 * (after - before) / max(1, calls) for after, before in zip(now, then, strict=True))


async def storm_burst(urls: list[str], ticket: str, count: int) -> tuple[int, list[str]]:
    """``count`` relayed calls started at once, round-robin over ``urls``; (successes, failures)."""
    failures: list[str] = []
    ok = 0
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = asyncio.Event()

        async def one(i: int) -> None:
            nonlocal ok
            await start.wait()
            try:
                async with session.get(urls[i % len(urls)] + RELAYED, headers={"Cookie": f"{COOKIE}={ticket}"}) as a:
                    body = await a.text()
                    if a.status == 200:
                        ok += 1
                    else:
                        failures.append(f"{i}: {a.status} {body[:120]}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{i}: {type(exc).__name__}")

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0)
        start.set()
        await asyncio.gather(*tasks)
    return ok, failures


async def _storm(ctx: Context, name: str, replicas: int, store: dict[str, Any] | None) -> list[Row]:
    size = ctx.options.storm_size
    async with external_lark(ctx) as lark:
        urls, procs = await _gateways(ctx, lark, name.split(",")[0].replace(" ", ""), replicas, store)
        try:
            ticket = await login(urls[0], "/")
            refreshes, failures, calls = [], [], []
            for index in range(ctx.options.storm_rounds):
                await storm_burst(urls, ticket, 4)  # a warm-up: every replica has the session cached
                await expire_tokens(lark)
                before = await stats(lark)
                _, failed = await storm_burst(urls, ticket, size)
                after = await stats(lark)
                refreshes.append(after.get("refresh_token", 0) - before.get("refresh_token", 0))
                failures.append(len(failed))
                calls.append(after.get("calendars", 0) - before.get("calendars", 0))
                log(f"  relay storm {name} round {index + 1}: refresh calls {refreshes[-1]}, failures "
                    f"{failures[-1]} {failed[:3]}, calendar calls {calls[-1]} for {size} relayed calls")
            ctx.raw[f"relay-storm-{name}"] = {"refreshes": refreshes, "failures": failures, "provider_calls": calls}
            return [
                Row("relay", f"{name}: provider refresh calls per {size}-call expiry storm",
                    ", ".join(map(str, refreshes)), "exactly 1", all(r == 1 for r in refreshes)),
                Row("relay", f"{name}: failed relayed calls", ", ".join(map(str, failures)), "0",
                    all(f == 0 for f in failures)),
                Row("relay", f"{name}: calls that reached the provider (each call ≤ 1 retry)",
                    ", ".join(map(str, calls)), f"{size}–{2 * size}", all(size <= c <= 2 * size for c in calls)),
            ]
        finally:
            for proc in reversed(procs):
                proc.stop()


async def relay(ctx: Context) -> list[Row]:
    log("relay: throughput against calling the emulator directly")
    rows = await _throughput(ctx)
    log(f"relay: expiry storm of {ctx.options.storm_size} calls, one process (memory store)")
    rows += await _storm(ctx, "1 process, memory", 1, None)
    log("relay: expiry storm, three replicas on Redis")
    async with _redis(ctx) as url:
        store = {"backend": "redis", "url": url, "key_prefix": f"relay{time.time_ns()}:"}
        rows += await _storm(ctx, "3 replicas, Redis", 3, store)
    return rows
