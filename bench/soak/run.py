"""One soak run, start to end: servers, processes, load, faults, settling, the verdict.

However it ends (done, failed, or `Interrupted` by SIGTERM/SIGINT), every process it started
is gone and its temporary directories are removed (`_clean_up`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.lifecycle import Children, kill_descendants
from bench.soak.config import LEASE_MS, NAMESPACE, PARTITIONS, Config, log
from bench.soak.faults import Injector
from bench.soak.fleet import Fleet, Servers, cli
from bench.soak.load import Reader, ReaderStats, Writers
from bench.soak.observers import LagStats, Probe, Sampler
from bench.soak.report import judge, keep_logs
from bench.workload import Population
from cqrs import embedded
from cqrs.commands.db import make_session_factory
from cqrs.commands.migrations import upgrade
from cqrs.settings import Settings
from cqrs.urls import libpq_url
from cqrs.wiring import make_engine, make_redis


def _count(database_url: str, sql: str) -> int:
    with psycopg.connect(libpq_url(database_url)) as conn:
        return int(conn.execute(sql).fetchone()[0])


def run(config: Config) -> dict[str, Any]:
    """The run; returns its report (see `bench.soak.report.judge`)."""
    report: dict[str, Any] = {"seed": config.seed, "seconds": config.seconds}
    home: Path | None = None
    servers: Servers | None = None
    fleet: Fleet | None = None
    children = Children()
    threads: list[Any] = []
    try:
        home = Path(tempfile.mkdtemp(prefix="cqrs-soak-"))
        report["home"] = str(home)
        # The PostgreSQL user (we may be root) must reach the home, so everything stays
        # inside it.
        home.chmod(0o755)
        log_dir = home / "logs"
        log_dir.mkdir()
        servers = Servers(home)
        log(f"servers: {servers.database_url} {servers.redis_url} (home {home})")
        engine = make_engine(servers.database_url, pool_size=config.writers + 2)
        upgrade(engine)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CQRS_", "PG"))}
        env.update(
            CQRS_DATABASE_URL=servers.database_url,
            CQRS_REDIS_URL=servers.redis_url,
            CQRS_NAMESPACE=NAMESPACE,
            CQRS_HOME=str(home / "unused"),  # never start other embedded servers
            CQRS_PARTITIONS=str(PARTITIONS),
            CQRS_PROJECTOR_LEASE_MS=str(LEASE_MS),
            CQRS_RELAY_POLL_SECONDS="0.5",
            CQRS_STREAM_RETENTION=str(config.retention),
        )
        fleet = Fleet(env, log_dir, children)
        fleet.add("relay", "relay")
        for i in range(1, config.workers + 1):
            fleet.add(f"w{i}", "project", "--consumer", f"w{i}")

        pop, rstats, lag = Population(), ReaderStats(), LagStats()
        probe = Probe(servers.redis_url, lag)
        writers = Writers(
            config.seed, config.writers, make_session_factory(engine), pop, probe.committed
        )
        readers = [
            Reader(i, config.seed, servers.redis_url, pop, rstats) for i in range(config.readers)
        ]
        sampler = Sampler(servers.database_url, servers.redis_url, lag)
        started = time.monotonic()
        injector = Injector(config, servers, fleet, env, started)
        threads = [writers, *readers, sampler, probe, injector]
        for thread in threads:
            thread.start()

        # Run: supervise the processes until the time is up and every fault has fired.
        end = started + config.seconds
        while time.monotonic() < end or injector.is_alive():
            fleet.check()
            if time.monotonic() > end + 600:
                injector.halt.set()
                report["injector_overran"] = True
            time.sleep(0.25)
        log("faults done; settling")
        injector.close()
        servers.ensure()
        fleet.check()
        for thread in (writers, *readers, probe):
            thread.halt.set()
        for thread in (writers, *readers, probe):
            thread.join(timeout=60)
        sampler.halt.set()
        sampler.join(timeout=30)
        fleet.check()
        codes = fleet.stop_all()
        log(f"processes stopped: {codes}")

        # Drain what is left and let PostgreSQL judge.
        drained = cli(children, env, "run", "--drain", timeout=1800)
        verify = cli(children, env, "verify", "--json", "--limit", "20", timeout=600)
        try:
            verdict = json.loads(verify.stdout)
        except ValueError:
            verdict = {"differences": None, "error": (verify.stderr or verify.stdout)[-2000:]}
        injector.client = make_redis(servers.redis_url, Settings(redis_socket_timeout=5))
        injector.collect_dead_letters()
        injector.client.close()
        judge(
            report,
            wstats=writers.report,
            writer_bugs=writers.bugs,
            rstats=rstats,
            lag=lag,
            injector=injector,
            fleet=fleet,
            codes=codes,
            drained=drained,
            verdict=verdict,
            events=_count(servers.database_url, "SELECT count(*) FROM events.event_log"),
            outbox=_count(servers.database_url, "SELECT count(*) FROM events.outbox"),
        )
        for u in fleet.unexpected:
            if u["traceback"]:
                log(f"crash of {u['process']}:\n{u['output']}")
        if not report["ok"]:
            keep_logs(log_dir, report)
        return report
    finally:
        _clean_up(config, report, home, servers, fleet, children, threads)


def _clean_up(
    config: Config,
    report: dict[str, Any],
    home: Path | None,
    servers: Servers | None,
    fleet: Fleet | None,
    children: Children,
    threads: list[Any],
) -> None:
    """Halt the threads, kill every process started (restarts refused from now on), stop
    the embedded servers (also when the signal came while they were starting: the state
    file in the home records them), kill whatever is left below us, remove the home and
    the directory embedded PostgreSQL may have used outside it (as root)."""
    for thread in threads:
        if hasattr(thread, "halt"):
            thread.halt.set()
    killed = children.close()
    if fleet is not None:
        report["process_pids"] = sorted(
            p.popen.pid for p in fleet.procs.values() if p.popen is not None
        )
    if killed:
        log(f"killed processes {killed}")
    if home is None:
        return
    try:
        stopped = servers.stop() if servers is not None else embedded.stop(home)
        report["server_pids"] = stopped
        log(f"stopped embedded servers {stopped}")
    except embedded.EmbeddedError as exc:
        log(f"could not stop the embedded servers: {exc}")
    left = kill_descendants()
    if left:
        log(f"killed leftover processes {left}")
    if not config.keep:
        shutil.rmtree(home, ignore_errors=True)
        # As root, PostgreSQL may run from a per-home directory in /var/tmp (see
        # cqrs.embedded); it belongs to this run's home alone.
        shutil.rmtree(embedded.external_root(home), ignore_errors=True)
