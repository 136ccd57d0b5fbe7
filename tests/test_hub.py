"""The hub in-process (no sockets): who receives a bus message, by route, with a fake transport.

These pin the hot path of SPEC §3 bus routing in milliseconds: a user channel reaches
only that user's connections, ``push:admin`` only admins other than the user, plain
``events:`` private events both; nothing is parsed for a node that holds no recipient;
interest is reference-counted through the broker as connections and patterns come and go.
"""

from __future__ import annotations

import orjson
import pytest
from fakes import FakeTransport

from cluster.auth import Identity
from cluster.broker import Broker
from cluster.bus_routing import routed_message
from cluster.channels import parse_pattern
from cluster.envelope import build_envelope
from cluster.metrics import BUS_COUNTS
from cluster.settings import Settings
from node.connection import ClientConnection, Subscription
from node.hub import Hub


class CountingBus(Broker):
    """A broker that only counts what the hub wants (the interest, without Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    async def run(self, handler):  # pragma: no cover - not used
        raise NotImplementedError

    async def publish(self, channel, message):  # pragma: no cover - not used
        raise NotImplementedError

    def want(self, names):
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1

    def unwant(self, names):
        for name in names:
            self.counts[name] -= 1
            if not self.counts[name]:
                del self.counts[name]


@pytest.fixture
def hub():
    return Hub("n", ["market"], 65536, CountingBus())


def connect(hub: Hub, user: str | None, *patterns: str, admin: bool = False) -> tuple[ClientConnection, FakeTransport]:
    transport = FakeTransport()
    roles = frozenset({"admin"}) if admin else frozenset()
    conn = ClientConnection(f"c{len(hub.connections)}", Identity(user, roles), None, transport, Settings(), None)  # type: ignore[arg-type]
    hub.add(conn)
    for text in patterns:
        hub.subscribe(conn, Subscription(parse_pattern(text), 3, None))
    return conn, transport


def private(user: str, event_type: str = "order.filled") -> tuple[str, bytes]:
    envelope = build_envelope(event_type, {"n": 1}, source="order-executor", user_id=user)
    return envelope["id"], orjson.dumps(envelope)


async def test_a_user_channel_reaches_only_that_users_connections(hub):
    _, alice = connect(hub, "alice", "order.*")
    _, bob = connect(hub, "bob", "order.*")
    _, admin = connect(hub, "ops", "order.*", admin=True)
    event_id, raw = private("alice")
    hub.on_bus_message(b"push:user:{alice}", routed_message("order.filled", raw))
    assert [e["data"]["id"] for e in alice.events()] == [event_id]
    assert bob.events() == [] and admin.events() == [], "admins get it from push:admin, not twice"
    hub.on_bus_message(b"push:admin", routed_message("order.filled", raw))
    assert [e["data"]["id"] for e in admin.events()] == [event_id]
    assert len(alice.events()) == 1, "the user is not an admin recipient of its own event"


async def test_an_admin_who_is_the_user_gets_its_event_once(hub):
    _, both = connect(hub, "alice", "order.*", admin=True)
    _, raw = private("alice")
    hub.on_bus_message(b"push:user:{alice}", routed_message("order.filled", raw))
    hub.on_bus_message(b"push:admin", routed_message("order.filled", raw))
    assert len(both.events()) == 1


async def test_nothing_is_parsed_when_no_local_connection_can_want_it(hub):
    connect(hub, "alice", "market.ticker:BTC")
    before = BUS_COUNTS.unwanted
    hub.on_bus_message(b"push:user:{alice}", routed_message("order.filled", b"not even json"))
    hub.on_bus_message(b"push:user:{carol}", b"anything at all")
    hub.on_bus_message(b"push:admin", b"anything at all")
    hub.on_bus_message(b"events:market.ticker:ETH", b"not json either")
    assert BUS_COUNTS.unwanted == before + 4


async def test_an_event_of_another_user_on_a_user_channel_is_dropped(hub):
    _, alice = connect(hub, "alice", "order.*")
    _, raw = private("mallory")
    hub.on_bus_message(b"push:user:{alice}", routed_message("order.filled", raw))
    hub.on_bus_message(b"push:user:{alice}", routed_message("order.created", private("alice")[1]))
    assert alice.events() == [], "a user mismatch and a type mismatch are both malformed"


async def test_interest_follows_connections_and_patterns(hub):
    bus: CountingBus = hub.bus
    first, _ = connect(hub, "alice", "order.*", "market.ticker:BTC")
    second, _ = connect(hub, "alice", "order.*")
    anonymous, _ = connect(hub, None, "*")
    assert bus.counts == {
        "push:user:{alice}": 2,
        "events:order.*": 2,
        "events:market.ticker:BTC": 1,
        "events:market.*": 1,  # an anonymous * needs only the public domains
    }
    hub.unsubscribe(first, parse_pattern("market.ticker:BTC"))
    hub.remove(second)
    assert bus.counts == {"push:user:{alice}": 1, "events:order.*": 1, "events:market.*": 1}
    hub.reidentify(anonymous, Identity("carol"))  # logging in widens * to the whole bus
    assert bus.counts["events:*"] == 1 and "events:market.*" not in bus.counts
    assert bus.counts["push:user:{carol}"] == 1
    hub.remove(first)
    hub.remove(anonymous)
    assert bus.counts == {}


async def test_a_plain_publish_of_a_private_event_reaches_user_and_admins(hub):
    _, alice = connect(hub, "alice", "order.*")
    _, admin = connect(hub, "ops", "order.*", admin=True)
    _, raw = private("alice")
    hub.on_bus_message(b"events:order.filled", raw)
    assert len(alice.events()) == 1 and len(admin.events()) == 1



# --- fan-out, authorization and priorities, in the style of Centrifuge's hub tests -------------


def public(event_type: str = "market.ticker", priority: str | None = None) -> tuple[str, bytes]:
    envelope = build_envelope(event_type, {"p": 1}, source="market-data-collector", priority=priority)
    return envelope["id"], orjson.dumps(envelope)


async def test_one_event_fans_out_to_every_subscriber_as_one_shared_frame(hub):
    transports = [connect(hub, None, "market.ticker:BTC")[1] for _ in range(50)]
    _, other = connect(hub, None, "market.ticker:ETH")
    event_id, raw = public()
    hub.on_bus_message(b"events:market.ticker:BTC", raw)
    assert all(len(t.frames) == 1 for t in transports)
    assert len({id(t.frames[0]) for t in transports}) == 1, "encoded once, written to each"
    assert transports[0].events()[0]["data"]["id"] == event_id
    assert other.frames == []


async def test_a_private_event_published_plainly_reaches_only_its_user_and_admins(hub):
    _, alice = connect(hub, "alice", "order.*")
    _, bob = connect(hub, "bob", "order.*")
    _, anonymous = connect(hub, None, "*")
    _, admin = connect(hub, "ops", "*", admin=True)
    event_id, raw = private("alice")
    hub.on_bus_message(b"events:order.filled", raw)
    assert [e["data"]["id"] for e in alice.events()] == [event_id]
    assert [e["data"]["id"] for e in admin.events()] == [event_id]
    assert bob.frames == [] and anonymous.frames == []


async def test_a_subscription_gets_only_events_of_its_priority_or_higher(hub):
    conn, transport = connect(hub, None)
    hub.subscribe(conn, Subscription(parse_pattern("market.*"), 1, None))  # options.priority p1
    sent: dict[str, str] = {}
    for priority in ("p0", "p1", "p2", "p3"):
        envelope = build_envelope("market.trades", {}, source="market-data-collector", priority=priority)
        sent[priority] = envelope["id"]
        hub.on_bus_message(b"events:market.trades", orjson.dumps(envelope))
    assert [e["data"]["id"] for e in transport.events()] == [sent["p0"], sent["p1"]]


async def test_a_state_value_older_than_the_newest_seen_is_dropped_but_a_restarted_counter_is_not(hub):
    _, transport = connect(hub, None, "market.ticker:LATE")

    def ticker(seq: int, timestamp: int) -> bytes:
        envelope = build_envelope("market.ticker", {"seq": seq}, source="market-data-collector")
        envelope.update(seq=seq, timestamp=timestamp)
        return orjson.dumps(envelope)

    for seq, timestamp in ((5, 1_000), (4, 990), (6, 1_010), (1, 5_000)):  # 4 arrives late; 1: Redis was flushed
        hub.on_bus_message(b"events:market.ticker:LATE", ticker(seq, timestamp))
    assert [e["seq"] for e in transport.events()] == [5, 6, 1]
