"""Projection: events/s from the streams into every view, 1 and 2 worker processes.

The project side is `projector.worker.Worker` with every projection and every guarantee
on (version gates, crash-safe index bookkeeping, leases, acknowledgements), exactly as
`cqrs project` runs it. The ceiling is the hand-written loop over the same entries and the
same consumer-group deliveries (one group per projection): XREADGROUP COUNT 500 +
pipelined HSET of the event's fields + XACK, and a variant with one Lua call per batch
that also checks versions. Both sides are timed from "go" until every group has read its
whole stream with nothing pending (bench.procs).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import psutil

from bench import ceilings
from bench.history import make_history, xadd_history
from bench.procs import ConsumerPool, reset_groups
from bench.scenarios import Context
from bench.stats import Figure, Row
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import unlink_pattern
from cqrs.projector.state import ProjectionState, write_state
from cqrs.redisio import publish
from cqrs.settings import Settings
from cqrs.tuning import tune_gc
from cqrs.wiring import make_redis

WORKER_ROUND = "bench.scenarios.projection:worker_round"
RAW_ROUND = "bench.ceilings:raw_loop_child"


def cpu_seconds() -> float:
    """This process's CPU time so far (user + system)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


def worker_round(
    settings_values: dict[str, Any], consumer: str, *, ready: Any, go: Any, stop: Any, **_: Any
) -> dict[str, Any]:
    """One `cqrs project` worker (all projections) until `stop`."""
    from cqrs.projector.worker import Worker

    settings = Settings(**settings_values)
    client = make_redis(settings.redis_url or "", settings)
    worker = Worker(client, settings, list(PROJECTIONS.values()), consumer=consumer)
    ready()
    go.wait()
    cpu = cpu_seconds()
    tune_gc(settings.projector_gc_threshold)  # as `cqrs project` does
    worker.run(stop)
    cpu = cpu_seconds() - cpu
    client.close()
    stats = worker.stats
    return {
        "consumer": consumer,
        "cpu": cpu,
        "rss": psutil.Process().memory_info().rss,
        "applied": stats.applied,
        "acked": stats.acked,
        "failed": stats.failed,
        "batches": stats.batches,
    }


def redis_cpu_seconds(client: Any) -> float:
    """The server's CPU so far (user + system), summed over every master of a cluster."""
    info = client.info("cpu")
    parts = info.values() if isinstance(next(iter(info.values()), None), dict) else [info]
    return sum(float(p["used_cpu_sys"]) + float(p["used_cpu_user"]) for p in parts)


def prepare_live(client: Any, keys: KeyMap, consumers: list[str], partitions: int) -> None:
    """Empty views of generation 1 for every projection, fresh groups at the start of the
    streams, no leases, and the workers' heartbeats registered up front so each computes
    its fair share from the first batch (no rebalancing inside the timed window)."""
    for name in PROJECTIONS:
        unlink_pattern(client, keys.projection_pattern(name))
        client.delete(keys.workers(name), *[keys.lease(name, p) for p in range(partitions)])
        write_state(client, keys, name, ProjectionState(1, PROJECTIONS[name].version))
        now_ms = int(time.time() * 1000)
        client.zadd(keys.workers(name), dict.fromkeys(consumers, now_ms))
    reset_groups(client, [keys.stream(p) for p in range(partitions)], list(PROJECTIONS))


def prepare_raw(client: Any, keys: KeyMap, partitions: int) -> None:
    for name in PROJECTIONS:
        unlink_pattern(client, f"{keys.ns}:ceiling-{name}:*")
    groups = [ceilings.raw_group(name) for name in PROJECTIONS]
    reset_groups(client, [keys.stream(p) for p in range(partitions)], groups)


def measure(
    ctx: Context, pool: ConsumerPool, settings: Settings, client: Any, n_events: int
) -> dict[str, list[float]]:
    """events/s per configuration over ctx.repeat rounds on the streams already filled."""
    keys = KeyMap(settings.namespace)
    partitions = settings.partitions
    streams = [keys.stream(p) for p in range(partitions)]
    values = settings.model_dump()
    handled = {name: list(p.handlers) for name, p in PROJECTIONS.items()}
    raw_groups = [ceilings.raw_group(name) for name in PROJECTIONS]
    figures: dict[str, list[float]] = {}
    rss: list[int] = []
    raw_rss: list[int] = []

    def record(name: str, seconds: float) -> None:
        figures.setdefault(name, []).append(n_events / seconds)

    def record_cpu(name: str, reports: list[dict[str, Any]], redis_seconds: float) -> None:
        # CPU per stream entry, the consumers' and the Redis server's (INFO cpu around the
        # round): what bounds a second worker on the machine's cores (docs/benchmarks.md).
        consumers = sum(r["cpu"] for r in reports)
        figures.setdefault(f"{name}-cpu", []).append(1e6 * consumers / n_events)
        figures.setdefault(f"{name}-redis-cpu", []).append(1e6 * redis_seconds / n_events)

    for rep in range(ctx.repeat):
        for workers in (1, 2):
            consumers = [f"bench-{rep}-{workers}-{i}" for i in range(workers)]
            prepare_live(client, keys, consumers, partitions)
            # The first 1-worker round runs in a fresh process, so its RSS is the worker's.
            with contextlib.ExitStack() as stack:
                fresh = rep == 0 and workers == 1
                runner = stack.enter_context(ConsumerPool(1)) if fresh else pool
                redis_before = redis_cpu_seconds(client)
                timed = runner.round(
                    WORKER_ROUND,
                    [(values, c) for c in consumers],
                    client,
                    streams,
                    list(PROJECTIONS),
                    tick=lambda: publish(client, keys.relay_wakeup_channel(), 1),
                )
            failed = sum(r["failed"] for r in timed.reports)
            if failed:
                ctx.say(f"  warning: {failed} entries failed in the project's round")
            record(f"project-{workers}", timed.seconds)
            used = redis_cpu_seconds(client) - redis_before
            record_cpu(f"project-{workers}", timed.reports, used)
            if rep == 0 and workers == 1:
                rss += [r["rss"] for r in timed.reports]
        for mode, procs in (("hset", 1), ("lua", 1), ("hset", 2)):
            prepare_raw(client, keys, partitions)
            args = [
                (
                    settings.redis_url,
                    settings.namespace,
                    [p for p in range(partitions) if p % procs == i],
                    handled,
                    mode,
                    f"raw-{rep}-{i}",
                )
                for i in range(procs)
            ]
            fresh = rep == 0 and (mode, procs) == ("hset", 1)
            with contextlib.ExitStack() as stack:
                runner = stack.enter_context(ConsumerPool(1)) if fresh else pool
                redis_before = redis_cpu_seconds(client)
                timed = runner.round(RAW_ROUND, args, client, streams, raw_groups)
            record(f"raw-{mode}-{procs}", timed.seconds)
            used = redis_cpu_seconds(client) - redis_before
            record_cpu(f"raw-{mode}-{procs}", timed.reports, used)
            if fresh:
                raw_rss += [r["rss"] for r in timed.reports]
        rates = sorted(k for k in figures if not k.endswith("cpu"))
        ctx.say(
            f"  projection rep {rep + 1}: "
            + ", ".join(f"{k} {figures[k][-1]:.0f}/s" for k in rates)
            + "; CPU us per entry (consumers + Redis): "
            + ", ".join(
                f"{k} {figures[k + '-cpu'][-1]:.1f}+{figures[k + '-redis-cpu'][-1]:.1f}"
                for k in rates
            )
        )
    figures["rss"] = [float(r) for r in rss]
    figures["raw-rss"] = [float(r) for r in raw_rss]
    return figures


def run(ctx: Context) -> list[Row]:
    n_events = ctx.size(3_000, 100_000)
    with ctx.backend.scope("projection") as settings:
        client = make_redis(settings.redis_url or "", settings)
        keys = KeyMap(settings.namespace)
        ctx.say(f"projection: {n_events} events in {settings.partitions} partition streams")
        xadd_history(client, keys, make_history(n_events, partitions=settings.partitions))
        with ConsumerPool(2) as pool:
            figures = measure(ctx, pool, settings, client, n_events)
        client.close()
    one, two = Figure.of(figures["project-1"]), Figure.of(figures["project-2"])
    ctx.figures["projection.1worker.figure"] = one
    ctx.figures["projection.worker_rss"] = Figure.of(figures["rss"])
    ctx.figures["projection.raw_rss"] = Figure.of(figures["raw-rss"])
    size = {"events": n_events, "projections": list(PROJECTIONS)}
    # CPU per stream entry (medians over the repeats): consumers' and Redis's, per config.
    size["cpu_us_per_entry"] = {
        k.removesuffix("-cpu"): round(Figure.of(v).median, 1)
        for k, v in figures.items()
        if k.endswith("cpu")
    }
    return [
        Row(
            "projection",
            "1 worker",
            "events/s",
            one,
            Figure.of(figures["raw-hset-1"]),
            "XREADGROUP+HSET+XACK loop, 1 process",
            target=1.0,
            extra=size,
        ),
        Row(
            "projection",
            "1 worker vs Lua batch",
            "events/s",
            one,
            Figure.of(figures["raw-lua-1"]),
            "same loop, one version-checking Lua call per batch",
            extra=size,
        ),
        Row(
            "projection",
            "2 workers",
            "events/s",
            two,
            one,
            "project, 1 worker",
            target=1.6,
            extra=size,
        ),
        Row(
            "projection",
            "2 workers vs 2-process loop",
            "events/s",
            two,
            Figure.of(figures["raw-hset-2"]),
            "XREADGROUP+HSET+XACK loop, 2 processes",
            extra=size,
        ),
    ]
