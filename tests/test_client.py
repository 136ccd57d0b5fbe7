"""The Python PushClient (SPEC §8 client side): reconnects, resumes from its cursor, deduplicates."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

from conftest import ROOT, async_wait_until, node_env, publish, token

from cluster.client import PushClient


async def test_client_survives_a_node_crash_and_receives_each_missed_event_once(start_node):
    node = start_node("client-crash")
    received: list[dict] = []
    client = PushClient(node.url, token=token("mona"), min_backoff=0.05, max_backoff=0.3)
    client.subscribe(["order.*"], received.append)
    async with client:
        await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
        before = [publish(node.redis_url, "order.filled", {"n": i}, user_id="mona") for i in range(5)]
        await async_wait_until(lambda: len(received) == 5)
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        node.proc = None
        missed = [publish(node.redis_url, "order.filled", {"n": 5 + i}, user_id="mona") for i in range(20)]
        node.start()
        await async_wait_until(lambda: len(received) == 25, timeout=15)
        after = publish(node.redis_url, "order.filled", {"n": 25}, user_id="mona")
        await async_wait_until(lambda: len(received) == 26)
        await asyncio.sleep(0.3)
    ids = [e["data"]["id"] for e in received]
    assert ids == [e["id"] for e in [*before, *missed, after]]
    assert client.connects == 2


async def test_client_follows_reconnect_from_a_draining_node(start_node):
    node = start_node("client-drain")
    states: list[str] = []
    received: list[dict] = []
    client = PushClient(node.url, min_backoff=0.05, max_backoff=0.2, on_state=states.append)
    client.subscribe(["market.trades"], received.append)
    async with client:
        await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
        publish(node.redis_url, "market.trades", {"n": 0})
        await async_wait_until(lambda: len(received) == 1)
        node.stop(signal.SIGTERM)
        publish(node.redis_url, "market.trades", {"n": 1})
        node.start()
        await async_wait_until(lambda: len(received) == 2, timeout=15)
    assert 1012 in client.close_codes
    assert "reconnecting" in states
    assert [e["data"]["payload"]["n"] for e in received] == [0, 1]


async def test_client_reports_unrecoverable_history(start_node, private_redis):
    node = start_node("client-lost", redis=private_redis)
    lost: list[list[str]] = []
    received: list[dict] = []
    client = PushClient(node.url, min_backoff=0.05, max_backoff=0.2, on_unrecovered=lost.append)
    client.subscribe(["market.trades"], received.append)
    async with client:
        await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
        publish(node.redis_url, "market.trades", {"n": 0})
        await async_wait_until(lambda: len(received) == 1)
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        node.proc = None
        private_redis.client().flushall()
        node.start()
        await async_wait_until(lambda: lost, timeout=15)
    assert lost == [["market.trades"]]


async def test_client_refreshes_its_token_before_expiry(start_node):
    node = start_node("client-refresh")
    issued: list[str] = []

    def fresh_token() -> str:
        issued.append(token("nora", ttl=3))
        return issued[-1]

    errors: list[dict] = []
    client = PushClient(node.url, get_token=fresh_token, on_error=errors.append)
    client.subscribe(["order.*"], lambda e: None)
    async with client:
        await asyncio.wait_for(client.connected.wait(), 5)
        await asyncio.sleep(4)  # past the first token's expiry
        assert client.connects == 1, "the connection stayed open across expiry"
    assert len(issued) >= 2 and not errors


def test_pushctl_tail_prints_published_events(start_node):
    node = start_node("tail")
    tail = subprocess.Popen(
        [sys.executable, "-m", "pushctl.cli", "tail", "market.ticker:BTC/USDT", "--url", node.url, "--count", "1"],
        cwd=ROOT,
        env=node_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        from conftest import wait_until

        wait_until(lambda: node.metric("subscriptions_active") >= 1, message="tail to subscribe")
        envelope = publish(node.redis_url, "market.ticker", {"price": 42}, key="BTC/USDT")
        out, _ = tail.communicate(timeout=10)
    finally:
        tail.kill()
    assert envelope["id"] in out.decode()
    assert tail.returncode == 0


async def test_every_matching_subscriptions_handler_gets_the_event_once(start_node):
    """The browser client's rule (web/test/dedup.test.mjs): ``*`` and ``order.filled`` both see an order.filled,
    and a subscription's priority filters its own handler even when another pattern brought the event."""
    node = start_node("client-handlers")
    everything: list[str] = []
    fills: list[str] = []
    urgent: list[str] = []
    client = PushClient(node.url, token=token("nora"))
    client.subscribe(["*"], lambda e: everything.append(e["data"]["type"]))
    client.subscribe(["order.filled"], lambda e: fills.append(e["data"]["type"]))
    client.subscribe(["risk.*"], lambda e: urgent.append(e["data"]["payload"]["level"]), priority="p1")
    async with client:
        for subscription in client.subscriptions:
            await asyncio.wait_for(subscription.acked.wait(), 5)
        publish(node.redis_url, "order.created", {}, user_id="nora")
        publish(node.redis_url, "order.filled", {}, user_id="nora")
        publish(node.redis_url, "risk.alert", {"level": "high"}, user_id="nora", priority="p0")
        publish(node.redis_url, "risk.alert", {"level": "low"}, user_id="nora")  # p2: * brings it, not for risk.* p1
        await async_wait_until(lambda: len(everything) == 4)
        await asyncio.sleep(0.3)
    assert everything == ["order.created", "order.filled", "risk.alert", "risk.alert"]
    assert fills == ["order.filled"]
    assert urgent == ["high"]
