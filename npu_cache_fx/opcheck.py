"""Will torchair's GE graph mode (``max-autotune``) accept this graph?

torchair (``torch_npu.dynamo.torchair``) is an AOTAutograd dynamo backend: the
graph it hands to its GE converter is the functionalized forward/inference graph
of ``aot_module_simplified``.  Every ``call_function`` node of that graph needs
a GE converter, and in torch_npu 2.14.0 most registered aten converters are
stubs that raise.  The list of implemented aten overloads is generated from the
wheel's sources by ``tools/torchair_ops.py`` into ``data/torchair_ge_ops.json``.

This module reproduces the trace (:func:`trace_like_torchair`) and checks it
against that list (:func:`unsupported_torchair_ops`) without torch_npu being
installed.  It never imports torch_npu.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from typing import Any, Callable, Dict, FrozenSet, List, Sequence, Union

import torch
import torch.fx
import torch.utils._pytree as pytree

__all__ = [
    "TORCHAIR_OPS_JSON",
    "torchair_ops_data",
    "torchair_supported_ops",
    "op_name",
    "aten_ops",
    "trace_like_torchair",
    "unsupported_torchair_ops",
    "gelu_erf_nodes",
    "strip_runtime_asserts",
]

TORCHAIR_OPS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchair_ge_ops.json")

# Node targets that are not ops and never reach a GE converter as such
# (torchair handles getitem itself; see fx2ge_converter.py).
_IGNORED_TARGETS = ("_operator.getitem", "operator.getitem")


@functools.lru_cache(maxsize=None)
def torchair_ops_data() -> Dict[str, Any]:
    """The parsed ``data/torchair_ge_ops.json`` (see ``tools/torchair_ops.py``)."""
    with open(TORCHAIR_OPS_JSON) as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)
def torchair_supported_ops() -> FrozenSet[str]:
    """aten overloads ("aten.add.Tensor") whose torchair GE converter is implemented."""
    return frozenset(torchair_ops_data()["implemented"])


@functools.lru_cache(maxsize=None)
def _supported_other() -> FrozenSet[str]:
    # npu.* (e.g. npu.npu_fused_infer_attention_score.default), prims.*, torch.sym_float, ...
    return frozenset(torchair_ops_data().get("implemented_other_namespaces", ()))


def _is_builtin_callable(target) -> bool:
    # torchair's _NpuGraphConverter runs builtin callables (operator.getitem, ...) in Python
    # unless they are binary operators, which have (implemented) builtin converters.
    try:
        from torch._dynamo.trace_rules import is_builtin_callable
    except ImportError:  # pragma: no cover - older torch
        from torch._dynamo.allowed_functions import is_builtin_callable
    return is_builtin_callable(target)


def op_name(target: Any) -> Union[str, None]:
    """``torch.ops.aten.add.Tensor`` -> ``"aten.add.Tensor"``; None for non-OpOverloads."""
    if isinstance(target, torch._ops.OpOverload):
        # str(OpOverload) is "aten.add.Tensor"; name() would be "aten::add.Tensor".
        ns, _, rest = target.name().partition("::")
        overload = target._overloadname
        base = rest.split(".", 1)[0]
        return f"{ns}.{base}.{overload}"
    return None


def aten_ops(gm: torch.fx.GraphModule) -> "collections.Counter[str]":
    """Count ``call_function`` targets that are OpOverloads, of every namespace
    (``aten.mm.default``, ``npu_cache_fx.cache_write.default``, ...)."""
    counts: collections.Counter = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name is not None:
            counts[name] += 1
    return counts


class _CallAsModule(torch.nn.Module):
    """Wrap a callable (or a module called with a pytree of args/kwargs) so that
    ``aot_module_simplified`` sees flat positional tensor inputs."""

    def __init__(self, fn: Callable, in_spec: pytree.TreeSpec) -> None:
        super().__init__()
        if isinstance(fn, torch.nn.Module):
            self.inner = fn  # registered: its parameters/buffers are lifted as graph inputs
        else:
            self._fn = fn
        self._in_spec = in_spec

    def forward(self, *flat):
        args, kwargs = pytree.tree_unflatten(list(flat), self._in_spec)
        fn = self.inner if hasattr(self, "inner") else self._fn
        # aot_module_simplified wants a tuple of outputs.
        return tuple(pytree.tree_leaves(fn(*args, **kwargs)))


def _view_to_reshape(gm: torch.fx.GraphModule) -> None:
    # torchair npu_fx_compiler._view_to_reshape (run from _optimize_fx before conversion).
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        gm.recompile()


def trace_like_torchair(
    fn_or_gm: Callable,
    example_inputs: Union[Sequence[Any], Dict[str, Any]],
    example_kwargs: Union[Dict[str, Any], None] = None,
    *,
    decompositions: Union[Dict[Any, Callable], None] = None,
    view_to_reshape: bool = True,
) -> torch.fx.GraphModule:
    """The aten graph torchair's GE converter would be handed for ``fn_or_gm``.

    What torchair does (torch_npu 2.14.0, ``dynamo/torchair/npu_fx_compiler.py``):

    * ``_npu_backend`` -> ``_compile_graph_with_aot`` -> ``aot_module_simplified(gm,
      example_inputs, fw_compiler=..., inference_compiler=..., partition_fn=...,
      keep_inference_input_mutations=experimental_config.keep_inference_input_mutations
      (default True), decompositions=...)``.
    * ``decompositions`` = ``_utils.get_npu_default_decompositions()``: only
      ``npu_define.allgather`` and ``_c10d_functional.all_to_all_single`` -- nothing
      for aten.  ``add_npu_patch`` additionally swaps a handful of py_kernels
      (upsample_nearest2d.vec, dropout/batch-norm meta, to.other/type_as under
      AutogradPrivateUse1); these do not touch transformer inference graphs and are
      not reproduced (they patch global state).
    * So CompositeImplicitAutograd ops are decomposed by the dispatcher during
      tracing (linear -> t/addmm/mm, softmax.int -> _softmax, matmul -> bmm, ...),
      the graph is functionalized, and input mutations stay in the graph as
      ``aten.copy_`` (GE ``Assign``).
    * Before conversion ``_optimize_fx`` runs ``remove_noop_ops`` (inductor),
      ``recover_view_inplace_pattern``, pattern fusion and ``_view_to_reshape``
      (``aten.view.default`` -> ``aten.reshape.default``); only the last is
      reproduced here (``view_to_reshape=True``).

    ``fn_or_gm`` may be an ``nn.Module``/``GraphModule`` (its parameters and buffers
    become graph inputs, as dynamo lifts them for torchair) or a plain callable.
    ``example_inputs`` are its positional arguments (or a dict of keyword arguments),
    ``example_kwargs`` extra keyword arguments; pytrees of tensors are fine.

    The trace runs under ``torch.no_grad()`` so AOTAutograd produces the inference
    graph (what ``inference_compiler`` gets).  The returned GraphModule is the
    recorded graph: it runs (inputs = lifted params/buffers, then the flattened user
    inputs) and the compiled function that wraps it is discarded.
    """
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    if isinstance(example_inputs, dict):
        args: tuple = ()
        kwargs = dict(example_inputs)
    else:
        args = tuple(example_inputs)
        kwargs = {}
    if example_kwargs:
        kwargs.update(example_kwargs)
    flat, in_spec = pytree.tree_flatten((args, kwargs))
    wrapper = _CallAsModule(fn_or_gm, in_spec)

    captured: List[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _example_inputs):
        captured.append(gm)
        return make_boxed_func(gm.forward)

    with torch.no_grad():
        aot_module_simplified(
            wrapper,
            flat,
            fw_compiler=record,
            inference_compiler=record,
            keep_inference_input_mutations=True,
            decompositions=dict(decompositions or {}),
        )
    if not captured:  # pragma: no cover - aot always compiles eagerly
        raise RuntimeError("aot_module_simplified did not call the compiler")
    gm = captured[-1]
    if view_to_reshape:
        _view_to_reshape(gm)
    return gm


def unsupported_torchair_ops(
    gm: Callable,
    example_inputs: Union[Sequence[Any], Dict[str, Any]],
    example_kwargs: Union[Dict[str, Any], None] = None,
) -> Dict[str, int]:
    """Ops of the torchair-like trace of ``gm`` that GE mode cannot convert, with counts.

    An op is supported when ``data/torchair_ge_ops.json`` lists an implemented
    converter for it: the ``aten`` list, or ``implemented_other_namespaces``
    (``npu.npu_fused_infer_attention_score.default``, ``prims.*``, the SymInt
    builtins).  ``operator.getitem``, other python builtins (torchair runs them in
    Python) and non-op nodes are ignored.  Everything else counts, notably our own
    ``npu_cache_fx::*`` ops, which must be lowered before torchair sees the graph,
    and ``aten._assert_tensor_metadata`` that ``torch.export`` inserts (see
    :func:`strip_runtime_asserts`).  Non-OpOverload python functions are reported
    by their qualified name.
    """
    traced = trace_like_torchair(gm, example_inputs, example_kwargs)
    supported = torchair_supported_ops()
    other = _supported_other()
    out: collections.Counter = collections.Counter()
    for node in traced.graph.nodes:
        if node.op != "call_function":
            continue
        name = op_name(node.target)
        if name is None:
            target = node.target
            module = getattr(target, "__module__", None) or ""
            module = "operator" if module == "_operator" else module
            qual = f"{module}.{getattr(target, '__name__', str(target))}"
            if qual in _IGNORED_TARGETS or qual in other or _is_builtin_callable(target):
                continue
            out[qual] += 1
        elif name.startswith("npu_cache_fx."):
            out[name] += 1  # ours: must be lowered before torchair
        elif name not in supported and name not in other:
            out[name] += 1
    return dict(sorted(out.items()))


def _runtime_assert_targets():
    names = [("_assert_tensor_metadata", "default"), ("_assert_scalar", "default"), ("_assert_async", "default"),
             ("_assert_async", "msg"), ("sym_constrain_range", "default"),
             ("sym_constrain_range_for_size", "default")]
    out = set()
    for packet, overload in names:
        try:
            out.add(getattr(getattr(torch.ops.aten, packet), overload))
        except (AttributeError, RuntimeError):  # pragma: no cover - other torch versions
            pass
    return out


def strip_runtime_asserts(gm: torch.fx.GraphModule) -> int:
    """Erase unused runtime-assert nodes (``aten._assert_tensor_metadata``,
    ``_assert_scalar``, ``_assert_async``, ``sym_constrain_range*``); return how many.

    ``torch.export`` (non-strict, torch >= 2.6) puts an ``aten._assert_tensor_metadata``
    before every ``.to(dtype)``; Flux has dozens.  They are side-effectful, so
    AOTAutograd keeps them, and torchair has no GE converter for them (nor an
    auto-generated one: aten ops are excluded), so an exported graph must be stripped
    before torchair compiles it.  Same selection as torch's
    ``_export/passes/remove_runtime_assertions.py``; the graph is recompiled.
    """
    targets = _runtime_assert_targets()
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in targets and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    if removed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return removed


def gelu_erf_nodes(gm: torch.fx.GraphModule) -> List[torch.fx.Node]:
    """``aten.gelu.default`` nodes computing the exact (erf) GELU.

    torchair's gelu converter ignores ``approximate`` and always emits GE ``Gelu``
    (the tanh approximation), so these nodes would silently change numerics in GE
    mode.  ``approximate`` defaults to ``"none"``; it may be passed positionally or
    as a keyword.
    """
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.gelu.default:
            approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
            if approx == "none":
                found.append(node)
    return found
