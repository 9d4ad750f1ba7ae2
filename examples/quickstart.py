"""Quickstart: cache the single-stream blocks of a (tiny, random) diffusers Flux transformer.

    python examples/quickstart.py [--steps 28] [--backend eager|aot_eager|inductor]

Prints the per-step plan, the measured speedup of a 28-step Euler loop and the
difference to the uncached output.
"""

import argparse
import time

import torch

from npu_cache_fx import CacheConfig, optimize


def build(width: int = 2, layers: int = 2, single: int = 6):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
                                  attention_head_dim=64, num_attention_heads=width, joint_attention_dim=64,
                                  pooled_projection_dim=64, axes_dims_rope=(16, 24, 24)).eval()


def sample(transformer, steps: int, tokens: int = 256, text: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, 16, generator=g)
    cond = dict(encoder_hidden_states=torch.randn(1, text, 64, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = transformer(hidden_states=x, timestep=ts[i:i + 1], **cond)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--backend", default="eager")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build()
    cfgs = [CacheConfig(steps_count=args.steps, step_start=4, step_interval=3, blocks="transformer_blocks"),
            CacheConfig(steps_count=args.steps, step_start=4, step_interval=3, blocks="single_transformer_blocks")]
    fast = optimize(model, cfgs, backend=None if args.backend == "eager" else args.backend)
    print(fast.plan)
    sample(fast, args.steps)  # warm-up: capture (and compile) every variant
    sample(model, 2)
    t0 = time.perf_counter()
    ref = sample(model, args.steps)
    t1 = time.perf_counter()
    out = sample(fast, args.steps)
    t2 = time.perf_counter()
    mse = torch.mean((out - ref) ** 2).item()
    print(f"uncached {t1 - t0:.2f}s  cached {t2 - t1:.2f}s  speedup {(t1 - t0) / (t2 - t1):.2f}x  mse {mse:.2e}")
    print(fast.stats)


if __name__ == "__main__":
    main()
