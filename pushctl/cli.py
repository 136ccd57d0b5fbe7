"""``pushctl``: run and poke a delta-push cluster (SPEC §10)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, Sequence

import orjson

from cluster.settings import add_setting_flags, settings_from_args
from pushctl.local_cluster import ROUTER_PORT, add_up_flags, safe_url

NODE_FLAGS = None  # every setting is a flag of `pushctl node`


def _publish(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisClusterException, RedisError

    from cluster.envelope import EnvelopeError
    from cluster.events import DEFAULT_SOURCE_BY_DOMAIN, SyncEventPublisher

    settings = settings_from_args(args)
    try:
        payload = orjson.loads(args.payload)
    except orjson.JSONDecodeError as exc:
        print(f"pushctl publish: --payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    domain = args.type.partition(".")[0]
    if args.user is None and domain not in settings.public_domains:
        print(
            f"pushctl publish: warning: no --user, so this {args.type} goes to EVERY user subscribed to it "
            f"(add --user U for one user's private event)",
            file=sys.stderr,
        )
    source = args.source or DEFAULT_SOURCE_BY_DOMAIN.get(domain, "")
    try:
        publisher = SyncEventPublisher(settings.redis_url, source or "unknown", allow_unknown=args.allow_unknown)
        envelope = publisher.publish(
            args.type,
            payload,
            key=args.key,
            user_id=args.user,
            session_id=args.session,
            priority=args.priority,
            ttl=args.ttl,
            correlation_id=args.correlation_id,
        )
    except (EnvelopeError, ValueError) as exc:
        print(f"pushctl publish: {exc}", file=sys.stderr)
        return 2
    except (OSError, RedisError, RedisClusterException) as exc:
        print(f"pushctl publish: cannot reach Redis at {safe_url(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(envelope).decode())
    return 0


def _token(args: argparse.Namespace) -> int:
    from cluster.auth import ADMIN_ROLE, issue_token

    settings = settings_from_args(args)
    roles = list(args.role or [])
    if args.admin:
        roles.append(ADMIN_ROLE)
    try:
        token = issue_token(
            settings.jwt_secret,
            args.sub,
            ttl_seconds=args.ttl,
            roles=roles,
            sid=args.sid,
            audience=settings.jwt_audience or None,
            issuer=settings.jwt_issuer or None,
        )
    except ValueError as exc:
        print(f"pushctl token: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


async def _tail(args: argparse.Namespace) -> int:
    from cluster.channels import ChannelError
    from cluster.client import PushClient

    done = asyncio.Event()
    received = 0

    def show(event: dict[str, Any]) -> None:
        nonlocal received
        print(orjson.dumps(event).decode(), flush=True)
        received += 1
        if args.count and received >= args.count:
            done.set()

    def show_notice(doc: dict[str, Any]) -> None:
        """Everything but events goes to stderr, one JSON object a line."""
        print(orjson.dumps(doc).decode(), file=sys.stderr, flush=True)

    client = PushClient(
        args.url,
        token=args.token,
        on_lagged=show_notice,
        on_error=show_notice,
        on_ack=show_notice,
        on_unrecovered=lambda channels: show_notice({"recovered": False, "channels": channels}),
        on_state=lambda state: show_notice({"state": state}),
        fail_fast=True,
    )
    try:
        client.subscribe(args.patterns, show)
    except ChannelError as exc:
        print(f"pushctl tail: {exc}", file=sys.stderr)
        return 2
    async with client:
        closed = asyncio.ensure_future(client.wait_closed())
        finished = asyncio.ensure_future(done.wait())
        await asyncio.wait({closed, finished}, return_when=asyncio.FIRST_COMPLETED)
        finished.cancel()
    if client.failure is not None:
        print(f"pushctl tail: cannot connect to {args.url}: {client.failure}", file=sys.stderr)
        return 1
    if client.fatal is not None:
        print(f"pushctl tail: refused by the server (close {client.fatal})", file=sys.stderr)
        return 1
    return 0


def _node(args: argparse.Namespace) -> int:
    from cluster.auth import require_strong_secret
    from node.app import run

    settings = settings_from_args(args)
    require_strong_secret(settings.jwt_secret, "pushctl node")
    run(settings)
    return 0


def _router(args: argparse.Namespace) -> int:
    import dataclasses
    import os

    from cluster.auth import require_strong_secret
    from router.app import run

    settings = settings_from_args(args)
    require_strong_secret(settings.jwt_secret, "pushctl router")
    if args.port is None and "PUSH_PORT" not in os.environ:
        settings = dataclasses.replace(settings, port=ROUTER_PORT)
    run(settings)
    return 0


def _up(args: argparse.Namespace) -> int:
    from pushctl.local_cluster import up

    return up(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pushctl", description="Run and use a delta-push cluster.")
    parser.add_argument("--version", action="version", version=f"pushctl (delta-push) {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    node = commands.add_parser("node", help="run a push node")
    add_setting_flags(node)
    node.set_defaults(func=_node)

    router = commands.add_parser("router", help=f"run a router (default port {ROUTER_PORT})")
    add_setting_flags(router, shown={"port": ROUTER_PORT})
    router.set_defaults(func=_router)

    up = commands.add_parser("up", help="run a local cluster: Redis, a router on 8080, nodes on 8081...")
    add_up_flags(up)
    up.set_defaults(func=_up)

    publish = commands.add_parser("publish", help="publish one event through the SDK")
    publish.add_argument("type", help="event type, e.g. order.filled")
    publish.add_argument("--payload", default="{}", help="payload as JSON")
    publish.add_argument("--user", help="userId: a private event of that user")
    publish.add_argument("--key", help="channel key, e.g. BTC/USDT")
    publish.add_argument("--priority", choices=["p0", "p1", "p2", "p3"])
    publish.add_argument("--ttl", type=int, help="milliseconds after which the event is not delivered")
    publish.add_argument("--session", help="sessionId: only that session's connections")
    publish.add_argument("--correlation-id", dest="correlation_id")
    publish.add_argument("--source", help="service name (default: the domain's service)")
    publish.add_argument("--allow-unknown", action="store_true", help="publish unknown types or services")
    add_setting_flags(publish, ["redis_url"])
    publish.set_defaults(func=_publish)

    tail = commands.add_parser("tail", help="print live events")
    tail.add_argument("patterns", nargs="+", metavar="PATTERN")
    tail.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="router or node WebSocket URL")
    tail.add_argument("--token", help="JWT (else anonymous: public channels only)")
    tail.add_argument("--count", type=int, default=0, help="exit after this many events")
    tail.set_defaults(func=lambda a: _run_async(_tail(a)))

    token = commands.add_parser("token", help="print a dev token signed with PUSH_JWT_SECRET")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--admin", action="store_true", help="add the admin role")
    token.add_argument("--role", action="append", help="another role (repeatable)")
    token.add_argument("--sid", help="session id claim")
    token.add_argument("--ttl", type=int, default=3600, help="seconds until expiry")
    add_setting_flags(token, ["jwt_secret", "jwt_audience", "jwt_issuer"])
    token.set_defaults(func=_token)
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml), so an image says what it carries."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("delta-push")
    except PackageNotFoundError:  # run from a checkout without `pip install`
        return "unknown (not installed)"


def _run_async(coro: Any) -> int:
    from cluster.process import run_loop

    result: list[int] = []

    async def main() -> None:
        result.append(await coro)

    try:
        run_loop(main())
    except KeyboardInterrupt:
        return 130
    return result[0] if result else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
