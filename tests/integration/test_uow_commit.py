"""COMMIT travels behind the command's statement (commands/uow.py): a row count checked
inside that statement must still stop the COMMIT, and nothing of the command is kept."""

from __future__ import annotations

import uuid

import psycopg
import pytest

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import StaleVersion
from cqrs.commands.handlers import execute
from cqrs.commands.uow import UnitOfWork
from cqrs.events import ProductRenamed
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring

_RENAME = "UPDATE catalog.products SET name = %s, version = %s WHERE id = %s AND version = %s"


def _rename_expecting(wiring: Wiring, product: uuid.UUID, read: int, expect: int) -> None:
    with UnitOfWork(make_session_factory(wiring.engine)) as uow:
        uow.write(_RENAME, ("Renamed", read + 1, product, read), expect_rows=expect, what="it")
        uow.record("product", product, read + 1, ProductRenamed(name="Renamed"))
        uow.commit()


def _state(wiring: Wiring, product: uuid.UUID) -> tuple[object, ...]:
    with psycopg.connect(libpq_url(wiring.database_url)) as conn:
        return conn.execute(
            "SELECT (SELECT name FROM catalog.products WHERE id = %s),"
            " (SELECT count(*) FROM events.event_log), (SELECT count(*) FROM events.outbox)",
            (product,),
        ).fetchone()  # type: ignore[return-value]


@pytest.mark.parametrize(("read", "expect"), [(2, 1), (1, 2)])
def test_a_count_mismatch_in_the_statement_commits_nothing(
    wiring: Wiring, read: int, expect: int
) -> None:
    """A stale version (matches 0 rows) or any other count than expected: StaleVersion
    naming the write, and the UPDATE, the event and its outbox row are all rolled back."""
    sf = make_session_factory(wiring.engine)
    product = execute(CreateProduct(sku="C-1", name="Original", price="1.00"), sf).id
    before = _state(wiring, product)
    with pytest.raises(StaleVersion, match="it changed concurrently"):
        _rename_expecting(wiring, product, read, expect)
    assert _state(wiring, product) == before
    _rename_expecting(wiring, product, 1, 1)  # the connection went back to the pool usable
    assert _state(wiring, product)[0] == "Renamed"
