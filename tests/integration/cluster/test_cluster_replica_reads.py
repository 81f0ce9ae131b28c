"""The query side on a Redis Cluster with reads from replicas (`CQRS_READ_FROM=replicas`),
and `cqrs serve`'s waiting pool per node.

Evidence that replicas served reads is their own `INFO commandstats` (HGETALL calls on
the replicas go up; nothing else reads from them). Connections are counted with
`CLIENT LIST` on every node, by the client name `cqrs serve` gives them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.queries.aio import CLUSTER_SPARE
from cqrs.queries.errors import Busy
from cqrs.queries.http import build_state
from cqrs.queries.service import QueryService
from cqrs.replicas import Route
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.helpers import wait_until
from tests.integration.http_support import ApiServer, api_servers
from tests.integration.projector_support import drain, relay_all, run, worker_in_thread
from tests.integration.test_http_load import raw_get

# Read-your-writes must hold within the timeout it has on one node.
WAIT_SECONDS = 5.0
POOL = 4  # CQRS_HTTP_REDIS_MAX_CONNECTIONS of the load test's server
CONCURRENT = 300


def _nodes(url: str) -> dict[str, list[str]]:
    """The cluster's nodes by role, as URLs (CLUSTER NODES of the node `url` names)."""
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        nodes = client.execute_command("CLUSTER NODES")
    finally:
        client.close()
    found: dict[str, list[str]] = {"primaries": [], "replicas": []}
    for address, node in nodes.items():
        role = "replicas" if "slave" in node["flags"] else "primaries"
        found[role].append(f"redis://{address.split('@')[0]}/0")
    return found


def _calls(urls: list[str], commands: tuple[str, ...] = ("hget", "hgetall")) -> int:
    """How many of `commands` the nodes ran (the reads of a check and of a view)."""
    total = 0
    for url in urls:
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            stats = client.info("commandstats")
            total += sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands)
        finally:
            client.close()
    return total


def _connections(urls: list[str], name: str) -> dict[str, int]:
    counts = {}
    for url in urls:
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            counts[url] = sum(1 for c in client.client_list() if c.get("name") == name)
        finally:
            client.close()
    return counts


@pytest.fixture
def replica_settings(cluster_settings: Settings) -> Settings:
    return cluster_settings.model_copy(update={"read_from": "replicas"})


def _replicas_in_slot_map(url: str) -> bool:
    """Whether CLUSTER SLOTS lists every master's replica: a node leaves out a replica
    it has not yet heard has replicated anything (offset 0), as in a cluster formed a
    moment ago, and clients learn replicas from it."""
    client = redis.Redis.from_url(url)
    try:
        return all(len(entry) > 3 for entry in client.execute_command("CLUSTER SLOTS"))
    finally:
        client.close()


@pytest.fixture
def live(replica_settings: Settings) -> Iterator[Wiring]:
    """Views built, then a worker running in a thread; the replicas known to clients."""
    w = Wiring(replica_settings)
    run(w, CreateProduct(sku="S-0", name="First", price="1.00", stock=1))
    drain(w)
    wait_until(
        lambda: _replicas_in_slot_map(w.redis_url), timeout=30, what="replicas in CLUSTER SLOTS"
    )
    try:
        with worker_in_thread(w):
            yield w
    finally:
        w.close()


@pytest.fixture
def start_api(replica_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., ApiServer]]:
    yield from api_servers(replica_settings, tmp_path)


def test_read_your_writes_from_replicas_sync(live: Wiring) -> None:
    replicas = _nodes(live.redis_url)["replicas"]
    assert replicas, "the cluster has no replicas"
    queries = QueryService.from_settings(live.settings)
    before = _calls(replicas)
    products = []
    for i in range(5):
        created = run(live, CreateProduct(sku=f"S-{i + 1}", name=f"P{i}", price="1.00", stock=9))
        renamed = run(live, RenameProduct(product_id=created.id, name=f"P{i} renamed"))
        relay_all(live)
        started = time.monotonic()
        reader = queries.wait_for(renamed.token, timeout=WAIT_SECONDS)
        assert time.monotonic() - started < WAIT_SECONDS
        view = reader.get_product(created.id)
        assert (view.name, view.version) == (f"P{i} renamed", 2)
        products.append(created.id)
    # Across slots: an order's view, its customer's index (another slot, on its primary).
    customer = run(live, RegisterCustomer(email="c@example.com", name="Cleo")).id
    placed = run(
        live,
        PlaceOrder(customer_id=customer, items=[{"product_id": p, "qty": 1} for p in products]),
    )
    relay_all(live)
    reader = queries.wait_for(placed.token, timeout=WAIT_SECONDS)
    assert [o.id for o in reader.customer_orders(customer).items] == [placed.id]
    assert reader.get_order(placed.id).customer_name == "Cleo"
    assert {p.id for p in reader.list_products(limit=50).items} >= set(products)
    assert _calls(replicas) - before >= 6, "the replicas served no reads"


def test_http_after_from_replicas(live: Wiring, start_api: Callable[..., ApiServer]) -> None:
    """`?after=` with reads from replicas answers the write within the one-node timeout."""
    api = start_api(CQRS_READ_FROM="replicas", CQRS_LOG_LEVEL="warning")
    nodes = _nodes(live.redis_url)
    product = run(live, CreateProduct(sku="H-1", name="Http 0", price="3.00", stock=2))
    relay_all(live)
    api.wait_ready()
    before = _calls(nodes["replicas"])
    for i in range(1, 4):
        renamed = run(live, RenameProduct(product_id=product.id, name=f"Http {i}"))
        relay_all(live)
        started = time.monotonic()
        response = api.get(
            f"/products/{product.id}", params={"after": renamed.token, "timeout": WAIT_SECONDS}
        )
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < WAIT_SECONDS
        assert response.json()["name"] == f"Http {i}"
    # Right after its notification the replicas may not have the write yet (the check
    # then reads the primaries); a token applied a moment ago is checked and read there.
    for _ in range(5):
        response = api.get(f"/products/{product.id}", params={"after": renamed.token})
        assert response.json()["name"] == "Http 3"
    assert _calls(nodes["replicas"]) - before >= 5, "the replicas served no reads"


@pytest.mark.parametrize("read_from", ["primary", "replicas"])
def test_many_concurrent_requests_wait_for_a_small_pool(
    live: Wiring, start_api: Callable[..., ApiServer], read_from: str
) -> None:
    """300 concurrent requests on a pool of 4 connections per node: every one answered
    (they wait, in turn, for a connection), none 5xx, and no node, primary or replica,
    sees more than the pool (and its spare) of the server's connections."""
    api = start_api(
        CQRS_READ_FROM=read_from,
        CQRS_HTTP_REDIS_MAX_CONNECTIONS=str(POOL),
        CQRS_HTTP_REDIS_POOL_TIMEOUT="10",
        CQRS_LOG_LEVEL="warning",
    )
    nodes = _nodes(live.redis_url)
    product = run(live, CreateProduct(sku="L-1", name="Loaded", price="3.00", stock=2))
    relay_all(live)
    api.wait_ready()
    name = f"cqrs-serve.{live.settings.namespace}"
    every_node = nodes["primaries"] + nodes["replicas"]

    async def load() -> tuple[dict[int, int], int, float]:
        started = time.monotonic()
        paths = [f"/products/{product.id}", "/products?limit=5", "/stats/top-products"]
        tasks = [
            asyncio.create_task(raw_get(api.port, paths[i % len(paths)])) for i in range(CONCURRENT)
        ]
        most = 0
        gathered = asyncio.gather(*tasks)
        while not gathered.done():
            counts = await asyncio.to_thread(_connections, every_node, name)
            most = max(most, *counts.values())
            await asyncio.wait([gathered], timeout=0.2)
        statuses: dict[int, int] = {}
        for status, _ in await gathered:
            statuses[status] = statuses.get(status, 0) + 1
        return statuses, most, time.monotonic() - started

    statuses, most, elapsed = asyncio.run(load())
    print(
        f"\n{CONCURRENT} concurrent requests, pool {POOL} per node ({read_from}): "
        f"{elapsed:.2f}s, at most {most} connections of the server on one node"
    )
    assert statuses == {200: CONCURRENT}, statuses
    assert most <= POOL + CLUSTER_SPARE, f"{most} connections of the server on one node"
    assert max(_connections(every_node, name).values()) <= POOL + CLUSTER_SPARE


def test_a_full_node_waits_in_turn_then_is_busy(cluster_wiring: Wiring) -> None:
    """The per-node wait itself: with every connection to a node held, requests for its
    keys wait (not fail at once), get the connection in arrival order, and past the pool
    timeout are `Busy` (503 busy), never "unreachable"."""
    w = cluster_wiring
    product = run(w, CreateProduct(sku="F-1", name="Full", price="1.00", stock=1))
    drain(w)
    settings = w.settings.model_copy(
        update={"http_redis_max_connections": 2, "http_redis_pool_timeout": 0.5}
    )

    async def scenario() -> None:
        state = build_state(settings)
        views = state.views
        try:
            assert (await views.get_product(product.id)).name == "Full"
            assert views.replicas is not None
            node = Route(views.replicas).node_for(w.keys.views("products", 1).product(product.id))
            assert node is not None
            held = [await node.handle.acquire() for _ in range(2)]
            started = time.monotonic()
            with pytest.raises(Busy, match=r"all 2 Redis connections to .* busy for 0\.5s"):
                await views.get_product(product.id)
            assert time.monotonic() - started >= 0.5

            finished: list[int] = []

            async def read(n: int) -> None:
                assert (await views.get_product(product.id)).name == "Full"
                finished.append(n)

            readers = []
            for n in range(3):
                readers.append(asyncio.create_task(read(n)))
                await asyncio.sleep(0.01)  # queued in this order
            await asyncio.sleep(0.1)
            assert finished == [], "a request did not wait for the full node"
            await node.handle.release(held.pop())
            await asyncio.wait_for(asyncio.gather(*readers), 5)
            assert finished == [0, 1, 2]
            await node.handle.release(held.pop())
        finally:
            await state.aclose()

    asyncio.run(scenario())


def test_a_replica_of_another_shard_costs_a_trip_never_an_error(live: Wiring) -> None:
    """A route the cluster moved under (a failover, a resharding): the replica answers
    MOVED, the read goes to the primary path, and the topology is read again."""
    queries = QueryService.from_settings(live.settings)
    product = run(live, CreateProduct(sku="M-1", name="Moved", price="1.00", stock=1))
    relay_all(live)
    queries.wait_for(product.token, timeout=WAIT_SECONDS)
    nodes = queries.replicas
    assert nodes is not None
    key = live.keys.views("products", 1).product(product.id)
    home = nodes.shard_of(key)
    assert home is not None
    elsewhere = next(
        r for shard in nodes.shards.values() if shard is not home for r in shard.replicas
    )
    reader = queries.pinned({key: elsewhere})
    assert reader.get_product(product.id).name == "Moved"
    assert nodes.is_down(elsewhere) and nodes.due()
