"""Attention cache: the pass (FileCheck + numerics), exact step semantics, parity with CacheAgent,
combined plans and the cache-memory budget."""

import logging

import pytest
import torch
import torch.fx as fx
from torch.testing import FileCheck

from npu_cache_fx import CacheAgent, CacheConfig, ConfigError, optimize
from npu_cache_fx.capture import attention_sites, capture
from npu_cache_fx.ops import SlotStore
from npu_cache_fx.passes import attention_cache_pass
from npu_cache_fx.schedule import Action
from hooks import agent_on_attention
from toy import AttnDiT, QKVDiT, toy_inputs


def fresh(cap):
    graph = fx.Graph()
    graph.output(graph.graph_copy(cap.gm.graph, {}))
    return fx.GraphModule(cap.gm, graph)


@pytest.fixture(scope="session")
def qkv():
    model = QKVDiT(n=3, dim=8)
    inputs = dict(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([0.5]))
    return model, inputs, capture(model, inputs, ["blocks"])


def test_read_variant_drops_attention_and_qkv_of_cached_blocks_only(qkv):
    model, inputs, cap = qkv
    sites = attention_sites(cap, model, "blocks", 0, 2)
    assert [s.fqn for s in sites] == ["blocks.0.attn", "blocks.1.attn"]
    gm = attention_cache_pass(fresh(cap), sites, "read", "a").graph_module
    code = gm.code
    FileCheck().check_count("aten.scaled_dot_product_attention.default(", 1, exactly=True).run(code)  # block 2 only
    FileCheck().check_count("npu_cache_fx.cache_read", 2, exactly=True).run(code)
    for i in (0, 1):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            FileCheck().check_not(f"blocks_{i}_attn_{proj}").run(code)
        FileCheck().check_not(f"blocks_{i}_norm1").run(code)  # the norm only fed attention
        FileCheck().check(f"blocks_{i}_ff").run(code)
    FileCheck().check("blocks_2_attn_to_q").run(code)
    # numerics: feeding the true attention outputs reproduces the model exactly
    store = SlotStore()
    outs = {}
    hooks = [model.blocks[i].attn.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o))
             for i in range(2)]
    want = model(**inputs)[0]
    for h in hooks:
        h.remove()
    store.tensors.update({f"a.blocks.{i}.attn.0": outs[i] for i in range(2)})
    with store.active():
        got = gm(inputs["hidden_states"], inputs["timestep"])[0]
    torch.testing.assert_close(got, want)


def test_write_variant_one_write_per_cached_block(qkv):
    model, inputs, cap = qkv
    sites = attention_sites(cap, model, "blocks", 1, 3)
    gm = attention_cache_pass(fresh(cap), sites, "write", "a").graph_module
    FileCheck().check_count("npu_cache_fx.cache_write", 2, exactly=True).run(gm.code)
    FileCheck().check_count("aten.scaled_dot_product_attention.default(", 3, exactly=True).run(gm.code)
    with SlotStore().active() as store:
        got = gm(inputs["hidden_states"], inputs["timestep"])[0]
    torch.testing.assert_close(got, model(**inputs)[0])
    assert set(store.tensors) == {"a.blocks.1.attn.0", "a.blocks.2.attn.0"}


# ----------------------------------------------------------------------------- exact semantics
GAINS = [2.0 ** i for i in range(8)]


def expected_attention(x, ts, plan, blocks, n=4):
    """Each block adds gain*t_attn + t; t_attn is the last stored step's t on a reuse step."""
    out, stored = [], None
    for s, t in enumerate(ts):
        if plan[s] == "W":
            stored = t
        ta = [stored if plan[s] == "R" and i in blocks else t for i in range(n)]
        out.append(x + sum(g * u for g, u in zip(GAINS, ta)) + n * t)
    return out


@pytest.mark.parametrize("kw, plan, blocks", [
    (dict(step_start=2, step_interval=3, step_end=7), "CCWRRWRRCC", range(4)),
    (dict(step_start=0, step_interval=2, block_start=1, block_end=3), "WRWRWRWRWR", range(1, 3)),
    (dict(step_start=2, step_interval=1), "C" * 10, range(0)),          # bypass
    (dict(step_start=4, step_end=4, step_interval=2), "C" * 10, range(0)),  # bypass
])
def test_attention_steps_exact_two_generations(kw, plan, blocks):
    cfg = CacheConfig(method="attention_cache", steps_count=10, **kw)
    opt = optimize(AttnDiT(4), cfg)
    ts = [float(100 * (10 - s)) for s in range(10)]
    x = toy_inputs(0)["hidden_states"]
    for _ in range(2):
        got = [opt(**toy_inputs(t))[0] for t in ts]
        for g, w in zip(got, expected_attention(x, ts, plan, blocks)):
            assert torch.equal(g, w)
    if "R" in plan:
        assert opt.stats.attention_calls_skipped == 2 * plan.count("R") * len(blocks)


# ----------------------------------------------------------------------------- diffusers parity
def parity(model, make_inputs, cfg, name="attn", steps=8):
    opt = optimize(model, cfg)
    rc = opt.configs[0]
    agent = CacheAgent(rc)
    reuse = 0
    with torch.no_grad():
        for s in range(steps):
            inputs = make_inputs(1.0 - s / steps, seed=s)
            got = opt(**inputs)[0]
            with agent_on_attention(model.get_submodule(rc.blocks), agent, name):
                want = model(**inputs)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if opt.plan.decision(s)[0] is Action.READ:
                reuse += 1
                assert not torch.equal(got, model(**inputs)[0])
            else:
                assert torch.equal(got, model(**inputs)[0])
    assert reuse > 0
    return opt


def test_flux_joint_attention_matches_agent():
    from dit_models import flux_inputs, tiny_flux
    cfg = CacheConfig(method="attention_cache", steps_count=8, step_start=1, step_interval=3,
                      blocks="transformer_blocks", block_start=1)
    opt = parity(tiny_flux(layers=3, single=1), flux_inputs, cfg)
    gm = opt.variant_graphs[(Action.READ,)]
    # joint attention returns (hidden, encoder): both outputs cached, 2 blocks -> 4 slots
    assert len(gm.meta["cache_slots"]) == 4
    FileCheck().check_count("aten.scaled_dot_product_attention.default(", 2, exactly=True).run(gm.code)  # block 0 + single


def test_wan_self_attention_matches_agent():
    from dit_models import tiny_wan, wan_inputs
    cfg = CacheConfig(method="attention_cache", steps_count=8, step_start=1, step_interval=2, block_end=3)
    opt = parity(tiny_wan(layers=4), wan_inputs, cfg, name="attn1")
    gm = opt.variant_graphs[(Action.READ,)]
    # attn1 of blocks 0-2 gone; attn2 (cross) of all 4 and attn1 of block 3 remain
    FileCheck().check_count("aten.scaled_dot_product_attention.default(", 5, exactly=True).run(gm.code)


def test_wan_cross_attention_by_name():
    from dit_models import tiny_wan, wan_inputs
    cfg = CacheConfig(method="attention_cache", steps_count=8, step_start=1, step_interval=2, attention="attn2")
    parity(tiny_wan(layers=2), wan_inputs, cfg, name="attn2")
    with pytest.raises(ConfigError, match="has no submodule 'attn9'"):
        optimize(tiny_wan(layers=2), cfg.replace(attention="attn9"))(**wan_inputs(1.0))


# ----------------------------------------------------------------------------- combined plans
def test_combined_block_and_attention_plan_20_steps():
    from dit_models import flux_inputs, tiny_flux
    model = tiny_flux(layers=3, single=4)
    cfgs = [CacheConfig(steps_count=20, step_start=4, step_interval=2, blocks="transformer_blocks",
                        block_start=0, block_end=2),
            CacheConfig(steps_count=20, step_start=3, step_interval=3, blocks="single_transformer_blocks"),
            CacheConfig(method="attention_cache", steps_count=20, step_start=2, step_interval=2,
                        blocks="transformer_blocks", block_start=2)]
    opt = optimize(model, cfgs)
    text = str(opt.plan)
    assert "attn[transformer_blocks:2:3]" in text and f"{len(opt.plan.variants())} variant(s)" in text
    with torch.no_grad():
        outs = [opt(**flux_inputs(1.0 - s / 20, seed=s))[0] for s in range(20)]
    assert all(torch.isfinite(o).all() for o in outs)
    assert len(opt.variant_graphs) == len(opt.plan.variants())
    assert opt.stats.steps == 20 and opt.stats.stale_reads_avoided == 0
    assert set(opt.stats.cache_bytes_by_config) == {c.label for c in opt.configs}


def test_attention_inside_a_skipped_range_is_rejected():
    with pytest.raises(ConfigError, match="overlap"):
        optimize(AttnDiT(4), [CacheConfig(steps_count=10, step_interval=2, blocks="blocks", block_end=3),
                              CacheConfig(method="attention_cache", steps_count=10, step_interval=2,
                                          blocks="blocks", block_start=2)])


# ----------------------------------------------------------------------------- memory
def test_max_cache_bytes_honoured_and_logged(caplog):
    model = QKVDiT(n=4, dim=8)
    per_block = 1 * 4 * 8 * 4  # one (1, 4, 8) float32 attention output
    cfg = CacheConfig(method="attention_cache", steps_count=6, step_interval=2, max_cache_bytes=2 * per_block + 5)
    opt = optimize(model, cfg)
    with caplog.at_level(logging.WARNING):
        with torch.no_grad():
            for s in range(6):
                opt(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([1.0 - s / 6]))
    assert opt.stats.cache_bytes == 2 * per_block <= cfg.max_cache_bytes
    assert "fits 2 of 4 attention calls" in caplog.text
    full = optimize(model, cfg.replace(max_cache_bytes=None))
    full(hidden_states=torch.randn(1, 4, 8), timestep=torch.tensor([1.0]))
    assert full.stats.cache_bytes == 4 * per_block
