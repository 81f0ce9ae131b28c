"""Poison events: retried a bounded number of times, then dead-lettered with their error;
the projection moves on, and a fixed event can be re-applied with `cqrs dlq retry`."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.events import EventEnvelope
from cqrs.keys import ViewKeys, partition_of
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.projection import Projection
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.steps import Step
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import run_cli, run_cli_json
from tests.integration.projector_support import differences, drain, relay_all, run


@pytest.fixture
def poison_wiring(settings: Settings) -> Wiring:
    wiring = Wiring(settings.model_copy(update={"projector_max_deliveries": 3}))
    yield wiring
    wiring.close()


def _xadd(wiring: Wiring, partition: int, fields: dict[str, str]) -> str:
    return wiring.redis.xadd(wiring.keys.stream(partition), fields)


def test_malformed_entries_are_dead_lettered_and_the_rest_is_projected(
    poison_wiring: Wiring,
) -> None:
    wiring = poison_wiring
    drain(wiring)  # the views exist: what follows is live projection, not a first build
    before = run(wiring, CreateProduct(sku="P-1", name="Before", price="1.00", stock=1)).id
    relay_all(wiring)
    good = EventEnvelope(
        event_id=uuid.uuid4(),
        event_type="ProductCreated",
        aggregate_type="product",
        aggregate_id=uuid.uuid4(),
        version=1,
        partition_key=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        payload={"sku": "X", "name": "X", "price": "1.00", "stock": 1},
    ).to_stream_fields()
    poisons = {
        "missing fields": {"hello": "world"},
        "unknown type": {**good, "type": "ProductTeleported", "event_id": str(uuid.uuid4())},
        "future schema": {**good, "schema": "99", "event_id": str(uuid.uuid4())},
        "wrong payload type": {
            **good,
            "payload": json.dumps({"sku": "X", "name": "X", "price": "free", "stock": "many"}),
        },
        "not json": {**good, "payload": "{not json", "event_id": str(uuid.uuid4())},
    }
    ids = {why: _xadd(wiring, 0, fields) for why, fields in poisons.items()}
    after = run(wiring, CreateProduct(sku="P-2", name="After", price="2.00", stock=2)).id

    worker = drain(wiring)

    # Everything valid around the poison was projected.
    products = wiring.keys.views("products", 1)
    assert wiring.redis.hget(products.product(before), "name") == "Before"
    assert wiring.redis.hget(products.product(after), "name") == "After"
    assert differences(wiring) == []
    # Entries of no known type are dead-lettered by every projection; a bad ProductCreated
    # (even one whose payload is not JSON) only by the projection that handles
    # ProductCreated: the others skip that type without parsing it.
    unreadable = {"missing fields", "unknown type"}
    for name in PROJECTIONS:
        letters = {d.entry_id: d for d in list_dead_letters(wiring.redis, wiring.keys, name)}
        expected = set(poisons) if name == "products" else unreadable
        assert set(letters) == {ids[why] for why in expected}, name
        for why in expected:
            entry_id = ids[why]
            letter = letters[entry_id]
            assert letter.deliveries >= 3, (name, why)
            assert letter.error, (name, why)
            assert letter.fields == poisons[why]
    errors = {d.entry_id: d.error for d in list_dead_letters(wiring.redis, wiring.keys, "products")}
    assert "missing field" in errors[ids["missing fields"]]
    assert "unknown event type" in errors[ids["unknown type"]]
    assert "schema version 99" in errors[ids["future schema"]]
    assert "price" in errors[ids["wrong payload type"]]
    others = len(PROJECTIONS) - 1  # every projection but products (plugins too)
    assert worker.stats.dead_lettered == len(poisons) + others * len(unreadable)
    # Nothing is left pending: the poison does not block its partition.
    for name in PROJECTIONS:
        assert wiring.redis.xpending(wiring.keys.stream(0), name)["pending"] == 0


def test_handler_exception_is_dead_lettered_then_retried_once_fixed(
    poison_wiring: Wiring,
) -> None:
    wiring = poison_wiring
    real = PROJECTIONS["products"]
    boom = {"armed": True}

    def exploding(event: EventEnvelope, payload: Any, views: ViewKeys) -> list[Step]:
        if boom["armed"] and payload.name == "Boom":
            raise RuntimeError("handler bug")
        return real.handlers["ProductCreated"](event, payload, views)

    flaky = Projection(
        name="products", version=1, handlers={**real.handlers, "ProductCreated": exploding}
    )
    drain(wiring, [flaky])
    victim = run(wiring, CreateProduct(sku="B-1", name="Boom", price="1.00", stock=1)).id
    bystander = run(wiring, CreateProduct(sku="B-2", name="Fine", price="1.00", stock=1)).id
    drain(wiring, [flaky])
    view = wiring.keys.views("products", 1)
    assert wiring.redis.exists(view.product(victim)) == 0
    assert wiring.redis.hget(view.product(bystander), "name") == "Fine"
    [letter] = list_dead_letters(wiring.redis, wiring.keys, "products")
    assert "RuntimeError: handler bug" in letter.error

    from cqrs.projector.worker import Worker

    boom["armed"] = False  # the bug is fixed
    worker = Worker(wiring.redis, wiring.settings, [flaky], consumer="dlq")
    assert worker.reapply(flaky, [letter]) == [None]
    assert wiring.redis.hget(view.product(victim), "name") == "Boom"
    # Re-applying again changes nothing (exactly once in effect).
    snapshot = wiring.redis.hgetall(view.product(victim))
    assert worker.reapply(flaky, [letter]) == [None]
    assert wiring.redis.hgetall(view.product(victim)) == snapshot


def test_parked_successor_is_retried_from_the_cli(poison_wiring: Wiring) -> None:
    """An event whose predecessor has not arrived is parked in the dead letters; once the
    predecessor is projected, `cqrs dlq retry --all` applies it."""
    wiring = poison_wiring
    env = settings_env(wiring.settings) | {
        "CQRS_PROJECTOR_MAX_DELIVERIES": "3",
        "CQRS_PUBLISH_ON_COMMIT": "false",
    }
    drain(wiring)
    created = run(wiring, CreateProduct(sku="G-1", name="Original", price="1.00", stock=1))
    renamed = run(wiring, RenameProduct(product_id=created.id, name="Renamed"))
    # Publish only the rename (v2): take the create's outbox row out of the relay's way.
    with wiring.engine.begin() as conn:
        from sqlalchemy import text

        conn.execute(
            text("DELETE FROM events.outbox WHERE position = :p"),
            {"p": created.events[0].position},
        )
    relay_all(wiring)
    drain(wiring)
    letters = run_cli_json("dlq", "list", "-p", "products", env=env)["items"]
    assert [d["fields"]["version"] for d in letters] == ["2"]
    assert "predecessor" in letters[0]["error"]
    shown = run_cli_json("dlq", "show", letters[0]["id"], "-p", "products", env=env)
    assert shown["entry_id"] == letters[0]["entry_id"]

    # The predecessor arrives (re-published from the log), then the retry applies v2.
    event = created.events[0]
    wiring.redis.xadd(
        wiring.keys.stream(partition_of(event.partition_key, wiring.settings.partitions)),
        event.to_stream_fields(),
    )
    drain(wiring)
    result = run_cli("dlq", "retry", "--all", "-p", "products", env=env)
    assert result.returncode == 0, result.stderr
    view = wiring.keys.views("products", 1).product(created.id)
    assert wiring.redis.hgetall(view)["name"] == "Renamed"
    assert wiring.redis.hget(view, "version") == str(renamed.version)
    assert run_cli_json("dlq", "list", "-p", "products", env=env)["items"] == []
    assert differences(wiring) == []

    missing = run_cli("dlq", "show", "0-1", "-p", "products", env=env)
    assert missing.returncode == 1 and missing.stderr.startswith("error:")
    unknown = run_cli("dlq", "list", "-p", "nope", env=env)
    assert unknown.returncode == 2 and "unknown projection" in unknown.stderr
