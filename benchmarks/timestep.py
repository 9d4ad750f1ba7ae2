"""AdaStep and the fewer-steps baseline vs step caching, on the shipped tiny trained models.

    python benchmarks/timestep.py [--models tiny-flux,tiny-wan] [--samples 20] [--repeats 5] [--quick]

For each model (tiny-wan only when its weights are shipped), measured in one run
(generations interleaved round-robin, medians):

* ``uncached``: the model's default step count (tiny-flux 28, tiny-wan 20);
* ``fewer N``: the plain sampler with fewer steps, at several N (~1.05x .. ~3.5x);
  its measured (speedup, PSNR) points are the fewer-steps curve;
* ``adastep thr=..``: ``CacheConfig(method="adastep", threshold=thr,
  max_skip_steps=--ada-max-skip, decay=0.99)`` at two thresholds. ``--ada-thresholds
  auto`` (default) tries a ladder of thresholds for one generation each and keeps
  the two whose skipped-step count is closest to a 1.5x and a 2x step reduction
  (the calibration table is printed); steps skipped come from ``opt.stats.steps_skipped``;
* ``dit (shipped)``: ``npu_cache_fx.bench.shipped_plan`` (all blocks of every list,
  step_start 3, interval 3, linear forecast);
* ``attention cache``: ``method="attention_cache"`` on every block list (one config
  per list), ``step_start=--attn-start``, interval 2;
* ``dit + adastep``: the shipped dit plan plus the lower AdaStep threshold.

Columns: model calls per generation, steps skipped (AdaStep), steps that read a
cache (dit / attention), measured speedup (median uncached / median method, process
CPU time by default -- see ``--clock`` -- with the wall-clock speedup alongside),
PSNR vs uncached (dB, images in [-1, 1]), class fidelity (digit classifier), the fewer-steps PSNR at the same measured
speedup (linear interpolation of the fewer-steps curve; ``-`` outside it) and
whether the method beats it. Writes JSON (``--out``), a Markdown table next to it
and one Pareto PNG per model (``<out stem>_<model>.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tinybench as tb  # noqa: E402

from npu_cache_fx import CacheConfig, models, optimize  # noqa: E402
from npu_cache_fx.bench import shipped_plan  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "timestep.json")
ADA_LADDER = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06)
ADA_TARGETS = (1.5, 2.0)  # step-count reductions the two auto thresholds aim at
FEWER_SPEEDUPS = (1.05, 1.12, 1.25, 1.5, 1.75, 2.0, 2.4, 2.8, 3.5)


def adastep_config(steps: int, threshold: float, max_skip: int) -> CacheConfig:
    return CacheConfig(method="adastep", steps_count=steps, threshold=threshold, max_skip_steps=max_skip, decay=0.99)


def calibrate_adastep(model, gen: tb.Generations, steps: int, max_skip: int, ladder: Sequence[float],
                      captures: Optional[CaptureCache] = None) -> Tuple[List[float], List[Dict[str, Any]]]:
    """Skipped steps per threshold (one generation each); pick the two closest to ADA_TARGETS."""
    table = []
    for thr in ladder:
        opt = optimize(model.transformer, adastep_config(steps, thr, max_skip), captures=captures)
        gen(opt)
        skipped = opt.stats.steps_skipped
        table.append({"threshold": thr, "steps_skipped": skipped, "step_speedup": steps / (steps - skipped)})
    chosen: List[float] = []
    for target in ADA_TARGETS:
        usable = [r for r in table if r["steps_skipped"] > 0 and r["threshold"] not in chosen]
        if not usable:
            break
        best = min(usable, key=lambda r: (abs(r["step_speedup"] - target), r["threshold"]))
        chosen.append(best["threshold"])
    if len(chosen) < 2:  # nothing skips: keep the largest thresholds, the table says so
        chosen = sorted(set(chosen) | set(sorted(ladder)[-2:]))[:2]
    return sorted(chosen), table


def run_model(name: str, args) -> Dict[str, Any]:
    model = models.load(name)
    steps = args.steps or model.default_steps
    labels = models.eval_labels(args.samples)
    gen = tb.Generations(model, labels, steps)
    lists = tb.block_lists(name)
    captures = CaptureCache(model.transformer)
    print(f"\n## {name}: {steps} steps, {len(labels)} samples, block lists {list(lists)}")

    # AdaStep thresholds
    if args.ada_thresholds == "auto":
        ladder = ADA_LADDER[1::3] if args.quick else ADA_LADDER
        thresholds, calib = calibrate_adastep(model, gen, steps, args.ada_max_skip, ladder, captures)
        print(f"   AdaStep calibration (max_skip_steps={args.ada_max_skip}, decay=0.99; one generation each):")
        tb.print_table(["threshold", "steps skipped", "step-count speedup"],
                       [[f"{r['threshold']:g}", r["steps_skipped"], r["step_speedup"]] for r in calib], indent="     ")
        print(f"   chosen thresholds: {thresholds}")
    else:
        thresholds, calib = sorted(float(x) for x in args.ada_thresholds.split(",")), []

    fewer_counts = tb.fewer_step_counts(steps, FEWER_SPEEDUPS[1::3] if args.quick else FEWER_SPEEDUPS)
    methods: Dict[str, Dict[str, Any]] = {"uncached": {"kind": "uncached", "fn": gen.fn(), "calls": steps}}
    for n in fewer_counts:
        methods[f"fewer {n}"] = {"kind": "fewer", "fn": gen.fn(steps=n), "calls": n, "steps": n}
    opts: Dict[str, Any] = {}
    for thr in thresholds:
        key = f"adastep thr={thr:g}"
        opts[key] = optimize(model.transformer, adastep_config(steps, thr, args.ada_max_skip), captures=captures)
        methods[key] = {"kind": "adastep", "threshold": thr}
    dit = shipped_plan(name, steps)
    opts["dit (shipped)"] = optimize(model.transformer, dit, captures=captures)
    methods["dit (shipped)"] = {"kind": "dit"}
    attn = [CacheConfig(method="attention_cache", steps_count=steps, step_start=args.attn_start, step_interval=2,
                        blocks=b, name=f"attn[{tb.short(b)}]") for b in lists]
    opts["attention cache"] = optimize(model.transformer, attn, captures=captures)
    methods["attention cache"] = {"kind": "attention"}
    combo = dit + [adastep_config(steps, thresholds[0], args.ada_max_skip)]
    opts["dit + adastep"] = optimize(model.transformer, combo, captures=captures)
    methods["dit + adastep"] = {"kind": "dit+adastep", "threshold": thresholds[0]}
    plans = {"dit (shipped)": dit, "attention cache": attn, "dit + adastep": combo}
    for key, opt in opts.items():
        methods[key]["fn"] = gen.fn(opt)

    # quality pass (also the warm-up: captures and variants are built here)
    ref = methods["uncached"]["fn"]()
    rows: Dict[str, Dict[str, Any]] = {}
    for key, m in methods.items():
        images = ref if key == "uncached" else m["fn"]()
        row = {"method": key, "kind": m["kind"], **tb.quality(images, ref, labels)}
        if key in opts:
            st = opts[key].stats
            row["steps_skipped"] = st.steps_skipped
            row["steps_reused"] = st.steps_reused
            row["calls"] = steps - st.steps_skipped
            row["stats"] = tb.stats_dict(opts[key])
            if opts[key].configs:
                row["plan_table"] = str(opts[key].plan)
            opts[key].stats.clear()
        else:
            row["calls"] = m["calls"]
            row["steps_skipped"] = 0
        if "threshold" in m:
            row["threshold"] = m["threshold"]
        if key in plans:
            row["plan"] = [c.to_dict() for c in plans[key]]
        rows[key] = row

    # timed runs
    times = tb.time_generations({k: m["fn"] for k, m in methods.items()}, repeats=args.repeats)
    unc = common.median(times[args.clock]["uncached"])
    sp = tb.speedups(times)
    for key, row in rows.items():
        row["seconds"] = {clock: common.summary(t[key], scale=1) for clock, t in times.items()}
        row["speedup"] = sp[args.clock][key]
        row["speedup_wall"], row["speedup_cpu"] = sp["wall"][key], sp["cpu"][key]
    curve = [(rows[k]["speedup"], rows[k]["psnr"]) for k in rows if rows[k]["kind"] == "fewer"]
    for row in rows.values():
        if row["kind"] in ("uncached", "fewer"):
            continue
        at = tb.interp_curve(curve, row["speedup"])
        row["fewer_psnr_at_speed"] = at
        row["beats_fewer"] = None if at is None else row["psnr"] > at
        row["margin_db"] = None if at is None else row["psnr"] - at

    headers = ["method", "calls", "skipped", "reused", "speedup", "(wall)", "PSNR dB", "fidelity", "fewer PSNR @speed",
               "beats fewer?"]
    table = []
    for row in rows.values():
        beats = row.get("beats_fewer")
        verdict = "-" if row["kind"] in ("uncached", "fewer") else (
            "outside curve" if beats is None else f"{'yes' if beats else 'no'} ({row['margin_db']:+.2f} dB)")
        table.append([row["method"], row["calls"], row["steps_skipped"], row.get("steps_reused", 0), row["speedup"],
                      row["speedup_wall"], row["psnr"],
                      row["class_fidelity"], row.get("fewer_psnr_at_speed"), verdict])
    print(f"   {name}: {args.repeats} interleaved generations per method; speedup = {args.clock} time (wall-clock "
          f"speedup alongside); uncached median {unc:.3f} s {args.clock}")
    tb.print_table(headers, table)
    png = tb.sibling(args.out, f"_{name}.png")
    tb.pareto_png(png, f"{name}: {steps} steps, {len(labels)} samples (measured speedup, one run)",
                  {"fewer steps": curve},
                  {r["method"]: [(r["speedup"], r["psnr"], r["method"].replace("adastep ", ""))]
                   for r in rows.values() if r["kind"] not in ("uncached", "fewer")})
    print(f"   wrote {png}")
    return {"model": name, "steps": steps, "samples": len(labels), "ada_max_skip": args.ada_max_skip,
            "ada_thresholds": thresholds, "ada_calibration": calib, "fewer_step_counts": fewer_counts,
            "rows": list(rows.values()), "fewer_curve": curve, "table": {"headers": headers, "rows": table},
            "png": png}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma list of tiny-flux,tiny-wan (default: both; tiny-wan skipped without weights; "
                        "--quick: tiny-flux)")
    p.add_argument("--samples", type=int, default=20, help="samples per generation (default 20)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 28 / 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per method (default 5)")
    p.add_argument("--ada-thresholds", default="auto",
                   help="'auto' (calibrate, default) or a comma list of two AdaStep thresholds")
    p.add_argument("--ada-max-skip", type=int, default=2, help="AdaStep max_skip_steps (default 2)")
    p.add_argument("--attn-start", type=int, default=2, help="attention cache step_start (default 2)")
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny-flux, 4 samples, 10 steps, 1 repeat (numbers are not meaningful)")
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = min(args.samples, 4), 1
        args.steps = args.steps or 10
    if args.repeats < 1 or args.samples < 1:
        p.error("--repeats and --samples must be >= 1")
    args.clock = tb.resolve_clock(args.clock, args.threads)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    info = tb.start(args, "timestep", argv)
    names, notes = tb.models_to_run(args.models, args.quick)
    result: Dict[str, Any] = {"machine": info, "settings": {
        "samples": args.samples, "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
        "ada_max_skip": args.ada_max_skip, "attn_start": args.attn_start, "clock": args.clock, "models": names,
        "notes": notes},
        "models": {}}
    md = tb.md_header("AdaStep, fewer steps and step caching (benchmarks/timestep.py)", info)
    md += [f"Not run: {n}" for n in notes] + ([""] if notes else [])
    with torch.no_grad():
        for name in names:
            r = run_model(name, args)
            result["models"][name] = r
            md += [f"## {name} ({r['steps']} steps, {r['samples']} samples, AdaStep thresholds "
                   f"{r['ada_thresholds']}, max_skip_steps {r['ada_max_skip']})", "",
                   tb.markdown_table(r["table"]["headers"], r["table"]["rows"]), "",
                   f"![pareto]({os.path.basename(r['png'])})", ""]
    path, mdpath = tb.write_outputs(args.out, result, "\n".join(md))
    print(f"\nwrote {path}, {mdpath}")
    return result


if __name__ == "__main__":
    main()
