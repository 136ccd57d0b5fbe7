"""Observability of a node (SPEC §7 endpoints, §9 metrics and logs), from outside.

Metric values are read from ``/metrics`` as deltas around the action, since
the module's node is shared by its tests. Log lines are read from the node's
output (one JSON object per line) and found by connection id.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import jwt
import orjson
import pytest
from conftest import WsClient, async_wait_until, publish, publish_raw, token

SPEC_METRICS = [
    ("ws_connections_total", "gauge"),
    ("events_published_total", "counter"),
    ("event_consume_latency_seconds", "histogram"),
    ("subscriptions_active", "gauge"),
    ("events_delivered_total", "counter"),
    ("events_dropped_total", "counter"),
    ("auth_failures_total", "counter"),
    ("connections_rejected_total", "counter"),
    ("redis_reconnects_total", "counter"),
]
LABELLED = {"events_dropped_total": "reason", "auth_failures_total": "reason", "connections_rejected_total": "reason"}


def get(node: Any, path: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(node.http + path, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric_types(text: str) -> dict[str, str]:
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind.strip()
    return types


def samples(text: str, name: str) -> dict[str, float]:
    """label-set text -> value for every sample of ``name``."""
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        metric, brace, labels = key.partition("{")
        if metric == name:
            found[labels.rstrip("}") if brace else ""] = float(value)
    return found


def total(node: Any, name: str) -> float:
    return sum(samples(node.metrics(), name).values())


def user(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def lines_of(node: Any, connection_id: str) -> list[dict[str, Any]]:
    return [line for line in node.log_lines() if line.get("connection") == connection_id]


async def wait_for_line(node: Any, connection_id: str, event: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((line for line in lines_of(node, connection_id) if line.get("event") == event), None)

    return await async_wait_until(find, timeout=5, message=f"a {event!r} log line for {connection_id}")


# --- endpoints ---------------------------------------------------------------------------


def test_healthz_says_the_process_is_alive(shared_node):
    status, _, body = get(shared_node, "/healthz")
    assert status == 200
    doc = orjson.loads(body)
    assert doc["status"] == "ok"
    assert doc["node"] == "shared"


def test_readyz_says_ready_when_subscribed_to_the_bus(shared_node):
    status, _, body = get(shared_node, "/readyz")
    assert status == 200
    assert orjson.loads(body)["status"] == "ready"


def test_metrics_is_prometheus_text(shared_node):
    status, headers, body = get(shared_node, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert b"# TYPE " in body


@pytest.mark.parametrize("name,kind", SPEC_METRICS)
def test_metrics_has_every_spec_metric_with_its_type(shared_node, name, kind):
    assert metric_types(shared_node.metrics()).get(name) == kind


# --- metric meanings ----------------------------------------------------------------------


async def test_ws_connections_total_rises_and_falls(shared_node, connect):
    before = shared_node.metric("ws_connections_total")
    clients = [await connect(shared_node) for _ in range(3)]
    await async_wait_until(
        lambda: shared_node.metric("ws_connections_total") == before + 3, timeout=5, message="gauge +3"
    )
    for client in clients:
        await client.close()
    await async_wait_until(
        lambda: shared_node.metric("ws_connections_total") == before, timeout=5, message="gauge back"
    )


async def test_gauges_fall_when_the_node_closes_a_connection(shared_node, connect):
    connections = shared_node.metric("ws_connections_total")
    subscriptions = shared_node.metric("subscriptions_active")
    client: WsClient = await connect(shared_node)
    await client.subscribe(["market.*", "market.ticker"])
    assert shared_node.metric("subscriptions_active") == subscriptions + 2
    await client.send('{"action":"ping","pad":"' + "x" * 70_000 + '"}')
    assert await client.closed() == 1009
    await client.ws.close()  # complete the closing handshake, as a browser does
    await async_wait_until(
        lambda: (
            (shared_node.metric("ws_connections_total"), shared_node.metric("subscriptions_active"))
            == (connections, subscriptions)
        ),
        timeout=5,
        message="gauges back after a server-side close",
    )


async def test_refused_connection_is_not_an_open_connection(shared_node, connect):
    before = shared_node.metric("ws_connections_total")
    client = await connect(shared_node, token="garbage", expect_welcome=False)
    await client.closed()
    assert shared_node.metric("ws_connections_total") == before


async def test_subscriptions_active_rises_and_falls(shared_node, connect):
    before = shared_node.metric("subscriptions_active")
    client: WsClient = await connect(shared_node)
    await client.subscribe(["market.ticker:A", "market.ticker:B", "market.*"])
    await client.subscribe(["market.*"], request_id="again")  # idempotent: not counted twice
    assert shared_node.metric("subscriptions_active") == before + 3
    await client.send({"action": "unsubscribe", "channels": ["market.ticker:A"]})
    await client.recv_action("ack")
    assert shared_node.metric("subscriptions_active") == before + 2
    await client.close()
    await async_wait_until(
        lambda: shared_node.metric("subscriptions_active") == before, timeout=5, message="subscriptions released"
    )


async def test_delivered_events_are_counted_once_per_connection(shared_node, connect):
    key = user("k")
    clients = [await connect(shared_node) for _ in range(2)]
    for client in clients:
        await client.subscribe([f"market.ticker:{key}"])
    published = shared_node.metric("events_published_total")
    delivered = shared_node.metric("events_delivered_total")
    publish(shared_node.redis_url, "market.ticker", {}, key=key)
    for client in clients:
        await client.events(1)
    await async_wait_until(
        lambda: shared_node.metric("events_delivered_total") >= delivered + 2, timeout=5, message="delivered +2"
    )
    assert shared_node.metric("events_delivered_total") == delivered + 2
    assert shared_node.metric("events_published_total") == published + 1


async def test_consume_latency_measures_event_timestamp_to_socket(shared_node, connect):
    key = user("k")
    client: WsClient = await connect(shared_node)
    await client.subscribe([f"market.trades:{key}"])
    count = shared_node.metric("event_consume_latency_seconds_count")
    total_seconds = shared_node.metric("event_consume_latency_seconds_sum")
    two_seconds_old = {
        "id": str(uuid.uuid4()),
        "type": "market.trades",
        "source": "market-data-collector",
        "timestamp": int(time.time() * 1000) - 2000,
        "version": "1.0",
        "payload": {},
    }
    publish_raw(shared_node.redis_url, f"events:market.trades:{key}", orjson.dumps(two_seconds_old))
    await client.events(1)
    await async_wait_until(
        lambda: shared_node.metric("event_consume_latency_seconds_count") >= count + 1, timeout=5, message="observed"
    )
    assert shared_node.metric("event_consume_latency_seconds_sum") - total_seconds >= 2.0


async def test_auth_failures_are_counted_with_a_reason(shared_node, connect):
    before = samples(shared_node.metrics(), "auth_failures_total")
    forged = jwt.encode({"sub": user(), "exp": int(time.time()) + 60}, "wrong-secret-" + "x" * 32, algorithm="HS256")
    client = await connect(shared_node, token=forged, expect_welcome=False)
    await client.closed()
    after = samples(shared_node.metrics(), "auth_failures_total")
    assert sum(after.values()) == sum(before.values()) + 1
    assert all(labels.startswith('reason="') for labels in after)


async def test_refused_connections_are_counted_with_a_reason(shared_node, connect):
    before = total(shared_node, "connections_rejected_total")
    client = await connect(shared_node, token="not-a-jwt", expect_welcome=False)
    await client.closed()
    await async_wait_until(
        lambda: total(shared_node, "connections_rejected_total") == before + 1, timeout=5, message="rejection counted"
    )
    assert all(labels.startswith('reason="') for labels in samples(shared_node.metrics(), "connections_rejected_total"))


# --- logs -----------------------------------------------------------------------------------


async def test_connect_and_disconnect_are_logged_with_node_connection_user_and_reason(shared_node, connect):
    alice = user("alice")
    client: WsClient = await connect(shared_node, token=token(alice))
    connection_id = client.welcome["connectionId"]
    connected = await wait_for_line(shared_node, connection_id, "connect")
    assert connected["node"] == "shared"
    assert connected["user"] == alice
    await client.close()
    disconnected = await wait_for_line(shared_node, connection_id, "disconnect")
    assert disconnected["node"] == "shared"
    assert disconnected["user"] == alice
    assert disconnected["reason"]


async def test_subscribe_and_unsubscribe_are_logged(shared_node, connect):
    alice = user("alice")
    client: WsClient = await connect(shared_node, token=token(alice))
    connection_id = client.welcome["connectionId"]
    await client.subscribe(["order.*"])
    await client.send({"action": "unsubscribe", "channels": ["order.*"]})
    await client.recv_action("ack")
    for event in ("subscribe", "unsubscribe"):
        line = await wait_for_line(shared_node, connection_id, event)
        assert line["node"] == "shared"
        assert line["user"] == alice
        assert "order.*" in orjson.dumps(line).decode()


async def test_auth_failure_at_connect_is_logged_with_node_and_reason(shared_node, connect):
    expired = jwt.encode({"sub": user(), "exp": int(time.time()) - 60}, "s" * 40, algorithm="HS256")
    lines_before = len(shared_node.log_lines())
    client = await connect(shared_node, token=expired, expect_welcome=False)
    await client.closed()

    def failure() -> dict[str, Any] | None:
        new = shared_node.log_lines()[lines_before:]
        return next((line for line in new if line.get("event") == "auth_failure"), None)

    line = await async_wait_until(failure, timeout=5, message="an auth_failure log line")
    assert line["node"] == "shared"
    assert line["reason"]


async def test_auth_failure_on_refresh_is_logged_with_node_connection_user_and_reason(shared_node, connect):
    alice = user("alice")
    client: WsClient = await connect(shared_node, token=token(alice))
    await client.send({"action": "auth", "token": token(user("mallory"))})
    await client.recv_action("error")
    line = await wait_for_line(shared_node, client.welcome["connectionId"], "auth_failure")
    assert line["node"] == "shared"
    assert line["user"] == alice
    assert line["reason"]


async def test_every_log_line_is_one_json_object(shared_node, connect):
    client = await connect(shared_node, token=token(user()))
    await client.close()
    await wait_for_line(shared_node, client.welcome["connectionId"], "disconnect")
    text_lines = [line for line in shared_node.log().splitlines() if line.strip()]
    assert text_lines
    for line in text_lines:
        doc = orjson.loads(line)
        assert isinstance(doc, dict) and doc.get("event"), line
