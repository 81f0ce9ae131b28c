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
        default=None, description="postgresql://user@host:port/db; unset = embedded server"
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db or rediss://; unset = embedded server"
    )
    namespace: str = Field(default="cqrs", description="prefix of every Redis key")
    home: Path = Field(default=Path(".cqrs"), description="embedded servers' data and state")

    # Streams: events are spread over a fixed number of partition streams by partition key
    # (see docs/architecture.md). Changing it on a live system re-maps aggregates, so it is
    # read once and stored with the streams.
    partitions: int = Field(default=8, ge=1, le=1024)
    stream_retention: int = Field(
        default=1_000_000,
        ge=0,
        description="approximate entries kept per partition stream (0 = keep everything)",
    )

    publish_on_commit: bool = Field(
        default=True, description="CLI writes publish their events right after commit"
    )
    relay_batch_size: int = Field(default=2000, ge=1, le=10_000)
    relay_poll_seconds: float = Field(default=1.0, gt=0)

    projector_batch_size: int = Field(default=500, ge=1, le=10_000)
    projector_block_ms: int = Field(default=1000, ge=1)
    projector_claim_idle_ms: int = Field(default=10_000, ge=100)
    projector_lease_ms: int = Field(default=5_000, ge=500)
    projector_max_deliveries: int = Field(default=5, ge=1)
    # Allocations between young-generation garbage collections in a worker process (0:
    # leave the interpreter's default of 700). A batch allocates and frees tens of
    # thousands of short-lived objects; at the default, collections cost the worker a
    # quarter of its CPU (docs/benchmarks.md).
    projector_gc_threshold: int = Field(default=50_000, ge=0)

    replay_lock_ms: int = Field(
        default=15_000, ge=1000, description="TTL of a replay's lock and pause flag (renewed)"
    )
    replay_grace_seconds: float = Field(
        default=2.0, ge=0, description="wait after a switch before deleting the old generation"
    )

    redis_socket_timeout: float = Field(default=10.0, gt=0)

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
    log_format: Literal["text", "json"] = Field(default="text", description="text or json lines")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        default=None, description="unset: INFO for long-running commands, WARNING for others"
    )
    embedded_user: str | None = Field(
        default=None, description="OS user that runs embedded PostgreSQL when we are root"
    )

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str) -> str:
        if not _NAMESPACE_RE.match(value):
            raise ValueError("namespace must be 1-64 characters of letters, digits, '_', '.', '-'")
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
