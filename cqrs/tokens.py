"""Consistency tokens: what a write printed, so a later query can wait for it.

A token names the aggregate versions a command produced (with each event's partition
key). A projection reflects the write once, for every aggregate, the version it recorded
as applied is at least the token's: exact (no clocks) and one pipelined read to check.
The encoding is opaque to users: URL-safe base64 of compact JSON.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from uuid import UUID

from cqrs.events import AGGREGATE_TYPES


class TokenError(ValueError):
    """A token that was not printed by a write command."""


@dataclass(frozen=True, order=True)
class AggregateVersion:
    aggregate_type: str
    aggregate_id: UUID
    version: int
    partition_key: UUID


def encode_token(versions: list[AggregateVersion]) -> str:
    latest: dict[tuple[str, UUID], AggregateVersion] = {}
    for v in versions:
        key = (v.aggregate_type, v.aggregate_id)
        if key not in latest or latest[key].version < v.version:
            latest[key] = v
    body = [
        [v.aggregate_type[0], v.aggregate_id.hex, v.version]
        + ([] if v.partition_key == v.aggregate_id else [v.partition_key.hex])
        for v in sorted(latest.values())
    ]
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> list[AggregateVersion]:
    by_initial = {t[0]: t for t in AGGREGATE_TYPES}
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        versions = []
        for item in body:
            kind, agg_id, version, *rest = item
            aggregate_id = UUID(hex=agg_id)
            partition_key = UUID(hex=rest[0]) if rest else aggregate_id
            versions.append(
                AggregateVersion(by_initial[kind], aggregate_id, int(version), partition_key)
            )
        return versions
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError, IndexError):
        raise TokenError("invalid consistency token") from None
