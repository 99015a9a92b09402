"""Start-up: from launching ``gateway serve`` to its first 200 from ``/_gateway/healthz``.

Same-run baseline: a bare uvicorn serving a raw ASGI app (``python -m bench.apps raw``), launched
and polled the same way; the two alternate. Polling: one GET every 5 ms on loopback.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.context import Context, Row
from bench.harness import PYTHON, Spread, free_port, log, server_argv, wait_http
from bench.site import lark_emulator


async def _time_to_200(ctx: Context, name: str, argv: list[str], url: str, tree: Path | None = None) -> float:
    proc = ctx.processes.start(name, argv, tree=tree)
    try:
        await wait_http(url, proc, timeout_s=30, interval_s=0.005)
        return time.perf_counter() - proc.started_at
    finally:
        proc.stop()


async def startup(ctx: Context) -> list[Row]:
    log("start-up: gateway serve to the first 200 from /_gateway/healthz")
    gateway_times: list[float] = []
    bare_times: list[float] = []
    others: dict[str, list[float]] = {label: [] for label in ctx.options.compare}
    async with lark_emulator() as lark:
        for rep in range(ctx.options.startup_reps):
            port = free_port()
            config = lark.write_config(ctx.workdir / f"startup-{rep}.yaml", port)
            bare_port = free_port()
            runs: list[tuple[str, list[str], str, list[float], Path | None]] = [
                ("gateway", [PYTHON, "-m", "gateway", "serve", "--config", str(config)],
                 f"http://127.0.0.1:{port}/_gateway/healthz", gateway_times, None),
                ("bare", server_argv("raw", bare_port), f"http://127.0.0.1:{bare_port}/", bare_times, None),
            ]
            for label, tree in ctx.options.compare.items():
                runs.append((label, [PYTHON, "-m", "gateway", "serve", "--config", str(config)],
                             f"http://127.0.0.1:{port}/_gateway/healthz", others[label], tree))
            shift = rep % len(runs)
            for name, argv, url, times, tree in runs[shift:] + runs[:shift]:
                times.append(await _time_to_200(ctx, f"startup-{name}-{rep}", argv, url, tree))
            log(f"  rep {rep + 1}: gateway serve {gateway_times[-1]:.3f} s, bare uvicorn {bare_times[-1]:.3f} s"
                + "".join(f", [{label}] {times[-1]:.3f} s" for label, times in others.items()))
    gateway, bare = Spread.of(gateway_times), Spread.of(bare_times)
    ratio = Spread.of([g / b for g, b in zip(gateway_times, bare_times, strict=True)])
    ctx.raw["startup"] = {"gateway_s": gateway_times, "bare_s": bare_times, **others}
    rows = [
        Row("startup", "gateway serve → first 200 from /_gateway/healthz, s", gateway.fmt(3), "< 1 s",
            gateway.median < 1.0),
        Row("startup", "bare uvicorn + raw ASGI app → first 200, s (same-run baseline)", bare.fmt(3)),
        Row("startup", "gateway serve / bare uvicorn", ratio.fmt(2),
            note=f"median difference {statistics.median(gateway_times) - statistics.median(bare_times):.3f} s"),
    ]
    for label, times in others.items():
        rows.append(Row("startup", f"gateway serve [{label}] → first 200, s", Spread.of(times).fmt(3), "< 1 s",
                        statistics.median(times) < 1.0))
    return rows
