"""Small test utilities shared by every test package: waiting (on a condition, or on the
projector's `applied` notification), running the CLI as a user would, free loopback ports.

Long-running processes a test starts (and must always kill) are in `tests.procs`; the one
seeded command workload is `bench.workload` (tests and benchmarks both run from the
repository root, so tests import it rather than keep a copy).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import psycopg
import redis

from cqrs.keys import KeyMap
from cqrs.redisio import Subscription
from cqrs.settings import Settings
from cqrs.urls import libpq_url

T = TypeVar("T")

# How often `wait_applied` re-checks without a notification: the net for a notification
# lost while Redis restarts, or for a change no projector announces (a group's lag).
APPLIED_RECHECK = 0.5


class HasViews(Protocol):
    """What `wait_applied` needs: a wiring, or anything shaped like one (a test with a
    private Redis builds its own)."""

    @property
    def redis(self) -> redis.Redis: ...

    @property
    def keys(self) -> KeyMap: ...

    @property
    def settings(self) -> Settings: ...


def wait_until(
    condition: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll `condition` until it returns something truthy; fail with `what` at the deadline.

    For what the projector does, prefer `wait_applied`: it wakes on the projector's own
    notification instead of polling."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def wait_applied(
    wiring: HasViews,
    token_or_condition: str | Callable[[], T],
    timeout: float = 30.0,
    *,
    what: str = "",
) -> T | bool:
    """Wait until the views reflect something: a consistency token (every projection has
    applied the write behind it) or a condition (returns something truthy, returned here).

    Subscribes to `<ns>:applied` (the channel every projector batch and replay switch
    publishes to) before the first check, then re-checks on each notification: no write is
    missed between a check and the wait, and the test neither sleeps longer than needed nor
    spins on a 2-5 ms poll that competes with the processes it waits for. Re-checks every
    `APPLIED_RECHECK` seconds as well (a notification lost while Redis restarts).
    """
    if isinstance(token_or_condition, str):
        from cqrs.queries.service import QueryService

        service = QueryService(wiring.redis, wiring.keys, partitions=wiring.settings.partitions)
        token = token_or_condition

        def condition() -> Any:
            return not service.behind(token)

        what = what or f"the views to apply token {token[:24]}..."
    else:
        condition = token_or_condition
    deadline = time.monotonic() + timeout
    # The kernel's subscription: sharded on a Redis Cluster, as the projector publishes there.
    pubsub = Subscription(wiring.redis, wiring.keys.applied_channel())
    try:
        while True:
            value = condition()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what or token_or_condition}"
                )
            pubsub.get_message(timeout=min(remaining, APPLIED_RECHECK))
    finally:
        pubsub.close()


def until_events(target: int, timeout: float) -> Callable[[Any], bool]:
    """An `until=` for `bench.workload.generate`: stop once `target` events are committed,
    fail (in the writer, so `generate` raises it) if that takes longer than `timeout`."""
    deadline = time.monotonic() + timeout

    def until(report: Any) -> bool:
        if report.events >= target:
            return True
        if time.monotonic() > deadline:
            raise AssertionError(
                f"only {report.events} of {target} events committed within {timeout:g}s"
            )
        return False

    return until


def free_port() -> int:
    """A loopback port free right now (the kernel picks it). Another program may take it
    before the caller binds: callers that start a server retry on a start-up failure."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cqrs_argv(*args: str) -> list[str]:
    """The command line of `cqrs ARGS...` in this interpreter (the installed entry point
    would need the venv's bin/ on PATH)."""
    return [sys.executable, "-m", "cqrs.app", *args]


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run `cqrs ARGS...` in a subprocess, exactly as a user would."""
    return subprocess.run(
        cqrs_argv(*args),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_cli_json(*args: str, env: dict[str, str]) -> Any:
    """`cqrs ARGS... --json` that must succeed: its parsed output."""
    result = run_cli(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_one_error_line(result: subprocess.CompletedProcess[str], contains: str = "") -> str:
    """A refused CLI call as users must see it: nothing on stdout, one `error: ...` line on
    stderr (mentioning `contains`); returns that line."""
    assert result.stdout == "", f"stdout must be empty on failure, got {result.stdout!r}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: ") and line.removeprefix("error: ").strip(), line
    assert contains.lower() in line.lower(), f"{contains!r} not in {line!r}"
    return line


def event_count(database_url: str) -> int:
    """Rows in the event log: what a refused command must not have added to."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        return int(conn.execute("SELECT count(*) FROM events.event_log").fetchone()[0])


def cli_json(*args: str, env: dict[str, str]) -> tuple[int, Any, str]:
    """(exit code, parsed stdout or None, stderr) of `cqrs ARGS... --json`, for commands
    whose failure is the point of the test."""
    result = run_cli(*args, "--json", env=env)
    try:
        data = json.loads(result.stdout) if result.stdout.strip() else None
    except json.JSONDecodeError as exc:
        raise AssertionError(f"not JSON: {result.stdout!r} / {result.stderr!r}") from exc
    return result.returncode, data, result.stderr


def cli_parallel(
    *calls: tuple[tuple[str, ...], dict[str, str]], timeout: float = 60.0
) -> list[subprocess.CompletedProcess[str]]:
    """Run several `cqrs` commands at once (each pays the interpreter start-up; they do
    not depend on each other); results in the order given."""
    running = [
        subprocess.Popen(
            cqrs_argv(*args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, env in calls
    ]
    results = []
    try:
        for proc, (args, _env) in zip(running, calls, strict=True):
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return results
