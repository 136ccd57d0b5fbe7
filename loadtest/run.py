"""Run one locust suite headless, with its own Redis and node(s) unless given a target.

    .venv/bin/python -m loadtest.run ratelimit                # PASS expected
    .venv/bin/python -m loadtest.run ratelimit --high-limit   # node at 300 ev/s: FAIL expected
    .venv/bin/python -m loadtest.run caps                     # two nodes, one Redis
    .venv/bin/python -m loadtest.run soak                     # router if this checkout has one, else a node
    .venv/bin/python -m loadtest.run soak --target ws://127.0.0.1:8080/ws --redis-url redis://127.0.0.1:6379/0

Without ``--target`` it starts a private redis-server and ``pushctl node``
processes on free ports (127.0.0.1 only), runs locust headless against them and
stops them. With ``--target`` (a WebSocket URL; ``caps`` accepts a comma list,
one per node) it only runs locust: give the cluster's ``--redis-url`` and its
``--jwt-secret`` (or ``PUSH_JWT_SECRET``). Any other argument (after ``--``,
or unknown to this wrapper) is passed to locust. The exit code is locust's:
0 PASS, 1 FAIL; the last line printed says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from loadtest import procs

SUITES = {
    "ratelimit": {"file": "locust_ratelimit.py", "users": 11, "seconds": 150},
    "caps": {"file": "locust_caps.py", "users": 4, "seconds": 90},
    "soak": {"file": "locust_soak.py", "users": 51, "seconds": 0},  # run time follows --soak-seconds
}
HIGH_LIMIT = "300"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--target", help="WebSocket URL(s) of a running cluster (default: start one)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--jwt-secret", default=os.environ.get("PUSH_JWT_SECRET", ""))
    parser.add_argument("--users", type=int, help="locust users (default per suite)")
    parser.add_argument(
        "--high-limit",
        action="store_true",
        help=f"start the node with PUSH_EVENTS_PER_SECOND={HIGH_LIMIT}: the rate-limit suite must FAIL",
    )
    parser.add_argument("--soak-seconds", type=float, default=60.0, help="soak: seconds of load (default 60)")
    parser.add_argument(
        "--node-setting",
        action="append",
        default=[],
        type=procs.parse_node_setting,
        metavar="NAME=VALUE",
        help="a setting for the nodes and router this starts (repeatable), e.g. PUSH_TCP_NODELAY=true; "
        "inherited PUSH_* variables never reach them",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    args.locust_args = [a for a in extra if a != "--"]
    if importlib.util.find_spec("locust") is None or importlib.util.find_spec("websocket") is None:
        print("FAIL: locust and websocket-client are not installed: .venv/bin/pip install -e '.[load]'", flush=True)
        return 2
    suite = SUITES[args.suite]
    procs.raise_nofile()
    children: list[procs.Child] = []
    try:
        if args.target:
            targets = args.target
            redis_url, secret = args.redis_url, args.jwt_secret
        else:
            targets, redis_url = start_cluster(args, children)
            secret = procs.BENCH_JWT_SECRET
        seconds = suite["seconds"] or int(args.soak_seconds + 90)
        users = args.users or suite["users"]
        host = targets.split(",")[0]
        argv = [sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / suite["file"])]
        argv += ["--headless", "--only-summary", "-u", str(users), "-r", str(users), "-t", f"{seconds}s"]
        argv += ["--stop-timeout", "5", "--host", host, "--redis-url", redis_url, "--jwt-secret", secret]
        if args.suite == "caps":
            argv += ["--targets", targets]
        if args.suite == "soak":
            argv += ["--soak-seconds", str(args.soak_seconds)]
        argv += args.locust_args
        env = {**os.environ, "PYTHONPATH": str(procs.ROOT)}
        print(f"loadtest.run: locust {args.suite} against {targets} (Redis {redis_url})", flush=True)
        try:
            done = subprocess.run(argv, cwd=procs.ROOT, env=env, timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            print(f"FAIL: {args.suite}: locust did not stop within {seconds + 60} s", flush=True)
            return 1
        return done.returncode
    except (RuntimeError, OSError) as exc:
        print(f"FAIL: {args.suite}: could not start the cluster: {exc}", flush=True)
        return 1
    finally:
        procs.stop_all(children)


def start_cluster(args: argparse.Namespace, children: list[procs.Child]) -> tuple[str, str]:
    """Redis + node(s) (+ a router for soak, when this checkout has one); returns (targets, Redis URL)."""
    redis_child, redis_url = procs.start_redis()
    children.append(redis_child)
    settings: dict[str, str] = dict(args.node_setting)
    if args.high_limit:
        settings["PUSH_EVENTS_PER_SECOND"] = HIGH_LIMIT
        print(f"loadtest.run: node started with PUSH_EVENTS_PER_SECOND={HIGH_LIMIT}: expect FAIL", flush=True)
    count = 2 if args.suite == "caps" else 1
    urls = []
    for index in range(count):
        node, port = procs.start_node(redis_url, node_id=f"{args.suite}-{index + 1}", **settings)
        children.append(node)
        urls.append(f"ws://127.0.0.1:{port}/ws")
    if args.suite == "soak" and procs.router_available():
        router, port = procs.start_router(
            redis_url, PUSH_ROUTER_IP_RATE="1000", PUSH_ROUTER_IP_BURST="2000", **settings
        )
        children.append(router)
        print(f"loadtest.run: soak goes through a router (port {port}) in front of {urls[0]}", flush=True)
        urls = [f"ws://127.0.0.1:{port}/ws"]
    elif args.suite == "soak":
        print("loadtest.run: no `pushctl router` in this checkout: soak runs against the node directly", flush=True)
    return ",".join(urls), redis_url


if __name__ == "__main__":
    sys.exit(main())
