"""Commands: commands/s through the real handlers, 1 and 8 concurrent writers.

The mix is the issue's: product create and order place, alternating (orders of 1-3 lines
over a pool of products with ample stock, so nothing is refused). Each command is one
`commands.handlers.execute` call: validation, one PostgreSQL transaction with the
optimistic version check, event log + outbox rows, NOTIFY, commit. Writers are threads
sharing one engine, as a web service would. The ceiling is a raw psycopg transaction
inserting one row and one log row, on as many connections.

The order placement is also measured alone, against the same work written by hand
(`bench.ceilings.raw_order_placements`: the same orders, the same rows in copies of the
same tables, raw psycopg in pipeline mode): what the project's guarantees and layers
cost on its heaviest command.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

from bench import ceilings
from bench.scenarios import Context
from bench.stats import Figure, Row
from cqrs.commands import notify
from cqrs.commands.catalog import CreateProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.commands.orders import OrderItem, PlaceOrder
from cqrs.commands.results import CommandResult
from cqrs.wiring import make_engine


class Shop:
    """The products and customers the measured commands refer to."""

    def __init__(
        self,
        session_factory: object,
        products: list[uuid.UUID] | None = None,
        customers: list[uuid.UUID] | None = None,
        tag: str = "",
    ) -> None:
        self.session_factory = session_factory
        self.products = list(products or [])
        self.customers = list(customers or [])
        self.tag = tag or uuid.uuid4().hex[:6]
        self.serial = 0
        self.lock = threading.Lock()

    @classmethod
    def create(cls, session_factory: object, products: int, customers: int) -> Shop:
        shop = cls(session_factory)
        for _ in range(products):
            shop.products.append(shop.create_product().id)
        for n in range(customers):
            shop.customers.append(
                execute(
                    RegisterCustomer(email=f"bench{n}@example.com", name=f"Bench Customer {n}"),
                    session_factory,
                ).id
            )
        return shop

    def create_product(self) -> CommandResult:
        with self.lock:
            self.serial += 1
            n = self.serial
        return execute(
            CreateProduct(
                sku=f"BENCH-{self.tag}-{n}", name=f"Bench Widget {n}", price="12.50", stock=10**6
            ),
            self.session_factory,
        )

    def place_order(self, rng: random.Random) -> CommandResult:
        picked = rng.sample(self.products, rng.randint(1, 3))
        items = [OrderItem(product_id=p, qty=rng.randint(1, 3)) for p in picked]
        return execute(
            PlaceOrder(customer_id=rng.choice(self.customers), items=items), self.session_factory
        )

    def order_items(self, rng: random.Random) -> tuple[uuid.UUID, list[tuple[uuid.UUID, int]]]:
        """A customer and 1-3 distinct products with their quantities."""
        picked = rng.sample(self.products, rng.randint(1, 3))
        return rng.choice(self.customers), [(p, rng.randint(1, 3)) for p in picked]

    def command(self, rng: random.Random, n: int) -> CommandResult:
        """The n-th command of the mix: even create a product, odd place an order."""
        return self.create_product() if n % 2 == 0 else self.place_order(rng)

    def light_command(self, rng: random.Random, n: int) -> CommandResult:
        """The n-th command of the lighter end-to-end mix: restock, rename customer,
        restock, place order (a quarter of them orders, every projection involved)."""
        kind = n % 4
        if kind in (0, 2):
            qty = rng.randint(1, 50)
            return execute(
                RestockProduct(product_id=rng.choice(self.products), qty=qty),
                self.session_factory,
            )
        if kind == 1:
            name = f"Bench Customer {rng.randint(1, 10**6)}"
            return execute(
                RenameCustomer(customer_id=rng.choice(self.customers), name=name),
                self.session_factory,
            )
        return self.place_order(rng)


def run_mix(shop: Shop, total: int, writers: int) -> float:
    """Commands per second for `total` commands over `writers` threads."""
    tickets = iter(range(total))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while True:
                with lock:
                    n = next(tickets, None)
                if n is None:
                    return
                shop.command(rng, n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return total / (time.perf_counter() - started)


def run_orders(
    shop: Shop, orders: list[tuple[uuid.UUID, list[tuple[uuid.UUID, int]]]], writers: int
) -> float:
    """Order placements per second through `execute`, the given orders over `writers`
    threads (the very orders the hand-written ceiling places)."""
    commands = [
        PlaceOrder(customer_id=c, items=[OrderItem(product_id=p, qty=q) for p, q in items])
        for c, items in orders
    ]
    tickets = iter(commands)
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            while True:
                with lock:
                    command = next(tickets, None)
                if command is None:
                    return
                execute(command, shop.session_factory)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(writers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return len(commands) / elapsed


def order_rows(ctx: Context, shop: Shop, database_url: str) -> list[Row]:
    """The order placement alone, project against the hand-written ceiling."""
    rows = []
    rng = random.Random(16)
    ceilings.prepare_order_tables(database_url)
    try:
        for writers in (1, 8):
            total = ctx.size(40, 1000) * (1 if writers == 1 else 2)
            warm = [shop.order_items(rng) for _ in range(writers * 10)]
            run_orders(shop, warm, writers)
            ceilings.raw_order_placements(database_url, warm, writers)
            project, ceiling = [], []
            for rep in range(ctx.repeat):
                orders = [shop.order_items(rng) for _ in range(total)]
                project.append(run_orders(shop, orders, writers))
                ceiling.append(ceilings.raw_order_placements(database_url, orders, writers))
                ctx.say(
                    f"  order placement, {writers} writer(s), rep {rep + 1}: "
                    f"{project[-1]:.0f}/s vs by hand {ceiling[-1]:.0f}/s"
                )
            rows.append(
                Row(
                    "commands",
                    f"order placement, {writers} writer{'s' if writers > 1 else ''}",
                    "orders/s",
                    Figure.of(project),
                    Figure.of(ceiling),
                    f"order placement by hand (raw psycopg pipeline, same rows), {writers} conn",
                    target=0.8 if writers == 1 else None,
                    extra={"orders": total, "lines": "1-3 per order"},
                )
            )
    finally:
        ceilings.drop_order_tables(database_url)
    return rows


def run(ctx: Context) -> list[Row]:
    rows = []
    with ctx.backend.scope("commands") as settings:
        engine = make_engine(settings.database_url or "", pool_size=10)
        try:
            shop = Shop.create(
                make_session_factory(engine),
                products=ctx.size(20, 300),
                customers=ctx.size(10, 100),
            )
            default = settings.commit_notify
            # Every wake-up mode in the same run, alternated with the ceiling per
            # repetition (so noise falls on all of them); the default's rows come first.
            modes = [default, *(m for m in notify.MODES if m != default)]
            for writers in (1, 8):
                total = ctx.size(40, 1000) * (1 if writers == 1 else 2)
                # Untimed warm-up: the pool opens its connections for this many writers
                # (the ceiling opens its own before its clock starts) and prepares the
                # statements on each.
                run_mix(shop, writers * 10, writers)
                project: dict[str, list[float]] = {m: [] for m in modes}
                ceiling = []
                for rep in range(ctx.repeat):
                    for mode in modes:
                        notify.configure(engine, mode)
                        project[mode].append(run_mix(shop, total, writers))
                    ceiling.append(
                        ceilings.raw_transactions(settings.database_url or "", total, writers)
                    )
                    shown = ", ".join(f"{m} {project[m][-1]:.0f}/s" for m in modes)
                    ctx.say(
                        f"  commands, {writers} writer(s), rep {rep + 1}: "
                        f"{shown} vs raw {ceiling[-1]:.0f}/s"
                    )
                notify.configure(engine, default)
                for mode in modes:
                    label = f"{writers} writer{'s' if writers > 1 else ''}"
                    rows.append(
                        Row(
                            "commands",
                            label if mode == default else f"{label}, commit notify {mode}",
                            "commands/s",
                            Figure.of(project[mode]),
                            Figure.of(ceiling),
                            f"raw psycopg tx (1 row + 1 log row), {writers} conn",
                            target=(0.7 if writers == 1 else 0.6) if mode == default else None,
                            extra={
                                "commands": total,
                                "mix": "create product / place order 1:1",
                                "commit_notify": mode,
                            },
                        )
                    )
            rows += order_rows(ctx, shop, settings.database_url or "")
        finally:
            engine.dispose()
    return rows
