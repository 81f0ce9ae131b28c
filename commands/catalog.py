"""Catalog service: products, their price and stock."""

from __future__ import annotations

import uuid

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from commands.db import Product
from commands.errors import Duplicate, InsufficientStock, NotFound
from commands.fields import MAX_STOCK, Name, Price, Sku
from commands.results import CommandResult
from commands.uow import UnitOfWork
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


def get_product(uow: UnitOfWork, product_id: uuid.UUID, *, for_update: bool = False) -> Product:
    query = select(Product).where(Product.id == product_id)
    if for_update:
        query = query.with_for_update()
    product = uow.session.scalars(query).one_or_none()
    if product is None:
        raise NotFound(f"product {product_id} not found")
    return product


def create_product(cmd: CreateProduct, uow: UnitOfWork) -> CommandResult:
    if uow.session.get(Product, cmd.product_id) is not None:
        raise Duplicate(f"product {cmd.product_id} already exists")
    if uow.session.scalar(select(Product.id).where(Product.sku == cmd.sku)) is not None:
        raise Duplicate(f"a product with SKU {cmd.sku!r} already exists")
    product = Product(
        id=cmd.product_id, sku=cmd.sku, name=cmd.name, price=cmd.price, stock=cmd.stock
    )
    uow.session.add(product)
    try:
        uow.session.flush()
    except IntegrityError as exc:
        # Two creates raced past the checks above.
        if "pk_products" in str(exc.orig):
            raise Duplicate(f"product {cmd.product_id} already exists") from exc
        raise Duplicate(f"a product with SKU {cmd.sku!r} already exists") from exc
    uow.record(
        "product",
        product.id,
        product.version,
        ProductCreated(sku=cmd.sku, name=cmd.name, price=cmd.price, stock=cmd.stock),
    )
    events = uow.commit()
    return CommandResult(product.id, product.version, events)


def rename_product(cmd: RenameProduct, uow: UnitOfWork) -> CommandResult:
    product = get_product(uow, cmd.product_id)
    product.name = cmd.name
    uow.session.flush()
    uow.record("product", product.id, product.version, ProductRenamed(name=cmd.name))
    return CommandResult(product.id, product.version, uow.commit())


def reprice_product(cmd: RepriceProduct, uow: UnitOfWork) -> CommandResult:
    product = get_product(uow, cmd.product_id)
    product.price = cmd.price
    uow.session.flush()
    uow.record("product", product.id, product.version, ProductRepriced(price=cmd.price))
    return CommandResult(product.id, product.version, uow.commit())


def restock_product(cmd: RestockProduct, uow: UnitOfWork) -> CommandResult:
    product = get_product(uow, cmd.product_id)
    if product.stock + cmd.qty < 0:
        raise InsufficientStock(
            f"insufficient stock for product {product.id}: "
            f"cannot remove {-cmd.qty}, only {product.stock} in stock"
        )
    if product.stock + cmd.qty > MAX_STOCK:
        raise InsufficientStock(f"stock of product {product.id} would exceed {MAX_STOCK}")
    product.stock += cmd.qty
    uow.session.flush()
    uow.record(
        "product",
        product.id,
        product.version,
        ProductRestocked(delta=cmd.qty, stock=product.stock),
    )
    return CommandResult(product.id, product.version, uow.commit())
