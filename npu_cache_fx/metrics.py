"""Quality metrics for cached vs. uncached generations.

* :func:`mse`, :func:`psnr`, :func:`max_abs_error` - pixel fidelity against a reference (images in
  [-1, 1], so ``data_range = 2``).
* :func:`class_fidelity` - fraction of generated digits that the digit classifier
  (:mod:`npu_cache_fx.models.digits`) assigns to the class they were conditioned on.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

__all__ = ["class_fidelity", "max_abs_error", "mse", "psnr", "sample_mse"]


# ------------------------------------------------------------------------------------------------
# Pixel metrics
# ------------------------------------------------------------------------------------------------

def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared error over all elements (computed in float64)."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(((a.detach().double().cpu() - b.detach().double().cpu()) ** 2).mean())


def sample_mse(a: torch.Tensor, b: torch.Tensor) -> Optional[List[float]]:
    """:func:`mse` of each sample (the leading dimension) of a batch; None for a batch of one or a shape
    mismatch. Their mean is :func:`mse` (every sample has the same size)."""
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.dim() < 2 or a.shape[0] < 2 or a.shape != b.shape:
        return None
    return ((a.detach().double().cpu() - b.detach().double().cpu()) ** 2).flatten(1).mean(1).tolist()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / mse)``; ``inf`` when identical."""
    m = mse(a, b)
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range ** 2 / m)


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((torch.as_tensor(a).double() - torch.as_tensor(b).double()).abs().max())


def class_fidelity(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples classified as their conditioning label (images in [-1, 1]).

    ``images``: (B, 1, 16, 16) / (B, 16, 16) stills, or (B, F, 1, 16, 16) clips (per-clip majority vote).
    """
    from .models.digits import predict

    labels = torch.as_tensor(labels).reshape(-1).cpu().long()
    pred = predict(images)
    if pred.shape[0] != labels.shape[0]:
        raise ValueError(f"{pred.shape[0]} samples but {labels.shape[0]} labels")
    return float((pred == labels).float().mean())
