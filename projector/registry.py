"""Every projection the system runs. Adding one: a module plus one line here."""

from __future__ import annotations

from cqrs.projector.customers import CUSTOMERS
from cqrs.projector.orders import ORDERS
from cqrs.projector.products import PRODUCTS
from cqrs.projector.projection import Projection

PROJECTIONS: dict[str, Projection] = {p.name: p for p in (PRODUCTS, CUSTOMERS, ORDERS)}
