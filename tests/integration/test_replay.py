"""Replay (`cqrs replay`): a new generation is built beside the live one and switched to
atomically; the result never depends on how often, from where, or under what load it ran.

Everything goes through the real CLI as subprocesses (replay, relay, workers, drain,
verify) against the real services; writers run in threads of this process through the
real command handlers (bench/workload.py). PostgreSQL is the judge: `cqrs verify`.

Views are compared across generations with a snapshot keyed without the generation
segment (`<ns>:products:g3:product:{id}` -> `products:product:{id}`).

Where a test needs a replay to be still running at some point (killed before its switch,
refusing a second one), it does not race the replay's speed: it plants the lease of a
frozen worker on one slot, and the replay waits for that lease to expire before it can
switch, as it would for a real worker that stopped responding.

The seed of each run is printed; set `CQRS_TEST_SEED` to replay a run's workload.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from bench.workload import WorkloadReport, generate
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import Replayer, stream_holds_history
from cqrs.projector.state import live_generation, read_state
from cqrs.queries.errors import NotFound
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import Wiring, make_redis
from tests.conftest import settings_env
from tests.helpers import event_count, run_cli, wait_applied, wait_until
from tests.integration.projector_support import differences, drain
from tests.integration.replay_support import (
    assert_totals_match_the_write_side,
    generations_present,
    keys_of_generation,
    live_snapshot,
    replay,
    run_seed,
    snapshot_mismatch,
    stream_entries,
    verify_clean,
)
from tests.procs import fleet

# The replay lock outlives a killed replay by max(3 * lease, CQRS_REPLAY_LOCK_MS); the
# test settings make that a few seconds.
LOCK_TTL_S = 15.0


# --------------------------------------------------------------------------- a) twice


def test_replaying_twice_builds_identical_views(wiring: Wiring, settings: Settings) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    # The first views are built from a short history, the rest of the workload is
    # projected live: the live views must equal what a replay builds from scratch.
    generate(random.Random(rng.getrandbits(64)), wiring, 60)
    drain(wiring)
    report = generate(random.Random(rng.getrandbits(64)), wiring, 240)
    drain(wiring)
    assert report.committed > 150, report.summary()
    assert differences(wiring) == []
    live_built = live_snapshot(client, keys)
    assert_totals_match_the_write_side(live_built, settings.database_url)
    events = event_count(settings.database_url)
    env = settings_env(settings)

    previous = {p: live_generation(client, keys, p) for p in PROJECTIONS}
    assert all(previous.values()), previous
    snapshots = []
    for attempt in (1, 2):
        old_keys = {p: keys_of_generation(client, keys, p, g) for p, g in previous.items()}
        summaries = replay(env, "--all")
        assert [s["projection"] for s in summaries] == list(PROJECTIONS)
        for s in summaries:
            name = s["projection"]
            assert s["source"] == "stream", s  # the streams hold the whole history
            assert s["events"] == events, s  # every entry once, nothing else to catch up
            assert s["dead_lettered"] == 0, s
            assert s["old_generation"] == previous[name], (attempt, s)
            assert s["new_generation"] > s["old_generation"], (attempt, s)
            assert live_generation(client, keys, name) == s["new_generation"]
            assert read_state(client, keys, name).generation == s["new_generation"]
            assert s["removed_keys"] == old_keys[name] > 0, (old_keys, s)
            # The old generation is gone (SCAN <ns>:<projection>:g<old>:*), nothing else
            # but the live one is left.
            assert keys_of_generation(client, keys, name, s["old_generation"]) == 0, s
            assert generations_present(client, keys)[name] == {s["new_generation"]}, s
            previous[name] = s["new_generation"]
        assert differences(wiring) == []
        snapshot = live_snapshot(client, keys)
        assert_totals_match_the_write_side(snapshot, settings.database_url)
        snapshots.append(snapshot)

    assert not (problem := snapshot_mismatch(snapshots[0], snapshots[1])), problem
    assert not (problem := snapshot_mismatch(live_built, snapshots[0])), problem


# --------------------------------------------------------------------------- b) under load


MIN_READS = 50


class Reader(threading.Thread):
    """Reads one old order and the top products in a tight loop and records every read
    that is not a complete view: NotFound, a validation error (a missing field), an
    order with other lines than it was placed with, or a shorter top list."""

    def __init__(self, settings: Settings, order_id: str) -> None:
        super().__init__(name="reader", daemon=True)
        self.client = make_redis(settings.redis_url, settings)
        self.keys = KeyMap(settings.namespace)
        self.service = QueryService(self.client, self.keys, partitions=settings.partitions)
        self.order_id = order_id
        self.expected_lines = self.service.get_order(order_id).lines
        self.top_size = len(self.service.top_products(limit=5))
        self.stop = threading.Event()
        self.reads = 0
        self.problems: list[str] = []
        self.generations: dict[str, set[int]] = {"orders": set(), "products": set()}

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for name in self.generations:
                    self.generations[name].add(live_generation(self.client, self.keys, name))
                try:
                    order = self.service.get_order(self.order_id)
                    if not order.lines or order.lines != self.expected_lines:
                        self.problems.append(f"order lines {order.lines!r}")
                    if not order.customer_name:
                        self.problems.append(f"order without customer name {order!r}")
                    top = self.service.top_products(limit=5)
                    if len(top) < self.top_size:
                        self.problems.append(f"top products {len(top)} < {self.top_size}")
                except NotFound as exc:
                    self.problems.append(f"NotFound: {exc}")
                except Exception as exc:  # a missing field fails validation
                    self.problems.append(f"{type(exc).__name__}: {exc}")
                self.reads += 1
        finally:
            self.client.close()


def test_replay_while_writers_commit_never_serves_a_partial_view(
    wiring: Wiring, settings: Settings, tmp_path: Path
) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    generate(random.Random(rng.getrandbits(64)), wiring, 150)
    drain(wiring)
    with psycopg.connect(libpq_url(settings.database_url)) as conn:
        order_id = conn.execute(
            "SELECT id FROM orders.orders ORDER BY placed_at LIMIT 1"
        ).fetchone()[0]
    reader = Reader(settings, str(order_id))
    assert reader.expected_lines and reader.top_size == 5
    before = {p: live_generation(client, keys, p) for p in PROJECTIONS}
    env = {**settings_env(settings), "CQRS_PROJECTOR_LEASE_MS": "1000"}
    halt = threading.Event()
    live = WorkloadReport()

    with fleet(tmp_path, env) as processes, ThreadPoolExecutor(1) as pool:
        relay = processes.cqrs("relay", "relay")
        worker = processes.worker("live")
        writers = pool.submit(
            generate,
            random.Random(rng.getrandbits(64)),
            wiring,
            1_000_000,
            writers=2,
            report=live,
            stop=halt,
        )
        reader.start()
        try:
            # Writers commit and the live worker projects them before the replay starts.
            start = live.committed
            wait_until(
                lambda: writers.done() or live.committed >= start + 30,
                timeout=30,
                what="writers to commit",
            )
            wait_until(
                lambda: client.zcard(keys.workers("products")) > 0,
                timeout=30,
                what="the live worker to start",
            )
            during = live.committed
            reads_before = reader.reads
            summaries = replay(env, "--all")
            after_replay = reader.reads
            reads_during = after_replay - reads_before
            committed_during = live.committed - during
            # Reads go on after the switch and the removal of the old generation.
            wait_until(
                lambda: reader.reads >= after_replay + 20 or not reader.is_alive(),
                timeout=30,
                what="reads after the replay",
            )
        finally:
            halt.set()
            reader.stop.set()
            reader.join(timeout=30)
        report = writers.result()
        assert processes.stop(relay, timeout=30) == 0, processes.logs()
        assert processes.stop(worker, timeout=30) == 0, processes.logs()

    assert not reader.is_alive()
    assert reader.problems == [], reader.problems[:5]
    assert reads_during > MIN_READS, reads_during
    assert committed_during > 0, "no writer committed while the replay ran"
    for s in summaries:
        name = s["projection"]
        assert s["old_generation"] == before[name] and s["new_generation"] > before[name], s
        assert s["dead_lettered"] == 0, s
    # The reader read across the switch: both generations served it.
    for name, seen in reader.generations.items():
        old, new = before[name], live_generation(client, keys, name)
        assert {old, new} <= seen, (name, seen)
        assert 0 not in seen, (name, seen)

    drained = run_cli("run", "--drain", env=env, timeout=120)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    verify_clean(env)
    assert differences(wiring) == []
    for projection in PROJECTIONS:
        assert client.xlen(keys.dead_letters(projection)) == 0
    print(
        f"{report.summary()}; {committed_during} commands committed during the replay; "
        f"{reader.reads} reads ({reads_during} during the replay); "
        f"generations seen {reader.generations}"
    )


# --------------------------------------------------------------------------- c) trimmed


KEEP_ENTRIES = 100


def test_replay_from_auto_falls_back_to_the_log_when_the_streams_were_trimmed(
    wiring: Wiring, settings: Settings
) -> None:
    seed = run_seed()
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    generate(random.Random(seed), wiring, 300)
    drain(wiring)
    env = settings_env(settings)
    events = event_count(settings.database_url)

    assert client.hget(keys.meta(), "origin") == "complete"
    assert stream_holds_history(client, keys, settings.partitions)
    reference_run = replay(env, "--all", "--from", "stream")
    assert {s["source"] for s in reference_run} == {"stream"}
    reference = live_snapshot(client, keys)
    assert differences(wiring) == []

    # Keep only the newest KEEP_ENTRIES entries over all partitions: the newest
    # k_p of partition p are exactly its entries among the global newest ones.
    entries = stream_entries(client, keys)
    assert len(entries) == events > 3 * KEEP_ENTRIES
    newest = sorted(entries, key=lambda e: tuple(map(int, e[1].split("-"))))[-KEEP_ENTRIES:]
    keep = {p: 0 for p in range(settings.partitions)}
    for partition, _id in newest:
        keep[partition] += 1
    for partition, count in keep.items():
        client.xtrim(keys.stream(partition), maxlen=count, approximate=False)
    assert len(stream_entries(client, keys)) == KEEP_ENTRIES
    assert not stream_holds_history(client, keys, settings.partitions)

    summaries = replay(env, "--all", "--from", "auto")
    for s in summaries:
        assert s["source"] == "log", s
        # The whole log, then the streams from their (new) first entry: those entries are
        # seen twice (no-ops the second time) and counted once (issue 13: the count was
        # events + KEEP_ENTRIES).
        assert s["events"] == events, s
        assert s["dead_lettered"] == 0, s
    rebuilt = live_snapshot(client, keys)
    assert not (problem := snapshot_mismatch(reference, rebuilt)), problem
    assert_totals_match_the_write_side(rebuilt, settings.database_url)
    assert differences(wiring) == []
    verify_clean(env)


# --------------------------------------------------------------------------- d) SIGKILL


KILL_EVENTS = 3_000


def test_a_replay_killed_midway_leaves_the_live_views_and_the_next_one_cleans_up(
    wiring: Wiring, settings: Settings, tmp_path: Path
) -> None:
    seed = run_seed()
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    report = WorkloadReport()
    while report.events < KILL_EVENTS:
        generate(random.Random(rng.getrandbits(64)), wiring, 400, writers=2, report=report)
    drain(wiring)
    live = live_generation(client, keys, "products")
    before = live_snapshot(client, keys)
    # The killed replay's lock must outlive the checks below and a CLI start on a loaded
    # machine (the suite's 3 s lapsed first): 10 s, renewed every 3.3 s while it runs.
    env = {
        **settings_env(settings),
        "CQRS_PROJECTOR_LEASE_MS": "1000",
        "CQRS_REPLAY_LOCK_MS": "10000",
    }
    service = QueryService(client, keys, partitions=settings.partitions)
    top = service.top_products(limit=5)
    assert len(top) == 5

    # A frozen worker's lease on one products slot (it expires on its own): the replay
    # cannot switch before it does, so the kill below lands before the switch even if
    # the build itself is faster than our polling.
    client.set(keys.lease("products", 0), "frozen-worker", px=8_000)
    with fleet(tmp_path, env) as processes:
        victim = processes.cqrs("replay", "replay", "products", "--yes")

        def building() -> int | None:
            if victim.poll() is not None:
                return -1
            new = generations_present(client, keys)["products"] - {live}
            return next(iter(new)) if new else None

        # No need to poll fast: the frozen lease holds the switch for seconds.
        new = wait_until(building, timeout=30, what="the new generation")
        assert new != -1, f"the replay exited early\n{processes.logs()}"
        paused = bool(client.exists(keys.pause("products")))
        victim.kill()
        assert victim.wait(timeout=10) == -signal.SIGKILL
    orphans = keys_of_generation(client, keys, "products", new)
    assert orphans > 0
    print(f"killed while building generation {new} ({orphans} keys, paused={paused})")

    # The live generation is untouched and keeps answering.
    assert live_generation(client, keys, "products") == live
    assert read_state(client, keys, "products").generation == live
    assert service.top_products(limit=5) == top
    assert service.get_product(top[0].id) == top[0]
    assert live_snapshot(client, keys) == before

    # The dead replay's lock is still held: a new replay refuses until it expires.
    assert client.exists(keys.replay_lock("products"))
    refused = run_cli("replay", "products", "--yes", env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "already running" in refused.stderr
    wait_until(
        lambda: not client.exists(keys.replay_lock("products")),
        timeout=LOCK_TTL_S + 10,
        interval=0.1,
        what="the killed replay's lock to expire",
    )
    assert service.top_products(limit=5) == top  # still serving while nobody replays

    [summary] = replay(env, "products")
    assert summary["old_generation"] == live, summary
    assert summary["new_generation"] > new, summary  # a generation number is never reused
    assert summary["removed_keys"] >= orphans, summary
    verify_clean(env)
    assert differences(wiring) == []
    # No orphan: every projection has keys of its live generation only.
    present = generations_present(client, keys)
    for projection in PROJECTIONS:
        assert present[projection] == {live_generation(client, keys, projection)}, present
    assert not client.exists(keys.pause("products"))
    after = live_snapshot(client, keys)
    assert not (problem := snapshot_mismatch(before, after)), problem


# --------------------------------------------------------------------------- e) two at once


def test_a_second_replay_of_the_same_projection_refuses(
    wiring: Wiring, settings: Settings, tmp_path: Path
) -> None:
    seed = run_seed()
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    generate(random.Random(seed), wiring, 100)
    drain(wiring)
    live = live_generation(client, keys, "products")
    env = settings_env(settings)

    # A frozen worker's lease holds the first replay in its switch until the test lets
    # go of it, so the second one certainly starts while the first runs, however slowly
    # a loaded machine starts it.
    frozen = keys.lease("products", 0)
    client.set(frozen, "frozen-worker", px=60_000)
    # Long leases: the first replay waits that long for a frozen worker's lease to lapse.
    first_env = env | {"CQRS_PROJECTOR_LEASE_MS": "30000"}
    with fleet(tmp_path, env) as processes:
        log = tmp_path / "first.json"
        with log.open("wb") as out:
            first = subprocess.Popen(
                [sys.executable, "-m", "cqrs.app", "replay", "products", "--yes", "--json"],
                env=first_env,
                stdout=out,
                stderr=subprocess.PIPE,
            )
        processes.adopt("first", first, log)
        wait_until(
            lambda: first.poll() is not None or client.exists(keys.pause("products")),
            timeout=30,
            what="the first replay to reach its switch",
        )
        assert first.poll() is None, processes.logs()
        second = run_cli("replay", "products", "--yes", "--json", env=env)
        assert first.poll() is None, "the first replay ended before the second one tried"
        assert second.returncode == 1, second.stdout + second.stderr
        assert second.stdout == ""
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already running" in lines[0], second.stderr
        client.delete(frozen)  # the frozen worker's lease lapses: the switch goes on
        _out, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    (summary,) = json.loads(log.read_text())["replays"]
    assert summary["projection"] == "products"
    assert summary["old_generation"] == live and summary["new_generation"] > live
    assert live_generation(client, keys, "products") == summary["new_generation"]
    assert not client.exists(keys.replay_lock("products"))
    assert differences(wiring) == []


# --------------------------------------------------------------------------- f) lost lock


def test_a_replay_that_lost_its_lock_never_deletes_the_generation_of_the_next(
    wiring: Wiring, settings: Settings
) -> None:
    """A replay's lock can be lost while it waits out its grace period after the switch
    (the process stalled past the TTL, or Redis lost its data, which also resets the
    generation counter). The replay that holds the lock now may have switched to its own
    generation meanwhile: the first one's cleanup must not delete it."""
    seed = run_seed()
    print(f"\nseed {seed}")
    client, keys = wiring.redis, wiring.keys
    generate(random.Random(seed), wiring, 80)
    drain(wiring)
    products = PROJECTIONS["products"]
    live = live_generation(client, keys, "products")
    outcome: dict[str, Any] = {}

    def first_replay() -> None:
        try:
            replayer = Replayer(client, wiring.settings, products, wiring.database_url)
            outcome["result"] = replayer.run("stream", stop=threading.Event())
        except BaseException as exc:
            outcome["error"] = exc

    first = threading.Thread(target=first_replay, name="first-replay")
    first.start()
    try:
        # The switch publishes on the applied channel: woken by it, the check runs while
        # the first replay waits out its grace period.
        switched = wait_applied(
            wiring,
            lambda: live_generation(client, keys, "products") != live or not first.is_alive(),
            timeout=30,
            what="the first replay to switch",
        )
        assert switched and first.is_alive(), outcome
        # The first replay now waits out its grace period; its lock is lost.
        client.delete(keys.replay_lock("products"))
        second = Replayer(client, wiring.settings, products, wiring.database_url).run("stream")
        assert live_generation(client, keys, "products") == second.new_generation
    finally:
        first.join(timeout=30)
    assert "error" not in outcome, outcome
    assert second.old_generation == outcome["result"].new_generation
    assert keys_of_generation(client, keys, "products", second.new_generation) > 0
    assert differences(wiring) == []
    assert generations_present(client, keys)["products"] == {second.new_generation}
