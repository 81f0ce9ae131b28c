"""Server processes: who runs them, how they are spawned, and how we tell they are ours.

A dead server can leave a zombie behind (our own child, or an orphan under a PID 1 that does
not reap, as in many containers); zombies are treated as dead everywhere. A recorded PID is
only trusted while executable and start time still match, so a recycled PID is never hit.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cqrs.embedded.errors import EmbeddedError

POLL = 0.1

# Servers spawned by this process. Holding the Popen objects keeps CPython from warning that a
# child is "still running" when they are garbage-collected, and lets us reap a server that died
# while we are alive (an unreaped zombie would otherwise look like a running postmaster).
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class RunAs:
    """The unprivileged OS user that runs PostgreSQL when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def run_as_user(user: str | None) -> RunAs | None:
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
        return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)
    raise EmbeddedError(f"OS user {names[0]!r} does not exist; pass an existing non-root user")


def user_can(run_as: RunAs, checks: list[tuple[str, Path]]) -> bool:
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
            env=clean_env(),
            timeout=30,
            check=False,
            **user_kwargs(run_as),
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def make_dir(path: Path, mode: int, owner: RunAs | None) -> None:
    """mkdir + explicit chmod/chown: the umask must not decide whether postgres can enter."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None:
        os.chown(path, owner.uid, owner.gid)


def live_process(entry: object) -> psutil.Process | None:
    """The recorded process if it still runs, else None (zombies and recycled PIDs count as
    dead): only this check stands between `stop()` and killing a stranger."""
    if not isinstance(entry, dict):
        return None
    pid = entry.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    reap(pid)
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


def reap(pid: int) -> None:
    """Collect the exit status of a server we spawned, so it does not linger as a zombie."""
    child = CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del CHILDREN[pid]


def gone(proc: psutil.Process) -> bool:
    """Exited or a zombie (reaped first when it is our own child)."""
    reap(proc.pid)
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def wait_gone(procs: list[psutil.Process], deadline: float) -> list[psutil.Process]:
    """Poll instead of psutil.wait_procs: that never returns for a zombie we cannot reap."""
    left = [p for p in procs if not gone(p)]
    while left and time.monotonic() < deadline:
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))
        left = [p for p in left if not gone(p)]
    return left


def identity(pid: int, exe: Path) -> dict[str, Any]:
    """What `live_process` needs to recognize this process later."""
    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:
        created = 0.0
    return {"pid": pid, "create_time": created, "exe": os.path.realpath(exe)}


def clean_env() -> dict[str, str]:
    """Drop PG* variables: PGOPTIONS, PGDATA and friends would silently reconfigure the
    servers and tools we launch."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def user_kwargs(run_as: RunAs | None) -> dict[str, Any]:
    """Switch user in the child; extra_groups also drops root's supplementary groups."""
    if run_as is None:
        return {}
    return {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}


def spawn(argv: list[str], log: Path, run_as: RunAs | None) -> subprocess.Popen[bytes]:
    """Start a server in its own session (Ctrl-C on the CLI must not reach it) with output
    appended to its log; close_fds keeps our lock and sockets out of the long-lived child."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd="/",
            env=clean_env(),
            start_new_session=True,
            close_fds=True,
            **user_kwargs(run_as),
        )
    CHILDREN[proc.pid] = proc
    return proc


def processes_in(directory: Path) -> list[psutil.Process]:
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
