"""Command-line helpers every side's CLI shares: settings from the environment, the
metrics option, one line for a server that cannot be reached.

The root `cqrs` command itself lives in the composition (`cqrs.app.cli`), which mounts
each side's Typer app; the kernel imports none of them.
"""

from __future__ import annotations

from typing import Any, NoReturn

import typer
from pydantic import ValidationError

from cqrs.console import EXIT_USAGE, fail
from cqrs.settings import Settings
from cqrs.urls import mask_url


def load_settings() -> Settings:
    """Settings from the environment; a broken value is a one-line error, exit 2."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "CQRS_" + str(first["loc"][0]).upper() if first["loc"] else "settings"
        fail(f"invalid {name}: {first['msg'].removeprefix('Value error, ')}", EXIT_USAGE)


def metrics_port_option() -> Any:
    """`--metrics-port` for the long-running commands; unset = `CQRS_METRICS_PORT`."""
    return typer.Option(
        None,
        "--metrics-port",
        min=0,
        max=65535,
        envvar="CQRS_METRICS_PORT",
        show_default=False,
        help="Serve Prometheus metrics on this port (0 = off, the default).",
    )


def start_metrics_or_fail(settings: Settings, port: int | None) -> Any:
    """The process's `cqrs.metrics.Metrics`, or None when metrics are off; a port that
    cannot be bound is a one-line error."""
    from cqrs.metrics import start_metrics

    port = settings.metrics_port if port is None else port
    try:
        return start_metrics(port, settings.metrics_host)
    except OSError as exc:
        fail(f"cannot serve metrics on {settings.metrics_host}:{port}: {exc.strerror or exc}")


def unreachable_message(exc: BaseException) -> str | None:
    """One line for a server that cannot be reached or refuses our credentials, whatever
    command met it; None for any other exception (a bug: its traceback is wanted)."""
    import psycopg
    import redis
    import sqlalchemy.exc

    def url(name: str) -> str:
        try:
            value = getattr(Settings(), name)
        except ValidationError:
            value = None
        return f" at {mask_url(value)}" if value else ""

    if type(exc).__name__ == "EmbeddedError":  # cqrs.embedded, not imported for this
        return str(exc)
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis refused the credentials{url('redis_url')}: {exc}"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return f"cannot reach Redis{url('redis_url')}: {exc}"
    if isinstance(exc, redis.ResponseError) and ("NOAUTH" in str(exc) or "NOPERM" in str(exc)):
        return f"Redis refused{url('redis_url')}: {exc}"
    if isinstance(exc, redis.ResponseError) and "DB index is out of range" in str(exc):
        # Raised by the SELECT of the first connection, from whatever command met it.
        return (
            f"cannot use Redis{url('redis_url')}: the database index is out of range (the "
            "URL's /N must be below the server's `databases` setting, 16 by default)"
        )
    orig = getattr(exc, "orig", None) if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    if isinstance(exc, sqlalchemy.exc.OperationalError) or isinstance(
        orig, psycopg.OperationalError
    ):
        first = (str(orig).strip().splitlines() or [type(exc).__name__])[0]
        return f"cannot reach PostgreSQL{url('database_url')}: {first}"
    return None


def fail_unreachable(exc: BaseException) -> NoReturn:
    """Exit 1 with the one line `unreachable_message` gives for a server error (naming the
    masked URL), for commands that catch driver errors themselves; anything else is
    re-raised (a bug: its traceback is wanted)."""
    message = unreachable_message(exc)
    if message is None:
        raise exc
    fail(message)
