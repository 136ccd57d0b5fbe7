"""The delta-frames benchmark (issue 15) runs end to end in a small mode and checks itself.

Only that the tool works: 10 connections, 10 book updates/s for 2 s, full then delta. Every
update must reach every client, the delta mode must send deltas and fewer bytes, and the
checking client must rebuild the last book in both modes.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
from conftest import ROOT


def test_state_bench_small_mode_delivers_every_update_and_deltas_save_bytes(tmp_path):
    result_path = tmp_path / "state_bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest.state_bench", "--connections", "10", "--seconds", "2",
         "--json", str(result_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    full, delta = orjson.loads(result_path.read_bytes())
    assert (full["mode"], delta["mode"]) == ("full", "delta")
    for mode in (full, delta):
        assert mode["delivered"] == mode["expected"] == 19 * 10, mode
        assert mode["last_book_matches"], mode
    assert full["delta_share"] == 0 and delta["delta_share"] > 0.9
    assert delta["bytes_per_connection_per_second"] < full["bytes_per_connection_per_second"] / 5
