"""Graph-mode compilation figures: graphs per variant, compile time, recompiles, steady-state step time and
realised vs ideal speedup with a compiler backend (inductor on CPU by default; CUDA graphs on a GPU).

    python benchmarks/compile.py                              # tiny-flux (+ tiny-wan), inductor, CPU
    python benchmarks/compile.py --quick                      # smoke: aot_eager, tiny-flux, short
    python benchmarks/compile.py --device cuda --size flux-dev   # Flux-dev shapes, bf16, reduce-overhead

Five flows per model, with a ~2x plan (tiny models: ``npu_cache_fx.bench.shipped_plan``,
3 graph variants; flux-dev: MindIE's shipped Flux config, double [5,13) + single
[1,23), step_start 18, interval 2, 28 steps):

* ``uncached eager``: the model;
* ``uncached <backend>``: ``torch.compile(model, backend=B)``;
* ``cached eager``: ``optimize(model, plan)``;
* ``cached <backend>``: ``optimize(model, plan, backend=B)`` (the default graphs: regional, each distinct
  block / glue graph compiled once and shared by the variants; full graphs for CUDA graphs);
* ``cached <backend> full``: the same with ``backend_options={"graphs": "full"}`` (one whole graph per
  variant, what ``cached <backend>`` was before regional compilation);
* ``cached <backend> static``: ``cached <backend>`` with ``backend_options={"shapes": "static"}`` (graphs
  compiled for the captured sizes only, what ``cached <backend>`` was before dynamic shapes; its step time is
  the reference of the dynamic graphs' ``dynamic_over_static_step``);
* ``user compile <backend>``: ``torch.compile(optimize(model, plan), backend=B)``.

``B`` is a counting backend wrapping the real one (``--backend``; with ``--mode`` other
than ``default`` the inductor wrapper that ``torch.compile(mode=...)`` builds, e.g.
``reduce-overhead`` = CUDA graphs). It records every graph it is handed, the step
variant that triggered it and the seconds spent in the backend.

Measured:

1. compile: graphs per variant (expect 1) and backend compile seconds per graph, plus the
   wall time of the first call of each variant (dynamo tracing + compile + one run);
   warm-up = 2 generations (CUDA graph trees record on a variant's 2nd call).
2. recompiles: graphs compiled after the warm-up (expect 0); the timed generations run
   under ``torch._dynamo.config.patch(error_on_recompile=True)``; graph breaks from
   ``torch._dynamo.utils.counters``. CUDA: ``counters["inductor"]["cudagraph_skips"]``
   and CUDA-graph captures (warm-up: one per variant; timed phase: 0 = pure replay).
3. steady state: generations of all flows interleaved round-robin (``--repeats``),
   per-step time = median generation / steps, and the median call time per variant;
   process CPU time by default (``--clock``; CUDA: wall), wall-clock speedup alongside.
4. realised vs ideal: as in overhead.py, ideal = uncached / (uncached - blocks skipped),
   with the blocks' costs taken as *shares of a model call* (blocks and the call timed
   together; absolute times measured minutes apart on a shared machine do not compare):
   ideal = steps / (steps - sum over READ steps of the skipped blocks' share). Eager
   flow: shares from forward hooks on the eager blocks. Compiled flows: shares from
   ``split`` (default for tiny models: the captured graph split at block boundaries with
   ``torch.fx.passes.split_module``, every segment compiled with the same backend and
   timed per call) or ``eager`` (the eager hook shares; default for flux-dev, where
   compiling ~60 segments is too slow). Target: realised/ideal >= 0.95.

5. compile cost (``--compile-cost``, on by default): each measurement in a fresh subprocess with its own
   empty inductor cache and ``compile_threads=1`` (so the C++ compiler's CPU time is counted as the
   process's children): the plain model's compile (``torch.compile(model)``, first call), the cold compile
   of all variants, regional and full (dynamic shapes, the default) and regional with static shapes
   (``static``), and the cost of a second resolution (the model called with other image / video sizes
   after two generations at the first). Cost = CPU seconds (self + children) of the calls that captured or
   compiled, less a steady call each; wall seconds and the C++ compiler's CPU seconds (the children) alongside.
   Ratios: regional / plain (goal <= 0.5; ``regional_cpp_compiler_over_plain_compile``: the C++ compiler's
   share of it alone, a floor no saving on the Python side goes below),
   second / first resolution (goal <= 0.1; ``_static``: the per-shape path), regional / full step time and
   dynamic / static step time (goal <= 1.03 each, from the interleaved steady state of 3.).

``--inductor-cache fresh`` (default) points ``TORCHINDUCTOR_CACHE_DIR`` at an empty
temporary folder, so compile times are cold (graphs identical to an earlier one in the
same run still hit the cache, as they would for a user).
Writes JSON (``--out``) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tinybench as tb  # noqa: E402

from npu_cache_fx import CacheConfig, metrics, models, optimize  # noqa: E402
from npu_cache_fx.backends import graph_mode  # noqa: E402
from npu_cache_fx.bench import SHIPPED_PLANS, shipped_plan  # noqa: E402
from npu_cache_fx.capture import find_block_lists  # noqa: E402
from npu_cache_fx.profile import synchronize  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402
from npu_cache_fx.schedule import Action  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "compile.json")
REALISED_MIN = 0.95
FLUX_DEV_STEPS = 28


FLUX_DEV_BLOCKS = (19, 38)
FLOWS = ("uncached eager", "uncached compiled", "cached eager", "cached compiled", "cached compiled full",
         "cached compiled static", "user compile")
GOALS = {"regional_over_plain_compile": 0.5, "second_over_first_resolution": 0.1, "regional_over_full_step": 1.03,
         "dynamic_over_static_step": 1.03}
COST_KINDS = ("plain", "regional", "full", "static")


def mindie_flux_plan(steps: int = FLUX_DEV_STEPS, blocks: Tuple[int, int] = FLUX_DEV_BLOCKS) -> List[CacheConfig]:
    """MindIE-SD's shipped Flux DiT-cache config: double [5,13), single [1,23), start 18, interval 2.

    For another step count or block count (``--steps``, ``--blocks`` smoke runs) the same plan is
    scaled: step_start 18/28 of the steps, block ranges the same fractions of each list.
    """
    def scaled(a: int, b: int, n: int, full: int) -> Tuple[int, int]:
        if n == full:
            return a, b
        lo = min(max(round(a * n / full), 0), n - 1)
        return lo, min(max(round(b * n / full), lo + 1), n)

    start = 18 if steps == FLUX_DEV_STEPS else max(1, min(round(18 * steps / FLUX_DEV_STEPS), steps - 2))
    (d0, d1), (s0, s1) = scaled(5, 13, blocks[0], FLUX_DEV_BLOCKS[0]), scaled(1, 23, blocks[1], FLUX_DEV_BLOCKS[1])
    return [CacheConfig(steps_count=steps, step_start=start, step_interval=2, block_start=d0, block_end=d1,
                        blocks="transformer_blocks", name="double"),
            CacheConfig(steps_count=steps, step_start=start, step_interval=2, block_start=s0, block_end=s1,
                        blocks="single_transformer_blocks", name="single")]


# ----------------------------------------------------------------------------- workloads
class Workload:
    """A model, a plan and a generation loop (``generate(transformer) -> output``)."""

    name: str
    steps: int
    lists: Tuple[str, ...]
    plan: List[CacheConfig]
    device: torch.device
    transformer: torch.nn.Module

    def generate(self, transformer: Optional[Callable] = None) -> torch.Tensor:
        raise NotImplementedError

    def call_kwargs(self) -> Dict[str, Any]:
        """Keyword inputs of one model call (mid-trajectory), for the cost measurements."""
        raise NotImplementedError

    def quality(self, out: torch.Tensor, ref: torch.Tensor) -> Dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class TinyWorkload(Workload):
    def __init__(self, name: str, samples: int, steps: Optional[int], device: torch.device):
        self.model = models.load(name, device=device)
        self.name, self.device = name, device
        self.steps = steps or self.model.default_steps
        self.labels = models.eval_labels(samples)
        self.transformer = self.model.transformer
        # tiny-flux-deep (--compile-cost only): Flux-dev's 19 + 38 block topology, tiny-flux's plan shape
        self.lists = tb.BLOCK_LISTS.get(name) or tuple(b.fqn for b in find_block_lists(self.transformer))
        self.plan = shipped_plan(name, self.steps) if name in SHIPPED_PLANS else [
            CacheConfig(steps_count=self.steps, blocks=b, step_start=3, step_interval=3, forecast="linear")
            for b in self.lists]

    def generate(self, transformer=None):
        out = self.model.sample(self.labels, steps=self.steps, seed=0, transformer=transformer)
        synchronize(self.device)
        return out

    def call_kwargs(self):
        return self.model.inputs(self.labels, t=0.5)

    def quality(self, out, ref):
        return {"psnr": metrics.psnr(out, ref), "class_fidelity": metrics.class_fidelity(out, self.labels)}

    def describe(self):
        return (f"{self.name}: {type(self.transformer).__name__}, {self.model.num_parameters() / 1e6:.2f} M params, "
                f"{len(self.labels)} samples, {self.steps} steps, {self.device}")


class FluxDevWorkload(Workload):
    """diffusers' default ``FluxTransformer2DModel`` config, random bf16 weights, 1024x1024 (4096 + 512 tokens)."""

    def __init__(self, steps: Optional[int], device: torch.device, dtype=torch.bfloat16, seed: int = 0,
                 blocks: Tuple[int, int] = FLUX_DEV_BLOCKS):
        from diffusers import FluxTransformer2DModel
        from diffusers.utils import logging as dlogging
        self.name, self.device, self.dtype = "flux-dev", device, dtype
        self.steps = steps or FLUX_DEV_STEPS
        self.blocks = tuple(blocks)
        self.lists = ("transformer_blocks", "single_transformer_blocks")
        self.plan = mindie_flux_plan(self.steps, self.blocks)
        with torch.device("meta"):
            # diffusers' defaults: 19 double + 38 single blocks, 24 x 128 heads (--blocks: fewer, same width)
            model = FluxTransformer2DModel(num_layers=self.blocks[0], num_single_layers=self.blocks[1])
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # "modules that should be kept in float32: []"
        try:
            model = model.to(dtype).to_empty(device=device)  # bf16 on meta first: 24 GB on the GPU, never fp32
        finally:
            dlogging.set_verbosity(level)
        g = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(mean=0.0, std=0.02, generator=g)
            for b in model.buffers():  # none in diffusers 0.42; to_empty leaves any uninitialised
                b.zero_()
        self.transformer = model.eval().requires_grad_(False)
        cfg = model.config
        self.guidance = cfg.guidance_embeds
        self.image_tokens, self.text_tokens = 4096, 512
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.inputs = dict(
            encoder_hidden_states=torch.randn(1, self.text_tokens, cfg.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
        )
        self.inputs = {k: v.to(device, dtype) for k, v in self.inputs.items()}
        side = 64  # 1024 px / 8 (VAE) / 2 (packing) = 64 -> 4096 image tokens
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        self.inputs["img_ids"] = img_ids.reshape(-1, 3).to(device, dtype)
        self.inputs["txt_ids"] = torch.zeros(self.text_tokens, 3, device=device, dtype=dtype)
        self.noise = torch.randn(1, self.image_tokens, cfg.in_channels, generator=g).to(device, dtype)
        self.params = sum(p.numel() for p in model.parameters())

    def _kwargs(self, x, t):
        kw = dict(hidden_states=x, timestep=t, return_dict=False, **self.inputs)
        kw["guidance"] = torch.full_like(t, 3.5) if self.guidance else None
        return kw

    def generate(self, transformer=None):
        tr = transformer or self.transformer
        ts = torch.linspace(1.0, 0.0, self.steps + 1)
        x = self.noise.clone()
        with torch.no_grad():
            for i in range(self.steps):
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                t = ts[i:i + 1].to(self.device, self.dtype)
                v = tr(**self._kwargs(x, t))[0]
                x = x + (ts[i + 1] - ts[i]).item() * v
        synchronize(self.device)
        return x

    def call_kwargs(self):
        return self._kwargs(self.noise, torch.full((1,), 0.5, device=self.device, dtype=self.dtype))

    def quality(self, out, ref):
        a, b = out.double().cpu(), ref.double().cpu()
        return {"mse": metrics.mse(a, b), "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
                "psnr": None}

    def describe(self):
        depth = ("19 double + 38 single blocks" if self.blocks == FLUX_DEV_BLOCKS else
                 f"{self.blocks[0]} double + {self.blocks[1]} single blocks (--blocks; the default config has 19 + 38)")
        return (f"flux-dev: FluxTransformer2DModel() defaults ({depth}, hidden 3072), "
                f"{self.params / 1e9:.2f} B params, random bf16 weights, batch 1, {self.image_tokens} image + "
                f"{self.text_tokens} text tokens, {self.steps} steps, {self.device}")


# ----------------------------------------------------------------------------- counting backend
def real_backend(backend: str, mode: str) -> Callable:
    if backend == "inductor" and mode != "default":
        return torch._TorchCompileInductorWrapper(mode, None, False)  # what torch.compile(mode=...) builds
    return torch._dynamo.lookup_backend(backend)


class CountingBackend:
    """Wraps a real backend; records every graph it compiles, the variant label and the backend seconds."""

    def __init__(self, backend: str, mode: str = "default"):
        self.inner = real_backend(backend, mode)
        self.graphs: List[Dict[str, Any]] = []
        self.label: Optional[str] = None
        self.phase = "warmup"

    def __call__(self, gm: fx.GraphModule, example_inputs):
        t0 = time.perf_counter()
        fn = self.inner(gm, example_inputs)
        self.graphs.append({"label": self.label, "phase": self.phase, "backend_s": time.perf_counter() - t0,
                            "nodes": sum(1 for n in gm.graph.nodes if n.op == "call_function"),
                            "inputs": len(example_inputs)})
        return fn


def variant_label(decision) -> str:  # (probe() names its own variable ``kind``)
    return kind(decision)


def kind(decision) -> str:
    """Variant label: 'compute' / 'write' / 'read', or one action per config joined by '|'."""
    values = [a.value for a in decision]
    return values[0] if len(set(values)) == 1 else "|".join(values)


class Recorder:
    """A transformer stand-in that labels each call with its step's variant and times it."""

    def __init__(self, fn: Callable, steps: int, plan=None, backend: Optional[CountingBackend] = None,
                 device: torch.device = torch.device("cpu"), sync: bool = False,
                 clock: Callable[[], float] = time.perf_counter):
        self.fn, self.steps, self.plan, self.backend, self.device, self.sync = fn, steps, plan, backend, device, sync
        self.clock = clock
        self.calls = 0
        self.times: Dict[str, List[float]] = {}
        self.first: Dict[str, float] = {}
        self.record = False

    def label(self) -> str:
        if self.plan is None:
            return "full"
        return kind(self.plan.decision(self.calls % self.steps))

    def __call__(self, *args, **kwargs):
        label = self.label()
        if self.backend is not None:
            self.backend.label = label
        w0, t0 = time.perf_counter(), self.clock()
        out = self.fn(*args, **kwargs)
        if self.sync:
            synchronize(self.device)
        dt = self.clock() - t0
        self.calls += 1
        self.first.setdefault(label, time.perf_counter() - w0)  # wall: compiles run partly in worker processes
        if self.record:
            self.times.setdefault(label, []).append(dt)
        return out


@contextmanager
def count_cuda_graph_captures() -> Iterator[List[int]]:
    """Count ``torch.cuda.CUDAGraph.capture_begin`` calls (CUDA graph trees record through it)."""
    box = [0]
    if not torch.cuda.is_available():
        yield box
        return
    cls = torch.cuda.graphs.CUDAGraph
    original = cls.capture_begin

    def counted(self, *a, **k):
        box[0] += 1
        return original(self, *a, **k)

    cls.capture_begin = counted
    try:
        yield box
    finally:
        cls.capture_begin = original


# ----------------------------------------------------------------------------- block costs
def eager_block_costs(w: Workload, repeats: int, clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """Median seconds per block (forward hooks, synchronised) and per hooked model call."""
    per: Dict[Tuple[str, int], List[float]] = {}
    start: Dict[Tuple[str, int], float] = {}
    handles = []
    for fqn in w.lists:
        for i, block in enumerate(w.transformer.get_submodule(fqn)):
            def pre(_m, _a, key=(fqn, i)):
                synchronize(w.device)
                start[key] = clock()

            def post(_m, _a, _o, key=(fqn, i)):
                synchronize(w.device)
                per.setdefault(key, []).append(clock() - start[key])

            handles.append(block.register_forward_pre_hook(pre))
            handles.append(block.register_forward_hook(post))
    kwargs = w.call_kwargs()
    calls = []
    try:
        with torch.no_grad(), common.no_gc():
            for r in range(repeats + 1):
                synchronize(w.device)
                t0 = clock()
                w.transformer(**kwargs)
                synchronize(w.device)
                if r == 0:
                    per.clear()
                    continue
                calls.append(clock() - t0)
    finally:
        for h in handles:
            h.remove()
    blocks = {fqn: [common.median(per[(fqn, i)]) for i in range(len(w.transformer.get_submodule(fqn)))]
              for fqn in w.lists}
    return {"blocks_s": blocks, "call_s": common.median(calls)}


def split_block_costs(w: Workload, captures: CaptureCache, backend: str, mode: str, repeats: int,
                      clock: Callable[[], float] = time.perf_counter) -> Dict[str, Any]:
    """Per-block seconds in compiled mode: the captured graph split at block boundaries, each segment compiled."""
    from torch.fx.passes.split_module import split_module

    cap = next(iter(captures.values()))
    kwargs = w.call_kwargs()
    bound = inspect.signature(w.transformer.forward).bind(**kwargs)
    leaves, spec = pytree.tree_flatten(((), dict(bound.arguments)))
    if spec != cap.in_spec:
        raise RuntimeError("call inputs differ in structure from the capture")
    owner = {n: (fqn, i) for fqn, per in cap.spans.items() if fqn in w.lists
             for i, names in enumerate(per) for n in names}
    seg: Dict[str, int] = {}
    labels: List[Any] = []
    for node in cap.gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        lab = owner.get(node.name, "rest")
        if not labels or labels[-1] != lab:
            labels.append(lab)
        seg[node.name] = len(labels) - 1
    split = split_module(cap.gm, w.transformer, lambda n: seg[n.name])
    counting = CountingBackend(backend, mode)
    t0 = time.perf_counter()
    for name, sub in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, torch.compile(sub, backend=counting, fullgraph=True, dynamic=False))
    samples: Dict[int, List[float]] = {}

    class Timer(fx.Interpreter):
        record = False

        def call_module(self, target, args, kw):
            if not target.startswith("submod_"):
                return super().call_module(target, args, kw)
            synchronize(w.device)
            s = clock()
            out = super().call_module(target, args, kw)
            synchronize(w.device)
            if self.record:
                samples.setdefault(int(target.split("_")[1]), []).append(clock() - s)
            return out

    timer = Timer(split)
    with torch.no_grad():
        timer.run(*leaves)  # compiles every segment
        compile_s = time.perf_counter() - t0
        ref = cap.gm(*leaves)
        got = timer.run(*leaves)
        err = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref)
                  if isinstance(a, torch.Tensor))
        timer.record = True
        with common.no_gc():
            for _ in range(repeats):
                timer.run(*leaves)
    med = {k: common.median(v) for k, v in samples.items()}
    blocks = {fqn: [0.0] * len(w.transformer.get_submodule(fqn)) for fqn in w.lists}
    rest = 0.0
    for k, lab in enumerate(labels):
        if lab == "rest":
            rest += med.get(k, 0.0)
        else:
            blocks[lab[0]][lab[1]] += med.get(k, 0.0)
    return {"blocks_s": blocks, "rest_s": rest, "total_s": rest + sum(sum(v) for v in blocks.values()),
            "segments": len(labels), "graphs": len(counting.graphs), "compile_s": compile_s,
            "max_abs_err_vs_graph": err}


def skipped_per_generation(plan, blocks: Dict[str, List[float]]) -> float:
    """Seconds of blocks skipped over one generation (READ steps), from per-block costs."""
    total = 0.0
    for decision in plan.decisions:
        for cfg, action in zip(plan.configs, decision):
            if action is Action.READ:
                total += sum(blocks[cfg.blocks][cfg.block_start:cfg.block_end])
    return total


# ----------------------------------------------------------------------------- per workload
def run_workload(w: Workload, args) -> Dict[str, Any]:
    b, mode = args.backend, args.mode
    print(f"\n## {w.describe()}")
    print(f"   plan: {' + '.join(c.label for c in w.plan)}; backend {b}, mode {mode}, "
          f"graphs {graph_mode(b, {'mode': mode} if b == 'inductor' else {})} (full: the 'full' flow)")
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    captures = CaptureCache(w.transformer)
    sync = w.device.type != "cpu"
    backends = {f"uncached {b}": CountingBackend(b, mode), f"cached {b}": CountingBackend(b, mode),
                f"cached {b} full": CountingBackend(b, mode), f"cached {b} static": CountingBackend(b, mode),
                f"user compile {b}": CountingBackend(b, mode)}
    opt_eager = optimize(w.transformer, w.plan, captures=captures)
    # the counting backend is a callable: say which graphs a user of backend=b, mode gets by default
    default_graphs = graph_mode(b, {"mode": mode} if b == "inductor" else {})
    opt_comp = optimize(w.transformer, w.plan, backend=backends[f"cached {b}"], captures=captures,
                        backend_options={"graphs": default_graphs})
    opt_full = optimize(w.transformer, w.plan, backend=backends[f"cached {b} full"], captures=captures,
                        backend_options={"graphs": "full"})
    # the same graphs as cached {b}, compiled for the captured sizes only (shapes='static')
    opt_static = optimize(w.transformer, w.plan, backend=backends[f"cached {b} static"], captures=captures,
                          backend_options={"graphs": default_graphs, "shapes": "static"})
    opt_user = optimize(w.transformer, w.plan, captures=captures)
    user = torch.compile(opt_user, backend=backends[f"user compile {b}"])
    plan = opt_eager.plan
    print(f"   {len(plan.variants())} variant(s); {len(plan.reuse_steps())} of {w.steps} steps reuse")
    clock = tb.CLOCKS[args.clock]
    kw = dict(device=w.device, sync=sync, clock=clock)
    flows: Dict[str, Recorder] = {
        "uncached eager": Recorder(w.transformer, w.steps, **kw),
        f"uncached {b}": Recorder(torch.compile(w.transformer, backend=backends[f"uncached {b}"]), w.steps,
                                  backend=backends[f"uncached {b}"], **kw),
        "cached eager": Recorder(opt_eager, w.steps, plan, **kw),
        f"cached {b}": Recorder(opt_comp, w.steps, plan, backends[f"cached {b}"], **kw),
        f"cached {b} full": Recorder(opt_full, w.steps, plan, backends[f"cached {b} full"], **kw),
        f"cached {b} static": Recorder(opt_static, w.steps, plan, backends[f"cached {b} static"], **kw),
        f"user compile {b}": Recorder(user, w.steps, plan, backends[f"user compile {b}"], **kw),
    }
    chosen = {flow_name(f, b) for f in args.flows}
    flows = {name: rec for name, rec in flows.items() if name in chosen}
    backends = {name: bk for name, bk in backends.items() if name in chosen}
    # 1. warm-up: 2 generations per flow (compiles; CUDA graph trees record on the 2nd call of a variant)
    outputs, warm, cg_flow, skips_flow = {}, {}, {}, {}
    with count_cuda_graph_captures() as cg_warm:
        skips0 = counters["inductor"]["cudagraph_skips"]
        for name, rec in flows.items():
            t0 = time.perf_counter()
            c0, k0 = cg_warm[0], counters["inductor"]["cudagraph_skips"]
            with torch.no_grad():
                w.generate(rec)
                outputs[name] = w.generate(rec)
            warm[name] = time.perf_counter() - t0
            cg_flow[name], skips_flow[name] = cg_warm[0] - c0, counters["inductor"]["cudagraph_skips"] - k0
            compiled = [f"{g['label']} {g['backend_s']:.1f} s" for g in getattr(backends.get(name), "graphs", [])]
            print(f"   warm-up {name:<24} {warm[name]:7.1f} s" + (f"  (backend compile: {', '.join(compiled)})"
                                                                 if compiled else ""), flush=True)
        skips_warm = counters["inductor"]["cudagraph_skips"] - skips0
    for bk in backends.values():
        bk.phase = "timed"
    ref = outputs["uncached eager"]
    # 2-3. timed generations under error_on_recompile
    for rec in flows.values():
        rec.record = True
    recompile_error = None
    fns = {name: (lambda rec=rec: w.generate(rec)) for name, rec in flows.items()}
    with count_cuda_graph_captures() as cg_timed:
        skips1 = counters["inductor"]["cudagraph_skips"]
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                all_times = tb.time_generations(fns, repeats=args.repeats)
        except Exception as err:  # a recompile: report it, time again without the check
            recompile_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            print(f"   RECOMPILE during the timed generations: {recompile_error}")
            for rec in flows.values():
                rec.times.clear()
            all_times = tb.time_generations(fns, repeats=args.repeats)
        skips_timed = counters["inductor"]["cudagraph_skips"] - skips1

    # 4. block costs and ideals
    times = all_times[args.clock]
    wall = tb.speedups(all_times, "uncached eager")["wall"]
    eager_costs = eager_block_costs(w, args.cost_repeats, clock)
    split = None
    ideal_source = args.ideal if args.ideal != "auto" else ("eager" if w.name == "flux-dev" else "split")
    if ideal_source == "split":
        try:
            split = split_block_costs(w, captures, b, mode, args.cost_repeats, clock)
        except Exception as err:  # noqa: BLE001 - report, fall back to eager fractions
            print(f"   split block costs failed ({type(err).__name__}: {err}); using eager fractions")
            ideal_source = "eager"

    med = {k: common.median(v) for k, v in times.items()}
    unc_eager = med["uncached eager"]
    compiled_flows = [name for name in flows if name not in ("uncached eager", "cached eager")]
    unc_comp_source = f"uncached {b}"
    if f"uncached {b}" in med:
        unc_comp = med[f"uncached {b}"]
    elif compiled_flows:
        # Flow left out (--flows): the compute variant of a cached compiled flow runs the whole model
        # with no cache ops, so the uncached compiled generation is estimated as steps x its median call.
        src = compiled_flows[0]
        unc_comp = common.median(flows[src].times["compute"]) * w.steps
        unc_comp_source = f"{src}: {w.steps} x compute-variant call"
        print(f"   uncached {b} not run (--flows): its generation estimated as {unc_comp_source}")
    else:
        unc_comp = float("nan")
    # Ideal = steps / (steps - sum over steps of the skipped share of a model call), each share measured
    # within one cost measurement (blocks and the call they belong to, timed together): absolute times taken
    # minutes apart on a shared machine do not compare. The sampler's own per-step work counts as remainder.
    share_eager = skipped_per_generation(plan, eager_costs["blocks_s"]) / eager_costs["call_s"]
    ideals = {"eager": w.steps / (w.steps - share_eager), f"{b} (eager shares)": w.steps / (w.steps - share_eager)}
    if split is not None:
        share_split = skipped_per_generation(plan, split["blocks_s"]) / split["total_s"]
        ideals[f"{b} (split)"] = w.steps / (w.steps - share_split)
        comp_call = (common.median(flows[f"uncached {b}"].times.get("full", [float("nan")]))
                     if f"uncached {b}" in flows else unc_comp / w.steps)
        split["total_over_compiled_call"] = split["total_s"] / comp_call
    ideal_comp = ideals[f"{b} (split)"] if split is not None else ideals[f"{b} (eager shares)"]

    rows: Dict[str, Dict[str, Any]] = {}
    for name, rec in flows.items():
        bk = backends.get(name)
        graphs = bk.graphs if bk else []
        per_label: Dict[str, Dict[str, Any]] = {}
        for g in graphs:
            d = per_label.setdefault(g["label"], {"graphs": 0, "backend_s": 0.0, "timed_graphs": 0})
            d["graphs"] += 1
            d["backend_s"] += g["backend_s"]
            d["timed_graphs"] += g["phase"] == "timed"
        for label, first in rec.first.items():
            per_label.setdefault(label, {"graphs": 0, "backend_s": 0.0, "timed_graphs": 0})["first_call_s"] = first
        compiled = name not in ("uncached eager", "cached eager")
        same = unc_comp if compiled else unc_eager
        row = {"flow": name, "generation_s": common.summary(times[name], scale=1),
               "per_step_ms": med[name] / w.steps * 1e3,
               "call_ms": {k: common.median(v) * 1e3 for k, v in rec.times.items()},
               "speedup_vs_uncached_eager": unc_eager / med[name], "speedup_vs_uncached_same": same / med[name],
               "wall_speedup_vs_uncached_eager": wall[name], "clock": args.clock,
               "variants": per_label, "graphs": len(graphs),
               "recompiles": sum(1 for g in graphs if g["phase"] == "timed"), "warmup_s": warm[name],
               **w.quality(outputs[name], ref)}
        if name.startswith("cached") or name.startswith("user"):
            ideal = ideals["eager"] if not compiled else ideal_comp
            row["ideal"] = ideal
            row["realised"] = same / med[name]
            row["realised_over_ideal"] = row["realised"] / ideal
        rows[name] = row
    graph_breaks = sum(counters["graph_break"].values())

    # tables
    t_compile = []
    for name, row in rows.items():
        for label, d in row["variants"].items():
            t_compile.append([name, label, d["graphs"], d["backend_s"], d.get("first_call_s")])
    order = ["full", "compute", "write", "read"]
    labels = sorted({lab for r in rows.values() for lab in r["call_ms"]},
                    key=lambda lab: (order.index(lab) if lab in order else len(order), lab))
    t_steady = [[name, r["per_step_ms"], *[r["call_ms"].get(lab) for lab in labels], r["speedup_vs_uncached_eager"],
                 r["wall_speedup_vs_uncached_eager"], r["speedup_vs_uncached_same"], r["graphs"], r["recompiles"],
                 r.get("psnr") if r.get("psnr") is not None else r.get("rel_l2")] for name, r in rows.items()]
    t_ideal = [[name, r["ideal"], r["realised"], r["realised_over_ideal"],
                "ok" if r["realised_over_ideal"] >= REALISED_MIN else "MISSED"]
               for name, r in rows.items() if "ideal" in r]
    qual = "PSNR dB" if rows["uncached eager"].get("psnr") is not None else "rel L2"
    h_compile = ["flow", "variant", "graphs", "backend compile s", "first call s"]
    h_steady = ["flow", "per-step ms", *[f"{lab} call ms" for lab in labels], "vs uncached eager", "(wall)",
                "vs uncached same", "graphs", "recompiles", qual]
    h_ideal = ["flow", "ideal", "realised", "realised/ideal", f">= {REALISED_MIN}"]
    print("   1. graphs and compile time per variant (warm-up; wall seconds)")
    tb.print_table(h_compile, t_compile)
    print(f"   2-3. steady state, {args.repeats} interleaved generations per flow, {args.clock} time "
          f"(wall-clock speedup alongside; recompiles = graphs compiled after "
          f"warm-up; graph breaks {graph_breaks}"
          + (f"; RECOMPILE ERROR {recompile_error}" if recompile_error else "; error_on_recompile: none") + ")")
    tb.print_table(h_steady, t_steady)
    if w.device.type == "cuda":
        print(f"   CUDA graphs: captures in warm-up {cg_warm[0]} (per flow {cg_flow}; expect 1 per compiled "
              f"variant), in the timed phase {cg_timed[0]} (expect 0 = replay only); cudagraph_skips warm-up "
              f"{skips_warm} (per flow {skips_flow}), timed {skips_timed}")
    ev = ", ".join(f"{k} {v:.3f}x" for k, v in ideals.items())
    print(f"   4. realised vs ideal (ideal speedups: {ev}; compiled flows use "
          f"{'split' if split is not None else 'eager shares'})")
    tb.print_table(h_ideal, t_ideal)
    if split is not None:
        print(f"      split: {split['segments']} segments, {split['graphs']} graphs compiled in "
              f"{split['compile_s']:.1f} s, block share {1 - split['rest_s'] / split['total_s']:.1%} of "
              f"{split['total_s'] * 1e3:.2f} ms = {split['total_over_compiled_call']:.2f} x the compiled full call "
              f"(max |err| vs graph {split['max_abs_err_vs_graph']:.1e})")
    step_ratio = None
    if f"cached {b}" in rows and f"cached {b} full" in rows:
        step_ratio = rows[f"cached {b}"]["per_step_ms"] / rows[f"cached {b} full"]["per_step_ms"]
        print(f"   step time, cached {b} ({default_graphs} graphs) / cached {b} full: {step_ratio:.3f} "
              f"(medians {rows[f'cached {b}']['per_step_ms']:.3f} / {rows[f'cached {b} full']['per_step_ms']:.3f} "
              f"ms per step; goal <= {GOALS['regional_over_full_step']})")
    dyn_ratio = None
    if f"cached {b}" in rows and f"cached {b} static" in rows and opt_comp.stats.shape_capture.startswith("dynamic"):
        dyn_ratio = rows[f"cached {b}"]["per_step_ms"] / rows[f"cached {b} static"]["per_step_ms"]
        print(f"   step time, cached {b} (dynamic shapes) / cached {b} static: {dyn_ratio:.3f} (medians "
              f"{rows[f'cached {b}']['per_step_ms']:.3f} / {rows[f'cached {b} static']['per_step_ms']:.3f} ms per "
              f"step; goal <= {GOALS['dynamic_over_static_step']})")
    print(f"   shape capture: {opt_comp.stats.shape_capture}")
    return {"workload": w.describe(), "model": w.name, "steps": w.steps, "backend": b, "mode": mode,
            "ratios": {"regional_over_full_step": step_ratio, "dynamic_over_static_step": dyn_ratio},
            "shape_capture": opt_comp.stats.shape_capture,
            "plan": [c.to_dict() for c in w.plan], "plan_table": str(plan), "variants": len(plan.variants()),
            "flows": rows, "graph_breaks": graph_breaks, "recompile_error": recompile_error,
            "cuda_graphs": {"captures_warmup": cg_warm[0], "captures_timed": cg_timed[0],
                            "captures_warmup_per_flow": cg_flow, "cudagraph_skips_per_flow": skips_flow,
                            "cudagraph_skips_warmup": skips_warm, "cudagraph_skips_timed": skips_timed}
            if w.device.type == "cuda" else None,
            "uncached_compiled_source": unc_comp_source, "ideals": ideals,
            "ideal_source": "split" if split is not None else "eager shares",
            "block_costs": {"eager_ms": {k: [x * 1e3 for x in v] for k, v in eager_costs["blocks_s"].items()},
                            "eager_call_ms": eager_costs["call_s"] * 1e3,
                            "split": None if split is None else {
                                **{k: v for k, v in split.items() if k != "blocks_s"},
                                "blocks_ms": {k: [x * 1e3 for x in v] for k, v in split["blocks_s"].items()}}},
            "stats": {"cached eager": tb.stats_dict(opt_eager), f"cached {b}": tb.stats_dict(opt_comp),
                      f"cached {b} full": tb.stats_dict(opt_full), f"user compile {b}": tb.stats_dict(opt_user)},
            "default_graphs": default_graphs,
            "tables": {"compile": {"headers": h_compile, "rows": t_compile},
                       "steady": {"headers": h_steady, "rows": t_steady},
                       "ideal": {"headers": h_ideal, "rows": t_ideal}}}


# ----------------------------------------------------------------------------- compile cost (subprocesses)
def cpu_seconds() -> float:
    """CPU seconds of this process (process_time: ns resolution) and its reaped children (the C++ compiler
    with compile_threads=1; os.times: clock-tick resolution, fine for compiles)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def compiler_seconds() -> float:
    """CPU seconds of this process's reaped children: the C++ compiler (inductor on a CPU, compile_threads=1)."""
    t = os.times()
    return t.children_user + t.children_system


def resolution_kwargs(w: "TinyWorkload", side: Optional[int]) -> Callable[[torch.Tensor, float], Dict[str, Any]]:
    """``(latents, t) -> kwargs`` of one call at another image size: ``side`` latent tokens per image side
    (tiny-flux: 8 at 16x16; tiny-wan: 8 per frame). ``None``: the model's own size."""
    model = w.model
    cond = model.conditioning(model._labels(w.labels))
    if side is not None and model.kind == "flux":
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side).view(side, 1)
        ids[..., 2] = torch.arange(side).view(1, side)
        cond = dict(cond, img_ids=ids.reshape(side * side, 3).to(model.device, model.dtype))

    def make(latents, t):
        tt = torch.full((latents.shape[0],), float(t), device=model.device)
        return model._kwargs(latents.to(model.dtype), tt, cond)
    return make


def latent_noise(w: "TinyWorkload", side: Optional[int]) -> torch.Tensor:
    model = w.model
    shape = list(model.latent_shape)
    if side is not None:
        shape = [side * side, shape[1]] if model.kind == "flux" else shape[:2] + [side, side]
    g = torch.Generator().manual_seed(0)
    return torch.randn([len(w.labels), *shape], generator=g).to(model.device)


def probe(args) -> Dict[str, Any]:
    """One compile-cost measurement (run in a fresh subprocess by :func:`compile_cost`)."""
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1  # the C++ compiler runs as reaped children: its CPU time is counted
    common.set_threads(args.threads)
    w = TinyWorkload(args.models, args.samples, args.steps, torch.device("cpu"))
    kind = args.probe
    mode_opts = {"mode": args.mode} if args.backend == "inductor" and args.mode != "default" else {}
    if kind == "plain":
        fn = torch.compile(w.transformer, backend=args.backend, **({"mode": args.mode} if mode_opts else {}))
        opt = None
    else:  # "static": regional graphs, compiled per shape (shapes='static')
        options = {**mode_opts, "graphs": "regional", "shapes": "static"} if kind == "static" else \
            {**mode_opts, "graphs": kind}
        fn = opt = optimize(w.transformer, w.plan, backend=args.backend, backend_options=options)
    out: Dict[str, Any] = {"kind": kind, "compiler_warmup_cpu_s": 0.0}
    if args.compiler_warmup == "on":  # one-time compiler start-up (imports, toolchain checks), paid by any first
        # compile in a process whatever the model: excluded from both sides by compiling an unrelated graph first
        c0 = cpu_seconds()
        torch.compile(lambda a: (a * 2.0).sin() + a.cos(), backend=args.backend)(torch.randn(8, 8))
        out["compiler_warmup_cpu_s"] = cpu_seconds() - c0
    seen_first = [False]
    for res, side in (("first", None), ("second", args.second_side)):
        make, x0 = resolution_kwargs(w, side), latent_noise(w, side)
        cost_cpu, cost_wall, cost_cc, changed, steady = 0.0, 0.0, 0.0, 0, []
        first_labels: List[str] = []
        steady_by: Dict[str, List[float]] = {}
        for gen in range(2):
            x = x0.clone()
            if opt is not None:
                opt.reset()
            for i in range(w.steps):
                t, t_next = 1.0 - i / w.steps, 1.0 - (i + 1) / w.steps
                before = (opt.stats.captures, opt.stats.graphs_compiled) if opt is not None else None
                c0, w0, cc0 = cpu_seconds(), time.perf_counter(), compiler_seconds()
                with torch.no_grad():
                    v = fn(**make(x, t))[0]
                dc, dw, dcc = cpu_seconds() - c0, time.perf_counter() - w0, compiler_seconds() - cc0
                if opt is not None:
                    new = (opt.stats.captures, opt.stats.graphs_compiled) != before
                else:
                    new = not seen_first[0] or (gen == 0 and i == 0)
                    seen_first[0] = True
                label = opt.trace[-1][2] if opt is not None else "full"
                label = label if isinstance(label, str) else variant_label(label)
                if new:
                    cost_cpu, cost_wall, changed = cost_cpu + dc, cost_wall + dw, changed + 1
                    cost_cc += dcc
                    first_labels.append(label)
                elif gen == 1:
                    steady.append(dc)
                    steady_by.setdefault(label, []).append(dc)
                x = x + (t_next - t) * v.float()
        base = common.median(steady)
        run = sum(common.median(steady_by.get(lab, steady)) for lab in first_labels)  # one steady call each
        out[res] = {"cost_cpu_s": cost_cpu - run, "cost_wall_s": cost_wall - run, "cpp_compiler_cpu_s": cost_cc,
                    "calls_that_compiled": changed, "steady_call_ms": base * 1e3,
                    "tokens": int(x0[0].numel() / x0.shape[-1]) if w.model.kind == "flux" else list(x0.shape[2:])}
    if opt is not None:
        out["stats"] = {k: v for k, v in tb.stats_dict(opt).items()
                        if k in ("captures", "capture_seconds", "compile_seconds", "graphs_compiled",
                                 "graphs_shared", "graph_mode", "timings", "shape_capture", "shapes_reused")}
    return out


def compile_cost(name: str, args) -> Dict[str, Any]:
    """Plain compile, cold compile of all variants (regional, full) and second-resolution cost, each in a
    fresh subprocess with an empty inductor cache."""
    import json
    import subprocess
    results: Dict[str, Any] = {}
    for kind in args.cost_kinds:
        with tempfile.TemporaryDirectory(prefix="inductor_probe_") as tmp:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tmp)
            cmd = [sys.executable, os.path.abspath(__file__), "--probe", kind, "--models", name,
                   "--backend", args.backend, "--mode", args.mode, "--samples", str(args.samples),
                   "--threads", str(args.threads), "--second-side", str(args.second_side),
                   "--compiler-warmup", args.compiler_warmup] + (
                       ["--steps", str(args.steps)] if args.steps else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
            if proc.returncode != 0 or line is None:
                results[kind] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
                print(f"   compile cost {kind}: FAILED {results[kind]['error']}")
                continue
            results[kind] = json.loads(line[len("PROBE "):])
            f, sec = results[kind]["first"], results[kind]["second"]
            print(f"   compile cost {kind:<8} first resolution {f['cost_cpu_s']:7.1f} s cpu ({f['cost_wall_s']:6.1f} s "
                  f"wall; C++ compiler {f['cpp_compiler_cpu_s']:.1f} s), second {sec['cost_cpu_s']:7.1f} s cpu (compiler warm-up excluded: "
                  f"{results[kind]['compiler_warmup_cpu_s']:.1f} s cpu; {time.perf_counter() - t0:.0f} s)", flush=True)
    ratios: Dict[str, Any] = {}
    ok = {k for k in args.cost_kinds if "first" in results.get(k, {})}
    for k in ("regional", "full"):
        if k in ok and "plain" in ok:
            ratios[f"{k}_over_plain_compile"] = results[k]["first"]["cost_cpu_s"] / results["plain"]["first"]["cost_cpu_s"]
            # the part of that ratio the C++ compiler alone accounts for: the floor of any saving on the Python side
            ratios[f"{k}_cpp_compiler_over_plain_compile"] = (results[k]["first"]["cpp_compiler_cpu_s"]
                                                             / results["plain"]["first"]["cost_cpu_s"])
    for k in ("regional", "full", "plain", "static"):
        if k in ok:
            name_k = "second_over_first_resolution" + ("" if k == "regional" else f"_{k}")
            ratios[name_k] = results[k]["second"]["cost_cpu_s"] / results[k]["first"]["cost_cpu_s"]
    results["ratios"] = ratios
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="tiny models, comma list of tiny-flux,tiny-wan (default: both; tiny-wan skipped without "
                        "weights; --quick: tiny-flux); ignored with --size flux-dev")
    p.add_argument("--size", choices=("tiny", "flux-dev"), default="tiny",
                   help="tiny: the shipped models; flux-dev: diffusers' default Flux config, random bf16 weights, "
                        "1024x1024 (needs --device cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    p.add_argument("--backend", default=None, help="compile backend (default inductor; --quick: aot_eager)")
    p.add_argument("--mode", default=None,
                   help="torch.compile mode for inductor (default: 'default' on CPU, 'reduce-overhead' = CUDA "
                        "graphs on CUDA)")
    p.add_argument("--flows", default=",".join(FLOWS),
                   help=f"comma list of flows to run, from {', '.join(FLOWS)} (default: all); 'uncached eager' "
                        "is always run (the baseline); without 'uncached compiled' its generation is estimated as "
                        "steps x the compute-variant call of the cached compiled flow")
    p.add_argument("--blocks", default=None,
                   help="flux-dev: double,single block counts at full width (default 19,38 = diffusers' "
                        "config); fewer for a smoke run; MindIE's plan is scaled to them")
    p.add_argument("--samples", type=int, default=10, help="tiny models: samples per generation (default 10)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the model's; flux-dev 28)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per flow (default 5)")
    p.add_argument("--cost-repeats", type=int, default=10, help="forwards per block-cost measurement (default 10)")
    p.add_argument("--ideal", choices=("auto", "split", "eager"), default="auto",
                   help="compiled-mode block costs: split graph compiled per segment, or eager hook fractions "
                        "(auto: split for tiny models, eager for flux-dev)")
    p.add_argument("--inductor-cache", choices=("fresh", "default"), default="fresh",
                   help="fresh: empty TORCHINDUCTOR_CACHE_DIR (cold compile times, default); default: the user's")
    p.add_argument("--compile-cost", choices=("on", "off", "only"), default=None,
                   help="tiny models: measure the plain compile, the cold compile of all variants (regional, full) "
                        "and a second resolution, each in a fresh subprocess (default on, --quick: off; 'only': "
                        "nothing else, "
                        "and --models may also name tiny-flux-deep, Flux-dev's 19 + 38 blocks at width 64)")
    p.add_argument("--cost-kinds", default=",".join(COST_KINDS),
                   help="compile cost: which compiles to measure, from plain, regional, full (dynamic shapes, the "
                        "default) and static (regional, shapes='static'); default all four")
    p.add_argument("--second-side", type=int, default=12,
                   help="latent tokens per image side of the second resolution (default 12; the models' own is 8)")
    p.add_argument("--compiler-warmup", choices=("on", "off"), default="on",
                   help="compile cost: compile an unrelated tiny graph first in each subprocess, so the compiler's "
                        "one-time start-up (the same for any model) is not counted (default on; its CPU seconds "
                        "are reported as compiler_warmup_cpu_s)")
    p.add_argument("--probe", choices=COST_KINDS, default=None, help=argparse.SUPPRESS)
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: aot_eager, tiny-flux, 2 samples, 8 steps, 1 repeat, eager-fraction ideal "
                        "(numbers are not meaningful)")
    args = p.parse_args(argv)
    if args.quick:
        args.backend = args.backend or "aot_eager"
        args.samples, args.repeats, args.cost_repeats = min(args.samples, 2), 1, 2
        args.steps = args.steps or 8
        args.ideal = "eager" if args.ideal == "auto" else args.ideal
    if args.probe is not None:
        args.models = args.models or "tiny-flux"
    if args.compile_cost is None:
        args.compile_cost = "off" if args.quick else "on"
    args.cost_kinds = [k.strip() for k in args.cost_kinds.split(",") if k.strip()]
    if not set(args.cost_kinds) <= set(COST_KINDS):
        p.error(f"--cost-kinds: choose from {', '.join(COST_KINDS)}; got {args.cost_kinds}")
    args.backend = args.backend or "inductor"
    args.mode = args.mode or ("reduce-overhead" if args.device == "cuda" and args.backend == "inductor"
                              else "default")
    if args.mode != "default" and args.backend != "inductor":
        p.error("--mode applies to --backend inductor only")
    if args.size == "flux-dev" and args.device != "cuda":
        p.error("--size flux-dev needs --device cuda (12 B parameters in bf16; not a CPU benchmark)")
    if args.repeats < 1 or args.samples < 1 or args.cost_repeats < 1:
        p.error("--repeats, --samples and --cost-repeats must be >= 1")
    flows = [f.strip() for f in args.flows.split(",") if f.strip()]
    unknown = [f for f in flows if f not in FLOWS]
    if unknown:
        p.error(f"--flows: unknown flow(s) {unknown}; choose from {', '.join(FLOWS)}")
    args.flows = ["uncached eager"] + [f for f in FLOWS[1:] if f in flows]
    if args.blocks is None:
        args.blocks = FLUX_DEV_BLOCKS
    else:
        try:
            args.blocks = tuple(int(x) for x in args.blocks.split(","))
        except ValueError:
            args.blocks = ()
        if len(args.blocks) != 2 or min(args.blocks) < 2:
            p.error(f"--blocks: expected two block counts >= 2 like 19,38, got {args.blocks!r}")
        if args.size != "flux-dev":
            p.error("--blocks applies to --size flux-dev only")
    args.clock = tb.resolve_clock(args.clock, args.threads, args.device)
    return args


def flow_name(flow: str, backend: str) -> str:
    """Row name of a --flows entry: 'cached compiled' -> 'cached inductor', 'cached compiled full' ->
    'cached inductor full'."""
    return flow.replace("compiled", backend) if "compiled" in flow else (
        f"user compile {backend}" if flow == "user compile" else flow)


def check_device(args) -> torch.device:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                f"benchmarks/compile.py --device cuda: no CUDA device (torch {torch.__version__}, built with CUDA "
                f"{torch.version.cuda or 'none'}; torch.cuda.is_available() is False). Run it on a machine with an "
                "NVIDIA GPU and a CUDA build of torch, or drop --device cuda.")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.probe is not None:  # one compile-cost measurement, in a subprocess of compile_cost()
        import json
        print("PROBE " + json.dumps(probe(args), default=str))
        return {}
    device = check_device(args)
    tmp = None
    if args.inductor_cache == "fresh":
        tmp = tempfile.TemporaryDirectory(prefix="inductor_cache_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tmp.name
    info = tb.start(args, "compile", argv)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        print(f"gpu     : {info['gpu']}")
    print(f"inductor cache: {os.environ.get('TORCHINDUCTOR_CACHE_DIR', 'default')} ({args.inductor_cache})")
    if args.size == "flux-dev":
        names, notes = ["flux-dev"], []
    else:
        if args.compile_cost == "only" and args.models:
            names, notes = [m.strip() for m in args.models.split(",") if m.strip()], []
        else:
            names, notes = tb.models_to_run(args.models, args.quick)
    result: Dict[str, Any] = {"machine": info, "settings": {
        "size": args.size, "device": str(device), "backend": args.backend, "mode": args.mode,
        "samples": args.samples, "steps": args.steps, "repeats": args.repeats, "cost_repeats": args.cost_repeats,
        "flows": args.flows, "blocks": list(args.blocks), "ideal": args.ideal,
        "inductor_cache": args.inductor_cache, "quick": args.quick, "clock": args.clock,
        "models": names,
        "notes": notes}, "targets": {"graphs_per_variant": 1, "recompiles": 0, "realised_over_ideal_min":
                                     REALISED_MIN}, "models": {}}
    md = tb.md_header("Graph-mode compilation (benchmarks/compile.py)", info)
    md += [f"Not run: {n}" for n in notes] + ([""] if notes else [])
    try:
        for name in names:
            if args.compile_cost == "only":
                print(f"\n## {name}")
                r = {"workload": name, "model": name, "ratios": {}}
            else:
                w = FluxDevWorkload(args.steps, device, blocks=args.blocks) if name == "flux-dev" else TinyWorkload(
                    name, args.samples, args.steps, device)
                r = run_workload(w, args)
                del w
            result["models"][name] = r
            if args.size == "tiny" and args.compile_cost != "off":
                print(f"   5. compile cost ({args.backend}; fresh subprocess and inductor cache each; second "
                      f"resolution: {args.second_side} latent tokens per side)")
                cost = r["compile_cost"] = compile_cost(name, args)
                r["ratios"].update(cost["ratios"])
            ratio_line = ", ".join(f"{k} {v:.3f}" + (f" (goal <= {GOALS[k]})" if k in GOALS else "")
                                   for k, v in r["ratios"].items() if v is not None)
            print(f"   ratios: {ratio_line}")
            if "tables" not in r:  # --compile-cost only
                md += [f"## {name}", "", f"Compile cost: {r.get('compile_cost')}", "", f"Ratios: {ratio_line}", ""]
                continue
            t = r["tables"]
            plan_names = ", ".join(c.get("name") or c.get("blocks", "") for c in r["plan"])
            md += [f"## {r['workload']}", "", f"Plan: {plan_names} ({r['variants']} variants); backend "
                   f"{r['backend']}, mode {r['mode']}.", "",
                   "Graphs and compile time per variant:", "",
                   tb.markdown_table(t["compile"]["headers"], t["compile"]["rows"]), "",
                   f"Steady state (graph breaks: {r['graph_breaks']}; recompile error: {r['recompile_error']}):", "",
                   tb.markdown_table(t["steady"]["headers"], t["steady"]["rows"]), "",
                   f"Realised vs ideal (ideal from {r['ideal_source']} block costs):", "",
                   tb.markdown_table(t["ideal"]["headers"], t["ideal"]["rows"]), ""]
            if r["cuda_graphs"]:
                md += [f"CUDA graphs: {r['cuda_graphs']}", ""]
            if r.get("compile_cost"):
                cc = r["compile_cost"]
                rows_cc = [[k, cc[k]["first"]["cost_cpu_s"], cc[k]["first"]["cost_wall_s"],
                            cc[k]["second"]["cost_cpu_s"], cc[k]["first"]["steady_call_ms"]]
                           for k in COST_KINDS if "first" in cc.get(k, {})]
                md += ["Compile cost (fresh subprocess and inductor cache each):", "",
                       tb.markdown_table(["graphs", "first resolution cpu s", "wall s", "second resolution cpu s",
                                          "steady call ms"], rows_cc), ""]
            md += [f"Ratios: {ratio_line}", ""]
    finally:
        if tmp is not None:
            tmp.cleanup()
    path, mdpath = tb.write_outputs(args.out, result, "\n".join(md))
    print(f"\nwrote {path}, {mdpath}")
    return result


if __name__ == "__main__":
    main()
