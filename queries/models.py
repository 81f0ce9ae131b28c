"""Query results. Field names are the view's field names, so `--json`, HTTP and Python
callers all see the same shape."""

from __future__ import annotations

from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from cqrs.events import Money

T = TypeVar("T")


class View(BaseModel):
    model_config = ConfigDict(frozen=True)


class ProductView(View):
    id: UUID
    sku: str
    name: str
    price: Money
    stock: int
    units_sold: int
    revenue: Money
    version: int


class CustomerView(View):
    id: UUID
    email: str
    name: str
    order_count: int
    lifetime_value: Money
    version: int


class OrderLineView(View):
    product_id: UUID
    name: str
    unit_price: Money
    qty: int
    line_total: Money


class OrderView(View):
    id: UUID
    customer_id: UUID
    customer_name: str
    status: str
    lines: list[OrderLineView]
    total: Money
    placed_at: datetime
    shipped_at: datetime | None = None
    cancelled_at: datetime | None = None
    version: int


class Page(View, Generic[T]):
    items: list[T]
    next_cursor: str | None = None
