"""Production behaviour of routers and nodes (issue 16): Redis outages, departed nodes, the metrics port.

Real processes: a private redis-server is stopped for 15 s under a router and
two nodes. The router stays ready (it holds a usable ring), a connection it
already proxies keeps working, and new connections are routed on the cached
ring; Redis health shows in ``router_redis_connected`` instead. A node that
leaves the ring takes its ``node``-labelled router series with it. With
``PUSH_METRICS_PORT`` set, ``/metrics`` leaves the client port for its own.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import uuid

from conftest import UNLIMITED_ROUTER, async_wait_until, free_port, start_nodes, token

OUTAGE_SECONDS = 15.0
PROBE_PERIOD = 0.25  # under the node's 20 client messages/s per connection


def node_series(router, node_id: str) -> list[str]:
    return [line for line in router.metrics().splitlines() if f'node="{node_id}"' in line]


async def test_router_stays_ready_and_routes_on_its_cached_ring_while_redis_is_down(
    private_redis, start_router, connect
):
    nodes = start_nodes(private_redis, ["blip-1", "blip-2"])
    try:
        router = start_router(redis=private_redis, **UNLIMITED_ROUTER)
        assert router.metric("router_redis_connected") == 1
        before = await connect(router.url, token=token(f"before-{uuid.uuid4().hex[:8]}"))
        assert before.welcome["node"] in {"blip-1", "blip-2"}

        private_redis.kill()
        await async_wait_until(lambda: router.get("/readyz")[1]["redis"] is False, 10, message="router sees Redis gone")
        assert router.metric("router_redis_connected") == 0
        down_until = time.monotonic() + OUTAGE_SECONDS
        welcomed: set[str] = set()
        round_number = 0
        while time.monotonic() < down_until:
            status, body = router.get("/readyz")
            assert status == 200 and body["nodes"] == 2, body  # the load balancer keeps this router
            await before.send({"action": "ping", "id": f"p{round_number}"})
            assert await before.recv_action("pong") == {"action": "pong", "id": f"p{round_number}"}
            client = await connect(router.url, token=token(f"outage-{round_number}"))
            welcomed.add(client.welcome["node"])
            await client.close()
            round_number += 1
            await asyncio.sleep(PROBE_PERIOD)  # paces the probes of a fixed-length outage; waits for nothing
        assert welcomed == {"blip-1", "blip-2"}, "new clients are spread over the cached ring"
        assert not before.ws.closed

        private_redis.start()
        await async_wait_until(
            lambda: router.metric("router_redis_connected") == 1, 15, message="router reads Redis again"
        )
        status, body = router.get("/readyz")
        assert status == 200 and body["redis"] is True
    finally:
        for node in nodes:
            node.stop()


async def test_a_node_that_leaves_takes_its_router_series_with_it(redis_server, start_router, connect):
    nodes = start_nodes(redis_server, [f"leaving-{uuid.uuid4().hex[:6]}", f"staying-{uuid.uuid4().hex[:6]}"])
    leaving = nodes[0]
    try:
        router = start_router(**UNLIMITED_ROUTER)
        await async_wait_until(lambda: router.get("/readyz")[1]["nodes"] >= 2, 5, message="both nodes in the ring")
        client = None
        seen: set[str] = set()
        for i in range(200):
            candidate = await connect(router.url, token=token(f"series-{i}"))
            seen.add(candidate.welcome["node"])
            if candidate.welcome["node"] == leaving.node_id and client is None:
                client = candidate
            else:
                await candidate.close()
            if client is not None and len(seen) == 2:
                break
        assert client is not None and len(seen) == 2, "users hashed to both nodes"
        assert any(line.startswith("router_proxied_connections{") for line in node_series(router, leaving.node_id))
        assert any(line.startswith("router_routes_total{") for line in node_series(router, leaving.node_id))

        leaving.stop()  # SIGTERM: leaves the ring, then sends its clients reconnect + 1012
        assert await client.closed() == 1012
        await async_wait_until(
            lambda: not node_series(router, leaving.node_id), 10, message="the departed node's series removed"
        )
        staying = nodes[1].node_id
        assert node_series(router, staying), "the live node's series stay"
    finally:
        for node in nodes:
            node.stop()


def http_status(url: str) -> int:
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_metrics_port_moves_metrics_off_the_client_port(redis_server, start_node, start_router):
    node_metrics, router_metrics = free_port(), free_port()
    node = start_node(node_id=f"metrics-{uuid.uuid4().hex[:6]}", PUSH_METRICS_PORT=str(node_metrics))
    router = start_router(PUSH_METRICS_PORT=str(router_metrics))
    for process, port, family in ((node, node_metrics, "ws_connections_total"), (router, router_metrics, "router_nodes")):
        assert http_status(process.http + "/metrics") == 404, "not on the client port"
        assert http_status(process.http + "/readyz") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert response.status == 200
            assert f"# TYPE {family} gauge" in response.read().decode()
        assert http_status(f"http://127.0.0.1:{port}/ws") == 404, "the metrics port serves nothing else"
