"""`cqrs demo`: the whole flow on the configured backend (embedded servers by default).

Seeds a small shop through the real command handlers, relays and projects until the
views are current (with a progress bar), then shows the views the way a service or a
dashboard would read them, and finally renames a customer to show the denormalized order
view following. Every run uses fresh ids and SKUs, so it is safe to run again.
"""

from __future__ import annotations

import random
import sys
import uuid
from typing import Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from cqrs.app.drain import drain_all
from cqrs.cli import fail_unreachable, load_settings
from cqrs.commands.catalog import CreateProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.migrations import ensure_schema
from cqrs.commands.orders import PlaceOrder
from cqrs.console import EXIT_USAGE, fail, heading, out
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.queries.cli import orders_table, product_table, render_customer, render_order
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.urls import mask_url
from cqrs.wiring import Wiring

PRODUCT_NAMES = [
    "Espresso Beans",
    "Oolong Tea",
    "French Press",
    "Milk Frother",
    "Ceramic Mug",
    "Travel Tumbler",
    "Burr Grinder",
    "Pour-over Kettle",
    "Paper Filters",
    "Cold Brew Jar",
    "Matcha Whisk",
    "Tea Infuser",
    "Cocoa Powder",
    "Vanilla Syrup",
    "Digital Scale",
    "Glass Carafe",
    "Bamboo Tray",
    "Latte Cups",
    "Descaler",
    "Knock Box",
]
CUSTOMER_NAMES = [
    "Ada Lovelace",
    "Grace Hopper",
    "Alan Turing",
    "Edsger Dijkstra",
    "Barbara Liskov",
]
ORDERS = 30
DEMO_SIZE = f"{len(PRODUCT_NAMES)} products, {len(CUSTOMER_NAMES)} customers, {ORDERS} orders"


def seed(session_factory: sessionmaker, rng: random.Random) -> tuple[list, list, list, int]:
    run_id = uuid.uuid4().hex[:6]
    events = 0
    products = []
    for n, name in enumerate(PRODUCT_NAMES):
        price = f"{rng.randint(150, 6000) / 100:.2f}"
        result = execute(
            CreateProduct(
                sku=f"DEMO-{run_id}-{n:02d}", name=name, price=price, stock=rng.randint(20, 80)
            ),
            session_factory,
        )
        products.append(result.id)
        events += len(result.events)
    customers = []
    for name in CUSTOMER_NAMES:
        email = f"{name.split()[0].lower()}.{run_id}@example.com"
        result = execute(RegisterCustomer(email=email, name=name), session_factory)
        customers.append(result.id)
        events += len(result.events)
    orders = []
    while len(orders) < ORDERS:
        lines = rng.sample(products, rng.randint(1, 4))
        command = PlaceOrder(
            customer_id=rng.choice(customers),
            items=[{"product_id": p, "qty": rng.randint(1, 3)} for p in lines],
        )
        try:
            result = execute(command, session_factory)
        except CommandRejected:
            continue  # out of stock: try another basket
        orders.append((result.id, command.customer_id))
        events += len(result.events)
    return products, customers, orders, events


class _ProgressBar:
    """Worker metrics (`WorkerMetrics`, reported once per batch) that move the bar."""

    def __init__(self, progress: Progress, task: TaskID, worker: Worker, total: int) -> None:
        self.progress, self.task, self.worker, self.total = progress, task, worker, total

    def projected(self, applied: Any, failed: Any, seconds: float) -> None:
        self.progress.update(self.task, completed=min(self.worker.stats.acked, self.total))

    def dead_lettered(self, projection: str, count: int) -> None:
        pass

    def reconnected(self, component: str) -> None:
        pass

    def repaired(self, projection: str) -> None:
        pass


def project_until_current(wiring: Wiring, expected_entries: int) -> None:
    worker = Worker(
        wiring.redis,
        wiring.settings,
        PROJECTIONS.values(),
        consumer="demo",
        database_url=wiring.database_url,
    )
    total = expected_entries * len(PROJECTIONS)
    with Progress(
        TextColumn("projecting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=False,
    ) as progress:
        task = progress.add_task("events", total=total)
        worker.metrics = _ProgressBar(progress, task, worker, total)
        drain_all(wiring, worker=worker)
        progress.update(task, completed=total)


def run_demo(wiring: Wiring) -> None:
    ensure_schema(wiring.engine)
    session_factory = make_session_factory(wiring.engine)
    rng = random.Random()
    heading("1. commands: seeding through the write services")
    products, customers, orders, events = seed(session_factory, rng)
    counts = f"{len(products)} products, {len(customers)} customers, {len(orders)} orders"
    out.print(f"{counts}: {events} events committed")
    heading("2. relay + projectors")
    project_until_current(wiring, events)
    queries = QueryService(wiring.redis, wiring.keys, partitions=wiring.settings.partitions)
    heading("3. queries, served only from Redis")
    product = queries.get_product(products[0])
    out.print(product_table([product], f"product {product.id}"))
    catalog = queries.list_products(sort="price", limit=10)
    out.print(product_table(catalog.items, "catalog by price (first page)"))
    order_id, customer_id = orders[0]
    render_order(queries.get_order(order_id))
    render_customer(queries.get_customer(customer_id))
    out.print(
        orders_table(
            queries.customer_orders(customer_id, limit=10).items, "their orders, newest first"
        )
    )
    out.print(product_table(queries.top_products(limit=5), "top products by units sold"))
    heading("4. a customer renames; the order views follow")
    before = queries.get_order(order_id).customer_name
    renamed = execute(
        RenameCustomer(customer_id=customer_id, name=f"{before} (renamed)"), session_factory
    )
    project_until_current(wiring, len(renamed.events))
    queries.wait_for(renamed.token, timeout=10)
    after = queries.get_order(order_id)
    out.print(f"order {after.id}: customer_name {before!r} -> {after.customer_name!r}")
    out.print("[green]demo done[/green]: try `cqrs query order ID`, `cqrs serve`, `cqrs verify`")


def _is_embedded_database(settings: Settings) -> bool:
    """True when the database is the embedded one: no URL set, or the URL the embedded
    server answers on (as `cqrs up` printed it)."""
    if settings.database_url is None:
        return True
    from cqrs.embedded import status

    try:
        embedded = status(settings.home).get("postgres")
    except Exception:  # an unreadable state file: not provably ours
        return False
    url = embedded.get("url") if isinstance(embedded, dict) else None
    return bool(url) and mask_url(str(url)) == mask_url(settings.database_url)


def demo_command(
    yes: bool = typer.Option(
        False,
        "--yes",
        "-y",
        help="Write the demo data without asking, even to a database that is not the embedded one.",
    ),
) -> None:
    """Seed a small shop, project it, and show the views (embedded servers by default)."""

    settings = load_settings()
    if not yes and not _is_embedded_database(settings):
        # Demo rows in someone's real database are hard to take back: ask, and never hang
        # waiting for an answer nobody can type.
        target = mask_url(settings.database_url or "")
        if not sys.stdin.isatty():
            fail(
                f"demo would write {DEMO_SIZE} to {target} (not the embedded database); "
                "pass --yes to do it non-interactively",
                EXIT_USAGE,
            )
        if not typer.confirm(f"Write demo data ({DEMO_SIZE}) to {target}?", err=True):
            fail("demo not run; nothing written")
    wiring = Wiring(settings)
    try:
        run_demo(wiring)
    except OperationalError as exc:
        fail_unreachable(exc)
    finally:
        wiring.close()
