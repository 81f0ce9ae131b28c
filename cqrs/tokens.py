"""Consistency tokens: what a write printed, so a later query can wait for it.

A token names the aggregate versions a command produced. A view reflects the write once
each aggregate's view shows at least that version, which is exact (no clocks) and cheap
to check. The encoding is opaque to users: URL-safe base64 of compact JSON.
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


def encode_token(versions: list[AggregateVersion]) -> str:
    body = [[v.aggregate_type[0], v.aggregate_id.hex, v.version] for v in sorted(set(versions))]
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> list[AggregateVersion]:
    by_initial = {t[0]: t for t in AGGREGATE_TYPES}
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
        return [
            AggregateVersion(by_initial[kind], UUID(hex=agg_id), int(version))
            for kind, agg_id, version in body
        ]
    except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise TokenError("invalid consistency token") from None
