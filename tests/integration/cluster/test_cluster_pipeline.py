"""The whole pipeline on a Redis Cluster of 3 masters + 3 replicas: commands, relay,
projector (replay from the log, then live batches), verify and the query side, with
`CQRS_REDIS_URL` naming one node and nothing else said."""

from __future__ import annotations

from collections import Counter

from redis.exceptions import NoScriptError

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer, RenameCustomer
from cqrs.commands.orders import CancelOrder, PlaceOrder
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.status import collect_status
from cqrs.queries.service import QueryService
from cqrs.redisio import round_trip
from cqrs.wiring import Wiring
from tests.integration.projector_support import differences, drain, run


def _keys_per_master(wiring: Wiring) -> Counter[int]:
    client = wiring.redis
    counts: Counter[int] = Counter()
    for node in client.get_primaries():
        conn = client.get_redis_connection(node)
        counts[node.port] = sum(1 for _ in conn.scan_iter(match=f"{wiring.keys.ns}:*"))
    return counts


def test_cluster_is_detected_from_one_node_url(cluster_wiring: Wiring) -> None:
    assert cluster_wiring.redis_cluster
    assert type(cluster_wiring.redis).__name__ == "RedisCluster"


def test_round_trip_spans_masters_and_keeps_order(cluster_wiring: Wiring) -> None:
    ns = cluster_wiring.keys.ns
    keys = [f"{ns}:rt:{{k{i}}}" for i in range(30)]
    commands = [("HSET", key, "n", i) for i, key in enumerate(keys)]
    commands.append(("PUBLISH", f"{ns}:applied", 1))
    commands += [("HGET", key, "n") for key in keys]
    commands.append(("EVALSHA", "0" * 40, 1, keys[0]))
    replies = round_trip(cluster_wiring.redis, commands)
    assert replies[:30] == [1] * 30
    assert replies[31:61] == [str(i) for i in range(30)]
    assert isinstance(replies[61], NoScriptError)
    assert len(_keys_per_master(cluster_wiring)) == 3


def test_pipeline_on_the_cluster(cluster_wiring: Wiring) -> None:
    w = cluster_wiring
    products = [
        run(w, CreateProduct(sku=f"S-{i}", name=f"P{i}", price="2.50", stock=100)).id
        for i in range(6)
    ]
    customers = [
        run(w, RegisterCustomer(email=f"c{i}@example.com", name=f"C{i}")).id for i in range(4)
    ]
    drain(w)  # views built from the log (no views yet)
    orders = [
        run(
            w,
            PlaceOrder(
                customer_id=customers[i % 4],
                items=[{"product_id": products[i % 6], "qty": 1}],
            ),
        ).id
        for i in range(12)
    ]
    run(w, RenameProduct(product_id=products[0], name="Renamed"))
    run(w, RenameCustomer(customer_id=customers[0], name="Ann"))
    run(w, CancelOrder(order_id=orders[1]))
    worker = drain(w)  # live batches through the consumer groups
    assert worker.stats.applied > 0 and worker.stats.dead_lettered == 0
    assert differences(w) == []
    status = collect_status(w.redis, w.settings, list(PROJECTIONS.values()))
    assert {p.name: (p.state, p.lag, p.pending) for p in status.projections} == {
        name: ("caught up", 0, 0) for name in PROJECTIONS
    }

    per_master = _keys_per_master(w)
    assert len(per_master) == 3 and all(n > 0 for n in per_master.values()), per_master

    queries = QueryService(w.redis, w.keys, partitions=w.settings.partitions)
    assert queries.get_product(products[0]).name == "Renamed"
    assert queries.get_order(orders[0]).customer_name == "Ann"
    assert queries.get_order(orders[1]).status == "cancelled"
    page = queries.customer_orders(customers[0], limit=10)
    assert len(page.items) == 3
    names = [p.name for p in queries.list_products(sort="name", limit=10).items]
    assert names == sorted(names) and "Renamed" in names
