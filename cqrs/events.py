"""Event contracts shared by the write side, the projector and replay.

An event travels as an `EventEnvelope`: identity and ordering metadata plus a JSON payload
whose shape is one of the payload models below, chosen by `event_type`. Projections depend
only on these contracts, never on `commands`.

Money is a `Decimal` with two places, serialised as a string so no float ever touches it.
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Json,
    PlainSerializer,
    ValidationError,
    create_model,
)
from pydantic_core import SchemaValidator, core_schema

Money = Annotated[
    Decimal,
    Field(max_digits=14, decimal_places=2),
    PlainSerializer(lambda d: f"{d:.2f}", return_type=str, when_used="json"),
]

SCHEMA_VERSION = 1


class Payload(BaseModel):
    """Base of every payload: strict about unknown fields so a contract drift is loud."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- catalog ---------------------------------------------------------------------------


class ProductCreated(Payload):
    sku: str
    name: str
    price: Money
    stock: int


class ProductRenamed(Payload):
    name: str


class ProductRepriced(Payload):
    price: Money


class ProductRestocked(Payload):
    delta: int
    stock: int


class StockReserved(Payload):
    """Emitted on the product when an order takes stock; carries the sale for the
    product's units_sold/revenue so that view is fed only by its own aggregate's events."""

    order_id: UUID
    qty: int
    unit_price: Money
    stock: int


class StockReleased(Payload):
    """The reverse of `StockReserved` when an order is cancelled."""

    order_id: UUID
    qty: int
    unit_price: Money
    stock: int


# --- customers -------------------------------------------------------------------------


class CustomerRegistered(Payload):
    email: str
    name: str


class CustomerRenamed(Payload):
    name: str


# --- orders ----------------------------------------------------------------------------


class OrderLine(Payload):
    product_id: UUID
    name: str
    unit_price: Money
    qty: int
    line_total: Money


class OrderPlaced(Payload):
    customer_id: UUID
    customer_name: str
    customer_version: int
    lines: list[OrderLine]
    total: Money
    placed_at: datetime


class OrderCancelled(Payload):
    customer_id: UUID
    total: Money
    cancelled_at: datetime


class OrderShipped(Payload):
    customer_id: UUID
    shipped_at: datetime


PAYLOAD_TYPES: dict[str, type[Payload]] = {
    cls.__name__: cls
    for cls in (
        ProductCreated,
        ProductRenamed,
        ProductRepriced,
        ProductRestocked,
        StockReserved,
        StockReleased,
        CustomerRegistered,
        CustomerRenamed,
        OrderPlaced,
        OrderCancelled,
        OrderShipped,
    )
}

AGGREGATE_TYPES = ("product", "customer", "order")


class EventError(ValueError):
    """A stream entry or log row that is not a valid event; the message says which field."""


class EventHeader(BaseModel):
    """What identifies and orders an event, without its payload: all a projection handler
    needs besides the typed payload."""

    model_config = ConfigDict(frozen=True)

    event_id: UUID
    event_type: str
    schema_version: int = SCHEMA_VERSION
    aggregate_type: str
    aggregate_id: UUID
    version: int = Field(ge=1)
    # Events that must be applied in order relative to each other share a partition key:
    # an order's events use its customer's id so order views follow customer renames.
    partition_key: UUID
    position: int = 0
    occurred_at: datetime


class EventEnvelope(EventHeader):
    """One event as stored in the log and carried on a stream."""

    payload: dict[str, Any]

    def typed_payload(self) -> Payload:
        """Validate the payload against its contract; raises EventError on any mismatch."""
        if self.schema_version != SCHEMA_VERSION:
            raise EventError(
                f"{self.event_type} schema version {self.schema_version} is not supported "
                f"(expected {SCHEMA_VERSION})"
            )
        model = PAYLOAD_TYPES.get(self.event_type)
        if model is None:
            raise EventError(f"unknown event type {self.event_type!r}")
        try:
            return model.model_validate(self.payload)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "payload"
            raise EventError(f"{self.event_type}: {where}: {first['msg']}") from None

    def to_stream_fields(self) -> dict[str, str]:
        """Flat string fields for XADD; the payload stays one JSON string."""
        return {
            "event_id": str(self.event_id),
            "type": self.event_type,
            "schema": str(self.schema_version),
            "aggregate_type": self.aggregate_type,
            "aggregate_id": str(self.aggregate_id),
            "version": str(self.version),
            "partition_key": str(self.partition_key),
            "position": str(self.position),
            "occurred_at": self.occurred_at.isoformat(),
            "payload": json.dumps(self.payload, separators=(",", ":")),
        }

    @classmethod
    def from_stream_fields(cls, fields: dict[str, str]) -> EventEnvelope:
        """Parse an entry read from a stream; anything malformed is an EventError."""
        try:
            return cls(
                event_id=fields["event_id"],
                event_type=fields["type"],
                schema_version=int(fields["schema"]),
                aggregate_type=fields["aggregate_type"],
                aggregate_id=fields["aggregate_id"],
                version=int(fields["version"]),
                partition_key=fields["partition_key"],
                position=int(fields.get("position", "0")),
                occurred_at=fields["occurred_at"],
                payload=json.loads(fields["payload"]),
            )
        except KeyError as exc:
            raise EventError(f"stream entry is missing field {exc.args[0]!r}") from None
        except (ValueError, TypeError) as exc:
            if isinstance(exc, ValidationError):
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise EventError(f"stream entry field {where}: {first['msg']}") from None
            raise EventError(f"stream entry is malformed: {exc}") from None


_UUID_TEXT = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def aggregate_text(event: EventHeader) -> str:
    """An event's aggregate id as keys carry it (`str` of the UUID), without formatting
    the UUID again when the stream entry already spelled it so."""
    text = event.__dict__.get("aggregate_text")
    return str(event.aggregate_id) if text is None else text


class _StreamEntry(EventHeader):
    """A stream entry validated in one pydantic call, payload JSON included (per event
    type a subclass fixes the payload's contract); see `parse_stream_entry`."""

    event_type: str = Field(validation_alias="type")
    schema_version: int = Field(validation_alias="schema")
    # The aggregate id as the entry spells it, read only when that is the UUID's canonical
    # text (what `str(aggregate_id)` gives, ~0.9 us of Python each time): keys and fields
    # that carry the id take it from here (`aggregate_text`). Not part of the event: left
    # out of dumps and repr. An entry spelling its id otherwise takes the slow path.
    aggregate_text: str = Field(
        validation_alias="aggregate_id", pattern=_UUID_TEXT, exclude=True, repr=False
    )


_ENTRY_MODELS: dict[str, type[_StreamEntry]] = {
    name: create_model(f"{name}Entry", __base__=_StreamEntry, payload=(Json[model], ...))
    for name, model in PAYLOAD_TYPES.items()
}
_SCHEMA_TEXT = str(SCHEMA_VERSION)

# An amount as the write side writes it (`f"{d:.2f}"` of a Money): at most 12 integer
# digits without leading zeros, exactly two decimals ([0-9], not \d: the Rust regex's \d
# is any Unicode digit). Every such text is a Money the contract accepts, with the same
# Decimal, so the fast path below may check this pattern (compiled, in pydantic-core)
# instead of the contract's digit counting (~0.5 us more per amount: pydantic-core asks
# the Decimal for its digits through Python calls).
_MONEY_TEXT = r"^-?(0|[1-9][0-9]{0,11})\.[0-9]{2}$"


def _canonical_money(schema: Any) -> Any:
    """`schema` (a core schema) with every Money validator replaced by "a string of
    `_MONEY_TEXT`, then a Decimal". Stricter than Money (a JSON number, or a text with
    one decimal, fails it), never looser, and the value is the same."""
    if isinstance(schema, list):
        return [_canonical_money(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if schema.get("type") == "decimal" and (
        schema.get("max_digits"),
        schema.get("decimal_places"),
    ) == (14, 2):
        fast = core_schema.chain_schema(
            [core_schema.str_schema(pattern=_MONEY_TEXT), core_schema.decimal_schema()]
        )
        if "serialization" in schema:
            fast["serialization"] = schema["serialization"]
        return fast
    return {key: _canonical_money(value) for key, value in schema.items()}


def _models_in(schema: Any) -> set[type]:
    if isinstance(schema, list):
        return set().union(*map(_models_in, schema)) if schema else set()
    if not isinstance(schema, dict):
        return set()
    found = {schema["cls"]} if schema.get("type") == "model" else set()
    return found.union(*map(_models_in, schema.values()))


def _fast_validator(model: type[BaseModel]) -> SchemaValidator:
    """The validator of `model`'s core schema with canonical money: it builds instances of
    the same classes (the entry model, the payload contract and its nested models).

    pydantic-core reuses a complete model class's own validator wherever the class appears
    in a schema, which would bring the contract's money checks back; the classes are
    marked incomplete for the time of the build only. Should a pydantic-core ignore that,
    the validator is the contract's own: slower, never different (tests check it is not)."""
    schema = _canonical_money(model.__pydantic_core_schema__)
    classes = _models_in(schema)
    for cls in classes:
        type.__setattr__(cls, "__pydantic_complete__", False)
    try:
        return SchemaValidator(schema)
    finally:
        for cls in classes:
            type.__setattr__(cls, "__pydantic_complete__", True)


# Per event type, the validator of the fast path.
_ENTRY_VALIDATORS: dict[str, SchemaValidator] = {
    name: _fast_validator(model) for name, model in _ENTRY_MODELS.items()
}


def parse_stream_entry(fields: dict[str, str]) -> tuple[EventHeader, Payload]:
    """The header and typed payload of a stream entry; EventError for anything malformed.

    This is the projector's hot path, run for every delivery of a handled event type:
    one validation call per entry (the payload's JSON is parsed inside it) instead of
    `from_stream_fields` + `typed_payload` (json.loads, an envelope, then the payload
    model: 2-3x the time). Entries that fail it go through that slower path, which gives
    the established error messages, so both paths accept and reject the same entries
    with the same words."""
    validator = _ENTRY_VALIDATORS.get(fields.get("type", ""))
    if validator is not None and fields.get("schema") == _SCHEMA_TEXT:
        try:
            entry = validator.validate_python(fields)
        except ValidationError:
            pass
        else:
            return entry, entry.payload
    event = EventEnvelope.from_stream_fields(fields)
    if event.event_type not in PAYLOAD_TYPES:
        raise EventError(f"unknown event type {event.event_type!r}")
    return event, event.typed_payload()


def payload_json(payload: Payload) -> dict[str, Any]:
    """The JSON-ready dict of a payload (Decimals as strings, datetimes ISO)."""
    return payload.model_dump(mode="json")
