"""Redis Cluster: the same work on a cluster and on one node, in the same run.

`python -m bench cluster` (not part of the default run: it starts servers of its own).
Figures, each with the cluster's value against one node's (ratio = cluster / one node):

- projection events/s with 1, 2 and 3 `cqrs project` workers (all projections, every
  guarantee on), over the same synthetic history in the same number of partitions
  (`PARTITIONS`), timed like the projection scenario (bench.procs); and the hand-written
  XREADGROUP+HSET+XACK loop (bench.ceilings) in 1, 2 and 3 processes, so what the
  cluster costs the project can be told from what it costs any client;
- get-by-id p50/p99: `QueryService.get_product`/`get_order` (one packed trip per master),
  a raw HGETALL with redis-py (`RedisCluster` on the cluster), and `cqrs serve` over HTTP;
  the two sides take turns call by call (HTTP: every `HTTP_BLOCK` requests), so a burst of
  load lands on both alike;
- the packed round trip itself (`cqrs.redisio.round_trip`), get-by-id shape (GET + HGETALL)
  and 1,000 HSETs on 1,000 slots, against one node; and, with one grouping code for all
  three, the ways to split a trip over the masters: every master's part sent before any
  reply is read (redisio's way), one master after another, one thread per master.

After the last projection round every aggregate of the history is checked at its last
version through the projections' applied marks (as `?after=` checks them): `not_applied`
in each projection row's `extra`, 0 when every event was applied.

Servers. The cluster: `CQRS_BENCH_CLUSTER_URL` (any node of an existing cluster), else
`CQRS_REDIS_URL` when it names a cluster node, else a local cluster started here
(`cqrs.cluster`: 3 masters + 3 replicas on free loopback ports) and stopped by PID when
the scenario ends, also after an error or a SIGTERM/SIGINT (bench.runner turns those
into an exception, so every `finally` runs). One node: `CQRS_BENCH_NODE_URL`, else a
private `redis-server` started (and stopped) here with the local cluster's binary and
flags, so neither side serves anyone else's traffic and both run the same server with
the same settings. Both sides work under namespaces of their own, deleted at the end.

CPU: every round also records the CPU time of the consumer processes and of every server
(INFO cpu, masters and replicas apart), per event: where the time goes, and what a
deployment with the masters and workers on machines of their own would be bound by
(docs/benchmarks.md, "Redis Cluster").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from bench import ceilings
from bench.backend import delete_namespace
from bench.history import History, SynthEvent, xadd_history
from bench.procs import ConsumerPool
from bench.scenarios import Context
from bench.scenarios.projection import RAW_ROUND, WORKER_ROUND, prepare_live, prepare_raw
from bench.scenarios.queries import HTTP_BLOCK, free_port, server, timed
from bench.stats import Figure, Row, percentile
from cqrs import cluster as local_cluster
from cqrs.contracts import registered_contracts
from cqrs.keys import KeyMap
from cqrs.projector.registry import PROJECTIONS
from cqrs.queries.service import QueryService
from cqrs.redisio import (
    command_key,
    is_cluster_client,
    pack,
    pool_round_trip,
    publish,
    read_replies,
    round_trip,
)
from cqrs.redisio import slot_of as key_slot_of
from cqrs.settings import Settings
from cqrs.urls import mask_url
from cqrs.wiring import make_redis

CLUSTER_URL_ENV = "CQRS_BENCH_CLUSTER_URL"
NODE_URL_ENV = "CQRS_BENCH_NODE_URL"
WORKERS = (1, 2, 3)
# More partitions than the default 8 so each of 3 masters holds several streams (the
# local cluster's slot ranges give 4/5/7) and 3 workers each own several; docs/scaling.md
# recommends 16-32 for 3 masters. Both sides use the same count.
PARTITIONS = 16
TRIP_WRITES = 1_000
SIDES = ("node", "cluster")


@dataclass
class Side:
    """One Redis under test (the cluster or the one node) and its namespace."""

    name: str
    source: str
    settings: Settings
    client: redis.Redis
    events: list[SynthEvent] = field(default_factory=list)
    # (role, plain client) of every server of this side, for INFO cpu.
    servers: list[tuple[str, redis.Redis]] = field(default_factory=list)

    @property
    def keys(self) -> KeyMap:
        return KeyMap(self.settings.namespace)

    @property
    def streams(self) -> list[str]:
        return [self.keys.stream(p) for p in range(self.settings.partitions)]


# --- servers -------------------------------------------------------------------------------


def wait_ping(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {url} did not start") from None
                time.sleep(0.05)
    finally:
        client.close()


@contextlib.contextmanager
def private_node(home: Path) -> Iterator[str]:
    """A one-node redis-server on a free loopback port, with the local cluster's binary
    and flags (no persistence), in a session of its own (a Ctrl-C reaches us, not it);
    stopped by PID when the block ends."""
    port = free_port()
    data = home / f"node-{port}"
    data.mkdir(parents=True)
    args = [
        local_cluster.server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "yes",
        "--dir", str(data),
        "--logfile", str(data / "server.log"),
        "--daemonize", "no",
    ]  # fmt: skip
    proc = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_ping(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def servers(ctx: Context) -> Iterator[dict[str, tuple[str, str]]]:
    """{"cluster": (url, source), "node": (url, source)}; whatever is started here is
    stopped when the block ends, however it ends."""
    home = Path(tempfile.mkdtemp(prefix="cqrs-bench-cluster-"))
    try:
        with contextlib.ExitStack() as stack:
            chosen: dict[str, tuple[str, str]] = {}
            if os.environ.get(CLUSTER_URL_ENV):
                chosen["cluster"] = (os.environ[CLUSTER_URL_ENV], CLUSTER_URL_ENV)
            elif is_cluster_client(ctx.backend.redis):
                chosen["cluster"] = (ctx.backend.redis_url, "CQRS_REDIS_URL")
            else:
                ctx.say("cluster: starting a local cluster (3 masters + 3 replicas)")
                started = local_cluster.start(home)
                stack.callback(lambda: ctx.say(f"cluster: stopped {stop_local(started)}"))
                chosen["cluster"] = (started.url, "local: cqrs.cluster, 3 masters + 3 replicas")
            if os.environ.get(NODE_URL_ENV):
                chosen["node"] = (os.environ[NODE_URL_ENV], NODE_URL_ENV)
            else:
                url = stack.enter_context(private_node(home))
                chosen["node"] = (url, "local: private redis-server")
            yield chosen
    finally:
        shutil.rmtree(home, ignore_errors=True)


def stop_local(started: local_cluster.LocalCluster) -> str:
    pids = local_cluster.stop_cluster(started)
    return f"{len(pids)} nodes (pids {', '.join(map(str, pids))})"


def open_side(ctx: Context, name: str, url: str, source: str) -> Side:
    settings = ctx.backend.settings(f"cluster-{name}", redis_url=url, partitions=PARTITIONS)
    client = make_redis(url, settings)
    if (name == "cluster") != is_cluster_client(client):
        client.close()
        what = "is not a Redis Cluster node" if name == "cluster" else "is a cluster node"
        raise RuntimeError(f"{source} {what}: {mask_url(url)}")
    side = Side(name, source, settings, client)
    if name == "node":
        side.servers = [("master", redis.Redis.from_url(url, decode_responses=True))]
    else:
        base = redis.Redis.from_url(url).connection_pool.connection_kwargs
        for address, node in client.cluster_nodes().items():  # type: ignore[attr-defined]
            host, _, port = address.partition("@")[0].rpartition(":")
            role = "master" if "master" in node["flags"] else "replica"
            plain = redis.Redis(
                host=host,
                port=int(port),
                username=base.get("username"),
                password=base.get("password"),
                decode_responses=True,
            )
            side.servers.append((role, plain))
    return side


def redis_cpu(side: Side) -> list[tuple[str, float]]:
    """(role, CPU seconds used so far) of each of its servers."""
    used = []
    for role, server_client in side.servers:
        info = server_client.info("cpu")
        used.append((role, float(info["used_cpu_user"]) + float(info["used_cpu_sys"])))
    return used


def replicas(client: Any) -> int:
    """Replicas linked to the masters now (the client's own node list can lag behind a
    cluster formed a moment ago)."""
    infos = client.info("replication", target_nodes=client.PRIMARIES)
    return sum(int(info.get("connected_slaves", 0)) for info in infos.values())


def cluster_facts(client: Any, keys: KeyMap) -> dict[str, Any]:
    """Masters, replicas, the server version, and how the partition streams spread."""
    per_master = Counter(
        client.nodes_manager.get_node_from_slot(key_slot_of(keys.stream(p))).name
        for p in range(PARTITIONS)
    )
    return {
        "masters": len(client.get_primaries()),
        "replicas": replicas(client),
        "redis_version": client.info("server").get("redis_version"),
        "streams_per_master": sorted(per_master.values()),
    }


# --- projection ----------------------------------------------------------------------------


@dataclass
class Round:
    """One timed round: events/s, entries failed, and CPU seconds of the consumer
    processes and of the servers by role over the round."""

    rate: float
    failed: int
    consumers_cpu: float
    servers_cpu: dict[str, float]
    # The busiest master's part of the masters' CPU (1.0 on one node): how evenly the
    # work spreads, which bounds a cluster whose masters have a core each.
    busiest_master: float


def timed_round(
    side: Side, run: Callable[[], Any], reports_cpu: Callable[[list[dict[str, Any]]], float]
) -> Round:
    before = redis_cpu(side)
    result = run()
    after = redis_cpu(side)
    spent = [(role, b - a) for (role, a), (_, b) in zip(before, after, strict=True)]
    by_role = {"master": 0.0, "replica": 0.0}
    for role, seconds in spent:
        by_role[role] += seconds
    masters = [seconds for role, seconds in spent if role == "master"]
    return Round(
        len(side.events) / result.seconds,
        sum(r.get("failed", 0) for r in result.reports),
        reports_cpu(result.reports),
        by_role,
        max(masters) / sum(masters) if sum(masters) > 0 else 1.0,
    )


def project_round(pool: ConsumerPool, side: Side, workers: int, tag: str) -> Round:
    """`workers` worker processes over the whole history."""
    keys, client = side.keys, side.client
    consumers = [f"bench-{tag}-{i}" for i in range(workers)]
    prepare_live(client, keys, consumers, side.settings.partitions)
    values = side.settings.model_dump()
    return timed_round(
        side,
        lambda: pool.round(
            WORKER_ROUND,
            [(values, c) for c in consumers],
            client,
            side.streams,
            list(PROJECTIONS),
            tick=lambda: publish(client, keys.relay_wakeup_channel(), 1),
        ),
        lambda reports: sum(r["cpu"] for r in reports),
    )


def raw_round(pool: ConsumerPool, side: Side, procs: int, tag: str) -> Round:
    """The hand-written loop in `procs` processes (partitions dealt out)."""
    partitions = side.settings.partitions
    prepare_raw(side.client, side.keys, partitions)
    handled = {name: list(p.handlers) for name, p in PROJECTIONS.items()}
    args = [
        (
            side.settings.redis_url,
            side.settings.namespace,
            [p for p in range(partitions) if p % procs == i],
            handled,
            "hset",
            f"raw-{tag}-{i}",
        )
        for i in range(procs)
    ]
    groups = [ceilings.raw_group(name) for name in PROJECTIONS]
    measured = timed_round(
        side,
        lambda: pool.round(RAW_ROUND, args, side.client, side.streams, groups),
        lambda reports: sum(r["cpu"] for r in reports),
    )
    prepare_raw(side.client, side.keys, partitions)  # the loop's view copies go
    return measured


def not_applied(side: Side) -> int:
    """(aggregate, projection) pairs of the history whose applied mark (what `?after=`
    checks) does not show the aggregate's last version yet: 0 once every event was
    applied."""
    last: dict[tuple[str, str, str], int] = {}
    for e in side.events:
        last[(e.aggregate_type, e.aggregate_id, e.partition_key)] = e.version
    marks: list[tuple[str, str, int]] = []
    for name, contract in registered_contracts().items():
        rule = contract.applied
        if rule is None:
            continue
        views = side.keys.views(name, 1)
        for (kind, ident, partition_key), version in last.items():
            mark = rule(views, kind, ident, partition_key)  # type: ignore[arg-type]
            if mark:
                marks.append((mark[0], mark[1], version))
    pipes = ceilings.Pipes(side.client)
    for key, name, _version in marks:
        pipes.on(key).hget(key, name)
    got = pipes.execute() if marks else []
    return sum(1 for have, (_k, _f, want) in zip(got, marks, strict=True) if int(have or 0) < want)


# --- packed round trips ----------------------------------------------------------------------


def by_master(client: Any, commands: list[tuple[Any, ...]]) -> list[tuple[Any, list[Any]]]:
    """The commands grouped by the master of their slot: (connection pool, commands)."""
    nodes: dict[int, Any] = {}
    groups: dict[str, tuple[Any, list[Any]]] = {}
    for command in commands:
        slot = key_slot_of(command_key(command))
        node = nodes.get(slot)
        if node is None:
            node = nodes[slot] = client.nodes_manager.get_node_from_slot(slot)
        entry = groups.get(node.name)
        if entry is None:
            entry = groups[node.name] = (client.get_redis_connection(node).connection_pool, [])
        entry[1].append(command)
    return list(groups.values())


def node_trip(pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """One master's part: one packed write, its replies read."""
    return pool_round_trip(pool, commands)


def send_all_then_read(client: Any, commands: list[tuple[Any, ...]]) -> None:
    """`cqrs.redisio`'s order (every master's part written before any reply is read),
    without its retries: the reference the two others are compared with, same code."""
    sent = []
    for pool, part in by_master(client, commands):
        conn = pool.get_connection()
        conn.send_packed_command([b"".join(pack(c) for c in part)])
        sent.append((pool, conn, len(part)))
    for pool, conn, count in sent:
        try:
            read_replies(conn, count)
        finally:
            pool.release(conn)


def one_after_another(client: Any, commands: list[tuple[Any, ...]]) -> None:
    for pool, part in by_master(client, commands):
        node_trip(pool, part)


def thread_per_master(
    client: Any, commands: list[tuple[Any, ...]], threads: ThreadPoolExecutor
) -> None:
    futures = [threads.submit(node_trip, pool, part) for pool, part in by_master(client, commands)]
    for future in futures:
        future.result()


def trip_calls(
    node: Side, cluster: Side, build: Callable[[Side, Any], list[tuple[Any, ...]]], threads: Any
) -> dict[str, Callable[[Any], Any]]:
    """The ways to send one trip; `build(side, ident)` gives its commands. `node` and
    `cluster` are the product's `round_trip`; the other three share the bench's grouping
    and differ only in the order of sends and reads."""
    return {
        "node": lambda i: round_trip(node.client, build(node, i)),
        "cluster": lambda i: round_trip(cluster.client, build(cluster, i)),
        "sendall": lambda i: send_all_then_read(cluster.client, build(cluster, i)),
        "sequential": lambda i: one_after_another(cluster.client, build(cluster, i)),
        "threads": lambda i: thread_per_master(cluster.client, build(cluster, i), threads),
    }


# --- the scenario --------------------------------------------------------------------------


def run(ctx: Context) -> list[Row]:
    n_events = ctx.size(1_000, 50_000)
    n_calls = ctx.size(100, 5_000)
    n_trips = ctx.size(10, 300)
    results: dict[str, list[float]] = {}
    failed = 0
    # Servers, workers and the client share the machine's cores: the load says how much
    # else ran meanwhile (figures from a busy machine are noisy).
    load = {"start": [round(x, 2) for x in os.getloadavg()]}

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    def record(side: Side, name: str, kind: str, measured: Round) -> None:
        """events/s, and CPU microseconds per event of the consumers and the servers."""
        add(f"{side.name}-{name}", measured.rate)
        per_event = 1e6 / len(side.events)
        add(f"{side.name}-{kind}-cpu", measured.consumers_cpu * per_event)
        for role, seconds in measured.servers_cpu.items():
            add(f"{side.name}-{kind}-redis-{role}", seconds * per_event)
        add(f"{side.name}-{kind}-busiest-master", measured.busiest_master)

    with servers(ctx) as chosen, contextlib.ExitStack() as stack:
        sides: dict[str, Side] = {}
        for name in SIDES:
            side = open_side(ctx, name, *chosen[name])
            sides[name] = side
            stack.callback(side.client.close)
            stack.callback(lambda s=side: [c.close() for _role, c in s.servers])
            stack.callback(lambda s=side: delete_namespace(s.client, s.settings.namespace))
        node, cluster = sides["node"], sides["cluster"]
        facts = cluster_facts(cluster.client, cluster.keys)
        ctx.say(
            f"cluster: {facts['masters']} masters + {facts['replicas']} replicas "
            f"({chosen['cluster'][1]}), one node: {chosen['node'][1]}; {n_events} events "
            f"in {PARTITIONS} partitions, streams per master {facts['streams_per_master']}"
        )
        history = History(partitions=PARTITIONS)
        events = list(history.events(n_events))
        for side in sides.values():
            side.events = events
            xadd_history(side.client, side.keys, events, partitions=PARTITIONS)
        unapplied: dict[str, int] = {}
        started = time.monotonic()
        with ConsumerPool(max(WORKERS)) as pool:
            for rep in range(ctx.repeat):
                order = [node, cluster] if rep % 2 == 0 else [cluster, node]
                for workers in WORKERS:
                    for side in order:
                        measured = project_round(pool, side, workers, f"{rep}-{workers}")
                        record(side, f"project-{workers}", "project", measured)
                        failed += measured.failed
                # The last round left complete views: check them, then read them.
                for side in order:
                    unapplied[side.name] = max(unapplied.get(side.name, 0), not_applied(side))
                for procs in WORKERS:
                    for side in order:
                        measured = raw_round(pool, side, procs, f"{rep}")
                        record(side, f"raw-{procs}", "raw", measured)
                ctx.say(
                    f"  cluster rep {rep + 1} events/s: "
                    + ", ".join(
                        f"{w} worker(s) {results[f'cluster-project-{w}'][-1]:.0f} vs node "
                        f"{results[f'node-project-{w}'][-1]:.0f}"
                        for w in WORKERS
                    )
                    + "; raw loop "
                    + ", ".join(
                        f"{w}: {results[f'cluster-raw-{w}'][-1]:.0f} vs "
                        f"{results[f'node-raw-{w}'][-1]:.0f}"
                        for w in WORKERS
                    )
                )
        if failed or any(unapplied.values()):
            ctx.say(f"  warning: {failed} entries failed; not applied: {unapplied}")
        ctx.say(f"  cluster: projection rounds {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        measure_reads(ctx, node, cluster, history, n_calls, n_trips, results)
        ctx.say(f"  cluster: reads {time.monotonic() - started:.1f}s")
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    ctx.say(f"  cluster: load average {load['start']} at the start, {load['end']} at the end")
    return rows(results, facts, chosen, n_events, n_calls, failed, unapplied, load)


def measure_reads(
    ctx: Context,
    node: Side,
    cluster: Side,
    history: History,
    n_calls: int,
    n_trips: int,
    results: dict[str, list[float]],
) -> None:
    """Get-by-id (Python API, raw HGETALL, HTTP) and the packed trips, both sides in turn;
    latencies in seconds into `results`."""

    def add(name: str, value: float) -> None:
        results.setdefault(name, []).append(value)

    both = (node, cluster)
    ids = {"product": [p.id for p in history.products], "order": list(history.orders)}
    services = {s.name: QueryService(s.client, s.keys, partitions=PARTITIONS) for s in both}
    order_key = {s.name: s.keys.views("orders", 1).order for s in both}
    generation = {s.name: s.keys.generation("orders") for s in both}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CQRS_", "BENCH_"))}

    def get_by_id(side: Side, ident: Any) -> list[tuple[Any, ...]]:
        return [("GET", generation[side.name]), ("HGETALL", order_key[side.name](ident))]

    def hsets(side: Side, _ident: Any) -> list[tuple[Any, ...]]:
        prefix = f"{side.settings.namespace}:trip"
        return [
            ("HSET", f"{prefix}:{{{i}}}", "name", "Blue Widget", "price", "12.50", "version", 3)
            for i in range(TRIP_WRITES)
        ]

    with contextlib.ExitStack() as stack:
        threads = stack.enter_context(ThreadPoolExecutor(max(WORKERS)))
        http: dict[str, httpx.Client] = {}
        for s in both:
            port = free_port()
            side_env = {
                **env,
                "CQRS_REDIS_URL": s.settings.redis_url or "",
                "CQRS_NAMESPACE": s.settings.namespace,
                "CQRS_LOG_LEVEL": "warning",  # as the queries scenario's "access log off"
            }
            args = ["-m", "cqrs.app", "serve", "--port", str(port)]
            base = stack.enter_context(server(args, side_env, port))
            http[s.name] = stack.enter_context(httpx.Client(base_url=base, timeout=60))
        for rep in range(ctx.repeat):
            for kind in ("product", "order"):
                calls: dict[str, Callable[[Any], Any]] = {}
                for s in both:
                    calls[f"{s.name}-py-{kind}"] = getattr(services[s.name], f"get_{kind}")
                    if kind == "order":
                        calls[f"{s.name}-raw-order"] = lambda i, c=s.client, k=order_key[s.name]: (
                            c.hgetall(k(i))
                        )
                for name, (samples, _rate) in timed(calls, ids[kind], n_calls).items():
                    add(f"{name}-p50", percentile(samples, 50))
                    add(f"{name}-p99", percentile(samples, 99))
            requests = {
                f"{name}-http": lambda i, h=client: h.get(f"/orders/{i}").raise_for_status()
                for name, client in http.items()
            }
            measured = timed(requests, ids["order"], n_calls, block=HTTP_BLOCK)
            for name, (samples, _rate) in measured.items():
                add(f"{name}-p50", percentile(samples, 50))
                add(f"{name}-p99", percentile(samples, 99))
            for shape, build, idents, n in (
                ("get", get_by_id, ids["order"], n_calls),
                ("writes", hsets, [0], n_trips),
            ):
                calls = trip_calls(node, cluster, build, threads)
                for name, (samples, _rate) in timed(calls, idents, n).items():
                    add(f"trip-{shape}-{name}-p50", percentile(samples, 50))
            ctx.say(
                f"  cluster rep {rep + 1} reads, p50/p99 us: "
                + "; ".join(
                    f"{what} cluster {results[f'cluster-{what}-p50'][-1] * 1e6:.0f}/"
                    f"{results[f'cluster-{what}-p99'][-1] * 1e6:.0f} vs node "
                    f"{results[f'node-{what}-p50'][-1] * 1e6:.0f}/"
                    f"{results[f'node-{what}-p99'][-1] * 1e6:.0f}"
                    for what in ("py-order", "raw-order", "http")
                )
                + "; 1,000 HSETs p50 us: "
                + ", ".join(
                    f"{way} {results[f'trip-writes-{way}-p50'][-1] * 1e6:.0f}"
                    for way in ("node", "cluster", "sendall", "sequential", "threads")
                )
            )


def rows(
    results: dict[str, list[float]],
    facts: dict[str, Any],
    chosen: dict[str, tuple[str, str]],
    n_events: int,
    n_calls: int,
    failed: int,
    unapplied: dict[str, int],
    load: dict[str, list[float]],
) -> list[Row]:
    def fig(name: str, scale: float = 1.0) -> Figure:
        return Figure.of([v * scale for v in results[name]])

    size = {
        "events": n_events,
        "partitions": PARTITIONS,
        "projections": list(PROJECTIONS),
        "cluster": {"source": chosen["cluster"][1], "url": mask_url(chosen["cluster"][0]), **facts},
        "node": {"source": chosen["node"][1], "url": mask_url(chosen["node"][0])},
        "failed": failed,
        "not_applied": unapplied,
        "load_average": load,
    }
    out: list[Row] = []
    for w in WORKERS:
        out.append(
            Row(
                "cluster",
                f"projection, {w} worker{'s' if w > 1 else ''}",
                "events/s",
                fig(f"cluster-project-{w}"),
                fig(f"node-project-{w}"),
                "the same, one node",
                extra=size,
            )
        )
    for w in WORKERS:
        out.append(
            Row(
                "cluster",
                f"raw loop, {w} process{'es' if w > 1 else ''}",
                "events/s",
                fig(f"cluster-raw-{w}"),
                fig(f"node-raw-{w}"),
                "the same loop, one node",
                extra=size,
            )
        )
    for kind, label in (("project", "workers"), ("raw", "raw loop")):
        cpu = {
            "replicas_cpu_us_per_event": Figure.of(results[f"cluster-{kind}-redis-replica"]).median,
            "busiest_master_share": Figure.of(results[f"cluster-{kind}-busiest-master"]).median,
        }
        for what, name, ceiling in (
            ("cpu", f"CPU per event, {label}", "the same, one node"),
            (
                "redis-master",
                f"Redis CPU per event, masters, {label}",
                "the one node's, same work",
            ),
        ):
            out.append(
                Row(
                    "cluster",
                    name,
                    "us",
                    fig(f"cluster-{kind}-{what}"),
                    fig(f"node-{kind}-{what}"),
                    ceiling,
                    better="lower",
                    extra={**size, **cpu},
                )
            )
    reads = {"calls": n_calls, **{k: size[k] for k in ("cluster", "node", "load_average")}}
    for what, label in (
        ("py-product", "get product {q}, Python API"),
        ("py-order", "get order {q}, Python API"),
        ("raw-order", "raw HGETALL (order) {q}"),
        ("http", "get order {q}, HTTP API"),
    ):
        for q in ("p50", "p99"):
            out.append(
                Row(
                    "cluster",
                    label.format(q=q),
                    "us",
                    fig(f"cluster-{what}-{q}", 1e6),
                    fig(f"node-{what}-{q}", 1e6),
                    f"the same, one node, {q}",
                    better="lower",
                    extra=reads,
                )
            )
    for shape, label in (("get", "get-by-id shape (GET + HGETALL)"), ("writes", "1,000 HSETs")):
        cluster = fig(f"trip-{shape}-cluster-p50", 1e6)
        out.append(
            Row(
                "cluster",
                f"packed trip, {label}, p50",
                "us",
                cluster,
                fig(f"trip-{shape}-node-p50", 1e6),
                "round_trip on one node",
                better="lower",
                extra=reads,
            )
        )
        for way, name in (
            ("sequential", "masters' parts one after another"),
            ("threads", "a thread per master"),
        ):
            out.append(
                Row(
                    "cluster",
                    f"packed trip, {label}, {name}, p50",
                    "us",
                    fig(f"trip-{shape}-{way}-p50", 1e6),
                    fig(f"trip-{shape}-sendall-p50", 1e6),
                    "every master sent before any is read (as cqrs.redisio), same code",
                    better="lower",
                    extra=reads,
                )
            )
    return out
