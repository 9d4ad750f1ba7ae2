"""``npu-cache-fx search | generate | bench --pipeline DIR_OR_ID``: the CLI on the user's own pipeline.

The pipeline loads with ``DiffusionPipeline.from_pretrained`` (a folder written by
``pipe.save_pretrained`` works offline; a hub id needs the hub). Its DiT denoisers are cached with
:func:`~npu_cache_fx.enable_cache`; prompts come one per line from a text file (blank lines and lines
starting with ``#`` are skipped), each generated once per seed.

* ``search``: the prompts are the calibration set; writes search.json / search.md / pareto.png.
* ``generate``: images (the first frame of a video) uncached and cached, the plan table and the time
  per image of each; writes PNGs and generate.json.
* ``bench``: on prompts that were not the calibration set: speedup (interleaved medians), PSNR / MSE
  against uncached, and fewer steps at the plan's measured speed; writes bench.json and report.md.

Image quality is measured on the decoded output (``output_type="pt"``, values in [0, 1]); the search
measures on the latents.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import metrics
from .config import ConfigError, configs_to_json, load_plan
from .pipeline import denoisers as pipeline_denoisers
from .pipeline import optimized_denoisers, summary
from .recipes import default_plan
from .runtime import OptimizedModule
from .bench import machine_info, measure_interleaved, verdict
from .timestep import fewer_steps_for

__all__ = ["CLIError", "PipelineRunner", "default_device", "load_pipeline", "read_prompts", "run_bench", "run_generate",
           "run_search"]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CLIError(Exception):
    """A one-line error for the command line (what was wrong and what to pass instead)."""


# ----------------------------------------------------------------------------- options
def _seeds(text: str) -> List[int]:
    try:
        seeds = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--seeds {text!r}: pass comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise CLIError(f"--seeds {text!r}: pass at least one seed, e.g. --seeds 0")
    return seeds


def _call_args(items: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CLIError(f"--call {item!r}: pass KEY=VALUE, e.g. --call guidance_scale=3.5")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def read_prompts(path: Optional[str], option: str = "--prompts") -> List[str]:
    """The prompts of a text file, one per line; a missing or empty file is a :class:`CLIError`."""
    if not path:
        raise CLIError(f"{option} FILE is required with --pipeline: a text file with one prompt per line")
    if not os.path.isfile(path):
        raise CLIError(f"{option} {path}: no such file; pass a text file with one prompt per line")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise CLIError(f"{option} {path}: no prompts in the file; write one prompt per line")
    return prompts


def default_device(name: str = "auto") -> str:
    """``name``, or for ``"auto"``: ``"npu"`` when torch_npu imports, else ``"cuda"`` when available, else ``"cpu"``."""
    if name != "auto":
        return name
    try:
        import torch_npu  # noqa: F401
        return "npu"
    except Exception:  # noqa: BLE001  (torch_npu needs CANN; any import failure means no NPU)
        return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(path: Optional[str], dtype: str = "auto", device: str = "auto") -> Any:
    """``DiffusionPipeline.from_pretrained(path)`` on ``device``, checked to have a DiT denoiser."""
    if not path:
        raise CLIError("--pipeline DIR_OR_ID is required (a folder written by pipe.save_pretrained, or a hub id); "
                       "for the shipped tiny models use --model")
    local = os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1
    if local and not os.path.isdir(os.path.expanduser(path)):
        raise CLIError(f"--pipeline {path}: no such folder; pass a folder written by pipe.save_pretrained "
                       "(it holds model_index.json) or a hub id such as black-forest-labs/FLUX.1-dev")
    if local and not os.path.isfile(os.path.join(os.path.expanduser(path), "model_index.json")):
        raise CLIError(f"--pipeline {path}: the folder has no model_index.json; pass the folder "
                       "pipe.save_pretrained wrote (not a single model's folder)")
    device = default_device(device)
    if device == "npu":
        import torch_npu  # noqa: F401
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (torch.float32 if device == "cpu" else torch.bfloat16)
    from diffusers import DiffusionPipeline
    from diffusers.pipelines import pipeline_utils
    renamed = hasattr(pipeline_utils, "_resolve_dtype")  # newer diffusers take dtype= (torch_dtype= warns)
    try:
        pipe = DiffusionPipeline.from_pretrained(os.path.expanduser(path) if local else path,
                                                 **{"dtype" if renamed else "torch_dtype": torch_dtype})
    except OSError as exc:
        raise CLIError(f"--pipeline {path}: could not load it ({str(exc).splitlines()[0]})") from None
    try:
        pipeline_denoisers(pipe)
    except ConfigError as exc:
        raise CLIError(f"--pipeline {path}: {exc}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- generations
def _output(result: Any) -> torch.Tensor:
    out = result.frames if hasattr(result, "frames") else result.images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


class PipelineRunner:
    """Generations of a loaded pipeline over prompts × seeds, with chosen denoisers swapped in."""

    def __init__(self, pipe: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int,
                 height: Optional[int] = None, width: Optional[int] = None,
                 call: Optional[Dict[str, Any]] = None, progress: bool = True):
        self.pipe = pipe
        self.prompts = list(prompts)
        self.seeds = list(seeds)
        self.steps = steps
        self.call = dict(call or {})
        if height is not None:
            self.call["height"] = height
        if width is not None:
            self.call["width"] = width
        self.progress = progress
        self.plain = pipeline_denoisers(pipe)  # the modules as loaded

    @property
    def generations(self) -> int:
        return len(self.prompts) * len(self.seeds)

    @contextlib.contextmanager
    def using(self, modules: Dict[str, torch.nn.Module]) -> Iterator[None]:
        saved = {name: getattr(self.pipe, name) for name in modules}
        for name, module in modules.items():
            setattr(self.pipe, name, module)
        try:
            yield
        finally:
            for name, module in saved.items():
                setattr(self.pipe, name, module)

    def run(self, modules: Optional[Dict[str, torch.nn.Module]] = None, steps: Optional[int] = None,
            output_type: str = "pt", desc: Optional[str] = None, batched: bool = False) -> torch.Tensor:
        """Every prompt × seed with ``modules`` in the pipeline (default: as loaded); outputs concatenated.

        ``batched``: all of them in one pipeline call (one generation of batch prompts × seeds, a
        generator per sample), as the search's ``run_fn`` must be; else one call each."""
        items = [(p, s) for p in self.prompts for s in self.seeds]
        calls = [items] if batched else [[item] for item in items]
        if self.progress and desc:
            from tqdm.auto import tqdm
            calls = tqdm(calls, desc=desc, leave=False)
        extra = dict(self.call)
        if batched:  # one negative prompt per sample (Qwen-Image keeps a single one at batch 1 and broadcasts it)
            extra.update({k: [v] * len(items) for k, v in extra.items()
                          if k.startswith("negative_prompt") and isinstance(v, str)})
        outs = []
        with self.using(modules or self.plain), torch.no_grad():
            for call in calls:
                prompts = [p for p, _ in call]
                generators = [torch.Generator("cpu").manual_seed(s) for _, s in call]
                result = self.pipe(prompt=prompts if batched else prompts[0], output_type=output_type,
                                   num_inference_steps=steps or self.steps,
                                   generator=generators if batched else generators[0], **extra)
                outs.append(_output(result).float().cpu())
        return torch.cat(outs)

    def cached(self, plan, backend=None, backend_options=None) -> Dict[str, OptimizedModule]:
        """The pipeline's denoisers optimized with ``plan`` (the pipeline itself is left as loaded)."""
        with self.using(self.plain):
            return optimized_denoisers(self.pipe, plan, backend=backend, backend_options=backend_options)


def _plan_arg(plan: Optional[str], pipe: Any, steps: Optional[int]) -> Tuple[list, int, str]:
    """The plan (a file, or the default plan of the pipeline's family) and the step count to run."""
    if plan:
        try:
            cfgs = load_plan(plan)
        except ConfigError as exc:
            raise CLIError(f"--plan {plan}: {exc}") from None
        source = plan
    else:
        cfgs = default_plan(pipe.transformer)
        source = "the default plan of the pipeline's family (npu_cache_fx.recipes.default_plan)"
    return cfgs, steps or cfgs[0].steps_count, source


def _runner(args, prompts: List[str]) -> PipelineRunner:
    pipe = load_pipeline(args.pipeline, args.dtype, args.device)
    return PipelineRunner(pipe, prompts, _seeds(args.seeds), args.steps or 0, args.height, args.width,
                          _call_args(args.call))


def _warmed_up(args, prompts: List[str], plan: Optional[str]):
    """The runner, the plan (its configs and where it came from) and the cached denoisers, every variant
    captured and compiled by one warm-up generation per prompt × seed (outside any timing)."""
    runner = _runner(args, prompts)
    cfgs, runner.steps, source = _plan_arg(plan, runner.pipe, args.steps)
    cached = runner.cached(cfgs, backend=None if args.backend == "eager" else args.backend)
    print(f"plan: {source}")
    print(next(iter(cached.values())).plan_for(runner.steps))
    runner.run(cached, desc="warm-up (capture and compile)")
    return runner, cfgs, source, cached


def _fail(exc: CLIError) -> int:
    print(f"npu-cache-fx: error: {exc}")
    return 2


# ----------------------------------------------------------------------------- search
def run_search(args) -> int:
    """``npu-cache-fx search --pipeline DIR --prompts FILE``: search a plan on the user's own prompts."""
    try:
        prompts = read_prompts(args.prompts)
        runner = _runner(args, prompts)
    except CLIError as exc:
        return _fail(exc)
    from .search import search
    steps = args.steps or 28
    runner.steps = steps
    runner.progress = False  # the search shows its own progress
    several = len(runner.plain) > 1  # Wan 2.2's experts: one plan over the steps each runs

    def run_fn(denoisers, n=None):  # one generation: every prompt x seed in one batch (n: other step count)
        modules = denoisers if several else {next(iter(runner.plain)): denoisers}
        return runner.run(modules, steps=n, output_type="latent", batched=True)

    print(f"search: {len(prompts)} prompt(s) x {len(runner.seeds)} seed(s), {steps} steps, target "
          f"x{args.target:g}, " + " + ".join(f"{n} ({type(m).__name__})" for n, m in runner.plain.items()))
    model = dict(runner.plain) if several else next(iter(runner.plain.values()))
    result = search(model, run_fn, method=args.method, target_speedup=args.target,
                    max_cache_bytes=args.max_cache_bytes, steps_count=steps, strategy=args.strategy,
                    max_full_runs=args.max_full_runs, repeats=args.repeats, progress=True,
                    run_fn_steps=run_fn if args.method == "auto" else None)
    paths = result.write(args.out)
    print(result.summary())
    for kind, path in paths.items():
        print(f"{kind}: {os.path.abspath(path)}")
    print(f"next: npu-cache-fx generate --pipeline {args.pipeline} --plan {paths['json']} --prompt '...'")
    return 0 if result.best is not None else 1


# ----------------------------------------------------------------------------- generate
def _save_images(images: torch.Tensor, out: Path, prefix: str) -> List[str]:
    from PIL import Image
    paths = []
    for i, img in enumerate(images):
        if img.dim() == 4:  # a video (F, C, H, W): its first frame
            img = img[0]
        arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        path = out / f"{prefix}_{i}.png"
        Image.fromarray(arr.squeeze(-1) if arr.shape[-1] == 1 else arr).save(path)
        paths.append(str(path))
    return paths


def run_generate(args) -> int:
    """``npu-cache-fx generate --pipeline DIR --plan search.json --prompt TEXT``."""
    try:
        prompts = [p for p in args.prompt if p.strip()] if args.prompt else []
        if not prompts:
            raise CLIError("--prompt TEXT is required (repeat it for several prompts)")
        runner, cfgs, source, cached = _warmed_up(args, prompts, args.plan)
    except CLIError as exc:
        return _fail(exc)
    steps = runner.steps
    t0 = time.perf_counter()
    with_cache = runner.run(cached, desc="cached")
    cached_s = (time.perf_counter() - t0) / runner.generations
    t0 = time.perf_counter()
    plain = runner.run(desc="uncached")
    plain_s = (time.perf_counter() - t0) / runner.generations
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = _save_images(plain, out, "uncached") + _save_images(with_cache, out, "cached")
    with runner.using(cached):
        stats = summary(runner.pipe, echo=False)
    result = {"pipeline": args.pipeline, "prompts": prompts, "seeds": runner.seeds, "steps": steps,
              "backend": args.backend, "plan": configs_to_json(cfgs), "plan_source": source,
              "seconds_per_image": {"uncached": plain_s, "cached": cached_s}, "speedup": plain_s / cached_s,
              "psnr": metrics.psnr(with_cache, plain, data_range=1.0), "images": files, "summary": stats,
              "machine": machine_info()}
    (out / "generate.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"uncached {plain_s:.3f} s/image  cached {cached_s:.3f} s/image  speedup {plain_s / cached_s:.2f}x  "
          f"PSNR {result['psnr']:.2f} dB (one timed run each, after a warm-up)")
    print(f"wrote {len(files)} images and {out / 'generate.json'}")
    return 0


# ----------------------------------------------------------------------------- bench
def run_bench(args) -> int:
    """``npu-cache-fx bench --pipeline DIR --plan ... --prompts heldout.txt``."""
    try:
        prompts = read_prompts(args.prompts)
        runner, cfgs, source, cached = _warmed_up(args, prompts, args.config)
    except CLIError as exc:
        return _fail(exc)
    steps = runner.steps
    times = measure_interleaved({"uncached": lambda: runner.run(desc="uncached"),
                     "cached": lambda: runner.run(cached, desc="cached")}, args.repeats)
    speedup = times["uncached"] / times["cached"]
    fewer = min(steps, fewer_steps_for(speedup, steps))  # a plan slower than uncached: compare with uncached
    other = measure_interleaved({"uncached": lambda: runner.run(desc="uncached"),
                     "fewer": lambda: runner.run(steps=fewer, desc=f"{fewer} steps")}, args.repeats)
    fewer_speedup = other["uncached"] / other["fewer"]
    ref, got, few = runner.run(), runner.run(cached), runner.run(steps=fewer)
    cached_q = {"psnr": metrics.psnr(got, ref, data_range=1.0), "mse": metrics.mse(got, ref)}
    fewer_q = {"psnr": metrics.psnr(few, ref, data_range=1.0), "mse": metrics.mse(few, ref)}
    result = {"pipeline": args.pipeline, "prompts": len(prompts), "seeds": runner.seeds, "steps": steps,
              "backend": args.backend, "repeats": args.repeats, "plan": configs_to_json(cfgs), "plan_source": source,
              "seconds": {"uncached": times["uncached"], "cached": times["cached"], "fewer": other["fewer"]},
              "speedup": speedup, "cached": cached_q,
              "fewer_steps": {"steps": fewer, "speedup": fewer_speedup, **fewer_q},
              "verdict": verdict(speedup, cached_q["psnr"], fewer_speedup, fewer_q["psnr"]),
              "machine": machine_info()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "report.md").write_text(_bench_report(result))
    print(f"cached: {speedup:.2f}x, PSNR {cached_q['psnr']:.2f} dB; fewer steps ({fewer}): {fewer_speedup:.2f}x, "
          f"PSNR {fewer_q['psnr']:.2f} dB ({runner.generations} generation(s) per run, medians of {args.repeats} "
          "interleaved runs)")
    print(f"verdict: {result['verdict']}")
    print(f"wrote {out / 'bench.json'} and {out / 'report.md'}")
    return 0


def _bench_report(r: Dict[str, Any]) -> str:
    c, f, s = r["cached"], r["fewer_steps"], r["seconds"]
    return "\n".join([
        f"# npu_cache_fx bench: {r['pipeline']}",
        "",
        f"{r['prompts']} held-out prompt(s) x {len(r['seeds'])} seed(s), {r['steps']} steps, backend {r['backend']}, "
        f"torch {r['machine']['torch']}. Seconds are medians of {r['repeats']} interleaved runs; PSNR against "
        "the uncached images (values in [0, 1]).",
        "",
        "| run | seconds | speedup | PSNR (dB) | MSE |",
        "|---|---|---|---|---|",
        f"| uncached | {s['uncached']:.3f} | 1.00 | - | - |",
        f"| cached | {s['cached']:.3f} | {r['speedup']:.2f} | {c['psnr']:.2f} | {c['mse']:.3g} |",
        f"| fewer steps ({f['steps']}) | {s['fewer']:.3f} | {f['speedup']:.2f} | {f['psnr']:.2f} | {f['mse']:.3g} |",
        "",
        f"Verdict: {r['verdict']}.",
        "",
    ])
