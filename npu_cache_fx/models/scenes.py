"""Procedural 16x16 RGB scenes for ``tiny-flux-deep``, and the attribute checker that scores them.

Why procedural scenes: on the digits the shipped models learned, the flow is nearly straight (10 Euler
steps already reach 40 dB against 28), so caching methods cannot be told apart the way they can on real
models.  These scenes carry fine, *random* detail that the caption does not determine (texture phase,
sub-pixel position and size, background gradient): the sampler has to resolve it late in the trajectory,
where a coarse step schedule blurs it, so the number of steps matters.

A scene is one anti-aliased object on a dark grey gradient background.  Its caption is four attributes:

* ``shape``    - square, disc, triangle, cross
* ``colour``   - red, green, blue, yellow
* ``position`` - top-left, top-right, bottom-left, bottom-right quadrant (centre jittered +-1 px)
* ``texture``  - solid, horizontal stripes, vertical stripes, checker (2 px bands, random phase;
  the dark bands are 40 % of the colour)

The caption is encoded as one integer ``label = ((shape * 4 + colour) * 4 + position) * 4 + texture``
(0..255; :data:`NULL_LABEL` = 256 is the empty caption for classifier-free guidance), so the models'
``sample(labels)`` interface is the same as for the digit models.

:func:`attribute_agreement` scores generated images with a small CNN (:class:`AttributeChecker`, four
heads) trained on these scenes only (no blur augmentation, so a sample whose texture was averaged away
by too few steps is read as the wrong texture).  Its weights ship next to the model
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
SHAPES = ("square", "disc", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
TEXTURES = ("solid", "hstripes", "vstripes", "checker")
ATTRIBUTES = ("shape", "colour", "position", "texture")
ATTRIBUTE_SIZES = (len(SHAPES), len(COLOURS), len(POSITIONS), len(TEXTURES))
NUM_LABELS = math.prod(ATTRIBUTE_SIZES)  # 256
NULL_LABEL = NUM_LABELS

# Colours in [0, 1] RGB; kept away from 0 / 1 so that samples are not flattened by the final clamp.
_PALETTE = torch.tensor([[0.90, 0.15, 0.10], [0.15, 0.80, 0.20], [0.20, 0.35, 0.95], [0.90, 0.85, 0.15]])
_QUADRANT_CENTRES = (6.0, 10.0)  # pixel units, for row / column
_JITTER = 1.0  # +- px of the object centre
_RADIUS = (4.2, 5.2)  # object "radius" in px: large enough that shape and texture are learnable
_DARK = 0.4  # brightness of the texture's dark bands
_SUPERSAMPLE = 4

CHECKER_FILE = "scenes-checker.safetensors"


# ------------------------------------------------------------------------------------------------
# Labels <-> attributes
# ------------------------------------------------------------------------------------------------

def encode(shape: torch.Tensor, colour: torch.Tensor, position: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
    """Attribute indices -> caption labels (mixed radix, see the module docstring)."""
    return ((shape * ATTRIBUTE_SIZES[1] + colour) * ATTRIBUTE_SIZES[2] + position) * ATTRIBUTE_SIZES[3] + texture


def decode(labels: torch.Tensor) -> torch.Tensor:
    """Caption labels (B,) in 0..255 -> attribute indices (B, 4) in :data:`ATTRIBUTES` order."""
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
    """Human-readable caption of one label, e.g. ``"red striped disc, top-left"``."""
    s, c, p, t = (int(v) for v in decode(torch.tensor([label]))[0])
    tex = {"solid": "solid", "hstripes": "horizontally striped", "vstripes": "vertically striped",
           "checker": "checkered"}[TEXTURES[t]]
    return f"{tex} {COLOURS[c]} {SHAPES[s]}, {POSITIONS[p]}"


def eval_labels(n: int) -> torch.Tensor:
    """Fixed evaluation captions of length ``n``: a stride through all 256 that varies every attribute.

    ``(i * 157) % 256`` visits every label once per 256 (157 is odd), and neighbouring entries differ in
    all four attributes, so a short batch still covers each value of each attribute.
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
    disc = dy * dy + dx * dx <= r * r
    tri = (dy >= -r) & (dy <= 0.8 * r) & (adx <= (dy + r) / 1.8)
    arm = 0.38 * r
    cross = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    masks = torch.stack([square, disc, tri, cross], dim=1).float()  # (B, 4, Hs, Ws)
    m = masks[torch.arange(b), shape]
    return F.avg_pool2d(m.unsqueeze(1), s).squeeze(1)


def _pattern(texture: torch.Tensor, phase_y: torch.Tensor, phase_x: torch.Tensor) -> torch.Tensor:
    """Texture patterns (B, H, W) in {0, 1} (1 = dark band), 2 px bands with per-sample phase 0..3."""
    n = SCENE_SIZE
    b = texture.shape[0]
    y = torch.arange(n).view(1, n, 1) + phase_y.view(b, 1, 1)
    x = torch.arange(n).view(1, 1, n) + phase_x.view(b, 1, 1)
    h = ((y // 2) % 2).expand(b, n, n)
    v = ((x // 2) % 2).expand(b, n, n)
    c = (h + v) % 2
    pats = torch.stack([torch.zeros_like(h), h, v, c], dim=1).float()
    return pats[torch.arange(b), texture]


def render(attributes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Render scenes for attribute indices (B, 4) -> (B, 3, 16, 16) in [-1, 1].

    The nuisance (centre jitter, size, texture phase, background level and gradient) is drawn from
    ``generator``; the attributes fix everything a caption says.
    """
    attributes = torch.as_tensor(attributes).long()
    b = attributes.shape[0]
    shape, colour, position, texture = attributes.unbind(1)
    centres = torch.tensor(_QUADRANT_CENTRES)
    cy = centres[position // 2] + (torch.rand(b, generator=generator) * 2 - 1) * _JITTER
    cx = centres[position % 2] + (torch.rand(b, generator=generator) * 2 - 1) * _JITTER
    r = _RADIUS[0] + torch.rand(b, generator=generator) * (_RADIUS[1] - _RADIUS[0])
    phase = torch.randint(0, 4, (b, 2), generator=generator)
    cov = _coverage(shape, cy, cx, r)  # (B, H, W)
    pat = _pattern(texture, phase[:, 0], phase[:, 1])
    obj = _PALETTE[colour].view(b, 3, 1, 1) * (1.0 - (1.0 - _DARK) * pat.unsqueeze(1))
    # background: grey level 0.05..0.25 plus a linear ramp of +-0.08 along a random direction
    level = 0.05 + 0.2 * torch.rand(b, generator=generator)
    angle = torch.rand(b, generator=generator) * (2 * math.pi)
    ramp = (torch.arange(SCENE_SIZE, dtype=torch.float32) - (SCENE_SIZE - 1) / 2) / (SCENE_SIZE / 2)
    grad = (torch.cos(angle).view(b, 1, 1) * ramp.view(1, -1, 1) + torch.sin(angle).view(b, 1, 1) * ramp.view(1, 1, -1))
    bg = (level.view(b, 1, 1) + 0.08 * grad).unsqueeze(1).expand(b, 3, SCENE_SIZE, SCENE_SIZE)
    img = bg * (1.0 - cov.unsqueeze(1)) + obj * cov.unsqueeze(1)
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
    """Small CNN with one classification head per attribute (shape, colour, position, texture).

    The first layers keep full resolution: the texture bands are 2 px wide and must not be pooled away
    before they are seen.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(SCENE_CHANNELS, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.heads = nn.Linear(128, sum(ATTRIBUTE_SIZES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4x4
        logits = self.heads(F.relu(self.fc(x.flatten(1))))
        return list(logits.split(list(ATTRIBUTE_SIZES), dim=1))


_CHECKER_SEED = 4321
_CHECKER_STEPS = 2000
_CHECKER_BATCH = 128
_checker: AttributeChecker | None = None
_checker_path: Path | None = None


def train_checker(steps: int = _CHECKER_STEPS, seed: int = _CHECKER_SEED) -> tuple[AttributeChecker, dict]:
    """Train the attribute checker on freshly drawn scenes (deterministic: fixed seed, one thread).

    Mild Gaussian noise (sigma 0.05) is the only augmentation, so that small sampler imperfections do
    not flip an attribute, while a texture blurred away by a coarse sampler still reads as "solid".
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
    """Predicted attribute indices (B, 4) for scenes (B, 3, 16, 16) in [-1, 1]."""
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
    "position": ..., "texture": ...}``.
    """
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} samples but {labels.shape[0]} labels")
    return _agreement(checker if checker is not None else get_checker(), images, labels)
