"""Hostile input through the real CLI, complementing tests/e2e/test_cli_bad_input.py (whose
rows are not repeated here): oversized and invisible text, terminal escapes, CR/LF, SQL and
RESP look-alikes, numbers at and past every limit, ids in every shape, 10,001 order lines.

Each refused input: the expected exit code (2 invalid, 1 refused by the state), exactly one
`error: ...` line on stderr, nothing on stdout, nothing written (event log count unchanged).

Text that only *looks* dangerous but breaks no rule (no control characters) is a valid name:
it must be stored and projected verbatim, and it must not change which keys are touched
(tests/integration/test_hostile_keys.py checks the whole key set).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from cqrs.commands import catalog, customers, orders
from cqrs.commands.db import MAX_ORDER_LINES, make_session_factory
from cqrs.commands.handlers import execute
from cqrs.wiring import Wiring
from tests.helpers import assert_one_error_line, event_count, run_cli, run_cli_json

UNKNOWN = str(uuid.UUID(int=0xBAD))


@dataclass(frozen=True)
class World:
    product: str  # stock 5, then 4 (one order shipped, one cancelled)
    customer: str
    shipped: str
    cancelled: str

    def fill(self, arg: str) -> str:
        """Replace the known placeholders only (hostile text may contain other braces)."""
        pid = uuid.UUID(self.product)
        values = {
            **vars(self),
            "unknown": UNKNOWN,
            "product_upper": str(pid).upper(),
            "product_braced": f"{{{pid}}}",
            "product_urn": pid.urn,
        }
        for key, value in values.items():
            arg = arg.replace(f"{{{key}}}", value)
        return arg


@pytest.fixture
def world(wiring: Wiring) -> World:
    sf = make_session_factory(wiring.engine)
    product = execute(
        catalog.CreateProduct(sku="HOST-1", name="Host", price="3.00", stock=5), sf
    ).id
    customer = execute(customers.RegisterCustomer(email="host@example.com", name="Host"), sf).id

    def place() -> uuid.UUID:
        items = [{"product_id": product, "qty": 1}]
        return execute(orders.PlaceOrder(customer_id=customer, items=items), sf).id

    shipped, cancelled = place(), place()
    execute(orders.ShipOrder(order_id=shipped), sf)
    execute(orders.CancelOrder(order_id=cancelled), sf)
    return World(str(product), str(customer), str(shipped), str(cancelled))


P, C = "{product}", "{customer}"
CREATE = ("product", "create", "--sku", "NEW-1", "--price", "1.00")
NAMED = ("product", "create", "--sku", "NEW-1", "--price", "1.00", "--name")
PRICED = ("product", "create", "--sku", "NEW-1", "--name", "New", "--price")
PLACE = ("order", "place", "--customer", C)
RESP = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n"

# (id, argv with {product}/{customer}/{shipped}/{cancelled}/{unknown}/..., exit, text in error)
CASES = [
    # --- names: oversized, invisible, terminal escapes, CR/LF, protocol look-alikes ---
    ("name-10000-chars", (*NAMED, "x" * 10_000), 2, "at most 200"),
    ("name-ansi-escape", (*NAMED, "\x1b[2J\x1b[31mred"), 2, "control characters"),
    ("name-crlf", ("customer", "rename", C, "Ann\r\nSmith"), 2, "control characters"),
    ("name-only-newline", ("product", "rename", P, "\n"), 2, "control characters"),
    ("name-bidi-override", (*NAMED, "\u202egnp.exe"), 2, "control characters"),
    ("name-zero-width-only", ("customer", "rename", C, "\u200b\u200b"), 2, "control characters"),
    ("name-delete-char", (*NAMED, "abc\x7f"), 2, "control characters"),
    ("name-resp-command", ("product", "rename", P, RESP), 2, "control characters"),
    # --- other text fields ---
    ("sku-crlf", ("product", "create", "--sku", "S-1\r\nX", "--name", "N", "--price", "1"), 2,
     "sku"),
    ("sku-sql", ("product", "create", "--sku", "'; DROP TABLE x; --", "--name", "N",
                 "--price", "1"), 2, "sku"),
    ("sku-65-chars", ("product", "create", "--sku", "S" * 65, "--name", "N", "--price", "1"), 2,
     "at most 64"),
    ("email-crlf-header", ("customer", "register", "--email", "a@b.co\r\nBcc: x@y.z",
                           "--name", "N"), 2, "email"),
    ("email-oversized", ("customer", "register", "--email", "a" * 250 + "@example.com",
                         "--name", "N"), 2, "email"),
    # --- prices ---
    ("price-empty", (*PRICED, ""), 2, "not a number"),
    ("price-comma", (*PRICED, "12,50"), 2, "not a number"),
    ("price-hex", (*PRICED, "0x10"), 2, "not a number"),
    ("price-1e400", (*PRICED, "1e400"), 2, "at most"),
    ("price-negative-fraction", (*PRICED, "-0.001"), 2, "negative"),
    ("price-signalling-nan", ("product", "reprice", P, "sNaN"), 2, "finite"),
    ("price-minus-inf", (*PRICED[:-1], "--price=-Infinity"), 2, "finite"),
    # --- quantities ---
    ("stock-negative", (*CREATE, "--name", "N", "--stock=-1"), 2, "greater than or equal to 0"),
    ("stock-huge", (*CREATE, "--name", "N", "--stock", "10000000000"), 2,
     "less than or equal to 1000000000"),
    ("item-qty-huge", (*PLACE, "--item", f"{P}:1000001"), 2, "less than or equal to 1000000"),
    ("item-qty-past-int64", (*PLACE, "--item", f"{P}:99999999999999999999999"), 2,
     "less than or equal"),
    ("item-qty-fraction", (*PLACE, "--item", f"{P}:1.5"), 2, "integer"),
    ("item-qty-nan", (*PLACE, "--item", f"{P}:nan"), 2, "integer"),
    ("restock-huge", ("product", "restock", P, "10000000000"), 2, "less than or equal"),
    ("order-without-items", PLACE, 2, "--item"),
    # --- duplicate lines in other spellings of the same id ---
    ("item-duplicate-upper-case", (*PLACE, "--item", f"{P}:1", "--item", "{product_upper}:2"),
     2, "more than one line"),
    ("item-duplicate-braced", (*PLACE, "--item", "{product_braced}:1", "--item",
                               "{product_urn}:2"), 2, "more than one line"),
    ("lines-101", (*PLACE, *[a for _ in range(MAX_ORDER_LINES + 1)
                             for a in ("--item", f"{uuid.uuid4()}:1")]), 2, "at most 100"),
    # --- ids that are not UUIDs ---
    ("id-sql", ("product", "rename", "1' OR '1'='1", "X"), 2, "product_id"),
    ("id-glob", ("order", "ship", "*"), 2, "order_id"),
    ("id-hash-tag", ("customer", "rename", "{p0}", "X"), 2, "customer_id"),
    ("id-trailing-newline", ("order", "cancel", UNKNOWN + "\n"), 2, "order_id"),
    ("id-empty", ("product", "restock", "", "1"), 2, "product_id"),
    # --- well-formed, refused by the state: exit 1 ---
    ("ship-unknown-order", ("order", "ship", "{unknown}"), 1, "not found"),
    ("reprice-unknown-product", ("product", "reprice", "{unknown}", "1.00"), 1, "not found"),
    ("restock-unknown-product", ("product", "restock", "{unknown}", "5"), 1, "not found"),
    ("rename-unknown-customer", ("customer", "rename", "{unknown}", "X"), 1, "not found"),
    ("cancel-cancelled", ("order", "cancel", "{cancelled}"), 1, "already cancelled"),
    ("ship-shipped", ("order", "ship", "{shipped}"), 1, "already shipped"),
    ("restock-past-max", ("product", "restock", P, "1000000000"), 1, "would exceed"),
    ("place-one-more-than-stock", (*PLACE, "--item", f"{P}:5"), 1, "available 4"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "contains"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_hostile_input_is_one_error_line_and_writes_nothing(
    world: World,
    wiring: Wiring,
    cli_env: dict[str, str],
    argv: tuple[str, ...],
    code: int,
    contains: str,
) -> None:
    args = [world.fill(a) for a in argv]
    before = event_count(wiring.database_url)
    result = run_cli(*args, env=cli_env)
    assert result.returncode == code, result.stderr[-2000:]
    line = assert_one_error_line(result, contains)
    assert len(line) < 500, "the error line must not echo a huge input back"
    assert "\x1b" not in line and "\r" not in line, "the error line must not replay escapes"
    assert event_count(wiring.database_url) == before


def test_10001_order_lines_are_refused_and_write_nothing(
    world: World, wiring: Wiring, cli_env: dict[str, str]
) -> None:
    """20,002 arguments still fit in argv on Linux (about 0.5 MB); the model refuses the
    order before anything is looked up."""
    lines = [f"{uuid.uuid4()}:1" for _ in range(10_001)]
    before = event_count(wiring.database_url)
    argv = ["order", "place", "--customer", world.customer]
    for line in lines:
        argv += ["--item", line]
    result = run_cli(*argv, env=cli_env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_error_line(result, "at most 100")
    assert event_count(wiring.database_url) == before
    # The same through the Python API, as another service would call it.
    with pytest.raises(ValidationError, match="at most 100 items"):
        orders.PlaceOrder(
            customer_id=world.customer,
            items=[{"product_id": line.split(":")[0], "qty": 1} for line in lines],
        )


LOOKALIKES = [
    "'; DROP TABLE x; --",
    "*3 $3 SET k v",
    "{p0} }{ a:b*c ?[x]",
    "$(rm -rf /) `id` %s%n",
    "<script>alert(1)</script>",
]


@pytest.mark.parametrize("name", LOOKALIKES, ids=["sql", "resp", "key-chars", "shell", "html"])
def test_dangerous_looking_names_are_stored_and_projected_verbatim(
    wiring: Wiring, cli_env: dict[str, str], name: str
) -> None:
    before = event_count(wiring.database_url)
    product = run_cli_json(
        "product", "create", "--sku", "LOOK-1", "--name", name, "--price", "2.00", env=cli_env
    )
    customer = run_cli_json(
        "customer", "register", "--email", "look@example.com", "--name", name, env=cli_env
    )
    assert event_count(wiring.database_url) == before + 2
    drained = run_cli("run", "--drain", env=cli_env)
    assert drained.returncode == 0, drained.stderr[-2000:]
    shown = run_cli_json("query", "product", product["id"], env=cli_env)
    assert shown["name"] == name
    shown = run_cli_json("query", "customer", customer["id"], env=cli_env)
    assert shown["name"] == name
    with wiring.engine.connect() as conn:
        stored = conn.execute(
            text("SELECT name FROM catalog.products WHERE id = :id"), {"id": product["id"]}
        ).scalar_one()
    assert stored == name
    verified = run_cli("verify", env=cli_env)
    assert verified.returncode == 0, verified.stdout[-2000:]


def test_minus_zero_price_is_zero_everywhere(wiring: Wiring, cli_env: dict[str, str]) -> None:
    """Regression (found by the property tests): "-0" passed the sign check and travelled
    as "-0.00" into the events and views while PostgreSQL stored 0.00."""
    product = run_cli_json(
        "product", "create", "--sku", "ZERO-1", "--name", "Zero", "--price", "-0", env=cli_env
    )
    drained = run_cli("run", "--drain", env=cli_env)
    assert drained.returncode == 0, drained.stderr[-2000:]
    assert run_cli_json("query", "product", product["id"], env=cli_env)["price"] == "0.00"
    verified = run_cli("verify", "--json", env=cli_env)
    assert verified.returncode == 0 and json.loads(verified.stdout)["differences"] == 0
