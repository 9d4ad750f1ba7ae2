"""AdaStep inside the optimized module: per cache context, the rule's state, the previous step's latent
and the output a skipped step returns.

The rule itself is pure Python (:class:`~npu_cache_fx.timestep.AdaStepRule`); this is the torch side:
``d_t = mean|x_t - x_{t-1}|`` over the latent input, the vote across ranks (a skip only if every rank
proposes it), and the persistent copy of the last output (per input signature) that a skipped step
returns without calling the model.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .config import CacheConfig
from .timestep import AdaStepRule

__all__ = ["AdaStepState", "all_ranks_agree"]


def _persistent(x: torch.Tensor) -> torch.Tensor:
    """A copy of ``x`` kept across calls and updated in place: a normal tensor even under ``torch.inference_mode``
    (an inference tensor cannot be updated in place by a later call outside it)."""
    with torch.inference_mode(False):
        return x.detach().clone()


def all_ranks_agree(skip: bool) -> bool:
    """AdaStep's vote: skip only if every rank proposes to (no-op without torch.distributed)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return skip
    flag = torch.tensor([1 if skip else 0], dtype=torch.int32)
    if dist.get_backend() != "gloo":
        flag = flag.to(torch.device(torch.accelerator.current_accelerator() or "cpu"))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class AdaStepState:
    """One cache context's AdaStep: rule state, previous latent, last output per input signature."""

    def __init__(self, config: CacheConfig, steps: int) -> None:
        self.rule = AdaStepRule(config.threshold, config.max_skip_steps, config.decay, steps)
        self.prev_latent: Optional[torch.Tensor] = None
        self.last_output: Dict[Any, Tuple[List[Any], Any]] = {}

    def reset(self) -> None:
        """A new generation."""
        self.rule.reset()
        self.prev_latent = None
        self.last_output.clear()

    def set_steps(self, steps: int) -> None:
        """This generation runs ``steps`` steps (the rule never skips the last one)."""
        self.rule.steps_count = steps

    def distance(self, latent: Any) -> Optional[torch.Tensor]:
        """``d_t`` as a 0-d tensor (read to the host with the timestep, in one sync), or None."""
        if not isinstance(latent, torch.Tensor) or self.prev_latent is None or self.prev_latent.shape != latent.shape:
            return None
        return (latent - self.prev_latent).abs().mean().double()

    def skips(self, key: Any, step: int, d: Optional[float], latent: Any) -> bool:
        """Decide this step's skip (rule, then a vote across ranks) and record the latent."""
        skip = self.rule.decide(d if step > 0 else None, vote=all_ranks_agree)
        if isinstance(latent, torch.Tensor):
            if self.prev_latent is None or self.prev_latent.shape != latent.shape:
                self.prev_latent = _persistent(latent)
            else:
                self.prev_latent.copy_(latent)
        return skip and key in self.last_output

    def keep(self, key: Any, flat_out: List[Any], out_spec: Any) -> bool:
        """Copy the step's output into persistent buffers; True when they were allocated now."""
        kept = self.last_output.get(key)
        if kept is None:
            self.last_output[key] = ([_persistent(x) if isinstance(x, torch.Tensor) else x for x in flat_out],
                                     out_spec)
            return True
        for buf, x in zip(kept[0], flat_out):
            if isinstance(x, torch.Tensor):
                buf.copy_(x)
        return False

    def output(self, key: Any) -> Tuple[List[Any], Any]:
        """The kept output of input signature ``key`` and its pytree spec (what a skipped step returns)."""
        return self.last_output[key]

    def tensors(self) -> List[torch.Tensor]:
        return [t for outs, _ in self.last_output.values() for t in outs if isinstance(t, torch.Tensor)]
