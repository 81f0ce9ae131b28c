"""The `products` projection's handlers: one hash per product plus the catalog indexes
(the layout, encoders and read model are its contract, `projector.contracts.products`).

Index entries are recomputed from the view after every event, so replays and
duplicates converge instead of drifting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from cqrs.events import (
    EventHeader,
    ProductCreated,
    ProductRenamed,
    ProductRepriced,
    ProductRestocked,
    StockReleased,
    StockReserved,
    aggregate_text,
)
from cqrs.projector.contracts.products import (
    CONTRACT,
    CREATES,
    REINDEX_NAME,
    REINDEX_PRICE,
    REINDEX_TOP,
    ProductKeys,
    member_id,  # noqa: F401 (re-exported: the index encoders' old home)
    name_member,
    price_member,
)
from cqrs.projector.projection import Projection, cents
from cqrs.projector.steps import NEED_GATE, Step, apply, command, script


class _Indexes(NamedTuple):
    """The catalog index keys of one generation, each with its version record."""

    by_name: tuple[str, str]
    by_price: tuple[str, str]
    top: tuple[str, str]


# Per generation (key prefix): its index keys are the same for every event.
_INDEXES: dict[tuple[type, str], _Indexes] = {}


def _indexes(views: ProductKeys) -> _Indexes:
    found = _INDEXES.get((type(views), views.prefix))
    if found is None:
        if len(_INDEXES) > 64:  # generations come and go with rebuilds
            _INDEXES.clear()
        found = _INDEXES[(type(views), views.prefix)] = _Indexes(
            (views.products_by_name(), views.products_by_name_versions()),
            (views.products_by_price(), views.products_by_price_versions()),
            (views.top_products(), views.top_products_versions()),
        )
    return found


def _reindex(
    pid: str, version: int, tracked: str, index: tuple[str, str], member: Any
) -> Callable[[list[Any]], list[Step]]:
    def follow(result: list[Any]) -> list[Step]:
        current, *known = result
        if current is None:
            return []
        stale = [v for v in known if v != current]
        args = (pid, version, 0, member(current, pid), *[member(v, pid) for v in stale])
        step = script("index", index, args)
        if stale:
            # Forget stale values only after they left the index (next round), and
            # only if this write was not refused as older than the index.
            step.then = lambda written: [command("SREM", tracked, *stale)] if written else []
        return [step]

    return follow


def _steps(event: EventHeader, views: ProductKeys, ops: list[tuple[str, str, Any]]) -> list[Step]:
    """The gated write of `ops`, then the index upkeep of the fields this event type can
    change: the by-name index (REINDEX_NAME), by-price (REINDEX_PRICE), the units_sold
    score (REINDEX_TOP).

    An index is recomputed from the view only after an event that can change its field;
    the others (a stock change, a sale for the name and price indexes) leave it as it was,
    which keeps the most frequent events (StockReserved) to two commands instead of six.
    Convergence holds: the upkeep is not gated by the event's version, so a redelivered
    event whose first attempt crashed between its write and its index upkeep recomputes
    the index again. It carries the event's version, and the index refuses anything older
    than the event it already reflects: a worker that stalled past its lease between the
    two rounds cannot put back a value another worker has since replaced.

    Only CREATES may write a view that does not exist: any other event for a missing view
    is a gap (its creation is missing), never a partial view. The index upkeep runs only
    after the apply, so a gap leaves no index entry either.

    Only what the event type needs is built (the keys, follow-ups and closures of the
    indexes it leaves alone are not): this runs for every product event.
    """
    kind = event.event_type
    pid = aggregate_text(event)
    key = views.product(pid)
    version = event.version
    needs = () if kind == CREATES else (NEED_GATE,)
    top = kind in REINDEX_TOP
    name, price = kind in REINDEX_NAME, kind in REINDEX_PRICE
    if not (top or name or price):
        return [apply(key, key, "version", version, ops, needs=needs)]

    indexes = _indexes(views)
    trackers = []
    if name:
        trackers.append((views.product_names(pid), "name", indexes.by_name, name_member))
    if price:
        trackers.append((views.product_prices(pid), "price", indexes.by_price, price_member))

    def after_apply(result: list[Any]) -> list[Step]:
        # Only once the event's own write has applied (or had applied before): a step
        # that ran beside it in round 1 would read the value from before the event when
        # the apply has to wait for a predecessor (a GAP retried in the next round), and
        # index that old value under the event's version.
        steps: list[Step] = []
        if top and result[1] is not None:
            steps.append(script("index", indexes.top, (pid, version, int(result[1]), pid)))
        steps += [
            script(
                "track",
                (key, tracked),
                (field,),
                then=_reindex(pid, version, tracked, index, member),
            )
            for tracked, field, index, member in trackers
        ]
        return steps

    returns = ("units_sold",) if top else ()
    return [apply(key, key, "version", version, ops, returns, after_apply, needs=needs)]


def on_created(event: EventHeader, p: ProductCreated, views: ProductKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "id", aggregate_text(event)),
            ("set", "sku", p.sku),
            ("set", "name", p.name),
            ("set", "price", f"{p.price:.2f}"),
            ("set", "stock", p.stock),
            ("set", "units_sold", 0),
            ("set", "revenue", "0.00"),
        ],
    )


def on_renamed(event: EventHeader, p: ProductRenamed, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "name", p.name)])


def on_repriced(event: EventHeader, p: ProductRepriced, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "price", f"{p.price:.2f}")])


def on_restocked(event: EventHeader, p: ProductRestocked, views: ProductKeys) -> list[Step]:
    return _steps(event, views, [("set", "stock", p.stock)])


def on_reserved(event: EventHeader, p: StockReserved, views: ProductKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "stock", p.stock),
            ("incr", "units_sold", p.qty),
            ("money", "revenue", cents(p.unit_price) * p.qty),
        ],
    )


def on_released(event: EventHeader, p: StockReleased, views: ProductKeys) -> list[Step]:
    return _steps(
        event,
        views,
        [
            ("set", "stock", p.stock),
            ("incr", "units_sold", -p.qty),
            ("money", "revenue", -cents(p.unit_price) * p.qty),
        ],
    )


PRODUCTS = Projection(
    name="products",
    # 2: index keys with hash tags and per-product index versions (stale-worker safe).
    version=2,
    contract=CONTRACT,
    handlers={
        "ProductCreated": on_created,
        "ProductRenamed": on_renamed,
        "ProductRepriced": on_repriced,
        "ProductRestocked": on_restocked,
        "StockReserved": on_reserved,
        "StockReleased": on_released,
    },
)
