"""``python -m bench``: every measurement of issue 6, each as a ratio to its same-run baseline.

    python -m bench                      # everything (about 20 minutes on 2 cores)
    python -m bench --only middleware    # one or more of: middleware sidecar latency forward-auth
                                         #   storm memory startup relay
    python -m bench --quick              # 3 repetitions of 3 s: a smoke run, noisier figures

``bench/run`` installs wrk, nginx and redis-server with apt when they are missing, then runs this.
The table goes to stdout (Markdown) and, with every raw figure, to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.context import Context, Options, Row
from bench.harness import Processes, Wrk, log, machine

SCENARIOS = ("middleware", "sidecar", "latency", "forward-auth", "storm", "memory", "startup", "relay")


def _scenario(name: str) -> Callable[[Context], Awaitable[list[Row]]]:
    import importlib

    module, function = {
        "middleware": ("throughput", "middleware"),
        "sidecar": ("throughput", "sidecar"),
        "latency": ("throughput", "latency"),
        "forward-auth": ("throughput", "forward_auth"),
        "storm": ("storm", "storm"),
        "memory": ("memory", "memory"),
        "startup": ("startup", "startup"),
        "relay": ("relay", "relay"),
    }[name]
    scenario: Callable[[Context], Awaitable[list[Row]]] = getattr(importlib.import_module(f"bench.{module}"),
                                                                  function)
    return scenario


def render(rows: list[Row], info: dict[str, str]) -> str:
    lines = ["| scenario | figure | median (min–max) | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        met = "" if row.met is None else ("yes" if row.met else "**no**")
        figure = f"{row.figure} ({row.note})" if row.note else row.figure
        lines.append(f"| {row.scenario} | {figure} | {row.value} | {row.target} | {met} |")
    head = ", ".join(f"{key} {value}" for key, value in info.items())
    return f"Machine: {head}\n\n" + "\n".join(lines) + "\n"


def _require_bench_extra() -> None:
    import importlib.util

    missing = [name for name in ("itsdangerous",) if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"bench needs {', '.join(missing)}: pip install -e '.[dev,bench]' (bench/run does it)")


async def run(options: Options, names: list[str]) -> tuple[int, str, dict[str, object]]:
    _require_bench_extra()
    info = machine()
    log(f"machine: {info}")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        processes = Processes(workdir)
        ctx = Context(options, workdir, processes, Wrk(workdir, threads=options.threads,
                                                       connections=options.connections))
        rows: list[Row] = []
        started = time.monotonic()
        try:
            for name in names:
                try:
                    rows += await _scenario(name)(ctx)
                except Exception as exc:
                    log(f"{name} failed: {type(exc).__name__}: {exc}")
                    rows.append(Row(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:200]}", met=False))
                finally:
                    processes.stop_all()
        finally:
            processes.stop_all()
        info["bench_minutes"] = f"{(time.monotonic() - started) / 60:.1f}"
    payload = {"machine": info, "options": vars(options), "rows": [r.as_dict() for r in rows], "raw": ctx.raw}
    return (0 if all(row.figure != "FAILED" for row in rows) else 1), render(rows, info), payload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 3 s (a smoke run)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 5)")
    parser.add_argument("--server", choices=["uvicorn", "granian"], default="uvicorn",
                        help="server for the extra sidecar variant (the gateway serve figures always use the CLI)")
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=PATH",
                        help="other copies of the project (e.g. before=/tmp/before): their gateway is measured "
                             "side by side with this one in the middleware, sidecar and forward-auth scenarios")
    parser.add_argument("--sidecar-variants", nargs="*", choices=["uvicorn", "granian"], default=[],
                        help="extra sidecar variants: the same sidecar on uvicorn without access log, on granian")
    parser.add_argument("--out", type=Path, default=None, help="write every figure as JSON here")
    args = parser.parse_args(argv)
    options = Options()
    if args.quick:
        options.reps, options.duration_s, options.warmup_s = 3, 3.0, 1.0
        options.storm_rounds, options.memory_counts, options.startup_reps = 1, (10_000,), 3
    if args.reps:
        options.reps = args.reps
    if args.duration:
        options.duration_s = args.duration
    options.server = args.server
    for item in args.compare:
        label, _, path = item.partition("=")
        if not path or not Path(path, "gateway").is_dir():
            parser.error(f"--compare {item}: expected LABEL=PATH to a copy of the project")
        options.compare[label] = Path(path).resolve()
    options.sidecar_variants = tuple(args.sidecar_variants)
    code, table, payload = asyncio.run(run(options, list(args.only)))
    print(table)
    if args.out is not None:
        args.out.write_text(json.dumps(payload, indent=1, default=str))
        log(f"wrote {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
