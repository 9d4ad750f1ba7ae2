"""Forecasting reuse (forecast='linear' | 'taylor2') vs plain reuse vs fewer steps, on the shipped tiny models.

    python benchmarks/forecast.py [--models tiny-flux,tiny-wan] [--samples 10] [--repeats 5] [--quick]

For each model (tiny-wan only when its weights are shipped), measured in one run
(generations interleaved round-robin, medians; speedups in process CPU time by
default, ``--clock``, with the wall-clock speedup alongside):

* ``fewer N``: the plain sampler at several step counts (~1.05x .. ~4.5x): the
  fewer-steps curve (measured speedup, PSNR);
* a DiT block cache over all blocks of every block list, for every
  ``step_interval`` in ``--intervals`` (2,3,4,5) and ``step_start`` in ``--starts``
  (2,3,4), with ``forecast`` = ``none`` (plain reuse), ``linear`` and ``taylor2``.
  All plans share one capture (``captures=``).

Targets, checked and printed with their margins:

1. at >= 2x measured speedup, forecasting (linear or taylor2) is >= 2 dB above the
   fewer-steps run of equal measured speed (fewer-steps curve interpolated linearly
   at the plan's measured speedup); the best such point is reported;
2. forecasting is above plain reuse at every speedup >= 1.5x: the Pareto frontiers
   are compared, ``F(s)`` = best PSNR among a family's points with measured
   speedup >= ``s``, at every measured speedup ``s >= 1.5`` both families reach;
   the worst margin is reported. Same-config wins (forecast vs plain reuse at equal
   interval/start) are reported too.

Writes JSON (``--out``), a Markdown table next to it and one Pareto PNG per model
(``<out stem>_<model>.png``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import tinybench as tb  # noqa: E402

from npu_cache_fx import CacheConfig, models, optimize  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

DEFAULT_OUT = os.path.join("benchmarks", "out", "forecast.json")
FORECASTS = ("none", "linear", "taylor2")
FEWER_SPEEDUPS = (1.05, 1.12, 1.25, 1.5, 1.75, 2.0, 2.4, 2.8, 3.5, 4.5)
MIN_SPEEDUP_VS_FEWER, MIN_MARGIN_DB = 2.0, 2.0
MIN_SPEEDUP_VS_REUSE = 1.5


def plan(lists: Sequence[str], steps: int, interval: int, start: int, forecast: str) -> List[CacheConfig]:
    return [CacheConfig(steps_count=steps, step_start=start, step_interval=interval, blocks=b, forecast=forecast,
                        name=tb.short(b)) for b in lists]


def check_targets(rows: List[Dict[str, Any]], curve: Sequence[Tuple[float, float]]) -> Dict[str, Any]:
    fam = {f: [(r["speedup"], r["psnr"]) for r in rows if r.get("forecast") == f] for f in FORECASTS}
    out: Dict[str, Any] = {}
    # 1. >= 2 dB above fewer steps at >= 2x
    for f in FORECASTS:
        cands = [r for r in rows if r.get("forecast") == f and r["speedup"] >= MIN_SPEEDUP_VS_FEWER
                 and r.get("margin_db") is not None]
        best = max(cands, key=lambda r: r["margin_db"], default=None)
        out[f"vs_fewer_{f}"] = None if best is None else {
            "method": best["method"], "speedup": best["speedup"], "psnr": best["psnr"],
            "fewer_psnr": best["fewer_psnr_at_speed"], "margin_db": best["margin_db"]}
    best_fc = [out[f"vs_fewer_{f}"] for f in ("linear", "taylor2") if out[f"vs_fewer_{f}"]]
    top = max(best_fc, key=lambda b: b["margin_db"], default=None)
    out["target1"] = {"text": f">= {MIN_MARGIN_DB:g} dB above fewer steps at >= {MIN_SPEEDUP_VS_FEWER:g}x",
                      "best": top, "met": bool(top and top["margin_db"] >= MIN_MARGIN_DB),
                      "margin_db": None if top is None else top["margin_db"] - MIN_MARGIN_DB}
    # 2. frontier above plain reuse at every speedup >= 1.5x
    for f in ("linear", "taylor2"):
        reach = min(max((x for x, _ in fam[f]), default=0), max((x for x, _ in fam["none"]), default=0))
        grid = sorted({x for g in fam.values() for x, _ in g if MIN_SPEEDUP_VS_REUSE <= x <= reach})
        margins = [(s, tb.frontier(fam[f], s) - tb.frontier(fam["none"], s)) for s in grid]
        worst = min(margins, key=lambda m: m[1], default=None)
        same = [(r["method"], r["psnr"] - r["plain_psnr"]) for r in rows
                if r.get("forecast") == f and r.get("plain_speedup", 0) >= MIN_SPEEDUP_VS_REUSE]
        out[f"target2_{f}"] = {
            "text": f"{f} frontier above plain reuse at every speedup >= {MIN_SPEEDUP_VS_REUSE:g}x "
                    f"(checked up to {reach:.2f}x)",
            "met": bool(margins) and all(m > 0 for _, m in margins),
            "worst_margin_db": None if worst is None else worst[1], "worst_at_speedup": None if worst is None
            else worst[0], "points": len(margins),
            "same_config_wins": sum(1 for _, d in same if d > 0), "same_config_total": len(same),
            "same_config_min_db": min((d for _, d in same), default=None)}
    return out


def run_model(name: str, args) -> Dict[str, Any]:
    model = models.load(name)
    steps = args.steps or model.default_steps
    labels = models.eval_labels(args.samples, model)  # scene captions for tiny-flux-deep
    gen = tb.Generations(model, labels, steps)
    lists = tb.block_lists(name)
    captures = CaptureCache(model.transformer)
    print(f"\n## {name}: {steps} steps, {len(labels)} samples, all blocks of {list(lists)}")

    fewer_counts = tb.fewer_step_counts(steps, FEWER_SPEEDUPS[1::3] if args.quick else FEWER_SPEEDUPS)
    methods: Dict[str, Dict[str, Any]] = {"uncached": {"kind": "uncached", "fn": gen.fn()}}
    for n in fewer_counts:
        methods[f"fewer {n}"] = {"kind": "fewer", "steps": n, "fn": gen.fn(steps=n)}
    opts = {}
    for f in args.forecasts:
        for interval in args.intervals:
            for start in args.starts:
                key = f"{f} i{interval} s{start}"
                cfgs = plan(lists, steps, interval, start, f)
                opts[key] = optimize(model.transformer, cfgs, captures=captures)
                methods[key] = {"kind": "cache", "forecast": f, "interval": interval, "start": start,
                                "fn": gen.fn(opts[key]), "plan": [c.to_dict() for c in cfgs]}

    ref = methods["uncached"]["fn"]()  # quality pass = warm-up (captures, variants)
    rows: Dict[str, Dict[str, Any]] = {}
    for key, m in methods.items():
        images = ref if key == "uncached" else m["fn"]()
        row = {"method": key, **{k: v for k, v in m.items() if k != "fn"}, **tb.quality(images, ref, labels, model)}
        if key in opts:
            row["reuse_steps"] = opts[key].stats.steps_reused
            row["variants"] = len(opts[key].plan.variants())
            row["stale_reads_avoided"] = opts[key].stats.stale_reads_avoided
            row["cache_bytes"] = opts[key].stats.cache_bytes
        rows[key] = row
    print(f"   {len(methods)} runs; timing {args.repeats} interleaved rounds ...", flush=True)
    times = tb.time_generations({k: m["fn"] for k, m in methods.items()}, repeats=args.repeats)
    unc = common.median(times[args.clock]["uncached"])
    sp = tb.speedups(times)
    for key, row in rows.items():
        row["seconds"] = {clock: common.summary(t[key], scale=1) for clock, t in times.items()}
        row["speedup"] = sp[args.clock][key]
        row["speedup_wall"], row["speedup_cpu"] = sp["wall"][key], sp["cpu"][key]
    curve = [(r["speedup"], r["psnr"]) for r in rows.values() if r["kind"] == "fewer"]
    for row in rows.values():
        if row["kind"] == "cache":
            at = tb.interp_curve(curve, row["speedup"])
            row["fewer_psnr_at_speed"] = at
            row["margin_db"] = None if at is None else row["psnr"] - at
            plain = rows.get(f"none i{row['interval']} s{row['start']}")
            if plain is not None:
                row["plain_psnr"], row["plain_speedup"] = plain["psnr"], plain["speedup"]
    targets = check_targets(list(rows.values()), curve)

    headers = ["method", "reuse steps", "speedup", "(wall)", "PSNR dB", "fidelity", "fewer PSNR @speed", "vs fewer dB",
               "vs plain dB"]
    ordered = sorted(rows.values(), key=lambda r: ({"uncached": 0, "fewer": 1, "cache": 2}[r["kind"]],
                                                   FORECASTS.index(r.get("forecast", "none")), -r.get("steps", 0),
                                                   r["speedup"]))
    table = [[r["method"], r.get("reuse_steps", "-"), r["speedup"], r["speedup_wall"], r["psnr"], r["class_fidelity"],
              r.get("fewer_psnr_at_speed"), r.get("margin_db"),
              (r["psnr"] - r["plain_psnr"]) if r.get("forecast") not in (None, "none") and "plain_psnr" in r
              else None] for r in ordered]
    print(f"   {name}: uncached median {unc:.3f} s per generation ({args.clock}); speedup = {args.clock} time, "
          f"wall-clock speedup alongside")
    tb.print_table(headers, table)
    lines = _target_lines(targets)
    for line in lines:
        print("   " + line)
    png = tb.sibling(args.out, f"_{name}.png")
    fam = {f: [(r["speedup"], r["psnr"], r["method"].split(" ", 1)[1]) for r in rows.values()
               if r.get("forecast") == f] for f in args.forecasts}
    frontiers = {f"{f} (frontier)": _frontier_line(pts) for f, pts in fam.items()}
    tb.pareto_png(png, f"{name}: {steps} steps, {len(labels)} samples; all blocks, interval x step_start grid",
                  {"fewer steps": curve, **frontiers}, {f"{f} (i=interval, s=step_start)": pts
                                                         for f, pts in fam.items()})
    print(f"   wrote {png}")
    return {"model": name, "steps": steps, "samples": len(labels), "fewer_step_counts": fewer_counts,
            "rows": ordered, "fewer_curve": curve, "targets": targets, "target_lines": lines,
            "table": {"headers": headers, "rows": table}, "png": png}


def _frontier_line(pts) -> List[Tuple[float, float]]:
    """The upper-right Pareto points (no other point is both faster and better)."""
    pts = sorted(((x, y) for x, y, _ in pts), key=lambda p: -p[0])
    out, best = [], float("-inf")
    for x, y in pts:
        if y > best:
            out.append((x, y))
            best = y
    return out


def _target_lines(t: Dict[str, Any]) -> List[str]:
    lines = []
    t1 = t["target1"]
    if t1["best"] is None:
        lines.append(f"target 1 ({t1['text']}): NOT CHECKED (no forecasting point at >= "
                     f"{MIN_SPEEDUP_VS_FEWER:g}x inside the fewer-steps curve)")
    else:
        b = t1["best"]
        lines.append(f"target 1 ({t1['text']}): {'MET' if t1['met'] else 'MISSED'} -- best {b['method']} at "
                     f"{b['speedup']:.2f}x: {b['psnr']:.2f} dB vs fewer steps {b['fewer_psnr']:.2f} dB = "
                     f"{b['margin_db']:+.2f} dB ({t1['margin_db']:+.2f} dB vs the target)")
    for f in ("none",):
        b = t.get(f"vs_fewer_{f}")
        if b:
            lines.append(f"  (plain reuse, for reference: best {b['method']} at {b['speedup']:.2f}x: "
                         f"{b['margin_db']:+.2f} dB vs fewer steps)")
    for f in ("linear", "taylor2"):
        t2 = t.get(f"target2_{f}")
        if t2 is None:
            continue
        if not t2["points"]:
            lines.append(f"target 2 ({t2['text']}): NOT CHECKED (no common speedup >= {MIN_SPEEDUP_VS_REUSE:g}x)")
            continue
        lines.append(f"target 2 ({t2['text']}): {'MET' if t2['met'] else 'MISSED'} -- worst frontier margin "
                     f"{t2['worst_margin_db']:+.2f} dB at {t2['worst_at_speedup']:.2f}x over {t2['points']} "
                     f"speedups; same interval/start: {t2['same_config_wins']}/{t2['same_config_total']} above "
                     f"plain reuse (min {tb.fmt(t2['same_config_min_db'], '+.2f')} dB)")
    return lines


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help="comma list of tiny-flux,tiny-wan (default: both; tiny-wan skipped without weights; "
                        "--quick: tiny-flux), or tiny-flux-deep (only when named)")
    p.add_argument("--samples", type=int, default=10, help="samples per generation (default 10)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's, 28 / 20)")
    p.add_argument("--repeats", type=int, default=5, help="timed generations per run (default 5)")
    p.add_argument("--intervals", type=_ints, default=[2, 3, 4, 5], help="step_interval grid (default 2,3,4,5)")
    p.add_argument("--starts", type=_ints, default=[2, 3, 4], help="step_start grid (default 2,3,4)")
    tb.add_run_args(p, DEFAULT_OUT)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny-flux, 4 samples, 10 steps, intervals 2,3, start 2, 1 repeat")
    args = p.parse_args(argv)
    args.forecasts = list(FORECASTS)
    if args.quick:
        args.samples, args.repeats = min(args.samples, 4), 1
        args.steps = args.steps or 10
        args.intervals, args.starts = args.intervals[:2], args.starts[:1]
    if args.repeats < 1 or args.samples < 1 or not args.intervals or not args.starts:
        p.error("--repeats/--samples must be >= 1 and the grids non-empty")
    args.clock = tb.resolve_clock(args.clock, args.threads)
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    info = tb.start(args, "forecast", argv)
    names, notes = tb.models_to_run(args.models, args.quick)
    result: Dict[str, Any] = {"machine": info, "settings": {
        "samples": args.samples, "steps": args.steps, "repeats": args.repeats, "quick": args.quick,
        "intervals": args.intervals, "starts": args.starts, "forecasts": args.forecasts, "clock": args.clock,
        "models": names,
        "notes": notes}, "targets": {"min_speedup_vs_fewer": MIN_SPEEDUP_VS_FEWER, "min_margin_db": MIN_MARGIN_DB,
                                     "min_speedup_vs_reuse": MIN_SPEEDUP_VS_REUSE}, "models": {}}
    md = tb.md_header("Forecasting reuse vs plain reuse vs fewer steps (benchmarks/forecast.py)", info)
    md += [f"Not run: {n}" for n in notes] + ([""] if notes else [])
    with torch.no_grad():
        for name in names:
            r = run_model(name, args)
            result["models"][name] = r
            md += [f"## {name} ({r['steps']} steps, {r['samples']} samples)", "",
                   tb.markdown_table(r["table"]["headers"], r["table"]["rows"]), ""]
            md += [f"* {line.strip()}" for line in r["target_lines"]]
            md += ["", f"![pareto]({os.path.basename(r['png'])})", ""]
    path, mdpath = tb.write_outputs(args.out, result, "\n".join(md))
    print(f"\nwrote {path}, {mdpath}")
    return result


if __name__ == "__main__":
    main()
