"""``CacheAgent``: the eager, MindIE-SD-compatible API, without MindIE's defects.

MindIE user code ports by changing one import::

    from npu_cache_fx import CacheAgent, CacheConfig   # was: from mindiesd import ...
    agent = CacheAgent(CacheConfig(method="dit_block_cache", blocks_count=len(blocks),
                                   steps_count=28, step_start=4, step_interval=2,
                                   block_start=1, block_end=5))
    for block in blocks:                     # inside the model's forward
        hidden_states = agent.apply(block, hidden_states=hidden_states, temb=temb)

Same outputs as ``mindiesd`` 3.1.0 wherever it is correct. Fixed: ``step_end``
is honoured by the DiT cache; a one-block range caches ``out - in``; the
default ``block_end`` works; blocks returning ``(encoder, hidden)`` are paired
right (``output_order="encoder_first"``); ``reset()``, ``set_timestep()``
(a rising timestep starts a new generation) and ``cache_context(name)`` (one
counter and cache per CFG branch); the attention cache honours the block range.
No graph is involved: this is the reference the graph passes are tested against.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .config import CacheConfig, ConfigError
from .contexts import CacheContexts
from .schedule import Action, config_actions, forecast_coefficients

__all__ = ["CacheAgent"]

log = logging.getLogger(__name__)

OUTPUT_ORDERS = ("hidden_first", "encoder_first")


class _State:
    def __init__(self) -> None:
        self.step = 0
        self.block = 0
        self.last_timestep: Optional[float] = None
        self.inputs: Optional[List[Optional[torch.Tensor]]] = None  # dit: stream inputs at block_start
        self.delta: Optional[List[Optional[torch.Tensor]]] = None   # dit: recorded out - in (newest)
        self.history: List[Any] = []       # forecast: recorded values, newest first (dit: deltas)
        self.times: List[float] = []       # forecast: their timesteps
        self.n_outputs = 1
        self.reading = False  # dit: this step's range is being skipped
        self.leaving: Optional[List[Optional[torch.Tensor]]] = None  # dit, hold_range_output: in + delta
        self.override: Optional[Action] = None  # begin_step(): this step's action, set from outside
        self.attention: Dict[int, Any] = {}

    def release(self) -> None:
        self.inputs = self.delta = self.leaving = None
        self.history, self.times = [], []
        self.attention = {}


def _scale(value, c: float):
    if isinstance(value, (list, tuple)):
        return type(value)(_scale(v, c) for v in value)
    return None if value is None else value * c


def _combine(a, b):
    if isinstance(a, (list, tuple)):
        return type(a)(_combine(x, y) for x, y in zip(a, b))
    return None if a is None else a + b


class CacheAgent(CacheContexts):
    """Apply a cached block (``dit_block_cache``) or attention call (``attention_cache``).

    ``apply`` must be called once per block per step, in block order: it counts
    ``blocks_count`` calls as one step and wraps after ``steps_count`` steps.

    At a reuse step of a ``dit_block_cache`` the range's first block returns ``in + delta`` and the others
    their input, as MindIE's agent does: code the model runs between the range's blocks (ControlNet residuals,
    VACE hints) adds to it again, on top of a delta that holds it. ``hold_range_output=True`` makes the range's
    last block return ``in + delta`` whatever it is handed, what the graph rewrite emits (the spec's range
    semantics; ``optimize``'s eager and Dynamo paths use it).
    """

    def __init__(self, config: CacheConfig, *, output_order: str = "hidden_first", hold_range_output: bool = False):
        if not isinstance(config, CacheConfig):
            raise ConfigError(f"CacheAgent takes a CacheConfig, got {type(config).__name__}")
        if output_order not in OUTPUT_ORDERS:
            raise ConfigError(f"output_order must be one of {OUTPUT_ORDERS}, got {output_order!r}")
        self.config = config.resolved()
        self.output_order = output_order
        self.hold_range_output = hold_range_output
        self.actions: List[Action] = config_actions(self.config)
        self._states: Dict[str, _State] = {}

    def use_config(self, config: CacheConfig) -> None:
        """Follow ``config`` from the next step on: the same cache (method, block list and range) with
        another schedule, e.g. the plan scaled to a generation's step count (``CacheConfig.scaled``)."""
        config = config.resolved()
        if config == self.config:
            return
        same = ("method", "blocks_count", "block_start", "block_end", "forecast", "attention")
        changed = [f for f in same if getattr(config, f) != getattr(self.config, f)]
        if changed:
            raise ConfigError(f"CacheAgent.use_config changes {changed}: build a new CacheAgent for another cache")
        self.config = config
        self.actions = config_actions(config)

    # ------------------------------------------------------------------ state
    @property
    def _state(self) -> _State:
        return self._states.setdefault(self._active, _State())

    def reset(self, context: Optional[str] = None) -> None:
        """Start a new generation (all contexts, or one)."""
        if context is None:
            self._states.clear()
        else:
            self._states.pop(context, None)

    def set_timestep(self, timestep: Any) -> None:
        """Tell the agent the step's timestep; a rise starts a new generation."""
        value = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        st = self._state
        if st.last_timestep is not None and value > st.last_timestep and (st.step or st.block):
            self.reset(self._active)
            st = self._state
        st.last_timestep = value

    @property
    def step(self) -> int:
        return self._state.step

    def begin_step(self, step: int, action: Optional[Action] = None, timestep: Optional[float] = None) -> None:
        """Drive the agent from outside (the eager path of ``optimize()``): set the step,
        override its planned action for this step, and give the timestep for forecasting."""
        st = self._state
        if step == 0 and (st.step or st.block):
            self.reset(self._active)
            st = self._state
        st.step, st.block = step, 0
        st.override = action
        if timestep is not None:
            st.last_timestep = float(timestep)

    # ------------------------------------------------------------------ apply
    def apply(self, function: Callable, *args, **kwargs):
        if not callable(function):
            raise TypeError("CacheAgent.apply: function must be callable")
        cfg = self.config
        if cfg.bypass:
            return function(*args, **kwargs)
        st = self._state
        action = self.actions[st.step] if st.override is None else st.override
        in_range = cfg.block_start <= st.block < cfg.block_end
        try:
            if cfg.method == "dit_block_cache":
                return self._dit(st, action if in_range else Action.COMPUTE, function, args, kwargs)
            return self._attention(st, action if in_range else Action.COMPUTE, function, args, kwargs)
        finally:
            self._advance(st)

    def _advance(self, st: _State) -> None:
        st.block += 1
        if st.block == self.config.blocks_count:
            st.block = 0
            st.step += 1
            if st.step == self.config.steps_count:
                st.step = 0
                st.release()

    def _now(self, st: _State) -> float:
        if st.last_timestep is None:
            raise RuntimeError(f"CacheAgent(forecast={self.config.forecast!r}) needs set_timestep(t) every step")
        return st.last_timestep

    def _forecast(self, st: _State, history: List[Any], times: List[float]):
        """The recorded value (plain reuse) or its extrapolation to the current timestep."""
        if self.config.history == 1:
            return history[0]
        coefs = forecast_coefficients(self._now(st), times, self.config.history)
        total = None
        for c, value in zip(coefs, history):
            term = _scale(value, c)
            total = term if total is None else _combine(total, term)
        return total

    def _record(self, st: _State, history: List[Any], times: List[float], value) -> None:
        history.insert(0, value)
        del history[self.config.history:]
        if self.config.history > 1:
            times.insert(0, self._now(st))
            del times[self.config.history:]

    def _attention(self, st: _State, action: Action, fn, args, kwargs):
        if action is Action.READ and st.block in st.attention:
            return self._forecast(st, *st.attention[st.block])
        out = fn(*args, **kwargs)
        if action is Action.WRITE:
            self._record(st, *st.attention.setdefault(st.block, ([], [])), out)
        return out

    def _streams(self, out) -> List[torch.Tensor]:
        """Block output as [hidden, encoder] (or [hidden])."""
        if isinstance(out, (list, tuple)):
            if len(out) not in (1, 2):
                raise RuntimeError(f"CacheAgent: a cached block must return 1 or 2 tensors, got {len(out)}")
            outs = list(out)
            return outs[::-1] if self.output_order == "encoder_first" and len(outs) == 2 else outs
        return [out]

    def _pack(self, streams: Sequence[torch.Tensor], n_outputs: int):
        if n_outputs == 1:
            return streams[0]
        hidden, encoder = streams
        return (encoder, hidden) if self.output_order == "encoder_first" else (hidden, encoder)

    def _dit(self, st: _State, action: Action, fn, args, kwargs):
        if "hidden_states" not in kwargs or kwargs["hidden_states"] is None:
            raise ValueError("CacheAgent(dit_block_cache).apply needs hidden_states= as a keyword argument")
        kwargs = dict(kwargs)
        hidden = kwargs.pop("hidden_states")
        has_encoder = "encoder_hidden_states" in kwargs
        encoder = kwargs.pop("encoder_hidden_states", None)
        inputs = [hidden, encoder]
        cfg = self.config
        if action is Action.READ:
            if st.block == cfg.block_start:
                # Nothing valid recorded (reset, new shape): compute this step's range instead.
                st.reading = st.delta is not None and all(
                    d is None or (x is not None and x.shape == d.shape) for x, d in zip(inputs, st.delta))
                if st.reading:
                    delta = self._forecast(st, st.history, st.times)
                    out = [x + d if d is not None else x for x, d in zip(inputs, delta)]
                    st.leaving = out if self.hold_range_output else None
                    return self._pack(out, st.n_outputs)
            elif st.reading:
                if st.leaving is not None and st.block == cfg.block_end - 1:
                    out, st.leaving = st.leaving, None
                    return self._pack(out, st.n_outputs)
                return self._pack(inputs, st.n_outputs)
            action = Action.COMPUTE
        res = fn(hidden, encoder, *args, **kwargs) if has_encoder else fn(hidden, *args, **kwargs)
        if action is Action.WRITE:
            if st.block == cfg.block_start:
                st.inputs = inputs
            if st.block == cfg.block_end - 1:
                outs = self._streams(res)
                st.n_outputs = len(outs)
                if st.n_outputs == 2 and st.inputs[1] is None:
                    raise ValueError("CacheAgent: the block returns two streams but encoder_hidden_states "
                                     "was not passed to apply()")
                st.delta = [o - i if o is not None else None for o, i in zip(outs, st.inputs)]
                if st.n_outputs == 1:
                    st.delta.append(None)
                if st.history and any(d is not None and h is not None and d.shape != h.shape
                                      for d, h in zip(st.delta, st.history[0])):
                    st.history, st.times = [], []  # a new shape starts a new history
                self._record(st, st.history, st.times, st.delta)
                st.inputs = None
        return res

    def __repr__(self) -> str:
        return f"CacheAgent({self.config}, output_order={self.output_order!r})"
