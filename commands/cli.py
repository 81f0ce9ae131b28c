"""`cqrs product|customer|order ...`, `cqrs relay` and `cqrs db upgrade`.

Exit codes: 0 done, 1 rejected by the current state (unknown id, out of stock, conflict,
duplicate, wrong status), 2 invalid input. In both failure cases nothing is written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis
import typer
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError

from commands import catalog, customers, orders
from commands.db import make_session_factory
from commands.errors import CommandRejected
from commands.handlers import execute
from commands.migrations import LATEST_VERSION, current_version, upgrade
from commands.relay import Relay
from commands.results import CommandResult
from cqrs.cli import (
    fail_unreachable,
    load_settings,
    metrics_port_option,
    start_metrics_or_fail,
)
from cqrs.console import EXIT_USAGE, fail, out, print_json, validation_message
from cqrs.logs import configure_logging
from cqrs.metrics import Gauge
from cqrs.settings import Settings
from cqrs.signals import install_stop_handlers
from cqrs.startup import prepare_or_exit
from cqrs.urls import mask_url
from cqrs.wiring import Wiring

log = logging.getLogger(__name__)

product_app = typer.Typer(help="Catalog service: products, prices and stock.", no_args_is_help=True)
customer_app = typer.Typer(help="Customers service: registration and names.", no_args_is_help=True)
order_app = typer.Typer(help="Orders service: place, cancel, ship.", no_args_is_help=True)
db_app = typer.Typer(help="Write-side database schema.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object (id, version, token).")


def ensure_schema(wiring: Wiring) -> None:
    if current_version(wiring.engine) < LATEST_VERSION:
        upgrade(wiring.engine)


def _publish_now(wiring: Wiring) -> None:
    """Best effort: hand the new events to Redis right away so a query can see them
    without waiting for the relay's next wake-up; the relay remains the safety net."""
    try:
        relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
        with relay._connect() as conn:
            relay.publish_batch(conn)
    except Exception as exc:  # the relay will publish later; the command has succeeded
        log.debug("publish after commit skipped: %s", exc)


def run_command(
    build: Callable[[], BaseModel], json_output: bool, describe: Callable[[CommandResult], str]
) -> None:
    settings = load_settings()
    try:
        command = build()
    except ValidationError as exc:
        fail(validation_message(exc), EXIT_USAGE)
    wiring = Wiring(settings)
    try:
        ensure_schema(wiring)
        result = execute(command, make_session_factory(wiring.engine))
        if settings.publish_on_commit:
            _publish_now(wiring)
    except CommandRejected as exc:
        fail(str(exc))
    except OperationalError as exc:
        fail_unreachable(exc)
    except Exception as exc:
        from cqrs.embedded import EmbeddedError

        if isinstance(exc, EmbeddedError):
            fail(str(exc))
        raise
    finally:
        wiring.close()
    if json_output:
        print_json(result.as_json())
    else:
        out.print(describe(result))
        out.print(f"[dim]token {result.token}[/dim]")


# --- catalog -----------------------------------------------------------------------------


@product_app.command("create")
def product_create(
    sku: str = typer.Option(..., "--sku", help="Unique stock-keeping unit."),
    name: str = typer.Option(..., "--name", help="Display name."),
    price: str = typer.Option(..., "--price", help="Decimal, at most 2 places, e.g. 12.50."),
    stock: int = typer.Option(0, "--stock", help="Units in stock (>= 0)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Create a product."""
    run_command(
        lambda: catalog.CreateProduct(sku=sku, name=name, price=price, stock=stock),
        json_output,
        lambda r: f"created product {r.id} (version {r.version})",
    )


@product_app.command("rename")
def product_rename(
    product_id: str = typer.Argument(..., metavar="ID"),
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JSON_OPTION,
) -> None:
    """Rename a product (orders keep the name they were placed with)."""
    run_command(
        lambda: catalog.RenameProduct(product_id=product_id, name=name),
        json_output,
        lambda r: f"renamed product {r.id} (version {r.version})",
    )


@product_app.command("reprice")
def product_reprice(
    product_id: str = typer.Argument(..., metavar="ID"),
    price: str = typer.Argument(..., metavar="PRICE"),
    json_output: bool = JSON_OPTION,
) -> None:
    """Change a product's price (orders keep the price they were placed with)."""
    run_command(
        lambda: catalog.RepriceProduct(product_id=product_id, price=price),
        json_output,
        lambda r: f"repriced product {r.id} (version {r.version})",
    )


# Without ignore_unknown_options click reads a negative QTY ("-5") as short options and
# fails with "No such option: -5", so removing stock would need "--" before it.
@product_app.command("restock", context_settings={"ignore_unknown_options": True})
def product_restock(
    product_id: str = typer.Argument(..., metavar="ID"),
    qty: int = typer.Argument(..., metavar="QTY", help="Units to add; negative removes."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Add (or, with a negative QTY, remove) stock; stock never goes below zero."""
    run_command(
        lambda: catalog.RestockProduct(product_id=product_id, qty=qty),
        json_output,
        lambda r: f"restocked product {r.id} (version {r.version})",
    )


# --- customers ---------------------------------------------------------------------------


@customer_app.command("register")
def customer_register(
    email: str = typer.Option(..., "--email", help="Unique email (case-insensitive)."),
    name: str = typer.Option(..., "--name", help="Display name."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Register a customer; the email must be unique (case-insensitive)."""
    run_command(
        lambda: customers.RegisterCustomer(email=email, name=name),
        json_output,
        lambda r: f"registered customer {r.id} (version {r.version})",
    )


@customer_app.command("rename")
def customer_rename(
    customer_id: str = typer.Argument(..., metavar="ID"),
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JSON_OPTION,
) -> None:
    """Rename a customer (their order views follow)."""
    run_command(
        lambda: customers.RenameCustomer(customer_id=customer_id, name=name),
        json_output,
        lambda r: f"renamed customer {r.id} (version {r.version})",
    )


# --- orders ------------------------------------------------------------------------------


def parse_item(text: str) -> dict[str, str]:
    """`PRODUCT_ID:QTY` -> fields for OrderItem; the model validates the values."""
    product_id, sep, qty = text.rpartition(":")
    if not sep or not product_id or not qty:
        raise ValueError(f"--item must be PRODUCT_ID:QTY, got {text!r}")
    return {"product_id": product_id.strip(), "qty": qty.strip()}


@order_app.command("place")
def order_place(
    customer_id: str = typer.Option(..., "--customer", help="Customer id."),
    items: list[str] = typer.Option(..., "--item", help="PRODUCT_ID:QTY (repeatable)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Place an order, reserving stock for every line in the same transaction."""

    def build() -> orders.PlaceOrder:
        try:
            parsed = [parse_item(i) for i in items]
        except ValueError as exc:
            fail(str(exc), EXIT_USAGE)
        return orders.PlaceOrder(customer_id=customer_id, items=parsed)

    run_command(build, json_output, lambda r: f"placed order {r.id} (version {r.version})")


@order_app.command("cancel")
def order_cancel(
    order_id: str = typer.Argument(..., metavar="ID"), json_output: bool = JSON_OPTION
) -> None:
    """Cancel an order and release its stock (not once shipped)."""
    run_command(
        lambda: orders.CancelOrder(order_id=order_id),
        json_output,
        lambda r: f"cancelled order {r.id} (version {r.version})",
    )


@order_app.command("ship")
def order_ship(
    order_id: str = typer.Argument(..., metavar="ID"), json_output: bool = JSON_OPTION
) -> None:
    """Mark an order shipped (not once cancelled)."""
    run_command(
        lambda: orders.ShipOrder(order_id=order_id),
        json_output,
        lambda r: f"shipped order {r.id} (version {r.version})",
    )


# --- operations --------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(
    json_output: bool = typer.Option(
        False, "--json", help="One JSON object: migrations applied and the schema version."
    ),
) -> None:
    """Create or migrate the write-side schema (also done automatically on first use)."""
    wiring = Wiring(load_settings())
    try:
        applied = upgrade(wiring.engine)
        version = current_version(wiring.engine)
    except OperationalError as exc:
        fail_unreachable(exc)
    finally:
        wiring.close()
    if json_output:
        print_json({"applied": applied, "version": version})
    else:
        out.print(f"schema at version {version}" + (f" (applied {applied})" if applied else ""))


def outbox_gauges(relay: Relay) -> list[Gauge]:
    """The relay's backlog, computed at scrape time (one small query)."""
    count, oldest = relay.pending_count()
    age = 0.0
    if oldest is not None:
        age = max((datetime.now(UTC) - oldest).total_seconds(), 0.0)
    return [
        Gauge("cqrs_outbox_backlog", "Committed events not yet published", count),
        Gauge("cqrs_outbox_oldest_seconds", "Age of the oldest unpublished event (0: none)", age),
    ]


def relay_command(
    drain: bool = typer.Option(False, "--drain", help="Publish what is pending, then exit."),
    metrics_port: int = metrics_port_option(),
) -> None:
    """Move committed events from the PostgreSQL log to Redis Streams until stopped."""
    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM while waiting for the servers is a stop
    configure_logging(logging.INFO)
    wiring = Wiring(load_settings())
    try:
        prepare_or_exit(wiring, stop, long_running=not drain, postgres=True)
        ensure_schema(wiring)
        relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
        metrics = None if drain else start_metrics_or_fail(wiring.settings, metrics_port)
        if metrics is not None:
            relay.metrics = metrics
            metrics.add_gauges(lambda: outbox_gauges(relay))
        if drain:
            out.print(f"published {relay.drain(stop)} event(s)")
            return
        relay.run(stop)
    except (OperationalError, psycopg.OperationalError) as exc:
        # One line, not a traceback; `run` itself retries, so this is startup or --drain.
        fail_unreachable(exc)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        fail_unreachable(exc)
    finally:
        wiring.close()


@dataclass
class DrainReport:
    """What `cqrs run --drain` did, counted exactly: events published by the relay, views
    built from history (events read per projection, each event once), and the live
    deliveries after that (one per event and projection that handles it)."""

    published: int = 0
    built: dict[str, dict[str, Any]] = field(default_factory=dict)
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "built": self.built,
            "deliveries": {
                "applied": self.applied,
                "already_applied": self.duplicates,
                "dead_lettered": self.dead_lettered,
            },
        }

    def lines(self) -> list[str]:
        built = [
            f"{name}: views built from the {b['source']}, {b['events']} event(s)"
            for name, b in self.built.items()
        ]
        return [
            f"published {self.published} event(s) to the streams",
            *built,
            f"live deliveries (one per event and projection handling it): {self.applied} "
            f"applied, {self.duplicates} already applied, {self.dead_lettered} dead-lettered",
        ]


def build_missing_views(worker: Any, wiring: Wiring, stop: threading.Event) -> dict[str, Any]:
    """Build, from history, the projections that have no valid views, and say how many
    events each build read. The worker would build them too, but only logs the counts; a
    build that fails here is left to the worker, which retries it."""
    from projector.replay import AlreadyBuilt, Replayer, ReplayError

    built: dict[str, Any] = {}
    worker.refresh_status()
    for projection in worker.projections:
        if projection.name not in worker.needs_build or stop.is_set():
            continue
        replayer = Replayer(wiring.redis, wiring.settings, projection, wiring.database_url)
        try:
            result = replayer.run("auto", stop=stop, only_if_invalid=True)
        except (AlreadyBuilt, ReplayError, psycopg.OperationalError):
            continue
        built[projection.name] = {"source": result.source, "events": result.events}
    worker.refresh_status()
    return built


def run_command_(
    drain: bool = typer.Option(
        False, "--drain", help="Relay and project everything pending, then exit 0."
    ),
    metrics_port: int = metrics_port_option(),
    json_output: bool = typer.Option(
        False, "--json", help="With --drain: print the counts as one JSON object."
    ),
) -> None:
    """Run the relay and every projection in one process (development, demos, scripts)."""
    from projector.cli import add_projection_gauges
    from projector.registry import PROJECTIONS
    from projector.worker import Worker

    stop = threading.Event()
    install_stop_handlers(stop)  # first: a SIGTERM while waiting for the servers is a stop
    configure_logging(logging.INFO)
    wiring = Wiring(load_settings())
    try:
        prepare_or_exit(wiring, stop, long_running=not drain, postgres=True)
        ensure_schema(wiring)
        relay = Relay(wiring.database_url, wiring.redis, wiring.settings)
        worker = Worker(
            wiring.redis, wiring.settings, PROJECTIONS.values(), database_url=wiring.database_url
        )
        metrics = None if drain else start_metrics_or_fail(wiring.settings, metrics_port)
        if metrics is not None:
            relay.metrics = worker.metrics = metrics
            metrics.add_gauges(lambda: outbox_gauges(relay))
            add_projection_gauges(metrics, wiring, list(PROJECTIONS.values()))
        log.info(
            "running the relay and %d projections (%s) over %d partitions as consumer %s",
            len(PROJECTIONS),
            ", ".join(PROJECTIONS),
            worker.partitions,
            worker.consumer,
            extra={"consumer": worker.consumer},
        )
        if drain:
            report = DrainReport()
            # Relay, project to the end, and go round again if writers added more meanwhile.
            while (published := relay.drain(stop)) or not worker.caught_up():
                report.published += published
                report.built.update(build_missing_views(worker, wiring, stop))
                worker.run(stop, drain=True)
                if stop.is_set():
                    break
            stats = worker.stats
            report.applied, report.duplicates = stats.applied, stats.duplicates
            report.dead_lettered = stats.dead_lettered
            if json_output:
                print_json(report.as_json())
            else:
                for line in report.lines():
                    out.print(line)
            return
        relay_thread = threading.Thread(target=relay.run, args=(stop,), name="relay", daemon=True)
        relay_thread.start()
        worker.run(stop)
        relay_thread.join(timeout=10)
    finally:
        wiring.close()


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
    import sys

    from commands.demo import DEMO_SIZE, run_demo

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


def doctor_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check Redis (version, eviction policy, persistence, stream retention) and PostgreSQL
    (reachable, schema version), each with how to fix it; exit 1 on any error."""
    from commands.doctor import ERROR, WARNING, run_checks

    wiring = Wiring(load_settings())
    try:
        checks = run_checks(wiring.settings, wiring.database_url, wiring.redis_url, wiring.redis)
    finally:
        wiring.close()
    failed = any(c.status == ERROR for c in checks)
    if json_output:
        print_json({"ok": not failed, "checks": [c.as_json() for c in checks]})
    else:
        from rich.text import Text

        style = {ERROR: "bold red", WARNING: "yellow"}
        for check in checks:
            line = Text(f"{check.status:<7} ", style=style.get(check.status, "green"))
            line.append(mask_url(f"{check.name}: {check.detail}"))
            out.print(line)
            if check.fix and check.status != "ok":
                out.print(Text(mask_url(f"        fix: {check.fix}"), style="dim"))
        errors = sum(c.status == ERROR for c in checks)
        warnings = sum(c.status == WARNING for c in checks)
        out.print(f"{errors} error(s), {warnings} warning(s)")
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_command)
    app.add_typer(product_app, name="product")
    app.add_typer(customer_app, name="customer")
    app.add_typer(order_app, name="order")
    app.add_typer(db_app, name="db")
    app.command("relay")(relay_command)
    app.command("run")(run_command_)
    app.command("demo")(demo_command)
