"""What the `sales-by-day` views are: keys, read model, read-your-writes rule and the
expectation `cqrs verify` checks against PostgreSQL.

Keys (in generation `<g>` of `<ns>:sales-by-day`):
- `day:{<date>}` hash, the view: date, order_count, revenue (of the day's non-cancelled
  orders, the day being the UTC calendar day the order was placed on);
- `day-orders:{<date>}` hash, in the view's hash tag: order id -> the order's last version
  counted on the day. It makes the counters exactly-once: one script checks and advances
  it together with the counters (the customers projection's per-order record, per day);
- `customer:{<customer id>}` hash, tagged by the customer, whose partition carries both
  the customer's and their orders' events: `version` (the registration seen here: an
  order of a customer never registered is a gap, as in the built-in projections), and
  per order `<order id>` (the order's last event seen here: its gate), `<order id>:day`
  (where it was counted, because a cancellation does not say when its order was placed)
  and `<order id>:applied` (the last version whose effect on the day is done:
  read-your-writes waits on it, so a reader never sees the mark before the counters).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from uuid import UUID

from cqrs.contracts import Expected, KeySpec, ViewContract, ViewModel, money
from cqrs.events import Money
from cqrs.keys import ViewKeys

NAME = "sales-by-day"


class SalesByDayView(ViewModel):
    date: dt.date
    order_count: int
    revenue: Money


def day_of(moment: dt.datetime) -> str:
    """The UTC calendar day of a moment, as the key carries it (YYYY-MM-DD)."""
    return moment.astimezone(dt.UTC).date().isoformat()


def parse_day(text: str) -> str:
    """A day typed by a reader (YYYY-MM-DD); ValueError otherwise. Only a date that
    parsed reaches a key, so no input can name another key."""
    if len(text) != 10:
        raise ValueError(f"not a date (YYYY-MM-DD): {text!r}")
    return dt.date.fromisoformat(text).isoformat()


def day_key(views: ViewKeys, day: str) -> str:
    return views.tagged("day", day)


def day_orders_key(views: ViewKeys, day: str) -> str:
    return views.tagged("day-orders", day)


def customer_key(views: ViewKeys, customer_id: UUID | str) -> str:
    return views.tagged("customer", customer_id)


def day_field(order_id: UUID | str) -> str:
    return f"{order_id}:day"


def applied_field(order_id: UUID | str) -> str:
    return f"{order_id}:applied"


def applied(views: ViewKeys, aggregate_type: str, aggregate_id: UUID, partition: UUID) -> Any:
    """An order's write is reflected once its `applied` mark, in its customer's record
    (an order's partition key is its customer's id), reaches its version."""
    if aggregate_type != "order":
        return None
    return customer_key(views, partition), applied_field(aggregate_id)


def expect(conn: Any, views: ViewKeys) -> dict[str, Expected]:
    """Every day with an order placed on it (a day whose orders were all cancelled keeps
    its view, at zero), the per-day order records, and each registered customer's record
    with every order of theirs."""
    out: dict[str, Expected] = {}
    customers: dict[str, dict[str, str]] = {
        str(cid): {"version": "1"} for (cid,) in conn.execute("SELECT id FROM customers.customers")
    }
    days: dict[str, list[Any]] = {}
    records: dict[str, dict[str, str]] = {}
    for oid, cid, status, total, placed_at, version in conn.execute(
        "SELECT id, customer_id, status, total, placed_at, version FROM orders.orders"
    ):
        day = day_of(placed_at)
        totals = days.setdefault(day, [0, Decimal("0")])
        if status != "cancelled":
            totals[0] += 1
            totals[1] += total
        records.setdefault(day, {})[str(oid)] = str(version)
        customers.setdefault(str(cid), {}).update(
            {str(oid): str(version), day_field(oid): day, applied_field(oid): str(version)}
        )
    for day, (count, revenue) in days.items():
        out[day_key(views, day)] = Expected(
            "day", "hash", {"date": day, "order_count": str(count), "revenue": money(revenue)}
        )
        out[day_orders_key(views, day)] = Expected("day-orders", "hash", records[day])
    for cid, content in customers.items():
        out[customer_key(views, cid)] = Expected("customer", "hash", content)
    return out


CONTRACT = ViewContract(
    name=NAME,
    description="per UTC day of placement: count and revenue of the non-cancelled orders",
    keys=(
        KeySpec(
            "day",
            "hash",
            lambda v: day_key(v, "<date>"),
            "date",
            "date, order_count, revenue",
            view=True,
        ),
        KeySpec(
            "day-orders",
            "hash",
            lambda v: day_orders_key(v, "<date>"),
            "date",
            "order id -> order version counted on the day",
        ),
        KeySpec(
            "customer",
            "hash",
            lambda v: customer_key(v, "<customer>"),
            "customer id",
            "version (registration seen); per order: `<order id>` (gate), `<order id>:day`,"
            " `<order id>:applied` (read-your-writes mark)",
        ),
    ),
    model=SalesByDayView,
    view_key=lambda views, key: day_key(views, parse_day(key)),
    key_help="UTC day (YYYY-MM-DD)",
    present_field="date",
    applied=applied,
    expect=expect,
    aggregate_types=frozenset({"customer", "order"}),
)
