"""`cqrs serve` through a cluster failover: the master holding the views being read is
SIGKILLed while readers keep asking; its replica is promoted and the server answers again
on its own, without a restart. During the failover a request gets 503 (the documented
"Redis unavailable, retry" answer), never another 5xx, and never a wrong view; once the
cluster says ok again every request is answered within a bounded time. With replica reads
on (`CQRS_READ_FROM=replicas`) too: then the victim's replica is what the reads were
served by, and becomes the master they read.

Needs the local cluster (it kills one of its processes): skipped on CQRS_TEST_CLUSTER_URL.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from cqrs import cluster as local_cluster
from cqrs.commands.catalog import CreateProduct
from cqrs.redisio import slot_of
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import wait_until
from tests.integration.cluster.conftest import ClusterBackend
from tests.integration.http_support import ApiServer
from tests.integration.projector_support import drain, run

RECOVERY_SECONDS = 15.0  # after cluster_state:ok, until every reader is answered again


@pytest.mark.slow
@pytest.mark.parametrize("read_from", ["primary", "replicas"])
def test_serve_answers_again_after_a_master_dies_without_a_restart(
    redis_cluster: ClusterBackend,
    cluster_wiring: Wiring,
    cluster_settings: Settings,
    tmp_path: Path,
    read_from: str,
) -> None:
    if redis_cluster.local is None:
        pytest.skip("kills a node: needs the local cluster, not CQRS_TEST_CLUSTER_URL")
    cluster = redis_cluster.local
    w = cluster_wiring
    products = [
        run(w, CreateProduct(sku=f"F-{i}", name=f"Lamp {i}", price="2.00", stock=i)).id
        for i in range(12)
    ]
    drain(w)
    # The victim: the master of the first product's view.
    view_key = w.keys.views("products", 1).product(products[0])
    victim = local_cluster.master_of_slot(cluster, slot_of(view_key))

    env = settings_env(cluster_settings) | {
        "CQRS_READ_FROM": read_from,
        "CQRS_HTTP_REDIS_POOL_TIMEOUT": "2",
    }
    server = ApiServer(env, tmp_path / "serve.log")
    codes: Counter[int] = Counter()
    wrong: list[str] = []
    last_ok: dict[str, float] = {}
    halt = threading.Event()

    def reader(pid: str, expected_stock: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30.0, trust_env=False) as client:
            while not halt.is_set():
                try:
                    response = client.get(f"/products/{pid}")
                except httpx.TransportError as exc:
                    wrong.append(f"transport error: {exc}")
                    return
                codes[response.status_code] += 1
                if response.status_code == 200:
                    if response.json()["stock"] != expected_stock:
                        wrong.append(response.text)
                    last_ok[pid] = time.monotonic()
                elif response.status_code == 503:
                    halt.wait(0.05)  # the answer says: retry shortly
                else:
                    wrong.append(f"{response.status_code}: {response.text}")

    try:
        server.wait_ready()
        assert server.get(f"/products/{products[0]}").status_code == 200
        threads = [
            threading.Thread(target=reader, args=(pid, i), daemon=True)
            for i, pid in enumerate(products)
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(last_ok) == len(products), timeout=30, what="every reader served")
        try:
            local_cluster.stop_node(victim, kill=True)
            killed_at = time.monotonic()
            local_cluster.wait_failover(cluster, victim, timeout=30)
            healthy_at = time.monotonic()
            # Every reader is answered again, by the same server process, within the bound.
            wait_until(
                lambda: all(t > healthy_at for t in last_ok.values()),
                timeout=RECOVERY_SECONDS,
                what="every reader answered after the failover",
            )
        finally:
            halt.set()
            for thread in threads:
                thread.join(timeout=40)
            local_cluster.restart_node(cluster, victim)
        assert server.proc.poll() is None, server.log()
        assert not wrong, wrong[:5]
        assert set(codes) <= {200, 503}, codes
        assert codes[200] > len(products)
        print(f"failover {healthy_at - killed_at:.1f}s; answers {dict(codes)}")
    finally:
        server.close()
    local_cluster.wait_healthy(cluster, timeout=30)
    # The restarted node rejoined as a replica: wait until its link is up, so later tests
    # (and their failovers) find every master with a replica in sync.
    wait_until(
        lambda: cluster.client(victim.port).info("replication").get("master_link_status") == "up",
        timeout=30,
        what="the restarted node's replication link",
    )
