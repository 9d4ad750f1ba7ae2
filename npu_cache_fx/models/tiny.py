"""Tiny trained reference diffusion transformers (plain diffusers classes) + flow-matching samplers.

Three models are shipped with the package (``npu_cache_fx/models/weights/``):

``tiny-flux``
    ``diffusers.FluxTransformer2DModel`` with 2 dual-stream blocks (``transformer_blocks``) and 6
    single-stream blocks (``single_transformer_blocks``), inner dim 128 (4 heads x 32), ~2.8M params.
    Generates 16x16 grey-scale digits.  The image is packed like Flux latents: 2x2 patches of the
    (1, 16, 16) image -> 64 tokens with 4 channels; ``img_ids`` are ``(0, row, col)``.  The digit class
    is the "prompt": a learned table (:class:`ClassConditioner`, kept *outside* the transformer) maps
    the class (0..9, or 10 = null/unconditional) to 4 text tokens of ``joint_attention_dim`` = 64 and a
    64-dim ``pooled_projections`` vector.  ``guidance_embeds=False``.

``tiny-wan``
    ``diffusers.WanTransformer3DModel`` (patch (1, 2, 2), 4 blocks, inner dim 128, ~1.2M params)
    generating 4-frame 16x16 grey-scale clips of a digit moving one pixel per frame (see :mod:`.data`).
    Each frame is turned into a "latent-like" (4, 8, 8) tensor by 2x2 space-to-depth
    (``pixel_unshuffle``), so the transformer sees ``(B, 4, F=4, 8, 8)`` and, after its (1, 2, 2)
    patching, 4 frames x 4 x 4 = 64 tokens (one token = a 4x4 pixel patch of one frame).  The class
    goes through ``encoder_hidden_states`` (4 tokens of ``text_dim`` = 64).

``tiny-flux-deep``
    ``diffusers.FluxTransformer2DModel`` with Flux-dev's topology: 19 dual-stream + 38 single-stream
    blocks, the same block classes and rotary layout (``axes_dims_rope`` (8, 12, 12) = head dim 32),
    narrowed to inner dim 64 (2 heads x 32), ~5.2M params.  Generates 16x16 RGB procedural scenes
    (:mod:`.scenes`: shape, colour and quadrant of one object and the strength of the film grain over the
    scene, whose per-pixel signs only the low-noise end of the trajectory resolves) so that, unlike the
    digit models, the number of sampling steps matters.
    Its default schedule is time-shifted like Flux-dev's (``default_shift`` 3.16, :data:`DEFAULT_SHIFT`).  Packed like
    tiny-flux (2x2 patches -> 64 tokens of 12 channels).  The caption (four attributes, encoded as one
    label 0..127, 128 = empty) goes through :class:`AttributeConditioner`: one token per attribute.

All three were trained with rectified flow: ``x_t = (1 - t) x0 + t * noise``, target velocity
``noise - x0``; sampling integrates ``dx/dt = v`` with Euler from t = 1 to t = 0 (linear flow times for the
digit models, time-shifted with shift 3.16 for tiny-flux-deep).

Timestep conventions (checked against diffusers 0.42 source):
* Flux: ``timestep`` in [0, 1]; ``FluxTransformer2DModel.forward`` multiplies it by 1000 itself.
* Wan: ``timestep`` in [0, 1000]; we pass ``t * 1000``.

Output layouts of :meth:`TinyModel.sample`:
* tiny-flux: ``(B, 1, 16, 16)`` in [-1, 1].
* tiny-wan: ``(B, F, 1, 16, 16)`` in [-1, 1] (frames first, like diffusers video pipelines); the
  transformer itself works on ``(B, C=4, F=4, 8, 8)`` (space-to-depth packed frames).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from . import scenes
from .data import IMAGE_SIZE, NULL_CLASS, NUM_CLASSES, NUM_FRAMES

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# ---------------------------------------------------------------------------------------------------
# Architecture specs (also written into the shipped json; the json is authoritative when loading).
# ---------------------------------------------------------------------------------------------------

FLUX_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4,
    out_channels=None,
    num_layers=2,
    num_single_layers=6,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=[8, 12, 12],
)
FLUX_CONDITIONER_CONFIG: dict[str, Any] = dict(num_tokens=4, token_dim=64, pooled_dim=64)

WAN_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=64,
    freq_dim=64,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
WAN_CONDITIONER_CONFIG: dict[str, Any] = dict(num_tokens=4, token_dim=64, pooled_dim=0)

# Flux-dev's depth (19 + 38 blocks) and rotary layout at 1/48 of its width (3072 -> 64).
FLUX_DEEP_TRANSFORMER_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4 * scenes.SCENE_CHANNELS,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=False,
    axes_dims_rope=[8, 12, 12],
)
FLUX_DEEP_CONDITIONER_CONFIG: dict[str, Any] = dict(kind="attributes", sizes=list(scenes.ATTRIBUTE_SIZES),
                                                    token_dim=64, pooled_dim=64)

MODEL_NAMES = ("tiny-flux", "tiny-wan", "tiny-flux-deep")
DEFAULT_STEPS = {"tiny-flux": 28, "tiny-wan": 20, "tiny-flux-deep": 28}
# Time shift of the default sampling schedule (``flow_timesteps(steps, shift)``).  tiny-flux-deep samples
# like Flux-dev, whose dynamic shift at 1024x1024 is exp(1.15) ~ 3.16: more of the steps at high noise,
# so a coarse schedule takes large steps through the low-noise end where fine detail is resolved.
DEFAULT_SHIFT = {"tiny-flux": 1.0, "tiny-wan": 1.0, "tiny-flux-deep": 3.16}


class ClassConditioner(nn.Module):
    """The "text encoder" of the tiny models: class id (0..9, 10 = null) -> prompt embeddings.

    ``tokens``: (num_classes + 1, num_tokens, token_dim) -> ``encoder_hidden_states``.
    ``pooled``: (num_classes + 1, pooled_dim) -> Flux ``pooled_projections`` (absent when pooled_dim=0).
    """

    def __init__(self, num_tokens: int = 4, token_dim: int = 64, pooled_dim: int = 64,
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        self.num_tokens, self.token_dim, self.pooled_dim = num_tokens, token_dim, pooled_dim
        self.tokens = nn.Parameter(torch.randn(num_classes + 1, num_tokens, token_dim))
        self.pooled = nn.Parameter(torch.randn(num_classes + 1, pooled_dim)) if pooled_dim > 0 else None

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        ehs = self.tokens[labels]
        pooled = self.pooled[labels] if self.pooled is not None else None
        return ehs, pooled


class AttributeConditioner(nn.Module):
    """The "text encoder" of tiny-flux-deep: a caption of attributes -> one token per attribute.

    Labels are mixed-radix codes of ``len(sizes)`` attributes (see :func:`.scenes.decode`); the label
    ``prod(sizes)`` is the empty caption (every attribute null).  Attribute ``i`` is looked up in its own
    table (``sizes[i] + 1`` rows, the last one null), so token ``i`` always speaks about attribute ``i``,
    like the words of a fixed-template caption; ``pooled`` is the sum of per-attribute vectors.
    """

    def __init__(self, sizes: Sequence[int] = scenes.ATTRIBUTE_SIZES, token_dim: int = 64, pooled_dim: int = 64,
                 kind: str = "attributes"):
        super().__init__()
        if kind != "attributes":
            raise ValueError(f"AttributeConditioner got kind={kind!r}")
        self.sizes = tuple(int(s) for s in sizes)
        self.num_tokens, self.token_dim, self.pooled_dim = len(self.sizes), token_dim, pooled_dim
        self.num_labels = 1
        for s in self.sizes:
            self.num_labels *= s
        self.tokens = nn.ParameterList([nn.Parameter(torch.randn(s + 1, token_dim)) for s in self.sizes])
        self.pooled = nn.ParameterList([nn.Parameter(torch.randn(s + 1, pooled_dim) / len(self.sizes) ** 0.5)
                                        for s in self.sizes])

    def attributes(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) -> attribute indices (B, n); the empty caption maps to the null row of every table."""
        null = labels >= self.num_labels
        rest = torch.where(null, torch.zeros_like(labels), labels)
        cols = []
        for s in reversed(self.sizes):
            cols.append(torch.where(null, torch.full_like(rest, s), rest % s))
            rest = rest // s
        return torch.stack(cols[::-1], dim=1)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attrs = self.attributes(labels)
        ehs = torch.stack([tab[attrs[:, i]] for i, tab in enumerate(self.tokens)], dim=1)
        pooled = sum(tab[attrs[:, i]] for i, tab in enumerate(self.pooled))
        return ehs, pooled


def _first(out: Any) -> torch.Tensor:
    """Extract the sample from whatever a transformer (or an optimized wrapper) returned."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot interpret transformer output of type {type(out)!r}")


def _maybe_cache_context(transformer: Any, name: str):
    fn = getattr(transformer, "cache_context", None)
    if callable(fn):
        return fn(name)
    return contextlib.nullcontext()


def flow_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Decreasing sigmas ``t_0 = 1 > ... > t_{steps-1} > 0`` (length ``steps``).

    Linear in [1, 1/steps]; with ``shift != 1`` the SD3/Flux time shift ``s t / (1 + (s - 1) t)`` is applied.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    if shift != 1.0:
        t = shift * t / (1.0 + (shift - 1.0) * t)
    return t.float()


class TinyModel:
    """A loaded tiny reference model: diffusers ``transformer`` + class conditioner + sampler.

    Attributes
    ----------
    name : str                 ``"tiny-flux"``, ``"tiny-wan"`` or ``"tiny-flux-deep"``
    transformer : nn.Module    the plain diffusers model, in eval mode
    conditioner : ClassConditioner (AttributeConditioner for tiny-flux-deep)
    default_steps : int        28 for tiny-flux and tiny-flux-deep, 20 for tiny-wan
    default_shift : float      time shift of the default schedule: 1.0 (linear) for the digit models, 3.16 for
                               tiny-flux-deep (Flux-dev-like); ``meta["default_shift"]`` (1.0 when absent)
    meta : dict                the shipped json (configs + training record)
    """

    kind: str = ""
    null_label: int = NULL_CLASS  # the empty prompt (CFG's unconditional branch, label dropout)

    def __init__(self, name: str, transformer: nn.Module, conditioner: ClassConditioner,
                 meta: dict | None = None, default_steps: int | None = None, default_shift: float | None = None):
        self.name = name
        self.transformer = transformer.eval()
        self.conditioner = conditioner.eval()
        self.meta = dict(meta or {})
        self.default_steps = int(default_steps or DEFAULT_STEPS.get(name, 28))
        self.default_shift = float(default_shift if default_shift is not None else DEFAULT_SHIFT.get(name, 1.0))

    # --- properties -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the transformer's ``hidden_states`` (without batch)."""
        raise NotImplementedError

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of :meth:`sample`'s images (without batch)."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.transformer.parameters())

    # --- layout conversion --------------------------------------------------------------------------
    def to_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images (output layout) -> transformer ``hidden_states`` layout."""
        raise NotImplementedError

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer layout -> images (output layout)."""
        raise NotImplementedError

    # --- transformer kwargs -------------------------------------------------------------------------
    def conditioning(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompt-side kwargs for ``labels`` (computed once per generation)."""
        raise NotImplementedError

    def inputs(self, labels: torch.Tensor | Sequence[int], latents: torch.Tensor | None = None,
               t: float | torch.Tensor = 1.0, *, seed: int = 0,
               cond: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Complete diffusers kwargs for one transformer call.

        ``t`` is the flow time in [0, 1] (scalar or (B,)); it is converted to each model's timestep
        convention.  If ``latents`` is None, seeded Gaussian noise is used (``t = 1`` inputs), which is
        what tracing / capture code typically wants.
        """
        labels = self._labels(labels)
        if latents is None:
            latents = self.noise(labels.shape[0], seed=seed)
        b = latents.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(float(t))
        t = t.to(torch.float32).reshape(-1).expand(b).to(self.device)
        if cond is None:
            cond = self.conditioning(labels)
        return self._kwargs(latents.to(self.device, self.dtype), t, cond)

    def _kwargs(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def _labels(self, labels) -> torch.Tensor:
        if not torch.is_tensor(labels):
            labels = torch.tensor(list(labels), dtype=torch.long)
        return labels.to(device=self.device, dtype=torch.long).reshape(-1)

    def noise(self, batch: int, seed: int = 0) -> torch.Tensor:
        """Seeded starting noise (float32, transformer layout); identical for any device / dtype."""
        g = torch.Generator().manual_seed(int(seed))
        return torch.randn((batch, *self.latent_shape), generator=g, dtype=torch.float32).to(self.device)

    # --- sampling -----------------------------------------------------------------------------------
    @torch.no_grad()
    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                 transformer: Callable | None = None) -> torch.Tensor:
        tr = self.transformer if transformer is None else transformer
        out = tr(**self._kwargs(latents.to(self.dtype), t, cond))
        return _first(out).to(torch.float32)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], *, steps: int | None = None, seed: int = 0,
               cfg_scale: float | None = None, transformer: Callable | None = None,
               timesteps: Sequence[float] | torch.Tensor | None = None, return_latents: bool = False,
               shift: float | None = None, noise: torch.Tensor | None = None,
               callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Euler flow-matching sampler (t: 1 -> 0).

        Parameters
        ----------
        labels : class ids (B,), 0..9 (10 = unconditional); scene captions 0..127 (128) for tiny-flux-deep.
        steps : number of denoising steps (``default_steps`` if None).  Ignored when ``timesteps`` is given.
        seed : seed of the starting noise (CPU generator; same noise on every device/dtype).
        cfg_scale : None -> ONE transformer call per step.  A float -> classifier-free guidance as TWO
            SEQUENTIAL calls per step, cond first then uncond (null class), wrapped in
            ``transformer.cache_context("cond")`` / ``("uncond")`` when the transformer has that method;
            ``v = v_u + cfg_scale * (v_c - v_u)``.
        transformer : callable used instead of ``self.transformer`` (e.g. an optimized wrapper).  It is
            called with diffusers keyword arguments and ``return_dict=False``.
        timesteps : explicit decreasing flow times in (0, 1] (one per step); the final target is 0.
        return_latents : return the final latents in the transformer layout instead of images.
        shift : SD3-style time shift of the linear schedule (1.0 = plain linear); ``default_shift`` if None
            (1.0 for the digit models, 3.16 for tiny-flux-deep).
        noise : explicit starting noise (transformer layout), overrides ``seed``.
        callback : ``callback(step_index, t, latents)`` after each step.

        The ``timestep`` passed to the transformer is always a (B,) tensor that decreases over the steps.
        Returns images clamped to [-1, 1]: (B, 1, 16, 16) for tiny-flux, (B, F, 1, 16, 16) for tiny-wan.
        """
        labels = self._labels(labels)
        b = labels.shape[0]
        if timesteps is None:
            ts = flow_timesteps(self.default_steps if steps is None else int(steps),
                                shift=self.default_shift if shift is None else float(shift))
        else:
            ts = torch.as_tensor(timesteps, dtype=torch.float32).reshape(-1)
            if ts.numel() < 1 or not bool((ts[1:] < ts[:-1]).all()) or float(ts[0]) > 1.0 or float(ts[-1]) <= 0:
                raise ValueError("timesteps must be strictly decreasing values in (0, 1]")
        sigmas = torch.cat([ts, ts.new_zeros(1)])
        x = (noise.to(torch.float32).to(self.device) if noise is not None else self.noise(b, seed=seed))
        if x.shape[0] != b:
            raise ValueError("noise batch does not match labels")
        tr = self.transformer if transformer is None else transformer
        cond = self.conditioning(labels)
        uncond = self.conditioning(torch.full_like(labels, self.null_label)) if cfg_scale is not None else None
        for i in range(len(ts)):
            t = sigmas[i].expand(b).to(self.device)
            if cfg_scale is None:
                v = self.velocity(x, t, cond, tr)
            else:
                with _maybe_cache_context(tr, "cond"):
                    v_c = self.velocity(x, t, cond, tr)
                with _maybe_cache_context(tr, "uncond"):
                    v_u = self.velocity(x, t, uncond, tr)
                v = v_u + float(cfg_scale) * (v_c - v_u)
            x = x + (sigmas[i + 1] - sigmas[i]).item() * v
            if callback is not None:
                callback(i, sigmas[i], x)
        if return_latents:
            return x
        return self.from_latents(x).clamp(-1.0, 1.0)

    def fewer_steps(self, labels, steps: int, **kw) -> torch.Tensor:
        """Baseline "just take fewer steps": ``sample(labels, steps=steps, ...)``."""
        return self.sample(labels, steps=steps, **kw)

    # --- training helpers ---------------------------------------------------------------------------
    def training_loss(self, x0: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                      p_uncond: float = 0.1, t_dist: str = "logit-normal") -> torch.Tensor:
        """Rectified-flow loss on a batch of images (output layout). Gradients flow into both modules.

        ``t_dist``: ``"logit-normal"`` (mean 0, std 1, as in SD3) or ``"uniform"`` (more weight on the
        low-noise end, where fine detail is resolved).
        """
        b = x0.shape[0]
        x0 = self.to_latents(x0)
        noise = torch.randn(x0.shape, generator=generator)
        if t_dist == "logit-normal":
            t = torch.sigmoid(torch.randn(b, generator=generator))
        elif t_dist == "uniform":
            t = torch.rand(b, generator=generator).clamp_min(1e-4)
        else:
            raise ValueError(f"unknown t_dist {t_dist!r}")
        drop = torch.rand(b, generator=generator) < p_uncond
        labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        tt = t.view(b, *([1] * (x0.dim() - 1)))
        xt = (1.0 - tt) * x0 + tt * noise
        target = noise - x0
        pred = _first(self.transformer(**self._kwargs(xt, t, self.conditioning(labels))))
        return torch.mean((pred.float() - target) ** 2)

    def modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer, "cond": self.conditioner}

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for prefix, mod in self.modules().items():
            for k, v in mod.state_dict().items():
                sd[f"{prefix}.{k}"] = v
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for prefix, mod in self.modules().items():
            sub = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
            mod.load_state_dict(sub, strict=True)

    def to(self, device=None, dtype=None) -> "TinyModel":
        if dtype is not None and dtype != self.dtype:
            from diffusers.utils import logging as dlogging

            level = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # silence the "should be kept in float32: []" warning
            try:
                self.transformer.to(device=device, dtype=dtype)
            finally:
                dlogging.set_verbosity(level)
        elif device is not None:
            self.transformer.to(device=device)
        self.conditioner.to(device=device, dtype=dtype)
        return self

    def __repr__(self) -> str:
        return (f"TinyModel(name={self.name!r}, transformer={type(self.transformer).__name__}, "
                f"params={self.num_parameters():,}, default_steps={self.default_steps}"
                + (f", default_shift={self.default_shift:g})" if self.default_shift != 1.0 else ")"))


class TinyFlux(TinyModel):
    kind = "flux"
    patch = 2
    channels = 1  # image channels; a latent token carries channels * patch * patch values

    @property
    def latent_shape(self):
        n = (IMAGE_SIZE // self.patch) ** 2
        return (n, self.channels * self.patch * self.patch)

    @property
    def output_shape(self):
        return (self.channels, IMAGE_SIZE, IMAGE_SIZE)

    def to_latents(self, images):
        # Same packing as diffusers' FluxPipeline._pack_latents.
        b, c, h, w = images.shape
        p = self.patch
        x = images.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def from_latents(self, latents):
        b = latents.shape[0]
        p, hp = self.patch, IMAGE_SIZE // self.patch
        x = latents.reshape(b, hp, hp, self.channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, self.channels, IMAGE_SIZE, IMAGE_SIZE)

    def img_ids(self) -> torch.Tensor:
        hp = IMAGE_SIZE // self.patch
        ids = torch.zeros(hp, hp, 3)
        ids[..., 1] = torch.arange(hp).view(hp, 1)
        ids[..., 2] = torch.arange(hp).view(1, hp)
        return ids.reshape(hp * hp, 3).to(self.device, self.dtype)

    def txt_ids(self) -> torch.Tensor:
        return torch.zeros(self.conditioner.num_tokens, 3, device=self.device, dtype=self.dtype)

    def conditioning(self, labels):
        ehs, pooled = self.conditioner(self._labels(labels))
        return {"encoder_hidden_states": ehs.to(self.dtype), "pooled_projections": pooled.to(self.dtype),
                "img_ids": self.img_ids(), "txt_ids": self.txt_ids()}

    def _kwargs(self, latents, t, cond):
        return dict(hidden_states=latents, encoder_hidden_states=cond["encoder_hidden_states"],
                    pooled_projections=cond["pooled_projections"], timestep=t.to(latents.dtype),
                    img_ids=cond["img_ids"], txt_ids=cond["txt_ids"], guidance=None, return_dict=False)


class TinyFluxDeep(TinyFlux):
    """tiny-flux-deep: Flux-dev's 19 + 38 block topology on 16x16 RGB scenes (see :mod:`.scenes`).

    Labels are scene captions 0..127 (:func:`.scenes.encode`), 128 = empty caption.  ``sample`` returns
    (B, 3, 16, 16) in [-1, 1]; :meth:`agreement` scores samples against their captions.
    """

    channels = scenes.SCENE_CHANNELS
    null_label = scenes.NULL_LABEL

    def eval_labels(self, n: int) -> torch.Tensor:
        return scenes.eval_labels(n)

    def agreement(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int]) -> dict[str, float]:
        """Attribute checker's agreement of ``images`` with captions ``labels`` (see :mod:`.scenes`)."""
        return scenes.attribute_agreement(images, labels)


class TinyWan(TinyModel):
    kind = "wan"

    pack = 2  # space-to-depth factor of the "latent"

    @property
    def latent_shape(self):
        p = self.pack
        return (p * p, NUM_FRAMES, IMAGE_SIZE // p, IMAGE_SIZE // p)

    @property
    def output_shape(self):
        return (NUM_FRAMES, 1, IMAGE_SIZE, IMAGE_SIZE)

    def to_latents(self, clips):  # (B, F, 1, H, W) -> (B, 4, F, H/2, W/2)
        b, f = clips.shape[:2]
        x = torch.nn.functional.pixel_unshuffle(clips.reshape(b * f, *clips.shape[2:]), self.pack)
        return x.reshape(b, f, *x.shape[1:]).transpose(1, 2).contiguous()

    def from_latents(self, latents):  # (B, 4, F, H/2, W/2) -> (B, F, 1, H, W)
        b, _, f = latents.shape[:3]
        x = latents.transpose(1, 2).reshape(b * f, *latents.shape[1:2], *latents.shape[3:])
        x = torch.nn.functional.pixel_shuffle(x, self.pack)
        return x.reshape(b, f, *x.shape[1:]).contiguous()

    def conditioning(self, labels):
        ehs, _ = self.conditioner(self._labels(labels))
        return {"encoder_hidden_states": ehs.to(self.dtype)}

    def _kwargs(self, latents, t, cond):
        return dict(hidden_states=latents, timestep=t.to(latents.dtype) * 1000.0,
                    encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)


# ---------------------------------------------------------------------------------------------------
# Construction / loading
# ---------------------------------------------------------------------------------------------------

def _check_name(name: str) -> str:
    if name not in MODEL_NAMES:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(MODEL_NAMES)}")
    return name


def default_meta(name: str) -> dict:
    _check_name(name)
    if name == "tiny-flux-deep":
        return {"name": name, "class": "FluxTransformer2DModel",
                "transformer_config": dict(FLUX_DEEP_TRANSFORMER_CONFIG),
                "conditioner_config": dict(FLUX_DEEP_CONDITIONER_CONFIG), "default_steps": DEFAULT_STEPS[name],
                "default_shift": DEFAULT_SHIFT[name]}
    if name == "tiny-flux":
        return {"name": name, "class": "FluxTransformer2DModel", "transformer_config": dict(FLUX_TRANSFORMER_CONFIG),
                "conditioner_config": dict(FLUX_CONDITIONER_CONFIG), "default_steps": DEFAULT_STEPS[name]}
    return {"name": name, "class": "WanTransformer3DModel", "transformer_config": dict(WAN_TRANSFORMER_CONFIG),
            "conditioner_config": dict(WAN_CONDITIONER_CONFIG), "default_steps": DEFAULT_STEPS[name]}


def adaln_zero_init(transformer: nn.Module) -> None:
    """DiT-style "adaLN-Zero" init: zero every modulation projection and the output projection, so each
    block starts as the identity (gates = 0).  Speeds up the short CPU training runs considerably."""
    for name, mod in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        zero = False
        if isinstance(mod, nn.Linear):
            if leaf == "linear" and parent.startswith("norm"):  # Flux AdaLayerNorm* modulation
                zero = True
            elif name in ("proj_out", "condition_embedder.time_proj"):  # outputs / Wan shared modulation
                zero = True
            elif name.endswith("attn2.to_out.0"):  # Wan cross-attention has no gate
                zero = True
        if zero:
            nn.init.zeros_(mod.weight)
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    for name, prm in transformer.named_parameters():
        if name.endswith("scale_shift_table") and name.startswith("blocks."):  # Wan per-block modulation
            nn.init.zeros_(prm)


def build(name: str, meta: dict | None = None, seed: int | None = None, init: str = "default") -> TinyModel:
    """Randomly initialised model of the given architecture (used for training and as load skeleton).

    ``init="adaln-zero"`` applies :func:`adaln_zero_init` (used by ``examples/train_tiny.py``).
    """
    import diffusers

    _check_name(name)
    meta = dict(meta or default_meta(name))
    if seed is not None:
        torch.manual_seed(seed)
    cls = getattr(diffusers, meta["class"])
    tcfg = dict(meta["transformer_config"])
    for k in ("patch_size", "axes_dims_rope"):
        if k in tcfg and isinstance(tcfg[k], list):
            tcfg[k] = tuple(tcfg[k])
    transformer = cls(**tcfg)
    if init == "adaln-zero":
        adaln_zero_init(transformer)
    elif init != "default":
        raise ValueError(f"unknown init {init!r}")
    ccfg = dict(meta["conditioner_config"])
    if ccfg.get("kind") == "attributes":
        conditioner: nn.Module = AttributeConditioner(**ccfg)
    else:
        conditioner = ClassConditioner(**ccfg)
    model_cls = {"tiny-flux": TinyFlux, "tiny-wan": TinyWan, "tiny-flux-deep": TinyFluxDeep}[name]
    # a json without "default_shift" (weights trained before it existed) was measured with linear flow times
    return model_cls(name, transformer, conditioner, meta=meta, default_steps=meta.get("default_steps"),
                     default_shift=meta.get("default_shift", 1.0))


def weights_paths(name: str, directory: str | Path | None = None) -> tuple[Path, Path]:
    d = Path(directory) if directory is not None else WEIGHTS_DIR
    return d / f"{name}.safetensors", d / f"{name}.json"


def save(model: TinyModel, directory: str | Path, weights_dtype: torch.dtype = torch.float16,
         extra_meta: dict | None = None) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    st_path, json_path = weights_paths(model.name, directory)
    sd = {k: v.detach().to("cpu", weights_dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(st_path), metadata={"name": model.name, "format": "pt"})
    meta = dict(model.meta)
    meta.update(extra_meta or {})
    meta["weights_dtype"] = str(weights_dtype).replace("torch.", "")
    meta["num_parameters"] = model.num_parameters()
    json_path.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return st_path, json_path


def load(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
         directory: str | Path | None = None) -> TinyModel:
    """Load a shipped tiny model (offline, from package data).

    ``name``: ``"tiny-flux"``, ``"tiny-wan"`` or ``"tiny-flux-deep"``.  ``directory`` overrides the weights
    folder (e.g. a freshly trained ``examples/train_tiny.py --out DIR``).  Weights are stored in fp16 and cast
    to ``dtype``.
    """
    from safetensors.torch import load_file

    _check_name(name)
    st_path, json_path = weights_paths(name, directory)
    if not st_path.exists() or not json_path.exists():
        raise FileNotFoundError(f"weights for {name!r} not found in {st_path.parent}")
    meta = json.loads(json_path.read_text())
    model = build(name, meta=meta)
    sd = load_file(str(st_path))
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    model.load_state_dict(sd)
    model.to(device=device, dtype=dtype)
    model.transformer.eval()
    model.conditioner.eval()
    for p in list(model.transformer.parameters()) + list(model.conditioner.parameters()):
        p.requires_grad_(False)
    return model


def list_models() -> list[str]:
    return list(MODEL_NAMES)


def eval_labels(n: int = 10, model: str | TinyModel | None = None) -> torch.Tensor:
    """Fixed evaluation batch of length ``n``: ``0, 1, ..., 9, 0, 1, ...`` for the digit models.

    For ``model="tiny-flux-deep"`` (name or loaded model) the captions of :func:`.scenes.eval_labels`
    (a stride through all 128 scene captions), since digit labels would only name 10 of them.
    """
    name = model.name if isinstance(model, TinyModel) else model
    if name == "tiny-flux-deep":
        return scenes.eval_labels(n)
    return torch.arange(n, dtype=torch.long) % NUM_CLASSES
