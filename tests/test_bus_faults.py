"""The node survives Redis going away (issue 2): a real redis-server is killed
under a live subscription and started again on the same port.

The node keeps every client connection open while the bus is down, reports
not-ready on ``/readyz`` (503) until it has resubscribed, counts the recovery in
``redis_reconnects_total`` and delivers again to the same connections.
"""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid

from conftest import async_wait_until, publish, token


def readyz_status(node) -> int:
    try:
        with urllib.request.urlopen(node.http + "/readyz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def healthz_status(node) -> int:
    try:
        with urllib.request.urlopen(node.http + "/healthz", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_redis_restart_keeps_clients_and_resumes_delivery(start_node, private_redis, connect):
    node = start_node(node_id="bus-faults", redis=private_redis)
    alice = f"alice-{uuid.uuid4().hex[:8]}"
    key = uuid.uuid4().hex[:8]
    public = await connect(node)
    await public.subscribe([f"market.ticker:{key}"])
    private = await connect(node, token=token(alice))
    await private.subscribe(["order.*"])
    first = publish(private_redis.url, "market.ticker", {"n": 1}, key=key)
    assert (await public.events(1))[0]["data"] == first
    reconnects_before = node.metric("redis_reconnects_total")
    assert readyz_status(node) == 200

    private_redis.kill()
    await async_wait_until(lambda: readyz_status(node) == 503, timeout=10, message="/readyz 503 while Redis is down")
    assert healthz_status(node) == 200, "the process is alive even without its bus"
    for client in (public, private):  # connections stay open and served while the bus is down
        await client.send({"action": "ping", "id": "down"})
        assert (await client.recv_action("pong")) == {"action": "pong", "id": "down"}

    private_redis.start()
    await async_wait_until(lambda: readyz_status(node) == 200, timeout=15, message="/readyz 200 after Redis is back")
    assert node.metric("redis_reconnects_total") >= reconnects_before + 1

    second = publish(private_redis.url, "market.ticker", {"n": 2}, key=key)
    assert (await public.events(1))[0]["data"] == second
    third = publish(private_redis.url, "order.filled", {"n": 3}, user_id=alice)
    assert (await private.events(1))[0]["data"] == third
    assert not public.ws.closed and not private.ws.closed


async def test_node_subscribes_again_after_each_of_several_restarts(start_node, private_redis, connect):
    node = start_node(node_id="bus-faults-twice", redis=private_redis)
    key = uuid.uuid4().hex[:8]
    client = await connect(node)
    await client.subscribe([f"market.trades:{key}"])
    reconnects_before = node.metric("redis_reconnects_total")
    for round_number in range(2):
        private_redis.kill()
        await async_wait_until(lambda: readyz_status(node) == 503, timeout=10, message="/readyz 503")
        private_redis.start()
        await async_wait_until(lambda: readyz_status(node) == 200, timeout=15, message="/readyz 200")
        envelope = publish(private_redis.url, "market.trades", {"round": round_number}, key=key)
        assert (await client.events(1))[0]["data"] == envelope
    assert node.metric("redis_reconnects_total") >= reconnects_before + 2


async def test_new_clients_are_accepted_after_redis_comes_back(start_node, private_redis, connect):
    node = start_node(node_id="bus-faults-new", redis=private_redis)
    private_redis.kill()
    await async_wait_until(lambda: readyz_status(node) == 503, timeout=10, message="/readyz 503")
    private_redis.start()
    await async_wait_until(lambda: readyz_status(node) == 200, timeout=15, message="/readyz 200")
    bob = f"bob-{uuid.uuid4().hex[:8]}"
    client = await connect(node, token=token(bob))
    assert client.welcome["userId"] == bob
    await client.subscribe(["risk.*"])
    envelope = publish(private_redis.url, "risk.alert", {"level": "high"}, user_id=bob)
    assert (await client.events(1))[0]["data"] == envelope


async def test_redis_refusing_subscribe_keeps_clients_and_catches_up_from_history(start_node, private_redis, connect):
    """An ACL that stops allowing the node's user channels: the bus reconnects until it may
    subscribe again, clients stay connected, and what was published meanwhile is delivered."""
    admin = private_redis.client()
    try:
        admin.execute_command("ACL", "SETUSER", "node", "on", ">node-password", "~*", "+@all", "allchannels")
        url = f"redis://node:node-password@127.0.0.1:{private_redis.port}/0"
        from conftest import NodeProcess, free_port, node_env

        node = NodeProcess(free_port(), "bus-acl", url, node_env(), [])
        node.start()
        try:
            alice = f"alice-{uuid.uuid4().hex[:8]}"
            client = await connect(node, token=token(alice))
            await client.subscribe(["order.*"])
            first = publish(private_redis.url, "order.filled", {"n": 1}, user_id=alice)
            assert (await client.events(1))[0]["data"] == first

            admin.execute_command(
                "ACL", "SETUSER", "node", "resetchannels", "&events:*", "&spirit:events", "&push:membership"
            )
            await async_wait_until(lambda: readyz_status(node) == 503, timeout=10, message="/readyz 503 while refused")
            await async_wait_until(
                lambda: any(
                    line.get("event") == "bus_refused" and "NOPERM" in line.get("detail", "") for line in node.log_lines()
                ),
                timeout=10,
                message="the node to log that Redis refuses its SUBSCRIBE",
            )
            missed = [publish(private_redis.url, "order.filled", {"n": n}, user_id=alice) for n in (2, 3)]
            admin.execute_command("ACL", "SETUSER", "node", "allchannels")
            await async_wait_until(lambda: readyz_status(node) == 200, timeout=15, message="/readyz 200 when allowed")
            assert [e["data"] for e in await client.events(2, timeout=10)] == missed
            live = publish(private_redis.url, "order.filled", {"n": 4}, user_id=alice)
            assert (await client.events(1))[0]["data"] == live
            assert not client.ws.closed
            assert any(
                line.get("event") == "bus_refused" and "NOPERM" in line.get("detail", "") for line in node.log_lines()
            )
        finally:
            node.stop()
    finally:
        admin.close()
