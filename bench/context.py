"""What a scenario gets: options, a work directory, a process registry, wrk; what it returns: rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import Processes, Spread, Wrk


@dataclass
class Options:
    reps: int = 5
    duration_s: float = 5.0
    warmup_s: float = 2.0
    connections: int = 32
    threads: int = 2
    server: str = "uvicorn"  # the server of the gateway variants (sidecar, forward-auth)
    storm_size: int = 1000
    storm_rounds: int = 3
    memory_counts: tuple[int, ...] = (10_000, 100_000)
    startup_reps: int = 7
    compare: dict[str, Path] = field(default_factory=dict)  # label -> another copy of the project
    sidecar_variants: tuple[str, ...] = ()  # extra sidecar servers: "uvicorn" (bench.apps), "granian"


@dataclass
class Context:
    options: Options
    workdir: Path
    processes: Processes
    wrk: Wrk
    raw: dict[str, Any] = field(default_factory=dict)  # every measurement, for the JSON file
    pids: dict[str, int] = field(default_factory=dict)  # base URL -> pid of the server serving it


@dataclass
class Row:
    """One line of the results table: a figure, its spread, the target and whether it is met."""

    scenario: str
    figure: str
    value: str
    target: str = ""
    met: bool | None = None
    note: str = ""

    @classmethod
    def ratio(cls, scenario: str, figure: str, spread: Spread, minimum: float | None = None,
              note: str = "") -> Row:
        met = None if minimum is None else spread.median >= minimum
        return cls(scenario, figure, spread.fmt(2), f"≥ {minimum:.2f}" if minimum is not None else "", met, note)

    def as_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "figure": self.figure, "value": self.value, "target": self.target,
                "met": self.met, "note": self.note}
