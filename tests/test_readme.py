"""The README documents every setting with its real default, and the commands CI runs."""

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import orjson
from conftest import ROOT, up_env, up_router_port, wait_until

from cluster.settings import SETTINGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_configuration_table_lists_every_setting_with_its_default():
    for env, flag, default, _ in SETTINGS:
        row = f"| `{env}` | `{flag}` | `{default}` |"
        assert row in README, f"README configuration table lacks or misstates {env}"


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test.sh" in README and "scripts/test.sh" in ci
    assert "scripts/up.sh" in README


# --- the "Using it" snippets, run as written (issue 17) ---------------------------------------

RUN_START, RUN_END = "<!-- readme-run: start -->", "<!-- readme-run: end -->"
SNIPPET_TIMEOUT = 30.0
LONG_RUNNING = ("pushctl up", "pushctl tail")
"""Commands a terminal keeps running: the test starts them in the background and waits until they are ready."""


def readme_terminals() -> list[list[str]]:
    """The fenced ``sh`` blocks of the marked section: one list of lines per terminal."""
    section = README[README.index(RUN_START) : README.index(RUN_END)]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [[line for line in block.splitlines() if line.strip()] for block in blocks]


def test_readme_snippets_are_pasteable_commands():
    terminals = readme_terminals()
    assert len(terminals) == 3
    text = "\n".join(line for lines in terminals for line in lines)
    assert not re.search(r"\[--|…|<[a-z-]+>|change-me", text), "placeholders cannot be pasted"
    assert all(line.startswith(("export ", ".venv/bin/pushctl ", "TOKEN=", "ADMIN=", "curl ")) for line in text.splitlines())
    assert "$TOKEN" not in text.split("TOKEN=", 1)[0], "$TOKEN is used before it is set"


class Terminal:
    """One terminal of the README: its lines run by one bash, in its own session, output to files."""

    def __init__(self, name: str, lines: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.out = Path(f"/tmp/delta-push-readme-{os.getpid()}-{name}.out")
        self.err = Path(f"/tmp/delta-push-readme-{os.getpid()}-{name}.err")
        script = "set -euo pipefail\n" + "\n".join(lines) + "\n"
        self.proc = subprocess.Popen(
            ["bash", "-c", script], cwd=ROOT, env=env, stdout=self.out.open("wb"), stderr=self.err.open("wb"),
            start_new_session=True,
        )

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def running(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"terminal {self.name} exited with {self.proc.returncode}:\n{self.output()}")
        return True

    def interrupt(self) -> int:
        """Ctrl-C, as a user stops it."""
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout=SNIPPET_TIMEOUT)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def json_documents(text: str) -> list[dict]:
    """Every JSON object in ``text``, whether or not a newline separates them."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) != -1:
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def adapt(line: str, port: int) -> str:
    """The README's line for a cluster on ``port`` instead of 8080 (busy on a shared machine)."""
    if port == 8080:
        return line
    for offset in range(4):
        line = line.replace(f"127.0.0.1:{8080 + offset}", f"127.0.0.1:{port + offset}")
    line = line.replace("pushctl up ", f"pushctl up --port {port} ")
    return line.replace("pushctl tail ", f"pushctl tail --url ws://127.0.0.1:{port}/ws ")


def test_readme_using_it_runs_as_written_against_a_real_cluster(private_redis):
    """Terminal 1 starts the cluster, terminal 2 tails, terminal 3 publishes and queries: all succeed."""
    port, note = up_router_port(3)
    if note:
        print(note)
    env = up_env(REDIS_URL=private_redis.url)  # the user's default Redis, here a private one
    one, two, three = ([adapt(line, port) for line in lines] for lines in readme_terminals())
    assert any(cmd in one[-1] for cmd in LONG_RUNNING) and any(cmd in two[-1] for cmd in LONG_RUNNING)
    cluster = Terminal("1", one, env)
    tail: Terminal | None = None
    try:
        wait_until(
            lambda: cluster.running() and "pushctl up: ready" in cluster.output(),
            SNIPPET_TIMEOUT,
            message="terminal 1: pushctl up ready",
        )
        assert f"http://127.0.0.1:{port}/" in cluster.output(), "up names the live page"
        assert "node-3 ready" in cluster.output(), "up prints progress while starting"
        tail = Terminal("2", two, env)
        wait_until(lambda: tail.running() and '"ack"' in tail.output(), SNIPPET_TIMEOUT, message="terminal 2: tail ack")
        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + "\n".join(three)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=SNIPPET_TIMEOUT,
        )
        assert result.returncode == 0, f"terminal 3 failed:\n{result.stdout}\n{result.stderr}"
        *published, route, view = json_documents(result.stdout)  # curl prints no newline after its body
        assert [doc["type"] for doc in published] == ["order.filled", "market.ticker"]
        assert route["node"] in {"node-1", "node-2", "node-3"}
        assert sorted(node["id"] for node in view["nodes"]) == ["node-1", "node-2", "node-3"]

        def tailed() -> list[dict]:
            return [orjson.loads(line) for line in tail.out.read_text().splitlines() if line.startswith("{")]

        events = wait_until(lambda: len(tailed()) >= 2 and tailed(), SNIPPET_TIMEOUT, message="terminal 2: 2 events")
        data = [event.get("data", event) for event in events]
        assert {(d["type"], d.get("userId")) for d in data} == {
            ("order.filled", "alice"),
            ("market.ticker", None),
        }
        tail.interrupt()
        assert cluster.interrupt() == 0
    finally:
        if tail is not None:
            tail.kill()
        cluster.kill()
