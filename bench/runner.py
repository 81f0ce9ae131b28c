"""Run scenarios against the configured backend and print figures with their ratios.

Usage: python -m bench [SCENARIO ...] [--quick] [--repeat N] [--json PATH]

`cluster` runs only when named (it starts servers of its own). A SIGTERM or SIGINT
unwinds the run like an error (bench.lifecycle), so servers a scenario started are
stopped and the scratch database is dropped.

Each scenario measures the project and the raw ceiling for the same work in the same
run; the table shows medians with [min-max] over the repetitions and the ratio of the
medians. Nothing fails on time: a missed target is printed as MISSED, never raised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bench.backend import BenchBackend
from bench.lifecycle import Interrupted, interrupt_on_signals
from bench.scenarios import ALIASES, OPT_IN, SCENARIOS, Context, runner
from bench.stats import Row, table


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in load],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks: the project against the raw ceiling, same run, same work.",
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help=f"any of {', '.join(SCENARIOS + OPT_IN)} (default: all but {', '.join(OPT_IN)})",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="repetitions per figure (default 3; 1 with --quick)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write results as JSON")
    args = parser.parse_args(argv)
    chosen = [ALIASES.get(s, s) for s in args.scenarios] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS + OPT_IN]
    if unknown:
        known = ", ".join(SCENARIOS + OPT_IN)
        parser.error(f"unknown scenario {unknown[0]!r} (known: {known})")
    args.scenarios = [s for s in SCENARIOS + OPT_IN if s in chosen]
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    args.repeat = max(1, args.repeat)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return run(args, argv)  # signal handlers can only be set in the main thread
    try:
        with interrupt_on_signals():
            return run(args, argv)
    except Interrupted as stop:
        print(f"bench: {stop}; servers stopped, scratch database dropped", file=sys.stderr)
        return stop.exit_code


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.monotonic()
    rows: list[Row] = []
    failed: dict[str, str] = {}
    with BenchBackend() as backend:
        ctx = Context(backend, quick=args.quick, repeat=args.repeat)
        description = {**machine(), **backend.describe()}
        ctx.say(
            f"bench: {description['cores']} cores, {description['cpu_model']}, load "
            f"{description['load_average']}; redis {description['redis_version']}, "
            f"postgresql {description['postgresql_version']}; scratch database "
            f"{backend.database_name}"
        )
        for name in args.scenarios:
            t = time.monotonic()
            try:
                rows += runner(name)(ctx)
            except Exception as exc:  # one broken scenario must not lose the others' figures
                failed[name] = f"{type(exc).__name__}: {exc}"
                ctx.say(f"{name}: FAILED: {failed[name]}")
                traceback.print_exc()
                continue
            ctx.say(f"{name}: {time.monotonic() - t:.1f}s")
    command = "python -m bench " + " ".join(
        ([*args.scenarios] if argv or len(args.scenarios) < len(SCENARIOS) else [])
        + (["--quick"] if args.quick else [])
        + ([f"--repeat {args.repeat}"] if args.repeat != (1 if args.quick else 3) else [])
    )
    print(table(rows))
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f}s; ratio = project / ceiling")
    for name, error in failed.items():
        print(f"scenario {name} FAILED: {error}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "command": command.strip(),
                    "quick": args.quick,
                    "repeat": args.repeat,
                    "scenarios": args.scenarios,
                    "machine": description,
                    "scratch": {
                        "database": backend.database_name,
                        "namespace_prefix": f"bench-{backend.run_id}-",
                    },
                    "seconds": round(time.monotonic() - started, 1),
                    "rows": [r.as_json() for r in rows],
                    "failed": failed,
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
