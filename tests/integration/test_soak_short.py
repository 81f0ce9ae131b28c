"""A short run of the soak harness (`python -m bench.soak`): every fault kind fires at least
once against its own PostgreSQL and Valkey, and the views still equal PostgreSQL.

The long run (10 minutes, every fault at least three times) is not part of the suite; its
report is in docs/reliability.md. The seed is printed; set CQRS_TEST_SEED to repeat a run's
workload and fault schedule (the interleaving still depends on timing).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from bench.soak import KINDS

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and servers"),
]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_short_soak_survives_every_fault_kind(tmp_path: Path) -> None:
    seed = int(os.environ.get("CQRS_TEST_SEED") or random.SystemRandom().randrange(2**31))
    report_path = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    argv = ["--seconds", "30", "--seed", str(seed), "--json", str(report_path)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.soak", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    context = f"seed {seed}\n{result.stdout}\n{result.stderr[-6000:]}"
    assert report_path.exists(), context
    report = json.loads(report_path.read_text())

    assert "views == PostgreSQL: yes" in result.stdout, context
    assert result.returncode == 0, context
    assert report["ok"] and report["problems"] == [], context
    fired = report["faults"]
    assert all(fired[kind] >= 1 for kind in KINDS), (fired, context)
    assert report["commands"]["committed"] > 0 and report["commands"]["rejected"] > 0, context
    assert report["events"]["unpublished"] == 0, context
    assert report["events"]["relayed"] == report["events"]["in_log"] > 0, context
    assert report["dead_letters"]["real_events"] == 0, context
    assert report["dead_letters"]["injected_entries"] >= 1, context
    # Everything it started is gone.
    left = [pid for pid in report["server_pids"] + report["process_pids"] if _alive(pid)]
    assert report["server_pids"] and not left, (left, context)
    assert not Path(report["home"]).exists(), context
