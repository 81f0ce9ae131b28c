"""The relay survives SIGKILL at any instant: nothing committed is lost, nothing is
reordered within an aggregate, and a re-published event is an identical copy.

Four writer threads commit a random mix of every command (>= 10,000 events) while a relay
subprocess (`cqrs relay`, batches of 50 so a kill usually lands mid-backlog) is killed with
SIGKILL shortly after it starts making progress, then restarted, over and over.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cqrs.commands.db import make_session_factory
from cqrs.wiring import Wiring
from tests.helpers import run_cli, wait_until
from tests.integration.stream_checks import (
    assert_published_exactly_once,
    outbox_count,
    stream_length,
)
from tests.integration.workload import Workload

TARGET_EVENTS = 10_000
WRITERS = 4
MIN_KILLS = 5
BATCH = 50


def start_relay(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cqrs.app", "relay"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def test_relay_sigkilled_repeatedly_loses_and_reorders_nothing(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env, "CQRS_RELAY_BATCH_SIZE": str(BATCH)}
    settings, keys, client = wiring.settings, wiring.keys, wiring.redis
    workload = Workload(make_session_factory(wiring.engine), TARGET_EVENTS, seed=1)
    workload.prepare()
    log = tmp_path / "relay.log"
    rng = random.Random()
    kills = kills_while_writing = kills_mid_backlog = 0
    relay: subprocess.Popen[bytes] | None = None

    deadline = time.monotonic() + 120
    # Writers go on until the target is reached *and* enough kills landed while they were
    # writing: a fast write path must not finish before the relay has been killed enough.
    enough_kills = threading.Event()

    def write(index: int) -> None:
        rng = random.Random(f"1-{index}")
        while workload.events < TARGET_EVENTS or not enough_kills.is_set():
            assert time.monotonic() < deadline, (
                f"writer {index}: {workload.events} events, {kills_while_writing} kills "
                "during writes before the deadline"
            )
            workload.step(rng)

    try:
        with ThreadPoolExecutor(WRITERS) as pool:
            writers = [pool.submit(write, i) for i in range(WRITERS)]
            while not all(w.done() for w in writers) or kills < MIN_KILLS:
                writing = not all(w.done() for w in writers)
                before = stream_length(client, keys, settings)
                relay = start_relay(env, log)
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
                    raise AssertionError(f"{exc}; relay log:\n{log_tail(log)}") from None
                assert relay.poll() is None, f"relay exited early; relay log:\n{log_tail(log)}"
                time.sleep(rng.uniform(0.0, 0.05))
                pending = outbox_count(settings.database_url)
                relay.kill()
                relay.wait(timeout=10)
                relay = None
                kills += 1
                kills_while_writing += writing
                if kills_while_writing >= MIN_KILLS:
                    enough_kills.set()
                kills_mid_backlog += pending > BATCH
                # Stay down a random while so the next relay starts with a backlog of
                # many batches, and the next kill lands in the middle of it.
                time.sleep(rng.uniform(0.2, 1.0))
            for w in writers:
                w.result()  # re-raise anything a writer hit
    finally:
        if relay is not None:
            relay.kill()
            relay.wait(timeout=10)

    assert workload.events >= TARGET_EVENTS
    assert kills_while_writing >= MIN_KILLS, f"only {kills_while_writing} kills during writes"
    assert kills_mid_backlog >= 3, f"only {kills_mid_backlog} kills landed during a backlog"

    drained = run_cli("relay", "--drain", env=env, timeout=120)
    assert drained.returncode == 0, drained.stderr + log_tail(log)

    report = assert_published_exactly_once(settings.database_url, client, keys, settings)
    assert report.events == workload.events
    assert report.streams_used == settings.partitions
    print(
        f"\n{report.events} events, {report.duplicates} duplicates, {kills} kills "
        f"({kills_while_writing} during writes, {kills_mid_backlog} with a backlog), "
        f"commands {dict(workload.commands)}, rejected {dict(workload.rejected)}"
    )
