"""Training / evaluation data for the tiny reference models.

Everything here is built from ``sklearn.datasets.load_digits`` (1797 8x8 digits, values 0..16, shipped
inside scikit-learn, so it works offline).  Images are upsampled bilinearly to 16x16 and scaled to
[-1, 1] (background = -1, ink = +1).

Video clips (for ``tiny-wan``) show a digit *moving*: ``NUM_FRAMES`` frames in which the digit is
translated by ``(f - 1) * d`` pixels for frame ``f`` (f = 0..3, so offsets -1, 0, +1, +2) along one of
eight unit directions ``d`` (axis-aligned or diagonal).  The direction is random per clip, so the model
has to keep both the content and the motion consistent across frames (temporal attention matters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
NULL_CLASS = 10  # extra "empty prompt" class used for classifier-free guidance
NUM_FRAMES = 4
DIRECTIONS = ((0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))
FRAME_OFFSETS = (-1, 0, 1, 2)  # multiples of the direction vector, per frame
_PAD = 3


def load_digits_16(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 sklearn digits as (N, 1, 16, 16) tensors in [-1, 1] plus int64 labels (N,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).clamp(-1.0, 1.0)
    y = torch.tensor(d.target, dtype=torch.long)
    return x.to(dtype), y


def split_indices(n: int, holdout: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train / held-out split of ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    k = int(round(n * holdout))
    return perm[k:], perm[:k]


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate each image of ``x`` (N, C, H, W) by integer (dy, dx) pixels, filling with background -1.

    ``|dy|, |dx|`` must be <= 3.
    """
    n, c, h, w = x.shape
    p = _PAD
    xp = F.pad(x, (p, p, p, p), value=-1.0).permute(0, 2, 3, 1)  # (N, H+2p, W+2p, C)
    n_idx = torch.arange(n).view(n, 1, 1)
    r = torch.arange(h).view(1, h, 1) - dy.view(n, 1, 1) + p
    col = torch.arange(w).view(1, 1, w) - dx.view(n, 1, 1) + p
    return xp[n_idx, r, col].permute(0, 3, 1, 2).contiguous()


def make_clips(images: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Turn (N, 1, 16, 16) images into moving clips (N, F, 1, 16, 16) along ``DIRECTIONS[directions]``."""
    dirs = torch.tensor(DIRECTIONS, dtype=torch.long)[directions]  # (N, 2)
    frames = []
    for off in FRAME_OFFSETS:
        frames.append(shift_images(images, dirs[:, 0] * off, dirs[:, 1] * off))
    return torch.stack(frames, dim=1)


def random_clips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    d = torch.randint(0, len(DIRECTIONS), (images.shape[0],), generator=generator)
    return make_clips(images, d)
