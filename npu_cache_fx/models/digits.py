"""The digit classifier that scores the shipped digit models (tiny-flux stills, tiny-wan clips).

A small CNN trained on the sklearn digits (upsampled to 16x16, scaled to [-1, 1], exactly the
preprocessing of the generators' training data) with random +-2 pixel shift augmentation (the tiny-wan
clips move the digit by up to 2 px). It is trained on first use (deterministic: fixed seed, one thread,
~5 s) on a fixed 80 % split and cached on disk in ``$NPU_CACHE_FX_CACHE_DIR`` (default
``~/.cache/npu_cache_fx``) as ``digits_classifier_v1.safetensors``. Held-out accuracy on the remaining
20 % (359 real digits): 0.994 (centred) and 0.983 with random +-2 px shifts; see
:func:`classifier_holdout_accuracy`. :func:`npu_cache_fx.metrics.class_fidelity` scores with it.

Videos ``(B, F, 1, H, W)`` are scored per clip by majority vote of the per-frame predictions (ties are
broken by the higher mean softmax probability over the frames).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DigitCNN", "cache_dir", "classifier_holdout_accuracy", "classify_logits", "get_classifier", "predict"]

_CLASSIFIER_FILE = "digits_classifier_v1.safetensors"
_SEED = 1234
_EPOCHS = 30
_BATCH = 64
_MAX_SHIFT = 2


class DigitCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 4x4
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def cache_dir() -> Path:
    env = os.environ.get("NPU_CACHE_FX_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "npu_cache_fx"


_classifier: DigitCNN | None = None
_classifier_path: Path | None = None


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = _MAX_SHIFT) -> torch.Tensor:
    from .data import shift_images

    n = x.shape[0]
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    return shift_images(x, dy, dx)


def _train_classifier() -> tuple[DigitCNN, float]:
    from .data import load_digits_16, split_indices

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and polite; restored below
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # may be first called under no_grad (class_fidelity)
    try:
        x, y = load_digits_16()
        tr, te = split_indices(len(x))
        g = torch.Generator().manual_seed(_SEED)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_SEED)
            net = DigitCNN()
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        steps_per_epoch = math.ceil(len(tr) / _BATCH)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=_EPOCHS * steps_per_epoch)
        xtr, ytr = x[tr], y[tr]
        net.train()
        for _ in range(_EPOCHS):
            perm = torch.randperm(len(tr), generator=g)
            for i in range(0, len(tr), _BATCH):
                idx = perm[i:i + _BATCH]
                xb = _random_shift(xtr[idx], g)
                xb = xb + 0.05 * torch.randn(xb.shape, generator=g)
                loss = F.cross_entropy(net(xb), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            acc = float((net(x[te]).argmax(1) == y[te]).float().mean())
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    return net, acc


def get_classifier(retrain: bool = False) -> DigitCNN:
    """The cached digit classifier (trained on first use, then loaded from the cache dir)."""
    global _classifier, _classifier_path
    from safetensors.torch import load_file, save_file

    path = cache_dir() / _CLASSIFIER_FILE
    if _classifier is not None and not retrain and _classifier_path == path:
        return _classifier
    net = None
    if path.exists() and not retrain:
        try:
            net = DigitCNN()
            net.load_state_dict(load_file(str(path)))
        except Exception:  # corrupt / incompatible cache: retrain
            net = None
    if net is None:
        net, acc = _train_classifier()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                      metadata={"holdout_accuracy": f"{acc:.4f}"})
            os.replace(tmp, path)
        except OSError:
            pass  # read-only cache dir: keep it in memory only
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _classifier, _classifier_path = net, path
    return net


def _as_frames(images: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """-> ((N, 1, 16, 16) float32 frames, frames per clip or None for still images)."""
    x = torch.as_tensor(images).detach().cpu().float()
    if x.dim() == 3:  # (B, H, W)
        x = x.unsqueeze(1)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected single-channel images (B, 1, H, W), got {tuple(x.shape)}")
        return _resize(x), None
    if x.dim() == 5:
        if x.shape[2] == 1:  # (B, F, 1, H, W)
            b, f = x.shape[:2]
        elif x.shape[1] == 1:  # (B, 1, F, H, W)
            x = x.transpose(1, 2)
            b, f = x.shape[:2]
        else:
            raise ValueError(f"expected (B, F, 1, H, W) clips, got {tuple(x.shape)}")
        return _resize(x.reshape(b * f, 1, *x.shape[-2:])), f
    raise ValueError(f"unsupported image tensor shape {tuple(x.shape)}")


def _resize(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != (16, 16):
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def classify_logits(images: torch.Tensor) -> torch.Tensor:
    """Per-frame classifier logits, shape (N, 10) (N = B for images, B*F for clips)."""
    frames, _ = _as_frames(images)
    return get_classifier()(frames)


@torch.no_grad()
def predict(images: torch.Tensor) -> torch.Tensor:
    """Predicted digit per image, or per clip (majority vote over frames) for (B, F, 1, H, W) input."""
    frames, f = _as_frames(images)
    logits = get_classifier()(frames)
    if f is None:
        return logits.argmax(1)
    probs = logits.softmax(1).view(-1, f, 10)
    votes = F.one_hot(probs.argmax(2), 10).sum(1).float()  # (B, 10)
    score = votes + 0.5 * probs.mean(1)  # mean prob < 1 only breaks ties
    return score.argmax(1)


def classifier_holdout_accuracy(shifted: bool = False) -> float:
    """Accuracy of the cached classifier on the 359 held-out real digits (optionally randomly shifted)."""
    from .data import load_digits_16, split_indices

    x, y = load_digits_16()
    _, te = split_indices(len(x))
    xt = x[te]
    if shifted:
        xt = _random_shift(xt, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((get_classifier()(xt).argmax(1) == y[te]).float().mean())
