"""Tiny random-init diffusers DiTs (no hub), for tests. The by-hand CacheAgent hooks are in hooks.py."""

from __future__ import annotations

import torch


def tiny_flux(layers=2, single=4):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    return model.eval()


def flux_inputs(t: float, seed: int = 0, batch: int = 1, tokens: int = 16, text: int = 4):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, tokens, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                timestep=torch.full((batch,), t), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


def tiny_wan(layers=4):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers,
                                  rope_max_seq_len=32)
    return model.eval()


def wan_inputs(t: float, seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g),
                timestep=torch.full((batch,), t * 1000),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g), return_dict=False)


def generate_cfg(opt, make_inputs, steps: int, generations: int = 2, after_step=None):
    """``generations`` generations of ``steps`` steps, a "cond" and an "uncond" call per step (seeds ``s`` and
    ``100 + s``, ``t`` from 1 down); returns the cond outputs of every step of every generation.
    ``after_step()`` is called after each step's two calls."""
    outs = []
    with torch.no_grad():
        for _ in range(generations):
            for s in range(steps):
                t = 1.0 - s / steps
                with opt.cache_context("cond"):
                    out = opt(**make_inputs(t, seed=s))[0]
                with opt.cache_context("uncond"):
                    opt(**make_inputs(t, seed=100 + s))
                outs.append(out)
                if after_step is not None:
                    after_step()
    return outs
