"""The Python PushClient (SPEC §8 client side): reconnects, resumes from its cursor, deduplicates."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import uuid

import orjson
import pytest
from aiohttp import web
from conftest import ROOT, async_wait_until, node_env, publish, token
from fossil_fixtures import next_book, order_book
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster import fossil, protocol
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
    key = f"TAIL-{uuid.uuid4().hex[:8]}"  # a channel of its own: a ticker's latest value would come first
    tail = subprocess.Popen(
        [sys.executable, "-m", "pushctl.cli", "tail", f"market.ticker:{key}", "--url", node.url, "--count", "1"],
        cwd=ROOT,
        env=node_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        from conftest import wait_until

        wait_until(lambda: node.metric("subscriptions_active") >= 1, message="tail to subscribe")
        envelope = publish(node.redis_url, "market.ticker", {"price": 42}, key=key)
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


# --- delta frames (docs/DELTA.md), against a scripted node: a real socket, our client as is --------------


class ScriptedNode:
    """A WebSocket server that plays the node: it welcomes each connection, records what the client
    sends, and sends what the test tells it to (acks included, so the test orders every frame)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[dict] = asyncio.Queue()
        self.ws: web.WebSocketResponse | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> ScriptedNode:
        app = web.Application()
        app.router.add_get("/ws", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/ws"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.ws = ws
        await ws.send_str(protocol.welcome("c1", "scripted", None, None, {}))
        async for message in ws:
            await self.inbox.put(orjson.loads(message.data))
        return ws

    async def expect(self, action: str) -> dict:
        doc = await asyncio.wait_for(self.inbox.get(), 5)
        assert doc["action"] == action, doc
        return doc

    async def ack(self, subscribe: dict) -> None:
        await self.send(protocol.ack(subscribe["id"], subscribed=subscribe["channels"], cursor="e:0"))

    async def send(self, frame: str | bytes) -> None:
        assert self.ws is not None
        await self.ws.send_str(frame if isinstance(frame, str) else frame.decode())


@pytest.fixture
async def scripted_node():
    node = await ScriptedNode().start()
    yield node
    await node.stop()


BOOK = "market.orderbook:BTC/USDT"


def books(count: int, seed: int = 15) -> list[bytes]:
    """``count`` successive 50-level order books, as the node holds them: exact envelope bytes."""
    rng = random.Random(seed)
    book = order_book(rng)
    out = [book]
    for _ in range(count - 1):
        out.append(next_book(out[-1], rng))
    return [orjson.dumps(b) for b in out]


def full_frame(raw: bytes, seq: int, snapshot: bool = False) -> bytes:
    doc = {"action": "event", "channel": BOOK, "delta": False, "data": raw.decode(), "cursor": f"e:{seq}", "seq": seq}
    return orjson.dumps({**doc, "snapshot": True} if snapshot else doc)


def delta_frame(base: bytes, raw: bytes, seq: int, delta: bytes | None = None) -> bytes:
    text = (delta if delta is not None else fossil.encode(base, raw)).decode()
    return orjson.dumps(
        {"action": "event", "channel": BOOK, "delta": True, "data": text, "cursor": f"e:{seq}", "seq": seq}
    )


def as_full_subscriber_sees_it(raw: bytes, seq: int) -> dict:
    """The event a subscriber without deltas gets for the same envelope (what the handler must get)."""
    return protocol.parse_server_message(protocol.event_frame(BOOK, raw, f"e:{seq}", seq)).doc


async def delta_client(node: ScriptedNode, **options) -> tuple[PushClient, list[dict], list[tuple], dict]:
    received: list[dict] = []
    gaps: list[tuple] = []
    client = PushClient(node.url, on_gap=lambda *gap: gaps.append(gap), min_backoff=0.01, max_backoff=0.05, **options)
    client.subscribe([BOOK], received.append, delta="fossil")
    await client.start()
    subscribe = await node.expect("subscribe")
    await node.ack(subscribe)
    await asyncio.wait_for(client.subscriptions[0].acked.wait(), 5)
    return client, received, gaps, subscribe


async def test_a_delta_subscriber_gets_the_same_events_as_a_full_subscriber_byte_for_byte(scripted_node):
    raws = books(12)
    client, received, gaps, subscribe = await delta_client(scripted_node)
    try:
        assert subscribe["options"] == {"delta": "fossil"}
        await scripted_node.send(full_frame(raws[0], 1))
        for seq in range(2, 13):
            await scripted_node.send(delta_frame(raws[seq - 2], raws[seq - 1], seq))
        await async_wait_until(lambda: len(received) == 12)
        assert received == [as_full_subscriber_sees_it(raw, seq) for seq, raw in enumerate(raws, 1)]
        assert [orjson.dumps(event["data"]) for event in received] == raws  # the very bytes published
        assert client._bases[BOOK] == (12, raws[-1])  # the next delta's base: the exact envelope bytes
        assert gaps == []
        # a full event in the middle of the chain (the node's choice after a drop) replaces the base
        other = books(2, seed=99)
        await scripted_node.send(full_frame(other[0], 13))
        await scripted_node.send(delta_frame(other[0], other[1], 14))
        await async_wait_until(lambda: len(received) == 14)
        assert received[12:] == [as_full_subscriber_sees_it(other[0], 13), as_full_subscriber_sees_it(other[1], 14)]
    finally:
        await client.close()


async def test_a_corrupt_delta_is_not_delivered_and_the_channel_is_resubscribed_for_a_snapshot(scripted_node):
    raws = books(6, seed=3)
    client, received, gaps, _ = await delta_client(scripted_node)
    try:
        await scripted_node.send(full_frame(raws[0], 1))
        await scripted_node.send(delta_frame(raws[0], raws[1], 2))
        good = fossil.encode(raws[1], raws[2])
        at = good.index(b":") + 5  # a byte inside the first literal: same length, wrong checksum
        corrupt = good[:at] + (b"0" if good[at : at + 1] != b"0" else b"1") + good[at + 1 :]
        await scripted_node.send(delta_frame(raws[1], raws[2], 3, corrupt))
        unsubscribe = await scripted_node.expect("unsubscribe")
        resubscribe = await scripted_node.expect("subscribe")
        assert unsubscribe["channels"] == [BOOK]
        assert resubscribe["channels"] == [BOOK]
        assert resubscribe["options"]["delta"] == "fossil" and "since" not in resubscribe["options"]
        assert resubscribe["options"].get("snapshot", True) is True  # the latest book, not a replay
        await async_wait_until(lambda: gaps)
        assert gaps == [(BOOK, 3, 3)]  # the event expected arrived, but could not be used
        # the node had sent the next delta before it read the resubscribe: no base, dropped quietly
        await scripted_node.send(delta_frame(raws[2], raws[3], 4))
        await scripted_node.ack(resubscribe)
        await scripted_node.send(full_frame(raws[3], 4, snapshot=True))  # the snapshot after the ack
        await scripted_node.send(delta_frame(raws[3], raws[4], 5))
        await async_wait_until(lambda: len(received) == 4)
        assert [(e["seq"], e["data"]) for e in received] == [
            (seq, orjson.loads(raws[i])) for seq, i in ((1, 0), (2, 1), (4, 3), (5, 4))
        ]
        assert [e.get("snapshot", False) for e in received] == [False, False, True, False], "handlers see the mark"
        assert gaps == [(BOOK, 3, 3)]
    finally:
        await client.close()


async def test_a_delta_on_an_unknown_base_is_not_delivered(scripted_node):
    raws = books(5, seed=4)
    client, received, gaps, _ = await delta_client(scripted_node)

    async def resubscribed() -> None:
        assert (await scripted_node.expect("unsubscribe"))["channels"] == [BOOK]
        await scripted_node.ack(await scripted_node.expect("subscribe"))

    try:
        await scripted_node.send(delta_frame(raws[0], raws[1], 2))  # no full event yet on this connection
        await resubscribed()
        assert gaps == [(BOOK, 2, 2)]
        await scripted_node.send(full_frame(raws[1], 2))
        # a delta made from seq 3 arriving as seq 4: the base it needs (3) is not the one held (2)
        await scripted_node.send(delta_frame(raws[2], raws[3], 4))
        await resubscribed()
        assert gaps[1] == (BOOK, 3, 4)
        # a delta of the right seq made from another book: Fossil's length and checksum checks refuse it
        await scripted_node.send(full_frame(raws[3], 5))
        await scripted_node.send(delta_frame(raws[0], raws[4], 6))
        await resubscribed()
        assert gaps[2] == (BOOK, 6, 6)
        assert [e["data"] for e in received] == [orjson.loads(raws[1]), orjson.loads(raws[3])]  # never a wrong book
        assert BOOK not in client._bases
    finally:
        await client.close()


async def test_a_new_connection_starts_the_delta_chain_again(scripted_node):
    raws = books(3, seed=5)
    client, received, gaps, _ = await delta_client(scripted_node)
    try:
        await scripted_node.send(full_frame(raws[0], 1))
        await async_wait_until(lambda: len(received) == 1)
        old = scripted_node.ws
        await old.close(code=1012)
        await scripted_node.ack(await scripted_node.expect("subscribe"))  # the resubscribe after the welcome
        await async_wait_until(lambda: scripted_node.ws is not old and client.connects == 2)
        await scripted_node.send(delta_frame(raws[0], raws[1], 2))  # the old connection's base is gone
        await async_wait_until(lambda: gaps)
        assert gaps == [(BOOK, 2, 2)] and len(received) == 1
    finally:
        await client.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
envelopes = st.dictionaries(st.text(max_size=12), json_values, max_size=8).map(
    lambda fields: {"id": "e", "type": "market.orderbook", **fields}
)


@settings(max_examples=200, deadline=None)
@given(envelopes, envelopes)
def test_any_envelope_pair_travels_as_a_delta_frame_and_comes_back_byte_for_byte(first, second):
    """Through the wire format itself: the delta of two UTF-8 envelopes rides in a JSON string,
    is parsed by the client's parser and applied by its rebuild step to the exact bytes."""
    source, target = orjson.dumps(first), orjson.dumps({**second, "id": "f"})
    client = PushClient("ws://unused.invalid/ws")  # no socket: the frame handling alone
    for frame in (full_frame(source, 1), delta_frame(source, target, 2)):
        event = protocol.parse_server_message(frame)
        assert isinstance(event, protocol.Event)
        envelope = client._rebuild(event, [])
        assert envelope == orjson.loads(source if event.seq == 1 else target)
    assert client._bases[BOOK] == (2, target)


async def test_a_delta_announcing_more_than_64_kib_is_refused(scripted_node):
    small = orjson.dumps({"id": "a", "type": "market.orderbook", "payload": "x"})
    big = orjson.dumps({"id": "b", "type": "market.orderbook", "payload": "x" * 70_000})
    client, received, gaps, _ = await delta_client(scripted_node)
    try:
        await scripted_node.send(full_frame(small, 1))
        await scripted_node.send(delta_frame(small, big, 2))  # a valid delta, but past MAX_ENVELOPE_BYTES
        await async_wait_until(lambda: gaps)
        assert gaps == [(BOOK, 2, 2)] and len(received) == 1
    finally:
        await client.close()


def ticker_frame(channel: str, seq: int) -> bytes:
    envelope = orjson.dumps({"id": f"{channel}#{seq}#{random.random()}", "type": "market.ticker", "payload": {}})
    return protocol.event_frame(channel, envelope, f"e:{seq}", seq)


async def test_a_seq_jump_renews_every_matching_subscription_once_and_replays_are_ignored(scripted_node):
    gaps: list[tuple] = []
    client = PushClient(scripted_node.url, on_gap=lambda *gap: gaps.append(gap), min_backoff=0.01, max_backoff=0.05)
    client.subscribe(["market.ticker:*"], lambda e: None)
    client.subscribe(["market.ticker:A/B", "market.trades"], lambda e: None, limit=2)
    client.subscribe(["order.*"], lambda e: None)
    async with client:
        for _ in range(3):
            await scripted_node.ack(await scripted_node.expect("subscribe"))
        for seq in (1, 2, 2, 1, 3):  # a repeat and a replay: nothing newer was missed
            await scripted_node.send(ticker_frame("market.ticker:A/B", seq))
        await scripted_node.send(ticker_frame("market.ticker:A/B", 6))
        unsubscribe = await scripted_node.expect("unsubscribe")
        renewed = [await scripted_node.expect("subscribe") for _ in range(2)]
        assert gaps == [("market.ticker:A/B", 4, 6)]
        assert unsubscribe["channels"] == ["market.ticker:*", "market.ticker:A/B", "market.trades"]
        assert [r["channels"] for r in renewed] == [["market.ticker:*"], ["market.ticker:A/B", "market.trades"]]
        assert all("since" not in r.get("options", {}) for r in renewed)
        for subscribe in renewed:
            await scripted_node.ack(subscribe)
        # a new connection starts the count again: its first seq is no gap
        old = scripted_node.ws
        await old.close(code=1012)
        for _ in range(3):
            await scripted_node.ack(await scripted_node.expect("subscribe"))
        await async_wait_until(lambda: client.connects == 2)
        await scripted_node.send(ticker_frame("market.ticker:A/B", 40))
        await scripted_node.send(ticker_frame("market.ticker:A/B", 41))
        await scripted_node.send(ticker_frame("market.ticker:A/B", 43))  # the next gap tells that 40 was none
        await async_wait_until(lambda: len(gaps) == 2)
        assert gaps == [("market.ticker:A/B", 4, 6), ("market.ticker:A/B", 42, 43)]
