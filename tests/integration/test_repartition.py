"""`cqrs repartition N`: the partition count changes, the streams are replaced and every
projection is rebuilt from the PostgreSQL log; the relay and the workers follow the new
count, and nothing is lost or counted twice (`cqrs verify` and the views of the log).

The command runs as a user runs it (a subprocess); writers commit through the real
command handlers (bench/workload.py); relays and workers are either the in-process drain
(a fresh Relay and Worker: a restart) or `cqrs relay` / `cqrs project` subprocesses.
"""

from __future__ import annotations

import json
import random
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from bench.workload import WorkloadReport, generate
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.repartition import Repartitioner, RepartitionRefused
from cqrs.projector.state import live_generation, read_state
from cqrs.relay.outbox import _RELAY_LOCK
from cqrs.settings import Settings
from cqrs.streams import unfinished_repartition
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import assert_one_error_line, run_cli, wait_until
from tests.integration.projector_support import differences, drain
from tests.integration.repartition_support import assert_streams_are, repartition, stream_keys
from tests.integration.replay_support import (
    assert_totals_match_the_write_side,
    generations_present,
    live_snapshot,
    run_seed,
    snapshot_mismatch,
    verify_clean,
)
from tests.procs import fleet

FIRST = 4


@pytest.fixture
def four(settings: Settings) -> Settings:
    """The test's settings with 4 partitions (the count the namespace starts with)."""
    return settings.model_copy(update={"partitions": FIRST})


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**settings_env(settings), "CQRS_PARTITIONS": str(settings.partitions), **extra}


def _doctor_partitions(env: dict[str, str]) -> list[dict[str, str]]:
    """The `partitions` findings of `cqrs doctor --json`."""
    result = run_cli("doctor", "--json", env=env)
    checks = json.loads(result.stdout)["checks"]
    return [c for c in checks if c["name"] == "partitions"]


def _relay_leads(database_url: str) -> bool:
    """Some session holds the relay's leader lock in the test's database."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return bool(
            conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1"
                " AND d.datname = current_database()"
                " AND l.classid::bigint = %s AND l.objid::bigint = %s",
                (_RELAY_LOCK >> 32, _RELAY_LOCK & 0xFFFFFFFF),
            ).fetchone()[0]
        )


def _namespace_facts(wiring: Wiring) -> dict[str, object]:
    """What a refused repartition must leave exactly as it was."""
    client, keys = wiring.redis, wiring.keys
    return {
        "meta": client.hgetall(keys.meta()),
        "streams": {k: client.xlen(k) for k in stream_keys(client, keys)},
        "states": {p: read_state(client, keys, p) for p in PROJECTIONS},
        "locks": [client.exists(keys.replay_lock(p), keys.pause(p)) for p in PROJECTIONS],
    }


# --------------------------------------------------------------------------- grow, shrink


def test_repartition_grows_and_shrinks_and_the_views_stay_those_of_the_log(
    four: Settings, tmp_path: Path
) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    wiring = Wiring(four)
    try:
        client, keys = wiring.redis, wiring.keys
        generate(random.Random(rng.getrandbits(64)), wiring, 150)
        drain(wiring)
        assert_streams_are(client, keys, FIRST)
        before = live_snapshot(client, keys)
        assert_totals_match_the_write_side(before, four.database_url)

        for target in (8, 2):
            previous = {p: live_generation(client, keys, p) for p in PROJECTIONS}
            old_count = int(client.hget(keys.meta(), "partitions"))
            report = repartition(_env(four), target)
            assert (report["before"], report["after"]) == (old_count, target), report
            assert report["removed_streams"] == old_count, report  # every old stream went
            assert [r["projection"] for r in report["replays"]] == list(PROJECTIONS)
            for r in report["replays"]:
                assert r["source"] == "log" and r["dead_lettered"] == 0, r
                assert r["old_generation"] == previous[r["projection"]], r
            assert unfinished_repartition(client, keys) is None
            assert client.hget(keys.meta(), "origin") == "partial"
            assert_streams_are(client, keys, target)
            for projection, gens in generations_present(client, keys).items():
                assert gens == {live_generation(client, keys, projection)}, (projection, gens)
            # Rebuilt from the log: the same views as before the change.
            after = live_snapshot(client, keys)
            assert not (problem := snapshot_mismatch(before, after)), problem
            if target == 8:
                # The doctor: CQRS_PARTITIONS=4 is now stale; the new count, no finding.
                [stale] = _doctor_partitions(_env(four))
                assert f"cqrs repartition {FIRST}" in stale["fix"], stale
                assert _doctor_partitions(_env(four.model_copy(update={"partitions": 8}))) == []

            # A restarted relay and workers (the in-process drain: a new Relay and Worker)
            # publish and read under the new count.
            generate(random.Random(rng.getrandbits(64)), wiring, 60)
            drain(wiring)
            assert_streams_are(client, keys, target)
            assert differences(wiring) == []
            before = live_snapshot(client, keys)
            assert_totals_match_the_write_side(before, four.database_url)

        # Once more with the stored count: nothing to do, nothing touched.
        facts = _namespace_facts(wiring)
        report = repartition(_env(four), 2)
        assert report["replays"] == [] and report["removed_streams"] == 0, report
        assert _namespace_facts(wiring) == facts
        verify_clean(_env(four))
    finally:
        wiring.close()


# --------------------------------------------------------------------------- refusals


def test_repartition_refuses_while_a_worker_a_relay_or_a_replay_runs(
    wiring: Wiring, settings: Settings, tmp_path: Path
) -> None:
    client, keys = wiring.redis, wiring.keys
    generate(random.Random(7), wiring, 60)
    drain(wiring)
    facts = _namespace_facts(wiring)
    env = _env(settings)
    with fleet(tmp_path, env) as processes:
        worker = processes.worker("w1")
        wait_until(lambda: client.zcard(keys.workers("products")), timeout=30, what="a heartbeat")
        refused = run_cli("repartition", "4", "--yes", env=env)
        assert refused.returncode == 1
        line = assert_one_error_line(refused, "workers are running")
        assert "--online" in line
        assert _namespace_facts(wiring) == facts
        assert processes.stop(worker) == 0  # a clean stop drops its heartbeat

        relay = processes.cqrs("relay", "relay")
        wait_until(lambda: _relay_leads(settings.database_url or ""), what="the relay to lead")
        refused = run_cli("repartition", "4", "--yes", env=env)
        assert refused.returncode == 1
        assert_one_error_line(refused, "a relay is running")
        assert _namespace_facts(wiring) == facts
        assert processes.stop(relay) == 0

    client.set(keys.replay_lock("orders"), "someone", px=10_000)
    refused = run_cli("repartition", "4", "--yes", env=env)
    assert refused.returncode == 1
    assert_one_error_line(refused, "a replay of orders is running")
    client.delete(keys.replay_lock("orders"))
    facts["locks"] = [client.exists(keys.replay_lock(p), keys.pause(p)) for p in PROJECTIONS]
    assert _namespace_facts(wiring) == facts


# --------------------------------------------------------------------------- online


def test_online_repartition_while_the_relay_workers_and_writers_run(
    four: Settings, tmp_path: Path
) -> None:
    """The relay's session is ended and it leads again under the new count; the workers
    step aside and follow; writers never stop. Nothing is lost or applied twice."""
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    wiring = Wiring(four)
    env = _env(four, CQRS_PROJECTOR_LEASE_MS="1000")
    try:
        client, keys = wiring.redis, wiring.keys
        generate(random.Random(rng.getrandbits(64)), wiring, 150)
        drain(wiring)
        with fleet(tmp_path, env) as processes:
            relay = processes.cqrs("relay", "relay")
            workers = [processes.worker(f"w{i}") for i in range(2)]
            wait_until(lambda: _relay_leads(four.database_url or ""), what="the relay to lead")
            wait_until(
                lambda: client.zcard(keys.workers("orders")) == 2, timeout=30, what="2 workers"
            )
            stop = threading.Event()
            written = WorkloadReport()
            writer = threading.Thread(
                target=generate,
                args=(random.Random(rng.getrandbits(64)), wiring),
                kwargs={"stop": stop, "report": written},
            )
            writer.start()
            try:
                wait_until(lambda: written.events > 50, what="writers to commit")
                report = repartition(env, 8, "--online")
                at_switch = written.events
                wait_until(lambda: written.events > at_switch + 50, what="commits after it")
            finally:
                stop.set()
                writer.join(timeout=30)
            assert (report["before"], report["after"]) == (FIRST, 8), report

            # The running relay and workers carry on under the new count, no restart.
            def caught_up() -> bool:
                with psycopg.connect(libpq_url(four.database_url or "")) as conn:
                    if conn.execute("SELECT count(*) FROM events.outbox").fetchone()[0]:
                        return False
                return not differences(wiring)

            wait_until(caught_up, timeout=60, interval=0.5, what="the views to catch up")
            assert all(p.poll() is None for p in [relay, *workers]), processes.logs()
            assert "connection lost" in relay.output(), relay.tail()
            assert all("partition count changed from 4 to 8" in w.output() for w in workers)
        assert_streams_are(client, keys, 8)
        for projection in PROJECTIONS:
            assert client.xlen(keys.dead_letters(projection)) == 0, projection
        verify_clean(env)
    finally:
        wiring.close()


# --------------------------------------------------------------------------- interrupted


def _interrupt_after_switch(
    wiring: Wiring, env: dict[str, str], tmp_path: Path, signum: int, switched: Callable[[], bool]
) -> str:
    """Run `cqrs repartition 8`, and once `switched()` says its streams are switched, hold
    the last projection's rebuild with a "frozen worker's" lease on one of its new slots
    (it cannot switch while the lease is there) until the first projection is rebuilt,
    then send `signum`: it lands after the switch of the streams and before the end.
    Returns the process's output."""
    client, keys = wiring.redis, wiring.keys
    first, *_, last = PROJECTIONS
    generation = live_generation(client, keys, first)
    with fleet(tmp_path, env) as processes:
        victim = processes.cqrs("repartition", "repartition", "8", "--yes")
        wait_until(lambda: victim.poll() is not None or switched(), what="the switch")
        client.set(keys.lease(last, 7), "frozen-worker", px=60_000)
        wait_until(
            lambda: victim.poll() is not None or live_generation(client, keys, first) > generation,
            what="the first projection's rebuild",
        )
        assert victim.poll() is None, processes.logs()
        victim.send_signal(signum)
        code = victim.wait(timeout=20)
        output = victim.output()
    client.delete(keys.lease(last, 7))
    assert code == (130 if signum == signal.SIGINT else -signal.SIGKILL), output
    return output


def test_an_interrupted_repartition_leaves_a_working_namespace_and_a_rerun_finishes(
    four: Settings, tmp_path: Path
) -> None:
    """Stopped after the switch of the streams, before the last projection is rebuilt
    (SIGINT, then SIGKILL on the re-run): the count is the new one, only the new streams
    exist, the views keep serving; a restarted worker rebuilds what is left (a working
    namespace with no re-run), and running the command again finishes it."""
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    wiring = Wiring(four)
    env = _env(four, CQRS_PROJECTOR_LEASE_MS="1000", CQRS_REPLAY_LOCK_MS="3000")
    first, *_, last = PROJECTIONS
    try:
        client, keys = wiring.redis, wiring.keys
        generate(random.Random(rng.getrandbits(64)), wiring, 120)
        drain(wiring)
        before = live_snapshot(client, keys)
        old = live_generation(client, keys, last)

        def interrupted() -> None:
            """A working namespace: the new count, only the new streams, the last
            projection still served from its old generation."""
            assert unfinished_repartition(client, keys) == 8
            assert set(stream_keys(client, keys)) == {keys.stream(k) for k in range(8)}
            assert read_state(client, keys, last) is None
            assert live_generation(client, keys, last) == old
            assert live_snapshot(client, keys) == before

        # SIGINT: one line saying what to do; its locks are given back at once.
        output = _interrupt_after_switch(
            wiring, env, tmp_path, signal.SIGINT,
            lambda: client.hget(keys.meta(), "partitions") == "8",
        )  # fmt: skip
        assert "run `cqrs repartition 8` again" in output, output
        interrupted()
        assert not any(client.exists(keys.replay_lock(p), keys.pause(p)) for p in PROJECTIONS)

        # SIGKILL of the re-run, after its own switch: it deletes the state hashes again,
        # and the first projection's comes back with its next generation.
        rebuilt = live_generation(client, keys, first)
        _interrupt_after_switch(
            wiring, env, tmp_path, signal.SIGKILL,
            lambda: read_state(client, keys, first) is None
            or live_generation(client, keys, first) > rebuilt,
        )  # fmt: skip
        interrupted()
        # Its locks are still held for a moment: a run now refuses and says why.
        with pytest.raises(RepartitionRefused, match="interrupted repartition still holds"):
            Repartitioner(client, four, list(PROJECTIONS.values()), None, 8).preflight(online=False)
        [finding] = _doctor_partitions(env)
        assert "did not finish" in finding["detail"] and "repartition 8" in finding["fix"]

        # The killed run's locks expire; a restarted worker rebuilds the rest by itself.
        wait_until(
            lambda: not any(client.exists(keys.replay_lock(p)) for p in PROJECTIONS),
            timeout=15,
            what="the killed run's locks to expire",
        )
        generate(random.Random(rng.getrandbits(64)), wiring, 60)
        drain(wiring)
        assert read_state(client, keys, last) is not None
        assert differences(wiring) == []
        assert_streams_are(client, keys, 8)

        # Running it again finishes the job: marker gone, every view rebuilt, verify clean.
        report = repartition(env, 8)
        assert report["unfinished"] == 8 and report["before"] == 8, report
        assert len(report["replays"]) == len(PROJECTIONS), report
        assert unfinished_repartition(client, keys) is None
        assert_streams_are(client, keys, 8)
        verify_clean(env)
    finally:
        wiring.close()
