"""Refresh storm: 1,000 concurrent requests for one user whose access token is about to expire.

The Lark emulator issues a 4-second access token at login, so the gateway wants to refresh it 2 s
later (half its lifetime); the token it issues next lives an hour. Once the first is due, a burst
of ``storm_size`` requests starts at once (one aiohttp connection each), then, as the same-run
baseline, the same burst with the fresh token. Counted: refresh calls that reached the provider
(must be 1), failed requests (must be 0), requests whose upstream saw another token than the new
one; measured: latency of the storm burst against the baseline burst.

Deployments: one ``gateway serve`` on the memory store; three ``gateway serve`` replicas on one
Redis (``redis-server`` started here), the burst spread round-robin over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.context import Context, Row
from bench.harness import PYTHON, Proc, free_port, log, server_argv, wait_http
from bench.site import COOKIE, Emulator, lark_emulator, login

FIRST_TTL_S = 4


@dataclass
class Burst:
    latencies_ms: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    tokens: set[str] = field(default_factory=set)
    seconds: float = 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def burst(urls: list[str], ticket: str, count: int) -> Burst:
    """``count`` requests started at once, round-robin over ``urls``, one connection each."""
    result = Burst()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = asyncio.Event()

        async def one(i: int) -> None:
            await start.wait()
            began = time.perf_counter()
            try:
                async with session.get(f"{urls[i % len(urls)]}/storm/{i}",
                                       headers={"Cookie": f"{COOKIE}={ticket}"}) as answer:
                    body = await answer.text()
                    status = answer.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                result.failures.append(f"{i}: {type(exc).__name__}: {exc}")
                return
            result.latencies_ms.append((time.perf_counter() - began) * 1000)
            if status != 200:
                result.failures.append(f"{i}: {status} {body[:120]}")
            else:
                result.tokens.add(body)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.sleep(0)
        began = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        result.seconds = time.perf_counter() - began
    return result


@contextlib.asynccontextmanager
async def _redis(ctx: Context) -> Any:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = ctx.processes.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(ctx.workdir)])
    try:
        import redis.asyncio as aioredis

        client = aioredis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.ping()
                break
            except Exception:
                if proc.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{proc.tail()}") from None
                await asyncio.sleep(0.05)
        await client.aclose()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


async def _round(ctx: Context, lark: Emulator, urls: list[str]) -> tuple[int, Burst, Burst]:
    lark.sandbox.access_ttl_s = FIRST_TTL_S
    before = lark.sandbox.stats["refresh_token"]
    ticket = await login(urls[0], "/")
    await asyncio.sleep(FIRST_TTL_S / 2 + 0.3)  # now due: the next token lives an hour
    lark.sandbox.access_ttl_s = 3600
    storm = await burst(urls, ticket, ctx.options.storm_size)
    refreshes = lark.sandbox.stats["refresh_token"] - before
    baseline = await burst(urls, ticket, ctx.options.storm_size)
    return refreshes, storm, baseline


async def _deployment(ctx: Context, name: str, replicas: int, store: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    async with lark_emulator(access_ttl_s=FIRST_TTL_S) as lark:
        upstream_port = free_port()
        upstream_proc = ctx.processes.start(f"storm-{name}-upstream", server_argv("token-echo", upstream_port))
        procs: list[Proc] = [upstream_proc]
        try:
            await wait_http(f"http://127.0.0.1:{upstream_port}/", upstream_proc)
            ports = [free_port() for _ in range(replicas)]
            sections: dict[str, Any] = {"upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
                                        "identity": {"pass_access_token": True}}
            if store:
                sections["store"] = store
            # Behind a load balancer every replica has one public URL: here, the first replica's.
            config = lark.write_config(ctx.workdir / f"storm-{name}.yaml", ports[0], **sections)
            urls = []
            for port in ports:
                proc = ctx.processes.start(f"storm-{name}-{port}", [PYTHON, "-m", "gateway", "serve", "--config",
                                                                   str(config), "--port", str(port)])
                procs.append(proc)
                urls.append(f"http://127.0.0.1:{port}")
                await wait_http(urls[-1] + "/_gateway/healthz", proc)
            refreshes, failures, wrong, added_p50, added_p99, storm_p99, base_p99 = [], [], [], [], [], [], []
            for index in range(ctx.options.storm_rounds):
                count, storm, baseline = await _round(ctx, lark, urls)
                refreshes.append(count)
                failures.append(len(storm.failures) + len(baseline.failures))
                wrong.append(0 if len(storm.tokens) == 1 and storm.tokens == baseline.tokens else 1)
                added_p50.append(storm.pct(0.5) - baseline.pct(0.5))
                added_p99.append(storm.pct(0.99) - baseline.pct(0.99))
                storm_p99.append(storm.pct(0.99))
                base_p99.append(baseline.pct(0.99))
                log(f"  {name} round {index + 1}: refresh calls {count}, failures {failures[-1]} "
                    f"{(storm.failures + baseline.failures)[:3]}, tokens seen {len(storm.tokens)}, storm "
                    f"{storm.seconds:.2f} s (p50 {storm.pct(0.5):.0f} ms, p99 {storm.pct(0.99):.0f} ms), baseline "
                    f"{baseline.seconds:.2f} s (p50 {baseline.pct(0.5):.0f} ms, p99 {baseline.pct(0.99):.0f} ms)")
            ctx.raw[f"storm-{name}"] = {"refreshes": refreshes, "failures": failures, "added_p50_ms": added_p50,
                                        "added_p99_ms": added_p99, "storm_p99_ms": storm_p99,
                                        "baseline_p99_ms": base_p99}
            size = ctx.options.storm_size
            rows += [
                Row("storm", f"{name}: provider refresh calls per {size}-request storm ({len(refreshes)} rounds)",
                    ", ".join(map(str, refreshes)), "exactly 1", all(r == 1 for r in refreshes)),
                Row("storm", f"{name}: failed requests per storm + baseline burst", ", ".join(map(str, failures)),
                    "0", all(f == 0 for f in failures)),
                Row("storm", f"{name}: bursts where the upstream saw a stale or mixed token",
                    ", ".join(map(str, wrong)), "0", all(w == 0 for w in wrong)),
                Row("storm", f"{name}: storm p50 / p99 minus fresh-token burst p50 / p99, ms",
                    f"{statistics.median(added_p50):.0f} / {statistics.median(added_p99):.0f} "
                    f"(p99 {min(added_p99):.0f}–{max(added_p99):.0f}; baseline p99 "
                    f"{statistics.median(base_p99):.0f})"),
            ]
        finally:
            for proc in reversed(procs):
                proc.stop()
    return rows


async def storm(ctx: Context) -> list[Row]:
    log(f"refresh storm: {ctx.options.storm_size} concurrent requests, one process (memory store)")
    rows = await _deployment(ctx, "1 process, memory", 1, None)
    log("refresh storm: three replicas on Redis")
    try:
        async with _redis(ctx) as url:
            store = {"backend": "redis", "url": url, "key_prefix": f"bench{time.time_ns()}:"}
            rows += await _deployment(ctx, "3 replicas, Redis", 3, store)
    except Exception as exc:  # the Redis store is young: report, don't hide the memory figures
        log(f"three replicas on Redis failed: {type(exc).__name__}: {exc}")
        rows.append(Row("storm", "3 replicas, Redis", f"FAILED to run: {type(exc).__name__}: {str(exc)[:150]}",
                        "", False))
    return rows


