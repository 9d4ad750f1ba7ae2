"""Tiny random diffusers pipelines assembled offline: no hub, no downloaded tokenizer or weights.

Tokenizers are built in memory from a handful of words (a CLIP BPE with
whole-word merges, a T5/UMT5 unigram); text encoders, VAEs and transformers
are random-init from tiny configs. Used by tests/test_pipelines.py, tests/test_pipeline_cli.py
(saved with ``save_pretrained``) and the ``--tiny`` path of examples/.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

WORDS = ("a photo of an astronaut riding horse cat dog red blue car tree sky house on the in with and "
         "bad blurry low quality ugly sunset over mountains lake city night").split()
TEXT_DIM = 32  # CLIP hidden size == T5 d_model == the transformers' text/pooled dims


def clip_tokenizer(max_length: int = 16):
    """A real ``CLIPTokenizer`` over WORDS (whole-word BPE merges; other words split into letters)."""
    from transformers import CLIPTokenizer
    vocab: Dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: List[Tuple[str, str]] = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merge = (left, right)
            left = left + right
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(left, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer():
    """A real ``T5TokenizerFast`` (unigram) over WORDS; UMT5 (Wan) uses the same class."""
    from transformers import T5TokenizerFast
    vocab: List[Tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def clip_text_model(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, projection_dim=TEXT_DIM, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(cfg).eval()


def t5_encoder(vocab_size: int, umt5: bool = False):
    torch.manual_seed(0)
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel
        return UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                           eos_token_id=1, decoder_start_token_id=0)).eval()
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def flux_transformer(guidance_embeds: bool = True, layers: int = 2, single: int = 4):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                  pooled_projection_dim=TEXT_DIM, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 6, 6)).eval()


def flux_pipeline(guidance_embeds: bool = True):
    """``FluxPipeline``: 1 latent channel, VAE scale factor 1 (a 32x32 image is 32x32 latents, 16x16 tokens)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip_text_model(len(tok)),
                        tokenizer=tok, text_encoder_2=t5_encoder(len(tok2)), tokenizer_2=tok2,
                        transformer=flux_transformer(guidance_embeds))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_transformer(layers: int = 4, seed: int = 0):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=32, num_layers=layers,
                                 rope_max_seq_len=32).eval()


def wan_pipeline(boundary_ratio: float = None):
    """``WanPipeline`` (text-to-video) with a tiny UMT5 and ``AutoencoderKLWan`` (4 latent channels).

    ``boundary_ratio``: Wan 2.2's two experts, ``transformer`` for timesteps at or above
    ``boundary_ratio * 1000`` and ``transformer_2`` (other weights) below."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    tok = t5_tokenizer()
    transformer = wan_transformer()
    experts = {}
    if boundary_ratio is not None:
        experts = dict(transformer_2=wan_transformer(seed=1), boundary_ratio=boundary_ratio)
    pipe = WanPipeline(tokenizer=tok, text_encoder=t5_encoder(len(tok), umt5=True), vae=vae,
                       transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def clip_text_model_with_projection(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=32, projection_dim=TEXT_DIM, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg).eval()


def sd3_pipeline():
    """``StableDiffusion3Pipeline``: batched CFG (cond and uncond in one transformer call of batch 2)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16,
                                        joint_attention_dim=TEXT_DIM, pooled_projection_dim=2 * TEXT_DIM,
                                        out_channels=4).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    tok, tok3 = clip_tokenizer(), t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=transformer,
        text_encoder=clip_text_model_with_projection(len(tok)), tokenizer=tok,
        text_encoder_2=clip_text_model_with_projection(len(tok)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(len(tok3)), tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def qwen2_tokenizer():
    """A real ``Qwen2Tokenizer`` (byte-level BPE over the 256 byte symbols, no merges) with Qwen's chat tokens."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {"<|endoftext|>": 0}
    for symbol in bytes_to_unicode().values():
        vocab.setdefault(symbol, len(vocab))
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def qwen_image_pipeline():
    """``QwenImagePipeline`` with a tiny Qwen2.5-VL text encoder (true CFG: cond and uncond in two calls)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tok = qwen2_tokenizer()
    n = len(tok)
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                rope_theta=1000000.0, vocab_size=n, bos_token_id=0, eos_token_id=0)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16,
                                                                num_heads=2, out_hidden_size=16),
                           hidden_size=16, vocab_size=n, bos_token_id=0, eos_token_id=0,
                           vision_start_token_id=n, vision_end_token_id=n + 1, vision_token_id=n + 2,
                           image_token_id=n + 3, video_token_id=n + 4)
    pipe = QwenImagePipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                             text_encoder=Qwen2_5_VLForConditionalGeneration(cfg).eval(), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe
