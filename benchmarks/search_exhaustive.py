"""Is the search's plan dominated by a periodic plan, and does its speedup hold on a held-out batch?

    python benchmarks/search_exhaustive.py                                  # tiny-flux, tiny-wan, tiny-flux-deep
    python benchmarks/search_exhaustive.py --models tiny-flux --plans 40    # one model
    python benchmarks/search_exhaustive.py --quick --out /tmp/x.json        # smoke run (8 steps, 2 + 3 samples, 3 full runs)

Per model:

1. **Tune**: our search (``search(..., session=tune)``, defaults) at each target on a tuning batch
   (``--tune-samples`` samples, seed 0); its plans, predicted speedups and full runs are recorded.
2. **Held-out batch**: another seed (``--held-seed``) and size (``--held-samples``), its own uncached
   reference. Every chosen plan is run there (PSNR vs the uncached output of that batch) and timed
   against the uncached model (median of ``--repeats`` interleaved rounds): ``measured / target``.
3. **Sweep** (sampled where exhaustive is too slow): periodic plans over the search's own method space
   (block range x step_start x step_interval x step_end x forecast order), each one full generation on
   the held-out batch: every simple all-blocks plan (start 0..5, interval 2..6, to the end, each
   forecast order) predicted at least ``--band`` x as fast as the slowest chosen plan, the held-out
   proxy's best plans per target and forecast order (distinct families), and random plans among those
   predicted to reach each target -- ``--plans`` in all at most.
4. **Dominance**: a sweep plan whose PSNR beats a chosen plan's by more than 0.5 dB and is predicted at
   least ``--band`` x its speed is timed in the same interleaved rounds as the chosen plan; it
   dominates if its measured speedup is within ``--tol`` of the chosen plan's or above. Printed: the
   worst gap per target (PSNR of the best plan at equal or higher measured speed minus the chosen
   plan's; <= 0.5 dB = not dominated).
5. The held-out proxy's Spearman rank correlation with the measured MSE over the swept plans
   (forecasting plans included).

Writes ``benchmarks/out/search_exhaustive.json`` + ``.md`` and merges it into ``benchmarks/out/search.json``
under ``"exhaustive"``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402

GAP_DB = 0.5


def spearman(x, y) -> float:
    from search_proxy import spearman as sp
    return sp(x, y)


def _run_fn(name: str, samples: int, steps, seed: int):
    from npu_cache_fx.search.cli import model_run_fn
    return model_run_fn(name, samples, steps, seed=seed)


def sweep_plans(held, targets, slow: float, band: float, per_target: int, limit: int, rng):
    """Periodic plans of the method space to run on the held-out batch (see module doc, step 3)."""
    import dataclasses

    from npu_cache_fx.search.engine import _exact
    from npu_cache_fx.search.screen import pick_diverse, screen
    from npu_cache_fx.search.space import DIT, Candidate, Part, Schedule

    n, seq, B = held.steps_count, held.seq, held.seq.total
    forecasts = held.proxy.forecasts()
    plans, order = {}, []

    def add(part, source):
        c = _exact(held, Candidate((part,), n, seq, source=source))
        if c.key not in plans:
            plans[c.key] = c
            order.append(c.key)

    for s in range(0, 6):
        for i in range(2, 7):
            for f in forecasts:
                part = Part(DIT, 0, B, Schedule(s, i), forecast=f)
                c = _exact(held, Candidate((part,), n, seq))
                if c.predicted_speedup >= band * slow:
                    add(part, "simple")
    table = screen(held, DIT)
    pbf = table.proxy_by_forecast
    for t in targets:
        idx = table.eligible(t)
        for k, f in enumerate(table.forecasts):
            best = idx[np.lexsort((-table.speedup[idx], pbf[k, idx]))]
            for j in pick_diverse(table, best, per_target, per_family=1):
                add(dataclasses.replace(table.part(int(j)), forecast=f), "proxy")
        for j in rng.choice(idx, min(per_target, len(idx)), replace=False) if len(idx) else []:
            f = forecasts[int(rng.integers(len(forecasts)))]
            add(dataclasses.replace(table.part(int(j)), forecast=f), "random")
    simple = [k for k in order if plans[k].source == "simple"]
    rest = [k for k in order if plans[k].source != "simple"]
    keep = simple[: limit // 2] + rest
    return [plans[k] for k in keep[:limit]]


def run_model(name: str, args, rng) -> dict:
    from npu_cache_fx.search import Candidate, SearchSession, search
    from npu_cache_fx.search.engine import _exact, proxy_of

    targets = [float(t) for t in args.targets.split(",")]
    tr, run_tune, steps = _run_fn(name, args.tune_samples, args.steps, 0)
    _, run_held, _ = _run_fn(name, args.held_samples, steps, args.held_seed)
    tune = SearchSession(tr, run_tune, steps_count=steps, progress=False).prepare()
    print(f"\n== {name}: {tune.seq.describe()} (B = {tune.seq.total}), {steps} steps; tune {args.tune_samples} "
          f"samples seed 0, held-out {args.held_samples} samples seed {args.held_seed}", flush=True)
    chosen = {}
    for t in targets:
        r = search(tr, run_tune, target_speedup=t, session=tune, repeats=args.repeats, progress=False,
                   **({"max_full_runs": 3} if args.quick else {}))
        chosen[t] = r
        b = r.best
        choice = r.notes.get("choice")
        sep = "-" if choice is None else (f"{'separated' if choice['separated'] else 'NOT separated'} from "
                                          f"{choice['runner_up']} (t {choice['t'] if choice['t'] is None else round(choice['t'], 1)})")
        print(f"   tune x{t:g}: {b.label if b else '-'}  predicted x{b.predicted_speedup:.2f}  timed "
              f"x{b.timed_speedup or float('nan'):.2f}  psnr {b.psnr:.1f}  new full runs {r.full_runs} "
              f"(plans measured {r.plans_evaluated}); tuning batch: {sep}", flush=True)
    held = SearchSession(tr, run_held, steps_count=steps, progress=False).prepare()
    mine = {}
    for t, r in chosen.items():
        c = Candidate(r.best.parts, steps, held.seq, source="chosen", extra=r.best.extra)
        mine[t] = held.evaluate(_exact(held, c))
    slow = min(c.predicted_speedup for c in mine.values())
    plans = sweep_plans(held, targets, slow, args.band, args.per_target, args.plans, rng)
    t0 = time.perf_counter()
    for k, c in enumerate(plans):
        held.evaluate(c, keep_module=False)
        if args.verbose:
            print(f"   [{k + 1}/{len(plans)}] {c.label:44s} pred x{c.predicted_speedup:5.2f} psnr {c.psnr:5.1f}",
                  flush=True)
    sweep_s = time.perf_counter() - t0
    measured = [c for c in plans if c.mse is not None and c.mse > 0]
    rho = spearman([proxy_of(held, c) for c in measured], [c.mse for c in measured])
    out = {"blocks": tune.seq.describe(), "B": tune.seq.total, "steps": steps, "tune_samples": args.tune_samples,
           "held_samples": args.held_samples, "held_seed": args.held_seed, "plans_swept": len(plans),
           "sweep_seconds": sweep_s, "proxy_spearman_held": rho, "targets": {}}
    print(f"   swept {len(plans)} periodic plans on the held-out batch ({sweep_s:.0f}s); held-out proxy Spearman "
          f"vs MSE {rho:.2f}", flush=True)
    for t in targets:
        me = mine[t]
        rivals = [c for c in measured if c.psnr > me.psnr + GAP_DB and c.predicted_speedup >= args.band * me.predicted_speedup]
        rivals = sorted(rivals, key=lambda c: (c.predicted_speedup < me.predicted_speedup, -c.psnr))
        untimed = len(rivals[args.max_rivals:])
        rivals = rivals[: args.max_rivals]
        me.timed_speedup = None
        for c in rivals:
            c.timed_speedup = None
        held.time([me] + rivals, repeats=args.repeats)
        held.release()
        faster = [c for c in rivals if c.timed_speedup >= (1 - args.tol) * me.timed_speedup]
        top = max(faster, key=lambda c: c.psnr) if faster else None
        # the gap over every swept plan predicted at least as fast (untimed ones: by prediction), for context
        pred_fast = [c for c in measured if c.predicted_speedup >= me.predicted_speedup]
        best_pred = max(pred_fast, key=lambda c: c.psnr) if pred_fast else None
        # no rival at >= its measured speed: the best of the other plans (<= +0.5 dB) predicted at least as fast
        others = [c.psnr - me.psnr for c in measured if c not in rivals and c.key != me.key
                  and c.predicted_speedup >= me.predicted_speedup]
        gap = (top.psnr - me.psnr) if top is not None else (max(others) if others else 0.0)
        r = chosen[t]
        row = {"chosen": {"plan": me.label, "tune_predicted_speedup": r.best.predicted_speedup,
                          "tune_timed_speedup": r.best.timed_speedup, "tune_psnr": r.best.psnr,
                          "held_predicted_speedup": me.predicted_speedup, "held_timed_speedup": me.timed_speedup,
                          "held_psnr": me.psnr, "held_mse": me.mse, "new_full_runs": r.full_runs,
                          "plans_measured": r.plans_evaluated, "timing_runs": r.timing_runs,
                          "notes": {k: r.notes.get(k) for k in ("simple_plans", "forecast_siblings", "refine",
                                                                "reused_plans", "choice")}},
               "measured_over_target": (me.timed_speedup / t) if me.timed_speedup else None,
               "speed_ok": bool(me.timed_speedup and me.timed_speedup >= 0.95 * t),
               "rivals_timed": [{"plan": c.label, "psnr": c.psnr, "predicted_speedup": c.predicted_speedup,
                                 "timed_speedup": c.timed_speedup} for c in rivals],
               "dominating": [c.label for c in faster], "rivals_untimed": untimed,
               "worst_gap_db": gap, "dominated": bool(gap > GAP_DB),
               "best_predicted_at_least_as_fast": None if best_pred is None else {
                   "plan": best_pred.label, "psnr": best_pred.psnr, "predicted_speedup": best_pred.predicted_speedup}}
        out["targets"][str(t)] = row
        print(f"   x{t:g}: chosen {me.label} held-out x{me.timed_speedup:.2f} ({row['measured_over_target']:.2f} of "
              f"target) psnr {me.psnr:.1f} | {len(rivals)} rival(s) > +{GAP_DB} dB timed, {len(faster)} at >= its "
              f"speed | worst gap {gap:+.2f} dB -> {'DOMINATED' if row['dominated'] else 'not dominated'}",
              flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-flux,tiny-wan,tiny-flux-deep")
    p.add_argument("--targets", default="1.5,2.0,2.5")
    p.add_argument("--steps", type=int, default=None, help="default: the model's")
    p.add_argument("--tune-samples", type=int, default=8)
    p.add_argument("--held-samples", type=int, default=16)
    p.add_argument("--held-seed", type=int, default=1)
    p.add_argument("--plans", type=int, default=48, help="at most this many swept plans per model")
    p.add_argument("--per-target", type=int, default=2, help="proxy-best plans per target and forecast, and "
                   "random plans per target")
    p.add_argument("--band", type=float, default=0.9, help="sweep/rival plans predicted >= band x the chosen speed")
    p.add_argument("--tol", type=float, default=0.02, help="measured speed within tol counts as equal")
    p.add_argument("--max-rivals", type=int, default=6, help="rivals timed per target (best PSNR first)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-flux, 8 steps, 2 + 3 samples, x1.5, 5 plans, "
                   "at most 3 full runs (numbers not meaningful)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "search_exhaustive.json"))
    p.add_argument("--merge-into", default=os.path.join(HERE, "out", "search.json"),
                   help="also store the result under 'exhaustive' in this JSON ('' to skip)")
    args = p.parse_args(argv)
    common.set_threads(1)
    if args.quick:
        args.models, args.steps, args.tune_samples, args.held_samples = "tiny-flux", 8, 2, 3
        args.targets, args.plans, args.repeats, args.per_target = "1.5", 5, 1, 1  # and at most 3 full runs
    info = common.machine_info()
    print(f"command : {info['command']}\ntorch   : {info['torch']}, {info['threads']} thread(s), {info['processor']}")
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    models = {name: run_model(name, args, rng) for name in args.models.split(",")}
    data = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "merge_into")},
            "models": models, "seconds": time.perf_counter() - t0}
    common.write_json(args.out, data)
    lines = ["# Search vs periodic plans on a held-out batch", "", f"Command: `{info['command']}`", "",
             "| model | target | chosen plan | held-out x | / target | PSNR | worst gap dB | dominated | new full "
             "runs | plans swept | proxy Spearman |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        for t, v in m["targets"].items():
            c = v["chosen"]
            lines.append(f"| {name} | {t} | `{c['plan']}` | {c['held_timed_speedup']:.2f} | "
                         f"{v['measured_over_target']:.2f} | {c['held_psnr']:.1f} | {v['worst_gap_db']:+.2f} | "
                         f"{'yes' if v['dominated'] else 'no'} | {c['new_full_runs']} | {m['plans_swept']} | "
                         f"{m['proxy_spearman_held']:.2f} |")
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.merge_into:
        merged = {}
        if os.path.exists(args.merge_into):
            try:
                merged = json.load(open(args.merge_into))
            except Exception:
                merged = {}
        merged["exhaustive"] = data
        common.write_json(args.merge_into, merged)
    worst = max(v["worst_gap_db"] for m in models.values() for v in m["targets"].values())
    low = min(v["measured_over_target"] or 0 for m in models.values() for v in m["targets"].values())
    print(f"\nworst gap {worst:+.2f} dB (dominated if > {GAP_DB}); lowest held-out measured/target {low:.2f}")
    print(f"wrote {args.out} ({data['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
