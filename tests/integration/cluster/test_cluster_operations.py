"""Operations on a Redis Cluster (3 masters + 3 replicas), each through the real CLI with
`CQRS_REDIS_URL` naming one node: `cqrs replay` rebuilds a projection into a new
generation (verify clean after, no key of the old generation left on any master),
`cqrs dlq list/retry/drop` handle a malformed entry XADDed into a partition stream, and
`cqrs demo --yes` runs against the cluster and the test's database."""

from __future__ import annotations

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.commands.customers import RegisterCustomer
from cqrs.commands.orders import PlaceOrder
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.state import live_generation
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import run_cli, run_cli_json
from tests.integration.projector_support import (
    deploy_projections,
    differences,
    drain,
    malformed,
    run,
)
from tests.integration.replay_support import replay, verify_clean


def _generations_per_master(wiring: Wiring, projection: str) -> dict[int, set[int]]:
    """The generations of `projection` that have view keys, per master (SCAN is per node)."""
    client, keys = wiring.redis, wiring.keys
    prefix = f"{keys.ns}:{projection}:g"
    found: dict[int, set[int]] = {}
    for node in client.get_primaries():
        conn = client.get_redis_connection(node)
        for key in conn.scan_iter(match=keys.projection_pattern(projection), count=1000):
            name = key.decode() if isinstance(key, bytes) else key
            found.setdefault(node.port, set()).add(int(name[len(prefix) :].split(":", 1)[0]))
    return found


def test_replay_rebuilds_the_views_on_the_cluster(
    cluster_wiring: Wiring, cluster_settings: Settings
) -> None:
    w = cluster_wiring
    env = settings_env(cluster_settings)
    products = [
        run(w, CreateProduct(sku=f"R-{i}", name=f"P{i}", price="3.00", stock=50)).id
        for i in range(12)
    ]
    customer = run(w, RegisterCustomer(email="r@example.com", name="R")).id
    drain(w)
    for i, product in enumerate(products[:6]):
        run(w, RenameProduct(product_id=product, name=f"Renamed {i}"))
        run(w, PlaceOrder(customer_id=customer, items=[{"product_id": product, "qty": 2}]))
    drain(w)
    assert differences(w) == []
    live = live_generation(w.redis, w.keys, "products")
    before = _generations_per_master(w, "products")
    assert len(before) == 3 and all(g == {live} for g in before.values()), before

    [summary] = replay(env, "products")
    assert summary["projection"] == "products", summary
    assert summary["old_generation"] == live, summary
    new = summary["new_generation"]
    assert new > live, summary
    assert live_generation(w.redis, w.keys, "products") == new
    after = _generations_per_master(w, "products")
    assert len(after) == 3 and all(g == {new} for g in after.values()), after
    verify_clean(env)
    # The other projections were left alone.
    for projection in PROJECTIONS:
        if projection != "products":
            assert live_generation(w.redis, w.keys, projection) == 1, projection
    # Writes after the switch flow into the new generation.
    run(w, RenameProduct(product_id=products[0], name="After replay"))
    drain(w)
    view = w.keys.views("products", new).product(products[0])
    assert w.redis.hget(view, "name") == "After replay"
    assert differences(w) == []


def test_dlq_list_retry_drop_on_the_cluster(
    cluster_wiring: Wiring, cluster_settings: Settings
) -> None:
    w = cluster_wiring
    env = settings_env(cluster_settings) | {"CQRS_PROJECTOR_MAX_DELIVERIES": "2"}
    worker_wiring = Wiring(cluster_settings.model_copy(update={"projector_max_deliveries": 2}))
    try:
        deploy_projections(worker_wiring)
        partitions = int(w.redis.hget(w.keys.meta(), "partitions"))
        # One malformed entry on each of three partitions, so the dead letters' sources
        # lie on different masters.
        masters = {p: w.redis.get_node_from_key(w.keys.stream(p)).port for p in range(partitions)}
        chosen: dict[int, int] = {}
        for p, port in masters.items():
            chosen.setdefault(port, p)
        assert len(chosen) == 3, masters
        entries = {w.redis.xadd(w.keys.stream(p), malformed()) for p in chosen.values()}
        drain(worker_wiring)
        drain(worker_wiring)
    finally:
        worker_wiring.close()

    letters = run_cli_json("dlq", "list", "-p", "products", env=env)["items"]
    assert {d["entry_id"] for d in letters} == entries, letters
    assert all("payload" in d["fields"] for d in letters)
    shown = run_cli_json("dlq", "show", letters[0]["id"], "-p", "products", env=env)
    assert shown["entry_id"] == letters[0]["entry_id"]

    # Still malformed: a retry fails again, the letter stays (exit 1).
    retried = run_cli("dlq", "retry", letters[0]["id"], "-p", "products", "--json", env=env)
    assert retried.returncode == 1, retried.stdout + retried.stderr
    again = run_cli_json("dlq", "list", "-p", "products", env=env)["items"]
    assert len(again) == 3, again
    assert {d["entry_id"] for d in again} == entries

    one = next(d for d in again if d["entry_id"] == letters[1]["entry_id"])
    dropped = run_cli_json("dlq", "drop", one["id"], "-p", "products", env=env)
    assert dropped["dropped"] == 1, dropped
    assert len(run_cli_json("dlq", "list", "-p", "products", env=env)["items"]) == 2
    dropped = run_cli_json("dlq", "drop", "--all", "-p", "products", env=env)
    assert dropped["dropped"] == 2, dropped
    assert run_cli_json("dlq", "list", "-p", "products", env=env)["items"] == []
    # The projection moved on: a real product still projects, and the views are right.
    product = run(w, CreateProduct(sku="D-1", name="Fine", price="1.00", stock=1)).id
    drain(w)
    generation = live_generation(w.redis, w.keys, "products")
    assert w.redis.hget(w.keys.views("products", generation).product(product), "name") == "Fine"
    assert differences(w) == []


def test_demo_runs_against_the_cluster(cluster_settings: Settings) -> None:
    env = settings_env(cluster_settings) | {"COLUMNS": "160"}
    result = run_cli("demo", "--yes", env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for expected in ("20 products, 5 customers, 30 orders", "top products", "demo done"):
        assert expected in result.stdout, expected
    verify_clean(env)
