"""A node that cannot serve fails loudly instead of joining the ring (issue 17, SPEC §7).

Real `pushctl node` and `pushctl router` processes on a real Redis: a node binds
its port before it registers and exits 1 with one line when it cannot; it
refuses an id that another live node heartbeats, and a cluster whose live nodes
accept other tokens than it does; SIGTERM stops a node that is still waiting
for Redis.
"""

from __future__ import annotations

import signal
import subprocess
import time

import orjson
from conftest import (
    JWT_SECRET,
    PUSHCTL,
    ROOT,
    NodeProcess,
    RedisProcess,
    free_port,
    node_env,
    token,
    wait_until,
)

from cluster.auth import NO_KEYS, TokenVerifier
from cluster.membership import NODE_KEY_PREFIX, NODES_KEY
from cluster.settings import Settings

REFUSAL_SECONDS = 10.0
"""A refused node exits well within this (an id check watches 3 heartbeats of 1 s)."""
FAST_HEARTBEAT = {"PUSH_HEARTBEAT_SECONDS": "0.3"}
"""The id check watches a held id for 3 heartbeats: a short period keeps those tests short."""
CHECKED = {"PUSH_JWT_MATCH_CLUSTER": "true"}
"""The JWT match check, which the test nodes of other modules leave off (see conftest.node_env)."""
OTHER_SECRET = "another-secret-for-delta-push-0123456789abcdef"


def run_node(port: int, node_id: str, redis_url: str, **env: str) -> tuple[int, str, float]:
    """Run `pushctl node` until it exits on its own: (exit code, its output, seconds it ran)."""
    began = time.monotonic()
    result = subprocess.run(
        [*PUSHCTL, "node", "--port", str(port), "--node-id", node_id, "--redis-url", redis_url],
        env=node_env(**env),
        cwd=ROOT,
        capture_output=True,
        timeout=REFUSAL_SECONDS + 10,
    )
    return result.returncode, (result.stdout + result.stderr).decode(), time.monotonic() - began


def error_line(output: str) -> str:
    """The one line that is not a JSON log line; there must be exactly one, and no traceback."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, output
    return lines[0]


def live_ids(redis: RedisProcess) -> set[str]:
    client = redis.client()
    try:
        return {member.decode() for member in client.zrange(NODES_KEY, 0, -1)}
    finally:
        client.close()


def test_a_node_that_cannot_bind_exits_1_at_once_and_never_joins_the_ring(private_redis, start_node, start_router):
    first = start_node("bind-1", redis=private_redis)
    router = start_router(redis=private_redis)
    code, output, seconds = run_node(first.port, "bind-2", private_redis.url)
    assert code == 1
    assert seconds < REFUSAL_SECONDS
    line = error_line(output)
    assert line.startswith("pushctl node: cannot listen on") and str(first.port) in line, line
    assert "node_registered" not in output
    assert live_ids(private_redis) == {"bind-1"}
    assert not private_redis.client().exists(NODE_KEY_PREFIX + "bind-2")
    status, body = router.get("/v1/cluster", token=token("ops", roles=["admin"]))
    assert status == 200
    assert [node["id"] for node in body["nodes"]] == ["bind-1"]


def test_a_router_that_cannot_bind_exits_1_with_one_line(start_node):
    node = start_node("bind-router")
    result = subprocess.run(
        [*PUSHCTL, "router", "--port", str(node.port), "--redis-url", node.redis_url],
        env=node_env(),
        cwd=ROOT,
        capture_output=True,
        timeout=REFUSAL_SECONDS,
    )
    assert result.returncode == 1
    assert error_line(result.stderr.decode()).startswith("pushctl router: cannot listen on")


def test_sigterm_stops_a_node_that_is_still_waiting_for_redis():
    node = NodeProcess(free_port(), "no-redis", f"redis://127.0.0.1:{free_port()}/0", node_env(), [])
    cmd = [*PUSHCTL, "node", "--port", str(node.port), "--node-id", node.node_id, "--redis-url", node.redis_url]
    node.proc = subprocess.Popen(cmd, env=node.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: node.ready() or _healthy(node), 15, message="the node to serve /healthz")
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=10) == 0
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()


def _healthy(node: NodeProcess) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(node.http + "/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_node_refuses_an_id_that_a_live_node_heartbeats(private_redis, start_node):
    first = start_node("twin", redis=private_redis, **FAST_HEARTBEAT)
    code, output, seconds = run_node(free_port(), "twin", private_redis.url, **FAST_HEARTBEAT)
    assert code == 1
    assert seconds < REFUSAL_SECONDS
    line = error_line(output)
    assert "'twin' is already live" in line and first.url in line and "--node-id" in line, line
    client = private_redis.client()
    info = orjson.loads(client.hget(NODE_KEY_PREFIX + "twin", "info"))
    assert info["url"] == first.url, "the live node keeps its record"
    assert first.ready()


def test_a_node_takes_over_the_id_of_a_crashed_node(private_redis, start_node):
    crashed = start_node("phoenix", redis=private_redis, **FAST_HEARTBEAT)
    crashed.stop(signal.SIGKILL)  # its lease is still running
    assert live_ids(private_redis) == {"phoenix"}
    crashed.start()  # same port: the record at our own address is the dead predecessor's, no wait
    assert not [line for line in crashed.log_lines() if line.get("event") == "node_id_held"]
    crashed.stop(signal.SIGKILL)
    again = start_node("phoenix", redis=private_redis, **FAST_HEARTBEAT)  # elsewhere: after 3 silent heartbeats
    assert [line for line in again.log_lines() if line.get("event") == "node_id_held"]
    info = orjson.loads(private_redis.client().hget(NODE_KEY_PREFIX + "phoenix", "info"))
    assert info["url"] == again.url


def test_a_node_without_a_secret_refuses_to_join_a_cluster_that_has_one(private_redis, start_node):
    start_node("keyed", redis=private_redis, **CHECKED)
    code, output, seconds = run_node(free_port(), "keyless", private_redis.url, PUSH_JWT_SECRET="", **CHECKED)
    assert code == 1
    assert seconds < REFUSAL_SECONDS
    line = error_line(output)
    assert "no PUSH_JWT_SECRET or PUSH_JWT_PUBLIC_KEY" in line and "keyed" in line, line
    assert live_ids(private_redis) == {"keyed"}


def test_a_node_with_another_secret_refuses_to_join_and_the_secret_never_reaches_redis(private_redis, start_node):
    start_node("keyed", redis=private_redis, **CHECKED)
    code, output, _ = run_node(free_port(), "other-key", private_redis.url, PUSH_JWT_SECRET=OTHER_SECRET, **CHECKED)
    assert code == 1
    assert "PUSH_JWT_SECRET" in error_line(output)
    assert live_ids(private_redis) == {"keyed"}
    record = private_redis.client().hget(NODE_KEY_PREFIX + "keyed", "info")
    assert JWT_SECRET.encode() not in record
    assert orjson.loads(record)["verifier"] == TokenVerifier(Settings(jwt_secret=JWT_SECRET)).fingerprint


def test_by_default_other_keys_join_and_say_so(private_redis, start_node):
    """A rolling key change, or deployments sharing one Redis on purpose, must still start."""
    start_node("old-key", redis=private_redis)
    new = start_node("new-key", redis=private_redis, PUSH_JWT_SECRET=OTHER_SECRET)
    assert live_ids(private_redis) == {"old-key", "new-key"}
    assert any(line.get("event") == "jwt_keys_differ" for line in new.log_lines())


def test_a_node_without_keys_never_joins_nodes_that_have_them(private_redis, start_node):
    start_node("keyed", redis=private_redis)
    code, output, _ = run_node(free_port(), "keyless", private_redis.url, PUSH_JWT_SECRET="")
    assert code == 1
    assert "PUSH_JWT_SECRET" in error_line(output)
    assert live_ids(private_redis) == {"keyed"}


def test_an_anonymous_only_cluster_is_possible_and_says_so(private_redis, start_node):
    first = start_node("anon-1", redis=private_redis, PUSH_JWT_SECRET="", **CHECKED)
    start_node("anon-2", redis=private_redis, PUSH_JWT_SECRET="", **CHECKED)
    assert live_ids(private_redis) == {"anon-1", "anon-2"}
    warnings = [line for line in first.log_lines() if line.get("event") == "node_without_keys"]
    assert warnings and "every token is refused" in warnings[0]["reason"]


def test_a_node_without_keys_or_anonymous_clients_refuses_to_start(private_redis):
    code, output, _ = run_node(free_port(), "useless", private_redis.url, PUSH_JWT_SECRET="", PUSH_ALLOW_ANONYMOUS="false")
    assert code == 1
    assert "would refuse every client" in error_line(output)
    assert live_ids(private_redis) == set()


def test_the_fingerprint_names_the_keys_without_revealing_them():
    one = TokenVerifier(Settings(jwt_secret=JWT_SECRET)).fingerprint
    assert one == TokenVerifier(Settings(jwt_secret=JWT_SECRET)).fingerprint
    assert one != TokenVerifier(Settings(jwt_secret=OTHER_SECRET)).fingerprint
    assert one != TokenVerifier(Settings(jwt_secret=JWT_SECRET, jwt_audience="delta")).fingerprint
    assert TokenVerifier(Settings()).fingerprint == NO_KEYS
    assert len(one) == 16 and JWT_SECRET not in one
