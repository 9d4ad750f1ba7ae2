"""What to cache: :class:`CacheConfig`, MindIE-SD's fields with their defects fixed.

Pure Python (no torch), so the step plan and its tests need nothing else.

Example::

    >>> cfg = CacheConfig(method="dit_block_cache", steps_count=28, step_start=18,
    ...                   step_interval=2, block_start=1, block_end=23,
    ...                   blocks="single_transformer_blocks")
    >>> cfg.resolved(blocks_count=38).block_end
    23
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

__all__ = ["CacheConfig", "ConfigError", "FORECASTS", "METHODS", "MINDIE_UNBOUNDED", "PLAN_FILE", "config_list",
           "configs_from_json",
           "configs_to_json", "load_plan", "save_plan"]

METHODS = ("dit_block_cache", "attention_cache", "adastep")
FORECASTS = {"none": 1, "linear": 2, "taylor2": 3}  # forecast -> values kept per cache slot
ADASTEP_DEFAULTS = {"threshold": 0.015, "max_skip_steps": 4, "decay": 0.99}  # MindIE-SD AdaStep defaults

# MindIE-SD's default for ``step_end``/``block_end``; it means "to the end".
# MindIE itself rejects it for the DiT cache (its defect 3); we accept it.
MINDIE_UNBOUNDED = 10000


class ConfigError(ValueError):
    """An invalid cache configuration; the message names the field and the value."""


def _check_int(name: str, value, *, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"CacheConfig.{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"CacheConfig.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class CacheConfig:
    """A step-cache plan for one block list of a diffusion transformer.

    Field names and meanings follow ``mindiesd.CacheConfig``:

    * ``method``: ``"dit_block_cache"`` (reuse the residual of blocks
      ``[block_start, block_end)``) or ``"attention_cache"`` (reuse each block's
      attention output).
    * ``blocks_count``: number of blocks in the list; inferred from the model
      by :func:`npu_cache_fx.optimize`, required by :class:`CacheAgent`.
    * ``steps_count``: denoising steps per generation; the step counter wraps
      there and frees the cache.
    * ``step_start``, ``step_interval``, ``step_end``: first step that may use
      the cache, refresh period (1 = cache off) and last step that may reuse
      (default: the last step; honoured by the DiT cache too).
    * ``block_start``, ``block_end``: block range ``[start, end)``; ``block_end``
      defaults to ``blocks_count``.

    Added by npu_cache_fx:

    * ``blocks``: module path of the block list (``"single_transformer_blocks"``);
      auto-detected when omitted.
    * ``name``: label used in the plan table and in cache slot names.
    * ``forecast``: ``"none"`` (reuse the recorded value), ``"linear"`` or ``"taylor2"``
      (extrapolate the values recorded at the last 2 / 3 refreshes in timestep).
    * ``refresh_steps``: an explicit (non-periodic) set of refresh steps instead of
      ``step_interval``; reuse happens on the other steps of ``[step_start, step_end]``.
    * ``attention`` (attention cache): the block's attention submodule to cache
      (``"attn"``, ``"attn1"``, comma-separated names, or ``"all"``); default:
      the block's first attention submodule (self-attention).
    * ``threshold``, ``max_skip_steps``, ``decay`` (``method="adastep"``): AdaStep's
      skip threshold (default 0.015), consecutive-skip limit (4) and threshold
      decay per evaluation (0.99); see :mod:`npu_cache_fx.timestep`.
    * ``max_cache_bytes``: cache-memory budget per cache context. An attention
      cache over budget caches only the blocks that fit, preferring the highest
      measured attention cost per byte; a DiT cache over budget is an error.

    ``step_end``/``block_end`` of ``10000`` (MindIE's defaults) mean "to the end".

    >>> CacheConfig(method="dit_block_cache", steps_count=10, step_interval=0)
    Traceback (most recent call last):
    ...
    npu_cache_fx.config.ConfigError: CacheConfig.step_interval must be >= 1, got 0
    """

    method: str = "dit_block_cache"
    blocks_count: Optional[int] = None
    steps_count: Optional[int] = None
    step_start: int = 0
    step_interval: int = 1
    step_end: Optional[int] = None
    block_start: int = 0
    block_end: Optional[int] = None
    blocks: Optional[str] = None
    name: Optional[str] = None
    attention: Optional[str] = None
    max_cache_bytes: Optional[int] = None
    threshold: Optional[float] = None
    max_skip_steps: Optional[int] = None
    decay: Optional[float] = None
    refresh_steps: Optional[Tuple[int, ...]] = None
    forecast: str = "none"

    def __post_init__(self) -> None:
        if self.forecast not in FORECASTS:
            raise ConfigError(f"CacheConfig.forecast must be one of {tuple(FORECASTS)}, got {self.forecast!r}")
        if self.forecast != "none" and self.method == "adastep":
            raise ConfigError(f"CacheConfig.forecast={self.forecast!r} does not apply to method='adastep'")
        if self.refresh_steps is not None:
            if isinstance(self.refresh_steps, (str, bytes)) or not hasattr(self.refresh_steps, "__iter__"):
                raise ConfigError(f"CacheConfig.refresh_steps must be a sequence of ints, got {self.refresh_steps!r}")
            steps = tuple(self.refresh_steps)
            for s in steps:
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    raise ConfigError(f"CacheConfig.refresh_steps must hold ints >= 0, got {s!r} in {steps}")
                if self.steps_count is not None and s >= self.steps_count:
                    raise ConfigError(f"CacheConfig.refresh_steps must be < steps_count ({self.steps_count}), "
                                      f"got {s} in {steps}")
            if len(set(steps)) != len(steps):
                raise ConfigError(f"CacheConfig.refresh_steps has duplicates: {steps}")
            if self.step_interval != 1:
                raise ConfigError(f"CacheConfig.refresh_steps replaces step_interval; got both "
                                  f"(step_interval={self.step_interval})")
            object.__setattr__(self, "refresh_steps", tuple(sorted(steps)))
        if self.method not in METHODS:
            raise ConfigError(f"CacheConfig.method must be one of {METHODS}, got {self.method!r}")
        _check_int("blocks_count", self.blocks_count, minimum=1, optional=True)
        _check_int("steps_count", self.steps_count, minimum=1, optional=True)
        _check_int("step_start", self.step_start, minimum=0)
        _check_int("step_interval", self.step_interval, minimum=1)
        _check_int("step_end", self.step_end, minimum=0, optional=True)
        _check_int("block_start", self.block_start, minimum=0)
        _check_int("block_end", self.block_end, minimum=0, optional=True)
        if self.step_end is not None and self.step_end < self.step_start:
            raise ConfigError(
                f"CacheConfig.step_end must be >= step_start ({self.step_start}), got {self.step_end}")
        if self.block_end is not None and self.block_end < self.block_start:
            raise ConfigError(
                f"CacheConfig.block_end must be >= block_start ({self.block_start}), got {self.block_end}")
        if (self.blocks_count is not None and self.block_end is not None
                and self.blocks_count < self.block_end < MINDIE_UNBOUNDED):
            raise ConfigError(
                f"CacheConfig.block_end must be <= blocks_count ({self.blocks_count}), got {self.block_end}")
        _check_int("max_cache_bytes", self.max_cache_bytes, minimum=0, optional=True)
        if self.attention is not None and self.method != "attention_cache":
            raise ConfigError(f"CacheConfig.attention={self.attention!r} only applies to method='attention_cache', "
                              f"got method={self.method!r}")
        for field in ADASTEP_DEFAULTS:
            if getattr(self, field) is not None and self.method != "adastep":
                raise ConfigError(f"CacheConfig.{field}={getattr(self, field)!r} only applies to method='adastep', "
                                  f"got method={self.method!r}")
        _check_int("max_skip_steps", self.max_skip_steps, minimum=0, optional=True)
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not self.threshold >= 0):
            raise ConfigError(f"CacheConfig.threshold must be a number >= 0, got {self.threshold!r}")
        if self.decay is not None and (isinstance(self.decay, bool) or not isinstance(self.decay, (int, float))
                                       or not 0 < self.decay <= 1):
            raise ConfigError(f"CacheConfig.decay must be in (0, 1], got {self.decay!r}")
        for field in ("blocks", "name", "attention"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"CacheConfig.{field} must be a non-empty str, got {value!r}")

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """The fields that differ from their defaults (JSON-ready)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value != f.default:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "CacheConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown CacheConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    # ------------------------------------------------------------------ derived
    def replace(self, **changes) -> "CacheConfig":
        return dataclasses.replace(self, **changes)

    def resolved(self, blocks_count: Optional[int] = None) -> "CacheConfig":
        """Fill ``blocks_count`` (from the model when given) and the open ends.

        The result has concrete ``blocks_count``, ``steps_count``, ``step_end`` and
        ``block_end``; it is what the plan and the passes consume.
        """
        if self.method == "adastep":
            if self.steps_count is None:
                raise ConfigError("CacheConfig.steps_count is required (got None): "
                                  "the number of denoising steps per generation")
            filled = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in ADASTEP_DEFAULTS.items()}
            return dataclasses.replace(self, **filled)
        if blocks_count is not None:
            if self.blocks_count is not None and self.blocks_count != blocks_count:
                raise ConfigError(
                    f"CacheConfig.blocks_count is {self.blocks_count} but the block list "
                    f"{self.blocks or '(auto)'!s} has {blocks_count} blocks")
        count = self.blocks_count if blocks_count is None else blocks_count
        if count is None:
            raise ConfigError("CacheConfig.blocks_count is required here (got None): "
                              "give it, or let optimize() infer it from the model")
        if self.steps_count is None:
            raise ConfigError("CacheConfig.steps_count is required (got None): "
                              "the number of denoising steps per generation")
        last_step = self.steps_count - 1
        step_end = last_step if self.step_end is None or self.step_end >= MINDIE_UNBOUNDED else self.step_end
        step_end = max(self.step_start, min(step_end, last_step))  # step_start past the end: bypass
        block_end = count if self.block_end is None or self.block_end >= MINDIE_UNBOUNDED else self.block_end
        if self.block_start >= count and block_end != self.block_start:
            raise ConfigError(
                f"CacheConfig.block_start={self.block_start} is past the last block of "
                f"{self.blocks or 'the block list'} ({count} blocks: block_start must be in 0..{count - 1})")
        if block_end > count:
            raise ConfigError(f"CacheConfig.block_end must be <= blocks_count ({count}), got {block_end}")
        return dataclasses.replace(self, blocks_count=count, step_end=step_end, block_end=block_end)

    def scaled(self, steps: int) -> "CacheConfig":
        """This resolved config re-stated for a generation of ``steps`` steps.

        A plan is written for ``steps_count`` steps; a request with another step count
        (serving engines pick ``num_inference_steps`` per request) runs the same plan
        *over the trajectory*: every step index (``step_start``, ``step_end``,
        ``refresh_steps``) and the refresh period are scaled by ``steps / steps_count``
        and rounded half up. A period of 2 or more stays at least 2 (the plan keeps
        caching); ``step_end`` at the last step stays at the last step.

        >>> cfg = CacheConfig(steps_count=28, blocks_count=8, step_start=4, step_interval=3).resolved()
        >>> s = cfg.scaled(50)
        >>> (s.steps_count, s.step_start, s.step_interval, s.step_end)
        (50, 7, 5, 49)
        """
        _check_int("steps", steps, minimum=1)
        if self.steps_count is None or (self.method != "adastep" and self.step_end is None):
            raise ConfigError("CacheConfig.scaled needs a resolved config (call cfg.resolved())")
        if steps == self.steps_count:
            return self
        if self.method == "adastep":
            return dataclasses.replace(self, steps_count=steps)
        ratio = steps / self.steps_count
        last = steps - 1

        def at(s: int) -> int:
            return min(last, math.floor(s * ratio + 0.5))

        if self.step_start >= self.steps_count:  # never starts: stays a bypass
            start = end = steps
        else:
            start = at(self.step_start)
            end = max(start, last if self.step_end >= self.steps_count - 1 else at(self.step_end))
        if self.refresh_steps is not None:
            refresh = tuple(sorted({at(s) for s in self.refresh_steps}))
            return dataclasses.replace(self, steps_count=steps, step_start=start, step_end=end, refresh_steps=refresh)
        interval = self.step_interval
        if interval > 1:
            interval = max(2, math.floor(interval * ratio + 0.5))
        return dataclasses.replace(self, steps_count=steps, step_start=start, step_end=end, step_interval=interval)

    @property
    def bypass(self) -> bool:
        """True when this config never reuses anything (SPEC §2 "Bypass")."""
        if self.method == "adastep":
            return self.max_skip_steps == 0
        steps = self.steps_count
        blocks = self.blocks_count
        return (
            (steps is not None and self.step_start >= steps)
            or (self.step_end is not None and self.step_end == self.step_start)
            or (blocks is not None and self.block_start >= blocks)
            or (self.block_end is not None and self.block_end == self.block_start)
            or (self.step_interval == 1 and self.refresh_steps is None)
            or (self.refresh_steps is not None and not self.refresh_steps)
        )

    @property
    def history(self) -> int:
        """Recorded values kept per cache slot: 1 plain reuse, 2 linear, 3 taylor2."""
        return FORECASTS[self.forecast]

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method == "adastep":
            return "adastep"
        kind = "dit" if self.method == "dit_block_cache" else "attn"
        end = "" if self.block_end is None else self.block_end
        return f"{kind}[{self.blocks or 'blocks'}:{self.block_start}:{end}]"


def config_list(configs, what: str = "optimize()") -> List[CacheConfig]:
    """One config or an iterable of them as a list; anything else is a ConfigError naming ``what`` took it."""
    if configs is None:
        raise ConfigError(f"{what}: the plan is None; pass a CacheConfig or a list of them "
                          "(npu_cache_fx.load_plan(path) reads a saved plan)")
    out = [configs] if isinstance(configs, CacheConfig) else list(configs)
    for c in out:
        if not isinstance(c, CacheConfig):
            raise ConfigError(f"{what} takes CacheConfig objects, got {type(c).__name__}")
    return out


def configs_to_json(configs) -> list:
    """A config or list of configs as a JSON-ready list of dicts."""
    return [c.to_dict() for c in config_list(configs, "configs_to_json")]


def configs_from_json(obj) -> list:
    """Configs from a dict, a list of dicts, or a search report (``{"best": {"config": ...}}``)."""
    if isinstance(obj, dict) and "best" in obj:
        obj = obj["best"]
    if isinstance(obj, dict) and "config" in obj:
        obj = obj["config"]
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(x, dict) for x in obj):
        raise ConfigError(f"expected a CacheConfig dict or a list of them, got {type(obj).__name__}")
    return [CacheConfig.from_dict(x) for x in obj]


PLAN_FILE = "npu_cache_fx_plan.json"


def save_plan(configs: Union[CacheConfig, Sequence[CacheConfig]], path: Union[str, os.PathLike]) -> str:
    """Write a plan (one config or a list) as JSON; ``path`` may be a directory (then ``PLAN_FILE`` in it).

    Returns the file written. :func:`load_plan` reads it back::

        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> f = save_plan(CacheConfig(steps_count=28, step_start=4, step_interval=3), d)
        >>> load_plan(d)[0].step_interval
        3
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, PLAN_FILE)
    with open(path, "w") as f:
        json.dump({"npu_cache_fx_plan": 1, "configs": configs_to_json(configs)}, f, indent=2)
        f.write("\n")
    return path


def load_plan(path: Union[str, os.PathLike]) -> List[CacheConfig]:
    """The configs of a plan file, a directory holding ``PLAN_FILE`` (a saved transformer folder),
    or a search report (``search.json``)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, PLAN_FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"no plan at {path!r}: pass a plan JSON file or a folder holding {PLAN_FILE} "
                          "(written by save_plan or by save_pretrained of an optimized model)")
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, dict) and "npu_cache_fx_plan" in data:
        data = data["configs"]
    return configs_from_json(data)
