"""Query handlers and `cqrs query` against views built by the real projector."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading

import pytest

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.worker import Worker
from cqrs.queries import BadCursor, BadView, NotCaughtUp, NotFound, ProductView, QueryService
from cqrs.queries.aio import AsyncViews, make_async_redis
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import run_cli, run_cli_json
from tests.integration.projector_support import drain, relay_all, run

CLOSED_DB = "postgresql://nobody:sekret@127.0.0.1:1/none"


@pytest.fixture
def service(wiring: Wiring) -> QueryService:
    return QueryService(wiring.redis, wiring.keys)


def _shop(wiring: Wiring, n_products: int = 7) -> tuple[list, object, list]:
    products = [
        run(
            wiring,
            CreateProduct(sku=f"Q-{i}", name=f"Item {i:02d}", price=f"{10 - i}.00", stock=50),
        ).id
        for i in range(n_products)
    ]
    customer = run(wiring, RegisterCustomer(email="q@example.com", name="Quinn")).id
    orders = [
        run(
            wiring,
            PlaceOrder(customer_id=customer, items=[{"product_id": products[i], "qty": i + 1}]),
        ).id
        for i in range(3)
    ]
    drain(wiring)
    return products, customer, orders


def test_every_query_reads_the_views(wiring: Wiring, service: QueryService) -> None:
    products, customer, orders = _shop(wiring)
    product = service.get_product(products[0])
    assert (product.name, str(product.price), product.stock, product.units_sold) == (
        "Item 00",
        "10.00",
        49,
        1,
    )
    c = service.get_customer(customer)
    # Three orders: 1 x 10.00, 2 x 9.00, 3 x 8.00.
    assert (c.name, c.order_count, str(c.lifetime_value)) == ("Quinn", 3, "52.00")
    order = service.get_order(orders[2])
    assert (order.customer_name, order.status, str(order.total)) == ("Quinn", "placed", "24.00")
    assert [(line.name, str(line.unit_price), line.qty) for line in order.lines] == [
        ("Item 02", "8.00", 3)
    ]
    newest_first = service.customer_orders(customer, limit=10).items
    assert [o.id for o in newest_first] == list(reversed(orders))
    top = service.top_products(limit=2)
    assert [p.id for p in top] == [products[2], products[1]]
    by_name = service.list_products(sort="name", limit=100).items
    assert [p.name for p in by_name] == sorted(p.name for p in by_name)
    by_price = service.list_products(sort="price", limit=100).items
    assert [p.price for p in by_price] == sorted(p.price for p in by_price)
    for missing in (
        lambda: service.get_product("00000000-0000-0000-0000-000000000000"),
        lambda: service.get_order("not-a-uuid"),
        lambda: service.get_customer("00000000-0000-0000-0000-000000000000"),
        lambda: service.customer_orders("00000000-0000-0000-0000-000000000000"),
    ):
        with pytest.raises(NotFound):
            missing()
    with pytest.raises(BadCursor):
        service.list_products(cursor="bm90IG91cnM")


@pytest.mark.parametrize("sort", ["name", "price"])
def test_pages_survive_a_concurrent_insert(
    wiring: Wiring, service: QueryService, sort: str
) -> None:
    _shop(wiring)
    first = service.list_products(sort=sort, limit=3)
    # A product that sorts before the cursor and one after it arrive between two pages.
    run(wiring, CreateProduct(sku="Q-A", name="Aardvark", price="0.01", stock=1))
    run(wiring, CreateProduct(sku="Q-Z", name="Zebra", price="99.00", stock=1))
    drain(wiring)
    seen = [p.id for p in first.items]
    cursor = first.next_cursor
    while cursor:
        page = service.list_products(sort=sort, limit=3, cursor=cursor)
        seen += [p.id for p in page.items]
        cursor = page.next_cursor
    names = [service.get_product(i).name for i in seen]
    assert len(seen) == len(set(seen)), "an item was repeated across pages"
    assert {f"Item {i:02d}" for i in range(7)} <= set(names), "an existing item was skipped"
    assert "Zebra" in names and "Aardvark" not in names  # before the cursor: not revisited


def test_customer_orders_paginate_newest_first(wiring: Wiring, service: QueryService) -> None:
    _, customer, orders = _shop(wiring)
    page1 = service.customer_orders(customer, limit=2)
    assert [o.id for o in page1.items] == [orders[2], orders[1]]
    page2 = service.customer_orders(customer, limit=2, cursor=page1.next_cursor)
    assert [o.id for o in page2.items] == [orders[0]] and page2.next_cursor is None


def test_queries_never_touch_postgresql(settings: Settings, wiring: Wiring) -> None:
    products, customer, orders = _shop(wiring)
    broken = Wiring(settings.model_copy(update={"database_url": CLOSED_DB}))
    try:
        service = QueryService(broken.redis, broken.keys)
        assert service.get_product(products[0]).name == "Item 00"
        assert service.get_order(orders[0]).customer_name == "Quinn"
        assert service.customer_orders(customer).items
        assert "engine" not in broken.__dict__  # no engine was ever built
    finally:
        broken.close()
    env = settings_env(settings) | {"CQRS_DATABASE_URL": CLOSED_DB}
    result = run_cli("query", "order", str(orders[0]), "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["customer_name"] == "Quinn"


def test_cli_queries_print_json_with_view_field_names(settings: Settings, wiring: Wiring) -> None:
    products, customer, orders = _shop(wiring)
    env = settings_env(settings)
    order = run_cli_json("query", "order", str(orders[1]), env=env)
    assert order["lines"][0] == {
        "product_id": str(products[1]),
        "name": "Item 01",
        "unit_price": "9.00",
        "qty": 2,
        "line_total": "18.00",
    }
    assert set(order) >= {"customer_name", "status", "total", "placed_at", "version"}
    product = run_cli_json("query", "product", str(products[0]), env=env)
    assert set(product) >= {"name", "stock", "units_sold", "revenue", "price", "sku"}
    page = run_cli_json("query", "products", "--sort", "price", "--limit", "2", env=env)
    assert len(page["items"]) == 2 and page["next_cursor"]
    top = run_cli_json("query", "top-products", "--limit", "1", env=env)
    assert set(top) == {"items", "next_cursor"} and top["next_cursor"] is None
    assert [p["id"] for p in top["items"]] == [str(products[2])]
    assert run_cli_json("query", "customer", str(customer), env=env)["order_count"] == 3
    assert len(run_cli_json("query", "customer-orders", str(customer), env=env)["items"]) == 3
    missing = run_cli("query", "product", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "error: product 00000000-0000-0000-0000-000000000000 not found"
    assert missing.stdout == ""
    bad = run_cli("query", "products", "--sort", "size", env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_after_returns_at_once_when_caught_up(settings: Settings, wiring: Wiring) -> None:
    env = settings_env(settings)
    created = run_cli_json(
        "product", "create", "--sku", "RYW-1", "--name", "Now", "--price", "1.00", env=env
    )
    drain(wiring)
    result = run_cli(
        "query",
        "product",
        created["id"],
        "--after",
        created["token"],
        "--timeout",
        "0.5",
        "--json",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "Now"


def test_after_waits_for_a_paused_projector_then_answers(
    settings: Settings, wiring: Wiring
) -> None:
    env = settings_env(settings)
    customer = run_cli_json(
        "customer", "register", "--email", "w@example.com", "--name", "Wes", env=env
    )
    drain(wiring)
    product = run_cli_json(
        "product",
        "create",
        "--sku",
        "RYW-2",
        "--name",
        "Later",
        "--price",
        "2.00",
        "--stock",
        "5",
        env=env,
    )
    placed = run_cli_json(
        "order", "place", "--customer", customer["id"], "--item", f"{product['id']}:2", env=env
    )
    relay_all(wiring)
    service = QueryService(wiring.redis, wiring.keys)
    assert service.behind(placed["token"]), "nothing should be projected yet"
    waiter = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cqrs.app",
            "query",
            "order",
            placed["id"],
            "--after",
            placed["token"],
            "--timeout",
            "30",
            "--json",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The waiter is blocked while the projector is paused...
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=1.5)
        assert service.behind(placed["token"])
        # ...and answers once it is released.
        worker = Worker(
            wiring.redis, wiring.settings, PROJECTIONS.values(), database_url=wiring.database_url
        )
        threading.Thread(
            target=worker.run, args=(threading.Event(),), kwargs={"drain": True}
        ).start()
        stdout, stderr = waiter.communicate(timeout=30)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, stderr
    order = json.loads(stdout)
    assert order["id"] == placed["id"] and order["lines"][0]["qty"] == 2
    # The same token now also covers the customer's counters and the product's sales.
    assert service.get_customer(customer["id"]).order_count == 1
    assert service.get_product(product["id"]).units_sold == 2


def test_after_times_out_when_the_projector_stays_paused(
    settings: Settings, wiring: Wiring
) -> None:
    env = settings_env(settings)
    created = run_cli_json(
        "product", "create", "--sku", "RYW-3", "--name", "Never", "--price", "3.00", env=env
    )
    result = run_cli(
        "query", "product", created["id"], "--after", created["token"], "--timeout", "1", env=env
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: views did not reflect the write within 1s")
    assert "lag" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(NotCaughtUp):
        QueryService(wiring.redis, wiring.keys).wait_for(created["token"], timeout=0.2)
    bad = run_cli("query", "product", created["id"], "--after", "garbage!", env=env)
    assert bad.returncode == 2 and "invalid consistency token" in bad.stderr


def test_a_corrupted_view_is_reported_not_half_read(
    settings: Settings, wiring: Wiring, service: QueryService
) -> None:
    """Views are written by our projections only, but a hand edit, a truncated restore or
    another program can still break one: the query names the key and what is wrong (one
    line in the CLI), and the connection stays usable for the next query."""
    products, customer, orders = _shop(wiring)
    r, views = wiring.redis, wiring.keys.views("orders", 1)
    order_key = views.order(orders[0])
    r.hset(order_key, "total", "lots")
    with pytest.raises(BadView, match=r"view .*order:\{.*\} is not valid: total: "):
        service.get_order(orders[0])
    env = settings_env(settings)
    result = run_cli("query", "order", str(orders[0]), "--json", env=env)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: view {order_key} is not valid: total:"), line

    r.hset(order_key, mapping={"total": "10.00", "line_count": "one"})
    with pytest.raises(BadView, match="line_count: 'one'"):
        service.get_order(orders[0])
    r.hset(order_key, "line_count", "1")
    r.hdel(order_key, "line:1:qty")
    with pytest.raises(BadView, match=r"lines\.0\.qty"):
        service.get_order(orders[0])
    with pytest.raises(BadView, match=r"lines\.0\.qty"):  # inside a page of orders too
        service.customer_orders(customer)

    # A key of another type where a product view belongs: an error reply from Redis.
    product_key = wiring.keys.views("products", 1).product(products[0])
    r.delete(product_key)
    r.set(product_key, "not a hash")
    with pytest.raises(BadView, match=f"view {re.escape(product_key)} cannot be read: WRONGTYPE"):
        service.get_product(products[0])
    assert service.get_product(products[1]).name == "Item 01"  # the next read is clean
    assert asyncio.run(_async_get_product(wiring, products[1])).name == "Item 01"
    with pytest.raises(BadView, match="WRONGTYPE"):
        asyncio.run(_async_get_product(wiring, products[0]))


async def _async_get_product(wiring: Wiring, product_id: object) -> ProductView:
    views = AsyncViews(make_async_redis(wiring.redis_url, socket_timeout=5), wiring.keys)
    try:
        return await views.get_product(str(product_id))
    finally:
        await views.aclose()


def test_get_by_id_reads_the_generation_a_rebuild_switched_to(
    wiring: Wiring, service: QueryService
) -> None:
    """Each reader remembers the live generation it last saw; the generation number is
    read in the same round trip as the view, so a switch is noticed on the very next read
    and the view read again from the new generation (never a cached answer)."""
    _, _, orders = _shop(wiring)
    r = wiring.keys
    assert service.get_order(orders[0]).customer_name == "Quinn"  # generation 1 remembered

    async def read_twice() -> tuple[str, str]:
        views = AsyncViews(make_async_redis(wiring.redis_url, socket_timeout=5), r)
        try:
            before = (await views.get_order(orders[0])).customer_name
            wiring.redis.set(r.generation("orders"), 2)
            after = (await views.get_order(orders[0])).customer_name
            return before, after
        finally:
            await views.aclose()

    old, new = r.views("orders", 1).order(orders[0]), r.views("orders", 2).order(orders[0])
    wiring.redis.hset(new, mapping={**wiring.redis.hgetall(old), "customer_name": "Quinn II"})
    assert asyncio.run(read_twice()) == ("Quinn", "Quinn II")
    assert service.get_order(orders[0]).customer_name == "Quinn II"
    wiring.redis.set(r.generation("orders"), 1)
    assert service.get_order(orders[0]).customer_name == "Quinn"


def test_orders_of_100_lines_read_back_in_order(wiring: Wiring, service: QueryService) -> None:
    products = [
        run(wiring, CreateProduct(sku=f"C-{n}", name=f"Part {n:03d}", price="0.50", stock=9)).id
        for n in range(100)
    ]
    customer = run(wiring, RegisterCustomer(email="c@example.com", name="Cleo")).id
    items = [{"product_id": p, "qty": 1 + n % 4} for n, p in enumerate(products)]
    order_id = run(wiring, PlaceOrder(customer_id=customer, items=items)).id
    drain(wiring)
    order = service.get_order(order_id)
    assert [(line.product_id, line.name, line.qty) for line in order.lines] == [
        (p, f"Part {n:03d}", 1 + n % 4) for n, p in enumerate(products)
    ]
    assert sum(line.line_total for line in order.lines) == order.total


def test_a_cursor_belongs_to_its_sort(settings: Settings, wiring: Wiring) -> None:
    """A cursor handed out for one sort order is refused with another (it used to start
    the other index at a meaningless member: an empty page and exit 0)."""
    _shop(wiring)
    env = settings_env(settings)
    page = run_cli_json("query", "products", "--sort", "name", "--limit", "2", env=env)
    reused = run_cli(
        "query", "products", "--sort", "price", "--cursor", page["next_cursor"], env=env
    )
    assert reused.returncode == 2 and reused.stdout == ""
    assert reused.stderr.strip().splitlines() == ["error: cursor belongs to another sort"]
    same = run_cli_json(
        "query", "products", "--sort", "name", "--cursor", page["next_cursor"], env=env
    )
    assert [p["name"] for p in same["items"]][:1] == ["Item 02"]


def test_query_ids_and_choices_are_checked_as_usage(settings: Settings) -> None:
    """A malformed id is exit 2 (usage) in `query` as in the write commands, with nothing
    read; `--sort` offers and checks its choices."""
    env = settings_env(settings)
    for command, field in (
        ("product", "product_id"),
        ("customer", "customer_id"),
        ("order", "order_id"),
        ("customer-orders", "customer_id"),
    ):
        result = run_cli("query", command, "not-a-uuid", "--json", env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert result.stdout == ""
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: invalid {field}: Input should be a valid UUID"), line
    usage = run_cli("query", "products", "--help", env=env)
    assert "name|price" in usage.stdout
    bad = run_cli("query", "products", "--sort", "size", env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: Invalid value for '--sort': 'size' is not one of 'name', 'price'."
    ]


def test_serve_on_a_busy_port_is_one_error_line(settings: Settings) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port), env=settings_env(settings))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), line
    assert "in use" in line.lower()
