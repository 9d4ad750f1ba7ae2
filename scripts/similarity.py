#!/usr/bin/env python
"""Adjacent-step similarity of every transformer block of a tiny reference model.

Runs one uncached generation, records each block's input and output at every denoising step (forward
hooks on the block ModuleLists) and plots, per block, the cosine similarity between step ``i - 1`` and
step ``i`` of (top) the block output and (bottom) its residual ``out - in``.  High similarity means
the block's work can be reused from the previous step (step caching).  A short text summary is printed.

For tiny-flux both streams (text tokens, image tokens) are concatenated; blocks are labelled ``D0, D1``
(dual-stream ``transformer_blocks``) and ``S0..S5`` (``single_transformer_blocks``).  For tiny-wan the
blocks are ``B0..B3``.

    python scripts/similarity.py --model tiny-flux --out demo_out/similarity_tiny-flux.png
    python scripts/similarity.py --model tiny-wan --out demo_out/similarity_tiny-wan.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

try:
    import npu_cache_fx  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npu_cache_fx import models  # noqa: E402


def block_lists(transformer) -> list[tuple[str, torch.nn.ModuleList]]:
    """(prefix, ModuleList) of the transformer-block lists, in execution order."""
    out = []
    for attr, prefix in (("transformer_blocks", "D"), ("single_transformer_blocks", "S"), ("blocks", "B")):
        lst = getattr(transformer, attr, None)
        if isinstance(lst, torch.nn.ModuleList) and len(lst) > 0:
            out.append((prefix, lst))
    return out


def _flat(x) -> torch.Tensor:
    """Block input/output (tensor or tuple of tensors) -> (B, D) float64."""
    if isinstance(x, (tuple, list)):
        return torch.cat([_flat(t) for t in x if torch.is_tensor(t)], dim=1)
    return x.detach().reshape(x.shape[0], -1).double()


def record(model: models.TinyModel, labels: torch.Tensor, steps: int, seed: int = 0):
    """Run one generation; return (names, ins, outs) with ins[name][step] = (B, D) tensors."""
    names, ins, outs, handles = [], {}, {}, []
    for prefix, lst in block_lists(model.transformer):
        for i, blk in enumerate(lst):
            name = f"{prefix}{i}"
            names.append(name)
            ins[name], outs[name] = [], []

            def pre(mod, args, kwargs, _n=name):
                hs = kwargs.get("hidden_states", args[0] if args else None)
                ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
                if _n[0] in "DS":  # Flux blocks return (encoder_hidden_states, hidden_states)
                    ins[_n].append(_flat((ehs, hs)))
                else:
                    ins[_n].append(_flat(hs))

            def post(mod, args, kwargs, output, _n=name):
                outs[_n].append(_flat(output))

            handles.append(blk.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(blk.register_forward_hook(post, with_kwargs=True))
    try:
        model.sample(labels, steps=steps, seed=seed)
    finally:
        for h in handles:
            h.remove()
    return names, ins, outs


def cos_adjacent(seq: list[torch.Tensor]) -> torch.Tensor:
    """Mean (over batch) cosine similarity between consecutive entries: shape (len(seq) - 1,)."""
    return torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=1).mean()
                        for a, b in zip(seq[:-1], seq[1:])])


def rel_l1_adjacent(seq: list[torch.Tensor]) -> torch.Tensor:
    """Relative L1 change ``|x_i - x_{i-1}|_1 / |x_{i-1}|_1`` between consecutive entries."""
    return torch.stack([(b - a).abs().mean() / a.abs().mean().clamp_min(1e-12) for a, b in zip(seq[:-1], seq[1:])])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Adjacent-step block similarity plot for a tiny model.")
    p.add_argument("--model", choices=models.list_models(), default="tiny-flux")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default demo_out/similarity_<model>.png)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: model default)")
    p.add_argument("--batch", type=int, default=10, help="eval batch size (labels 0..9 repeated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights-dir", type=Path, default=None, help="load weights from here instead of the package")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = models.load(args.model, directory=args.weights_dir)
    steps = args.steps or model.default_steps
    out = args.out or Path("demo_out") / f"similarity_{args.model}.png"
    names, ins, outs = record(model, models.eval_labels(args.batch), steps, seed=args.seed)
    res = {n: [o - i for i, o in zip(ins[n], outs[n])] for n in names}
    cos_out = {n: cos_adjacent(outs[n]) for n in names}
    cos_res = {n: cos_adjacent(res[n]) for n in names}
    l1_res = {n: rel_l1_adjacent(res[n]) for n in names}

    x = list(range(1, steps))
    fig, axes = plt.subplots(2, 1, figsize=(9, 7.5), sharex=True)
    cmap = plt.get_cmap("viridis")
    for k, n in enumerate(names):
        c = cmap(k / max(1, len(names) - 1))
        ls = "--" if n.startswith("D") else "-"
        axes[0].plot(x, cos_out[n].numpy(), ls, color=c, label=n, lw=1.4)
        axes[1].plot(x, cos_res[n].numpy(), ls, color=c, label=n, lw=1.4)
    axes[0].set_ylabel("cos(out_i, out_{i-1})")
    axes[1].set_ylabel("cos(res_i, res_{i-1}),  res = out - in")
    axes[1].set_xlabel(f"denoising step i (of {steps}; t: 1 -> 0)")
    axes[0].set_title(f"{args.model}: adjacent-step similarity per block (batch {args.batch}, seed {args.seed})")
    for ax in axes:
        ax.grid(alpha=0.3)
    lo = min(float(min(v.min() for v in cos_res.values())), float(min(v.min() for v in cos_out.values())))
    for ax in axes:
        ax.set_ylim(max(-1.0, lo - 0.02), 1.005)
    axes[0].legend(ncol=min(len(names), 8), fontsize=8, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")

    # ---- text summary --------------------------------------------------------------------------
    print(f"\n{args.model}: {len(names)} blocks, {steps} steps, batch {args.batch}")
    print(f"{'block':>6} {'cos(out) mean/min':>18} {'cos(res) mean/min':>18} {'relL1(res) mean':>16}"
          f" {'cos(res) steps 1-3':>20} {'cos(res) last 3':>18}")
    for n in names:
        co, cr, l1 = cos_out[n], cos_res[n], l1_res[n]
        print(f"{n:>6} {co.mean():>9.4f}/{co.min():<8.4f} {cr.mean():>9.4f}/{cr.min():<8.4f} {l1.mean():>16.4f}"
              f" {' '.join(f'{v:.3f}' for v in cr[:3].tolist()):>20} "
              f"{' '.join(f'{v:.3f}' for v in cr[-3:].tolist()):>18}")
    allres = torch.stack([cos_res[n] for n in names])  # (blocks, steps-1)
    per_step = allres.mean(0)
    print("mean cos(res) over blocks per step:", " ".join(f"{v:.3f}" for v in per_step.tolist()))
    for thr in (0.99, 0.95, 0.9):
        frac = float((allres >= thr).float().mean())
        print(f"  fraction of (block, step) pairs with cos(res) >= {thr}: {frac:.2f}")
    first = names[0]
    print(f"first-block ({first}) residual relative L1 change per step:",
          " ".join(f"{v:.3f}" for v in l1_res[first].tolist()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
