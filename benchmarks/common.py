"""Shared helpers for the benchmark scripts: timing, machine info, JSON output, a small Flux.

Kept free of anything script-specific so later benchmarks can reuse it::

    import common
    common.set_threads(1)
    model = common.build_flux()
    inputs = common.flux_inputs()
    times = common.interleaved({"eager": lambda: model(timestep=t, **inputs),
                                "opt": lambda: fast(timestep=t, **inputs)}, repeats=20)
    print(common.median(times["opt"]) / common.median(times["eager"]))

Timings on a shared machine are noisy: measure the things you compare in the
same run, interleaved (:func:`interleaved`), and report medians and ratios.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from npu_cache_fx.profile import no_gc

__all__ = [
    "build_flux", "euler_sample", "flux_inputs", "interleaved", "machine_info", "median", "no_gc",
    "set_threads", "summary", "timesteps", "write_json",
]


# ----------------------------------------------------------------------------- environment
def set_threads(n: int = 1) -> int:
    """Pin intra-op threads (the benchmark machines are small and shared)."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def machine_info(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line, versions, thread count and machine, for the printed header and the JSON."""
    argv = list(sys.argv if argv is None else argv)
    info = {
        "command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except Exception:  # optional: only the Flux builder needs it
        info["diffusers"] = None
    return info


# ----------------------------------------------------------------------------- timing
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def summary(xs: Sequence[float], scale: float = 1e3) -> Dict[str, float]:
    """Median / min / max / n of seconds ``xs``, scaled (default: milliseconds)."""
    if not xs:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": median(xs) * scale, "min": min(xs) * scale, "max": max(xs) * scale, "n": len(xs)}


def interleaved(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds per call of each function, measured round-robin to cancel drift.

    Each round calls every function once; the order alternates between rounds
    (A,B then B,A) so neither side always runs first. ``warmup`` rounds are
    run untimed first. Returns ``{name: [seconds] * repeats}``.
    """
    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    with torch.no_grad(), no_gc():
        for r in range(warmup + repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                dt = time.perf_counter() - t0
                if r >= warmup:
                    times[name].append(dt)
    return times


# ----------------------------------------------------------------------------- output
def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, tuples lists, unknown objects their str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return str(obj)


def write_json(path: str, data: Mapping[str, Any]) -> str:
    """Write ``data`` as indented JSON, creating the folder; returns the path."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(data), f, indent=2)
        f.write("\n")
    return path


# ----------------------------------------------------------------------------- a small Flux
def build_flux(double: int = 2, single: int = 6, heads: int = 2, head_dim: int = 64, in_channels: int = 16,
               text_dim: int = 64, seed: int = 0) -> torch.nn.Module:
    """A random diffusers ``FluxTransformer2DModel``, small but with real compute per block."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
                                  attention_head_dim=head_dim, num_attention_heads=heads,
                                  joint_attention_dim=text_dim, pooled_projection_dim=text_dim,
                                  axes_dims_rope=(16, 24, 24)).eval()


def flux_inputs(tokens: int = 256, text: int = 32, in_channels: int = 16, text_dim: int = 64,
                seed: int = 0) -> Dict[str, Any]:
    """Inputs of :func:`build_flux` except ``timestep`` (the caller passes it per step)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, tokens, in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text, text_dim, generator=g),
                pooled_projections=torch.randn(1, text_dim, generator=g),
                img_ids=torch.zeros(tokens, 3), txt_ids=torch.zeros(text, 3), return_dict=False)


def timesteps(steps: int) -> torch.Tensor:
    """``steps + 1`` Euler timesteps from 1 to 0 (slice ``ts[i:i+1]`` per step)."""
    return torch.linspace(1.0, 0.0, steps + 1)


def euler_sample(model: Callable, inputs: Mapping[str, Any], steps: int) -> torch.Tensor:
    """A plain flow-matching Euler loop of ``steps`` model calls; returns the final latents."""
    ts = timesteps(steps)
    kwargs = dict(inputs)
    x = kwargs.pop("hidden_states")
    with torch.no_grad():
        for i in range(steps):
            v = model(hidden_states=x, timestep=ts[i:i + 1], **kwargs)[0]
            x = x + (ts[i + 1] - ts[i]) * v
    return x
