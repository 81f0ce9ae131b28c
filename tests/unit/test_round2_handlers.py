"""The built-in handlers write the same steps whichever way an entry was parsed: on the
fast path (canonical ids and amounts: the keys reuse the entry's id text, money skips the
text round trip) or on the contract's slow path (the same event spelled otherwise: an
upper-case aggregate id, amounts without their trailing zero)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from bench.history import make_history
from cqrs.contracts import cents
from cqrs.events import EventEnvelope, aggregate_text, parse_stream_entry
from cqrs.keys import KeyMap
from cqrs.projector.customers import CUSTOMERS
from cqrs.projector.orders import ORDERS
from cqrs.projector.products import PRODUCTS
from cqrs.projector.steps import Step

PROJECTIONS = (PRODUCTS, ORDERS, CUSTOMERS)
HISTORY = [e.stream_fields(n) for n, e in enumerate(make_history(2000, seed=5), start=1)]
KEYS = KeyMap("t")
VIEWS = {p.name: KEYS.views(p.name, 1) for p in PROJECTIONS}


def _respelled(fields: dict[str, str]) -> dict[str, str]:
    """The same event, spelled as the contract accepts but the fast path does not."""
    payload = re.sub(r'"(-?\d+\.\d)0"', r'"\1"', fields["payload"])  # "12.50" -> "12.5"
    return {**fields, "aggregate_id": fields["aggregate_id"].upper(), "payload": payload}


def _shape(steps: list[Step] | None) -> Any:
    if steps is None:
        return None
    return [
        (
            s.script,
            tuple(s.keys),
            tuple(s.args),
            tuple(s.command),
            s.gated,
            s.counted,
            s.then is None,
        )
        for s in steps
    ]


def test_the_respelled_entries_take_the_slow_path() -> None:
    slow = [parse_stream_entry(_respelled(f))[0] for f in HISTORY]
    assert all(type(h) is EventEnvelope for h in slow)
    assert any(_respelled(f)["payload"] != f["payload"] for f in HISTORY)


def test_steps_are_the_same_on_both_paths() -> None:
    compared = 0
    for fields in HISTORY:
        for projection in PROJECTIONS:
            views = VIEWS[projection.name]
            fast = projection.steps(fields, views)
            slow = projection.steps(_respelled(fields), views)
            assert _shape(fast) == _shape(slow), (projection.name, fields["type"])
            compared += fast is not None
    assert compared > len(HISTORY)


def test_follow_ups_are_the_same_on_both_paths() -> None:
    """The callbacks too: fed the same results, they return the same next steps."""
    results = {
        "apply": [1, "7", "3"],  # status, then the returned fields (units_sold / name, version)
        "zadd_and_read": [1, "Known Name", "9"],
        "track": ["Old Name", "Older Name", "Old Name"],
    }
    for fields in HISTORY:
        for projection in PROJECTIONS:
            views = VIEWS[projection.name]
            fast = projection.steps(fields, views) or []
            slow = projection.steps(_respelled(fields), views) or []
            for a, b in zip(fast, slow, strict=True):
                if a.then is None:
                    continue
                result = results.get(a.script or "", [1])
                assert _shape(a.then(result)) == _shape(b.then(result))  # type: ignore[misc]


def test_ids_are_the_canonical_text_either_way() -> None:
    fields = next(f for f in HISTORY if f["type"] == "ProductRenamed")
    fast, _ = parse_stream_entry(fields)
    slow, _ = parse_stream_entry(_respelled(fields))
    assert aggregate_text(fast) == aggregate_text(slow) == str(slow.aggregate_id)
    assert aggregate_text(fast) == fields["aggregate_id"]


def test_cents_of_a_decimal_and_of_its_text_agree() -> None:
    amounts = {a for f in HISTORY for a in re.findall(r'"(-?\d+\.\d\d)"', f["payload"])}
    assert amounts
    for amount in [*amounts, "-0.00", "-12.05", "999999999999.99"]:
        assert cents(Decimal(amount)) == cents(amount) == int(amount.replace(".", ""))
    assert cents(Decimal("1E+2")) == cents("1E+2") == 10000
