"""The optimized module: host-side step dispatch over specialised graph variants.

``optimize(model, config)`` returns an :class:`OptimizedModule`, a drop-in for
``model``. Per call it (1) normalises the inputs, (2) advances the step
counter of the active cache context (resetting on a new generation), (3)
looks up the step's decision in the static :class:`~npu_cache_fx.schedule.Plan`,
and (4) runs the graph variant for that decision, passing the context's cache
buffers. Captures are lazy and keyed by the inputs' structure, shapes, dtypes,
devices and non-tensor values; a new key gets its own buffers and is captured
again, unless a dynamic capture (``backend_options["shapes"]``, the default for compiling backends:
:mod:`npu_cache_fx.shapes`) serves its sizes with the variants compiled already.

Example::

    >>> from npu_cache_fx import CacheConfig, optimize
    >>> cfg = CacheConfig(steps_count=28, step_start=4, step_interval=2,
    ...                   block_start=1, block_end=5)
    >>> fast = optimize(transformer, cfg)                  # doctest: +SKIP
    >>> print(fast.plan)                                   # doctest: +SKIP
    >>> with fast.cache_context("uncond"): ...             # doctest: +SKIP
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch._dynamo.eval_frame import skip_code
from torch.utils import _pytree as pytree

from .backends import (Backend, PerShape, check_backend_options, compile_graph, compile_segment, graph_mode,
                       resolve_backend, shape_mode)
from .capture import TRACING, Capture, capture, choose_attention, find_block_lists
from .config import CacheConfig, ConfigError, config_list, save_plan
from .contexts import CacheContexts
from .fallback import EagerPath, export_failure
from .integration import OWN_ATTRIBUTES, pipeline_steps, reported_class, without_root_hook
from .passes import lower_cache_ops
from .passes.common import coef_slot, eliminate_dead_code
from .regions import RegionalProgram, SegmentCache
from .schedule import Action, Decision, Plan, forecast_coefficients, make_plan
from .shapes import DynamicShapes, bind, concrete
from .adastep import AdaStepState
from .targets import Target, bind_target, check_overlaps, resolve_config
from .watch import ModelWatch, offload_hooks, stateful_hooks

__all__ = ["CaptureCache", "OptimizedModule", "Stats", "TIMESTEP_NAMES", "normalize_inputs", "optimize", "signature_key",
           "static_cache_buffers", "timestep_value"]

log = logging.getLogger(__name__)

TIMESTEP_NAMES = ("timestep", "timesteps", "t")
LATENT_NAMES = ("hidden_states", "sample", "latents", "x")


SHAPE_CAPTURE = ("static: each new input shape is captured and its variants compiled again (regional graphs "
                 "share only segments whose inputs keep their shapes)")
SHAPE_DYNAMIC = ("dynamic: captured once with symbolic sizes (torch.export Dim.AUTO); a new shape that fits the "
                 "capture reuses it and its compiled variants; cache buffers are allocated per shape")


@dataclass
class Stats:
    """Counters of an :class:`OptimizedModule` since construction (or ``stats.clear()``)."""

    steps: int = 0
    steps_computed: int = 0
    steps_reused: int = 0
    steps_skipped: int = 0  # AdaStep: whole model skipped, previous output returned
    # extra calls within a step with other inputs (SD3's skip-layer guidance): no step of their own
    auxiliary_calls: int = 0
    blocks_skipped: int = 0
    attention_calls_skipped: int = 0
    stale_reads_avoided: int = 0
    generations: int = 0  # generations started (per context)
    captures: int = 0
    # captures dropped because the wrapped model changed (a LoRA loaded, a module replaced, a hook added...)
    model_changes: int = 0
    variants_built: int = 0
    # steps of the latest generation's plan (the configs' steps_count, or the request's: see set_steps)
    plan_steps: int = 0
    capture_seconds: float = 0.0
    # how optimize(backend=...) compiles: "regional" (each distinct block / glue graph once, shared by the
    # variants), "full" (one graph per variant) or None (nothing compiled); see backends.graph_mode
    graph_mode: Optional[str] = None
    # first call of each compiled variant (compile + one run), all input signatures
    compile_seconds: float = 0.0
    graphs_compiled: int = 0  # graphs handed to the backend (regional: distinct segments)
    graphs_shared: int = 0  # regional: segments a variant found compiled by another block or variant
    # per input signature (shape label): capture seconds and, per variant, compile seconds and graphs
    timings: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # how a new input shape (another resolution) is served, and why (backend_options["shapes"])
    shape_capture: str = SHAPE_CAPTURE
    # input signatures served by a dynamic capture taken for another signature (no capture, no compile)
    shapes_reused: int = 0
    # how the model runs: "export" (captured graphs), "dynamo" (export failed: blocks compiled one by one,
    # cache logic on the host) or "eager" (export failed and nothing is compiled)
    path: str = "export"
    fallback_reason: Optional[str] = None
    cache_bytes: int = 0
    cache_bytes_by_context: Dict[str, int] = field(default_factory=dict)
    cache_bytes_by_config: Dict[str, int] = field(default_factory=dict)

    def clear(self) -> None:
        keep = (self.path, self.fallback_reason, self.cache_bytes, self.cache_bytes_by_context,
                self.cache_bytes_by_config, self.graph_mode, self.shape_capture)
        self.__init__()
        (self.path, self.fallback_reason, self.cache_bytes, self.cache_bytes_by_context,
         self.cache_bytes_by_config, self.graph_mode, self.shape_capture) = keep


@dataclass
class _Variant:
    decision: Decision
    graph: fx.GraphModule
    fn: Callable
    slots: List[Tuple[str, List[Any], torch.dtype, torch.device]]  # sizes: ints, SymInts of a dynamic capture
    # input signatures whose first call (the compile, if any) was timed; None: nothing is compiled
    timed: Optional[set] = None
    recorded: Tuple[int, int] = (0, 0)  # regional: (compiled, shared) segments already in the stats

    @property
    def label(self) -> str:
        return "|".join(a.value for a in self.decision)


@dataclass
class _Call:
    """What _prepare hands to the variant call and to _finish."""

    ctx: "_Context"
    entry: "_Entry"
    variant: _Variant
    valid: set
    fn: Callable
    inputs: List[Any]
    key: Any = None
    skip: bool = False
    timestep: Optional[float] = None
    step: int = 0
    auxiliary: bool = False


class _Entry:
    """One capture (one input signature) and the variants built from it."""

    def __init__(self, cap: Optional[Capture], targets: List[Target], eager: Optional[EagerPath] = None,
                 label: str = ""):
        self.capture = cap
        self.label = label  # the input signature in words (stats.timings)
        # the symbolic input sizes of a dynamic capture (npu_cache_fx.shapes), else None
        self.dynamic: Optional[DynamicShapes] = cap.meta.get("dynamic") if cap is not None else None
        self.targets = targets
        self.eager = eager  # the eager path when the model could not be captured
        self.out_spec = cap.out_spec if cap is not None else None
        self.variants: Dict[Decision, _Variant] = {}
        # Rewrite downstream targets first: an upstream rewrite then redirects the
        # downstream region's input along with every other user.
        self.rewrite_order = sorted((t for t in targets if t.values), key=lambda t: -t.first)
        # slot name -> index of the config that owns it (cache bytes per config)
        self.slot_owner: Dict[str, int] = {slot: t.index for t in targets for slot in t.slot_bytes}

    def build(self, decision: Decision) -> fx.GraphModule:
        cap = self.capture
        graph = fx.Graph()
        out = graph.graph_copy(cap.gm.graph, {})
        graph.output(out)
        gm = fx.GraphModule(cap.gm, graph, class_name="CacheVariant")
        # No DCE until every target is rewritten: a write keeps alive a stream that a
        # downstream read made dead, so the recorded cache is complete.
        removed: set = set()
        for target in self.rewrite_order:
            action = decision[target.index]
            if action is not Action.COMPUTE:
                target.rewrite(gm, action)
            if action is Action.READ:
                removed |= target.nodes
        eliminate_dead_code(gm, pure=removed, recompile=False)
        lower_cache_ops(gm)  # recompiles: gm.code is current from here
        return gm


@dataclass
class _StepRun:
    """A step that has run: its timestep, index and the input signatures called in it."""

    timestep: float
    index: int
    keys: set


class _Context:
    """Per cache-context state: step counter, last timestep, buffers and their validity."""

    def __init__(self, plan: Plan, adastep: Optional[CacheConfig] = None) -> None:
        self.plan = plan  # this generation's plan (re-made per generation for the request's step count)
        self.thread: Optional[int] = None  # the thread running this context's generation
        self.step = 0
        self.last_timestep: Optional[float] = None
        self.wrapped_at: Optional[float] = None  # timestep of the last step before the counter wrapped
        self.buffers: Dict[Any, Dict[str, torch.Tensor]] = {}
        self.valid: Dict[Any, set] = {}
        self.pending_refresh: set = set()  # targets whose refresh step AdaStep skipped
        # (input signature, target) -> timesteps of its writes in this generation, newest first
        self.refresh_times: Dict[Tuple[Any, int], List[float]] = {}
        self.ada = AdaStepState(adastep, plan.steps_count) if adastep is not None else None
        self.last_step: Optional[_StepRun] = None  # the step just run, for its auxiliary calls

    def new_generation(self) -> None:
        self.step = 0
        self.last_timestep = None
        self.pending_refresh.clear()
        self.refresh_times.clear()
        for valid in self.valid.values():
            valid.clear()
        if self.ada is not None:
            self.ada.reset()

    def nbytes(self) -> int:
        tensors = [t for bufs in self.buffers.values() for t in bufs.values()]
        tensors += self.ada.tensors() if self.ada is not None else []
        return sum(t.numel() * t.element_size() for t in tensors)


def static_cache_buffers(backend: Any, options: Dict[str, Any]) -> bool:
    """Whether cache buffers are marked static inputs of the compiled variants (``mark_static_address``).

    Marked, CUDA graph trees (inductor ``mode="reduce-overhead"``) record the write variant's in-place
    ``copy_`` instead of skipping CUDA graphs for "mutated inputs", and replay reads without copying
    the buffer in. The mark is unguarded, so the cond/uncond contexts' buffers still share one compiled
    graph; CUDA graph trees record one replay per buffer address. torchair's aclgraph keys its captures
    by these addresses too, but with ``experimental_config.frozen_parameter`` it takes them as fixed and
    would replay one context's buffers for another: for ``backend="torchair"`` the default is therefore
    ``False``. ``backend_options={"static_cache_buffers": bool}`` overrides it (pass ``False`` when
    compiling ``optimize(model, cfg)`` yourself with a torchair backend that freezes parameters).
    """
    value = options.get("static_cache_buffers", backend != "torchair")
    if not isinstance(value, bool):
        raise ConfigError(f"backend_options['static_cache_buffers'] must be True or False, got {value!r}")
    return value


def normalize_inputs(signature: inspect.Signature, args: tuple, kwargs: Dict[str, Any], owner: str) -> Dict[str, Any]:
    """A call's inputs as keyword arguments in ``forward``'s parameter order: one capture key per call form
    (the optimized module and the search's recorder key calls the same way)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as err:
        raise TypeError(f"{owner}.forward: {err}") from None
    out: Dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{owner}.forward takes *{name}; npu_cache_fx needs named inputs")
        else:
            out[name] = value
    return out


def reject_bad_inputs(model: torch.nn.Module, kwargs: Dict[str, Any]) -> None:
    """After an export failure: raise the plain model's own error when it rejects these inputs too (a bad
    call, not a model export cannot capture), without export's error chained to it."""
    try:
        with torch.no_grad():
            model(**kwargs)
    except Exception as err:
        error = err
    else:
        return
    raise error


def refuse_wrapped_model(model: Any) -> None:
    """``optimize`` of a wrapper instead of the model: ``torch.compile(model)`` (e.g. ``enable_cache(pipe)`` after
    ``pipe.transformer = torch.compile(pipe.transformer)``: the capture would see the wrapper, not the blocks), or
    a module ``optimize`` returned (two step caches, one inside the other, on one model)."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        inner = type(getattr(model, "_orig_mod", model)).__name__
        raise ConfigError(
            f"optimize(model=...) got a torch.compile wrapper of {inner}: pass the model itself (the wrapper's "
            "._orig_mod, e.g. pipe.transformer = pipe.transformer._orig_mod) and compile after: "
            "optimize(model, plan, backend='inductor') compiles the cache variants, or "
            "torch.compile(optimize(model, plan)).")
    if isinstance(model, OptimizedModule):
        raise ConfigError(
            f"optimize(model=...) got a module optimize() returned ({type(model.model).__name__} with a plan of "
            f"{len(model.all_configs)} config(s)): one step cache per model. For another plan, optimize the "
            "model itself, optimize(optimized.model, plan), or re-plan a pipeline with enable_cache(pipe, plan), "
            "which keeps the captures.")


def _first_names(names: Sequence[str]) -> str:
    """``"a, b, c and 4 more"``: the first three of ``names`` for a message."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return ", ".join(names[:3]) + more


def refuse_stateful_hooks(model: torch.nn.Module) -> None:
    """Raise when diffusers' stateful hooks are on the model (its own step caches, ``enable_cache(...)``):
    two step caches on one model, and a captured graph would freeze one call's branch of theirs."""
    found = stateful_hooks(model)
    if found:
        raise RuntimeError(
            f"{type(model).__name__} has diffusers' stateful hooks ({_first_names(found)}): a step cache of "
            "diffusers' own (enable_cache / apply_first_block_cache / apply_faster_cache...) on a model that "
            "npu_cache_fx caches. One step cache per model: remove diffusers' (model.disable_cache()) and keep "
            "the optimize() plan, or call the model without optimize().")


def refuse_autocast(model: torch.nn.Module, leaves: Sequence[Any]) -> None:
    """Raise when ``torch.autocast`` is in effect for the call's devices: a captured graph cannot follow it.

    Export under autocast records the dtypes of one autocast state in the model's own casts, and running the
    graph under autocast casts again: the graph raises dtype mismatches (or, compiled, ignores autocast)."""
    device = next((x.device.type for x in leaves if isinstance(x, torch.Tensor)), "cpu")
    for device_type in ("cpu",) if device == "cpu" else ("cpu", device):
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except (RuntimeError, TypeError, ValueError):  # a device type without autocast support
            continue
        if enabled:
            dtype = str(torch.get_autocast_dtype(device_type)).replace("torch.", "")
            raise RuntimeError(
                f"{type(model).__name__} called under torch.autocast({device_type!r}, dtype=torch.{dtype}): a captured "
                f"graph cannot follow autocast. Cast the model instead (pipe.to(torch.{dtype}), or torch_dtype="
                f"torch.{dtype} in from_pretrained) and call it outside autocast.")


def timestep_value(kwargs: Dict[str, Any]) -> Optional[float]:
    """The first element of the call's timestep input (``TIMESTEP_NAMES``), or None."""
    for name in TIMESTEP_NAMES:
        t = kwargs.get(name)
        if isinstance(t, torch.Tensor) and t.numel():
            return float(t.reshape(-1)[0])
        if isinstance(t, (int, float)):
            return float(t)
    return None


def signature_key(leaves: Sequence[Any], spec: Any) -> Any:
    """The input signature a call is keyed by (its capture, variants and cache buffers): the pytree
    spec plus, per leaf, shape/dtype/device for tensors and the value for everything else.

    Public so that code sharing a :class:`CaptureCache` (the search's recorder) finds the capture
    the runtime will look up.
    """
    return (spec, tuple(_leaf_key(x) for x in leaves))


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, torch.Tensor):
        return ("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad and torch.is_grad_enabled())
    try:
        hash(leaf)
        return ("V", type(leaf), leaf)
    except TypeError:
        return ("R", type(leaf), repr(leaf))


def _model_keys(module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of :class:`OptimizedModule`: its keys are the wrapped model's (``model.`` left out)."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions, keyed by module path without the trailing dot
        for key in [k for k in metadata if k.startswith(inner) or k == inner[:-1]]:
            metadata[(prefix + key[len(inner):]) if key != inner[:-1] else prefix[:-1]] = metadata.pop(key)


def _wrapped_keys(module: torch.nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook of :class:`OptimizedModule`: the wrapped model's keys go to ``model.``."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None and prefix[:-1] in metadata:
        metadata[prefix + "model"] = metadata[prefix[:-1]]


class OptimizedModule(CacheContexts, torch.nn.Module):
    """A drop-in for the wrapped model that reuses cached block outputs across steps.

    Attributes not defined here (``config``, ``dtype``, ``device``, ...) are read
    from the wrapped model. See :func:`optimize`.
    """

    def __init__(self, model: torch.nn.Module, configs: Union[CacheConfig, Sequence[CacheConfig]], backend: Backend = None,
                 backend_options: Optional[Dict[str, Any]] = None, timestep_arg: Optional[str] = "auto",
                 captures: Optional["CaptureCache"] = None):
        super().__init__()
        refuse_wrapped_model(model)
        self.model = model
        # names are the wrapped model's (see named_modules): state_dict / load_state_dict use its keys
        self.register_state_dict_post_hook(_model_keys)
        self.register_load_state_dict_pre_hook(_wrapped_keys)
        if captures is not None and captures.model is not model:
            raise ValueError("captures= belongs to another model")
        self._captures = captures if captures is not None else CaptureCache(model)
        configs = config_list(configs, "optimize()")
        if not configs:
            raise ConfigError("optimize(): cache_config is empty; pass a CacheConfig or a non-empty list of them")
        resolved, adasteps = [], []
        for cfg in configs:
            cfg = resolve_config(model, cfg)
            if cfg.method == "adastep":
                adasteps.append(cfg)
                continue
            if cfg.method == "attention_cache" and cfg.block_end > cfg.block_start:
                choose_attention(model, f"{cfg.blocks}.{cfg.block_start}", cfg.attention)  # fail now
            resolved.append(cfg)
        if len(adasteps) > 1:
            raise ConfigError(f"at most one CacheConfig(method='adastep') per model, got {len(adasteps)}")
        check_overlaps(resolved)
        self.configs: Tuple[CacheConfig, ...] = tuple(resolved)
        self.adastep: Optional[CacheConfig] = adasteps[0] if adasteps else None
        if resolved:
            self.plan: Plan = make_plan(resolved)
            if self.adastep is not None and self.adastep.steps_count != self.plan.steps_count:
                raise ConfigError(f"CacheConfig.steps_count must be the same for all configs, got "
                                  f"{sorted({self.adastep.steps_count, self.plan.steps_count})}")
        else:
            self.plan = Plan((), ((),) * self.adastep.steps_count)
        # an attribute: forward must not call into traceable frames
        self._bypass = self.plan.bypass and (self.adastep is None or self.adastep.bypass)
        self.backend = backend
        check_backend_options(backend, backend_options if backend_options is not None else {})
        self._backend_options = dict(backend_options or {})
        resolve_backend(backend, self._backend_options)  # fail now, not at the first step
        self._static_buffers = static_cache_buffers(backend, self._backend_options)
        self._graph_mode = graph_mode(backend, self._backend_options)
        self._shape_mode = shape_mode(backend, self._backend_options)
        # compiled segments by structural key, shared by every variant and input signature (regional mode)
        self._segments = SegmentCache(functools.partial(compile_segment, backend=backend,
                                                        options=self._backend_options))
        self._signature = inspect.signature(model.forward)
        self._timestep_arg = self._find_timestep_arg(timestep_arg)
        self._latent_arg = next((n for n in LATENT_NAMES if n in self._signature.parameters), None)
        forecasting = [c.label for c in self.configs if c.history > 1]
        if forecasting and self._timestep_arg is None:
            raise ConfigError(f"forecast in {forecasting} extrapolates in timestep: {type(model).__name__}.forward "
                              f"needs a timestep input (timestep_arg=...)")
        if self.adastep is not None and self._latent_arg is None:
            raise ConfigError(f"CacheConfig(method='adastep') needs the latent input of "
                              f"{type(model).__name__}.forward, one of {LATENT_NAMES}")
        self._entries: Dict[Any, _Entry] = {}
        self._labels: Dict[Any, str] = {}  # input signature -> its shape label (stats.timings)
        self._static_keys: set = set()  # signatures a dynamic capture cannot serve (captured with static sizes)
        self._guards_checked: Dict[Any, int] = {}  # signature -> guards of its dynamic capture checked so far
        self._dynamic_failed = False  # a dynamic capture could not be used: static captures from now on
        self._eager: Optional[EagerPath] = None
        self._contexts: Dict[str, _Context] = {}
        self._plans: Dict[int, Plan] = {self.plan.steps_count: self.plan}
        self._steps: Optional[int] = None  # set_steps(): the step count of the coming generations
        self._watch = ModelWatch(model)
        self._dtypes = _dtypes(model)
        self._lock = threading.RLock()  # one call (and so one capture) at a time
        self.stats = Stats()
        self.stats.plan_steps = self.plan.steps_count
        self.stats.graph_mode = self._graph_mode
        self.stats.shape_capture = SHAPE_CAPTURE if self._shape_mode == "static" else SHAPE_DYNAMIC
        if self._shape_mode == "static" and "shapes" not in self._backend_options:
            why = ("nothing is compiled, so a static capture is faster" if self._graph_mode is None
                   else "graph replay records one graph per shape")
            self.stats.shape_capture += f" (backend={backend!r}: {why}; backend_options['shapes'] defaults to 'static')"
        self._by_capture: Dict[int, Tuple[Capture, _Entry]] = {}  # id(capture) -> (capture, its entry)
        if reported_class(self) is not OptimizedModule:  # diffusers reads the library from the instance's __module__
            self.__dict__["__module__"] = type(model).__module__
        # (context, step, decision taken or "skip") per call; every rank must log the same sequence
        self.trace: Deque[Tuple[str, int, Union[Decision, str]]] = collections.deque(maxlen=4096)
        self._warned_same_timestep = False
        self._warned_overrun = False
        self._warned_compiled_blocks = False

    # ------------------------------------------------------------------ passthrough
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self._modules.get("model")
            if model is None or name in OWN_ATTRIBUTES:
                raise
            return getattr(model, name)

    def _apply(self, fn, *args, **kwargs):
        # The captured graphs read the model's own parameters, so a device move reaches them, and a
        # call on another device is another input signature: captures stay (accelerate's model offload
        # calls .to() before every call). Cache buffers of the old device are freed. A dtype change
        # alters the traced casts: everything is captured again.
        out = super()._apply(fn, *args, **kwargs)
        dtypes = _dtypes(self.model)
        if dtypes != self._dtypes:
            self._dtypes = dtypes
            self.invalidate()
            return out
        for entry in self._entries.values():  # regional programs hold the buffers .to() replaced
            for variant in entry.variants.values():
                if isinstance(variant.fn, RegionalProgram):
                    variant.fn.refresh_constants()
        if self._contexts:
            devices = _devices(self.model)
            if any(t.device not in devices for ctx in self._contexts.values() for bufs in ctx.buffers.values()
                   for t in bufs.values()):
                self.release()
        return out

    def reusable_captures(self) -> Optional["CaptureCache"]:
        """This module's captures, for another module of the same model (``optimize(model, other_plan,
        captures=...)``: :func:`~npu_cache_fx.enable_cache` re-planning a pipeline), or None when the model
        changed since this module last checked it (a LoRA loaded, a hook added...): its captures may be stale."""
        with self._lock:
            return self._captures if self._watch.unchanged() else None

    def invalidate(self) -> None:
        """Drop every capture, variant and cache: the wrapped model's forward changed (hooks added or
        removed, e.g. diffusers' ``enable_parallelism``). The next call captures again."""
        with self._lock:
            self._entries.clear()
            self._by_capture.clear()
            self._static_keys.clear()
            self._guards_checked.clear()
            self._dynamic_failed = False
            self._captures.clear()
            self._contexts.clear()
            self._segments.compiled.clear()
            self._eager = None
            self.stats.path, self.stats.fallback_reason = "export", None  # decided again at the next call
            self._watch.refresh()
            self._update_bytes()

    @property
    def all_configs(self) -> List[CacheConfig]:
        """The plan as given to ``optimize``, resolved: the cache configs, then AdaStep's if any."""
        return list(self.configs) + ([self.adastep] if self.adastep is not None else [])

    def __deepcopy__(self, memo: Dict[int, Any]) -> "OptimizedModule":
        """A deep copy of the wrapped model under the same plan and options; its captures, compiled
        variants and caches start empty (they belong to the original's parameters)."""
        copied = OptimizedModule(copy.deepcopy(self.model, memo), self.all_configs, self.backend,
                                 self._backend_options, self._timestep_arg)
        copied._steps = self._steps
        memo[id(self)] = copied
        return copied

    def enable_parallelism(self, *args, **kwargs):
        """diffusers' ``enable_parallelism`` on the wrapped model, then :meth:`invalidate`.

        A graph captured before it never calls the context-parallel hooks: it would hold no
        collectives and run the whole sequence, with full-size caches, on every rank.
        """
        out = self.model.enable_parallelism(*args, **kwargs)
        self.invalidate()
        return out

    def __repr__(self) -> str:
        return (f"OptimizedModule({type(self.model).__name__}, path={self.stats.path}, "
                f"backend={self.backend or 'eager'}, configs={[c.label for c in self.configs]}, "
                f"variants={len(self.plan.variants())})")

    # ------------------------------------------------------------------ public state
    def reset(self, context: Optional[str] = None) -> None:
        """Start a new generation in ``context`` (default: every context)."""
        targets = list(self._contexts.values()) if context is None else \
            [self._contexts[context]] if context in self._contexts else []
        for ctx in targets:
            ctx.new_generation()

    # contexts kept between generations: a server that names a context per request (what the thread check's
    # error suggests) would otherwise keep every request's cache buffers
    max_idle_contexts = 4
    max_contexts = 64  # in all: beyond it the least recently used go even mid-generation (a cancelled request)

    def _forget_idle_contexts(self) -> None:
        """Before a new context: drop the least recently used contexts between generations beyond
        ``max_idle_contexts``, and any beyond ``max_contexts`` in all. A dropped context that is called again
        starts afresh: its next step computes, and its reads compute until it has written (never a stale cache)."""
        idle = [name for name, c in self._contexts.items() if c.step in (0, c.plan.steps_count)]
        drop = idle[:max(0, len(idle) - self.max_idle_contexts + 1)]
        rest = [name for name in self._contexts if name not in drop]
        drop += rest[:max(0, len(rest) - self.max_contexts + 1)]
        for name in drop:
            del self._contexts[name]
            for agents in self._eager.agents if self._eager is not None else ():  # the eager path's caches
                for agent in agents:
                    agent.reset(name)
        if drop:
            self._update_bytes()

    def release(self) -> None:
        """Free every cache buffer (they are re-allocated on the next write)."""
        with self._lock:
            self._contexts.clear()
            self._update_bytes()

    def _on_context(self, name: str, info: dict) -> None:
        _check_steps("cache_context(num_inference_steps=...)", info.get("num_inference_steps"))

    # ------------------------------------------------------------------ step count per generation
    def set_steps(self, steps: Optional[int]) -> None:
        """Run the coming generations with ``steps`` denoising steps (``None``: find out per generation).

        The plan is stated for ``CacheConfig.steps_count`` steps and scaled to each generation's step
        count (:meth:`CacheConfig.scaled`). Per generation the count is, in this order: the value set
        here (serving engines that pick ``num_inference_steps`` per request), the
        ``num_inference_steps`` a pipeline passes to ``cache_context`` (Wan), the calling diffusers
        pipeline's own count (``pipe._num_timesteps``, set by every diffusers pipeline before its
        denoising loop), else ``steps_count``. Plans whose decisions are the same variants reuse the
        compiled variants: nothing recompiles.
        """
        self._steps = _check_steps("set_steps(steps)", steps)

    def plan_for(self, steps: int) -> Plan:
        """The plan of a generation of ``steps`` steps (the configs scaled; cached per count)."""
        plan = self._plans.get(steps)
        if plan is None:
            configs = [c.scaled(steps) for c in self.configs]
            plan = self._plans[steps] = make_plan(configs) if configs else Plan((), ((),) * steps)
        return plan

    def _pipeline_step_index(self) -> Optional[int]:
        """The step index the pipeline passed to ``cache_context(..., step_index=i)`` (Wan), if any.

        It ties this module's step to the pipeline's: a denoiser that runs only part of a generation
        (Wan 2.2's two experts, ``transformer`` for the high-noise steps and ``transformer_2`` after the
        boundary) follows the plan for the steps it runs, and a read it joins on without a cache computes
        (see :meth:`_safe_decision`)."""
        index = self._active_info.get("step_index")
        return index if isinstance(index, int) and not isinstance(index, bool) and index >= 0 else None

    def _generation_steps(self) -> int:
        if self._steps is not None:
            return self._steps
        steps = self._active_info.get("num_inference_steps")
        if steps is None:
            steps = pipeline_steps()
        return steps if steps is not None else self.plan.steps_count

    def _start_generation(self, ctx: "_Context", entry: "_Entry") -> None:
        steps = self._generation_steps()
        if steps != ctx.plan.steps_count:
            ctx.plan = self.plan_for(steps)
            if ctx.ada is not None:
                ctx.ada.set_steps(steps)
            log.debug("%s: a generation of %d steps: the plan is scaled from %d steps", type(self.model).__name__,
                      steps, self.plan.steps_count)
        if entry.eager is not None:
            entry.eager.use_configs(ctx.plan.configs)
        self.stats.generations += 1
        self.stats.plan_steps = steps

    # ------------------------------------------------------------------ names
    def named_modules(self, memo: Optional[set] = None, prefix: str = "", remove_duplicate: bool = True):
        """The wrapped model's modules under the model's own names (``transformer_blocks.0``, not
        ``model.transformer_blocks.0``), and so ``named_parameters`` / ``named_buffers`` / ``state_dict``
        keys too: what code written for the model reads, e.g. peft's ``get_peft_model_state_dict`` (names of
        tuner layers matched against state-dict keys), hence ``save_lora_weights`` of an optimized transformer,
        and ``load_state_dict`` of the model's own checkpoint. ``get_submodule`` of those names works through
        the attribute passthrough. ``modules()`` starts at the wrapped model, not at this wrapper."""
        return self.model.named_modules(memo, prefix, remove_duplicate)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str, **kwargs) -> Any:
        """Save the wrapped model exactly as it saves itself, and the plan next to it (``PLAN_FILE``).

        ``pipe.save_pretrained(dir)`` calls this for an optimized transformer: the folder loads back
        as the plain model, and ``optimize(pipe.transformer, load_plan(f"{dir}/transformer"))``
        re-applies the plan.
        """
        save = getattr(self.model, "save_pretrained", None)
        if save is None:
            raise TypeError(f"{type(self.model).__name__} has no save_pretrained: save optimized.model's "
                            "state_dict yourself and the plan with npu_cache_fx.save_plan")
        out = save(save_directory, **kwargs)
        save_plan(self.all_configs, save_directory)
        return out

    @property
    def __class__(self):  # noqa: D105  (see integration.reported_class)
        return reported_class(self)

    @property
    def variant_graphs(self) -> Dict[Decision, fx.GraphModule]:
        """The rewritten, lowered graph of every variant built so far (latest capture)."""
        if not self._entries:
            return {}
        entry = list(self._entries.values())[-1]
        return {d: v.graph for d, v in entry.variants.items()}

    def build_variant(self, decision: Decision, *args, **kwargs) -> fx.GraphModule:
        """Capture for these inputs (if needed) and return the lowered graph of ``decision``."""
        kwargs = self._normalize(args, kwargs)
        leaves, spec = pytree.tree_flatten(((), kwargs))
        return self._variant(self._entry(kwargs, leaves, spec), decision).graph

    # ------------------------------------------------------------------ dispatch
    # Dynamo skips this frame only (its code is marked SKIP after the class, what
    # ``torch._dynamo.disable(recursive=False)`` does without its wrapper): under
    # ``torch.compile(optimized)`` the host logic in _prepare/_finish stays eager and
    # uncompiled, while the call of the variant graph (a frame of its own) is what dynamo
    # compiles -- one graph per variant, and no step counter in any graph. The wrapper is
    # avoided because it refuses every call while torch.export runs anywhere in the process
    # (a global flag): a second thread calling while the first one captures would fail.
    def forward(self, *args, **kwargs):
        if self._bypass:
            return self.model(*args, **kwargs)
        hook = self.model.__dict__.get("_hf_hook")  # accelerate's hook on the model itself (cpu offload)
        with self._lock, TRACING.shared():  # never while another thread captures or compiles (TraceLock)
            if hook is not None:
                args, kwargs = hook.pre_forward(self.model, *args, **kwargs)
            call = self._prepare(args, kwargs)
            if call.skip:  # AdaStep: no model call at all
                out = self._finish(call, None)
            else:
                # the first call of a compiled variant compiles it (per input signature: a static one compiles
                # again, a dynamic capture's variant runs its compiled code)
                timed = call.variant.timed
                first = timed is not None and call.key not in timed
                start = time.perf_counter() if first else 0.0
                per_shape = self._per_shape_compiles(call.variant) if first else 0
                # a compile traces (AOTAutograd): alone in the process
                with TRACING.exclusive() if first else contextlib.nullcontext():
                    flat_out = call.fn(*call.inputs)
                if first:
                    self._record_compile(call.key, call.variant, time.perf_counter() - start,
                                         self._per_shape_compiles(call.variant) - per_shape)
                    dynamic = call.entry.dynamic
                    if dynamic is not None and not self._still_binds(call.key, call.entry,
                                                                     call.inputs[:len(dynamic.sizes)]):
                        # this compile added a guard these sizes fail: its code may not hold for them, the
                        # uncompiled variant does (it rewrites the same cache slots); the next call captures
                        # these sizes with static shapes
                        flat_out = call.variant.graph(*call.inputs)
                out = self._finish(call, flat_out)
            return hook.post_forward(self.model, out) if hook is not None else out

    @torch._dynamo.disable
    def _prepare(self, args, kwargs) -> "_Call":
        kwargs = self._normalize(args, kwargs)
        changed = self._watch.changed()
        if changed:
            self._model_changed(changed)
        leaves, spec = pytree.tree_flatten(((), kwargs))
        key = signature_key(leaves, spec)
        entry = self._entry(kwargs, leaves, spec, key)  # bad inputs raise here, before any state changes
        if entry.eager is None:  # the Dynamo / eager paths call the blocks as the model does: autocast applies
            refuse_autocast(self.model, leaves)
        active = self._active  # (a thread-local read)
        ctx = self._contexts.get(active)
        if ctx is None:
            self._forget_idle_contexts()
            ctx = self._contexts[active] = _Context(self.plan, self.adastep)
        elif next(reversed(self._contexts)) != active:  # least recently used first
            self._contexts[active] = self._contexts.pop(active)
        t, d = self._host_scalars(ctx, kwargs)
        aux = self._auxiliary(ctx, t, key)
        if aux:  # the step just run, again, with other inputs
            step = ctx.last_step.index
            ctx.last_step.keys.add(key)
        else:
            if ctx.step == ctx.plan.steps_count:
                ctx.new_generation()
            self._maybe_new_generation(ctx, t)
            index = self._pipeline_step_index()
            if index is not None and index < ctx.step:  # the pipeline started over
                ctx.new_generation()
            if ctx.step == 0:
                self._start_generation(ctx, entry)
            if index is not None and ctx.step < index < ctx.plan.steps_count:
                ctx.step = index  # joined mid-generation: Wan 2.2's low-noise expert takes over at its boundary
            step = ctx.step
        self._check_thread(ctx, step)
        decision = self._decide(ctx, entry, key, step, aux, d, kwargs.get(self._latent_arg))
        if decision is None:  # AdaStep: no model call at all
            return _Call(ctx, None, None, set(), None, [], key, skip=True, timestep=t, step=step)
        if entry.eager is not None:
            run = functools.partial(self._run_eager, entry, spec, decision, active, step, t)
            return _Call(ctx, entry, _Variant(decision, None, run, []), set(), run, leaves, key, timestep=t,
                         step=step, auxiliary=aux)
        valid = ctx.valid.setdefault(key, set())
        variant = self._variant(entry, decision)
        buffers = ctx.buffers.setdefault(key, {})
        cache_inputs = []
        for slot, shape, dtype, device in variant.slots:
            buf = buffers.get(slot)
            if buf is None:  # per input signature: a dynamic capture's slot sizes at this call's sizes
                bindings = self._captures.bindings.get(key) if entry.dynamic is not None else None
                with torch.inference_mode(False):  # a normal tensor: updated in place with or without inference mode
                    buf = buffers[slot] = torch.zeros([concrete(s, bindings) for s in shape], dtype=dtype,
                                                      device=device)
                if self._static_buffers:
                    torch._dynamo.mark_static_address(buf, guard=False)  # see static_cache_buffers()
                self._update_bytes()
            cache_inputs.append(buf)
        self._set_forecast(ctx, key, entry, decision, buffers, t)
        return _Call(ctx, entry, variant, valid, variant.fn, [*leaves, *cache_inputs], key, timestep=t,
                     step=step, auxiliary=aux)

    def _decide(self, ctx: "_Context", entry: "_Entry", key, step: int, aux: bool, d: Optional[float],
                latent: Any) -> Optional[Decision]:
        """What happens this step, in one place: ``None`` (AdaStep skips the model), else one action per config.

        The plan's decision for the step, then, in order: AdaStep's skip (a refresh it skips moves to that
        cache's next read step), the refreshes moved so, and a read of a slot this input signature has not
        written in this generation turned into a compute. An auxiliary call (the step just run, other inputs)
        takes the step's decision as planned with a cache of its own; on the eager path, whose agents keep
        one cache per config, it computes everything.
        """
        decision = ctx.plan.decision(step)
        if aux:
            if entry.eager is not None:
                return tuple(Action.COMPUTE for _ in decision)
            return self._safe_decision(entry, decision, ctx.valid.setdefault(key, set()))
        if ctx.ada is not None and ctx.ada.skips(key, step, d, latent):
            ctx.pending_refresh.update(i for i, a in enumerate(decision) if a is Action.WRITE)
            return None
        decision = self._refresh_pending(ctx, decision)
        if entry.eager is not None:
            return decision
        return self._safe_decision(entry, decision, ctx.valid.setdefault(key, set()))

    def _check_thread(self, ctx: "_Context", step: int) -> None:
        """A context's generation runs on one thread; another thread continuing it would mix two
        generations' steps and caches."""
        me = threading.get_ident()
        if step != 0 and ctx.thread is not None and ctx.thread != me:
            raise RuntimeError(
                f"{type(self.model).__name__}: cache context {self._active!r} is in the middle of a generation "
                f"(step {step}) started on another thread; concurrent generations need a cache context each: "
                f"`with model.cache_context(f'request-{{i}}'):` around each thread's calls (or reset({self._active!r}) "
                "to abandon the other generation)")
        ctx.thread = me

    def _model_changed(self, sections: List[str]) -> None:
        log.info("%s changed since it was captured (%s): captures, variants and caches are dropped and the "
                 "model is captured again", type(self.model).__name__, ", ".join(sections))
        self.invalidate()
        self.stats.model_changes += 1

    @staticmethod
    def _auxiliary(ctx: "_Context", t: Optional[float], key) -> bool:
        """A further call of the step just run with other inputs: same timestep, an input signature that
        step has not used (SD3's skip-layer guidance calls the model again with ``skip_layers=[...]`` and
        batch 1). It reuses that step's decision and its own cache; it does not advance the step."""
        last = ctx.last_step
        return t is not None and last is not None and t == last.timestep and key not in last.keys

    @torch._dynamo.disable
    def _finish(self, call: "_Call", flat_out):
        ctx = call.ctx
        if call.skip:
            self.stats.steps += 1
            self.stats.steps_skipped += 1
            flat_out, out_spec = ctx.ada.output(call.key)
        else:
            decision = call.variant.decision
            written = {s for s, *_ in call.variant.slots}
            for target in call.entry.targets:
                if decision[target.index] is Action.WRITE:
                    call.valid.update(s for s in target.slots if s in written)
                    if target.config.history > 1:
                        times = ctx.refresh_times.setdefault((call.key, target.index), [])
                        times.insert(0, call.timestep)
                        del times[target.config.history:]
            self._count(call.entry, decision, call.auxiliary)
            out_spec = call.entry.out_spec
            if ctx.ada is not None and not call.auxiliary and ctx.ada.keep(call.key, flat_out, out_spec):
                self._update_bytes()
        self.trace.append((self._active, call.step, "skip" if call.skip else call.variant.decision))
        if call.auxiliary:
            return pytree.tree_unflatten(list(flat_out), out_spec)
        ctx.last_step = _StepRun(call.timestep, call.step, {call.key}) if call.timestep is not None else None
        ctx.step += 1
        if ctx.step == ctx.plan.steps_count:  # the generation is over; the next step call starts a new one
            ctx.wrapped_at = call.timestep  # (an auxiliary call of this last step still finds its cache)
        return pytree.tree_unflatten(list(flat_out), out_spec)

    def _set_forecast(self, ctx: "_Context", key, entry: "_Entry", decision: Decision, buffers, t) -> None:
        """Fill each forecasting read's coefficient buffer (in place: a static address) for timestep ``t``."""
        for target in entry.targets:
            k = target.config.history
            if k > 1 and decision[target.index] is Action.READ:
                coefs = forecast_coefficients(t, ctx.refresh_times[(key, target.index)], k)
                buffers[coef_slot(target.prefix)].copy_(torch.tensor(coefs, dtype=torch.float32))

    def _refresh_pending(self, ctx: "_Context", decision: Decision) -> Decision:
        """A refresh that AdaStep skipped happens at the target's next read step instead."""
        if not ctx.pending_refresh:
            return decision
        fixed = list(decision)
        for i in list(ctx.pending_refresh):
            if fixed[i] is Action.READ:
                fixed[i] = Action.WRITE
                ctx.pending_refresh.discard(i)
            elif fixed[i] is Action.WRITE:
                ctx.pending_refresh.discard(i)
        return tuple(fixed)

    def _host_scalars(self, ctx: "_Context", kwargs) -> Tuple[Optional[float], Optional[float]]:
        """The timestep value and AdaStep's ``d_t``, read to the host with a single sync."""
        t = kwargs.get(self._timestep_arg) if self._timestep_arg else None
        scalars = []
        has_t = isinstance(t, torch.Tensor) and t.numel() > 0
        if has_t:
            scalars.append(t.reshape(-1)[0].double())
        d = ctx.ada.distance(kwargs.get(self._latent_arg)) if ctx.ada is not None else None
        has_d = d is not None
        if has_d:
            scalars.append(d)
        values = torch.stack([x.to(scalars[0].device) for x in scalars]).tolist() if scalars else []
        t_value = values[0] if has_t else (float(t) if isinstance(t, (int, float)) else None)
        d_value = values[-1] if has_d else None
        return t_value, d_value

    # ------------------------------------------------------------------ helpers
    def _find_timestep_arg(self, requested: Optional[str]) -> Optional[str]:
        params = self._signature.parameters
        if requested != "auto":
            if requested is not None and requested not in params:
                raise ConfigError(f"timestep_arg={requested!r} is not a parameter of "
                                  f"{type(self.model).__name__}.forward {list(params)}")
            return requested
        return next((n for n in TIMESTEP_NAMES if n in params), None)

    def _normalize(self, args, kwargs) -> Dict[str, Any]:
        return normalize_inputs(self._signature, args, kwargs, type(self.model).__name__)

    def _maybe_new_generation(self, ctx: _Context, value: Optional[float]) -> None:
        if value is None:
            return
        if ctx.wrapped_at is not None:
            if value < ctx.wrapped_at and not self._warned_overrun:
                self._warned_overrun = True
                log.warning("%s: the generation goes on past the %d steps planned (the timestep kept falling); "
                            "the plan restarts from step 0 mid-generation. Tell the module the step count: "
                            "set_steps(num_inference_steps), or cache_context(name, num_inference_steps=n).",
                            type(self.model).__name__, ctx.plan.steps_count)
            ctx.wrapped_at = None
        if ctx.last_timestep is not None:
            if value > ctx.last_timestep and ctx.step:
                log.debug("timestep rose %s -> %s: new generation", ctx.last_timestep, value)
                ctx.new_generation()
            elif value == ctx.last_timestep and ctx.step and not self._warned_same_timestep:
                self._warned_same_timestep = True
                log.warning("%s called twice at timestep %s in cache context %r: each call counts as a "
                            "step. For sequential CFG wrap each branch in cache_context('cond'/'uncond').",
                            type(self.model).__name__, value, self._active)
        ctx.last_timestep = value

    def _entry(self, kwargs, leaves, spec, key=None) -> _Entry:
        key = key if key is not None else signature_key(leaves, spec)
        entry = self._entries.get(key)
        if entry is not None and entry.dynamic is not None and not self._still_binds(key, entry, leaves):
            entry = None  # a guard added since (a compile) excludes these sizes: captured for them alone
        if entry is None:
            dynamic = self._shape_mode == "dynamic" and key not in self._static_keys and not self._dynamic_failed
            cap = self._captures.find(key, leaves, spec, dynamic)
            fresh = cap is None
            if cap is None and self._eager is None:
                cap = self._capture(kwargs, key, dynamic)
            if cap is None:
                entry = self._entries[key] = _Entry(None, [], eager=self._eager)
                return entry
            if cap.in_spec != spec:
                raise RuntimeError(f"captured input structure {cap.in_spec} differs from the call's {spec}")
            label = _shape_label(kwargs)
            known = self._by_capture.get(id(cap))
            if known is not None and known[0] is cap:  # a dynamic capture of another shape serves this one
                entry = known[1]
                self.stats.shapes_reused += 1
                self._timing(label).update(capture_seconds=0.0, dynamic_capture_of=entry.label)
                log.info("new input signature for %s (%s): served by the dynamic capture of %s",
                         type(self.model).__name__, label, entry.label)
            else:
                try:
                    targets = [bind_target(i, c, cap, self.model, leaves) for i, c in enumerate(self.configs)]
                except Exception as err:
                    if cap.meta.get("dynamic") is None:
                        raise
                    # the analysis of the symbolic graph failed: this shape is captured with static sizes
                    cap = self._recapture_static(kwargs, key, f"locating the cache targets in the dynamic capture "
                                                               f"failed: {type(err).__name__}: {err}")
                    fresh = True
                    targets = [bind_target(i, c, cap, self.model, leaves) for i, c in enumerate(self.configs)]
                entry = _Entry(cap, targets, label=label)
                self._by_capture[id(cap)] = (cap, entry)
                self._timing(label)["capture_seconds"] = cap.seconds if fresh else 0.0  # 0: shared via captures=
                if len(self._by_capture) > 1:
                    log.info("new input signature for %s: captured again (%d captures)",
                             type(self.model).__name__, len(self._by_capture))
            self._entries[key] = entry
            self._labels[key] = label
            if entry.dynamic is not None:
                self._guards_checked[key] = len(entry.dynamic.shape_env.guards)
        return entry

    def _still_binds(self, key, entry: _Entry, leaves) -> bool:
        """Whether the sizes of ``key`` still satisfy every guard of the dynamic capture serving it (a compile
        may have added guards since they were bound); if not, ``key`` is captured again with static sizes."""
        guards = len(entry.dynamic.shape_env.guards)
        if self._guards_checked.get(key) == guards:
            return True
        self._guards_checked[key] = guards
        if bind(entry.dynamic, leaves) is not None:
            return True
        log.warning("%s: a guard added while compiling the dynamic capture excludes the input sizes %s; they are "
                    "captured again with static sizes", type(self.model).__name__, self._labels.get(key))
        self._entries.pop(key, None)
        self._captures.forget(key)
        self._static_keys.add(key)
        for ctx in self._contexts.values():
            ctx.buffers.pop(key, None)
            ctx.valid.pop(key, None)
        return False

    def _recapture_static(self, kwargs: Dict[str, Any], key: Any, reason: str) -> Capture:
        log.warning("%s: %s; this input shape is captured with static sizes", type(self.model).__name__, reason)
        self._static_keys.add(key)
        self._captures.forget(key)
        cap = self._capture(kwargs, key, dynamic=False)
        if cap is None:
            raise RuntimeError(f"{type(self.model).__name__}: the static capture failed after the dynamic one")
        self.stats.shape_capture = f"{SHAPE_CAPTURE}: {reason}"
        self._dynamic_failed = True  # the next shapes are captured static straight away
        return cap

    def _capture(self, kwargs: Dict[str, Any], key: Any, dynamic: bool = False) -> Optional[Capture]:
        """Capture this signature, or switch to a fallback path (and return None) when a graph cannot run
        the model: weights offloaded by hooks inside it, or a model export cannot capture."""
        refuse_stateful_hooks(self.model)
        offloaded = offload_hooks(self.model)
        if offloaded:  # a graph would run without the hooks that bring the weights in
            more = " ..." if len(offloaded) > 3 else ""
            self._fall_back(f"has its weights offloaded by hooks on {offloaded[:3]}{more}", backend=None,
                            offloaded=True)
            return None
        refuse_autocast(self.model, pytree.tree_leaves(kwargs))  # before export records one autocast state
        failure = None
        try:
            cap = self._captures.capture(kwargs, [c.blocks for c in self.configs], key, dynamic=dynamic)
        except ConfigError:
            raise
        except Exception as err:  # export cannot capture this model: same semantics, eagerly
            failure = err
        if failure is not None:
            reject_bad_inputs(self.model, kwargs)
            self._fall_back(export_failure(failure), backend=self.backend)
            return None
        self._watch.refresh()  # export registers and removes hooks of its own
        self.stats.captures += 1
        self._warn_compiled_blocks()
        self.stats.capture_seconds += cap.seconds
        if dynamic and cap.meta.get("dynamic") is None:  # why this shape was captured with static sizes
            self.stats.shape_capture = f"{SHAPE_CAPTURE}: {cap.meta.get('shape_capture', 'dynamic capture failed')}"
        return cap

    def _warn_compiled_blocks(self) -> None:
        """Once: submodules compiled with ``Module.compile()`` (diffusers' ``compile_repeated_blocks``) while
        nothing compiles the captured graph, which runs their code, not their compiled code."""
        if self.backend is not None or self._warned_compiled_blocks:
            return
        compiled = [name for name, mod in self.model.named_modules()
                    if mod.__dict__.get("_compiled_call_impl") is not None]
        if compiled:
            self._warned_compiled_blocks = True
            log.warning("%s: %d submodules were compiled with Module.compile() (%s; e.g. diffusers' "
                        "compile_repeated_blocks), but optimize(backend=None) runs the captured graph uncompiled: "
                        "their compiled code is not used. Pass backend='inductor' to optimize(): it compiles each "
                        "distinct block once and shares it across the cache variants.", type(self.model).__name__,
                        len(compiled), _first_names(compiled))

    def _fall_back(self, reason: str, backend: Backend, offloaded: bool = False) -> None:
        """Run the model on the Dynamo or eager path from now on, with one warning saying why."""
        self._eager = EagerPath(self.model, self.configs, reason, backend, self._backend_options)
        if self._eager.path == "dynamo":
            how = (f"the Dynamo path: each block compiled by torch.compile(backend={self.backend!r}), the cache "
                   "semantics applied around the blocks on the host, the model's top level eager")
        else:
            how = ("the eager path: the same cache semantics applied around the blocks' forward, without graph "
                   "rewriting or compilation")
        why = reason if offloaded else f"cannot be captured by torch.export ({reason})"
        log.warning("%s %s; npu_cache_fx runs %s", type(self.model).__name__, why, how)
        self.stats.path = self._eager.path
        self.stats.fallback_reason = reason

    @torch._dynamo.disable
    def _run_eager(self, entry: "_Entry", spec, decision: Decision, context: str, step: int,
                   timestep: Optional[float], *leaves):
        _, kwargs = pytree.tree_unflatten(list(leaves), spec)
        out = entry.eager.run(kwargs, decision, context, step, timestep)
        if entry.eager.path != self.stats.path:  # the Dynamo path failed on a block: eager from now on
            self.stats.path = entry.eager.path
            self.stats.fallback_reason = f"{entry.eager.reason}; torch.compile: {entry.eager.dynamo_failure}"
        flat, entry.out_spec = pytree.tree_flatten(out)
        return flat

    def _variant(self, entry: _Entry, decision: Decision) -> _Variant:
        variant = entry.variants.get(decision)
        if variant is None:
            gm = entry.build(decision)
            symbolic = entry.dynamic is not None
            if self._graph_mode == "regional":
                fn = RegionalProgram(gm, entry.capture.spans, self._segments, symbolic=symbolic)
            else:
                fn = compile_graph(gm, self.backend, self._backend_options, symbolic=symbolic)
            variant = entry.variants[decision] = _Variant(decision, gm, fn, gm.meta["cache_slots"],
                                                          timed=None if self._graph_mode is None else set())
            self.stats.variants_built += 1
        return variant

    @torch._dynamo.disable
    def _per_shape_compiles(self, variant: _Variant) -> int:
        """Compiles so far of the per-shape fallbacks (backends.PerShape) this variant runs."""
        fn = variant.fn
        fns = [s.fn for s in fn.segments] if isinstance(fn, RegionalProgram) else [getattr(fn, "fn", fn)]
        return sum(f.compiles for f in fns if isinstance(f, PerShape))

    def _record_compile(self, key: Any, variant: _Variant, seconds: float, per_shape: int = 0) -> None:
        """Stats of a compiled variant's first call for an input signature: seconds (compile + one run) and
        graphs compiled / shared (a dynamic capture's variant compiles at its first signature only, but for
        graphs compiled per shape: ``per_shape``, the compiles of its PerShape fallbacks in this call)."""
        program = variant.fn if isinstance(variant.fn, RegionalProgram) else None
        if program is not None:
            compiled, shared = program.compiled_new, program.shared
            done = variant.recorded
            variant.recorded = (compiled, shared)
            compiled, shared = compiled - done[0], shared - done[1]
        else:
            compiled, shared = (0, 0) if variant.timed else (1, 0)
        if variant.timed:  # a later signature: the per-shape compiles are the graphs it compiled
            compiled = per_shape
        variant.timed.add(key)
        self.stats.compile_seconds += seconds
        self.stats.graphs_compiled += compiled
        self.stats.graphs_shared += shared
        self._timing(self._labels[key])["variants"][variant.label] = {
            "compile_seconds": seconds, "graphs_compiled": compiled, "graphs_shared": shared}

    def _timing(self, label: str) -> Dict[str, Any]:
        """``stats.timings`` of one input signature."""
        return self.stats.timings.setdefault(label, {"capture_seconds": 0.0, "variants": {}})

    def _safe_decision(self, entry: _Entry, decision: Decision, valid: set) -> Decision:
        """Never read a slot not written in this generation for this input signature."""
        fixed = list(decision)
        for target in entry.targets:
            if not target.values:  # nothing to cache for this signature (bypass, or its blocks not called)
                fixed[target.index] = Action.COMPUTE
            elif decision[target.index] is Action.READ and not all(s in valid for s in target.slots):
                fixed[target.index] = Action.COMPUTE
                self.stats.stale_reads_avoided += 1
        return tuple(fixed)

    def _count(self, entry: _Entry, decision: Decision, auxiliary: bool = False) -> None:
        if auxiliary:
            self.stats.auxiliary_calls += 1
            return
        self.stats.steps += 1
        reads = [i for i, a in enumerate(decision) if a is Action.READ]
        if reads:
            self.stats.steps_reused += 1
            for i in reads:
                cfg = self.configs[i]
                if cfg.method == "dit_block_cache":
                    self.stats.blocks_skipped += cfg.block_end - cfg.block_start
                elif entry.eager is None:
                    self.stats.attention_calls_skipped += len(entry.targets[i].sites)
        else:
            self.stats.steps_computed += 1

    def _update_bytes(self) -> None:
        by_ctx = {name: ctx.nbytes() for name, ctx in self._contexts.items()}
        self.stats.cache_bytes_by_context = by_ctx
        self.stats.cache_bytes = sum(by_ctx.values())
        by_config: Dict[str, int] = {}
        for ctx in self._contexts.values():
            for key, bufs in ctx.buffers.items():
                owner = self._entries[key].slot_owner  # buffers exist only for signatures with an entry
                for slot, t in bufs.items():
                    label = self.configs[owner[slot]].label
                    by_config[label] = by_config.get(label, 0) + t.numel() * t.element_size()
        self.stats.cache_bytes_by_config = by_config


skip_code(OptimizedModule.forward.__code__)


class CaptureCache(dict):
    """Captures of one model keyed by input signature, shareable between optimized modules.

    The search builds one module per candidate plan over the same capture:
    ``optimize(model, cfg, captures=cache)`` never retraces a signature in ``cache``.
    :meth:`capture` is the one place a model is captured.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.dynamic: Dict[Any, List[Capture]] = {}  # rank-level signature -> dynamic captures
        self.bindings: Dict[Any, Dict[Any, int]] = {}  # signature served by a dynamic capture -> its symbols' sizes
        self.static: Dict[Any, Capture] = {}  # static captures of signatures a dynamic capture serves too
        self.failed: Dict[Any, Exception] = {}  # signature -> what export raised: not exported again

    def clear(self) -> None:
        super().clear()
        self.dynamic.clear()
        self.bindings.clear()
        self.static.clear()
        self.failed.clear()

    def forget(self, key: Any) -> None:
        """Stop serving ``key`` by a dynamic capture (its sizes no longer bind it)."""
        if key in self.bindings:
            self.bindings.pop(key)
            self.pop(key, None)

    def find(self, key: Any, leaves: Sequence[Any], spec: Any, dynamic: bool = False) -> Optional[Capture]:
        """The capture serving signature ``key``: its own, or (``dynamic``) a dynamic capture its sizes bind.
        Without ``dynamic`` only a static capture is returned."""
        cap = self.get(key)
        if not dynamic:
            return self.static.get(key) if cap is not None and cap.meta.get("dynamic") is not None else cap
        if cap is not None:
            return cap
        for cand in self.dynamic.get(_rank_key(leaves, spec), ()):
            bindings = bind(cand.meta["dynamic"], leaves)
            if bindings is not None:
                self[key], self.bindings[key] = cand, bindings
                return cand
        return None

    def capture(self, kwargs: Dict[str, Any], block_lists: Sequence[str] = (), key: Any = None,
                dynamic: bool = False) -> Capture:
        """The capture of ``model(**kwargs)`` (normalised inputs), taken now if this signature has none.

        ``block_lists``: lists whose block spans are needed besides those ``find_block_lists`` finds.
        ``dynamic``: reuse a dynamic capture these sizes bind, else export with every dimension ``Dim.AUTO``
        (:mod:`npu_cache_fx.shapes`); if that export fails, or keeps no dimension symbolic, the capture is
        static and ``cap.meta["shape_capture"]`` says why.
        Raises what ``torch.export`` raises when the model cannot be captured, and raises it again, without
        exporting, for this signature until :meth:`clear` (the model changed): every module sharing the cache
        (``optimize(model, plan, captures=cache)`` per plan) then goes to its fallback path without paying the
        export again.
        """
        leaves, spec = pytree.tree_flatten(((), kwargs))
        if key is None:
            key = signature_key(leaves, spec)
        cap = self.find(key, leaves, spec, dynamic)
        if cap is not None:
            return cap
        if key in self.failed:
            raise self.failed[key]
        lists = list(dict.fromkeys(list(block_lists) + [b.fqn for b in find_block_lists(self.model)]))
        why = None
        with torch.no_grad(), without_root_hook(self.model):
            if dynamic:
                try:
                    cap = capture(self.model, kwargs, lists, dynamic=True)
                except Exception as err:  # noqa: BLE001 - the static export below raises what is really wrong
                    why = f"the dynamic export failed ({type(err).__name__}: {str(err).strip().splitlines()[0]})"
                if cap is not None:
                    shapes = cap.meta["dynamic"]
                    bindings = bind(shapes, leaves) if shapes is not None else None
                    if bindings is not None:
                        self.dynamic.setdefault(_rank_key(leaves, spec), []).append(cap)
                        self.bindings[key] = bindings
                    else:
                        cap.meta["dynamic"] = None
                        why = ("export specialised every input dimension" if shapes is None else
                               "the dynamic capture does not bind its own input sizes")
            if cap is None:
                try:
                    cap = capture(self.model, kwargs, lists)
                except Exception as err:
                    self.failed[key] = err
                    raise
            if why is not None:
                cap.meta["shape_capture"] = why
        if not dynamic and self.get(key) is not None:  # a dynamic capture serves this signature for others
            self.static[key] = cap
        else:
            self[key] = cap
        return cap


def _rank_key(leaves: Sequence[Any], spec: Any) -> Any:
    """The signature less the tensors' sizes (their ranks stay): what a dynamic capture is looked up by."""
    return (spec, tuple(("T", x.dim(), x.dtype, x.device, x.requires_grad and torch.is_grad_enabled())
                        if isinstance(x, torch.Tensor) else _leaf_key(x) for x in leaves))


def _shape_label(kwargs: Dict[str, Any]) -> str:
    """An input signature in words: ``"hidden_states=4x64x4,encoder_hidden_states=4x4x64,..."``."""
    leaves = pytree.tree_flatten_with_path(kwargs)[0]
    return ",".join(f"{pytree.keystr(path).strip('[]').strip(chr(39))}={'x'.join(map(str, v.shape))}"
                    for path, v in leaves if isinstance(v, torch.Tensor))


def _check_steps(what: str, steps: Any) -> Optional[int]:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"{what}: the step count must be an int >= 1 (or None), got {steps!r}")
    return steps


def _dtypes(model: torch.nn.Module) -> Tuple[torch.dtype, ...]:
    return tuple(t.dtype for t in itertools.chain(model.parameters(), model.buffers()))


def _devices(model: torch.nn.Module) -> set:
    return {t.device for t in itertools.chain(model.parameters(), model.buffers())}


def optimize(model: torch.nn.Module, cache_config: Union[CacheConfig, Sequence[CacheConfig]], *,
             backend: Backend = None, backend_options: Optional[Dict[str, Any]] = None,
             timestep_arg: Optional[str] = "auto", captures: Optional[CaptureCache] = None) -> OptimizedModule:
    """Rewrite ``model`` so steps reuse cached block outputs per ``cache_config``.

    Args:
        model: a DiT (e.g. ``pipe.transformer``); it is not modified.
        cache_config: one :class:`CacheConfig` or a list (e.g. one per block list).
        backend: ``None``/``"eager"`` (run the rewritten graphs), ``"inductor"``,
            ``"aot_eager"``, ``"torchair"`` (Ascend; lazy ``torch_npu`` import) or
            any ``torch.compile`` backend callable. Each variant is compiled once.
        backend_options: e.g. ``{"mode": "reduce-overhead"}`` or
            ``{"compiler_config": torchair.CompilerConfig()}`` for torchair;
            ``"static_cache_buffers"``: see :func:`static_cache_buffers`;
            ``"graphs"``: ``"regional"`` | ``"full"`` (:func:`~npu_cache_fx.backends.graph_mode`);
            ``"shapes"``: ``"dynamic"`` (one capture and one compile for every input size the model allows;
            the default except for graph replay) | ``"static"`` (each shape captured and compiled again), see
            :func:`~npu_cache_fx.backends.shape_mode` and ``stats.shape_capture``.
        timestep_arg: forward parameter whose value rising starts a new generation
            (``"auto"``: ``timestep``/``timesteps``/``t``; ``None`` disables). Detecting it
            reads one scalar of the timestep per call: on an accelerator that is a
            host sync per step; ``None`` avoids it (then call ``reset()`` between
            generations that do not run all ``steps_count`` steps).
        captures: a :class:`CaptureCache` shared with other optimized modules of
            the same model (the search evaluates many plans on one capture).

    Example::

        >>> cfg = CacheConfig(steps_count=28, step_start=18, step_interval=2,
        ...                   block_start=1, block_end=23, blocks="single_transformer_blocks")
        >>> pipe.transformer = optimize(pipe.transformer, cfg)   # doctest: +SKIP
    """
    return OptimizedModule(model, cache_config, backend, backend_options, timestep_arg, captures)
