"""SQLAlchemy models of the write side and the factory for sessions.

Each service owns one PostgreSQL schema; the event log and the outbox live in `events`.
The models describe the schema (a test keeps them and the migrations in agreement) for
tools and ad-hoc sessions; the command handlers do not load them: they write with
explicit SQL on the engine's pooled connections (commands/uow.py), because the ORM's unit
of work cost more Python per command than everything else together. Relationships are
`lazy="raise"` so an accidental N+1 is an error, not a slow query.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Engine,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Numeric,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MONEY = Numeric(12, 2)

# Input limits: no name or SKU can blow up a row, a key or a view.
MAX_NAME = 200
MAX_SKU = 64
MAX_EMAIL = 254
MAX_ORDER_LINES = 100


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class EventLogRow(Base):
    """Every event ever committed, kept forever: the source for rebuilding any view."""

    __tablename__ = "event_log"
    __table_args__ = (
        UniqueConstraint("aggregate_type", "aggregate_id", "aggregate_version"),
        {"schema": "events"},
    )

    position: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(UUID, unique=True)
    aggregate_type: Mapped[str] = mapped_column(String(32))
    aggregate_id: Mapped[uuid.UUID] = mapped_column(UUID)
    aggregate_version: Mapped[int] = mapped_column(Integer)
    partition_key: Mapped[uuid.UUID] = mapped_column(UUID)
    event_type: Mapped[str] = mapped_column(String(64))
    schema_version: Mapped[int] = mapped_column(SmallInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class OutboxRow(Base):
    """Positions of events not yet on a stream. The relay deletes a row once its event is
    published, so this table stays small while the log keeps the whole history."""

    __tablename__ = "outbox"
    __table_args__ = {"schema": "events"}

    position: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("events.event_log.position"), primary_key=True
    )


class RelayMark(Base):
    """The highest log position the relay published per partition stream (migration 2)."""

    __tablename__ = "relay_marks"
    __table_args__ = {"schema": "events"}

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    partitions: Mapped[int] = mapped_column(Integer, primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger)


class RedisReplid(Base):
    """Redis masters' replication ids the projector has seen (migration 2)."""

    __tablename__ = "redis_replids"
    __table_args__ = {"schema": "events"}

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    replid: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        CheckConstraint("stock >= 0", name="stock_not_negative"),
        CheckConstraint("price >= 0", name="price_not_negative"),
        {"schema": "catalog"},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    sku: Mapped[str] = mapped_column(String(MAX_SKU), unique=True)
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    price: Mapped[Decimal] = mapped_column(MONEY)
    stock: Mapped[int] = mapped_column(Integer)
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    # For ORM sessions: SQLAlchemy adds "AND version = :old" to every UPDATE. The command
    # handlers write the same guard explicitly (commands/catalog.py, commands/orders.py).
    __mapper_args__ = {"version_id_col": version}


class Customer(Base):
    __tablename__ = "customers"
    __table_args__ = (
        Index("uq_customers_email_lower", func.lower("email"), unique=True),
        {"schema": "customers"},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    email: Mapped[str] = mapped_column(String(MAX_EMAIL))
    name: Mapped[str] = mapped_column(String(MAX_NAME))
    version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __mapper_args__ = {"version_id_col": version}


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_customer_id", "customer_id"),
        {"schema": "orders"},
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID, primary_key=True)
    # No foreign key into the customers schema: services own their tables, and a split
    # deployment could not have one either.
    customer_id: Mapped[uuid.UUID] = mapped_column(UUID)
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[Decimal] = mapped_column(MONEY)
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    shipped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    version: Mapped[int] = mapped_column(Integer)

    lines: Mapped[list[OrderLineRow]] = relationship(
        lazy="raise", order_by="OrderLineRow.line_no", cascade="all, delete-orphan"
    )

    __mapper_args__ = {"version_id_col": version}


class OrderLineRow(Base):
    __tablename__ = "order_lines"
    __table_args__ = {"schema": "orders"}

    order_id: Mapped[uuid.UUID] = mapped_column(
        UUID, ForeignKey("orders.orders.id", ondelete="CASCADE"), primary_key=True
    )
    line_no: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(UUID)
    name: Mapped[str] = mapped_column(Text)
    unit_price: Mapped[Decimal] = mapped_column(MONEY)
    qty: Mapped[int] = mapped_column(Integer)
    line_total: Mapped[Decimal] = mapped_column(MONEY)


def make_session_factory(engine: Engine) -> sessionmaker:
    """What callers hand to `commands.handlers.execute`: commands borrow connections from
    the pool of the engine it is bound to."""
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)
