"""No text a user types changes which Redis keys are touched.

Names full of `{`, `}`, `:`, `*` (hash tags, key separators, glob patterns), names that
spell whole keys or other aggregates' hash tags, and ids given in their other accepted
spellings (braced, URN, upper case) go through the real handlers and the real projector.
Afterwards the namespace holds exactly the keys the UUIDs call for, every name reads back
verbatim, and `verify` finds nothing to report.
"""

from __future__ import annotations

import uuid

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.contracts import builtin_contracts
from cqrs.projector.registry import PROJECTIONS
from cqrs.wiring import Wiring
from tests.integration.projector_support import differences, drain, run

GHOST = uuid.UUID("00000000-0000-4000-8000-00000000beef")  # never created


def hostile_names(ns: str) -> list[str]:
    return [
        "{p0}",
        "}{",
        "a:b:c",
        "*",
        "**:{*}:**",
        f"{{{GHOST}}}",
        f"x}}:product:{{{GHOST}}}",
        f"{ns}:products:g1:product:{{{GHOST}}}",
        f"{ns}:*",
        "?[a-z]\\",
        "{}",
        "::",
    ]


def expected_keys(
    wiring: Wiring,
    products: list[uuid.UUID],
    customers: list[uuid.UUID],
    orders: dict[uuid.UUID, uuid.UUID],
) -> set[str]:
    """The view and bookkeeping keys these aggregates call for, built with the key map."""
    k = wiring.keys
    p, c, o = (k.views(name, 1) for name in ("products", "customers", "orders"))
    keys = {p.products_by_name(), p.products_by_price(), p.top_products(), k.meta()}
    keys |= {p.products_by_name_versions(), p.products_by_price_versions()}
    keys |= {p.top_products_versions()}
    for pid in products:
        keys |= {p.product(pid), p.product_names(pid), p.product_prices(pid)}
    for cid in customers:
        keys |= {c.customer(cid), o.order_customer(cid)}
    for oid, cid in orders.items():
        keys |= {o.order(oid), o.customer_orders(cid), c.customer_order_state(cid)}
    for name in PROJECTIONS:
        keys |= {k.generation(name), k.projection_state(name), k.generation_counter(name)}
    keys |= {k.stream(n) for n in range(wiring.settings.partitions)}
    return keys


def allowed_extras(wiring: Wiring) -> set[str]:
    """Keys that may or may not exist after a drain (heartbeats, leases, dead letters,
    operational records); none is built from user text either."""
    k = wiring.keys
    extras: set[str] = set()
    for name in PROJECTIONS:
        extras |= {k.workers(name), k.dead_letters(name), k.pause(name), k.replay_lock(name)}
        extras |= {k.lease(name, n) for n in range(wiring.settings.partitions)}
        extras |= {k.progress(name), k.repair(name)}
    # The relay's per-stream marks (failover repair), for the streams that got events.
    extras |= {k.relay_mark(n) for n in range(wiring.settings.partitions)}
    return extras


def test_names_never_change_which_keys_are_touched(wiring: Wiring) -> None:
    names = hostile_names(wiring.keys.ns)
    products, customers, orders = [], [], {}
    for i, name in enumerate(names):
        pid = run(wiring, CreateProduct(sku=f"K-{i}", name=name, price="1.00", stock=10)).id
        cid = run(wiring, RegisterCustomer(email=f"k{i}@example.com", name=name)).id
        products.append(pid)
        customers.append(cid)
        # Other spellings of the same ids: braced, URN, upper case.
        run(wiring, RenameProduct(product_id=f"{{{pid}}}", name=names[-1 - i]))
        run(wiring, RenameCustomer(customer_id=cid.urn, name=names[-1 - i]))
        items = [{"product_id": str(pid).upper(), "qty": 1}]
        orders[run(wiring, PlaceOrder(customer_id=cid, items=items)).id] = cid
    drain(wiring)

    present = set(wiring.redis.scan_iter(match=f"{wiring.keys.ns}:*", count=1000))
    expected = expected_keys(wiring, products, customers, orders)
    assert expected <= present, sorted(expected - present)[:5]
    # An installed plugin's views (this test names the built-ins' keys; a plugin's keys are
    # its contract's, and `differences` below checks them against PostgreSQL).
    plugins = [f"{wiring.keys.ns}:{n}:g" for n in set(PROJECTIONS) - set(builtin_contracts())]
    unexpected = {
        key
        for key in present - expected - allowed_extras(wiring)
        if not key.startswith(tuple(plugins))
    }
    assert not unexpected, sorted(unexpected)[:5]
    assert not any(str(GHOST) in key for key in present)

    views = wiring.keys.views("products", 1)
    for i, pid in enumerate(products):
        assert wiring.redis.hget(views.product(pid), "name") == names[-1 - i]
    views = wiring.keys.views("customers", 1)
    for i, cid in enumerate(customers):
        assert wiring.redis.hget(views.customer(cid), "name") == names[-1 - i]
    assert differences(wiring) == []
