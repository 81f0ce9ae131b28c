"""The write side end to end through the Python API: command -> log -> relay -> stream."""

from __future__ import annotations

from decimal import Decimal

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.events import EventEnvelope, ProductCreated
from cqrs.relay.outbox import Relay
from cqrs.wiring import Wiring


def test_created_product_reaches_its_stream(wiring: Wiring) -> None:
    result = execute(
        CreateProduct(sku="SMOKE-1", name="Smoke", price="1.50", stock=2),
        make_session_factory(wiring.engine),
    )
    relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
    assert relay.drain() == 1
    entries = []
    for partition in range(relay.partitions):
        entries += wiring.redis.xrange(wiring.keys.stream(partition))
    assert len(entries) == 1
    event = EventEnvelope.from_stream_fields(entries[0][1])
    assert event.event_id == result.events[0].event_id
    assert event.typed_payload() == ProductCreated(
        sku="SMOKE-1", name="Smoke", price=Decimal("1.50"), stock=2
    )
    assert relay.pending_count()[0] == 0
