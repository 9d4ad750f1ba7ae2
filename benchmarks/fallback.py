"""What a model costs when torch.export cannot capture it: the Dynamo path vs the export path.

    python benchmarks/fallback.py                 # tiny-flux (+ tiny-wan), inductor, CPU
    python benchmarks/fallback.py --quick         # smoke: aot_eager, tiny-flux, short

Each shipped tiny model is run twice over: as shipped, and with a data-dependent check in
its forward, the kind that makes ``torch.export`` fail on Lumina2 and on models with
mask-length code (``lengths = mask.sum(-1).tolist(); if len(set(lengths)) > 1: ...``).
The check costs one host read per call; the rows isolate it (``uncached eager``, the
model as shipped, vs ``uncached eager, unexportable``). Flows, the same ~2x plan
(``npu_cache_fx.bench.shipped_plan``), same seeds:

* ``export path <B>``: ``optimize(model, plan, backend=B)`` — captured graph, one compiled
  graph per variant;
* ``dynamo path <B>``: ``optimize(unexportable, plan, backend=B)`` — export fails, each
  block compiled by ``torch.compile(backend=B)``, cache decisions on the host;
* ``eager path``: ``optimize(unexportable, plan)`` — the same semantics, nothing compiled;
* ``export path eager``: ``optimize(model, plan)``.

Reported: speedup vs uncached eager (median generation time, interleaved, process CPU
time with one thread), graphs compiled during the warm-up generation and after it (expect
0: no recompiles across steps and generations), and the largest difference to the export
path's output (the fallback applies the same cache semantics, so it should be ~0).
Writes JSON (``--out``) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tinybench as tb  # noqa: E402
from compile import CountingBackend  # noqa: E402

from npu_cache_fx import models, optimize  # noqa: E402
from npu_cache_fx.bench import shipped_plan  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "fallback.json")


def make_unexportable(transformer: torch.nn.Module) -> torch.nn.Module:
    """Give ``transformer`` (in place) a forward that branches on tensor values, as Lumina2's does."""
    base = type(transformer)
    signature = inspect.signature(base.forward)

    class Unexportable(base):
        @functools.wraps(base.forward)
        def forward(self, *args, **kwargs):
            context = signature.bind(self, *args, **kwargs).arguments["encoder_hidden_states"]
            lengths = (context.abs().sum(-1) > 0).sum(-1).tolist()  # text lengths, as from a mask
            if len(set(lengths)) > 1:
                raise ValueError(f"ragged text lengths {lengths}")
            return super().forward(*args, **kwargs)

    Unexportable.__name__ = Unexportable.__qualname__ = f"Unexportable{base.__name__}"
    transformer.__class__ = Unexportable
    return transformer


def run_model(name: str, args) -> Dict[str, Any]:
    model, twin = models.load(name), models.load(name)
    make_unexportable(twin.transformer)
    steps = args.steps or model.default_steps
    labels = models.eval_labels(args.samples)
    plan = shipped_plan(name, steps)
    run = tb.Generations(model, labels, steps)
    run_twin = tb.Generations(twin, labels, steps)
    counting = {"export": CountingBackend(args.backend), "dynamo": CountingBackend(args.backend)}
    b = args.backend
    failed = CaptureCache(twin.transformer)  # its failed export is not tried again by the second module
    opts = {
        f"export path {b}": (run, optimize(model.transformer, plan, backend=counting["export"]), "export"),
        f"dynamo path {b}": (run_twin, optimize(twin.transformer, plan, backend=counting["dynamo"], captures=failed),
                             "dynamo"),
        "eager path": (run_twin, optimize(twin.transformer, plan, captures=failed), None),
        "export path eager": (run, optimize(model.transformer, plan), None),
    }
    print(f"\n## {name}: {len(labels)} samples, {steps} steps, plan {[c.label for c in plan]}")
    outputs, graphs = {}, {}
    with torch.no_grad():
        ref = run()
        for label, (gen, opt, key) in opts.items():
            outputs[label] = gen(opt)  # warm-up generation: capture, compile
            if key is not None:
                graphs[label] = [len(counting[key].graphs)]
    fns = {"uncached": run.fn(), "uncached eager, unexportable": run_twin.fn()}
    fns.update({label: gen.fn(opt) for label, (gen, opt, _) in opts.items()})
    times = tb.time_generations(fns, repeats=args.repeats)
    for label in graphs:
        graphs[label].append(len(counting[opts[label][2]].graphs) - graphs[label][0])
    speed = tb.speedups(times)
    base = outputs[f"export path {b}"]
    rows: List[Dict[str, Any]] = []
    for label in fns:
        out = ref if label.startswith("uncached") else outputs[label]
        opt = opts[label][1] if label in opts else None
        rows.append({
            "flow": label, "path": opt.stats.path if opt is not None else "-",
            "speedup": speed[args.clock][label], "speedup_wall": speed["wall"][label],
            "ms_per_generation": 1e3 * tb.common.median(times[args.clock][label]),
            "graphs_warmup": graphs.get(label, [None, None])[0], "graphs_after": graphs.get(label, [None, None])[1],
            "max_abs_diff_vs_export": None if opt is None else float((out - base).abs().max()),
            "psnr_vs_uncached": tb.quality(out, ref, labels)["psnr"] if opt is not None else None,
        })
    headers = ["flow", "path", f"speedup ({args.clock})", "ms/gen", "graphs (warm-up / after)",
               "max |diff| vs export", "PSNR dB"]
    table = [[r["flow"], r["path"], tb.fmt(r["speedup"]), tb.fmt(r["ms_per_generation"], ".0f"),
              "-" if r["graphs_warmup"] is None else f"{r['graphs_warmup']} / {r['graphs_after']}",
              tb.fmt(r["max_abs_diff_vs_export"], ".1e"), tb.fmt(r["psnr_vs_uncached"], ".1f")] for r in rows]
    tb.print_table(headers, table)
    return {"model": name, "steps": steps, "samples": len(labels), "plan": [c.to_dict() for c in plan],
            "fallback_reason": opts[f"dynamo path {b}"][1].stats.fallback_reason, "rows": rows,
            "headers": headers, "table": table}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma list of tiny-flux,tiny-wan (default: both; --quick: tiny-flux)")
    p.add_argument("--backend", default=None, help="compile backend (default inductor; --quick: aot_eager)")
    p.add_argument("--samples", type=int, default=10, help="samples per generation (default 10)")
    p.add_argument("--steps", type=int, default=None, help="steps (default: the model's)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per flow (default 5)")
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: aot_eager, tiny-flux, 2 samples, 8 steps, 1 repeat (numbers not meaningful)")
    args = p.parse_args(argv)
    if args.quick:
        args.backend = args.backend or "aot_eager"
        args.samples, args.repeats, args.steps = min(args.samples, 2), 1, args.steps or 8
    args.backend = args.backend or "inductor"
    args.clock = tb.resolve_clock(args.clock, args.threads)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    info = tb.start(args, "fallback", argv)
    names, skipped = tb.models_to_run(args.models, quick=args.quick)
    results = [run_model(name, args) for name in names]
    md = tb.md_header("Fallback paths: export vs Dynamo vs eager", info)
    for r in results:
        md += [f"## {r['model']} ({r['samples']} samples, {r['steps']} steps)", "",
               f"Export failure of the unexportable twin: `{r['fallback_reason']}`", "",
               tb.markdown_table(r["headers"], r["table"]), ""]
    md += [f"Skipped: {s}" for s in skipped]
    result = {"machine": info, "settings": vars(args), "models": {r["model"]: r for r in results},
              "skipped": skipped}
    tb.write_outputs(args.out, result, "\n".join(md) + "\n")
    return result


if __name__ == "__main__":
    main()
