"""Tiny trained reference diffusion transformers shipped with npu_cache_fx.

>>> from npu_cache_fx import models
>>> m = models.load("tiny-flux")                 # plain diffusers FluxTransformer2DModel inside
>>> imgs = m.sample(models.eval_labels(10))      # (10, 1, 16, 16) in [-1, 1], 28 Euler steps
>>> clips = models.load("tiny-wan").sample([3])  # (1, 4, 1, 16, 16): 4 frames of a moving "3"
>>> deep = models.load("tiny-flux-deep")         # Flux-dev topology (19 + 38 blocks) on RGB scenes
>>> labels = models.eval_labels(8, deep)          # scene captions, see models.scenes.caption(label)
>>> deep.agreement(deep.sample(labels), labels)   # attribute checker: {"all": ..., "shape": ..., ...}

See :mod:`npu_cache_fx.models.tiny` for details (architectures, timestep conventions, layouts).
"""

from . import scenes
from .data import NULL_CLASS, NUM_CLASSES, NUM_FRAMES, load_digits_16
from .tiny import (
    DEFAULT_SHIFT,
    DEFAULT_STEPS,
    MODEL_NAMES,
    WEIGHTS_DIR,
    AttributeConditioner,
    ClassConditioner,
    TinyFlux,
    TinyFluxDeep,
    TinyModel,
    TinyWan,
    build,
    eval_labels,
    flow_timesteps,
    list_models,
    load,
    save,
)

__all__ = [
    "load", "list_models", "eval_labels", "build", "save", "flow_timesteps", "TinyModel", "TinyFlux", "TinyWan",
    "TinyFluxDeep", "AttributeConditioner", "scenes", "ClassConditioner", "MODEL_NAMES", "DEFAULT_STEPS",
    "DEFAULT_SHIFT", "WEIGHTS_DIR", "NULL_CLASS", "NUM_CLASSES", "NUM_FRAMES", "load_digits_16",
]
