"""The versioned DDL and the SQLAlchemy models describe the same tables, so neither can
drift without a failing test; and upgrading twice (or from two processes) is harmless."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import inspect

from cqrs.commands.db import Base
from cqrs.commands.migrations import LATEST_VERSION, current_version, upgrade
from cqrs.wiring import Wiring
from tests.conftest import Backend


def test_models_match_the_migrated_database(wiring: Wiring) -> None:
    inspector = inspect(wiring.engine)
    for table in Base.metadata.sorted_tables:
        columns = {c["name"]: c for c in inspector.get_columns(table.name, schema=table.schema)}
        assert set(columns) == {c.name for c in table.columns}, table.fullname
        for column in table.columns:
            actual = columns[column.name]
            assert actual["nullable"] == column.nullable, f"{table.fullname}.{column.name}"
            expected_type = column.type.compile(dialect=wiring.engine.dialect)
            actual_type = actual["type"].compile(dialect=wiring.engine.dialect)
            assert actual_type == expected_type, f"{table.fullname}.{column.name}"
        primary = inspector.get_pk_constraint(table.name, schema=table.schema)
        assert primary["constrained_columns"] == [c.name for c in table.primary_key.columns]


def test_upgrade_is_idempotent_and_safe_in_parallel(wiring: Wiring) -> None:
    assert current_version(wiring.engine) == LATEST_VERSION
    with ThreadPoolExecutor(4) as pool:
        applied = list(pool.map(lambda _i: upgrade(wiring.engine), range(4)))
    assert applied == [[], [], [], []]
    assert current_version(wiring.engine) == LATEST_VERSION


def test_parallel_upgrades_of_a_fresh_database_apply_each_step_once(backend: Backend) -> None:
    import uuid

    import psycopg

    from cqrs.urls import libpq_url
    from cqrs.wiring import make_engine

    name = f"cqrs_fresh_{uuid.uuid4().hex[:8]}"
    admin = libpq_url(backend.database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(backend.database_url.rsplit("/", 1)[0] + f"/{name}")
    try:
        assert current_version(engine) == 0
        with ThreadPoolExecutor(4) as pool:
            applied = list(pool.map(lambda _i: upgrade(engine), range(4)))
        assert sorted(v for versions in applied for v in versions) == list(
            range(1, LATEST_VERSION + 1)
        )
        assert current_version(engine) == LATEST_VERSION
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_reused_ids_are_rejected_as_duplicates(wiring: Wiring) -> None:
    import uuid

    import pytest

    from cqrs.commands.catalog import CreateProduct
    from cqrs.commands.customers import RegisterCustomer
    from cqrs.commands.db import make_session_factory
    from cqrs.commands.errors import Duplicate
    from cqrs.commands.handlers import execute
    from cqrs.commands.orders import PlaceOrder

    sf = make_session_factory(wiring.engine)
    pid, cid, oid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    execute(CreateProduct(sku="ID-1", name="A", price="1.00", stock=5, product_id=pid), sf)
    execute(RegisterCustomer(email="id@example.com", name="C", customer_id=cid), sf)
    execute(PlaceOrder(customer_id=cid, items=[{"product_id": pid, "qty": 1}], order_id=oid), sf)
    with pytest.raises(Duplicate, match=f"product {pid} already exists"):
        execute(CreateProduct(sku="ID-2", name="B", price="1.00", product_id=pid), sf)
    with pytest.raises(Duplicate, match=f"customer {cid} already exists"):
        execute(RegisterCustomer(email="other@example.com", name="D", customer_id=cid), sf)
    with pytest.raises(Duplicate, match=f"order {oid} already exists"):
        execute(
            PlaceOrder(customer_id=cid, items=[{"product_id": pid, "qty": 1}], order_id=oid), sf
        )
