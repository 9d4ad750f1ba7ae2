"""CacheAgent: exact values with blocks that add ``gain * t``; MindIE 3.1.0's defects, fixed."""

import pytest
import torch

from npu_cache_fx import CacheAgent, CacheConfig, ConfigError
from npu_cache_fx.compat import mindie as mindie_compat

GAINS = [2.0 ** i for i in range(8)]
MINDIE = mindie_compat.load()
needs_mindie = pytest.mark.skipif(MINDIE is None, reason="mindiesd==3.1.0 wheel not installed "
                                  "(pip install --no-deps mindiesd==3.1.0)")


def block(i):
    return lambda hidden_states, temb: hidden_states + GAINS[i] * temb


def dual_block(i):
    # (encoder, hidden) like diffusers' Flux double block; both streams have equal shapes.
    return lambda hidden_states, encoder_hidden_states, temb: (encoder_hidden_states + 16 * GAINS[i] * temb,
                                                               hidden_states + GAINS[i] * temb)


def run(agent, n_blocks, timesteps, x=None, dual=False, set_t=False):
    outs = []
    for t in timesteps:
        if set_t:
            agent.set_timestep(t)
        h = torch.full((1, 3), 1.0) if x is None else x.clone()
        e = torch.full((1, 3), 100.0)
        temb = torch.tensor(float(t))
        for i in range(n_blocks):
            if dual:
                e, h = agent.apply(dual_block(i), hidden_states=h, encoder_hidden_states=e, temb=temb)
            else:
                h = agent.apply(block(i), hidden_states=h, temb=temb)
        outs.append((h, e) if dual else h)
    return outs


def expected(x, ts, n_blocks, rng, plan, gains=GAINS):
    """Closed form: blocks in ``rng`` on a reuse step add what they added at the refresh step."""
    out, last = [], None
    for s, t in enumerate(ts):
        tt = [t] * n_blocks
        if plan[s] == "R":
            tt = [last if i in rng else t for i in range(n_blocks)]
        elif plan[s] == "W":
            last = t
        out.append(x + sum(g * u for g, u in zip(gains, tt)))
    return out


def cfg(**kw):
    base = dict(method="dit_block_cache", blocks_count=7, steps_count=5, step_start=1, step_interval=2,
                block_start=2, block_end=6)
    base.update(kw)
    return CacheConfig(**base)


TS = [900.0, 800.0, 700.0, 600.0, 500.0]


def test_reference_trace_exact():
    got = run(CacheAgent(cfg()), 7, TS)
    want = expected(1.0, TS, 7, range(2, 6), "CWRWR")
    assert [o[0, 0].item() for o in got] == want


@needs_mindie
def test_reference_trace_matches_mindie():
    m = MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 5, 1, 2, 10000, 2, 6))
    ours = run(CacheAgent(cfg()), 7, TS * 2)  # two generations: the counter wraps
    theirs = run(m, 7, TS * 2)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def test_step_end_honoured():
    ts = [float(1000 - 100 * s) for s in range(8)]
    got = run(CacheAgent(cfg(steps_count=8, step_start=1, step_end=3)), 7, ts)
    assert [o[0, 0].item() for o in got] == expected(1.0, ts, 7, range(2, 6), "CWRWCCCC")
    if MINDIE is not None:  # MindIE defect 1: it reuses at steps 4 and 6 anyway
        theirs = run(MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 8, 1, 2, 3, 2, 6)), 7, ts)
        assert not torch.equal(theirs[4], got[4])


def test_one_block_range_caches_delta():
    got = run(CacheAgent(cfg(block_start=3, block_end=4)), 7, TS)
    assert [o[0, 0].item() for o in got] == expected(1.0, TS, 7, range(3, 4), "CWRWR")
    if MINDIE is not None:  # MindIE defect 2: returns input + old input
        theirs = run(MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 5, 1, 2, 10000, 3, 4)), 7, TS)
        assert not torch.equal(theirs[2], got[2])


def test_default_block_end_works_for_dit_cache():
    agent = CacheAgent(CacheConfig(method="dit_block_cache", blocks_count=7, steps_count=5, step_start=1,
                                   step_interval=2))
    got = run(agent, 7, TS)
    assert [o[0, 0].item() for o in got] == expected(1.0, TS, 7, range(0, 7), "CWRWR")
    if MINDIE is not None:  # MindIE defect 3
        with pytest.raises(MINDIE.ConfigError):
            MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 5, 1, 2))


def test_warmup_with_fewer_steps_then_full_generation():
    # MindIE defect 4: after a 2-step warm-up its counter stays 2 steps off forever.
    agent = CacheAgent(cfg())
    run(agent, 7, [900.0, 800.0], set_t=True)       # warm-up
    got = run(agent, 7, TS, set_t=True)              # timestep rises -> new generation
    assert [o[0, 0].item() for o in got] == expected(1.0, TS, 7, range(2, 6), "CWRWR")
    agent2 = CacheAgent(cfg())
    run(agent2, 7, [900.0, 800.0])
    agent2.reset()
    assert [o[0, 0].item() for o in run(agent2, 7, TS)] == expected(1.0, TS, 7, range(2, 6), "CWRWR")
    if MINDIE is not None:
        m = MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 5, 1, 2, 10000, 2, 6))
        run(m, 7, [900.0, 800.0])
        assert [o[0, 0].item() for o in run(m, 7, TS)] != expected(1.0, TS, 7, range(2, 6), "CWRWR")


def test_encoder_first_blocks_paired_right():
    # MindIE defect 5: diffusers Flux blocks return (encoder, hidden); equal shapes hide the swap.
    agent = CacheAgent(cfg(), output_order="encoder_first")
    got = run(agent, 7, TS, dual=True)
    hid = expected(1.0, TS, 7, range(2, 6), "CWRWR")
    enc = expected(100.0, TS, 7, range(2, 6), "CWRWR", gains=[16 * g for g in GAINS])
    assert [h[0, 0].item() for h, _ in got] == hid
    assert [e[0, 0].item() for _, e in got] == enc
    if MINDIE is not None:
        theirs = run(MINDIE.CacheAgent(MINDIE.CacheConfig("dit_block_cache", 7, 5, 1, 2, 10000, 2, 6)), 7, TS,
                     dual=True)
        assert theirs[2][0][0, 0].item() != hid[2]


def test_sequential_cfg_contexts():
    # MindIE defect 6: two calls per step need two agents; one agent with two contexts here.
    agent = CacheAgent(cfg())
    cond, uncond = [], []
    for t in TS:
        with agent.cache_context("cond"):
            cond += run(agent, 7, [t], x=torch.full((1, 3), 1.0))
        with agent.cache_context("uncond"):
            uncond += run(agent, 7, [t], x=torch.full((1, 3), -1.0))
    assert [o[0, 0].item() for o in cond] == expected(1.0, TS, 7, range(2, 6), "CWRWR")
    assert [o[0, 0].item() for o in uncond] == expected(-1.0, TS, 7, range(2, 6), "CWRWR")


def test_two_generations_and_shape_change_never_stale():
    agent = CacheAgent(cfg())
    first = run(agent, 7, TS)
    second = run(agent, 7, TS)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # A shape change on a reuse step computes instead of adding a delta of another shape.
    agent.reset()
    run(agent, 7, TS[:2])
    (got,) = run(agent, 7, TS[2:3], x=torch.ones(2, 3))
    assert torch.equal(got, torch.ones(2, 3) + sum(g * TS[2] for g in GAINS[:7]))


def test_bypass_calls_through():
    agent = CacheAgent(cfg(step_interval=1))
    got = run(agent, 7, TS)
    assert [o[0, 0].item() for o in got] == expected(1.0, TS, 7, range(0), "CCCCC")


def test_invalid():
    with pytest.raises(ConfigError, match="blocks_count is required"):
        CacheAgent(CacheConfig(steps_count=3))
    with pytest.raises(ConfigError, match="output_order"):
        CacheAgent(cfg(), output_order="sideways")
    with pytest.raises(ValueError, match="hidden_states="):
        CacheAgent(cfg(step_start=0)).apply(block(0), torch.ones(1), temb=torch.tensor(1.0))


# ----------------------------------------------------------------------------- attention cache
def run_attention(agent, n_blocks, timesteps):
    outs = []
    for t in timesteps:
        h = torch.zeros(1)
        for i in range(n_blocks):
            h = h + agent.apply(lambda x, i=i: x * GAINS[i], torch.tensor([float(t)]))
        outs.append(h.item())
    return outs


ATS = [float(10 * (10 - s)) for s in range(10)]


def test_attention_cache_exact_and_block_range():
    c = CacheConfig(method="attention_cache", blocks_count=4, steps_count=10, step_start=2, step_interval=3,
                    step_end=7, block_start=1, block_end=3)
    got = run_attention(CacheAgent(c), 4, ATS)
    plan = "CCWRRWRRCC"
    want, last = [], None
    for s, t in enumerate(ATS):
        if plan[s] == "W":
            last = t
        tt = [last if plan[s] == "R" and i in (1, 2) else t for i in range(4)]
        want.append(sum(g * u for g, u in zip(GAINS, tt)))
    assert got == want


@needs_mindie
def test_attention_cache_matches_mindie_on_full_range():
    c = CacheConfig(method="attention_cache", blocks_count=4, steps_count=10, step_start=2, step_interval=3,
                    step_end=7)
    m = MINDIE.CacheAgent(MINDIE.CacheConfig("attention_cache", 4, 10, 2, 3, 7))
    assert run_attention(CacheAgent(c), 4, ATS * 2) == run_attention(m, 4, ATS * 2)
