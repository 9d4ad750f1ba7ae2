"""Where an optimized module meets the libraries around it: diffusers, accelerate, the calling pipeline.

* ``pipe.save_pretrained`` looks up the component's class to find how to save it:
  :func:`reported_class` makes an optimized diffusers model report the wrapped model's class
  (``type()`` is unchanged), so the transformer is saved as the plain model.
* accelerate's offload hook on the wrapped model replaces its ``forward``: captures export the
  model's own forward (:func:`without_root_hook`) and the optimized module runs the hook around
  the graph; the attributes hook libraries set and delete on the module they wrap are never read
  through to the wrapped model (:data:`OWN_ATTRIBUTES`).
* a diffusers pipeline sets ``_num_timesteps`` before its denoising loop: :func:`pipeline_steps`
  reads the step count of the generation that is starting.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch

__all__ = ["OWN_ATTRIBUTES", "pipeline_steps", "reported_class", "without_root_hook"]


# Attributes hook libraries set and delete on the module they wrap: never read through to the wrapped
# model (accelerate's remove_hook_from_module deletes what hasattr() found).
OWN_ATTRIBUTES = frozenset({"_hf_hook", "_old_forward", "_diffusers_hook"})


@contextlib.contextmanager
def without_root_hook(model: torch.nn.Module) -> Iterator[None]:
    """Export the model's own forward, not accelerate's wrapper around it (whose ``.to()`` would run on
    export's fake tensors): :meth:`OptimizedModule.forward` calls the hook's pre/post itself."""
    own = model.__dict__.get("forward") if "_hf_hook" in model.__dict__ else None
    if own is None:
        yield
        return
    del model.__dict__["forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = own


def pipeline_steps(depth: int = 12) -> Optional[int]:
    """The step count of the diffusers pipeline calling the model, if one is: ``pipe._num_timesteps``, which
    every diffusers pipeline sets to ``len(timesteps)`` before its denoising loop."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return None
        owner = getattr(frame.f_locals.get("self"), "__dict__", None)
        if owner is not None and "scheduler" in owner:
            steps = owner.get("_num_timesteps")
            if isinstance(steps, int) and not isinstance(steps, bool) and steps > 0:
                return steps
        frame = frame.f_back
    return None


def reported_class(module: torch.nn.Module) -> type:
    """The class an optimized module reports as ``__class__``: the wrapped model's, for models that save
    and load themselves (diffusers' ``ModelMixin``), so that ``pipe.save_pretrained`` saves the
    transformer as the plain model (and ``isinstance(pipe.transformer, FluxTransformer2DModel)`` holds);
    ``type(module)`` is still :class:`~npu_cache_fx.runtime.OptimizedModule`. Other models: its own class."""
    cls = type(module)
    model = module.__dict__.get("_modules", {}).get("model")
    if model is not None and hasattr(type(model), "save_pretrained") and hasattr(type(model), "from_pretrained"):
        return type(model)
    return cls
