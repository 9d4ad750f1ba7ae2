"""AdaStep: the decision rule on synthetic sequences, through optimize(), composed and compiled."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from npu_cache_fx import CacheConfig, ConfigError, optimize
from npu_cache_fx.timestep import AdaStepRule, fewer_steps_for
from counting import fresh_dynamo
from toy import ToyDiT

GAINS = [2.0 ** i for i in range(8)]


def decisions(ds, **kw):
    rule = AdaStepRule(**{"threshold": 0.1, "max_skip_steps": 1, "decay": 1.0, "steps_count": len(ds), **kw})
    return [rule.decide(d) for d in ds], rule


def test_rule_exact_threshold_boundary():
    # t=3: |(d3 + d1)/2 - d2| = |(1.25 + 1)/2 - 1| = 0.125 <= 1 * thr  <=> thr >= 0.125
    ds = [None, 1.0, 1.0, 1.25, 5.0, 5.0]
    assert decisions(ds, threshold=0.125)[0] == [False, False, False, True, False, False]
    assert decisions(ds, threshold=0.124)[0] == [False] * 6


def test_rule_decay_per_evaluation():
    # thr 0.25 decays x0.5 per evaluation: 0.125 at t=3 (skip); 0.0625 at t=4: |1.375 - 1.25| > 1.25 * 0.0625
    ds = [None, 1.0, 1.0, 1.25, 1.75, 1.75, 1.75]
    got, rule = decisions(ds, threshold=0.25, decay=0.5, max_skip_steps=2)
    assert got == [False, False, False, True, False, False, False]
    assert rule.evaluations == 3 and rule.threshold == 0.25 * 0.5 ** 3


def test_rule_max_consecutive_skips_and_last_step():
    ds = [None] + [1.0] * 9
    assert decisions(ds, max_skip_steps=1)[0] == [False] * 3 + [True, False, True, False, True, False, False]
    assert decisions(ds, max_skip_steps=2)[0] == [False] * 3 + [True, True, False, True, True, False, False]
    assert decisions(ds, max_skip_steps=0)[0] == [False] * 10


def test_rule_vote_is_recorded():
    rule = AdaStepRule(0.1, 1, 1.0, 8)
    got = [rule.decide(d, vote=lambda s: False) for d in [None] + [1.0] * 7]
    assert not any(got) and rule.skips == got


def test_config_validation():
    with pytest.raises(ConfigError, match="decay must be in"):
        CacheConfig(method="adastep", steps_count=10, decay=1.5)
    with pytest.raises(ConfigError, match="threshold=0.1 only applies to method='adastep'"):
        CacheConfig(steps_count=10, threshold=0.1)
    cfg = CacheConfig(method="adastep", steps_count=10).resolved()
    assert (cfg.threshold, cfg.max_skip_steps, cfg.decay) == (0.015, 4, 0.99)
    with pytest.raises(ConfigError, match="at most one"):
        optimize(ToyDiT(single=2), [cfg, cfg])


def test_fewer_steps_for():
    assert fewer_steps_for(2.0, 28) == 14 and fewer_steps_for(1.5, 28) == 19


# ----------------------------------------------------------------------------- through optimize()
LATENTS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # d_t = 1 everywhere: skips at 3 and 5 (max 1)
TS = [float(800 - 100 * s) for s in range(8)]


def inputs(s, scale=1.0, latents=LATENTS):
    return dict(hidden_states=torch.full((1, 4, 2), latents[s] * scale),
                encoder_hidden_states=torch.zeros(1, 4, 2), timestep=torch.tensor([TS[s]]))


def plain(s, scale=1.0, n=3):
    return LATENTS[s] * scale + sum(GAINS[:n]) * TS[s]


def run(opt, scale=1.0, latents=LATENTS):
    return [opt(**inputs(s, scale, latents))[0][0, 0, 0].item() for s in range(8)]


def test_skips_return_previous_output_and_reset_per_generation():
    model = ToyDiT(single=3)
    opt = optimize(model, CacheConfig(method="adastep", steps_count=8, threshold=0.1, max_skip_steps=1, decay=1.0))
    want = [plain(s) for s in range(8)]
    want[3], want[5] = want[2], want[4]
    assert run(opt) == want
    assert run(opt) == want  # second generation: state reset (MindIE keeps it)
    assert opt.stats.steps_skipped == 4 and opt.stats.steps == 16


def test_cfg_contexts_decide_independently():
    opt = optimize(ToyDiT(single=3), CacheConfig(method="adastep", steps_count=8, threshold=0.1,
                                                   max_skip_steps=1, decay=1.0))
    cond, uncond = [], []
    for s in range(8):
        with opt.cache_context("cond"):
            cond.append(opt(**inputs(s))[0][0, 0, 0].item())
        with opt.cache_context("uncond"):
            # exponential latents: d doubles, never within threshold
            x = dict(inputs(s), hidden_states=torch.full((1, 4, 2), float(2 ** s)))
            uncond.append(opt(**x)[0][0, 0, 0].item())
    assert cond[3] == cond[2] and cond[5] == cond[4]
    assert uncond == [2 ** s + sum(GAINS[:3]) * TS[s] for s in range(8)]


def test_composed_with_dit_cache_refresh_moves_past_a_skip():
    # dit refreshes at 1, 3, 5 (interval 2); AdaStep skips 3 -> the refresh happens at 4 instead of reading
    model = ToyDiT(single=3)
    cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=3),
            CacheConfig(method="adastep", steps_count=8, threshold=0.1, max_skip_steps=1, decay=1.0)]
    opt = optimize(model, cfgs)
    xs = [0.0, 1.0, 2.0, 3.0, 5.0, 9.0, 17.0, 33.0]  # d = 1, 1, 1, 2, 4, 8, 16: only step 3 is skipped
    got = run(opt, latents=xs)
    full = lambda s: xs[s] + sum(GAINS[:3]) * TS[s]  # noqa: E731
    cached = lambda s, r: xs[s] + GAINS[0] * TS[s] + (GAINS[1] + GAINS[2]) * TS[r]  # noqa: E731
    # 3 (a refresh) is skipped; 4, planned as a read, refreshes instead; 5 refreshes; 6 reads 5's delta
    want = [full(0), full(1), cached(2, 1), cached(2, 1), full(4), full(5), cached(6, 5), full(7)]
    assert got == want
    assert opt.stats.steps_skipped == 1 and opt.stats.stale_reads_avoided == 0


def test_zero_recompiles_two_generations_with_adastep():
    backend = fresh_dynamo()
    cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=3),
            CacheConfig(method="adastep", steps_count=8, threshold=0.1, max_skip_steps=1, decay=1.0)]
    opt = torch.compile(optimize(ToyDiT(single=3), cfgs), backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = run(opt), run(opt)
    assert first == second == run(optimize(ToyDiT(single=3), cfgs))  # == the uncompiled module
    assert len(backend.graphs) == 3 and not counters["graph_break"]  # plain, write, read
