"""Models torch.export cannot capture run the Dynamo path (with a backend) or the eager path: same
results as the captured graphs, one clear warning, no recompiles across steps and generations."""

import logging
import os

import pytest
import torch

from counting import fresh_dynamo
from npu_cache_fx import CacheConfig, optimize
from npu_cache_fx.runtime import CaptureCache
from toy import AttnDiT, SingleBlock, ToyDiT, UnexportableAttnDiT, UnexportableDiT, toy_inputs

TS = [float(1000 - 100 * s) for s in range(8)]


def run_pair(graph_model, eager_model, cfgs, contexts=("default",), generations=2, backend=None, after=None):
    """Run both models through ``optimize`` and assert equal outputs at every call; ``after(gen)`` hooks
    the end of each generation."""
    graph_model.load_state_dict(eager_model.state_dict())
    a, b = optimize(graph_model, cfgs), optimize(eager_model, cfgs, backend=backend)
    for gen in range(generations):
        for s, t in enumerate(TS):
            for c, ctx in enumerate(contexts):
                with a.cache_context(ctx), b.cache_context(ctx):
                    ga = a(**toy_inputs(t, seed=c))[0]
                    gb = b(**toy_inputs(t, seed=c))[0]
                assert torch.equal(ga, gb), (s, ctx)
        if after is not None:
            after(gen)
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


# ----------------------------------------------------------------------------- the Dynamo path
def graphs_per_generation(cfgs, graph_model, model, contexts=("default",), **kw):
    """Graphs compiled in each generation of a Dynamo-path run checked against the export path."""
    counting, per_gen = fresh_dynamo(), []
    with torch.no_grad():
        a, b = run_pair(graph_model, model, cfgs, contexts=contexts, backend=counting,
                        after=lambda gen: per_gen.append(len(counting.graphs)), **kw)
    return b, counting, per_gen


DIT = CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="blocks", block_start=1, block_end=4,
                  forecast="linear")


def test_dynamo_path_compiles_each_block_class_once(caplog):
    with caplog.at_level(logging.WARNING):
        opt, counting, per_gen = graphs_per_generation(DIT, ToyDiT(single=5), UnexportableDiT(single=5),
                                                       contexts=("cond", "uncond"))
    assert opt.stats.path == "dynamo" and "path=dynamo" in repr(opt)
    # five SingleBlocks share one graph; reuse steps, writes and the second generation compile nothing
    assert per_gen == [1, 1], [g.code for g in counting.graphs]
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "UnexportableDiT" in msg and "lengths[0] > 1000" in msg and "Dynamo path" in msg
    assert opt.stats.steps_reused > 0


def test_dynamo_path_flux_like_two_block_lists():
    cfgs = [CacheConfig(steps_count=8, step_start=1, step_interval=2, blocks="transformer_blocks", block_end=2),
            CacheConfig(steps_count=8, step_start=2, step_interval=3, blocks="single_transformer_blocks")]
    opt, _, per_gen = graphs_per_generation(cfgs, ToyDiT(dual=3, joint=3), UnexportableDiT(dual=3, joint=3))
    # DualBlock, JointBlock, and JointBlock again for the first call whose inputs are strided slices of the
    # previous block's output (dynamic=False specializes on strides); none after the first generation
    assert opt.stats.path == "dynamo" and per_gen == [3, 3]


def test_dynamo_path_attention_cache_breaks_the_graph_around_cached_attention():
    cfg = CacheConfig(method="attention_cache", steps_count=8, step_start=1, step_interval=3, block_start=1)
    opt, counting, per_gen = graphs_per_generation(cfg, AttnDiT(4), UnexportableAttnDiT(4))
    assert opt.stats.path == "dynamo"
    # block 0 (attention not cached): one graph; blocks 1-3: before / after the cached attention call, and
    # the attention module itself. Nothing new after the first generation.
    assert per_gen[0] == per_gen[1] <= 4, [g.code for g in counting.graphs]


def test_dynamo_failure_falls_back_to_eager_with_a_warning(caplog):
    def broken(gm, example_inputs):
        raise RuntimeError("no converter for aten.foo")

    with caplog.at_level(logging.WARNING):
        _, opt = run_pair(ToyDiT(single=4), UnexportableDiT(single=4), DIT.replace(block_end=3), backend=broken)
    assert opt.stats.path == "eager"
    assert "no converter for aten.foo" in opt.stats.fallback_reason
    failed = [r.getMessage() for r in caplog.records if "torch.compile of" in r.getMessage()]
    assert len(failed) == 1 and "SingleBlock" in failed[0] and "eager path" in failed[0]


class PickyBlock(SingleBlock):
    def forward(self, hidden_states, encoder_hidden_states, temb):
        if hidden_states.shape[1] != 4:
            raise ValueError(f"PickyBlock takes 4 tokens, got {hidden_states.shape[1]}")
        return super().forward(hidden_states, encoder_hidden_states, temb)


def test_errors_of_the_input_are_raised_not_taken_for_compiler_failures():
    model = UnexportableDiT(single=3)
    model.blocks = torch.nn.ModuleList(PickyBlock(2.0 ** i) for i in range(3))
    opt = optimize(model, DIT.replace(block_end=3), backend=fresh_dynamo())
    with torch.no_grad():
        opt(**toy_inputs(1000.0))
        with pytest.raises(ValueError, match="takes 4 tokens, got 3"):
            opt(**toy_inputs(900.0, tokens=3))
    assert opt.stats.path == "dynamo"


def test_fallback_reason_names_the_source_from_any_working_directory(tmp_path, monkeypatch):
    """Export prints the model's file shortened (``tests/toy.py``); the reason must still quote the line
    when the working directory is elsewhere (e.g. the virtualenv outside the checkout)."""
    monkeypatch.chdir(tmp_path)
    opt = optimize(UnexportableDiT(single=3), CacheConfig(steps_count=4, step_start=1, step_interval=2,
                                                          blocks="blocks"))
    opt(**toy_inputs(900.0))
    reason = opt.stats.fallback_reason
    assert "lengths[0] > 1000" in reason and os.path.join("tests", "toy.py") in reason
    assert os.path.isabs(reason.split(" at ", 1)[1].split(":", 1)[0])


def test_a_shared_capture_cache_exports_a_failing_signature_once(monkeypatch):
    """Modules sharing a CaptureCache (the search builds one per candidate plan) export a signature export cannot
    capture once: the next module takes the fallback path straight away, with the same reason; a new input
    signature and a cleared cache (the model changed) export again."""
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = UnexportableDiT(single=3)
    captures = CaptureCache(model)
    cfg = CacheConfig(steps_count=4, step_start=1, step_interval=2, blocks="blocks")
    first = optimize(model, cfg, captures=captures)
    want = first(**toy_inputs(900.0))[0]
    exports = len(calls)  # the first export retries once without preserved block signatures
    assert exports >= 1 and first.stats.path == "eager"
    second = optimize(model, cfg.replace(step_interval=3), captures=captures)
    assert torch.equal(second(**toy_inputs(900.0))[0], want)
    assert len(calls) == exports and second.stats.path == "eager"
    assert second.stats.fallback_reason == first.stats.fallback_reason
    optimize(model, cfg, captures=captures)(**toy_inputs(900.0, tokens=3))  # another signature: exported
    assert len(calls) == 2 * exports
    captures.clear()
    optimize(model, cfg, captures=captures)(**toy_inputs(900.0))
    assert len(calls) == 3 * exports


def test_search_on_a_model_export_cannot_capture_says_what_to_do():
    """The search scores plans on the captured graph: on a model export cannot capture it used to raise export's
    own GuardOnDataDependentSymNode; it says what failed, where, and what still works."""
    from npu_cache_fx.search import SearchSession
    model = UnexportableDiT(single=3).eval()

    def run_fn(module):
        with torch.no_grad():
            return torch.stack([module(**toy_inputs(t))[0] for t in TS[:4]])
    with pytest.raises(RuntimeError, match=r"UnexportableDiT cannot be captured by torch.export \(.*lengths\[0\] "
                                           r"> 1000.*optimize\(model, plan\) still runs"):
        SearchSession(model, run_fn, progress=False, steps_count=4).prepare()
