"""The benchmark runs end to end in its smallest mode and prints sane numbers.

Speed is judged by the benchmark itself against Nchan, not here: this only
checks that the tool works (a real redis-server and `pushctl node`, 50
connections × 100 events/s for 2 s) so that the perf team's command keeps running.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
from conftest import ROOT


def test_bench_smallest_mode_delivers_everything_and_prints_the_table(tmp_path):
    result_path = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench",
            "--workloads",
            "w1",
            "--w1",
            "50x100",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--no-nchan",
            "--json",
            str(result_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "delivered/s" in done.stdout and "CPU µs/deliv" in done.stdout, done.stdout
    [row] = orjson.loads(result_path.read_bytes())["rows"]
    assert row["server"] == "delta-push"
    assert row["failed_connections"] == 0
    assert row["published"] == 200
    assert row["expected"] == 50 * 200
    assert 0.99 <= row["delivery_ratio"] <= 1.0
    assert 0 < row["cpu_us_per_delivery"] < 1000
    assert 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] < 2000
    assert row["delivered_per_second"] > 0
