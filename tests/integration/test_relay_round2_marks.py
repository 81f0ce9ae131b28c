"""A relay pass cut off mid-way leaves the two relay marks consistent (docs/scaling.md,
"Failover"): PostgreSQL's mark is raised only by the COMMIT that deletes the outbox rows,
so it never names a position the stream has not received, whatever instant the pass's
PostgreSQL session dies at.

The session is terminated from outside (`pg_terminate_backend`, what a crash of the relay
or of its connection looks like to PostgreSQL) either before the pass's Redis write or
right after it, before its marks' UPSERT and COMMIT; these tests guard any change that
reorders or folds the statements of a pass (e.g. sending the UPSERT and the COMMIT in one
round trip). Then:

- the outbox row is still there and PostgreSQL's mark has not moved;
- cut after the Redis write, the stream's mark is ahead of PostgreSQL's (allowed: Redis
  ahead means nothing was lost), cut before it, the stream's mark has not moved either;
- the next pass publishes the event again without taking the stream for behind (nothing
  re-published from the log), after which both marks name the event's position and the
  audit finds nothing to repair.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
import pytest

from cqrs.commands import catalog
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.keys import partition_of
from cqrs.relay.outbox import Relay
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.integration.stream_checks import assert_published_exactly_once, outbox_count


class _RelayDied(Exception):
    """The relay process ending in the middle of a pass (what a SIGKILL leaves)."""


def _create_products(wiring: Wiring, first: int, n: int) -> list[Any]:
    session_factory = make_session_factory(wiring.engine)
    return [
        execute(
            catalog.CreateProduct(sku=f"R2M-{i}", name=f"Mark {i}", price="1.00", stock=3),
            session_factory,
        )
        for i in range(first, first + n)
    ]


def _pg_mark(wiring: Wiring, relay: Relay, partition: int) -> int | None:
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        row = conn.execute(
            "SELECT position FROM events.relay_marks"
            " WHERE namespace = %s AND partitions = %s AND partition = %s",
            (wiring.keys.ns, relay.partitions, partition),
        ).fetchone()
    return None if row is None else int(row[0])


def _redis_mark(wiring: Wiring, relay: Relay, partition: int) -> int | None:
    value = wiring.redis.hget(wiring.keys.relay_mark(partition), relay.partitions)
    return None if value is None else int(value)


def _outbox_positions(wiring: Wiring) -> list[int]:
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        return [row[0] for row in conn.execute("SELECT position FROM events.outbox ORDER BY 1")]


def _terminate(database_url: str, pid: int) -> None:
    """End backend `pid` and wait (up to 10 s) until it is gone."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        ended = conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,)).fetchone()[0]
    assert ended, f"backend {pid} was not terminated"


@pytest.mark.parametrize("cut", ["before the Redis write", "after the Redis write"])
def test_a_pass_cut_off_before_its_commit_leaves_the_marks_consistent(
    wiring: Wiring, cut: str
) -> None:
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    # Earlier events published: the partitions have marks, so the next pass checks them.
    _create_products(wiring, 0, 12)
    relay.drain()
    assert outbox_count(wiring.database_url) == 0

    (result,) = _create_products(wiring, 100, 1)
    partition = partition_of(UUID(str(result.events[0].partition_key)), relay.partitions)
    (position,) = _outbox_positions(wiring)
    pg_before = _pg_mark(wiring, relay, partition)
    redis_before = _redis_mark(wiring, relay, partition)
    assert pg_before == redis_before  # the drain left them equal (None if no event yet)
    length_before = wiring.redis.xlen(wiring.keys.stream(partition))

    conn = relay._connect()
    pid = conn.info.backend_pid
    publish = relay._publish

    written = cut == "after the Redis write"

    def cut_off(commands: list[tuple[Any, ...]]) -> None:
        if written:
            publish(commands)
        _terminate(wiring.database_url, pid)
        if not written:
            raise _RelayDied  # the relay process dies before its Redis write

    relay._publish = cut_off  # type: ignore[method-assign]
    try:
        # After the Redis write the pass's next statement meets the dead session.
        with pytest.raises(psycopg.OperationalError if written else _RelayDied):
            relay.publish_batch(conn)
    finally:
        relay._publish = publish  # type: ignore[method-assign]
        conn.close()

    assert _outbox_positions(wiring) == [position]
    assert _pg_mark(wiring, relay, partition) == pg_before
    assert wiring.redis.xlen(wiring.keys.stream(partition)) == length_before + written
    assert _redis_mark(wiring, relay, partition) == (position if written else redis_before)
    assert position > (pg_before or 0)  # Redis never behind PostgreSQL here

    with relay._connect() as conn:
        assert relay.publish_batch(conn) == 1
        assert relay.republished == 0
        assert relay.audit(conn) == 0
    assert wiring.redis.hget(wiring.keys.meta(), "republished") is None
    assert _pg_mark(wiring, relay, partition) == position
    assert _redis_mark(wiring, relay, partition) == position
    assert outbox_count(wiring.database_url) == 0
    report = assert_published_exactly_once(
        wiring.database_url, wiring.redis, wiring.keys, wiring.settings
    )
    # The cut-off pass's copy, if it got out (projections drop it).
    assert report.duplicates == written
