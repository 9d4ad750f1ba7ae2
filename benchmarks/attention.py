"""Attention cache figures: cache memory (measured vs formula, scaled to Flux-dev / Wan2.1-14B) and
realised vs ideal speedup in eager, on the shipped tiny models.

    python benchmarks/attention.py [--models tiny-flux,tiny-wan] [--samples 20] [--repeats 7] [--quick]

1. **Cache memory.** An attention cache keeps, per cached attention call, each output
   the call hands to the rest of the block: ``batch x tokens x hidden x dtype bytes``
   per output (Flux joint attention in the dual-stream blocks returns the image *and*
   the text stream: image + text tokens; a single-stream block attends over the
   concatenated image + text tokens; Wan self-attention over the video tokens, and
   cross-attention -- ``attention="all"`` -- once more over the video tokens), times
   the forecast history (1 plain, 2 linear, 3 taylor2; plus 4 x history bytes of
   coefficients per forecasting config), per cache context (x2 for sequential CFG).
   Measured: ``opt.stats.cache_bytes`` / ``stats.cache_bytes_by_config`` after one
   generation. The formula is then scaled to Flux-dev (19 double + 38 single blocks,
   hidden 3072, 4096 + 512 tokens, bf16, batch 1) and Wan2.1-14B at 720p (40 blocks,
   hidden 5120, 75,600 tokens, bf16, batch 1).
2. **Realised vs ideal speedup** (eager backend) of an attention cache on every block
   list (one config per list) at ``step_interval`` 2 and 3 (``step_start=--attn-start``).
   Realised = median uncached generation / median cached generation (generations
   interleaved in one run; process CPU time by default, ``--clock``, wall-clock
   alongside). Ideal = uncached / (uncached - reads x per-step attention cost)
   = steps / (steps - reads x attention share of a model call), reads = steps that
   read the cache (``opt.stats.steps_reused``); the share is measured together with the
   call it belongs to (absolute times measured minutes apart on a shared machine do not
   compare), two ways:

   * ``span``: ``npu_cache_fx.profile.span_costs`` over the ``attention_sites`` spans
     of the captured graph (fx Interpreter, per node) / the whole graph timed the same way;
   * ``hooks``: forward pre/post hooks on the attention modules of the eager model
     (median per module over ``--cost-repeats`` forwards) / the hooked model call.

   Target: realised / ideal >= 0.95. The captured graph skips diffusers' Python module
   overhead, so realised/ideal can exceed 1 on CPU.

Writes JSON (``--out``) and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tinybench as tb  # noqa: E402

from npu_cache_fx import CacheConfig, models, optimize  # noqa: E402
from npu_cache_fx.capture import attention_sites  # noqa: E402
from npu_cache_fx.config import FORECASTS  # noqa: E402
from npu_cache_fx.profile import span_costs  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "attention.json")
REALISED_MIN = 0.95
GIB = 1024 ** 3

# Scaled-up shapes (batch 1, bf16). Flux: every block caches image + text tokens (joint or concatenated).
SCALED = {
    "Flux-dev 1024x1024": {"kind": "flux", "blocks": {"transformer_blocks": 19, "single_transformer_blocks": 38},
                           "image_tokens": 4096, "text_tokens": 512, "hidden": 3072, "dtype_bytes": 2, "batch": 1},
    "Wan2.1-14B 720p": {"kind": "wan", "blocks": {"blocks": 40}, "image_tokens": 75600, "text_tokens": 512,
                        "hidden": 5120, "dtype_bytes": 2, "batch": 1},
}


# ----------------------------------------------------------------------------- formula
def bytes_per_call(kind: str, list_fqn: str, batch: int, image_tokens: int, text_tokens: int, hidden: int,
                   dtype_bytes: int, attention: Optional[str] = None) -> int:
    """Bytes one cached attention call keeps (all of its outputs), one recorded value."""
    if kind == "flux":  # joint attention: image + text outputs; single-stream: concatenated tokens
        tokens = image_tokens + text_tokens
        calls = 1
    else:  # wan: attn1 over the video tokens; attention="all" adds attn2 (cross), also over the video tokens
        tokens = image_tokens
        calls = 2 if attention == "all" else 1
    return calls * batch * tokens * hidden * dtype_bytes


def formula_bytes(kind: str, blocks: Dict[str, int], batch: int, image_tokens: int, text_tokens: int, hidden: int,
                  dtype_bytes: int, forecast: str = "none", attention: Optional[str] = None) -> Dict[str, int]:
    """Per block list: blocks x bytes per call x history (+ forecast coefficients), one cache context."""
    k = FORECASTS[forecast]
    out = {}
    for fqn, n in blocks.items():
        per = bytes_per_call(kind, fqn, batch, image_tokens, text_tokens, hidden, dtype_bytes, attention)
        out[fqn] = n * per * k + (4 * k if k > 1 else 0)
    return out


def model_shape(model: models.TinyModel, batch: int) -> Dict[str, Any]:
    cfg = model.transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    if model.kind == "flux":
        image, text = model.latent_shape[0], model.conditioner.num_tokens
    else:
        patch = tuple(cfg.patch_size)
        image = math.prod(s // p for s, p in zip(model.latent_shape[1:], patch))
        text = model.conditioner.num_tokens
    blocks = {b: len(model.transformer.get_submodule(b)) for b in tb.block_lists(model.name)}
    return {"kind": model.kind, "blocks": blocks, "image_tokens": image, "text_tokens": text, "hidden": hidden,
            "dtype_bytes": torch.tensor([], dtype=model.dtype).element_size(), "batch": batch}


# ----------------------------------------------------------------------------- costs
def hook_costs(model: models.TinyModel, kwargs: Dict[str, Any], attention: List[str], repeats: int,
               clock: Callable[[], float] = time.perf_counter):
    """Median seconds per attention module (pre/post hooks) and per whole model call."""
    samples: Dict[str, List[float]] = {}
    starts: Dict[str, float] = {}
    handles = []
    for fqn in attention:
        mod = model.transformer.get_submodule(fqn)

        def pre(_m, _a, key=fqn):
            starts[key] = clock()

        def post(_m, _a, _o, key=fqn):
            samples.setdefault(key, []).append(clock() - starts[key])

        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post))
    calls = []
    try:
        with torch.no_grad(), common.no_gc():
            for r in range(repeats + 1):
                t0 = clock()
                model.transformer(**kwargs)
                if r == 0:
                    samples.clear()
                    continue
                calls.append(clock() - t0)
    finally:
        for h in handles:
            h.remove()
    return {k: common.median(v) for k, v in samples.items()}, common.median(calls)


def graph_costs(model: models.TinyModel, captures: CaptureCache, kwargs: Dict[str, Any], configs, repeats: int):
    """span_costs of every attention site of ``configs`` and of the whole captured graph (same Interpreter)."""
    cap = next(iter(captures.values()))
    bound = inspect.signature(model.transformer.forward).bind(**kwargs)
    leaves, spec = pytree.tree_flatten(((), dict(bound.arguments)))
    if spec != cap.in_spec:
        raise RuntimeError("input structure differs from the capture's")
    spans = {}
    for cfg in configs:
        n = len(model.transformer.get_submodule(cfg.blocks))
        for site in attention_sites(cap, model.transformer, cfg.blocks, 0, n, cfg.attention):
            spans[site.fqn] = site.nodes
    spans["__graph__"] = [node.name for node in cap.gm.graph.nodes if node.op == "call_function"]
    return span_costs(cap.gm, leaves, spans, repeats=repeats)


# ----------------------------------------------------------------------------- per model
def attn_plan(lists, steps: int, start: int, interval: int, forecast: str = "none",
              attention: Optional[str] = None) -> List[CacheConfig]:
    return [CacheConfig(method="attention_cache", steps_count=steps, step_start=start, step_interval=interval,
                        blocks=b, forecast=forecast, attention=attention, name=f"attn[{tb.short(b)}]")
            for b in lists]


def run_model(name: str, args) -> Dict[str, Any]:
    model = models.load(name)
    steps = args.steps or model.default_steps
    labels = models.eval_labels(args.samples)
    gen = tb.Generations(model, labels, steps)
    lists = tb.block_lists(name)
    captures = CaptureCache(model.transformer)
    shape = model_shape(model, len(labels))
    print(f"\n## {name}: {steps} steps, {len(labels)} samples, attention cache on {list(lists)}; "
          f"{shape['image_tokens']} image + {shape['text_tokens']} text tokens, hidden {shape['hidden']}, "
          f"{shape['dtype_bytes']} B/elem")

    # 1. memory: measured vs formula
    variants = [("plain", "none", None), ("linear", "linear", None)]
    if model.kind == "wan":
        variants.append(("attn1+attn2", "none", "all"))
    if args.quick:
        variants = variants[:1]
    mem_rows, mem_table = [], []
    for label, forecast, attention in variants:
        cfgs = attn_plan(lists, steps, args.attn_start, 2, forecast, attention)
        opt = optimize(model.transformer, cfgs, captures=captures)
        gen(opt)
        st = opt.stats
        formula = formula_bytes(shape["kind"], shape["blocks"], shape["batch"], shape["image_tokens"],
                                shape["text_tokens"], shape["hidden"], shape["dtype_bytes"], forecast, attention)
        for cfg in opt.configs:
            measured = st.cache_bytes_by_config.get(cfg.label, 0)
            mem_rows.append({"variant": label, "config": cfg.label, "measured_bytes": measured,
                             "formula_bytes": formula[cfg.blocks], "ratio": measured / formula[cfg.blocks]})
            mem_table.append([label, cfg.label, measured, formula[cfg.blocks], measured / formula[cfg.blocks]])
        total_f = sum(formula.values())
        mem_rows.append({"variant": label, "config": "total (stats.cache_bytes)", "measured_bytes": st.cache_bytes,
                         "formula_bytes": total_f, "ratio": st.cache_bytes / total_f})
        mem_table.append([label, "total (stats.cache_bytes)", st.cache_bytes, total_f, st.cache_bytes / total_f])
    print("   1. cache memory, one cache context (measured after one generation vs formula)")
    tb.print_table(["variant", "config", "measured B", "formula B", "ratio"], mem_table)

    # 2. realised vs ideal
    kwargs = model.inputs(labels, t=0.5)
    plans = {f"attn i{k}": attn_plan(lists, steps, args.attn_start, k) for k in args.intervals}
    opts = {k: optimize(model.transformer, v, captures=captures) for k, v in plans.items()}
    ref = gen()
    quality, reads = {}, {}
    for k, opt in opts.items():  # warm-up + quality; one generation
        quality[k] = tb.quality(gen(opt), ref, labels)
        reads[k] = opt.stats.steps_reused
        skipped_calls = opt.stats.attention_calls_skipped
        quality[k]["attention_calls_skipped"] = skipped_calls
    fns = {"uncached": gen.fn(), **{k: gen.fn(opt) for k, opt in opts.items()}}
    all_times = tb.time_generations(fns, repeats=args.repeats)
    times = all_times[args.clock]
    unc = common.median(times["uncached"])
    sp = tb.speedups(all_times)
    sites = [f"{b}.{i}.{child}" for b in lists for i in range(shape["blocks"][b])
             for child in _attention_children(model, b, i)]
    hooks, hooked_call = hook_costs(model, kwargs, sites, args.cost_repeats, tb.CLOCKS[args.clock])
    span = graph_costs(model, captures, kwargs, plans[next(iter(plans))], repeats=max(2, args.cost_repeats // 3))
    attn_hooks = sum(hooks.values())
    span_fraction = sum(v for k, v in span.items() if k != "__graph__") / span["__graph__"]
    hooks_fraction = attn_hooks / hooked_call
    rows, table = [], []
    for k in opts:
        cached = common.median(times[k])
        realised = unc / cached
        ideal_span = steps / (steps - reads[k] * span_fraction)
        ideal_hooks = steps / (steps - reads[k] * hooks_fraction)
        row = {"plan": k, "step_start": args.attn_start, "step_interval": int(k.split("i")[-1]),
               "reads": reads[k], "uncached_s": common.summary(times["uncached"], scale=1),
               "cached_s": common.summary(times[k], scale=1), "realised": realised,
               "realised_wall": sp["wall"][k], "realised_cpu": sp["cpu"][k], "clock": args.clock,
               "ideal_span": ideal_span, "ideal_hooks": ideal_hooks, "realised_over_ideal_span": realised / ideal_span,
               "realised_over_ideal_hooks": realised / ideal_hooks, **quality[k],
               "plan_configs": [c.to_dict() for c in plans[k]]}
        rows.append(row)
        table.append([k, reads[k], realised, sp["wall"][k], ideal_span, realised / ideal_span, ideal_hooks,
                      realised / ideal_hooks,
                      quality[k]["psnr"], quality[k]["class_fidelity"],
                      "ok" if min(realised / ideal_span, realised / ideal_hooks) >= REALISED_MIN else "MISSED"])
    costs = {"hooked_call_ms": hooked_call * 1e3,
             "attention_hooks_ms": {k: v * 1e3 for k, v in hooks.items()},
             "attention_hooks_total_ms": attn_hooks * 1e3, "span_ms": {k: v * 1e3 for k, v in span.items()},
             "span_fraction": span_fraction, "hooks_fraction": hooks_fraction}
    print(f"   2. realised vs ideal, eager, {steps}-step generations ({args.repeats} interleaved rounds; "
          f"{args.clock} time, wall-clock realised alongside; uncached median {unc:.3f} s)")
    attn_span = sum(v for k, v in span.items() if k != "__graph__")
    print(f"      attention share of a model call: span {span_fraction:.1%} ({attn_span * 1e3:.2f} of "
          f"{span['__graph__'] * 1e3:.2f} ms, interpreted) | hooks {hooks_fraction:.1%} ({attn_hooks * 1e3:.2f} of a "
          f"{hooked_call * 1e3:.2f} ms hooked call)")
    headers = ["plan", "reads", "realised", "(wall)", "ideal(span)", "real/ideal", "ideal(hooks)", "real/ideal",
               "PSNR dB",
               "fidelity", f">= {REALISED_MIN}"]
    tb.print_table(headers, table)
    return {"model": name, "steps": steps, "samples": len(labels), "shape": shape, "memory": mem_rows,
            "memory_table": mem_table, "speedup": rows, "speedup_table": {"headers": headers, "rows": table},
            "costs": costs}


def _attention_children(model, list_fqn: str, i: int) -> List[str]:
    from npu_cache_fx.capture import attention_children
    return attention_children(model.transformer.get_submodule(f"{list_fqn}.{i}"))[:1]


def scaled_table() -> Dict[str, Any]:
    rows, table = [], []
    for label, s in SCALED.items():
        variants = [("self", None)] + ([("self+cross", "all")] if s["kind"] == "wan" else [])
        for att_label, attention in variants:
            per = {f: formula_bytes(s["kind"], s["blocks"], s["batch"], s["image_tokens"], s["text_tokens"],
                                    s["hidden"], s["dtype_bytes"], f, attention) for f in FORECASTS}
            tot = {f: sum(v.values()) for f, v in per.items()}
            nblocks = sum(s["blocks"].values())
            one = bytes_per_call(s["kind"], "", s["batch"], s["image_tokens"], s["text_tokens"], s["hidden"],
                                 s["dtype_bytes"], attention)
            rows.append({"model": label, "attention": att_label, "blocks": nblocks, "bytes_per_block": one,
                         "bytes": tot, "gib": {f: v / GIB for f, v in tot.items()},
                         "cfg_two_contexts_gib": {f: 2 * v / GIB for f, v in tot.items()}, **s})
            table.append([f"{label} ({att_label})", nblocks, one / 2 ** 20, tot["none"] / GIB, tot["linear"] / GIB,
                          tot["taylor2"] / GIB, 2 * tot["none"] / GIB])
    return {"rows": rows, "headers": ["model (attention)", "blocks", "MiB/block", "plain GiB", "linear GiB",
                                      "taylor2 GiB", "plain x2 CFG GiB"], "table": table}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma list of tiny-flux,tiny-wan (default: both; tiny-wan skipped without weights; "
                        "--quick: tiny-flux)")
    p.add_argument("--samples", type=int, default=20, help="samples per generation = batch (default 20)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 28 / 20)")
    p.add_argument("--repeats", type=int, default=7, help="timed generations per plan (default 7)")
    p.add_argument("--cost-repeats", type=int, default=15, help="forwards for the per-attention costs (default 15)")
    p.add_argument("--intervals", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3],
                   help="attention cache step_interval values (default 2,3)")
    p.add_argument("--attn-start", type=int, default=2, help="attention cache step_start (default 2)")
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny-flux, 4 samples, 10 steps, 1 repeat (numbers are not meaningful)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats, args.cost_repeats = min(args.samples, 4), 1, 3
        args.steps = args.steps or 10
    if args.repeats < 1 or args.samples < 1 or args.cost_repeats < 1:
        p.error("--repeats, --samples and --cost-repeats must be >= 1")
    args.clock = tb.resolve_clock(args.clock, args.threads)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    info = tb.start(args, "attention", argv)
    names, notes = tb.models_to_run(args.models, args.quick)
    result: Dict[str, Any] = {"machine": info, "settings": {
        "samples": args.samples, "steps": args.steps, "repeats": args.repeats, "cost_repeats": args.cost_repeats,
        "intervals": args.intervals, "attn_start": args.attn_start, "quick": args.quick, "clock": args.clock,
        "models": names,
        "notes": notes}, "targets": {"realised_over_ideal_min": REALISED_MIN}, "models": {}}
    md = tb.md_header("Attention cache: memory and realised vs ideal speedup (benchmarks/attention.py)", info)
    md += [f"Not run: {n}" for n in notes] + ([""] if notes else [])
    with torch.no_grad():
        for name in names:
            r = run_model(name, args)
            result["models"][name] = r
            md += [f"## {name} ({r['steps']} steps, batch {r['samples']})", "", "Cache memory, one context:", "",
                   tb.markdown_table(["variant", "config", "measured B", "formula B", "ratio"], r["memory_table"]),
                   "", "Realised vs ideal speedup, eager:", "",
                   tb.markdown_table(r["speedup_table"]["headers"], r["speedup_table"]["rows"]), ""]
    scaled = scaled_table()
    result["scaled"] = scaled
    print("\n## formula scaled up (batch 1, bf16, one cache context; x2 for sequential CFG)")
    tb.print_table(scaled["headers"], scaled["table"])
    md += ["## Formula scaled up (batch 1, bf16, one cache context)", "",
           tb.markdown_table(scaled["headers"], scaled["table"]), ""]
    path, mdpath = tb.write_outputs(args.out, result, "\n".join(md))
    print(f"\nwrote {path}, {mdpath}")
    return result


if __name__ == "__main__":
    main()
