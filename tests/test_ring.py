"""The pure parts of routing (SPEC §7): the ketama ring and the per-IP connection limiter."""

from __future__ import annotations

from collections import Counter

from cluster.auth import ANONYMOUS, Identity
from cluster.membership import NodeInfo
from cluster.ring import Ring, routing_key
from router.admission import ConnectionRateLimiter
from router.relay import sendable_close_code

USERS = [f"user-{i}" for i in range(10_000)]


def test_adding_one_node_to_n_moves_about_one_in_n_plus_one_users_all_onto_it():
    for n in (2, 3, 5, 8):
        old = Ring(f"node-{i}" for i in range(n))
        new = Ring(f"node-{i}" for i in range(n + 1))
        moved = [u for u in USERS if old.node_for(u) != new.node_for(u)]
        assert {new.node_for(u) for u in moved} == {f"node-{n}"}
        assert abs(len(moved) / len(USERS) - 1 / (n + 1)) < 0.06, (n, len(moved))


def test_removing_a_node_moves_only_its_users():
    old = Ring(["a", "b", "c", "d"])
    new = Ring(["a", "b", "d"])
    for user in USERS[:3000]:
        if old.node_for(user) != "c":
            assert new.node_for(user) == old.node_for(user)


def test_ring_is_deterministic_and_independent_of_order():
    assert all(Ring(["x", "y", "z"]).node_for(u) == Ring(["z", "x", "y"]).node_for(u) for u in USERS[:500])


def test_three_nodes_share_users_and_hash_space_evenly():
    ring = Ring(["node-1", "node-2", "node-3"])
    counts = Counter(ring.node_for(u) for u in USERS)
    assert all(0.25 < c / len(USERS) < 0.42 for c in counts.values())
    shares = ring.shares()
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert all(0.25 < s < 0.42 for s in shares.values())


def test_candidates_start_with_the_owner_and_list_every_node_once():
    ring = Ring(["a", "b", "c"])
    for user in USERS[:200]:
        candidates = list(ring.candidates(user))
        assert candidates[0] == ring.node_for(user)
        assert sorted(candidates) == ["a", "b", "c"]


def test_empty_ring_owns_nothing():
    ring = Ring()
    assert ring.node_for("alice") is None and list(ring.candidates("alice")) == [] and ring.shares() == {}


def test_routing_key_is_the_user_or_a_fresh_random_key():
    assert routing_key(Identity("alice")) == "alice"
    assert routing_key(ANONYMOUS) != routing_key(ANONYMOUS)


def test_ip_limiter_allows_the_burst_then_the_rate():
    limiter = ConnectionRateLimiter(rate=100, burst=200)
    assert sum(limiter.allow("10.0.0.1", 0.0) for _ in range(300)) == 200
    assert limiter.allow("10.0.0.2", 0.0)  # another address has its own bucket
    assert sum(limiter.allow("10.0.0.1", 0.5) for _ in range(100)) == 50


def test_ip_limiter_table_is_bounded():
    limiter = ConnectionRateLimiter(rate=1, burst=5, max_ips=1000)
    for i in range(10_000):
        limiter.allow(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=i * 0.001)
    assert len(limiter) <= 1000


def test_close_codes_that_may_not_be_sent_are_recognised():
    assert all(sendable_close_code(c) for c in (1000, 1008, 1011, 1012, 4001, 4029))
    assert not any(sendable_close_code(c) for c in (None, 999, 1005, 1006, 1015, 2000))


def test_node_record_round_trips_through_json():
    info = NodeInfo("node-1", "ws://h:8081/ws", "http://h:8081", connections=7, started_at=123)
    assert NodeInfo.from_json(info.to_json(), 456) == NodeInfo(
        "node-1", "ws://h:8081/ws", "http://h:8081", connections=7, started_at=123, updated_at=456
    )
