"""Relay: events/s from the PostgreSQL outbox to the partition streams.

The project side is `cqrs.relay.Relay.drain()`: passes of `relay_batch_size` visible
outbox rows (SELECT ... FOR UPDATE joined with the log), one pipelined XADD per event,
the wake-up PUBLISH, DELETE of the published outbox rows, COMMIT. The log is filled with
COPY beforehand (not timed). The ceiling is pipelined XADDs of the very same entries,
built in advance, in pipelines of the same size.
"""

from __future__ import annotations

import time

from bench import ceilings
from bench.history import copy_to_log, make_history
from bench.scenarios import Context
from bench.stats import Figure, Row
from cqrs.keys import KeyMap
from cqrs.relay.outbox import Relay
from cqrs.wiring import make_redis


def run(ctx: Context) -> list[Row]:
    n_events = ctx.size(3_000, 50_000)
    project, ceiling = [], []
    with ctx.backend.scope("relay") as settings:
        client = make_redis(settings.redis_url or "", settings)
        keys = KeyMap(settings.namespace)
        events = make_history(n_events, partitions=settings.partitions)
        streams = [keys.stream(p) for p in range(settings.partitions)]
        for rep in range(ctx.repeat):
            ctx.backend.truncate()
            client.delete(*streams, keys.meta())
            copy_to_log(settings.database_url or "", events, outbox=True)
            relay = Relay(settings.database_url or "", client, settings)
            started = time.perf_counter()
            published = relay.drain()
            project.append(published / (time.perf_counter() - started))
            client.delete(*streams)
            ceiling.append(ceilings.raw_xadd(client, keys, events, batch=settings.relay_batch_size))
            client.delete(*streams)
            ctx.say(f"  relay rep {rep + 1}: {project[-1]:.0f}/s vs raw XADD {ceiling[-1]:.0f}/s")
        client.close()
    return [
        Row(
            "relay",
            "outbox -> streams",
            "events/s",
            Figure.of(project),
            Figure.of(ceiling),
            "pipelined XADD of the same entries",
            target=0.5,
            extra={"events": n_events, "batch": settings.relay_batch_size},
        )
    ]
