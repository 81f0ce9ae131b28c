"""`cqrs serve`'s get-by-id fast path (`queries.http.PlainGet`): a GET with no query
string, or only a plain `after` / `timeout`, skips FastAPI's parameter machinery;
anything else goes through the FastAPI route.
Both must answer alike, byte for byte, errors and 304s included; and the access log is
off unless `CQRS_HTTP_ACCESS_LOG` turns it on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from cqrs.commands.catalog import CreateProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.helpers import wait_until
from tests.integration.http_support import ApiServer, api_servers
from tests.integration.projector_support import drain, run

MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def start_api(settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    yield from api_servers(settings, tmp_path)


def _same(plain: httpx.Response, full: httpx.Response) -> None:
    assert plain.status_code == full.status_code, (plain.text, full.text)
    assert plain.content == full.content
    for header in ("content-type", "etag", "cache-control", "retry-after"):
        assert plain.headers.get(header) == full.headers.get(header), header


def test_plain_get_answers_as_the_fastapi_route(
    wiring: Wiring, start_api: Callable[..., ApiServer]
) -> None:
    api = start_api()
    product = run(wiring, CreateProduct(sku="P-1", name="Plain", price="2.50", stock=5)).id
    customer = run(wiring, RegisterCustomer(email="p@example.com", name="Pia")).id
    order = run(wiring, PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 2}]))
    drain(wiring)
    paths = [
        f"/products/{product}",
        f"/customers/{customer}",
        f"/orders/{order.id}",
        f"/views/products/{product}",
        f"/products/{MISSING}",  # 404 not_found
        "/orders/not-a-uuid",  # 404 as well: ids are looked up, not parsed
        f"/views/nope/{product}",  # unknown projection
    ]
    for path in paths:
        plain = api.get(path)
        # A parameter the route ignores sends the request through FastAPI's route.
        full = api.get(path, params={"x": "1"})
        _same(plain, full)
        if plain.status_code == 200:
            tag = plain.headers["etag"]
            revalidated = api.get(path, headers={"If-None-Match": tag})
            assert revalidated.status_code == 304 and revalidated.headers["etag"] == tag
            _same(revalidated, api.get(path, params={"x": "1"}, headers={"If-None-Match": tag}))
    assert api.get(f"/orders/{order.id}").json()["lines"][0]["qty"] == 2
    # `after` and a plain `timeout` stay on the fast path; an extra parameter sends the
    # same request through FastAPI's route, which must answer the same.
    for query in (
        {"after": order.token},
        {"after": order.token, "timeout": "2.5"},
        {"after": ""},
        {"after": "not-a-token"},  # 400 bad_request
        {"timeout": "0"},
    ):
        path = f"/orders/{order.id}"
        _same(api.get(path, params=query), api.get(path, params={**query, "x": "1"}))
    for timeout in ("abc", "31", "1e3", "-1", "nan"):  # FastAPI judges these: 400
        bad = api.get(f"/orders/{order.id}", params={"timeout": timeout})
        assert bad.status_code == 400 and bad.json()["error"] == "bad_request", timeout
    assert api.client.post(f"/products/{product}").status_code == 405


def test_access_log_is_off_unless_switched_on(
    wiring: Wiring, start_api: Callable[..., ApiServer]
) -> None:
    product = run(wiring, CreateProduct(sku="P-2", name="Logged", price="1.00", stock=1)).id
    drain(wiring)
    quiet = start_api()
    logged = start_api(CQRS_HTTP_ACCESS_LOG="true")
    for server in (quiet, logged):
        assert server.get(f"/products/{product}").status_code == 200
    line = f"GET /products/{product}"
    wait_until(lambda: line in logged.log(), timeout=10, what="the access-log line")
    assert line not in quiet.log()
