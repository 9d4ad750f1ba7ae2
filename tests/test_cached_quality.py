"""Cached sampling on the shipped trained models keeps the task metric (class fidelity)."""

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")

from npu_cache_fx import metrics, models, optimize  # noqa: E402
from npu_cache_fx.bench import shipped_plan  # noqa: E402
from npu_cache_fx.schedule import Action  # noqa: E402


@pytest.mark.parametrize("name, n", [("tiny-flux", 50), ("tiny-wan", 100)])
def test_2x_plan_keeps_class_fidelity(name, n):
    model = models.load(name)
    steps = model.default_steps
    labels = models.eval_labels(n)
    cfgs = shipped_plan(name, steps)
    opt = optimize(model.transformer, cfgs)
    computed = sum(1 for d in opt.plan.decisions if Action.READ not in d)
    assert steps / computed >= 1.9  # a ~2x plan: blocks are >95% of a step
    ref = model.sample(labels, steps=steps, seed=0)
    out = model.sample(labels, steps=steps, seed=0, transformer=opt)
    assert opt.stats.steps_reused == steps - computed
    assert not torch.equal(out, ref)  # the reads reused something (a READ computed would give ref exactly)
    assert abs(metrics.class_fidelity(out, labels) - metrics.class_fidelity(ref, labels)) <= 0.05
    assert metrics.psnr(out, ref) > 30


def test_cfg_sampling_through_optimized_module():
    model = models.load("tiny-wan")
    labels = models.eval_labels(4)
    opt = optimize(model.transformer, shipped_plan("tiny-wan", 8))
    ref = model.sample(labels, steps=8, seed=0, cfg_scale=2.0)
    out = model.sample(labels, steps=8, seed=0, cfg_scale=2.0, transformer=opt)
    assert set(opt.stats.cache_bytes_by_context) == {"cond", "uncond"}
    assert opt.stats.steps == 16 and torch.isfinite(out).all()
    assert opt.stats.steps_reused == 2 * len(opt.plan.reuse_steps()) > 0  # both contexts reuse
    assert not torch.equal(out, ref)  # and it shows: a READ turned into a compute would give ref exactly
    assert metrics.psnr(out, ref) > 25
