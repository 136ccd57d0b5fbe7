"""Authentication (SPEC §5) through a real `pushctl node` and a real Redis.

Every refusal happens after the upgrade: an ``error`` message with the SPEC's
code, then close 4001 (or FORBIDDEN on a private channel for an anonymous
client). Keys for RS256/ES256 are generated per test session with
``cryptography``; nodes read the public key from ``PUSH_JWT_PUBLIC_KEY``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jwt
import orjson
import pytest
from conftest import JWT_SECRET, NodeProcess, WsClient, async_wait_until, free_port, node_env, publish, token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# --- keys and tokens ---------------------------------------------------------------


def pem_pair(private_key: Any) -> tuple[bytes, str]:
    private = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    return pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, str]:
    return pem_pair(ec.generate_private_key(ec.SECP256R1()))


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def claims(sub: str | None = None, ttl: int = 3600, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    doc: dict[str, Any] = {"iat": now, "exp": now + ttl, **extra}
    if sub is not None:
        doc["sub"] = sub
    return {k: v for k, v in doc.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(payload: dict[str, Any]) -> str:
    """A token with ``alg: none`` and an empty signature."""
    return f"{b64(orjson.dumps({'alg': 'none', 'typ': 'JWT'}))}.{b64(orjson.dumps(payload))}."


def hmac_token(payload: dict[str, Any], secret: bytes, alg: str = "HS256") -> str:
    """An HMAC token signed by hand (PyJWT refuses PEM keys as HMAC secrets, an attacker does not)."""
    signing_input = f"{b64(orjson.dumps({'alg': alg, 'typ': 'JWT'}))}.{b64(orjson.dumps(payload))}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384}[alg]
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), digest).digest())}"


# --- nodes with their own settings ---------------------------------------------------


def module_node(redis_server: Any, node_id: str, **env: str) -> Iterator[NodeProcess]:
    node = NodeProcess(free_port(), node_id, redis_server.url, node_env(**env), [])
    node.start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def rsa_node(redis_server: Any, rsa_keys: tuple[bytes, str]) -> Iterator[NodeProcess]:
    yield from module_node(redis_server, "auth-rsa", PUSH_JWT_SECRET="", PUSH_JWT_PUBLIC_KEY=rsa_keys[1])


@pytest.fixture(scope="module")
def ec_node(redis_server: Any, ec_keys: tuple[bytes, str]) -> Iterator[NodeProcess]:
    yield from module_node(redis_server, "auth-ec", PUSH_JWT_SECRET="", PUSH_JWT_PUBLIC_KEY=ec_keys[1])


@pytest.fixture(scope="module")
def claims_node(redis_server: Any) -> Iterator[NodeProcess]:
    yield from module_node(
        redis_server, "auth-claims", PUSH_JWT_AUDIENCE="delta-push", PUSH_JWT_ISSUER="https://auth.delta"
    )


# --- helpers ---------------------------------------------------------------------------


async def refusal(connect: Any, node: NodeProcess, bad_token: str | None = None, **kwargs: Any) -> tuple[str, int]:
    """Connect and return (error code, close code) of the refusal."""
    client: WsClient = await connect(node, token=bad_token, expect_welcome=False, **kwargs)
    first = await client.recv()
    assert first["action"] == "error", f"expected a refusal, got {first}"
    return first["code"], await client.closed()


async def accepted(connect: Any, node: NodeProcess, good_token: str, **kwargs: Any) -> dict[str, Any]:
    client: WsClient = await connect(node, token=good_token, **kwargs)
    return client.welcome


# --- HS256 -------------------------------------------------------------------------------


async def test_hs256_token_is_accepted_and_names_the_user(shared_node, connect):
    sub = user()
    good = jwt.encode(claims(sub, ttl=600), JWT_SECRET, algorithm="HS256")
    welcome = await accepted(connect, shared_node, good)
    assert welcome["userId"] == sub
    assert welcome["expiresAt"] == jwt.decode(good, JWT_SECRET, algorithms=["HS256"])["exp"] * 1000


async def test_expired_token_gets_token_expired_then_4001(shared_node, connect):
    expired = jwt.encode(claims(user(), ttl=-30), JWT_SECRET, algorithm="HS256")
    assert await refusal(connect, shared_node, expired) == ("TOKEN_EXPIRED", 4001)


async def test_alg_none_token_is_unauthorized_4001(shared_node, connect):
    assert await refusal(connect, shared_node, unsigned_token(claims(user()))) == ("UNAUTHORIZED", 4001)


async def test_token_signed_with_the_wrong_key_is_unauthorized_4001(shared_node, connect):
    forged = jwt.encode(claims(user()), "not-the-secret-" + "x" * 32, algorithm="HS256")
    assert await refusal(connect, shared_node, forged) == ("UNAUTHORIZED", 4001)


async def test_algorithm_outside_the_allow_list_is_refused_even_with_the_right_secret(shared_node, connect):
    other_alg = hmac_token(claims(user()), JWT_SECRET.encode(), alg="HS384")
    assert await refusal(connect, shared_node, other_alg) == ("UNAUTHORIZED", 4001)


async def test_garbage_token_is_unauthorized_4001(shared_node, connect):
    assert await refusal(connect, shared_node, "not-a-jwt") == ("UNAUTHORIZED", 4001)


async def test_token_with_tampered_claims_is_unauthorized_4001(shared_node, connect):
    header, _, signature = token(user()).split(".")
    tampered = f"{header}.{b64(orjson.dumps(claims('someone-else', roles=['admin'])))}.{signature}"
    assert await refusal(connect, shared_node, tampered) == ("UNAUTHORIZED", 4001)


async def test_token_without_exp_is_refused(shared_node, connect):
    no_exp = jwt.encode({"sub": user(), "iat": int(time.time())}, JWT_SECRET, algorithm="HS256")
    assert await refusal(connect, shared_node, no_exp) == ("UNAUTHORIZED", 4001)


async def test_token_without_sub_is_refused(shared_node, connect):
    no_sub = jwt.encode(claims(None), JWT_SECRET, algorithm="HS256")
    assert await refusal(connect, shared_node, no_sub) == ("UNAUTHORIZED", 4001)


async def test_token_issued_by_a_clock_running_ahead_is_accepted(shared_node, connect):
    sub = user()
    ahead = jwt.encode(claims(sub, iat=int(time.time()) + 60), JWT_SECRET, algorithm="HS256")
    assert (await accepted(connect, shared_node, ahead))["userId"] == sub


async def test_token_via_authorization_bearer_header(shared_node, connect):
    sub = user()
    client = await connect(shared_node, headers={"Authorization": f"Bearer {token(sub)}"})
    assert client.welcome["userId"] == sub


async def test_bad_token_via_authorization_bearer_header_is_refused(shared_node, connect):
    forged = jwt.encode(claims(user()), "wrong-secret-" + "y" * 32, algorithm="HS256")
    code = await refusal(connect, shared_node, headers={"Authorization": f"Bearer {forged}"})
    assert code == ("UNAUTHORIZED", 4001)


async def test_aud_and_iss_are_not_checked_when_unset(shared_node, connect):
    sub = user()
    good = jwt.encode(claims(sub, aud="anything", iss="anyone"), JWT_SECRET, algorithm="HS256")
    assert (await accepted(connect, shared_node, good))["userId"] == sub


# --- RS256 / ES256 -----------------------------------------------------------------------


async def test_rs256_token_is_accepted_with_the_public_key(rsa_node, rsa_keys, connect):
    sub = user()
    good = jwt.encode(claims(sub), rsa_keys[0], algorithm="RS256")
    assert (await accepted(connect, rsa_node, good))["userId"] == sub


async def test_es256_token_is_accepted_with_the_public_key(ec_node, ec_keys, connect):
    sub = user()
    good = jwt.encode(claims(sub), ec_keys[0], algorithm="ES256")
    assert (await accepted(connect, ec_node, good))["userId"] == sub


async def test_hs256_token_forged_with_the_public_key_as_secret_is_refused(rsa_node, rsa_keys, connect):
    forged = hmac_token(claims(user(), roles=["admin"]), rsa_keys[1].encode())
    assert await refusal(connect, rsa_node, forged) == ("UNAUTHORIZED", 4001)


async def test_es256_hs256_confusion_is_refused(ec_node, ec_keys, connect):
    forged = hmac_token(claims(user()), ec_keys[1].encode())
    assert await refusal(connect, ec_node, forged) == ("UNAUTHORIZED", 4001)


async def test_rs256_token_signed_with_another_private_key_is_refused(rsa_node, connect):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims(user()), pem_pair(stranger)[0], algorithm="RS256")
    assert await refusal(connect, rsa_node, forged) == ("UNAUTHORIZED", 4001)


async def test_alg_none_is_refused_by_a_public_key_node(rsa_node, connect):
    assert await refusal(connect, rsa_node, unsigned_token(claims(user()))) == ("UNAUTHORIZED", 4001)


async def test_public_key_may_be_given_as_a_path(start_node, ec_keys, connect, tmp_path):
    path = tmp_path / "public.pem"
    path.write_text(ec_keys[1])
    node = start_node(node_id="auth-ec-path", PUSH_JWT_SECRET="", PUSH_JWT_PUBLIC_KEY=str(path))
    sub = user()
    assert (await accepted(connect, node, jwt.encode(claims(sub), ec_keys[0], algorithm="ES256")))["userId"] == sub


async def test_secret_and_public_key_together_accept_both_kinds_of_token(start_node, rsa_keys, connect):
    """HS256 with the secret *or* RS256/ES256 with the public key (SPEC §5): configuring both accepts both."""
    node = start_node(node_id="auth-both", PUSH_JWT_PUBLIC_KEY=rsa_keys[1])
    hs_user, rs_user = user(), user()
    assert (await accepted(connect, node, token(hs_user)))["userId"] == hs_user
    rs_token = jwt.encode(claims(rs_user), rsa_keys[0], algorithm="RS256")
    assert (await accepted(connect, node, rs_token))["userId"] == rs_user
    forged = hmac_token(claims(user()), rsa_keys[1].encode())
    assert await refusal(connect, node, forged) == ("UNAUTHORIZED", 4001)


# --- aud / iss --------------------------------------------------------------------------------


def claims_token(**extra: Any) -> str:
    doc = {"aud": "delta-push", "iss": "https://auth.delta", **extra}
    return jwt.encode(claims(user(), **doc), JWT_SECRET, algorithm="HS256")


async def test_token_with_the_configured_aud_and_iss_is_accepted(claims_node, connect):
    assert (await accepted(connect, claims_node, claims_token()))["userId"]


@pytest.mark.parametrize(
    "extra",
    [{"aud": "another-service"}, {"aud": None}, {"iss": "https://evil.example"}, {"iss": None}],
    ids=["wrong-aud", "missing-aud", "wrong-iss", "missing-iss"],
)
async def test_token_with_another_or_no_aud_or_iss_is_refused_when_checked(claims_node, connect, extra):
    assert await refusal(connect, claims_node, claims_token(**extra)) == ("UNAUTHORIZED", 4001)


# --- anonymous clients -------------------------------------------------------------------


async def test_anonymous_client_is_welcomed_without_a_user(shared_node, connect):
    client = await connect(shared_node)
    assert client.welcome["userId"] is None
    assert client.welcome["expiresAt"] is None


async def test_anonymous_client_may_subscribe_to_public_domains(shared_node, connect):
    client = await connect(shared_node)
    ack = await client.subscribe(["market.ticker:BTC/USDT", "market.*"], request_id="pub")
    assert ack["subscribed"] == ["market.ticker:BTC/USDT", "market.*"]


async def test_anonymous_client_is_forbidden_private_domains(shared_node, connect):
    client = await connect(shared_node)
    await client.send({"action": "subscribe", "channels": ["market.trades", "order.*", "risk.alert"], "id": "mix"})
    ack = await client.recv_action("ack")
    assert ack["subscribed"] == ["market.trades"]
    error = await client.recv_action("error")
    assert error["code"] == "FORBIDDEN"
    assert error["channels"] == ["order.*", "risk.alert"]
    assert error["id"] == "mix"
    await client.send({"action": "ping"})
    assert (await client.recv_action("pong"))["action"] == "pong"  # forbidden channels do not close the connection


async def test_anonymous_connections_can_be_switched_off(start_node, connect):
    node = start_node(node_id="auth-no-anon", PUSH_ALLOW_ANONYMOUS="false")
    assert await refusal(connect, node) == ("UNAUTHORIZED", 4001)
    sub = user()
    assert (await accepted(connect, node, token(sub)))["userId"] == sub


async def test_public_domains_are_configurable(start_node, connect):
    node = start_node(node_id="auth-public-ai", PUSH_PUBLIC_DOMAINS="market,ai")
    client = await connect(node)
    assert (await client.subscribe(["ai.*"], request_id="ai"))["subscribed"] == ["ai.*"]
    envelope = publish(node.redis_url, "ai.insight_generated", {"text": "public now"})
    [event] = await client.events(1)
    assert event["data"] == envelope
    await client.send({"action": "subscribe", "channels": ["order.*"], "id": "order"})
    assert (await client.recv_action("error"))["code"] == "FORBIDDEN"


# --- Origin allow-list --------------------------------------------------------------------


@pytest.fixture(scope="module")
def origin_node(redis_server: Any) -> Iterator[NodeProcess]:
    yield from module_node(redis_server, "auth-origin", PUSH_ALLOWED_ORIGINS="https://app.delta.example")


async def test_origin_outside_the_allow_list_is_forbidden_4003(origin_node, connect):
    code = await refusal(connect, origin_node, token(user()), headers={"Origin": "https://evil.example"})
    assert code == ("FORBIDDEN", 4003)


async def test_origin_on_the_allow_list_is_accepted(origin_node, connect):
    sub = user()
    welcome = await accepted(connect, origin_node, token(sub), headers={"Origin": "https://app.delta.example"})
    assert welcome["userId"] == sub


async def test_client_without_origin_is_accepted_by_an_origin_allow_list(origin_node, connect):
    """Only browsers send Origin, and the allow-list protects browsers (as in Centrifugo and gorilla/websocket)."""
    sub = user()
    assert (await accepted(connect, origin_node, token(sub)))["userId"] == sub


# --- expiry and refresh during a connection ----------------------------------------------


async def test_token_expiring_during_a_connection_gets_token_expired_then_4001(shared_node, connect):
    client = await connect(shared_node, token=token(user(), ttl=2))
    expires_at = client.welcome["expiresAt"]
    error = await client.recv_action("error", timeout=5)
    assert error["code"] == "TOKEN_EXPIRED"
    assert time.time() * 1000 >= expires_at - 50, "closed before the token expired"
    assert await client.closed() == 4001


async def test_refresh_before_expiry_keeps_the_connection_open(shared_node, connect):
    sub = user()
    client = await connect(shared_node, token=token(sub, ttl=2))
    old_expiry = client.welcome["expiresAt"]
    fresh = token(sub, ttl=600)
    await client.send({"action": "auth", "token": fresh, "id": "refresh"})
    reply = await client.recv_action("authenticated")
    assert reply["userId"] == sub
    assert reply["expiresAt"] == jwt.decode(fresh, JWT_SECRET, algorithms=["HS256"])["exp"] * 1000
    assert reply["expiresAt"] > old_expiry
    quiet_until = old_expiry / 1000 + 0.7
    with pytest.raises((asyncio.TimeoutError, TimeoutError)):
        message = await client.recv(timeout=max(0.1, quiet_until - time.time()))
        pytest.fail(f"connection got {message} after a refresh")
    await client.send({"action": "ping"})
    assert (await client.recv())["action"] == "pong"


async def test_refreshed_token_expiry_is_the_new_deadline(shared_node, connect):
    sub = user()
    client = await connect(shared_node, token=token(sub, ttl=600))
    await client.send({"action": "auth", "token": token(sub, ttl=2)})
    reply = await client.recv_action("authenticated")
    assert reply["expiresAt"] < client.welcome["expiresAt"]
    error = await client.recv_action("error", timeout=5)
    assert error["code"] == "TOKEN_EXPIRED"
    assert await client.closed() == 4001


async def test_refresh_with_a_different_sub_is_refused(shared_node, connect):
    alice, mallory = user(), user()
    client = await connect(shared_node, token=token(alice))
    await client.subscribe(["order.*"])
    await client.send({"action": "auth", "token": token(mallory), "id": "swap"})
    error = await client.recv_action("error")
    assert error["code"] == "UNAUTHORIZED"
    assert error["id"] == "swap"
    publish(shared_node.redis_url, "order.filled", {"for": "mallory"}, user_id=mallory)
    envelope = publish(shared_node.redis_url, "order.filled", {"for": "alice"}, user_id=alice)
    [event] = await client.events(1)
    assert event["data"] == envelope, "the connection must still be alice's, not mallory's"


async def test_refresh_with_an_expired_token_is_refused(shared_node, connect):
    sub = user()
    client = await connect(shared_node, token=token(sub))
    await client.send({"action": "auth", "token": token(sub, ttl=-30), "id": "old"})
    error = await client.recv_action("error")
    assert error["code"] == "TOKEN_EXPIRED"
    assert error["id"] == "old"


# --- tokens never appear in logs ------------------------------------------------------


async def test_tokens_never_appear_in_the_node_log(shared_node, connect):
    sub = user()
    used = [
        token(sub, ttl=600),  # accepted via ?token=
        token(sub, ttl=601),  # accepted via Authorization
        token(sub, ttl=602),  # refresh
        token(user(), ttl=603),  # refused refresh (other sub)
        jwt.encode(claims(sub, ttl=-30), JWT_SECRET, algorithm="HS256"),  # expired
        jwt.encode(claims(sub), "wrong-secret-" + "z" * 32, algorithm="HS256"),  # wrong key
        unsigned_token(claims(sub)),  # alg none
    ]
    good = await connect(shared_node, token=used[0])
    await connect(shared_node, headers={"Authorization": f"Bearer {used[1]}"})
    await good.send({"action": "auth", "token": used[2]})
    await good.recv_action("authenticated")
    await good.send({"action": "auth", "token": used[3]})
    await good.recv_action("error")
    for bad in used[4:]:
        await refusal(connect, shared_node, bad)
    await good.close()

    def logged() -> bool:
        text = shared_node.log()
        return text.count('"auth_failure"') >= 4 and good.welcome["connectionId"] in text and "disconnect" in text

    await async_wait_until(logged, timeout=5, message="auth failures and the disconnect to be logged")
    text = shared_node.log()
    for used_token in used:
        assert used_token not in text
        assert used_token.split(".")[1] not in text, "a token's claims segment was logged"
        signature = used_token.split(".")[2]
        assert not signature or signature not in text, "a token's signature was logged"
