"""Starting one server on a loopback port and waiting until it answers.

Shared by PostgreSQL and Valkey: pick a port (the old one if still free, so URLs users copied
keep working), spawn, record the process in the state file before waiting, and turn a
failed start into one actionable line taken from the server's log.
"""

from __future__ import annotations

import functools
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cqrs.embedded.errors import EmbeddedError
from cqrs.embedded.processes import (
    CHILDREN,
    POLL,
    RunAs,
    gone,
    identity,
    live_process,
    spawn,
)
from cqrs.embedded.state import write_state

HOST = "127.0.0.1"
PORT_ATTEMPTS = 8


def free_port() -> int:
    """Let the kernel pick; the tiny race until the server binds is handled by retrying."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Nothing listens on `port` (SO_REUSEADDR: a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def log_since(log: Path, offset: int) -> str:
    """What the server wrote since `offset` (bounded: a start-up log, not a whole day's)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read(256 * 1024).decode("utf-8", errors="replace")
    except OSError:
        return ""


def log_size(log: Path) -> int:
    """Where this start's output will begin in the (appended) log."""
    try:
        return log.stat().st_size
    except OSError:
        return 0


def last_error_line(text: str) -> str:
    """The line a human needs from a start-up log, so the one-line error is actionable."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(mark in line for mark in ("FATAL", "PANIC", "ERROR", " # ")):
            return line[-200:]
    return lines[-1][-200:] if lines else "no output"


def wait_ready(
    ready: Callable[[], bool],
    proc: subprocess.Popen[bytes] | psutil.Process | None,
    deadline: float,
) -> str:
    """Poll until the server answers ('ready'), its process exits ('exited') or the deadline
    passes ('timeout'); never sleeps past the deadline."""
    while True:
        if isinstance(proc, subprocess.Popen):
            if proc.poll() is not None:
                CHILDREN.pop(proc.pid, None)
                return "exited"
        elif proc is not None and gone(proc):
            return "exited"
        if ready():
            return "ready"
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        time.sleep(min(POLL, remaining))


@dataclass(frozen=True)
class Launch:
    """One server kind: how to start it on a port, how to tell it answers, where it logs."""

    name: str
    kind: str
    argv: Callable[[int], list[str]]
    ready: Callable[[int], bool]
    log: Path
    run_as: RunAs | None
    extra: dict[str, Any]
    # Start-up failures that go away by themselves (e.g. a killed postmaster's children
    # still holding shared memory); retried on the same port until the deadline.
    transient: tuple[str, ...] = ()


def launch(
    spec: Launch,
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
    port = preferred_port if preferred_port and port_free(preferred_port) else free_port()
    port_retries = 0
    while True:
        offset = log_size(spec.log)
        argv = spec.argv(port)
        proc = spawn(argv, spec.log, spec.run_as)
        entry = {**identity(proc.pid, Path(argv[0])), "port": port, **spec.extra}
        entry["log"] = str(spec.log)
        state[spec.kind] = entry
        write_state(home, state)
        outcome = wait_ready(functools.partial(spec.ready, port), proc, deadline)
        if outcome == "ready":
            return entry
        if outcome == "timeout":
            raise EmbeddedError(
                f"embedded {spec.name} did not start within {timeout:g}s; see {spec.log}"
            )
        text = log_since(spec.log, offset)
        if "Address already in use" in text and port_retries < PORT_ATTEMPTS:
            port_retries += 1
            port = free_port()
            continue
        if any(mark in text for mark in spec.transient) and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            continue
        raise EmbeddedError(
            f"embedded {spec.name} exited with code {proc.returncode} during start-up "
            f"({last_error_line(text)}); see {spec.log}"
        )


def reuse(
    name: str, entry: object, ready: Callable[[int], bool], deadline: float, timeout: float
) -> dict[str, Any] | None:
    """The recorded server if its process lives; waits for it to answer (it may still be
    recovering) rather than killing a working server."""
    proc = live_process(entry)
    if proc is None or not isinstance(entry, dict) or not isinstance(entry.get("port"), int):
        return None
    port = int(entry["port"])
    if wait_ready(lambda: ready(port), proc, deadline) == "ready":
        return entry
    if gone(proc):
        return None
    raise EmbeddedError(
        f"embedded {name} (pid {proc.pid}) runs but did not answer on {HOST}:{port} "
        f"within {timeout:g}s; see {entry.get('log')}"
    )


def describe(
    entry: object, url: Callable[[int], str], ready: Callable[[int], bool]
) -> dict[str, object]:
    """One server's entry of `status()`: recorded, alive (our process), ready (answers)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("port"), int):
        return {"pid": None, "port": None, "url": None, "alive": False, "ready": False, "log": None}
    port = int(entry["port"])
    alive = live_process(entry) is not None
    return {
        "pid": entry.get("pid"),
        "port": port,
        "url": url(port),
        "alive": alive,
        "ready": alive and ready(port),
        "log": entry.get("log"),
    }
