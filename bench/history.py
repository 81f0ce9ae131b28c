"""Synthetic event histories, made fast enough for a million events.

Going through the command handlers costs milliseconds per command, so the projection,
relay, rebuild and memory scenarios start from a history built here instead: the events
a seeded shop would have produced (the same mix of commands as `bench.workload`), with
consistent aggregate versions, partition keys and payloads that pass their contracts.
It is loaded with COPY into the PostgreSQL event log and with pipelined XADDs of
pre-built entries into the partition streams, exactly as the relay would have written
them. The command scenarios keep using the real handlers.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import psycopg
import redis

from cqrs.keys import KeyMap, partition_of
from cqrs.urls import libpq_url

# Same relative weights as the seeded workload (bench.workload.COMMAND_WEIGHTS).
WEIGHTS = {
    "create_product": 6,
    "register_customer": 6,
    "rename_product": 8,
    "reprice_product": 6,
    "restock_product": 10,
    "rename_customer": 8,
    "place_order": 36,
    "cancel_order": 9,
    "ship_order": 11,
}
_ADJECTIVES = ("Blue", "Small", "Heavy", "Quiet", "Smart", "Green", "Eclair", "Big", "Old")
_NOUNS = ("Widget", "Gadget", "Kettle", "Lamp", "Street Map", "Cafe Mug", "Drill", "Chair")
_FIRST = ("Ann", "Bob", "Chloe", "Dmitri", "Eve", "Fatima", "Gunter", "Hiro", "Ines", "Jo")
_LAST = ("Smith", "Muller", "Okafor", "Tanaka", "Garcia", "Nguyen", "Lukasz", "O'Brien")
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_JSON = json.JSONEncoder(separators=(",", ":"))


class SynthEvent(NamedTuple):
    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    version: int
    partition_key: str
    partition: int
    occurred_at: str
    payload: str  # compact JSON, as the relay puts it on a stream

    def stream_fields(self, position: int) -> dict[str, str]:
        """The entry the relay would XADD (EventEnvelope.to_stream_fields)."""
        return {
            "event_id": self.event_id,
            "type": self.event_type,
            "schema": "1",
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "version": str(self.version),
            "partition_key": self.partition_key,
            "position": str(position),
            "occurred_at": self.occurred_at,
            "payload": self.payload,
        }


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass
class _Product:
    id: str
    partition: int
    version: int
    name: str
    price: int
    stock: int


@dataclass
class _Customer:
    id: str
    partition: int
    version: int
    name: str


@dataclass
class _Order:
    id: str
    customer: str
    version: int
    lines: list[tuple[str, int, int]]  # product id, qty, unit price cents
    total: int


@dataclass
class History:
    """A seeded shop; `events(n)` yields its next n events in commit order."""

    seed: int = 7
    partitions: int = 8
    rng: random.Random = field(init=False)
    products: list[_Product] = field(default_factory=list)
    product_by_id: dict[str, _Product] = field(default_factory=dict)
    customers: list[_Customer] = field(default_factory=list)
    customer_by_id: dict[str, _Customer] = field(default_factory=dict)
    open_orders: list[_Order] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)
    _clock: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._kinds = list(WEIGHTS)
        self._weights = list(WEIGHTS.values())

    def _uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def _now(self) -> tuple[datetime, str]:
        self._clock += 1
        at = _EPOCH + timedelta(milliseconds=self._clock)
        return at, at.isoformat()

    def _event(
        self, etype: str, atype: str, aid: str, version: int, pkey: str, part: int, payload: dict
    ) -> SynthEvent:
        _at, iso = self._now()
        return SynthEvent(
            str(self._uuid()), etype, atype, aid, version, pkey, part, iso, _JSON.encode(payload)
        )

    def _partition(self, key: uuid.UUID) -> int:
        return partition_of(key, self.partitions)

    def _command(self) -> list[SynthEvent]:
        rng = self.rng
        if len(self.products) < 4:
            kind = "create_product"
        elif len(self.customers) < 3:
            kind = "register_customer"
        else:
            kind = rng.choices(self._kinds, self._weights)[0]
            if kind in ("cancel_order", "ship_order") and not self.open_orders:
                kind = "place_order"
        if kind == "create_product":
            pid = self._uuid()
            n = len(self.products) + 1
            p = _Product(
                str(pid),
                self._partition(pid),
                1,
                f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {n}",
                rng.randint(50, 250_000),
                1_000_000,
            )
            self.products.append(p)
            self.product_by_id[p.id] = p
            payload = {
                "sku": f"SKU-{n}",
                "name": p.name,
                "price": _money(p.price),
                "stock": p.stock,
            }
            return [self._pevent(p, "ProductCreated", payload)]
        if kind == "register_customer":
            cid = self._uuid()
            name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            c = _Customer(str(cid), self._partition(cid), 1, name)
            self.customers.append(c)
            self.customer_by_id[c.id] = c
            n = len(self.customers)
            payload = {"email": f"c{n}@example.com", "name": c.name}
            return [self._cevent(c, "CustomerRegistered", payload)]
        if kind == "rename_product":
            p = rng.choice(self.products)
            p.version += 1
            p.name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.randint(1, 10**6)}"
            return [self._pevent(p, "ProductRenamed", {"name": p.name})]
        if kind == "reprice_product":
            p = rng.choice(self.products)
            p.version += 1
            p.price = rng.randint(50, 250_000)
            return [self._pevent(p, "ProductRepriced", {"price": _money(p.price)})]
        if kind == "restock_product":
            p = rng.choice(self.products)
            p.version += 1
            delta = rng.randint(10, 200)
            p.stock += delta
            return [self._pevent(p, "ProductRestocked", {"delta": delta, "stock": p.stock})]
        if kind == "rename_customer":
            c = rng.choice(self.customers)
            c.version += 1
            c.name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
            return [self._cevent(c, "CustomerRenamed", {"name": c.name})]
        if kind == "place_order":
            return self._place_order()
        order = self.open_orders.pop(rng.randrange(len(self.open_orders)))
        return self._close_order(order, cancel=kind == "cancel_order")

    def _pevent(self, p: _Product, etype: str, payload: dict) -> SynthEvent:
        return self._event(etype, "product", p.id, p.version, p.id, p.partition, payload)

    def _cevent(self, c: _Customer, etype: str, payload: dict) -> SynthEvent:
        return self._event(etype, "customer", c.id, c.version, c.id, c.partition, payload)

    def _place_order(self) -> list[SynthEvent]:
        rng = self.rng
        customer = rng.choice(self.customers)
        picked = rng.sample(self.products, min(rng.randint(1, 4), len(self.products)))
        oid = str(self._uuid())
        lines = []
        for p in picked:
            qty = rng.choices((1, 2, 3, 5, 8), (40, 25, 15, 12, 8))[0]
            lines.append((p, qty))
        total = sum(p.price * qty for p, qty in lines)
        _at, iso = self._now()
        payload = {
            "customer_id": customer.id,
            "customer_name": customer.name,
            "customer_version": customer.version,
            "lines": [
                {
                    "product_id": p.id,
                    "name": p.name,
                    "unit_price": _money(p.price),
                    "qty": qty,
                    "line_total": _money(p.price * qty),
                }
                for p, qty in lines
            ],
            "total": _money(total),
            "placed_at": iso,
        }
        order = _Order(oid, customer.id, 1, [(p.id, qty, p.price) for p, qty in lines], total)
        self.open_orders.append(order)
        self.orders.append(oid)
        events = [
            self._event(
                "OrderPlaced",
                "order",
                oid,
                1,
                customer.id,
                customer.partition,
                payload,
            )
        ]
        for p, qty in lines:
            p.version += 1
            p.stock -= qty
            events.append(
                self._pevent(
                    p,
                    "StockReserved",
                    {"order_id": oid, "qty": qty, "unit_price": _money(p.price), "stock": p.stock},
                )
            )
        return events

    def _close_order(self, order: _Order, *, cancel: bool) -> list[SynthEvent]:
        order.version += 1
        part = self.customer_by_id[order.customer].partition
        _at, iso = self._now()
        if not cancel:
            payload = {"customer_id": order.customer, "shipped_at": iso}
            return [
                self._event(
                    "OrderShipped", "order", order.id, order.version, order.customer, part, payload
                )
            ]
        payload = {"customer_id": order.customer, "total": _money(order.total), "cancelled_at": iso}
        events = [
            self._event(
                "OrderCancelled", "order", order.id, order.version, order.customer, part, payload
            )
        ]
        for pid, qty, price in order.lines:
            p = self.product_by_id[pid]
            p.version += 1
            p.stock += qty
            events.append(
                self._pevent(
                    p,
                    "StockReleased",
                    {
                        "order_id": order.id,
                        "qty": qty,
                        "unit_price": _money(price),
                        "stock": p.stock,
                    },
                )
            )
        return events

    def events(self, n: int) -> Iterator[SynthEvent]:
        produced = 0
        while produced < n:
            for event in self._command():
                if produced >= n:
                    return
                produced += 1
                yield event


def make_history(n: int, *, seed: int = 7, partitions: int = 8) -> list[SynthEvent]:
    return list(History(seed=seed, partitions=partitions).events(n))


# --- loading ---------------------------------------------------------------------------

LOG_COPY = (
    "COPY events.event_log (event_id, aggregate_type, aggregate_id, aggregate_version,"
    " partition_key, event_type, schema_version, payload, occurred_at) FROM STDIN"
)


def copy_to_log(database_url: str, events: Iterable[SynthEvent], *, outbox: bool) -> int:
    """Append events to the (empty) event log with COPY; positions follow the order given.
    With `outbox`, every event is also left unpublished (an outbox row each)."""
    n = 0
    with psycopg.connect(libpq_url(database_url)) as conn:
        with conn.cursor() as cur, cur.copy(LOG_COPY) as copy:
            for e in events:
                copy.write_row(
                    (
                        e.event_id,
                        e.aggregate_type,
                        e.aggregate_id,
                        e.version,
                        e.partition_key,
                        e.event_type,
                        1,
                        e.payload,
                        e.occurred_at,
                    )
                )
                n += 1
        if outbox:
            conn.execute(
                "INSERT INTO events.outbox (position) SELECT position FROM events.event_log"
            )
        conn.commit()
        conn.execute("ANALYZE events.event_log")
        conn.commit()
    return n


def xadd_history(
    client: redis.Redis,
    keys: KeyMap,
    events: Iterable[SynthEvent],
    *,
    partitions: int = 8,
    first_position: int = 1,
    batch: int = 2000,
) -> int:
    """Write the entries the relay would have written, pipelined; marks the streams as
    holding the whole history (as a relay started on an empty log does)."""
    client.hset(keys.meta(), mapping={"partitions": partitions, "origin": "complete"})
    streams = [keys.stream(p) for p in range(partitions)]
    pipe = client.pipeline(transaction=False)
    n = 0
    for n, e in enumerate(events, start=1):
        pipe.xadd(streams[e.partition], e.stream_fields(first_position + n - 1))
        if n % batch == 0:
            pipe.execute()
            pipe = client.pipeline(transaction=False)
    pipe.execute()
    return n
