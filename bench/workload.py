"""A seeded random workload through the real command handlers.

Tests, benchmarks and soak runs all need the same thing: a realistic stream of events from
every service, produced the way production produces them (`commands.handlers.execute`, one
PostgreSQL transaction per command, events through the outbox), not hand-made envelopes
that could drift from what the write side really emits.

Why it looks like this:

* **Seeded.** Every choice (command, ids, names, prices, quantities) comes from the `rng`
  the caller passes, so a failing run can be replayed. With one writer the sequence of
  commands is fully reproducible; with several writers each thread draws from its own
  generator seeded from `rng`, so only the interleaving varies.
* **Mostly valid.** The generator only addresses aggregates it created itself and that
  committed, so most commands succeed and the views get real work. Some commands are
  refused by the state on purpose, the way real clients get refused: negative restocks
  and orders larger than the stock (`InsufficientStock`), cancelling or shipping an order
  that is already closed (`InvalidTransition`), and under several writers the odd lost
  retry race (`Conflict`). A refusal (`CommandRejected`) is counted, never raised; any
  other exception is a bug and propagates.
* **Every command.** Products are created (with stock), renamed, repriced and restocked
  (both ways); customers registered and renamed; orders placed with 1-4 distinct lines,
  cancelled and shipped. Names include non-ASCII text so case-folded indexes are exercised.
* **Hostile on request.** `hostile=` is the share of commands that must never write: input
  the command models refuse (`ValidationError`: empty or control-character names, bad
  prices, bad emails, zero quantities, an order listing a product twice), well-formed
  commands about aggregates that do not exist (`NotFound`) and an email that differs only
  in case from a registered one (`Duplicate`). The soak runs with it; tests that count
  events leave it at 0.
* **Survives its servers on request.** Exceptions listed in `transient=` (the soak restarts
  PostgreSQL under the writers) are counted and the writer pauses briefly instead of
  failing; anything else still propagates.
* **Observable while running.** Pass your own `WorkloadReport` as `report=` (and your own
  `Population` as `population=`) and read them from another thread: a crash test kills
  processes at chosen points of progress, the soak's readers query the aggregates the
  writers created.
* **One generator.** Benchmarks, the soak and the tests (`tests/` imports `bench.workload`;
  both run from the repository root) share this module, so the command mix is written once.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.orders import CancelOrder, OrderItem, PlaceOrder, ShipOrder
from cqrs.commands.results import CommandResult

__all__ = ["COMMAND_WEIGHTS", "Population", "WorkloadReport", "generate"]


class HasEngine(Protocol):
    """Anything with a SQLAlchemy engine, such as `cqrs.wiring.Wiring` (duck-typed so this
    module does not need a wiring to be importable)."""

    @property
    def engine(self) -> Engine: ...


# Relative frequency of each kind of command. Orders dominate, as in a shop; the rest keep
# every event type flowing. The population grows with creates and registrations, so later
# commands spread over more aggregates and contend less.
COMMAND_WEIGHTS: dict[str, int] = {
    "create_product": 6,
    "register_customer": 6,
    "rename_product": 8,
    "reprice_product": 6,
    "restock_product": 10,
    "rename_customer": 8,
    "place_order": 36,
    "cancel_order": 9,
    "ship_order": 11,
}

# Below these, the generator creates before it references, so the first commands are valid.
MIN_PRODUCTS = 4
MIN_CUSTOMERS = 3
# Share of restocks that remove stock (some of them more than there is).
NEGATIVE_RESTOCK = 0.3
# Share of cancels/ships aimed at an order that is already closed (refused on purpose).
CLOSED_ORDER_RETRY = 0.05
# How long a writer waits after a `transient` error (a server restarting): no busy loop.
TRANSIENT_PAUSE = 0.1

_ADJECTIVES = ("Blue", "Small", "Heavy", "Quiet", "Smart", "Grüne", "Éclair", "Ångström", "Big")
_NOUNS = ("Widget", "Gadget", "Kettle", "Lamp", "Straße Map", "Café Mug", "Drill", "Chair")
_FIRST = ("Ann", "Bob", "Chloé", "Dmitri", "Eve", "Fatima", "Günter", "Hiro", "Inès", "Jo")
_LAST = ("Smith", "Müller", "Okafor", "Tanaka", "García", "Nguyen", "Łukasz", "O'Brien")
# Input the command models must refuse (exit 2 on the CLI): never reaches a handler.
_BAD_NAMES = ("", "   ", "tab\there", "bell\x07", "zero\u200bwidth", "x" * 201)
_BAD_PRICES = ("-1.00", "1.234", "NaN", "inf", "abc", "99999999999.00")


@dataclass
class WorkloadReport:
    """What a workload did. Counters are updated under a lock while the workload runs, so
    another thread may read them as live progress."""

    attempted: int = 0
    committed: int = 0
    rejected: int = 0  # refused by the state (CommandRejected)
    invalid: int = 0  # refused by the input rules (ValidationError), `hostile` only
    failed: int = 0  # a `transient` error: a server was down
    events: int = 0  # sum of len(result.events) over committed commands
    seconds: float = 0.0
    committed_by_command: Counter[str] = field(default_factory=Counter)
    # "<Command>:<Rejection>", e.g. "PlaceOrder:InsufficientStock".
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    # "<model title>.<first field>", e.g. "CreateProduct.price".
    invalid_by_reason: Counter[str] = field(default_factory=Counter)
    failed_by_error: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _committed(self, command: object, result: CommandResult) -> None:
        with self._lock:
            self.attempted += 1
            self.committed += 1
            self.events += len(result.events)
            self.committed_by_command[type(command).__name__] += 1

    def _rejected(self, command: object, exc: CommandRejected) -> None:
        with self._lock:
            self.attempted += 1
            self.rejected += 1
            self.rejected_by_reason[f"{type(command).__name__}:{type(exc).__name__}"] += 1

    def _invalid(self, exc: ValidationError) -> None:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"][:1])
        with self._lock:
            self.attempted += 1
            self.invalid += 1
            self.invalid_by_reason[f"{exc.title}.{where}"] += 1

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self.attempted += 1
            self.failed += 1
            self.failed_by_error[type(exc).__name__] += 1

    def summary(self) -> str:
        """One line for benchmark output and test logs."""
        rate = self.attempted / self.seconds if self.seconds else 0.0
        extra = f", {self.invalid} invalid" if self.invalid else ""
        extra += f", {self.failed} failed" if self.failed else ""
        return (
            f"{self.attempted} commands ({self.committed} committed, {self.rejected} rejected"
            f"{extra}), {self.events} events in {self.seconds:.1f}s ({rate:.0f} commands/s); "
            f"rejected: {dict(self.rejected_by_reason)}"
        )


class Population:
    """The aggregates this workload created and saw committed, shared by its writers (and
    by whoever else reads them under `lock`, like the soak's query readers).

    Open orders are taken out of the list by the writer that cancels or ships them, so two
    writers rarely race for the same transition; the loser of a race that does happen is
    simply refused (InvalidTransition) and counted. `orders` keeps every placed order.
    """

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.lock = threading.Lock()
        self.products: list[uuid.UUID] = []
        self.customers: list[uuid.UUID] = []
        self.emails: list[str] = []
        self.orders: list[uuid.UUID] = []
        self.open_orders: list[uuid.UUID] = []
        self.closed_orders: list[uuid.UUID] = []
        self._serial = 0

    def serial(self) -> int:
        with self.lock:
            self._serial += 1
            return self._serial


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _price(rng: random.Random) -> str:
    cents = rng.randint(50, 250_000)
    return f"{cents // 100}.{cents % 100:02d}"


def _product_name(rng: random.Random, n: int) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {n}"


def _person_name(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


class _Writer:
    """One thread's command source: its own generator, the shared population and report."""

    def __init__(
        self,
        rng: random.Random,
        session_factory: sessionmaker,
        population: Population,
        report: WorkloadReport,
        after_commit: Callable[[CommandResult], None] | None,
        *,
        hostile: float = 0.0,
        transient: tuple[type[BaseException], ...] = (),
        pause: Callable[[float], object] = time.sleep,
    ) -> None:
        self.rng = rng
        self.session_factory = session_factory
        self.pop = population
        self.report = report
        self.after_commit = after_commit
        self.hostile = hostile
        self.transient = transient
        self.pause = pause

    def _run(self, command: object) -> CommandResult | None:
        try:
            result = execute(command, self.session_factory)
        except CommandRejected as exc:
            self.report._rejected(command, exc)
            return None
        except self.transient as exc:
            self.report._failed(exc)
            self.pause(TRANSIENT_PAUSE)  # the server is (re)starting: do not spin
            return None
        self.report._committed(command, result)
        if self.after_commit is not None:
            self.after_commit(result)
        return result

    def _build_and_run(self, build: Callable[[], object]) -> CommandResult | None:
        """Build the command first: a hostile input fails in its model, before any handler."""
        try:
            command = build()
        except ValidationError as exc:
            self.report._invalid(exc)
            return None
        return self._run(command)

    def _choose(self) -> str:
        with self.pop.lock:
            products, customers = len(self.pop.products), len(self.pop.customers)
            open_orders = len(self.pop.open_orders)
        if products < MIN_PRODUCTS:
            return "create_product"
        if customers < MIN_CUSTOMERS:
            return "register_customer"
        if self.hostile and self.rng.random() < self.hostile:
            return "hostile"
        kind = self.rng.choices(list(COMMAND_WEIGHTS), weights=list(COMMAND_WEIGHTS.values()))[0]
        if kind in ("cancel_order", "ship_order") and not open_orders:
            return "place_order"
        return kind

    def _pick(self, ids: list[uuid.UUID]) -> uuid.UUID:
        with self.pop.lock:
            return self.rng.choice(ids)

    def _take_order(self) -> uuid.UUID | None:
        """An order to cancel or ship: usually an open one (removed from the open list, so
        other writers leave it alone), sometimes one already closed (refused on purpose)."""
        with self.pop.lock:
            if self.pop.closed_orders and self.rng.random() < CLOSED_ORDER_RETRY:
                return self.rng.choice(self.pop.closed_orders)
            if not self.pop.open_orders:
                return None
            ids = self.pop.open_orders
            i = self.rng.randrange(len(ids))
            ids[i], ids[-1] = ids[-1], ids[i]
            return ids.pop()

    def step(self) -> None:
        """Issue one command."""
        rng, pop = self.rng, self.pop
        kind = self._choose()
        if kind == "hostile":
            self._hostile(pop.serial())
        elif kind == "create_product":
            n = pop.serial()
            result = self._run(
                CreateProduct(
                    sku=f"{pop.tag}-{n}",
                    name=_product_name(rng, n),
                    price=_price(rng),
                    stock=rng.randint(20, 400),
                    product_id=_uuid(rng),
                )
            )
            if result is not None:
                with pop.lock:
                    pop.products.append(result.id)
        elif kind == "register_customer":
            n = pop.serial()
            email = f"c{n}.{pop.tag}@example.com"
            result = self._run(
                RegisterCustomer(email=email, name=_person_name(rng), customer_id=_uuid(rng))
            )
            if result is not None:
                with pop.lock:
                    pop.customers.append(result.id)
                    pop.emails.append(email)
        elif kind == "rename_product":
            n = pop.serial()
            self._run(
                RenameProduct(product_id=self._pick(pop.products), name=_product_name(rng, n))
            )
        elif kind == "reprice_product":
            self._run(RepriceProduct(product_id=self._pick(pop.products), price=_price(rng)))
        elif kind == "restock_product":
            qty = -rng.randint(1, 60) if rng.random() < NEGATIVE_RESTOCK else rng.randint(10, 200)
            self._run(RestockProduct(product_id=self._pick(pop.products), qty=qty))
        elif kind == "rename_customer":
            self._run(RenameCustomer(customer_id=self._pick(pop.customers), name=_person_name(rng)))
        elif kind == "place_order":
            with pop.lock:
                customer = rng.choice(pop.customers)
                picked = rng.sample(pop.products, min(rng.randint(1, 4), len(pop.products)))
            items = [
                OrderItem(product_id=p, qty=rng.choices((1, 2, 3, 5, 8), (40, 25, 15, 12, 8))[0])
                for p in picked
            ]
            result = self._run(PlaceOrder(customer_id=customer, items=items, order_id=_uuid(rng)))
            if result is not None:
                with pop.lock:
                    pop.open_orders.append(result.id)
                    pop.orders.append(result.id)
        else:
            order = self._take_order()
            if order is None:  # another writer took the last open order meanwhile
                return self.step()
            command = (
                CancelOrder(order_id=order) if kind == "cancel_order" else ShipOrder(order_id=order)
            )
            self._run(command)
            with pop.lock:
                if order not in pop.closed_orders:
                    pop.closed_orders.append(order)

    def _hostile(self, n: int) -> None:
        """One command that must write nothing: refused by its model or by the state."""
        rng = self.rng
        product, customer = self._pick(self.pop.products), self._pick(self.pop.customers)
        ghost = _uuid(rng)
        with self.pop.lock:
            # Registered already, in another case: refused whatever the case (Duplicate).
            taken = rng.choice(self.pop.emails).upper() if self.pop.emails else "not-an-email"
        cases: list[Callable[[], object]] = [
            lambda: CreateProduct(sku=f"X-{n}", name=rng.choice(_BAD_NAMES), price="1.00"),
            lambda: CreateProduct(sku=f"X-{n}", name="ok", price=rng.choice(_BAD_PRICES)),
            lambda: RegisterCustomer(email="not-an-email", name="N"),
            lambda: RestockProduct(product_id=product, qty=0),
            lambda: PlaceOrder(  # the same product on two lines
                customer_id=customer,
                items=[{"product_id": product, "qty": 1}, {"product_id": product, "qty": 2}],
            ),
            lambda: PlaceOrder(
                customer_id=customer,
                items=[{"product_id": product, "qty": rng.choice((0, -3))}],
            ),
            lambda: RenameProduct(product_id=ghost, name="Ghost"),
            lambda: CancelOrder(order_id=ghost),
            lambda: PlaceOrder(customer_id=customer, items=[{"product_id": ghost, "qty": 1}]),
            lambda: PlaceOrder(customer_id=ghost, items=[{"product_id": product, "qty": 1}]),
            lambda: RegisterCustomer(email=taken, name=_person_name(rng)),
        ]
        self._build_and_run(rng.choice(cases))


def _session_factory(target: HasEngine | sessionmaker) -> sessionmaker:
    if isinstance(target, sessionmaker):
        return target
    return make_session_factory(target.engine)


def generate(
    rng: random.Random,
    target: HasEngine | sessionmaker,
    n_commands: int | None = None,
    *,
    writers: int = 1,
    report: WorkloadReport | None = None,
    after_commit: Callable[[CommandResult], None] | None = None,
    stop: threading.Event | None = None,
    until: Callable[[WorkloadReport], bool] | None = None,
    hostile: float = 0.0,
    transient: tuple[type[BaseException], ...] = (),
    population: Population | None = None,
) -> WorkloadReport:
    """Issue `n_commands` random commands and report what happened; fewer if `stop` is set
    or `until(report)` turns true (checked before each command, so a caller can stop at a
    number of events or raise at its own deadline). `n_commands=None`: until one of those.

    `target` is a wiring (anything with `.engine`) or a session factory. With `writers` > 1
    the commands are shared among that many threads that contend for the same aggregates,
    as concurrent clients do. `after_commit` runs in the writer's thread after each
    committed command (e.g. to publish right away as the CLI does). Refused commands are
    counted in the report, and so are `transient` errors; any other exception stops every
    writer and is raised here. `hostile` and `population`: see the module docstring.
    """
    if n_commands is not None and n_commands < 0:
        raise ValueError("n_commands must not be negative")
    if n_commands is None and stop is None and until is None:
        raise ValueError("without n_commands, pass stop or until: the run must end")
    if writers < 1:
        raise ValueError("writers must be at least 1")
    if not 0.0 <= hostile < 1.0:
        raise ValueError("hostile is a share: at least 0, below 1")
    report = report if report is not None else WorkloadReport()
    session_factory = _session_factory(target)
    tag = f"{rng.getrandbits(40):010x}"
    if population is None:
        population = Population(tag)
    elif not population.tag:
        population.tag = tag
    halt = threading.Event()
    tickets: Iterator[int] = iter(range(n_commands)) if n_commands is not None else _forever()
    tickets_lock = threading.Lock()

    def pause(seconds: float) -> None:
        (stop or halt).wait(seconds)

    def take_ticket() -> bool:
        if halt.is_set() or (stop is not None and stop.is_set()):
            return False
        if until is not None and until(report):
            return False
        with tickets_lock:
            return next(tickets, None) is not None

    def write(writer: _Writer) -> None:
        try:
            while take_ticket():
                writer.step()
        except BaseException:
            halt.set()  # a bug in one writer ends the run for all of them
            raise

    # Seeds are drawn before any thread starts, so they depend on `rng` alone.
    workers = [
        _Writer(
            random.Random(rng.getrandbits(64)),
            session_factory,
            population,
            report,
            after_commit,
            hostile=hostile,
            transient=transient,
            pause=pause,
        )
        for _ in range(writers)
    ]
    started = time.monotonic()
    try:
        if writers == 1:
            write(workers[0])
        else:
            with ThreadPoolExecutor(writers, thread_name_prefix="workload") as pool:
                futures = [pool.submit(write, w) for w in workers]
                wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    future.result()
    finally:
        report.seconds = time.monotonic() - started
    return report


def _forever() -> Iterator[int]:
    n = 0
    while True:
        yield n
        n += 1
