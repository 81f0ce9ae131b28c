"""Service time of each stage of the end-to-end pipeline, one command at a time.

Usage: python -m bench.stages [--commands N]

The `e2e` scenario measures commit -> visible under load, where waiting for a core and
queueing behind other events are part of every figure. This probe takes them out: one
process runs the stages back to back for one command at a time, so each figure is what
that stage costs with nothing else in the way (the floor of the end-to-end latency), and
the gap between their sum and `e2e`'s p50 is the queueing. Stages, per command of the
e2e mix (restock, rename customer, restock, place order):

- command: `commands.handlers.execute`, from the call until its COMMIT returned;
- relay pass: `Relay.publish_batch`, the claim statement, the XADDs and the COMMIT;
- projector batch: `Worker.run_once` (read with status, rounds, XACK + PUBLISH);
- query check: the applied marks read as `?after=` reads them.

Same backend rules as `python -m bench` (a scratch database and namespace, removed after).
Figures are microseconds, median / p90 / p99 over the commands. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.backend import BenchBackend
from bench.scenarios.commands import Shop
from bench.scenarios.projection import prepare_live
from bench.stats import percentile
from cqrs.commands.db import make_session_factory
from cqrs.contracts import registered_contracts
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.relay.outbox import Relay
from cqrs.wiring import make_engine, make_redis

STAGES = ("command", "relay pass", "projector batch", "query check")


def _timed(samples: list[float], call: Callable[[], Any]) -> Any:
    started = time.perf_counter()
    result = call()
    samples.append((time.perf_counter() - started) * 1e6)
    return result


def probe(backend: BenchBackend, commands: int) -> dict[str, list[float]]:
    settings = backend.settings("stages")
    keys = KeyMap(settings.namespace)
    client = make_redis(settings.redis_url or "", settings)
    engine = make_engine(settings.database_url or "", pool_size=1)
    shop = Shop.create(make_session_factory(engine), products=20, customers=10)
    relay = Relay(settings.database_url or "", client, settings)
    relay.drain()
    prepare_live(client, keys, ["bench-stages"], settings.partitions)
    worker = Worker(client, settings, list(PROJECTIONS.values()), consumer="bench-stages")
    while worker.run_once(drain=True):  # the shop's own events, and every slot taken
        pass
    samples: dict[str, list[float]] = {stage: [] for stage in STAGES}
    rng = random.Random(7)
    try:
        with relay._connect() as conn:
            for n in range(commands):
                result = _timed(samples["command"], lambda n=n: shop.light_command(rng, n))
                published = _timed(samples["relay pass"], lambda: relay.publish_batch(conn))
                applied = _timed(samples["projector batch"], lambda: worker.run_once(drain=True))
                marks = [
                    (mark, event.version)
                    for event in result.events
                    for name, contract in registered_contracts().items()
                    if (
                        mark := contract.applied(  # type: ignore[misc]
                            keys.views(name, 1),
                            event.aggregate_type,
                            event.aggregate_id,
                            event.partition_key,
                        )
                    )
                ]

                def check(marks: list[tuple[tuple[str, str], int]] = marks) -> bool:
                    pipe = client.pipeline(transaction=False)
                    for (key, field), _version in marks:
                        pipe.hget(key, field)
                    got = pipe.execute()
                    return all(
                        int(have or 0) >= want for have, (_m, want) in zip(got, marks, strict=True)
                    )

                visible = _timed(samples["query check"], check)
                if not (published and applied and visible):
                    raise SystemExit(f"bench.stages: command {n} did not go through every stage")
    finally:
        engine.dispose()
        client.close()
        backend.delete_namespace(settings.namespace)
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages", description=__doc__)
    parser.add_argument("--commands", type=int, default=2000, help="commands to time")
    args = parser.parse_args(argv)
    if args.commands < 10:
        parser.error("--commands must be at least 10")
    with BenchBackend() as backend:
        samples = probe(backend, args.commands)
    print("| stage | median us | p90 us | p99 us |")
    print("|---|---|---|---|")
    total = [sum(values) for values in zip(*samples.values(), strict=True)]
    for stage, values in [*samples.items(), ("sum", total)]:
        figures = [percentile(values, q) for q in (50, 90, 99)]
        print(f"| {stage} | " + " | ".join(f"{f:.0f}" for f in figures) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
