"""`amorlip bench {overhead,loss,throughput,data,comm,flops,memory,amortizer}`: efficiency measurements (docs/benchmarks.md),
and the amortizer's mechanism check (can Stage I learn log Z on frozen features).

Each command prints a table of figures measured side by side in one run (ratios, never absolute timing
targets) and writes JSON with `--json PATH`. Options are parsed here from the words the CLI did not use.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Any

COMMANDS = {
    "overhead": "amorlip.bench.overhead",
    "loss": "amorlip.bench.loss",
    "throughput": "amorlip.bench.throughput",
    "data": "amorlip.bench.data",
    "comm": "amorlip.bench.comm",
    "flops": "amorlip.bench.flops",
    "memory": "amorlip.bench.memory",
    "amortizer": "amorlip.bench.amortizer",
}


def run_command(what: str, extra: list[str]) -> dict[str, Any]:
    """Run bench `what` with command-line words `extra`; returns the results (as written with --json)."""
    if what not in COMMANDS:
        raise ValueError(f"unknown bench {what!r}; choose one of: {', '.join(COMMANDS)}")
    return importlib.import_module(COMMANDS[what]).run(list(extra))


def run_bench(args: argparse.Namespace, extra: list[str]) -> int:
    """CLI entry point: `args.what` names the benchmark, `extra` holds its options."""
    run_command(args.what, extra)
    return 0


__all__ = ["COMMANDS", "run_bench", "run_command"]
