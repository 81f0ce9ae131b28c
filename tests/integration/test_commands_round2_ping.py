"""The engine's pre-ping without a round trip per checkout (`cqrs.wiring.make_engine`).

A connection that sat quietly in the pool is handed out without `SELECT 1`; one whose
server ended it while it was idle is pinged, found dead and replaced, and the command on
it succeeds as it did with `pool_pre_ping=True`.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring, server_spoke
from tests.helpers import wait_until


def _count_pings(wiring: Wiring, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    pings: list[object] = []
    dialect = wiring.engine.dialect
    real = dialect.do_ping

    def counted(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real(dbapi_connection)

    monkeypatch.setattr(dialect, "do_ping", counted)
    return pings


def _pooled_pid(wiring: Wiring) -> int:
    pooled = wiring.engine.raw_connection()
    try:
        return pooled.driver_connection.info.backend_pid  # type: ignore[union-attr]
    finally:
        pooled.close()


def test_a_quiet_pooled_connection_is_not_pinged(
    wiring: Wiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    sf = make_session_factory(wiring.engine)
    execute(CreateProduct(sku="PING-1", name="Quiet", price="1.00"), sf)
    pings = _count_pings(wiring, monkeypatch)
    pid = _pooled_pid(wiring)
    for n in range(3):
        execute(CreateProduct(sku=f"PING-Q{n}", name="Quiet", price="1.00"), sf)
    assert pings == []
    assert _pooled_pid(wiring) == pid  # the same connection all along, never replaced


def test_a_connection_the_server_ended_in_the_pool_is_replaced(
    wiring: Wiring, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid = _pooled_pid(wiring)
    pooled = wiring.engine.raw_connection()
    dbapi = pooled.driver_connection
    pooled.close()
    with psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # The goodbye reaches the idle socket asynchronously.
    wait_until(lambda: server_spoke(dbapi), timeout=10, what="the ended connection's socket")
    pings = _count_pings(wiring, monkeypatch)
    created = execute(
        CreateProduct(sku="PING-2", name="After", price="1.00"),
        make_session_factory(wiring.engine),
    )
    assert created.version == 1
    assert len(pings) == 1  # the real ping decided, as pool_pre_ping's would
    assert _pooled_pid(wiring) != pid
