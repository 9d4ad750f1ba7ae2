"""How well the search's error proxy ranks plans on a model: rank correlation and single-read probes.

    python benchmarks/search_proxy.py                                   # tiny-flux, ~6 min on 2 cores
    python benchmarks/search_proxy.py --models flux-dev-depth --samples 2   # Flux-dev's depth, ~10 min
    python benchmarks/search_proxy.py --quick --out /tmp/p.json         # smoke run

Our search runs only a short list in full, so the plan it finds is as good as the proxy's ranking
(:mod:`npu_cache_fx.search.proxy`). For each model this runs, on one :class:`SearchSession`:

1. **Rank check**: a sample of DiT plans (per target 1.5 / 2 / 2.5: the best-proxy plans of
   distinct families, the best plans computing the first 15 % of the steps, and random plans
   from the best third), all with plain reuse, each one full generation. Printed: Spearman rank
   correlation of the measured MSE with the proxy as the search uses it (warm-up damping 0.2),
   without the damping, and with a *coherent* variant that adds the per-step errors as vectors
   (``|sum_s w_s e_s|^2`` from the recorded Gram matrix, errors propagated unchanged) instead of
   as squared norms; plus the RMS log error of ``mse = c * proxy`` (a factor: exp(rms)).
2. **Single-read probes**: plans that read the cache at one step ``s`` only (refresh at ``s-1``),
   for a range of the block sequence: the measured MSE over the proxy's term for that step is
   the sensitivity of the final output to an error made at ``s`` -- flat if the proxy's per-step
   weights are right.

Prints the tables and writes JSON + Markdown (``benchmarks/out/search_proxy.{json,md}``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

import common  # noqa: E402
from search import DEPTH_MODEL, load_model  # noqa: E402

LATE = 0.15  # of the steps, as the search's late-start slot


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for val in np.unique(v):  # ties share their mean rank
            tie = v == val
            r[tie] = r[tie].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def proxies(px, part, n):
    """The proxy as the search uses it (:meth:`Proxy.score`), without warm-up damping, and the coherent variant."""
    from npu_cache_fx.search.space import DIT, reference_steps, schedule_actions
    actions = schedule_actions(DIT, part.schedule, n)
    mat = px.dit_matrix(part.start, part.end)
    gram = sum(w * g for w, g in px.gram_terms(DIT, part.start, part.end))
    out = {}
    warmup = px.warmup
    try:
        for name, wu in (("proxy", warmup), ("no warm-up damping", 0.0)):
            px.warmup = wu
            out[name] = px.score(mat, actions)
    finally:
        px.warmup = warmup
    w = px.weights() * px.gain
    c = np.zeros(n)  # the output error as a combination of the recorded per-step deltas
    for s, r in enumerate(reference_steps(actions)):
        if r is not None:
            c[r] += w[s]
            c[s] -= w[s]
    out["coherent"] = float(c @ gram @ c)
    return out


def sample_plans(session, table, targets, per_target, rng):
    from npu_cache_fx.search.engine import _exact
    from npu_cache_fx.search.screen import pick_diverse
    from npu_cache_fx.search.space import Candidate
    n = session.steps_count
    plans = {}

    def add(i):
        part = dataclasses.replace(table.part(int(i)), forecast="none")
        c = _exact(session, Candidate((part,), n, session.seq, source="sample"))
        plans.setdefault(c.key, c)

    for t in targets:
        order = table.order(t)
        if not len(order):
            continue
        for i in pick_diverse(table, order, per_target, per_family=1):
            add(i)
        late = [i for i in order if table.part(int(i)).schedule.step_start >= max(1, int(np.ceil(LATE * n)))]
        for i in late[:max(1, per_target // 2)]:
            add(i)
        best_third = order[:max(len(order) // 3, 1)]
        for i in rng.choice(best_third, min(per_target, len(best_third)), replace=False):
            add(i)
    return list(plans.values())


def probe(session, start, end, steps_to_probe):
    from npu_cache_fx.search.engine import _exact
    from npu_cache_fx.search.space import DIT, Candidate, Part, Schedule, schedule_actions
    n, px = session.steps_count, session.proxy
    mat = px.dit_matrix(start, end)
    rows = []
    for s in steps_to_probe:
        refresh = tuple([s - 1] + list(range(s + 1, n)))
        part = Part(DIT, start, end, Schedule(s - 1, 1, None, refresh))
        c = _exact(session, Candidate((part,), n, session.seq, source="probe"))
        session.evaluate(c, keep_module=False)
        term = px.score(mat, schedule_actions(DIT, part.schedule, n))  # its one READ step
        rows.append({"step": s, "mse": c.mse, "proxy_term": term, "mse_over_term": c.mse / max(term, 1e-300)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-flux", help=f"comma list of tiny-flux, tiny-wan, {DEPTH_MODEL}")
    p.add_argument("--samples", type=int, default=4, help="samples per generation (default 4)")
    p.add_argument("--steps", type=int, default=None, help="default: the model's (28)")
    p.add_argument("--targets", default="1.5,2.0,2.5")
    p.add_argument("--per-target", type=int, default=4, help="best-proxy plans per target (plus as many "
                   "random ones and half as many late-start ones)")
    p.add_argument("--probe-range", default=None,
                   help="A,B: block range of the single-read probes (default: the whole sequence but block 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-flux, 2 samples, 8 steps, 1 plan per target")
    p.add_argument("--out", default=os.path.join(HERE, "out", "search_proxy.json"))
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    if args.quick:
        args.models, args.samples, args.steps, args.per_target, args.targets = "tiny-flux", 2, 8, 1, "1.5,2.0"
    info = common.machine_info()
    print(f"command : {info['command']}\ntorch   : {info['torch']}, {info['threads']} thread(s), {info['processor']}")

    from npu_cache_fx.search import SearchSession
    from npu_cache_fx.search.screen import screen
    from npu_cache_fx.search.space import DIT

    targets = [float(t) for t in args.targets.split(",")]
    rng = np.random.default_rng(args.seed)
    t_all = time.perf_counter()
    data = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k != "out"}, "models": {}}
    md = ["# Search proxy: rank check and single-read probes", "", f"Command: `{info['command']}`", ""]
    for name in args.models.split(","):
        transformer, run_fn, steps = load_model(name, args.samples, args.steps)
        session = SearchSession(transformer, run_fn, steps_count=steps, progress=False).prepare()
        n, px = steps, session.proxy
        table = screen(session, DIT)
        plans = sample_plans(session, table, targets, args.per_target, rng)
        print(f"\n== {name}: {session.seq.describe()} (B = {session.seq.total}), {steps} steps, {args.samples} "
              f"samples: {len(plans)} plans")
        rows = []
        for c in plans:
            session.evaluate(c, keep_module=False)
            rows.append({"plan": c.label, "predicted_speedup": c.predicted_speedup, "mse": c.mse,
                         **proxies(px, c.parts[0], n)})
            print(f"   {c.label:36s} x{c.predicted_speedup:5.2f}  mse {c.mse:9.3g}  proxy {rows[-1]['proxy']:9.4g}",
                  flush=True)
        mse = [r["mse"] for r in rows]
        check = {}
        for key in ("proxy", "no warm-up damping", "coherent"):
            vals = np.array([r[key] for r in rows])
            ok = vals > 0
            resid = np.log(np.array(mse)[ok]) - np.log(vals[ok])
            check[key] = {"spearman": spearman(vals, mse),
                          "rms_log_error": float(resid.std()) if ok.sum() > 1 else float("nan")}
        print(f"   rank check over {len(rows)} plans: " + "; ".join(
            f"{k}: Spearman {v['spearman']:.2f}, rms log error {v['rms_log_error']:.2f}" for k, v in check.items()))
        if args.probe_range:
            a, b = (int(x) for x in args.probe_range.split(","))
        else:
            a, b = 1, session.seq.total
        probe_steps = sorted({s for s in (1, 2, 3, 5, n // 4, n // 2, 3 * n // 4, n - 2) if 1 <= s <= n - 2})
        probes = probe(session, a, b, probe_steps)
        print(f"   single-read probes, range [{a}:{b}] (mse / proxy term flat = per-step weights right):")
        for r in probes:
            print(f"     step {r['step']:3d}  mse {r['mse']:9.3g}  proxy term {r['proxy_term']:9.3g}  "
                  f"ratio {r['mse_over_term']:9.3g}")
        data["models"][name] = {"blocks": session.seq.describe(), "B": session.seq.total, "steps": steps,
                                "samples": args.samples, "plans": rows, "rank_check": check,
                                "probe_range": [a, b], "probes": probes}
        md += [f"## {name} ({session.seq.describe()}, {steps} steps, {args.samples} samples)", "",
               "| proxy | Spearman vs measured MSE | rms log error |", "|---|---|---|"]
        md += [f"| {k} | {v['spearman']:.2f} | {v['rms_log_error']:.2f} |" for k, v in check.items()]
        md += ["", f"{len(rows)} plans. Single-read probes, range [{a}:{b}]:", "",
               "| step | MSE | proxy term | MSE / term |", "|---|---|---|---|"]
        md += [f"| {r['step']} | {r['mse']:.3g} | {r['proxy_term']:.3g} | {r['mse_over_term']:.3g} |" for r in probes]
        md += [""]
    data["seconds"] = time.perf_counter() - t_all
    common.write_json(args.out, data)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    print(f"\nwrote {args.out}, {md_path} ({data['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
