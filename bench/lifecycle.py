"""Stopping a long harness run cleanly when the run itself is stopped.

`python -m bench.soak` starts its own PostgreSQL and Valkey (in new sessions, so a Ctrl-C
in the terminal does not reach them), a relay, workers, replays and CLI runs. Stopped by
`timeout` (SIGTERM, whose default action ends the interpreter without running a single
`finally`) it used to leave all of them running, with their data directories. Here:

* `interrupt_on_signals` turns the first SIGTERM/SIGINT into `Interrupted`, raised in the
  main thread, so the run unwinds through its `finally` blocks like on any error; later
  signals are ignored until the cleanup is done (a `timeout -k` SIGKILL still ends it);
* `Children` starts every subprocess of the run and refuses new ones once closed, so a
  supervisor or fault-injector thread cannot restart a process behind the cleanup's back;
* `kill_descendants` is the net under both: whatever process is still below us at the end
  (a PostgreSQL backend, an initdb cut short, a child spawned in the instant before the
  signal) is killed by PID.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

import psutil

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt, so the run's own
    `except Exception` (a fault that could not be injected, a server that was down) never
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interrupt_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Within the block, the first of `signals` raises `Interrupted` in the main thread;
    later ones only say that the cleanup is still running. Handlers restored on exit."""
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            print("still cleaning up; please wait", file=sys.stderr, flush=True)
            return
        fired.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Children:
    """Every subprocess the run starts, so the cleanup can end each one by its PID."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: list[subprocess.Popen[Any]] = []
        self.closed = False

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen`, recorded; refused (RuntimeError) once the run is closing."""
        with self.lock:
            if self.closed:
                raise RuntimeError("the run is stopping: no new process")
            proc = subprocess.Popen(argv, **kwargs)
            self.procs.append(proc)
            return proc

    def run(
        self, argv: list[str], *, env: dict[str, str], timeout: float
    ) -> subprocess.CompletedProcess[str]:
        """`subprocess.run(..., capture_output=True, text=True)` through `popen`."""
        proc = self.popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def close(self, timeout: float = 10.0) -> list[int]:
        """Refuse new processes, SIGKILL every live one (SIGCONT first: a SIGSTOPped one
        would not die), reap them; returns the PIDs killed."""
        with self.lock:
            self.closed = True
            live = [p for p in self.procs if p.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
        return [p.pid for p in live]


def kill_descendants(timeout: float = 10.0) -> list[int]:
    """SIGKILL every process still below this one; returns their PIDs."""
    try:
        left = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.resume()
            proc.kill()
    psutil.wait_procs(left, timeout=timeout)
    return [p.pid for p in left]
