"""Processes of the cluster tests: `cqrs` subprocesses started here and stopped by PID."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from cqrs.projector.registry import PROJECTIONS
from cqrs.wiring import Wiring


def cqrs(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cqrs.app", *args], env=env, stdout=out, stderr=out
        )


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrs.app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def wait_ready(wiring: Wiring, names: list[str], procs: list[subprocess.Popen[bytes]]) -> None:
    """Until every named worker has a heartbeat newer than now (it runs its loop, so
    signals are handled; a killed predecessor of the same name left an older one)."""
    key = wiring.keys.workers(next(iter(PROJECTIONS)))
    since = time.time() * 1000
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        scores = [wiring.redis.zscore(key, name) for name in names]
        if all(score is not None and score >= since for score in scores):
            return
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3:]} exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError(f"workers {names} never reported a heartbeat")


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
