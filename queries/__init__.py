"""Read side: typed queries served only from the Redis views, never from PostgreSQL.

Other services use it as::

    from cqrs.queries import QueryService
    service = QueryService.from_settings()          # CQRS_REDIS_URL, CQRS_NAMESPACE
    product = service.get_product(product_id)
"""

from cqrs.queries.errors import BadCursor, BadView, NotCaughtUp, NotFound
from cqrs.queries.models import CustomerView, OrderLineView, OrderView, Page, ProductView
from cqrs.queries.service import QueryService

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
