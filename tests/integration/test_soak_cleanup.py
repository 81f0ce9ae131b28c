"""A stopped soak (`timeout` sends SIGTERM, a terminal Ctrl-C sends SIGINT) leaves nothing
behind: no embedded PostgreSQL or Valkey, no relay, worker, replay or CLI process, no
temporary directory. The soak's processes are recorded (psutil, by PID and start time)
while it runs, before the signal, and each one must be gone after it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cqrs import embedded
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and servers")


def _alive(proc: psutil.Process) -> bool:
    """Running and still the process we recorded (psutil compares the start time)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmdline(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


@pytest.mark.parametrize(
    ("signum", "after"),
    [(signal.SIGTERM, "fault:"), (signal.SIGINT, "servers:")],
    ids=["SIGTERM-during-faults", "SIGINT-at-start"],
)
def test_a_stopped_soak_leaves_no_process_and_no_directory(
    tmp_path: Path, signum: signal.Signals, after: str
) -> None:
    """`after`: the log line to wait for before the signal (faults already being injected
    means restarts race the cleanup)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    log_path = tmp_path / "soak.log"
    with log_path.open("wb") as log:
        soak = subprocess.Popen(
            [sys.executable, "-m", "bench.soak", "--seconds", "30", "--seed", "1"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    root = psutil.Process(soak.pid)
    seen: dict[int, psutil.Process] = {}
    try:

        def running() -> bool:
            """Servers up and the relay and the three workers started; records them all."""
            assert soak.poll() is None, log_path.read_text()
            for child in root.children(recursive=True):
                seen.setdefault(child.pid, child)
            started = [p for p in seen.values() if _alive(p)]
            commands = [_cmdline(p) for p in started]
            return (
                after in log_path.read_text()
                and sum("cqrs.app" in c for c in commands) >= 4
                and any("postgres" in c for c in commands)
                and any("valkey-server" in c or "redis-server" in c for c in commands)
            )

        wait_until(running, timeout=120, interval=0.1, what="the soak's servers and processes")
        text = log_path.read_text()
        home = Path(re.search(r"\(home (\S+)\)", text).group(1))  # type: ignore[union-attr]
        assert home.is_dir()

        soak.send_signal(signum)
        assert soak.wait(timeout=60) == 128 + signum, log_path.read_text()

        wait_until(
            lambda: not [p for p in seen.values() if _alive(p)],
            timeout=20,
            what="every process the soak started to be gone",
        )
        assert not home.exists(), sorted(str(p) for p in home.rglob("*"))[:20]
        assert not embedded.external_root(home).exists()
        assert f"stopped by {signum.name}" in log_path.read_text()
    finally:
        # Only what this test started (the soak) and what the soak started, by PID.
        if soak.poll() is None:
            soak.kill()
            soak.wait(timeout=30)
        for proc in seen.values():
            if _alive(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()
