"""optimize() on tiny random diffusers Flux and Wan: compute steps bit-identical, reuse == CacheAgent."""

import contextlib

import pytest
import torch

pytest.importorskip("diffusers")

from npu_cache_fx import CacheAgent, CacheConfig, optimize  # noqa: E402
from npu_cache_fx.capture import find_block_lists  # noqa: E402
from npu_cache_fx.schedule import Action  # noqa: E402
from dit_models import flux_inputs, tiny_flux, tiny_wan, wan_inputs  # noqa: E402
from hooks import agent_on_blocks  # noqa: E402

STEPS = 10
TS = [1.0 - s / STEPS for s in range(STEPS)]


def check_loop(model, cfgs, make_inputs, order):
    opt = optimize(model, cfgs)
    agents = [CacheAgent(c, output_order=order) for c in opt.configs]
    reuse_seen = 0
    with torch.no_grad():
        for s, t in enumerate(TS):
            inputs = make_inputs(t, seed=s)
            got = opt(**inputs)[0]
            plain = model(**inputs)[0]
            with contextlib.ExitStack() as st:
                for c, a in zip(opt.configs, agents):
                    st.enter_context(agent_on_blocks(model.get_submodule(c.blocks), a))
                by_hand = model(**inputs)[0]
            if any(a is Action.READ for a in opt.plan.decision(s)):
                reuse_seen += 1
                torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-5)
                assert not torch.equal(got, plain)
            else:
                assert torch.equal(got, plain), f"step {s}: compute step differs from the original model"
                assert torch.equal(by_hand, plain)
    assert reuse_seen == len(opt.plan.reuse_steps()) > 0
    return opt


@pytest.fixture(scope="session")
def flux():
    return tiny_flux()


def test_flux_block_lists_detected(flux):
    names = [b.fqn for b in find_block_lists(flux)]
    assert set(names) == {"transformer_blocks", "single_transformer_blocks"}


def test_flux_double_and_single_blocks(flux):
    cfgs = [CacheConfig(steps_count=STEPS, step_start=2, step_interval=2, blocks="transformer_blocks",
                        block_start=1, block_end=2),
            CacheConfig(steps_count=STEPS, step_start=2, step_interval=3, step_end=8,
                        blocks="single_transformer_blocks", block_start=0, block_end=3)]
    opt = check_loop(flux, cfgs, flux_inputs, "encoder_first")
    assert opt.stats.captures == 1


def test_flux_single_blocks_only(flux):
    cfg = CacheConfig(steps_count=STEPS, step_start=1, step_interval=2, blocks="single_transformer_blocks",
                      block_start=1)
    check_loop(flux, cfg, flux_inputs, "encoder_first")


def test_wan():
    model = tiny_wan()
    assert find_block_lists(model)[0].fqn == "blocks"
    cfg = CacheConfig(steps_count=STEPS, step_start=1, step_interval=2, block_start=1, block_end=3)
    check_loop(model, cfg, wan_inputs, "hidden_first")


def test_flux_return_dict_output_type(flux):
    cfg = CacheConfig(steps_count=STEPS, step_start=1, step_interval=2, blocks="single_transformer_blocks")
    opt = optimize(flux, cfg)
    inputs = dict(flux_inputs(1.0), return_dict=True)
    out = opt(**inputs)
    assert type(out).__name__ == "Transformer2DModelOutput"
    assert torch.equal(out.sample, flux(**inputs).sample)
    assert opt.config is flux.config and opt.dtype == flux.dtype
