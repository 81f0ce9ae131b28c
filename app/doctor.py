"""`cqrs doctor`: check the servers and settings against what the system relies on, and
say how to fix what is wrong. Exit 1 on any error; warnings do not fail.

It lives in the composition (cqrs.app) because it looks at every side: the write-side
schema version (cqrs.commands.migrations), the projections' streams and views; it only
reads, never changes anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis
import typer
from sqlalchemy.exc import SQLAlchemyError

from cqrs.cli import load_settings
from cqrs.commands.migrations import LATEST_VERSION, current_version
from cqrs.console import out, print_json
from cqrs.keys import KeyMap
from cqrs.redisio import is_cluster_client
from cqrs.settings import Settings
from cqrs.startup import judge_eviction_policy
from cqrs.streams import (
    parse_entry_id,
    partition_groups,
    stored_partitions,
    unfinished_repartition,
)
from cqrs.urls import mask_url
from cqrs.wiring import Wiring, make_engine

OK, WARNING, ERROR = "ok", "warning", "error"

MIN_VERSION = (6, 2)  # XAUTOCLAIM
FULL_VERSION = (7, 0)  # XINFO lag/entries-read, XAUTOCLAIM's deleted ids
SAMPLE_VIEWS = 20
FULL_COVERAGE = "cluster-require-full-coverage"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {k: mask_url(v) for k, v in asdict(self).items()}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _config(client: redis.Redis, name: str) -> str | None:
    """A CONFIG GET value, or None when the server (or our ACL user) refuses CONFIG."""
    try:
        return client.config_get(name).get(name)
    except redis.ResponseError:
        return None


def check_redis_version(info: dict[str, Any]) -> Check:
    server = "Valkey" if info.get("valkey_version") else "Redis"
    shown = info.get("valkey_version") or info.get("redis_version", "?")
    version = _version(str(info.get("redis_version", "0")))
    if version < MIN_VERSION:
        return Check(
            "redis version",
            ERROR,
            f"{server} {shown}: XAUTOCLAIM (crash recovery) needs Redis >= 6.2",
            "upgrade to Redis 7 or Valkey 7/8",
        )
    if version < FULL_VERSION:
        return Check(
            "redis version",
            WARNING,
            f"{server} {shown}: works, but without Redis 7 features we use when present: "
            "XINFO GROUPS lag/entries-read (status, trimming) and XAUTOCLAIM's list of deleted "
            "entries (pending entries whose stream entry was trimmed stay pending)",
            "upgrade to Redis 7 or Valkey 7/8",
        )
    return Check("redis version", OK, f"{server} {shown} (>= 7: XAUTOCLAIM, XINFO lag)")


def check_eviction(client: redis.Redis, keys: KeyMap, info: dict[str, Any]) -> Check:
    policy = _config(client, "maxmemory-policy") or info.get("maxmemory_policy")
    maxmemory = int(info.get("maxmemory") or 0)
    used = int(info.get("used_memory") or 0)
    sizes = _bytes_per_view(client, keys)
    measured = ", ".join(f"{name} ~{size} B per view" for name, size in sizes.items())
    budget = (
        f"used memory {used / 2**20:.1f} MiB"
        + (f"; {measured}" if measured else "")
        + "; size maxmemory for the streams plus two copies of the largest projection "
        "(a replay builds the new generation beside the live one), e.g. at least "
        f"{max(2 * used, 64 * 2**20) / 2**20:.0f} MiB now"
    )
    # The rule is the kernel's (the relay and the workers refuse to start on its errors);
    # doctor adds what only it measures: the memory budget.
    verdict = judge_eviction_policy(policy, maxmemory)
    if policy is None:
        return Check("maxmemory-policy", verdict.status, verdict.detail, verdict.fix)
    if verdict.status == OK:
        return Check("maxmemory-policy", OK, f"{verdict.detail}; {budget}")
    return Check("maxmemory-policy", verdict.status, verdict.detail, f"{verdict.fix}; {budget}")


def _bytes_per_view(client: redis.Redis, keys: KeyMap) -> dict[str, int]:
    """Average MEMORY USAGE of a few live view hashes per projection."""
    from cqrs.contracts import registered_contracts

    # Every registered projection's served views (`<prefix>:<kind>:{<id>}`, the layout
    # every contract's views share: `ViewKeys.tagged`).
    samples = {
        name: lambda v, kinds=sorted(contract.view_kinds()): v.tagged(kinds[0], "*")
        for name, contract in registered_contracts().items()
    }
    sizes: dict[str, int] = {}
    for name, pattern in samples.items():
        generation = int(client.get(keys.generation(name)) or 0)
        if not generation:
            continue
        found: list[str] = []
        for key in client.scan_iter(match=pattern(keys.views(name, generation)), count=500):
            found.append(key)
            if len(found) >= SAMPLE_VIEWS:
                break
        if not found:
            continue
        try:
            pipe = client.pipeline(transaction=False)
            for key in found:
                pipe.memory_usage(key)
            usage = [u for u in pipe.execute() if u]
        except redis.ResponseError:
            continue  # MEMORY refused by ACL
        if usage:
            sizes[name] = sum(usage) // len(usage)
    return sizes


def check_persistence(client: redis.Redis, info: dict[str, Any]) -> Check:
    aof = str(info.get("aof_enabled", "0")) == "1"
    save = _config(client, "save")
    rdb = bool(save and save.strip())
    if aof:
        return Check("persistence", OK, "AOF on" + (f", RDB snapshots '{save}'" if rdb else ""))
    if rdb:
        return Check(
            "persistence",
            WARNING,
            f"RDB snapshots only ('{save}'): a crash loses the writes since the last snapshot; "
            "the workers then rebuild the views from the PostgreSQL log (no data lost, but "
            "views are missing or stale until the rebuild is done)",
            "CONFIG SET appendonly yes (and in redis.conf) for restarts without a rebuild",
        )
    return Check(
        "persistence",
        WARNING,
        "no AOF and no RDB"
        + (" (save unknown: CONFIG refused)" if save is None else "")
        + ": a restart loses every view and stream; the workers rebuild them from the "
        "PostgreSQL log (no data lost, but views are missing until the rebuild is done)",
        "CONFIG SET appendonly yes (and in redis.conf)",
    )


def check_streams(client: redis.Redis, keys: KeyMap, settings: Settings) -> list[Check]:
    """Retention vs. the oldest entry each group has not finished: trimming must never cut
    entries a consumer group has not read (or still has pending)."""
    from cqrs.projector.registry import PROJECTIONS  # names only; doctor imports no worker code

    checks: list[Check] = []
    stored = stored_partitions(client, keys)
    partitions = stored or settings.partitions
    unfinished = unfinished_repartition(client, keys)
    if unfinished is not None:
        checks.append(
            Check(
                "partitions",
                WARNING,
                f"a repartition to {unfinished} partitions did not finish: workers rebuild "
                "from the log the views it had not rebuilt yet (the old ones serve meanwhile)",
                f"cqrs repartition {unfinished} --yes (finishes it)",
            )
        )
    elif stored and stored != settings.partitions:
        checks.append(
            Check(
                "partitions",
                WARNING,
                f"CQRS_PARTITIONS={settings.partitions} but the streams have {stored} "
                "partitions; the stored count is used",
                f"set CQRS_PARTITIONS={stored}, or change the count with "
                f"`cqrs repartition {settings.partitions}` (docs/scaling.md)",
            )
        )
    retention = settings.stream_retention
    cut: list[str] = []
    near: list[str] = []
    for name in PROJECTIONS:
        for row in partition_groups(client, keys, name, partitions):
            if not row.exists:
                continue
            first = parse_entry_id(row.first_entry_id) if row.first_entry_id else None
            pending_trimmed = False
            if row.pending and first is not None:
                summary = client.xpending(keys.stream(row.partition), name)
                if summary.get("min") and parse_entry_id(summary["min"]) < first:
                    pending_trimmed = True
            # No group at all: the projection has never run here; a worker builds it
            # from the PostgreSQL log first, so nothing trimmed is lost to it.
            if not row.has_group:
                continue
            if row.lag > row.length or pending_trimmed:
                cut.append(f"{name} on partition {row.partition}")
            elif retention and row.lag + row.pending > retention // 2:
                near.append(f"{name} p{row.partition}: {row.lag + row.pending} unapplied")
    if cut:
        checks.append(
            Check(
                "stream retention",
                ERROR,
                "entries were trimmed before a consumer group read or acknowledged them: "
                + ", ".join(cut[:5])
                + ("..." if len(cut) > 5 else ""),
                "rebuild the affected projections from the log: cqrs replay NAME --from log "
                "--yes (the relay trims only below every group's position; something else "
                "trimmed these streams, or a group was created after a trim)",
            )
        )
    elif near:
        checks.append(
            Check(
                "stream retention",
                WARNING,
                f"groups far behind (retention {retention} per partition): "
                + ", ".join(near[:5])
                + "; the relay will not trim past them, so these streams grow beyond retention",
                "start or scale the projector (cqrs status shows who is stalled)",
            )
        )
    else:
        kept = "everything (CQRS_STREAM_RETENTION=0)" if not retention else f"~{retention}"
        checks.append(
            Check(
                "stream retention",
                OK,
                f"keeping {kept} entries per partition; no group has unread entries trimmed",
            )
        )
    return checks


def check_dead_letters(client: redis.Redis, keys: KeyMap) -> Check:
    from cqrs.projector.registry import PROJECTIONS

    pipe = client.pipeline(transaction=False)
    for name in PROJECTIONS:
        pipe.xlen(keys.dead_letters(name))
    counts = dict(zip(PROJECTIONS, pipe.execute(), strict=True))
    waiting = {n: c for n, c in counts.items() if c}
    if waiting:
        listed = ", ".join(f"{n}: {c}" for n, c in waiting.items())
        first = next(iter(waiting))
        return Check(
            "dead letters",
            WARNING,
            f"events no view reflects yet ({listed})",
            f"inspect with cqrs dlq list -p {first}; fix the cause, then cqrs dlq retry "
            f"-p {first} --all",
        )
    return Check("dead letters", OK, "none")


def check_cluster(client: Any) -> list[Check]:
    """A Redis Cluster's shape, and the settings that put the views at risk: slots not
    covered (some views unreadable), masters without a replica (a dead master's views and
    streams are gone until rebuilt from PostgreSQL), `cluster-require-full-coverage no`
    (a cluster missing slots serves some views and not others), an evicting master."""
    node = client.get_redis_connection(client.get_default_node())
    info = dict(
        line.split(":", 1)
        for line in str(node.execute_command("CLUSTER", "INFO")).splitlines()
        if ":" in line
    )
    shards = node.execute_command("CLUSTER", "SHARDS")
    masters, bare, replicas = 0, 0, 0
    for shard in shards:
        nodes = shard["nodes"] if isinstance(shard, dict) else []
        # A replica whose replication offset is still 0 says "loading" (a fresh cluster
        # before its first write): it is there and linked, so it counts; a failed one not.
        live = [n for n in nodes if n.get("health") in ("online", "loading")]
        if any(n.get("role") == "master" and n.get("health") == "online" for n in live):
            masters += 1
            shard_replicas = sum(1 for n in live if n.get("role") == "replica")
            replicas += shard_replicas
            bare += not shard_replicas
    covered = int(info.get("cluster_slots_ok", "0").strip() or 0)
    state = info.get("cluster_state", "?").strip()
    summary = (
        f"{masters} master(s), {replicas} replica(s), {covered} of 16384 slots covered, "
        f"cluster_state:{state}"
    )
    checks: list[Check] = []
    if state != "ok" or covered < 16384:
        checks.append(
            Check(
                "redis cluster",
                ERROR,
                summary,
                "assign every slot to a live master (CLUSTER ADDSLOTS, or fail over)",
            )
        )
    elif bare:
        checks.append(
            Check(
                "redis cluster",
                WARNING,
                f"{summary}; {bare} master(s) without a replica: if one dies, its views and "
                "streams are unavailable until rebuilt from PostgreSQL",
                "give every master at least one replica (CLUSTER REPLICATE)",
            )
        )
    else:
        checks.append(Check("redis cluster", OK, summary))
    coverage = {
        n.name: (client.get_redis_connection(n).config_get("cluster-require-full-coverage"))
        for n in client.get_primaries()
    }
    partial = [name for name, got in coverage.items() if got.get(FULL_COVERAGE) == "no"]
    if partial:
        checks.append(
            Check(
                "cluster coverage",
                WARNING,
                f"cluster-require-full-coverage no on {', '.join(partial)}: with slots "
                "missing, some views are served and others not",
                "CONFIG SET cluster-require-full-coverage yes (and in redis.conf)",
            )
        )
    evicting = []
    for n in client.get_primaries():
        policy = _config(client.get_redis_connection(n), "maxmemory-policy")
        if policy is not None and judge_eviction_policy(policy, 1).status == ERROR:
            evicting.append(f"{n.name} ({policy})")
    if evicting:
        checks.append(
            Check(
                "cluster eviction",
                ERROR,
                f"masters that may evict our keys: {', '.join(evicting)}",
                "CONFIG SET maxmemory-policy noeviction on every master (and in redis.conf)",
            )
        )
    return checks


def check_redis(client: redis.Redis, keys: KeyMap, settings: Settings, url: str) -> list[Check]:
    try:
        client.ping()
        info = client.info()
    except redis.AuthenticationError as exc:
        return [
            Check(
                "redis",
                ERROR,
                f"{mask_url(url)}: authentication failed ({exc})",
                "check the user and password in CQRS_REDIS_URL (redis://user:password@host)",
            )
        ]
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return [
            Check(
                "redis",
                ERROR,
                f"cannot reach {mask_url(url)}: {exc}",
                "start Redis or fix CQRS_REDIS_URL (rediss:// for TLS)",
            )
        ]
    checks = [Check("redis", OK, f"{mask_url(url)} answers")]
    checks.append(check_redis_version(info))
    if is_cluster_client(client):
        checks += check_cluster(client)
    checks.append(check_eviction(client, keys, info))
    checks.append(check_persistence(client, info))
    checks += check_streams(client, keys, settings)
    checks.append(check_dead_letters(client, keys))
    return checks


def check_postgres(database_url: str) -> list[Check]:
    engine = make_engine(database_url, pool_size=1)
    try:
        version = current_version(engine)
        with engine.connect() as conn:
            server = conn.exec_driver_sql("SHOW server_version").scalar()
    except SQLAlchemyError as exc:
        orig = getattr(exc, "orig", None) or exc
        first = (str(orig).strip().splitlines() or [type(exc).__name__])[0]
        return [
            Check(
                "postgresql",
                ERROR,
                f"cannot reach {mask_url(database_url)}: {first}",
                "start PostgreSQL or fix CQRS_DATABASE_URL (add ?sslmode=require for TLS)",
            )
        ]
    finally:
        engine.dispose()
    checks = [Check("postgresql", OK, f"{mask_url(database_url)} answers (PostgreSQL {server})")]
    if version < LATEST_VERSION:
        checks.append(
            Check(
                "schema",
                WARNING,
                f"schema version {version}, this code expects {LATEST_VERSION}",
                "cqrs db upgrade (every command also upgrades on first use)",
            )
        )
    elif version > LATEST_VERSION:
        checks.append(
            Check(
                "schema",
                ERROR,
                f"schema version {version} is newer than this code ({LATEST_VERSION})",
                "run the release that migrated the database",
            )
        )
    else:
        checks.append(Check("schema", OK, f"version {version} (latest)"))
    return checks


def run_checks(
    settings: Settings, database_url: str, redis_url: str, client: redis.Redis
) -> list[Check]:
    keys = KeyMap(settings.namespace)
    return check_redis(client, keys, settings, redis_url) + check_postgres(database_url)


def doctor_command(
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Check Redis (version, eviction policy, persistence, stream retention) and PostgreSQL
    (reachable, schema version), each with how to fix it; exit 1 on any error."""
    wiring = Wiring(load_settings())
    try:
        checks = run_checks(wiring.settings, wiring.database_url, wiring.redis_url, wiring.redis)
    finally:
        wiring.close()
    failed = any(c.status == ERROR for c in checks)
    if json_output:
        print_json({"ok": not failed, "checks": [c.as_json() for c in checks]})
    else:
        from rich.text import Text

        style = {ERROR: "bold red", WARNING: "yellow"}
        for check in checks:
            line = Text(f"{check.status:<7} ", style=style.get(check.status, "green"))
            line.append(mask_url(f"{check.name}: {check.detail}"))
            out.print(line)
            if check.fix and check.status != "ok":
                out.print(Text(mask_url(f"        fix: {check.fix}"), style="dim"))
        errors = sum(c.status == ERROR for c in checks)
        warnings = sum(c.status == WARNING for c in checks)
        out.print(f"{errors} error(s), {warnings} warning(s)")
    if failed:
        raise typer.Exit(1)
