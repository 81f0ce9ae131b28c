"""Per-entry CPU of one projector worker: an in-process `Worker.run(drain=True)` over a
synthetic history (docs/benchmarks.md, "What bounds each figure", projection).

    python -m bench.profile_worker --events 24000 --redis-url redis://127.0.0.1:6379/7
    python -m bench.profile_worker --root /tmp/proj-old ...   # another checkout's code

Each drain starts from fresh groups and empty views: `--repeat` plain drains (the
process's user + system CPU per stream entry, the figure to compare), then with
`--profile` one under `cProfile` with a CPU-time timer (the profiler's own overhead
inflates that figure; it says where the time goes). Redis's
CPU over the plain drain comes from `INFO cpu`. A digest of every view key written lets
two checkouts' runs be compared for identical views. The Redis database is flushed: give
it one of your own. `--build-only` needs no Redis: it times what the projections do per
delivery (parse + handlers, round 1) without the worker's rounds and bookkeeping.

CPU time on a shared 2-core machine moves by +-10% between runs; instruction counts do
not. One drain's (or one build pass's) instructions, whatever the load:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python -m bench.profile_worker --events 3000 --repeat 2   # minus --repeat 1
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import importlib.util
import io
import os
import pstats
import sys
import threading
import time
from typing import Any


def use_tree(root: str) -> None:
    """Import `cqrs` and `cqrs.projector` from another checkout (e.g. a `git worktree` of
    the previous commit) instead of the installed one, so two versions run the same
    script."""
    for name, path in (("cqrs", f"{root}/cqrs"), ("cqrs.projector", f"{root}/projector")):
        spec = importlib.util.spec_from_file_location(
            name, f"{path}/__init__.py", submodule_search_locations=[path]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def digest(client: Any, pattern: str) -> str:
    """One hash of the content of every key matching `pattern` (sorted, type-aware)."""
    h = hashlib.sha256()
    for key in sorted(client.scan_iter(match=pattern, count=1000)):
        kind = client.type(key)
        if kind == "hash":
            value: Any = sorted(client.hgetall(key).items())
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            value = client.dump(key)
        h.update(repr((key, kind, value)).encode())
    return h.hexdigest()[:16]


def build_only(events: int, repeat: int) -> None:
    """CPU per entry of what `Projection.steps` does for every delivery of a batch of 500
    (each entry offered to every projection, parsed once per batch as the worker does),
    best of `repeat` passes: the projections' own part of a worker's time, without the
    Redis round trips or the worker's bookkeeping (and without the follow-up rounds)."""
    from bench.history import make_history
    from cqrs.keys import KeyMap
    from cqrs.projector.projection import ParseOnce
    from cqrs.projector.registry import PROJECTIONS

    entries = [e.stream_fields(n) for n, e in enumerate(make_history(events), start=1)]
    keys = KeyMap("pw")
    pairs = [(p, keys.views(name, 1)) for name, p in PROJECTIONS.items()]
    best = float("inf")
    for _ in range(max(repeat, 1)):
        copies = [dict(f) for f in entries for _ in pairs]  # one dict per delivery
        start = time.process_time()
        at = 0
        for b in range(0, len(entries), 500):
            parse = ParseOnce()
            for _f in entries[b : b + 500]:
                for projection, views in pairs:
                    projection.steps(copies[at], views, parse)
                    at += 1
        best = min(best, time.process_time() - start)
    print(f"entries {len(entries)}  build {best / len(entries) * 1e6:.2f} us/entry (best)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=24_000)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--root", help="import the code from this checkout")
    parser.add_argument("--repeat", type=int, default=1, help="plain drains to run")
    parser.add_argument("--profile", action="store_true", help="one more drain, profiled")
    parser.add_argument("--top", type=int, default=30, help="print the profile's top N")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument(
        "--build-only",
        action="store_true",
        help="no Redis: time only turning the entries into round-1 steps (parse + handlers)",
    )
    args = parser.parse_args()
    if args.root:
        use_tree(args.root)

    from bench.history import make_history, xadd_history
    from bench.scenarios.projection import prepare_live
    from cqrs.keys import KeyMap
    from cqrs.projector.registry import PROJECTIONS
    from cqrs.projector.worker import Worker
    from cqrs.settings import Settings
    from cqrs.tuning import tune_gc
    from cqrs.wiring import make_redis

    if args.build_only:
        build_only(args.events, args.repeat)
        return
    settings = Settings(redis_url=args.redis_url, namespace="pw", partitions=8)
    client = make_redis(args.redis_url, settings)
    client.flushdb()
    keys = KeyMap(settings.namespace)
    n = xadd_history(client, keys, make_history(args.events, partitions=8))
    tune_gc(settings.projector_gc_threshold)  # as `cqrs project` does

    def drain(profile: cProfile.Profile | None) -> tuple[float, float, float, Any]:
        prepare_live(client, keys, ["profiler"], settings.partitions)
        worker = Worker(client, settings, list(PROJECTIONS.values()), consumer="profiler")
        stop = threading.Event()
        before, redis_before = os.times(), redis_cpu(client)
        if profile is not None:
            profile.enable()
        worker.run(stop, drain=True)
        if profile is not None:
            profile.disable()
        after = os.times()
        user, system = after.user - before.user, after.system - before.system
        return user, system, redis_cpu(client) - redis_before, worker.stats

    us = 1e6 / n
    for _ in range(args.repeat):
        user, system, rcpu, stats = drain(None)
        print(
            f"entries {n}  python {(user + system) * us:.1f} us/entry (user {user * us:.1f}"
            f" sys {system * us:.1f})  redis {rcpu * us:.1f} us/entry  applied {stats.applied}"
            f" failed {stats.failed} dead {stats.dead_lettered}"
            f"  views {digest(client, f'{keys.ns}:*:g*')}",
            flush=True,
        )
    if args.profile:
        profile = cProfile.Profile(time.process_time)
        user, system, _, _ = drain(profile)
        print(f"profiled: {(user + system) * us:.1f} us/entry (the profiler's overhead included)")
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats(args.sort).print_stats(args.top)
        print(out.getvalue())
    client.flushdb()
    client.close()


if __name__ == "__main__":
    main()
