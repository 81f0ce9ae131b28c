"""The soak's verdict: what ran, what broke, and whether the views equal PostgreSQL.

`judge` turns what the run collected into the report (a JSON-able dict, with the list of
problems that make the exit status 1); `render` prints it for a human.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.soak.config import KINDS, LEASE_MS
from bench.soak.faults import Injector
from bench.soak.fleet import Fleet
from bench.soak.load import ReaderStats
from bench.soak.observers import LagStats
from bench.workload import WorkloadReport


def judge(
    report: dict[str, Any],
    *,
    wstats: WorkloadReport,
    writer_bugs: list[str],
    rstats: ReaderStats,
    lag: LagStats,
    injector: Injector,
    fleet: Fleet,
    codes: dict[str, int | None],
    drained: subprocess.CompletedProcess[str],
    verdict: dict[str, Any],
    events: int,
    outbox: int,
) -> None:
    """Fill `report` in place (so what was recorded before a failure stays in it); an
    empty `problems` list and `ok` true mean the run passed."""
    letters = injector.dead_letters
    poisoned = {k: v for k, v in letters.items() if (k[1], k[2]) in injector.poisons}
    real = {k: v for k, v in letters.items() if k not in poisoned}

    report.update(
        commands={
            "attempted": wstats.attempted,
            "committed": wstats.committed,
            "rejected": wstats.rejected + wstats.invalid,
            "refused_by_state": dict(wstats.rejected_by_reason),
            "invalid_input": dict(wstats.invalid_by_reason),
            "failed_server_down": dict(wstats.failed_by_error),
            "writer_bugs": writer_bugs[:5],
        },
        events={
            "in_log": events,
            "committed_by_writers": wstats.events,
            "relayed": events - outbox,
            "unpublished": outbox,
        },
        faults={k: injector.fired[k] for k in KINDS},
        fault_outcomes=dict(injector.outcomes),
        fault_errors=injector.errors[:10],
        dead_letters={
            "injected_entries": len(injector.poisons),
            "injected_dead_lettered": len(poisoned),
            "real_events": len(real),
            "real_by_cause": dict(
                Counter(
                    f"{k[0]} from {'log' if k[1] == 'log' else 'stream'}: "
                    + v["error"].split(":")[0][:60]
                    for k, v in real.items()
                )
            ),
            "real_examples": [
                {"projection": k[0], "stream": k[1], "entry_id": k[2], **v}
                for k, v in list(real.items())[:10]
            ],
        },
        queries={
            "reads": rstats.reads,
            "not_found": rstats.not_found,
            "unavailable": rstats.unavailable,
            "invalid_views": rstats.invalid[:20],
        },
        lag={
            "max_entries": lag.max_entries,
            "max_relay_backlog": lag.max_backlog,
            "commit_to_view_max_s": round(max(lag.latencies, default=0.0), 3),
            "commit_to_view_p50_s": round(statistics.median(lag.latencies), 3)
            if lag.latencies
            else None,
            "commit_to_view_p99_s": round(
                statistics.quantiles(lag.latencies, n=100, method="inclusive")[98], 3
            )
            if len(lag.latencies) >= 2
            else None,
            "probes": len(lag.latencies),
            "unresolved_s": round(lag.unresolved, 3),
        },
        processes={
            "restarts": {p.name: p.starts - 1 for p in fleet.procs.values()},
            "unexpected_exits": [
                {k: v for k, v in u.items() if k != "output"} for u in fleet.unexpected
            ],
            "stop_codes": codes,
        },
        drain={"returncode": drained.returncode, "output": drained.stdout.strip()[-300:]},
        verify=verdict,
    )
    problems = []
    if verdict.get("differences") != 0:
        problems.append(f"verify: {verdict.get('differences')} difference(s)")
    if outbox:
        problems.append(f"{outbox} event(s) never published")
    if real:
        problems.append(f"{len(real)} real event(s) dead-lettered")
    if rstats.invalid:
        problems.append(f"{len(rstats.invalid)} invalid view read(s)")
    if writer_bugs:
        problems.append("writer raised an unexpected exception")
    crashed = [u for u in fleet.unexpected if u["traceback"]]
    if crashed:
        problems.append(f"{len(crashed)} process crash(es) with a traceback")
    if any(code != 0 for code in codes.values()):
        problems.append(f"processes did not stop cleanly: {codes}")
    if drained.returncode != 0:
        problems.append(f"drain exited {drained.returncode}: {drained.stderr[-500:]}")
    report["problems"] = problems
    report["views_equal_postgresql"] = verdict.get("differences") == 0
    report["ok"] = not problems


def keep_logs(log_dir: Path, report: dict[str, Any]) -> None:
    """A failed run keeps its process logs for the investigation (the data goes)."""
    kept = Path(tempfile.mkdtemp(prefix=f"cqrs-soak-logs-{report['seed']}-"))
    for path in log_dir.iterdir():
        shutil.copy(path, kept / path.name)
    report["logs"] = str(kept)


def render(report: dict[str, Any]) -> str:
    c, e, d, q, lag = (
        report["commands"],
        report["events"],
        report["dead_letters"],
        report["queries"],
        report["lag"],
    )
    faults = report["faults"]
    refused = sum(c["refused_by_state"].values())
    invalid = sum(c["invalid_input"].values())
    lines = [
        f"soak: seed {report['seed']}, {report['seconds'] / 60:.1f} min, "
        f"PostgreSQL 18 + Valkey 8 (AOF), relay + 3 workers (lease {LEASE_MS} ms)",
        f"commands: {c['attempted']} attempted, {c['committed']} committed, "
        f"{c['rejected']} rejected ({refused} refused by state, {invalid} invalid input), "
        f"{sum(c['failed_server_down'].values())} failed while PostgreSQL was down",
        f"events: {e['in_log']} in the log, {e['relayed']} relayed, "
        f"{e['unpublished']} left unpublished",
        "faults injected: "
        + ", ".join(f"{k} {faults[k]}" for k in KINDS)
        + f" (total {sum(faults.values())})",
        "  replays: "
        + ", ".join(
            f"{k.split(':')[1]} {v}"
            for k, v in sorted(report["fault_outcomes"].items())
            if k.startswith("replay:")
        ),
        f"dead letters: {d['injected_dead_lettered']} for the {d['injected_entries']} injected "
        f"malformed entries (expected), {d['real_events']} real events"
        + (f" {d['real_by_cause']}" if d["real_events"] else ""),
        f"queries: {q['reads']} reads, {q['not_found']} not found (while rebuilding), "
        f"{q['unavailable']} while Redis was down, {len(q['invalid_views'])} invalid views",
        "max observed lag: "
        + ", ".join(f"{k} {v} entries" for k, v in lag["max_entries"].items())
        + f"; relay backlog {lag['max_relay_backlog']} events; commit-to-view max "
        f"{lag['commit_to_view_max_s']} s (p50 {lag['commit_to_view_p50_s']} s, "
        f"p99 {lag['commit_to_view_p99_s']} s, {lag['probes']} probes)",
        f"process restarts: {report['processes']['restarts']}; unexpected exits: "
        f"{len(report['processes']['unexpected_exits'])}"
        + "".join(
            f"\n  {u['process']} exited {u['returncode']}: {u['last_line'][:160]}"
            for u in report["processes"]["unexpected_exits"][:5]
        ),
        f"views == PostgreSQL: {'yes' if report['views_equal_postgresql'] else 'no'}",
    ]
    for problem in report["problems"]:
        lines.append(f"PROBLEM: {problem}")
    for diff in report["verify"].get("shown", [])[:10]:
        lines.append(f"  difference: {diff}")
    if "logs" in report:
        lines.append(f"logs kept in {report['logs']}")
    return "\n".join(lines)
