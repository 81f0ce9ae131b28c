"""`python -m bench.soak`: the command line of the soak (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from bench.lifecycle import Interrupted, interrupt_on_signals
from bench.soak.config import Config, fault_schedule, log
from bench.soak.report import render
from bench.soak.run import run


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print the report; exit 1 on any problem, 128+N when stopped by signal N."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="the whole system under a seeded workload and injected faults",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None)
    length.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument(
        "--min-each", type=int, default=None, help="faults of each kind (default 3, 1 if < 2 min)"
    )
    parser.add_argument("--retention", type=int, default=5000, help="CQRS_STREAM_RETENTION")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    config = Config(
        seconds=seconds,
        seed=seed,
        writers=args.writers,
        readers=args.readers,
        min_each=args.min_each if args.min_each is not None else (3 if seconds >= 120 else 1),
        mean_interval=8.0 if seconds >= 120 else 3.0,
        retention=args.retention,
        keep=args.keep,
        json_path=args.json,
    )
    log(f"seed {seed}, {seconds:.0f} s; faults: {len(fault_schedule(config))} planned")
    try:
        with interrupt_on_signals():
            report = run(config)
    except Interrupted as exc:
        log(f"{exc}: every process of the run stopped and its directories removed")
        return exc.exit_code
    text = render(report)
    print(text, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "text": text}, indent=2, default=str))
    return 0 if report["ok"] else 1
