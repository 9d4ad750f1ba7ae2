"""Tests for the shipped tiny reference models (npu_cache_fx.models)."""

import contextlib

import pytest
import torch

pytestmark = pytest.mark.slow  # real pipelines, trained models or searches: not in the quick tier

torch.set_num_threads(1)

import diffusers  # noqa: E402

from npu_cache_fx import metrics, models  # noqa: E402


@pytest.fixture(scope="module")
def flux():
    return models.load("tiny-flux")


@pytest.fixture(scope="module")
def wan():
    return models.load("tiny-wan")


class CountingWrapper:
    """Stands in for an optimized module: counts calls, records timesteps and the active cache context."""

    def __init__(self, transformer, with_context=True):
        self.transformer = transformer
        self.calls = []
        self.contexts = []
        self._active = None
        if with_context:
            self.cache_context = self._cache_context

    @contextlib.contextmanager
    def _cache_context(self, name):
        assert self._active is None, "cache contexts must not nest"
        self._active = name
        self.contexts.append(name)
        try:
            yield
        finally:
            self._active = None

    def __call__(self, **kwargs):
        assert kwargs.get("return_dict") is False
        self.calls.append((self._active, kwargs["timestep"].detach().clone(), kwargs["hidden_states"].shape))
        return self.transformer(**kwargs)


def test_list_models():
    assert models.list_models() == ["tiny-flux", "tiny-wan", "tiny-flux-deep"]
    with pytest.raises(KeyError):
        models.load("nope")


def test_loader_flux(flux):
    tr = flux.transformer
    assert type(tr) is diffusers.FluxTransformer2DModel
    assert len(tr.transformer_blocks) == 2 and len(tr.single_transformer_blocks) == 6
    assert not tr.training and flux.name == "tiny-flux" and flux.default_steps == 28
    assert 2_000_000 <= flux.num_parameters() <= 4_000_000
    assert tr.config.guidance_embeds is False and tr.config.in_channels == 4
    assert all(p.dtype == torch.float32 for p in tr.parameters())
    meta = flux.meta["training"]
    assert meta["seconds"] > 0 and meta["final_loss"] > 0 and meta["steps"] > 0


def test_loader_wan(wan):
    tr = wan.transformer
    assert type(tr) is diffusers.WanTransformer3DModel
    assert 2 <= len(tr.blocks) <= 4 and tuple(tr.config.patch_size) == (1, 2, 2)
    assert not tr.training and wan.name == "tiny-wan" and wan.default_steps == 20
    assert 1_000_000 <= wan.num_parameters() <= 3_000_000


def test_load_dtype():
    m = models.load("tiny-flux", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.transformer.parameters())
    out = m.sample([1, 7], steps=2)
    assert out.dtype == torch.float32 and out.shape == (2, 1, 16, 16)


def test_inputs_are_diffusers_kwargs(flux, wan):
    kw = flux.inputs(torch.tensor([3, 4]))
    assert set(kw) == {"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids",
                       "txt_ids", "guidance", "return_dict"}
    assert kw["hidden_states"].shape == (2, 64, 4) and kw["img_ids"].shape == (64, 3)
    assert kw["timestep"].shape == (2,) and float(kw["timestep"][0]) == 1.0
    with torch.no_grad():
        assert flux.transformer(**kw)[0].shape == (2, 64, 4)
    kw = wan.inputs([3], t=0.5)
    assert kw["hidden_states"].shape == (1, 4, 4, 8, 8) and float(kw["timestep"][0]) == 500.0
    assert set(kw) == {"hidden_states", "timestep", "encoder_hidden_states", "return_dict"}
    with torch.no_grad():
        assert wan.transformer(**kw)[0].shape == (1, 4, 4, 8, 8)


def test_pack_roundtrip(flux, wan):
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(flux.from_latents(flux.to_latents(x)), x)
    v = torch.randn(2, 4, 1, 16, 16)
    assert wan.to_latents(v).shape == (2, 4, 4, 8, 8)
    assert torch.equal(wan.from_latents(wan.to_latents(v)), v)


@pytest.fixture(scope="module")
def flux_eval(flux):
    labels = models.eval_labels(30)
    return labels, flux.sample(labels, seed=0)


@pytest.fixture(scope="module")
def wan_eval(wan):
    labels = models.eval_labels(100)
    return labels, wan.sample(labels, seed=0)


def test_flux_fidelity(flux_eval):
    labels, imgs = flux_eval
    assert imgs.shape == (30, 1, 16, 16) and imgs.min() >= -1 and imgs.max() <= 1
    assert metrics.class_fidelity(imgs, labels) >= 0.9


def test_wan_fidelity(wan_eval):
    labels, clips = wan_eval
    assert clips.shape == (100, 4, 1, 16, 16) and clips.min() >= -1 and clips.max() <= 1
    assert metrics.class_fidelity(clips, labels) >= 0.8
    # the clips move: consecutive frames differ noticeably
    assert (clips[:, 1:] - clips[:, :-1]).abs().mean() > 0.05


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_determinism(name, flux, wan):
    m = flux if name == "tiny-flux" else wan
    a = m.sample([0, 5, 9], steps=3, seed=7)
    b = m.sample([0, 5, 9], steps=3, seed=7)
    c = m.sample([0, 5, 9], steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_one_call_per_step_decreasing_timestep(name, flux, wan):
    m = flux if name == "tiny-flux" else wan
    w = CountingWrapper(m.transformer)
    out = m.sample([1, 2], steps=4, transformer=w)
    assert len(w.calls) == 4 and all(ctx is None for ctx, _, _ in w.calls)
    ts = [t for _, t, _ in w.calls]
    assert all(t.shape == (2,) for t in ts)
    assert all(float(a[0]) > float(b[0]) for a, b in zip(ts[:-1], ts[1:]))
    assert torch.equal(out, m.sample([1, 2], steps=4))  # the wrapper is really what was used


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-wan"])
def test_cfg_two_sequential_calls_with_cache_context(name, flux, wan):
    m = flux if name == "tiny-flux" else wan
    w = CountingWrapper(m.transformer)
    out = m.sample([3, 4], steps=3, cfg_scale=2.0, transformer=w)
    assert len(w.calls) == 6
    assert [ctx for ctx, _, _ in w.calls] == ["cond", "uncond"] * 3
    assert w.contexts == ["cond", "uncond"] * 3
    assert all(shape[0] == 2 for _, _, shape in w.calls)  # sequential, not batched
    # without cache_context the CFG path still works and gives the same result
    w2 = CountingWrapper(m.transformer, with_context=False)
    assert torch.equal(out, m.sample([3, 4], steps=3, cfg_scale=2.0, transformer=w2))
    assert len(w2.calls) == 6
    # cfg_scale = 1 equals the conditional prediction
    a = m.sample([3, 4], steps=3, cfg_scale=1.0)
    b = m.sample([3, 4], steps=3)
    assert torch.allclose(a, b, atol=1e-5)


def test_custom_timesteps_and_fewer_steps(flux):
    w = CountingWrapper(flux.transformer)
    flux.sample([0], timesteps=[1.0, 0.6, 0.3], transformer=w)
    assert [round(float(t[0]), 4) for _, t, _ in w.calls] == [1.0, 0.6, 0.3]
    with pytest.raises(ValueError):
        flux.sample([0], timesteps=[0.5, 0.9])
    assert torch.equal(flux.fewer_steps([2], 5, seed=1), flux.sample([2], steps=5, seed=1))
    lat = flux.sample([2], steps=2, return_latents=True)
    assert lat.shape == (1, 64, 4)


def test_flow_timesteps():
    t = models.flow_timesteps(4)
    assert torch.allclose(t, torch.tensor([1.0, 0.75, 0.5, 0.25]))
    ts = models.flow_timesteps(4, shift=3.0)
    assert float(ts[0]) == 1.0 and bool((ts[1:] < ts[:-1]).all()) and bool((ts >= t).all())


def test_eval_labels():
    assert models.eval_labels(12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_training_loss_t_dist():
    """``training_loss(t_dist=...)``: logit-normal is the default (the shipped weights' recipe), uniform the option."""
    m = models.build("tiny-flux", seed=0)
    x = torch.zeros(2, 1, 16, 16)
    y = torch.tensor([1, 2])
    a = m.training_loss(x, y, torch.Generator().manual_seed(0))
    b = m.training_loss(x, y, torch.Generator().manual_seed(0), t_dist="logit-normal")
    c = m.training_loss(x, y, torch.Generator().manual_seed(0), t_dist="uniform")
    assert torch.equal(a, b) and not torch.equal(a, c) and bool(torch.isfinite(c))
    with pytest.raises(ValueError):
        m.training_loss(x, y, torch.Generator().manual_seed(0), t_dist="beta")
