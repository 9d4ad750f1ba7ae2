"""examples/<family>.py: the recipes (MindIE-SD's shipped configs where known), their scaling onto the
tiny models, and that optimize() accepts the scaled plan. The full runs (python examples/<family>.py)
are not repeated here: each runs 28-50 steps twice."""

import importlib
import os
import sys

import pytest

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")

from npu_cache_fx import optimize  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

from npu_cache_fx.recipes import scale_range  # noqa: E402

FAMILIES = {"flux": "flux", "wan": "wan", "hunyuan_video": "hunyuan_video", "qwen_image": "qwen_image",
            "cogvideox": "cogvideox", "sd3": "sd3"}


def test_scale_range():
    assert scale_range(5, 13, 19, 19) == (5, 13)           # the real model: unscaled
    assert scale_range(5, 13, 19, 2) == (1, 2)
    assert scale_range(1, 23, 38, 4) == (0, 2)
    assert scale_range(10, 50, 60, 4) == (1, 3)
    assert scale_range(0, 1, 40, 3) == (0, 1)              # never empty


def test_mindie_recipes():
    flux = importlib.import_module("flux").RECIPE
    assert (flux.steps, flux.step_start, flux.step_interval) == (28, 18, 2)
    assert [(r.blocks, r.start, r.end) for r in flux.ranges] == [("transformer_blocks", 5, 13),
                                                                 ("single_transformer_blocks", 1, 23)]
    hv = importlib.import_module("hunyuan_video").RECIPE
    assert (hv.step_start, hv.step_interval) == (10, 3)
    assert [(r.blocks, r.start, r.end) for r in hv.ranges] == [("single_transformer_blocks", 5, 35),
                                                               ("transformer_blocks", 3, 18)]
    qwen = importlib.import_module("qwen_image").RECIPE
    assert (qwen.steps, qwen.step_start, qwen.step_interval, qwen.step_end) == (40, 10, 3, 35)
    assert [(r.start, r.end) for r in qwen.ranges] == [(10, 50)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recipe_fits_the_tiny_model(family):
    from coverage_models import MODELS
    recipe = importlib.import_module(family).RECIPE
    model = MODELS[FAMILIES[family]].build()
    cfgs = recipe.configs(model)
    opt = optimize(model, cfgs)  # validates block lists and ranges; captures nothing yet
    assert opt.plan.steps_count == recipe.steps and opt.plan.reuse_steps()
    for r, cfg in zip(recipe.ranges, opt.configs):
        assert 0 <= r.start < r.end <= r.real_count
        assert cfg.block_end - cfg.block_start >= 1
    assert type(model).__name__ == recipe.model_class  # recipe_for finds the recipe of this family


def test_default_plan_per_family():
    """enable_cache's default: MindIE-SD's shipped recipe where the family has one, else the conservative plan."""
    from coverage_models import MODELS
    from npu_cache_fx.recipes import RECIPES, conservative_plan, default_plan, recipe_for
    shipped = {name for name, r in RECIPES.items() if r.shipped}
    assert shipped == {"FLUX.1", "HunyuanVideo", "Qwen-Image"}
    for family in FAMILIES:
        model = MODELS[FAMILIES[family]].build()
        recipe = recipe_for(model)
        want = recipe.configs(model) if recipe.shipped else conservative_plan(model)
        assert default_plan(model) == want, family
    assert recipe_for(MODELS["wan"].build(), shipped_only=True) is None


def test_forward_patterns_script(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    forward_patterns = importlib.import_module("forward_patterns")
    out = tmp_path / "fp.md"
    forward_patterns.main(["sd3", "--out", str(out)])
    text = out.read_text()
    assert "| sd3 (`SD3Transformer2DModel`) | `transformer_blocks` | `JointTransformerBlock` | 4 |" in text
    assert "`(encoder, hidden)` | Pattern_1" in text and "`(None, hidden)` | Pattern_2" in text
