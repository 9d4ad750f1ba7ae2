"""Models torch.export cannot capture run the eager path: same results, one clear warning."""

import logging

import torch

from npu_cache_fx import CacheConfig, optimize
from toy import AttnDiT, ToyDiT, UnexportableAttnDiT, UnexportableDiT, toy_inputs

TS = [float(1000 - 100 * s) for s in range(8)]


def run_pair(graph_model, eager_model, cfgs, contexts=("default",), generations=2):
    graph_model.load_state_dict(eager_model.state_dict())
    a, b = optimize(graph_model, cfgs), optimize(eager_model, cfgs)
    for _ in range(generations):
        for s, t in enumerate(TS):
            for c, ctx in enumerate(contexts):
                with a.cache_context(ctx), b.cache_context(ctx):
                    ga = a(**toy_inputs(t, seed=c))[0]
                    gb = b(**toy_inputs(t, seed=c))[0]
                assert torch.equal(ga, gb), (s, ctx)
    return a, b


def test_dit_cache_eager_path_matches_graph_path(caplog):
    cfg = CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=4,
                      forecast="linear")
    with caplog.at_level(logging.WARNING):
        graph, eager = run_pair(ToyDiT(single=5), UnexportableDiT(single=5), cfg, contexts=("cond", "uncond"))
    assert (graph.stats.path, eager.stats.path) == ("export", "eager")
    warnings = [r for r in caplog.records if "eager path" in r.getMessage()]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "UnexportableDiT" in msg and "lengths[0] > 1000" in msg
    assert eager.stats.steps_reused == graph.stats.steps_reused > 0
    assert "lengths[0] > 1000" in eager.stats.fallback_reason


def test_flux_like_streams_paired_without_a_graph():
    cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="transformer_blocks", block_end=2),
            CacheConfig(steps_count=8, step_start=2, step_interval=3, blocks="single_transformer_blocks")]
    run_pair(ToyDiT(dual=3, joint=3), UnexportableDiT(dual=3, joint=3), cfgs)


def test_attention_cache_eager_path():
    cfg = CacheConfig(method="attention_cache", steps_count=8, step_start=1, step_interval=3, block_start=1)
    run_pair(AttnDiT(4), UnexportableAttnDiT(4), cfg)


def test_adastep_on_eager_path():
    cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=3),
            CacheConfig(method="adastep", steps_count=8, threshold=0.1, max_skip_steps=1, decay=1.0)]
    a, b = run_pair(ToyDiT(single=3), UnexportableDiT(single=3), cfgs)
    assert b.stats.steps_skipped == a.stats.steps_skipped
