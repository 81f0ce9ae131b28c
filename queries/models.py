"""Query results. Field names are the view's field names, so `--json`, HTTP and Python
callers all see the same shape.

Each view's read model belongs to its projection's contract (`cqrs.contracts`); the query
side gets contracts only from the entry-point registry, never by importing the projector.
The built-in models are still reachable here by name (`ProductView`, `CustomerView`,
`OrderView`, `OrderLineView`): resolved from the registry on first use, not at import.
"""

from __future__ import annotations

import typing
from typing import Any, Generic, TypeVar

from cqrs.contracts import ViewModel, registered_contracts

T = TypeVar("T")

View = ViewModel

# Public name -> the registered projection whose contract's model it is.
_BUILTIN_MODELS = {"ProductView": "products", "CustomerView": "customers", "OrderView": "orders"}


class Page(View, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


def __getattr__(name: str) -> Any:
    """`ProductView` & co., from the registered contracts (PEP 562)."""
    if name in _BUILTIN_MODELS:
        return registered_contracts()[_BUILTIN_MODELS[name]].model
    if name == "OrderLineView":
        order = registered_contracts()["orders"].model
        assert order is not None
        return typing.get_args(order.model_fields["lines"].annotation)[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
