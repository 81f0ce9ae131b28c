"""Properties of the projections over generated command sequences, on real servers.

Each example runs a generated sequence of commands through the real command handlers
against PostgreSQL, reads the events back from the event log, and projects them with the
real handlers and `projector.steps.run_steps` into fresh Redis namespaces:

- **reference**: every event once, in log order, one at a time;
- **chaos**: per projection (each has its own consumer groups), the events as the workers
  may see them: split into partition streams (per-partition order kept), redelivered
  (copies of an event anywhere after its first delivery in its partition, as after a crash
  before XACK or a relay that published twice), partitions interleaved arbitrarily, and
  cut into batches of any size (a batch's steps run in rounds, as the worker runs them).

Properties: chaos == reference key by key; reference == PostgreSQL (`verify`); and the
domain rules hold: stock is never negative (in PostgreSQL after every command, in every
event, in the view after every event), an order's total is the sum of its lines, and a
cancellation reverts everything the order counted (units sold, revenue, order count,
lifetime value, stock): the views equal a fold of the log in which cancelled orders never
happened.
"""

from __future__ import annotations

import contextlib
import itertools
import uuid
from collections import defaultdict
from decimal import Decimal
from typing import Any

import psycopg
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.orders import CancelOrder, PlaceOrder, ShipOrder
from cqrs.eventlog import LOG_COLUMNS, envelope_from_row
from cqrs.events import EventEnvelope
from cqrs.keys import KeyMap, partition_of
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.scripts import Scripts
from cqrs.projector.steps import Step, run_steps
from cqrs.projector.verify import verify
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring
from tests.conftest import delete_namespace, truncate_write_side

PARTITIONS = 8
FUNCTION_FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
_examples = itertools.count()

# --------------------------------------------------------------------------- programs

names = st.sampled_from(["Ann", "Bob", "Chloé", "Mug {x}", "a:b*c", "Zed"]) | st.text(
    alphabet="abcXYZ {}:*'; ", min_size=1, max_size=12
).filter(str.strip)
idx = st.integers(0, 30)
money_cents = st.integers(0, 99_999)

operations = st.one_of(
    st.tuples(st.just("create_product"), money_cents, st.integers(0, 12)),
    st.tuples(st.just("register_customer"), names),
    st.tuples(st.just("rename_product"), idx, names),
    st.tuples(st.just("reprice_product"), idx, money_cents),
    st.tuples(st.just("restock_product"), idx, st.integers(-15, 15).filter(bool)),
    st.tuples(st.just("rename_customer"), idx, names),
    st.tuples(
        st.just("place_order"),
        idx,
        st.lists(st.tuples(idx, st.integers(1, 6)), min_size=1, max_size=3),
    ),
    st.tuples(st.just("cancel_order"), idx),
    st.tuples(st.just("ship_order"), idx),
)
# Always something to work on: two products and a customer first.
START = [("create_product", 250, 8), ("create_product", 1999, 3), ("register_customer", "Ann")]
programs = st.lists(operations, min_size=1, max_size=22).map(lambda ops: [*START, *ops])
# Ids derive from the operation's position: the same program always yields the same
# partitions, so hypothesis can replay and shrink what it draws from them.
_IDS = uuid.UUID("6c1d0a52-58f6-4c8e-9a52-0a5b1e7d3c11")


def _id(kind: str, n: int) -> uuid.UUID:
    return uuid.uuid5(_IDS, f"{kind}-{n}")


def _price(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _command(op: tuple[Any, ...], world: dict[str, list[uuid.UUID]], n: int) -> object | None:
    """The command an operation means in the current world (ids picked by index), or None
    when it refers to nothing yet."""
    kind = op[0]
    products, customers, orders = world["products"], world["customers"], world["orders"]

    def pick(ids: list[uuid.UUID], i: int) -> uuid.UUID | None:
        return ids[i % len(ids)] if ids else None

    if kind == "create_product":
        return CreateProduct(
            sku=f"P-{n}",
            name=f"Product {n}",
            price=_price(op[1]),
            stock=op[2],
            product_id=_id("product", n),
        )
    if kind == "register_customer":
        return RegisterCustomer(
            email=f"c{n}@example.com", name=op[1], customer_id=_id("customer", n)
        )
    if kind in ("rename_product", "reprice_product", "restock_product"):
        pid = pick(products, op[1])
        if kind == "rename_product":
            return RenameProduct(product_id=pid, name=op[2])
        if kind == "reprice_product":
            return RepriceProduct(product_id=pid, price=_price(op[2]))
        return RestockProduct(product_id=pid, qty=op[2])
    if kind == "rename_customer":
        return RenameCustomer(customer_id=pick(customers, op[1]), name=op[2])
    if kind == "place_order":
        lines = {pick(products, i): qty for i, qty in op[2]}  # distinct products
        items = [{"product_id": pid, "qty": qty} for pid, qty in lines.items()]
        return PlaceOrder(customer_id=pick(customers, op[1]), items=items, order_id=_id("order", n))
    oid = pick(orders, op[1])
    if oid is None:
        return None
    return CancelOrder(order_id=oid) if kind == "cancel_order" else ShipOrder(order_id=oid)


CREATES = {CreateProduct: "products", RegisterCustomer: "customers", PlaceOrder: "orders"}


def run_program(wiring: Wiring, program: list[tuple[Any, ...]]) -> list[EventEnvelope]:
    """Run the commands (refusals are part of the program), checking after each one that
    no stock in PostgreSQL is negative; return the event log."""
    truncate_write_side(wiring.database_url)
    sf = make_session_factory(wiring.engine)
    world: dict[str, list[uuid.UUID]] = {"products": [], "customers": [], "orders": []}
    with psycopg.connect(libpq_url(wiring.database_url), autocommit=True) as conn:
        for n, op in enumerate(program):
            command = _command(op, world, n)
            if command is None:
                continue
            try:
                result = execute(command, sf)
            except CommandRejected:
                pass
            else:
                for cls, kind in CREATES.items():
                    if isinstance(command, cls):
                        world[kind].append(result.id)
            lowest = conn.execute("SELECT min(stock) FROM catalog.products").fetchone()[0]
            assert lowest is None or lowest >= 0, f"stock {lowest} after {command!r}"
        rows = conn.execute(f"SELECT {LOG_COLUMNS} FROM events.event_log ORDER BY position")
        return [envelope_from_row(row) for row in rows]


# --------------------------------------------------------------------------- projecting


def steps_of(projection: str, event: EventEnvelope, keys: KeyMap) -> list[Step]:
    # Through the stream encoding, exactly as a worker receives it.
    event = EventEnvelope.from_stream_fields(event.to_stream_fields())
    handler = PROJECTIONS[projection].handlers.get(event.event_type)
    if handler is None:
        return []
    return handler(event, event.typed_payload(), keys.views(projection, 1))


def apply_batch(
    client: redis.Redis, scripts: Scripts, keys: KeyMap, batch: list[tuple[str, EventEnvelope]]
) -> None:
    outcome = run_steps(client, scripts, [steps_of(p, e, keys) for p, e in batch])
    failed = [
        (p, e.event_type, e.version, err)
        for (p, e), err in zip(batch, outcome.errors, strict=True)
        if err is not None
    ]
    assert not failed, failed


def snapshot(client: redis.Redis, keys: KeyMap) -> dict[str, Any]:
    """Every view key (namespace stripped) with its whole content."""
    found: dict[str, Any] = {}
    for projection in PROJECTIONS:
        for key in client.scan_iter(match=keys.views(projection, 1).pattern(), count=1000):
            kind = client.type(key)
            if kind == "hash":
                value: Any = client.hgetall(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "set":
                value = sorted(client.smembers(key))
            else:
                raise AssertionError(f"unexpected {kind} at {key}")
            # The namespace also appears inside the catalog indexes' hash tags.
            found[key.replace(keys.ns, "")] = value
    return found


def chaotic_deliveries(
    data: st.DataObject, events: list[EventEnvelope]
) -> list[list[EventEnvelope]]:
    """The events as one projection's workers may receive them, cut into batches."""
    streams: dict[int, list[EventEnvelope]] = defaultdict(list)
    for event in events:
        streams[partition_of(event.partition_key, PARTITIONS)].append(event)
    for partition, seq in streams.items():
        copies = data.draw(st.integers(0, len(seq)), label=f"copies in p{partition}")
        for _ in range(copies):
            original = data.draw(st.sampled_from(seq))
            first = next(i for i, e in enumerate(seq) if e is original)
            seq.insert(data.draw(st.integers(first + 1, len(seq))), original)
    order: list[EventEnvelope] = []
    heads = {p: 0 for p in streams}
    while live := sorted(p for p in streams if heads[p] < len(streams[p])):
        p = data.draw(st.sampled_from(live))
        order.append(streams[p][heads[p]])
        heads[p] += 1
    batches = []
    while order:
        size = data.draw(st.integers(1, 12))
        batches.append(order[:size])
        order = order[size:]
    return batches


# --------------------------------------------------------------------------- the fold


def expected_from_log(events: list[EventEnvelope]) -> dict[str, dict[str, Any]]:
    """Stock, sales and customer counters as if cancelled orders had never been placed."""
    cancelled = {e.aggregate_id for e in events if e.event_type == "OrderCancelled"}
    stock: dict[str, int] = {}
    sold: dict[str, int] = defaultdict(int)
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    orders: dict[str, int] = defaultdict(int)
    value: dict[str, Decimal] = defaultdict(Decimal)
    for e in events:
        p = e.payload
        pid = str(e.aggregate_id)
        if e.event_type == "ProductCreated":
            stock[pid] = p["stock"]
        elif e.event_type == "ProductRestocked":
            stock[pid] += p["delta"]
        elif e.event_type == "OrderPlaced":
            total = sum((Decimal(line["line_total"]) for line in p["lines"]), Decimal("0"))
            assert Decimal(p["total"]) == total, "an order's total is the sum of its lines"
            for line in p["lines"]:
                assert Decimal(line["line_total"]) == Decimal(line["unit_price"]) * line["qty"]
            if e.aggregate_id in cancelled:
                continue
            orders[p["customer_id"]] += 1
            value[p["customer_id"]] += total
            for line in p["lines"]:
                stock[line["product_id"]] -= line["qty"]
                sold[line["product_id"]] += line["qty"]
                revenue[line["product_id"]] += Decimal(line["line_total"])
        if "stock" in p and e.aggregate_type == "product":
            assert p["stock"] >= 0, f"{e.event_type} v{e.version} carries stock {p['stock']}"
    return {
        "products": {
            pid: {
                "stock": str(s),
                "units_sold": str(sold[pid]),
                "revenue": f"{revenue[pid]:.2f}",
            }
            for pid, s in stock.items()
        },
        "customers": {
            str(e.aggregate_id): {
                "order_count": str(orders[str(e.aggregate_id)]),
                "lifetime_value": f"{value[str(e.aggregate_id)]:.2f}",
            }
            for e in events
            if e.event_type == "CustomerRegistered"
        },
    }


# --------------------------------------------------------------------------- the property


@settings(max_examples=40, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(program=programs, data=st.data())
def test_any_redelivery_and_interleaving_gives_the_views_of_one_ordered_pass(
    wiring: Wiring, program: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    events = run_program(wiring, program)
    client = wiring.redis
    scripts = Scripts(client)
    n = next(_examples)
    reference = KeyMap(f"{wiring.settings.namespace}-ref{n}")
    chaos = KeyMap(f"{wiring.settings.namespace}-chaos{n}")
    try:
        # Reference: once each, in order; stock in the view never goes below zero.
        for event in events:
            apply_batch(client, scripts, reference, [(p, event) for p in PROJECTIONS])
            if event.aggregate_type == "product":
                view = reference.views("products", 1).product(event.aggregate_id)
                assert int(client.hget(view, "stock")) >= 0
        want = snapshot(client, reference)
        assert want, "the reference projected nothing"

        # Chaos: each projection on its own schedule.
        for projection in PROJECTIONS:
            for batch in chaotic_deliveries(data, events):
                apply_batch(client, scripts, chaos, [(projection, e) for e in batch])
        assert snapshot(client, chaos) == want

        # The reference agrees with PostgreSQL, and with the fold of the log.
        diffs = verify(wiring.database_url, client, reference, dict.fromkeys(PROJECTIONS, 1))
        assert diffs == [], [str(d) for d in diffs[:5]]
        expected = expected_from_log(events)
        products = reference.views("products", 1)
        for pid, fields in expected["products"].items():
            got = client.hmget(products.product(pid), list(fields))
            assert dict(zip(fields, got, strict=True)) == fields, pid
        customers = reference.views("customers", 1)
        for cid, fields in expected["customers"].items():
            got = client.hmget(customers.customer(cid), list(fields))
            assert dict(zip(fields, got, strict=True)) == fields, cid
        orders = reference.views("orders", 1)
        for event in events:
            if event.event_type == "OrderPlaced":
                view = client.hgetall(orders.order(event.aggregate_id))
                count = int(view["line_count"])
                totals = [view[f"line:{n}:line_total"] for n in range(1, count + 1)]
                assert Decimal(view["total"]) == sum(map(Decimal, totals), Decimal("0"))
    finally:
        for keys in (reference, chaos):
            with contextlib.suppress(redis.RedisError):
                delete_namespace(wiring.redis_url, keys.ns)


# --------------------------------------------------------------------------- money in Lua


@settings(max_examples=60, deadline=None, suppress_health_check=FUNCTION_FIXTURES)
@given(st.lists(st.integers(-(10**12), 10**12), min_size=1, max_size=20))
def test_money_ops_in_lua_add_exact_cents(wiring: Wiring, amounts: list[int]) -> None:
    """Revenue and lifetime value are summed in Lua (doubles): exact in integer cents for
    any sequence of additions and reversals, and formatted with two places."""
    client, scripts = wiring.redis, Scripts(wiring.redis)
    key = f"{wiring.settings.namespace}:money:{{{uuid.uuid4()}}}"
    try:
        for version, cents in enumerate(amounts, start=1):
            result = scripts["apply"](
                keys=[key, key], args=["version", version, 1, "money", "total", cents, "total"]
            )
            assert result[0] == 1
        total = sum(amounts)
        sign = "-" if total < 0 else ""
        assert client.hget(key, "total") == f"{sign}{abs(total) // 100}.{abs(total) % 100:02d}"
    finally:
        client.delete(key)
