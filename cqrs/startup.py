"""Start-up guards of the long-running processes (relay, projector workers, `cqrs run`).

Two things a process checks before it touches anything:

* **The servers answer.** Orchestrators start everything at once, so a worker often comes up
  before Redis or PostgreSQL does. Exiting 1 ("cannot reach Redis") made the process depend
  on a supervisor's restart policy to ever start; instead it waits, retrying with bounded
  exponential back-off (tenacity), logs the wait once (not once per retry: a process that
  waits an hour must not write a thousand lines), and gives up only after
  `CQRS_STARTUP_TIMEOUT` (no limit by default for the long-running processes, a few
  seconds for one-shot `--drain` runs, which a person or a script is waiting for). A
  SIGTERM/SIGINT during the wait is a normal stop.
* **Redis will not evict our keys.** Under an `allkeys-*` policy Redis may drop a view, an
  index, a generation key or a stream entry at any moment: queries lie and events are lost
  to the projections (seen in fault injection: 194 real events dead-lettered and no
  recovery). `cqrs doctor` has always called that an error; the processes that write those
  keys now refuse to start on it (exit 2) unless `CQRS_ALLOW_EVICTION=true`, and
  `EvictionWatch` says so loudly if the policy changes while they run.

The eviction rule itself (`judge_eviction_policy`) lives here, in the kernel, so that
doctor, the relay and the workers apply one rule and none of them imports another.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import redis
import tenacity

from cqrs.settings import Settings
from cqrs.urls import libpq_url, mask_url

if TYPE_CHECKING:
    from cqrs.wiring import Wiring

log = logging.getLogger(__name__)

T = TypeVar("T")

# `--drain` and other one-shot runs: someone is waiting for the answer, so an unreachable
# server is reported after a few seconds unless CQRS_STARTUP_TIMEOUT says otherwise.
ONE_SHOT_TIMEOUT = 5.0
# Back-off between attempts: 0.1, 0.2, 0.4 ... capped here (a restarted server is noticed
# within this long), plus up to 10% jitter so a fleet of workers does not retry in step.
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 5.0
# Bound on one attempt (TCP connect / libpq connect_timeout): a blackholed address would
# otherwise hold an attempt, and so a SIGTERM, for the OS's connect timeout.
ATTEMPT_TIMEOUT = 5
# While Redis keeps an evicting policy, `EvictionWatch` repeats its error this often.
EVICTION_REMINDER_SECONDS = 300.0

# PostgreSQL answers but refuses for now (not a configuration error worth giving up on).
_PG_TRANSIENT_FATAL = (
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "too many clients",
    "remaining connection slots are reserved",
)


class StartupStopped(Exception):
    """SIGTERM/SIGINT arrived while waiting for a server: stop like a normal stop (exit 0)."""


class ServerUnreachable(Exception):
    """The start-up timeout elapsed; the message is the one line to print (exit 1)."""


class EvictionRefused(Exception):
    """Redis may evict our keys and CQRS_ALLOW_EVICTION is not set; the message is the one
    line to print, the doctor's finding and its fix (exit 2)."""


# --------------------------------------------------------------------------- timeouts


def startup_timeout(settings: Settings, *, long_running: bool) -> float | None:
    """Seconds to wait for the servers; None = no limit.

    CQRS_STARTUP_TIMEOUT unset: no limit for the long-running processes (relay, project,
    run), `ONE_SHOT_TIMEOUT` for one-shot runs (`--drain`). Set: that bound for both; 0 means
    no limit."""
    value = settings.startup_timeout
    if value is None:
        return None if long_running else ONE_SHOT_TIMEOUT
    return None if value == 0 else value


# --------------------------------------------------------------------------- waiting


def _seconds(value: float) -> str:
    """2 -> '2s', 0.5 -> '0.5s', 120 -> '120s' (what a person set, not 1.9947s)."""
    return f"{max(value, 0.0):.1f}".rstrip("0").rstrip(".") + "s"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def redis_unavailable(exc: BaseException) -> bool:
    """Worth waiting for: refused/reset/timed out connections and a Redis still loading its
    data set. Not a wrong password (AuthenticationError is a ConnectionError in redis-py):
    waiting would not fix it."""
    return isinstance(
        exc, redis.ConnectionError | redis.TimeoutError | redis.BusyLoadingError
    ) and not isinstance(exc, redis.AuthenticationError)


def postgres_unavailable(exc: BaseException) -> bool:
    """Worth waiting for: no server answering, or a server that answers "not now" (starting,
    shutting down, recovering, out of slots). A FATAL about the role, the password or the
    database name is a configuration error (psycopg gives no SQLSTATE at connect time, so
    the text decides)."""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc)
    if "FATAL:" not in text:
        return True
    return any(phrase in text for phrase in _PG_TRANSIENT_FATAL)


def wait_until_reachable(
    what: str,
    url: str,
    attempt: Callable[[], T],
    *,
    unavailable: Callable[[BaseException], bool],
    stop: threading.Event,
    deadline: float | None,
    level: int = logging.WARNING,
) -> T:
    """`attempt()` until it succeeds, waiting with bounded exponential back-off while it
    fails with an error `unavailable` accepts.

    Logs the wait once at `level` (with the first reason) and once more when the server
    answers.
    Raises `StartupStopped` when `stop` is set, `ServerUnreachable` at `deadline`
    (time.monotonic()), and any other error of `attempt` at once (a wrong password is not
    waited for)."""
    shown = mask_url(url)
    started = time.monotonic()
    waited: list[str] = []  # the first reason, once logged

    def announce(state: tenacity.RetryCallState) -> None:
        if state.outcome is None:
            return
        reason = _first_line(state.outcome.exception())
        pause = state.next_action.sleep if state.next_action is not None else 0.0
        log.debug("%s attempt %d failed; next in %.2fs", what, state.attempt_number, pause)
        if waited:
            return
        waited.append(reason)
        limit = (
            "no time limit"
            if deadline is None
            else f"giving up after {_seconds(deadline - started)} (CQRS_STARTUP_TIMEOUT)"
        )
        log.log(level, "waiting for %s at %s (%s); retrying, %s", what, shown, reason, limit)

    def sleep(seconds: float) -> None:
        if deadline is not None:
            seconds = min(seconds, max(deadline - time.monotonic(), 0.0))
        if stop.wait(seconds):
            raise StartupStopped(f"stopped while waiting for {what}")

    def give_up(state: tenacity.RetryCallState) -> bool:
        return stop.is_set() or (deadline is not None and time.monotonic() >= deadline)

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(unavailable),
        wait=tenacity.wait_exponential(multiplier=FIRST_BACKOFF, max=MAX_BACKOFF)
        + tenacity.wait_random(0, FIRST_BACKOFF),
        stop=give_up,
        sleep=sleep,
        before_sleep=announce,
        reraise=True,
    )
    try:
        result = retrying(attempt)
    except StartupStopped:
        raise
    except Exception as exc:
        if stop.is_set():
            raise StartupStopped(f"stopped while waiting for {what}") from exc
        if not unavailable(exc):
            raise
        waited_for = f" (gave up after {_seconds(time.monotonic() - started)})" if waited else ""
        raise ServerUnreachable(
            f"cannot reach {what} at {shown}: {_first_line(exc)}{waited_for}"
        ) from exc
    if waited:
        log.log(
            min(level, logging.INFO),
            "%s at %s answers after %.1fs",
            what,
            shown,
            time.monotonic() - started,
        )
    return result


def wait_for_redis(
    client: redis.Redis | Callable[[], redis.Redis],
    url: str,
    *,
    stop: threading.Event,
    deadline: float | None,
    level: int = logging.WARNING,
) -> None:
    """Until Redis answers PING (a loading Redis answers LOADING, which waits too).

    `client` may be a function that builds the client: building it asks a node whether
    it is in a cluster (cqrs.wiring), which waits for Redis like the PING does."""

    def ping() -> None:
        (client() if callable(client) else client).ping()

    wait_until_reachable(
        "Redis",
        url,
        ping,
        unavailable=redis_unavailable,
        stop=stop,
        deadline=deadline,
        level=level,
    )


def wait_for_postgres(
    database_url: str,
    *,
    stop: threading.Event,
    deadline: float | None,
    level: int = logging.WARNING,
) -> None:
    """Until PostgreSQL accepts a connection to our database."""

    def attempt() -> None:
        with psycopg.connect(libpq_url(database_url), connect_timeout=ATTEMPT_TIMEOUT):
            pass

    wait_until_reachable(
        "PostgreSQL",
        database_url,
        attempt,
        unavailable=postgres_unavailable,
        stop=stop,
        deadline=deadline,
        level=level,
    )


def prepare_to_start(
    wiring: Wiring, stop: threading.Event, *, long_running: bool, postgres: bool
) -> None:
    """What every writer of the views does first: wait for PostgreSQL (when it needs it)
    and Redis within one start-up deadline, then refuse an evicting Redis.

    Raises `StartupStopped`, `ServerUnreachable` or `EvictionRefused` (see the CLI for the
    exit codes: 0, 1, 2). A one-shot run logs its wait at DEBUG only: a failed command
    prints exactly one `error:` line, which then says how long it waited."""
    timeout = startup_timeout(wiring.settings, long_running=long_running)
    deadline = None if timeout is None else time.monotonic() + timeout
    level = logging.WARNING if long_running else logging.DEBUG
    if postgres:
        wait_for_postgres(wiring.database_url, stop=stop, deadline=deadline, level=level)
    wait_for_redis(
        lambda: wiring.redis, wiring.redis_url, stop=stop, deadline=deadline, level=level
    )
    refuse_evicting_redis(wiring.redis, wiring.settings)


# --------------------------------------------------------------------------- eviction

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass(frozen=True)
class PolicyVerdict:
    """What a maxmemory-policy means for our keys: `status` ok/warning/error, `detail`
    (why), `fix` (what to do). `cqrs doctor` adds a memory budget to the fix."""

    status: str
    detail: str
    fix: str = ""


def judge_eviction_policy(policy: str | None, maxmemory: int) -> PolicyVerdict:
    """The one rule for Redis's maxmemory-policy, shared by doctor and the start-up check.

    `allkeys-*` is an error: any key, a view, an index or a stream entry included, can be
    evicted. `volatile-*` only evicts keys with a TTL (our leases, not our views): a
    warning. `noeviction` without maxmemory grows until the OS kills Redis: a warning."""
    if policy is None:
        return PolicyVerdict(
            WARNING,
            "cannot read maxmemory-policy (CONFIG GET refused)",
            "make sure it is noeviction (views must never be evicted)",
        )
    if policy.startswith("allkeys-"):
        return PolicyVerdict(
            ERROR,
            f"maxmemory-policy is {policy}: Redis may evict any key, so a view, an index or a "
            "stream entry can vanish silently and queries would lie",
            "CONFIG SET maxmemory-policy noeviction (and in redis.conf)",
        )
    if policy.startswith("volatile-"):
        return PolicyVerdict(
            WARNING,
            f"maxmemory-policy is {policy}: our view keys have no TTL so they are not evicted, "
            "but leases would be, and anything else with a TTL in this Redis competes with them",
            "use noeviction",
        )
    if not maxmemory:
        return PolicyVerdict(
            WARNING,
            f"{policy} but no maxmemory: Redis grows until the OS kills it",
            "set maxmemory",
        )
    return PolicyVerdict(OK, f"{policy}, maxmemory {maxmemory / 2**20:.0f} MiB")


def read_eviction_policy(client: redis.Redis) -> tuple[str | None, int]:
    """(maxmemory-policy, maxmemory in bytes): CONFIG GET, or INFO when CONFIG is refused
    (managed services and ACL users often refuse CONFIG but show INFO memory)."""
    # An error reply means refused (ACL, renamed command): then the other source decides.
    policy: str | None = None
    with contextlib.suppress(redis.ResponseError):
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    info: dict[str, Any] = {}
    with contextlib.suppress(redis.ResponseError):
        info = client.info("memory")
    return policy or info.get("maxmemory_policy"), int(info.get("maxmemory") or 0)


def check_eviction_policy(client: redis.Redis) -> str | None:
    """The doctor's finding and fix as one line when Redis may evict our keys, else None.

    For periodic use by running processes (see `EvictionWatch`, which rate-limits it);
    connection errors propagate (the caller's loop has its own handling for an outage)."""
    policy, maxmemory = read_eviction_policy(client)
    verdict = judge_eviction_policy(policy, maxmemory)
    if verdict.status != ERROR:
        return None
    return f"{verdict.detail}; fix: {verdict.fix}"


def refuse_evicting_redis(client: redis.Redis, settings: Settings) -> None:
    """Raise `EvictionRefused` when Redis may evict our keys, unless the operator set
    CQRS_ALLOW_EVICTION=true, in which case log the danger as an error and go on."""
    problem = check_eviction_policy(client)
    if problem is None:
        return
    if settings.allow_eviction:
        log.error("starting anyway (CQRS_ALLOW_EVICTION=true): %s", problem)
        return
    raise EvictionRefused(
        f"refusing to start: {problem} (or set CQRS_ALLOW_EVICTION=true to start anyway)"
    )


class EvictionWatch:
    """Checks Redis's eviction policy at most once every `every` seconds, from a running
    loop, and logs an error when it becomes one that may evict our keys (then again every
    `EVICTION_REMINDER_SECONDS` while it stays so) and an info line when it is fixed.

    A process does not stop on it: stopping would not bring back an evicted key, and the
    operator may be fixing the policy as we speak. Never raises: a Redis outage is the
    loop's business, a refused CONFIG/INFO means "unknown", and neither must disturb it."""

    def __init__(self, client: redis.Redis, *, every: float, allowed: bool = False) -> None:
        self.client = client
        self.every = every
        self.allowed = allowed
        self.problem: str | None = None  # the last finding, None = fine (or unknown)
        self._next_check = time.monotonic() + every
        self._last_said = 0.0

    def poll(self, now: float | None = None) -> str | None:
        """Check when due (cheap otherwise: one clock read); returns the current finding."""
        now = time.monotonic() if now is None else now
        if now < self._next_check:
            return self.problem
        self._next_check = now + self.every
        try:
            problem = check_eviction_policy(self.client)
        except redis.RedisError:
            return self.problem
        if problem is not None and (
            self.problem is None or now - self._last_said >= EVICTION_REMINDER_SECONDS
        ):
            allowed = " (CQRS_ALLOW_EVICTION=true)" if self.allowed else ""
            log.error("Redis may now evict our keys%s: %s", allowed, problem)
            self._last_said = now
        elif problem is None and self.problem is not None:
            log.info("Redis no longer evicts our keys (maxmemory-policy fixed)")
        self.problem = problem
        return problem


def prepare_or_exit(
    wiring: Wiring, stop: threading.Event, *, long_running: bool, postgres: bool
) -> None:
    """`prepare_to_start` for a CLI command: a stop during the wait exits 0 (a normal
    stop), an unreachable server exits 1 and an evicting Redis exits 2, each with one
    `error:` line."""
    import typer

    from cqrs.console import EXIT_USAGE, fail

    try:
        prepare_to_start(wiring, stop, long_running=long_running, postgres=postgres)
    except StartupStopped as exc:
        log.info("%s; exiting", exc)
        raise typer.Exit(0) from None
    except ServerUnreachable as exc:
        fail(str(exc))
    except EvictionRefused as exc:
        fail(str(exc), EXIT_USAGE)
