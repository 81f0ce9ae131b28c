"""Start-up guards (cqrs/startup.py): `cqrs relay`, `cqrs project` and `cqrs run` wait for an
unreachable Redis or PostgreSQL (logging the wait once), proceed when it comes up, give up
after CQRS_STARTUP_TIMEOUT with one error line (exit 1), stop at once on SIGTERM (exit 0),
and refuse to start on a Redis that may evict their keys (exit 2) unless
CQRS_ALLOW_EVICTION=true; a running relay says so when the policy changes.

Every Redis here is our own redis-server on a free loopback port (killed by PID); the
shared Redis's configuration is never touched.
"""

from __future__ import annotations

import re
import signal
import subprocess
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
import redis

from cqrs.commands.catalog import CreateProduct
from cqrs.keys import KeyMap
from cqrs.queries.errors import NotFound
from cqrs.queries.service import QueryService
from cqrs.settings import Settings
from cqrs.startup import EvictionWatch, check_eviction_policy
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.helpers import free_port, wait_applied, wait_until
from tests.integration.ops_support import start_redis
from tests.integration.projector_support import run
from tests.procs import Proc, fleet

WAIT_LINE = "waiting for Redis at"


def _retries(log: str, what: str) -> int:
    """Failed attempts so far (DEBUG lines of cqrs.startup, one per back-off)."""
    return len(re.findall(rf"{what} attempt \d+ failed", log))


def _exit_code(proc: Proc, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout}s") from None


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("error:")]


def test_relay_and_worker_wait_for_redis_then_proceed(
    settings: Settings, wiring: Wiring, tmp_path: Path
) -> None:
    port = free_port()
    env = settings_env(settings)
    env.update(CQRS_REDIS_URL=f"redis://127.0.0.1:{port}/0", CQRS_LOG_LEVEL="DEBUG")
    with fleet(tmp_path) as procs:
        relay = procs.cqrs("relay", "relay", env=env)
        worker = procs.cqrs("worker", "project", "--consumer", "a", env=env)

        # Alive after a few back-offs, and the wait was logged once, not once per retry.
        for proc in (relay, worker):
            wait_until(
                lambda p=proc: p.poll() is not None or _retries(procs.log_of(p), "Redis") >= 4,
                timeout=30,
                what="four failed attempts",
            )
            assert proc.poll() is None, procs.log_of(proc)
            assert procs.log_of(proc).count(WAIT_LINE) == 1, procs.log_of(proc)

        # A product committed while Redis is down, then Redis comes up on that port.
        product = run(
            wiring, CreateProduct(sku=f"S-{uuid.uuid4().hex[:6]}", name="Lamp", price="9.50")
        )
        url = start_redis(procs, tmp_path, port=port)[1]
        client = redis.Redis.from_url(url, decode_responses=True)
        service = QueryService(client, KeyMap(settings.namespace), partitions=settings.partitions)

        def projected() -> bool:
            assert relay.poll() is None and worker.poll() is None, procs.logs()
            try:
                return service.get_product(product.id).price == Decimal("9.50")
            except NotFound:
                return False

        # The relay publishes it and the worker takes slots and projects it.
        views = Wiring(settings.model_copy(update={"redis_url": url}))
        try:
            wait_applied(views, projected, timeout=60, what="the product projected")
        finally:
            views.close()
        for proc in (relay, worker):
            log = procs.log_of(proc)
            assert log.count(WAIT_LINE) == 1 and "Redis at" in log and "answers after" in log
        client.close()

        for proc in (relay, worker):
            procs.stop(proc)
            assert proc.returncode == 0, procs.log_of(proc)


@pytest.mark.parametrize("command", [("relay",), ("project",), ("run",)])
def test_gives_up_after_the_startup_timeout_with_one_error_line(
    settings: Settings, tmp_path: Path, command: tuple[str, ...]
) -> None:
    port = free_port()
    env = settings_env(settings)
    env.update(CQRS_REDIS_URL=f"redis://127.0.0.1:{port}/0", CQRS_STARTUP_TIMEOUT="1")
    with fleet(tmp_path) as procs:
        proc = procs.cqrs(command[0], *command, env=env)
        assert _exit_code(proc, timeout=30) == 1, procs.log_of(proc)
        log = procs.log_of(proc)
        assert "Traceback" not in log, log
        errors = _error_lines(log)
        assert len(errors) == 1, log
        assert errors[0].startswith(f"error: cannot reach Redis at redis://127.0.0.1:{port}/0")
        assert "gave up after" in errors[0]
        assert log.count(WAIT_LINE) == 1, log


def test_a_drain_gives_up_after_a_few_seconds_by_default(
    settings: Settings, tmp_path: Path
) -> None:
    env = settings_env(settings)
    env["CQRS_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    with fleet(tmp_path) as procs:
        proc = procs.cqrs("drain", "project", "--drain", env=env)
        assert _exit_code(proc, timeout=30) == 1, procs.log_of(proc)
        # A one-shot command: exactly one line (the wait itself is logged at DEBUG only).
        lines = procs.log_of(proc).strip().splitlines()
        assert len(lines) == 1 and "gave up after 5s" in lines[0], procs.log_of(proc)
        assert lines[0].startswith("error: cannot reach Redis at"), lines


def test_relay_waits_for_postgresql_stops_on_sigterm_and_gives_up(
    settings: Settings, tmp_path: Path
) -> None:
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    env = settings_env(settings)
    env.update(CQRS_DATABASE_URL=closed, CQRS_LOG_LEVEL="DEBUG")
    with fleet(tmp_path) as procs:
        waiting = procs.cqrs("relay-waits", "relay", env=env)
        limited = procs.cqrs("relay-limited", "relay", env={**env, "CQRS_STARTUP_TIMEOUT": "1"})

        wait_until(
            lambda: (
                waiting.poll() is not None or _retries(procs.log_of(waiting), "PostgreSQL") >= 4
            ),
            timeout=30,
            what="four failed attempts",
        )
        log = procs.log_of(waiting)
        assert waiting.poll() is None, log
        assert log.count("waiting for PostgreSQL at") == 1, log
        # A stop during the wait is a normal stop: at once, exit 0, no error line.
        waiting.send_signal(signal.SIGTERM)
        assert _exit_code(waiting, timeout=5) == 0, procs.log_of(waiting)
        assert not _error_lines(procs.log_of(waiting))

        assert _exit_code(limited, timeout=30) == 1, procs.log_of(limited)
        errors = _error_lines(procs.log_of(limited))
        assert len(errors) == 1 and errors[0].startswith("error: cannot reach PostgreSQL at")
        assert "Traceback" not in procs.log_of(limited)


def test_run_stops_promptly_on_sigterm_while_waiting(settings: Settings, tmp_path: Path) -> None:
    env = settings_env(settings)
    env["CQRS_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    with fleet(tmp_path) as procs:
        proc = procs.cqrs("run", "run", env=env)
        wait_until(
            lambda: proc.poll() is not None or WAIT_LINE in procs.log_of(proc),
            timeout=30,
            what="the wait logged",
        )
        assert proc.poll() is None, procs.log_of(proc)
        proc.send_signal(signal.SIGINT)
        assert _exit_code(proc, timeout=5) == 0, procs.log_of(proc)


def test_refuses_to_start_on_an_evicting_redis_unless_allowed(
    settings: Settings, tmp_path: Path
) -> None:
    with fleet(tmp_path) as procs:
        _lru, url = start_redis(procs, tmp_path, "--maxmemory-policy", "allkeys-lru")
        env = settings_env(settings)
        env["CQRS_REDIS_URL"] = url
        started = [procs.cqrs(name, name, env=env) for name in ("relay", "project", "run")]
        for proc in started:
            assert _exit_code(proc, timeout=60) == 2, procs.log_of(proc)
            log = procs.log_of(proc)
            errors = _error_lines(log)
            assert len(errors) == 1 and "Traceback" not in log, log
            # The doctor's finding and fix, and the way out.
            assert "maxmemory-policy is allkeys-lru" in errors[0]
            assert "CONFIG SET maxmemory-policy noeviction" in errors[0]
            assert "CQRS_ALLOW_EVICTION=true" in errors[0]

        allowed = procs.cqrs("allowed", "project", env={**env, "CQRS_ALLOW_EVICTION": "true"})
        wait_until(
            lambda: allowed.poll() is not None or "starting anyway" in procs.log_of(allowed),
            timeout=30,
            what="the loud warning",
        )
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = KeyMap(settings.namespace)
        wait_until(
            lambda: allowed.poll() is not None or client.exists(keys.lease("products", 0)),
            timeout=30,
            what="the worker taking slots",
        )
        client.close()
        assert allowed.poll() is None, procs.log_of(allowed)
        assert "ERROR" in procs.log_of(allowed)
        procs.stop(allowed)
        assert allowed.returncode == 0, procs.log_of(allowed)


@pytest.mark.parametrize("command", ["relay", "project"])
def test_a_running_process_says_so_when_the_policy_changes(
    settings: Settings, tmp_path: Path, command: str
) -> None:
    with fleet(tmp_path) as procs:
        _proc, url = start_redis(procs, tmp_path, "--maxmemory-policy", "noeviction")
        env = settings_env(settings)
        env.update(CQRS_REDIS_URL=url, CQRS_EVICTION_CHECK_SECONDS="0.2")
        proc = procs.cqrs(command, command, env=env)
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = KeyMap(settings.namespace)
        running = {
            "relay": lambda: "relay: active" in procs.log_of(proc),
            "project": lambda: client.zcard(keys.workers("products")) > 0,  # a heartbeat
        }[command]
        wait_until(running, timeout=30, what=f"{command} running")
        client.config_set("maxmemory-policy", "allkeys-lfu")
        wait_until(
            lambda: "Redis may now evict our keys" in procs.log_of(proc),
            timeout=30,
            what="the error about the new policy",
        )
        client.config_set("maxmemory-policy", "noeviction")
        wait_until(
            lambda: "no longer evicts" in procs.log_of(proc), timeout=30, what="the all-clear"
        )
        client.close()
        log = procs.log_of(proc)
        assert log.count("Redis may now evict our keys") == 1, log
        assert "allkeys-lfu" in log
        procs.stop(proc)
        assert proc.returncode == 0, procs.log_of(proc)


def test_eviction_watch_for_a_worker_loop(tmp_path: Path) -> None:
    """The function a worker's loop calls: rate-limited, loud once per change."""
    with fleet(tmp_path) as procs:
        _proc, url = start_redis(procs, tmp_path, "--maxmemory-policy", "noeviction")
        client = redis.Redis.from_url(url, decode_responses=True)
        assert check_eviction_policy(client) is None
        watch = EvictionWatch(client, every=10.0)
        client.config_set("maxmemory-policy", "allkeys-random")
        assert watch.poll(now=0.0) is None  # not due yet: no round trip at all
        problem = watch.poll(now=1e9)
        assert problem is not None and "allkeys-random" in problem and "noeviction" in problem
        client.config_set("maxmemory-policy", "volatile-lru")  # a warning in doctor, not this
        assert watch.poll(now=1e9 + 5) == problem  # not due: the last finding
        assert watch.poll(now=1e9 + 10) is None
        client.close()
        # An unreachable Redis never raises out of the watch.
        dead = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
        assert EvictionWatch(dead, every=1.0).poll(now=1e9) is None
