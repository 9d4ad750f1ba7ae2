"""The bench runner: a cache plan on a shipped tiny trained model against the baselines it must beat.

Samples uncached, with the plan, with fewer steps at the plan's measured speed (the honest baseline)
and with AdaStep, the runs timed interleaved (medians); reports speedup, PSNR and class fidelity;
writes ``grid.png`` (rows labelled), ``report.md`` and ``demo.json``. ``npu-cache-fx bench`` runs it
on a plan file; ``npu-cache-fx demo`` (:mod:`npu_cache_fx.demo`) on the shipped plan.
"""

from __future__ import annotations

import json
import logging
import os
import math
import platform
import statistics
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import metrics, models
from .config import CacheConfig, configs_from_json, configs_to_json
from .runtime import optimize
from .timestep import fewer_steps_for

__all__ = ["EQUAL_SPEED", "SHIPPED_PLANS", "evaluate", "machine_info", "measure_interleaved", "print_result",
           "run_bench", "shipped_plan", "verdict"]

log = logging.getLogger(__name__)


def _all_blocks(steps: int, lists, **kw) -> List[CacheConfig]:
    return [CacheConfig(steps_count=steps, blocks=b, **kw) for b in lists]


ADASTEP_THRESHOLD = 0.002  # skips about a third of tiny-flux's 28 steps (benchmarks/timestep.py)

# Plans measured on the shipped models (see README "Demo"); the search replaces them per run.
SHIPPED_PLANS: Dict[str, Callable[[int], List[CacheConfig]]] = {
    "tiny-flux": lambda n: _all_blocks(n, ("transformer_blocks", "single_transformer_blocks"),
                                       step_start=3, step_interval=3, forecast="linear"),
    "tiny-wan": lambda n: _all_blocks(n, ("blocks",), step_start=3, step_interval=3, forecast="linear"),
    "tiny-flux-deep": lambda n: _all_blocks(n, ("transformer_blocks", "single_transformer_blocks"),
                                            step_start=3, step_interval=3, forecast="linear"),
}


def shipped_plan(model_name: str, steps: int) -> List[CacheConfig]:
    if model_name not in SHIPPED_PLANS:
        raise ValueError(f"no shipped plan for {model_name!r}; pass --config")
    return SHIPPED_PLANS[model_name](steps)


def _load_plan(path: Optional[str], model_name: str, steps: int) -> List[CacheConfig]:
    if path is None:
        return shipped_plan(model_name, steps)
    with open(path) as f:
        cfgs = configs_from_json(json.load(f))
    return [c.replace(steps_count=steps) if c.steps_count != steps else c for c in cfgs]


def _timed(fn: Callable[[], torch.Tensor]) -> Tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def machine_info() -> Dict[str, Any]:
    """What a timing was measured on (torch version, threads, CPU, cores), for the JSON reports."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def measure_interleaved(runs: Dict[str, Callable[[], torch.Tensor]], repeats: int,
                        outputs: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Median seconds per run, the runs interleaved so machine noise hits all alike. ``outputs``: filled with
    each run's last output (the runs are deterministic: no extra generation to score them)."""
    times: Dict[str, List[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            secs, out = _timed(fn)
            times[name].append(secs)
            if outputs is not None:
                outputs[name] = out
    return {k: statistics.median(v) for k, v in times.items()}


def _grid(rows: Dict[str, torch.Tensor], labels: torch.Tensor, path: Path, title: str,
          caption: Callable[[int], str] = str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(len(labels), 10)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.1 + 0.5), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            img = images[c]
            if img.dim() == 4:  # clip (F, C, H, W): frames side by side
                img = torch.cat(list(img), dim=-1)
            ax = axes[r][c]
            img = img.float().clamp(-1, 1).cpu()
            if img.shape[0] == 3:  # RGB (tiny-flux-deep's scenes)
                ax.imshow((img.permute(1, 2, 0).numpy() + 1) / 2)
            else:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(textwrap.fill(caption(int(labels[c])), 16), fontsize=8 if caption is str else 4.5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fidelity(model) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """How well samples match their conditions: the scene model's attribute checker (all four attributes
    right) or the digit classifier."""
    if hasattr(model, "agreement"):
        return lambda images, labels: model.agreement(images, labels)["all"]
    return metrics.class_fidelity


def evaluate(args, title: str, out_dir: Path) -> Dict[str, Any]:
    """Run the comparison for the CLI arguments ``args`` (model, steps, samples, config, backend, repeats);
    write grid.png, demo.json and report.md to ``out_dir``; return the result."""
    model = models.load(args.model)
    steps = args.steps or model.default_steps
    labels = models.eval_labels(args.samples, model)
    fidelity = _fidelity(model)
    cfgs = _load_plan(args.config, args.model, steps)
    backend = None if args.backend == "eager" else args.backend
    fast = optimize(model.transformer, cfgs, backend=backend)
    print(fast.plan)

    sample = lambda transformer=None, n=steps: model.sample(labels, steps=n, seed=0,  # noqa: E731
                                                            transformer=transformer)
    sample(fast)  # capture (and compile) every variant outside the timed runs
    outs: Dict[str, torch.Tensor] = {}  # the timed runs' outputs (deterministic: seed 0) are the ones scored
    times = measure_interleaved({"uncached": lambda: sample(), "cached": lambda: sample(fast)}, args.repeats, outs)
    speedup = times["uncached"] / times["cached"]
    fewer = fewer_steps_for(speedup, steps)
    ada = optimize(model.transformer, CacheConfig(method="adastep", steps_count=steps, threshold=ADASTEP_THRESHOLD,
                                                  max_skip_steps=2))
    sample(ada)
    ada.stats.clear()
    other = measure_interleaved({"fewer": lambda: sample(n=fewer), "adastep": lambda: sample(ada)}, args.repeats, outs)
    fewer_time = other["fewer"]
    # a generation's cost is not exactly proportional to its steps: when the measured speeds are further
    # apart than the verdict's tolerance, the step count whose speed (scaled from this one) is closest to the
    # cache plan's is measured instead
    fewer_speedup = times["uncached"] / fewer_time
    refit = closest_steps(fewer_speedup, fewer, speedup, steps)
    if refit != fewer and abs(fewer_speedup / speedup - 1) > EQUAL_SPEED:
        fewer = refit
        fewer_time = measure_interleaved({"fewer": lambda: sample(n=fewer)}, args.repeats, outs)["fewer"]
    ref, cached, few, skipped = outs["uncached"], outs["cached"], outs["fewer"], outs["adastep"]
    rows = {"uncached": ref, "cached": cached, f"{fewer} steps": few}
    result = {
        "model": args.model, "steps": steps, "samples": len(labels), "backend": args.backend,
        "fidelity": "attribute agreement" if hasattr(model, "agreement") else "class fidelity",
        "plan": configs_to_json(cfgs), "plan_table": str(fast.plan),
        "seconds": times, "speedup": speedup,
        "uncached": {"class_fidelity": fidelity(ref, labels)},
        "cached": {"psnr": metrics.psnr(cached, ref), "mse": metrics.mse(cached, ref),
                   "class_fidelity": fidelity(cached, labels)},
        "fewer_steps": {"steps": fewer, "seconds": fewer_time, "speedup": times["uncached"] / fewer_time,
                        "psnr": metrics.psnr(few, ref), "mse": metrics.mse(few, ref),
                        "class_fidelity": fidelity(few, labels)},
        "adastep": {"threshold": ADASTEP_THRESHOLD, "max_skip_steps": 2, "seconds": other["adastep"],
                    "speedup": times["uncached"] / other["adastep"],
                    "steps_skipped": ada.stats.steps_skipped // max(args.repeats, 1),  # per generation
                    "psnr": metrics.psnr(skipped, ref), "mse": metrics.mse(skipped, ref),
                    "class_fidelity": fidelity(skipped, labels)},
        "stats": {k: v for k, v in vars(fast.stats).items()},
        "verdict": verdict(speedup, metrics.psnr(cached, ref), times["uncached"] / fewer_time, metrics.psnr(few, ref)),
        "machine": machine_info(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _grid(rows, labels, out_dir / "grid.png", f"{title}: {args.model}, {steps} steps, cached {speedup:.2f}x",
          caption=models.scenes.caption if hasattr(model, "agreement") else str)
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "report.md").write_text(_report(result))
    return result


EQUAL_SPEED = 0.10  # two runs are "at equal speed" when their measured speedups differ by at most 10 %


def closest_steps(measured_speedup: float, measured_steps: int, target_speedup: float, steps: int) -> int:
    """The step count (1..``steps``) whose speedup, scaled from ``measured_speedup`` at ``measured_steps``
    (cost proportional to steps), is closest to ``target_speedup`` (in ratio).

    >>> closest_steps(2.59, 12, 2.34, 28)   # 12 steps measured 2.59x; 13 steps ~ 2.39x
    13
    >>> closest_steps(2.0, 14, 2.0, 28)
    14
    """
    return min(range(1, steps + 1),
               key=lambda k: abs(math.log(measured_speedup * measured_steps / k / target_speedup)))


def verdict(cached_speedup: float, cached_psnr: float, fewer_speedup: float, fewer_psnr: float,
            tolerance: float = EQUAL_SPEED) -> str:
    """Cache plan vs fewer steps, from measured speedups and PSNR vs uncached.

    One run wins outright when it is at least as fast *and* closer to uncached. Otherwise the two are
    compared on quality only when their speeds are within ``tolerance`` of each other; further apart
    (a busy machine, too few repeats) there is no equal-speed verdict.

    >>> verdict(2.0, 45.0, 2.1, 40.0)
    'the cache plan beats fewer steps at equal speed (2.00x vs 2.10x, within 10%): 45.0 dB vs 40.0 dB'
    >>> verdict(2.9, 50.6, 4.3, 40.5)[:40]
    'no verdict: the measured speeds differ b'
    """
    gap = max(cached_speedup, fewer_speedup) / min(cached_speedup, fewer_speedup) - 1
    speeds = f"{cached_speedup:.2f}x vs {fewer_speedup:.2f}x"
    quality = f"{cached_psnr:.1f} dB vs {fewer_psnr:.1f} dB"
    if cached_speedup >= fewer_speedup and cached_psnr > fewer_psnr:
        return f"the cache plan beats fewer steps: as fast or faster ({speeds}) and closer to uncached ({quality})"
    if fewer_speedup >= cached_speedup and fewer_psnr >= cached_psnr:
        return (f"fewer steps beats this cache plan: as fast or faster ({speeds}) and as close or closer to "
                f"uncached ({quality}): do not ship it")
    if gap <= tolerance:
        if cached_psnr > fewer_psnr:
            return (f"the cache plan beats fewer steps at equal speed ({speeds}, within {tolerance:.0%}): "
                    f"{quality}")
        return (f"fewer steps beats this cache plan at equal speed ({speeds}, within {tolerance:.0%}): {quality}: "
                "do not ship it")
    return (f"no verdict: the measured speeds differ by {gap:.0%} ({speeds}), more than {tolerance:.0%}; "
            "rerun with more --repeats on a quiet machine, or compare at equal speed with benchmarks/peers.py")


def _report(r: Dict[str, Any]) -> str:
    c, f, a = r["cached"], r["fewer_steps"], r["adastep"]
    return "\n".join([
        f"# npu_cache_fx demo: {r['model']}",
        "",
        f"{r['samples']} samples, {r['steps']} Euler steps, backend {r['backend']}, "
        f"torch {r['machine']['torch']}, {r['machine']['threads']} thread(s). Times are medians of interleaved runs.",
        "",
        f"| run | seconds | speedup | PSNR vs uncached (dB) | {r['fidelity']} |",
        "|---|---|---|---|---|",
        f"| uncached | {r['seconds']['uncached']:.2f} | 1.00 | - | {r['uncached']['class_fidelity']:.2f} |",
        f"| cached | {r['seconds']['cached']:.2f} | {r['speedup']:.2f} | {c['psnr']:.2f} | {c['class_fidelity']:.2f} |",
        f"| fewer steps ({f['steps']}) | {f['seconds']:.2f} | {f['speedup']:.2f} | {f['psnr']:.2f} | "
        f"{f['class_fidelity']:.2f} |",
        f"| AdaStep (thr {a['threshold']}, {a['steps_skipped']} steps skipped) | {a['seconds']:.2f} | "
        f"{a['speedup']:.2f} | {a['psnr']:.2f} | {a['class_fidelity']:.2f} |",
        "",
        f"Verdict: {r['verdict']}.",
        "",
        "Plan:",
        "",
        "```",
        r["plan_table"],
        "```",
        "",
        "![grid](grid.png)",
        "",
    ])


def print_result(r: Dict[str, Any]) -> None:
    c, f = r["cached"], r["fewer_steps"]
    print(f"uncached {r['seconds']['uncached']:.2f}s  fidelity {r['uncached']['class_fidelity']:.2f}")
    print(f"cached   {r['seconds']['cached']:.2f}s  speedup {r['speedup']:.2f}x  PSNR {c['psnr']:.2f} dB  "
          f"fidelity {c['class_fidelity']:.2f}")
    print(f"fewer steps ({f['steps']}) speedup {f['speedup']:.2f}x  PSNR {f['psnr']:.2f} dB  "
          f"fidelity {f['class_fidelity']:.2f}")
    a = r["adastep"]
    print(f"AdaStep ({a['steps_skipped']} steps skipped) speedup {a['speedup']:.2f}x  PSNR {a['psnr']:.2f} dB  "
          f"fidelity {a['class_fidelity']:.2f}")
    print(f"verdict: {r['verdict']}")


def run_bench(args, title: str = "bench") -> int:
    """``npu-cache-fx bench`` (and ``demo``, with ``title="demo"``): evaluate, print, write the files."""
    out = Path(args.out)
    result = evaluate(args, title, out)
    print_result(result)
    print(f"wrote {out / 'grid.png'}, {out / 'report.md'}, {out / 'demo.json'}")
    return 0
