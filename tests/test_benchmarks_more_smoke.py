"""Smoke tests: benchmarks/{compile,timestep,forecast,attention,fallback}.py --quick run end to end.

Each script runs in the test process (tests/benchrun.py) on tiny-flux (the --quick default) and must
write its JSON, the Markdown table next to it (and the Pareto PNGs where the script draws them), with the
documented keys. Timing values are not checked against targets: a --quick run is too short
to mean anything.
"""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from benchrun import run_benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, tmp_path, *extra):
    out = tmp_path / f"{script}.json"
    rc, stdout = run_benchmark(script, "--quick", "--out", out, *extra)
    assert rc == 0, stdout[-3000:]
    assert "command :" in stdout and "torch" in stdout
    assert out.exists() and (tmp_path / f"{script}.md").exists()
    data = json.loads(out.read_text())
    for key in ("command", "torch", "threads", "processor", "cpu_count"):
        assert key in data["machine"], key
    assert data["settings"]["quick"] is True
    assert "tiny-flux" in data["models"]
    return data["models"]["tiny-flux"], stdout, data


def _finite_positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_compile_quick(tmp_path):
    r, stdout, data = _run("compile", tmp_path)
    assert data["settings"]["backend"] == "aot_eager"
    flows = r["flows"]
    assert set(flows) == {"uncached eager", "uncached aot_eager", "cached eager", "cached aot_eager",
                          "cached aot_eager full", "cached aot_eager static", "user compile aot_eager"}
    # full graphs: one compiled graph per variant; regional: fewer graphs than segments; nothing after warm-up
    for name in ("cached aot_eager", "cached aot_eager full", "cached aot_eager static", "user compile aot_eager"):
        per_variant = flows[name]["variants"]
        assert len(per_variant) == r["variants"], per_variant
        if name not in ("cached aot_eager", "cached aot_eager static"):
            assert all(v["graphs"] == 1 for v in per_variant.values()), per_variant
        assert flows[name]["recompiles"] == 0
        assert _finite_positive(flows[name]["realised_over_ideal"])
    regional = r["stats"]["cached aot_eager"]
    assert r["default_graphs"] == regional["graph_mode"] == "regional"
    assert flows["cached aot_eager"]["graphs"] == regional["graphs_compiled"] and regional["graphs_shared"] > 0
    assert "compile_cost" not in r and _finite_positive(r["ratios"]["regional_over_full_step"])
    assert "ratios: regional_over_full_step" in stdout
    # dynamic shapes (the default) against the same graphs compiled for the captured sizes
    assert r["shape_capture"].startswith("dynamic") and _finite_positive(r["ratios"]["dynamic_over_static_step"])
    assert flows["uncached aot_eager"]["graphs"] >= 1
    assert r["recompile_error"] is None
    assert all(_finite_positive(f["per_step_ms"]) for f in flows.values())
    assert "realised/ideal" in stdout


def test_compile_cost_quick(tmp_path):
    """The compile-cost probes (plain and regional compiles in fresh subprocesses, two resolutions): with
    dynamic shapes (regional) the second resolution captures and compiles nothing. The per-shape kind
    ("static") is the same probe with ``shapes="static"``, whose recompile per shape test_shapes.py checks."""
    r, stdout, data = _run("compile", tmp_path, "--compile-cost", "only", "--cost-kinds", "plain,regional")
    cost = r["compile_cost"]
    for kind in ("plain", "regional"):
        assert _finite_positive(cost[kind]["first"]["cost_cpu_s"]), cost[kind]
        compiled = cost[kind]["second"]["calls_that_compiled"]
        assert compiled == 0 if kind == "regional" else compiled >= 1, (kind, compiled)
        assert cost[kind]["first"]["tokens"] == 64 and cost[kind]["second"]["tokens"] == 144
    stats = cost["regional"]["stats"]
    assert stats["graph_mode"] == "regional" and len(stats["timings"]) == 2  # one entry per resolution
    assert stats["captures"] == 1 and stats["shapes_reused"] == 1 and stats["shape_capture"].startswith("dynamic")
    assert set(r["ratios"]) == {"regional_over_plain_compile", "regional_cpp_compiler_over_plain_compile",
                                "second_over_first_resolution", "second_over_first_resolution_plain"}
    for kind in ("plain", "regional"):  # the C++ compiler's share (the children's CPU seconds) of the cost
        first = cost[kind]["first"]
        assert 0 <= first["cpp_compiler_cpu_s"] <= first["cost_cpu_s"] + 0.5  # (cost: less a steady call each)
    assert "ratios: regional_over_plain_compile" in stdout and "compile cost regional" in stdout


def test_compile_cuda_fails_clearly_without_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "compile.py"), "--device", "cuda", "--size",
                           "flux-dev", "--out", str(tmp_path / "c.json")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0
    assert "no CUDA device" in proc.stderr


def test_timestep_quick(tmp_path):
    r, stdout, _ = _run("timestep", tmp_path)
    kinds = {row["kind"] for row in r["rows"]}
    assert kinds == {"uncached", "fewer", "adastep", "dit", "attention", "dit+adastep"}
    assert len([row for row in r["rows"] if row["kind"] == "adastep"]) == 2
    assert all(_finite_positive(row["speedup"]) for row in r["rows"])
    assert any(row["steps_skipped"] > 0 for row in r["rows"] if row["kind"] == "adastep")
    assert os.path.exists(r["png"])
    assert "beats fewer?" in stdout


def test_forecast_quick(tmp_path):
    r, stdout, _ = _run("forecast", tmp_path)
    forecasts = {row.get("forecast") for row in r["rows"] if row["kind"] == "cache"}
    assert forecasts == {"none", "linear", "taylor2"}
    assert len([row for row in r["rows"] if row["kind"] == "fewer"]) >= 2
    assert {"target1", "target2_linear", "target2_taylor2"} <= set(r["targets"])
    assert os.path.exists(r["png"])
    assert "target 1" in stdout and "target 2" in stdout


def test_attention_quick(tmp_path):
    r, stdout, data = _run("attention", tmp_path)
    total = [m for m in r["memory"] if m["config"].startswith("total")][0]
    assert total["measured_bytes"] > 0
    assert total["measured_bytes"] == total["formula_bytes"]  # the formula is exact on tiny-flux
    assert {row["plan"] for row in r["speedup"]} == {"attn i2", "attn i3"}
    for row in r["speedup"]:
        assert _finite_positive(row["realised"]) and row["ideal_span"] > 1 and row["ideal_hooks"] > 1
    scaled = {row["model"]: row for row in data["scaled"]["rows"] if row["attention"] == "self"}
    assert scaled["Flux-dev 1024x1024"]["bytes"]["none"] == 57 * 4608 * 3072 * 2
    assert scaled["Wan2.1-14B 720p"]["bytes"]["none"] == 40 * 75600 * 5120 * 2


def test_fallback_quick(tmp_path):
    r, stdout, data = _run("fallback", tmp_path)
    rows = {row["flow"]: row for row in r["rows"]}
    assert {row["path"] for row in r["rows"]} == {"-", "export", "dynamo", "eager"}
    dynamo = rows["dynamo path aot_eager"]
    # same cache semantics as the export path, no recompile after the warm-up generation
    assert dynamo["max_abs_diff_vs_export"] < 1e-4 and rows["eager path"]["max_abs_diff_vs_export"] < 1e-4
    assert dynamo["graphs_warmup"] >= 1 and dynamo["graphs_after"] == 0
    assert rows["export path aot_eager"]["graphs_after"] == 0
    assert "fallback.py" in r["fallback_reason"] and "set(lengths)" in r["fallback_reason"]


def test_search_proxy_quick(tmp_path):
    r, stdout, _ = _run("search_proxy", tmp_path)
    assert len(r["plans"]) >= 3 and all(_finite_positive(p["mse"]) for p in r["plans"])
    assert set(r["rank_check"]) == {"proxy", "no warm-up damping", "coherent"}
    assert -1.0 <= r["rank_check"]["proxy"]["spearman"] <= 1.0
    assert [p["step"] for p in r["probes"]] == sorted(p["step"] for p in r["probes"]) and r["probes"]
    assert all(_finite_positive(p["mse_over_term"]) for p in r["probes"])
    assert "rank check over" in stdout


def test_search_exhaustive_quick(tmp_path):
    r, stdout, _ = _run("search_exhaustive", tmp_path, "--merge-into", "")
    assert r["plans_swept"] >= 3 and -1.0 <= r["proxy_spearman_held"] <= 1.0
    row = r["targets"]["1.5"]
    assert row["chosen"]["plan"] and _finite_positive(row["chosen"]["held_timed_speedup"])
    assert row["measured_over_target"] == pytest.approx(row["chosen"]["held_timed_speedup"] / 1.5)
    assert row["dominated"] == (row["worst_gap_db"] > 0.5) and 1 <= row["chosen"]["new_full_runs"] <= 8
    assert all(_finite_positive(x["timed_speedup"]) for x in row["rivals_timed"])
    assert "worst gap" in stdout


def test_spearman_exact():
    import importlib.util
    spec = importlib.util.spec_from_file_location("search_proxy", os.path.join(ROOT, "benchmarks", "search_proxy.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mod.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get their mean rank: x ranks [0, 1.5, 1.5, 3], y ranks [0, 1, 2, 3] -> r = 4.5 / sqrt(4.5 * 5)
    assert mod.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
