"""Settings from the environment (prefix `CQRS_`), one object passed to the wiring function.

Nothing connects at import time: `Settings()` only reads and validates values.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cqrs.urls import redis_url, sqlalchemy_url

# The namespace is the first segment of every key; braces would hijack Redis Cluster hash
# tags and ':' or '*' would make SCAN patterns ambiguous, so only a safe alphabet is allowed.
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class Settings(BaseSettings):
    """Every knob of the system; each has an environment variable `CQRS_<NAME>`."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore")

    database_url: str | None = Field(
        default=None,
        description="PostgreSQL, `postgresql://user:password@host:port/db` (the password is "
        "never printed); unset: the embedded server under `home` (pip extra `embedded`)",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis, `redis://host:port/db` or `rediss://` for TLS; unset: the embedded "
        "Valkey server under `home` (pip extra `embedded`)",
    )
    redis_cluster: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Redis Cluster mode: `auto` asks the node `redis_url` names (`INFO "
        "cluster`) and uses the cluster client when it says `cluster_enabled:1`; `on`/`off` "
        "force either mode (docs/scaling.md)",
    )
    database_connect_timeout: int = Field(
        default=5,
        ge=1,
        le=600,
        description="seconds to wait for PostgreSQL to answer a new connection before giving "
        "up (libpq `connect_timeout`; values below 2 count as 2)",
    )
    namespace: str = Field(
        default="cqrs",
        description="prefix of every Redis key; several systems can share one Redis",
    )
    home: Path = Field(
        default=Path(".cqrs"),
        description="directory of the embedded servers' data, logs and state",
    )

    # Streams: events are spread over a fixed number of partition streams by partition key
    # (see docs/architecture.md). Changing it on a live system re-maps aggregates, so it is
    # read once and stored with the streams.
    partitions: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="partition streams events are spread over (read once, then stored "
        "with the streams)",
    )
    stream_retention: int = Field(
        default=1_000_000,
        ge=0,
        description="approximate entries kept per partition stream (0 = keep everything)",
    )

    publish_on_commit: bool = Field(
        default=True, description="CLI writes publish their events right after commit"
    )
    commit_notify: Literal["auto", "in-transaction", "after-commit", "after-commit-sync"] = Field(
        default="auto",
        description="how a command wakes the relay: `auto` (in the transaction while it is "
        "the process's only command in flight, else after commit as `after-commit`), "
        "`in-transaction` (`pg_notify` in the "
        "command's statement; PostgreSQL then serialises concurrent commits), "
        "`after-commit` (a per-process background thread sends one NOTIFY per burst of "
        "commits on its own connection) or `after-commit-sync` (the same, sent by the "
        "committing thread before the command returns); after a commit, a process killed "
        "before its NOTIFY leaves the events to the relay's poll (docs/benchmarks.md, "
        "Round 2: commands)",
    )
    relay_batch_size: int = Field(
        default=2000, ge=1, le=10_000, description="events the relay publishes per pass"
    )
    relay_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="seconds the relay waits between passes when no commit woke it",
    )
    relay_audit_seconds: float = Field(
        default=5.0,
        gt=0,
        description="how often the active relay compares what each partition stream "
        "holds with what PostgreSQL says it published, and re-publishes from the log "
        "what Redis lost (also when it takes over and after every reconnect)",
    )

    projector_batch_size: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="stream entries a worker reads per batch from each partition it holds",
    )
    projector_batch_max: int = Field(
        default=5000,
        ge=1,
        le=100_000,
        description=(
            "most stream entries one batch reads over all the partitions a worker holds "
            "(each gets an equal share, at most projector_batch_size): a batch's time stays "
            "well inside the lease, which is renewed between batches"
        ),
    )
    projector_block_ms: int = Field(
        default=1000, ge=1, description="milliseconds an idle worker waits for new entries"
    )
    projector_retry_delay_ms: int = Field(
        default=200,
        ge=0,
        description="how long a failed entry waits before it is delivered again (on every path)",
    )
    projector_stuck_reads: int = Field(
        default=50,
        ge=1,
        description="reads in a row that applied, acknowledged and dead-lettered nothing "
        "before a worker backs off and reports itself stuck",
    )
    projector_lease_ms: int = Field(
        default=5_000,
        ge=500,
        description="TTL of a worker's lease on a (projection, partition); renewed while alive",
    )
    projector_max_deliveries: int = Field(
        default=5,
        ge=1,
        description="deliveries of a failing entry before it becomes a dead letter",
    )
    projector_failover_check_seconds: float = Field(
        default=5.0,
        gt=0,
        description="how often a worker asks the Redis masters for their replication ids; "
        "a new one (failover, restart without persistence) rebuilds the views from the "
        "log (also checked at start and after every reconnect)",
    )
    # Allocations between young-generation garbage collections in a worker process (0:
    # leave the interpreter's default of 700). A batch allocates and frees tens of
    # thousands of short-lived objects; at the default, collections cost the worker a
    # quarter of its CPU (docs/benchmarks.md).
    projector_gc_threshold: int = Field(
        default=50_000,
        ge=0,
        description="allocations between young-generation garbage collections in a worker "
        "(0: the interpreter's default)",
    )

    replay_lock_ms: int = Field(
        default=15_000, ge=1000, description="TTL of a replay's lock and pause flag (renewed)"
    )
    replay_grace_seconds: float = Field(
        default=2.0, ge=0, description="wait after a switch before deleting the old generation"
    )

    redis_socket_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a Redis reply may take before the call fails (kept above every "
        "blocking read)",
    )

    # The HTTP query server, per process (`cqrs serve`; docs/operations.md, "HTTP server
    # under load").
    http_max_waiters: int = Field(
        default=1000,
        ge=1,
        description="`?after=` read-your-writes waits one `cqrs serve` holds at once; beyond "
        "it: 503 busy with Retry-After",
    )
    http_redis_max_connections: int = Field(
        default=32,
        ge=2,
        description="Redis connections of one `cqrs serve` (requests and the waiters' one "
        "subscription share them)",
    )
    http_redis_pool_timeout: float = Field(
        default=5.0,
        gt=0,
        description="seconds a `cqrs serve` request waits for a free Redis connection "
        "before 503 busy with Retry-After",
    )
    http_access_log: bool = Field(
        default=False,
        description="`cqrs serve` logs one line per request (uvicorn's access log, at info); "
        "off by default: a line costs ~65-90 us, ~10% of a get-by-id over HTTP "
        "(docs/benchmarks.md)",
    )

    # Reads from replicas (docs/scaling.md, "Reads from replicas").
    read_from: Literal["primary", "replicas"] = Field(
        default="primary",
        description="where the query side (`cqrs query`, the Python API, `cqrs serve`) "
        "reads views: `primary`, or `replicas` (each primary's replicas, on one node or a "
        "cluster; read-your-writes still holds, the primary serves when no replica may)",
    )
    replica_max_lag: float = Field(
        default=2.0,
        gt=0,
        description="with `read_from=replicas`: a replica is skipped while its primary "
        "reports it not `online` or last heard from it more than this many seconds ago "
        "(`INFO replication` `lag`; a healthy replica reports every second)",
    )

    # Operations (docs/operations.md).
    stall_seconds: float = Field(
        default=30.0,
        gt=0,
        description="`cqrs status` calls a projection stalled when it has work waiting and "
        "no worker heartbeat or no progress for this long",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Prometheus metrics port (0 = off)"
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="address the metrics endpoint listens on"
    )
    log_format: Literal["text", "json"] = Field(
        default="text", description="log lines on stderr: `text` or `json` (one object a line)"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        default=None, description="unset: INFO for long-running commands, WARNING for others"
    )
    embedded_user: str | None = Field(
        default=None, description="OS user that runs embedded PostgreSQL when we are root"
    )

    # Start-up guards (cqrs/startup.py, docs/operations.md "Start-up").
    startup_timeout: float | None = Field(
        default=None,
        ge=0,
        description="seconds relay/project/run wait for Redis and PostgreSQL at start-up "
        "before exit 1; unset: no limit, but 5 s for --drain runs; 0: no limit",
    )
    allow_eviction: bool = Field(
        default=False,
        description="start even when Redis's maxmemory-policy may evict our keys (logged "
        "as an error); otherwise relay/project/run refuse to start (exit 2)",
    )
    eviction_check_seconds: float = Field(
        default=30.0, gt=0, description="how often running processes re-check the policy"
    )

    @field_validator("startup_timeout", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE_RE.match(value):
            raise ValueError("namespace must be 1-64 characters of letters, digits, '_', '.', '-'")
        return value

    @field_validator("redis_cluster", mode="before")
    @classmethod
    def _cluster_mode(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower() or "auto"
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off"}.get(
                value, value
            )
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    @field_validator("read_from", mode="before")
    @classmethod
    def _read_from(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower() or "primary"
            return {"replica": "replicas", "master": "primary"}.get(value, value)
        return value

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _case_insensitive(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            return (value.lower() if value.lower() in ("text", "json") else value.upper()) or None
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value:
            sqlalchemy_url(value)
        return value or None

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value:
            redis_url(value)
        return value or None


def settings_markdown() -> str:
    """docs/settings.md, generated from the model so the table never drifts from the code
    (tests/unit/test_settings_doc.py compares the two)."""
    lines = [
        "# Settings",
        "",
        "Every setting is read from an environment variable `CQRS_<NAME>` (or a root CLI",
        "option where one exists: `--log-format`, `--log-level`, `--metrics-port`).",
        "Generated from `cqrs/settings.py` by `python -m cqrs.settings --markdown`; do not edit",
        "by hand.",
        "",
        "| setting | environment variable | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `CQRS_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m cqrs.settings --markdown")
    sys.stdout.write(settings_markdown())
