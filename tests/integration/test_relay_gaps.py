"""The relay's known traps: sequence gaps, concurrent relays, failover and wake-up.

- Gap: a transaction that took an early log position and commits late is still published
  (a "position > last published" cursor would skip it forever).
- Two relays, plus CLI-style publish-after-commit passes, running at the same time publish
  every event exactly once (or as an identical copy) in per-aggregate order; and, made
  deterministic, a pass that overlaps another queues behind the rows that one holds.
- A standby relay takes over when the active relay's process is SIGKILLed.
- NOTIFY: with a 30 s poll interval, a commit reaches its stream within seconds.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from bench.workload import generate
from cqrs.commands import catalog
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import UnitOfWork
from cqrs.relay.outbox import Relay
from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.helpers import until_events, wait_until
from tests.integration.stream_checks import (
    PassPause,
    assert_published_exactly_once,
    outbox_count,
    published_event_ids,
    read_streams,
    stream_length,
    waiting_on_lock,
)
from tests.procs import fleet


def _create(n: int) -> catalog.CreateProduct:
    return catalog.CreateProduct(sku=f"GAP-{n}", name=f"Gap {n}", price="1.00", stock=5)


def test_late_commit_with_early_position_is_published(wiring: Wiring) -> None:
    session_factory = make_session_factory(wiring.engine)
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    positions_taken = threading.Event()
    release = threading.Event()

    def slow_command() -> CommandResult:
        """A real command through the real UnitOfWork, held open after its events were
        appended (positions taken) and just before COMMIT."""
        with UnitOfWork(session_factory) as uow:
            real_commit = uow.session.commit

            def held_commit() -> None:
                positions_taken.set()
                assert release.wait(30), "the test never released the slow transaction"
                real_commit()

            uow.session.commit = held_commit  # type: ignore[method-assign]
            return catalog.create_product(_create(0), uow)

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(slow_command)
        try:
            assert positions_taken.wait(10), "the slow command never reached its commit"
            fast = [execute(_create(n), session_factory) for n in range(1, 6)]

            assert relay.drain() == 5
            on_streams = published_event_ids(wiring.redis, wiring.keys, wiring.settings)
            assert {str(r.events[0].event_id) for r in fast} == on_streams
            assert relay.drain() == 0, "an uncommitted event must not be published"
        finally:
            release.set()
        held = slow.result(timeout=30)

    # The trap: the late event sits *below* everything already published.
    assert held.events[0].position < min(r.events[0].position for r in fast)
    assert relay.drain() == 1
    on_streams = published_event_ids(wiring.redis, wiring.keys, wiring.settings)
    assert str(held.events[0].event_id) in on_streams
    report = assert_published_exactly_once(
        wiring.database_url, wiring.redis, wiring.keys, wiring.settings
    )
    assert report.events == 6


def test_two_relays_and_publish_on_commit_passes_publish_each_event_once(
    wiring: Wiring,
) -> None:
    """Two `Relay.run` loops (one active, one standby) plus the CLI's publish-right-after-
    commit pass, which takes no leader lock, so passes really do overlap."""
    settings = wiring.settings.model_copy(update={"relay_batch_size": 20})
    local = threading.local()
    connections: list[psycopg.Connection] = []

    def publish_now(_: CommandResult) -> None:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = psycopg.connect(libpq_url(wiring.database_url), autocommit=True)
            connections.append(conn)
            local.relay = Relay(wiring.database_url, wiring.redis, settings)
        local.relay.publish_batch(conn)

    stops = [threading.Event(), threading.Event()]
    relays = [Relay(wiring.database_url, wiring.redis, settings) for _ in stops]
    threads = [
        threading.Thread(target=r.run, args=(s,), daemon=True)
        for r, s in zip(relays, stops, strict=True)
    ]
    for t in threads:
        t.start()
    try:
        workload = generate(
            random.Random(2),
            wiring,
            writers=3,
            after_commit=publish_now,
            until=until_events(2_500, timeout=60),
        )
        wait_until(
            lambda: outbox_count(wiring.database_url) == 0,
            timeout=30,
            what="the relays to publish everything",
        )
    finally:
        for s in stops:
            s.set()
        for t in threads:
            t.join(timeout=10)
        for conn in connections:
            conn.close()
    assert not any(t.is_alive() for t in threads), "a relay did not stop within 10 s"
    assert sum(r.published for r in relays) > 0, "the relay loops published nothing"

    report = assert_published_exactly_once(
        wiring.database_url, wiring.redis, wiring.keys, wiring.settings
    )
    assert report.events == workload.events


def test_overlapping_pass_waits_for_the_rows_another_pass_holds(wiring: Wiring) -> None:
    """Pass A has locked version 1 of a product and not yet published it; version 2 is
    committed; pass B must queue behind A (not skip A's rows and publish version 2 first)."""
    session_factory = make_session_factory(wiring.engine)
    relay_a = Relay(wiring.database_url, wiring.redis, wiring.settings)
    paused = PassPause(relay_a)
    relay_b = Relay(wiring.database_url, wiring.redis, wiring.settings)
    created = execute(_create(1), session_factory)
    with (
        psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn_a,
        psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn_b,
        ThreadPoolExecutor(2) as pool,
    ):
        pass_a = pool.submit(relay_a.publish_batch, conn_a)
        try:
            assert paused.reached.wait(10), "pass A never reached its XADDs"
            renamed = execute(
                catalog.RenameProduct(product_id=created.id, name="Renamed"), session_factory
            )
            pid_b = conn_b.info.backend_pid
            pass_b = pool.submit(relay_b.publish_batch, conn_b)
            wait_until(
                lambda: pass_b.done() or waiting_on_lock(wiring.database_url, pid_b),
                timeout=10,
                what="pass B to block on pass A's rows (or to finish)",
            )
        finally:
            paused.go.set()
        assert pass_a.result(timeout=30) == 1
        assert pass_b.result(timeout=30) == 1
    entries = [
        e.fields["event_id"] for e in read_streams(wiring.redis, wiring.keys, wiring.settings)
    ]
    assert entries == [str(created.events[0].event_id), str(renamed.events[0].event_id)]
    assert_published_exactly_once(wiring.database_url, wiring.redis, wiring.keys, wiring.settings)


# --- failover between relay processes -----------------------------------------------------


def _relay_backends(database_url: str) -> tuple[int | None, list[int]]:
    """(pid of the backend holding the relay's leader lock, pids of backends whose last
    statement was a leader-lock attempt), for this test's database only."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        holder = conn.execute(
            "SELECT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database"
            " WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database()"
        ).fetchone()
        trying = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND query LIKE '%%pg_try_advisory_lock%%' AND pid <> pg_backend_pid()"
        ).fetchall()
    return (holder[0] if holder else None), [r[0] for r in trying]


def _standby_waiting(database_url: str) -> bool:
    holder, trying = _relay_backends(database_url)
    return holder is not None and any(pid != holder for pid in trying)


def test_standby_relay_takes_over_when_the_active_one_is_killed(
    wiring: Wiring, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env, "CQRS_RELAY_BATCH_SIZE": "50"}
    settings, keys, client = wiring.settings, wiring.keys, wiring.redis
    with fleet(tmp_path, env) as relays:
        relay_a = relays.cqrs("relay-a", "relay")
        wait_until(lambda: "relay: active" in relay_a.output(), timeout=30, what="relay A")
        first_holder, _ = _relay_backends(settings.database_url)
        relay_b = relays.cqrs("relay-b", "relay")
        wait_until(
            lambda: _standby_waiting(settings.database_url), timeout=30, what="relay B standby"
        )
        assert "relay: active" not in relay_b.output()

        with ThreadPoolExecutor(1, thread_name_prefix="workload") as pool:
            writing = pool.submit(
                generate,
                random.Random(3),
                wiring,
                writers=2,
                until=until_events(3_000, timeout=60),
            )
            # Kill A while events are flowing through it.
            wait_until(
                lambda: stream_length(client, keys, settings) > 500,
                timeout=30,
                what="relay A to publish",
            )
            relay_a.kill()
            relay_a.wait(timeout=10)
            wait_until(
                lambda: "relay: active" in relay_b.output(),
                timeout=15,
                what="relay B to take over",
            )
            workload = writing.result()  # re-raises anything a writer hit
        # No drain: only relay B can empty the outbox now.
        wait_until(
            lambda: outbox_count(settings.database_url) == 0,
            timeout=30,
            what="relay B to publish everything",
        )
        holder, _ = _relay_backends(settings.database_url)
        assert holder is not None and holder != first_holder
        relay_b.terminate()
        assert relay_b.wait(timeout=15) == 0, "SIGTERM should stop the relay cleanly"

    report = assert_published_exactly_once(settings.database_url, client, keys, settings)
    assert report.events == workload.events


# --- NOTIFY wake-up ------------------------------------------------------------------------


@pytest.fixture
def slow_poll_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"relay_poll_seconds": 30.0})


def test_notify_wakes_the_relay_long_before_its_poll_interval(
    wiring: Wiring, slow_poll_settings: Settings
) -> None:
    session_factory = make_session_factory(wiring.engine)
    relay = Relay(wiring.database_url, wiring.redis, slow_poll_settings)
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    thread.start()
    latencies = []
    try:
        # The first event may be caught by the relay's initial pass; after it is on the
        # stream the relay is idle in its 30 s wait, so only NOTIFY can explain the rest.
        for n in range(4):
            event_id = str(execute(_create(n), session_factory).events[0].event_id)
            started = time.monotonic()
            wait_until(
                lambda e=event_id: (
                    e in published_event_ids(wiring.redis, wiring.keys, slow_poll_settings)
                ),
                timeout=5,
                what=f"event {n} on its stream (poll interval is 30 s)",
            )
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive(), "the relay did not stop within 5 s of its stop flag"
    assert relay.published == 4
    print(f"\npublish latencies after commit: {[f'{x:.3f}s' for x in latencies]}")
