"""The processes a test starts and must always end: one fleet for every test.

A test starts relays, workers, replays, API servers or a private redis-server through a
`Fleet` opened with `fleet(...)`; whatever still runs when the block ends (an assertion
failed, a process hung) is resumed and killed by its PID, never by name. Output goes to a
log file per process, never to a pipe nobody reads (a full pipe would block the child);
`logs()` gathers their tails for an assertion message.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import cqrs_argv


@dataclass
class Proc:
    """One subprocess the fleet started: its Popen, where its output goes, and when it
    started (a worker's first heartbeat is newer than that).

    Offers the Popen calls tests use (`poll`, `wait`, `kill`, ...), so a test treats it as
    the process itself."""

    name: str
    popen: subprocess.Popen[bytes]
    started_ms: int
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def poll(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def send_signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def terminate(self) -> None:
        self.popen.terminate()

    def kill(self) -> None:
        self.popen.kill()

    def output(self) -> str:
        """Everything the process wrote so far."""
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""

    def tail(self, chars: int = 3000) -> str:
        """The end of its output, headed with its log's name, for an assertion message."""
        with contextlib.suppress(OSError):
            return f"--- {self.log.name} ---\n{self.log.read_text(errors='replace')[-chars:]}"
        return f"--- {self.log.name}: unreadable ---"


class Fleet:
    """Every subprocess a test starts; `close()` (in a finally: use `fleet(...)`) resumes
    and kills each one still running."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env
        self.started: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        """Any program (`env` defaults to the fleet's)."""
        log = self.log_dir / f"{name}-{len(self.started)}.log"
        started_ms = int(time.time() * 1000)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                env=env if env is not None else self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self.adopt(name, popen, log, started_ms)

    def cqrs(self, name: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        """`cqrs ARGS...` as a long-running process."""
        return self.start(name, cqrs_argv(*args), env)

    def worker(self, consumer: str, env: dict[str, str] | None = None) -> Proc:
        """A projector worker named `consumer` (its name in heartbeats and leases)."""
        return self.cqrs(consumer, "project", "--consumer", consumer, env=env)

    def adopt(
        self, name: str, popen: subprocess.Popen[bytes], log: Path, started_ms: int = 0
    ) -> Proc:
        """A process the test started itself (e.g. with a pipe it reads), to be ended
        with the others."""
        proc = Proc(name, popen, started_ms or int(time.time() * 1000), log)
        self.started.append(proc)
        return proc

    def log_of(self, proc: Proc) -> str:
        return proc.output()

    def logs(self, last: int | None = None, chars: int = 2000) -> str:
        """The tails of the logs of the last `last` processes (all by default)."""
        chosen = self.started if last is None else self.started[-last:]
        return "\n".join(p.tail(chars) for p in chosen)

    @staticmethod
    def stop(proc: Proc, timeout: float = 15.0) -> int | None:
        """SIGTERM (the loops finish their batch and exit 0) and the exit code; None if it
        outlived `timeout`, and then it is killed."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            return None

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)  # a frozen process cannot die otherwise
                    proc.kill()
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@contextlib.contextmanager
def fleet(log_dir: Path, env: dict[str, str] | None = None) -> Iterator[Fleet]:
    """A `Fleet` whose processes are all gone when the block ends, however it ends."""
    processes = Fleet(log_dir, env)
    try:
        yield processes
    finally:
        processes.close()
