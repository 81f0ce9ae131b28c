"""Steps: how a projection handler describes its writes, and how a batch of them runs.

A handler turns one event into steps. Each step is one atomic, idempotent call on keys
that share a hash tag (a Lua script or a plain command). A step may depend on what an
earlier step read (an order needs the customer's current name), so it carries a `then`
callback that produces follow-up steps from its result.

A whole batch runs in *rounds*: round 1 pipelines the first steps of every event in
stream order, round 2 pipelines all their follow-ups in the same order, and so on. One
network round trip per round, whatever the batch size, and the relative order of two
events' writes is preserved within every round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import DataError, NoScriptError

from cqrs.projector.scripts import Scripts
from cqrs.redisio import is_cluster_client, pack, read_replies, round_trip

# Version-gate statuses (projector.scripts): MISSING is a gap too, of another kind: the
# view (or the aggregate record) an event updates does not exist, so the event that creates
# it is missing. Both wait for an earlier event of the batch, then fail the event, which
# the worker retries and finally dead-letters; neither writes anything.
APPLIED, DUPLICATE, GAP, MISSING = 1, 0, 2, 3


@dataclass
class Step:
    script: str | None = None
    keys: Sequence[str] = ()
    args: Sequence[Any] = ()
    command: Sequence[Any] = ()
    then: Callable[[Any], list[Step]] | None = None
    # The result's first element is a version-gate status: GAP or MISSING means the event
    # cannot be applied yet (a predecessor is missing), which fails the event.
    gated: bool = False
    # A gated step that only checks a precondition (it writes nothing that is the
    # event's own effect) is not counted as applied or duplicate: the counts stay one
    # per gated write, which is what redelivery tests and stats compare.
    counted: bool = True


NEED_GATE, NEED_TARGET = "gate", "target"


def apply(
    gate_key: str,
    target_key: str,
    gate_field: str,
    version: int,
    ops: Sequence[tuple[str, str, Any]] = (),
    returns: Sequence[str] = (),
    then: Callable[[Any], list[Step]] | None = None,
    *,
    needs: Sequence[str] = (),
) -> Step:
    """Apply `ops` to `target_key` once: only when `version` is exactly the next one
    recorded under `gate_field` of `gate_key` (both in one hash tag).

    `needs` says what must already exist, else the step answers MISSING and writes
    nothing: NEED_GATE for an update event (its aggregate's creation must have been
    applied: a well-formed update with version 1 is otherwise indistinguishable from a
    creation and would build a partial view), NEED_TARGET when the target hash belongs to
    another aggregate that must exist (an order counted on its customer's view)."""
    ops = [*(("need", what, "") for what in needs), *ops]
    args: list[Any] = [gate_field, version, len(ops)]
    for op, name, value in ops:
        args += [op, name, value]
    args += list(returns)
    return Step(script="apply", keys=(gate_key, target_key), args=args, then=then, gated=True)


def command(*args: Any, then: Callable[[Any], list[Step]] | None = None) -> Step:
    return Step(command=args, then=then)


def script(
    name: str,
    keys: Sequence[str],
    args: Sequence[Any] = (),
    then: Callable[[Any], list[Step]] | None = None,
) -> Step:
    return Step(script=name, keys=keys, args=args, then=then)


@dataclass
class BatchOutcome:
    """Per event of the batch: None when all its steps succeeded, else the error."""

    errors: list[str | None]
    applied: int = 0
    duplicates: int = 0
    rounds: int = 0


def _command_args(step: Step, shas: dict[str, str]) -> tuple[Any, ...]:
    if step.script:
        return ("EVALSHA", shas[step.script], len(step.keys), *step.keys, *step.args)
    return tuple(step.command)


def _execute_round(
    client: redis.Redis,
    scripts: Scripts,
    steps: list[Step],
    after: tuple[Any, ...] | None = None,
) -> list[Any]:
    """One pipeline for the round. Scripts are sent as plain EVALSHA (no SCRIPT EXISTS
    round trip first); if the server lost its script cache (restart, SCRIPT FLUSH), the
    calls that got NOSCRIPT are sent again, in their order, after reloading the scripts.
    Every step is idempotent, and NOSCRIPT means that call did nothing. `after`, if
    given, rides behind the round (its reply is dropped)."""
    commands = [_command_args(step, scripts.shas) for step in steps]
    if after is not None:
        commands.append(after)
    results = round_trip(client, commands)[: len(steps)]
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        scripts.load()
        again = round_trip(client, [_command_args(steps[i], scripts.shas) for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return results


# Round 1 is sent in slices of this many commands while the rest of the batch is still
# being parsed, so Redis (on another core) executes the first slices meanwhile.
STREAM_SLICE = 256


def _first_round(
    client: redis.Redis,
    scripts: Scripts,
    per_event: Iterable[list[Step]],
    errors: list[str | None],
    after: tuple[Any, ...] | None = None,
) -> tuple[list[tuple[int, Step]], list[Any]]:
    """Round 1: every event's first steps, sent while `per_event` is still producing them.

    Building a batch's steps is most of the worker's CPU time, and waiting for a round's
    replies most of the rest; sending the round in slices as it is built lets Redis
    execute it concurrently instead of after. The commands go out in event order either
    way, so the round means the same. An event whose steps cannot even be encoded (a
    handler bug) fails alone, before anything of it is sent. `after`, if given, is one more
    command sent behind the round (its reply is dropped)."""
    if is_cluster_client(client):
        return _first_round_cluster(client, scripts, per_event, errors, after)
    pending: list[tuple[int, Step]] = []
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        shas = scripts.shas
        chunk: list[bytes] = []
        for index, steps in enumerate(per_event):
            errors.append(None)
            if not steps:
                continue
            try:
                packed = [pack(_command_args(step, shas)) for step in steps]
            except DataError as exc:
                errors[index] = f"DataError: {exc}"
                continue
            pending += [(index, step) for step in steps]
            chunk += packed
            if len(chunk) >= STREAM_SLICE:
                conn.send_packed_command([b"".join(chunk)])
                chunk.clear()
        if after is not None and pending:
            chunk.append(pack(after))
        if chunk:
            conn.send_packed_command([b"".join(chunk)])
        extra = 1 if after is not None and pending else 0
        results = read_replies(conn, len(pending) + extra)[: len(pending)]
    except BaseException:
        conn.disconnect()  # replies may be left unread: never hand this socket out again
        raise
    finally:
        pool.release(conn)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        scripts.load()
        again = round_trip(client, [_command_args(pending[i][1], scripts.shas) for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return pending, results


def _first_round_cluster(
    client: redis.Redis,
    scripts: Scripts,
    per_event: Iterable[list[Step]],
    errors: list[str | None],
    after: tuple[Any, ...] | None,
) -> tuple[list[tuple[int, Step]], list[Any]]:
    """`_first_round` on a Redis Cluster: the round is built whole, then sent as one
    packed write per master (`cqrs.redisio.cluster_round_trip`; the masters execute
    their parts at the same time). `after` (a PUBLISH) goes once every write of the
    round has replied, as on one node."""
    pending: list[tuple[int, Step]] = []
    commands: list[tuple[Any, ...]] = []
    shas = scripts.shas
    for index, steps in enumerate(per_event):
        errors.append(None)
        if not steps:
            continue
        try:
            args = [_command_args(step, shas) for step in steps]
            for one in args:
                pack(one)  # a step that cannot be encoded fails its event alone
        except DataError as exc:
            errors[index] = f"DataError: {exc}"
            continue
        pending += [(index, step) for step in steps]
        commands += args
    if after is not None and pending:
        commands.append(after)
    results = round_trip(client, commands)[: len(pending)] if pending else []
    return pending, _reload_missing(client, scripts, [s for _, s in pending], results)


def _reload_missing(
    client: redis.Redis, scripts: Scripts, steps: list[Step], results: list[Any]
) -> list[Any]:
    """Steps that got NOSCRIPT, sent again after loading the scripts (on every master of
    a cluster: a promoted replica starts with an empty script cache)."""
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        scripts.load()
        again = round_trip(client, [_command_args(steps[i], scripts.shas) for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return results


def _gap_error(step: Step, status: int) -> str:
    """Why a gated step could not apply: the text the dead letter keeps."""
    if status == GAP:
        return (
            f"version {step.args[1]} arrived before its predecessor "
            "(an earlier event of this aggregate is missing or dead-lettered)"
        )
    if step.script == "apply":
        return (
            f"version {step.args[1]} updates {step.keys[1]}, which does not exist "
            "(the event creating it is missing or dead-lettered)"
        )
    return f"{step.keys[-1]} does not exist (the event creating it is missing or dead-lettered)"


def run_steps(
    client: redis.Redis,
    scripts: Scripts,
    per_event: Iterable[list[Step]],
    *,
    after_each_round: tuple[Any, ...] | None = None,
) -> BatchOutcome:
    """Run every event's steps in rounds; an error in one event never stops the others.

    `per_event` may be a generator: round 1 is sent while it runs (see `_first_round`).
    `after_each_round`: a command sent right behind every round (the worker's `applied`
    notification: an event's version gate is written in the round that applies it,
    round 1 for most, round 2 for an order's creation, so read-your-writes waiters can
    look as soon as that round is done, before the follow-up rounds and the XACK).

    A version-gated step that finds its predecessor missing is retried in the next round
    when an earlier event of the batch still has steps to run (the predecessor may be one
    of them: an order is created in round 2, its cancel arrives in round 1). Only when no
    earlier event is still in flight is the gap real, and the event fails.
    """
    outcome = BatchOutcome(errors=[])
    errors = outcome.errors
    scripts.ensure_loaded()
    pending, results = _first_round(client, scripts, per_event, errors, after_each_round)
    while pending:
        outcome.rounds += 1
        if outcome.rounds > 1:
            steps = [step for _, step in pending]
            results = _execute_round(client, scripts, steps, after_each_round)
        follow: list[tuple[int, Step]] = []
        gaps: list[tuple[int, Step, int]] = []
        for (index, step), result in zip(pending, results, strict=True):
            if errors[index] is not None:
                continue
            if isinstance(result, Exception):
                errors[index] = f"{type(result).__name__}: {result}"
                continue
            if step.gated:
                status = int(result[0])
                if status in (GAP, MISSING):
                    gaps.append((index, step, status))
                    continue
                if step.counted and status == APPLIED:
                    outcome.applied += 1
                elif step.counted:
                    outcome.duplicates += 1
            if step.then is not None:
                try:
                    follow += [(index, s) for s in step.then(result)]
                except Exception as exc:  # a handler bug is a poison event, not a crash
                    errors[index] = f"{type(exc).__name__}: {exc}"
        in_flight = [i for i, _ in follow if errors[i] is None]
        earliest = min(in_flight, default=len(errors))
        for index, step, status in gaps:
            if index > earliest:
                follow.append((index, step))
            else:
                errors[index] = _gap_error(step, status)
        follow.sort(key=lambda item: item[0])  # stable: keeps each event's own step order
        pending = [(i, s) for i, s in follow if errors[i] is None]
    return outcome
