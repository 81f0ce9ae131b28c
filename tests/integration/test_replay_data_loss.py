"""A replay during which Redis loses its data (FLUSHALL, a restart without persistence, a
failover to an empty replica) must give up, not switch to what it built after the loss.

Found by the soak (`python -m bench.soak`, FLUSHALL while workers rebuilt from the log): the replay
noticed the lost lock only when its keeper next renewed it (every 5 s), kept applying in
the meantime, filed every event whose predecessor had vanished as a dead letter, and when
it finished within that window it switched to a generation missing everything applied
before the loss.
"""

from __future__ import annotations

import pytest

from cqrs.commands.catalog import CreateProduct, RenameProduct
from cqrs.projector.deadletters import list_dead_letters
from cqrs.projector.registry import PROJECTIONS
from cqrs.projector.replay import Replayer, ReplayError
from cqrs.projector.state import read_state
from cqrs.wiring import Wiring
from tests.conftest import delete_namespace
from tests.integration.projector_support import differences, drain, run


def test_a_replay_that_loses_its_data_midway_fails_and_files_nothing(wiring: Wiring) -> None:
    products = [
        run(wiring, CreateProduct(sku=f"S-{i}", name=f"N{i}", price="1.00", stock=1)).id
        for i in range(20)
    ]
    for pid in products:
        run(wiring, RenameProduct(product_id=pid, name=f"Renamed {pid}"))
    drain(wiring)
    assert differences(wiring) == []

    batches = []

    def progress(done: int, _total: int) -> None:
        batches.append(done)
        if len(batches) == 2:  # the first batch is applied: now Redis loses everything
            delete_namespace(wiring.redis_url, wiring.keys.ns)

    replayer = Replayer(
        wiring.redis, wiring.settings, PROJECTIONS["products"], wiring.database_url, batch_size=10
    )
    with pytest.raises(ReplayError, match="lost its lock"):
        replayer.run("log", progress=progress)

    assert len(batches) == 2, "the replay went on after its data was gone"
    assert read_state(wiring.redis, wiring.keys, "products") is None  # no switch
    assert list_dead_letters(wiring.redis, wiring.keys, "products") == []
    assert replayer.dead_lettered == 0

    # The workers rebuild what was lost, from the log, as after any data loss.
    drain(wiring)
    assert differences(wiring) == []
    assert list_dead_letters(wiring.redis, wiring.keys, "products") == []
