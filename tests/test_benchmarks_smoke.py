"""Smoke test: benchmarks/overhead.py --quick runs end to end and writes the documented JSON keys.

Timing values are not checked against targets (a --quick run is too short to mean anything).
"""

import json
import math
import pytest

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")

from benchrun import run_benchmark  # noqa: E402


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_overhead_quick_writes_json(tmp_path):
    out = tmp_path / "overhead.json"
    rc, stdout = run_benchmark("overhead", "--quick", "--out", out)
    assert rc == 0, stdout[-2000:]
    assert "realised/ideal" in stdout
    data = json.loads(out.read_text())
    for key in ("machine", "settings", "targets", "bypass", "compute_steps", "block_costs", "candidates",
                "speedup", "dispatch_us", "summary"):
        assert key in data, key
    for key in ("command", "torch", "threads", "processor", "cpu_count"):
        assert key in data["machine"], key
    assert data["settings"]["quick"] is True
    assert _positive(data["bypass"]["ratio"])
    assert _positive(data["compute_steps"]["all"]["ratio"])
    assert len(data["block_costs"]["blocks_ms"]["transformer_blocks"]) == 2
    assert len(data["block_costs"]["blocks_ms"]["single_transformer_blocks"]) == 6
    row = data["speedup"][0]
    for key in ("config", "ideal", "realised", "realised_over_ideal"):
        assert key in row, key
    assert row["ideal"] > 1 and _positive(row["realised"])
    assert row["stats"]["stale_reads_avoided"] == 0
    for key in ("bypass_ratio", "compute_step_ratio", "target_ideal", "target_realised",
                "target_realised_over_ideal"):
        assert _positive(data["summary"][key]), key
