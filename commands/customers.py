"""Customers service: registration and names. Emails are unique case-insensitively."""

from __future__ import annotations

import uuid

from pydantic import EmailStr, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from commands.catalog import Command
from commands.db import MAX_EMAIL, Customer
from commands.errors import Duplicate, NotFound
from commands.fields import Name
from commands.results import CommandResult
from commands.uow import UnitOfWork
from cqrs.events import CustomerRegistered, CustomerRenamed


class RegisterCustomer(Command):
    email: EmailStr = Field(max_length=MAX_EMAIL)
    name: Name
    customer_id: uuid.UUID = Field(default_factory=uuid.uuid4)


class RenameCustomer(Command):
    customer_id: uuid.UUID
    name: Name


def get_customer(uow: UnitOfWork, customer_id: uuid.UUID, *, for_share: bool = False) -> Customer:
    query = select(Customer).where(Customer.id == customer_id)
    if for_share:
        query = query.with_for_update(read=True)
    customer = uow.session.scalars(query).one_or_none()
    if customer is None:
        raise NotFound(f"customer {customer_id} not found")
    return customer


def register_customer(cmd: RegisterCustomer, uow: UnitOfWork) -> CommandResult:
    email = str(cmd.email)
    if uow.session.get(Customer, cmd.customer_id) is not None:
        raise Duplicate(f"customer {cmd.customer_id} already exists")
    taken = uow.session.scalar(
        select(Customer.id).where(func.lower(Customer.email) == email.lower())
    )
    if taken is not None:
        raise Duplicate(f"a customer with email {email!r} already exists")
    customer = Customer(id=cmd.customer_id, email=email, name=cmd.name)
    uow.session.add(customer)
    try:
        uow.session.flush()
    except IntegrityError as exc:
        if "pk_customers" in str(exc.orig):
            raise Duplicate(f"customer {cmd.customer_id} already exists") from exc
        raise Duplicate(f"a customer with email {email!r} already exists") from exc
    uow.record(
        "customer", customer.id, customer.version, CustomerRegistered(email=email, name=cmd.name)
    )
    return CommandResult(customer.id, customer.version, uow.commit())


def rename_customer(cmd: RenameCustomer, uow: UnitOfWork) -> CommandResult:
    customer = get_customer(uow, cmd.customer_id)
    customer.name = cmd.name
    uow.session.flush()
    uow.record("customer", customer.id, customer.version, CustomerRenamed(name=cmd.name))
    return CommandResult(customer.id, customer.version, uow.commit())
