"""Soak: the whole system, for minutes, under a seeded workload while a fault injector breaks it.

    python -m bench.soak --minutes 10 --seed 1
    python -m bench.soak --seconds 30 --seed 7 --json report.json

What runs (all on loopback, all started and stopped by this process, by PID):

* its own PostgreSQL 18 and Valkey 8 (append-only file on) in a temporary home, through
  `cqrs.embedded.ensure_started`, so nothing of the machine's servers is touched;
* writer threads: the seeded command mix of `bench.workload` through the real command
  handlers, some invalid on purpose (bad input, unknown ids, too little stock, closed orders);
* a relay subprocess (`cqrs relay`) and three projector workers (`cqrs project --consumer wN`,
  lease 1 s), restarted whenever they exit;
* query readers (`QueryService`), a probe that measures commit-to-view latency from
  consistency tokens, and a sampler of consumer-group lag and relay backlog;
* a fault injector that, on a seeded schedule: SIGKILLs and restarts the relay or a worker,
  SIGSTOPs a worker for longer than its lease and SIGCONTs it, SIGKILLs Valkey and restarts it
  from its AOF, FLUSHALLs Valkey, fast-restarts PostgreSQL (SIGINT), replays a random
  projection (`cqrs replay NAME --yes`), and XADDs foreign, malformed entries into the streams.

At the end the faults stop, every process is stopped gracefully, `cqrs run --drain` projects
what is left and `cqrs verify` compares every view with PostgreSQL. The report says what ran,
what broke and whether the views equal PostgreSQL; the exit status is 1 on any difference,
unpublished (lost) event, real event in the dead letters, invalid view read, crashed process
or writer bug. With the same seed the workload and the fault schedule are the same; only the
timing (and so the interleaving) differs.

The package, by concern: `config` (the run's shape and its seeded fault schedule), `fleet`
(servers and processes, restarted only by PID), `load` (writers and readers), `observers`
(lag and commit-to-view latency), `faults` (the injector), `report` (the verdict), `run` (one
run, cleaned up however it ends) and `cli` (`python -m bench.soak`). It only uses the
product's public pieces (cqrs and its sides) and `bench.workload`, so it stays runnable on
its own.
"""

from __future__ import annotations

from bench.soak.config import KINDS, Config, fault_schedule
from bench.soak.report import render
from bench.soak.run import run

__all__ = ["KINDS", "Config", "fault_schedule", "render", "run"]
