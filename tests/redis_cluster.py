"""A real Redis Cluster for tests: 3 masters + 3 replicas of ``redis-server --cluster-enabled yes``.

Started on free ports in a temporary directory, joined with
``redis-cli --cluster create … --cluster-replicas 1 --cluster-yes``, torn down
by PID. Tests may SIGKILL one master (``kill_master_of``) to force a failover.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.cluster import RedisCluster

START_TIMEOUT = 30.0
NODE_TIMEOUT_MS = 2000  # how long a silent master stays a master: the failover takes about this plus an election


def _free_ports(count: int) -> list[int]:
    import socket

    ports: list[int] = []
    socks = []
    while len(ports) < count:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        socks.append(sock)
        if port + 10000 <= 65535:  # the cluster bus port is port + 10000
            ports.append(port)
    for sock in socks:
        sock.close()
    return ports


class RedisClusterProcesses:
    """Six redis-server processes forming one cluster; ``url`` is what nodes and the SDK take."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.count = masters * (1 + replicas)
        self.replicas = replicas
        self.ports = _free_ports(self.count)
        self.dir = Path(tempfile.mkdtemp(prefix="delta-push-rc-"))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            raise RuntimeError("redis-server and redis-cli are required (.ci/run installs them with apt-get)")
        for port in self.ports:
            workdir = self.dir / str(port)
            workdir.mkdir()
            self.procs[port] = subprocess.Popen(
                [
                    binary,
                    "--port", str(port),
                    "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(workdir),
                    "--logfile", "redis.log",
                    "--repl-diskless-sync-delay", "0",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            self._wait(lambda p=port: redis.Redis(port=p).ping(), "redis-server to start")
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=START_TIMEOUT,
        )  # fmt: skip
        self._wait(self._healthy, "the cluster to be ok on every node")

    def _healthy(self) -> bool:
        """Every node sees the cluster ok, and every replica has synced (a replica that never did cannot fail over)."""
        for port in self.procs:
            node = redis.Redis(port=port)
            if not self._state_ok(node):
                return False
            replication = node.info("replication")
            if replication.get("role") == "slave" and replication.get("master_link_status") != "up":
                return False
        client = self.client()
        try:
            client.set("push:probe", "1")
            return len(client.get_primaries()) == self.count // (1 + self.replicas)
        finally:
            client.close()

    @staticmethod
    def _wait(condition: object, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                if condition():  # type: ignore[operator]
                    return
            except (redis.exceptions.RedisError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}")

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.ports[0])

    def master_port_of(self, key: str) -> int:
        client = self.client()
        try:
            node = client.get_node_from_key(key)
            return int(node.port)
        finally:
            client.close()

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port, None)
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def wait_failover(self, dead_port: int, key: str, timeout: float = 30.0) -> int:
        """Wait until another node serves ``key``'s slot as master; returns its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for port in self.procs:
                try:
                    client = redis.Redis(port=port, socket_timeout=1)
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                    for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        owner = int(master[1])
                        if start <= slot <= end and owner != dead_port and self._state_ok(client):
                            return owner
                except (redis.exceptions.RedisError, OSError):
                    continue
            time.sleep(0.2)
        raise RuntimeError(f"no failover of {key}'s slot within {timeout} s")

    @staticmethod
    def _state_ok(client: redis.Redis) -> bool:
        return "cluster_state:ok" in client.execute_command("CLUSTER", "INFO").decode()

    def stop(self, keep_logs: bool = False) -> None:
        for port in list(self.procs):
            self.kill(port)
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
