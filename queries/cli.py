"""`cqrs query ...`: the views for people (rich tables) and scripts (`--json`).

Unknown id: exit 1 and "not found", with no fallback anywhere else; an id that is not a
UUID, a bad cursor or token: exit 2, as in the write commands. `--after TOKEN` waits (up
to `--timeout` seconds) until the views reflect the write that printed TOKEN. With
`--json`, one view is one object and every list is `{"items": [...], "next_cursor": ...}`,
the same shapes as the HTTP API.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any
from uuid import UUID

import typer
from pydantic import TypeAdapter, ValidationError
from rich.table import Table

from cqrs.cli import load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.contracts import ContractError, registered_contracts
from cqrs.queries.errors import BadCursor, BadView, Busy, NotCaughtUp, NotFound
from cqrs.queries.models import Page
from cqrs.queries.service import QueryService
from cqrs.tokens import TokenError
from cqrs.wiring import Wiring

query_app = typer.Typer(help="Read the views (never PostgreSQL).", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON on stdout.")
AFTER = typer.Option(None, "--after", help="Wait until the views reflect this write token.")
TIMEOUT = typer.Option(5.0, "--timeout", min=0.0, help="Seconds to wait for --after.")

_UUID = TypeAdapter(UUID)


class ProductSort(StrEnum):
    """The product indexes a page can follow (click offers and checks the choices)."""

    name = "name"
    price = "price"


def parse_id(value: str, field: str) -> UUID:
    """An id argument, checked before anything connects: not a UUID is a usage error
    (exit 2, the write commands' wording), not a "not found"."""
    try:
        return _UUID.validate_python(value)
    except ValidationError as exc:
        fail(f"invalid {field}: {exc.errors()[0]['msg']}", EXIT_USAGE)


@contextmanager
def service(after: str | None, timeout: float) -> Iterator[QueryService]:
    settings = load_settings()
    wiring = Wiring(settings)
    try:
        svc = QueryService(
            wiring.redis, wiring.keys, partitions=settings.partitions, replicas=wiring.replicas
        )
        if after:
            # With reads from replicas, the reader that reads where the check did.
            svc = svc.wait_for(after, timeout=timeout)
        yield svc
    except TokenError as exc:
        fail(str(exc), EXIT_USAGE)
    except BadCursor as exc:
        fail(str(exc), EXIT_USAGE)
    except (NotFound, NotCaughtUp, BadView, Busy) as exc:
        fail(str(exc))
    finally:
        wiring.close()


def _emit_page(page: Page[Any], json_output: bool, table: Table) -> None:
    if json_output:
        print_json(page.model_dump(mode="json"))
    else:
        _render_page(page, table)


def product_table(products: list[Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "sku", "name", "price", "stock", "units_sold", "revenue"):
        table.add_column(
            col, justify="right" if col in {"price", "stock", "units_sold", "revenue"} else "left"
        )
    for p in products:
        table.add_row(
            str(p.id),
            p.sku,
            p.name,
            f"{p.price:.2f}",
            str(p.stock),
            str(p.units_sold),
            f"{p.revenue:.2f}",
        )
    return table


def _render_page(page: Page[Any], table: Table) -> None:
    out.print(table)
    if page.next_cursor:
        out.print(f"next page: --cursor {page.next_cursor}")


def render_order(order: Any) -> None:
    out.print(
        f"order {order.id}  [bold]{order.status}[/bold]  customer {order.customer_name} "
        f"({order.customer_id})  placed {order.placed_at:%Y-%m-%d %H:%M:%S}"
    )
    table = Table()
    for col in ("product", "name", "unit_price", "qty", "line_total"):
        table.add_column(col)
    for line in order.lines:
        table.add_row(
            str(line.product_id),
            line.name,
            f"{line.unit_price:.2f}",
            str(line.qty),
            f"{line.line_total:.2f}",
        )
    out.print(table)
    out.print(f"total {order.total:.2f}")


def render_customer(c: Any) -> None:
    table = Table(title=f"customer {c.id}")
    for col in ("email", "name", "order_count", "lifetime_value"):
        table.add_column(col)
    table.add_row(c.email, c.name, str(c.order_count), f"{c.lifetime_value:.2f}")
    out.print(table)


def orders_table(orders: list[Any], title: str) -> Table:
    table = Table(title=title)
    for col in ("id", "status", "placed_at", "lines", "total", "customer_name"):
        table.add_column(col)
    for o in orders:
        table.add_row(
            str(o.id),
            o.status,
            f"{o.placed_at:%Y-%m-%d %H:%M:%S}",
            str(len(o.lines)),
            f"{o.total:.2f}",
            o.customer_name,
        )
    return table


@query_app.command("product")
def query_product(
    product_id: str = typer.Argument(..., metavar="ID"),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One product."""
    pid = parse_id(product_id, "product_id")
    with service(after, timeout) as svc:
        product = svc.get_product(pid)
    if json_output:
        print_json(product.model_dump(mode="json"))
    else:
        out.print(product_table([product], f"product {product.id}"))


@query_app.command("products")
def query_products(
    sort: ProductSort = typer.Option(ProductSort.name, "--sort", help="Order of the pages."),
    limit: int = typer.Option(20, "--limit", min=1, max=500),
    cursor: str = typer.Option(None, "--cursor", help="From a previous page of the same --sort."),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """The catalog, sorted by name or price, a page at a time."""
    with service(after, timeout) as svc:
        page = svc.list_products(sort=sort.value, limit=limit, cursor=cursor)
    _emit_page(page, json_output, product_table(page.items, f"products by {sort.value}"))


@query_app.command("customer")
def query_customer(
    customer_id: str = typer.Argument(..., metavar="ID"),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One customer with order count and lifetime value."""
    cid = parse_id(customer_id, "customer_id")
    with service(after, timeout) as svc:
        customer = svc.get_customer(cid)
    if json_output:
        print_json(customer.model_dump(mode="json"))
    else:
        render_customer(customer)


@query_app.command("order")
def query_order(
    order_id: str = typer.Argument(..., metavar="ID"),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One order, denormalized: customer name, lines as placed, status."""
    oid = parse_id(order_id, "order_id")
    with service(after, timeout) as svc:
        order = svc.get_order(oid)
    if json_output:
        print_json(order.model_dump(mode="json"))
    else:
        render_order(order)


@query_app.command("customer-orders")
def query_customer_orders(
    customer_id: str = typer.Argument(..., metavar="ID"),
    limit: int = typer.Option(20, "--limit", min=1, max=500),
    cursor: str = typer.Option(None, "--cursor", help="From a previous page."),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """A customer's orders, newest first."""
    cid = parse_id(customer_id, "customer_id")
    with service(after, timeout) as svc:
        page = svc.customer_orders(cid, limit=limit, cursor=cursor)
    _emit_page(page, json_output, orders_table(page.items, f"orders of {cid}"))


@query_app.command("top-products")
def query_top_products(
    limit: int = typer.Option(10, "--limit", min=1, max=500),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """Best sellers by units sold (cancelled orders do not count)."""
    with service(after, timeout) as svc:
        products = svc.top_products(limit=limit)
    # One page, never a cursor: the same list shape as every other list.
    page = Page[Any](items=products, next_cursor=None)
    _emit_page(page, json_output, product_table(products, "top products"))


@query_app.command("view")
def query_view(
    name: str = typer.Argument(..., metavar="NAME", help="A registered projection."),
    key: str = typer.Argument(
        ..., metavar="KEY", help="A view's id, as its contract reads it (see --help)."
    ),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One view of any registered projection, plugins included, read by its contract.

    NAME is a projection as `cqrs status` lists it; KEY is what its contract reads as a
    view's id: a UUID for products, customers and orders, a UTC day (YYYY-MM-DD) for
    sales-by-day. An unknown NAME or a malformed KEY: exit 2; no such view: exit 1."""
    try:
        contracts = registered_contracts()
    except ContractError as exc:
        fail(str(exc))
    contract = contracts.get(name)
    if contract is None:
        fail(f"unknown view {name!r} (registered: {', '.join(contracts)})", EXIT_USAGE)
    assert contract.view_key is not None  # a contract without one is refused when built
    try:
        contract.view_key(contract.layout("-", name, 1), key)  # checked before anything connects
    except ValueError:
        fail(f"invalid {name} key {key!r}: expected a {contract.key_help}", EXIT_USAGE)
    with service(after, timeout) as svc:
        view = svc.get_view(name, key)
    fields = view.model_dump(mode="json")
    if json_output:
        print_json(fields)
        return
    table = Table(title=f"{name} {key}")
    table.add_column("field")
    table.add_column("value")
    for field, value in fields.items():
        table.add_row(field, "" if value is None else str(value))
    out.print(table)


def serve_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    metrics_port: int = metrics_port_option(),
) -> None:
    """Serve the HTTP query API (read only, Redis only) with uvicorn."""
    import logging

    from cqrs.logs import configure_logging

    configure_logging(logging.INFO)
    settings = load_settings()
    from cqrs.queries.http import bind_listener, serve  # FastAPI/uvicorn load only for this command

    try:
        sock = bind_listener(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    metrics = start_metrics_or_fail(settings, metrics_port)
    wiring = Wiring(settings)
    try:
        if metrics is not None:
            svc = QueryService(wiring.redis, wiring.keys, partitions=settings.partitions)
            metrics.add_gauges(lambda: query_gauges(svc))
        serve(settings, host=host, port=port, own_logging=False, sock=sock)
    finally:
        sock.close()
        wiring.close()


def query_gauges(svc: QueryService) -> list[Any]:
    """Lag and pending per projection and dead letters, at scrape time (Redis only)."""
    from cqrs.metrics import Gauge

    gauges: list[Any] = []
    lags = svc.lag()
    pipe = svc.redis.pipeline(transaction=False)
    for name in lags:
        pipe.xlen(svc.keys.dead_letters(name))
    for (name, numbers), dead in zip(lags.items(), pipe.execute(), strict=True):
        labels = {"projection": name}
        gauges += [
            Gauge("cqrs_projection_lag", "Entries not yet delivered", numbers["lag"], labels),
            Gauge("cqrs_projection_pending", "Not acknowledged", numbers["pending"], labels),
            Gauge("cqrs_dead_letter_entries", "Entries in dead letters", dead, labels),
        ]
    return gauges


def register(app: typer.Typer) -> None:
    app.add_typer(query_app, name="query")
    app.command("serve")(serve_command)
