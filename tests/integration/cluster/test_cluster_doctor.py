"""`cqrs doctor` on a Redis Cluster: its shape, and the settings that put the views at risk."""

from __future__ import annotations

from cqrs.app.doctor import ERROR, OK, WARNING, check_cluster, check_redis
from cqrs.wiring import Wiring


def test_doctor_reports_the_cluster(cluster_wiring: Wiring) -> None:
    w = cluster_wiring
    checks = {c.name: c for c in check_redis(w.redis, w.keys, w.settings, w.redis_url)}
    cluster = checks["redis cluster"]
    assert cluster.status == OK, cluster
    assert "16384 of 16384 slots covered" in cluster.detail
    assert "3 master(s)" in cluster.detail and "3 replica(s)" in cluster.detail


def test_doctor_warns_of_partial_coverage_and_errs_on_an_evicting_master(
    cluster_wiring: Wiring,
) -> None:
    client = cluster_wiring.redis
    master = client.get_redis_connection(client.get_primaries()[-1])
    old_policy = master.config_get("maxmemory-policy")["maxmemory-policy"]
    master.config_set("cluster-require-full-coverage", "no")
    master.config_set("maxmemory-policy", "allkeys-lru")
    try:
        checks = {c.name: c for c in check_cluster(client)}
    finally:
        master.config_set("cluster-require-full-coverage", "yes")
        master.config_set("maxmemory-policy", old_policy)
    assert checks["cluster coverage"].status == WARNING
    assert checks["cluster eviction"].status == ERROR
    assert "allkeys-lru" in checks["cluster eviction"].detail
