"""Rebuild: events/s replaying every projection from history, from the streams and from
the PostgreSQL log, with `projector.replay.Replayer` (new generation beside the live one,
pause-and-switch, old generation removed) as `cqrs replay` runs it.

The history (1,000,000 events in the full run) is written with COPY into the event log
and with pipelined XADDs of pre-built entries into the streams. The figure is entries
per second to rebuild all three projections (the sum of their replay times), the same
unit as the live projection figure. "From the log" is the case where the streams are
gone: they are renamed aside for that replay, so only the log is read. The ceiling is
the hand-written projection loop (XREADGROUP COUNT 500 + pipelined HSET + XACK, one
process, one group per projection) over the same entries; the live worker's figure from
the projection scenario, when it ran in the same invocation, is compared too.
"""

from __future__ import annotations

from bench import ceilings
from bench.history import History, copy_to_log, xadd_history
from bench.procs import ConsumerPool
from bench.scenarios import Context
from bench.scenarios.projection import RAW_ROUND, prepare_raw
from bench.stats import Figure, Row
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import Replayer, unlink_pattern
from cqrs.tuning import tune_gc
from cqrs.wiring import make_redis

SEED = 11


def clear_views(client: object, keys: KeyMap) -> None:
    for name in PROJECTIONS:
        unlink_pattern(client, keys.projection_pattern(name))  # type: ignore[arg-type]
        client.delete(  # type: ignore[attr-defined]
            keys.projection_state(name), keys.generation(name), keys.generation_counter(name)
        )


def run(ctx: Context) -> list[Row]:
    n_events = ctx.size(10_000, 1_000_000)
    results: dict[str, list[float]] = {}
    with ctx.backend.scope("rebuild") as settings:
        client = make_redis(settings.redis_url or "", settings)
        keys = KeyMap(settings.namespace)
        partitions = settings.partitions
        ctx.say(f"rebuild: writing {n_events} events to the log (COPY) and the streams")
        copy_to_log(
            settings.database_url or "",
            History(seed=SEED, partitions=partitions).events(n_events),
            outbox=False,
        )
        xadd_history(
            client,
            keys,
            History(seed=SEED, partitions=partitions).events(n_events),
            partitions=partitions,
        )
        streams = [keys.stream(p) for p in range(partitions)]
        handled = {name: list(p.handlers) for name, p in PROJECTIONS.items()}
        tune_gc(settings.projector_gc_threshold)  # as `cqrs replay` does
        with ConsumerPool(1) as pool:
            for rep in range(ctx.repeat):
                for source in ("stream", "log"):
                    clear_views(client, keys)
                    if source == "log":
                        for stream in streams:
                            client.rename(stream, f"{stream}-parked")
                    seconds = 0.0
                    try:
                        for projection in PROJECTIONS.values():
                            result = Replayer(
                                client, settings, projection, settings.database_url
                            ).run(source)
                            if result.events < n_events or result.dead_lettered:
                                ctx.say(
                                    f"  warning: {projection.name} replayed {result.events} "
                                    f"events, {result.dead_lettered} dead-lettered"
                                )
                            seconds += result.seconds
                    finally:
                        if source == "log":
                            for stream in streams:
                                client.rename(f"{stream}-parked", stream)
                    results.setdefault(source, []).append(n_events / seconds)
                clear_views(client, keys)
                prepare_raw(client, keys, partitions)
                timed = pool.round(
                    RAW_ROUND,
                    [
                        (
                            settings.redis_url,
                            settings.namespace,
                            list(range(partitions)),
                            handled,
                            "hset",
                            "raw",
                        )
                    ],
                    client,
                    streams,
                    [ceilings.raw_group(name) for name in PROJECTIONS],
                )
                prepare_raw(client, keys, partitions)
                results.setdefault("ceiling", []).append(n_events / timed.seconds)
                ctx.say(
                    f"  rebuild rep {rep + 1}: stream {results['stream'][-1]:.0f}/s, "
                    f"log {results['log'][-1]:.0f}/s, loop ceiling {results['ceiling'][-1]:.0f}/s"
                )
        clear_views(client, keys)
        client.close()
    ceiling = Figure.of(results["ceiling"])
    size = {"events": n_events, "projections": list(PROJECTIONS)}
    rows = []
    live = ctx.figures.get("projection.1worker.figure")
    for source in ("stream", "log"):
        rows.append(
            Row(
                "rebuild",
                f"from {source}",
                "events/s",
                Figure.of(results[source]),
                ceiling,
                "XREADGROUP+HSET+XACK loop, 1 process",
                extra=size,
            )
        )
        if live is not None:
            rows.append(
                Row(
                    "rebuild",
                    f"from {source} vs live projection",
                    "events/s",
                    Figure.of(results[source]),
                    live,
                    "project, 1 live worker (projection scenario)",
                    target=1.0,
                    extra=size,
                )
            )
    return rows
