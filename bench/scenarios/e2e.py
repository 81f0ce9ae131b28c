"""End to end: a command's commit -> visible to a query, at a fixed command rate.

Writers (spawned processes, open loop: command k is due at k/rate seconds) run commands
through the real handlers and note the instant each commit returned. The mix is lighter
than the commands scenario's (restock, rename customer, restock, place order): on two
cores the writers' own Python would otherwise take the CPU the pipeline needs. The
pipeline runs as in production: `Relay.run` and `Worker.run` in processes of their own.
An observer process, subscribed to the projector's `<ns>:applied` notifications, checks
the written aggregate versions exactly as `?after=` does (the applied marks of every
projection) and notes the instant all of them show. Latency = visible - committed
(CLOCK_MONOTONIC is system-wide, so instants compare across processes). Two variants:
the relay alone (woken by NOTIFY), and publish right after commit (the writer runs one
relay pass on its own connection, as the CLI does) with the relay as the safety net.

The ceiling is the issue's prototype chain: raw INSERT + NOTIFY -> LISTEN -> SELECT ->
pipelined XADD -> XREAD -> pipelined HSET, visible when the HSET returned.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from typing import Any

from bench import ceilings
from bench.procs import ConsumerPool, groups_done
from bench.scenarios import Context
from bench.scenarios.commands import Shop
from bench.scenarios.projection import prepare_live
from bench.stats import Figure, Row, percentile
from cqrs.app.drain import drain_all
from cqrs.commands.db import make_session_factory
from cqrs.contracts import registered_contracts
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.redisio import Subscription
from cqrs.relay.outbox import Relay
from cqrs.settings import Settings
from cqrs.tuning import tune_gc
from cqrs.wiring import Wiring, make_engine, make_redis

RATES = (200, 500)
# Issue 16: (rate, percentile) -> the most the project may take, as a ratio to the raw
# chain's same percentile measured in the same run (absolute times move with the machine).
TARGETS: dict[tuple[int, int], float] = {(500, 50): 2.5, (500, 99): 3.0, (200, 99): 2.5}
WRITER_PROCESSES = 2
THREADS_PER_WRITER = 2


def relay_round(settings_values: dict[str, Any], **kw: Any) -> dict[str, Any]:
    settings = Settings(**settings_values)
    client = make_redis(settings.redis_url or "", settings)
    relay = Relay(settings.database_url or "", client, settings)
    kw["ready"]()
    kw["go"].wait()
    relay.run(kw["stop"])
    client.close()
    return {"published": relay.published}


def observer_round(redis_url: str, namespace: str, **kw: Any) -> dict[str, Any]:
    """Wait on `<ns>:applied`; on each notification (or new write to watch) check every
    outstanding write's marks in one pipeline; note when each is fully visible."""
    client = ceilings.raw_client(redis_url)
    # Sharded on a cluster, as the projector publishes there.
    pubsub = Subscription(client, KeyMap(namespace).applied_channel())
    inbox, stop = kw["inbox"], kw["stop"]
    outstanding: dict[int, list[tuple[str, str, int]]] = {}
    visible: dict[int, float] = {}
    kw["ready"]()
    kw["go"].wait()
    while not stop.is_set():
        fresh = False
        while True:
            try:
                seq, marks = inbox.get_nowait()
            except queue.Empty:
                break
            outstanding[seq] = marks
            fresh = True
        notified = pubsub.get_message(timeout=0 if fresh else 0.001) is not None
        while pubsub.get_message(timeout=0) is not None:
            notified = True
        if not outstanding or not (fresh or notified):
            continue
        pipes = ceilings.Pipes(client)
        flat = [(seq, m) for seq, marks in outstanding.items() for m in marks]
        for _seq, (key, field, _version) in flat:
            pipes.on(key).hget(key, field)
        got = pipes.execute()
        now = time.perf_counter()
        behind = {
            seq
            for (seq, (_k, _f, want)), have in zip(flat, got, strict=True)
            if int(have or 0) < want
        }
        for seq in list(outstanding):
            if seq not in behind:
                visible[seq] = now
                del outstanding[seq]
    pubsub.close()
    client.close()
    return {"visible": visible, "unseen": len(outstanding)}


def writer_round(
    settings_values: dict[str, Any],
    products: list[str],
    customers: list[str],
    rate: float,
    total: int,
    first: int,
    stride: int,
    publish: bool,
    **kw: Any,
) -> dict[str, Any]:
    """Commands first, first+stride, ... of `total`, command k due at k/rate after go."""
    settings = Settings(**settings_values)
    keys = KeyMap(settings.namespace)
    engine = make_engine(settings.database_url or "", pool_size=THREADS_PER_WRITER)
    shop = Shop(
        make_session_factory(engine),
        [uuid.UUID(p) for p in products],
        [uuid.UUID(c) for c in customers],
        tag=f"{first}-{uuid.uuid4().hex[:6]}",
    )
    client = make_redis(settings.redis_url or "", settings)
    relay = Relay(settings.database_url or "", client, settings)
    inbox = kw["inbox"]
    committed: dict[int, float] = {}
    mine = list(range(first, total, stride))
    kw["ready"]()
    kw["go"].wait()
    start = time.perf_counter()

    def write(ticks: list[int]) -> None:
        rng = random.Random(ticks[0] if ticks else 0)
        conn = relay._connect() if publish else None
        try:
            for k in ticks:
                delay = start + k / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                result = shop.light_command(rng, k)
                committed[k] = time.perf_counter()
                marks = []
                for e in result.events:
                    for name, contract in registered_contracts().items():
                        rule = contract.applied
                        assert rule is not None  # refused at registration otherwise
                        mark = rule(
                            keys.views(name, 1), e.aggregate_type, e.aggregate_id, e.partition_key
                        )
                        if mark:
                            marks.append((mark[0], mark[1], e.version))
                inbox.put((k, marks))
                if conn is not None:
                    relay.publish_batch(conn)
        finally:
            if conn is not None:
                conn.close()

    threads = [
        threading.Thread(target=write, args=(mine[i::THREADS_PER_WRITER],))
        for i in range(THREADS_PER_WRITER)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    client.close()
    return {"committed": committed, "start": start}


def chain_latencies(
    ctx: Context, pool: ConsumerPool, rate: float, total: int
) -> tuple[list[float], float]:
    settings = ctx.backend.settings("e2e-chain")
    keys = KeyMap(settings.namespace)
    stream = keys.stream(0)
    pool.begin(
        "bench.ceilings:chain_child",
        [(settings.database_url, settings.redis_url, stream, f"{settings.namespace}:chain")],
    )
    committed, achieved = ceilings.chain_write(settings.database_url or "", rate, total, writers=2)
    time.sleep(0.3)
    [report] = pool.end()
    ctx.backend.delete_namespace(settings.namespace)
    return ceilings.latencies(committed, report["visible"]), achieved


def project_latencies(
    ctx: Context, pool: ConsumerPool, rate: float, total: int, publish: bool
) -> tuple[list[float], float, int]:
    settings = ctx.backend.settings("e2e")
    values = settings.model_dump()
    keys = KeyMap(settings.namespace)
    client = make_redis(settings.redis_url or "", settings)
    engine = make_engine(settings.database_url or "", pool_size=2)
    shop = Shop.create(
        make_session_factory(engine), products=ctx.size(20, 50), customers=ctx.size(10, 30)
    )
    engine.dispose()
    # The shop's setup events are relayed and projected before the clock starts.
    prepare_live(client, keys, ["bench-e2e-setup", "bench-e2e"], settings.partitions)
    tune_gc(settings.projector_gc_threshold)  # as `cqrs run` does
    setup = Wiring(settings)
    try:
        worker = Worker(setup.redis, settings, PROJECTIONS.values(), consumer="bench-e2e-setup")
        drain_all(setup, worker=worker)
    finally:
        setup.close()
    products = [str(p) for p in shop.products]
    customers = [str(c) for c in shop.customers]
    targets = ["bench.scenarios.e2e:relay_round", "bench.scenarios.projection:worker_round"]
    targets += ["bench.scenarios.e2e:observer_round"]
    args: list[tuple[Any, ...]] = [
        (values,),
        (values, "bench-e2e"),
        (settings.redis_url, settings.namespace),
    ]
    for i in range(WRITER_PROCESSES):
        targets.append("bench.scenarios.e2e:writer_round")
        args.append((values, products, customers, rate, total, i, WRITER_PROCESSES, publish))
    pool.begin(targets, args)
    writers = pool.collect(WRITER_PROCESSES, timeout=total / rate * 10 + 120)
    streams = [keys.stream(p) for p in range(settings.partitions)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not groups_done(client, streams, list(PROJECTIONS)):
        time.sleep(0.05)
    time.sleep(0.2)
    reports = pool.end()
    observer = next(r for r in reports if "visible" in r)
    committed = {k: t for w in writers for k, t in w["committed"].items()}
    start = min(w["start"] for w in writers)
    achieved = len(committed) / (max(committed.values()) - start) if committed else 0.0
    client.close()
    ctx.backend.delete_namespace(settings.namespace)
    return ceilings.latencies(committed, observer["visible"]), achieved, observer["unseen"]


def run(ctx: Context) -> list[Row]:
    results: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    with ConsumerPool(3 + WRITER_PROCESSES) as pool:
        for rep in range(ctx.repeat):
            for rate in RATES:
                total = max(int(rate * ctx.size(0.4, 5)), 40)
                samples, achieved = chain_latencies(ctx, pool, rate, total)
                for q in (50, 95, 99):
                    add(f"chain-{rate}-p{q}", percentile(samples, q) * 1e3)
                add(f"chain-{rate}-rate", achieved)
                line = [f"chain p50 {percentile(samples, 50) * 1e3:.2f}ms"]
                for variant, publish in (("relay", False), ("publish", True)):
                    samples, achieved, unseen = project_latencies(ctx, pool, rate, total, publish)
                    for q in (50, 95, 99):
                        add(f"{variant}-{rate}-p{q}", percentile(samples, q) * 1e3)
                    add(f"{variant}-{rate}-rate", achieved)
                    add(f"{variant}-{rate}-unseen", unseen)
                    line.append(
                        f"{variant} p50 {percentile(samples, 50) * 1e3:.2f}ms "
                        f"p99 {percentile(samples, 99) * 1e3:.2f}ms at {achieved:.0f}/s"
                    )
                ctx.say(f"  e2e rep {rep + 1} @{rate}/s: " + "; ".join(line))
    rows = []
    for rate in RATES:
        for variant, label in (
            ("relay", "relay woken by NOTIFY"),
            ("publish", "publish after commit + relay"),
        ):
            achieved = Figure.of(results[f"{variant}-{rate}-rate"]).median
            for q in (50, 95, 99):
                goal = TARGETS.get((rate, q))
                rows.append(
                    Row(
                        "e2e",
                        f"{label} @{rate}/s p{q}",
                        "ms",
                        Figure.of(results[f"{variant}-{rate}-p{q}"]),
                        Figure.of(results[f"chain-{rate}-p{q}"]),
                        f"raw chain p{q}",
                        better="lower",
                        target=goal,
                        extra={
                            "rate": rate,
                            "achieved_rate": achieved,
                            "chain_achieved_rate": Figure.of(results[f"chain-{rate}-rate"]).median,
                            "unseen": max(results[f"{variant}-{rate}-unseen"]),
                        },
                    )
                )
    return rows
