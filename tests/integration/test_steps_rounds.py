"""The `applied` wake-up rides behind every round of a batch, not only the first.

An order's view is created in round 2 (it needs the customer's name read in round 1);
read-your-writes waiters must be able to see it as soon as that round is done, without
waiting for the acknowledgements.
"""

from __future__ import annotations

import time
from typing import Any

from cqrs.projector.scripts import Scripts
from cqrs.projector.steps import command, run_steps
from cqrs.wiring import Wiring


def test_the_wake_up_follows_every_round(wiring: Wiring) -> None:
    client = wiring.redis
    ns = wiring.settings.namespace
    channel, key = f"{ns}:test-rounds", f"{ns}:test-rounds:{{x}}"
    subscription = client.pubsub(ignore_subscribe_messages=True)
    subscription.subscribe(channel)
    deadline = time.monotonic() + 5
    while subscription.get_message(timeout=0.1) is None and not subscription.subscribed:
        assert time.monotonic() < deadline, "no subscription"
    seen_by_round: list[Any] = []

    def second_round(_result: Any) -> list[Any]:
        return [command("HSET", key, "b", "2", then=third_round)]

    def third_round(_result: Any) -> list[Any]:
        # Round 2's write is visible and its wake-up was sent before round 3 started.
        seen_by_round.append(client.hget(key, "b"))
        return [command("HSET", key, "c", "3")]

    try:
        outcome = run_steps(
            client,
            Scripts(client),
            [[command("HSET", key, "a", "1", then=second_round)]],
            after_each_round=("PUBLISH", channel, "applied"),
        )
        assert outcome.rounds == 3 and outcome.errors == [None]
        messages: list[Any] = []
        deadline = time.monotonic() + 5
        while len(messages) < 3 and time.monotonic() < deadline:
            message = subscription.get_message(timeout=0.5)
            if message is not None:
                messages.append(message["data"])
        assert messages == ["applied"] * 3, messages
        assert seen_by_round == ["2"]
        assert client.hgetall(key) == {"a": "1", "b": "2", "c": "3"}
    finally:
        subscription.close()
        client.delete(key)
