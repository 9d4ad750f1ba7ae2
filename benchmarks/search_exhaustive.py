"""Exhaustive sweep of every valid DiT plan on tiny-flux at few steps, against our search's pick.

    python benchmarks/search_exhaustive.py                 # 8 steps (x1.5, x2) and 10 steps (x2); ~10 min
    python benchmarks/search_exhaustive.py --quick         # 6 steps, x1.5, 2 samples (smoke)

"Every valid DiT plan": one block range ``[a, b)`` of the 8-block sequence (2 double + 6 single
blocks; a range over both lists is two CacheConfigs with one schedule) x every periodic
schedule ``(step_start, step_interval in 2..N-1, step_end)``, deduplicated by the per-step
action sequence (many triples give the same plan). The speedup constraint is the same for
both: predicted speedup (measured cost model) >= target. Every plan meeting it is run in full
(MSE vs the uncached output); our search runs on the same session first (its own full-run
count is recorded before the sweep) and its plan's MSE is compared with the sweep's optimum.
Writes ``benchmarks/out/search_exhaustive.json`` + ``.md`` and merges the result into
``benchmarks/out/search.json`` under ``"exhaustive"``.
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

import common  # noqa: E402


def sweep(steps: int, targets, samples: int, repeats: int, max_full_runs: int):
    from npu_cache_fx.search import SearchSession, search
    from npu_cache_fx.search.cli import model_run_fn
    from npu_cache_fx.search.screen import screen
    from npu_cache_fx.search.space import dit_schedules

    transformer, run_fn, steps = model_run_fn("tiny-flux", samples, steps)
    session = SearchSession(transformer, run_fn, steps_count=steps, progress=True)
    session.prepare()
    ours = {}
    for t in targets:
        r = search(transformer, run_fn, target_speedup=t, session=session, repeats=repeats,
                   max_full_runs=max_full_runs)
        ours[t] = r
    before = session.full_runs
    table = screen(session, "dit_block_cache", schedules=dit_schedules(steps, intervals=range(2, steps)))
    lo = min(targets)
    idx = table.eligible(lo)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(idx), desc=f"exhaustive {steps} steps")
    except ImportError:  # pragma: no cover
        bar = None
    plans = []
    for i in idx:
        c = table.candidate(int(i), source="exhaustive")
        session.evaluate(c, keep_module=False)
        plans.append(c)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    out = {"steps": steps, "samples": samples, "plans_screened": len(table), "plans_run": len(plans),
           "sweep_full_runs": session.full_runs - before, "targets": {}}
    for t in targets:
        ok = [c for c in plans if c.predicted_speedup >= t]
        best = min(ok, key=lambda c: c.mse)
        r = ours[t]
        b = r.best
        session.time([best], repeats=repeats)  # the optimum's measured speedup, same protocol as ours
        rank = 1 + sum(1 for c in ok if c.mse < b.mse)
        out["targets"][str(t)] = {
            "plans_meeting_constraint": len(ok),
            "optimum": {"plan": best.label, "mse": best.mse, "psnr": best.psnr,
                        "predicted_speedup": best.predicted_speedup, "measured_speedup": best.timed_speedup},
            "ours": {"plan": b.label, "mse": b.mse, "psnr": b.psnr, "predicted_speedup": b.predicted_speedup,
                     "measured_speedup": b.timed_speedup, "full_runs": r.full_runs, "timing_runs": r.timing_runs,
                     "source": b.source, "target_met": r.target_met},
            "mse_ratio": b.mse / best.mse if best.mse else None,
            "within_10pct": bool(b.mse <= 1.1 * best.mse),
            "ours_rank_among_periodic": rank,
            "ours_plan_in_sweep": any(c.key == b.key for c in ok),
            "median_mse": sorted(c.mse for c in ok)[len(ok) // 2],
        }
        print(f"{steps} steps x{t:g}: optimum {best.label} mse {best.mse:.4g} (x{best.timed_speedup:.2f}) | "
              f"ours {b.label} mse {b.mse:.4g} (x{b.timed_speedup:.2f}, {r.full_runs} full runs) | "
              f"ratio {b.mse / best.mse:.3f} rank {rank}/{len(ok)}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-full-runs", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "out", "search_exhaustive.json"))
    p.add_argument("--merge-into", default=os.path.join(HERE, "out", "search.json"),
                   help="also store the result under 'exhaustive' in this JSON ('' to skip)")
    args = p.parse_args(argv)
    common.set_threads(1)
    t0 = time.perf_counter()
    configs = [(6, [1.5])] if args.quick else [(8, [1.5, 2.0]), (10, [2.0])]
    if args.quick:
        args.samples, args.repeats = 2, 1
    results = [sweep(n, ts, args.samples, args.repeats, args.max_full_runs) for n, ts in configs]
    data = {"machine": common.machine_info(), "quick": args.quick, "sweeps": results,
            "seconds": time.perf_counter() - t0}
    common.write_json(args.out, data)
    lines = ["# Exhaustive DiT-plan sweep vs our search (tiny-flux)", "",
             "| steps | target | plans run | optimum plan | optimum MSE | ours plan | ours MSE | ratio | rank | "
             "ours full runs | within 10% |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in results:
        for t, v in s["targets"].items():
            lines.append(f"| {s['steps']} | {t} | {v['plans_meeting_constraint']} | `{v['optimum']['plan']}` | "
                         f"{v['optimum']['mse']:.4g} | `{v['ours']['plan']}` | {v['ours']['mse']:.4g} | "
                         f"{v['mse_ratio']:.3f} | {v['ours_rank_among_periodic']} | {v['ours']['full_runs']} | "
                         f"{'yes' if v['within_10pct'] else 'no'} |")
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
    print(f"wrote {args.out} ({data['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
