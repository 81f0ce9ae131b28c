"""The relay's trim survives a worker acknowledging between its two reads.

Found by the 10-minute soak (`python -m bench.soak`, seed 1): `_safe_trim_id` read XINFO GROUPS
(pending > 0), then XPENDING for the oldest pending id; a worker that acknowledged the last
pending entries in between left XPENDING's `min` empty (None), and the relay crashed with
AttributeError, three times in 20 s while workers caught up after an outage.
"""

from __future__ import annotations

from typing import Any

from cqrs.relay.outbox import Relay
from cqrs.streams import parse_entry_id
from cqrs.wiring import Wiring


def test_trim_when_the_pending_entries_are_acked_between_the_two_reads(wiring: Wiring) -> None:
    settings = wiring.settings.model_copy(update={"stream_retention": 5})
    relay = Relay(wiring.database_url, wiring.redis, settings)
    stream = wiring.keys.stream(0)
    ids = [wiring.redis.xadd(stream, {"n": str(i)}) for i in range(20)]
    wiring.redis.xgroup_create(stream, "g", id="0")
    read = wiring.redis.xreadgroup("g", "c", {stream: ">"}, count=15)
    delivered = [entry_id for entry_id, _ in read[0][1]]

    real_xinfo_groups = wiring.redis.xinfo_groups

    def xinfo_then_ack(name: str) -> list[dict[str, Any]]:
        groups = real_xinfo_groups(name)  # reports 15 pending
        wiring.redis.xack(stream, "g", *delivered)  # a worker acknowledges meanwhile
        return groups

    relay.redis.xinfo_groups = xinfo_then_ack  # type: ignore[method-assign]
    try:
        relay.trim_streams(force=True)
    finally:
        relay.redis.xinfo_groups = real_xinfo_groups  # type: ignore[method-assign]

    remaining = [entry_id for entry_id, _ in wiring.redis.xrange(stream)]
    # Nothing the group had not finished was trimmed (the last-delivered bound still holds).
    assert set(ids[15:]) <= set(remaining)
    assert all(parse_entry_id(e) >= parse_entry_id(remaining[0]) for e in ids[15:])
