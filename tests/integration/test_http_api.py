"""The HTTP query API, served by a real `cqrs serve` subprocess on 127.0.0.1.

Data comes from the real command handlers and the real projector; the client is httpx.
Each test gets its own server (the namespace is per test; see http_support).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openapi_spec_validator import validate

from cqrs.commands.catalog import CreateProduct, RepriceProduct, RestockProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.contracts import registered_contracts
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.helpers import wait_until
from tests.integration.http_support import ApiServer, api_servers
from tests.integration.projector_support import drain, relay_all, run

CLOSED_DB = "postgresql://nobody@127.0.0.1:1/none"
CLOSED_REDIS = "redis://127.0.0.1:1/0"
MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def start_api(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    yield from api_servers(settings, tmp_path)


@pytest.fixture
def api(start_api: Callable[..., ApiServer]) -> ApiServer:
    return start_api()


def _shop(wiring: Wiring, n_products: int = 5) -> tuple[list, object, list]:
    """Products priced 10.00, 9.00, ...; one customer; orders of 1, 2 and 3 units of the
    first three products, in that order; everything projected."""
    products = [
        run(
            wiring,
            CreateProduct(sku=f"H-{i}", name=f"Item {i:02d}", price=f"{10 - i}.00", stock=50),
        ).id
        for i in range(n_products)
    ]
    customer = run(wiring, RegisterCustomer(email="h@example.com", name="Hana")).id
    orders = [
        run(
            wiring,
            PlaceOrder(customer_id=customer, items=[{"product_id": products[i], "qty": i + 1}]),
        ).id
        for i in range(3)
    ]
    drain(wiring)
    return products, customer, orders


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def _error(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == error, body
    return body["detail"]


# --- happy paths -----------------------------------------------------------------------


def test_every_endpoint_serves_the_views(api: ApiServer, wiring: Wiring) -> None:
    products, customer, orders = _shop(wiring)

    product = _ok(api.get(f"/products/{products[1]}"))
    assert product == {
        "id": str(products[1]),
        "sku": "H-1",
        "name": "Item 01",
        "price": "9.00",
        "stock": 48,
        "units_sold": 2,
        "revenue": "18.00",
        "version": 2,
    }

    by_name = _ok(api.get("/products", params={"sort": "name", "limit": 3}))
    assert [p["name"] for p in by_name["items"]] == ["Item 00", "Item 01", "Item 02"]
    assert by_name["next_cursor"]
    by_price = _ok(api.get("/products", params={"sort": "price", "limit": 100}))
    assert [p["price"] for p in by_price["items"]] == ["6.00", "7.00", "8.00", "9.00", "10.00"]
    assert by_price["next_cursor"] is None
    assert _ok(api.get("/products"))["items"][0]["name"] == "Item 00"  # default: by name

    assert _ok(api.get(f"/customers/{customer}")) == {
        "id": str(customer),
        "email": "h@example.com",
        "name": "Hana",
        "order_count": 3,
        "lifetime_value": "52.00",  # 1 x 10.00 + 2 x 9.00 + 3 x 8.00
        "version": 1,
    }

    order = _ok(api.get(f"/orders/{orders[2]}"))
    assert (order["customer_id"], order["customer_name"], order["status"]) == (
        str(customer),
        "Hana",
        "placed",
    )
    assert order["lines"] == [
        {
            "product_id": str(products[2]),
            "name": "Item 02",
            "unit_price": "8.00",
            "qty": 3,
            "line_total": "24.00",
        }
    ]
    assert order["total"] == "24.00" and order["placed_at"] and order["shipped_at"] is None

    mine = _ok(api.get(f"/customers/{customer}/orders"))
    assert [o["id"] for o in mine["items"]] == [str(o) for o in reversed(orders)]
    assert mine["next_cursor"] is None
    assert {o["customer_name"] for o in mine["items"]} == {"Hana"}

    top = _ok(api.get("/stats/top-products", params={"limit": 2}))
    assert set(top) == {"items"}
    assert [(p["id"], p["units_sold"]) for p in top["items"]] == [
        (str(products[2]), 3),
        (str(products[1]), 2),
    ]


def test_errors_are_json_with_one_shape(api: ApiServer, wiring: Wiring) -> None:
    products, customer, _ = _shop(wiring, n_products=3)

    for path, detail in (
        (f"/products/{MISSING}", f"product {MISSING} not found"),
        ("/products/not-a-uuid", "product not-a-uuid not found"),
        (f"/customers/{MISSING}", f"customer {MISSING} not found"),
        (f"/orders/{MISSING}", f"order {MISSING} not found"),
        (f"/customers/{MISSING}/orders", f"customer {MISSING} not found"),
    ):
        assert _error(api.get(path), 404, "not_found") == detail
    _error(api.get("/no/such/route"), 404, "not_found")

    assert _error(api.get("/products", params={"cursor": "bm90IG91cnM"}), 400, "bad_request") == (
        "invalid cursor"
    )
    _error(api.get(f"/customers/{customer}/orders", params={"cursor": "@@"}), 400, "bad_request")
    by_name = _ok(api.get("/products", params={"sort": "name", "limit": 1}))
    other_sort = {"sort": "price", "cursor": by_name["next_cursor"]}
    detail = _error(api.get("/products", params=other_sort), 400, "bad_request")
    assert detail == "cursor belongs to another sort"
    orders_cursor = {"cursor": by_name["next_cursor"]}
    detail = _error(
        api.get(f"/customers/{customer}/orders", params=orders_cursor), 400, "bad_request"
    )
    assert detail == "invalid cursor"
    detail = _error(api.get("/products", params={"sort": "bogus"}), 400, "bad_request")
    assert "sort" in detail
    for params in ({"limit": 0}, {"limit": 501}, {"limit": "many"}):
        assert "limit" in _error(api.get("/products", params=params), 400, "bad_request")
    _error(api.get("/stats/top-products", params={"limit": 0}), 400, "bad_request")
    _error(api.get(f"/products/{products[0]}", params={"timeout": 31}), 400, "bad_request")
    detail = _error(api.get(f"/products/{products[0]}", params={"after": "x!"}), 400, "bad_request")
    assert detail == "invalid consistency token"


def test_a_corrupted_view_is_a_500_naming_it(api: ApiServer, wiring: Wiring) -> None:
    """A view our projections could not have written (edited by hand, a key of another
    type) is a JSON 500 that names the key and the problem; the server keeps serving."""
    products, customer, orders = _shop(wiring, n_products=3)
    order_key = wiring.keys.views("orders", 1).order(orders[0])
    wiring.redis.hset(order_key, "line:1:unit_price", "cheap")
    detail = _error(api.get(f"/orders/{orders[0]}"), 500, "bad_view")
    assert detail.startswith(f"view {order_key} is not valid: lines.0.unit_price:"), detail
    _error(api.get(f"/customers/{customer}/orders"), 500, "bad_view")
    product_key = wiring.keys.views("products", 1).product(products[0])
    wiring.redis.delete(product_key)
    wiring.redis.rpush(product_key, "not", "a", "hash")
    for _ in range(3):  # the connection that got the error reply is not reused dirty
        detail = _error(api.get(f"/products/{products[0]}"), 500, "bad_view")
        assert detail.startswith(f"view {product_key} cannot be read: WRONGTYPE"), detail
        assert _ok(api.get(f"/products/{products[1]}"))["name"] == "Item 01"
    assert _ok(api.get(f"/orders/{orders[1]}"))["lines"][0]["qty"] == 2


# --- pagination ------------------------------------------------------------------------


def test_product_pages_by_price_survive_inserts_between_pages(
    api: ApiServer, wiring: Wiring
) -> None:
    products, _, _ = _shop(wiring)
    first = _ok(api.get("/products", params={"sort": "price", "limit": 2}))
    assert [p["price"] for p in first["items"]] == ["6.00", "7.00"]
    # Between two pages: one product sorting before the cursor, one after it.
    cheap = run(wiring, CreateProduct(sku="H-C", name="Cheap", price="0.50", stock=1)).id
    dear = run(wiring, CreateProduct(sku="H-D", name="Dear", price="99.00", stock=1)).id
    drain(wiring)

    pages = [first]
    while pages[-1]["next_cursor"]:
        params = {"sort": "price", "limit": 2, "cursor": pages[-1]["next_cursor"]}
        pages.append(_ok(api.get("/products", params=params)))
    assert all(len(page["items"]) <= 2 for page in pages)
    seen = [p["id"] for page in pages for p in page["items"]]
    prices = [float(p["price"]) for page in pages for p in page["items"]]
    assert len(seen) == len(set(seen)), "an item was repeated across pages"
    assert {str(p) for p in products} <= set(seen), "an existing item was skipped"
    assert prices == sorted(prices)
    assert str(dear) in seen and str(cheap) not in seen  # before the cursor: not revisited


def test_customer_orders_page_one_at_a_time_across_a_new_order(
    api: ApiServer, wiring: Wiring
) -> None:
    products, customer, orders = _shop(wiring)
    first = _ok(api.get(f"/customers/{customer}/orders", params={"limit": 1}))
    assert [o["id"] for o in first["items"]] == [str(orders[2])]
    newer = run(
        wiring, PlaceOrder(customer_id=customer, items=[{"product_id": products[4], "qty": 1}])
    ).id
    drain(wiring)

    pages = [first]
    while pages[-1]["next_cursor"]:
        params = {"limit": 1, "cursor": pages[-1]["next_cursor"]}
        pages.append(_ok(api.get(f"/customers/{customer}/orders", params=params)))
    seen = [o["id"] for page in pages for o in page["items"]]
    assert all(len(page["items"]) == 1 for page in pages)
    assert seen == [str(o) for o in reversed(orders)], "repeated, skipped or out of order"
    assert str(newer) not in seen  # newer than the cursor: it belongs to a fresh first page
    fresh = _ok(api.get(f"/customers/{customer}/orders", params={"limit": 1}))
    assert [o["id"] for o in fresh["items"]] == [str(newer)]


# --- ETag / 304 ------------------------------------------------------------------------


def _revalidate(api: ApiServer, path: str, **params: Any) -> str:
    """GET twice (same ETag), then with If-None-Match: 304, no body. Returns the ETag."""
    first, second = api.get(path, params=params), api.get(path, params=params)
    _ok(first)
    etag = first.headers["etag"]
    assert etag.startswith('W/"') and second.headers["etag"] == etag
    assert first.headers["cache-control"] == "no-cache"
    for header in (etag, f'W/"stale", {etag}', etag.removeprefix("W/"), "*"):
        cached = api.get(path, params=params, headers={"If-None-Match": header})
        assert cached.status_code == 304, (header, cached.text)
        assert cached.content == b""
        assert cached.headers["etag"] == etag and cached.headers["cache-control"] == "no-cache"
    return etag


def _changed(api: ApiServer, path: str, etag: str, **params: Any) -> dict[str, Any]:
    response = api.get(path, params=params, headers={"If-None-Match": etag})
    body = _ok(response)
    assert response.headers["etag"] != etag
    return body


def test_etags_revalidate_until_the_view_changes(api: ApiServer, wiring: Wiring) -> None:
    products, customer, orders = _shop(wiring)
    product_path = f"/products/{products[0]}"
    customer_path = f"/customers/{customer}"
    order_path = f"/orders/{orders[0]}"
    tags = {
        product_path: _revalidate(api, product_path),
        customer_path: _revalidate(api, customer_path),
        order_path: _revalidate(api, order_path),
        "/products": _revalidate(api, "/products", sort="price", limit=2),
        "/stats/top-products": _revalidate(api, "/stats/top-products"),
        "orders": _revalidate(api, f"/customers/{customer}/orders"),
    }
    customer_version = _ok(api.get(customer_path))["version"]
    order_version = _ok(api.get(order_path))["version"]

    run(wiring, RestockProduct(product_id=products[0], qty=5))
    run(wiring, RepriceProduct(product_id=products[4], price="1.00"))
    run(wiring, PlaceOrder(customer_id=customer, items=[{"product_id": products[3], "qty": 9}]))
    drain(wiring)

    assert _changed(api, product_path, tags[product_path])["stock"] == 54
    cheapest = _changed(api, "/products", tags["/products"], sort="price", limit=2)
    assert cheapest["items"][0]["id"] == str(products[4])
    top = _changed(api, "/stats/top-products", tags["/stats/top-products"])
    assert top["items"][0]["units_sold"] == 9
    assert len(_changed(api, f"/customers/{customer}/orders", tags["orders"])["items"]) == 4
    untouched = api.get(order_path, headers={"If-None-Match": tags[order_path]})
    assert untouched.status_code == 304
    # The customer's counters change through *order* events: its own `version` stays put,
    # so an ETag built from the version would wrongly answer 304 here.
    counted = _changed(api, customer_path, tags[customer_path])
    assert (counted["order_count"], counted["version"]) == (4, customer_version)

    # Likewise an order shows its customer's current name, at the order's same version.
    run(wiring, RenameCustomer(customer_id=customer, name="Hana Mori"))
    drain(wiring)
    renamed = _changed(api, order_path, tags[order_path])
    assert (renamed["customer_name"], renamed["version"]) == ("Hana Mori", order_version)


# --- read-your-writes ------------------------------------------------------------------


def test_after_gives_up_with_504_when_no_projector_runs(api: ApiServer, wiring: Wiring) -> None:
    api.wait_ready()
    created = run(wiring, CreateProduct(sku="H-W", name="Waiting", price="3.00", stock=1))
    started = time.monotonic()
    response = api.get(f"/products/{created.id}", params={"after": created.token, "timeout": 1})
    elapsed = time.monotonic() - started
    detail = _error(response, 504, "not_caught_up")
    assert detail.startswith("views did not reflect the write within 1s")
    assert "lag" in detail
    assert 1.0 <= elapsed < 6.0, elapsed


def test_after_answers_once_a_later_worker_projects_the_write(
    api: ApiServer, wiring: Wiring
) -> None:
    products, customer, _ = _shop(wiring)
    placed = run(
        wiring, PlaceOrder(customer_id=customer, items=[{"product_id": products[0], "qty": 4}])
    )
    api.wait_ready()
    results: list[httpx.Response | BaseException] = []

    def request() -> None:
        try:
            with httpx.Client(base_url=api.url, timeout=45.0, trust_env=False) as client:
                params = {"after": placed.token, "timeout": 30}
                results.append(client.get(f"/orders/{placed.id}", params=params))
        except BaseException as exc:
            results.append(exc)

    waiter = threading.Thread(target=request)
    waiter.start()
    channel = wiring.keys.applied_channel()
    try:
        # The server is waiting once it listens for the projector's notifications (its
        # one subscription starts with the first waiter) and counts the waiter.
        wait_until(
            lambda: (
                wiring.redis.pubsub_numsub(channel)[0][1] >= 1
                and api.get("/healthz").json()["waiters"] == 1
            ),
            timeout=30,
            what="the server to wait on the applied channel",
        )
        assert not results, "answered before anything was projected"
        # The wait holds neither a thread nor the event loop: others are still served.
        health = _ok(api.get("/healthz", timeout=5.0))
        assert (health["status"], health["waiters"]) == ("ok", 1)
        assert not results
        worker = threading.Thread(target=drain, args=(wiring,))
        worker.start()
        waiter.join(timeout=40)
        worker.join(timeout=60)
    finally:
        waiter.join(timeout=60)
    [response] = results
    assert isinstance(response, httpx.Response), response
    order = _ok(response)
    assert order["id"] == str(placed.id) and order["lines"][0]["qty"] == 4
    # The token covers every view the write touched, not only the one asked for.
    caught_up = {"after": placed.token, "timeout": 0}
    assert _ok(api.get(f"/products/{products[0]}", params=caught_up))["units_sold"] == 5
    assert _ok(api.get(f"/customers/{customer}", params=caught_up))["order_count"] == 4


# --- health ----------------------------------------------------------------------------


def test_healthz_reports_each_projections_lag(api: ApiServer, wiring: Wiring) -> None:
    # Before the first build there are no views: the health check says why reads 404.
    unbuilt = _ok(api.get("/healthz"))
    assert unbuilt["status"] == "rebuilding"
    assert all(p["rebuilding"] for p in unbuilt["projections"].values())
    _shop(wiring, n_products=3)
    healthy = _ok(api.get("/healthz"))
    assert healthy == {
        "status": "ok",
        "redis": "ok",
        "projections": {
            name: {"lag": 0, "pending": 0, "rebuilding": False}
            for name in registered_contracts()  # plugins too, when installed
        },
        "waiters": 0,
    }
    writes = [
        run(wiring, CreateProduct(sku="H-L1", name="Later 1", price="1.00", stock=1)),
        run(wiring, RegisterCustomer(email="l@example.com", name="Lee")),
    ]
    relay_all(wiring)  # on the streams, not yet projected
    events = sum(len(w.events) for w in writes)
    behind = _ok(api.get("/healthz"))
    assert behind["status"] == "ok"
    assert behind["projections"] == {
        name: {"lag": events, "pending": 0, "rebuilding": False} for name in registered_contracts()
    }
    drain(wiring)
    assert _ok(api.get("/healthz")) == healthy


def test_any_registered_view_is_served_by_its_contract(api: ApiServer, wiring: Wiring) -> None:
    products, customer, orders = _shop(wiring, n_products=3)
    for name, path in (
        ("products", f"/products/{products[0]}"),
        ("customers", f"/customers/{customer}"),
        ("orders", f"/orders/{orders[2]}"),
    ):
        ident = path.rsplit("/", 1)[1]
        assert _ok(api.get(f"/views/{name}/{ident}")) == _ok(api.get(path))
    unknown = api.get(f"/views/nope/{customer}")
    assert unknown.status_code == 404 and "registered: " in unknown.json()["detail"]
    for missing in (f"/views/orders/{customer}", "/views/orders/not-a-uuid"):
        response = api.get(missing)
        assert response.status_code == 404, missing
        assert response.json()["error"] == "not_found"


def test_redis_unreachable_is_503(start_api: Callable[..., ApiServer]) -> None:
    api = start_api(CQRS_REDIS_URL=CLOSED_REDIS)
    response = api.get("/healthz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable" and body["redis"].startswith("unreachable")
    assert body["projections"] == {}
    _error(api.get(f"/products/{MISSING}"), 503, "unavailable")


# --- no PostgreSQL ---------------------------------------------------------------------


def test_reads_are_served_with_postgresql_unreachable(
    start_api: Callable[..., ApiServer], wiring: Wiring
) -> None:
    api = start_api(CQRS_DATABASE_URL=CLOSED_DB)
    products, customer, orders = _shop(wiring)
    token = run(wiring, RenameCustomer(customer_id=customer, name="Hana K")).token
    drain(wiring)
    assert _ok(api.get(f"/products/{products[0]}"))["name"] == "Item 00"
    assert _ok(api.get(f"/orders/{orders[0]}", params={"after": token}))["customer_name"] == (
        "Hana K"
    )
    assert _ok(api.get(f"/customers/{customer}"))["name"] == "Hana K"
    assert len(_ok(api.get(f"/customers/{customer}/orders"))["items"]) == 3
    assert len(_ok(api.get("/products", params={"sort": "price"}))["items"]) == 5
    assert _ok(api.get("/stats/top-products"))["items"]
    assert _ok(api.get("/healthz"))["status"] == "ok"
    assert "postgresql" not in api.log().lower()


# --- OpenAPI ---------------------------------------------------------------------------


def test_openapi_document_is_valid_and_complete(api: ApiServer) -> None:
    spec = _ok(api.get("/openapi.json"))
    validate(spec)
    assert spec["info"]["title"] == "cqrs-projector query API" and spec["info"]["version"]
    assert set(spec["paths"]) == {
        "/products/{product_id}",
        "/products",
        "/customers/{customer_id}",
        "/customers/{customer_id}/orders",
        "/orders/{order_id}",
        "/stats/top-products",
        "/views/{name}/{key}",
        "/healthz",
    }
    schemas = spec["components"]["schemas"]
    assert {"ProductView", "CustomerView", "OrderView", "OrderLineView", "ErrorBody"} <= set(
        schemas
    )
    assert {"name", "stock", "units_sold"} <= set(schemas["ProductView"]["properties"])
    for path, item in spec["paths"].items():
        responses = item["get"]["responses"]
        assert "200" in responses and "422" not in responses, path
        if path != "/healthz":
            assert {"304", "400", "503", "504"} <= set(responses), path
            names = {p["name"] for p in item["get"]["parameters"]}
            assert {"after", "timeout"} <= names, path
    sort = next(p for p in spec["paths"]["/products"]["get"]["parameters"] if p["name"] == "sort")
    assert sort["schema"]["enum"] == ["name", "price"]
    docs = api.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
