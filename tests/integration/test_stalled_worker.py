"""A worker that stalls between two rounds of a batch for longer than its lease (SIGSTOP,
a GC or swap pause, a VM migration) still sends its follow-up steps when it wakes up
(found while building the soak's SIGSTOP fault, issue 8). The gated writes are safe (the
version gate turns them into no-ops); the follow-ups are not gated by the event's version:
they carry values read in the first round, before the worker that took the slot over
applied later events. They must not overwrite the newer values.

Both tests model the stall deterministically with the real handlers and scripts: worker Z
runs round 1 of an event and stops; worker W, now holding the lease, applies that event
and the next one; Z wakes up and sends its round 2. Nothing is delivered twice afterwards
(W acknowledged both), so nothing heals the stale write until the aggregate's next event.

Each such write now carries the version of the event it was computed for and is refused
when its target already reflects a later one: the catalog indexes (top products, by name,
by price) keep a per-index version record sharing the index's hash tag, and an order view
keeps the `customer_version` its copy of the customer's name is from.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.events import EventEnvelope
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.scripts import Scripts
from cqrs.projector.steps import Step, run_steps
from cqrs.wiring import Wiring
from tests.integration.projector_support import differences, drain, run


def steps_of(wiring: Wiring, projection: str, event: EventEnvelope) -> list[Step]:
    handler = PROJECTIONS[projection].handlers.get(event.event_type)
    if handler is None:
        return []
    return handler(event, event.typed_payload(), wiring.keys.views(projection, 1))


def round_one_then_stall(wiring: Wiring, projection: str, event: EventEnvelope) -> list[Step]:
    """Worker Z: the first round of `event`; returns the follow-ups it sends on waking."""
    scripts = Scripts(wiring.redis)
    follow: list[Step] = []
    for step in steps_of(wiring, projection, event):
        result: Any = (
            scripts[step.script](keys=list(step.keys), args=list(step.args))
            if step.script
            else wiring.redis.execute_command(*step.command)
        )
        if step.then is not None:
            follow += step.then(result)
    return follow


def apply_everywhere(wiring: Wiring, events: list[EventEnvelope]) -> None:
    """Worker W (and the other projections' workers): every event, once, acknowledged."""
    scripts = Scripts(wiring.redis)
    for projection in PROJECTIONS:
        outcome = run_steps(
            wiring.redis, scripts, [steps_of(wiring, projection, e) for e in events]
        )
        assert outcome.errors == [None] * len(events)
    with wiring.engine.begin() as conn:  # published and acknowledged: never delivered again
        conn.execute(text("DELETE FROM events.outbox"))


def wake_up(wiring: Wiring, follow: list[Step]) -> None:
    outcome = run_steps(wiring.redis, Scripts(wiring.redis), [follow])
    assert outcome.errors == [None]


def test_a_stalled_worker_does_not_set_an_old_top_products_score(wiring: Wiring) -> None:
    product = run(wiring, CreateProduct(sku="T-1", name="T", price="1.00", stock=50)).id
    customer = run(wiring, RegisterCustomer(email="t@example.com", name="T")).id
    drain(wiring)
    first = run(wiring, PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 1}]))
    later = run(wiring, PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 2}]))
    reserved = next(e for e in first.events if e.event_type == "StockReserved")

    stale = round_one_then_stall(wiring, "products", reserved)  # reads units_sold = 1
    apply_everywhere(wiring, first.events + later.events)  # units_sold = 3, top score 3
    wake_up(wiring, stale)  # refused: the top index already reflects a later version

    top = wiring.keys.views("products", 1).top_products()
    assert wiring.redis.zscore(top, str(product)) == 3.0
    assert differences(wiring) == []


def test_a_stalled_worker_does_not_fan_out_an_old_customer_name(wiring: Wiring) -> None:
    product = run(wiring, CreateProduct(sku="F-1", name="F", price="1.00", stock=50)).id
    customer = run(wiring, RegisterCustomer(email="f@example.com", name="First")).id
    order = run(wiring, PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 1}]))
    drain(wiring)
    x = run(wiring, RenameCustomer(customer_id=customer, name="X")).events
    y = run(wiring, RenameCustomer(customer_id=customer, name="Y")).events

    stale = round_one_then_stall(wiring, "orders", x[0])  # reads the name "X"
    apply_everywhere(wiring, x + y)  # every order now says "Y"
    wake_up(wiring, stale)  # ZRANGE, then sets "X" on every order again

    view = wiring.keys.views("orders", 1).order(order.id)
    assert wiring.redis.hget(view, "customer_name") == "Y"
    assert differences(wiring) == []


def test_a_stalled_worker_does_not_put_back_an_old_name_in_the_index(wiring: Wiring) -> None:
    product = run(wiring, CreateProduct(sku="N-1", name="Old", price="1.00", stock=5)).id
    drain(wiring)
    x = run(wiring, RenameProduct(product_id=product, name="Xavier")).events
    y = run(wiring, RenameProduct(product_id=product, name="Yolanda")).events

    stale = round_one_then_stall(wiring, "products", x[0])  # tracks the name "Xavier"
    apply_everywhere(wiring, x + y)  # the index holds "Yolanda" only
    wake_up(wiring, stale)  # refused: the index already reflects a later version

    index = wiring.keys.views("products", 1).products_by_name()
    names = [m.split("\x00")[1] for m in wiring.redis.zrange(index, 0, -1)]
    assert names == ["Yolanda"]
    assert differences(wiring) == []
