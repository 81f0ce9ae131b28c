"""What the `sales-by-day` views are: keys, read model, read-your-writes rule and the
expectation `cqrs verify` checks against PostgreSQL.

Keys (in generation `<g>` of `<ns>:sales-by-day`):
- `day:{<date>}` hash, the view: date, order_count, revenue (of the day's non-cancelled
  orders, the day being the UTC calendar day the order was placed on);
- `day-orders:{<date>}` hash, in the view's hash tag: order id -> the order's last version
  counted on the day. It makes the counters exactly-once: one script checks and advances
  it together with the counters (the customers projection's per-order record, per day);
- `order:{<order id>}` hash: day (where the order was counted, because a cancellation
  does not say when its order was placed), version (the order's last event seen here:
  its gate), applied (the last version whose effect on the day is done: read-your-writes
  waits on it, so a reader never sees the mark before the counters).
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


def order_key(views: ViewKeys, order_id: UUID | str) -> str:
    return views.tagged("order", order_id)


def applied(views: ViewKeys, aggregate_type: str, aggregate_id: UUID, _partition: UUID) -> Any:
    """An order's write is reflected once its record's `applied` reaches its version."""
    return (order_key(views, aggregate_id), "applied") if aggregate_type == "order" else None


def expect(conn: Any, views: ViewKeys) -> dict[str, Expected]:
    """Every day with an order placed on it (a day whose orders were all cancelled keeps
    its view, at zero), the per-day order records and the per-order records."""
    out: dict[str, Expected] = {}
    days: dict[str, list[int | Decimal]] = {}
    records: dict[str, dict[str, str]] = {}
    for oid, status, total, placed_at, version in conn.execute(
        "SELECT id, status, total, placed_at, version FROM orders.orders"
    ):
        day = day_of(placed_at)
        totals = days.setdefault(day, [0, Decimal("0")])
        if status != "cancelled":
            totals[0] += 1
            totals[1] += total
        records.setdefault(day, {})[str(oid)] = str(version)
        out[order_key(views, oid)] = Expected(
            "order", "hash", {"day": day, "version": str(version), "applied": str(version)}
        )
    for day, (count, revenue) in days.items():
        out[day_key(views, day)] = Expected(
            "day", "hash", {"date": day, "order_count": str(count), "revenue": money(revenue)}
        )
        out[day_orders_key(views, day)] = Expected("day-orders", "hash", records[day])
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
            "order",
            "hash",
            lambda v: order_key(v, "<id>"),
            "id",
            "day, version (gate), applied (read-your-writes mark)",
        ),
    ),
    model=SalesByDayView,
    view_key=lambda views, key: day_key(views, parse_day(key)),
    key_help="UTC day (YYYY-MM-DD)",
    present_field="date",
    applied=applied,
    expect=expect,
    aggregate_types=frozenset({"order"}),
)
