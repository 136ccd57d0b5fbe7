"""`pushctl token`, `pushctl publish` and `pushctl tail` (SPEC §10), run as the
installed console script against a real node and Redis.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import orjson
from conftest import JWT_SECRET, PUSHCTL, ROOT, WsClient, async_wait_until, free_port, node_env, publish, token

SCRIPT = Path(sys.executable).parent / "pushctl"
COMMAND = [str(SCRIPT)] if SCRIPT.exists() else PUSHCTL
TIMEOUT = 15.0


def user(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def pushctl(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run pushctl to completion: (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        env=env if env is not None else node_env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def decode(tok: str, secret: str = JWT_SECRET) -> dict[str, Any]:
    return jwt.decode(tok, secret, algorithms=["HS256"])


# --- pushctl token ---------------------------------------------------------------------------


async def test_token_verifies_with_the_secret_and_names_the_user():
    code, out, _ = await pushctl("token", "--sub", "alice")
    assert code == 0
    claims = decode(out.strip())
    assert claims["sub"] == "alice"
    assert abs(claims["exp"] - (time.time() + 3600)) < 60
    assert "admin" not in claims.get("roles", [])


async def test_token_with_admin_carries_the_admin_role(shared_node, connect):
    code, out, _ = await pushctl("token", "--sub", "ops", "--admin")
    assert code == 0
    assert "admin" in decode(out.strip())["roles"]
    admin: WsClient = await connect(shared_node, token=out.strip())
    await admin.subscribe(["order.*"])
    envelope = publish(shared_node.redis_url, "order.filled", {}, user_id=user("bob"))
    [event] = await admin.events(1)
    assert event["data"] == envelope, "an admin token receives everyone's private events"


async def test_token_ttl_sets_the_expiry():
    code, out, _ = await pushctl("token", "--sub", "alice", "--ttl", "60")
    assert code == 0
    claims = decode(out.strip())
    assert abs(claims["exp"] - (time.time() + 60)) < 10


async def test_token_secret_can_be_given_as_a_flag():
    code, out, _ = await pushctl("token", "--sub", "alice", "--jwt-secret", "flag-secret-" + "f" * 32)
    assert code == 0
    assert decode(out.strip(), "flag-secret-" + "f" * 32)["sub"] == "alice"


async def test_token_without_a_secret_fails_with_a_clear_message():
    env = {k: v for k, v in node_env().items() if k != "PUSH_JWT_SECRET"}
    code, out, err = await pushctl("token", "--sub", "alice", env=env)
    assert code != 0
    assert out.strip() == ""
    assert "PUSH_JWT_SECRET" in err


# --- pushctl publish ------------------------------------------------------------------------


async def test_publish_reaches_a_subscriber(shared_node, connect):
    key = user("k")
    client: WsClient = await connect(shared_node)
    await client.subscribe([f"market.ticker:{key}"])
    code, out, err = await pushctl(
        "publish", "market.ticker", "--key", key, "--payload", '{"price": 101.5}', "--redis-url", shared_node.redis_url
    )
    assert code == 0, err
    printed = orjson.loads(out)
    [event] = await client.events(1)
    assert event["channel"] == f"market.ticker:{key}"
    assert event["data"] == printed
    assert printed["payload"] == {"price": 101.5}
    assert printed["source"] == "market-data-collector"


async def test_publish_private_event_with_priority_and_ttl(shared_node, connect):
    alice = user("alice")
    client: WsClient = await connect(shared_node, token=token(alice))
    await client.subscribe(["risk.*"], priority="p0")
    code, _, err = await pushctl(
        "publish",
        "risk.alert",
        "--user",
        alice,
        "--priority",
        "p0",
        "--ttl",
        "60000",
        "--payload",
        '{"level": "critical"}',
        "--redis-url",
        shared_node.redis_url,
    )
    assert code == 0, err
    [event] = await client.events(1)
    data = event["data"]
    assert (data["type"], data["userId"], data["priority"], data["ttl"]) == ("risk.alert", alice, "p0", 60000)
    assert data["payload"] == {"level": "critical"}


async def test_publish_reads_redis_url_from_the_environment(shared_node, connect):
    key = user("k")
    client: WsClient = await connect(shared_node)
    await client.subscribe([f"market.trades:{key}"])
    code, out, err = await pushctl(
        "publish", "market.trades", "--key", key, env=node_env(REDIS_URL=shared_node.redis_url)
    )
    assert code == 0, err
    [event] = await client.events(1)
    assert event["data"] == orjson.loads(out)


async def test_publish_refuses_an_unknown_type_with_a_clear_message(shared_node, connect):
    admin: WsClient = await connect(shared_node, token=token(user("ops"), roles=["admin"]))
    await admin.subscribe(["*"])
    code, out, err = await pushctl("publish", "order.teleported", "--redis-url", shared_node.redis_url)
    assert code != 0
    assert out.strip() == ""
    assert "order.teleported" in err
    assert "unknown" in err.lower()
    marker = publish(shared_node.redis_url, "order.created", {"marker": True})
    [event] = await admin.events(1)
    assert event["data"]["id"] == marker["id"], "the refused event must not have been published"


async def test_publish_refuses_an_unknown_service_with_a_clear_message(shared_node):
    code, _, err = await pushctl(
        "publish", "order.filled", "--source", "rogue-service", "--redis-url", shared_node.redis_url
    )
    assert code != 0
    assert "rogue-service" in err


async def test_publish_unknown_type_when_allowed(shared_node, connect):
    alice = user("alice")
    client: WsClient = await connect(shared_node, token=token(alice))
    await client.subscribe(["portfolio.*"])
    code, out, err = await pushctl(
        "publish",
        "portfolio.rebalanced",
        "--allow-unknown",
        "--source",
        "portfolio-service",
        "--user",
        alice,
        "--redis-url",
        shared_node.redis_url,
    )
    assert code == 0, err
    [event] = await client.events(1)
    assert event["data"] == orjson.loads(out)


async def test_publish_refuses_a_payload_that_is_not_json(shared_node):
    code, _, err = await pushctl("publish", "order.filled", "--payload", "{oops", "--redis-url", shared_node.redis_url)
    assert code != 0
    assert "payload" in err.lower()


# --- pushctl tail -----------------------------------------------------------------------------


async def run_tail(node: Any, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *COMMAND,
        "tail",
        "--url",
        node.url,
        *args,
        env=node_env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def subscribed(node: Any, before: float) -> None:
    """Wait until tail's subscription is live on the node (it may report its ack on stdout or stderr)."""
    await async_wait_until(
        lambda: node.metric("subscriptions_active") >= before + 1, timeout=TIMEOUT, message="tail to subscribe"
    )


async def printed_event(proc: asyncio.subprocess.Process, envelope: dict[str, Any]) -> dict[str, Any]:
    """The line tail printed for ``envelope``: the event message or the envelope itself."""
    assert proc.stdout is not None
    while True:
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        assert line, "tail exited before printing the event"
        if envelope["id"].encode() in line:
            doc = orjson.loads(line)
            assert doc == envelope or doc.get("data") == envelope, doc
            return doc


async def finish(proc: asyncio.subprocess.Process) -> int:
    try:
        return await asyncio.wait_for(proc.wait(), TIMEOUT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_tail_count_1_prints_a_published_event_and_exits(shared_node):
    key = user("k")
    before = shared_node.metric("subscriptions_active")
    proc = await run_tail(shared_node, "--count", "1", f"market.ticker:{key}")
    try:
        await subscribed(shared_node, before)
        envelope = publish(shared_node.redis_url, "market.ticker", {"price": 7}, key=key)
        doc = await printed_event(proc, envelope)
        if "channel" in doc:
            assert doc["channel"] == f"market.ticker:{key}"
    finally:
        code = await finish(proc)
    assert code == 0


async def test_tail_with_a_token_prints_private_events(shared_node):
    alice = user("alice")
    before = shared_node.metric("subscriptions_active")
    proc = await run_tail(shared_node, "--token", token(alice), "--count", "1", "order.*")
    try:
        await subscribed(shared_node, before)
        publish(shared_node.redis_url, "order.filled", {"for": "someone else"}, user_id=user("bob"))
        envelope = publish(shared_node.redis_url, "order.filled", {"for": "alice"}, user_id=alice)
        await printed_event(proc, envelope)
    finally:
        code = await finish(proc)
    assert code == 0


# --- one clear line instead of a traceback (issue 17) --------------------------------------------


def one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


async def test_tail_with_a_bad_pattern_says_why_in_one_line(shared_node):
    code, out, err = await pushctl("tail", "order.**", "--url", shared_node.url)
    assert code == 2
    assert out == ""
    assert one_line(err).startswith("pushctl tail: invalid type pattern in 'order.**'")


async def test_publish_with_redis_stopped_says_so_in_one_line():
    stopped = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    code, out, err = await pushctl("publish", "market.ticker", "--key", "BTC/USDT", "--redis-url", stopped)
    assert code == 1
    assert out == ""
    line = one_line(err)
    assert line.startswith("pushctl publish: cannot reach Redis at redis://***@127.0.0.1:"), line
    assert "hunter2" not in line


async def test_publish_without_user_warns_that_every_subscriber_gets_it_and_still_publishes(shared_node, connect):
    admin: WsClient = await connect(shared_node, token=token(user("ops"), roles=["admin"]))
    await admin.subscribe(["order.*"])
    code, out, err = await pushctl("publish", "order.filled", "--redis-url", shared_node.redis_url)
    assert code == 0
    assert "warning" in err and "EVERY user subscribed" in err and "--user" in err
    [event] = await admin.events(1)
    assert event["data"] == orjson.loads(out)


async def test_publish_of_a_public_event_does_not_warn(shared_node):
    code, _, err = await pushctl("publish", "market.ticker", "--key", "BTC/USDT", "--redis-url", shared_node.redis_url)
    assert code == 0
    assert err == ""
