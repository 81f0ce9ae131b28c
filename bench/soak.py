"""Soak: the whole system, for minutes, under a seeded workload while a fault injector breaks it.

    python -m bench.soak --minutes 10 --seed 1
    python -m bench.soak --seconds 30 --seed 7 --json report.json

What runs (all on loopback, all started and stopped by this process, by PID):

* its own PostgreSQL 18 and Valkey 8 (append-only file on) in a temporary home, through
  `cqrs.embedded.ensure_started`, so nothing of the machine's servers is touched;
* writer threads: a seeded random mix of every command through the real command handlers,
  some invalid on purpose (bad input, unknown ids, too little stock, closed orders);
* a relay subprocess (`cqrs relay`) and three projector workers (`cqrs project --consumer wN`,
  lease 1 s), restarted whenever they exit;
* query readers (`QueryService`), a probe that measures commit-to-view latency from
  consistency tokens, and a sampler of consumer-group lag and relay backlog;
* a fault injector that, on a seeded schedule: SIGKILLs and restarts the relay or a worker,
  SIGSTOPs a worker for longer than its lease and SIGCONTs it, SIGKILLs Valkey and restarts it
  from its AOF, FLUSHALLs Valkey, fast-restarts PostgreSQL (SIGINT), replays a random
  projection (`cqrs replay NAME --yes`), and XADDs foreign, malformed entries into the streams.

At the end the faults stop, every process is stopped gracefully, `cqrs run --drain` projects
what is left and `cqrs verify` compares every view with PostgreSQL. The report says what ran,
what broke and whether the views equal PostgreSQL; the exit status is 1 on any difference,
unpublished (lost) event, real event in the dead letters, invalid view read, crashed process
or writer bug. With the same seed the workload and the fault schedule are the same; only the
timing (and so the interleaving) differs.

This module only uses the product's public pieces (cqrs, commands, projector, queries) so it
stays runnable on its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import redis
import sqlalchemy.exc
from pydantic import ValidationError

from bench.lifecycle import Children, Interrupted, interrupt_on_signals, kill_descendants
from cqrs import embedded
from cqrs.commands.catalog import CreateProduct, RenameProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.migrations import upgrade
from cqrs.commands.orders import CancelOrder, PlaceOrder, ShipOrder
from cqrs.keys import KeyMap
from cqrs.projector.deadletters import list_dead_letters
from cqrs.queries.errors import NotFound, QueryError
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.streams import group_lag
from cqrs.urls import libpq_url
from cqrs.wiring import make_engine, make_redis

NAMESPACE = "soak"
PROJECTIONS = ("products", "customers", "orders")
PARTITIONS = 8
KINDS = (
    "kill_relay",
    "kill_worker",
    "stop_worker",
    "redis_restart",
    "redis_flushall",
    "pg_restart",
    "replay",
    "poison",
)
# Extra faults beyond the guaranteed minimum are drawn with these weights: the cheap ones
# often, the ones that force a full rebuild (FLUSHALL) or stall every writer (PostgreSQL)
# less, so the system spends most of the run working, not recovering.
WEIGHTS = {
    "kill_relay": 3,
    "kill_worker": 4,
    "stop_worker": 4,
    "redis_restart": 2,
    "redis_flushall": 1,
    "pg_restart": 2,
    "replay": 2,
    "poison": 3,
}
LEASE_MS = 1000
# Errors a writer or reader meets while a server is down or restarting: counted, retried.
_PG_DOWN = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, psycopg.Error)
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    seconds: float
    seed: int
    writers: int = 3
    readers: int = 2
    workers: int = 3
    # Faults of every kind at least this often (3 for long runs, 1 for short ones).
    min_each: int = 3
    mean_interval: float = 8.0
    retention: int = 5000
    keep: bool = False
    json_path: Path | None = None


def fault_schedule(config: Config) -> list[tuple[float, str]]:
    """(seconds after start, kind): every kind `min_each` times plus weighted extras, spread
    over the run with seeded jitter. Leaves a warm-up at the start and a quiet end."""
    rng = random.Random(f"{config.seed}-faults")
    warmup = min(5.0, config.seconds * 0.1)
    window = max(config.seconds * 0.9 - warmup, 1.0)
    total = max(len(KINDS) * config.min_each, int(window / config.mean_interval))
    kinds = [k for k in KINDS for _ in range(config.min_each)]
    kinds += rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()), k=total - len(kinds))
    rng.shuffle(kinds)
    step = window / len(kinds)
    return [(warmup + i * step + rng.uniform(0, step * 0.5), kind) for i, kind in enumerate(kinds)]


# --------------------------------------------------------------------------- servers


class Servers:
    """The embedded PostgreSQL and Valkey of this run; restarts keep their ports (the URLs
    handed to every subprocess must stay valid)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        # `ensure` (a fault's restart) and `close` exclude each other, and nothing is
        # started once closed: a restart racing the cleanup must not leave a server behind.
        self.lock = threading.Lock()
        self.closed = False
        started = embedded.ensure_started(home, timeout=120)
        self.database_url = started.database_url
        self.redis_url = started.redis_url

    def pid(self, kind: str) -> int | None:
        info = embedded.status(self.home)[kind]
        assert isinstance(info, dict)
        return int(info["pid"]) if info.get("alive") else None

    def wait_gone(self, kind: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pid(kind) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded {kind} did not exit within {timeout:g}s")
            time.sleep(0.05)

    def ensure(self) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("the run is stopping: no server restart")
            started = embedded.ensure_started(self.home, timeout=120)
        if (started.database_url, started.redis_url) != (self.database_url, self.redis_url):
            raise RuntimeError(
                f"a server came back on another port ({started.database_url}, "
                f"{started.redis_url}); the running processes cannot follow"
            )

    def stop(self) -> list[int]:
        with self.lock:
            self.closed = True
            return embedded.stop(self.home)


# --------------------------------------------------------------------------- processes


@dataclass
class Managed:
    """A subprocess this run owns: restarted when it exits, killed only through its Popen."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    offset: int = 0  # where this incarnation's output starts in the log
    expect_exit: bool = False
    stopped: bool = False  # SIGSTOPped
    starts: int = 0


class Fleet:
    def __init__(self, env: dict[str, str], log_dir: Path, children: Children) -> None:
        self.env = env
        self.log_dir = log_dir
        self.children = children
        self.lock = threading.RLock()
        self.procs: dict[str, Managed] = {}
        self.unexpected: list[dict[str, Any]] = []

    def add(self, name: str, *args: str) -> Managed:
        argv = [sys.executable, "-m", "cqrs.app", *args]
        proc = Managed(name, argv, self.log_dir / f"{name}.log")
        self.procs[name] = proc
        self.start(proc)
        return proc

    def start(self, proc: Managed) -> None:
        with self.lock:
            proc.offset = proc.log.stat().st_size if proc.log.exists() else 0
            with proc.log.open("ab") as out:
                out.write(f"\n=== start {proc.starts + 1} at {time.time():.3f}\n".encode())
                proc.popen = self.children.popen(
                    proc.argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            proc.starts += 1
            proc.expect_exit = False
            proc.stopped = False

    def output(self, proc: Managed, chars: int = 4000) -> str:
        with contextlib.suppress(OSError), proc.log.open("rb") as fh:
            fh.seek(proc.offset)
            return fh.read().decode("utf-8", "replace")[-chars:]
        return ""

    def kill(self, proc: Managed) -> None:
        with self.lock:
            proc.expect_exit = True
            assert proc.popen is not None
            if proc.stopped:
                proc.popen.send_signal(signal.SIGCONT)
                proc.stopped = False
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def pause(self, proc: Managed) -> bool:
        with self.lock:
            if proc.popen is None or proc.popen.poll() is not None:
                return False
            proc.popen.send_signal(signal.SIGSTOP)
            proc.stopped = True
            return True

    def resume(self, proc: Managed) -> None:
        with self.lock:
            if proc.stopped and proc.popen is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
            proc.stopped = False

    def check(self) -> None:
        """Record and restart every process that exited without being told to."""
        with self.lock:
            for proc in self.procs.values():
                if proc.expect_exit or proc.popen is None or proc.popen.poll() is None:
                    continue
                output = self.output(proc)
                lines = [line for line in output.splitlines() if line.strip()]
                self.unexpected.append(
                    {
                        "process": proc.name,
                        "returncode": proc.popen.returncode,
                        "last_line": lines[-1][-300:] if lines else "",
                        "traceback": "Traceback" in output,
                        "output": output[-2500:],
                    }
                )
                log(f"{proc.name} exited unexpectedly ({proc.popen.returncode}); restarting")
                self.start(proc)

    def stop_all(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everything (graceful: finish the batch, release leases), then wait."""
        with self.lock:
            for proc in self.procs.values():
                proc.expect_exit = True
                if proc.popen is not None and proc.popen.poll() is None:
                    if proc.stopped:
                        proc.popen.send_signal(signal.SIGCONT)
                        proc.stopped = False
                    proc.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            assert proc.popen is not None
            try:
                codes[proc.name] = proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[proc.name] = None
        return codes


# --------------------------------------------------------------------------- writers


class Population:
    """Aggregates the writers saw committed (only those are addressed on purpose)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.products: list[uuid.UUID] = []
        self.customers: list[uuid.UUID] = []
        self.open_orders: list[uuid.UUID] = []
        self.orders: list[uuid.UUID] = []
        self.serial = 0
        self.last_commit: tuple[float, str] | None = None  # (monotonic, token) for the probe

    def next(self) -> int:
        with self.lock:
            self.serial += 1
            return self.serial


@dataclass
class WriterStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: int = 0
    committed: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # by the current state
    invalid: Counter[str] = field(default_factory=Counter)  # by the input rules
    failed: Counter[str] = field(default_factory=Counter)  # a server was down
    events: int = 0
    bugs: list[str] = field(default_factory=list)


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


def _price(rng: random.Random) -> str:
    cents = rng.randint(1, 500_000)
    return f"{cents // 100}.{cents % 100:02d}"


_NAMES = ("Mug", "Lamp", "Straße Map", "Café Table", "Ångström Rule", "Drill", "Chair", "Kettle")
_PEOPLE = ("Ann", "Bob", "Chloé", "Dmitri", "Fatima", "Günter", "Hiro", "Inès", "O'Brien")
# Input the command models must refuse (exit 2 on the CLI): never reaches a handler.
_BAD_NAMES = ("", "   ", "tab\there", "bell\x07", "zero\u200bwidth", "x" * 201)
_BAD_PRICES = ("-1.00", "1.234", "NaN", "inf", "abc", "99999999999.00")


class Writer(threading.Thread):
    def __init__(
        self, index: int, seed: int, session_factory: Any, pop: Population, stats: WriterStats
    ) -> None:
        super().__init__(name=f"writer-{index}", daemon=True)
        self.rng = random.Random(f"{seed}-writer-{index}")
        self.sf = session_factory
        self.pop = pop
        self.stats = stats
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.step()
            except Exception:  # a bug in the harness or the product: keep it, stop writing
                with self.stats.lock:
                    self.stats.bugs.append(traceback.format_exc())
                return

    def _execute(self, build: Any) -> Any:
        """Build and run one command; every outcome is counted, none raised."""
        with self.stats.lock:
            self.stats.attempted += 1
        try:
            command = build()
        except ValidationError as exc:
            with self.stats.lock:
                where = ".".join(str(p) for p in exc.errors()[0]["loc"][:1])
                self.stats.invalid[f"{exc.title}.{where}"] += 1
            return None
        name = type(command).__name__
        try:
            result = execute(command, self.sf)
        except CommandRejected as exc:
            with self.stats.lock:
                self.stats.refused[f"{name}:{type(exc).__name__}"] += 1
            return None
        except _PG_DOWN as exc:
            with self.stats.lock:
                self.stats.failed[type(exc).__name__] += 1
            self.halt.wait(0.1)  # the server is (re)starting: do not spin
            return None
        with self.stats.lock:
            self.stats.committed += 1
            self.stats.events += len(result.events)
        with self.pop.lock:
            self.pop.last_commit = (time.monotonic(), result.token)
        return result

    def _pick(self, ids: list[uuid.UUID]) -> uuid.UUID:
        with self.pop.lock:
            return self.rng.choice(ids)

    def step(self) -> None:
        rng, pop = self.rng, self.pop
        with pop.lock:
            n_products, n_customers = len(pop.products), len(pop.customers)
            n_open = len(pop.open_orders)
        if n_products < 5:
            kind = "create_product"
        elif n_customers < 3:
            kind = "register_customer"
        else:
            kind = rng.choices(
                [
                    "create_product",
                    "register_customer",
                    "rename_product",
                    "reprice_product",
                    "restock_product",
                    "rename_customer",
                    "place_order",
                    "cancel_order",
                    "ship_order",
                    "invalid",
                    "unknown",
                ],
                weights=[5, 5, 7, 5, 9, 7, 34, 9, 10, 5, 4],
            )[0]
        if kind in ("cancel_order", "ship_order") and not n_open:
            kind = "place_order"
        n = pop.next()
        if kind == "create_product":
            result = self._execute(
                lambda: CreateProduct(
                    sku=f"S-{n}",
                    name=f"{rng.choice(_NAMES)} {n}",
                    price=_price(rng),
                    stock=rng.randint(0, 300),
                    product_id=_uuid(rng),
                )
            )
            if result is not None:
                with pop.lock:
                    pop.products.append(result.id)
        elif kind == "register_customer":
            # Now and then an email that differs only in case from an earlier one: refused.
            number = rng.randint(1, n) if rng.random() < 0.05 else n
            email = f"c{number}@soak.example" if number == n else f"C{number}@SOAK.example"
            result = self._execute(
                lambda: RegisterCustomer(
                    email=email, name=rng.choice(_PEOPLE), customer_id=_uuid(rng)
                )
            )
            if result is not None:
                with pop.lock:
                    pop.customers.append(result.id)
        elif kind == "rename_product":
            pid = self._pick(pop.products)
            self._execute(lambda: RenameProduct(product_id=pid, name=f"{rng.choice(_NAMES)} {n}"))
        elif kind == "reprice_product":
            pid = self._pick(pop.products)
            self._execute(lambda: RepriceProduct(product_id=pid, price=_price(rng)))
        elif kind == "restock_product":
            pid = self._pick(pop.products)
            qty = -rng.randint(1, 80) if rng.random() < 0.35 else rng.randint(1, 200)
            self._execute(lambda: RestockProduct(product_id=pid, qty=qty))
        elif kind == "rename_customer":
            cid = self._pick(pop.customers)
            self._execute(lambda: RenameCustomer(customer_id=cid, name=rng.choice(_PEOPLE)))
        elif kind == "place_order":
            with pop.lock:
                cid = rng.choice(pop.customers)
                picked = rng.sample(pop.products, min(rng.randint(1, 4), len(pop.products)))
            items = [{"product_id": p, "qty": rng.choice((1, 1, 2, 3, 5, 20))} for p in picked]
            result = self._execute(
                lambda: PlaceOrder(customer_id=cid, items=items, order_id=_uuid(rng))
            )
            if result is not None:
                with pop.lock:
                    pop.open_orders.append(result.id)
                    pop.orders.append(result.id)
        elif kind in ("cancel_order", "ship_order"):
            with pop.lock:
                if pop.orders and rng.random() < 0.05:
                    oid = rng.choice(pop.orders)  # maybe closed already: refused
                elif pop.open_orders:
                    oid = pop.open_orders.pop(rng.randrange(len(pop.open_orders)))
                else:
                    return
            cls = CancelOrder if kind == "cancel_order" else ShipOrder
            self._execute(lambda: cls(order_id=oid))
        elif kind == "invalid":
            self._invalid(n)
        else:
            self._unknown()

    def _invalid(self, n: int) -> None:
        rng = self.rng
        choice = rng.randrange(6)
        if choice == 0:
            self._execute(
                lambda: CreateProduct(sku=f"X-{n}", name=rng.choice(_BAD_NAMES), price="1.00")
            )
        elif choice == 1:
            self._execute(
                lambda: CreateProduct(sku=f"X-{n}", name="ok", price=rng.choice(_BAD_PRICES))
            )
        elif choice == 2:
            self._execute(lambda: RegisterCustomer(email="not-an-email", name="N"))
        elif choice == 3:
            pid = self._pick(self.pop.products)
            self._execute(lambda: RestockProduct(product_id=pid, qty=0))
        elif choice == 4:
            pid = self._pick(self.pop.products)
            cid = self._pick(self.pop.customers)
            items = [{"product_id": pid, "qty": 1}, {"product_id": pid, "qty": 2}]
            self._execute(lambda: PlaceOrder(customer_id=cid, items=items))
        else:
            cid = self._pick(self.pop.customers)
            items = [{"product_id": self._pick(self.pop.products), "qty": rng.choice((0, -3))}]
            self._execute(lambda: PlaceOrder(customer_id=cid, items=items))

    def _unknown(self) -> None:
        """Well-formed commands about aggregates that do not exist: refused, nothing written."""
        rng = self.rng
        ghost = _uuid(rng)
        choice = rng.randrange(4)
        if choice == 0:
            self._execute(lambda: RenameProduct(product_id=ghost, name="Ghost"))
        elif choice == 1:
            self._execute(lambda: CancelOrder(order_id=ghost))
        elif choice == 2:
            cid = self._pick(self.pop.customers)
            self._execute(
                lambda: PlaceOrder(customer_id=cid, items=[{"product_id": ghost, "qty": 1}])
            )
        else:
            pid = self._pick(self.pop.products)
            self._execute(
                lambda: PlaceOrder(customer_id=ghost, items=[{"product_id": pid, "qty": 1}])
            )


# --------------------------------------------------------------------------- readers


@dataclass
class ReaderStats:
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
                except (*_REDIS_DOWN, redis.ResponseError) as exc:
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


# --------------------------------------------------------------------------- observers


@dataclass
class LagStats:
    max_entries: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROJECTIONS, 0))
    max_backlog: int = 0  # events committed but not yet relayed (outbox rows)
    latencies: list[float] = field(default_factory=list)  # commit -> visible in every view
    unresolved: float = 0.0  # longest wait that the run's end cut short


class Sampler(threading.Thread):
    """Every half second: each projection's lag + pending entries over all partitions, and
    the relay's backlog (outbox rows)."""

    def __init__(self, database_url: str, redis_url: str, stats: LagStats) -> None:
        super().__init__(name="sampler", daemon=True)
        self.database_url = database_url
        self.client = make_redis(redis_url, Settings(redis_socket_timeout=5))
        self.stats = stats
        self.halt = threading.Event()

    def run(self) -> None:
        keys = KeyMap(NAMESPACE)
        while not self.halt.wait(0.5):
            with contextlib.suppress(*_REDIS_DOWN, redis.ResponseError):
                for projection in PROJECTIONS:
                    lag = group_lag(self.client, keys, projection, PARTITIONS)
                    total = lag["lag"] + lag["pending"]
                    self.stats.max_entries[projection] = max(
                        self.stats.max_entries[projection], total
                    )
            with (
                contextlib.suppress(psycopg.Error),
                psycopg.connect(libpq_url(self.database_url), connect_timeout=2) as conn,
            ):
                backlog = conn.execute("SELECT count(*) FROM events.outbox").fetchone()[0]
                self.stats.max_backlog = max(self.stats.max_backlog, int(backlog))
        self.client.close()


class Probe(threading.Thread):
    """Commit-to-view latency: take the newest committed token, wait until every projection
    reflects it (the token names the versions to wait for), measure, repeat."""

    def __init__(self, redis_url: str, pop: Population, stats: LagStats) -> None:
        super().__init__(name="probe", daemon=True)
        self.client = make_redis(redis_url, Settings(redis_socket_timeout=5))
        self.service = QueryService(self.client, KeyMap(NAMESPACE), partitions=PARTITIONS)
        self.pop = pop
        self.stats = stats
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            with self.pop.lock:
                last = self.pop.last_commit
            if last is None:
                continue
            committed, token = last
            while not self.halt.is_set():
                try:
                    if not self.service.behind(token):
                        self.stats.latencies.append(time.monotonic() - committed)
                        break
                except (*_REDIS_DOWN, redis.ResponseError):
                    pass
                self.halt.wait(0.02)
            else:
                self.stats.unresolved = max(self.stats.unresolved, time.monotonic() - committed)
        self.client.close()


# --------------------------------------------------------------------------- faults


def _poison_entries(rng: random.Random) -> list[tuple[str, dict[str, str]]]:
    """Foreign entries no relay wrote: each is malformed in its own way."""
    good = {
        "event_id": str(_uuid(rng)),
        "type": "ProductCreated",
        "schema": "1",
        "aggregate_type": "product",
        "aggregate_id": str(_uuid(rng)),
        "version": "1",
        "partition_key": str(_uuid(rng)),
        "position": "0",
        "occurred_at": "2024-01-01T00:00:00+00:00",
        "payload": json.dumps({"sku": "F-1", "name": "Foreign", "price": "1.00", "stock": 1}),
    }
    cases = [
        ("missing-fields", {"hello": "world"}),
        ("unknown-type", {**good, "type": "ProductTeleported"}),
        ("future-schema", {**good, "schema": "99"}),
        ("wrong-types", {**good, "payload": json.dumps({"price": "free", "stock": "many"})}),
        ("not-json", {**good, "payload": "{not json"}),
        ("bad-version", {**good, "version": "seven"}),
        ("bad-uuid", {**good, "aggregate_id": "'; DROP TABLE x; --"}),
        ("protocol", {**good, "type": "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"}),
        ("huge", {**good, "payload": '{"sku":"' + "x" * 1_000_000}),
    ]
    picked = rng.sample(cases, rng.randint(1, 3))
    return [(why, {**fields, "event_id": str(_uuid(rng))}) for why, fields in picked]


class Injector(threading.Thread):
    def __init__(
        self,
        config: Config,
        servers: Servers,
        fleet: Fleet,
        env: dict[str, str],
        started: float,
    ) -> None:
        super().__init__(name="injector", daemon=True)
        self.rng = random.Random(f"{config.seed}-injector")
        self.schedule = fault_schedule(config)
        self.servers = servers
        self.fleet = fleet
        self.env = env
        self.started = started
        self.halt = threading.Event()
        self.fired: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.poisons: set[tuple[str, str]] = set()  # (stream, entry id) of injected entries
        self.dead_letters: dict[tuple[str, str, str], dict[str, str]] = {}
        self.replays: list[threading.Thread] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.client = make_redis(servers.redis_url, Settings(redis_socket_timeout=5))
        self.keys = KeyMap(NAMESPACE)

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> None:
        for at, kind in self.schedule:
            if self.halt.wait(max(0.0, self.started + at - time.monotonic())):
                return
            log(f"fault: {kind}")
            try:
                getattr(self, kind)()
                self.fired[kind] += 1
            except Exception:
                self.errors.append(f"{kind}: {traceback.format_exc()}")
                log(f"fault {kind} could not be injected: {traceback.format_exc(limit=2)}")
                with contextlib.suppress(Exception):
                    self.servers.ensure()

    def workers(self) -> list[Managed]:
        return [p for name, p in self.fleet.procs.items() if name.startswith("w")]

    # -- process faults ---------------------------------------------------------------

    def _kill_and_restart(self, proc: Managed) -> None:
        self.fleet.kill(proc)
        self.halt.wait(self.rng.uniform(0.0, 1.5))
        self.fleet.start(proc)

    def kill_relay(self) -> None:
        self._kill_and_restart(self.fleet.procs["relay"])

    def kill_worker(self) -> None:
        self._kill_and_restart(self.rng.choice(self.workers()))

    def stop_worker(self) -> None:
        """Frozen for longer than its lease: others take its slots over; when it wakes up,
        it still holds the batch it read before and applies it."""
        proc = self.rng.choice(self.workers())
        frozen = self.rng.uniform(LEASE_MS / 1000 * 1.5, LEASE_MS / 1000 * 4)
        if self.fleet.pause(proc):
            self.halt.wait(frozen)
            self.fleet.resume(proc)

    # -- server faults ----------------------------------------------------------------

    def redis_restart(self) -> None:
        """Valkey crashes (SIGKILL) and comes back from its append-only file."""
        pid = self.servers.pid("redis")
        if pid is None:
            raise RuntimeError("Valkey is not running")
        self._collect_dead_letters()
        os.kill(pid, signal.SIGKILL)
        self.servers.wait_gone("redis")
        self.halt.wait(self.rng.uniform(0.0, 1.0))
        self.servers.ensure()

    def redis_flushall(self) -> None:
        self._collect_dead_letters()
        self.client.flushall()

    def pg_restart(self) -> None:
        """Fast shutdown (SIGINT: disconnect everyone, roll back what is in flight), start."""
        pid = self.servers.pid("postgres")
        if pid is None:
            raise RuntimeError("PostgreSQL is not running")
        os.kill(pid, signal.SIGINT)
        self.servers.wait_gone("postgres")
        self.halt.wait(self.rng.uniform(0.0, 1.0))
        self.servers.ensure()

    # -- data faults ------------------------------------------------------------------

    def replay(self) -> None:
        """In the background: a rebuild takes a while and the other faults go on meanwhile."""
        name = self.rng.choice(PROJECTIONS)

        def run() -> None:
            try:
                done = self.fleet.children.run(
                    [sys.executable, "-m", "cqrs.app", "replay", name, "--yes", "--json"],
                    env=self.env,
                    timeout=600,
                )
                outcome = "ok" if done.returncode == 0 else "refused"
                if done.returncode != 0:
                    log(f"replay {name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
            except subprocess.TimeoutExpired:
                outcome = "timeout"
            except RuntimeError:
                return  # the run is stopping
            with self.lock:
                self.outcomes[f"replay:{outcome}"] += 1

        thread = threading.Thread(target=run, name=f"replay-{name}", daemon=True)
        thread.start()
        self.replays.append(thread)

    def poison(self) -> None:
        for why, fields in _poison_entries(self.rng):
            stream = self.keys.stream(self.rng.randrange(PARTITIONS))
            entry_id = self.client.xadd(stream, fields)
            self.poisons.add((stream, entry_id))
            self.outcomes[f"poison:{why}"] += 1

    def _collect_dead_letters(self) -> None:
        """Dead letters live in Redis: keep a copy before a fault may take them away."""
        with contextlib.suppress(*_REDIS_DOWN):
            for projection in PROJECTIONS:
                for d in list_dead_letters(self.client, self.keys, projection):
                    self.dead_letters[(projection, d.stream, d.entry_id)] = {
                        "error": d.error[:300],
                        "type": str(d.fields.get("type", "?"))[:60],
                        "aggregate_id": str(d.fields.get("aggregate_id", ""))[:60],
                        "version": str(d.fields.get("version", ""))[:20],
                    }

    def close(self) -> None:
        for thread in self.replays:
            thread.join(timeout=600)
        self._collect_dead_letters()
        self.client.close()


# --------------------------------------------------------------------------- the run


def _cli(
    children: Children, env: dict[str, str], *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    return children.run([sys.executable, "-m", "cqrs.app", *args], env=env, timeout=timeout)


def _count(database_url: str, sql: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def run(config: Config) -> dict[str, Any]:
    """The run; however it ends (done, failed, or `Interrupted` by SIGTERM/SIGINT), every
    process it started is gone and its temporary directories are removed (`_clean_up`)."""
    report: dict[str, Any] = {"seed": config.seed, "seconds": config.seconds}
    home: Path | None = None
    servers: Servers | None = None
    fleet: Fleet | None = None
    children = Children()
    threads: list[Any] = []
    try:
        home = Path(tempfile.mkdtemp(prefix="cqrs-soak-"))
        report["home"] = str(home)
        # The PostgreSQL user (we may be root) must reach the home, so everything stays
        # inside it.
        home.chmod(0o755)
        log_dir = home / "logs"
        log_dir.mkdir()
        servers = Servers(home)
        log(f"servers: {servers.database_url} {servers.redis_url} (home {home})")
        engine = make_engine(servers.database_url, pool_size=config.writers + 2)
        upgrade(engine)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CQRS_", "PG"))}
        env.update(
            CQRS_DATABASE_URL=servers.database_url,
            CQRS_REDIS_URL=servers.redis_url,
            CQRS_NAMESPACE=NAMESPACE,
            CQRS_HOME=str(home / "unused"),  # never start other embedded servers
            CQRS_PARTITIONS=str(PARTITIONS),
            CQRS_PROJECTOR_LEASE_MS=str(LEASE_MS),
            CQRS_RELAY_POLL_SECONDS="0.5",
            CQRS_STREAM_RETENTION=str(config.retention),
        )
        fleet = Fleet(env, log_dir, children)
        fleet.add("relay", "relay")
        for i in range(1, config.workers + 1):
            fleet.add(f"w{i}", "project", "--consumer", f"w{i}")

        pop, wstats, rstats, lag = Population(), WriterStats(), ReaderStats(), LagStats()
        sf = make_session_factory(engine)
        writers = [Writer(i, config.seed, sf, pop, wstats) for i in range(config.writers)]
        readers = [
            Reader(i, config.seed, servers.redis_url, pop, rstats) for i in range(config.readers)
        ]
        sampler = Sampler(servers.database_url, servers.redis_url, lag)
        probe = Probe(servers.redis_url, pop, lag)
        started = time.monotonic()
        injector = Injector(config, servers, fleet, env, started)
        threads = [*writers, *readers, sampler, probe, injector]
        for thread in threads:
            thread.start()

        # Run: supervise the processes until the time is up and every fault has fired.
        end = started + config.seconds
        while time.monotonic() < end or injector.is_alive():
            fleet.check()
            if time.monotonic() > end + 600:
                injector.halt.set()
                report["injector_overran"] = True
            time.sleep(0.25)
        log("faults done; settling")
        injector.close()
        servers.ensure()
        fleet.check()
        for thread in (*writers, *readers, probe):
            thread.halt.set()
        for thread in (*writers, *readers, probe):
            thread.join(timeout=60)
        sampler.halt.set()
        sampler.join(timeout=30)
        fleet.check()
        codes = fleet.stop_all()
        log(f"processes stopped: {codes}")

        # Drain what is left and let PostgreSQL judge.
        drained = _cli(children, env, "run", "--drain", timeout=1800)
        verify = _cli(children, env, "verify", "--json", "--limit", "20", timeout=600)
        try:
            verdict = json.loads(verify.stdout)
        except ValueError:
            verdict = {"differences": None, "error": (verify.stderr or verify.stdout)[-2000:]}
        injector.client = make_redis(servers.redis_url, Settings(redis_socket_timeout=5))
        injector._collect_dead_letters()
        injector.client.close()
        events = _count(servers.database_url, "SELECT count(*) FROM events.event_log")
        outbox = _count(servers.database_url, "SELECT count(*) FROM events.outbox")
        letters = injector.dead_letters
        poisoned = {k: v for k, v in letters.items() if (k[1], k[2]) in injector.poisons}
        real = {k: v for k, v in letters.items() if k not in poisoned}

        report.update(
            commands={
                "attempted": wstats.attempted,
                "committed": wstats.committed,
                "rejected": sum(wstats.refused.values()) + sum(wstats.invalid.values()),
                "refused_by_state": dict(wstats.refused),
                "invalid_input": dict(wstats.invalid),
                "failed_server_down": dict(wstats.failed),
                "writer_bugs": wstats.bugs[:5],
            },
            events={
                "in_log": events,
                "committed_by_writers": wstats.events,
                "relayed": events - outbox,
                "unpublished": outbox,
            },
            faults={k: injector.fired[k] for k in KINDS},
            fault_outcomes=dict(injector.outcomes),
            fault_errors=injector.errors[:10],
            dead_letters={
                "injected_entries": len(injector.poisons),
                "injected_dead_lettered": len(poisoned),
                "real_events": len(real),
                "real_by_cause": dict(
                    Counter(
                        f"{k[0]} from {'log' if k[1] == 'log' else 'stream'}: "
                        + v["error"].split(":")[0][:60]
                        for k, v in real.items()
                    )
                ),
                "real_examples": [
                    {"projection": k[0], "stream": k[1], "entry_id": k[2], **v}
                    for k, v in list(real.items())[:10]
                ],
            },
            queries={
                "reads": rstats.reads,
                "not_found": rstats.not_found,
                "unavailable": rstats.unavailable,
                "invalid_views": rstats.invalid[:20],
            },
            lag={
                "max_entries": lag.max_entries,
                "max_relay_backlog": lag.max_backlog,
                "commit_to_view_max_s": round(max(lag.latencies, default=0.0), 3),
                "commit_to_view_p50_s": round(statistics.median(lag.latencies), 3)
                if lag.latencies
                else None,
                "commit_to_view_p99_s": round(
                    statistics.quantiles(lag.latencies, n=100, method="inclusive")[98], 3
                )
                if len(lag.latencies) >= 2
                else None,
                "probes": len(lag.latencies),
                "unresolved_s": round(lag.unresolved, 3),
            },
            processes={
                "restarts": {p.name: p.starts - 1 for p in fleet.procs.values()},
                "unexpected_exits": [
                    {k: v for k, v in u.items() if k != "output"} for u in fleet.unexpected
                ],
                "stop_codes": codes,
            },
            drain={"returncode": drained.returncode, "output": drained.stdout.strip()[-300:]},
            verify=verdict,
        )
        problems = []
        if verdict.get("differences") != 0:
            problems.append(f"verify: {verdict.get('differences')} difference(s)")
        if outbox:
            problems.append(f"{outbox} event(s) never published")
        if real:
            problems.append(f"{len(real)} real event(s) dead-lettered")
        if rstats.invalid:
            problems.append(f"{len(rstats.invalid)} invalid view read(s)")
        if wstats.bugs:
            problems.append("writer raised an unexpected exception")
        crashed = [u for u in fleet.unexpected if u["traceback"]]
        if crashed:
            problems.append(f"{len(crashed)} process crash(es) with a traceback")
        if any(code != 0 for code in codes.values()):
            problems.append(f"processes did not stop cleanly: {codes}")
        if drained.returncode != 0:
            problems.append(f"drain exited {drained.returncode}: {drained.stderr[-500:]}")
        report["problems"] = problems
        report["views_equal_postgresql"] = verdict.get("differences") == 0
        report["ok"] = not problems
        for u in fleet.unexpected:
            if u["traceback"]:
                log(f"crash of {u['process']}:\n{u['output']}")
        if not report["ok"]:
            _keep_logs(log_dir, report)
        return report
    finally:
        _clean_up(config, report, home, servers, fleet, children, threads)


def _clean_up(
    config: Config,
    report: dict[str, Any],
    home: Path | None,
    servers: Servers | None,
    fleet: Fleet | None,
    children: Children,
    threads: list[Any],
) -> None:
    """Halt the threads, kill every process started (restarts refused from now on), stop
    the embedded servers (also when the signal came while they were starting: the state
    file in the home records them), kill whatever is left below us, remove the home and
    the directory embedded PostgreSQL may have used outside it (as root)."""
    for thread in threads:
        if hasattr(thread, "halt"):
            thread.halt.set()
    killed = children.close()
    if fleet is not None:
        report["process_pids"] = sorted(
            p.popen.pid for p in fleet.procs.values() if p.popen is not None
        )
    if killed:
        log(f"killed processes {killed}")
    if home is None:
        return
    try:
        stopped = servers.stop() if servers is not None else embedded.stop(home)
        report["server_pids"] = stopped
        log(f"stopped embedded servers {stopped}")
    except embedded.EmbeddedError as exc:
        log(f"could not stop the embedded servers: {exc}")
    left = kill_descendants()
    if left:
        log(f"killed leftover processes {left}")
    if not config.keep:
        shutil.rmtree(home, ignore_errors=True)
        # As root, PostgreSQL may run from a per-home directory in /var/tmp (see
        # cqrs.embedded); it belongs to this run's home alone.
        shutil.rmtree(embedded.external_root(home), ignore_errors=True)


def _keep_logs(log_dir: Path, report: dict[str, Any]) -> None:
    """A failed run keeps its process logs for the investigation (the data goes)."""
    kept = Path(tempfile.mkdtemp(prefix=f"cqrs-soak-logs-{report['seed']}-"))
    for path in log_dir.iterdir():
        shutil.copy(path, kept / path.name)
    report["logs"] = str(kept)


# --------------------------------------------------------------------------- the report


def render(report: dict[str, Any]) -> str:
    c, e, d, q, lag = (
        report["commands"],
        report["events"],
        report["dead_letters"],
        report["queries"],
        report["lag"],
    )
    faults = report["faults"]
    refused = sum(c["refused_by_state"].values())
    invalid = sum(c["invalid_input"].values())
    lines = [
        f"soak: seed {report['seed']}, {report['seconds'] / 60:.1f} min, "
        f"PostgreSQL 18 + Valkey 8 (AOF), relay + 3 workers (lease {LEASE_MS} ms)",
        f"commands: {c['attempted']} attempted, {c['committed']} committed, "
        f"{c['rejected']} rejected ({refused} refused by state, {invalid} invalid input), "
        f"{sum(c['failed_server_down'].values())} failed while PostgreSQL was down",
        f"events: {e['in_log']} in the log, {e['relayed']} relayed, "
        f"{e['unpublished']} left unpublished",
        "faults injected: "
        + ", ".join(f"{k} {faults[k]}" for k in KINDS)
        + f" (total {sum(faults.values())})",
        "  replays: "
        + ", ".join(
            f"{k.split(':')[1]} {v}"
            for k, v in sorted(report["fault_outcomes"].items())
            if k.startswith("replay:")
        ),
        f"dead letters: {d['injected_dead_lettered']} for the {d['injected_entries']} injected "
        f"malformed entries (expected), {d['real_events']} real events"
        + (f" {d['real_by_cause']}" if d["real_events"] else ""),
        f"queries: {q['reads']} reads, {q['not_found']} not found (while rebuilding), "
        f"{q['unavailable']} while Redis was down, {len(q['invalid_views'])} invalid views",
        "max observed lag: "
        + ", ".join(f"{k} {v} entries" for k, v in lag["max_entries"].items())
        + f"; relay backlog {lag['max_relay_backlog']} events; commit-to-view max "
        f"{lag['commit_to_view_max_s']} s (p50 {lag['commit_to_view_p50_s']} s, "
        f"p99 {lag['commit_to_view_p99_s']} s, {lag['probes']} probes)",
        f"process restarts: {report['processes']['restarts']}; unexpected exits: "
        f"{len(report['processes']['unexpected_exits'])}"
        + "".join(
            f"\n  {u['process']} exited {u['returncode']}: {u['last_line'][:160]}"
            for u in report["processes"]["unexpected_exits"][:5]
        ),
        f"views == PostgreSQL: {'yes' if report['views_equal_postgresql'] else 'no'}",
    ]
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    for diff in report["verify"].get("shown", [])[:10]:
        lines.append(f"  difference: {diff}")
    if "logs" in report:
        lines.append(f"logs kept in {report['logs']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "")[:80])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None)
    length.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument(
        "--min-each", type=int, default=None, help="faults of each kind (default 3, 1 if < 2 min)"
    )
    parser.add_argument("--retention", type=int, default=5000, help="CQRS_STREAM_RETENTION")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (args.minutes or 1.0) * 60
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    config = Config(
        seconds=seconds,
        seed=seed,
        writers=args.writers,
        readers=args.readers,
        min_each=args.min_each if args.min_each is not None else (3 if seconds >= 120 else 1),
        mean_interval=8.0 if seconds >= 120 else 3.0,
        retention=args.retention,
        keep=args.keep,
        json_path=args.json,
    )
    log(f"seed {seed}, {seconds:.0f} s; faults: {len(fault_schedule(config))} planned")
    try:
        with interrupt_on_signals():
            report = run(config)
    except Interrupted as exc:
        log(f"{exc}: every process of the run stopped and its directories removed")
        return exc.exit_code
    text = render(report)
    print(text, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({**report, "text": text}, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
