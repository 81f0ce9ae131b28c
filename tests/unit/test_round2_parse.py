"""The stream-entry parser's fast path (`cqrs.events.parse_stream_entry`) against the
contract it shortcuts: whatever an entry holds, the parse gives the same header and
payload values, or the same EventError, as the contract's own validation
(`EventEnvelope.from_stream_fields` + `typed_payload`), and amounts as the write side
writes them take the fast path (its money check compiled, not the contract's)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bench.history import make_history
from cqrs.events import (
    _ENTRY_VALIDATORS,
    PAYLOAD_TYPES,
    EventEnvelope,
    EventError,
    parse_stream_entry,
)

HISTORY = [e.stream_fields(n) for n, e in enumerate(make_history(3000, seed=11), start=1)]


def _by_contract(fields: dict[str, str]) -> tuple[str, Any]:
    """What the contract makes of an entry: ("ok", header and payload values) or
    ("error", the EventError's text)."""
    try:
        event = EventEnvelope.from_stream_fields(fields)
        payload = event.typed_payload()
    except EventError as exc:
        return "error", str(exc)
    header = event.model_dump(exclude={"payload"})
    return "ok", (header, type(payload), payload.model_dump())


def _by_parser(fields: dict[str, str]) -> tuple[str, Any]:
    try:
        header, payload = parse_stream_entry(fields)
    except EventError as exc:
        return "error", str(exc)
    return "ok", (header.model_dump(exclude={"payload"}), type(payload), payload.model_dump())


def _takes_fast_path(fields: dict[str, str]) -> bool:
    try:
        _ENTRY_VALIDATORS[fields["type"]].validate_python(fields)
    except ValidationError:
        return False
    return True


def test_every_event_type_is_in_the_history() -> None:
    assert {f["type"] for f in HISTORY} == set(PAYLOAD_TYPES)


def test_history_entries_parse_as_the_contract_says_and_on_the_fast_path() -> None:
    for fields in HISTORY:
        assert _by_parser(fields) == _by_contract(fields)
        assert _takes_fast_path(fields), fields
        _, payload = parse_stream_entry(fields)
        # The very classes of the contract, not look-alikes.
        assert type(payload) is PAYLOAD_TYPES[fields["type"]]
        for line in getattr(payload, "lines", ()):
            assert type(line) is type(payload).model_fields["lines"].annotation.__args__[0]


def _repriced(amount: Any) -> dict[str, str]:
    fields = next(f for f in HISTORY if f["type"] == "ProductRepriced")
    return {**fields, "payload": json.dumps({"price": amount})}


@pytest.mark.parametrize(
    ("amount", "fast"),
    [
        ("12.50", True),
        ("0.00", True),
        ("-3.10", True),
        ("-0.00", True),
        ("123456789012.34", True),
        # Money the contract accepts in another spelling: the slow path, same value.
        ("12.5", False),
        ("12", False),
        (12.5, False),
        (7, False),
        ("007.50", False),
        ("1e2", False),
        (" 1.00", False),
        ("1.00\n", False),
        ("\uff11.00", False),  # a full-width digit: Decimal reads it, [0-9] does not
        ("1.000", False),
        ("+1.00", False),
        # Refused by the contract: the same error text.
        ("1234567890123.45", False),
        ("1.234", False),
        ("NaN", False),
        ("-", False),
        (None, False),
    ],
)
def test_an_amount_is_read_as_the_contract_reads_it(amount: Any, fast: bool) -> None:
    fields = _repriced(amount)
    assert _takes_fast_path(fields) is fast
    assert _by_parser(fields) == _by_contract(fields)


def test_an_order_line_amount_is_checked_on_the_fast_path_too() -> None:
    fields = next(f for f in HISTORY if f["type"] == "OrderPlaced")
    payload = json.loads(fields["payload"])
    payload["lines"][0]["unit_price"] = "1.234"
    bad = {**fields, "payload": json.dumps(payload)}
    assert not _takes_fast_path(bad)
    kind, text = _by_parser(bad)
    assert (kind, text) == _by_contract(bad)
    assert text == (
        "OrderPlaced: lines.0.unit_price: Decimal input should have no more than 2 decimal places"
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    amount=st.one_of(
        st.text(alphabet="0123456789.-+eE_ \n", max_size=20),
        st.decimals(allow_nan=True, allow_infinity=True).map(str),
        st.decimals(places=2, allow_nan=False, allow_infinity=False).map(lambda d: f"{d:.2f}"),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    )
)
@example(amount="99999999999999.99")
@example(amount="999999999999.99")
def test_any_amount_is_read_as_the_contract_reads_it(amount: Any) -> None:
    fields = _repriced(amount)
    assert _by_parser(fields) == _by_contract(fields)
    if _takes_fast_path(fields):
        _, payload = parse_stream_entry(fields)
        assert isinstance(payload.price, Decimal)  # type: ignore[attr-defined]
        assert f"{payload.price:.2f}" == amount  # type: ignore[attr-defined]
