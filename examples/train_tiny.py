#!/usr/bin/env python
"""Train the tiny reference DiTs shipped in ``npu_cache_fx/models/weights/``.

Rectified flow on sklearn digits (16x16, [-1, 1]); ``tiny-flux`` learns still digits, ``tiny-wan``
4-frame clips of a moving digit.  ``tiny-flux-deep`` (Flux-dev's 19 + 38 blocks, inner dim 64) learns
16x16 RGB procedural scenes captioned by four attributes (``npu_cache_fx.models.scenes``); its run also
trains the attribute checker first and measures the card figures (PSNR of 14 / 6 vs 28 steps, checker
agreement at 28 / 14 / 6 steps).  Class-conditional with 10 % label dropout to the null class (CFG).
AdamW, linear warm-up then cosine decay over the time (or step) budget, EMA of the weights.  The better
of raw / EMA weights (by class fidelity on a fixed eval batch) is saved.

The shipped weights were produced with (one thread, on a 2-core machine shared with other jobs)::

    python examples/train_tiny.py --model tiny-flux --seconds 690 --seed 0 --eval 100 --out npu_cache_fx/models/weights
    python examples/train_tiny.py --model tiny-wan  --seconds 690 --seed 0 --eval 50  --out npu_cache_fx/models/weights
    python examples/train_tiny.py --model tiny-flux-deep --out npu_cache_fx/models/weights

``tiny-flux-deep`` defaults to a fixed step count (``DEEP_DEFAULTS``: 1400 steps of batch 32, lr 2e-3,
t ~ uniform; ~40 min on one thread), so its plain command is bit-reproducible.  Its card is measured with
the model's default schedule (``TinyModel.default_shift`` = 3.16, Flux-dev's at 1024 x 1024).

A wall-clock budget makes the number of steps machine dependent; ``--steps N`` is bit-reproducible.
Load a result with ``npu_cache_fx.models.load(name, directory=OUT)``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

try:
    import npu_cache_fx  # noqa: F401
except ImportError:  # running from a source checkout without installation
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npu_cache_fx.models import scenes, tiny  # noqa: E402
from npu_cache_fx.models.data import load_digits_16, random_clips  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=tiny.MODEL_NAMES, required=True)
    p.add_argument("--seconds", type=float, default=None,
                   help="wall-clock training budget (default: 600 s; tiny-flux-deep: fixed --steps instead)")
    p.add_argument("--steps", type=int, default=None,
                   help="fixed number of optimizer steps (overrides --seconds; bit-reproducible)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("out/tiny"), help="output folder for <model>.safetensors/json")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (tiny-flux-deep: 32)")
    p.add_argument("--lr", type=float, default=None, help="default: 2e-3")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 30; tiny-flux-deep: 50)")
    p.add_argument("--ema", type=float, default=0.99, help="EMA decay (0 disables)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null class")
    p.add_argument("--t-dist", choices=["logit-normal", "uniform"], default=None,
                   help="training distribution of the flow time t (default: logit-normal; tiny-flux-deep: uniform)")
    p.add_argument("--init", choices=["adaln-zero", "default"], default="adaln-zero")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--weights-dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--eval", type=int, default=None,
                   help="eval batch size for class fidelity / card figures (0: skip; default 50, tiny-flux-deep 200)")
    p.add_argument("--checker", type=Path, default=None,
                   help="tiny-flux-deep: use this attribute checker instead of training one into --out")
    args = p.parse_args(argv)
    defaults = DEEP_DEFAULTS if args.model == "tiny-flux-deep" else DIGIT_DEFAULTS
    for k, v in defaults.items():
        if k == "steps" and args.seconds is not None:
            continue  # an explicit time budget replaces the default step count
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.steps is None and args.seconds is None:
        args.seconds = 600.0
    return args


# Why fixed steps for tiny-flux-deep: its card figures should come back from the plain command.
# Batch 32: at 57 blocks one step costs ~1.4 s on one thread, and more, smaller steps fit the 45 min
# budget better than fewer large ones.  lr 2e-3: a first run at 1e-3 learned colour and position but
# not shape and texture.  t ~ uniform instead of logit-normal(0, 1): the grain is resolved at t < 0.2,
# which logit-normal draws 8 % of the time (uniform 20 %); on a 3-block pilot (270 s, an earlier variant
# of the scenes: grain 0.12, 2 px speckle cells) it moved 14 vs 28 steps (shift 3) from 35.7 to 31.9 dB.
DIGIT_DEFAULTS = {"batch_size": 64, "lr": 2e-3, "warmup": 30, "eval": 50, "t_dist": "logit-normal"}
DEEP_DEFAULTS = {"batch_size": 32, "lr": 2e-3, "warmup": 50, "eval": 200, "steps": 1400, "t_dist": "uniform"}
CARD_STEPS = (28, 14, 6)
CARD_SEED = 12345


def lr_factor(progress: float, step: int, warmup: int) -> float:
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def evaluate(model: tiny.TinyModel, n: int, checker: Path | None = None) -> float:
    """Class fidelity (digits) or all-attribute checker agreement (scenes) at the default steps."""
    from npu_cache_fx.metrics import class_fidelity

    if model.name == "tiny-flux-deep":
        n = min(n, 50)  # raw-vs-EMA pick only; 57 blocks make every eval sample costly
    labels = tiny.eval_labels(n, model)
    out = model.sample(labels, seed=CARD_SEED)
    if model.name == "tiny-flux-deep":
        return scenes.attribute_agreement(out, labels, scenes.get_checker(checker))["all"]
    return class_fidelity(out, labels)


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def deep_card(model: tiny.TinyModel, n: int, checker: Path) -> dict:
    """The figures of tiny-flux-deep's card: PSNR of fewer steps vs 28, checker agreement per step count."""
    from npu_cache_fx.metrics import psnr

    labels = tiny.eval_labels(n, model)
    net = scenes.get_checker(checker)
    t0 = time.perf_counter()
    out = {s: model.sample(labels, steps=s, seed=CARD_SEED) for s in CARD_STEPS}
    ref = out[CARD_STEPS[0]]
    card = {"n": n, "labels": "scenes.eval_labels(n)", "seed": CARD_SEED, "cfg_scale": None,
            "sampler": (f"Euler, flow times linear then time-shifted, shift {model.default_shift:g} "
                        "(model.default_shift)")}
    for s in CARD_STEPS[1:]:
        card[f"psnr_{s}_vs_{CARD_STEPS[0]}"] = round(psnr(out[s], ref), 2)
    for s in CARD_STEPS:
        card[f"agreement_{s}"] = _rounded(scenes.attribute_agreement(out[s], labels, net))
    real = scenes.scenes_for(labels, seed=CARD_SEED)
    card["agreement_training_scenes"] = _rounded(scenes.attribute_agreement(real, labels, net))
    card["seconds"] = round(time.perf_counter() - t0, 1)
    return card


def main(argv=None) -> int:
    args = parse_args(argv)
    import diffusers
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bs = args.batch_size
    deep = args.model == "tiny-flux-deep"
    t_start, cpu_start = time.perf_counter(), time.process_time()
    checker_path, checker_record = args.checker, None
    if deep and checker_path is None:
        # Trained first and saved with the model: the card's agreement figures are only meaningful
        # together with the exact checker that measured them.
        tc = time.perf_counter()
        net, holdout = scenes.train_checker()
        checker_path = scenes.save_checker(net, args.out / scenes.CHECKER_FILE, holdout)
        checker_record = {"file": scenes.CHECKER_FILE, "seconds": round(time.perf_counter() - tc, 1),
                          "holdout_agreement": {k: round(v, 4) for k, v in holdout.items()}}
        print(f"attribute checker trained in {checker_record['seconds']} s; held-out agreement {holdout}")

    model = tiny.build(args.model, seed=args.seed, init=args.init)
    model.transformer.train()
    model.conditioner.train()
    params = [p for m in model.modules().values() for p in m.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.99))
    ema = [p.detach().clone() for p in params] if args.ema > 0 else None

    x, y = load_digits_16() if not deep else (None, None)
    g = torch.Generator().manual_seed(args.seed)
    print(f"{model!r}; conditioner params {sum(p.numel() for p in model.conditioner.parameters()):,}; "
          f"batch {bs}; budget {'%d steps' % args.steps if args.steps else '%.0f s' % args.seconds}")

    losses: list[float] = []
    step = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    bar = tqdm(total=args.steps if args.steps else int(args.seconds), unit="step" if args.steps else "s",
               dynamic_ncols=True, desc=args.model)
    shown = 0
    while True:
        elapsed = time.perf_counter() - t0
        if args.steps is not None:
            if step >= args.steps:
                break
            progress = step / args.steps
        else:
            if elapsed >= args.seconds:
                break
            progress = elapsed / args.seconds
        for grp in opt.param_groups:
            grp["lr"] = args.lr * lr_factor(progress, step, args.warmup)
        if deep:
            xb, yb = scenes.random_scenes(bs, g)
        else:
            idx = torch.randint(0, len(x), (bs,), generator=g)
            xb, yb = x[idx], y[idx]
        if args.model == "tiny-wan":
            xb = random_clips(xb, g)
        loss = model.training_loss(xb, yb, g, p_uncond=args.p_uncond, t_dist=args.t_dist)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            d = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - d)
        losses.append(float(loss.detach()))
        step += 1
        recent = sum(losses[-20:]) / len(losses[-20:])
        bar.set_postfix(step=step, loss=f"{recent:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if args.steps is not None:
            bar.update(1)
        else:
            now = min(int(time.perf_counter() - t0), int(args.seconds))
            bar.update(now - shown)
            shown = now
    bar.close()
    train_seconds, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    final_loss = sum(losses[-50:]) / max(1, len(losses[-50:]))
    print(f"trained {step} steps in {train_seconds:.1f} s; final loss (mean of last 50) {final_loss:.4f}")

    model.transformer.eval()
    model.conditioner.eval()
    chosen, fid_raw, fid_ema = "raw", None, None
    what = "attribute agreement (28 steps, 50 captions)" if deep else "class fidelity"
    if args.eval > 0:
        fid_raw = evaluate(model, args.eval, checker_path)
        print(f"{what} raw weights: {fid_raw:.3f}")
    if ema is not None:
        raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
        if args.eval > 0:
            fid_ema = evaluate(model, args.eval, checker_path)
            print(f"{what} EMA weights: {fid_ema:.3f}")
        if args.eval > 0 and fid_ema < fid_raw:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)
        else:
            chosen = "ema"

    wdtype = getattr(torch, args.weights_dtype)
    training = {
        "seconds": round(train_seconds, 1), "cpu_seconds": round(train_cpu, 1), "steps": step, "final_loss": round(final_loss, 5),
        "batch_size": bs, "lr": args.lr, "weight_decay": args.weight_decay, "warmup": args.warmup,
        "ema": args.ema, "weights": chosen, "p_uncond": args.p_uncond, "seed": args.seed,
        "threads": args.threads, "init": args.init, "objective": "rectified flow, v = noise - x0, t ~ "
        + ("logit-normal(0,1)" if args.t_dist == "logit-normal" else "uniform(0,1)"),
        "data": (("procedural 16x16 RGB scenes (npu_cache_fx.models.scenes: one object, "
                  "light / heavy per-pixel grain +-%g / +-%g), %d captions, drawn fresh per batch"
                  % (*scenes._GRAIN, scenes.NUM_LABELS))
                 if deep else "sklearn load_digits, bilinear 8x8->16x16, [-1,1]"
                 + ("; 4-frame clips, 1 px/frame motion in one of 8 directions" if args.model == "tiny-wan" else "")),
        "torch": torch.__version__, "diffusers": diffusers.__version__,
    }
    model.meta["training"] = training
    st, js = tiny.save(model, args.out, weights_dtype=wdtype)

    if args.eval > 0:  # re-check from the saved (possibly fp16) file
        loaded = tiny.load(args.model, directory=args.out)
        import json

        meta = json.loads(js.read_text())
        if deep:
            card = deep_card(loaded, args.eval, checker_path)
            fid = card[f"agreement_{CARD_STEPS[0]}"]["all"]
            meta["card"] = card
            if checker_record is not None:
                meta["checker"] = checker_record
            # wall clock and this process's CPU time: on a machine shared with other jobs the wall clock
            # grows with their load, the CPU time (one thread) does not
            meta["training"]["total_seconds"] = round(time.perf_counter() - t_start, 1)
            meta["training"]["total_cpu_seconds"] = round(time.process_time() - cpu_start, 1)
            print(f"card: {json.dumps(card)}")
        else:
            fid = evaluate(loaded, args.eval, checker_path)
        key = "attribute_agreement" if deep else "class_fidelity"
        meta["eval"] = {key: round(fid, 4), "n": args.eval, "steps": loaded.default_steps,
                        "seed": 12345, "cfg_scale": None, "fidelity_raw": None if fid_raw is None else round(fid_raw, 4),
                        "fidelity_ema": None if fid_ema is None else round(fid_ema, 4)}
        js.write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{key.replace('_', ' ')} of saved {args.weights_dtype} weights ({args.eval} samples, "
              f"{loaded.default_steps} steps): {fid:.3f}")
    print(f"wrote {st} ({st.stat().st_size / 1e6:.2f} MB) and {js}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
