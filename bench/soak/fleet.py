"""The processes of a soak run: its embedded servers and the product's processes.

Both are restarted by the run (a fault's restart, a process that exited on its own) but
only ever through their recorded PIDs and Popen objects, and never once the run is closing:
a restart racing the cleanup must not leave anything behind.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lifecycle import Children
from bench.soak.config import log
from cqrs import embedded


class Servers:
    """The embedded PostgreSQL and Valkey of this run; restarts keep their ports (the URLs
    handed to every subprocess must stay valid)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        # `ensure` (a fault's restart) and `close` exclude each other, and nothing is
        # started once closed: a restart racing the cleanup must not leave a server behind.
        self.lock = threading.Lock()
        self.closed = False
        started = embedded.ensure_started(home, timeout=120)
        self.database_url = started.database_url
        self.redis_url = started.redis_url

    def pid(self, kind: str) -> int | None:
        info = embedded.status(self.home)[kind]
        assert isinstance(info, dict)
        return int(info["pid"]) if info.get("alive") else None

    def wait_gone(self, kind: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pid(kind) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded {kind} did not exit within {timeout:g}s")
            time.sleep(0.05)

    def ensure(self) -> None:
        with self.lock:
            if self.closed:
                raise RuntimeError("the run is stopping: no server restart")
            started = embedded.ensure_started(self.home, timeout=120)
        if (started.database_url, started.redis_url) != (self.database_url, self.redis_url):
            raise RuntimeError(
                f"a server came back on another port ({started.database_url}, "
                f"{started.redis_url}); the running processes cannot follow"
            )

    def stop(self) -> list[int]:
        with self.lock:
            self.closed = True
            return embedded.stop(self.home)


@dataclass
class Managed:
    """A subprocess this run owns: restarted when it exits, killed only through its Popen."""

    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None
    offset: int = 0  # where this incarnation's output starts in the log
    expect_exit: bool = False
    stopped: bool = False  # SIGSTOPped
    starts: int = 0


class Fleet:
    """The relay and workers of the run: restarted by `check()` when they exit on their own
    (recorded as unexpected), killed, frozen and resumed by the injector, stopped at the end."""

    def __init__(self, env: dict[str, str], log_dir: Path, children: Children) -> None:
        self.env = env
        self.log_dir = log_dir
        self.children = children
        self.lock = threading.RLock()
        self.procs: dict[str, Managed] = {}
        self.unexpected: list[dict[str, Any]] = []

    def add(self, name: str, *args: str) -> Managed:
        argv = [sys.executable, "-m", "cqrs.app", *args]
        proc = Managed(name, argv, self.log_dir / f"{name}.log")
        self.procs[name] = proc
        self.start(proc)
        return proc

    def start(self, proc: Managed) -> None:
        with self.lock:
            proc.offset = proc.log.stat().st_size if proc.log.exists() else 0
            with proc.log.open("ab") as out:
                out.write(f"\n=== start {proc.starts + 1} at {time.time():.3f}\n".encode())
                proc.popen = self.children.popen(
                    proc.argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            proc.starts += 1
            proc.expect_exit = False
            proc.stopped = False

    def output(self, proc: Managed, chars: int = 4000) -> str:
        with contextlib.suppress(OSError), proc.log.open("rb") as fh:
            fh.seek(proc.offset)
            return fh.read().decode("utf-8", "replace")[-chars:]
        return ""

    def kill(self, proc: Managed) -> None:
        with self.lock:
            proc.expect_exit = True
            assert proc.popen is not None
            if proc.stopped:
                proc.popen.send_signal(signal.SIGCONT)
                proc.stopped = False
            proc.popen.send_signal(signal.SIGKILL)
        proc.popen.wait(timeout=30)

    def pause(self, proc: Managed) -> bool:
        with self.lock:
            if proc.popen is None or proc.popen.poll() is not None:
                return False
            proc.popen.send_signal(signal.SIGSTOP)
            proc.stopped = True
            return True

    def resume(self, proc: Managed) -> None:
        with self.lock:
            if proc.stopped and proc.popen is not None and proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
            proc.stopped = False

    def check(self) -> None:
        """Record and restart every process that exited without being told to."""
        with self.lock:
            for proc in self.procs.values():
                if proc.expect_exit or proc.popen is None or proc.popen.poll() is None:
                    continue
                output = self.output(proc)
                lines = [line for line in output.splitlines() if line.strip()]
                self.unexpected.append(
                    {
                        "process": proc.name,
                        "returncode": proc.popen.returncode,
                        "last_line": lines[-1][-300:] if lines else "",
                        "traceback": "Traceback" in output,
                        "output": output[-2500:],
                    }
                )
                log(f"{proc.name} exited unexpectedly ({proc.popen.returncode}); restarting")
                self.start(proc)

    def stop_all(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everything (graceful: finish the batch, release leases), then wait."""
        with self.lock:
            for proc in self.procs.values():
                proc.expect_exit = True
                if proc.popen is not None and proc.popen.poll() is None:
                    if proc.stopped:
                        proc.popen.send_signal(signal.SIGCONT)
                        proc.stopped = False
                    proc.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            assert proc.popen is not None
            try:
                codes[proc.name] = proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                codes[proc.name] = None
        return codes


def cli(
    children: Children, env: dict[str, str], *args: str, timeout: float
) -> subprocess.CompletedProcess[str]:
    """`cqrs ARGS...` as a child of the run (so the cleanup can end it), output captured."""
    return children.run([sys.executable, "-m", "cqrs.app", *args], env=env, timeout=timeout)
