"""`cqrs status`: how far behind each projection is, whether anyone is working on it, and
how much the relay has not published yet.

Everything about projections comes from Redis in a few pipelined round trips: the live
generation and recorded version (projector/state.py), the partition streams and the
projection's consumer group on each (lag, pending), the oldest entry not yet applied
(XPENDING summary min id for pending entries, the first entry after the group's
last-delivered id for undelivered ones; entry ids carry their XADD time in ms), the
consumers (XINFO CONSUMERS: pending and idle time), the worker heartbeats
(`<ns>:workers:<projection>`), the dead letters (XLEN) and the progress record the
worker writes after every acknowledged batch (`<ns>:progress:<projection>`).

The relay part (unpublished events, the age of the oldest) is the only thing that needs
PostgreSQL; when it cannot be reached, that is reported, not raised. Plain SQL here:
projector/ does not import commands/.

States:
- "rebuilding": a replay holds the projection's lock or paused it, or it has no valid
  views yet (never built, version bumped, or Redis lost its data), which a worker builds;
- "broken": the views are recorded as built (`<ns>:state:<projection>`), but the key
  queries read the live generation from (`<ns>:gen:<projection>`) is missing or names
  another generation. Workers go on writing the recorded generation, queries read the
  other one, and nothing repairs this on its own (an evicted key, or a switch that died
  between its two writes): the reason says which and what to run;
- "caught up": nothing undelivered and nothing pending;
- "stalled": work is waiting and no worker heartbeat is fresher than
  `CQRS_STALL_SECONDS`, or nothing was applied for that long while the oldest waiting
  entry is older than that;
- "behind": work is waiting and a worker is making progress.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
import redis

from cqrs.health import OUTBOX_BACKLOG_SQL
from cqrs.keys import KeyMap
from cqrs.metrics import Gauge
from cqrs.projector.projection import Projection
from cqrs.redisio import is_cluster_client
from cqrs.settings import Settings
from cqrs.streams import PartitionGroup, parse_entry_id, partition_groups
from cqrs.urls import libpq_url, mask_url

CAUGHT_UP, BEHIND, REBUILDING, STALLED = "caught up", "behind", "rebuilding", "stalled"
BROKEN = "broken"


@dataclass
class ConsumerStatus:
    name: str
    pending: int = 0
    idle_seconds: float | None = None  # since its last read/claim (XINFO CONSUMERS idle)
    heartbeat_age_seconds: float | None = None  # None: no heartbeat recorded


@dataclass
class PartitionStatus:
    partition: int
    length: int
    lag: int
    pending: int


@dataclass
class ProjectionStatus:
    name: str
    state: str
    generation: int
    version: int | None  # the version that built the live views
    code_version: int
    stream_length: int
    lag: int
    pending: int
    oldest_pending_age_seconds: float | None
    oldest_unapplied_age_seconds: float | None
    dead_letters: int
    last_position: int | None
    last_applied_age_seconds: float | None
    live_workers: int
    consumers: list[ConsumerStatus] = field(default_factory=list)
    partitions: list[PartitionStatus] = field(default_factory=list)
    reason: str = ""

    @property
    def unapplied(self) -> int:
        return self.lag + self.pending


@dataclass
class RelayStatus:
    reachable: bool
    unpublished: int | None = None
    oldest_age_seconds: float | None = None
    error: str | None = None


@dataclass
class SystemStatus:
    namespace: str
    stall_seconds: float
    projections: list[ProjectionStatus]
    relay: RelayStatus | None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["projections"] = {p["name"]: p for p in data["projections"]}
        for name, p in data["projections"].items():
            p.pop("name")
            p["unapplied"] = self.by_name(name).unapplied
        return data

    def by_name(self, name: str) -> ProjectionStatus:
        return next(p for p in self.projections if p.name == name)

    def violations(self, max_lag: int | None, max_age: float | None) -> list[str]:
        """Why a health check with these thresholds fails; empty when it passes."""
        found: list[str] = []
        for p in self.projections:
            if p.state == BROKEN and (max_lag is not None or max_age is not None):
                found.append(f"{p.name}: {p.reason}")
            if max_lag is not None and p.unapplied > max_lag:
                found.append(
                    f"{p.name}: {p.unapplied} entries not applied "
                    f"(lag {p.lag} + pending {p.pending}) > --max-lag {max_lag}"
                )
            age = p.oldest_unapplied_age_seconds
            if max_age is not None and age is not None and age > max_age:
                found.append(f"{p.name}: oldest unapplied entry is {age:.1f}s old > {max_age:g}s")
        relay = self.relay
        if relay is not None and (max_lag is not None or max_age is not None):
            if not relay.reachable:
                found.append(f"relay: cannot check the outbox: {relay.error}")
            else:
                if max_lag is not None and (relay.unpublished or 0) > max_lag:
                    found.append(f"relay: {relay.unpublished} unpublished > --max-lag {max_lag}")
                age = relay.oldest_age_seconds
                if max_age is not None and age is not None and age > max_age:
                    found.append(
                        f"relay: oldest unpublished event is {age:.1f}s old > {max_age:g}s"
                    )
        return found


def _entry_ms(entry_id: str | None) -> int | None:
    return parse_entry_id(entry_id)[0] if entry_id else None


def _age(now_ms: float, then_ms: float | None) -> float | None:
    return None if then_ms is None else round(max(now_ms - then_ms, 0) / 1000, 3)


def projection_status(
    client: redis.Redis,
    keys: KeyMap,
    settings: Settings,
    projection: Projection,
    partitions: int,
) -> ProjectionStatus:
    name = projection.name
    # A cluster pipeline refuses keyless commands (TIME): there it is asked on its own.
    cluster = is_cluster_client(client)
    pipe = client.pipeline(transaction=False)
    if not cluster:
        pipe.time()
    pipe.get(keys.generation(name))
    pipe.hgetall(keys.projection_state(name))
    pipe.exists(keys.replay_lock(name))
    pipe.pttl(keys.pause(name))
    pipe.zrange(keys.workers(name), 0, -1, withscores=True)
    pipe.xlen(keys.dead_letters(name))
    pipe.hgetall(keys.progress(name))
    pipe.get(keys.repair(name))
    replies = pipe.execute()
    server_time = client.time() if cluster else replies.pop(0)
    generation, state, replaying, pause_ms, beats, dead, progress, repair = replies
    local_ms = time.time() * 1000  # heartbeats and progress carry the workers' clocks
    redis_ms = server_time[0] * 1000 + server_time[1] / 1000  # entry ids carry Redis's

    rows = partition_groups(client, keys, name, partitions)
    oldest_pending, oldest_unapplied, consumers = _waiting_work(client, keys, name, rows)

    stall_ms = settings.stall_seconds * 1000
    beats_by_name = {member: score for member, score in beats}
    fresh = [m for m, score in beats if local_ms - score <= stall_ms]
    merged: dict[str, ConsumerStatus] = {}
    for consumer in consumers:
        row = merged.setdefault(consumer["name"], ConsumerStatus(consumer["name"]))
        row.pending += int(consumer["pending"])
        idle = int(consumer["idle"]) / 1000
        row.idle_seconds = idle if row.idle_seconds is None else min(row.idle_seconds, idle)
    for member, score in beats_by_name.items():
        merged.setdefault(member, ConsumerStatus(member)).heartbeat_age_seconds = _age(
            local_ms, score
        )
    # Consumers of long-gone workers stay in XINFO CONSUMERS; show only those that still
    # heartbeat or still hold entries.
    shown = sorted(
        (c for c in merged.values() if c.heartbeat_age_seconds is not None or c.pending),
        key=lambda c: c.name,
    )

    lag = sum(r.lag for r in rows)
    pending = sum(r.pending for r in rows)
    at_ms = int(progress["at_ms"]) if progress.get("at_ms") else None
    progress_age = _age(local_ms, at_ms)
    unapplied_age = _age(redis_ms, oldest_unapplied)
    recorded_version = int(state["version"]) if state.get("version") else None

    status, reason = _setup_state(
        keys,
        projection,
        served=int(generation or 0),
        recorded=int(state["generation"]) if state.get("generation") else 0,
        recorded_version=recorded_version,
        replaying=bool(replaying),
        pause_ms=int(pause_ms),
        repair=repair,
    )
    # Rebuilding or broken (`status` set): lag and stalls say nothing more about it.
    stuck = progress.get("stuck")
    if not status and stuck and progress.get("stuck_consumer") in fresh:
        # A live worker's busy-loop guard tripped (projector.worker: `_check_progress`);
        # the record of a worker that died since is left out with the worker.
        status = STALLED
        reason = f"worker {progress['stuck_consumer']} is backing off: {stuck}"
    elif not status and lag == 0 and pending == 0:
        status = CAUGHT_UP
    elif not status:
        quiet = min(
            progress_age if progress_age is not None else math.inf,
            unapplied_age if unapplied_age is not None else math.inf,
        )
        if not fresh:
            status = STALLED
            reason = (
                f"work is waiting and no worker heartbeat in the last {settings.stall_seconds:g}s"
            )
        elif quiet * 1000 > stall_ms:
            status = STALLED
            reason = (
                f"work is waiting and nothing was applied for over {settings.stall_seconds:g}s"
                f" although {len(fresh)} worker(s) heartbeat"
            )
        else:
            status = BEHIND
    if recorded_version is not None and recorded_version > projection.version and not reason:
        reason = (
            f"views built by a newer release (version {recorded_version}; this code is "
            f"version {projection.version}): workers of this release leave them alone"
        )
    return ProjectionStatus(
        name=name,
        state=status,
        generation=int(generation or 0),
        version=recorded_version,
        code_version=projection.version,
        stream_length=sum(r.length for r in rows),
        lag=lag,
        pending=pending,
        oldest_pending_age_seconds=_age(redis_ms, oldest_pending),
        oldest_unapplied_age_seconds=unapplied_age,
        dead_letters=int(dead),
        last_position=int(progress["position"]) if progress.get("position") else None,
        last_applied_age_seconds=progress_age,
        live_workers=len(fresh),
        consumers=shown,
        partitions=[PartitionStatus(r.partition, r.length, r.lag, r.pending) for r in rows],
        reason=reason,
    )


def _setup_state(
    keys: KeyMap,
    projection: Projection,
    *,
    served: int,
    recorded: int,
    recorded_version: int | None,
    replaying: bool,
    pause_ms: int,
    repair: str | None = None,
) -> tuple[str, str]:
    """("rebuilding" or "broken", why) when the projection's views are not in their live
    state, else ("", ""). Each reason says what is missing and what will happen, as the
    worker (`projector.worker.Worker._apply_status`) and the replay actually behave.

    `served`: the generation queries read (`<ns>:gen:<projection>`, 0 when missing);
    `recorded`: the generation the state hash records, which live workers write (0: none);
    `pause_ms`: PTTL of the pause flag (negative when absent); `repair`: the failover
    repair flag (`projector.repair`), None when absent."""
    name, code = projection.name, projection.version
    gen_key, state_key = keys.generation(name), keys.projection_state(name)
    if repair is not None:
        doing = "a replay is rebuilding it now" if replaying else "a worker rebuilds it"
        return REBUILDING, (
            f"a Redis master's history changed (failover or restart without its data: {repair}),"
            f" so views may miss acknowledged updates: {doing} from the log; generation "
            f"{served} keeps serving, without new events, until the switch"
        )
    if replaying:
        serving = (
            f"generation {served} keeps serving meanwhile"
            if served and served == recorded
            else "no views are served until it switches"
        )
        if pause_ms >= 0:
            return REBUILDING, (
                "a replay is switching to its new generation (live workers stepped aside)"
            )
        return REBUILDING, f"a replay is building a new generation; {serving}"
    if pause_ms >= 0:
        return REBUILDING, (
            "paused for a generation switch, but no replay holds the lock (it stopped): "
            f"the pause expires within {pause_ms / 1000:.1f}s and workers resume"
        )
    if not recorded:
        left = f"; queries still read generation {served} ({gen_key}) until then" if served else ""
        return REBUILDING, (
            f"no views recorded ({state_key} is missing: never built, or Redis lost it): "
            f"a worker started with a database builds them from history{left}"
        )
    if recorded_version is not None and recorded_version < code:
        return REBUILDING, (
            f"views built by version {recorded_version}, the code is version {code}: a "
            "worker rebuilds them from history; the old views serve, without new events, "
            "until the switch"
        )
    if recorded_version is None:
        return REBUILDING, (
            f"{state_key} records generation {recorded} but no version: a worker rebuilds "
            "the views from history"
        )
    if served == recorded:
        return "", ""
    if not served:
        return BROKEN, (
            f"no live generation: {gen_key} is missing, so queries find no views, while "
            f"workers keep generation {recorded} ({state_key}) up to date; a live worker "
            f"restores it from {state_key} at its next read (or `cqrs replay {name}` "
            "rebuilds the views and writes it again)"
        )
    remedy = (
        f"nothing restores it on its own: `cqrs replay {name}` rebuilds the views and "
        "writes it again"
    )
    return BROKEN, (
        f"queries read generation {served} ({gen_key}) but workers write generation "
        f"{recorded} ({state_key}); {remedy}"
    )


def _waiting_work(
    client: redis.Redis, keys: KeyMap, group: str, rows: list[PartitionGroup]
) -> tuple[int | None, int | None, list[dict[str, Any]]]:
    """(ms of the oldest pending entry, ms of the oldest entry not applied yet, the
    group's consumers over every partition), in one pipelined round trip."""
    pipe = client.pipeline(transaction=False)
    asks: list[tuple[str, PartitionGroup]] = []
    # Without a group on a partition, everything in its stream is undelivered.
    undelivered = [_entry_ms(r.first_entry_id) for r in rows if r.exists and not r.has_group]
    firsts = [ms for ms in undelivered if ms is not None]
    oldest: int | None = min(firsts) if firsts else None
    for row in rows:
        stream = keys.stream(row.partition)
        if not row.exists or not row.has_group:
            continue
        pipe.xinfo_consumers(stream, group)
        asks.append(("consumers", row))
        if row.pending:
            pipe.xpending(stream, group)
            asks.append(("pending", row))
        if row.lag:
            pipe.xrange(stream, f"({row.last_delivered_id}", "+", count=1)
            asks.append(("next", row))
    results = pipe.execute(raise_on_error=False) if len(pipe) else []
    oldest_pending: int | None = None
    consumers: list[dict[str, Any]] = []
    for (kind, _row), result in zip(asks, results, strict=True):
        if isinstance(result, Exception):
            continue  # the stream or group went away meanwhile
        ms: int | None = None
        if kind == "consumers":
            consumers += result
        elif kind == "pending":
            ms = _entry_ms(result.get("min"))
            if ms is not None:
                oldest_pending = ms if oldest_pending is None else min(oldest_pending, ms)
        elif kind == "next" and result:
            ms = _entry_ms(result[0][0])
        if ms is not None:
            oldest = ms if oldest is None else min(oldest, ms)
    return oldest_pending, oldest, consumers


def relay_status(database_url: str | None) -> RelayStatus:
    """Unpublished events and the age of the oldest, by plain SQL; never raises."""
    if not database_url:
        return RelayStatus(False, error="no database configured (CQRS_DATABASE_URL)")
    try:
        with psycopg.connect(libpq_url(database_url), connect_timeout=3) as conn:
            count, age = conn.execute(OUTBOX_BACKLOG_SQL).fetchone()
    except psycopg.errors.UndefinedTable:
        return RelayStatus(False, error="the write-side schema does not exist (cqrs db upgrade)")
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return RelayStatus(False, error=mask_url(f"cannot reach PostgreSQL: {first}"))
    return RelayStatus(
        True,
        unpublished=int(count),
        oldest_age_seconds=None if age is None else round(max(float(age), 0.0), 3),
    )


def collect_status(
    client: redis.Redis,
    settings: Settings,
    projections: list[Projection],
    *,
    database_url: str | None = None,
    include_relay: bool = True,
) -> SystemStatus:
    keys = KeyMap(settings.namespace)
    partitions = int(client.hget(keys.meta(), "partitions") or settings.partitions)
    return SystemStatus(
        namespace=settings.namespace,
        stall_seconds=settings.stall_seconds,
        projections=[projection_status(client, keys, settings, p, partitions) for p in projections],
        relay=relay_status(database_url) if include_relay else None,
    )


def projection_gauges(
    client: redis.Redis, settings: Settings, projections: list[Projection]
) -> list[Gauge]:
    """The projection part of `cqrs status` as Prometheus gauges (computed per scrape)."""
    keys = KeyMap(settings.namespace)
    partitions = int(client.hget(keys.meta(), "partitions") or settings.partitions)
    gauges: list[Gauge] = []
    for projection in projections:
        p = projection_status(client, keys, settings, projection, partitions)
        labels = {"projection": p.name}
        gauges += [
            Gauge("cqrs_projection_lag", "Entries not yet delivered", p.lag, labels),
            Gauge("cqrs_projection_pending", "Not acknowledged", p.pending, labels),
            Gauge(
                "cqrs_projection_oldest_unapplied_seconds",
                "Age of the oldest entry not applied yet (0 when caught up)",
                p.oldest_unapplied_age_seconds or 0.0,
                labels,
            ),
            Gauge(
                "cqrs_projection_last_applied_seconds",
                "Seconds since a worker last acknowledged a batch (-1: never)",
                -1.0 if p.last_applied_age_seconds is None else p.last_applied_age_seconds,
                labels,
            ),
            Gauge(
                "cqrs_dead_letter_entries", "Entries in the dead letters", p.dead_letters, labels
            ),
            Gauge(
                "cqrs_projection_workers", "Workers with a fresh heartbeat", p.live_workers, labels
            ),
            Gauge("cqrs_projection_stalled", "1 when stalled", float(p.state == STALLED), labels),
            Gauge(
                "cqrs_projection_broken",
                "1 when queries cannot find the views workers keep (see cqrs status)",
                float(p.state == BROKEN),
                labels,
            ),
            Gauge(
                "cqrs_projection_rebuilding",
                "1 when rebuilding",
                float(p.state == REBUILDING),
                labels,
            ),
        ]
    return gauges
