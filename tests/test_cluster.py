"""Membership and scaling with real processes (SPEC §7, §10): join, crash, drain, rebalance, `pushctl up`.

Every test here changes the set of nodes, so each one gets its own Redis, nodes
and router.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
from conftest import (
    UNLIMITED_ROUTER,
    NodeProcess,
    Up,
    async_wait_until,
    free_port,
    http_status,
    node_env,
    route_many,
    start_nodes,
    token,
    up_env,
    users_by_owner,
    wait_until,
)

from cluster.membership import NODE_KEY_PREFIX

USERS = [f"member-{i}" for i in range(3000)]


@pytest.fixture
def nodes_to_stop() -> Iterator[list[NodeProcess]]:
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.stop()


async def test_new_node_is_routable_within_2s_and_only_users_moving_to_it_move(
    private_redis, start_router, nodes_to_stop, connect
):
    fast_rebalance = {"PUSH_REBALANCE_SHARE_PER_SECOND": "1"}  # the whole move within about a second
    nodes_to_stop.extend(start_nodes(private_redis, ["node-1", "node-2", "node-3"], **fast_rebalance))
    router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
    before = await route_many(router, USERS)

    # 60 connected users, to see who the scale-out moves
    connected = USERS[:60]
    clients = {user: await connect(router.url, token=token(user)) for user in connected}
    for user, client in clients.items():
        assert client.welcome["node"] == before[user]

    fourth = NodeProcess(free_port(), "node-4", private_redis.url, node_env(**fast_rebalance), [])
    nodes_to_stop.append(fourth)
    fourth.start()  # returns as soon as its /readyz answers 200
    ready_at = time.monotonic()
    sample = USERS[:300]

    async def some_user_routed_to_fourth() -> bool:
        routes = await route_many(router, sample)
        return "node-4" in routes.values()

    while not await some_user_routed_to_fourth():
        assert time.monotonic() - ready_at < 2.0, "node-4 not routable within 2 s of /readyz"
        await asyncio.sleep(0.05)
    assert time.monotonic() - ready_at < 2.0

    after = await route_many(router, USERS)
    moved = {user for user in USERS if after[user] != before[user]}
    assert {after[user] for user in moved} == {"node-4"}, "a user moved between old nodes"
    assert 0.15 <= len(moved) / len(USERS) <= 0.35, len(moved)

    # the connections of moved users get reconnect + 1012; the others stay
    movers = [user for user in connected if user in moved]
    stayers = [user for user in connected if user not in moved]
    assert movers and stayers
    for user in movers:
        reconnect = await clients[user].recv_action("reconnect", timeout=10)
        assert "rebalance" in reconnect["reason"]
        assert await clients[user].closed() == 1012
        again = await connect(router.url, token=token(user))
        assert again.welcome["node"] == "node-4"
    for user in stayers[:10]:
        await clients[user].send({"action": "ping"})
        assert (await clients[user].recv_action("pong"))["action"] == "pong"


async def test_killed_node_leaves_the_ring_within_10s_and_its_proxied_clients_are_told_to_reconnect(
    private_redis, start_router, nodes_to_stop, connect
):
    nodes_to_stop.extend(start_nodes(private_redis, ["node-1", "node-2", "node-3"]))
    victim = nodes_to_stop[0]
    router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
    routes = await route_many(router, USERS[:300])
    victim_user = users_by_owner(routes)["node-1"][0]
    client = await connect(router.url, token=token(victim_user))
    assert client.welcome["node"] == "node-1"

    assert victim.proc is not None
    victim.proc.kill()
    killed_at = time.monotonic()
    reconnect = await client.recv_action("reconnect", timeout=5)
    assert reconnect["action"] == "reconnect"
    assert await client.closed() == 1012

    admin = token("ops", roles=["admin"])

    async def gone() -> bool:
        _, body = router.get("/v1/cluster", admin)
        listed = {n["id"] for n in body["nodes"]}
        routed = set((await route_many(router, USERS[:300])).values())
        return "node-1" not in listed and "node-1" not in routed

    while not await gone():
        assert time.monotonic() - killed_at < 10.0, "killed node still in the ring after 10 s"
        await asyncio.sleep(0.2)
    victim.proc.wait()
    victim.proc = None
    again = await connect(router.url, token=token(victim_user))
    assert again.welcome["node"] in {"node-2", "node-3"}


async def test_sigterm_leaves_the_ring_at_once_tells_20_clients_to_reconnect_and_exits(
    private_redis, start_router, nodes_to_stop, connect
):
    nodes_to_stop.extend(start_nodes(private_redis, ["node-1", "node-2"], PUSH_DRAIN_SECONDS="1"))
    leaving = nodes_to_stop[0]
    router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
    clients = [await connect(leaving, token=token(f"drained-{i}")) for i in range(20)]
    assert leaving.proc is not None
    leaving.proc.send_signal(signal.SIGTERM)
    signalled_at = time.monotonic()

    async def left_ring() -> bool:
        return "node-1" not in set((await route_many(router, USERS[:200])).values())

    while not await left_ring():
        assert time.monotonic() - signalled_at < 0.5, "a stopping node must leave the ring at once"
        await asyncio.sleep(0.02)

    arrivals = []
    for client in clients:
        reconnect = await client.recv_action("reconnect", timeout=5)
        arrivals.append(time.monotonic())
        assert reconnect["action"] == "reconnect"
        assert await client.closed() == 1012
    assert max(arrivals) - min(arrivals) >= 0.4, "reconnects must be spread over the drain window"
    assert leaving.proc.wait(timeout=10) == 0
    leaving.proc = None


async def test_node_that_crashed_and_restarts_rejoins(private_redis, start_router, nodes_to_stop):
    nodes_to_stop.extend(start_nodes(private_redis, ["node-1", "node-2"]))
    router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
    node = nodes_to_stop[1]
    assert node.proc is not None
    node.proc.kill()
    node.proc.wait()
    node.proc = None
    node.start()  # same id, same port, while its old lease may still be live
    routes = await route_many(router, USERS[:300])
    assert set(routes.values()) == {"node-1", "node-2"}


async def test_membership_survives_a_redis_restart_without_routing_gaps(private_redis, start_router, nodes_to_stop):
    nodes_to_stop.extend(start_nodes(private_redis, ["node-1", "node-2"]))
    router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
    private_redis.kill()
    wait_until(lambda: router.get("/readyz")[1]["redis"] is False, 5, message="router sees Redis gone")
    assert router.get("/readyz")[0] == 200, "a router with a usable ring stays ready without Redis"
    status, body = router.get("/v1/route", token("alice"))
    assert status == 200 and body["node"] in {"node-1", "node-2"}  # routing goes on from the last view
    private_redis.start()  # same port, empty: the nodes must register again by themselves
    registry = private_redis.client()
    deadline = time.monotonic() + 10
    while registry.zcard("push:nodes") < 2:
        assert time.monotonic() < deadline, "nodes did not register again"
        status, body = router.get("/v1/route", token("alice"))
        assert status == 200, body  # never "no node" while they do
        time.sleep(0.02)
    wait_until(lambda: router.get("/readyz")[0] == 200, 5, message="router ready again")
    routes = await route_many(router, USERS[:300])
    assert set(routes.values()) == {"node-1", "node-2"}


# --- pushctl up -------------------------------------------------------------------------------


def test_pushctl_up_starts_a_private_redis_serves_readyz_and_stops_cleanly_on_sigint():
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    up = Up(2, up_env(REDIS_URL=unreachable))
    try:
        wait_until(up.ready, 20, message="pushctl up router /readyz")
        if up.note:
            print(up.note)
        output = up.output()
        assert "private redis-server" in output
        assert "PUSH_JWT_SECRET" in output
        secret = next(line.split("=", 1)[1].strip() for line in output.splitlines() if "PUSH_JWT_SECRET=" in line)
        redis_url = next(word for word in output.split() if word.startswith("redis://") and word != unreachable)
        for port in (up.port + 1, up.port + 2):
            assert http_status(f"http://127.0.0.1:{port}/readyz") == 200
        admin = token("ops", roles=["admin"], secret=secret)
        request = urllib.request.Request(f"http://127.0.0.1:{up.port}/v1/cluster")
        request.add_header("Authorization", f"Bearer {admin}")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        assert up.interrupt() == 0
    finally:
        up.kill()
    for port in (up.port, up.port + 1, up.port + 2):
        assert http_status(f"http://127.0.0.1:{port}/healthz") == 0, f"port {port} still served after SIGINT"
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis.from_url(redis_url, socket_connect_timeout=1).ping()  # the private Redis is gone too
    assert "stopped" in up.output()


def test_pushctl_up_uses_a_reachable_redis_url(private_redis):
    up = Up(1, up_env(REDIS_URL=private_redis.url, PUSH_JWT_SECRET="up-secret-0123456789abcdef0123456789"))
    try:
        wait_until(up.ready, 20, message="pushctl up router /readyz")
        assert f"using the Redis at {private_redis.url}" in up.output()
        assert "generated" not in up.output()
        assert up.interrupt() == 0
    finally:
        up.kill()
    assert private_redis.client().ping()  # not ours to stop


def test_two_pushctl_ups_on_one_redis_stay_separate(private_redis):
    """The second `up` finds a live cluster on REDIS_URL and runs on a private redis-server instead."""
    env = up_env(REDIS_URL=private_redis.url, PUSH_JWT_SECRET="up-secret-0123456789abcdef0123456789")
    first = Up(1, env)
    second: Up | None = None
    try:
        wait_until(first.ready, 20, message="the first pushctl up")
        second = Up(1, env)
        wait_until(second.ready, 20, message="the second pushctl up")
        assert "already serves a live cluster (node-1" in second.output()
        assert "starting a private redis-server" in second.output()
        admin = token("ops", roles=["admin"], secret="up-secret-0123456789abcdef0123456789")
        for up in (first, second):
            request = urllib.request.Request(f"http://127.0.0.1:{up.port}/v1/cluster")
            request.add_header("Authorization", f"Bearer {admin}")
            with urllib.request.urlopen(request, timeout=5) as response:
                [node] = orjson.loads(response.read())["nodes"]
            assert (node["id"], node["url"]) == ("node-1", f"ws://127.0.0.1:{up.port + 1}/ws"), "each its own node-1"
        info = orjson.loads(private_redis.client().hget(NODE_KEY_PREFIX + "node-1", "info"))
        assert info["url"] == f"ws://127.0.0.1:{first.port + 1}/ws", "the first cluster's node-1 was not taken over"
        assert second.interrupt() == 0
        assert first.interrupt() == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()


async def test_pushctl_up_without_redis_runs_one_in_process_node_behind_the_router(connect):
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    no_redis_binary = str(Path(sys.executable).parent)  # PATH without redis-server
    up = Up(2, up_env(REDIS_URL=unreachable, PATH=no_redis_binary))
    try:
        await async_wait_until(up.ready, 20, message="pushctl up router /readyz")
        assert "in-memory bus" in up.output()
        client = await connect(f"ws://127.0.0.1:{up.port}/ws")
        assert client.welcome["node"] == "node-1"
        await client.subscribe(["market.*"])
        up.proc.send_signal(signal.SIGINT)
        assert (await client.recv_action("reconnect"))["action"] == "reconnect"
        assert await client.closed() == 1012
        assert up.proc.wait(timeout=20) == 0
    finally:
        up.kill()
