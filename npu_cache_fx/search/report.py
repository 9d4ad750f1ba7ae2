"""Plans as JSON, and the search report: JSON, Markdown and the speedup-vs-MSE Pareto PNG."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Sequence, Union

from ..config import CacheConfig, config_list, configs_from_json, configs_to_json

__all__ = ["config_to_json", "config_from_json", "result_to_json", "write_report", "markdown", "pareto_png"]

def config_to_json(cfgs: Union[CacheConfig, Sequence[CacheConfig]]) -> List[Dict[str, Any]]:
    """CacheConfig(s) -> list of dicts of the fields that differ from the defaults, ``method`` always first.

    The core's :func:`npu_cache_fx.config.configs_to_json`, with the method spelled out.
    """
    return [{"method": c.method, **d} for c, d in zip(config_list(cfgs, "the search report"), configs_to_json(cfgs))]


def config_from_json(obj: Any) -> List[CacheConfig]:
    """A dict, a list of dicts, ``{"config": [...]}`` or a whole search.json -> list of CacheConfig."""
    return configs_from_json(obj)


# ----------------------------------------------------------------------------- report
def _clean(obj: Any) -> Any:
    import math

    import numpy as np
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return _clean(float(obj))
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_clean(v) for v in obj]
    if isinstance(obj, CacheConfig):
        return config_to_json(obj)[0]
    return str(obj)


def best_json(result) -> Dict[str, Any]:
    c = result.best
    if c is None:
        return {"config": [], "predicted_speedup": None, "measured_speedup": None, "mse": None, "psnr": None}
    return _clean({
        "label": c.label, "config": config_to_json(c.configs()), "predicted_speedup": c.predicted_speedup,
        "measured_speedup": c.speedup, "measured_wall_speedup": c.notes.get("timed_wall_speedup"),
        "single_run_speedup": c.measured_speedup, "mse": c.mse, "psnr": c.psnr, "proxy": c.proxy,
        "cache_bytes": c.cache_bytes, "source": c.source,
    })


def result_to_json(result) -> Dict[str, Any]:
    """The search.json layout: ``best``, ``candidates``, ``full_runs``, ``seconds`` and the rest."""
    return _clean({
        "strategy": result.strategy, "method": result.method, "target_speedup": result.target_speedup,
        "best": best_json(result), "target_met": result.target_met, "accept": result.accept,
        "full_runs": result.full_runs, "plans_evaluated": result.plans_evaluated, "timing_runs": result.timing_runs, "reference_runs": result.reference_runs,
        "seconds": result.seconds, "clock": result.clock,
        "candidates": [c.row() for c in result.candidates],
        "notes": {k: v for k, v in result.notes.items()},
        "screened": {m: {"count": d["count"], "pareto": [
            {"predicted_speedup": float(d["speedup"][i]), "proxy": float(d["proxy"][i]),
             "predicted_mse": None if d["predicted_mse"] is None else float(d["predicted_mse"][i])}
            for i in d["pareto"]]} for m, d in result.screened.items()},
    })


def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "-"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def summary_line(result) -> str:
    b = result.best
    if b is None:
        return f"{result.strategy} {result.method} x{result.target_speedup:g}: no plan"
    choice = result.notes.get("choice")
    unsure = (f"  (the tuning batch of {choice['samples']} does not separate it from {choice['runner_up']}: "
              f"tune on more samples)") if choice and not choice["separated"] else ""
    return (f"{result.strategy:6s} {result.method} x{result.target_speedup:g}: {b.label}  "
            f"predicted x{_fmt(b.predicted_speedup, '.2f')}  measured x{_fmt(b.speedup, '.2f')}  "
            f"mse {_fmt(b.mse)}  psnr {_fmt(b.psnr, '.1f')}  full runs {result.full_runs}  "
            f"{'met' if result.target_met else 'NOT met'}{unsure}")


def candidate_table(cands, limit: int = 60) -> str:
    """Evaluated plans; ``timed x`` is the median of interleaved repeats (``-`` for plans run once for quality
    only: a single run's speedup is in the JSON as ``measured_speedup``, never in this table)."""
    head = ("| plan | source | predicted x | timed x | mse | psnr | proxy | cache KiB |\n"
            "|---|---|---|---|---|---|---|---|")
    rows = []
    for c in list(cands)[:limit]:
        rows.append(f"| `{c.label}` | {c.source} | {_fmt(c.predicted_speedup, '.2f')} | "
                    f"{_fmt(c.timed_speedup, '.2f')} | {_fmt(c.mse)} | "
                    f"{_fmt(c.psnr, '.1f')} | {_fmt(c.proxy)} | {_fmt(c.cache_bytes / 1024, '.0f')} |")
    return "\n".join([head] + rows)


def markdown(results, title: str = "Cache-plan search") -> str:
    results = list(results) if isinstance(results, (list, tuple)) else [results]
    lines = [f"# {title}", ""]
    lines += ["| strategy | method | target | plan | predicted x | measured x | mse | psnr | full runs | "
              "timing runs | search s | met |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        b = r.best
        lines.append(f"| {r.strategy} | {r.method} | {r.target_speedup:g} | `{b.label if b else '-'}` | "
                     f"{_fmt(b.predicted_speedup if b else None, '.2f')} | {_fmt(b.speedup if b else None, '.2f')} | "
                     f"{_fmt(b.mse if b else None)} | {_fmt(b.psnr if b else None, '.1f')} | {r.full_runs} | "
                     f"{r.timing_runs} | {r.seconds:.1f} | {'yes' if r.target_met else 'no'} |")
    lines.append("")
    r0 = results[0]
    lines.append(f"Measured speedups: median of interleaved repeats against the uncached model, "
                 f"timed with the **{r0.clock}** clock (wall-clock speedups are in the JSON). A plan meets the "
                 f"target when measured >= {r0.accept:g} x target.")
    lines.append("")
    for r in results:
        lines += [f"## {r.strategy} / {r.method} / x{r.target_speedup:g}", ""]
        if r.best is not None:
            lines += ["Plan:", "", "```json", json.dumps(config_to_json(r.best.configs()), indent=1), "```", ""]
        for key in ("denoisers", "unreachable", "choice", "refine", "proxy_fit", "interval", "L_min", "L_min_raw",
                    "stage1_top3_starts"):
            if key in r.notes:
                lines.append(f"* {key}: `{json.dumps(_clean(r.notes[key]))}`")
        lines += ["", candidate_table([c for c in r.candidates if c.evaluated]), ""]
    return "\n".join(lines) + "\n"


def pareto_png(results, path: str, title: str = "speedup vs MSE") -> str:
    """Scatter: screened plans (predicted speedup vs proxy-fitted MSE), evaluated plans (measured), winners."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = list(results) if isinstance(results, (list, tuple)) else [results]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colors = {"ours": "tab:blue", "mindie": "tab:orange"}
    drawn_screen, labelled = set(), set()
    plotted = False
    for r in results:
        for method, d in r.screened.items():
            if method in drawn_screen or d.get("predicted_mse") is None:
                continue
            drawn_screen.add(method)
            ax.scatter(d["speedup"], d["predicted_mse"], s=2, c="lightgrey", alpha=0.5, rasterized=True,
                       label=f"screened {method} plans (predicted speedup, proxy-fitted MSE)")
            plotted = plotted or bool(np.any(np.asarray(d["predicted_mse"]) > 0))
        col = colors.get(r.strategy, "tab:green")
        ev = [c for c in r.candidates if c.evaluated and c.mse and c.mse > 0]
        xs = [c.speedup if c.speedup is not None else c.predicted_speedup for c in ev]  # untimed: predicted
        first = r.strategy not in labelled
        ax.scatter(xs, [c.mse for c in ev], s=18, c=col, alpha=0.6,
                   label=f"{r.strategy}: fully evaluated plans" if first else None)
        plotted = plotted or bool(ev)
        if r.best is not None and r.best.mse:
            bx = r.best.speedup if r.best.speedup is not None else r.best.predicted_speedup
            ax.scatter([bx], [r.best.mse], marker="*", s=220, c=col, edgecolors="k", zorder=5,
                       label=f"{r.strategy}: chosen plan per target" if first else None)
            ax.annotate(f"x{r.target_speedup:.2f}", (bx, r.best.mse), textcoords="offset points",
                        xytext=(6, 4), fontsize=7, color=col)
        labelled.add(r.strategy)
    for t in sorted({round(r.target_speedup, 2) for r in results}):
        ax.axvline(t, color="k", lw=0.5, ls=":")
    if plotted:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no plan evaluated", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("speedup (measured where run; predicted for screened plans)")
    ax.set_ylabel("MSE vs uncached output")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results, out_dir: str, name: str = "search", title: str = "Cache-plan search") -> Dict[str, str]:
    """``out_dir/search.json`` (one result: its layout; several: ``{"results": [...]}``), ``.md``, ``pareto.png``."""
    import os
    os.makedirs(out_dir, exist_ok=True)
    single = not isinstance(results, (list, tuple))
    data = result_to_json(results) if single else {"results": [result_to_json(r) for r in results]}
    paths = {"json": os.path.join(out_dir, f"{name}.json"), "md": os.path.join(out_dir, f"{name}.md"),
             "png": os.path.join(out_dir, "pareto.png" if name == "search" else f"{name}_pareto.png")}
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(markdown(results, title))
    pareto_png(results, paths["png"], title)
    return paths
