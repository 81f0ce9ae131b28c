"""Read side: typed queries served only from the Redis views, never from PostgreSQL.

Other services use it as::

    from cqrs.queries import QueryService
    service = QueryService.from_settings()          # CQRS_REDIS_URL, CQRS_NAMESPACE
    product = service.get_product(product_id)
"""

from typing import Any

from cqrs.queries import models
from cqrs.queries.errors import BadCursor, BadView, NotCaughtUp, NotFound
from cqrs.queries.models import Page
from cqrs.queries.service import QueryService


def __getattr__(name: str) -> Any:
    """The built-in read models, from their contracts on first use (`queries.models`)."""
    return getattr(models, name)


__all__ = [
    "BadCursor",
    "BadView",
    "CustomerView",
    "NotCaughtUp",
    "NotFound",
    "OrderLineView",
    "OrderView",
    "Page",
    "ProductView",
    "QueryService",
]
