"""The router in front of three real nodes (SPEC §7): route lookup, proxy, admin view, per-IP limit.

One Redis, three `pushctl node` processes and a `pushctl router` are shared by
the module (nothing here changes the set of nodes); the per-IP limit test runs
a second router with the default limits against the same nodes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from conftest import (
    UNLIMITED_ROUTER,
    ConnectionClosed,
    RedisProcess,
    RouterProcess,
    WsClient,
    async_wait_until,
    free_port,
    node_env,
    publish,
    route_many,
    start_nodes,
    token,
    users_by_owner,
)

NODE_IDS = ["node-a", "node-b", "node-c"]


class Cluster:
    def __init__(self, redis: RedisProcess, nodes: list[Any], router: RouterProcess) -> None:
        self.redis = redis
        self.nodes = {node.node_id: node for node in nodes}
        self.router = router


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    redis = RedisProcess(free_port())
    redis.start()
    nodes = start_nodes(redis, NODE_IDS)
    router = RouterProcess(free_port(), redis.url, node_env(**UNLIMITED_ROUTER), [])
    try:
        router.start()
        yield Cluster(redis, nodes, router)
    finally:
        router.stop()
        for node in nodes:
            node.stop()
        redis.kill()


async def open_ws(
    url: str, tok: str | None = None, source: str | None = None, headers: dict[str, str] | None = None
) -> WsClient:
    """A client, optionally bound to a source address (127.0.0.2 is another IP on Linux loopback)."""
    connector = aiohttp.TCPConnector(local_addr=(source, 0)) if source else None
    session = aiohttp.ClientSession(connector=connector)
    try:
        ws = await session.ws_connect(
            url, params={"token": tok} if tok else None, headers=headers, autoclose=False, max_msg_size=0
        )
    except BaseException:
        await session.close()
        raise
    return WsClient(session, ws)


# --- GET /v1/route --------------------------------------------------------------------


async def test_route_is_stable_per_user_and_spreads_3000_users_over_every_node(cluster):
    users = [f"user-{i}" for i in range(3000)]
    routes = await route_many(cluster.router, users)
    shares = Counter(routes.values())
    assert set(shares) == set(NODE_IDS)
    for node_id, count in shares.items():
        assert 0.20 <= count / len(users) <= 0.47, (node_id, count)
    again = await route_many(cluster.router, users[:500])
    assert again == {user: routes[user] for user in users[:500]}


async def test_route_answers_node_and_its_public_url(cluster):
    status, body = cluster.router.get("/v1/route", token("alice"))
    assert status == 200
    assert set(body) == {"node", "url"}
    assert body["url"] == cluster.nodes[body["node"]].url


async def test_route_without_token_is_anonymous_and_bad_tokens_are_refused_like_a_node(cluster):
    status, body = cluster.router.get("/v1/route")
    assert status == 200 and body["node"] in NODE_IDS
    status, body = cluster.router.get("/v1/route", "not-a-jwt")
    assert (status, body["code"]) == (401, "UNAUTHORIZED")
    status, body = cluster.router.get("/v1/route", token("alice", ttl=-10))
    assert (status, body["code"]) == (401, "TOKEN_EXPIRED")
    status, body = cluster.router.get("/v1/route", token("alice", secret="another-secret-0123456789abcdef0123"))
    assert (status, body["code"]) == (401, "UNAUTHORIZED")


# --- GET /ws: the proxy -------------------------------------------------------------------


async def test_client_through_router_is_welcomed_by_the_routed_node_and_receives_its_events(cluster, connect):
    routes = await route_many(cluster.router, [f"trader-{i}" for i in range(30)])
    owners = users_by_owner(routes)
    assert set(owners) == set(NODE_IDS)
    for node_id in NODE_IDS:
        user = owners[node_id][0]
        client = await connect(cluster.router.url, token=token(user))
        assert client.welcome["node"] == node_id
        assert client.welcome["userId"] == user
        key = f"ETH-{uuid.uuid4().hex[:8]}"  # a ticker of its own: none of its latest value before the subscribe
        ack = await client.subscribe(["order.*", f"market.ticker:{key}"])
        assert ack["subscribed"] == ["order.*", f"market.ticker:{key}"]
        private = publish(cluster.redis.url, "order.filled", {"qty": 1}, user_id=user)
        public = publish(cluster.redis.url, "market.ticker", {"price": 2}, key=key)
        events = await client.events(2)
        assert sorted((e["channel"], e["data"]["id"]) for e in events) == sorted(
            [("order.filled", private["id"]), (f"market.ticker:{key}", public["id"])]
        )
        assert {e["data"]["id"]: e["data"] for e in events}[private["id"]] == private


async def test_router_relays_protocol_messages_both_ways(cluster, connect):
    client = await connect(cluster.router.url)
    await client.send({"action": "ping", "id": "p1"})
    assert await client.recv() == {"action": "pong", "id": "p1"}
    await client.send("{not json")
    reply = await client.recv()
    assert (reply["action"], reply["code"]) == ("error", "INVALID_JSON")


async def test_router_refuses_bad_tokens_with_the_node_codes(cluster, connect):
    for target in (cluster.router.url, cluster.nodes["node-a"].url):
        client = await connect(target, token=token("alice", ttl=-10), expect_welcome=False)
        error = await client.recv()
        assert (error["action"], error["code"]) == ("error", "TOKEN_EXPIRED")
        assert await client.closed() == 4001
        client = await connect(target, token="garbage", expect_welcome=False)
        assert (await client.recv())["code"] == "UNAUTHORIZED"
        assert await client.closed() == 4001


async def test_node_close_codes_pass_through_the_router(cluster, connect):
    client = await connect(cluster.router.url)
    for _ in range(40):  # past the 20 messages per second a node accepts
        await client.send({"action": "ping"})
    with pytest.raises(ConnectionClosed):
        while True:
            doc = await client.recv()
            if doc.get("action") == "error":
                assert doc["code"] == "RATE_LIMITED"
    assert client.ws.close_code == 1008


async def test_client_close_code_passes_through_to_the_node(cluster, connect):
    routes = await route_many(cluster.router, ["closer"])
    node = cluster.nodes[routes["closer"]]
    client = await connect(cluster.router.url, token=token("closer"))
    connection_id = client.welcome["connectionId"]
    await client.ws.close(code=4000, message=b"bye")

    def disconnect_code() -> Any:
        for line in node.log_lines():
            if line.get("event") == "disconnect" and line.get("connection") == connection_id:
                return line.get("code") or True
        return None

    assert await async_wait_until(disconnect_code, 5, message="node disconnect log") == 4000


async def test_router_forwards_the_client_ip_and_ignores_client_sent_forwarded_for(cluster):
    client = await open_ws(cluster.router.url, source="127.0.0.2", headers={"X-Forwarded-For": "6.6.6.6"})
    try:
        welcome = await client.recv()
        node = cluster.nodes[welcome["node"]]

        def remote() -> Any:
            for line in node.log_lines():
                if line.get("event") == "connect" and line.get("connection") == welcome["connectionId"]:
                    return line.get("forwarded_for")
            return None

        assert await async_wait_until(remote, 5, message="node connect log") == "127.0.0.2"
    finally:
        await client.close()


# --- admin view, probes, metrics -----------------------------------------------------------------


async def test_cluster_view_requires_an_admin_token(cluster):
    assert cluster.router.get("/v1/cluster")[0] == 401
    assert cluster.router.get("/v1/cluster", "garbage")[0] == 401
    status, body = cluster.router.get("/v1/cluster", token("bob"))
    assert (status, body["code"]) == (403, "FORBIDDEN")


async def test_cluster_view_lists_nodes_connections_ring_share_and_health(cluster, connect):
    routes = await route_many(cluster.router, [f"viewer-{i}" for i in range(30)])
    user = users_by_owner(routes)["node-b"][0]
    await connect(cluster.router.url, token=token(user))
    admin = token("ops", roles=["admin"])

    def node_b_counted() -> Any:
        status, body = cluster.router.get("/v1/cluster", admin)
        assert status == 200
        nodes = {n["id"]: n for n in body["nodes"]}
        return body if nodes["node-b"]["connections"] >= 1 else None

    body = await async_wait_until(node_b_counted, 5, message="heartbeat with the connection count")
    nodes = {n["id"]: n for n in body["nodes"]}
    assert set(nodes) == set(NODE_IDS)
    assert abs(sum(n["share"] for n in nodes.values()) - 1.0) < 0.01
    for node_id, node in nodes.items():
        assert 0.2 < node["share"] < 0.47
        assert node["ready"] and node["healthy"]
        assert node["url"] == cluster.nodes[node_id].url
    assert nodes["node-b"]["proxied"] >= 1
    assert body["connections"] >= 1


async def test_router_probes_and_metrics(cluster):
    status, body = cluster.router.get("/healthz")
    assert status == 200
    status, body = cluster.router.get("/readyz")
    assert status == 200 and body["nodes"] == 3 and body["redis"] is True
    await route_many(cluster.router, ["metrics-user"])
    assert cluster.router.metric("router_nodes") == 3
    assert sum(cluster.router.metric("router_routes_total", f'node="{n}"') for n in NODE_IDS) >= 1


async def test_router_without_nodes_is_not_ready_and_refuses_with_internal(start_router, private_redis, connect):
    router = start_router(redis=private_redis, wait_ready=False)
    status, body = router.get("/readyz")
    assert status == 503 and body["nodes"] == 0
    assert router.get("/v1/route")[0] == 503
    client = await connect(router.url, expect_welcome=False)
    assert (await client.recv())["code"] == "INTERNAL"
    assert await client.closed() == 1011


# --- per-IP limit on new connections ---------------------------------------------------------------


async def test_burst_of_300_connections_from_one_ip_is_limited_while_another_ip_gets_in(cluster, start_router):
    router = start_router(redis=cluster.redis)  # the default limits: 100/s, burst 200
    accepted = rejected = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one() -> str:
            ws = await session.ws_connect(router.url, autoclose=False)
            try:
                first = orjson.loads((await ws.receive(timeout=10)).data)
                if first["action"] == "welcome":
                    return "welcome"
                assert first["code"] == "RATE_LIMITED"
                msg = await ws.receive(timeout=5)
                assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1008
                return "rejected"
            finally:
                await ws.close()

        started = time.monotonic()
        outcomes = Counter(await asyncio.gather(*(one() for _ in range(300))))
        elapsed = time.monotonic() - started
        accepted, rejected = outcomes["welcome"], outcomes["rejected"]
        assert rejected > 0, f"no rejection in a burst of 300 over {elapsed:.2f}s"
        assert accepted >= 200  # the burst is let through
        print(f"burst of 300 over {elapsed:.2f}s: {accepted} accepted, {rejected} rejected")
        assert router.get("/v1/route")[0] == 200  # a lookup is not a connection
        other = await open_ws(router.url, source="127.0.0.2")
        try:
            assert (await other.recv())["action"] == "welcome"
        finally:
            await other.close()
    assert router.metric("connections_rejected_total", 'reason="rate_limited"') >= rejected
