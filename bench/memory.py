"""Memory per active session in the memory store, at 10k and 100k sessions.

Each figure comes from a fresh process (``python -m bench.memory probe N --what W --how H``):
the gateway's ``Runtime`` on the memory store, N users each signed in once the way a code exchange
does it (a token record saved, a session created; the cookies are not kept), then:

- ``--what store``: nothing else: what the store holds per session (the target: ≤ 1 KiB);
- ``--what cache``: every session also authenticated once, so the in-process cache of verified
  sessions (``session.cache_ttl_s``) holds an entry each: the cost while all of them are active at
  once, for information;

measured ``--how rss`` (resident set size before and after, after a full garbage collection,
divided by N) or ``--how tracemalloc`` (Python allocations still alive, divided by N; it excludes
the allocator's own slack, RSS includes it). The baseline is the same process before the sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import time
from typing import Any

from bench.context import Context, Row
from bench.harness import PYTHON, log

KIB = 1024


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _probe(count: int, what: str, how: str) -> dict[str, float]:
    import secrets
    import tracemalloc

    from gateway.config import GatewayConfig
    from gateway.providers import TokenSet
    from gateway.runtime import Runtime
    from plugins.lark.sandbox import LarkSandbox

    settings = LarkSandbox().provider_settings({"open": "http://127.0.0.1:9", "accounts": "http://127.0.0.1:9"})
    config = GatewayConfig(public_url="http://127.0.0.1:8080",
                           session={"secrets": [secrets.token_urlsafe(32)], "secure": False,
                                    # every entry must outlive the sign-in loop (100k take longer than 10 s)
                                    "cache_ttl_s": 3600},
                           store={"backend": "memory", "max_entries": max(200_000, count * 3)},
                           providers={"lark": settings})
    runtime = Runtime(config)
    # Warm every code path once (imports, caches, interned strings) before the baseline.
    warm = await _sign_in(runtime, "warmup", TokenSet)
    await runtime.authenticator.authenticate(warm)
    del warm
    gc.collect()
    if how == "tracemalloc":
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] if how == "tracemalloc" else _rss()
    for index in range(count):
        ticket = await _sign_in(runtime, f"ou_{index:032x}", TokenSet)
        if what == "cache" and await runtime.authenticator.authenticate(ticket) is None:
            raise RuntimeError("a fresh session did not authenticate")
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if how == "tracemalloc" else _rss()
    entries = len(runtime.store)  # type: ignore[arg-type]
    await runtime.aclose()
    return {"count": count, "bytes_per_session": (after - before) / count, "store_entries": entries}


async def _sign_in(runtime: Any, user: str, token_set: Any) -> str:
    """What a code exchange leaves behind: the user's token record and a session (Lark-sized values)."""
    now = time.time()
    tokens = token_set(access_token="u-" + os.urandom(30).hex()[:43], refresh_token="ur-" + os.urandom(30).hex()[:43],
                       expires_at=now + 7200, refresh_expires_at=now + 30 * 86400, scope="offline_access")
    await runtime.tokens.save("lark", "736588c9260f175d", user, tokens)
    ticket, _ = await runtime.sessions.create(provider="lark", user=user, tenant="736588c9260f175d",
                                              name="张三 Zhang San")
    return str(ticket)


async def memory(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for count in ctx.options.memory_counts:
        figures: dict[str, float] = {}
        for what, how in [(w, h) for w in ("store", "cache") for h in ("rss", "tracemalloc")]:
            log(f"memory: {count:,} sessions, {what}, {how}")
            process = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "bench.memory", "probe", str(count), "--what", what, "--how", how,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": _root()}, cwd=_root())
            try:
                out, err = await asyncio.wait_for(process.communicate(), 600)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise
            if process.returncode != 0:
                raise RuntimeError(f"memory probe failed: {err.decode(errors='replace')[-800:]}")
            figures[f"{what}-{how}"] = json.loads(out)["bytes_per_session"]
        ctx.raw[f"memory-{count}"] = figures
        store = figures["store-rss"]
        rows += [
            Row("memory", f"{count:,} sessions: memory store, RSS delta per session (bytes)", f"{store:.0f}",
                "≤ 1024", store <= KIB),
            Row("memory", f"{count:,} sessions: memory store, tracemalloc per session (bytes)",
                f"{figures['store-tracemalloc']:.0f}", "≤ 1024", figures["store-tracemalloc"] <= KIB),
            Row("memory", f"{count:,} sessions: store + verified-session cache, RSS / tracemalloc per session "
                "(bytes, all active within session.cache_ttl_s)",
                f"{figures['cache-rss']:.0f} / {figures['cache-tracemalloc']:.0f}"),
        ]
    return rows


def _root() -> str:
    from bench.harness import ROOT

    return str(ROOT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["probe"])
    parser.add_argument("count", type=int)
    parser.add_argument("--what", choices=["store", "cache"], default="store")
    parser.add_argument("--how", choices=["rss", "tracemalloc"], default="rss")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_probe(args.count, args.what, args.how))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
