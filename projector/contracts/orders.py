"""Contract of the `orders` views (handlers: `projector.orders`).

View `order:{id}`: id, customer_id, customer_name (the customer's *current* name),
customer_version (the customer version that name is from), status, line_count, then per
line n (1-based) `line:<n>:product_id`, `line:<n>:name`, `line:<n>:unit_price`,
`line:<n>:qty`, `line:<n>:line_total` (name and price as at order time); total,
placed_at, shipped_at, cancelled_at, version. One field per line attribute keeps every
value short, so Redis keeps the hash in its compact listpack encoding (docs/keys.md).

Index `customer-orders:{customer}`: the customer's orders as a lexicographic sorted set
(score 0, member `<placed_at ms, zero-padded>:<order id>`), newest first by cursor. The
projection's own copy of each customer's name, `customer-name:{customer}` (name, version),
feeds the rename fan-out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from cqrs.contracts import Expected, KeySpec, ViewContract, ViewModel, iso, money, uuid_key
from cqrs.events import Money
from cqrs.keys import ViewKeys


class OrderKeys(ViewKeys):
    """The `orders` views' key layout: the order hash, a customer's order list, and the
    orders projection's copy of a customer's name."""

    def order(self, order_id: UUID | str) -> str:
        return f"{self.prefix}:order:{{{order_id}}}"

    def customer_orders(self, customer_id: UUID | str) -> str:
        return f"{self.prefix}:customer-orders:{{{customer_id}}}"

    def order_customer(self, customer_id: UUID | str) -> str:
        """The orders projection's own copy of a customer's name, for fan-out on rename."""
        return f"{self.prefix}:customer-name:{{{customer_id}}}"


LINE_ATTRIBUTES = ("product_id", "name", "unit_price", "qty", "line_total")
# More lines than any order can have (commands accept 100) means a corrupted count: it is
# reported rather than turned into that many lookups.
MAX_LINES = 10_000


class OrderLineView(ViewModel):
    product_id: UUID
    name: str
    unit_price: Money
    qty: int
    line_total: Money


class OrderView(ViewModel):
    id: UUID
    customer_id: UUID
    customer_name: str
    status: str
    lines: list[OrderLineView]
    total: Money
    placed_at: datetime
    shipped_at: datetime | None = None
    cancelled_at: datetime | None = None
    version: int


def line_field(n: int, attribute: str) -> str:
    """The view field of attribute `attribute` of line `n` (1-based)."""
    return f"line:{n}:{attribute}"


# Per line number (1-based; 0 unused), its fields in LINE_ATTRIBUTES order, formatted once.
_LINE_NAMES = [tuple(line_field(n, a) for a in LINE_ATTRIBUTES) for n in range(101)]


def line_fields(n: int) -> tuple[str, ...]:
    """The view fields of line `n` (1-based), in LINE_ATTRIBUTES order."""
    if n < len(_LINE_NAMES):
        return _LINE_NAMES[n]
    return tuple(line_field(n, a) for a in LINE_ATTRIBUTES)


def order_member(placed_at: datetime, order_id: UUID | str) -> str:
    return f"{int(placed_at.timestamp() * 1000):015d}:{order_id}"


def order_member_id(member: str) -> str:
    return member.rsplit(":", 1)[-1]


def _line_fields(count: int) -> list[tuple[tuple[str, str], ...]]:
    """Per line number, (attribute, view field) pairs: formatted once, not per read."""
    return [tuple((a, line_field(n, a)) for a in LINE_ATTRIBUTES) for n in range(count)]


_LINE_FIELDS = _line_fields(101)


def read_order(data: dict[str, str], _key: str) -> OrderView:
    """The read model: the line fields gathered into `lines`."""
    try:
        count = int(data.get("line_count") or 0)
    except ValueError:
        raise ValueError(f"line_count: {data['line_count']!r}") from None
    if not 0 <= count <= MAX_LINES:
        raise ValueError(f"line_count: {count}")
    get = data.get
    fields = _LINE_FIELDS if count < len(_LINE_FIELDS) else _line_fields(count + 1)
    lines = [{a: get(f) for a, f in fields[n]} for n in range(1, count + 1)]
    return OrderView.model_validate({**data, "lines": lines})


def applied(views: OrderKeys, aggregate_type: str, aggregate_id: UUID, _partition: UUID) -> Any:
    """An order's version on its view; a customer's version on this projection's copy of
    the customer's name (a rename reached the orders once that copy has it)."""
    if aggregate_type == "order":
        return views.order(aggregate_id), "version"
    if aggregate_type == "customer":
        return views.order_customer(aggregate_id), "version"
    return None


def expect(conn: Any, orders: OrderKeys) -> dict[str, Expected]:
    """Each order with its customer's current name, the per-customer index and the
    projection's copy of every customer's name and version."""
    out: dict[str, Expected] = {}
    names: dict[str, tuple[str, str]] = {}
    for cid, name, version in conn.execute("SELECT id, name, version FROM customers.customers"):
        names[str(cid)] = (name, str(version))
        out[orders.order_customer(cid)] = Expected(
            "customer-name", "hash", {"name": name, "version": str(version)}
        )
    lines: dict[str, dict[str, str]] = {}
    for oid, pid, name, unit_price, qty, line_total in conn.execute(
        "SELECT order_id, product_id, name, unit_price, qty, line_total FROM orders.order_lines"
        " ORDER BY order_id, line_no"
    ):
        fields = lines.setdefault(str(oid), {})
        n = len(fields) // len(LINE_ATTRIBUTES) + 1
        values = (str(pid), name, money(unit_price), str(qty), money(line_total))
        fields.update({line_field(n, a): v for a, v in zip(LINE_ATTRIBUTES, values, strict=True)})
    members: dict[str, dict[str, float]] = {}
    for oid, cid, status, total, placed, shipped, cancelled, version in conn.execute(
        "SELECT id, customer_id, status, total, placed_at, shipped_at, cancelled_at, version"
        " FROM orders.orders"
    ):
        name, name_version = names.get(str(cid), (None, None))
        view = {
            "id": str(oid),
            "customer_id": str(cid),
            "customer_name": name,
            "customer_version": name_version,
            "status": status,
            "line_count": str(len(lines.get(str(oid), {})) // len(LINE_ATTRIBUTES)),
            **lines.get(str(oid), {}),
            "total": money(total),
            "placed_at": iso(placed),
            "version": str(version),
        }
        if shipped:
            view["shipped_at"] = iso(shipped)
        if cancelled:
            view["cancelled_at"] = iso(cancelled)
        out[orders.order(oid)] = Expected("order", "hash", view)
        members.setdefault(str(cid), {})[order_member(placed, oid)] = 0.0
    for cid, content in members.items():
        out[orders.customer_orders(cid)] = Expected("customer-orders", "zset", content)
    return out


CONTRACT = ViewContract(
    name="orders",
    layout=OrderKeys,
    description="one hash per order, denormalized across the three services",
    keys=(
        KeySpec(
            "order",
            "hash",
            lambda v: v.order("<id>"),
            "id",
            "id, customer_id, customer_name, customer_version (the customer version the"
            " name is from), status, line_count, `line:<n>:product_id`, `line:<n>:name`,"
            " `line:<n>:unit_price`, `line:<n>:qty`, `line:<n>:line_total` for n = 1.."
            "line_count, total, placed_at, shipped_at, cancelled_at, version",
            view=True,
        ),
        KeySpec(
            "customer-orders",
            "zset (lex)",
            lambda v: v.customer_orders("<customer>"),
            "customer id",
            "`placed_at ms (15 digits) : order id`",
        ),
        KeySpec(
            "customer-name",
            "hash",
            lambda v: v.order_customer("<customer>"),
            "customer id",
            "name, version (for rename fan-out)",
        ),
    ),
    model=OrderView,
    read=read_order,
    view_key=lambda views, key: views.order(uuid_key(key)),
    key_help="order id (UUID)",
    applied=applied,
    expect=expect,
    aggregate_types=frozenset({"order", "customer"}),
)
