"""Step caching under diffusers' context (sequence) parallelism, one process per device.

    torchrun --nproc-per-node 2 examples/multi_device.py [--steps 10] [--ring]

Backend: hccl when torch_npu is importable, nccl with CUDA, else gloo (CPU).
A tiny random Wan transformer is sharded over the ranks with diffusers'
``enable_parallelism(ContextParallelConfig(ulysses_degree=world))``; rank 0 picks
the cache plan (DiT block cache + attention cache) and broadcasts it; each
rank caches its own token shard. Prints per-rank stats and the per-rank cache
bytes next to the formula of :mod:`npu_cache_fx.distributed`, and checks that
every rank took the same steps and returned the same output.

``--ring`` uses ring attention instead of Ulysses: diffusers 0.42.1's ring
needs an attention backend that returns the log-sum-exp, which the native
(CPU) and NPU backends do not (``ValueError: Native attention does not support
return_lse=True``); it runs with the flash/cuDNN backends on CUDA only.
"""

import argparse
import os

import torch
import torch.distributed as dist

from npu_cache_fx import CacheConfig, optimize
from npu_cache_fx.distributed import (all_ranks_equal, attention_cache_bytes, broadcast_configs, default_backend,
                                      dit_cache_bytes, enable_context_parallel)

FRAMES, HEIGHT, WIDTH, CHANNELS, TEXT = 2, 16, 16, 4, 8  # 2 x 8 x 8 = 128 tokens after the (1, 2, 2) patch


def build(heads: int = 8, head_dim: int = 8, layers: int = 4):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim,
                                 in_channels=CHANNELS, out_channels=CHANNELS, text_dim=16, freq_dim=16,
                                 ffn_dim=4 * heads * head_dim, num_layers=layers, rope_max_seq_len=32).eval()


def plan(steps: int):
    """What a search on rank 0 would return: DiT cache on blocks 1-2, attention cache on block 3."""
    return [CacheConfig(steps_count=steps, step_start=1, step_interval=2, blocks="blocks", block_start=1,
                        block_end=3, name="dit"),
            CacheConfig(method="attention_cache", steps_count=steps, step_start=2, step_interval=3, blocks="blocks",
                        block_start=3, block_end=4, name="attn")]


def sample(transformer, steps: int, device):
    g = torch.Generator().manual_seed(0)  # same inputs on every rank: CP shards them inside the model
    x = torch.randn(1, CHANNELS, FRAMES, HEIGHT, WIDTH, generator=g).to(device)
    text = torch.randn(1, TEXT, 16, generator=g).to(device)
    ts = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            v = transformer(hidden_states=x, timestep=(ts[i:i + 1] * 1000).to(device), encoder_hidden_states=text,
                            return_dict=False)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses (CUDA flash only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    backend = default_backend()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if backend == "hccl":
        torch.npu.set_device(local)
        device = torch.device("npu", local)
    elif backend == "nccl":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)

    model = build(heads=max(8, world)).to(device)
    configs = broadcast_configs(plan(args.steps) if rank == 0 else None)
    fast = optimize(model, configs)
    if world > 1:
        from diffusers import ContextParallelConfig
        cp = (ContextParallelConfig(ring_degree=world) if args.ring else ContextParallelConfig(ulysses_degree=world))
        enable_context_parallel(fast, cp)  # before the first call: the lazy capture sees the hooks

    out = sample(fast, args.steps, device)

    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    nbytes = torch.finfo(model.dtype).bits // 8
    formula = {"dit": dit_cache_bytes(hidden, tokens, nbytes, ranks=world),
               "attn": attention_cache_bytes(hidden, tokens, nbytes, blocks=1, ranks=world)}
    s = fast.stats
    taken = (s.steps, s.steps_computed, s.steps_reused, s.steps_skipped, s.blocks_skipped, s.attention_calls_skipped)
    for r in range(world):
        if r == rank:
            print(f"[rank {rank}/{world} {backend}] steps={s.steps} computed={s.steps_computed} "
                  f"reused={s.steps_reused} blocks_skipped={s.blocks_skipped} "
                  f"attention_calls_skipped={s.attention_calls_skipped} cache_bytes={s.cache_bytes} "
                  f"by_config={s.cache_bytes_by_config} formula={formula}", flush=True)
        dist.barrier()
    same_steps = all_ranks_equal(taken)
    gathered = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(gathered, out.contiguous())
    same_output = all(torch.equal(g, gathered[0]) for g in gathered)
    bytes_ok = s.cache_bytes_by_config == formula
    if rank == 0:
        print(fast.plan)
        print(f"ranks agree on steps: {same_steps}; outputs identical: {same_output}; "
              f"cache bytes == formula: {bytes_ok}")
    dist.destroy_process_group()
    if not (same_steps and same_output and bytes_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
