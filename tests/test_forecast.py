"""Forecasting reuse: values extrapolated in timestep from the last refreshes.

Toy blocks add ``gain * t`` (or ``gain * t**2``): linear forecasting must then be
exact after two refreshes, taylor2 exact for the quadratic after three.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from npu_cache_fx import CacheAgent, CacheConfig, ConfigError, optimize
from npu_cache_fx.schedule import forecast_coefficients
from counting import fresh_dynamo
from toy import AttnDiT, ToyDiT, toy_inputs

N = 10
TS = [float(1000 - 100 * s) for s in range(N)]  # equally spaced: every coefficient is exact in binary


def test_coefficients_exact():
    assert forecast_coefficients(500.0, [600.0, 700.0], 2) == [2.0, -1.0]
    assert forecast_coefficients(400.0, [500.0, 700.0], 2) == [1.5, -0.5]
    assert forecast_coefficients(400.0, [500.0, 600.0, 700.0], 3) == [3.0, -3.0, 1.0]
    assert forecast_coefficients(400.0, [500.0], 3) == [1.0, 0.0, 0.0]          # too few refreshes: plain
    assert forecast_coefficients(400.0, [500.0, 500.0, 700.0], 3) == [1.5, -0.5, 0.0]  # repeated node skipped


def cfg(forecast, **kw):
    base = dict(steps_count=N, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=4,
                forecast=forecast)
    base.update(kw)
    return CacheConfig(**base)


def uncached(model):
    return [model(**toy_inputs(t))[0] for t in TS]


@pytest.mark.parametrize("forecast, power, exact_from", [("linear", 1, 4), ("taylor2", 2, 6)])
def test_forecast_exact_for_polynomial_blocks(forecast, power, exact_from):
    # refreshes at 1, 3, 5, 7, 9; reuse at 2, 4, 6, 8. Linear is exact once 2 refreshes exist (step 4),
    # taylor2 on t**2 once 3 exist (step 6).
    model = ToyDiT(single=5, time_power=power)
    want = uncached(model)
    opt = optimize(model, cfg(forecast))
    for _ in range(2):  # two generations: history resets
        got = [opt(**toy_inputs(t))[0] for t in TS]
        for s in range(N):
            if s >= exact_from or opt.plan.decision(s)[0].value != "read":
                assert torch.equal(got[s], want[s]), s
        assert not torch.equal(got[2], want[2])  # first reuse: only one refresh, plain reuse
    plain = optimize(model, cfg("none"))
    assert not torch.equal([plain(**toy_inputs(t))[0] for t in TS][exact_from], want[exact_from])


@pytest.mark.parametrize("forecast, power", [("linear", 1), ("taylor2", 2), ("taylor2", 1)])
def test_agent_parity(forecast, power):
    model = ToyDiT(single=5, time_power=power)
    opt = optimize(model, cfg(forecast))
    ref = ToyDiT(single=5, time_power=power)
    agent = CacheAgent(opt.configs[0])
    ref.agents = {"blocks": agent}
    for t in TS:
        agent.set_timestep(t)
        assert torch.equal(opt(**toy_inputs(t))[0], ref(**toy_inputs(t))[0])


def test_agent_requires_timestep():
    agent = CacheAgent(cfg("linear").resolved(5))
    ref = ToyDiT(single=5)
    ref.agents = {"blocks": agent}
    with pytest.raises(RuntimeError, match="set_timestep"):
        for t in TS[:3]:
            ref(**toy_inputs(t))


def test_attention_forecast_linear_exact():
    model = AttnDiT(4)
    want = [model(**toy_inputs(t))[0] for t in TS]
    opt = optimize(model, CacheConfig(method="attention_cache", steps_count=N, step_start=1, step_interval=2,
                                      forecast="linear"))
    got = [opt(**toy_inputs(t))[0] for t in TS]
    for s in range(4, N):
        assert torch.equal(got[s], want[s]), s


def test_forecast_cache_bytes_and_timestep_required():
    model = ToyDiT(single=5)
    opt = optimize(model, cfg("taylor2"))
    for t in TS[:4]:
        opt(**toy_inputs(t))
    assert opt.stats.cache_bytes == 3 * (1 * 4 * 2 * 4) + 3 * 4  # 3 deltas + 3 float32 coefficients
    with pytest.raises(ConfigError, match="needs a timestep input"):
        optimize(model, cfg("linear"), timestep_arg=None)
    with pytest.raises(ConfigError, match="forecast must be one of"):
        cfg("cubic")


def test_zero_recompiles_with_forecasting():
    backend = fresh_dynamo()
    model = ToyDiT(single=5)
    want = uncached(model)
    opt = torch.compile(optimize(model, cfg("linear")), backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            got = [opt(**toy_inputs(t))[0] for t in TS]
            assert all(torch.equal(got[s], want[s]) for s in range(4, N))
    assert len(backend.graphs) == 3 and not counters["graph_break"]
