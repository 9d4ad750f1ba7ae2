"""optimize() on toy DiTs with exactly predictable values."""

import logging

import pytest
import torch
from torch import nn

from npu_cache_fx import CacheAgent, CacheConfig, ConfigError, optimize
from npu_cache_fx.schedule import Action, make_plan
from toy import ToyDiT, toy_inputs

TS = [900.0, 800.0, 700.0, 600.0, 500.0]
GAINS = [2.0 ** i for i in range(8)]


def closed_form(x, ts, rng, plan, n=7):
    out, last = [], None
    for s, t in enumerate(ts):
        if plan[s] == "W":
            last = t
        tt = [last if plan[s] == "R" and i in rng else t for i in range(n)]
        out.append(x + sum(g * u for g, u in zip(GAINS, tt)))
    return out


def ref_cfg(**kw):
    base = dict(steps_count=5, step_start=1, step_interval=2, block_start=2, block_end=6, blocks="blocks")
    base.update(kw)
    return CacheConfig(**base)


def run(model, ts, seed=0, **kw):
    return [model(**toy_inputs(t, seed=seed, **kw))[0] for t in ts]


def test_reference_trace_two_generations_exact():
    model = ToyDiT(single=7)
    opt = optimize(model, ref_cfg())
    x = toy_inputs(0)["hidden_states"]
    for _ in range(2):
        got = run(opt, TS)
        for g, w in zip(got, closed_form(x, TS, range(2, 6), "CWRWR")):
            assert torch.equal(g, w)
    assert opt.stats.steps == 10 and opt.stats.steps_reused == 4 and opt.stats.blocks_skipped == 16
    assert opt.stats.captures == 1 and opt.stats.variants_built == 3


def test_compute_steps_bit_identical_to_original():
    model = ToyDiT(single=7)
    opt = optimize(model, ref_cfg())
    for s, t in enumerate(TS):
        inputs = toy_inputs(t, seed=s)
        got = opt(**inputs)[0]
        if opt.plan.decision(s)[0] is not Action.READ:
            assert torch.equal(got, model(**inputs)[0])


def test_flux_like_two_block_lists_match_cache_agent():
    # Dual blocks return (encoder, hidden); joint blocks cat/split the streams.
    model = ToyDiT(dual=3, joint=4)
    cfgs = [CacheConfig(steps_count=6, step_start=1, step_interval=2, blocks="transformer_blocks",
                        block_start=1, block_end=3),
            CacheConfig(steps_count=6, step_start=2, step_interval=3, blocks="single_transformer_blocks",
                        block_start=0, block_end=3)]
    opt = optimize(model, cfgs)
    ref = ToyDiT(dual=3, joint=4)
    ref.load_state_dict(model.state_dict())
    ref.agents = {"transformer_blocks": CacheAgent(cfgs[0].resolved(3), output_order="encoder_first"),
                  "single_transformer_blocks": CacheAgent(cfgs[1].resolved(4), output_order="encoder_first")}
    ts = [float(1000 - 100 * s) for s in range(6)]
    for s, t in enumerate(ts):
        assert torch.equal(opt(**toy_inputs(t, seed=s))[0], ref(**toy_inputs(t, seed=s))[0]), s
    assert len(opt.plan.variants()) == len(opt.variant_graphs)


def test_warmup_generation_with_fewer_steps_then_full():
    opt = optimize(ToyDiT(single=7), ref_cfg())
    run(opt, [900.0, 800.0])                     # warm-up: 2 steps only
    x = toy_inputs(0)["hidden_states"]
    got = run(opt, TS)                           # timestep rises: new generation
    assert all(torch.equal(g, w) for g, w in zip(got, closed_form(x, TS, range(2, 6), "CWRWR")))
    assert opt.stats.generations == 2


def test_sequential_cfg_contexts():
    opt = optimize(ToyDiT(single=7), ref_cfg())
    cond, uncond = [], []
    for t in TS:
        with opt.cache_context("cond"):
            cond.append(opt(**toy_inputs(t, seed=0))[0])
        with opt.cache_context("uncond"):
            uncond.append(opt(**toy_inputs(t, seed=1))[0])
    for seed, outs in ((0, cond), (1, uncond)):
        x = toy_inputs(0, seed=seed)["hidden_states"]
        assert all(torch.equal(g, w) for g, w in zip(outs, closed_form(x, TS, range(2, 6), "CWRWR")))
    assert set(opt.stats.cache_bytes_by_context) == {"cond", "uncond"}
    assert opt.stats.variants_built == 3  # contexts share variants


@pytest.mark.parametrize("shapes", ["dynamic", "static"])
@pytest.mark.parametrize("change", [dict(tokens=6), dict(batch=2)])
def test_shape_or_batch_change_mid_generation_recomputes(change, shapes):
    opt = optimize(ToyDiT(single=7), ref_cfg(), backend_options={"shapes": shapes})
    run(opt, TS[:2])                                  # step 1 wrote a (1, 4, 2) delta
    got = opt(**toy_inputs(TS[2], **change))[0]       # step 2 would reuse: other shape -> compute
    x = toy_inputs(0, **change)["hidden_states"]
    assert torch.equal(got, x + sum(g * TS[2] for g in GAINS[:7]))
    assert opt.stats.stale_reads_avoided == 1
    # another token count: served by the dynamic capture (its own buffers); a batch of 2 (1 was specialised):
    # captured again
    dynamic = "tokens" in change and shapes == "dynamic"
    assert (opt.stats.captures, opt.stats.shapes_reused) == ((1, 1) if dynamic else (2, 0))


def test_reset_and_wrap_invalidate_cache():
    opt = optimize(ToyDiT(single=7), ref_cfg(), timestep_arg=None)
    run(opt, TS[:2])
    opt.reset()
    x = toy_inputs(0)["hidden_states"]
    got = run(opt, TS)
    assert all(torch.equal(g, w) for g, w in zip(got, closed_form(x, TS, range(2, 6), "CWRWR")))


def test_call_forms_return_dict_and_passthrough():
    model = ToyDiT(single=7)
    opt = optimize(model, ref_cfg())
    inputs = toy_inputs(900.0)
    out = opt(inputs["hidden_states"], inputs["encoder_hidden_states"], timestep=inputs["timestep"],
              return_dict=True)
    assert isinstance(out, dict) and torch.equal(out["sample"], model(**inputs)[0])
    assert opt.proj_out is model.proj_out and opt.calls == model.calls
    assert "ToyDiT" in repr(opt) and "variants=3" in repr(opt)


def test_bypass_runs_the_model_itself():
    model = ToyDiT(single=7)
    opt = optimize(model, ref_cfg(step_interval=1))
    run(opt, TS)
    assert model.calls == 5 and opt.stats.captures == 0


def test_cache_bytes_exact():
    opt = optimize(ToyDiT(single=7), ref_cfg())
    run(opt, TS[:2])
    assert opt.stats.cache_bytes == 1 * 4 * 2 * 4  # one (1, 4, 2) float32 delta


def test_config_errors():
    with pytest.raises(ConfigError, match="overlap"):
        optimize(ToyDiT(single=7), [ref_cfg(block_start=0, block_end=3), ref_cfg(block_start=2, block_end=5)])
    with pytest.raises(ConfigError, match="blocks='nope' is not a ModuleList"):
        optimize(ToyDiT(single=7), ref_cfg(blocks="nope"))
    with pytest.raises(ConfigError, match="block_end must be <= blocks_count \\(7\\), got 8"):
        optimize(ToyDiT(single=7), ref_cfg(block_end=8))

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

        def forward(self, x):
            return x

    with pytest.raises(ConfigError, match=r"no block list found in NoBlocks \(ModuleLists: \['heads'\]\)"):
        optimize(NoBlocks(), CacheConfig(steps_count=4))


def test_same_timestep_twice_warns(caplog):
    opt = optimize(ToyDiT(single=7), ref_cfg())
    with caplog.at_level(logging.WARNING):
        run(opt, [900.0, 900.0])
    assert "cache_context" in caplog.text


def test_extra_call_with_other_inputs_in_a_step_is_not_a_step():
    # SD3's skip-layer guidance pattern: after the step's call, a call at the same timestep with other
    # inputs (batch 2 here). It follows the step's decision with a cache of its own.
    opt = optimize(ToyDiT(single=7), ref_cfg())
    x, x2 = toy_inputs(0)["hidden_states"], toy_inputs(0, batch=2, seed=1)["hidden_states"]
    for _ in range(2):
        for s, t in enumerate(TS):
            main = opt(**toy_inputs(t))[0]
            assert torch.equal(main, closed_form(x, TS, range(2, 6), "CWRWR")[s])
            if s >= 1:  # no extra call at step 0: the extra call's first write is at step 1, its read at 2
                extra = opt(**toy_inputs(t, batch=2, seed=1))[0]
                assert torch.equal(extra, closed_form(x2, TS, range(2, 6), "CWRWR")[s]), s
    assert (opt.stats.steps, opt.stats.auxiliary_calls, opt.stats.generations) == (10, 8, 2)
    assert opt.stats.steps_reused == 4


def test_extra_call_reads_only_what_it_wrote():
    # the extra call first appears at a reuse step: nothing of its own is cached, so it computes
    opt = optimize(ToyDiT(single=7), ref_cfg())
    opt(**toy_inputs(TS[0]))
    opt(**toy_inputs(TS[1]))
    opt(**toy_inputs(TS[2]))  # step 2: READ
    extra = opt(**toy_inputs(TS[2], batch=2, seed=1))[0]
    x2 = toy_inputs(0, batch=2, seed=1)["hidden_states"]
    assert torch.equal(extra, x2 + sum(g * TS[2] for g in GAINS[:7]))
    assert opt.stats.stale_reads_avoided == 1 and opt.stats.auxiliary_calls == 1


def test_capture_cache_shared_between_plans():
    from npu_cache_fx.runtime import CaptureCache
    model = ToyDiT(single=7)
    cache = CaptureCache(model)
    first = optimize(model, ref_cfg(), captures=cache)
    run(first, TS)
    second = optimize(model, ref_cfg(block_start=0, block_end=3), captures=cache)
    x = toy_inputs(0)["hidden_states"]
    got = run(second, TS)
    assert all(torch.equal(g, w) for g, w in zip(got, closed_form(x, TS, range(0, 3), "CWRWR")))
    assert (first.stats.captures, second.stats.captures, len(cache)) == (1, 0, 1)
    with pytest.raises(ValueError, match="another model"):
        optimize(ToyDiT(single=7), ref_cfg(), captures=cache)


def test_longer_generation_than_steps_count_warns(caplog):
    opt = optimize(ToyDiT(single=7), ref_cfg())
    with caplog.at_level(logging.WARNING):
        run(opt, [float(900 - 100 * s) for s in range(7)])  # 7 steps, steps_count=5
    assert "past the 5 steps planned" in caplog.text and "set_steps" in caplog.text


def test_context_num_inference_steps_scales_the_plan():
    """cache_context(num_inference_steps=n) (WanPipeline passes it) makes that generation's plan the
    configs scaled to n steps; the next context without it is back to steps_count."""
    opt = optimize(ToyDiT(single=7), ref_cfg())
    with opt.cache_context("cond", step_index=0, sigma=1.0, num_inference_steps=8):
        opt(**toy_inputs(900.0))
    assert opt._contexts["cond"].plan is opt.plan_for(8) and opt.stats.plan_steps == 8
    assert opt.plan_for(8).decisions == make_plan([c.scaled(8) for c in opt.configs]).decisions
    opt(**toy_inputs(900.0))
    assert opt._contexts["default"].plan is opt.plan and opt.stats.plan_steps == 5
    with pytest.raises(ConfigError, match=r"num_inference_steps=\.\.\.\): the step count must be an int >= 1"):
        with opt.cache_context("cond", num_inference_steps=0):
            pass

def test_new_generation_clears_what_another_signature_wrote():
    """An auxiliary call (same timestep, other inputs) writes with its own signature in generation 1;
    generation 2 makes the same call only at a READ step: it must compute, not read generation 1's value."""
    model = ToyDiT(single=7)
    opt = optimize(model, ref_cfg())  # C W R W R
    aux = dict(batch=2, seed=7)
    for gen in range(2):
        for s, t in enumerate(TS):
            opt(**toy_inputs(t))
            if (gen, s) == (0, 1):  # generation 1, a WRITE step: the other signature writes too
                opt(**toy_inputs(t, **aux))
            if (gen, s) == (1, 2):  # generation 2, a READ step: nothing of this generation to read
                got = opt(**toy_inputs(t, **aux))[0]
                assert torch.equal(got, model(**toy_inputs(t, **aux))[0])
    assert opt.stats.stale_reads_avoided == 1 and opt.stats.auxiliary_calls == 2


def test_one_step_warm_up_then_a_generation():
    """A 1-step warm-up run, then a generation whose timestep rises above it: a new generation at step 0."""
    opt, fresh = optimize(ToyDiT(single=7), ref_cfg()), optimize(ToyDiT(single=7), ref_cfg())
    opt(**toy_inputs(TS[-1]))  # warm-up: one call at the last timestep
    got, want = run(opt, TS), run(fresh, TS)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert opt.stats.generations == 2 and opt.stats.steps_reused == fresh.stats.steps_reused == 2


def test_reset_of_a_context_never_used_is_a_no_op():
    opt = optimize(ToyDiT(single=7), ref_cfg())
    opt.reset("never-used")  # used to build a _Context without its plan: TypeError
    run(opt, TS[:2])
    opt.reset("default")
    assert opt._contexts["default"].step == 0
