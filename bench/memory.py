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


async def _probe(count: int, what: str, how: str, store_kind: str = "memory") -> dict[str, float]:
    import secrets
    import tracemalloc

    from gateway.config import GatewayConfig
    from gateway.providers import TokenSet
    from gateway.runtime import Runtime
    from plugins.lark.sandbox import LarkSandbox

    settings = LarkSandbox().provider_settings({"open": "http://127.0.0.1:9", "accounts": "http://127.0.0.1:9"})
    config = GatewayConfig(public_url="http://127.0.0.1:8080",
                           session={"secrets": [secrets.token_urlsafe(32)], "secure": False},
                           store={"backend": "memory", "max_entries": max(200_000, count * 3)},
                           providers={"lark": settings})
    store = None
    if store_kind in ("lean", "lean-compact"):
        from bench.lean_store import LeanMemoryStore

        store = LeanMemoryStore(max_entries=max(200_000, count * 3))
    runtime = Runtime(config, store=store)
    # Warm every code path once (imports, caches, interned strings) before the baseline.
    warm = await _sign_in(runtime, "warmup", TokenSet)
    await runtime.authenticator.authenticate(warm)
    del warm
    if store_kind == "lean-compact":  # records are written only from here on (never read back)
        if what != "store":
            raise SystemExit("lean-compact is measured for --what store only")
        _compact_session_records()
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


def _compact_session_records() -> None:
    """A proposal for ``gateway/sessions.py``, measured here: the session record without what the
    store key or the record itself already says (``sid`` is in the key, ``token_key`` is
    ``tok:<provider>:<tenant>:<user>``) and with whole-second times."""
    import json

    from gateway.sessions import SessionRecord

    def to_bytes(self: SessionRecord) -> bytes:
        return json.dumps([self.provider, self.user, self.tenant, self.name, int(self.created_at),
                           int(self.expires_at)], separators=(",", ":"), ensure_ascii=False).encode()

    SessionRecord.to_bytes = to_bytes  # type: ignore[method-assign]


async def _sign_in(runtime: Any, user: str, token_set: Any) -> str:
    """What a code exchange leaves behind: the user's token record and a session (Lark-sized values)."""
    now = time.time()
    tokens = token_set(access_token="u-" + os.urandom(30).hex()[:43], refresh_token="ur-" + os.urandom(30).hex()[:43],
                       expires_at=now + 7200, refresh_expires_at=now + 30 * 86400, scope="offline_access")
    key = await runtime.tokens.save("lark", "736588c9260f175d", user, tokens)
    ticket, _ = await runtime.sessions.create(provider="lark", user=user, tenant="736588c9260f175d",
                                              name="张三 Zhang San", token_key=key)
    return str(ticket)


async def memory(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for count in ctx.options.memory_counts:
        figures: dict[str, float] = {}
        for what, how, kind in [(w, h, "memory") for w in ("store", "cache") for h in ("rss", "tracemalloc")] + \
                [("store", h, kind) for kind in ("lean", "lean-compact") for h in ("rss", "tracemalloc")]:
            log(f"memory: {count:,} sessions, {what}, {how}, {kind} store")
            process = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "bench.memory", "probe", str(count), "--what", what, "--how", how, "--store", kind,
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
            figures[f"{what}-{how}" + ("" if kind == "memory" else f"-{kind}")] = json.loads(out)["bytes_per_session"]
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
            Row("memory", f"{count:,} sessions: proposed lean store (bench/lean_store.py), RSS / tracemalloc "
                "per session (bytes)", f"{figures['store-rss-lean']:.0f} / {figures['store-tracemalloc-lean']:.0f}",
                "≤ 1024", figures["store-rss-lean"] <= KIB),
            Row("memory", f"{count:,} sessions: proposed lean store + compact session record, RSS / tracemalloc "
                "per session (bytes)",
                f"{figures['store-rss-lean-compact']:.0f} / {figures['store-tracemalloc-lean-compact']:.0f}",
                "≤ 1024", figures["store-rss-lean-compact"] <= KIB),
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
    parser.add_argument("--store", choices=["memory", "lean", "lean-compact"], default="memory",
                        help="lean: bench/lean_store.py; lean-compact: also a compact session record "
                             "(proposals, measured for comparison)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_probe(args.count, args.what, args.how, args.store))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
