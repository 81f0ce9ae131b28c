from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from pydantic import ValidationError

from cqrs.commands.catalog import CreateProduct, RestockProduct
from cqrs.commands.cli import parse_item
from cqrs.commands.orders import PlaceOrder
from cqrs.keys import KeyMap, partition_of
from cqrs.queries.errors import BadCursor
from cqrs.queries.service import decode_cursor, encode_cursor
from cqrs.tokens import AggregateVersion, TokenError, decode_token, encode_token


def test_token_round_trip_keeps_the_latest_version_per_aggregate() -> None:
    a, b, customer = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    token = encode_token(
        [
            AggregateVersion("product", a, 1, a),
            AggregateVersion("product", a, 3, a),
            AggregateVersion("order", b, 1, customer),
        ]
    )
    assert sorted(decode_token(token)) == sorted(
        [AggregateVersion("product", a, 3, a), AggregateVersion("order", b, 1, customer)]
    )


@pytest.mark.parametrize("bad", ["", "!!!", "bm90IGpzb24", "W1siel0i", "W1sieCIsImFiYyIsMV1d"])
def test_garbage_tokens_are_rejected(bad: str) -> None:
    with pytest.raises(TokenError):
        decode_token(bad)


def test_partition_is_stable_and_spread() -> None:
    key = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert partition_of(key, 8) == partition_of(uuid.UUID(str(key)), 8)
    spread = {partition_of(uuid.uuid4(), 8) for _ in range(500)}
    assert spread == set(range(8))


def test_keys_share_a_hash_tag_where_scripts_touch_them_together() -> None:
    views = KeyMap("ns").views("orders", 3)
    cid = uuid.uuid4()
    tag = f"{{{cid}}}"
    assert views.customer_orders(cid).endswith(tag) and views.order_customer(cid).endswith(tag)
    assert views.order(cid).startswith("ns:orders:g3:")
    assert KeyMap("ns").stream(5) == "ns:stream:{p5}"


def test_cursor_round_trip_and_rejection() -> None:
    member = "widget\x00Widget\x00" + str(uuid.uuid4())
    assert decode_cursor(encode_cursor(member), "\x00") == member
    for bad in ("!!", encode_cursor("no separator"), "a" * 3000):
        with pytest.raises(BadCursor):
            decode_cursor(bad, "\x00")


@pytest.mark.parametrize(
    ("price", "ok"),
    [
        ("12.50", True),
        ("0", True),
        ("12.505", False),
        ("-1", False),
        ("NaN", False),
        ("inf", False),
        ("1e3", True),
        ("abc", False),
        ("99999999999", False),
    ],
)
def test_price_rules(price: str, ok: bool) -> None:
    if ok:
        assert CreateProduct(sku="S", name="N", price=price).price == Decimal(price).quantize(
            Decimal("0.01")
        )
    else:
        with pytest.raises(ValidationError):
            CreateProduct(sku="S", name="N", price=price)


@pytest.mark.parametrize("name", ["", "   ", "tab\there", "bell\x07", "zero\u200bwidth", "x" * 201])
def test_names_refuse_blank_control_and_oversized(name: str) -> None:
    with pytest.raises(ValidationError):
        CreateProduct(sku="S", name=name, price="1.00")


def test_order_lines_rules() -> None:
    pid = uuid.uuid4()
    with pytest.raises(ValidationError, match="more than one line"):
        PlaceOrder(customer_id=uuid.uuid4(), items=[{"product_id": pid, "qty": 1}] * 2)
    with pytest.raises(ValidationError):
        PlaceOrder(customer_id=uuid.uuid4(), items=[])
    with pytest.raises(ValidationError):
        PlaceOrder(customer_id=uuid.uuid4(), items=[{"product_id": pid, "qty": 0}])
    with pytest.raises(ValidationError):
        RestockProduct(product_id=pid, qty=0)
    assert parse_item(f"{pid}:3") == {"product_id": str(pid), "qty": "3"}
    for bad in ("abc", ":3", f"{pid}:"):
        with pytest.raises(ValueError):
            parse_item(bad)
