"""Regional compilation (npu_cache_fx.regions, issue #19): variants share the compiled code of their blocks.

Quick tier: the partition itself (every node in one segment, blocks of one class one structural key, the
program equal to the variant graph). Slow tier: a counting backend over two generations with two cache
contexts (2 x 50 steps): the same outputs as the full-graph variants, each distinct segment compiled exactly once, no
recompiles and no graph breaks, and the stats per variant and per shape.
"""

import pytest
import torch
from torch._dynamo.utils import counters

pytest.importorskip("diffusers")

from npu_cache_fx import CacheConfig, optimize  # noqa: E402
from npu_cache_fx.backends import graph_mode  # noqa: E402
from npu_cache_fx.config import ConfigError  # noqa: E402
from npu_cache_fx.regions import (GLUE, WRITES, RegionalProgram, SegmentCache, _free_views, _labels, _size_arithmetic,  # noqa: E402
                                  partition)
from npu_cache_fx.schedule import Action  # noqa: E402
from npu_cache_fx.shapes import size_hint  # noqa: E402
from counting import fresh_dynamo, scalar_inductor  # noqa: E402
from dit_models import flux_inputs, generate_cfg, tiny_flux, tiny_wan, wan_inputs  # noqa: E402

STEPS = 50  # two generations of 50 steps in two contexts: 0 recompiles (issue #19)
FLUX_CFGS = [CacheConfig(steps_count=STEPS, step_start=3, step_interval=3, blocks="transformer_blocks"),
             CacheConfig(steps_count=STEPS, step_start=4, step_interval=2, step_end=10,
                         blocks="single_transformer_blocks", block_start=1, forecast="linear")]
WAN_CFGS = [CacheConfig(method="attention_cache", steps_count=STEPS, step_start=2, step_interval=3)]


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(layers=2, single=4)


def _variants(opt, make_inputs):
    kwargs = make_inputs(0.5)
    return {d: opt.build_variant(d, **kwargs) for d in opt.plan.variants()}, kwargs


def test_partition_groups_blocks_and_keeps_the_graph(flux):
    """Every call_function node in exactly one segment; blocks of one class share a key; glue a rewrite
    inserts inside a block's span leaves the block whole; the program returns the variant's outputs."""
    opt = optimize(flux, FLUX_CFGS)
    variants, kwargs = _variants(opt, flux_inputs)
    cap = next(iter(opt._entries.values())).capture
    leaves = [v for v in kwargs.values()]
    compiled = []
    cache = SegmentCache(lambda gm, example: compiled.append(gm) or gm)
    for decision, gm in variants.items():
        segments, constants, outputs, n_inputs = partition(gm, cap.spans)
        # size arithmetic of a dynamic capture and the views a block hands on are recomputed where they are read
        # (segment nodes named s<k>); a no-op cast is read as its input
        views, casts = _free_views(gm, _labels(gm, cap.spans))
        n_nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function" and not _size_arithmetic(n)
                      and n not in views and n not in casts)
        assert sum(sum(1 for n in s.gm.graph.nodes if n.op == "call_function" and n.name.startswith("n"))
                   for s in segments) == n_nodes
        labels = [s.label for s in segments if s.label not in (GLUE, WRITES)]
        assert len(labels) == len(set(labels)), f"a block split in two segments: {labels}"
        assert not any(n.op == "get_attr" for s in segments for n in s.gm.graph.nodes)  # weights are inputs
        program = RegionalProgram(gm, cap.spans, cache)
        # a dynamic capture's slot sizes are SymInts: their values at the captured inputs
        bufs = [torch.randn([size_hint(x) for x in shape], dtype=dtype) for _, shape, dtype, _ in gm.meta["cache_slots"]]
        with torch.no_grad():
            want = gm(*leaves, *[b.clone() for b in bufs])
            got = program(*leaves, *[b.clone() for b in bufs])
        for a, b in zip(got, want):
            if isinstance(b, torch.Tensor):
                assert torch.equal(a, b)
    # the compute variant: both double blocks one key, the middle single blocks one key
    compute = next(p for d, p in variants.items() if all(a is Action.COMPUTE for a in d))
    program = RegionalProgram(compute, cap.spans, SegmentCache(lambda gm, example: gm))
    with torch.no_grad():
        program(*leaves)
    keys = {s.label: s.key for s in program.segments}
    assert keys[("transformer_blocks", 0)] == keys[("transformer_blocks", 1)]
    # the last single block too: its split of the joint stream (whose unused text half export removed) is
    # recomputed by its readers (before, it had a key of its own)
    assert keys[("single_transformer_blocks", 1)] == keys[("single_transformer_blocks", 2)] == keys[
        ("single_transformer_blocks", 3)]
    assert len(compiled) < sum(len(partition(gm, cap.spans)[0]) for gm in variants.values())


def test_graph_mode_option():
    assert graph_mode(None) is None and graph_mode("eager") is None
    assert graph_mode("inductor") == "regional" and graph_mode("aot_eager") == "regional"
    assert graph_mode("inductor", {"mode": "reduce-overhead"}) == "full"
    assert graph_mode("torchair") == "full"
    assert graph_mode("inductor", {"graphs": "full"}) == "full"
    assert graph_mode(lambda gm, ex: gm) == "regional"
    model = tiny_wan(layers=1)
    with pytest.raises(ConfigError, match=r"backend_options\['graphs'\]='whole'.*\['regional', 'full'\]"):
        optimize(model, WAN_CFGS, backend="aot_eager", backend_options={"graphs": "whole"})
    with pytest.raises(ConfigError, match=r"backend_options\['graphs'\] is not read by backend=None"):
        optimize(model, WAN_CFGS, backend_options={"graphs": "regional"})


def _generate(opt, make_inputs, steps=STEPS):
    return generate_cfg(opt, make_inputs, steps)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["flux", "wan"])
def test_regional_variants_share_compiled_blocks(flux, name):
    """optimize(backend=B): each distinct segment compiled once for all variants and blocks, the outputs of
    the uncompiled variants, no recompile over two generations in two contexts, stats per variant."""
    model, make_inputs, cfgs = (flux, flux_inputs, FLUX_CFGS) if name == "flux" else (
        tiny_wan(layers=3), wan_inputs, WAN_CFGS)
    # the full-graph variants compile one graph each (test_compile.py); aot_eager runs their aten graphs as
    # eager does, so the uncompiled variants are the reference
    full = optimize(model, cfgs)
    want = _generate(full, make_inputs)
    n_variants = len(full.plan.variants())

    backend = fresh_dynamo()
    opt = optimize(model, cfgs, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _generate(opt, make_inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"]
    programs = [v.fn for e in opt._entries.values() for v in e.variants.values()]
    assert len(programs) == n_variants and all(isinstance(p, RegionalProgram) for p in programs)
    keys = {s.key for p in programs for s in p.segments if s.label != WRITES}
    assert len(backend.graphs) == len(keys)  # one compile per distinct segment, none after the first call
    assert len(keys) < sum(len(p.segments) for p in programs)  # shared by blocks and variants
    compute = max(programs, key=lambda p: p.blocks)
    # a refresh's writes run uncompiled after the glue they came with, so a variant of computes and refreshes
    # has compute's glue: no glue graph of its own (before: one per place a cache writes). A block cache's
    # refresh compiles nothing; an attention cache's compiles its blocks (they hand the attention output on)
    refresh = [v.fn for e in opt._entries.values() for d, v in e.variants.items()
               if Action.WRITE in d and Action.READ not in d]
    compute_glue = {s.key for s in compute.segments if s.label == GLUE}
    assert refresh and all(any(s.label == WRITES for s in p.segments) for p in refresh)
    assert all({s.key for s in p.segments if s.label == GLUE} <= compute_glue for p in refresh)
    assert all(p.compiled_new == 0 for p in refresh) == (name == "flux")
    per_list = {}
    for s in compute.segments:
        if s.label not in (GLUE, WRITES):
            per_list.setdefault(s.label[0], set()).add(s.key)
    # Flux's double blocks one key; its single blocks two (the first reads two tensors, the others the joint
    # stream the block before hands on, the last one too); Wan's blocks one (export traces a block's use of
    # temb as the previous block's no-op cast temb.float(): read as temb). Before: 1 / 3 and 2.
    want_keys = {"transformer_blocks": 1, "single_transformer_blocks": 2} if name == "flux" else {"blocks": 1}
    assert {fqn: len(ks) for fqn, ks in per_list.items()} == want_keys
    stats = opt.stats
    assert stats.graph_mode == "regional" and stats.graphs_compiled == len(keys)
    assert stats.graphs_shared == sum(1 for p in programs for s in p.segments if s.label != WRITES) - len(keys)
    (timing,) = stats.timings.values()
    assert timing["capture_seconds"] > 0 and len(timing["variants"]) == n_variants
    assert all(v["compile_seconds"] > 0 for v in timing["variants"].values())
    assert stats.compile_seconds == pytest.approx(sum(v["compile_seconds"] for v in timing["variants"].values()))
    # a new input shape: captured and compiled again, reported under its own label
    with torch.no_grad():
        opt(**make_inputs(0.5, batch=2))
    assert len(stats.timings) == 2


@pytest.mark.slow
def test_full_graph_inductor_matches_the_uncompiled_variants():
    """The real backend, whole-graph variants: equal to the uncompiled variants up to inductor's rounding (1e-4),
    0 recompiles. Regional inductor graphs (symbolic sizes): test_shapes.py::test_dynamic_inductor_two_resolutions.
    A Flux of one block per list, static shapes and 12 steps (every variant by step 6): a cold inductor
    compiles C++ per graph; scalar kernels compile faster."""
    flux = tiny_flux(layers=1, single=2)
    cfgs = FLUX_CFGS[:1]
    full = optimize(flux, cfgs, backend="inductor", backend_options={"graphs": "full", "shapes": "static"})
    plain = optimize(flux, cfgs)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True), scalar_inductor():
        a, b = _generate(full, flux_inputs, steps=12), _generate(plain, flux_inputs, steps=12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    assert full.stats.graph_mode == "full" and full.stats.graphs_compiled == len(full.plan.variants())
