"""The bus-shards benchmark (issue 12) runs end to end in its smallest mode and loses nothing.

Only that the tool works: a 1-master and a 3-master Redis Cluster, two real
`pushctl node`s, 20 users, 200 private events/s for 2 s each — a rate far below
what the nodes deliver, so every published event must reach its client.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
from conftest import ROOT


def test_bus_shards_smallest_mode_delivers_every_event_on_1_and_3_shards(tmp_path):
    result_path = tmp_path / "bus_shards.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bus_shards", "--seconds", "2", "--users", "20", "--rate", "200",
         "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=40,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| shards |" in done.stdout and "3 shards / 1 shard" in done.stdout, done.stdout
    result = orjson.loads(result_path.read_bytes())
    configurations = {c["shards"]: c for c in result["configurations"]}
    assert set(configurations) == {1, 3}
    for shards, c in configurations.items():
        assert c["published"] >= 300, c
        assert c["delivered"] == c["published"] == c["reached_nodes"], c
        assert len(c["per_shard"]) == shards
        assert sum(s["events"] for s in c["per_shard"]) == c["published"]
    assert all(s["events"] > 0 for s in configurations[3]["per_shard"])
    assert "busiest_shard_ratio_3_over_1" in result
