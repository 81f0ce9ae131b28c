"""Properties of the pure pieces (no I/O), checked with hypothesis over generated inputs.

What must hold for *any* input, not just the examples in the other unit tests:
- an event survives the trip through stream fields unchanged, and anything else read from a
  stream is either an event or an `EventError` (never another exception: a poison entry
  must be dead-lettered, not crash the worker);
- consistency tokens round-trip, and garbage is only ever a `TokenError`;
- the input rules: a price is accepted iff it is a finite, non-negative decimal with at most
  two places and at most the maximum; a name iff it is non-blank, short enough and free of
  control/format characters; an order iff its lines name distinct products;
- index members sort the way the queries need (price members by amount, order members by
  time) and give back the id they were built from, whatever the name;
- the keys a projection handler touches depend only on UUIDs, never on names or SKUs.
"""

from __future__ import annotations

import contextlib
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from cqrs.commands.db import MAX_NAME, MAX_ORDER_LINES
from cqrs.commands.fields import MAX_PRICE, MAX_QTY, Name, Price
from cqrs.commands.orders import PlaceOrder
from cqrs.contracts import builtin_contracts
from cqrs.events import EventEnvelope, EventError, Payload
from cqrs.keys import KeyMap, partition_of
from cqrs.projector.orders import order_member, order_member_id
from cqrs.projector.products import member_id, name_member, price_member
from cqrs.projector.projection import cents
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.steps import Step
from cqrs.queries.errors import BadCursor
from cqrs.queries.service import decode_cursor, encode_cursor
from cqrs.streams import parse_entry_id
from cqrs.tokens import AggregateVersion, TokenError, decode_token, encode_token

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

uuids = st.uuids()
any_text = st.text(max_size=300)
# Names users may type, biased towards the characters that mean something to Redis keys,
# glob patterns, RESP, SQL and our index member separator.
hostile_text = st.text(
    alphabet=st.one_of(st.sampled_from("{}:*?[]\\\x00\r\n'\";-$ "), st.characters(codec="utf-8")),
    min_size=1,
    max_size=60,
)
money = st.decimals(
    min_value=Decimal("0"), max_value=MAX_PRICE, places=2, allow_nan=False, allow_infinity=False
)
aware_datetimes = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
)


def _valid_name(text: str) -> bool:
    bad = {"Cc", "Cf", "Cs", "Co"}
    return (
        0 < len(text) <= MAX_NAME
        and bool(text.strip())
        and not any(unicodedata.category(ch) in bad for ch in text)
    )


valid_names = hostile_text.filter(_valid_name)


# --------------------------------------------------------------------------- events


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)

envelopes = st.builds(
    EventEnvelope,
    event_id=uuids,
    event_type=st.text(max_size=40),
    schema_version=st.integers(-(2**31), 2**31),
    aggregate_type=st.text(max_size=20),
    aggregate_id=uuids,
    version=st.integers(1, 2**31),
    partition_key=uuids,
    position=st.integers(0, 2**62),
    occurred_at=aware_datetimes,
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)


@PROPS
@given(envelopes)
def test_an_event_survives_the_trip_through_stream_fields(event: EventEnvelope) -> None:
    fields = event.to_stream_fields()
    assert all(isinstance(v, str) for v in fields.values())
    assert EventEnvelope.from_stream_fields(fields) == event


FIELD_NAMES = (
    "event_id",
    "type",
    "schema",
    "aggregate_type",
    "aggregate_id",
    "version",
    "partition_key",
    "position",
    "occurred_at",
    "payload",
)


def _valid_fields() -> dict[str, str]:
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type="ProductCreated",
        aggregate_type="product",
        aggregate_id=uuid.uuid4(),
        version=1,
        partition_key=uuid.uuid4(),
        occurred_at=datetime.now(UTC),
        payload={"sku": "S-1", "name": "N", "price": "1.00", "stock": 1},
    ).to_stream_fields()


@PROPS
@given(
    changes=st.dictionaries(
        st.sampled_from(FIELD_NAMES) | st.text(max_size=10),
        st.text(max_size=50) | st.sampled_from(["", "0", "-1", "1e999", "nan", "{}", "[]", "null"]),
        max_size=4,
    ),
    dropped=st.sets(st.sampled_from(FIELD_NAMES), max_size=3),
)
def test_whatever_a_stream_holds_is_an_event_or_an_event_error(
    changes: dict[str, str], dropped: set[str]
) -> None:
    """The worker turns EventError into a dead letter; any other exception type here would
    be a handler-bug path at best and a crash at worst."""
    fields = {k: v for k, v in {**_valid_fields(), **changes}.items() if k not in dropped}
    try:
        event = EventEnvelope.from_stream_fields(fields)
    except EventError as exc:
        assert str(exc)
        return
    try:
        payload = event.typed_payload()
    except EventError as exc:
        assert str(exc)
        return
    assert isinstance(payload, Payload)


# --------------------------------------------------------------------------- tokens


versions = st.lists(
    st.builds(
        AggregateVersion,
        aggregate_type=st.sampled_from(["product", "customer", "order"]),
        aggregate_id=st.sampled_from([uuid.UUID(int=i) for i in range(1, 6)]) | uuids,
        version=st.integers(1, 2**31),
        partition_key=uuids,
    ),
    max_size=12,
)


@PROPS
@given(versions)
def test_a_token_gives_back_the_latest_version_of_each_aggregate(
    items: list[AggregateVersion],
) -> None:
    latest: dict[tuple[str, uuid.UUID], int] = {}
    for v in items:
        key = (v.aggregate_type, v.aggregate_id)
        latest[key] = max(latest.get(key, 0), v.version)
    decoded = decode_token(encode_token(items))
    assert {(v.aggregate_type, v.aggregate_id): v.version for v in decoded} == latest
    assert len(decoded) == len(latest)


@PROPS
@given(st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.hex()))
def test_any_other_text_is_refused_as_a_token_error(text: str) -> None:
    with contextlib.suppress(TokenError):
        decode_token(text)


# --------------------------------------------------------------------------- input rules

price_adapter = TypeAdapter(Price)
name_adapter = TypeAdapter(Name)


@PROPS
@example("-0")
@example("-0.00")
@example(" -0E+2 ")
@given(
    st.one_of(
        st.text(max_size=20),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.integers(-(10**12), 10**12).map(str),
        st.floats().map(str),
    )
)
def test_a_price_is_accepted_iff_it_is_exact_money_in_range(text: str) -> None:
    try:
        exact = Decimal(text.strip())
        ok = exact.is_finite() and 0 <= exact <= MAX_PRICE and exact.as_tuple().exponent >= -2
    except ArithmeticError:
        ok = False
    try:
        price = price_adapter.validate_python(text)
    except ValidationError:
        assert not ok, text
        return
    assert ok, text
    assert price == exact
    assert price.as_tuple().exponent == -2  # always two places, whatever was typed
    # "-0" is zero, and must look like the zero PostgreSQL stores ("0.00", not "-0.00"),
    # or the view and `cqrs verify` disagree with the database forever.
    assert not price.is_signed() and f"{price:.2f}" == f"{abs(exact):.2f}"


@PROPS
@given(money)
def test_money_to_cents_is_exact(amount: Decimal) -> None:
    assert cents(amount) == int(amount * 100)
    assert cents(f"{amount:.2f}") == cents(amount)
    assert Decimal(cents(amount)) / 100 == amount


@PROPS
@given(st.one_of(any_text, hostile_text, st.text(min_size=195, max_size=205)))
def test_a_name_is_accepted_iff_non_blank_short_and_free_of_control_characters(
    text: str,
) -> None:
    try:
        assert name_adapter.validate_python(text) == text  # stored verbatim, never altered
    except ValidationError:
        assert not _valid_name(text), repr(text)
    else:
        assert _valid_name(text), repr(text)


pool = [uuid.UUID(int=i) for i in range(1, 8)]


@PROPS
@given(
    st.lists(
        st.fixed_dictionaries(
            {"product_id": st.sampled_from(pool), "qty": st.integers(-2, MAX_QTY + 2)}
        ),
        max_size=10,
    )
)
def test_an_order_is_valid_iff_its_lines_name_distinct_products_in_range(
    items: list[dict[str, Any]],
) -> None:
    ids = [i["product_id"] for i in items]
    ok = (
        1 <= len(items) <= MAX_ORDER_LINES
        and len(set(ids)) == len(ids)
        and all(0 < i["qty"] <= MAX_QTY for i in items)
    )
    try:
        order = PlaceOrder(customer_id=uuid.uuid4(), items=items)
    except ValidationError:
        assert not ok
    else:
        assert ok
        assert [i.product_id for i in order.items] == ids


# --------------------------------------------------------------------------- index members


@PROPS
@given(money, money, uuids, uuids)
def test_price_members_sort_by_amount(a: Decimal, b: Decimal, x: uuid.UUID, y: uuid.UUID) -> None:
    ma, mb = price_member(f"{a:.2f}", x), price_member(f"{b:.2f}", y)
    if a != b:
        assert (ma < mb) == (a < b)
    assert member_id(ma) == str(x)


@PROPS
@given(valid_names, uuids)
def test_a_name_member_gives_back_its_product_whatever_the_name(name: str, pid: uuid.UUID) -> None:
    member = name_member(name, pid)
    assert member_id(member) == str(pid)
    assert member.startswith(name.casefold())


@PROPS
@given(aware_datetimes, aware_datetimes, uuids, uuids)
def test_order_members_sort_by_time(a: datetime, b: datetime, x: uuid.UUID, y: uuid.UUID) -> None:
    ma, mb = order_member(a, x), order_member(b, y)
    assert order_member_id(ma) == str(x)
    if int(a.timestamp() * 1000) != int(b.timestamp() * 1000):
        assert (ma < mb) == (a < b)


@PROPS
@given(st.text(max_size=400), st.sampled_from(["\x00", ":"]))
def test_a_cursor_gives_back_its_member_and_garbage_is_refused(text: str, separator: str) -> None:
    member = f"{text}{separator}{uuid.uuid4()}"
    assume(len(member) <= 1000)
    assert decode_cursor(encode_cursor(member), separator) == member
    with contextlib.suppress(BadCursor):
        decode_cursor(text, separator)


@PROPS
@given(
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**32)),
    st.tuples(st.integers(0, 2**48), st.integers(0, 2**32)),
)
def test_stream_ids_compare_as_pairs(a: tuple[int, int], b: tuple[int, int]) -> None:
    assert (parse_entry_id(f"{a[0]}-{a[1]}") < parse_entry_id(f"{b[0]}-{b[1]}")) == (a < b)


@PROPS
@given(uuids, st.integers(1, 1024))
def test_a_partition_is_stable_and_in_range(key: uuid.UUID, partitions: int) -> None:
    p = partition_of(key, partitions)
    assert 0 <= p < partitions
    assert partition_of(uuid.UUID(str(key)), partitions) == p


# --------------------------------------------------------------------------- keys


def _keys_of(step: Step) -> list[str]:
    """The keys a step touches (a script's KEYS, or a command's key argument)."""
    if step.script:
        return list(step.keys)
    verb = str(step.command[0]).upper()
    assert verb in {"ZADD", "ZREM", "SREM", "ZRANGE", "HSET", "HDEL", "SADD"}, verb
    return [str(step.command[1])]


def _fake_result(step: Step, name: str, other: uuid.UUID) -> Any:
    """A plausible reply for a step, carrying hostile text wherever a reply can carry it,
    so follow-up steps are generated from it too."""
    if step.script == "apply":
        returned = step.args[3 + 3 * int(step.args[2]) :]
        return [1] + ["3" if field == "units_sold" else name for field in returned]
    if step.script == "track":
        if step.args[0] == "price":
            return ["1.00", "2.50"]
        return [name, name + "*", "{" + name + "}"]
    if step.script == "zadd_and_read":
        return [1, name, "1"]
    if step.command and str(step.command[0]).upper() == "ZRANGE":
        return [f"{0:015d}:{other}"]
    return 1


def touched_keys(steps: list[Step], name: str, other: uuid.UUID) -> set[str]:
    keys: set[str] = set()
    todo = list(steps)
    while todo:
        step = todo.pop()
        keys.update(_keys_of(step))
        if step.then is not None:
            todo.extend(step.then(_fake_result(step, name, other)))
    return keys


def _event(event_type: str, aggregate_type: str, agg: uuid.UUID, pkey: uuid.UUID, payload: dict):
    return EventEnvelope(
        event_id=uuid.uuid4(),
        event_type=event_type,
        aggregate_type=aggregate_type,
        aggregate_id=agg,
        version=2,
        partition_key=pkey,
        occurred_at=datetime.now(UTC),
        payload=payload,
    )


@PROPS
@given(valid_names, valid_names, uuids, uuids, uuids)
def test_the_keys_a_handler_touches_depend_only_on_uuids(
    name: str, other_name: str, product: uuid.UUID, customer: uuid.UUID, order: uuid.UUID
) -> None:
    """Two events that differ only in their text touch exactly the same keys, and every key
    carries one hash tag made of a UUID the event names."""
    placed = datetime.now(UTC) - timedelta(days=1)

    def events(text: str) -> list[EventEnvelope]:
        line = {
            "product_id": str(product),
            "name": text,
            "unit_price": "1.00",
            "qty": 1,
            "line_total": "1.00",
        }
        return [
            _event(
                "ProductCreated",
                "product",
                product,
                product,
                {"sku": "S-1", "name": text, "price": "1.00", "stock": 1},
            ),
            _event("ProductRenamed", "product", product, product, {"name": text}),
            _event(
                "CustomerRegistered",
                "customer",
                customer,
                customer,
                {"email": "a@b.co", "name": text},
            ),
            _event("CustomerRenamed", "customer", customer, customer, {"name": text}),
            _event(
                "OrderPlaced",
                "order",
                order,
                customer,
                {
                    "customer_id": str(customer),
                    "customer_name": text,
                    "customer_version": 1,
                    "lines": [line],
                    "total": "1.00",
                    "placed_at": placed.isoformat(),
                },
            ),
        ]

    ids = {str(product), str(customer), str(order)}
    # The built-in projections' layout rule; a plugin's keys are its own contract's business
    # (sales-by-day tags its day views by a date).
    for projection in (PROJECTIONS[name] for name in builtin_contracts()):
        views = KeyMap("ns").views(projection.name, 1)
        by_text: list[set[str]] = []
        for text in (name, other_name):
            keys: set[str] = set()
            for event in events(text):
                handler = projection.handlers.get(event.event_type)
                if handler is not None:
                    steps = handler(event, event.typed_payload(), views)
                    keys |= touched_keys(steps, text, order)
            by_text.append(keys)
        assert by_text[0] == by_text[1], projection.name
        # The catalog indexes and their version records: fixed names, tagged by the index.
        indexes = (
            {
                views.products_by_name(),
                views.products_by_name_versions(),
                views.products_by_price(),
                views.products_by_price_versions(),
                views.top_products(),
                views.top_products_versions(),
            }
            if projection.name == "products"  # its layout alone has the catalog indexes
            else set()
        )
        for key in by_text[0]:
            assert key.startswith(views.prefix + ":"), key
            rest = key[len(views.prefix) + 1 :]
            if key in indexes:
                tag = key[key.index("{") :]
                assert tag.startswith(f"{{{views.prefix}:") and tag.endswith("}"), key
            elif "{" in rest:
                kind, tag = rest.split(":", 1)
                assert tag.startswith("{") and tag.endswith("}") and tag.count("{") == 1, key
                assert tag[1:-1] in ids, key
                assert kind.replace("-", "").isalpha(), key
            else:
                raise AssertionError(f"untagged key {key}")
