"""Delivering every event again changes nothing: the version gates make a redelivered
entry a no-op, whether it comes back as a copy with a new stream id (a relay that
re-published) or as the same entry read again (a group rewound with XGROUP SETID).

The drained views are snapshotted key by key; after each redelivery the snapshot must be
identical, `verify` must find no difference, and the worker must have recognised every
gated write as a duplicate and applied none.
"""

from __future__ import annotations

import random

from bench.workload import generate
from cqrs.projector.registry import PROJECTIONS
from cqrs.wiring import Wiring
from tests.integration.projector_support import (
    deploy_projections,
    differences,
    drain,
    view_snapshot,
)

SEED = 20_240_611
N_COMMANDS = 300


def _streams(wiring: Wiring) -> list[str]:
    partitions = int(wiring.redis.hget(wiring.keys.meta(), "partitions"))
    return [wiring.keys.stream(p) for p in range(partitions)]


def _entries(wiring: Wiring) -> int:
    return sum(wiring.redis.xlen(s) for s in _streams(wiring))


def test_redelivered_events_change_no_view(wiring: Wiring) -> None:
    deploy_projections(wiring)
    report = generate(random.Random(SEED), wiring, N_COMMANDS)
    assert report.committed > 0.9 * N_COMMANDS, report.summary()
    first = drain(wiring)
    events = _entries(wiring)
    groups = len(PROJECTIONS)
    assert events == report.events
    assert first.stats.applied > 0
    assert first.stats.duplicates == first.stats.dead_lettered == first.stats.failed == 0
    assert first.stats.acked == events * groups
    assert differences(wiring) == []
    before = view_snapshot(wiring)
    assert len(before) > report.committed_by_command["CreateProduct"]  # views, not just noise

    # (1) Every entry again as a copy with a new id, as a relay that re-published would.
    pipe = wiring.redis.pipeline(transaction=False)
    for stream in _streams(wiring):
        for _entry_id, fields in wiring.redis.xrange(stream):
            pipe.xadd(stream, fields)
    pipe.execute()
    assert _entries(wiring) == 2 * events

    copies = drain(wiring)
    assert copies.stats.acked == events * groups  # every copy was delivered to every group
    assert copies.stats.applied == 0
    assert copies.stats.duplicates == first.stats.applied  # each gated write seen as done
    assert copies.stats.dead_lettered == copies.stats.failed == 0
    assert view_snapshot(wiring) == before
    assert differences(wiring) == []

    # (2) Rewind every group to the start: originals and copies are all delivered again.
    for stream in _streams(wiring):
        for group in PROJECTIONS:
            assert wiring.redis.xgroup_setid(stream, group, "0")
    rewound = drain(wiring)
    assert rewound.stats.acked == 2 * events * groups
    assert rewound.stats.applied == 0
    assert rewound.stats.duplicates == 2 * first.stats.applied
    assert rewound.stats.dead_lettered == rewound.stats.failed == 0
    assert view_snapshot(wiring) == before
    assert differences(wiring) == []
