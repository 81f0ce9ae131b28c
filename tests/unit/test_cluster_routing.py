"""The routing rule of packed round trips on a Redis Cluster (cqrs.redisio.command_key):
which key sends each command of ours to its master. No I/O."""

from __future__ import annotations

import pytest

from cqrs.redisio import command_key, publish_command, slot_of


@pytest.mark.parametrize(
    ("command", "key"),
    [
        (("HGETALL", "ns:products:g1:product:{a}"), "ns:products:g1:product:{a}"),
        (("XADD", "ns:stream:{p3}", "*", "f", "v"), "ns:stream:{p3}"),
        (("XACK", "ns:stream:{p3}", "orders", "1-0"), "ns:stream:{p3}"),
        (("XPENDING", "ns:stream:{p3}", "orders", "IDLE", 200, "-", "+", 10), "ns:stream:{p3}"),
        (("XCLAIM", "ns:stream:{p3}", "orders", "w1", 0, "1-0"), "ns:stream:{p3}"),
        (("EVALSHA", "f" * 40, 2, "ns:o:g1:order:{x}", "ns:o:g1:gate:{x}", 1), "ns:o:g1:order:{x}"),
        (("EVALSHA", "f" * 40, 0, "arg"), None),
        (
            ("XREADGROUP", "GROUP", "orders", "w1", "COUNT", 500, "STREAMS", "ns:stream:{p5}", ">"),
            "ns:stream:{p5}",
        ),
        (("xreadgroup", "GROUP", "g", "c", "streams", "ns:stream:{p1}", ">"), "ns:stream:{p1}"),
        (("PUBLISH", "ns:applied", 3), None),
        (("SPUBLISH", "ns:applied", 3), "ns:applied"),
        (("PING",), None),
        ((b"HGET", b"ns:x:{k}", b"f"), b"ns:x:{k}"),
    ],
)
def test_every_command_is_routed_by_its_key(command: tuple, key: object) -> None:
    assert command_key(command) == key


def test_a_scripts_keys_share_the_slot_of_the_first() -> None:
    assert slot_of("ns:o:g1:order:{x}") == slot_of("ns:o:g1:gate:{x}") == slot_of("{x}")


def test_wake_ups_are_sharded_only_on_a_cluster() -> None:
    class OneNode:
        pass

    class Cluster:
        nodes_manager = object()

    assert publish_command(OneNode(), "ns:relay", 1) == ("PUBLISH", "ns:relay", 1)
    assert publish_command(Cluster(), "ns:relay", 1) == ("SPUBLISH", "ns:relay", 1)
