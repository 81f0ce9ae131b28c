"""The command bus: one dict from command type to handler, and the retry policy.

Every command runs in a fresh unit of work. A lost optimistic-concurrency race or a
deadlock is retried a bounded number of times (all our commands re-read their state, so
a retry is safe); after that the caller gets a clear `Conflict`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from psycopg import errors as pg_errors
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from commands import catalog, customers, orders
from commands.errors import Conflict
from commands.results import CommandResult
from commands.uow import UnitOfWork

Handler = Callable[[Any, UnitOfWork], CommandResult]

HANDLERS: dict[type, Handler] = {
    catalog.CreateProduct: catalog.create_product,
    catalog.RenameProduct: catalog.rename_product,
    catalog.RepriceProduct: catalog.reprice_product,
    catalog.RestockProduct: catalog.restock_product,
    customers.RegisterCustomer: customers.register_customer,
    customers.RenameCustomer: customers.rename_customer,
    orders.PlaceOrder: orders.place_order,
    orders.CancelOrder: orders.cancel_order,
    orders.ShipOrder: orders.ship_order,
}

_RETRYABLE_PG = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def _is_retryable(exc: Exception) -> bool:
    if isinstance(exc, StaleDataError):
        return True
    if isinstance(exc, IntegrityError):
        # Two writers appended the same aggregate version: the loser retries.
        return "uq_event_log_aggregate_type" in str(exc.orig)
    return isinstance(exc, DBAPIError) and isinstance(exc.orig, _RETRYABLE_PG)


def execute(command: object, session_factory: sessionmaker, *, retries: int = 5) -> CommandResult:
    """Run one command to completion or raise CommandRejected; nothing half-written."""
    handler = HANDLERS[type(command)]
    for attempt in range(retries + 1):
        try:
            with UnitOfWork(session_factory) as uow:
                return handler(command, uow)
        except (StaleDataError, IntegrityError, DBAPIError) as exc:
            if not _is_retryable(exc):
                raise
            # Jittered backoff: writers that collided once should not collide again in
            # lockstep on a hot aggregate.
            if attempt < retries:
                time.sleep(random.uniform(0, 0.002 * (2**attempt)))
    raise Conflict(
        f"{type(command).__name__} lost {retries + 1} concurrent-update races in a row; try again"
    )
