"""Procedural 16x16 RGB scenes for ``tiny-flux-deep``, and the attribute checker that scores them.

Why procedural scenes: on the digits the shipped models learned, the flow is nearly straight (10 Euler
steps already reach 40 dB against 28), so caching methods cannot be told apart the way they can on real
models.  A first version of these scenes (one textured object, its detail fixed up to a phase and +-1 px)
was learned just as straight: 14 vs 28 steps 43.6 dB.  What makes the step count matter is detail that only
the low-noise end of the trajectory resolves: film grain, every pixel and channel independently +-a.
Sampled with Flux-dev's time shift (3, ``tiny.DEFAULT_SHIFT``), a coarse schedule crosses that end in a
few large steps and returns a posterior mean in which the grain is largely averaged away.  The caption
says how strong the grain is (light or heavy), so a sampler with too few steps gets that attribute wrong.

A scene is one anti-aliased object on a dark grey gradient background, with grain over everything.  Its
caption is four attributes:

* ``shape``    - square, down-triangle, up-triangle, cross.  (Until the grain, a disc was the second
  shape: the model's rounded corners made 14 of 51 squares read as discs.)
* ``colour``   - red, green, blue, yellow
* ``position`` - top-left, top-right, bottom-left, bottom-right quadrant (centre jittered +-1 px)
* ``grain``    - light or heavy film grain (binary +-0.10 or +-0.24 per pixel and channel, in [0, 1] units)

(Earlier versions also had a texture: solid, stripes, checker or speckle.  Under the grain the
model did not learn it in the 45-minute CPU budget: 0.47 agreement at 28 steps with 2 px stripes and
checker, see docs/models.md.)

The caption is encoded as one integer ``label = ((shape * 4 + colour) * 4 + position) * 2 + grain``
(0..127; :data:`NULL_LABEL` = 128 is the empty caption for classifier-free guidance), so the models'
``sample(labels)`` interface is the same as for the digit models.

:func:`attribute_agreement` scores generated images with a small CNN (:class:`AttributeChecker`, four
heads) trained on these scenes only (no blur augmentation, so a sample whose grain was averaged away by
too few steps is read as light grain).  Its weights ship next to the model
(``weights/scenes-checker.safetensors``); :func:`train_checker` reproduces them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SCENE_SIZE = 16
SCENE_CHANNELS = 3
SHAPES = ("square", "down-triangle", "up-triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
GRAINS = ("light", "heavy")
ATTRIBUTES = ("shape", "colour", "position", "grain")
ATTRIBUTE_SIZES = (len(SHAPES), len(COLOURS), len(POSITIONS), len(GRAINS))
NUM_LABELS = math.prod(ATTRIBUTE_SIZES)  # 128
NULL_LABEL = NUM_LABELS

# Colours in [0, 1] RGB; kept away from 0 / 1 so that samples are not flattened by the final clamp.
_PALETTE = torch.tensor([[0.90, 0.15, 0.10], [0.15, 0.80, 0.20], [0.20, 0.35, 0.95], [0.90, 0.85, 0.15]])
_QUADRANT_CENTRES = (6.0, 10.0)  # pixel units, for row / column
_JITTER = 1.0  # +- px of the object centre
_RADIUS = (4.2, 5.2)  # object "radius" in px: large enough that the shape reads through the grain
_GRAIN = (0.10, 0.24)  # amplitude of the binary per-pixel, per-channel grain (+-, [0, 1] units) per GRAINS
_SUPERSAMPLE = 4

CHECKER_FILE = "scenes-checker.safetensors"


# ------------------------------------------------------------------------------------------------
# Labels <-> attributes
# ------------------------------------------------------------------------------------------------

def encode(*attributes: torch.Tensor) -> torch.Tensor:
    """Attribute indices (shape, colour, position, grain) -> caption labels (mixed radix)."""
    if len(attributes) != len(ATTRIBUTE_SIZES):
        raise ValueError(f"expected {len(ATTRIBUTE_SIZES)} attributes ({', '.join(ATTRIBUTES)})")
    label = attributes[0]
    for size, a in zip(ATTRIBUTE_SIZES[1:], attributes[1:]):
        label = label * size + a
    return label


def decode(labels: torch.Tensor) -> torch.Tensor:
    """Caption labels (B,) in 0..127 -> attribute indices (B, 4) in :data:`ATTRIBUTES` order."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    if bool(((labels < 0) | (labels >= NUM_LABELS)).any()):
        raise ValueError(f"scene labels must be in 0..{NUM_LABELS - 1}")
    out = []
    rest = labels
    for size in reversed(ATTRIBUTE_SIZES):
        out.append(rest % size)
        rest = rest // size
    return torch.stack(out[::-1], dim=1)


def caption(label: int) -> str:
    """Human-readable caption of one label, e.g. ``"red up-triangle, top-left, heavy grain"``."""
    s, c, p, g = (int(v) for v in decode(torch.tensor([label]))[0])
    return f"{COLOURS[c]} {SHAPES[s]}, {POSITIONS[p]}, {GRAINS[g]} grain"


def eval_labels(n: int) -> torch.Tensor:
    """Fixed evaluation captions of length ``n``: a stride through all 128 that varies every attribute.

    ``(i * 157) % 128`` visits every label once per 128 (157 is odd), and neighbouring entries differ in
    most attributes (always in the grain), so a short batch still covers each value of each attribute.
    """
    return (torch.arange(n, dtype=torch.long) * 157) % NUM_LABELS


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------

def _coverage(shape: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Anti-aliased object masks (B, H, W) in [0, 1] by supersampling."""
    s, n = _SUPERSAMPLE, SCENE_SIZE
    coords = (torch.arange(n * s, dtype=torch.float32) + 0.5) / s  # pixel units
    b = shape.shape[0]
    dy = coords.view(1, -1, 1) - cy.view(b, 1, 1)
    dx = coords.view(1, 1, -1) - cx.view(b, 1, 1)
    r = r.view(b, 1, 1)
    ady, adx = dy.abs(), dx.abs()
    square = torch.maximum(ady, adx) <= 0.85 * r
    up = (dy >= -r) & (dy <= 0.8 * r) & (adx <= (dy + r) / 1.8)  # apex at the top (rows grow downwards)
    down = (-dy >= -r) & (-dy <= 0.8 * r) & (adx <= (r - dy) / 1.8)
    arm = 0.38 * r
    cross = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    masks = torch.stack([square, down, up, cross], dim=1).float()  # (B, 4, Hs, Ws)
    m = masks[torch.arange(b), shape]
    return F.avg_pool2d(m.unsqueeze(1), s).squeeze(1)


def render(attributes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Render scenes for attribute indices (B, 4) -> (B, 3, 16, 16) in [-1, 1].

    The nuisance (centre jitter, size, background level and gradient, the grain's signs)
    is drawn from ``generator``; the attributes fix everything a caption says.
    """
    attributes = torch.as_tensor(attributes).long()
    b = attributes.shape[0]
    shape, colour, position, grain = attributes.unbind(1)
    centres = torch.tensor(_QUADRANT_CENTRES)
    cy = centres[position // 2] + (torch.rand(b, generator=generator) * 2 - 1) * _JITTER
    cx = centres[position % 2] + (torch.rand(b, generator=generator) * 2 - 1) * _JITTER
    r = _RADIUS[0] + torch.rand(b, generator=generator) * (_RADIUS[1] - _RADIUS[0])
    cov = _coverage(shape, cy, cx, r)  # (B, H, W)
    obj = _PALETTE[colour].view(b, 3, 1, 1)
    # background: grey level 0.05..0.20 plus a linear ramp of +-0.08 along a random direction
    level = 0.05 + 0.15 * torch.rand(b, generator=generator)
    angle = torch.rand(b, generator=generator) * (2 * math.pi)
    ramp = (torch.arange(SCENE_SIZE, dtype=torch.float32) - (SCENE_SIZE - 1) / 2) / (SCENE_SIZE / 2)
    grad = (torch.cos(angle).view(b, 1, 1) * ramp.view(1, -1, 1) + torch.sin(angle).view(b, 1, 1) * ramp.view(1, 1, -1))
    bg = (level.view(b, 1, 1) + 0.08 * grad).unsqueeze(1).expand(b, 3, SCENE_SIZE, SCENE_SIZE)
    img = bg * (1.0 - cov.unsqueeze(1)) + obj * cov.unsqueeze(1)
    # film grain: every pixel and channel independently +-amplitude; the caption says how strong, the signs
    # are random, and a sampler only resolves them at the low-noise end of the trajectory
    signs = torch.randint(0, 2, (b, SCENE_CHANNELS, SCENE_SIZE, SCENE_SIZE), generator=generator).float() * 2 - 1
    img = img + torch.tensor(_GRAIN)[grain].view(b, 1, 1, 1) * signs
    return (img * 2.0 - 1.0).clamp(-1.0, 1.0)


def random_scenes(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of uniformly drawn captions and their scenes: ``(images (B, 3, 16, 16), labels (B,))``."""
    labels = torch.randint(0, NUM_LABELS, (batch,), generator=generator)
    return render(decode(labels), generator), labels


def scenes_for(labels: torch.Tensor | Sequence[int], seed: int = 0) -> torch.Tensor:
    """Deterministic scenes for given captions (reference images, e.g. for docs and tests)."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    return render(decode(labels), torch.Generator().manual_seed(int(seed)))


# ------------------------------------------------------------------------------------------------
# Attribute checker
# ------------------------------------------------------------------------------------------------

class AttributeChecker(nn.Module):
    """Small CNN with one classification head per attribute (shape, colour, position, grain).

    The first layers keep full resolution: the grain is per pixel and must not be pooled away before it
    is seen.  Two convolutions at 8 x 8 read the shape through the grain.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(SCENE_CHANNELS, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.heads = nn.Linear(128, sum(ATTRIBUTE_SIZES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.relu(self.conv3(x))
        x = F.max_pool2d(F.relu(self.conv4(x)), 2)  # 4x4
        logits = self.heads(F.relu(self.fc(x.flatten(1))))
        return list(logits.split(list(ATTRIBUTE_SIZES), dim=1))


_CHECKER_SEED = 4321
_CHECKER_STEPS = 2500
_CHECKER_BATCH = 128
_checker: AttributeChecker | None = None
_checker_path: Path | None = None


def train_checker(steps: int = _CHECKER_STEPS, seed: int = _CHECKER_SEED) -> tuple[AttributeChecker, dict]:
    """Train the attribute checker on freshly drawn scenes (deterministic: fixed seed, one thread).

    Mild Gaussian noise (sigma 0.05) is the only augmentation, so that small sampler imperfections do
    not flip an attribute, while grain averaged away by a coarse sampler still reads as "light".
    Returns the network and its accuracy on 2048 held-out scenes (per attribute and all four at once).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = AttributeChecker()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
        net.train()
        for _ in range(steps):
            x, y = random_scenes(_CHECKER_BATCH, g)
            x = x + 0.05 * torch.randn(x.shape, generator=g)
            attrs = decode(y)
            loss = sum(F.cross_entropy(lg, attrs[:, i]) for i, lg in enumerate(net(x)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():
            x, y = random_scenes(2048, torch.Generator().manual_seed(seed + 1))
            report = _agreement(net, x, y)
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)
    return net, report


def save_checker(net: AttributeChecker, path: str | Path, report: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"attributes": ",".join(ATTRIBUTES)}
    if report:
        meta.update({f"holdout_{k}": f"{v:.4f}" for k, v in report.items()})
    save_file({k: v.detach().float().contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)
    return path


def get_checker(path: str | Path | None = None) -> AttributeChecker:
    """The shipped attribute checker (``weights/scenes-checker.safetensors`` unless ``path`` is given)."""
    global _checker, _checker_path
    from safetensors.torch import load_file

    from .tiny import WEIGHTS_DIR

    path = Path(path) if path is not None else WEIGHTS_DIR / CHECKER_FILE
    if _checker is not None and _checker_path == path:
        return _checker
    if not path.exists():
        raise FileNotFoundError(f"attribute checker weights not found at {path}; "
                                "run examples/train_tiny.py --model tiny-flux-deep")
    net = AttributeChecker()
    net.load_state_dict(load_file(str(path)))
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    _checker, _checker_path = net, path
    return net


@torch.no_grad()
def predict_attributes(images: torch.Tensor, checker: AttributeChecker | None = None) -> torch.Tensor:
    """Predicted attribute indices (B, 5) for scenes (B, 3, 16, 16) in [-1, 1]."""
    net = checker if checker is not None else get_checker()
    x = torch.as_tensor(images).detach().cpu().float().clamp(-1.0, 1.0)
    if x.dim() != 4 or x.shape[1:] != (SCENE_CHANNELS, SCENE_SIZE, SCENE_SIZE):
        raise ValueError(f"expected scenes (B, 3, 16, 16), got {tuple(x.shape)}")
    return torch.stack([lg.argmax(1) for lg in net(x)], dim=1)


@torch.no_grad()
def _agreement(net: AttributeChecker, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    pred = predict_attributes(images, net)
    want = decode(labels)
    ok = pred == want
    out = {"all": float(ok.all(1).float().mean())}
    out.update({a: float(ok[:, i].float().mean()) for i, a in enumerate(ATTRIBUTES)})
    return out


def attribute_agreement(images: torch.Tensor, labels: torch.Tensor | Sequence[int],
                        checker: AttributeChecker | None = None) -> dict[str, float]:
    """How well generated scenes match their captions, per the attribute checker.

    Returns ``{"all": fraction with all four attributes right, "shape": ..., "colour": ...,
    "position": ..., "grain": ...}``.
    """
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} samples but {labels.shape[0]} labels")
    return _agreement(checker if checker is not None else get_checker(), images, labels)
