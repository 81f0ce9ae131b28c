"""Contract of the `products` views: the product hash, the catalog indexes and their
bookkeeping (handlers: `projector.products`).

View `product:{id}`: id, sku, name, price, stock, units_sold, revenue, version. Indexes:
by name and by price are lexicographic sorted sets (all scores 0, members
`<casefolded name>\\x00<name>\\x00<id>` and `<cents, zero-padded>\\x00<id>`), so pages
continue after an opaque cursor even while products are added; top products is scored by
units_sold. Each index shares a hash tag with a hash of the product version it last
reflects per product (`*-versions`), so an index write can refuse to go back.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any
from uuid import UUID

from cqrs.contracts import Expected, KeySpec, ViewContract, ViewModel, cents, money, uuid_key
from cqrs.events import Money
from cqrs.keys import ViewKeys


class ProductKeys(ViewKeys):
    """The `products` views' key layout: the product hash, its index bookkeeping and
    the catalog indexes."""

    def product(self, product_id: UUID | str) -> str:
        return f"{self.prefix}:product:{{{product_id}}}"

    def product_names(self, product_id: UUID | str) -> str:
        """Names of a product that may still be in the by-name index (crash-safe cleanup)."""
        return f"{self.prefix}:product-names:{{{product_id}}}"

    def product_prices(self, product_id: UUID | str) -> str:
        return f"{self.prefix}:product-prices:{{{product_id}}}"

    # The catalog indexes. Each shares a hash tag with a hash of the product version it
    # last reflects per product (`*_versions`), so an index write can refuse to go back
    # to an older version in one script call (a worker that stalled past its lease).
    def products_by_name(self) -> str:
        return f"{self.prefix}:products:by-name:{{{self.prefix}:by-name}}"

    def products_by_name_versions(self) -> str:
        return f"{self.prefix}:products:by-name-versions:{{{self.prefix}:by-name}}"

    def products_by_price(self) -> str:
        return f"{self.prefix}:products:by-price:{{{self.prefix}:by-price}}"

    def products_by_price_versions(self) -> str:
        return f"{self.prefix}:products:by-price-versions:{{{self.prefix}:by-price}}"

    def top_products(self) -> str:
        return f"{self.prefix}:products:top:{{{self.prefix}:top}}"

    def top_products_versions(self) -> str:
        return f"{self.prefix}:products:top-versions:{{{self.prefix}:top}}"


NAME_SEPARATOR = "\x00"


class ProductView(ViewModel):
    id: UUID
    sku: str
    name: str
    price: Money
    stock: int
    units_sold: int
    revenue: Money
    version: int


def name_member(name: str, product_id: UUID | str) -> str:
    return f"{name.casefold()}{NAME_SEPARATOR}{name}{NAME_SEPARATOR}{product_id}"


def price_member(price: str, product_id: UUID | str) -> str:
    return f"{cents(price):015d}{NAME_SEPARATOR}{product_id}"


def member_id(member: str) -> str:
    """The product id at the end of an index member."""
    return member.rsplit(NAME_SEPARATOR, 1)[-1]


# Which events recompute which index (each index's version record keeps, per product, the
# version of the last such event applied: the expectation below derives it from the event
# log with these same sets), and the one event that may create a view.
REINDEX_NAME = frozenset({"ProductCreated", "ProductRenamed"})
REINDEX_PRICE = frozenset({"ProductCreated", "ProductRepriced"})
REINDEX_TOP = frozenset({"ProductCreated", "StockReserved", "StockReleased"})
CREATES = "ProductCreated"


def applied(views: ProductKeys, aggregate_type: str, aggregate_id: UUID, _partition: UUID) -> Any:
    """Read-your-writes: a product's view records the last product version applied."""
    return (views.product(aggregate_id), "version") if aggregate_type == "product" else None


def _index_versions(conn: Any) -> dict[str, dict[str, str]]:
    """Per catalog index, {product id: version of the last event that recomputed it}."""
    wanted = {"name": REINDEX_NAME, "price": REINDEX_PRICE, "top": REINDEX_TOP}
    versions: dict[str, dict[str, str]] = {index: {} for index in wanted}
    types = sorted(set().union(*wanted.values()))
    for pid, event_type, version in conn.execute(
        "SELECT aggregate_id, event_type, max(aggregate_version) FROM events.event_log"
        " WHERE aggregate_type = 'product' AND event_type = ANY(%s)"
        " GROUP BY aggregate_id, event_type",
        (types,),
    ):
        for index, event_types in wanted.items():
            if event_type in event_types:
                held = versions[index].get(str(pid))
                if held is None or int(held) < version:
                    versions[index][str(pid)] = str(version)
    return versions


def expect(conn: Any, products: ProductKeys) -> dict[str, Expected]:
    """Every product view, the indexes and their bookkeeping, from the catalog and the
    non-cancelled order lines (units sold, revenue) and the event log (index versions)."""
    sales = {
        str(pid): (int(qty), Decimal(total))
        for pid, qty, total in conn.execute(
            "SELECT l.product_id, sum(l.qty), sum(l.line_total) FROM orders.order_lines l"
            " JOIN orders.orders o ON o.id = l.order_id WHERE o.status <> 'cancelled'"
            " GROUP BY l.product_id"
        )
    }
    prods: dict[str, dict[str, str]] = {}
    for pid, sku, name, price, stock, version in conn.execute(
        "SELECT id, sku, name, price, stock, version FROM catalog.products"
    ):
        sold, revenue = sales.get(str(pid), (0, Decimal("0")))
        prods[str(pid)] = {
            "id": str(pid),
            "sku": sku,
            "name": name,
            "price": money(price),
            "stock": str(stock),
            "units_sold": str(sold),
            "revenue": money(revenue),
            "version": str(version),
        }
    out: dict[str, Expected] = {}
    for pid, view in prods.items():
        out[products.product(pid)] = Expected("product", "hash", view)
        # The values that may still be in an index: once converged, only the current one.
        out[products.product_names(pid)] = Expected("product-names", "set", {view["name"]})
        out[products.product_prices(pid)] = Expected("product-prices", "set", {view["price"]})
    for label, key, content in (
        ("products-by-name", products.products_by_name(),
         {name_member(p["name"], p["id"]): 0.0 for p in prods.values()}),
        ("products-by-price", products.products_by_price(),
         {price_member(p["price"], p["id"]): 0.0 for p in prods.values()}),
        ("top-products", products.top_products(),
         {p["id"]: float(p["units_sold"]) for p in prods.values()}),
    ):  # fmt: skip
        out[key] = Expected(label, "zset", content)
    index_versions = _index_versions(conn)
    for label, key, index in (
        ("products-by-name-versions", products.products_by_name_versions(), "name"),
        ("products-by-price-versions", products.products_by_price_versions(), "price"),
        ("top-products-versions", products.top_products_versions(), "top"),
    ):
        out[key] = Expected(label, "hash", index_versions[index])
    return out


_ID = "<id>"
CONTRACT = ViewContract(
    name="products",
    layout=ProductKeys,
    description="one hash per product plus the catalog indexes (by name, by price, top sellers)",
    keys=(
        KeySpec(
            "product",
            "hash",
            lambda v: v.product(_ID),
            "id",
            "id, sku, name, price, stock, units_sold, revenue, version",
            view=True,
        ),
        KeySpec(
            "product-names",
            "set",
            lambda v: v.product_names(_ID),
            "id",
            "names that may be in the by-name index",
        ),
        KeySpec(
            "product-prices",
            "set",
            lambda v: v.product_prices(_ID),
            "id",
            "prices that may be in the by-price index",
        ),
        KeySpec(
            "products:by-name",
            "zset (lex)",
            ProductKeys.products_by_name,
            "the index",
            "`casefold(name) \\0 name \\0 id`",
        ),
        KeySpec(
            "products:by-name-versions",
            "hash",
            ProductKeys.products_by_name_versions,
            "the index",
            "id -> version of the event the index entry is from",
        ),
        KeySpec(
            "products:by-price",
            "zset (lex)",
            ProductKeys.products_by_price,
            "the index",
            "`cents (15 digits) \\0 id`",
        ),
        KeySpec(
            "products:by-price-versions",
            "hash",
            ProductKeys.products_by_price_versions,
            "the index",
            "id -> version, as for by-name",
        ),
        KeySpec(
            "products:top", "zset", ProductKeys.top_products, "the index", "id scored by units_sold"
        ),
        KeySpec(
            "products:top-versions",
            "hash",
            ProductKeys.top_products_versions,
            "the index",
            "id -> version, as for by-name",
        ),
    ),
    model=ProductView,
    view_key=lambda views, key: views.product(uuid_key(key)),
    key_help="product id (UUID)",
    applied=applied,
    expect=expect,
    aggregate_types=frozenset({"product"}),
)
