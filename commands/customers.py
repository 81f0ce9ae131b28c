"""Customers service: registration and names. Emails are unique case-insensitively."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
from pydantic import EmailStr, Field

from cqrs.commands.catalog import Command
from cqrs.commands.db import MAX_EMAIL
from cqrs.commands.errors import Duplicate, NotFound
from cqrs.commands.fields import Name
from cqrs.commands.results import CommandResult
from cqrs.commands.uow import UnitOfWork
from cqrs.events import CustomerRegistered, CustomerRenamed


class RegisterCustomer(Command):
    email: EmailStr = Field(max_length=MAX_EMAIL)
    name: Name
    customer_id: uuid.UUID = Field(default_factory=uuid.uuid4)


class RenameCustomer(Command):
    customer_id: uuid.UUID
    name: Name


_INSERT = "INSERT INTO customers.customers (id, email, name, version) VALUES (%s, %s, %s, 1)"
_READ = "SELECT name, version FROM customers.customers WHERE id = %s"
_READ_FOR_SHARE = _READ + " FOR SHARE"
_RENAME = "UPDATE customers.customers SET name = %s, version = %s WHERE id = %s AND version = %s"


def send_customer_read(
    uow: UnitOfWork, customer_id: uuid.UUID, *, for_share: bool = False
) -> psycopg.Cursor[Any]:
    """Queue the read of a customer's (name, version); pass the cursor to
    `fetch_customer`. Queued, so a caller can send other reads in the same round trip."""
    return uow.send(_READ_FOR_SHARE if for_share else _READ, (customer_id,))


def fetch_customer(cursor: psycopg.Cursor[Any], customer_id: uuid.UUID) -> tuple[str, int]:
    row = cursor.fetchone()
    if row is None:
        raise NotFound(f"customer {customer_id} not found")
    return row


def register_customer(cmd: RegisterCustomer, uow: UnitOfWork) -> CommandResult:
    email = str(cmd.email)
    # No SELECT first: the constraints decide, in the statement that appends the event; a
    # reused id is reported before a reused email, as the SELECTs did before.
    taken = Duplicate(f"customer {cmd.customer_id} already exists")
    uow.reject_if_exists(taken, cmd.customer_id, "pk_customers")
    uow.reject_on_conflict(
        Duplicate(f"a customer with email {email!r} already exists"), "uq_customers_email_lower"
    )
    uow.write(_INSERT, (cmd.customer_id, email, cmd.name))
    uow.record("customer", cmd.customer_id, 1, CustomerRegistered(email=email, name=cmd.name))
    return CommandResult(cmd.customer_id, 1, uow.commit())


def rename_customer(cmd: RenameCustomer, uow: UnitOfWork) -> CommandResult:
    _, read = fetch_customer(send_customer_read(uow, cmd.customer_id), cmd.customer_id)
    version = read + 1
    renamed = uow.send(_RENAME, (cmd.name, version, cmd.customer_id, read))
    uow.expect_rows(renamed, 1, f"customer {cmd.customer_id}")
    uow.record("customer", cmd.customer_id, version, CustomerRenamed(name=cmd.name))
    return CommandResult(cmd.customer_id, version, uow.commit())
