"""Dead letters: events a projection could not apply after N deliveries.

An entry in `dlq:{projection}` keeps the original stream entry, where it came from, the
last error and the delivery count, so it can be inspected, fixed and re-applied
(`cqrs dlq retry`) or dropped. Moving it there and acknowledging the original are two
steps on different keys; a crash in between leaves a duplicate dead letter with the same
`entry_id`, which `list` shows once and `retry` applies once (the views are gated).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis

from cqrs.keys import KeyMap
from cqrs.redisio import round_trip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    id: str  # id in the dead-letter stream
    projection: str
    stream: str
    entry_id: str
    error: str
    deliveries: int
    failed_at_ms: int
    fields: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "projection": self.projection,
            "stream": self.stream,
            "entry_id": self.entry_id,
            "error": self.error,
            "deliveries": self.deliveries,
            "failed_at_ms": self.failed_at_ms,
            "fields": self.fields,
        }


def dead_letter_fields(
    projection: str, stream: str, entry_id: str, fields: dict[str, str], error: str, deliveries: int
) -> dict[str, str]:
    return {
        "projection": projection,
        "stream": stream,
        "entry_id": entry_id,
        "error": error[:2000],
        "deliveries": str(deliveries),
        "failed_at_ms": str(int(time.time() * 1000)),
        "entry": json.dumps(fields, separators=(",", ":"))[:1_000_000],
    }


def _parse(dlq_id: str, data: dict[str, str]) -> DeadLetter:
    try:
        fields = json.loads(data.get("entry", "{}"))
    except ValueError:
        fields = {}
    return DeadLetter(
        id=dlq_id,
        projection=data.get("projection", ""),
        stream=data.get("stream", ""),
        entry_id=data.get("entry_id", ""),
        error=data.get("error", ""),
        deliveries=int(data.get("deliveries", "0") or 0),
        failed_at_ms=int(data.get("failed_at_ms", "0") or 0),
        fields=fields if isinstance(fields, dict) else {},
    )


def list_dead_letters(client: redis.Redis, keys: KeyMap, projection: str) -> list[DeadLetter]:
    """Oldest first, one per original entry (a crash can file the same entry twice)."""
    seen: set[tuple[str, str]] = set()
    letters = []
    for dlq_id, data in client.xrange(keys.dead_letters(projection)):
        letter = _parse(dlq_id, data)
        if (letter.stream, letter.entry_id) in seen:
            continue
        seen.add((letter.stream, letter.entry_id))
        letters.append(letter)
    return letters


def get_dead_letter(
    client: redis.Redis, keys: KeyMap, projection: str, dlq_id: str
) -> DeadLetter | None:
    rows = client.xrange(keys.dead_letters(projection), dlq_id, dlq_id)
    return _parse(*rows[0]) if rows else None


def drop_dead_letters(
    client: redis.Redis, keys: KeyMap, projection: str, letters: list[DeadLetter]
) -> int:
    """Remove letters and any duplicate filed for the same original entry."""
    originals = {(d.stream, d.entry_id) for d in letters}
    ids = [
        dlq_id
        for dlq_id, data in client.xrange(keys.dead_letters(projection))
        if (data.get("stream"), data.get("entry_id")) in originals
    ]
    return client.xdel(keys.dead_letters(projection), *ids) if ids else 0


def refile_dead_letters(
    client: redis.Redis, keys: KeyMap, projection: str, failed: list[tuple[DeadLetter, str]]
) -> None:
    """A retry from the dead letters is a delivery too: a letter that fails again is
    filed anew (a new id, at the end) with its delivery count raised and the new error,
    and the old one removed, in one MULTI on the one dead-letter key, so a crash leaves
    either the old letter or the new one, never both or neither."""
    if not failed:
        return
    key = keys.dead_letters(projection)
    pipe = client.pipeline(transaction=True)
    for letter, error in failed:
        pipe.xadd(
            key,
            dead_letter_fields(
                projection,
                letter.stream,
                letter.entry_id,
                letter.fields,
                error,
                letter.deliveries + 1,
            ),
        )
        pipe.xdel(key, letter.id)
    pipe.execute()


def file_dead_letters(
    client: redis.Redis,
    keys: KeyMap,
    projection: str,
    stream: str,
    letters: dict[str, dict[str, str] | None],
    deliveries: dict[str, int],
    errors: dict[str, str],
    log_extra: dict[str, Any],
) -> None:
    """File stream entries (id -> fields, None when the entry is gone) in the
    projection's dead letters and acknowledge them, in one round trip. Two keys in
    different hash tags, so not atomic: a crash in between files the same entry again
    next time, which `cqrs dlq` shows and applies once."""
    commands: list[tuple[Any, ...]] = []
    for eid, found in letters.items():
        fields = found or {}
        letter = dead_letter_fields(projection, stream, eid, fields, errors[eid], deliveries[eid])
        commands.append(
            ("XADD", keys.dead_letters(projection), "*", *[x for kv in letter.items() for x in kv])
        )
        log.error(
            "dead-lettered %s %s after %d deliveries: %s",
            projection,
            eid,
            deliveries[eid],
            errors[eid],
            extra={
                **log_extra,
                "projection": projection,
                "entry_id": eid,
                "event_id": fields.get("event_id"),
                "event_type": fields.get("type"),
                "deliveries": deliveries[eid],
            },
        )
    commands.append(("XACK", stream, projection, *letters))
    for reply in round_trip(client, commands):
        if isinstance(reply, Exception):
            raise reply
