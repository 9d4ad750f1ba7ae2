"""One line on a diffusers pipeline: ``enable_cache(pipe)``, ``summary(pipe)``, ``disable_cache(pipe)``.

``enable_cache`` optimizes every DiT denoiser the pipeline has (``transformer``; ``transformer_2``
where present) with a plan: a list of :class:`~npu_cache_fx.CacheConfig`, a saved plan or search
report (a path), or ``None`` for the default plan of the model's family
(:func:`~npu_cache_fx.recipes.default_plan`: MindIE-SD's shipped config for FLUX.1, HunyuanVideo and
Qwen-Image, else a conservative plan). The plan is scaled to each request's step count as the pipeline
runs (see :meth:`~npu_cache_fx.runtime.OptimizedModule.set_steps`); Wan 2.2's two experts each run
the plan's decisions for the steps they run. The pipeline keeps working as before: CFG in any form,
``save_pretrained``, LoRA, offload.
``disable_cache`` puts the original modules back (``pipe.transformer is original``).

Example::

    >>> from npu_cache_fx import enable_cache, summary, disable_cache
    >>> enable_cache(pipe)                        # doctest: +SKIP
    >>> image = pipe("a cat").images[0]           # doctest: +SKIP
    >>> summary(pipe)                             # doctest: +SKIP
    >>> disable_cache(pipe)                       # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from .backends import Backend
from .config import CacheConfig, ConfigError, config_list, load_plan
from .recipes import default_plan
from .runtime import OptimizedModule, optimize

__all__ = ["DENOISERS", "default_plan", "denoisers", "disable_cache", "enable_cache", "optimized_denoisers",
           "summary"]

log = logging.getLogger(__name__)

DENOISERS = ("transformer", "transformer_2")  # pipeline attributes holding a DiT denoiser


def denoisers(pipe: Any) -> Dict[str, torch.nn.Module]:
    """The pipeline's DiT denoisers by attribute name (``transformer``, ``transformer_2``); a pipeline
    without one (a UNet pipeline) raises :class:`ConfigError` saying what to do instead."""
    found = {name: getattr(pipe, name, None) for name in DENOISERS}
    found = {name: m for name, m in found.items() if isinstance(m, torch.nn.Module)}
    if not found:
        parts = [n for n, v in vars(pipe).items() if isinstance(v, torch.nn.Module)] if hasattr(pipe, "__dict__") \
            else []
        raise ConfigError(f"{type(pipe).__name__} has no DiT denoiser (pipe.transformer); its modules: {parts}. "
                          "enable_cache works on transformer pipelines (Flux, SD3, Wan, Qwen-Image, ...), "
                          "not UNet ones; for another model call optimize(model, configs) directly")
    return found


def _plan_for(plan: Union[None, str, os.PathLike, CacheConfig, Sequence[CacheConfig]],
              model: torch.nn.Module) -> List[CacheConfig]:
    if plan is None:
        return default_plan(model)
    if isinstance(plan, (str, os.PathLike)):
        return load_plan(plan)
    return config_list(plan, "enable_cache")


def enable_cache(pipe: Any, plan: Union[None, str, os.PathLike, CacheConfig, Sequence[CacheConfig]] = None, *,
                 backend: Backend = None, backend_options: Optional[Dict[str, Any]] = None) -> Any:
    """Optimize every DiT denoiser of ``pipe`` with ``plan`` (None: :func:`default_plan`); returns ``pipe``.

    A denoiser already optimized is optimized again from its original module with the new plan, keeping its
    captures when the module has not changed since it last checked (no recapture when trying another plan).
    """
    for name, module in optimized_denoisers(pipe, plan, backend=backend, backend_options=backend_options).items():
        setattr(pipe, name, module)
        log.info("enable_cache: %s.%s optimized (%s)", type(pipe).__name__, name, [c.label for c in module.configs])
    return pipe


def optimized_denoisers(pipe: Any, plan: Union[None, str, os.PathLike, CacheConfig, Sequence[CacheConfig]] = None,
                        *, backend: Backend = None,
                        backend_options: Optional[Dict[str, Any]] = None) -> Dict[str, OptimizedModule]:
    """Each DiT denoiser of ``pipe`` (its original module, if already optimized) optimized with ``plan``,
    by attribute name; ``pipe`` itself is left as it is (:func:`enable_cache` installs them)."""
    out = {}
    for name, module in denoisers(pipe).items():
        original = module.model if isinstance(module, OptimizedModule) else module
        captures = module.reusable_captures() if isinstance(module, OptimizedModule) else None
        out[name] = optimize(original, _plan_for(plan, original), backend=backend, backend_options=backend_options,
                             captures=captures)
    return out


def disable_cache(pipe: Any) -> Any:
    """Put the original denoisers back (``pipe.transformer is`` the module before ``enable_cache``)."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, OptimizedModule):
            setattr(pipe, name, module.model)
    return pipe


def summary(pipe: Any, *, echo: bool = True) -> Dict[str, Dict[str, Any]]:
    """Per optimized denoiser: the plan table, steps computed / reused / skipped, blocks skipped, cache bytes,
    the path taken (export / dynamo / eager) and capture counts; printed (``echo``) and returned."""
    out: Dict[str, Dict[str, Any]] = {}
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if not isinstance(module, OptimizedModule):
            continue
        out[name] = {"model": type(module.model).__name__, "plan": str(module.plan),
                     "configs": [c.to_dict() for c in module.configs], **dataclasses.asdict(module.stats)}
    if echo:
        for name, row in out.items():
            print(f"{name} ({row['model']}): path {row['path']}, {row['steps']} steps = {row['steps_computed']} "
                  f"computed + {row['steps_reused']} reused + {row['steps_skipped']} skipped, "
                  f"{row['blocks_skipped']} blocks skipped, {row['cache_bytes']} cache bytes, "
                  f"{row['captures']} capture(s), {row['variants_built']} variant(s)")
            print(row["plan"])
        if not out:
            print(f"{type(pipe).__name__}: no optimized denoiser (enable_cache(pipe) first)")
    return out
