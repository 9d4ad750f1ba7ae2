"""Smoke test: ``benchmarks/peers.py --quick`` runs end to end and writes every expected row.

The script runs its quick mode in the test process (tests/benchrun.py), without the torch.compile graph
counting (~25 s); the counting path is exercised on two rows with 4 steps. Rows of an optional peer skip
cleanly when it is not installed: cache-dit rows when ``cache_dit`` is missing, MindIE rows when
the ``mindiesd`` wheel is missing; every other row must run. Timing values are not checked:
a --quick run is too short to mean anything.
"""

import importlib.util
import json
import math
import os
import sys

import pytest

# slow; its session fixture (a ~30 s run of the script) runs once per test run, shared by the xdist workers
pytestmark = pytest.mark.slow

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from benchrun import run_benchmark  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

HAVE_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def _have_mindie():
    from npu_cache_fx.compat import mindie
    return mindie.load() is not None


def _diffusers_families():
    """The diffusers hook families this diffusers has (benchmarks/peers.py skips the others with the reason)."""
    import diffusers.hooks
    hooks = {"FirstBlockCacheConfig": "diffusers FirstBlockCache",
             "PyramidAttentionBroadcastConfig": "diffusers PyramidAttentionBroadcast",
             "FasterCacheConfig": "diffusers FasterCache", "TaylorSeerCacheConfig": "diffusers TaylorSeerCache",
             "MagCacheConfig": "diffusers MagCache", "SeaCacheConfig": "diffusers SeaCache"}
    return {fam for cls, fam in hooks.items() if hasattr(diffusers.hooks, cls)}


DIFFUSERS_FAMILIES = _diffusers_families()


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    from conftest import once_per_run
    with once_per_run(tmp_path_factory, "peers_quick") as (folder, done):
        out = folder / "peers.json"
        if not done:
            rc, stdout = run_benchmark("peers", "--quick", "--no-compile-count", "--out", out)
            assert rc == 0, stdout[-3000:]
            (folder / "stdout.txt").write_text(stdout)
            (folder / "done").touch()
    return json.loads(out.read_text()), out, (folder / "stdout.txt").read_text()


def test_outputs_and_settings(quick):
    data, out, stdout = quick
    assert out.with_suffix(".md").exists() and out.with_suffix(".png").exists()
    assert "command :" in stdout and "verdict" in stdout
    assert data["settings"]["quick"] is True and data["settings"]["inductor"] is False
    assert list(data["models"]) == ["tiny-flux"]
    model = data["models"]["tiny-flux"]
    assert model["verdict"]["lines"] and len(model["verdict"]["per_target"]) == 3
    assert "| method |" in out.with_suffix(".md").read_text()


def test_expected_rows(quick):
    data, _, _ = quick
    rows = data["models"]["tiny-flux"]["rows"]
    by_family = {}
    for r in rows:
        by_family.setdefault(r["family"], []).append(r)
    assert [r["method"] for r in by_family["uncached"]] == ["uncached"]
    assert len(by_family["fewer steps"]) == 3
    assert len(by_family["AdaStep (npu_cache_fx)"]) == 2
    assert by_family["npu_cache_fx"] and by_family["MindIE search, npu_cache_fx runtime"]
    assert DIFFUSERS_FAMILIES <= set(by_family), set(by_family)
    always = ["uncached", "fewer steps", "AdaStep (npu_cache_fx)", "npu_cache_fx",
              "MindIE search, npu_cache_fx runtime", *sorted(DIFFUSERS_FAMILIES)]
    for fam in always:
        for r in by_family[fam]:
            assert r["status"] == "ok", (r["method"], r.get("reason"))
            for key in ("speedup", "speedup_wall", "mse", "class_fidelity"):
                assert isinstance(r[key], (int, float)), (r["method"], key)
            # JSON writes an infinite PSNR (output identical to uncached) as null
            assert isinstance(r["psnr"], (int, float)) or (r["psnr"] is None and r["mse"] == 0), r["method"]
            assert math.isfinite(r["speedup"]) and r["speedup"] > 0
            assert r["cache_bytes"] is not None and r["cache_bytes"] >= 0, r["method"]
    for r in by_family["npu_cache_fx"]:
        assert r["cache_bytes"] > 0 and r["config"]


def test_optional_peers_run_or_skip_cleanly(quick):
    data, _, _ = quick
    rows = data["models"]["tiny-flux"]["rows"]
    cache_dit = [r for r in rows if r["family"].startswith("cache-dit")]
    mindie = [r for r in rows if r["family"] == "MindIE-SD 3.1.0 agent"]
    assert cache_dit and mindie
    if HAVE_CACHE_DIT:
        assert len(cache_dit) == 4 and all(r["status"] == "ok" for r in cache_dit), cache_dit
    else:
        assert all(r["status"] == "skipped" and "cache-dit not installed" in r["reason"] for r in cache_dit)
    if _have_mindie():
        assert all(r["status"] == "ok" for r in mindie), mindie
    else:
        assert all(r["status"] == "skipped" and "mindiesd" in r["reason"] for r in mindie)


def test_compile_counting_in_process():
    """The graph / recompile counter on two rows (uncached: 1 graph; ours: its regional graphs)."""
    sys.path.insert(0, BENCH)
    try:
        import peers
    finally:
        sys.path.remove(BENCH)
    import torch
    torch.set_num_threads(1)
    b = peers.Bench("tiny-flux", samples=1, steps=4)
    unc = peers.count_compiles(b, peers.plain_method(b, "uncached", "uncached", 4, "", "", ""))
    assert unc["compile_error"] is None and unc["graphs"] == 1 and unc["recompiles"] == 0
    from npu_cache_fx import CacheConfig
    cfgs = [CacheConfig(steps_count=4, step_start=1, step_interval=2, blocks=f) for f in
            ("transformer_blocks", "single_transformer_blocks")]
    m = peers.ours_method(b, "ours", peers.OURS, cfgs, "", "", "")
    ours = peers.count_compiles(b, m)
    n_variants = len(m.build(None).opt.plan.variants())
    # regional compilation (the default for a callable backend): each distinct block / glue graph once, shared
    # by the variants, so more graphs than variants but far fewer than variants x segments
    assert ours["compile_error"] is None and n_variants <= ours["graphs"] <= 4 * n_variants
    assert ours["recompiles"] == 0
    torch._dynamo.reset()
