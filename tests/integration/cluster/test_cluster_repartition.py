"""`cqrs repartition` on a Redis Cluster (3 masters + 3 replicas): 8 -> 16 partitions
through the real CLI with `CQRS_REDIS_URL` naming one node. Afterwards the streams are
exactly the 16 new ones, spread over all three masters, every entry in its aggregate's
partition; the views are those of the log, before and after more commits."""

from __future__ import annotations

import random

from bench.workload import generate
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.integration.projector_support import differences, drain
from tests.integration.repartition_support import assert_streams_are, repartition, stream_keys
from tests.integration.replay_support import live_snapshot, snapshot_mismatch, verify_clean


def test_repartition_8_to_16_spreads_the_new_streams_over_every_master(
    cluster_wiring: Wiring, cluster_settings: Settings
) -> None:
    w = cluster_wiring
    client, keys = w.redis, w.keys
    env = settings_env(cluster_settings)
    generate(random.Random(15), w, 80)
    drain(w)
    assert_streams_are(client, keys, 8)
    before = live_snapshot(client, keys)

    report = repartition(env, 16)
    assert (report["before"], report["after"], report["removed_streams"]) == (8, 16, 8), report
    assert_streams_are(client, keys, 16)
    masters = set(stream_keys(client, keys).values())
    assert len(masters) == 3, masters
    assert not (problem := snapshot_mismatch(before, live_snapshot(client, keys))), problem

    generate(random.Random(16), w, 40)
    drain(w)
    assert_streams_are(client, keys, 16)
    assert differences(w) == []
    verify_clean(env)
