"""optimize() under diffusers' context parallelism: 2 CPU processes (gloo, loopback), tiny Wan, 10 steps.

The parent starts two copies of this file (``--worker``) that share a FileStore
(no port) and keep gloo on the loopback interface; each is bounded in time.
Rank 0's plan reaches rank 1 through ``broadcast_configs``. Per rank they run:

* A: Ulysses CP (``enable_parallelism(ContextParallelConfig(ulysses_degree=2))``)
  + DiT block cache + attention cache -- outputs (gathered by diffusers at
  ``proj_out``) equal the single-process cached outputs, both ranks take the
  same decision on every step, and each rank's cache is its token shard.
* B: A + AdaStep on latents that make it skip: same decisions on both ranks
  (the vote is a gloo all-reduce), outputs equal the single-process run.
* C: AdaStep alone, no CP, rank-dependent latents: rank 0 alone would skip,
  rank 1 never; the vote makes neither skip.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow  # compiles or runs benchmarks end to end: not in the quick tier

pytest.importorskip("diffusers")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (HERE, ROOT) if p not in sys.path]

from npu_cache_fx import CacheConfig, ConfigError, optimize  # noqa: E402
from npu_cache_fx.distributed import (attention_cache_bytes, broadcast_configs, dit_cache_bytes,  # noqa: E402
                                      enable_context_parallel, per_rank_cache_bytes, shard_tokens,
                                      wan_latent_tokens)
from npu_cache_fx.runtime import CaptureCache  # noqa: E402

WORLD = 2
STEPS = 10
TS = [1.0 - s / STEPS for s in range(STEPS)]
TIMEOUT_S = 120
HIDDEN, TOKENS = 16, 32  # tiny_wan: 2 heads x 8; latent 2 x 8 x 8 over a (1, 2, 2) patch
TOY_LATENTS = {0: [float(s) for s in range(8)],          # d_t = 1 everywhere: the rule skips steps 3 and 5
               1: [float(2 ** s) for s in range(8)]}     # d_t doubles: the rule never skips


def cache_configs():
    return [CacheConfig(steps_count=STEPS, step_start=1, step_interval=2, blocks="blocks", block_start=1,
                        block_end=3, name="dit"),
            CacheConfig(method="attention_cache", steps_count=STEPS, step_start=2, step_interval=3, blocks="blocks",
                        block_start=3, block_end=4, name="attn")]


def adastep_config(steps=STEPS):
    return CacheConfig(method="adastep", steps_count=steps, threshold=0.1, max_skip_steps=1, decay=1.0)


def smooth_inputs(s: int):
    """Wan inputs whose latent moves linearly (d_t constant): AdaStep's rule skips."""
    from dit_models import wan_inputs
    inputs = wan_inputs(TS[s], seed=0)
    v = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    inputs["hidden_states"] = inputs["hidden_states"] + 0.1 * s * v
    return inputs


def toy_inputs(s: int, rank: int):
    return dict(hidden_states=torch.full((1, 4, 2), TOY_LATENTS[rank][s]), encoder_hidden_states=torch.zeros(1, 4, 2),
                timestep=torch.tensor([float(800 - 100 * s)]))


def record_decisions(opt):
    """Log the decision each call actually takes ('skip' or the action per config) by wrapping ``_prepare``."""
    log = []
    prepare = opt._prepare

    def _prepare(args, kwargs):
        call = prepare(args, kwargs)
        log.append("skip" if call.skip else tuple(a.name for a in call.variant.decision))
        return call

    opt._prepare = _prepare
    return log


def stats_of(opt):
    s = opt.stats
    return dict(steps=s.steps, computed=s.steps_computed, reused=s.steps_reused, skipped=s.steps_skipped,
                blocks_skipped=s.blocks_skipped, attention_calls_skipped=s.attention_calls_skipped,
                stale_reads_avoided=s.stale_reads_avoided, cache_bytes_by_config=dict(s.cache_bytes_by_config))


def run_wan(opt, make_inputs):
    log = record_decisions(opt)
    with torch.no_grad():
        outs = [opt(**make_inputs(s))[0] for s in range(STEPS)]
    return torch.stack(outs), log, stats_of(opt)


def wan_phases(model, configs):
    """Phases A and B on ``model`` (parallel or not), sharing one capture."""
    from dit_models import wan_inputs
    captures = CaptureCache(model)
    a = run_wan(optimize(model, configs, captures=captures), lambda s: wan_inputs(TS[s], seed=s))
    b = run_wan(optimize(model, configs + [adastep_config()], captures=captures), smooth_inputs)
    collectives = sorted({str(n.target).split(".")[1] for cap in captures.values() for n in cap.gm.graph.nodes
                          if str(n.target).startswith("_c10d_functional.")})
    return {"A": a, "B": b, "captures": len(captures), "collectives": collectives}


def toy_phase(rank: int):
    from toy import ToyDiT
    opt = optimize(ToyDiT(single=3), adastep_config(steps=8))
    log = record_decisions(opt)
    with torch.no_grad():
        outs = [opt(**toy_inputs(s, rank))[0] for s in range(8)]
    return torch.stack(outs), log, stats_of(opt)


# ----------------------------------------------------------------------------- single process
def test_cache_bytes_formulas_wan14b():
    tokens = wan_latent_tokens(frames=81, height=720, width=1280)  # latent 21 x 90 x 160, (1, 2, 2) patch
    assert tokens == 75_600
    bf16 = torch.bfloat16
    assert [dit_cache_bytes(5120, tokens, bf16, ranks=r) for r in (1, 2, 4, 8)] == [
        774_144_000, 387_072_000, 193_536_000, 96_768_000]
    assert [attention_cache_bytes(5120, tokens, 2, blocks=40, ranks=r) for r in (1, 2, 4, 8)] == [
        30_965_760_000, 15_482_880_000, 7_741_440_000, 3_870_720_000]
    assert dit_cache_bytes(5120, tokens, 2, ranks=8, contexts=2) == 2 * 96_768_000  # sequential CFG
    assert shard_tokens(10, 4) == 3  # the largest tensor_split shard ("anything" modes)
    dit = CacheConfig(steps_count=50, step_start=10, step_interval=2, block_start=1, block_end=39)
    attn = CacheConfig(method="attention_cache", steps_count=50, step_start=10, step_interval=2)
    assert per_rank_cache_bytes(dit, 5120, tokens, 2, ranks=4, blocks_count=40) == 193_536_000
    assert per_rank_cache_bytes(attn, 5120, tokens, 2, ranks=4, blocks_count=40) == 7_741_440_000
    assert per_rank_cache_bytes(attn.replace(step_interval=1), 5120, tokens, 2, blocks_count=40) == 0  # bypass


def test_broadcast_configs_without_process_group():
    cfgs = cache_configs()
    assert broadcast_configs(cfgs) == cfgs and broadcast_configs(cfgs[0]) == cfgs[:1]
    with pytest.raises(ValueError, match="no configs"):
        broadcast_configs(None)
    with pytest.raises(ConfigError, match="CacheConfig objects"):
        broadcast_configs([{"method": "dit_block_cache"}])


def test_enable_context_parallel_checks_before_touching_the_model():
    from diffusers import ContextParallelConfig
    from dit_models import tiny_wan, wan_inputs
    with pytest.raises(ConfigError, match="ulysses_degree=4 must divide num_attention_heads=2"):
        enable_context_parallel(tiny_wan(), ContextParallelConfig(ulysses_degree=4))
    # a capture taken before parallelism would bypass its hooks: invalidate() drops it, the next call recaptures
    opt = optimize(tiny_wan(), cache_configs())
    with torch.no_grad():
        opt(**wan_inputs(1.0))
        opt.invalidate()
        assert not opt._captures and not opt._entries and opt.stats.cache_bytes == 0
        opt(**wan_inputs(1.0))
    assert opt.stats.captures == 2


# ----------------------------------------------------------------------------- worker process
def worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig
    from dit_models import tiny_wan
    from npu_cache_fx.distributed import broadcast_configs, enable_context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = tiny_wan()
    enable_context_parallel(model, ContextParallelConfig(ulysses_degree=world))
    configs = broadcast_configs(cache_configs() if rank == 0 else None)  # the plan comes from rank 0
    result = wan_phases(model, configs)
    result["configs"] = [dataclasses.asdict(c) for c in configs]
    result["C"] = toy_phase(rank)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- the test
def _launch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]))
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo pairs on loopback only
    store = tmp_path / "store"
    procs = []
    for rank in range(WORLD):
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(WORLD), str(store),
                                        str(tmp_path)], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    return procs


def _wait(procs, tmp_path, start):
    try:
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = "\n".join(f"--- rank {r} (rc={p.returncode}) ---\n" + (tmp_path / f"rank{r}.log").read_text()[-3000:]
                     for r, (p, _) in enumerate(procs))
    assert all(p.returncode == 0 for p, _ in procs), f"workers failed or timed out ({TIMEOUT_S}s):\n{logs}"


def test_context_parallel_composes_with_caches(tmp_path):
    from dit_models import tiny_wan
    start = time.monotonic()
    procs = _launch(tmp_path)
    torch.set_num_threads(1)
    ref = wan_phases(tiny_wan(), cache_configs())  # single process, same plans: computed while the workers run
    ref["C"] = toy_phase(0)
    _wait(procs, tmp_path, start)
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for phase in ("A", "B"):
        ref_out, ref_log, ref_stats = ref[phase]
        for r, res in enumerate(got):
            out, log, stats = res[phase]
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5, msg=lambda m: f"{phase} rank {r}: {m}")
            assert log == ref_log, f"{phase} rank {r}: decisions {log} != single-process {ref_log}"
            per_rank = {k: v // WORLD for k, v in ref_stats["cache_bytes_by_config"].items()}
            assert stats == dict(ref_stats, cache_bytes_by_config=per_rank), f"{phase} rank {r}"
        assert torch.equal(got[0][phase][0], got[1][phase][0])  # diffusers gathered the full sequence on both
    assert all(res["configs"] == [dataclasses.asdict(c) for c in cache_configs()] for res in got)  # broadcast_configs over gloo
    assert got[0]["captures"] == 1  # B reused A's capture
    # torch.export kept diffusers' collectives (Ulysses all-to-all, proj_out all-gather) in each rank's graph
    assert ref["collectives"] == []
    for res in got:
        assert {"all_to_all_single", "all_gather_into_tensor", "wait_tensor"} <= set(res["collectives"])

    # A: every kind of step ran; the measured bytes (1 process, and per rank of 2) are the formula's
    log_a = ref["A"][1]
    assert {"COMPUTE", "WRITE", "READ"} <= {a for d in log_a for a in d}
    for ranks, measured in ((1, ref["A"][2]), (WORLD, got[0]["A"][2]), (WORLD, got[1]["A"][2])):
        assert measured["cache_bytes_by_config"] == {
            "dit": dit_cache_bytes(HIDDEN, TOKENS, torch.float32, ranks=ranks),
            "attn": attention_cache_bytes(HIDDEN, TOKENS, 4, blocks=1, ranks=ranks)}, ranks
    # B: AdaStep skipped steps, identically on both ranks
    assert got[0]["B"][1].count("skip") == ref["B"][2]["skipped"] > 0

    # C: rank 0 alone skips; voted with rank 1 (never skips), no rank skips
    assert ref["C"][1].count("skip") == 2
    for r, res in enumerate(got):
        _, log, stats = res["C"]
        assert "skip" not in log and stats["skipped"] == 0, f"C rank {r}: {log}"
    assert time.monotonic() - start < TIMEOUT_S


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
