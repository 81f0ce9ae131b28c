"""The benchmarks on a Redis Cluster: `python -m bench --quick cluster` with
`CQRS_REDIS_URL` naming a node of the session's cluster (about 10 s).

The bench backend (scratch namespaces, their deletion on every master) and the raw
ceilings (redis-py's cluster client, one pipeline per master) then run on the cluster,
and the `cluster` scenario compares it with one node: here a private redis-server it
starts, because the configured Redis is the cluster. Nothing looks at a time: figures
must exist and be sane (events/s > 0, p99 >= p50, every event applied), and nothing may
be left behind. (The other scenarios on a cluster: `CQRS_REDIS_URL=<node> python -m bench
--quick`, docs/benchmarks.md; not run here, to keep the suite short.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis
from redis.cluster import RedisCluster

from cqrs.urls import libpq_url
from tests.conftest import REPO, Backend
from tests.integration.cluster.conftest import ClusterBackend

CLUSTER_ROWS = {
    *(f"projection, {w} worker{'s' if w > 1 else ''}" for w in (1, 2, 3)),
    *(f"raw loop, {w} process{'es' if w > 1 else ''}" for w in (1, 2, 3)),
    *(
        f"{what} {q}{suffix}"
        for what, suffix in (
            ("get product", ", Python API"),
            ("get order", ", Python API"),
            ("raw HGETALL (order)", ""),
            ("get order", ", HTTP API"),
        )
        for q in ("p50", "p99")
    ),
    *(
        f"{what}, {consumers}"
        for what in ("CPU per event", "Redis CPU per event, masters")
        for consumers in ("workers", "raw loop")
    ),
    *(
        f"packed trip, {shape}{way}, p50"
        for shape in ("get-by-id shape (GET + HGETALL)", "1,000 HSETs")
        for way in ("", ", masters' parts one after another", ", a thread per master")
    ),
}


def _scratch_databases(server_url: str) -> set[str]:
    with psycopg.connect(libpq_url(server_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'cqrs_bench_%'"
        ).fetchall()
    return {r[0] for r in rows}


def test_bench_runs_on_a_cluster_and_compares_it_with_one_node(
    backend: Backend, redis_cluster: ClusterBackend, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env.update(
        CQRS_DATABASE_URL=backend.database_url,
        CQRS_REDIS_URL=redis_cluster.url,
        CQRS_HOME=str(tmp_path / "home"),
    )
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "cluster", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failed"] == {}
    assert report["machine"]["redis_cluster"]["masters"] >= 3

    rows = report["rows"]
    by_scenario: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_scenario.setdefault(row["scenario"], {})[row["name"]] = row
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
        for side in ("project", "ceiling"):
            assert row[side]["min"] <= row[side]["median"] <= row[side]["max"], row
    cluster = by_scenario["cluster"]
    assert set(cluster) == CLUSTER_ROWS
    for name, row in cluster.items():
        if row["unit"] == "events/s" or "CPU" in name:
            assert row["project"]["median"] > 0 and row["ceiling"]["median"] > 0, row
        if "CPU" in name:  # how the masters' CPU spread: at least an even share each
            share = row["extra"]["busiest_master_share"]
            assert 1 / row["extra"]["cluster"]["masters"] - 1e-9 <= share <= 1, row["extra"]
        if name.startswith("projection"):
            assert row["extra"]["failed"] == 0, row["extra"]
            assert row["extra"]["not_applied"] == {"node": 0, "cluster": 0}, row["extra"]
        if " p99" in name:
            p50 = cluster[name.replace(" p99", " p50")]
            for side in ("project", "ceiling"):  # cluster, one node
                assert row[side]["median"] >= p50[side]["median"] > 0, (name, side)
    facts = cluster["projection, 1 worker"]["extra"]
    assert facts["cluster"]["source"] == "CQRS_REDIS_URL"
    assert facts["cluster"]["masters"] >= 3 and facts["partitions"] == 16
    assert sum(facts["cluster"]["streams_per_master"]) == 16
    assert facts["node"]["source"] == "local: private redis-server"

    # Nothing left behind: the private node is stopped, the scratch database dropped,
    # and no key of the run's namespaces is left on any master.
    node = urlsplit(facts["node"]["url"])
    probe = redis.Redis(host=node.hostname, port=node.port, socket_connect_timeout=1)
    with pytest.raises(redis.ConnectionError):
        probe.ping()
    probe.close()
    assert report["scratch"]["database"] not in _scratch_databases(backend.database_url)
    client = RedisCluster.from_url(redis_cluster.url.rsplit("/", 1)[0])
    try:
        pattern = f"{report['scratch']['namespace_prefix']}*"
        assert list(client.scan_iter(match=pattern, count=1000)) == []
    finally:
        client.close()
