"""Multi-device use: plan broadcast, per-rank cache-memory formulas, diffusers context parallelism.

npu_cache_fx has no parallel runtime of its own. Sequence (context) parallelism
is diffusers' ``enable_parallelism(config=ContextParallelConfig(...))``: module
hooks shard the token sequence at the first block and gather it at
``proj_out``, and the attention backend exchanges heads/tokens (Ulysses
all-to-all, ring all-gather). ``torch.export`` traces through those hooks, so
the captured graph holds the rank's shard and the functional collectives
(``_c10d_functional.all_to_all_single`` / ``all_gather_into_tensor`` /
``wait_tensor``); every rank then caches its own shard. The static step plan
gives every rank the same graph variant per step with no communication;
AdaStep's skip vote is an all-reduce (``adastep.all_ranks_agree``).

Order: parallelize before the optimized module's first call (``enable_parallelism``
then ``optimize``, or ``optimize`` then ``enable_parallelism`` -- the capture is
lazy). A graph captured before parallelism never calls the hooked modules and
would run the full sequence on every rank; :func:`enable_context_parallel`
refuses that case. See ``docs/multi_device.md``.

Example::

    >>> dit_cache_bytes(hidden_dim=5120, tokens=75_600, dtype_bytes=2, ranks=8)
    96768000
    >>> wan_latent_tokens(frames=81, height=720, width=1280)
    75600
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, List, Optional, Sequence, Tuple, Union

from .config import CacheConfig, ConfigError, config_list

__all__ = [
    "all_ranks_equal", "attention_cache_bytes", "broadcast_configs", "default_backend", "dit_cache_bytes",
    "enable_context_parallel", "per_rank_cache_bytes", "shard_tokens", "wan_latent_tokens",
]


# ----------------------------------------------------------------------------- plan broadcast
def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def broadcast_configs(configs: Union[CacheConfig, Sequence[CacheConfig], None], src: int = 0,
                      group: Any = None) -> List[CacheConfig]:
    """Rank ``src``'s cache plan on every rank (the search runs on one rank only).

    ``configs`` is read on ``src`` only (other ranks may pass ``None``); every
    rank returns the same list. Without an initialised process group it
    returns ``configs`` as a list. ``src`` is a global rank, as in
    ``torch.distributed.broadcast_object_list``. Collective: every rank of
    ``group`` must call it.
    """
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        if configs is None:
            raise ValueError("broadcast_configs: no configs given and no process group to receive them from")
        return config_list(configs, "broadcast_configs")
    payload: List[Any] = [None]
    if dist.get_rank() == src:
        if configs is None:
            raise ValueError(f"broadcast_configs: rank {src} (src) must pass the configs")
        payload[0] = config_list(configs, "broadcast_configs")
    dist.broadcast_object_list(payload, src=src, group=group)  # staged on the group's default device
    got = payload[0]
    if not isinstance(got, list) or not all(isinstance(c, CacheConfig) for c in got):
        raise ConfigError(f"broadcast_configs: rank {src} sent {type(got).__name__}, not a list of CacheConfig")
    return got


def all_ranks_equal(obj: Any, group: Any = None) -> bool:
    """Whether ``obj`` (any picklable value: a decision log, stats) is equal on every rank. Collective."""
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return True
    gathered: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return all(g == gathered[0] for g in gathered)


def default_backend() -> str:
    """``hccl`` when torch_npu is importable, ``nccl`` with CUDA, else ``gloo``."""
    try:
        import torch_npu  # noqa: F401
        return "hccl"
    except ImportError:
        pass
    import torch
    return "nccl" if torch.cuda.is_available() else "gloo"


# ----------------------------------------------------------------------------- diffusers context parallelism
def enable_context_parallel(model: Any, config: Any, cp_plan: Any = None) -> None:
    """``model.enable_parallelism(config=config)``, usable on an :class:`OptimizedModule` and on CPU.

    * ``model`` may be the diffusers model or ``optimize(model, ...)``. A graph
      the latter captured before would bypass the hooks and run the whole
      sequence on every rank: it is dropped (``OptimizedModule.invalidate``).
    * diffusers 0.42.1 computes ``rank % torch.accelerator.device_count()`` in
      ``ModelMixin._resolve_parallel_config``: a ``ZeroDivisionError`` on a
      machine without an accelerator (CPU + gloo). There the count reads as 1
      during the call; nothing else changes.
    * Ulysses needs the head count divisible by ``ulysses_degree``: checked here
      with a clear error instead of a reshape failure inside attention.
    """
    import torch
    from .runtime import OptimizedModule

    optimized = isinstance(model, OptimizedModule)
    inner = model.model if optimized else model
    cp = getattr(config, "context_parallel_config", config)
    heads = getattr(getattr(inner, "config", None), "num_attention_heads", None)
    ulysses = getattr(cp, "ulysses_degree", None) or 1
    if isinstance(heads, int) and heads % ulysses:
        raise ConfigError(f"ulysses_degree={ulysses} must divide num_attention_heads={heads} "
                          f"of {type(inner).__name__}")
    patch = contextlib.nullcontext()
    if torch.accelerator.device_count() == 0:
        from unittest import mock
        patch = mock.patch.object(torch.accelerator, "device_count", lambda: 1)
    with patch:
        if cp_plan is None:
            inner.enable_parallelism(config=config)
        else:
            inner.enable_parallelism(config=config, cp_plan=cp_plan)
    if optimized:
        model.invalidate()  # captures taken before the hooks existed would bypass them


# ----------------------------------------------------------------------------- cache-memory formulas
def _dtype_bytes(dtype_bytes: Any) -> int:
    if isinstance(dtype_bytes, int) and not isinstance(dtype_bytes, bool):
        return dtype_bytes
    size = getattr(dtype_bytes, "itemsize", None)  # torch.dtype
    if isinstance(size, int):
        return size
    raise TypeError(f"dtype_bytes must be an int or a torch.dtype, got {dtype_bytes!r}")


def shard_tokens(tokens: int, ranks: int = 1) -> int:
    """Tokens one rank holds when ``tokens`` are split over ``ranks`` (the largest shard).

    diffusers' equipartition sharding requires ``tokens % ranks == 0``; the
    ``*_anything`` modes use ``tensor_split``, whose largest shard is the ceiling.
    """
    if tokens < 0 or ranks < 1:
        raise ValueError(f"need tokens >= 0 and ranks >= 1, got tokens={tokens}, ranks={ranks}")
    return math.ceil(tokens / ranks)


def dit_cache_bytes(hidden_dim: int, tokens: int, dtype_bytes: Any, batch: int = 1, streams: int = 1,
                    ranks: int = 1, contexts: int = 1) -> int:
    """Bytes per rank of a DiT block cache: one ``delta = out - in`` per carried stream.

    Independent of the number of cached blocks. ``streams``: streams of
    ``tokens`` tokens each (a dual-stream range also carries the text stream:
    add a second call with the text token count, and ``ranks=1`` if the
    model's CP plan does not shard it). ``contexts``: cache contexts (2 for
    sequential CFG).
    """
    return contexts * streams * batch * shard_tokens(tokens, ranks) * hidden_dim * _dtype_bytes(dtype_bytes)


def attention_cache_bytes(hidden_dim: int, tokens: int, dtype_bytes: Any, blocks: int, batch: int = 1,
                          attentions_per_block: int = 1, ranks: int = 1, contexts: int = 1) -> int:
    """Bytes per rank of an attention cache: one attention output ``[batch, tokens/ranks, hidden]`` per cached call.

    ``attentions_per_block``: 1 for self-attention only (the default site), 2 for
    Wan's ``attention="all"`` (``attn1`` and ``attn2``; cross-attention outputs
    have the query's, i.e. the image's, token count).
    """
    per_call = batch * shard_tokens(tokens, ranks) * hidden_dim * _dtype_bytes(dtype_bytes)
    return contexts * blocks * attentions_per_block * per_call


def per_rank_cache_bytes(config: CacheConfig, hidden_dim: int, tokens: int, dtype_bytes: Any, batch: int = 1,
                         ranks: int = 1, contexts: int = 1, streams: int = 1, attentions_per_block: int = 1,
                         blocks_count: Optional[int] = None) -> int:
    """:func:`dit_cache_bytes` or :func:`attention_cache_bytes` for one resolvable :class:`CacheConfig`.

    A bypassed config (and AdaStep, which keeps one model output per context: use
    ``dit_cache_bytes`` with the output's channels) counts 0 here.
    """
    if config.method == "adastep":
        return 0
    cfg = config.resolved(blocks_count=blocks_count)
    if cfg.bypass:
        return 0
    if cfg.method == "dit_block_cache":
        return dit_cache_bytes(hidden_dim, tokens, dtype_bytes, batch, streams, ranks, contexts)
    return attention_cache_bytes(hidden_dim, tokens, dtype_bytes, cfg.block_end - cfg.block_start, batch,
                                 attentions_per_block, ranks, contexts)


def wan_latent_tokens(frames: int, height: int, width: int, vae_stride: Tuple[int, int, int] = (4, 8, 8),
                      patch: Tuple[int, int, int] = (1, 2, 2)) -> int:
    """Wan's DiT sequence length for a video: VAE latent ``(1 + (frames-1)/4, h/8, w/8)`` over the patch.

    >>> wan_latent_tokens(81, 720, 1280)   # 21 x 90 x 160 latent, (1, 2, 2) patch
    75600
    """
    t = 1 + (frames - 1) // vae_stride[0]
    h, w = height // vae_stride[1], width // vae_stride[2]
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])
