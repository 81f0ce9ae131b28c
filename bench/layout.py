"""Issue 16's layout question, measured: would one server-side call per batch pay?

A partition-tagged view layout (views co-partitioned with their stream) exists to let a
worker apply a partition's batch in ONE script call instead of one EVALSHA per step. On a
single Redis node any script may touch any key, so that call can be tried here without
changing the layout: this harness runs the real worker (every projection, every gate)
over the same synthetic history three ways, on a private redis-server so that INFO cpu
counts only this work, and prints CPU per stream entry for the worker and for Redis:

- `steps`: the shipped executor, one pipelined EVALSHA per step (`projector.steps`);
- `batch`: the same steps, one call per round slice of 256 steps (what a co-partitioned
  layout allows per partition, and a per-master grouping with `allow-cross-slot-keys`
  per master on a cluster): a Lua interpreter running each step's own script body;
- `batch+merged`: as `batch`, with the apply script computing its ops in Lua and writing
  them in one HSET (one HMGET for what it reads) instead of one call per op.

    python -m bench.layout [--events 20000] [--rounds 3]

The variants alternate, so a load change hits all of them. Results and the decision they
led to: docs/benchmarks.md, "One call per round".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.exceptions import DataError, NoScriptError

from bench.history import make_history, xadd_history
from bench.scenarios.cluster import private_node
from bench.scenarios.projection import prepare_live
from cqrs.keys import KeyMap
from cqrs.projector import scripts as scripts_module
from cqrs.projector import steps as steps_module
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.scripts import SOURCES, Scripts
from cqrs.projector.steps import Step
from cqrs.redisio import pack, read_replies, round_trip
from cqrs.settings import Settings
from cqrs.tuning import tune_gc

KINDS = {"apply": 1, "track": 2, "index": 3, "set_if_newer": 4, "zadd_and_read": 5}
SLICE = 256

# The apply script with its ops computed in Lua and written at the end (2 calls for a
# sale instead of 7, 2 for a creation instead of 9+).
MERGED_APPLY = r"""
local gate, target, gate_field = KEYS[1], KEYS[2], ARGV[1]
local version = tonumber(ARGV[2])
local nops = tonumber(ARGV[3])
local same = gate == target
local reads = {gate_field}
for i = 0, nops - 1 do
  local op = ARGV[4 + 3 * i]
  if op == 'incr' or op == 'money' then reads[#reads + 1] = ARGV[5 + 3 * i] end
end
local value = {}
local stored
if same then
  local got = redis.call('HMGET', target, unpack(reads))
  stored = tonumber(got[1] or '0')
  for j = 2, #reads do value[reads[j]] = got[j] end
else
  stored = tonumber(redis.call('HGET', gate, gate_field) or '0')
  if #reads > 1 then
    local got = redis.call('HMGET', target, unpack(reads, 2))
    for j = 2, #reads do value[reads[j]] = got[j - 1] end
  end
end
local status, missing = 1, false
for i = 0, nops - 1 do
  if ARGV[4 + 3 * i] == 'need' then
    local what = ARGV[5 + 3 * i]
    if what == 'gate' then missing = missing or stored == 0
    else missing = missing or redis.call('EXISTS', target) == 0 end
  end
end
if version <= stored then status = 0
elseif version > stored + 1 then status = 2
elseif missing then status = 3
else
  local order, touched = {}, {}
  for i = 0, nops - 1 do
    local op, field, arg = ARGV[4 + 3 * i], ARGV[5 + 3 * i], ARGV[6 + 3 * i]
    if op ~= 'need' and not touched[field] then touched[field] = true; order[#order + 1] = field end
    if op == 'set' then value[field] = arg
    elseif op == 'del' then value[field] = false
    elseif op == 'incr' then value[field] = string.format('%d', tonumber(value[field] or '0') + tonumber(arg))
    elseif op == 'money' then value[field] = from_cents(to_cents(value[field] or '') + tonumber(arg)) end
  end
  local sets, dels = {}, {}
  for _, field in ipairs(order) do
    if value[field] then sets[#sets + 1] = field; sets[#sets + 1] = value[field]
    else dels[#dels + 1] = field end
  end
  if #dels > 0 then redis.call('HDEL', target, unpack(dels)) end
  if same then sets[#sets + 1] = gate_field; sets[#sets + 1] = version; value[gate_field] = tostring(version)
  else redis.call('HSET', gate, gate_field, version) end
  if #sets > 0 then redis.call('HSET', target, unpack(sets)) end
end
local out = {status}
for i = 4 + 3 * nops, #ARGV do
  local v = value[ARGV[i]]
  if status ~= 1 or v == nil then v = redis.call('HGET', target, ARGV[i]) end
  out[#out + 1] = v or false
end
return out
"""  # noqa: E501

_INTERPRETER = r"""
local argv, out, n, i, s = ARGV, {}, #ARGV, 1, 0
while i <= n do
  local kind, nk, na = tonumber(argv[i]), tonumber(argv[i + 1]), tonumber(argv[i + 2])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = argv[i + 2 + j] end
  i = i + 3 + nk
  for j = 1, na do args[j] = argv[i + j - 1] end
  i = i + na
  s = s + 1
  local result
  if kind == 0 then
    result = redis.pcall(unpack(args))
  else
    local ok, r = pcall(steps[kind], keys, args)
    if ok or type(r) == 'table' then result = r else result = {err = tostring(r)} end
  end
  if result == nil then result = false end
  out[s] = result
end
return out
"""


def batch_source(apply_body: str) -> str:
    """One script holding every step script's body as a function of its own KEYS/ARGV."""
    bodies = {
        "apply": apply_body,
        "track": scripts_module.TRACK,
        "index": scripts_module.INDEX,
        "set_if_newer": scripts_module.SET_IF_NEWER,
        "zadd_and_read": scripts_module.ZADD_AND_READ,
    }
    functions = "".join(
        f"  [{KINDS[name]}] = function(KEYS, ARGV)\n{body}\nend,\n" for name, body in bodies.items()
    )
    money = scripts_module._MONEY
    return (
        "#!lua flags=allow-cross-slot-keys\n"
        + money
        + "local steps = {\n"
        + functions
        + "}\n"
        + _INTERPRETER
    )


def _encoded(step: Step) -> list[Any]:
    if step.script:
        return [KINDS[step.script], len(step.keys), len(step.args), *step.keys, *step.args]
    return [0, 0, len(step.command), *step.command]


def _run_batches(client: redis.Redis, scripts: Scripts, steps: list[Step], after: Any) -> list[Any]:
    calls: list[tuple[Any, ...]] = []
    for at in range(0, len(steps), SLICE):
        flat: list[Any] = ["EVALSHA", scripts.shas["batch"], 0]
        for step in steps[at : at + SLICE]:
            flat += _encoded(step)
        calls.append(tuple(flat))
    if after is not None and steps:
        calls.append(after)
    replies = round_trip(client, calls)
    results: list[Any] = []
    for reply, at in zip(replies, range(0, len(steps), SLICE), strict=False):
        size = min(SLICE, len(steps) - at)
        if isinstance(reply, NoScriptError):
            scripts.load()
            return _run_batches(client, scripts, steps, None)
        results += reply if isinstance(reply, list) else [reply] * size
    return results


def _first_round_batched(
    client: redis.Redis,
    scripts: Scripts,
    per_event: Iterable[list[Step]],
    errors: list[str | None],
    after: tuple[Any, ...] | None = None,
) -> tuple[list[tuple[int, Step]], list[Any]]:
    """`projector.steps._first_round` with slices of SLICE steps sent as one call each,
    while later events are still being turned into steps (as the shipped one streams)."""
    pending: list[tuple[int, Step]] = []
    pool = client.connection_pool
    conn = pool.get_connection()
    sha = scripts.shas["batch"]
    sizes: list[int] = []
    try:
        flat: list[Any] = []
        count = 0
        for index, steps in enumerate(per_event):
            errors.append(None)
            if not steps:
                continue
            try:
                mine: list[Any] = []
                for step in steps:
                    mine += _encoded(step)
                pack(tuple(mine))
            except (DataError, KeyError) as exc:
                errors[index] = f"{type(exc).__name__}: {exc}"
                continue
            pending += [(index, step) for step in steps]
            flat += mine
            count += len(steps)
            if count >= SLICE:
                conn.send_packed_command([pack(("EVALSHA", sha, 0, *flat))])
                sizes.append(count)
                flat, count = [], 0
        if count:
            conn.send_packed_command([pack(("EVALSHA", sha, 0, *flat))])
            sizes.append(count)
        extra = 1 if after is not None and pending else 0
        if extra:
            conn.send_packed_command([pack(after)])  # type: ignore[arg-type]
        replies = read_replies(conn, len(sizes) + extra)[: len(sizes)]
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)
    results: list[Any] = []
    for reply, size in zip(replies, sizes, strict=True):
        results += reply if isinstance(reply, list) else [reply] * size
    if any(isinstance(r, NoScriptError) for r in results):
        scripts.load()
        results = _run_batches(client, scripts, [s for _, s in pending], None)
    return pending, results


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """Swap the executor (and the apply body) for the length of one drain."""
    saved = (steps_module._first_round, steps_module._execute_round, dict(SOURCES))
    try:
        if name != "steps":
            original = scripts_module.APPLY.removeprefix(scripts_module._MONEY)
            apply_body = MERGED_APPLY if name == "batch+merged" else original
            SOURCES["batch"] = batch_source(apply_body)
            if name == "batch+merged":
                SOURCES["apply"] = scripts_module._MONEY + MERGED_APPLY
            steps_module._first_round = _first_round_batched  # type: ignore[assignment]
            steps_module._execute_round = (  # type: ignore[assignment]
                lambda client, scripts, steps, after=None: _run_batches(
                    client, scripts, steps, after
                )
            )
        yield
    finally:
        steps_module._first_round, steps_module._execute_round = saved[0], saved[1]
        SOURCES.clear()
        SOURCES.update(saved[2])


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def drain(client: redis.Redis, settings: Settings, keys: KeyMap) -> tuple[float, float, int]:
    """One worker drains every projection's groups from the start: (worker CPU s, Redis
    CPU s, failed entries)."""
    from cqrs.projector.worker import Worker

    prepare_live(client, keys, ["layout"], settings.partitions)
    worker = Worker(client, settings, list(PROJECTIONS.values()), consumer="layout")
    r0, p0 = redis_cpu(client), time.process_time()
    worker.run(threading.Event(), drain=True)
    return time.process_time() - p0, redis_cpu(client) - r0, worker.stats.failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    names = ("steps", "batch", "batch+merged")
    with tempfile.TemporaryDirectory() as home, private_node(Path(home)) as url:
        settings = Settings(redis_url=url, namespace="layout")
        client = redis.Redis.from_url(url, decode_responses=True)
        keys = KeyMap(settings.namespace)
        xadd_history(client, keys, make_history(args.events, partitions=settings.partitions))
        entries = sum(client.xlen(keys.stream(p)) for p in range(settings.partitions))
        tune_gc(settings.projector_gc_threshold)
        figures: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
        for _ in range(args.rounds):
            for name in names:
                with variant(name):
                    worker_cpu, server_cpu, failed = drain(client, settings, keys)
                if failed:
                    raise SystemExit(f"{name}: {failed} entries failed")
                figures[name].append((1e6 * worker_cpu / entries, 1e6 * server_cpu / entries))
        # Where the shipped executor's Redis time goes, per command (a script's inner
        # calls are counted under their own names too, and inside EVALSHA's time).
        client.config_resetstat()
        drain(client, settings, keys)
        stats = client.info("commandstats")
        client.close()
    print(f"{entries} stream entries, {len(PROJECTIONS)} projections, {args.rounds} rounds")
    print("| executor | worker CPU us/entry (median [min-max]) | Redis CPU us/entry |")
    print("|---|---|---|")
    for name in names:
        worker = [w for w, _ in figures[name]]
        server = [s for _, s in figures[name]]
        print(
            f"| {name} | {statistics.median(worker):.1f} [{min(worker):.1f}-{max(worker):.1f}] "
            f"| {statistics.median(server):.1f} [{min(server):.1f}-{max(server):.1f}] |"
        )
    print("\nRedis time per command, `steps` executor (INFO commandstats, one more drain):")
    print("| command | calls per entry | us per call | us per entry |")
    print("|---|---|---|---|")
    by_time = sorted(stats.items(), key=lambda item: -float(item[1]["usec"]))
    for name, row in by_time[:10]:
        calls, usec = int(row["calls"]), float(row["usec"])
        print(
            f"| {name.removeprefix('cmdstat_')} | {calls / entries:.2f} | {usec / calls:.2f} "
            f"| {usec / entries:.2f} |"
        )


if __name__ == "__main__":
    main()
