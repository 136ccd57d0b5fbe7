"""The benchmark runs end to end in its smallest mode and prints sane numbers.

Speed is judged by the benchmark itself against Nchan, not here: this only
checks that the tool works (a real redis-server and `pushctl node`, 50
connections × 100 events/s for 2 s) so that the perf team's command keeps running.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from conftest import ROOT


def run_bench(result_path, *args: str) -> tuple[str, dict]:
    """Run ``python -m loadtest.bench`` with ``args`` (bounded); returns (stdout, the --json document)."""
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", *args, "--json", str(result_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, orjson.loads(result_path.read_bytes())


def test_bench_smallest_mode_delivers_everything_and_prints_the_table(tmp_path):
    result_path = tmp_path / "bench.json"
    stdout, result = run_bench(
        result_path, "--workloads", "w1", "--w1", "50x100", "--duration", "2", "--warmup", "0.5", "--no-nchan"
    )
    assert "delivered/s" in stdout and "CPU µs/deliv" in stdout, stdout
    [row] = result["rows"]
    assert row["server"] == "delta-push"
    assert row["failed_connections"] == 0
    assert row["published"] == 200
    assert row["expected"] == 50 * 200
    assert 0.99 <= row["delivery_ratio"] <= 1.0
    assert 0 < row["cpu_us_per_delivery"] < 1000
    assert 0 <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"] < 2000
    assert row["delivered_per_second"] > 0


def test_bench_ingest_family_counts_every_wanted_event_and_bounds_the_storm(tmp_path):
    """The bus-ingest workloads (issue 11) run in their smallest mode; no speed is judged here."""
    result_path = tmp_path / "ingest.json"
    stdout, result = run_bench(
        result_path,
        "--workloads",
        "ingest:offline-private,ingest:wanted-one,bus-storm",
        "--ingest-events",
        "2000",
        "--ingest-idle",
        "0.5",
        "--bus-storm",
        "200",
    )
    assert "CPU µs/ev" in stdout and "redis peak" in stdout, stdout
    offline, wanted, storm = result["ingest"]
    assert offline["workload"] == "ingest offline-private" and offline["published"] == 2000
    assert offline["cpu_us_per_event"] is not None and offline["publish_rate"] > 0
    assert wanted["published"] == 2000 and wanted["delivered"] == 2000 and wanted["delivery_ratio"] == 1.0
    assert storm["failed_connections"] == 0 and storm["connect_seconds"] > 0
    assert storm["redis_clients_peak"] >= storm["redis_clients_final"] >= 1


def test_bench_slow_reader_workload_reads_below_the_offered_rate_and_catches_up(tmp_path):
    """w2slow (issue 13) in its smallest mode: the sleep reader falls behind in the window, then catches up."""
    result_path = tmp_path / "slow.json"
    stdout, result = run_bench(
        result_path,
        "--workloads",
        "w2slow",
        "--w2slow",
        "50x20",
        "--slow-reader",
        "sleep",
        "--slow-read-share",
        "0.5",
        "--duration",
        "2",
        "--warmup",
        "0.5",
        "--no-nchan",
    )
    assert "win share" in stdout and "KB loaded" in stdout, stdout
    [row] = result["rows"]
    assert row["reader"] == "sleep" and row["failed_connections"] == 0
    assert row["expected"] == 50 * 40
    assert 0 < row["window_share"] <= 0.6, "the readers kept up: not a slow-reader workload"
    assert 0.99 <= row["delivery_ratio"] <= 1.0
    assert row["close_codes"] == {} and row["lagged"] == 0
    assert 0 < row["cpu_us_per_delivery"] < 1000 and row["rss_kb_per_conn"] is not None


def test_run_passes_node_settings_and_refuses_anything_but_push_settings(capsys):
    """`loadtest.run` starts its nodes without inherited PUSH_* variables: --node-setting is the way in."""
    from loadtest.run import build_parser

    args = build_parser().parse_args(["ratelimit", "--node-setting", "PUSH_TCP_NODELAY=true", "--node-setting", "PUSH_X=a=b"])
    assert dict(args.node_setting) == {"PUSH_TCP_NODELAY": "true", "PUSH_X": "a=b"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ratelimit", "--node-setting", "REDIS_URL=redis://x"])
    assert "expected PUSH_NAME=VALUE" in capsys.readouterr().err
