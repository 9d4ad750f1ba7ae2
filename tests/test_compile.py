"""Graph-clean compilation: one compiled graph per variant, 0 recompiles, 0 graph breaks.

Both user flows: (a) ``optimize(model, cfg, backend=B)`` and (b)
``torch.compile(optimize(model, cfg), backend=B)``, over two 16-step
generations with sequential CFG (two cache contexts): every variant of the plans below
appears by step 9 (the same variants as over 50 steps), and the second generation
compiles nothing.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")

from npu_cache_fx import CacheConfig, optimize  # noqa: E402
from npu_cache_fx.shapes import size_hint  # noqa: E402
from counting import MutationBackend, fresh_dynamo  # noqa: E402
from dit_models import flux_inputs, generate_cfg, tiny_flux, tiny_wan, wan_inputs  # noqa: E402

STEPS = 16
FULL = {"graphs": "full"}  # one graph per variant (the default for callables is regional: test_regions.py)
# graph replay (inductor's reduce-overhead, torchair) captures static shapes: the variants CUDA graph trees see
REPLAY = {**FULL, "shapes": "static"}


def configs(model_name):
    if model_name == "flux":
        return [CacheConfig(steps_count=STEPS, step_start=5, step_interval=3, blocks="transformer_blocks"),
                CacheConfig(steps_count=STEPS, step_start=8, step_interval=3, step_end=12,
                            blocks="single_transformer_blocks", block_start=1)]
    return [CacheConfig(steps_count=STEPS, step_start=5, step_interval=2, step_end=13, block_start=1)]


def models():
    return {"flux": (tiny_flux(layers=1, single=2), flux_inputs), "wan": (tiny_wan(layers=2), wan_inputs)}


def generate(opt, make_inputs, buffers_seen=None):
    """Two generations, cond + uncond call per step; returns the cond outputs of generation 1. ``buffers_seen``:
    (context, slot) -> the data pointers its cache buffer had after each step."""
    def record():
        inner = getattr(opt, "_orig_mod", opt)
        for name, ctx in inner._contexts.items():
            for bufs in ctx.buffers.values():
                for slot, buf in bufs.items():
                    buffers_seen.setdefault((name, slot), set()).add(buf.data_ptr())
    return generate_cfg(opt, make_inputs, STEPS, after_step=record if buffers_seen is not None else None)[:STEPS]


@pytest.fixture(scope="session")
def eager_reference():
    out = {}
    for name, (model, make_inputs) in models().items():
        opt = optimize(model, configs(name))
        out[name] = (model, make_inputs, generate(opt, make_inputs), len(opt.plan.variants()))
    return out


@pytest.mark.parametrize("name", ["flux", "wan"])
@pytest.mark.parametrize("flow", ["optimize_backend", "user_compile"])
def test_zero_recompiles_one_graph_per_variant(eager_reference, name, flow):
    model, make_inputs, reference, n_variants = eager_reference[name]
    backend = fresh_dynamo()
    if flow == "optimize_backend":  # full graphs: regional compilation is tested in test_regions.py
        opt = optimize(model, configs(name), backend=backend, backend_options=FULL)
    else:
        opt = torch.compile(optimize(model, configs(name)), backend=backend)
    buffers_seen = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = generate(opt, make_inputs, buffers_seen)
    assert len(backend.graphs) == n_variants          # one compiled graph per variant
    assert not counters["graph_break"], dict(counters["graph_break"])
    # optimize(backend=B) hands a dynamic capture's graphs to the backend directly (symbolic sizes, no Dynamo)
    assert counters["stats"]["unique_graphs"] == (0 if flow == "optimize_backend" else n_variants)
    for got, want in zip(outs, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # static cache buffers: one address per (context, slot) across 200 calls
    assert buffers_seen and all(len(ptrs) == 1 for ptrs in buffers_seen.values())
    assert {ctx for ctx, _ in buffers_seen} == {"cond", "uncond"}


@pytest.mark.parametrize("graphs", ["regional", "full"])
def test_torch_compile_over_a_module_that_compiles_its_variants(eager_reference, graphs):
    """``torch.compile(optimize(model, plan, backend=B))``: the variants are compiled by ``optimize`` already, so
    the enclosing compile has nothing to add. Before: Dynamo traced the regional program's binding code and
    ``LazyCompile``'s first call, recompiling frame after frame up to its limit ("hit config.recompile_limit"),
    and ``error_on_recompile`` raised. Now the compiled programs are opaque to it: it compiles nothing."""
    model, make_inputs, reference, n_variants = eager_reference["flux"]
    outer = fresh_dynamo()
    opt = optimize(model, configs("flux"), backend="aot_eager", backend_options={"graphs": graphs})
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs = generate(torch.compile(opt, backend=outer), make_inputs)
    assert not outer.graphs and not counters["graph_break"], dict(counters["graph_break"])
    assert opt.stats.graph_mode == graphs and opt.stats.graphs_compiled >= n_variants
    for got, want in zip(outs, reference):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flow", ["optimize_backend", "user_compile"])
def test_cache_writes_mutate_static_inputs_only(eager_reference, flow):
    """CUDA graph trees skip a graph that mutates a non-static input ("skipping cudagraphs due to mutated
    inputs"): every cache buffer a write variant copies into must be a static input of its graph."""
    model, make_inputs, _, n_variants = eager_reference["flux"]
    fresh_dynamo()
    backend = MutationBackend()
    opt = optimize(model, configs("flux"), backend=backend, backend_options=REPLAY) if flow == "optimize_backend" \
        else torch.compile(
        optimize(model, configs("flux")), backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(opt, make_inputs)
    assert len(backend.graphs) == n_variants
    mutating = [(mutated, static, names) for mutated, static, names in backend.graphs if mutated]
    assert mutating, "no variant writes the cache"
    for mutated, static, names in mutating:
        assert mutated <= static, f"non-static mutated inputs: {[names[i] for i in sorted(mutated - static)]}"


def test_static_cache_buffers_option(eager_reference):
    """``static_cache_buffers=False`` (torchair's default) leaves the buffers plain inputs; bad values are refused."""
    from npu_cache_fx.config import ConfigError
    from npu_cache_fx.runtime import static_cache_buffers
    assert static_cache_buffers("inductor", {}) and static_cache_buffers(None, {})
    assert not static_cache_buffers("torchair", {})
    assert static_cache_buffers("torchair", {"static_cache_buffers": True})
    model, make_inputs, _, n_variants = eager_reference["flux"]
    with pytest.raises(ConfigError, match=r"static_cache_buffers.*'yes'"):
        optimize(model, configs("flux"), backend="aot_eager", backend_options={"static_cache_buffers": "yes"})
    fresh_dynamo()
    backend = MutationBackend()
    opt = optimize(model, configs("flux"), backend=backend, backend_options={"static_cache_buffers": False, **REPLAY})
    generate(opt, make_inputs)
    assert len(backend.graphs) == n_variants
    assert all(not hasattr(buf, "_dynamo_static_input_type")
               for ctx in opt._contexts.values() for bufs in ctx.buffers.values() for buf in bufs.values())
    assert any(mutated and not mutated <= static for mutated, static, _ in backend.graphs)


def test_fullgraph_variant_compiles_alone():
    model = tiny_wan(layers=2)
    opt = optimize(model, configs("wan"))
    gm = opt.build_variant(opt.plan.decision(6), **wan_inputs(0.5))  # a reuse step
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    inputs = list(wan_inputs(0.5).values())
    buf = torch.randn([size_hint(s) for s in gm.meta["cache_slots"][0][1]])  # SymInts: a dynamic capture
    torch.testing.assert_close(compiled(*inputs, buf)[0], gm(*inputs, buf)[0])
