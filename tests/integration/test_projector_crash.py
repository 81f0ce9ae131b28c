"""The projector converges whatever worker is killed at whatever instant, and a SIGTERM
finishes and acknowledges the batch in hand before the worker exits.

Everything runs as real processes against the real services: `cqrs relay` and several
`cqrs project` workers as subprocesses, writers in threads of this process going through
`commands.handlers.execute` (bench/workload.py). PostgreSQL is the judge at the end:
`cqrs verify` recomputes every view from the write side's tables.

In the crash test the workers start on a fresh namespace, so they also race to build the
(still nearly empty) views from history before consuming; the SIGTERM and redelivery tests
deploy the projections first, so their backlog flows through the consumer groups.

The seed of each run is printed (and included in assertion messages); set
`CQRS_TEST_SEED` to replay a run's workload and kill schedule.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
import redis

from bench.workload import WorkloadReport, generate
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import event_count, run_cli, wait_applied, wait_until
from tests.integration.projector_support import (
    deploy_projections,
    differences,
    drain,
    relay_all,
)
from tests.procs import Fleet, Proc, fleet

N_COMMANDS = 5_000
WRITERS = 3
N_WORKERS = 3
KILLS = 7  # planned; at least MIN_KILLS must land while the workload runs
MIN_KILLS = 5
EXIT_DEADLINE = 30.0
HOLD_WAIT = 3.0  # how long a kill may wait for the victim to hold a batch
MIN_KILLS_MID_BATCH = 3

T = TypeVar("T")


def poll_for(condition: Callable[[], T], *, timeout: float, interval: float = 0.005) -> T | None:
    """Like `wait_until`, but a deadline is not a failure: returns None when it passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    return None


def _seed() -> int:
    return int(os.environ.get("CQRS_TEST_SEED") or random.SystemRandom().randrange(2**32))


# --------------------------------------------------------------------------- processes


def heartbeat_since(client: redis.Redis, keys: KeyMap, proc: Proc) -> bool:
    """The worker process has run its first lease round: it is past start-up (signal
    handlers installed, Redis reached) and is taking part in the work."""
    score = client.zscore(keys.workers(next(iter(PROJECTIONS))), proc.name)
    return score is not None and score >= proc.started_ms


def wait_ready(client: redis.Redis, keys: KeyMap, proc: Proc, processes: Fleet) -> None:
    wait_until(
        lambda: proc.popen.poll() is not None or heartbeat_since(client, keys, proc),
        timeout=30,
        interval=0.02,
        what=f"worker {proc.name} to start",
    )
    assert proc.popen.poll() is None, (
        f"worker {proc.name} exited early\n{processes.logs(last=6, chars=1500)}"
    )


def stop_gracefully(proc: Proc) -> int | None:
    """SIGTERM, then the exit code, or None if the process outlived the deadline."""
    proc.popen.send_signal(signal.SIGTERM)
    try:
        return proc.popen.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        return None


# --------------------------------------------------------------------------- Redis facts


def partitions_of(client: redis.Redis, keys: KeyMap) -> int:
    stored = client.hget(keys.meta(), "partitions")
    assert stored is not None, "nothing was ever relayed (no stream metadata)"
    return int(stored)


def streams(client: redis.Redis, keys: KeyMap) -> list[str]:
    return [keys.stream(p) for p in range(partitions_of(client, keys))]


def stream_entries(client: redis.Redis, keys: KeyMap) -> int:
    pipe = client.pipeline(transaction=False)
    for stream in streams(client, keys):
        pipe.xlen(stream)
    return sum(pipe.execute())


def groups_by_stream(client: redis.Redis, keys: KeyMap) -> dict[str, list[dict]]:
    """XINFO GROUPS of every partition stream; a stream not created yet has no groups."""
    pipe = client.pipeline(transaction=False)
    names = streams(client, keys)
    for stream in names:
        pipe.xinfo_groups(stream)
    results = pipe.execute(raise_on_error=False)
    for result in results:
        if isinstance(result, Exception) and "no such key" not in str(result):
            raise result
    return {
        stream: ([] if isinstance(result, Exception) else result)
        for stream, result in zip(names, results, strict=True)
    }


def pending_by_consumer(client: redis.Redis, keys: KeyMap) -> dict[str, int]:
    """Delivered-but-unacknowledged entries per consumer, over every stream and group."""
    pairs = [
        (stream, group["name"])
        for stream, groups in groups_by_stream(client, keys).items()
        for group in groups
    ]
    pipe = client.pipeline(transaction=False)
    for stream, group in pairs:
        pipe.xpending(stream, group)
    totals: dict[str, int] = {}
    for summary in pipe.execute(raise_on_error=False):
        if isinstance(summary, Exception):  # a group recreated meanwhile: count it next time
            continue
        for consumer in summary["consumers"] or []:
            name = consumer["name"]
            totals[name] = totals.get(name, 0) + int(consumer["pending"])
    return totals


def assert_nothing_pending_or_dead(client: redis.Redis, keys: KeyMap) -> None:
    """No dead letter in any projection; every group exists on every stream and has
    nothing pending (XPENDING summary, which is what an operator would look at)."""
    for projection in PROJECTIONS:
        assert client.xlen(keys.dead_letters(projection)) == 0, (
            f"dead letters in {projection}: {client.xrange(keys.dead_letters(projection))[:3]}"
        )
    for stream, groups in groups_by_stream(client, keys).items():
        assert sorted(g["name"] for g in groups) == sorted(PROJECTIONS), (stream, groups)
        for group in groups:
            summary = client.xpending(stream, group["name"])
            assert summary["pending"] == 0, (stream, group["name"], summary)


# --------------------------------------------------------------------------- a) crashes


@pytest.mark.slow
def test_views_converge_while_workers_are_sigkilled(
    wiring: Wiring, settings: Settings, tmp_path: Path
) -> None:
    seed = _seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    env = {
        **settings_env(settings),
        "CQRS_PROJECTOR_LEASE_MS": "1000",
        "CQRS_PROJECTOR_BATCH_SIZE": "100",
    }
    client, keys = wiring.redis, wiring.keys
    live = WorkloadReport()
    halt = threading.Event()
    # Kill at random points of the workload's progress, one in each of KILLS equal spans
    # of [5%, 90%] of the commands, so the kills are spread over the whole run.
    span = 0.85 / KILLS
    thresholds = [int((0.05 + span * i + rng.uniform(0, span)) * N_COMMANDS) for i in range(KILLS)]
    renamed_at = rng.randrange(MIN_KILLS)  # this restart uses a consumer name never seen
    kills = 0
    kills_with_batch_in_hand = 0
    consumers_seen: list[str] = []
    started = time.monotonic()

    with fleet(tmp_path, env) as processes:
        relay = processes.cqrs("relay", "relay")
        workers = [processes.worker(f"w{i}") for i in range(N_WORKERS)]
        consumers_seen += [w.name for w in workers]
        with ThreadPoolExecutor(1, thread_name_prefix="workload") as pool:
            workload = pool.submit(
                generate,
                random.Random(rng.getrandbits(64)),
                wiring,
                N_COMMANDS,
                writers=WRITERS,
                report=live,
                stop=halt,
            )
            try:
                for i, threshold in enumerate(thresholds):
                    wait_until(
                        lambda t=threshold: workload.done() or live.attempted >= t,
                        timeout=120,
                        interval=0.01,
                        what=f"the workload to reach {threshold} commands",
                    )
                    if workload.done():
                        break
                    slot = rng.randrange(N_WORKERS)
                    victim = workers[slot]
                    wait_ready(client, keys, victim, processes)
                    # Prefer the instant the victim holds a delivered, unacknowledged batch
                    # (possibly half applied): that is what the version gates must absorb.
                    in_hand = poll_for(
                        lambda v=victim: pending_by_consumer(client, keys).get(v.name, 0),
                        timeout=HOLD_WAIT,
                    )
                    victim.popen.kill()
                    code = victim.popen.wait(timeout=10)
                    assert code == -signal.SIGKILL, f"{victim.name}: {code}\n{victim.tail()}"
                    kills += 1
                    kills_with_batch_in_hand += bool(in_hand)
                    name = f"w{slot}-r{i}" if i == renamed_at else victim.name
                    workers[slot] = processes.worker(name)
                    if name not in consumers_seen:
                        consumers_seen.append(name)
                report = workload.result()  # re-raises anything a writer hit
            finally:
                halt.set()
        workload_seconds = time.monotonic() - started

        assert report.attempted == N_COMMANDS
        assert report.committed + report.rejected == N_COMMANDS
        assert report.committed > 0.9 * N_COMMANDS, report.summary()
        assert kills >= MIN_KILLS, f"only {kills} kills landed during the workload (seed {seed})"
        assert len(consumers_seen) == N_WORKERS + 1, consumers_seen  # one new name
        assert kills_with_batch_in_hand >= MIN_KILLS_MID_BATCH, (
            f"only {kills_with_batch_in_hand} of {kills} kills hit a worker holding a batch "
            f"(seed {seed})"
        )

        for worker in workers:
            wait_ready(client, keys, worker, processes)
        # Stop the workers and the relay together, as a deployment would.
        procs = [*workers, relay]
        for proc in procs:
            proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                code = proc.popen.wait(timeout=EXIT_DEADLINE)
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, f"{proc.name} exited with {code} after SIGTERM\n{proc.tail()}"

        drained = run_cli("run", "--drain", env=env, timeout=120)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        verified = run_cli("verify", "--json", env=env, timeout=120)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["differences"] == 0, verified.stdout

    assert_nothing_pending_or_dead(client, keys)
    assert event_count(settings.database_url) == report.events
    assert stream_entries(client, keys) >= report.events  # every event reached a stream
    assert differences(wiring) == []
    print(
        f"{report.summary()}\n"
        f"workload with workers running: {workload_seconds:.1f}s, total "
        f"{time.monotonic() - started:.1f}s; {kills} SIGKILLs ({kills_with_batch_in_hand} "
        f"with a batch in hand), {kills} restarts, consumers {consumers_seen}; "
        f"final drain: {drained.stdout.strip()}"
    )


# --------------------------------------------------------------------------- b) SIGTERM


BACKLOG_EVENTS = 3_000
SOLO_BATCH = 500
# Few partitions, so each slot's backlog spans several batches of SOLO_BATCH and there is
# a "some but not all" moment to stop the worker in (with the default 8 partitions one
# read would take the whole backlog).
SOLO_PARTITIONS = 2


def test_sigterm_finishes_and_acknowledges_the_batch_in_hand(
    settings: Settings, tmp_path: Path
) -> None:
    seed = _seed()
    print(f"\nseed {seed}")
    rng = random.Random(seed)
    settings = settings.model_copy(update={"partitions": SOLO_PARTITIONS})
    wiring = Wiring(settings)
    try:
        client, keys = wiring.redis, wiring.keys
        # The projector was deployed before any traffic (its first worker built the empty
        # views), then went down while the backlog accumulated: the backlog is consumed
        # through the consumer groups, in batches, not rebuilt from history.
        deploy_projections(wiring)
        report = WorkloadReport()
        while report.events < BACKLOG_EVENTS:
            generate(random.Random(rng.getrandbits(64)), wiring, 500, writers=2, report=report)
        relay_all(wiring)
        total = stream_entries(client, keys)
        assert total == report.events
        assert partitions_of(client, keys) == SOLO_PARTITIONS

        def progress() -> tuple[int, int, int]:
            """(entries acknowledged, entries in the solo consumer's hands, entries not yet
            delivered) summed over every group; no stream entry is ever deleted here, so
            entries-read is exact."""
            read = sum(
                int(g["entries-read"] or 0)
                for groups in groups_by_stream(client, keys).values()
                for g in groups
            )
            in_hand = pending_by_consumer(client, keys).get("solo", 0)
            return read - in_hand, in_hand, total * len(PROJECTIONS) - read

        env = {
            **settings_env(settings),
            "CQRS_PARTITIONS": str(SOLO_PARTITIONS),
            "CQRS_PROJECTOR_BATCH_SIZE": str(SOLO_BATCH),
        }
        with fleet(tmp_path, env) as processes:
            solo = processes.worker("solo")

            # A moment where some batches are applied and acknowledged, the next one is in
            # the worker's hands, and more is still waiting in the streams.
            def batch_in_hand() -> tuple[int, int, int] | str | None:
                if solo.popen.poll() is not None:
                    return "exited"
                acked, held, waiting = progress()
                return (acked, held, waiting) if acked and held and waiting else None

            # The worker publishes on the applied channel behind the first round of each
            # batch, before acknowledging it: the moment looked for, so wake on it.
            at_signal = wait_applied(
                wiring,
                batch_in_hand,
                timeout=60,
                what="the worker to hold a batch after applying some",
            )
            assert isinstance(at_signal, tuple), f"worker exited early\n{solo.tail()}"
            code = stop_gracefully(solo)
            assert code == 0, f"solo exited with {code} after SIGTERM\n{solo.tail()}"

        acked, in_hand, waiting = progress()
        print(f"(acked, in hand, undelivered) at SIGTERM {at_signal}, after exit {progress()}")
        # The batch in hand was finished and acknowledged, nothing was left pending...
        for stream, groups in groups_by_stream(client, keys).items():
            for group in groups:
                mine = client.xpending_range(
                    stream, group["name"], "-", "+", 10, consumername="solo"
                )
                assert mine == [], (stream, group["name"], mine)
        assert in_hand == 0
        assert acked >= at_signal[0] + at_signal[1]
        # ...and the worker stopped instead of draining everything first.
        assert waiting > 0, "the worker drained the whole backlog before stopping"

        rest = drain(wiring)
        assert rest.stats.applied > 0
        assert rest.stats.acked == waiting
        # Nothing the stopped worker applied is applied again: its batch was acknowledged.
        assert rest.stats.duplicates == 0
        assert rest.stats.dead_lettered == rest.stats.failed == 0
        assert_nothing_pending_or_dead(client, keys)
        assert differences(wiring) == []
    finally:
        wiring.close()
