"""optimize() inside real diffusers pipelines built offline from tiny random components.

``pipe.transformer = optimize(pipe.transformer, cfg)``, then the unmodified
pipeline: FluxPipeline (guidance-distilled, true CFG over two cache contexts,
a batch of prompts, a second resolution), StableDiffusion3Pipeline (batched
CFG: cond + uncond in one call of batch 2) and WanPipeline (sequential CFG).
Every cached run equals the same pipeline whose transformer applies
:class:`~npu_cache_fx.CacheAgent` by hand (allclose 1e-5).
"""

from __future__ import annotations

import types

import pytest
import torch

pytestmark = pytest.mark.slow  # real pipelines, trained models or searches: not in the quick tier

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from npu_cache_fx import CacheAgent, CacheConfig, ConfigError, optimize  # noqa: E402
from npu_cache_fx.runtime import CaptureCache, OptimizedModule  # noqa: E402
from hooks import ByHand, agent_on_blocks  # noqa: E402
from tiny_pipelines import flux_pipeline, sd3_pipeline, wan_pipeline  # noqa: E402

STEPS = 6
SCHEDULE = dict(steps_count=STEPS, step_start=1, step_interval=2)  # compute, write, read, write, read, compute
FLUX_CFGS = [CacheConfig(blocks="transformer_blocks", block_start=1, **SCHEDULE),
             CacheConfig(blocks="single_transformer_blocks", **SCHEDULE)]
FLUX_KW = dict(height=32, width=32, num_inference_steps=STEPS, max_sequence_length=8, output_type="latent")


def generate(pipe, transformer, seed=0, **kw):
    """Run ``pipe`` with ``transformer`` swapped in (and the original put back)."""
    original = pipe.transformer
    pipe.transformer = transformer
    try:
        out = pipe(generator=torch.Generator().manual_seed(seed), **kw)
    finally:
        pipe.transformer = original
    return out.frames if hasattr(out, "frames") else out.images


@pytest.fixture(scope="session")
def flux():
    pipe = flux_pipeline()
    return pipe, CaptureCache(pipe.transformer)


def matches_by_hand(pipe, opt, reference, **kw):
    """``pipe`` with ``opt`` equals ``pipe`` with ``reference`` (CacheAgent by hand) and differs from the
    plain transformer (the cache was used); returns ``opt``'s output."""
    with torch.no_grad():
        got = generate(pipe, opt, **kw)
        want = generate(pipe, reference, **kw)
        plain = generate(pipe, pipe.transformer, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, plain)
    return got


def flux_check(pipe, captures, **kw):
    opt = optimize(pipe.transformer, FLUX_CFGS, captures=captures)
    return opt, matches_by_hand(pipe, opt, ByHand(pipe.transformer, opt.configs, "encoder_first"), **kw)


@pytest.mark.parametrize("prompt", ["a photo of a cat", ["a photo of a cat", "a red car on the sky"]],
                         ids=["one-prompt", "two-prompts"])
def test_flux_pipeline_matches_agent(flux, prompt):
    pipe, captures = flux
    opt, _ = flux_check(pipe, captures, prompt=prompt, guidance_scale=3.5, **FLUX_KW)
    assert pipe.transformer.config.guidance_embeds  # guidance is a transformer input
    assert opt.stats.steps == STEPS and opt.stats.steps_reused == len(opt.plan.reuse_steps()) == 2
    assert set(opt.stats.cache_bytes_by_context) == {"cond"}  # FluxPipeline always names its context


def test_flux_decoded_output(flux):
    pipe, captures = flux
    opt = optimize(pipe.transformer, FLUX_CFGS, captures=captures)
    with torch.no_grad():
        image = generate(pipe, opt, prompt="a cat", **{**FLUX_KW, "output_type": "pt"})
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


def test_flux_true_cfg_two_contexts(flux):
    pipe, captures = flux
    kw = dict(prompt="a photo of a cat", negative_prompt="blurry low quality", true_cfg_scale=2.0, **FLUX_KW)
    steps = {}

    def spy(p, i, t, kwargs):  # per-context step counters of the optimized module after each step
        if isinstance(p.transformer, OptimizedModule):
            steps[i] = {name: ctx.step for name, ctx in p.transformer._contexts.items()}
        return {}
    opt, _ = flux_check(pipe, captures, callback_on_step_end=spy, **kw)
    # one transformer call per context per step; both counters advance (and reach steps_count after the
    # last step: the next step call starts a new generation)
    assert steps == {i: {"cond": i + 1, "uncond": i + 1} for i in range(STEPS)}
    assert opt.stats.steps == 2 * STEPS and opt.stats.steps_reused == 2 * 2 and opt.stats.generations == 2
    assert set(opt.stats.cache_bytes_by_context) == {"cond", "uncond"}
    assert opt.stats.stale_reads_avoided == 0


def test_flux_second_call_is_a_new_generation(flux):
    pipe, captures = flux
    opt = optimize(pipe.transformer, FLUX_CFGS, captures=captures)
    with torch.no_grad():
        a = generate(pipe, opt, prompt="a cat", **FLUX_KW)
        b = generate(pipe, opt, prompt="a cat", **FLUX_KW)
        c = generate(pipe, opt, prompt="a cat", seed=1, **FLUX_KW)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert opt.stats.generations == 3 and opt.stats.steps_reused == 3 * 2


@pytest.mark.parametrize("steps", [4, 10])
def test_flux_other_step_counts_scale_the_plan(flux, steps):
    """A request with another step count runs the plan scaled to it (CacheConfig.scaled), read from the
    pipeline (``_num_timesteps``): one generation per call, equal to CacheAgent by hand on the scaled
    configs. Before: 4 steps cut the plan short, 10 steps restarted it at step 6 (two "generations")."""
    pipe, captures = flux
    opt = optimize(pipe.transformer, FLUX_CFGS, captures=captures)
    scaled = [c.scaled(steps) for c in opt.configs]
    kw = dict(FLUX_KW, num_inference_steps=steps)
    matches_by_hand(pipe, opt, ByHand(pipe.transformer, scaled, "encoder_first"), prompt="a cat", **kw)
    assert opt.stats.generations == 1 and opt.stats.steps == steps and opt.stats.plan_steps == steps
    assert opt.stats.steps_reused == len(opt.plan_for(steps).reuse_steps()) > 0
    assert opt.stats.stale_reads_avoided == 0


def test_flux_second_resolution_reuses_the_capture_and_never_mixes(flux, capsys):
    pipe, _ = flux
    captures = CaptureCache(pipe.transformer)  # empty: opt.stats.captures counts every capture
    dynamic = {"shapes": "dynamic"}  # the default for backend=None is a static capture per shape
    opt = optimize(pipe.transformer, FLUX_CFGS, captures=captures, backend_options=dynamic)
    seconds = {}
    outs = {}
    with torch.no_grad():
        for size in (32, 48, 32):
            before = opt.stats.capture_seconds
            outs.setdefault(size, []).append(generate(pipe, opt, prompt="a cat",
                                                      **{**FLUX_KW, "height": size, "width": size}))
            seconds.setdefault(size, opt.stats.capture_seconds - before)
        # one dynamic capture serves both latent shapes (each with its own buffers), none for the repeat
        assert opt.stats.captures == 1 and opt.stats.shapes_reused == 1
        for size in (32, 48):
            alone = optimize(pipe.transformer, FLUX_CFGS, captures=captures,  # fresh contexts and buffers
                             backend_options=dynamic)
            want = generate(pipe, alone, prompt="a cat", **{**FLUX_KW, "height": size, "width": size})
            assert all(torch.equal(o, want) for o in outs[size]), size
    assert outs[48][0].shape == (1, (48 // 2) ** 2, 4)
    with capsys.disabled():
        print("\ncapture seconds per shape (tiny Flux): " + ", ".join(f"{s}x{s}: {v:.2f}s" for s, v in seconds.items()))


@pytest.fixture(scope="session")
def sd3():
    return sd3_pipeline()


SD3_KW = dict(prompt="a cat", negative_prompt="blurry", height=32, width=32, num_inference_steps=STEPS,
              guidance_scale=5.0, max_sequence_length=8, output_type="latent")


def test_sd3_batched_cfg(sd3):
    model = sd3.transformer
    opt = optimize(model, CacheConfig(block_start=1, block_end=3, **SCHEDULE))
    matches_by_hand(sd3, opt, ByHand(model, opt.configs, "encoder_first"), **SD3_KW)
    # cond and uncond share each call (batch 2): one step per call, one context
    (key,) = opt._entries
    assert key[1][0][1][0] == 2
    assert opt.stats.steps == STEPS and opt.stats.steps_reused == 2 and opt.stats.generations == 1


class ByHandSkipLayers(ByHand):
    """ByHand for StableDiffusion3Pipeline with skip-layer guidance: the extra ``skip_layers=[...]`` call of
    a step gets a CacheAgent of its own, driven at the step the main call just ran, over the blocks it runs."""

    def __init__(self, model, config, order, skipped):
        super().__init__(model, [config], order)
        self.kept = [i for i in range(config.blocks_count) if i not in skipped]
        aux = config.replace(blocks_count=len(self.kept), block_start=self.kept.index(config.block_start),
                             block_end=self.kept.index(config.block_end - 1) + 1)
        self.aux, self.calls = CacheAgent(aux, output_order=order), 0

    def forward(self, *args, skip_layers=None, **kwargs):
        if skip_layers is None:
            self.calls += 1
            return super().forward(*args, **kwargs)
        self.aux.begin_step((self.calls - 1) % self.configs[0].steps_count)
        blocks = self.model.get_submodule(self.configs[0].blocks)
        with agent_on_blocks([blocks[i] for i in self.kept], self.aux):
            return self.model(*args, skip_layers=skip_layers, **kwargs)


SLG = dict(skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0)  # steps 1..5 call the model twice


def test_sd3_skip_layer_guidance(sd3):
    # the skip-layer call (batch 1, skip_layers=[1]) is a second call of the same step: it takes that step's
    # decision and a cache of its own, and does not advance the step counter
    model = sd3.transformer
    opt = optimize(model, CacheConfig(block_start=2, block_end=3, **SCHEDULE))
    matches_by_hand(sd3, opt, ByHandSkipLayers(model, opt.configs[0], "encoder_first", [1]),
                    skip_guidance_layers=[1], **SLG, **SD3_KW)
    assert (opt.stats.steps, opt.stats.auxiliary_calls, opt.stats.generations) == (STEPS, STEPS - 1, 1)
    assert opt.stats.steps_reused == 2 and len(opt._entries) == 2
    assert [step for _, step, _ in opt.trace] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with torch.no_grad():
        generate(sd3, opt, skip_guidance_layers=[1], **SLG, **SD3_KW)
    assert (opt.stats.steps, opt.stats.generations) == (2 * STEPS, 2)


def test_sd3_skip_layer_guidance_skipping_cached_blocks(sd3):
    # skip_layers=[2] removes the whole cached range from the extra call: it computes as the plain model,
    # while the main calls still reuse
    model = sd3.transformer
    opt = optimize(model, CacheConfig(block_start=2, block_end=3, **SCHEDULE))
    extra = []

    class Record(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.opt = opt

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._modules["opt"], name)

        def forward(self, *args, **kwargs):
            out = self.opt(*args, **kwargs)
            if kwargs.get("skip_layers"):
                extra.append((kwargs, out[0]))
            return out

    with torch.no_grad():
        generate(sd3, Record(), skip_guidance_layers=[2], **SLG, **SD3_KW)
        for kwargs, out in extra:
            assert torch.equal(out, model(**kwargs)[0])
    assert len(extra) == STEPS - 1 and opt.stats.steps_reused == 2 and opt.stats.auxiliary_calls == STEPS - 1


@pytest.fixture(scope="session")
def wan():
    return wan_pipeline()


WAN_KW = dict(prompt="a cat", negative_prompt="blurry", height=16, width=16, num_frames=5,
              num_inference_steps=STEPS, guidance_scale=5.0, max_sequence_length=8, output_type="pt")


def test_wan_pipeline_other_step_count_scales_the_plan(wan):
    # WanPipeline passes cache_context("cond", step_index=i, sigma=..., num_inference_steps=N); it used to raise
    model = wan.transformer
    opt = optimize(model, CacheConfig(block_start=1, block_end=3, **SCHEDULE))
    steps = STEPS + 3
    reference = ByHand(model, [c.scaled(steps) for c in opt.configs], "hidden_first")
    matches_by_hand(wan, opt, reference, **dict(WAN_KW, num_inference_steps=steps))
    assert opt.stats.plan_steps == steps and opt.stats.generations == 2  # cond and uncond contexts


def test_wan_pipeline_sequential_cfg(wan):
    model = wan.transformer
    opt = optimize(model, CacheConfig(block_start=1, block_end=3, **SCHEDULE))
    got = matches_by_hand(wan, opt, ByHand(model, opt.configs, "hidden_first"), **WAN_KW)
    assert got.shape == (1, 5, 3, 16, 16)
    assert opt.stats.steps == 2 * STEPS and opt.stats.steps_reused == 2 * 2
    assert set(opt.stats.cache_bytes_by_context) == {"cond", "uncond"}


def _boundary_before(pipe, step, **kw):
    """A Wan 2.2 boundary_ratio that hands the generation to ``transformer_2`` at ``step``."""
    pipe.scheduler.set_timesteps(kw["num_inference_steps"])
    t = pipe.scheduler.timesteps
    return float(t[step - 1] + t[step]) / 2 / pipe.scheduler.config.num_train_timesteps


@pytest.mark.parametrize("switch", [3, 2], ids=["at-a-write", "at-a-read"])
def test_wan22_experts_each_follow_their_part_of_the_plan(switch):
    """Wan 2.2: ``transformer`` runs the steps before the boundary and ``transformer_2`` the rest; each
    follows the plan for the steps it runs (the step index WanPipeline passes to cache_context), so two
    identical experts give exactly the one-expert output when the switch falls on a refresh step. It used to
    start transformer_2 at step 0 of the plan."""
    import copy
    from npu_cache_fx import enable_cache
    from npu_cache_fx.schedule import Action
    one = wan_pipeline()
    two = wan_pipeline(boundary_ratio=0.5)
    two.transformer_2 = copy.deepcopy(one.transformer)
    two.transformer.load_state_dict(one.transformer.state_dict())
    two.register_to_config(boundary_ratio=_boundary_before(two, switch, **WAN_KW))
    cfg = CacheConfig(block_start=1, block_end=3, **SCHEDULE)  # compute write read write read compute
    enable_cache(one, [cfg])
    enable_cache(two, [cfg])
    with torch.no_grad():
        want = one(generator=torch.Generator().manual_seed(0), **WAN_KW).frames
        got = two(generator=torch.Generator().manual_seed(0), **WAN_KW).frames
    high, low = two.transformer, two.transformer_2
    steps = lambda m: [(s, d[0]) for c, s, d in m.trace if c == "cond"]  # noqa: E731
    C, W, R = Action.COMPUTE, Action.WRITE, Action.READ
    planned = [C, W, R, W, R, C]
    assert steps(high) == list(enumerate(planned))[:switch]
    joined = [C if a is R else a for a in planned[switch:switch + 1]] + planned[switch + 1:]  # no cache yet: compute
    assert steps(low) == list(zip(range(switch, STEPS), joined))
    assert low.stats.stale_reads_avoided == (2 if planned[switch] is R else 0)  # cond and uncond
    if planned[switch] is W:
        assert torch.equal(got, want)
    else:
        assert not torch.equal(got, want)
    # the next request starts both experts over
    with torch.no_grad():
        again = two(generator=torch.Generator().manual_seed(0), **WAN_KW).frames
    assert torch.equal(again, got) and steps(low)[-(STEPS - switch):] == steps(low)[:STEPS - switch]


def test_search_over_wan22_experts_predicts_and_runs_what_enable_cache_runs():
    """One search over both Wan 2.2 experts: the session records the generation across the switch, finds
    where ``transformer_2`` takes over, and predicts each plan with the runtime's rule there (the joining
    expert has no cache: a read before its own first write computes). Its predicted reuse steps are the
    ones the two experts really read on, its runs equal ``enable_cache`` on the pipeline, and a read the
    switch turns into a compute adds nothing to the proxy. It used to be refused (one denoiser only)."""
    from npu_cache_fx import disable_cache, enable_cache
    from npu_cache_fx.schedule import Action
    from npu_cache_fx.search import SearchSession, search
    from npu_cache_fx.search.engine import score_plan
    pipe = wan_pipeline(boundary_ratio=0.75)  # transformer: steps 0-2 (t >= 750), transformer_2: steps 3-5
    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    kw = dict(WAN_KW, output_type="latent")

    def run_fn(denoisers):
        saved = pipe.transformer, pipe.transformer_2
        pipe.transformer, pipe.transformer_2 = denoisers["transformer"], denoisers["transformer_2"]
        try:
            return pipe(generator=torch.Generator().manual_seed(0), **kw).frames
        finally:
            pipe.transformer, pipe.transformer_2 = saved

    session = SearchSession(experts, run_fn, progress=False).prepare()
    assert session.segments == (3,) and session.steps_count == STEPS
    assert {c["denoiser"] for c in session.recorder.calls[:6]} == {"transformer"}
    blocks = dict(steps_count=STEPS, block_start=0, block_end=4)
    plans = {  # plan: the steps that reuse (W R W R W R: the read at 3 has no write of transformer_2's)
        (0, 2, "none"): [1, 5], (0, 3, "none"): [1, 2, 4, 5], (1, 2, "linear"): [2, 4]}
    try:
        for (start, interval, forecast), reuse in plans.items():
            plan = [CacheConfig(step_start=start, step_interval=interval, forecast=forecast, **blocks)]
            opts = session.optimized(plan)
            with torch.no_grad():
                got = run_fn(opts)
            read = sorted({s for m in opts.values() for c, s, d in m.trace if c == "cond" and Action.READ in d})
            assert read == reuse == score_plan(session, plan)["reuse_steps"], (start, interval)
            enable_cache(pipe, plan)  # re-planned from the second plan on: each expert keeps its captures
            with torch.no_grad():
                assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).frames, got)
        assert pipe.transformer.stats.captures == 0 and pipe.transformer_2.stats.captures == 0
    finally:
        disable_cache(pipe)
    same_reads = [CacheConfig(step_start=0, step_interval=1, step_end=5, refresh_steps=(0, 2, 3, 4), **blocks)]
    every_2nd = [CacheConfig(step_start=0, step_interval=2, **blocks)]
    assert score_plan(session, every_2nd)["proxy"] == pytest.approx(score_plan(session, same_reads)["proxy"])
    # a forecast no read can use (each expert's reads see one refresh of its own) is not run again
    from npu_cache_fx.search.engine import effective_forecast
    from npu_cache_fx.search.space import DIT, Part, Schedule
    part = Part(DIT, 0, 4, Schedule(step_start=0, step_interval=2, step_end=5), forecast="taylor2")
    assert effective_forecast(session, part).forecast == "none"  # the read at 5 has step 4's refresh only
    one_denoiser = types.SimpleNamespace(steps_count=STEPS, segments=())
    assert effective_forecast(one_denoiser, part) == part  # there it has 4, 2 and 0
    result = search(experts, run_fn, target_speedup=1.3, session=session, progress=False)
    assert result.best is not None and result.notes["denoisers"]["segments"] == [3]
    assert result.best.notes["stats"]["captures"] == 0


def test_search_refuses_experts_of_two_architectures():
    from npu_cache_fx.search import SearchSession
    from tiny_pipelines import wan_transformer
    pipe = wan_pipeline(boundary_ratio=0.75)
    pipe.transformer_2 = wan_transformer(layers=2, seed=1)

    def run_fn(denoisers):
        pipe.transformer, pipe.transformer_2 = denoisers["transformer"], denoisers["transformer_2"]
        return pipe(generator=torch.Generator().manual_seed(0), **dict(WAN_KW, output_type="latent")).frames

    experts = {"transformer": pipe.transformer, "transformer_2": pipe.transformer_2}
    with pytest.raises(ValueError, match="'transformer' and 'transformer_2' capture different graphs"):
        SearchSession(experts, run_fn, progress=False).prepare()


# ----------------------------------------------------------------------------- one line on a pipeline
def test_enable_cache_equals_optimize_by_hand_and_disable_restores(flux, tmp_path):
    from npu_cache_fx import disable_cache, enable_cache, save_plan, summary
    pipe, captures = flux
    original = pipe.transformer
    with torch.no_grad():
        plain = generate(pipe, original, prompt="a cat", **FLUX_KW)
        by_hand = generate(pipe, optimize(original, FLUX_CFGS, captures=captures), prompt="a cat", **FLUX_KW)
    try:
        enable_cache(pipe, save_plan(FLUX_CFGS, tmp_path))  # a saved plan, by path
        assert isinstance(pipe.transformer, OptimizedModule) and pipe.transformer.model is original
        with torch.no_grad():
            cached = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **FLUX_KW).images
        assert torch.equal(cached, by_hand) and not torch.equal(cached, plain)
        info = summary(pipe, echo=False)["transformer"]
        assert info["path"] == "export" and info["steps_reused"] == 2 and info["steps"] == STEPS
        assert info["configs"] == [c.to_dict() for c in pipe.transformer.configs]
    finally:
        disable_cache(pipe)
    assert pipe.transformer is original
    with torch.no_grad():
        assert torch.equal(generate(pipe, pipe.transformer, prompt="a cat", **FLUX_KW), plain)


def test_enable_cache_again_keeps_the_captures_of_an_unchanged_model():
    """Another plan on an enabled pipeline keeps the denoiser's captures (a Flux-dev capture is 16-18 s; it used
    to capture again); after a change the enabled module has not seen (a hook added) it captures again."""
    from npu_cache_fx import disable_cache, enable_cache
    pipe = flux_pipeline()
    original = pipe.transformer
    other = [CacheConfig(blocks="single_transformer_blocks", steps_count=STEPS, step_start=2, step_interval=2)]
    try:
        enable_cache(pipe, FLUX_CFGS)
        with torch.no_grad():
            generate(pipe, pipe.transformer, prompt="a cat", **FLUX_KW)
        assert pipe.transformer.stats.captures == 1
        taken = pipe.transformer.reusable_captures()
        assert taken is not None
        enable_cache(pipe, other)
        with torch.no_grad():
            got = generate(pipe, pipe.transformer, prompt="a cat", **FLUX_KW)
            want = generate(pipe, optimize(original, other), prompt="a cat", **FLUX_KW)  # captured afresh
        assert pipe.transformer.stats.captures == 0 and pipe.transformer.reusable_captures() is taken
        assert torch.equal(got, want) and pipe.transformer.stats.steps_reused > 0
        handle = original.transformer_blocks[0].register_forward_pre_hook(lambda mod, args: None)
        try:
            assert pipe.transformer.reusable_captures() is None  # the model changed since it last looked
            enable_cache(pipe, FLUX_CFGS)
            with torch.no_grad():
                generate(pipe, pipe.transformer, prompt="a cat", **FLUX_KW)
            assert pipe.transformer.stats.captures == 1
        finally:
            handle.remove()
    finally:
        disable_cache(pipe)
    assert pipe.transformer is original


def test_enable_cache_default_plan_and_a_pipeline_without_dit(flux):
    import types
    from npu_cache_fx import disable_cache, enable_cache
    from npu_cache_fx.recipes import conservative_plan, default_plan
    pipe, _ = flux
    original = pipe.transformer
    # Flux: MindIE-SD's shipped FLUX.1-dev config (double [5, 13) of 19, single [1, 23) of 38, from step 18
    # every 2nd of 28) on the tiny model's 2 double and 4 single blocks
    plan = default_plan(original)
    assert [(c.blocks, c.block_start, c.block_end, c.steps_count, c.step_start, c.step_interval, c.forecast)
            for c in plan] == [("transformer_blocks", 1, 2, 28, 18, 2, "none"),
                               ("single_transformer_blocks", 0, 2, 28, 18, 2, "none")]
    assert [c.step_start for c in default_plan(original, steps=14)] == [9, 9]
    # a family without a shipped config: every block list, every 2nd step from 15 % to the last 10 %
    assert sorted((c.blocks, c.steps_count, c.step_start, c.step_interval, c.step_end, c.forecast)
                  for c in conservative_plan(original, steps=28)) == [
        ("single_transformer_blocks", 28, 4, 2, 24, "linear"), ("transformer_blocks", 28, 4, 2, 24, "linear")]
    try:
        enable_cache(pipe)
        kw = dict(FLUX_KW, num_inference_steps=12)
        with torch.no_grad():
            cached = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **kw).images
        assert pipe.transformer.stats.plan_steps == 12 and pipe.transformer.stats.steps_reused == 2
        by_hand = generate(pipe, optimize(original, default_plan(original)), prompt="a cat", **kw)
        assert torch.equal(cached, by_hand)
        assert not torch.equal(cached, generate(pipe, original, prompt="a cat", **kw))
    finally:
        disable_cache(pipe)
    with pytest.raises(ConfigError, match="no DiT denoiser"):
        enable_cache(types.SimpleNamespace(unet=torch.nn.Linear(2, 2)))
