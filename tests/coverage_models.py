"""The coverage set: tiny random-init diffusers DiTs (no hub), their inputs and expected block lists.

``MODELS`` maps a name to a :class:`Model`: a builder, an input builder
``inputs(t, seed)`` (``t`` in (0, 1], falling over a generation), and the block
lists ``find_block_lists`` must report, each with what a by-hand
:class:`~npu_cache_fx.CacheAgent` needs to reproduce a cached run (the
block's return order, the attention submodule, a sensible block range).
Every model builds and runs one forward in well under a second on one CPU
core; used by ``tests/test_coverage.py``, ``scripts/forward_patterns.py``,
``scripts/coverage.py`` and the ``--tiny`` examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

from npu_cache_fx.config import ConfigError

__all__ = ["BlockListSpec", "Model", "MODELS"]


@dataclass(frozen=True)
class BlockListSpec:
    """One block list of a model, as the tests expect it."""

    count: int
    block_class: str
    order: str = "hidden_first"        # CacheAgent output_order: "hidden_first" | "encoder_first"
    dit_range: Tuple[int, int] = (0, 0)  # (0, 0): the whole list
    attention: Optional[str] = None    # attention submodule the attention cache picks (None: auto)
    cached: bool = True                # False: detected, but not a denoising block list (e.g. a text refiner)


@dataclass(frozen=True)
class Model:
    name: str
    cls: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[..., dict]
    lists: Dict[str, BlockListSpec]
    combined: Tuple[str, ...] = ()     # (dit list, attention list); same list: disjoint ranges
    extra_ranges: Tuple[Tuple[str, Tuple[int, int]], ...] = ()  # more DiT-cache ranges to test
    # feature -> (precise reason, exception raised); a strict xfail in tests/test_coverage.py
    xfail: Dict[str, Tuple[str, type]] = field(default_factory=dict)
    export_error: str = ""             # torch.export cannot capture it: optimize() runs its eager fallback
    export_exception: type = Exception  # the exception type that capture raises (a strict xfail expects it)
    note: str = ""

    def dit_range(self, fqn: str) -> Tuple[int, int]:
        lo, hi = self.lists[fqn].dit_range
        return (lo, hi) if hi else (0, self.lists[fqn].count)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn().eval()
    build.__name__ = fn.__name__
    return build


# ----------------------------------------------------------------------------- image, dual + single stream
@_seeded
def flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=4,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))


def flux_inputs(t: float, seed: int = 0, batch: int = 1, tokens: int = 16, text: int = 4):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(batch, tokens, 4, generator=g),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g),
                pooled_projections=torch.randn(batch, 32, generator=g),
                timestep=torch.full((batch,), t), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


@_seeded
def chroma():
    from diffusers import ChromaTransformer2DModel
    return ChromaTransformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=1)


def chroma_inputs(t: float, seed: int = 0, tokens: int = 16, text: int = 4):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, tokens, 4, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                timestep=torch.full((1,), t), img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3),
                return_dict=False)


@_seeded
def flux2():
    from diffusers import Flux2Transformer2DModel
    return Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=2, num_single_layers=3,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))


def flux2_inputs(t: float, seed: int = 0, tokens: int = 16, text: int = 4):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, tokens, 4, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                timestep=torch.full((1,), t), img_ids=torch.zeros(1, tokens, 4), txt_ids=torch.zeros(1, text, 4),
                guidance=torch.full((1,), 3.5), return_dict=False)


@_seeded
def qwen_image():
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=4,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4))


def qwen_image_inputs(t: float, seed: int = 0, h: int = 4, w: int = 4, text: int = 7):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                encoder_hidden_states_mask=torch.ones(1, text, dtype=torch.long),
                timestep=torch.full((1,), t), img_shapes=[(1, h, w)], return_dict=False)


@_seeded
def sd3():
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=4, attention_head_dim=8,
                                 num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
                                 pooled_projection_dim=32, out_channels=4, pos_embed_max_size=16)


def sd3_inputs(t: float, seed: int = 0, text: int = 6):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.full((1,), t * 1000),
                return_dict=False)


@_seeded
def aura_flow():
    from diffusers import AuraFlowTransformer2DModel
    return AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                      num_single_dit_layers=3, attention_head_dim=8, num_attention_heads=2,
                                      caption_projection_dim=16, joint_attention_dim=32, out_channels=4,
                                      pos_embed_max_size=64)


def aura_flow_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 32, generator=g), timestep=torch.full((1,), t),
                return_dict=False)


@_seeded
def cogview4():
    from diffusers import CogView4Transformer2DModel
    return CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                      num_attention_heads=2, out_channels=4, text_embed_dim=16, time_embed_dim=8,
                                      condition_dim=4, rope_axes_dim=(8, 8))


def cogview4_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g), timestep=torch.full((1,), t * 1000),
                original_size=torch.tensor([[32.0, 32.0]]), target_size=torch.tensor([[32.0, 32.0]]),
                crop_coords=torch.tensor([[0.0, 0.0]]), return_dict=False)


# ----------------------------------------------------------------------------- image, cross-attention DiTs
@_seeded
def pixart():
    from diffusers import PixArtTransformer2DModel
    return PixArtTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=16, in_channels=4, cross_attention_dim=16,
                                    out_channels=8, norm_type="ada_norm_single", norm_elementwise_affine=False)


def pixart_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                timestep=torch.full((1,), t * 1000), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False)


@_seeded
def sana():
    from diffusers import SanaTransformer2DModel
    return SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=4,
                                  num_attention_heads=2, num_cross_attention_heads=2, cross_attention_head_dim=4,
                                  cross_attention_dim=8, caption_channels=8, sample_size=8)


def sana_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 8, generator=g), timestep=torch.full((1,), t * 1000),
                return_dict=False)


@_seeded
def hunyuan_dit():
    from diffusers import HunyuanDiT2DModel
    # 4 blocks: block 0 feeds the long skip of block 3 (a skip_linear block), 1-2 are the middle (as 0-18 feed
    # 21-39 around the middle 19-20 in the real 40-block model)
    return HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                             num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8,
                             pooled_projection_dim=4, hidden_size=16, text_len=4, text_len_t5=4)


def hunyuan_dit_inputs(t: float, seed: int = 0):
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    g = _gen(seed)
    rope = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4))  # head_dim 8 over a 4x4 patch grid
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.full((1,), t * 1000),
                encoder_hidden_states=torch.randn(1, 4, 8, generator=g),
                text_embedding_mask=torch.ones(1, 4, dtype=torch.long),
                encoder_hidden_states_t5=torch.randn(1, 4, 8, generator=g),
                text_embedding_mask_t5=torch.ones(1, 4, dtype=torch.long),
                image_meta_size=torch.tensor([[32.0, 32.0, 32.0, 32.0, 0.0, 0.0]]),
                style=torch.zeros(1, dtype=torch.long), image_rotary_emb=rope, return_dict=False)


@_seeded
def lumina2():
    from diffusers import Lumina2Transformer2DModel
    return Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=3,
                                     num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
                                     axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=8)


def lumina2_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.full((1,), t),
                encoder_hidden_states=torch.randn(1, text, 8, generator=g),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.bool), return_dict=False)


# ----------------------------------------------------------------------------- video
@_seeded
def wan():
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=4,
                                 rope_max_seq_len=32)


def wan_inputs(t: float, seed: int = 0, batch: int = 1):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(batch, 4, 2, 8, 8, generator=g), timestep=torch.full((batch,), t * 1000),
                encoder_hidden_states=torch.randn(batch, 6, 16, generator=g), return_dict=False)


@_seeded
def hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel
    return HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=2, num_single_layers=3, num_refiner_layers=1, patch_size=1,
                                          patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                          pooled_projection_dim=8, rope_axes_dim=(2, 2, 4))


def hunyuan_video_inputs(t: float, seed: int = 0, text: int = 6):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g), timestep=torch.full((1,), t * 1000),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.long),
                pooled_projections=torch.randn(1, 8, generator=g), guidance=torch.full((1,), 6000.0),
                return_dict=False)


@_seeded
def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=4, text_embed_dim=8, num_layers=3, sample_width=8,
                                       sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=8)


def cogvideox_inputs(t: float, seed: int = 0):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 2, 4, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 8, generator=g), timestep=torch.full((1,), t * 1000),
                return_dict=False)


@_seeded
def ltx_video():
    from diffusers import LTXVideoTransformer3DModel
    return LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=3, caption_channels=16)


def ltx_video_inputs(t: float, seed: int = 0, frames: int = 2, h: int = 4, w: int = 4, text: int = 6):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, frames * h * w, 4, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g), timestep=torch.full((1,), t * 1000),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.long), num_frames=frames, height=h, width=w,
                return_dict=False)


@_seeded
def mochi():
    from diffusers import MochiTransformer3DModel
    return MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3,
                                   pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                   max_sequence_length=8)


def mochi_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 4, 4, generator=g),
                encoder_hidden_states=torch.randn(1, text, 16, generator=g), timestep=torch.full((1,), t * 1000),
                encoder_attention_mask=torch.ones(1, text, dtype=torch.long), return_dict=False)


@_seeded
def allegro():
    from diffusers import AllegroTransformer3DModel
    return AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                     num_layers=3, cross_attention_dim=16, sample_width=8, sample_height=8,
                                     sample_frames=8, caption_channels=8)


def allegro_inputs(t: float, seed: int = 0, text: int = 8):
    g = _gen(seed)
    return dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g),
                encoder_hidden_states=torch.randn(1, text, 8, generator=g), timestep=torch.full((1,), t * 1000),
                return_dict=False)


# ----------------------------------------------------------------------------- the table
_B = BlockListSpec
MODELS: Dict[str, Model] = {m.name: m for m in [
    Model("flux", "FluxTransformer2DModel", flux, flux_inputs,
          {"single_transformer_blocks": _B(4, "FluxSingleTransformerBlock", "encoder_first", (1, 4)),
           "transformer_blocks": _B(2, "FluxTransformerBlock", "encoder_first", (1, 2))},
          combined=("single_transformer_blocks", "transformer_blocks")),
    Model("qwen_image", "QwenImageTransformer2DModel", qwen_image, qwen_image_inputs,
          {"transformer_blocks": _B(4, "QwenImageTransformerBlock", "encoder_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("wan", "WanTransformer3DModel", wan, wan_inputs,
          {"blocks": _B(4, "WanTransformerBlock", "hidden_first", (1, 3), attention="attn1")},
          combined=("blocks", "blocks")),
    Model("hunyuan_video", "HunyuanVideoTransformer3DModel", hunyuan_video, hunyuan_video_inputs,
          {"single_transformer_blocks": _B(3, "HunyuanVideoSingleTransformerBlock", "hidden_first", (1, 3)),
           "transformer_blocks": _B(2, "HunyuanVideoTransformerBlock", "hidden_first", (1, 2)),
           "context_embedder.token_refiner.refiner_blocks":
               _B(1, "HunyuanVideoIndividualTokenRefinerBlock", cached=False)},
          combined=("single_transformer_blocks", "transformer_blocks")),
    Model("cogvideox", "CogVideoXTransformer3DModel", cogvideox, cogvideox_inputs,
          {"transformer_blocks": _B(3, "CogVideoXBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("sd3", "SD3Transformer2DModel", sd3, sd3_inputs,
          {"transformer_blocks": _B(4, "JointTransformerBlock", "encoder_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("pixart", "PixArtTransformer2DModel", pixart, pixart_inputs,
          {"transformer_blocks": _B(3, "BasicTransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("sana", "SanaTransformer2DModel", sana, sana_inputs,
          {"transformer_blocks": _B(3, "SanaTransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("hunyuan_dit", "HunyuanDiT2DModel", hunyuan_dit, hunyuan_dit_inputs,
          {"blocks": _B(4, "HunyuanDiTBlock", "hidden_first", (2, 4))},
          combined=("blocks", "blocks"), extra_ranges=(("blocks", (0, 2)),),
          xfail={"dit:blocks[0:2]": ("block 0's output feeds HunyuanDiT's long skip (skips.append(hidden_states), "
                                     "hunyuan_transformer_2d.py line 449) read by block 3 outside the range, and "
                                     "block 1's output continues the stream: two range outputs continue its one "
                                     "input, and a reuse step has no block-0 output to hand to block 3. A range "
                                     "may end on a skip source, not hold one before its last block unless it also "
                                     "holds the consumer ([0, 1), [1, 2), [1, 3), [2, 4), [0, 4) work)",
                                     ConfigError)}),
    Model("aura_flow", "AuraFlowTransformer2DModel", aura_flow, aura_flow_inputs,
          {"single_transformer_blocks": _B(3, "AuraFlowSingleTransformerBlock", "hidden_first", (1, 3)),
           "joint_transformer_blocks": _B(2, "AuraFlowJointTransformerBlock", "encoder_first", (1, 2))},
          combined=("single_transformer_blocks", "joint_transformer_blocks")),
    Model("cogview4", "CogView4Transformer2DModel", cogview4, cogview4_inputs,
          {"transformer_blocks": _B(3, "CogView4TransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("chroma", "ChromaTransformer2DModel", chroma, chroma_inputs,
          {"single_transformer_blocks": _B(3, "ChromaSingleTransformerBlock", "hidden_first", (1, 3)),
           "transformer_blocks": _B(2, "ChromaTransformerBlock", "encoder_first", (1, 2)),
           "distilled_guidance_layer.layers": _B(1, "PixArtAlphaTextProjection", cached=False)},
          combined=("single_transformer_blocks", "transformer_blocks")),
    Model("flux2", "Flux2Transformer2DModel", flux2, flux2_inputs,
          {"single_transformer_blocks": _B(3, "Flux2SingleTransformerBlock", "hidden_first", (1, 3)),
           "transformer_blocks": _B(2, "Flux2TransformerBlock", "encoder_first", (1, 2))},
          combined=("single_transformer_blocks", "transformer_blocks")),
    Model("lumina2", "Lumina2Transformer2DModel", lumina2, lumina2_inputs,
          {"layers": _B(3, "Lumina2TransformerBlock", "hidden_first", (1, 3)),
           "noise_refiner": _B(1, "Lumina2TransformerBlock", cached=False),
           "context_refiner": _B(1, "Lumina2TransformerBlock", cached=False)},
          combined=("layers", "layers"),
          export_exception=TypeError,
          export_error="export fails: data-dependent encoder_attention_mask.sum(dim=1).tolist() in "
                       "Lumina2RotaryPosEmbed.forward (transformer_lumina2.py line 273), then "
                       "len(set(seq_lengths)) hashes a SymInt in Lumina2Transformer2DModel.forward (line 519): "
                       "TypeError: unhashable type: non-nested SymInt"),
    Model("ltx_video", "LTXVideoTransformer3DModel", ltx_video, ltx_video_inputs,
          {"transformer_blocks": _B(3, "LTXVideoTransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("mochi", "MochiTransformer3DModel", mochi, mochi_inputs,
          {"transformer_blocks": _B(3, "MochiTransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
    Model("allegro", "AllegroTransformer3DModel", allegro, allegro_inputs,
          {"transformer_blocks": _B(3, "AllegroTransformerBlock", "hidden_first", (1, 3))},
          combined=("transformer_blocks", "transformer_blocks")),
]}
