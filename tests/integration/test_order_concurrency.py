"""Concurrent writers never oversell stock and never fork an aggregate's versions.

- 8 `cqrs order place` processes race for the last 3 units: exactly 3 win.
- Concurrent renames of one product: each commit adds exactly one version, no duplicates;
  a lost race is retried, and when retries run out the caller gets a clear `Conflict`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest

from cqrs.commands import catalog, customers
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import Conflict
from cqrs.commands.handlers import execute
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import UnitOfWork
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.helpers import run_cli, wait_until


def _query(database_url: str, sql: str, *params: object) -> list[tuple]:
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _versions(database_url: str, aggregate_id: object) -> list[int]:
    rows = _query(
        database_url,
        "SELECT aggregate_version FROM events.event_log WHERE aggregate_id = %s ORDER BY position",
        aggregate_id,
    )
    return [v for (v,) in rows]


def test_eight_buyers_for_three_units_exactly_three_succeed(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    session_factory = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="LAST-3", name="Last three", price="9.99", stock=3),
        session_factory,
    )
    customer = execute(
        customers.RegisterCustomer(email="buyer@example.com", name="Buyer"), session_factory
    )
    env = {**cli_env, "CQRS_PUBLISH_ON_COMMIT": "false"}
    args = ("order", "place", "--customer", str(customer.id), "--item", f"{product.id}:1")
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: run_cli(*args, env=env), range(8)))

    won = [r for r in results if r.returncode == 0]
    lost = [r for r in results if r.returncode != 0]
    assert len(won) == 3, [r.stderr for r in results]
    assert len(lost) == 5
    for r in lost:
        assert r.returncode == 1, r.stderr
        assert r.stdout == ""
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        assert "insufficient stock" in lines[0]

    db = wiring.database_url
    assert _query(db, "SELECT stock FROM catalog.products WHERE id = %s", product.id) == [(0,)]
    assert _query(db, "SELECT count(*) FROM orders.orders") == [(3,)]
    placed = _query(db, "SELECT count(*) FROM events.event_log WHERE event_type = 'OrderPlaced'")
    assert placed == [(3,)]
    reserved = _query(
        db,
        "SELECT aggregate_version, (payload->>'stock')::int FROM events.event_log"
        " WHERE event_type = 'StockReserved' ORDER BY position",
    )
    # Each reservation saw the stock the previous one left: 2, 1, 0 -- never below zero.
    assert reserved == [(2, 2), (3, 1), (4, 0)]


def test_concurrent_renames_add_one_version_per_commit(wiring: Wiring) -> None:
    session_factory = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="HOT-1", name="Hot", price="1.00", stock=1), session_factory
    )
    threads, renames = 6, 10
    barrier = threading.Barrier(threads)

    def renamer(t: int) -> list[CommandResult | Conflict]:
        barrier.wait(timeout=10)
        outcomes: list[CommandResult | Conflict] = []
        for n in range(renames):
            try:
                cmd = catalog.RenameProduct(product_id=product.id, name=f"name {t}-{n}")
                outcomes.append(execute(cmd, session_factory))
            except Conflict as exc:
                outcomes.append(exc)
        return outcomes

    with ThreadPoolExecutor(threads) as pool:
        outcomes = [o for batch in pool.map(renamer, range(threads)) for o in batch]

    committed = [o for o in outcomes if isinstance(o, CommandResult)]
    conflicts = [o for o in outcomes if isinstance(o, Conflict)]
    assert len(committed) + len(conflicts) == threads * renames
    for exc in conflicts:
        assert "concurrent-update races" in str(exc)
    assert committed, "every rename lost its race"

    versions = sorted(r.version for r in committed)
    assert versions == list(range(2, 2 + len(committed))), "duplicate or skipped versions"
    assert _versions(wiring.database_url, product.id) == list(range(1, 2 + len(committed)))
    last = max(committed, key=lambda r: r.version)
    row = _query(
        wiring.database_url,
        "SELECT version, name FROM catalog.products WHERE id = %s",
        product.id,
    )
    assert row == [(last.version, last.events[0].payload["name"])]


@pytest.mark.parametrize("retries", [0, 1])
def test_a_lost_race_is_retried_or_reported_as_conflict(wiring: Wiring, retries: int) -> None:
    """Deterministic race: rename A has updated the row (version 2) but not committed;
    rename B read version 1 and blocks on A's row lock. When A commits, B's versioned
    UPDATE matches nothing. With a retry B re-reads and writes version 3; without one it
    fails with Conflict and writes nothing."""
    session_factory = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="RACE-1", name="Race", price="1.00", stock=1), session_factory
    )
    at_commit, release = threading.Event(), threading.Event()

    def held_rename() -> CommandResult:
        with UnitOfWork(session_factory) as uow:
            real_commit = uow.session.commit

            def held_commit() -> None:
                at_commit.set()
                assert release.wait(30), "the test never released rename A"
                real_commit()

            uow.session.commit = held_commit  # type: ignore[method-assign]
            return catalog.rename_product(
                catalog.RenameProduct(product_id=product.id, name="A"), uow
            )

    def blocked_on_lock() -> bool:
        rows = _query(
            wiring.database_url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'UPDATE catalog.products%%'",
        )
        return rows[0][0] > 0

    rename_b = catalog.RenameProduct(product_id=product.id, name="B")
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(held_rename)
        try:
            assert at_commit.wait(10)
            b = pool.submit(execute, rename_b, session_factory, retries=retries)
            wait_until(blocked_on_lock, timeout=10, what="rename B to wait for A's row lock")
        finally:
            release.set()
        assert a.result(timeout=30).version == 2
        if retries:
            assert b.result(timeout=30).version == 3
            expected = [1, 2, 3], "B"
        else:
            with pytest.raises(Conflict, match="lost 1 concurrent-update races"):
                b.result(timeout=30)
            expected = [1, 2], "A"

    assert _versions(wiring.database_url, product.id) == expected[0]
    row = _query(wiring.database_url, "SELECT name FROM catalog.products WHERE id = %s", product.id)
    assert row == [(expected[1],)]
