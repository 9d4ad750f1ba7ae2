"""Compile a lowered variant graph: torchair | inductor | aot_eager | eager | any dynamo backend.

``torch_npu`` is imported lazily, only when ``"torchair"`` is asked for: it
needs Ascend CANN to import at all.

Example::

    >>> fn = compile_graph(gm, "aot_eager")   # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.fx as fx

from .config import ConfigError

__all__ = ["BackendUnavailable", "BACKENDS", "block_backend", "check_backend_options", "compile_graph",
           "compile_segment", "ge_ready_blocks", "graph_mode", "GRAPH_MODES", "LazyCompile", "PerShape",
           "prepare_for_torchair",
           "resolve_backend", "shape_mode", "SHAPE_MODES", "TORCHAIR_MODES"]

log = logging.getLogger(__name__)

BACKENDS = ("torchair", "inductor", "aot_eager", "eager")
# torchair CompilerConfig.mode values: GE graph mode, and aclgraph capture.
TORCHAIR_MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")

Backend = Union[str, Callable[..., Any], None]
INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
SDPA_IMPLS = ("auto", "npu_fused_infer_attention_score", "matmul", "keep")
# How optimize(backend=...) compiles the variants: "regional" (each distinct block / glue graph once, shared
# by the variants: npu_cache_fx.regions) or "full" (one whole graph per variant). See graph_mode().
GRAPH_MODES = ("regional", "full")
# How a new input shape is served: "dynamic" (one capture with symbolic sizes, graphs compiled for all sizes) or
# "static" (each shape captured and compiled again). See shape_mode().
SHAPE_MODES = ("dynamic", "static")
# backend_options keys each backend reads (every backend reads "static_cache_buffers", see runtime)
_OPTION_KEYS = {"inductor": ("mode",), "torchair": ("mode", "compiler_config", "sdpa")}


def check_backend_options(backend: "Backend", options: Dict[str, Any]) -> None:
    """Refuse ``backend_options`` a backend would ignore or reject later, naming the key and the choices."""
    if not isinstance(options, dict):
        raise ConfigError(f"backend_options must be a dict, got {type(options).__name__}")
    name = backend if isinstance(backend, str) else None
    known = ("static_cache_buffers", "shapes") + (("graphs",) if backend not in (None, "eager") else ()) + \
        _OPTION_KEYS.get(name, ())
    for key in options:
        if key not in known:
            raise ConfigError(f"backend_options[{key!r}] is not read by backend={backend!r}; "
                              f"valid keys: {list(known)}")
    mode = options.get("mode")
    if "mode" in options:
        modes = INDUCTOR_MODES if name == "inductor" else TORCHAIR_MODES
        if mode not in modes:
            raise ConfigError(f"backend_options['mode']={mode!r} is not a {name} mode; choose one of {list(modes)}")
    if "graphs" in options and options["graphs"] not in GRAPH_MODES:
        raise ConfigError(f"backend_options['graphs']={options['graphs']!r}; choose one of {list(GRAPH_MODES)}")
    if "shapes" in options and options["shapes"] not in SHAPE_MODES:
        raise ConfigError(f"backend_options['shapes']={options['shapes']!r}; choose one of {list(SHAPE_MODES)}")
    if options.get("shapes") == "dynamic" and _graph_replay(backend, options):
        raise ConfigError(f"backend_options['shapes']='dynamic' with backend={backend!r}"
                          f"{', mode=' + repr(mode) if mode else ''}: graph replay (aclgraph / GE graphs, CUDA graphs) "
                          "records one graph per input shape; use shapes='static' (the default for this backend)")
    if "sdpa" in options and options["sdpa"] not in SDPA_IMPLS:
        raise ConfigError(f"backend_options['sdpa']={options['sdpa']!r}; choose one of {list(SDPA_IMPLS)}")


def graph_mode(backend: "Backend", options: Optional[Dict[str, Any]] = None) -> Optional[str]:
    """How ``optimize(..., backend=backend)`` compiles its variants: ``"regional"``, ``"full"``, or ``None``
    (nothing is compiled: ``backend=None`` / ``"eager"``).

    ``backend_options["graphs"]`` decides; by default ``"regional"`` (compile each distinct block graph
    once, shared by every block of its class and every variant: a fraction of the compile time), except
    where one whole graph per variant is what the backend is measured with: ``backend="torchair"`` (one GE
    graph / aclgraph capture per variant) and inductor's CUDA-graph mode ``"reduce-overhead"``.
    """
    options = options or {}
    if backend is None or backend == "eager":
        return None
    if "graphs" in options:
        return options["graphs"]
    if backend == "torchair" or (backend == "inductor" and options.get("mode") == "reduce-overhead"):
        return "full"
    return "regional"


def _graph_replay(backend: "Backend", options: Dict[str, Any]) -> bool:
    return backend == "torchair" or (backend == "inductor" and options.get("mode") == "reduce-overhead")


def shape_mode(backend: "Backend", options: Optional[Dict[str, Any]] = None) -> str:
    """How ``optimize(..., backend=backend)`` serves a new input shape (another resolution): ``"dynamic"`` or
    ``"static"``.

    ``"dynamic"`` (:mod:`npu_cache_fx.shapes`): the model is exported once with every input dimension
    ``Dim.AUTO``; a later call whose sizes fit the capture's symbolic sizes (and guards) reuses it, its
    variants and their compiled code (inductor / aot_eager / a callable backend compile each graph once with
    symbolic sizes); cache buffers are still allocated per shape. Where export cannot keep a dimension
    symbolic it specialises it (then that shape is captured again), where the dynamic export fails the
    capture is static; ``stats.shape_capture`` says which happened and why. ``"static"``: each shape is
    captured and compiled again. ``backend_options["shapes"]`` decides. The default is ``"dynamic"`` where
    there is compiled code to reuse (inductor, aot_eager, a callable), and ``"static"``
    * for graph replay (``backend="torchair"``, inductor ``mode="reduce-overhead"``): one recorded graph per
      shape;
    * for ``backend=None`` / ``"eager"``: nothing is compiled, so a new shape costs only a capture, and the
      symbolic export takes about twice as long as a static one (tiny-flux 2.5 s vs 1.2 s CPU) with equal
      step time; pass ``"dynamic"`` to capture once for many resolutions.
    Measured with inductor on CPU (README, Benchmarks): regional graphs compiled for symbolic sizes take
    1.15-1.35x as long to compile as static ones and per step are within 2 % of them (1.016x tiny-flux, 1.001x
    tiny-wan, whose blocks get fresh symbols: :func:`npu_cache_fx.shapes.canonical_inputs`); ``"static"``
    starts faster for a single resolution.
    """
    options = options or {}
    if "shapes" in options:
        return options["shapes"]
    if graph_mode(backend, options) is None or _graph_replay(backend, options):  # nothing compiled / replay
        return "static"
    return "dynamic"


class LazyCompile:
    """A graph compiled on its first call (the call the runtime times as the compile): ``compile_fn(args)``."""

    def __init__(self, compile_fn: Callable[[Sequence[Any]], Callable]):
        self.compile_fn = compile_fn
        self.fn: Optional[Callable] = None

    @torch._dynamo.disable  # compiled by us: opaque under an enclosing torch.compile (see RegionalProgram)
    def __call__(self, *args):
        if self.fn is None:
            self.fn = self.compile_fn(args)
        return self.fn(*args)


class PerShape:
    """A graph compiled for static shapes once per input layout (shapes, strides, size values): what a dynamic
    capture's graph falls back to when the backend cannot compile it for symbolic sizes. ``compiles`` counts
    the compiles (the runtime adds them to ``stats.graphs_compiled``)."""

    def __init__(self, gm: fx.GraphModule, compile_fn: Callable[[fx.GraphModule, list], Callable]):
        self.gm = gm
        self.compile_fn = compile_fn
        self.fns: Dict[Any, Callable] = {}
        self.compiles = 0

    @torch._dynamo.disable  # compiled by us: opaque under an enclosing torch.compile (see RegionalProgram)
    def __call__(self, *args):
        key = tuple((tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a for a in args)
        fn = self.fns.get(key)
        if fn is None:
            fn = self.fns[key] = self.compile_fn(self.gm, list(args))
            self.compiles += 1
        return fn(*args)


class BackendUnavailable(RuntimeError):
    """The requested compile backend cannot be used here; the message says what to install."""


def _torchair_backend(options: Dict[str, Any]) -> Callable:
    try:
        import torch_npu  # noqa: F401  (registers the NPU device)
        from torch_npu.dynamo import torchair
    except Exception as err:  # ImportError, or CANN missing at import time
        raise BackendUnavailable(
            "backend='torchair' needs torch_npu with torchair and the Ascend CANN toolkit: "
            "pip install 'npu_cache_fx[ascend]' and install CANN (source set_env.sh); "
            f"importing torch_npu failed with: {err!r}") from err
    config = options.get("compiler_config")
    if config is None:
        config = torchair.CompilerConfig()
        mode = options.get("mode", "max-autotune")
        if mode not in TORCHAIR_MODES:
            raise ValueError(f"torchair mode must be one of {TORCHAIR_MODES}, got {mode!r}")
        config.mode = mode
    return torchair.get_npu_backend(compiler_config=config)


def resolve_backend(backend: Backend, options: Optional[Dict[str, Any]] = None) -> Optional[Callable]:
    """``None`` for eager execution, otherwise what ``torch.compile(backend=...)`` takes."""
    options = dict(options or {})
    if backend is None or backend == "eager":
        return None
    if callable(backend):
        return backend
    if backend == "torchair":
        return _torchair_backend(options)
    if backend in ("inductor", "aot_eager"):
        return backend
    if isinstance(backend, str) and backend in torch._dynamo.list_backends(exclude_tags=()):
        return backend
    raise ValueError(f"backend must be one of {BACKENDS}, a registered torch.compile backend, "
                     f"or a callable; got {backend!r}")


def _torch_npu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch_npu") is not None


def prepare_for_torchair(gm: fx.GraphModule, options: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    """Make a variant GE-convertible: no export asserts, attention without fused SDPA.

    In GE mode (``max-autotune``) an aten op without a working converter fails the
    compile. ``aten._assert_tensor_metadata`` (inserted by export) and the fused SDPA
    overloads have none; SDPA becomes torch_npu's ``npu_fused_infer_attention_score``
    (fp16/bf16, torch_npu present) or matmul + softmax (``options["sdpa"]``:
    ``"auto"`` | ``"npu_fused_infer_attention_score"`` | ``"matmul"`` | ``"keep"``).
    aclgraph modes need no converters and keep SDPA.
    """
    from .opcheck import gelu_erf_nodes, strip_runtime_asserts
    from .passes.sdpa import decompose_sdpa

    options = dict(options or {})
    strip_runtime_asserts(gm)
    mode = options.get("mode", "max-autotune")
    sdpa = options.get("sdpa", "auto" if mode == "max-autotune" else "keep")
    if sdpa == "auto":
        sdpa = "npu_fused_infer_attention_score" if _torch_npu_available() and _half_attention(gm) else "matmul"
    if sdpa != "keep":
        decompose_sdpa(gm, impl=sdpa)
    if mode == "max-autotune" and gelu_erf_nodes(gm):
        log.warning("torchair GE mode computes aten.gelu with the tanh approximation: %d exact-erf gelu "
                    "node(s) in this graph will change numerically", len(gelu_erf_nodes(gm)))
    gm.recompile()
    return gm


def _half_attention(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product" in str(node.target):
            val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
            return val is not None and val.dtype in (torch.float16, torch.bfloat16)
    return False


def compile_graph(gm: fx.GraphModule, backend: Backend, options: Optional[Dict[str, Any]] = None,
                  symbolic: bool = False) -> Callable:
    """Compile one variant with ``fullgraph=True`` and static shapes (one graph, no recompiles).

    ``symbolic``: ``gm`` comes from a dynamic capture (:mod:`npu_cache_fx.shapes`); it is compiled on its first
    call for every size its placeholders' symbolic values allow, by :func:`compile_segment` (no Dynamo).
    """
    resolved = resolve_backend(backend, options)
    if resolved is None:
        return gm
    if symbolic and backend != "torchair":
        from .shapes import fake_inputs
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        return LazyCompile(lambda args: compile_segment(gm, fake_inputs(vals, args), backend, options, symbolic=True))
    if backend == "torchair":
        prepare_for_torchair(gm, options)
    mode = (options or {}).get("mode") if backend == "inductor" else None  # e.g. "reduce-overhead": CUDA graphs
    return torch.compile(gm, backend=resolved, fullgraph=True, dynamic=False, mode=mode)


def compile_segment(gm: fx.GraphModule, example_inputs, backend: Backend,
                    options: Optional[Dict[str, Any]] = None, symbolic: bool = False) -> Callable:
    """Compile one segment of a regional variant (:mod:`npu_cache_fx.regions`) for ``example_inputs``.

    The segment is an aten graph that is always called with inputs like ``example_inputs`` (the caller
    keys segments by their inputs' shapes, strides, dtypes and aliasing), so it is handed to the backend
    directly, without Dynamo: no guard evaluation per call (~70 us per segment on a CPU, a few percent of
    a tiny model's step), and nothing to recompile. torchair, which expects to run under Dynamo, gets the
    segment through ``torch.compile(fullgraph=True, dynamic=False)`` like a whole variant, and so does a
    segment the backend cannot compile on its own: one with a data-dependent output shape (``nonzero`` in
    Mochi's blocks) needs the shape environment Dynamo sets up.

    ``symbolic``: ``example_inputs`` are the fake values of a dynamic capture (symbolic sizes, SymInt inputs;
    :mod:`npu_cache_fx.shapes`): the backend compiles one graph for every size, in the capture's shape
    environment (its guards are checked when a call binds the capture). If that fails (inductor cannot compile
    a graph whose input sizes use a symbol only in a sum, e.g. Flux's rotary table of ``text + image`` rows),
    a :class:`PerShape` compiles it for static shapes per input layout.
    """
    resolved = resolve_backend(backend, options)
    if resolved is None:
        return gm
    if backend == "torchair":
        return compile_graph(gm, backend, options)
    if backend == "inductor":
        mode = (options or {}).get("mode")
        resolved = torch._TorchCompileInductorWrapper(mode, None, False) if mode not in (None, "default") \
            else torch._dynamo.lookup_backend("inductor")
    elif isinstance(resolved, str):
        resolved = torch._dynamo.lookup_backend(resolved)
    if backend == "inductor" and symbolic:
        mode = (options or {}).get("mode")
        resolved = torch._TorchCompileInductorWrapper(mode, None, True) if mode not in (None, "default") \
            else resolved
    try:
        return resolved(gm, list(example_inputs))
    except Exception as err:  # noqa: BLE001 - the Dynamo route below raises what is really wrong
        if symbolic:  # e.g. inductor needs every symbol of an input size as a size or input of its own
            log.info("compiling a graph for symbolic sizes failed (%s: %s); it is compiled per input shape",
                     type(err).__name__, str(err).splitlines()[0][:200])
            return PerShape(gm, lambda g, example: compile_segment(g, example, backend, options))
        log.debug("compiling a segment without Dynamo failed (%s: %s); compiling it with torch.compile",
                  type(err).__name__, err)
        return compile_graph(gm, backend, options)


def ge_ready_blocks(inner: Callable, options: Optional[Dict[str, Any]] = None) -> Callable:
    """A dynamo backend for the Dynamo path's block graphs that hands ``inner`` (torchair) GE-ready aten graphs.

    Dynamo gives a backend torch-level graphs; torchair would trace them to aten itself, with the fused
    SDPA overloads GE cannot convert. Here each block graph is traced the way torchair traces
    (:func:`~npu_cache_fx.opcheck.trace_like_torchair`), made GE-convertible by
    :func:`prepare_for_torchair` (as the export path's variants are) and then handed to ``inner``,
    whose own trace of an aten graph changes nothing. A graph that owns parameters (not lifted to
    inputs by Dynamo) goes to ``inner`` unchanged.
    """
    from .opcheck import trace_like_torchair

    def backend(gm: fx.GraphModule, example_inputs):
        example_inputs = list(example_inputs)
        traced = trace_like_torchair(gm, example_inputs)
        if sum(1 for n in traced.graph.nodes if n.op == "placeholder") != len(example_inputs):
            return inner(gm, example_inputs)
        return inner(prepare_for_torchair(traced, options), example_inputs)
    return backend


def block_backend(backend: Backend, options: Optional[Dict[str, Any]] = None) -> Optional[Callable]:
    """What the Dynamo path compiles each block with: :func:`resolve_backend`, GE-ready for torchair."""
    resolved = resolve_backend(backend, options)
    if backend == "torchair" and (options or {}).get("mode", "max-autotune") == "max-autotune":
        return ge_ready_blocks(resolved, options)
    return resolved
