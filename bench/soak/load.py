"""The load of a soak run: writers through the real command handlers, readers through the
query service, both going on while the faults hit.

The writers are `bench.workload.generate` (the one seeded command mix the benchmarks and
tests use) with a share of hostile commands and PostgreSQL's restart errors tolerated; the
readers query the aggregates the writers saw committed and check rules every view must
satisfy whatever its lag.
"""

from __future__ import annotations

import random
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import redis
from pydantic import ValidationError
from sqlalchemy.orm import sessionmaker

from bench.soak.config import HOSTILE, NAMESPACE, PARTITIONS, PG_DOWN, REDIS_DOWN
from bench.workload import Population, WorkloadReport, generate
from cqrs.commands.results import CommandResult
from cqrs.keys import KeyMap
from cqrs.queries.errors import NotFound, QueryError
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.wiring import make_redis


class Writers(threading.Thread):
    """`writers` threads of the seeded workload until `halt`; a bug (any exception that is
    neither a refusal nor a server restart) is kept for the report and ends the writing."""

    def __init__(
        self,
        seed: int,
        writers: int,
        session_factory: sessionmaker,
        population: Population,
        after_commit: Callable[[CommandResult], None],
    ) -> None:
        super().__init__(name="writers", daemon=True)
        self.seed = seed
        self.writers = writers
        self.session_factory = session_factory
        self.population = population
        self.after_commit = after_commit
        self.report = WorkloadReport()
        self.bugs: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            generate(
                random.Random(f"{self.seed}-writers"),
                self.session_factory,
                writers=self.writers,
                report=self.report,
                after_commit=self.after_commit,
                stop=self.halt,
                hostile=HOSTILE,
                transient=PG_DOWN,
                population=self.population,
            )
        except Exception:  # a bug in the harness or the product: keep it, stop writing
            self.bugs.append(traceback.format_exc())


@dataclass
class ReaderStats:
    """What the readers saw; `invalid` lists views that broke a rule (a problem of the run)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    reads: int = 0
    not_found: int = 0
    unavailable: int = 0
    invalid: list[str] = field(default_factory=list)  # a view that broke a rule


class Reader(threading.Thread):
    """Reads views the way clients do and checks rules every view must satisfy whatever
    its lag: it parses, stock and counters are not negative, an order's total is the sum
    of its lines."""

    def __init__(
        self, index: int, seed: int, redis_url: str, pop: Population, stats: ReaderStats
    ) -> None:
        super().__init__(name=f"reader-{index}", daemon=True)
        self.rng = random.Random(f"{seed}-reader-{index}")
        self.client = make_redis(redis_url, Settings(redis_socket_timeout=5))
        self.service = QueryService(self.client, KeyMap(NAMESPACE), partitions=PARTITIONS)
        self.pop = pop
        self.stats = stats
        self.halt = threading.Event()

    def _bad(self, what: str) -> None:
        with self.stats.lock:
            if len(self.stats.invalid) < 50:
                self.stats.invalid.append(what)

    def run(self) -> None:
        try:
            while not self.halt.wait(0.005):
                try:
                    self.read()
                    with self.stats.lock:
                        self.stats.reads += 1
                except NotFound:
                    with self.stats.lock:
                        self.stats.reads += 1
                        self.stats.not_found += 1
                except (*REDIS_DOWN, redis.ResponseError) as exc:
                    # ResponseError: e.g. LOADING while Valkey replays its AOF.
                    with self.stats.lock:
                        self.stats.unavailable += 1
                    if not isinstance(exc, redis.ResponseError) or "LOADING" in str(exc):
                        self.halt.wait(0.1)
                    else:
                        self._bad(f"{type(exc).__name__}: {exc}")
                except (ValidationError, QueryError, ValueError) as exc:
                    self._bad(f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            self.client.close()

    def read(self) -> None:
        rng, pop, service = self.rng, self.pop, self.service
        with pop.lock:
            if not pop.products or not pop.customers:
                return
            pid, cid = rng.choice(pop.products), rng.choice(pop.customers)
            oid = rng.choice(pop.orders) if pop.orders else None
        choice = rng.randrange(6)
        if choice == 0:
            p = service.get_product(pid)
            if p.stock < 0 or p.units_sold < 0 or p.revenue < 0:
                self._bad(f"product {pid}: stock {p.stock}, sold {p.units_sold}, {p.revenue}")
        elif choice == 1:
            c = service.get_customer(cid)
            if c.order_count < 0 or c.lifetime_value < 0:
                self._bad(f"customer {cid}: {c.order_count} orders, {c.lifetime_value}")
        elif choice == 2 and oid is not None:
            o = service.get_order(oid)
            if o.total != sum((line.line_total for line in o.lines), Decimal("0")):
                self._bad(f"order {oid}: total {o.total} != sum of lines")
            if any(line.line_total != line.unit_price * line.qty for line in o.lines):
                self._bad(f"order {oid}: a line total is not unit price x qty")
        elif choice == 3:
            page = service.list_products(sort=rng.choice(("name", "price")), limit=20)
            if any(p.stock < 0 for p in page.items):
                self._bad("a listed product has negative stock")
        elif choice == 4:
            service.customer_orders(cid, limit=10)
        else:
            service.top_products(limit=5)
