"""The torchair path without an NPU: every variant handed to torchair is GE-convertible.

torchair is an AOTAutograd backend; ``trace_like_torchair`` reproduces its trace
(keep_inference_input_mutations, its near-empty decomposition table, view->reshape)
and the op list comes from the torch_npu wheel's converter sources.
"""

import copy
import functools

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")

from npu_cache_fx import CacheConfig, optimize  # noqa: E402
from npu_cache_fx.backends import (BackendUnavailable, compile_graph, ge_ready_blocks,  # noqa: E402
                                   prepare_for_torchair)
from npu_cache_fx.opcheck import aten_ops, trace_like_torchair, unsupported_torchair_ops  # noqa: E402
from dit_models import flux_inputs, tiny_flux, tiny_wan, wan_inputs  # noqa: E402

HOST_SYNC_OPS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.nonzero.default"}


def variants(name):
    if name == "flux":
        model, make = tiny_flux(layers=1, single=2), flux_inputs
        cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="transformer_blocks"),
                CacheConfig(steps_count=8, step_start=2, step_interval=2, blocks="single_transformer_blocks")]
    else:
        model, make = tiny_wan(layers=2), wan_inputs
        cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, block_start=1)]
    opt = optimize(model, cfgs)  # static shapes, as torchair compiles them (shape_mode)
    inputs = make(0.5)
    for decision in opt.plan.variants():
        gm = opt.build_variant(decision, **inputs)
        leaves = [v for v in inputs.values()]
        bufs = [torch.randn(shape, dtype=dtype) for _, shape, dtype, _ in gm.meta["cache_slots"]]
        yield decision, gm, leaves + bufs


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_every_variant_is_ge_convertible_after_preparation(name):
    seen = 0
    for decision, gm, example in variants(name):
        before = unsupported_torchair_ops(copy.deepcopy(gm), example)
        assert set(before) <= {"aten._scaled_dot_product_flash_attention_for_cpu.default"}, before
        want = gm(*example)
        prepared = prepare_for_torchair(gm, {"mode": "max-autotune"})
        assert unsupported_torchair_ops(prepared, example) == {}, decision
        torch.testing.assert_close(prepared(*example), want, rtol=1e-5, atol=1e-5)
        traced = trace_like_torchair(prepared, example)
        ops = aten_ops(traced)
        assert not HOST_SYNC_OPS & set(ops)          # aclgraph: no host sync inside a variant
        n_slots = len(gm.meta["cache_slots"])
        writes = sum(1 for n in prepared.graph.nodes if n.target is torch.ops.aten.copy_.default
                     and n.args[0].op == "placeholder" and n.args[0].name.startswith("cache_"))
        assert ops.get("aten.copy_.default", 0) == writes  # cache writes stay in-place (GE Assign)
        assert writes <= n_slots
        seen += 1
    assert seen >= 3


def test_aclgraph_mode_keeps_sdpa():
    _, gm, example = next(iter(variants("wan")))
    prepare_for_torchair(gm, {"mode": "reduce-overhead"})
    assert any("scaled_dot_product" in str(n.target) for n in gm.graph.nodes)


def test_torchair_unavailable_says_what_to_install():
    model = tiny_wan(layers=2)
    with pytest.raises(BackendUnavailable, match=r"pip install 'npu_cache_fx\[ascend\]'.*CANN"):
        optimize(model, CacheConfig(steps_count=8, step_interval=2), backend="torchair")
    with pytest.raises(BackendUnavailable):
        compile_graph(torch.fx.symbolic_trace(torch.nn.Identity()), "torchair")
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize(model, CacheConfig(steps_count=8, step_interval=2), backend="tensorrt-llm")


def unexportable(model):
    """``model`` (in place) with a data-dependent branch in forward: torch.export fails, the Dynamo path runs."""
    base = type(model)

    class Unexportable(base):
        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            if kwargs["timestep"].tolist()[0] > 1e6:  # never true; export cannot know that
                raise ValueError("timestep out of range")
            return super().forward(*args, **kwargs)

    model.__class__ = Unexportable
    return model


def test_dynamo_path_hands_torchair_ge_convertible_block_graphs():
    # backend="torchair" on a model export cannot capture: every block graph torchair receives is the
    # torchair-like aten trace after prepare_for_torchair (an NPU-less stand-in records what it gets)
    received, raw = [], []

    def fake_torchair(gm, example_inputs):
        received.append((gm, list(example_inputs)))
        return gm.forward

    def spy(gm, example_inputs):  # the Dynamo graph as it comes, to show the rewrite mattered
        raw.append((copy.deepcopy(gm), list(example_inputs)))
        return ge_ready_blocks(fake_torchair, {"mode": "max-autotune"})(gm, example_inputs)

    cfgs = [CacheConfig(steps_count=4, step_start=1, step_interval=2, blocks="transformer_blocks"),
            CacheConfig(steps_count=4, step_start=1, step_interval=2, blocks="single_transformer_blocks")]
    torch._dynamo.reset()
    model = unexportable(tiny_flux(layers=1, single=2))
    opt, ref = optimize(model, cfgs, backend=spy), optimize(model, cfgs)
    with torch.no_grad():
        for s in range(4):
            got, want = opt(**flux_inputs(1.0 - s / 4))[0], ref(**flux_inputs(1.0 - s / 4))[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (opt.stats.path, ref.stats.path) == ("dynamo", "eager") and opt.stats.steps_reused == 1
    assert len(received) == len(raw) >= 2  # a double and a single block graph at least
    sdpa = "aten._scaled_dot_product_flash_attention_for_cpu.default"
    assert any(sdpa in unsupported_torchair_ops(gm, ex) for gm, ex in raw)
    for gm, example in received:
        assert unsupported_torchair_ops(gm, example) == {}, gm.code
