"""Crash convergence on a Redis Cluster (3 masters + 3 replicas): writers commit while
`cqrs relay` and 3 `cqrs project` workers run as real processes against the cluster, two
workers are SIGKILLed mid-run and restarted; after a drain `cqrs verify` is clean and the
views' keys live on all three masters.

Kept small (2 cores shared with the rest of the suite); tests/integration/
test_projector_crash.py is the long version on one node. Self-contained process handling:
every process is started here and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.workload import WorkloadReport, generate
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.state import live_generation
from cqrs.settings import Settings
from cqrs.wiring import Wiring
from tests.conftest import settings_env
from tests.integration.cluster.procs import cli as _cli
from tests.integration.cluster.procs import cqrs as _cqrs
from tests.integration.cluster.procs import logs as _logs
from tests.integration.cluster.procs import wait_ready as _wait_ready
from tests.integration.projector_support import deploy_projections

N_COMMANDS = 600
WRITERS = 3
N_WORKERS = 3
KILL_AT = (0.3, 0.6)  # fractions of the workload at which a worker is SIGKILLed


def _view_keys_per_master(wiring: Wiring) -> Counter[int]:
    client, counts = wiring.redis, Counter[int]()
    for projection in PROJECTIONS:
        pattern = wiring.keys.views(projection, live_generation(client, wiring.keys, projection))
        for node in client.get_primaries():
            conn = client.get_redis_connection(node)
            counts[node.port] += sum(1 for _ in conn.scan_iter(match=pattern.pattern()))
    return counts


@pytest.mark.slow
def test_views_converge_on_the_cluster_while_workers_are_sigkilled(
    cluster_wiring: Wiring, cluster_settings: Settings, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CQRS_TEST_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    print(f"\nseed {seed}")
    env = {
        **settings_env(cluster_settings),
        "CQRS_PROJECTOR_LEASE_MS": "1000",
        "CQRS_PROJECTOR_BATCH_SIZE": "50",
    }
    deploy_projections(cluster_wiring)  # the backlog flows through the consumer groups
    procs: list[subprocess.Popen[bytes]] = []
    report = WorkloadReport()
    halt = threading.Event()
    try:
        _run(cluster_wiring, env, rng, procs, report, halt, tmp_path)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (seed {seed})\n{_logs(tmp_path)}") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)

    drained = _cli(["run", "--drain"], env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    verified = _cli(["verify", "--json"], env)
    assert verified.returncode == 0, verified.stdout + verified.stderr + _logs(tmp_path)
    assert json.loads(verified.stdout)["differences"] == 0, verified.stdout
    per_master = _view_keys_per_master(cluster_wiring)
    assert len(per_master) == 3 and all(per_master.values()), per_master
    print(f"{report.summary()}; view keys per master {dict(per_master)}")


def _run(
    cluster_wiring: Wiring,
    env: dict[str, str],
    rng: random.Random,
    procs: list[subprocess.Popen[bytes]],
    report: WorkloadReport,
    halt: threading.Event,
    tmp_path: Path,
) -> None:
    """Relay and workers up, the workload with its SIGKILLs, everyone stopped by SIGTERM."""
    procs.append(_cqrs(["relay"], env, tmp_path / "relay.log"))
    workers = [
        _cqrs(["project", "--consumer", f"w{i}"], env, tmp_path / f"w{i}.log")
        for i in range(N_WORKERS)
    ]
    procs += workers
    _wait_ready(cluster_wiring, [f"w{i}" for i in range(N_WORKERS)], workers)
    with ThreadPoolExecutor(1) as pool:
        workload = pool.submit(
            generate,
            random.Random(rng.getrandbits(64)),
            cluster_wiring,
            N_COMMANDS,
            writers=WRITERS,
            report=report,
            stop=halt,
        )
        kills = 0
        try:
            for fraction in KILL_AT:
                while not workload.done() and report.attempted < fraction * N_COMMANDS:
                    time.sleep(0.01)
                if workload.done():
                    break
                slot = rng.randrange(N_WORKERS)
                _wait_ready(cluster_wiring, [f"w{slot}"], [workers[slot]])
                workers[slot].kill()
                assert workers[slot].wait(timeout=10) == -signal.SIGKILL
                kills += 1
                workers[slot] = _cqrs(
                    ["project", "--consumer", f"w{slot}"], env, tmp_path / f"w{slot}.log"
                )
                procs.append(workers[slot])
            done = workload.result()
        finally:
            halt.set()
    assert kills == len(KILL_AT), "the workload ended before the kills"
    assert done.committed > 0.9 * N_COMMANDS, done.summary()
    _wait_ready(cluster_wiring, [f"w{i}" for i in range(N_WORKERS)], workers)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        if proc.returncode is None or proc.returncode != -signal.SIGKILL:
            code = proc.wait(timeout=30)
            assert code in (0, -signal.SIGKILL), f"{proc.args[3:]} exited with {code}"
