"""Tests for tiny-flux-deep (Flux-dev topology on procedural scenes) and its scene generator / checker."""

import json

import pytest
import torch

torch.set_num_threads(1)

import diffusers  # noqa: E402
from diffusers.models.transformers.transformer_flux import (  # noqa: E402
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from npu_cache_fx import models  # noqa: E402
from npu_cache_fx.models import scenes  # noqa: E402


@pytest.fixture(scope="module")
def deep():
    return models.load("tiny-flux-deep")


def test_registered():
    assert "tiny-flux-deep" in models.list_models() and "tiny-flux-deep" in models.MODEL_NAMES
    assert models.DEFAULT_STEPS["tiny-flux-deep"] == 28


def test_flux_dev_topology(deep):
    tr = deep.transformer
    assert type(tr) is diffusers.FluxTransformer2DModel
    assert len(tr.transformer_blocks) == 19 and len(tr.single_transformer_blocks) == 38
    assert all(type(b) is FluxTransformerBlock for b in tr.transformer_blocks)
    assert all(type(b) is FluxSingleTransformerBlock for b in tr.single_transformer_blocks)
    cfg = tr.config
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim  # rotary layout like Flux-dev (16+56+56 = 128)
    assert cfg.guidance_embeds is False and cfg.in_channels == 12
    assert not tr.training and deep.name == "tiny-flux-deep" and deep.default_steps == 28
    assert deep.default_shift == 3.16 == models.DEFAULT_SHIFT["tiny-flux-deep"]  # samples like Flux-dev
    assert all(p.dtype == torch.float32 for p in tr.parameters())
    assert 4_000_000 <= deep.num_parameters() <= 8_000_000


def test_weights_size():
    st, _ = models.tiny.weights_paths("tiny-flux-deep")
    assert st.stat().st_size <= 25e6
    assert (models.WEIGHTS_DIR / scenes.CHECKER_FILE).exists()


def test_card_figures(deep):
    """The card carries the figures issue 21 asks for (their values are discussed in docs/models.md)."""
    _, js = models.tiny.weights_paths("tiny-flux-deep")
    meta = json.loads(js.read_text())
    assert meta == deep.meta
    card = meta["card"]
    assert card["n"] >= 200 and card["cfg_scale"] is None
    for key in ("psnr_14_vs_28", "psnr_6_vs_28"):
        assert isinstance(card[key], float) and card[key] > 0
    assert card["psnr_6_vs_28"] < card["psnr_14_vs_28"]  # fewer steps, further from 28
    for steps in (28, 14, 6):
        agreement = card[f"agreement_{steps}"]
        assert set(agreement) == {"all", *scenes.ATTRIBUTES} and all(0 <= v <= 1 for v in agreement.values())
    # the checker itself reads real scenes correctly, so its verdict on samples is about the model
    assert card["agreement_training_scenes"]["all"] >= 0.97
    assert meta["checker"]["holdout_agreement"]["all"] >= 0.97
    training = meta["training"]
    assert training["steps"] > 0 and training["threads"] == 1
    assert 0 < training["total_seconds"] <= 45 * 60  # reproducible within the CPU budget


def test_sample_shape_and_determinism(deep):
    a = deep.sample([0, 77, 127], steps=2, seed=7)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, deep.sample([0, 77, 127], steps=2, seed=7))
    assert not torch.equal(a, deep.sample([0, 77, 127], steps=2, seed=8))


def test_inputs_and_cfg(deep):
    kw = deep.inputs(torch.tensor([3, 100]))
    assert kw["hidden_states"].shape == (2, 64, 12) and kw["encoder_hidden_states"].shape == (2, 4, 64)
    assert kw["pooled_projections"].shape == (2, 64) and kw["txt_ids"].shape == (4, 3)
    # the empty caption is a real label (CFG's unconditional branch), distinct from every caption
    ehs_null, _ = deep.conditioner(torch.tensor([scenes.NULL_LABEL]))
    ehs_0, _ = deep.conditioner(torch.tensor([0]))
    assert not torch.equal(ehs_null, ehs_0)
    out = deep.sample([5], steps=1, cfg_scale=2.0)
    assert out.shape == (1, 3, 16, 16)


def test_pack_roundtrip(deep):
    x = torch.randn(2, 3, 16, 16)
    assert deep.to_latents(x).shape == (2, 64, 12)
    assert torch.equal(deep.from_latents(deep.to_latents(x)), x)


def test_labels_roundtrip():
    labels = torch.arange(scenes.NUM_LABELS)
    attrs = scenes.decode(labels)
    assert attrs.shape == (128, 4) and torch.equal(scenes.encode(*attrs.unbind(1)), labels)
    for i, size in enumerate(scenes.ATTRIBUTE_SIZES):
        assert set(attrs[:, i].tolist()) == set(range(size))
    with pytest.raises(ValueError):
        scenes.decode(torch.tensor([128]))
    ev = models.eval_labels(16, "tiny-flux-deep")
    assert len(set(ev.tolist())) == 16 and torch.equal(ev, scenes.eval_labels(16))
    assert models.eval_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # digit models unchanged
    assert scenes.caption(0) == "red square, top-left, light grain"
    assert scenes.caption(scenes.NUM_LABELS - 1) == "yellow cross, bottom-right, heavy grain"


def test_scenes_deterministic_and_checker_reads_them():
    labels = scenes.eval_labels(64)
    a = scenes.scenes_for(labels, seed=3)
    assert a.shape == (64, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, scenes.scenes_for(labels, seed=3))
    assert scenes.attribute_agreement(a, labels)["all"] >= 0.95
    # wrong captions are rejected: shift every shape by one, flip every grain
    attrs = scenes.decode(labels)
    attrs[:, 0] = (attrs[:, 0] + 1) % 4
    attrs[:, 3] = 1 - attrs[:, 3]
    wrong = scenes.attribute_agreement(a, scenes.encode(*attrs.unbind(1)))
    assert wrong["shape"] < 0.1 and wrong["grain"] < 0.1


def test_checker_reads_averaged_grain_as_light():
    """Heavy grain shrunk towards its local mean (what a coarse sampler's last large step returns) reads as
    light grain, so the grain attribute is the one that too few steps get wrong."""
    attrs = scenes.decode(scenes.eval_labels(256))
    heavy = attrs[attrs[:, 3] == 1]
    labels = scenes.encode(*heavy.unbind(1))
    x = scenes.scenes_for(labels, seed=2)
    smooth = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert scenes.attribute_agreement(x, labels)["grain"] >= 0.95
    assert scenes.attribute_agreement(smooth + 0.3 * (x - smooth), labels)["grain"] < 0.5


def test_default_shift_of_older_weights():
    """A json without ``default_shift`` (weights from before it existed) keeps linear flow times."""
    meta = models.tiny.default_meta("tiny-flux-deep")
    assert meta["default_shift"] == models.DEFAULT_SHIFT["tiny-flux-deep"] == 3.16
    del meta["default_shift"]
    assert models.build("tiny-flux-deep", meta=meta).default_shift == 1.0
    assert models.build("tiny-flux").default_shift == 1.0
