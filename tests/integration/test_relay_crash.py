"""The relay survives SIGKILL at any instant: nothing committed is lost, nothing is
reordered within an aggregate, and a re-published event is an identical copy.

Four writer threads commit the seeded mix of every command (`bench.workload`, >= 10,000
events) while a relay subprocess (`cqrs relay`, batches of 50 so a kill usually lands
mid-backlog) is killed with SIGKILL shortly after it starts making progress, then restarted,
over and over.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.workload import WorkloadReport, generate
from cqrs.wiring import Wiring
from tests.helpers import run_cli, wait_until
from tests.integration.stream_checks import (
    assert_published_exactly_once,
    outbox_count,
    stream_length,
)
from tests.procs import fleet

TARGET_EVENTS = 10_000
WRITERS = 4
MIN_KILLS = 5
BATCH = 50


def test_relay_sigkilled_repeatedly_loses_and_reorders_nothing(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env, "CQRS_RELAY_BATCH_SIZE": str(BATCH)}
    settings, keys, client = wiring.settings, wiring.keys, wiring.redis
    rng = random.Random()
    kills = kills_while_writing = kills_mid_backlog = 0

    deadline = time.monotonic() + 120
    # Writers go on until the target is reached *and* enough kills landed while they were
    # writing: a fast write path must not finish before the relay has been killed enough.
    enough_kills = threading.Event()

    workload = WorkloadReport()

    def until(report: WorkloadReport) -> bool:
        assert time.monotonic() < deadline, (
            f"{report.events} events, {kills_while_writing} kills during writes before the deadline"
        )
        return report.events >= TARGET_EVENTS and enough_kills.is_set()

    with fleet(tmp_path, env) as relays, ThreadPoolExecutor(1, "workload") as pool:
        writers = pool.submit(
            generate, random.Random(1), wiring, writers=WRITERS, report=workload, until=until
        )
        while not writers.done() or kills < MIN_KILLS:
            writing = not writers.done()
            before = stream_length(client, keys, settings)
            relay = relays.cqrs("relay", "relay")
            # Kill only once this relay is demonstrably publishing (or has nothing to
            # publish), then at a random instant within the next few batches.
            try:
                wait_until(
                    lambda p=relay, b=before: (
                        p.poll() is not None
                        or stream_length(client, keys, settings) > b
                        or outbox_count(settings.database_url) == 0
                    ),
                    timeout=30,
                    interval=0.01,
                    what="the restarted relay to publish",
                )
            except AssertionError as exc:
                raise AssertionError(f"{exc}; relay log:\n{relay.tail()}") from None
            assert relay.poll() is None, f"relay exited early; relay log:\n{relay.tail()}"
            time.sleep(rng.uniform(0.0, 0.05))
            pending = outbox_count(settings.database_url)
            relay.kill()
            relay.wait(timeout=10)
            kills += 1
            kills_while_writing += writing
            if kills_while_writing >= MIN_KILLS:
                enough_kills.set()
            kills_mid_backlog += pending > BATCH
            # Stay down a random while so the next relay starts with a backlog of
            # many batches, and the next kill lands in the middle of it.
            time.sleep(rng.uniform(0.2, 1.0))
        writers.result()  # re-raise anything a writer hit

    assert workload.events >= TARGET_EVENTS
    assert kills_while_writing >= MIN_KILLS, f"only {kills_while_writing} kills during writes"
    assert kills_mid_backlog >= 3, f"only {kills_mid_backlog} kills landed during a backlog"

    drained = run_cli("relay", "--drain", env=env, timeout=120)
    assert drained.returncode == 0, drained.stderr + relays.logs(last=2)

    report = assert_published_exactly_once(settings.database_url, client, keys, settings)
    assert report.events == workload.events
    assert report.streams_used == settings.partitions
    print(
        f"\n{report.events} events, {report.duplicates} duplicates, {kills} kills "
        f"({kills_while_writing} during writes, {kills_mid_backlog} with a backlog), "
        f"commands {dict(workload.committed_by_command)}, "
        f"rejected {dict(workload.rejected_by_reason)}"
    )
