"""A SIGTERM that arrives while `cqrs project` is still importing (a supervisor restarting
a worker and stopping it again at once, on a loaded machine) is a clean stop, exit 0,
not a death by signal; a one-shot command keeps the default (ends with 128+15).

The signal is sent as soon as the entry point's deferral is in place (the test polls the
child's caught-signals mask in /proc, the one sign that needs no cooperation from the
child): that is before the CLI's modules have loaded, so without the deferral the worker
dies of it, and with the deferral only for one-shot commands it exits 128+15."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from cqrs.settings import Settings
from tests.conftest import settings_env

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & SIGTERM_BIT)


def _terminated_early(args: list[str], env: dict[str, str]) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "cqrs.app", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not _catches_sigterm(proc.pid):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the entry point never deferred SIGTERM"
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return proc.returncode


def test_sigterm_while_a_worker_starts_is_a_clean_stop(settings: Settings) -> None:
    code = _terminated_early(["project"], settings_env(settings))
    assert code == 0


def test_sigterm_while_a_one_shot_command_starts_ends_it(settings: Settings) -> None:
    code = _terminated_early(["status", "--json"], settings_env(settings))
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM)
