"""Contract of the `customers` views (handlers: `projector.customers`).

View `customer:{id}`: id, email, name, order_count, lifetime_value, version. Beside it,
in the same hash tag, `customer-orders-applied:{id}`: the version of each of the
customer's orders already counted, which makes the counters exactly-once and is what
read-your-writes checks for an order's effect on its customer.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

from cqrs.contracts import Expected, KeySpec, ViewContract, ViewModel, money, uuid_key
from cqrs.events import Money
from cqrs.keys import ViewKeys


class CustomerKeys(ViewKeys):
    """The `customers` views' key layout: the customer hash and its per-order applied records."""

    def customer(self, customer_id: UUID | str) -> str:
        return f"{self.prefix}:customer:{{{customer_id}}}"

    def customer_order_state(self, customer_id: UUID | str) -> str:
        """Per-order applied version for the customer's counters (exactly-once)."""
        return f"{self.prefix}:customer-orders-applied:{{{customer_id}}}"


class CustomerView(ViewModel):
    id: UUID
    email: str
    name: str
    order_count: int
    lifetime_value: Money
    version: int


def applied(views: CustomerKeys, aggregate_type: str, aggregate_id: UUID, partition: UUID) -> Any:
    """A customer's own version on its view; an order's version in the per-order record of
    its customer (the order's partition key is its customer's id)."""
    if aggregate_type == "customer":
        return views.customer(aggregate_id), "version"
    if aggregate_type == "order":
        return views.customer_order_state(partition), str(aggregate_id)
    return None


def expect(conn: Any, customers: CustomerKeys) -> dict[str, Expected]:
    """Each customer with the count and value of their non-cancelled orders, and the
    per-order record: every order event is counted on the customer (placed, cancelled,
    shipped), so it holds the order's current version."""
    counters = {
        str(cid): (int(n), Decimal(total))
        for cid, n, total in conn.execute(
            "SELECT customer_id, count(*), sum(total) FROM orders.orders"
            " WHERE status <> 'cancelled' GROUP BY customer_id"
        )
    }
    out: dict[str, Expected] = {}
    for cid, email, name, version in conn.execute(
        "SELECT id, email, name, version FROM customers.customers"
    ):
        n, total = counters.get(str(cid), (0, Decimal("0")))
        out[customers.customer(cid)] = Expected(
            "customer",
            "hash",
            {
                "id": str(cid),
                "email": email,
                "name": name,
                "order_count": str(n),
                "lifetime_value": money(total),
                "version": str(version),
            },
        )
    applied_versions: dict[str, dict[str, str]] = {}
    for oid, cid, version in conn.execute("SELECT id, customer_id, version FROM orders.orders"):
        applied_versions.setdefault(str(cid), {})[str(oid)] = str(version)
    for cid, content in applied_versions.items():
        out[customers.customer_order_state(cid)] = Expected(
            "customer-orders-applied", "hash", content
        )
    return out


CONTRACT = ViewContract(
    name="customers",
    layout=CustomerKeys,
    description="one hash per customer with their order counters",
    keys=(
        KeySpec(
            "customer",
            "hash",
            lambda v: v.customer("<id>"),
            "id",
            "id, email, name, order_count, lifetime_value, version",
            view=True,
        ),
        KeySpec(
            "customer-orders-applied",
            "hash",
            lambda v: v.customer_order_state("<id>"),
            "customer id",
            "order id -> order version counted",
        ),
    ),
    model=CustomerView,
    view_key=lambda views, key: views.customer(uuid_key(key)),
    key_help="customer id (UUID)",
    applied=applied,
    expect=expect,
    aggregate_types=frozenset({"customer", "order"}),
)
