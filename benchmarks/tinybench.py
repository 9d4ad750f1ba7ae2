"""Helpers shared by the benchmarks on the shipped tiny trained models (compile, timestep, forecast, attention).

Everything here is script plumbing, not library code::

    import tinybench as tb
    info = tb.start(args, "forecast")                 # threads, header (command, torch, machine)
    names, skipped = tb.models_to_run(args.models)    # tiny-wan only when its weights are shipped
    run = tb.Generations(model, labels, steps)        # seeded sampler closures
    times = tb.time_generations({"uncached": run.fn(), "fewer 14": run.fn(steps=14)}, repeats=5)
    tb.speedups(times)["cpu"]["fewer 14"]            # median uncached / median fewer-14, CPU time
    tb.write_outputs(args.out, result, markdown)      # JSON + Markdown next to it
    tb.held_tensor_bytes(hook_states, exclude=params) # bytes a cache's state objects hold
    counter = tb.CompileCounter(); torch.compile(m, backend=counter)   # counter.graphs / .recompiles

Timings on a shared machine are noisy: every number compared is measured in the
same run, generations interleaved round-robin (alternating order), medians, and
both wall and process CPU time are recorded (CPU time is the stable one when other
users' jobs share the cores).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from npu_cache_fx import metrics, models  # noqa: E402

__all__ = ["CompileCounter", "Generations", "add_run_args", "fewer_step_counts", "held_tensor_bytes", "interp_curve",
           "markdown_table", "models_to_run", "pareto_panels_png", "pareto_png", "print_table", "quality", "start",
           "time_generations", "weights_present", "write_outputs"]

ALL_MODELS = ("tiny-flux", "tiny-wan")
# Run only when named (--models tiny-flux-deep): Flux-dev's 19 + 38 blocks, minutes per generation batch.
EXTRA_MODELS = ("tiny-flux-deep",)


# ----------------------------------------------------------------------------- setup
def start(args, name: str, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Pin threads, print the header (command, versions, threads, machine); returns machine info."""
    common.set_threads(args.threads)
    info = common.machine_info(None if argv is None else [sys.argv[0]] + list(argv))
    print(f"# benchmarks/{name}.py")
    print(f"command : {info['command']}")
    print(f"torch {info['torch']}  diffusers {info['diffusers']}  threads {info['threads']}  "
          f"machine {info['processor']} x{info['cpu_count']} ({info['platform']})")
    return info


def weights_present(name: str) -> bool:
    from npu_cache_fx.models.tiny import weights_paths
    st, js = weights_paths(name)
    return st.exists() and js.exists()


def models_to_run(requested: Optional[str], quick: bool = False) -> Tuple[List[str], List[str]]:
    """(models to run, notes on the ones skipped). Default: every shipped model (quick: tiny-flux)."""
    wanted = [m.strip() for m in requested.split(",")] if requested else (
        ["tiny-flux"] if quick else list(ALL_MODELS))
    names, notes = [], []
    for m in wanted:
        if m not in ALL_MODELS + EXTRA_MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(ALL_MODELS + EXTRA_MODELS)}")
        if weights_present(m):
            names.append(m)
        else:
            notes.append(f"{m}: weights not found in npu_cache_fx/models/weights/ -- not run")
    for n in notes:
        print(f"note    : {n}")
    if not names:
        raise SystemExit("no model to run: " + "; ".join(notes))
    return names, notes


def fewer_step_counts(steps: int, speedups: Iterable[float]) -> List[int]:
    """Distinct step counts ``round(steps / s)`` (descending), excluding ``steps`` itself."""
    out = sorted({max(1, int(round(steps / s))) for s in speedups} - {steps}, reverse=True)
    return out


# ----------------------------------------------------------------------------- generations
class Generations:
    """Seeded sampler closures for one model and one label batch (same noise for every run)."""

    def __init__(self, model: models.TinyModel, labels: torch.Tensor, steps: int, seed: int = 0):
        self.model, self.labels, self.steps, self.seed = model, labels, steps, seed

    def __call__(self, transformer: Optional[Callable] = None, steps: Optional[int] = None) -> torch.Tensor:
        return self.model.sample(self.labels, steps=steps or self.steps, seed=self.seed, transformer=transformer)

    def fn(self, transformer: Optional[Callable] = None, steps: Optional[int] = None) -> Callable[[], torch.Tensor]:
        return lambda: self(transformer, steps)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
CLOCK_HELP = ("timing clock: 'cpu' = process CPU time (single-threaded CPU runs: equals wall time on an idle "
              "machine and ignores other users' load), 'wall' = perf_counter; 'auto' (default): cpu with "
              "--threads 1 on CPU, else wall")


def add_run_args(p, default_out: str) -> None:
    """``--threads``, ``--clock`` and ``--out``: the options every tiny-model benchmark takes."""
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto", help=CLOCK_HELP)
    p.add_argument("--out", default=default_out, help=f"JSON output path (default {default_out})")


def resolve_clock(clock: str, threads: int, device: str = "cpu") -> str:
    if clock == "auto":
        return "cpu" if threads == 1 and device == "cpu" else "wall"
    if clock == "cpu" and device != "cpu":
        raise SystemExit("--clock cpu measures host CPU time: use --clock wall on an accelerator")
    return clock


def time_generations(fns: Mapping[str, Callable[[], Any]], repeats: int,
                     warmup: int = 0) -> Dict[str, Dict[str, List[float]]]:
    """``{"wall": {name: [s]}, "cpu": {name: [s]}}`` per generation, interleaved round-robin.

    Each round calls every run once, the order alternating between rounds (as
    ``common.interleaved``); GC off. Wall time (perf_counter) and process CPU time
    are both recorded: on a shared machine the CPU time of a single-threaded run is
    the stable one (wall time also counts the time other users' jobs hold the cores).
    """
    names = list(fns)
    out: Dict[str, Dict[str, List[float]]] = {"wall": {n: [] for n in names}, "cpu": {n: [] for n in names}}
    with torch.no_grad(), common.no_gc():
        for r in range(warmup + repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                w0, c0 = time.perf_counter(), time.process_time()
                fns[name]()
                dw, dc = time.perf_counter() - w0, time.process_time() - c0
                if r >= warmup:
                    out["wall"][name].append(dw)
                    out["cpu"][name].append(dc)
    return out


def speedups(times: Dict[str, Dict[str, List[float]]], base: str = "uncached") -> Dict[str, Dict[str, float]]:
    """``{clock: {name: median(base) / median(name)}}``."""
    return {clock: {k: common.median(t[base]) / common.median(v) for k, v in t.items()}
            for clock, t in times.items()}


def quality(images: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
            model: Optional[models.TinyModel] = None) -> Dict[str, float]:
    """PSNR / MSE vs ``ref`` and fidelity: the digit classifier's accuracy, or for a model with an attribute
    checker (tiny-flux-deep) its agreement with the captions (``model.agreement(...)["all"]``)."""
    if model is not None and hasattr(model, "agreement"):
        fidelity = float(model.agreement(images, labels)["all"])
    else:
        fidelity = metrics.class_fidelity(images, labels)
    return {"psnr": metrics.psnr(images, ref), "mse": metrics.mse(images, ref), "class_fidelity": fidelity}


# ----------------------------------------------------------------------------- curves
def interp_curve(points: Sequence[Tuple[float, float]], x: float) -> Optional[float]:
    """Linear interpolation of ``y`` at ``x`` through ``points`` (x, y) sorted by x; None outside."""
    pts = sorted((float(a), float(b)) for a, b in points if math.isfinite(a) and math.isfinite(b))
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if x == pts[-1][0] else None


def frontier(points: Sequence[Tuple[float, float]], at: float) -> Optional[float]:
    """Best ``y`` among points with ``x >= at`` (the achievable-quality staircase); None if none."""
    ys = [y for x, y in points if x >= at and math.isfinite(y)]
    return max(ys) if ys else None


# ----------------------------------------------------------------------------- output
def fmt(x: Any, spec: str = ".2f") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf"
        if math.isnan(x):
            return "nan"
        return format(x, spec)
    return str(x)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "   ") -> None:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print(indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print(indent + "  ".join("-" * w for w in widths))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def md_header(title: str, info: Mapping[str, Any]) -> List[str]:
    return [f"# {title}", "", f"`{info['command']}`", "",
            f"torch {info['torch']}, diffusers {info['diffusers']}, {info['threads']} thread(s), "
            f"{info['processor']} x{info['cpu_count']} ({info['platform']}). Times are medians of interleaved "
            "runs measured in this one run; compare ratios, not absolute times across runs.", ""]


def sibling(out: str, suffix: str) -> str:
    """``benchmarks/out/x.json`` -> ``benchmarks/out/x<suffix>``."""
    root, _ = os.path.splitext(out)
    return root + suffix


def write_outputs(out: str, result: Mapping[str, Any], markdown: str) -> Tuple[str, str]:
    path = common.write_json(out, result)
    md = sibling(out, ".md")
    with open(md, "w") as f:
        f.write(markdown.rstrip() + "\n")
    return path, md


def _draw_pareto(ax, title: str, curves: Mapping[str, Sequence[Tuple[float, float]]],
                 points: Mapping[str, Sequence[Tuple[float, float, str]]], ylabel: str) -> None:
    for name, pts in dict(curves).items():
        pts = sorted((x, y) for x, y in pts if math.isfinite(y))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", ms=4, label=name)
    markers = "s^Dv<>pP*X"
    for k, (name, pts) in enumerate(dict(points).items()):
        pts = [p for p in pts if math.isfinite(p[1])]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[k % len(markers)], s=36, label=name,
                   zorder=3)
        for x, y, label in pts:
            if label:
                ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("measured speedup vs uncached (x)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def pareto_png(path: str, title: str, curves: Mapping[str, Sequence[Tuple[float, float]]],
               points: Mapping[str, Sequence[Tuple[float, float, str]]] = (), ylabel: str = "PSNR vs uncached (dB)",
               ) -> str:
    """Speedup (x) vs PSNR (y): ``curves`` drawn as lines (sorted by x), ``points`` as labelled markers."""
    return pareto_panels_png(path, [(title, curves, points)], ylabel=ylabel, panel_size=(7.5, 5))


def pareto_panels_png(path: str, panels: Sequence[Tuple[str, Mapping[str, Sequence[Tuple[float, float]]],
                                                        Mapping[str, Sequence[Tuple[float, float, str]]]]],
                      ylabel: str = "PSNR vs uncached (dB)", panel_size: Tuple[float, float] = (8.5, 6)) -> str:
    """Several :func:`pareto_png` panels ``(title, curves, points)`` side by side in one PNG (e.g. one per model)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(panel_size[0] * n, panel_size[1]), squeeze=False)
    for ax, (title, curves, points) in zip(axes[0], panels):
        _draw_pareto(ax, title, curves, points, ylabel)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- plans
BLOCK_LISTS = {"tiny-flux": ("transformer_blocks", "single_transformer_blocks"), "tiny-wan": ("blocks",),
               "tiny-flux-deep": ("transformer_blocks", "single_transformer_blocks")}


def block_lists(model_name: str) -> Tuple[str, ...]:
    """Every block list of a shipped model (the dual- and single-stream lists of Flux)."""
    return BLOCK_LISTS[model_name]


def short(fqn: str) -> str:
    return {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(fqn, fqn)


def stats_dict(opt) -> Dict[str, Any]:
    """JSON-ready copy of an OptimizedModule's stats."""
    return {k: v for k, v in vars(opt.stats).items()}


# ----------------------------------------------------------------------------- memory / compile probes
_ATOMS = (str, bytes, int, float, complex, bool, type(None), type, torch.nn.Module, torch.dtype, torch.device)


def held_tensor_bytes(roots: Iterable[Any], exclude: Iterable[torch.Tensor] = (), max_objects: int = 200_000) -> int:
    """Bytes of the distinct tensor storages reachable from ``roots`` (e.g. a cache's state objects).

    Walks attributes (``__dict__``, ``__slots__``), dict values, lists, tuples and sets; stops at
    ``nn.Module`` objects (their parameters are the model, not the cache), functions, methods and
    classes. A storage counts once (views of one storage share it); storages of ``exclude``
    (the model's parameters and buffers) never count.
    """
    import types as _types
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen, storages, total, todo = set(), set(), 0, list(roots)
    while todo and len(seen) < max_objects:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, _ATOMS) or isinstance(
                obj, (_types.FunctionType, _types.MethodType, _types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            st = obj.untyped_storage()
            key = st.data_ptr()
            if key not in storages and key not in skip:
                storages.add(key)
                total += st.nbytes()
            continue
        if isinstance(obj, Mapping):
            todo.extend(obj.values())
            continue
        if isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
            continue
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            todo.extend(attrs.values())
        for slot in getattr(type(obj), "__slots__", ()):
            if isinstance(slot, str) and hasattr(obj, slot):
                todo.append(getattr(obj, slot))
    return total


class CompileCounter:
    """A dynamo backend (eager inner backend by default) that counts graphs and recompiles.

    ``graphs``: graphs handed to the backend; ``recompiles``: compiles of a frame dynamo had
    compiled before (``CompileId.frame_compile_id > 0``, guard failures); ``limit_hit``: a frame
    reached ``torch._dynamo.config.recompile_limit`` (dynamo then runs it eagerly).
    """

    def __init__(self, inner: Optional[Callable] = None):
        self.inner = inner
        self.graphs = 0
        self.compile_ids: set = set()

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        cid = torch._guards.CompileContext.current_compile_id()
        if cid is not None:
            self.compile_ids.add((cid.frame_id, cid.frame_compile_id))
        return gm.forward if self.inner is None else self.inner(gm, example_inputs)

    @property
    def recompiles(self) -> int:
        return sum(1 for _, k in self.compile_ids if k)

    @property
    def limit_hit(self) -> bool:
        limit = torch._dynamo.config.recompile_limit
        return any(k is not None and k + 1 >= limit for _, k in self.compile_ids)
