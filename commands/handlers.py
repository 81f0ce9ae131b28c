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

import psycopg
from psycopg import errors as pg_errors
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from cqrs.commands import catalog, customers, orders
from cqrs.commands.errors import Conflict, StaleVersion
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import EVENT_VERSION_TAKEN, UnitOfWork

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


def _is_retryable(exc: psycopg.Error) -> bool:
    if isinstance(exc, pg_errors.UniqueViolation):
        # Two writers appended the same aggregate version: the loser retries.
        return exc.diag.constraint_name == EVENT_VERSION_TAKEN
    return isinstance(exc, _RETRYABLE_PG)


def execute(
    command: object, session_factory: sessionmaker | Engine, *, retries: int = 5
) -> CommandResult:
    """Run one command to completion or raise CommandRejected; nothing half-written.

    Database errors reach the caller as SQLAlchemy's `DBAPIError` subclasses (with the
    psycopg error as `.orig`), as they did when the handlers used the ORM: the CLI and
    other callers tell an unreachable server from a bug by them."""
    handler = HANDLERS[type(command)]
    for attempt in range(retries + 1):
        try:
            with UnitOfWork(session_factory) as uow:
                return handler(command, uow)
        except StaleVersion:
            pass
        except psycopg.Error as exc:
            if not _is_retryable(exc):
                raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        # Jittered backoff: writers that collided once should not collide again in
        # lockstep on a hot aggregate.
        if attempt < retries:
            time.sleep(random.uniform(0, 0.002 * (2**attempt)))
    raise Conflict(
        f"{type(command).__name__} lost {retries + 1} concurrent-update races in a row; try again"
    )
