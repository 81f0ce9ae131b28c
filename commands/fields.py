"""Field types shared by the command models: the input rules live here, once."""

from __future__ import annotations

import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field

from cqrs.commands.db import MAX_NAME, MAX_SKU

MAX_PRICE = Decimal("9999999999.99")
MAX_QTY = 1_000_000
MAX_STOCK = 1_000_000_000


_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co"})


def _clean_text(value: str) -> str:
    """Reject control and invisible format characters: they corrupt terminals and logs,
    and a name that looks blank is no name."""
    # isprintable() is False for every character of those categories (and for a few more,
    # e.g. non-ASCII spaces): only such strings need the per-character look-up.
    if not value.isprintable() and any(unicodedata.category(ch) in _HIDDEN for ch in value):
        raise ValueError("must not contain control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _parse_money(value: object) -> Decimal:
    if isinstance(value, float):
        raise ValueError("must be a decimal string, not a float")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"{value!r} is not a number") from None
    if not amount.is_finite():
        raise ValueError("must be a finite number")
    if amount < 0:
        raise ValueError("must not be negative")
    if amount.as_tuple().exponent < -2:  # type: ignore[operator]
        raise ValueError("must have at most 2 decimal places")
    if amount > MAX_PRICE:
        raise ValueError(f"must be at most {MAX_PRICE}")
    # abs(): "-0" passes the sign check above but would travel as "-0.00" into events and
    # views while PostgreSQL stores 0.00, a difference `cqrs verify` would report forever.
    return abs(amount.quantize(Decimal("0.01")))


Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME), AfterValidator(_clean_text)]
Sku = Annotated[
    str,
    Field(min_length=1, max_length=MAX_SKU, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"),
]
Price = Annotated[Decimal, BeforeValidator(_parse_money)]
Quantity = Annotated[int, Field(gt=0, le=MAX_QTY)]
