"""`cqrs query ...`: the views for people (rich tables) and scripts (`--json`).

Unknown id: exit 1 and "not found", with no fallback anywhere else. `--after TOKEN`
waits (up to `--timeout` seconds) until the views reflect the write that printed TOKEN.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.table import Table

from cqrs.cli import load_settings, metrics_port_option, start_metrics_or_fail
from cqrs.console import EXIT_USAGE, fail, out, print_json
from cqrs.tokens import TokenError
from cqrs.wiring import Wiring
from queries.errors import BadCursor, BadView, NotCaughtUp, NotFound
from queries.models import CustomerView, OrderView, Page, ProductView
from queries.service import QueryService

query_app = typer.Typer(help="Read the views (never PostgreSQL).", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON on stdout.")
AFTER = typer.Option(None, "--after", help="Wait until the views reflect this write token.")
TIMEOUT = typer.Option(5.0, "--timeout", min=0.0, help="Seconds to wait for --after.")


@contextmanager
def service(after: str | None, timeout: float) -> Iterator[QueryService]:
    settings = load_settings()
    wiring = Wiring(settings)
    try:
        svc = QueryService(wiring.redis, wiring.keys, partitions=settings.partitions)
        if after:
            svc.wait_for(after, timeout=timeout)
        yield svc
    except TokenError as exc:
        fail(str(exc), EXIT_USAGE)
    except BadCursor as exc:
        fail(str(exc), EXIT_USAGE)
    except (NotFound, NotCaughtUp, BadView) as exc:
        fail(str(exc))
    finally:
        wiring.close()


def _emit(data: Any, json_output: bool, render: Callable[[Any], None]) -> None:
    if json_output:
        if isinstance(data, list):
            print_json([item.model_dump(mode="json") for item in data])
        else:
            print_json(data.model_dump(mode="json"))
    else:
        render(data)


def _product_table(products: list[ProductView], title: str) -> Table:
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


def render_order(order: OrderView) -> None:
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


def render_customer(c: CustomerView) -> None:
    table = Table(title=f"customer {c.id}")
    for col in ("email", "name", "order_count", "lifetime_value"):
        table.add_column(col)
    table.add_row(c.email, c.name, str(c.order_count), f"{c.lifetime_value:.2f}")
    out.print(table)


def _orders_table(orders: list[OrderView], title: str) -> Table:
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
    with service(after, timeout) as svc:
        product = svc.get_product(product_id)
    _emit(product, json_output, lambda p: out.print(_product_table([p], f"product {p.id}")))


@query_app.command("products")
def query_products(
    sort: str = typer.Option("name", "--sort", help="name or price"),
    limit: int = typer.Option(20, "--limit", min=1, max=500),
    cursor: str = typer.Option(None, "--cursor", help="From a previous page."),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """The catalog, sorted by name or price, a page at a time."""
    if sort not in ("name", "price"):
        fail(f"invalid --sort {sort!r}: use name or price", EXIT_USAGE)
    with service(after, timeout) as svc:
        page = svc.list_products(sort=sort, limit=limit, cursor=cursor)
    if json_output:
        print_json(page.model_dump(mode="json"))
    else:
        _render_page(page, _product_table(page.items, f"products by {sort}"))


@query_app.command("customer")
def query_customer(
    customer_id: str = typer.Argument(..., metavar="ID"),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One customer with order count and lifetime value."""
    with service(after, timeout) as svc:
        customer = svc.get_customer(customer_id)
    _emit(customer, json_output, render_customer)


@query_app.command("order")
def query_order(
    order_id: str = typer.Argument(..., metavar="ID"),
    json_output: bool = JSON,
    after: str = AFTER,
    timeout: float = TIMEOUT,
) -> None:
    """One order, denormalized: customer name, lines as placed, status."""
    with service(after, timeout) as svc:
        order = svc.get_order(order_id)
    _emit(order, json_output, render_order)


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
    with service(after, timeout) as svc:
        page = svc.customer_orders(customer_id, limit=limit, cursor=cursor)
    if json_output:
        print_json(page.model_dump(mode="json"))
    else:
        _render_page(page, _orders_table(page.items, f"orders of {customer_id}"))


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
    _emit(products, json_output, lambda ps: out.print(_product_table(ps, "top products")))


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
    from queries.http import serve  # FastAPI/uvicorn load only for this command

    metrics = start_metrics_or_fail(settings, metrics_port)
    wiring = Wiring(settings)
    try:
        if metrics is not None:
            svc = QueryService(wiring.redis, wiring.keys, partitions=settings.partitions)
            metrics.add_gauges(lambda: query_gauges(svc))
        serve(settings, host=host, port=port, own_logging=False)
    finally:
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
