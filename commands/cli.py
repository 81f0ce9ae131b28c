"""`cqrs product|customer|order ...` and `cqrs db upgrade`.

Exit codes: 0 done, 1 rejected by the current state (unknown id, out of stock, conflict,
duplicate, wrong status), 2 invalid input. In both failure cases nothing is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import typer
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError

from cqrs.cli import fail_unreachable, load_settings
from cqrs.commands import catalog, customers, notify, orders
from cqrs.commands.db import make_session_factory
from cqrs.commands.errors import CommandRejected
from cqrs.commands.handlers import execute
from cqrs.commands.migrations import current_version, ensure_schema, upgrade
from cqrs.commands.results import CommandResult
from cqrs.console import EXIT_USAGE, fail, out, print_json, validation_message
from cqrs.hooks import hooks
from cqrs.wiring import Wiring

log = logging.getLogger(__name__)

product_app = typer.Typer(help="Catalog service: products, prices and stock.", no_args_is_help=True)
customer_app = typer.Typer(help="Customers service: registration and names.", no_args_is_help=True)
order_app = typer.Typer(help="Orders service: place, cancel, ship.", no_args_is_help=True)
db_app = typer.Typer(help="Write-side database schema.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print one JSON object (id, version, token).")


def _publish_now(wiring: Wiring) -> None:
    """Best effort: hand the new events to Redis right away so a query can see them
    without waiting for the relay's next wake-up; the relay remains the safety net. The
    relay's `publish_pending` comes through `cqrs.hooks` (the composition sets it)."""
    publish = hooks.publish_pending
    if publish is None:
        return
    try:
        publish(wiring.database_url, wiring.redis, wiring.settings)
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
        ensure_schema(wiring.engine)
        result = execute(command, make_session_factory(wiring.engine))
        # A wake-up sent after commit must leave before this short-lived process does.
        notify.flush(wiring.engine)
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


def register(app: typer.Typer) -> None:
    app.add_typer(product_app, name="product")
    app.add_typer(customer_app, name="customer")
    app.add_typer(order_app, name="order")
    app.add_typer(db_app, name="db")
