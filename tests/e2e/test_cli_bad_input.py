"""Every bad input through the real CLI (`python -m cqrs.app` in a subprocess).

Exit 2 = the input itself is invalid, exit 1 = well-formed but refused by the current state.
Either way: exactly one `error: ...` line on stderr, nothing on stdout, and nothing written
(the event log has as many rows after as before).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest

from cqrs.commands import catalog, customers, orders
from cqrs.commands.db import make_session_factory
from cqrs.commands.handlers import execute
from cqrs.tokens import decode_token
from cqrs.wiring import Wiring
from tests.helpers import assert_one_error_line, event_count, run_cli

UNKNOWN = str(uuid.UUID(int=0xDEADBEEF))


@dataclass(frozen=True)
class World:
    """Existing state the refusals are about."""

    product: str  # stock 3, SKU "EXIST-1"
    customer: str  # email "Taken@Example.com"
    shipped: str
    cancelled: str


@pytest.fixture
def world(wiring: Wiring) -> World:
    sf = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="EXIST-1", name="Existing", price="2.50", stock=5), sf
    ).id
    customer = execute(customers.RegisterCustomer(email="Taken@Example.com", name="Cust"), sf).id

    def place() -> uuid.UUID:
        items = [{"product_id": product, "qty": 1}]
        return execute(orders.PlaceOrder(customer_id=customer, items=items), sf).id

    shipped, cancelled = place(), place()
    execute(orders.ShipOrder(order_id=shipped), sf)
    execute(orders.CancelOrder(order_id=cancelled), sf)
    return World(str(product), str(customer), str(shipped), str(cancelled))


P, C = "{product}", "{customer}"
CREATE = ("product", "create", "--sku", "NEW-1", "--name", "New")
PLACE = ("order", "place", "--customer", C)

# (id, argv with {product}/{customer}/{shipped}/{cancelled}/{unknown}, exit, text in error)
CASES = [
    # --- invalid input: exit 2 ---
    ("rename-product-bad-id", ("product", "rename", "not-a-uuid", "X"), 2, "product_id"),
    ("rename-customer-bad-id", ("customer", "rename", "123", "X"), 2, "customer_id"),
    ("cancel-bad-id", ("order", "cancel", "xyz"), 2, "order_id"),
    ("ship-bad-id", ("order", "ship", "42"), 2, "order_id"),
    ("place-bad-customer-id", ("order", "place", "--customer", "bob", "--item", f"{P}:1"), 2,
     "customer_id"),
    ("price-negative", (*CREATE, "--price=-1.00"), 2, "negative"),
    ("price-3-decimals", (*CREATE, "--price", "1.234"), 2, "2 decimal places"),
    ("price-nan", (*CREATE, "--price", "NaN"), 2, "finite"),
    ("price-inf", (*CREATE, "--price", "inf"), 2, "finite"),
    ("item-qty-zero", (*PLACE, "--item", f"{P}:0"), 2, "greater than 0"),
    ("item-qty-negative", (*PLACE, "--item", f"{P}:-2"), 2, "greater than 0"),
    ("item-abc", (*PLACE, "--item", "abc"), 2, "PRODUCT_ID:QTY"),
    ("item-no-product", (*PLACE, "--item", ":3"), 2, "PRODUCT_ID:QTY"),
    ("item-no-qty", (*PLACE, "--item", "x:"), 2, "PRODUCT_ID:QTY"),
    ("item-duplicate-product", (*PLACE, "--item", f"{P}:1", "--item", f"{P}:2"), 2,
     "more than one line"),
    ("email-invalid", ("customer", "register", "--email", "not-an-email", "--name", "N"), 2,
     "email"),
    ("name-empty", ("product", "create", "--sku", "NEW-1", "--name", "", "--price", "1"), 2,
     "name"),
    ("name-blank", ("customer", "rename", C, "   "), 2, "blank"),
    ("restock-zero", ("product", "restock", P, "0"), 2, "zero"),
    ("restock-not-a-number", ("product", "restock", P, "many"), 2, "QTY"),
    # --- refused by the current state: exit 1 ---
    ("rename-unknown-product", ("product", "rename", "{unknown}", "X"), 1, "not found"),
    ("cancel-unknown-order", ("order", "cancel", "{unknown}"), 1, "not found"),
    ("place-unknown-customer", ("order", "place", "--customer", "{unknown}", "--item", f"{P}:1"),
     1, "not found"),
    ("place-unknown-product", (*PLACE, "--item", "{unknown}:1"), 1, "not found"),
    ("place-out-of-stock", (*PLACE, "--item", f"{P}:999"), 1, "insufficient stock"),
    ("duplicate-sku", ("product", "create", "--sku", "EXIST-1", "--name", "N", "--price", "1"),
     1, "already exists"),
    ("duplicate-email-other-case",
     ("customer", "register", "--email", "taken@EXAMPLE.com", "--name", "N"), 1,
     "already exists"),
    ("cancel-shipped", ("order", "cancel", "{shipped}"), 1, "shipped"),
    ("ship-cancelled", ("order", "ship", "{cancelled}"), 1, "cancelled"),
    ("restock-below-zero", ("product", "restock", P, "-999"), 1, "insufficient stock"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "contains"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_one_error_line_and_writes_nothing(
    world: World,
    wiring: Wiring,
    cli_env: dict[str, str],
    argv: tuple[str, ...],
    code: int,
    contains: str,
) -> None:
    args = [a.format(unknown=UNKNOWN, **vars(world)) for a in argv]
    before = event_count(wiring.database_url)
    result = run_cli(*args, env=cli_env)
    assert result.returncode == code, result.stderr
    assert_one_error_line(result, contains)
    assert event_count(wiring.database_url) == before


def test_json_output_is_one_object_with_id_version_token(
    wiring: Wiring, cli_env: dict[str, str]
) -> None:
    before = event_count(wiring.database_url)
    result = run_cli(*CREATE, "--price", "12.50", "--stock", "3", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    assert {"id", "version", "token"} <= data.keys()
    product_id = uuid.UUID(data["id"])
    assert data["version"] == 1
    [stamp] = decode_token(data["token"])
    assert (stamp.aggregate_type, stamp.aggregate_id, stamp.version) == ("product", product_id, 1)
    assert event_count(wiring.database_url) == before + 1


CLOSED_PG = "postgresql://u:sekret@127.0.0.1:1/x"
CLOSED_REDIS = "redis://:sekret@127.0.0.1:1/0"


@pytest.mark.parametrize(
    ("argv", "env_update", "contains"),
    [
        (("customer", "register", "--email", "a@b.co", "--name", "N"),
         {"CQRS_DATABASE_URL": CLOSED_PG}, "PostgreSQL"),
        (("db", "upgrade"), {"CQRS_DATABASE_URL": CLOSED_PG}, "PostgreSQL"),
        (("relay", "--drain"), {"CQRS_DATABASE_URL": CLOSED_PG}, "PostgreSQL"),
        (("relay", "--drain"), {"CQRS_REDIS_URL": CLOSED_REDIS}, "Redis"),
    ],
    ids=["command", "db-upgrade", "relay-drain-pg", "relay-drain-redis"],
)  # fmt: skip
def test_unreachable_server_error_never_shows_the_password(
    cli_env: dict[str, str], argv: tuple[str, ...], env_update: dict[str, str], contains: str
) -> None:
    result = run_cli(*argv, env={**cli_env, **env_update})
    assert result.returncode == 1, result.stderr
    line = assert_one_error_line(result, f"cannot reach {contains}")
    assert "sekret" not in line


def test_invalid_database_url_setting_is_masked(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CQRS_DATABASE_URL": "mysql://u:sekret@127.0.0.1:1/x"}
    result = run_cli("db", "upgrade", env=env)
    assert result.returncode == 2, result.stderr
    line = assert_one_error_line(result, "CQRS_DATABASE_URL")
    assert "sekret" not in line
