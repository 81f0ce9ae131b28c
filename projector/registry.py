"""Every projection the system runs. Adding one: a module plus one line here."""

from __future__ import annotations

from projector.customers import CUSTOMERS
from projector.orders import ORDERS
from projector.products import PRODUCTS
from projector.projection import Projection

PROJECTIONS: dict[str, Projection] = {p.name: p for p in (PRODUCTS, CUSTOMERS, ORDERS)}
