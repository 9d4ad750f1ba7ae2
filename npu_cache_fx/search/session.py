"""What every search strategy shares: one capture, one reference run, the cost model, full evaluations.

:class:`SearchSession` runs the uncached model once (reference output and
timing), runs the reference again through a :class:`Recorder` (per-step
signals, the capture, the flat inputs), measures the cost model, and then
evaluates candidate plans: each one is ``optimize(model, configs,
captures=session.captures)`` -- the capture is never redone
(``stats.captures == 0`` is checked for every candidate).

Several denoisers that split each generation's steps (Wan 2.2's two experts: ``transformer`` for the
high-noise steps, ``transformer_2`` after its boundary) are searched together: pass
``{"transformer": t1, "transformer_2": t2}`` as the model and a ``run_fn`` that takes such a dict. They
must capture the same graph (one architecture); the recording follows the pipeline's calls, the steps
at which another denoiser takes over become ``segments`` (each denoiser keeps its own cache, so a read
with no write of its own in its segment computes: :func:`~npu_cache_fx.schedule.segment_actions`), and
one plan comes back for the whole generation -- what ``enable_cache`` gives each expert.

Counts kept, so strategies compare honestly: ``full_runs`` (candidate
generations run to measure quality -- what MindIE's search spends),
``timing_runs`` (repeats run only to time finalists, uncached included) and
``reference_runs``.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..capture import Capture, find_block_lists
from ..metrics import mse as mse_fn
from ..metrics import psnr as psnr_fn
from ..metrics import sample_mse
from ..config import CacheConfig
from ..runtime import CaptureCache, optimize
from .costs import CostModel
from .proxy import Proxy, watch_nodes
from .signals import Recorder, Sketch
from .space import BlockSeq, Candidate
from ..profile import no_gc

__all__ = ["SearchSession", "block_sequence", "as_tensor"]

log = logging.getLogger(__name__)


def as_tensor(out: Any) -> torch.Tensor:
    """The tensor a ``run_fn`` returned (first tensor of a tuple/list, ``.sample``/``.images``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return as_tensor(out[0])
    for attr in ("sample", "images", "frames"):
        if hasattr(out, attr):
            return as_tensor(getattr(out, attr))
    raise TypeError(f"run_fn must return a tensor (or a tuple/list/output object holding one), got {type(out)!r}")


def block_sequence(model: torch.nn.Module, cap: Optional[Capture] = None,
                   blocks: Optional[Sequence[str]] = None) -> BlockSeq:
    """The model's block lists in execution order (by their first node in the captured graph)."""
    names = list(blocks) if blocks else [b.fqn for b in find_block_lists(model)]
    if cap is not None:
        order = {n.name: i for i, n in enumerate(cap.gm.graph.nodes)}
        present = [n for n in names if n in cap.spans and cap.spans[n] and cap.spans[n][0]]
        names = sorted(present, key=lambda n: order[cap.spans[n][0][0]])
    return BlockSeq(tuple((n, len(model.get_submodule(n))) for n in names))


def make_clock(kind: str = "auto", device=None) -> Callable[[], float]:
    """``"wall"``: perf_counter; ``"cpu"``: this process's CPU time; ``"auto"``: CPU time when torch runs
    single-threaded on the CPU (then it measures the work and ignores other processes sharing the
    machine), else wall time."""
    if kind == "wall":
        return time.perf_counter
    if kind == "cpu":
        return time.process_time
    if kind != "auto":
        raise ValueError(f"clock must be 'auto', 'wall' or 'cpu', got {kind!r}")
    on_cpu = device is None or torch.device(device).type == "cpu"
    return time.process_time if on_cpu and torch.get_num_threads() == 1 else time.perf_counter


class SearchSession:
    """One model + ``run_fn``: reference, cost model and proxy, shared by every search on them.

    ``clock``: ``"auto"`` (default) times with this process's CPU time when torch runs
    single-threaded on the CPU -- on a machine shared with other work, wall time of a
    generation varies by 2x from one run to the next while CPU time does not -- and
    with wall time otherwise (accelerators, several threads). Wall times are kept too.
    """

    def __init__(self, model: Any, run_fn: Callable[[Any], Any], *, steps_count: Optional[int] = None,
                 blocks: Optional[Sequence[str]] = None, attention: Optional[str] = None, backend=None,
                 backend_options: Optional[Dict[str, Any]] = None, sketch_elements: int = 16384,
                 profile_repeats: int = 3, timing_repeats: int = 8, progress: bool = True, lateness: float = 0.0,
                 encoder_weight: float = 0.0, clock: str = "auto"):
        if isinstance(model, Mapping):
            if not model or not all(isinstance(m, torch.nn.Module) for m in model.values()):
                raise TypeError("SearchSession(model=...): a module, or a dict of denoiser name -> module "
                                f"(several denoisers splitting the steps), got {model!r}")
            self.denoisers: Dict[str, torch.nn.Module] = dict(model)
        else:
            self.denoisers = {"model": model}
        self.given = model  # what run_fn gets for the uncached generation
        self._captures = {name: CaptureCache(m) for name, m in self.denoisers.items()}
        self._use(next(iter(self.denoisers)))
        self.segments: Tuple[int, ...] = ()  # steps at which another denoiser takes over
        self.run_fn = run_fn
        self.steps_count = steps_count
        self.blocks = blocks
        self.attention = attention
        self.backend = backend
        self.backend_options = backend_options
        self.sketch_elements = sketch_elements
        self.profile_repeats = profile_repeats
        self.timing_repeats = timing_repeats
        self.progress = progress
        self.lateness = lateness
        self.encoder_weight = encoder_weight
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self.clock_kind = clock
        self.clock = make_clock(clock, device)
        self.clock_name = "cpu" if self.clock is time.process_time else "wall"
        self.full_runs = 0
        self.timing_runs = 0
        self.reference_runs = 0
        self.plain_seconds: List[float] = []  # by self.clock
        self.plain_wall: List[float] = []
        self.reference: Optional[torch.Tensor] = None
        self.recorder: Optional[Recorder] = None
        self.cost: Optional[CostModel] = None
        self.proxy: Optional[Proxy] = None
        self.seq: Optional[BlockSeq] = None
        self.prepare_seconds = 0.0
        self.reference_check_mse: Optional[float] = None
        self._evaluated: Dict[Any, Candidate] = {}
        self._modules: Dict[Any, Any] = {}
        self._run_fn_steps: Optional[Callable[[Any, int], Any]] = None

    # ------------------------------------------------------------------ helpers
    def _timed(self, fn: Callable[[], Any]):
        with torch.no_grad(), no_gc():
            w0, c0 = time.perf_counter(), self.clock()
            out = fn()
            return out, self.clock() - c0, time.perf_counter() - w0

    def counts(self) -> Dict[str, int]:
        return {"full_runs": self.full_runs, "timing_runs": self.timing_runs, "reference_runs": self.reference_runs}

    # ------------------------------------------------------------------ setup
    def prepare(self) -> "SearchSession":
        """Reference output, recorded signals, capture, cost model and proxy (once per session)."""
        if self.cost is not None:
            return self
        t0 = time.perf_counter()
        out, _, _ = self._timed(lambda: self.run_fn(self.given))  # warm-up + reference output
        self.reference = as_tensor(out).detach().clone()
        self.reference_runs += 1

        holder: Dict[str, Any] = {}

        def watch(name: str, cap: Capture) -> List[str]:
            if "cap" not in holder:  # the first denoiser called defines the graph every plan is built from
                seq = block_sequence(self.denoisers[name], cap, self.blocks)
                holder.update(cap=cap, name=name, seq=seq,
                              cm=CostModel(cap, self.denoisers[name], seq, {}, 0.0, 0.0, 0.0, 0, 0))
                holder["nodes"] = watch_nodes(holder["cm"], seq, self.attention)
            elif cap.gm.code != holder["cap"].gm.code:
                raise ValueError(f"SearchSession: denoisers {holder['name']!r} and {name!r} capture different "
                                 "graphs; one plan over both needs one architecture (search each on its own)")
            return holder["nodes"]

        recs: Dict[str, Recorder] = {}
        for name, m in self.denoisers.items():
            recs[name] = Recorder(m, self._captures[name], functools.partial(watch, name),
                                  Sketch(self.sketch_elements), clock=self.clock, name=name,
                                  shared=next(iter(recs.values()), None))
        with torch.no_grad():
            start = self.clock()
            rec_out = as_tensor(self.run_fn(self._as_given(recs)))
            total = self.clock() - start
        self.reference_runs += 1
        if "cap" not in holder:
            raise RuntimeError("run_fn never called the transformer it was given")
        self._use(holder["name"])
        rec = self.recorder = recs[self._main]
        rec.seconds_inside = sum(r.seconds_inside for r in recs.values())
        self.reference_check_mse = mse_fn(rec_out, self.reference)
        ref_power = max(float(self.reference.double().pow(2).mean()), 1e-12)
        if self.reference_check_mse > 1e-6 * ref_power:
            log.warning("the captured graph's output differs from the eager model's (mse %.3g); is run_fn "
                        "deterministic (same seed every call)?", self.reference_check_mse)
        contexts = rec.contexts()
        first = [c for c in rec.calls if c["primary"] and c["context"] == contexts[0]]
        steps = len(first)
        self.segments = tuple(i for i in range(1, steps) if first[i]["denoiser"] != first[i - 1]["denoiser"])
        if self.steps_count is None:
            self.steps_count = steps
        elif self.steps_count != steps:
            raise ValueError(f"steps_count={self.steps_count} but run_fn made {steps} transformer calls per "
                             f"cache context ({contexts[0]!r})")
        calls = len(rec.calls)
        t_outside = max(total - rec.seconds_inside, 0.0) / calls
        self.seq = holder["seq"]
        mid = rec.inputs[len(rec.inputs) // 2]
        cap = rec.capture
        kwargs = self._kwargs_of(cap, mid)
        self.cost = CostModel.measure(cap, self.model, self.seq, mid, eager_call=lambda: self.model(**kwargs),
                                      t_outside=t_outside, steps=self.steps_count, calls=calls,
                                      repeats=self.profile_repeats, timing_repeats=self.timing_repeats,
                                      clock=self.clock)
        self.cost._regions.update(holder["cm"]._regions)
        self.cost._sites.update(holder["cm"]._sites)
        self.cost.segments = self.segments
        self._verify_cost_model(kwargs)
        _, secs, wall = self._timed(lambda: self.run_fn(self.given))  # a warm uncached generation, timed
        self.plain_seconds.append(secs)
        self.plain_wall.append(wall)
        self.reference_runs += 1
        # Predictions stay in the units of the interleaved micro-benchmark (t_eager vs t_graph measured
        # side by side); the generation measured here is kept for the report.
        self.proxy = Proxy(rec, self.cost, lateness=self.lateness, attention=self.attention,
                           encoder_weight=self.encoder_weight, segments=self.segments)
        self.prepare_seconds = time.perf_counter() - t0
        return self

    def _verify_cost_model(self, kwargs) -> None:
        """Check the cost model's dead-code analysis against the runtime's real READ variants."""
        cm = self.cost
        variants: Dict[Any, frozenset] = {}

        def variant_nodes(configs, decision):
            key = (tuple(configs), tuple(decision))
            if key not in variants:
                graph = self._modules_of(self.optimized(configs))[self._main].build_variant(tuple(decision),
                                                                                            **kwargs)
                variants[key] = frozenset(n.name for n in graph.graph.nodes)
            return variants[key]

        cm.variant_nodes = variant_nodes
        samples = []
        for fqn, count in self.seq.lists:
            samples.append([CacheConfig(steps_count=self.steps_count, step_interval=2, blocks=fqn, block_start=0,
                                        block_end=count)])
            try:
                if cm.sites(fqn, 0, count, self.attention):
                    samples.append([CacheConfig(method="attention_cache", steps_count=self.steps_count,
                                                step_interval=2, blocks=fqn, block_start=0, block_end=count,
                                                attention=self.attention)])
            except Exception:  # no attention submodule
                pass
        if not cm.verify(samples):
            log.warning("the runtime's READ variants keep more of the graph than a cached range needs "
                        "(%s); predictions use the real variant graphs",
                        "; ".join(f"{r['configs']}: {r['variant_nodes']} nodes kept, {r['ideal_nodes']} needed"
                                  for r in cm.verification if "mismatch" in r))

    @staticmethod
    def _kwargs_of(cap: Capture, leaves) -> Dict[str, Any]:
        from torch.utils import _pytree as pytree
        (_, kwargs) = pytree.tree_unflatten(list(leaves), cap.in_spec)
        return kwargs

    @property
    def plain_median(self) -> float:
        return statistics.median(self.plain_seconds)

    # ------------------------------------------------------------------ evaluation
    def _use(self, name: str) -> None:
        """The denoiser whose capture the cost model, the proxy and the variant checks use."""
        self._main = name
        self.model, self.captures = self.denoisers[name], self._captures[name]

    def _as_given(self, by_name: Dict[str, Any]) -> Any:
        """Per-denoiser objects in the form ``run_fn`` takes: the dict, or the one module's."""
        return by_name if isinstance(self.given, Mapping) else by_name["model"]

    def optimized(self, configs):
        """``configs`` applied to the denoiser(s), with the session's captures: what ``run_fn`` takes (a
        module, or a dict of them when the session was given several denoisers)."""
        opts = {name: optimize(m, list(configs), captures=self._captures[name], backend=self.backend,
                               backend_options=self.backend_options) for name, m in self.denoisers.items()}
        return self._as_given(opts)

    @staticmethod
    def _modules_of(opt) -> Dict[str, Any]:
        return dict(opt) if isinstance(opt, Mapping) else {"model": opt}

    def _prebuild(self, opt) -> None:
        """Build (and compile) every variant of the plan before the timed run."""
        kwargs = self._kwargs_of(self.recorder.capture, self.recorder.inputs[0])
        try:
            for module in self._modules_of(opt).values():
                for decision in module.plan.variants():
                    module.build_variant(decision, **kwargs)
        except Exception as err:  # the timed run will build what is missing
            log.debug("could not pre-build variants: %s", err)

    def has_run(self, cand: Candidate) -> bool:
        """Whether this session already ran ``cand``'s plan in full (then :meth:`evaluate` costs nothing)."""
        return cand.key in self._evaluated

    def evaluated_plans(self) -> List[Candidate]:
        """Every plan this session ran in full, in run order."""
        return list(self._evaluated.values())

    def evaluate(self, cand: Candidate, *, keep_module: bool = True) -> Candidate:
        """One full generation of ``cand``: MSE/PSNR vs the uncached reference, and its time."""
        self.prepare()
        key = cand.key
        done = self._evaluated.get(key)
        if done is not None:
            if done is not cand:
                for attr in ("mse", "psnr", "seconds", "measured_speedup"):
                    setattr(cand, attr, getattr(done, attr))
                cand.notes.update({k: v for k, v in done.notes.items() if k not in cand.notes})
            return cand
        opt = self.optimized(cand.configs())
        self._prebuild(opt)
        out, secs, wall = self._timed(lambda: self.run_fn(opt))
        self.full_runs += 1
        stats = [m.stats for m in self._modules_of(opt).values()]
        captures = sum(st.captures for st in stats)
        if captures != 0:
            raise AssertionError(f"candidate {cand.label} recaptured the model ({captures} captures); "
                                 "the search must reuse the shared capture")
        self._score(cand, out, secs, wall)
        cand.notes["stats"] = {k: sum(getattr(st, k) for st in stats) for k in
                               ("steps_reused", "blocks_skipped", "attention_calls_skipped", "cache_bytes",
                                "captures")}
        self._evaluated[key] = cand
        if keep_module:
            self._modules[key] = opt
        return cand

    def evaluate_steps(self, cand: Candidate, run_fn_steps: Callable[[Any, int], Any]) -> Candidate:
        """One full generation of the plain model with ``cand.sampler_steps`` steps (fewer-steps baseline)."""
        self.prepare()
        done = self._evaluated.get(cand.key)
        if done is not None:
            return done
        self._run_fn_steps = run_fn_steps  # time() runs the baseline again, interleaved
        out, secs, wall = self._timed(lambda: run_fn_steps(self.given, cand.sampler_steps))
        self.full_runs += 1
        self._score(cand, out, secs, wall)
        self._evaluated[cand.key] = cand
        return cand

    def _score(self, cand: Candidate, out: Any, secs: float, wall: float) -> None:
        """Record one full generation's quality against the uncached reference, and its time."""
        out = as_tensor(out)
        cand.mse = mse_fn(out, self.reference)
        cand.psnr = psnr_fn(out, self.reference)
        sample = sample_mse(out, self.reference)
        if sample is not None:
            cand.notes["sample_mse"] = sample
        cand.seconds = secs
        cand.measured_speedup = self.plain_median / max(secs, 1e-12)
        cand.notes["wall_seconds"] = wall

    def time(self, cands: Sequence[Candidate], repeats: int = 3) -> Dict[str, float]:
        """Interleaved timing: per round the uncached model and every candidate once (order alternates).

        Sets ``timed_speedup`` = median uncached / median candidate (``self.clock``); wall-time
        speedups go to ``notes["timed_wall_speedup"]``. Returns the medians.
        """
        self.prepare()
        runners: Dict[str, Callable[[], Any]] = {"plain": lambda: self.run_fn(self.given)}
        for i, c in enumerate(cands):
            if c.sampler_steps is not None:  # the fewer-steps baseline: the plain model, fewer steps
                runners[str(i)] = (lambda k=c.sampler_steps: self._run_fn_steps(self.given, k))
                continue
            opt = self._modules.get(c.key)
            if opt is None:
                opt = self._modules[c.key] = self.optimized(c.configs())
                self._prebuild(opt)
            runners[str(i)] = (lambda o=opt: self.run_fn(o))
        secs: Dict[str, List[float]] = {k: [] for k in runners}
        wall: Dict[str, List[float]] = {k: [] for k in runners}
        names = list(runners)
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                _, s, w = self._timed(runners[name])
                secs[name].append(s)
                wall[name].append(w)
                self.timing_runs += 1
        self.plain_seconds += secs["plain"]
        self.plain_wall += wall["plain"]
        plain, plain_wall = statistics.median(secs["plain"]), statistics.median(wall["plain"])
        for i, c in enumerate(cands):
            c.timed_seconds = secs[str(i)]
            c.timed_speedup = plain / max(statistics.median(secs[str(i)]), 1e-12)
            c.notes["timed_wall_seconds"] = wall[str(i)]
            c.notes["timed_wall_speedup"] = plain_wall / max(statistics.median(wall[str(i)]), 1e-12)
            c.notes["timed_plain_seconds"] = secs["plain"]
        return {k: statistics.median(v) for k, v in secs.items()}

    def release(self) -> None:
        """Drop the optimized modules kept for timing (their cache buffers)."""
        self._modules.clear()
