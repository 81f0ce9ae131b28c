"""Catalog service: products, their price and stock."""

from __future__ import annotations

import uuid
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cqrs.commands.errors import Duplicate, InsufficientStock, NotFound
from cqrs.commands.fields import MAX_STOCK, Name, Price, Sku
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import UnitOfWork
from cqrs.events import ProductCreated, ProductRenamed, ProductRepriced, ProductRestocked


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateProduct(Command):
    sku: Sku
    name: Name
    price: Price
    stock: int = Field(default=0, ge=0, le=MAX_STOCK)
    product_id: uuid.UUID = Field(default_factory=uuid.uuid4)


class RenameProduct(Command):
    product_id: uuid.UUID
    name: Name


class RepriceProduct(Command):
    product_id: uuid.UUID
    price: Price


class RestockProduct(Command):
    product_id: uuid.UUID
    qty: int = Field(ge=-MAX_STOCK, le=MAX_STOCK)

    @field_validator("qty")
    @classmethod
    def _not_zero(cls, qty: int) -> int:
        if qty == 0:
            raise ValueError("must not be zero")
        return qty


_INSERT = (
    "INSERT INTO catalog.products (id, sku, name, price, stock, version)"
    " VALUES (%s, %s, %s, %s, %s, 1)"
)
_READ = "SELECT name, price, stock, version FROM catalog.products WHERE id = %s"
# Each UPDATE names the version it read: a concurrent change makes it match nothing. They
# are sent on their own (not folded into the commit statement): a writer blocked on the
# row lock then shows as this UPDATE in pg_stat_activity.
_RENAME = "UPDATE catalog.products SET name = %s, version = %s WHERE id = %s AND version = %s"
_REPRICE = "UPDATE catalog.products SET price = %s, version = %s WHERE id = %s AND version = %s"
_RESTOCK = "UPDATE catalog.products SET stock = %s, version = %s WHERE id = %s AND version = %s"


def get_product(uow: UnitOfWork, product_id: uuid.UUID) -> tuple[str, Decimal, int, int]:
    """The product's (name, price, stock, version), read without a lock: the versioned
    UPDATE that follows detects a concurrent change."""
    row = uow.send(_READ, (product_id,)).fetchone()
    if row is None:
        raise NotFound(f"product {product_id} not found")
    return row


def create_product(cmd: CreateProduct, uow: UnitOfWork) -> CommandResult:
    # No SELECT first: the constraints decide, in the statement that appends the event (two
    # creates racing on one id or SKU are settled the same way); a reused id is reported
    # before a reused SKU, as the SELECTs did before.
    taken = Duplicate(f"product {cmd.product_id} already exists")
    uow.reject_if_exists(taken, cmd.product_id, "pk_products")
    uow.reject_on_conflict(
        Duplicate(f"a product with SKU {cmd.sku!r} already exists"), "uq_products_sku"
    )
    uow.write(_INSERT, (cmd.product_id, cmd.sku, cmd.name, cmd.price, cmd.stock))
    uow.record(
        "product",
        cmd.product_id,
        1,
        ProductCreated(sku=cmd.sku, name=cmd.name, price=cmd.price, stock=cmd.stock),
    )
    return CommandResult(cmd.product_id, 1, uow.commit())


def _update(uow: UnitOfWork, sql: str, value: object, product_id: uuid.UUID, read: int) -> int:
    version = read + 1
    uow.expect_rows(uow.send(sql, (value, version, product_id, read)), 1, f"product {product_id}")
    return version


def rename_product(cmd: RenameProduct, uow: UnitOfWork) -> CommandResult:
    *_, read = get_product(uow, cmd.product_id)
    version = _update(uow, _RENAME, cmd.name, cmd.product_id, read)
    uow.record("product", cmd.product_id, version, ProductRenamed(name=cmd.name))
    return CommandResult(cmd.product_id, version, uow.commit())


def reprice_product(cmd: RepriceProduct, uow: UnitOfWork) -> CommandResult:
    *_, read = get_product(uow, cmd.product_id)
    version = _update(uow, _REPRICE, cmd.price, cmd.product_id, read)
    uow.record("product", cmd.product_id, version, ProductRepriced(price=cmd.price))
    return CommandResult(cmd.product_id, version, uow.commit())


def restock_product(cmd: RestockProduct, uow: UnitOfWork) -> CommandResult:
    _, _, stock, read = get_product(uow, cmd.product_id)
    if stock + cmd.qty < 0:
        raise InsufficientStock(
            f"insufficient stock for product {cmd.product_id}: "
            f"cannot remove {-cmd.qty}, only {stock} in stock"
        )
    if stock + cmd.qty > MAX_STOCK:
        raise InsufficientStock(f"stock of product {cmd.product_id} would exceed {MAX_STOCK}")
    stock += cmd.qty
    version = _update(uow, _RESTOCK, stock, cmd.product_id, read)
    uow.record("product", cmd.product_id, version, ProductRestocked(delta=cmd.qty, stock=stock))
    return CommandResult(cmd.product_id, version, uow.commit())
