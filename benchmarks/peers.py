"""npu_cache_fx side by side with the caches people use today, on the shipped tiny trained models.

    python benchmarks/peers.py                      # tiny-flux + tiny-wan, ~15-25 min on 2 cores
    python benchmarks/peers.py --quick              # smoke run: tiny-flux, 2 samples, 10 steps, no inductor
    pip install '.[bench]'                          # the peers: cache-dit (+ diffusers); MindIE-SD separately:
    pip install --no-deps mindiesd==3.1.0           # (its torch_npu dependency breaks `import torch` without CANN)

Every row of one model is measured in this one run, on the same labels, the same starting
noise (seed 0) and the same step count (the model's default; "fewer steps" rows excepted):

* ``uncached``; ``fewer steps N`` at ``N = round(steps / s)`` for s = 1.5, 2, 2.5;
* ``AdaStep thr=..``: ``CacheConfig(method="adastep")``, thresholds calibrated as in
  ``benchmarks/timestep.py`` (the two closest to a 1.5x / 2x step reduction);
* ``npu_cache_fx xT``: ``npu_cache_fx.search.search(..., target_speedup=T)`` applied with
  ``optimize()``, eager, and (unless ``--no-inductor``) ``optimize(..., backend="inductor")``,
  with an ``uncached inductor`` row (``torch.compile(model, backend="inductor")``) to separate
  what the compiler gives from what the cache gives;
* ``MindIE agent xT``: MindIE-SD 3.1.0's real ``cache_agent`` (``npu_cache_fx.compat.mindie``)
  applied by hand around every block's forward, one ``CacheAgent`` per block list, as
  MindIE's docs do; its config is MindIE's search result (``search(..., strategy="mindie")``,
  sharing one :class:`SearchSession` with ours). diffusers' Flux blocks return
  ``(encoder, hidden)``; MindIE's agent expects ``(hidden, encoder)``, so the wrapper swaps the
  pair in and out (MindIE's own Flux blocks return hidden first). ``MindIE plan (npu_cache_fx
  runtime)``: the same plan run by ``optimize()``, which separates MindIE's search from
  MindIE's runtime (its defects);
* diffusers hooks (``transformer.enable_cache(cfg)``): FirstBlockCache, PyramidAttentionBroadcast,
  FasterCache, TaylorSeerCache, MagCache, SeaCache, defaults and a more aggressive setting.
  The transformer is called the way diffusers' pipelines call it: each call inside
  ``transformer.cache_context("cond", step_index=, num_inference_steps=, timestep=, sigma=)``
  and ``transformer._reset_stateful_cache()`` after every generation (``maybe_free_model_hooks``
  does that in a pipeline; without it TaylorSeer carries its step counter into the next
  generation). ``current_timestep_callback`` returns the 0..1000 timestep. The model is sampled
  without CFG, so FasterCache runs with ``is_guidance_distilled=True`` (attention reuse only).
  MagCache's ``mag_ratios`` come from its own calibration mode on one generation with another
  seed (seed 1). SeaCache: tiny-wan uses diffusers' built-in Wan adapter; tiny-flux has none,
  so a ``raw_vision_callback`` (the documented generic path) unpacks the packed latents to
  ``(C=4, T=1, 8, 8)``;
* cache-dit (``cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...))``, its
  registered adapters for Flux / Wan): DBCache defaults, a tuned F1B0 setting, and the tuned
  setting + TaylorSeer (order 1), plus a more aggressive one. Transformer-only use keeps one
  persistent context; ``cache_dit.refresh_context(transformer, num_inference_steps=N)`` before
  each generation resets it (without it, cache-dit 1.5.3's step counter drifts by one step per
  generation). ``enable_separate_cfg=False``: no CFG here (cache-dit assumes CFG for Wan).

Everything that is tuned or calibrated (our search, MindIE's search, AdaStep thresholds, MagCache
ratios) uses seed 1; every row is measured on seed 0.

Columns: measured speedup (median uncached / median method over ``--repeats`` interleaved
generations, process CPU time with ``--threads 1``, wall-clock alongside), PSNR and MSE vs the
uncached images, class fidelity (digit classifier), cache bytes and compiled graphs /
recompiles:

* cache bytes: ours ``opt.stats.cache_bytes`` (the buffers allocated for one cache context);
  peers: the peak, over the steps of one generation, of the bytes of distinct tensor storages
  reachable from their state objects (``tinybench.held_tensor_bytes``: the diffusers hook
  objects on every module, cache-dit's context manager, MindIE's agents), model parameters
  excluded, probed after every transformer call;
* graphs / recompiles: one generation with ``torch.compile(transformer, backend=counter)`` (peers
  with their hooks active; ours ``optimize(..., backend=counter)``); ``counter`` counts graphs
  and compiles of an already compiled frame (guard failures = recompiles); "limit" = a frame hit
  dynamo's recompile limit (it then runs eagerly); errors are recorded, not raised.

The verdict per model and target speedup T: among the eager rows (compiled rows are compared
only with ``uncached inductor``), the best PSNR at measured speedup >= T, and whether the
npu_cache_fx rows are on the (speedup, PSNR) Pareto front of all eager rows. A peer that cannot
be applied to a model is a row with the reason instead of numbers.

Writes ``--out`` (JSON), the Markdown table next to it and ``<out stem>.png`` (one Pareto panel
per model).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import inspect
import io
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tinybench as tb  # noqa: E402
from timestep import ADA_LADDER, adastep_config, calibrate_adastep  # noqa: E402

from npu_cache_fx import CacheConfig, models, optimize  # noqa: E402
from npu_cache_fx.compat import mindie as mindie_compat  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "peers.json")
TARGETS = (1.5, 2.0, 2.5)
EVAL_SEED, CALIB_SEED = 0, 1
ADA_MAX_SKIP = 2
OURS = "npu_cache_fx"


# ----------------------------------------------------------------------------- methods
@dataclass
class Applied:
    """One method ready to run: ``call`` is what the sampler calls as its transformer."""

    call: Callable
    before: Callable[[], None] = lambda: None   # before each generation (a pipeline's setup)
    after: Callable[[], None] = lambda: None    # after each generation (a pipeline's teardown)
    roots: Callable[[], List[Any]] = lambda: []  # cache state objects, for the bytes probe
    opt: Any = None                             # an npu_cache_fx OptimizedModule (its stats)
    notes: List[str] = field(default_factory=list)
    noreset: Optional["Applied"] = None         # the same without the per-generation state reset
    reset_how: str = ""                         # what that reset is


@dataclass
class Method:
    name: str
    family: str
    setting: str
    build: Callable[[Optional[Callable]], Applied]  # build(None): eager; build(counter): under torch.compile
    steps: int
    group: str = ""              # Pareto-plot group
    compiled: bool = False       # an inductor row (compared with "uncached inductor" only)
    config: Any = None
    notes: List[str] = field(default_factory=list)
    skip: Optional[str] = None   # not applicable / not installed: the reason
    applied: Optional[Applied] = None
    label: str = ""              # short point label in the plot


class Bench:
    """One model: labels, steps, generation helper, the uncached transformer and its parameters."""

    def __init__(self, name: str, samples: int, steps: Optional[int]):
        self.name = name
        self.model = models.load(name)
        self.steps = steps or self.model.default_steps
        self.labels = models.eval_labels(samples, self.model)  # scene captions for tiny-flux-deep
        self.base = self.model.transformer
        self.params = list(self.base.parameters()) + list(self.base.buffers())
        self.captures = CaptureCache(self.base)
        self.ts_scale = 1.0 if self.model.kind == "flux" else 1000.0  # transformer timestep / flow time

    def sample(self, call: Callable, steps: Optional[int] = None, seed: int = EVAL_SEED) -> torch.Tensor:
        return self.model.sample(self.labels, steps=steps or self.steps, seed=seed, transformer=call)

    def generate(self, a: Applied, steps: Optional[int] = None, seed: int = EVAL_SEED) -> torch.Tensor:
        a.before()
        try:
            return self.sample(a.call, steps, seed)
        finally:
            a.after()

    def fresh(self) -> torch.nn.Module:
        return copy.deepcopy(self.base)


def _compiled(tr: torch.nn.Module, backend: Optional[Callable]):
    return tr if backend is None else torch.compile(tr, backend=backend)


# ----------------------------------------------------------------------------- uncached, fewer steps, ours
def plain_method(b: Bench, name: str, family: str, steps: int, setting: str, group: str, label: str) -> Method:
    def build(backend):
        return Applied(b.base if backend is None else torch.compile(b.fresh(), backend=backend))
    return Method(name, family, setting, build, steps, group=group, label=label)


def ours_method(b: Bench, name: str, family: str, cfgs: List[CacheConfig], setting: str, group: str, label: str,
                backend: Optional[str] = None) -> Method:
    def build(counter):
        opt = optimize(b.base, cfgs, backend=counter if counter is not None else backend, captures=b.captures)
        return Applied(opt, opt=opt)
    return Method(name, family, setting, build, b.steps, group=group, compiled=backend is not None,
                  config=[c.to_dict() for c in cfgs], label=label)


# ----------------------------------------------------------------------------- MindIE-SD, by hand
def mindie_on_blocks(blocks: Sequence[torch.nn.Module], agent, hidden_first: bool) -> None:
    """Route every block's forward through ``agent.apply`` (MindIE's documented per-block usage).

    MindIE's ``CacheAgent.apply(block, hidden_states=..., encoder_hidden_states=..., **rest)``
    calls ``block(hidden, encoder, **rest)`` and expects ``(hidden, encoder)`` back; for blocks
    that return ``(encoder, hidden)`` (diffusers Flux) the pair is swapped in and out.
    """
    for block in blocks:
        orig = block.forward
        sig = inspect.signature(orig)

        def swap(out):
            return (out[1], out[0]) if not hidden_first and isinstance(out, tuple) and len(out) == 2 else out

        def call(hidden, *rest, _orig=orig, **kwargs):
            if rest:
                (kwargs["encoder_hidden_states"],) = rest
            return swap(_orig(hidden_states=hidden, **kwargs))

        def forward(*args, _sig=sig, _call=call, **kwargs):
            bound = dict(_sig.bind(*args, **kwargs).arguments)
            hidden = bound.pop("hidden_states")
            return swap(agent.apply(_call, hidden_states=hidden, **bound))

        block.forward = forward


def mindie_method(b: Bench, M, cfgs: List[CacheConfig], targets: str, label: str) -> Method:
    lists = {c.blocks: c for c in cfgs}
    notes = []
    specs = []
    for fqn, c in lists.items():
        n_blocks = len(b.base.get_submodule(fqn))
        if c.refresh_steps is not None or getattr(c, "forecast", "none") not in (None, "none"):
            raise ValueError(f"MindIE has no refresh_steps / forecast: {c}")
        end = n_blocks if c.block_end is None else min(c.block_end, n_blocks)
        spec = dict(method=c.method, blocks_count=n_blocks, steps_count=b.steps, step_start=c.step_start,
                    step_interval=c.step_interval, step_end=10000 if c.step_end is None else c.step_end,
                    block_start=c.block_start, block_end=end)
        specs.append((fqn, spec))
        if end - c.block_start == 1:
            notes.append(f"one-block range on {fqn} [{c.block_start}:{end}): MindIE 3.1.0 defect -- on reuse steps "
                         "that block returns input + the cached *input* instead of input + delta")
    hidden_first = b.model.kind != "flux"

    def build(backend):
        tr = b.fresh()
        agents = []
        for fqn, spec in specs:
            agent = M.CacheAgent(M.CacheConfig(**spec))
            mindie_on_blocks(list(tr.get_submodule(fqn)), agent, hidden_first)
            agents.append(agent)
        return Applied(_compiled(tr, backend), roots=lambda: agents)

    setting = "; ".join(f"{tb.short(f)}: CacheConfig({', '.join(f'{k}={v}' for k, v in s.items())})" for f, s in specs)
    return Method(f"MindIE agent {targets}", "MindIE-SD 3.1.0 agent", setting, build, b.steps,
                  group="MindIE-SD agent", config=dict(specs), notes=notes, label=label)


# ----------------------------------------------------------------------------- diffusers hooks
class PipelineLoop:
    """What a diffusers pipeline does around each transformer call (``cache_context``) and after a generation."""

    def __init__(self, b: Bench, tr: torch.nn.Module, fwd: Callable, steps: int):
        self.b, self.tr, self.fwd, self.steps = b, tr, fwd, steps
        self.i, self.timestep = 0, 1000.0

    def __call__(self, **kwargs):
        sigma = float(kwargs["timestep"].reshape(-1)[0]) / self.b.ts_scale
        self.timestep = sigma * 1000.0
        with self.tr.cache_context("cond", step_index=self.i, num_inference_steps=self.steps, timestep=self.timestep,
                                   sigma=sigma):
            out = self.fwd(**kwargs)
        self.i += 1
        return out

    def start(self):
        self.i = 0

    def finish(self):
        self.tr._reset_stateful_cache()  # DiffusionPipeline.maybe_free_model_hooks() does this

    def hooks(self) -> List[Any]:
        from diffusers.hooks import HookRegistry
        out = []
        for m in self.tr.modules():
            reg = getattr(m, "_diffusers_hook", None)
            if isinstance(reg, HookRegistry):
                out.extend(reg.hooks.values())
        return out


def hooked_modules(tr: torch.nn.Module) -> int:
    return sum(1 for m in tr.modules() if getattr(getattr(m, "_diffusers_hook", None), "hooks", None))


def flux_raw_vision(module, args, kwargs) -> Optional[List[torch.Tensor]]:
    """SeaCache ``raw_vision_callback`` for tiny-flux: packed (B, 64, 4) latents -> per sample (C=4, T=1, 8, 8)."""
    h = kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor) or h.ndim != 3:
        return None
    bsz, n, c = h.shape
    side = int(round(math.sqrt(n)))
    if side * side != n:
        return None
    return list(h.transpose(1, 2).reshape(bsz, c, 1, side, side).unbind(0))


def diffusers_method(b: Bench, name: str, family: str, setting: str, make_cfg: Callable[[PipelineLoop], Any],
                     label: str) -> Method:
    def build(backend):
        tr = b.fresh()
        loop = PipelineLoop(b, tr, None, b.steps)
        tr.enable_cache(make_cfg(loop))
        loop.fwd = _compiled(tr, backend)
        a = Applied(loop, before=loop.start, after=loop.finish, roots=loop.hooks,
                    noreset=Applied(loop, before=loop.start), reset_how="transformer._reset_stateful_cache()")
        n = hooked_modules(tr)
        a.notes.append(f"hooks on {n} modules" + (": no module name matched the config's identifiers" if not n else ""))
        return a
    return Method(name, family, setting, build, b.steps, group="diffusers hooks", config=setting, label=label)


def magcache_ratios(b: Bench) -> List[float]:
    """MagCache's own calibration mode on one generation with the calibration seed; parses its printed ratios."""
    from diffusers.hooks import MagCacheConfig
    tr = b.fresh()
    loop = PipelineLoop(b, tr, tr, b.steps)
    tr.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=b.steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        b.generate(Applied(loop, loop.start, loop.finish), seed=CALIB_SEED)
    lines = [ln.strip() for ln in buf.getvalue().splitlines()]
    found = [ln for ln in lines if ln.startswith("[") and ln.endswith("]")]
    if not found:
        raise RuntimeError(f"MagCache calibration printed no ratios: {buf.getvalue()[-300:]!r}")
    ratios = [float(x) for x in ast.literal_eval(found[-1])]
    if len(ratios) != b.steps:
        raise RuntimeError(f"MagCache calibration gave {len(ratios)} ratios for {b.steps} steps")
    return ratios


DIFFUSERS_HOOKS = {"FirstBlockCacheConfig": "diffusers FirstBlockCache",
                   "PyramidAttentionBroadcastConfig": "diffusers PyramidAttentionBroadcast",
                   "FasterCacheConfig": "diffusers FasterCache", "TaylorSeerCacheConfig": "diffusers TaylorSeerCache",
                   "MagCacheConfig": "diffusers MagCache", "SeaCacheConfig": "diffusers SeaCache"}


def diffusers_methods(b: Bench) -> List[Method]:
    import diffusers
    import diffusers.hooks as hooks
    from diffusers.utils import logging as dlogging
    dlogging.set_verbosity_error()
    H = {k: getattr(hooks, k, None) for k in DIFFUSERS_HOOKS}
    out = [Method(fam.replace("diffusers ", ""), fam, "-", None, b.steps,
                  skip=f"{k} not in diffusers {diffusers.__version__}") for k, fam in DIFFUSERS_HOOKS.items() if not H[k]]
    if H["FirstBlockCacheConfig"]:
        for thr in (0.05, 0.1, 0.2):
            out.append(diffusers_method(
                b, f"FirstBlockCache thr={thr:g}", "diffusers FirstBlockCache",
                f"FirstBlockCacheConfig(threshold={thr:g})" + (" (default)" if thr == 0.05 else ""),
                lambda loop, thr=thr: H["FirstBlockCacheConfig"](threshold=thr), f"FBC {thr:g}"))
    if H["PyramidAttentionBroadcastConfig"]:
        for skip, rng, cross in ((2, (100, 800), None), (3, (100, 950), 3)):
            setting = (f"PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range={skip}, "
                       f"spatial_attention_timestep_skip_range={rng}"
                       + (f", cross_attention_block_skip_range={cross}, cross_attention_timestep_skip_range={rng}"
                          if cross else "") + ")" + (" (defaults; skip range 2 = its fallback)" if skip == 2 else ""))
            out.append(diffusers_method(
                b, f"PAB spatial {skip}" + (f" cross {cross}" if cross else ""), "diffusers PyramidAttentionBroadcast",
                setting, lambda loop, skip=skip, rng=rng, cross=cross: H["PyramidAttentionBroadcastConfig"](
                    spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=rng,
                    cross_attention_block_skip_range=cross, cross_attention_timestep_skip_range=rng,
                    current_timestep_callback=lambda: loop.timestep), f"PAB {skip}"))
    if H["FasterCacheConfig"]:
        for skip, rng in ((2, (-1, 681)), (3, (-1, 901))):
            out.append(diffusers_method(
                b, f"FasterCache skip {skip}", "diffusers FasterCache",
                f"FasterCacheConfig(spatial_attention_block_skip_range={skip}, "
                f"spatial_attention_timestep_skip_range={rng}, is_guidance_distilled=True)"
                + (" (defaults otherwise)" if skip == 2 else ""),
                lambda loop, skip=skip, rng=rng: H["FasterCacheConfig"](
                    spatial_attention_block_skip_range=skip, spatial_attention_timestep_skip_range=rng,
                    is_guidance_distilled=True, current_timestep_callback=lambda: loop.timestep), f"Faster {skip}"))
    if H["TaylorSeerCacheConfig"]:
        out.append(diffusers_method(b, "TaylorSeer default", "diffusers TaylorSeerCache",
                                    "TaylorSeerCacheConfig() (interval 5, from step 3, order 1, bf16 factors)",
                                    lambda loop: H["TaylorSeerCacheConfig"](), "TaylorSeer"))
        out.append(diffusers_method(b, "TaylorSeer lite", "diffusers TaylorSeerCache",
                                    "TaylorSeerCacheConfig(use_lite_mode=True) (forecasts proj_out, skips the blocks)",
                                    lambda loop: H["TaylorSeerCacheConfig"](use_lite_mode=True), "TaylorSeer lite"))
    if H["MagCacheConfig"]:
        try:
            ratios = magcache_ratios(b)
        except Exception as err:  # recorded, not raised
            ratios = None
            out.append(Method("MagCache", "diffusers MagCache", "-", None, b.steps,
                              skip=f"calibration failed: {type(err).__name__}: {err}"))
        for thr, k in ((0.06, 3), (0.24, 4)) if ratios else ():
            out.append(diffusers_method(
                b, f"MagCache thr={thr:g} K={k}", "diffusers MagCache",
                f"MagCacheConfig(threshold={thr:g}, max_skip_steps={k}, mag_ratios=<calibrated, seed {CALIB_SEED}>)"
                + (" (defaults otherwise)" if thr == 0.06 else ""),
                lambda loop, thr=thr, k=k: H["MagCacheConfig"](threshold=thr, max_skip_steps=k, mag_ratios=list(ratios),
                                                               num_inference_steps=b.steps), f"Mag {thr:g}"))
            out[-1].notes.append(f"mag_ratios from MagCache's calibrate mode, seed {CALIB_SEED}: "
                                 + ", ".join(f"{r:.3f}" for r in ratios))
    if H["SeaCacheConfig"]:
        callback = flux_raw_vision if b.model.kind == "flux" else None
        for thr, k in ((0.25, 2), (1.0, 3)):
            setting = (f"SeaCacheConfig(threshold={thr:g}, max_consecutive_cached={k}"
                       + (", raw_vision_callback=<unpack tiny-flux latents>" if callback else "") + ")"
                       + (" (defaults otherwise)" if thr == 0.25 else ""))
            m = diffusers_method(b, f"SeaCache thr={thr:g}", "diffusers SeaCache", setting,
                                 lambda loop, thr=thr, k=k: H["SeaCacheConfig"](
                                     threshold=thr, max_consecutive_cached=k, raw_vision_callback=callback),
                                 f"Sea {thr:g}")
            if callback:
                m.notes.append("no built-in SeaCache adapter for Flux: raw_vision_callback written here (generic path)")
            out.append(m)
    return out


# ----------------------------------------------------------------------------- cache-dit
def cache_dit_methods(b: Bench) -> List[Method]:
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except ImportError as err:
        return [Method("cache-dit", "cache-dit", "-", None, b.steps,
                       skip=f"cache-dit not installed (pip install '.[bench]'): {err}")]
    version = getattr(cache_dit, "__version__", "?")
    tuned = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=4)
    settings = [
        ("DBCache default", {}, None),
        ("DBCache F1B0 R0.2", dict(tuned, residual_diff_threshold=0.2), None),
        ("DBCache F1B0 R0.2 + TaylorSeer", dict(tuned, residual_diff_threshold=0.2), 1),
        ("DBCache F1B0 R0.3 + TaylorSeer", dict(tuned, residual_diff_threshold=0.3), 1),
    ]
    out = []
    for name, kw, order in settings:
        def build(backend, kw=kw, order=order):
            tr = b.fresh()
            cfg = DBCacheConfig(num_inference_steps=b.steps, enable_separate_cfg=False, **kw)
            cal = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
            cache_dit.enable_cache(tr, cache_config=cfg, calibrator_config=cal)  # patches tr in place
            fwd = _compiled(tr, backend)
            return Applied(fwd, before=lambda: cache_dit.refresh_context(tr, num_inference_steps=b.steps),
                           roots=lambda: [tr._context_manager], noreset=Applied(fwd),
                           reset_how=f"cache_dit.refresh_context(transformer, num_inference_steps={b.steps})")
        setting = (f"DBCacheConfig({', '.join(f'{k}={v}' for k, v in kw.items()) or 'defaults: F8B0, W8, R0.08'}, "
                   f"num_inference_steps={b.steps}, enable_separate_cfg=False)"
                   + (f" + TaylorSeerCalibratorConfig(taylorseer_order={order})" if order else ""))
        out.append(Method(f"cache-dit {name}", f"cache-dit {version}", setting, build, b.steps, group="cache-dit",
                          config=setting, label=name.replace("DBCache ", "DB ").replace(" + TaylorSeer", "+TS")))
    return out


# ----------------------------------------------------------------------------- searches
def run_searches(b: Bench, targets: Sequence[float], repeats: int, max_full_runs: int, quick: bool = False):
    from npu_cache_fx.search import SearchSession, search

    def run_fn(tr):
        return b.sample(tr, seed=CALIB_SEED)

    session = SearchSession(b.base, run_fn, steps_count=b.steps, progress=False,
                            **(dict(profile_repeats=1, timing_repeats=2) if quick else {}))
    session.prepare()
    b.captures = session.captures  # the methods' modules reuse the session's capture of the transformer
    found = {"mindie": {}, "ours": {}}
    info = []
    for t in targets:
        for strategy in ("mindie", "ours"):
            kw = dict(max_full_runs=max_full_runs) if strategy == "ours" else {}
            r = search(b.base, run_fn, target_speedup=t, strategy=strategy, session=session, repeats=repeats,
                       progress=False, **kw)
            info.append({"target": t, "strategy": strategy, "plan": r.best.label if r.best else None,
                         "search_measured_speedup": r.best.timed_speedup if r.best else None,
                         "search_mse": r.best.mse if r.best else None, "full_runs": r.full_runs,
                         "seconds": r.seconds})
            if r.best is not None:
                found[strategy].setdefault(r.best.label, {"cfgs": r.config, "targets": []})["targets"].append(t)
            print(f"   search {strategy:6s} x{t:g}: {info[-1]['plan']} (search-measured "
                  f"x{tb.fmt(info[-1]['search_measured_speedup'])}, {r.full_runs} full runs, {r.seconds:.0f} s)",
                  flush=True)
    return found, info, session.prepare_seconds


def targets_label(ts: Sequence[float]) -> str:
    return "/".join(f"x{t:g}" for t in ts)


# ----------------------------------------------------------------------------- measuring
class Probe:
    """Calls ``call`` and, after every call, records the peak bytes held by ``roots()``."""

    def __init__(self, call: Callable, roots: Callable[[], List[Any]], exclude: Sequence[torch.Tensor]):
        self.call, self.roots, self.exclude, self.peak = call, roots, exclude, 0

    def __call__(self, *args, **kwargs):
        out = self.call(*args, **kwargs)
        self.peak = max(self.peak, tb.held_tensor_bytes(self.roots(), self.exclude))
        return out


def cache_bytes(b: Bench, m: Method) -> Tuple[Optional[int], str]:
    a = m.applied
    if a.opt is not None:
        return int(a.opt.stats.cache_bytes), "stats.cache_bytes"
    if m.family in ("uncached", "fewer steps"):
        return 0, "-"
    probe = Probe(a.call, a.roots, b.params)
    b.generate(Applied(probe, a.before, a.after), m.steps)
    return probe.peak, "peak held tensors"


def count_compiles(b: Bench, m: Method) -> Dict[str, Any]:
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    counter = tb.CompileCounter()
    out: Dict[str, Any] = {"graphs": None, "recompiles": None, "graph_breaks": None, "limit_hit": None,
                           "compile_error": None}
    t0 = time.perf_counter()
    try:
        a = m.build(counter)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b.generate(a, m.steps)
    except Exception as err:
        out["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    out.update(graphs=counter.graphs, recompiles=counter.recompiles, limit_hit=counter.limit_hit,
               graph_breaks=sum(counters["graph_break"].values()), seconds=time.perf_counter() - t0)
    return out


def dominated_by(row: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Rows at >= speedup and >= PSNR, one of them strictly (so ``row`` is off their Pareto front)."""
    x, y = row["speedup"], row["psnr"]
    return [r["method"] for r in rows if r is not row and r["speedup"] >= x and r["psnr"] >= y
            and (r["speedup"] > x or r["psnr"] > y)]


def verdict(rows: Sequence[Dict[str, Any]], targets: Sequence[float]) -> Dict[str, Any]:
    eager = [r for r in rows if r["status"] == "ok" and not r["compiled"]]
    ours = [r for r in eager if r["family"] == OURS]
    per_target, lines = [], []
    for t in targets:
        at = [r for r in eager if r["speedup"] >= t]
        best = max(at, key=lambda r: (r["psnr"], r["speedup"])) if at else None
        ours_at = [r for r in ours if r["speedup"] >= t]
        ob = max(ours_at, key=lambda r: (r["psnr"], r["speedup"])) if ours_at else None
        item = {"target": t, "best": best and best["method"], "best_psnr": best and best["psnr"],
                "best_speedup": best and best["speedup"], "ours_best": ob and ob["method"],
                "ours_psnr": ob and ob["psnr"], "ours_speedup": ob and ob["speedup"],
                "ours_wins": bool(best is not None and best["family"] == OURS)}
        per_target.append(item)
        if best is None:
            lines.append(f"x{t:g}: no eager row reaches x{t:g}")
            continue
        s = f"x{t:g}: best PSNR at >= x{t:g} is {best['method']} ({best['psnr']:.1f} dB at x{best['speedup']:.2f})"
        if ob is None:
            s += f"; no {OURS} row reaches x{t:g}"
        elif ob is best:
            s += f" -- {OURS} wins"
        else:
            s += f"; {OURS}'s best there: {ob['method']} {ob['psnr']:.1f} dB at x{ob['speedup']:.2f} " \
                 f"({ob['psnr'] - best['psnr']:+.1f} dB)"
        lines.append(s)
    front = []
    for r in ours:
        dom = dominated_by(r, eager)
        front.append({"method": r["method"], "on_front": not dom, "dominated_by": dom})
    on = [f["method"] for f in front if f["on_front"]]
    off = [f for f in front if not f["on_front"]]
    fs = (f"{OURS} on the Pareto front: {'yes' if on else 'NO'}"
          + (f" ({', '.join(on)})" if on else "")
          + "".join(f"; {f['method']} is dominated by {', '.join(f['dominated_by'])}" for f in off))
    lines.append(fs)
    beyond = []
    if ours:
        fastest = max(r["speedup"] for r in ours)
        beyond = [r for r in eager if r["speedup"] > fastest and not dominated_by(r, eager)]
        if beyond:
            lines.append(f"faster than {OURS}'s fastest row (x{fastest:.2f}) the front is "
                         + ", ".join(f"{r['method']} ({r['psnr']:.1f} dB at x{r['speedup']:.2f})"
                                     for r in sorted(beyond, key=lambda r: r["speedup"])))
    compiled = [r for r in rows if r["status"] == "ok" and r["compiled"] and r.get("speedup_vs_uncached_inductor")]
    if compiled:
        lines.append("inductor: " + ", ".join(
            f"{r['method']} x{r['speedup']:.2f} vs uncached eager / x{r['speedup_vs_uncached_inductor']:.2f} vs "
            "uncached inductor" for r in compiled))
    return {"per_target": per_target, "front": front, "ours_on_front": bool(on), "lines": lines,
            "front_beyond_ours": [r["method"] for r in beyond]}


def run_model(name: str, args) -> Dict[str, Any]:
    t_model = time.perf_counter()
    b = Bench(name, args.samples, args.steps)
    steps = b.steps
    print(f"\n## {name}: {steps} steps, {len(b.labels)} samples (seed {EVAL_SEED}; tuning seed {CALIB_SEED})",
          flush=True)

    # searches (ours + MindIE's on one session) and AdaStep calibration, on the calibration seed
    t0 = time.perf_counter()
    found, search_info, prepare_s = run_searches(b, args.targets, args.search_repeats, args.max_full_runs,
                                                 args.quick)
    calib_gen = tb.Generations(b.model, b.labels, steps, seed=CALIB_SEED)
    ladder = ADA_LADDER[1::3] if args.quick else ADA_LADDER
    thresholds, ada_table = calibrate_adastep(b.model, calib_gen, steps, ADA_MAX_SKIP, ladder, b.captures)
    tuning_s = time.perf_counter() - t0
    print(f"   AdaStep thresholds {thresholds}; tuning took {tuning_s:.0f} s", flush=True)

    methods: List[Method] = [plain_method(b, "uncached", "uncached", steps, f"{steps} steps", "", "")]
    for n in tb.fewer_step_counts(steps, TARGETS):
        methods.append(plain_method(b, f"fewer steps {n}", "fewer steps", n, f"{n} steps", "fewer steps", str(n)))
    for thr in thresholds:
        cfg = [adastep_config(steps, thr, ADA_MAX_SKIP)]
        methods.append(ours_method(b, f"AdaStep thr={thr:g}", "AdaStep (npu_cache_fx)", cfg,
                                   f"CacheConfig(method='adastep', threshold={thr:g}, max_skip_steps={ADA_MAX_SKIP}, "
                                   "decay=0.99)", "AdaStep", f"thr {thr:g}"))
    for plan, v in found["ours"].items():
        lab = targets_label(v["targets"])
        methods.append(ours_method(b, f"{OURS} {lab}", OURS, v["cfgs"], plan, OURS, lab))
    M = mindie_compat.load()
    for plan, v in found["mindie"].items():
        lab = targets_label(v["targets"])
        if M is None:
            methods.append(Method(f"MindIE agent {lab}", "MindIE-SD 3.1.0 agent", plan, None, steps,
                                  skip="mindiesd wheel not installed (pip install --no-deps mindiesd==3.1.0)"))
        else:
            try:
                mm = mindie_method(b, M, v["cfgs"], lab, lab)
                mm.setting = f"{plan}: {mm.setting}"
                methods.append(mm)
            except Exception as err:
                methods.append(Method(f"MindIE agent {lab}", "MindIE-SD 3.1.0 agent", plan, None, steps,
                                      skip=f"{type(err).__name__}: {err}"))
        methods.append(ours_method(b, f"MindIE plan {lab} ({OURS} runtime)", "MindIE search, npu_cache_fx runtime",
                                   v["cfgs"], plan, "MindIE plan (npu_cache_fx runtime)", lab))
    methods += diffusers_methods(b)
    methods += cache_dit_methods(b)
    if args.inductor:
        methods.append(Method("uncached inductor", "uncached (inductor)", "torch.compile(model, backend='inductor')",
                              lambda _backend: Applied(torch.compile(b.fresh(), backend="inductor")), steps,
                              group="inductor", compiled=True, label="uncached"))
        for plan, v in found["ours"].items():
            lab = targets_label(v["targets"])
            methods.append(ours_method(b, f"{OURS} {lab} inductor", f"{OURS} (inductor)", v["cfgs"],
                                       f"{plan}, backend='inductor'", "inductor", lab, backend="inductor"))

    # build + quality pass (also the warm-up: captures, compiles); a failure makes the row "not applicable"
    ref = b.generate(Applied(b.base))
    rows: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        row = {"method": m.name, "family": m.family, "setting": m.setting, "steps": m.steps, "compiled": m.compiled,
               "group": m.group, "label": m.label, "config": m.config, "notes": list(m.notes), "status": "ok"}
        rows[m.name] = row
        if m.skip:
            row.update(status="skipped", reason=m.skip)
            print(f"   skipped {m.name}: {m.skip}", flush=True)
            continue
        t1 = time.perf_counter()
        try:
            m.applied = m.build(None)
            images = b.generate(m.applied, m.steps)
            if m.applied.opt is not None:
                m.applied.opt.stats.clear()
            images2 = b.generate(m.applied, m.steps)
        except Exception as err:
            row.update(status="not applicable", reason=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                       traceback=traceback.format_exc(limit=-4))
            m.applied = None
            print(f"   NOT APPLICABLE {m.name}: {row['reason']}", flush=True)
            continue
        row["first_generations_s"] = time.perf_counter() - t1
        row.update(tb.quality(images2, ref, b.labels, b.model))
        row["repeatable"] = bool(torch.equal(images, images2))
        if not row["repeatable"]:
            row["notes"].append("two consecutive generations differ (state carried between generations)")
        row["notes"] += m.applied.notes
        if m.applied.noreset is not None:  # does the peer reset its own state between generations?
            x1 = b.generate(m.applied.noreset, m.steps)
            x2 = b.generate(m.applied.noreset, m.steps)
            m.applied.after()
            row["resets_itself"] = bool(torch.equal(x1, x2))
            if not row["resets_itself"]:
                row["notes"].append(f"state carries into the next generation unless {m.applied.reset_how} runs "
                                    f"between generations (done here; without it the 2nd generation's PSNR is "
                                    f"{tb.fmt(tb.quality(x2, ref, b.labels, b.model)['psnr'])} dB)")
        if row["psnr"] == math.inf and m.family not in ("uncached", "uncached (inductor)"):
            row["notes"].append("output identical to uncached: nothing was cached or skipped")
        if m.applied.opt is not None and m.applied.opt.configs:
            st = m.applied.opt.stats
            row["steps_reused"], row["steps_skipped"] = st.steps_reused, st.steps_skipped
    live = [m for m in methods if m.applied is not None]

    # timed generations: every live row, interleaved round-robin
    print(f"   timing {len(live)} methods x {args.repeats} interleaved generations ...", flush=True)
    times = tb.time_generations({m.name: (lambda m=m: b.generate(m.applied, m.steps)) for m in live},
                                repeats=args.repeats)
    sp = tb.speedups(times)
    for m in live:
        row = rows[m.name]
        row["seconds"] = {clock: common.summary(t[m.name], scale=1) for clock, t in times.items()}
        row["speedup"], row["speedup_wall"], row["speedup_cpu"] = sp[args.clock][m.name], sp["wall"][m.name], \
            sp["cpu"][m.name]
    if args.inductor and "uncached inductor" in rows and rows["uncached inductor"]["status"] == "ok":
        base = rows["uncached inductor"]["speedup"]
        for row in rows.values():
            if row["compiled"] and row["status"] == "ok":
                row["speedup_vs_uncached_inductor"] = row["speedup"] / base

    # cache bytes (one more generation, probed after every call), then compile counting (resets dynamo)
    for m in live:
        try:
            rows[m.name]["cache_bytes"], rows[m.name]["cache_bytes_how"] = cache_bytes(b, m)
        except Exception as err:
            rows[m.name]["cache_bytes"], rows[m.name]["cache_bytes_how"] = None, f"error: {type(err).__name__}: {err}"
    if args.compile_count:
        print("   counting graphs / recompiles under torch.compile ...", flush=True)
        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
        unc, counted = None, set()
        for m in live:
            if m.compiled:
                rows[m.name]["compile"] = {"note": "inductor row: see the eager row's count"}
                continue
            if m.family == "fewer steps" and unc is not None:
                rows[m.name]["compile"] = dict(unc, note="same graph as uncached")
                continue
            if args.quick and m.family in counted:
                continue  # --quick: the first row of each family only
            counted.add(m.family)
            rows[m.name]["compile"] = count_compiles(b, m)
            if m.family == "uncached":
                unc = rows[m.name]["compile"]
        torch._dynamo.reset()

    ordered = [rows[m.name] for m in methods]
    v = verdict(ordered, TARGETS)
    headers = ["method", "family", "speedup", "(wall)", "PSNR dB", "MSE", "fidelity", "cache bytes", "graphs",
               "recompiles"]
    table = [table_row(r) for r in ordered]
    print(f"   {name}: speedup = {args.clock} time, median of {args.repeats} interleaved generations; "
          f"model {time.perf_counter() - t_model:.0f} s")
    tb.print_table(headers, table)
    for r in ordered:
        if r["status"] != "ok":
            print(f"   {r['status']}: {r['method']}: {r['reason']}")
    for line in v["lines"]:
        print(f"   verdict {line}")
    curve = sorted((r["speedup"], r["psnr"]) for r in ordered if r["family"] == "fewer steps" and r["status"] == "ok")
    return {"model": name, "steps": steps, "samples": len(b.labels), "targets": list(args.targets),
            "search": search_info, "search_prepare_seconds": prepare_s, "tuning_seconds": tuning_s,
            "ada_thresholds": thresholds, "ada_calibration": ada_table, "rows": ordered,
            "table": {"headers": headers, "rows": table}, "verdict": v, "fewer_curve": curve,
            "seconds": time.perf_counter() - t_model}


def table_row(r: Dict[str, Any]) -> List[Any]:
    if r["status"] != "ok":
        return [r["method"], r["family"], r["status"], "-", "-", "-", "-", "-", "-", "-"]
    c = r.get("compile") or {}
    graphs = c.get("graphs")
    if c.get("compile_error"):
        graphs = f"{graphs} (error)"
    rec = c.get("recompiles")
    if c.get("limit_hit"):
        rec = f"{rec} (limit)"
    return [r["method"], r["family"], r["speedup"], r["speedup_wall"], r["psnr"], f"{r['mse']:.2e}",
            r["class_fidelity"], r.get("cache_bytes"), graphs, rec]


def markdown(result: Dict[str, Any], info: Dict[str, Any], png: str) -> str:
    md = tb.md_header("npu_cache_fx vs MindIE-SD, diffusers hooks, cache-dit, fewer steps, AdaStep "
                      "(benchmarks/peers.py)", info)
    s = result["settings"]
    md += [f"Same labels, seed {EVAL_SEED} and steps for every row; searches / calibrations on seed {CALIB_SEED}. "
           f"{s['repeats']} interleaved generations per row, speedup in {s['clock']} time. Cache bytes: ours "
           "`stats.cache_bytes`; peers: peak bytes of tensors held by their hook / agent / context state during one "
           "generation. Graphs / recompiles: one generation under `torch.compile(..., backend=counter)`.", ""]
    md += [f"Not run: {n}" for n in s["notes"]] + ([""] if s["notes"] else [])
    for name, r in result["models"].items():
        md += [f"## {name} ({r['steps']} steps, {r['samples']} samples)", "",
               tb.markdown_table(r["table"]["headers"], r["table"]["rows"]), "", "Verdict:", ""]
        md += [f"* {line}" for line in r["verdict"]["lines"]]
        md += ["", "Settings and notes:", ""]
        for row in r["rows"]:
            extra = [row.get("reason")] if row["status"] != "ok" else []
            c = row.get("compile") or {}
            if c.get("compile_error"):
                extra.append(f"torch.compile: {c['compile_error']}")
            if row.get("speedup_vs_uncached_inductor") is not None:
                extra.append(f"x{row['speedup_vs_uncached_inductor']:.2f} vs uncached inductor")
            text = "; ".join(str(x) for x in [row["setting"]] + extra + row["notes"] if x)
            md.append(f"* **{row['method']}**: {text}")
        md.append("")
    md += [f"![pareto]({os.path.basename(png)})", ""]
    return "\n".join(md)


def plot(result: Dict[str, Any], png: str) -> str:
    panels = []
    for name, r in result["models"].items():
        points: Dict[str, List[Tuple[float, float, str]]] = {}
        for row in r["rows"]:
            if (row["status"] != "ok" or row["family"] in ("uncached", "fewer steps", "uncached (inductor)")
                    or not row["group"]):
                continue  # uncached inductor: ~147 dB (rounding only), off the scale
            points.setdefault(row["group"], []).append((row["speedup"], row["psnr"], row.get("label") or ""))
        panels.append((f"{name}: {r['steps']} steps, {r['samples']} samples (measured in one run)",
                       {"fewer steps": r["fewer_curve"]}, points))
    return tb.pareto_panels_png(png, panels)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None, help="comma list of tiny-flux,tiny-wan (default both; --quick tiny-flux), "
                   "or tiny-flux-deep (only when named)")
    p.add_argument("--samples", type=int, default=10, help="samples per generation (default 10)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 28 / 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per row (default 5)")
    p.add_argument("--targets", default="1.5,2.0,2.5", help="search target speedups (default 1.5,2.0,2.5)")
    p.add_argument("--search-repeats", type=int, default=3, help="timing rounds per search finalist (default 3)")
    p.add_argument("--max-full-runs", type=int, default=6, help="our search's full generations (default 6)")
    p.add_argument("--no-inductor", dest="inductor", action="store_false", help="skip the inductor rows")
    p.add_argument("--no-compile-count", dest="compile_count", action="store_false",
                   help="skip counting graphs / recompiles under torch.compile")
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="'fresh' (default): an empty TORCHINDUCTOR_CACHE_DIR, so compiles are cold")
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny-flux, 2 samples, 10 steps, 1 repeat, target 2.0, no inductor, graphs "
                        "counted for the first row of each family (numbers are not meaningful)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.search_repeats, args.max_full_runs = min(args.samples, 2), 1, 1, 3
        args.steps = args.steps or 10
        args.targets = "2.0"
        args.inductor = False
    if args.repeats < 1 or args.samples < 1:
        p.error("--repeats and --samples must be >= 1")
    args.targets = [float(t) for t in args.targets.split(",")]
    args.clock = tb.resolve_clock(args.clock, args.threads)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_all = time.perf_counter()
    info = tb.start(args, "peers", argv)
    tmp = None
    if args.inductor and args.inductor_cache == "fresh":  # removed when main() returns
        tmp = tempfile.TemporaryDirectory(prefix="inductor_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name
    names, notes = tb.models_to_run(args.models, args.quick)
    versions = {}
    for mod in ("diffusers", "cache_dit"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    try:
        import importlib.metadata as md
        versions["mindiesd"] = md.version("mindiesd") if mindie_compat.load() is not None else None
    except Exception:
        versions["mindiesd"] = None
    print(f"peers   : {versions}")
    result: Dict[str, Any] = {"machine": info, "versions": versions, "settings": {
        "samples": args.samples, "steps": args.steps, "repeats": args.repeats, "targets": args.targets,
        "quick": args.quick, "inductor": args.inductor, "compile_count": args.compile_count, "clock": args.clock,
        "eval_seed": EVAL_SEED, "calibration_seed": CALIB_SEED, "models": names, "notes": notes}, "models": {}}
    with torch.no_grad():
        for name in names:
            result["models"][name] = run_model(name, args)
    result["seconds"] = time.perf_counter() - t_all
    png = tb.sibling(args.out, ".png")
    plot(result, png)
    path, mdpath = tb.write_outputs(args.out, result, markdown(result, info, png))
    print(f"\nwrote {path}, {mdpath}, {png} ({result['seconds']:.0f} s)")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
