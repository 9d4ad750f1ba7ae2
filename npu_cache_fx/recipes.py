"""Recommended cache plans per model family, and the default plan of :func:`~npu_cache_fx.enable_cache`.

A :class:`Recipe` is written for the real model's block counts: MindIE-SD's shipped configs where
they exist (FLUX.1-dev, HunyuanVideo, Qwen-Image-Edit), otherwise a starting point we documented
(Wan2.1, CogVideoX, SD3). :meth:`Recipe.configs` maps each block range proportionally onto the
model at hand, so a smaller variant of the family (Wan2.1-1.3B's 30 blocks instead of 14B's 40) or a
tiny test model gets the same relative plan.

:func:`default_plan` is the plan ``enable_cache(pipe)`` uses without a plan: the shipped MindIE-SD
recipe of the model's family when there is one, else :func:`conservative_plan` (every block of every
block list, refreshed every second step from 15 % of the steps to the last 10 %, linear forecast).
Both are stated for a step count and scaled to each request's (``CacheConfig.scaled``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .capture import find_block_lists
from .config import CacheConfig, ConfigError

__all__ = ["DEFAULT_STEPS", "RECIPES", "Range", "Recipe", "conservative_plan", "default_plan", "recipe_for",
           "scale_range"]

DEFAULT_STEPS = 28  # steps the conservative plan is stated for (scaled per request)


@dataclass(frozen=True)
class Range:
    """Blocks ``[start, end)`` of the block list ``blocks``, which has ``real_count`` blocks in the real model."""

    blocks: str
    real_count: int
    start: int
    end: int


@dataclass(frozen=True)
class Recipe:
    family: str
    model_class: str             # the diffusers transformer class the recipe is for
    source: str                  # where the numbers come from
    shipped: bool                # a MindIE-SD shipped config (default_plan uses only these)
    steps: int                   # num_inference_steps the plan is written for (CacheConfig.steps_count)
    step_start: int
    step_interval: int
    ranges: Tuple[Range, ...]
    step_end: Optional[int] = None
    method: str = "dit_block_cache"
    call: Dict[str, Any] = field(default_factory=dict)  # pipeline call arguments for the real model

    def configs(self, model: torch.nn.Module, verbose: bool = False) -> List[CacheConfig]:
        """The recipe on ``model``: each range scaled proportionally to the model's block list."""
        out = []
        for r in self.ranges:
            try:
                count = len(model.get_submodule(r.blocks))
            except AttributeError:
                raise ConfigError(f"the {self.family} recipe caches {r.blocks!r}, which "
                                  f"{type(model).__name__} does not have; pass a plan of your own") from None
            lo, hi = scale_range(r.start, r.end, r.real_count, count)
            if verbose and (lo, hi, count) != (r.start, r.end, r.real_count):
                print(f"  {r.blocks}: recipe [{r.start}, {r.end}) of {r.real_count} blocks scaled to "
                      f"[{lo}, {hi}) of this model's {count}")
            out.append(CacheConfig(method=self.method, steps_count=self.steps, step_start=self.step_start,
                                   step_interval=self.step_interval, step_end=self.step_end, blocks=r.blocks,
                                   block_start=lo, block_end=hi))
        return out


def scale_range(start: int, end: int, real: int, count: int) -> Tuple[int, int]:
    """``[start, end)`` of a ``real``-block list mapped proportionally onto ``count`` blocks (never empty).

    >>> scale_range(5, 13, 19, 19), scale_range(5, 35, 40, 30), scale_range(5, 13, 19, 2)
    ((5, 13), (4, 26), (1, 2))
    """
    if count == real:
        return start, end
    lo = min(count - 1, round(start * count / real))
    hi = max(lo + 1, min(count, round(end * count / real)))
    return lo, hi


RECIPES: Dict[str, Recipe] = {r.family: r for r in (
    Recipe(family="FLUX.1", model_class="FluxTransformer2DModel", shipped=True,
           source="MindIE-SD shipped config (FLUX.1-dev, 28 steps)",
           steps=28, step_start=18, step_interval=2,
           ranges=(Range("transformer_blocks", 19, 5, 13), Range("single_transformer_blocks", 38, 1, 23)),
           call=dict(height=1024, width=1024, guidance_scale=3.5)),
    Recipe(family="HunyuanVideo", model_class="HunyuanVideoTransformer3DModel", shipped=True,
           source="MindIE-SD shipped config (HunyuanVideo, 50 steps)",
           steps=50, step_start=10, step_interval=3,
           ranges=(Range("single_transformer_blocks", 40, 5, 35), Range("transformer_blocks", 20, 3, 18)),
           call=dict(height=320, width=512, num_frames=61)),
    Recipe(family="Qwen-Image", model_class="QwenImageTransformer2DModel", shipped=True,
           source="MindIE-SD shipped config (Qwen-Image-Edit, 40 steps)",
           steps=40, step_start=10, step_interval=3, step_end=35,
           ranges=(Range("transformer_blocks", 60, 10, 50),),
           call=dict(true_cfg_scale=4.0, negative_prompt=" ")),
    Recipe(family="Wan2.1", model_class="WanTransformer3DModel", shipped=False,
           source="starting point, not a MindIE-SD shipped config (50 steps)",
           steps=50, step_start=12, step_interval=3, step_end=45,
           ranges=(Range("blocks", 40, 5, 35),),  # Wan2.1-14B has 40 blocks (1.3B: 30; ranges scale to it)
           call=dict(height=480, width=832, num_frames=81, guidance_scale=5.0,
                     negative_prompt="blurry, low quality, static")),
    Recipe(family="CogVideoX", model_class="CogVideoXTransformer3DModel", shipped=False,
           source="starting point, not a MindIE-SD shipped config (50 steps)",
           steps=50, step_start=12, step_interval=3, step_end=45,
           ranges=(Range("transformer_blocks", 42, 5, 37),),  # CogVideoX-5b: 42 blocks (2b: 30)
           call=dict(num_frames=49, guidance_scale=6.0)),
    Recipe(family="SD3", model_class="SD3Transformer2DModel", shipped=False,
           source="starting point, not a MindIE-SD shipped config (28 steps)",
           steps=28, step_start=14, step_interval=2,
           ranges=(Range("transformer_blocks", 24, 2, 20),),  # SD3-medium: 24 blocks (3.5-large: 38)
           call=dict(height=1024, width=1024, guidance_scale=7.0)),
)}


def recipe_for(model: torch.nn.Module, shipped_only: bool = False) -> Optional[Recipe]:
    """The recipe for ``model``'s class (by class name, so subclasses and lookalikes do not match)."""
    name = type(model).__name__
    for recipe in RECIPES.values():
        if recipe.model_class == name and (recipe.shipped or not shipped_only):
            return recipe
    return None


def conservative_plan(model: torch.nn.Module, steps: int = DEFAULT_STEPS) -> List[CacheConfig]:
    """Every block of each block list, refreshed every second step from 15 % of the steps to the last 10 %
    (computed in full), linear forecast: about 1.6x on the blocks, for any DiT."""
    lists = find_block_lists(model)
    if not lists:
        raise ConfigError(f"{type(model).__name__} has no list of transformer blocks: enable_cache needs a DiT "
                          "denoiser (a UNet pipeline has none)")
    start, end = round(0.15 * steps), steps - 1 - round(0.1 * steps)
    return [CacheConfig(steps_count=steps, blocks=b.fqn, step_start=start, step_interval=2, step_end=end,
                        forecast="linear") for b in lists]


def default_plan(model: torch.nn.Module, steps: Optional[int] = None) -> List[CacheConfig]:
    """The plan ``enable_cache`` uses without one: the MindIE-SD shipped recipe of ``model``'s family
    (FLUX.1, HunyuanVideo, Qwen-Image), else :func:`conservative_plan`; stated for ``steps`` steps
    (default: the recipe's, or 28) and scaled to each request's step count as the pipeline runs."""
    recipe = recipe_for(model, shipped_only=True)
    if recipe is None:
        return conservative_plan(model, steps or DEFAULT_STEPS)
    cfgs = recipe.configs(model)
    if not steps or steps == recipe.steps:
        return cfgs
    last = dict(step_end=recipe.steps - 1)  # the default, stated: scaled() keeps it at the last step
    return [c.replace(**last).scaled(steps) if c.step_end is None else c.scaled(steps) for c in cfgs]
