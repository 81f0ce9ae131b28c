"""A concurrent write workload for relay tests: several writer threads run a random mix of
every command through `commands.handlers.execute` on shared aggregates, so writers contend
for the same products, customers and orders the way real clients do.

Rejections the state legitimately produces (a negative restock, a lost retry race) are
counted, not failures; anything else raised by a writer fails the test through the
future's result.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.orm import sessionmaker

from cqrs.commands import catalog, customers, orders
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.results import CommandResult


@dataclass
class Workload:
    session_factory: sessionmaker
    target_events: int
    seed: int = 0
    # Called after each successful command (e.g. to publish right away like the CLI does).
    after_commit: Callable[[CommandResult], None] | None = None

    products: list[uuid.UUID] = field(default_factory=list)
    customers: list[uuid.UUID] = field(default_factory=list)
    placed: list[uuid.UUID] = field(default_factory=list)
    events: int = 0
    commands: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _serial: int = 0

    def _next(self) -> int:
        with self._lock:
            self._serial += 1
            return self._serial

    def _run(self, command: object) -> CommandResult | None:
        name = type(command).__name__
        try:
            result = execute(command, self.session_factory)
        except CommandRejected as exc:
            with self._lock:
                self.rejected[f"{name}:{type(exc).__name__}"] += 1
            return None
        with self._lock:
            self.events += len(result.events)
            self.commands[name] += 1
        if self.after_commit is not None:
            self.after_commit(result)
        return result

    def create_product(self, rng: random.Random) -> None:
        n = self._next()
        result = self._run(
            catalog.CreateProduct(
                sku=f"W-{self.seed}-{n}",
                name=f"Product {n}",
                price=f"{rng.randint(1, 5000) / 100:.2f}",
                stock=1_000_000,
            )
        )
        if result:
            with self._lock:
                self.products.append(result.id)

    def register_customer(self, rng: random.Random) -> None:
        n = self._next()
        result = self._run(
            customers.RegisterCustomer(email=f"w{self.seed}-{n}@example.com", name=f"Cust {n}")
        )
        if result:
            with self._lock:
                self.customers.append(result.id)

    def prepare(self, products: int = 12, customers_: int = 12) -> None:
        rng = random.Random(self.seed)
        for _ in range(products):
            self.create_product(rng)
        for _ in range(customers_):
            self.register_customer(rng)

    def step(self, rng: random.Random) -> None:
        with self._lock:
            products = list(self.products)
            customers_ = list(self.customers)
        op = rng.choices(
            [
                "place",
                "cancel",
                "ship",
                "product",
                "rename_p",
                "reprice",
                "restock",
                "customer",
                "rename_c",
            ],
            weights=[30, 8, 8, 4, 12, 4, 10, 4, 10],
        )[0]
        if op in ("cancel", "ship"):
            with self._lock:
                order_id = self.placed.pop(rng.randrange(len(self.placed))) if self.placed else None
            if order_id is None:
                op = "place"
            elif op == "cancel":
                self._run(orders.CancelOrder(order_id=order_id))
                return
            else:
                self._run(orders.ShipOrder(order_id=order_id))
                return
        if op == "place":
            picked = rng.sample(products, rng.randint(1, 4))
            result = self._run(
                orders.PlaceOrder(
                    customer_id=rng.choice(customers_),
                    items=[{"product_id": p, "qty": rng.randint(1, 3)} for p in picked],
                )
            )
            if result:
                with self._lock:
                    self.placed.append(result.id)
        elif op == "product":
            self.create_product(rng)
        elif op == "rename_p":
            n = self._next()
            self._run(catalog.RenameProduct(product_id=rng.choice(products), name=f"P {n}"))
        elif op == "reprice":
            price = f"{rng.randint(1, 5000) / 100:.2f}"
            self._run(catalog.RepriceProduct(product_id=rng.choice(products), price=price))
        elif op == "restock":
            qty = rng.choice([-1, 1]) * rng.randint(1, 50)
            self._run(catalog.RestockProduct(product_id=rng.choice(products), qty=qty))
        elif op == "customer":
            self.register_customer(rng)
        else:
            n = self._next()
            self._run(customers.RenameCustomer(customer_id=rng.choice(customers_), name=f"C {n}"))

    def writer(self, index: int, deadline: float) -> int:
        """Run commands until the workload reached its target; returns commands run."""
        rng = random.Random(f"{self.seed}-{index}")
        done = 0
        while self.events < self.target_events:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"writer {index}: only {self.events} of {self.target_events} events "
                    "committed before the deadline"
                )
            self.step(rng)
            done += 1
        return done
