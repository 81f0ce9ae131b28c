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

And the wake-ups between them, each seen by a listener in a process of its own (as the
relay, the worker and `cqrs serve` are), blocked as they block when idle; a wake-up is
the instant the listener's blocking call returned minus the instant the sender acted
(CLOCK_MONOTONIC is system-wide):
- relay wake-up: the command's COMMIT returned -> `LISTEN cqrs_outbox` returned
  (psycopg's `notifies`, as `Relay.run` waits);
- projector wake-up: the relay pass's Redis write (XADDs + PUBLISH on the relay wake-up
  channel) handed to the socket -> the subscription to that channel returned (as an
  idle worker waits);
- applied wake-up: the worker's first PUBLISH on `<ns>:applied` of the batch (sent right
  behind its round 1) handed to the socket -> the subscription to the applied channel
  returned (as `?after=` waiters wait).
The relay wake-up can come out slightly negative: the NOTIFY reaches the listener while
the committing side is still returning from its COMMIT.

Same backend rules as `python -m bench` (a scratch database and namespace, removed after).
Figures are microseconds, median / p90 / p99 over the commands. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

from bench.backend import BenchBackend
from bench.ceilings import raw_client
from bench.scenarios.commands import Shop
from bench.scenarios.projection import prepare_live
from bench.stats import percentile
from cqrs.commands.db import make_session_factory
from cqrs.contracts import registered_contracts
from cqrs.eventlog import NOTIFY_CHANNEL
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.redisio import Subscription
from cqrs.relay.outbox import Relay
from cqrs.wiring import make_engine, make_redis

STAGES = ("command", "relay pass", "projector batch", "query check")
WAKEUPS = ("relay wake-up", "projector wake-up", "applied wake-up")
# How long a stage waits for its listener to report a wake-up before counting it lost:
# well inside the worker's lease (5 s), which a longer pause between batches would lose.
WAKE_DEADLINE = 1.0
# Untimed batches the probe may run after one that lost its leases to a stall (the slots
# come back "recovering": a pending scan first, then the entries).
LEASE_RETRIES = 5


def listen(kind: str, url: str, channel: str, woke: Any, ready: Any, stop: Any) -> None:
    """A listener process: block as the real reader blocks, put the instant each wake-up
    returned on `woke`. Each block is at most 0.5 s so `stop` is seen."""
    if kind == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"LISTEN {channel}")
            ready.set()
            while not stop.is_set():
                for _ in conn.notifies(timeout=0.5, stop_after=1):
                    woke.put(time.perf_counter())
        return
    client = raw_client(url)
    sub = Subscription(client, channel)
    ready.set()
    while not stop.is_set():
        if sub.get_message(timeout=0.5) is not None:
            woke.put(time.perf_counter())
    sub.close()
    client.close()


def _note_publishes(*channels: str) -> dict[str, list[float]]:
    """Note, in this process, the instant each write carrying a PUBLISH to one of
    `channels` is handed to a Redis socket (the relay's and the worker's packed round
    trips write through `send_packed_command`)."""
    sent: dict[str, list[float]] = {channel: [] for channel in channels}
    wanted = {channel: channel.encode() for channel in channels}
    original = redis.connection.AbstractConnection.send_packed_command

    def noted(self: Any, command: Any, check_health: bool = True) -> None:
        now = time.perf_counter()
        parts = [command] if isinstance(command, bytes | str) else command
        data = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)
        if b"PUBLISH" in data:
            for channel, name in wanted.items():
                if name in data:
                    sent[channel].append(now)
        original(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = noted  # type: ignore[method-assign]
    return sent


def _drain(woke: Any) -> None:
    """Forget earlier wake-ups (a batch may publish twice), so the next is this stage's."""
    while True:
        try:
            woke.get_nowait()
        except queue.Empty:
            return


def _woken(woke: Any, sent: list[float], samples: list[float], lost: list[int]) -> None:
    """The first wake-up since the queue was drained, in microseconds after the first
    instant in `sent` (nothing sent, or no wake-up in time: a lost one)."""
    try:
        samples.append((woke.get(timeout=WAKE_DEADLINE) - sent[0]) * 1e6)
    except (queue.Empty, IndexError):
        lost.append(1)


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
    samples: dict[str, list[float]] = {stage: [] for stage in (*STAGES, *WAKEUPS)}
    lost: list[int] = []
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    sources = {
        "relay wake-up": ("postgres", settings.database_url, NOTIFY_CHANNEL),
        "projector wake-up": ("redis", settings.redis_url, keys.relay_wakeup_channel()),
        "applied wake-up": ("redis", settings.redis_url, keys.applied_channel()),
    }
    woke = {name: spawn.Queue() for name in sources}
    listeners = []
    for name, (kind, url, channel) in sources.items():
        ready = spawn.Event()
        proc = spawn.Process(target=listen, args=(kind, url, channel, woke[name], ready, stop))
        proc.start()
        listeners.append(proc)
        deadline = time.monotonic() + 60
        while not ready.wait(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"bench.stages: the {name} listener did not start")
    sent = _note_publishes(keys.relay_wakeup_channel(), keys.applied_channel())
    rng = random.Random(7)
    try:
        with relay._connect() as conn:
            for n in range(commands):
                for q in woke.values():
                    _drain(q)
                for instants in sent.values():
                    instants.clear()
                result = _timed(samples["command"], lambda n=n: shop.light_command(rng, n))
                _woken(woke["relay wake-up"], [time.perf_counter()], samples["relay wake-up"], lost)
                published = _timed(samples["relay pass"], lambda: relay.publish_batch(conn))
                relay_sent = sent[keys.relay_wakeup_channel()]
                _woken(woke["projector wake-up"], relay_sent, samples["projector wake-up"], lost)
                _drain(woke["applied wake-up"])
                applied = _timed(samples["projector batch"], lambda: worker.run_once(drain=True))
                applied_sent = sent[keys.applied_channel()]
                _woken(woke["applied wake-up"], applied_sent, samples["applied wake-up"], lost)
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
                for _ in range(LEASE_RETRIES):
                    if visible:
                        break
                    # A loaded machine stalled the probe past the worker's lease: that
                    # batch only took its slots back (recovering). Apply it, untimed.
                    worker.run_once(drain=True)
                    applied = visible = check()
                if not (published and applied and visible):
                    raise SystemExit(f"bench.stages: command {n} did not go through every stage")
                if lost:
                    raise SystemExit(
                        f"bench.stages: command {n}: a wake-up did not come within "
                        f"{WAKE_DEADLINE:g} s"
                    )
    finally:
        stop.set()
        for proc in listeners:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
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
    chain = (*STAGES, *WAKEUPS)
    total = [sum(values) for values in zip(*(samples[s] for s in chain), strict=True)]
    order = ["command", "relay wake-up", "relay pass", "projector wake-up", "projector batch"]
    order += ["applied wake-up", "query check"]
    for stage, values in [*((s, samples[s]) for s in order), ("sum", total)]:
        figures = [percentile(values, q) for q in (50, 90, 99)]
        print(f"| {stage} | " + " | ".join(f"{f:.0f}" for f in figures) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
