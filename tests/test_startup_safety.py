"""A cluster never starts on a secret anyone could know (issue 16), and the CLI says what it is.

Real `pushctl` processes: a node or router given a placeholder or a short
HS256 secret exits non-zero at once with one line naming the setting (and not
the secret); `pushctl up` refuses one too but still generates its own when
none is set (tests/test_cluster.py starts it that way).
"""

from __future__ import annotations

import subprocess
from importlib.metadata import version

import pytest
from conftest import JWT_SECRET, PUSHCTL, ROOT, free_port, node_env

from cluster.auth import MIN_SECRET_BYTES, weak_secret

PLACEHOLDER = "replace-me-with-a-32-byte-random-secret"
SHORT = "0123456789"  # 10 bytes


def run_pushctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PUSHCTL, *args], env=node_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("command", ["node", "router", "up"])
@pytest.mark.parametrize("secret", [PLACEHOLDER, SHORT], ids=["placeholder", "10-bytes"])
def test_a_weak_jwt_secret_stops_the_process_with_one_clear_line(command: str, secret: str) -> None:
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    result = run_pushctl(command, "--port", str(free_port()), PUSH_JWT_SECRET=secret, REDIS_URL=unreachable)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pushctl {command}: refusing to start" in lines[0] and "PUSH_JWT_SECRET" in lines[0]
    assert secret not in result.stderr + result.stdout, "the secret itself is never printed"


def test_the_flag_is_checked_like_the_environment_variable() -> None:
    result = run_pushctl("node", "--jwt-secret", SHORT, "--port", str(free_port()))
    assert result.returncode != 0 and "PUSH_JWT_SECRET is 10 bytes" in result.stderr


def test_weak_secret_accepts_random_and_test_secrets_and_refuses_examples() -> None:
    assert weak_secret(JWT_SECRET) is None
    assert weak_secret("x" * MIN_SECRET_BYTES) is None
    assert weak_secret("") is None, "no secret means no HS256 (public keys or anonymous only)"
    assert weak_secret("x" * (MIN_SECRET_BYTES - 1))
    for example in ("CHANGE_ME_" + "0" * 40, "dev-only-secret-change-me-0123456789abcdef", "ReplaceMe" + "9" * 40):
        assert weak_secret(example), example


def test_version_prints_the_installed_version() -> None:
    result = run_pushctl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"pushctl (delta-push) {version('delta-push')}"


def test_router_help_shows_the_router_port() -> None:
    result = run_pushctl("router", "--help")
    assert result.returncode == 0
    assert "default 8080" in port_help(result.stdout), port_help(result.stdout)
    assert "default 8081" in port_help(run_pushctl("node", "--help").stdout)


def port_help(text: str) -> str:
    """The help of --port (its last mention: the first is the usage line), on one line."""
    return " ".join(text.rsplit("--port PUSH_PORT", 1)[1].split("--", 1)[0].split())
