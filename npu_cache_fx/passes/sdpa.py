"""Rewrite scaled-dot-product attention into ops torchair's GE mode can convert.

torchair (torch_npu 2.14.0) has no working GE converter for any fused SDPA
overload (``aten._scaled_dot_product_flash_attention_for_cpu`` has none at all,
``_scaled_dot_product_flash_attention``/``_efficient_attention`` are stubs), so
a graph that calls ``F.scaled_dot_product_attention`` fails to compile in
``max-autotune``.  :func:`decompose_sdpa` replaces every attention call with

``impl="matmul"`` (default)
    ``softmax((q * scale) @ k^T (+ mask)) @ v`` from aten ops whose torchair
    converters are implemented (``mul.Tensor``, ``transpose.int``,
    ``matmul.default``, ``_softmax.default`` / ``_safe_softmax.default``,
    ``masked_fill.Scalar``, ``logical_not``, ``new_ones``, ``triu``, ``add.Tensor``,
    ``_to_copy``, ``unsqueeze``/``expand``/``reshape``; see
    ``data/torchair_ge_ops.json``).  ``matmul`` lowers to ``bmm`` when the graph
    is traced again by AOTAutograd; its GE converter emits ``BatchMatMul``.

``impl="npu_fused_infer_attention_score"``
    ``torch.ops.npu.npu_fused_infer_attention_score`` (torch_npu's fused
    inference attention, GE ``FusedInferAttentionScore``; implemented converter
    in ``ge_converter/custom/fused_infer_attention_score.py``).  Only
    buildable when torch_npu is importable (the op must be registered).

Handled targets (all of their spellings seen in practice):

* ``aten.scaled_dot_product_attention.default`` -- what ``torch.export.export(...,
  strict=False)`` graphs contain (diffusers Flux/Wan call ``F.scaled_dot_product_attention``);
* ``aten._scaled_dot_product_flash_attention_for_cpu.default`` -- what an
  AOTAutograd trace on CPU contains (tuple output, read through ``getitem``);
* ``aten._scaled_dot_product_flash_attention.default``,
  ``aten._scaled_dot_product_efficient_attention.default``,
  ``aten._scaled_dot_product_cudnn_attention.default``,
  ``aten._scaled_dot_product_fused_attention_overrideable.default`` (the
  PrivateUse1/NPU hook) -- CUDA/NPU traces;
* ``aten._scaled_dot_product_attention_math.default`` (output 1, the attention
  weights, is supported too).

Only output 0 of the fused overloads may be used (logsumexp etc. serve the
backward); ``dropout_p`` must be 0 (inference).

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``:
``scale=None`` means ``1/sqrt(E)``; a bool ``attn_mask`` is True where attention
is allowed, a float one is added to the scores; ``is_causal`` is the top-left
aligned ``tril(ones(L, S))``; ``enable_gqa`` repeats each kv head
``Hq // Hkv`` times (``repeat_interleave`` on dim -3).  The output has the
query's dtype.  For fp16/bf16 inputs the softmax is computed in fp32 by default
(``softmax_fp32``), like the fused kernels do.
"""

from __future__ import annotations

import collections
import math
import operator
from typing import Any, Dict, Optional, Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

__all__ = ["SDPA_TARGETS", "DecomposeSDPA", "SDPAPassResult", "decompose_sdpa", "IMPLS"]

aten = torch.ops.aten

IMPLS = ("matmul", "npu_fused_infer_attention_score")


def _optional_overload(packet: str, overload: str = "default"):
    try:
        return getattr(getattr(aten, packet), overload)
    except (AttributeError, RuntimeError):  # pragma: no cover - older/newer torch
        return None


# target -> (name of the mask argument or None, output index -> meaning)
_CANDIDATES = {
    "scaled_dot_product_attention": "attn_mask",
    "_scaled_dot_product_flash_attention_for_cpu": "attn_mask",
    "_scaled_dot_product_flash_attention": None,
    "_scaled_dot_product_efficient_attention": "attn_bias",
    "_scaled_dot_product_cudnn_attention": "attn_bias",
    "_scaled_dot_product_fused_attention_overrideable": "attn_bias",
    "_scaled_dot_product_attention_math": "attn_mask",
}
SDPA_TARGETS: Dict[Any, Optional[str]] = {}
for _name, _mask in _CANDIDATES.items():
    _op = _optional_overload(_name)
    if _op is not None:
        SDPA_TARGETS[_op] = _mask

# Metadata copied from the attention node onto the nodes that replace it, so that
# later passes matching on module paths (nn_module_stack) still see them.
_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr",
                "torch_fn", "custom")


class SDPAPassResult(PassResult):
    """A :class:`PassResult` that also carries ``rewritten``: attention calls
    replaced, by original overload name (a Counter; ``sum(...values())`` is the total)."""

    def __new__(cls, graph_module, modified, rewritten=None):
        self = super().__new__(cls, graph_module, modified)
        self.rewritten = collections.Counter(rewritten or {})
        return self


def _bind(node: torch.fx.Node) -> Dict[str, Any]:
    """Arguments of ``node`` by schema name, defaults filled in."""
    schema = node.target._schema
    bound: Dict[str, Any] = {}
    pos = 0
    for arg in schema.arguments:
        if not arg.kwarg_only and pos < len(node.args):
            bound[arg.name] = node.args[pos]
            pos += 1
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def _val(x: Any) -> Any:
    if isinstance(x, torch.fx.Node):
        v = x.meta.get("val", x.meta.get("example_value"))
        if v is None and "tensor_meta" in x.meta:
            tm = x.meta["tensor_meta"]
            return torch.empty(tm.shape, dtype=tm.dtype, device="meta")
        return v
    return x


def _require_val(node: torch.fx.Node, what: str, owner: torch.fx.Node) -> torch.Tensor:
    v = _val(node)
    if not isinstance(v, torch.Tensor):
        raise ValueError(
            f"decompose_sdpa: {what} of {owner.format_node()} has no meta['val']; run the pass on a graph "
            "from torch.export / make_fx / AOTAutograd (or run FakeTensorProp first)")
    return v


class _Builder:
    """Insert nodes before ``anchor``; copy its provenance meta and compute
    ``meta['val']`` under the fake mode of the anchor's inputs when there is one."""

    def __init__(self, graph: torch.fx.Graph, anchor: torch.fx.Node) -> None:
        from torch._guards import detect_fake_mode

        self.graph = graph
        self.anchor = anchor
        self.meta = {k: anchor.meta[k] for k in _COPIED_META if k in anchor.meta}
        vals = [_val(a) for a in anchor.all_input_nodes]
        self.fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def __call__(self, target, args: Sequence[Any] = (), kwargs: Optional[Dict[str, Any]] = None) -> torch.fx.Node:
        args = tuple(args)
        kwargs = dict(kwargs or {})
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, args, kwargs)
        node.meta.update(self.meta)
        val = self._fake_run(target, args, kwargs)
        if val is not None:
            node.meta["val"] = val
        return node

    def _fake_run(self, target, args, kwargs):
        if self.fake_mode is None:
            return None
        missing = []

        def conv(a):
            v = _val(a)
            if v is None:
                missing.append(a)
            return v

        fargs = torch.fx.node.map_arg(args, conv)
        fkwargs = torch.fx.node.map_arg(kwargs, conv)
        if missing:
            return None
        try:
            with self.fake_mode:
                return target(*fargs, **fkwargs)
        except Exception:  # meta is best-effort
            return None


def _size(b: _Builder, node: torch.fx.Node, val: torch.Tensor, dim: int):
    """``val.shape[dim]`` as an int, or a ``sym_size`` node when it is symbolic."""
    s = val.shape[dim]
    if isinstance(s, int):
        return s
    return b(aten.sym_size.int, (node, dim % val.dim()))


def _as_float(x: Any, what: str, node: torch.fx.Node) -> float:
    if isinstance(x, torch.fx.Node):
        raise ValueError(f"decompose_sdpa: {what} of {node.format_node()} is a graph value; need a constant")
    return float(x)


class DecomposeSDPA(PassBase):
    """PassBase form of :func:`decompose_sdpa`; ``self.rewritten`` counts the attention
    calls replaced by the last run, by original overload name."""

    def __init__(self, impl: str = "matmul", *, softmax_fp32: bool = True) -> None:
        if impl not in IMPLS:
            raise ValueError(f"decompose_sdpa: impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.softmax_fp32 = softmax_fp32
        self.rewritten: collections.Counter = collections.Counter()

    # ------------------------------------------------------------------ driver
    def call(self, graph_module: torch.fx.GraphModule) -> SDPAPassResult:
        self.rewritten = collections.Counter()
        fia = _npu_fia_op() if self.impl == "npu_fused_infer_attention_score" else None
        graph = graph_module.graph
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in SDPA_TARGETS:
                continue
            self._rewrite(graph, node, fia)
            self.rewritten[str(node.target)] += 1
            graph.erase_node(node)
        modified = bool(self.rewritten)
        if modified:
            graph.eliminate_dead_code()
            graph.lint()
            graph_module.recompile()
        return SDPAPassResult(graph_module, modified, self.rewritten)

    def _rewrite(self, graph: torch.fx.Graph, node: torch.fx.Node, fia) -> None:
        a = _bind(node)
        mask_name = SDPA_TARGETS[node.target]
        q, k, v = a["query"], a["key"], a["value"]
        mask = a.get(mask_name) if mask_name else None
        dropout_p = _as_float(a.get("dropout_p", 0.0) or 0.0, "dropout_p", node)
        if dropout_p != 0.0:
            raise ValueError(
                f"decompose_sdpa: {node.format_node()} has dropout_p={dropout_p}; only inference "
                "attention (dropout_p=0) can be rewritten -- call model.eval() before capturing")
        if a.get("dropout_mask") is not None:
            raise ValueError(f"decompose_sdpa: {node.format_node()} passes a dropout_mask; unsupported")
        is_causal = a.get("is_causal", False)
        if isinstance(is_causal, torch.fx.Node):
            raise ValueError(f"decompose_sdpa: is_causal of {node.format_node()} is a graph value")
        is_causal = bool(is_causal)
        if is_causal and mask is not None:
            raise ValueError(f"decompose_sdpa: {node.format_node()} sets both attn_mask and is_causal "
                             "(scaled_dot_product_attention rejects that too)")
        # The fused overloads have no enable_gqa argument: their kernels take fewer kv heads
        # as GQA (the CPU flash kernel does); the public op needs enable_gqa=True.
        enable_gqa = bool(a["enable_gqa"]) if "enable_gqa" in a else True

        qv = _require_val(q, "query", node)
        kv = _require_val(k, "key", node)
        _require_val(v, "value", node)
        if qv.dim() < 2:
            raise ValueError(f"decompose_sdpa: query of {node.format_node()} has rank {qv.dim()}")
        scale = a.get("scale")
        if scale is None:
            e = qv.shape[-1]
            scale = 1.0 / math.sqrt(int(e))
        else:
            scale = _as_float(scale, "scale", node)
        hq = qv.shape[-3] if qv.dim() >= 3 else 1
        hkv = kv.shape[-3] if kv.dim() >= 3 else 1
        gqa = enable_gqa and hq != hkv
        if gqa and int(hq) % int(hkv) != 0:
            raise ValueError(f"decompose_sdpa: enable_gqa with {hq} query heads and {hkv} kv heads")

        b = _Builder(graph, node)
        if fia is not None:
            out = self._emit_npu(b, node, fia, q, k, v, mask, is_causal, scale, gqa, int(hq), int(hkv))
            weights = None
        else:
            out, weights = self._emit_matmul(b, node, q, k, v, mask, is_causal, scale, gqa, hq, hkv)
        self._replace_uses(node, out, weights)

    @staticmethod
    def _replace_uses(node: torch.fx.Node, out: torch.fx.Node, weights: Optional[torch.fx.Node]) -> None:
        schema_returns = node.target._schema.returns
        if len(schema_returns) == 1:
            node.replace_all_uses_with(out)
            return
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise NotImplementedError(
                    f"decompose_sdpa: tuple output of {node.format_node()} used by {user.format_node()}")
            idx = user.args[1]
            if idx == 0:
                user.replace_all_uses_with(out)
            elif idx == 1 and node.target is _optional_overload("_scaled_dot_product_attention_math") \
                    and weights is not None:
                user.replace_all_uses_with(weights)
            elif user.users:
                raise NotImplementedError(
                    f"decompose_sdpa: output {idx} ({schema_returns[idx].name}) of {node.format_node()} is "
                    "used; only the attention output can be rewritten (inference graphs)")
            user.graph.erase_node(user)

    # ------------------------------------------------------------------ matmul
    def _emit_matmul(self, b, node, q, k, v, mask, is_causal, scale, gqa, hq, hkv):
        qv = _val(q)
        kv = _val(k)
        dtype = qv.dtype
        if gqa:
            k = _repeat_kv(b, k, kv, int(hq) // int(hkv))
            v = _repeat_kv(b, v, _val(v), int(hq) // int(hkv))
        # Pre-scale q (L*E multiplies instead of L*S, and it keeps fp16 q@k^T in range).
        qs = b(aten.mul.Tensor, (q, scale))
        kt = b(aten.transpose.int, (k, -2, -1))
        scores = b(aten.matmul.default, (qs, kt))
        upcast = self.softmax_fp32 and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            scores = b(aten._to_copy.default, (scores,), {"dtype": torch.float32})
        masked = False
        if is_causal:
            L = _size(b, q, qv, -2)
            S = _size(b, k, kv, -2)
            # new_ones takes q's device at run time (a graph captured on CPU can run on NPU).
            ones = b(aten.new_ones.default, (q, [L, S]), {"dtype": torch.bool})
            upper = b(aten.triu.default, (ones, 1))
            scores = b(aten.masked_fill.Scalar, (scores, upper, float("-inf")))
            masked = True
        if mask is not None:
            mv = _require_val(mask, "attn_mask", node) if isinstance(mask, torch.fx.Node) else None
            if mv is None:
                raise ValueError(f"decompose_sdpa: attn_mask of {node.format_node()} is not a tensor")
            if mv.dtype == torch.bool:
                inv = b(aten.logical_not.default, (mask,))
                scores = b(aten.masked_fill.Scalar, (scores, inv, float("-inf")))
            else:
                scores = b(aten.add.Tensor, (scores, mask))
            masked = True
        if masked:
            # PyTorch's math path uses _safe_softmax: fully masked rows give 0, not NaN.
            probs = b(aten._safe_softmax.default, (scores, -1))
        else:
            probs = b(aten._softmax.default, (scores, -1, False))
        if upcast:
            probs = b(aten._to_copy.default, (probs,), {"dtype": dtype})
        out = b(aten.matmul.default, (probs, v))
        return out, probs

    # ------------------------------------------------------------------ npu
    def _emit_npu(self, b, node, fia, q, k, v, mask, is_causal, scale, gqa, hq, hkv):
        qv = _val(q)
        kv = _val(k)
        if qv.dim() != 4 or kv.dim() != 4:
            raise ValueError(f"decompose_sdpa(impl='npu_fused_infer_attention_score'): {node.format_node()} "
                             "needs 4-D (B, N, S, D) query/key/value for input_layout='BNSD'")
        if qv.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(
                f"decompose_sdpa(impl='npu_fused_infer_attention_score'): query dtype {qv.dtype} of "
                f"{node.format_node()}; the fused op takes float16/bfloat16 -- cast the model or use impl='matmul'")
        if hq != hkv and not gqa:
            raise ValueError(f"decompose_sdpa: {node.format_node()} has {hq} query heads, {hkv} kv heads "
                             "and enable_gqa=False")
        # The fused kernel rejects non-contiguous inputs in eager mode; in GE mode clone is Identity.
        q, k, v = (_contiguous(b, t) for t in (q, k, v))
        atten_mask = None
        L = _size(b, q, qv, -2)
        S = _size(b, k, kv, -2)
        if is_causal:
            # atten_mask is True where attention is NOT computed; (1, 1, Q_S, KV_S) with sparse_mode=0.
            ones = b(aten.new_ones.default, (q, [1, 1, L, S]), {"dtype": torch.bool})
            atten_mask = b(aten.triu.default, (ones, 1))
        elif mask is not None:
            mv = _require_val(mask, "attn_mask", node)
            if mv.dtype != torch.bool:
                raise NotImplementedError(
                    f"decompose_sdpa(impl='npu_fused_infer_attention_score'): additive float attn_mask of "
                    f"{node.format_node()} is not supported (atten_mask is boolean; pse_shift has layout "
                    "constraints); use impl='matmul'")
            shape = [1] * (4 - mv.dim()) + list(mv.shape)
            if mv.dim() > 4 or shape[1] != 1:
                raise NotImplementedError(
                    f"decompose_sdpa(impl='npu_fused_infer_attention_score'): attn_mask shape {tuple(mv.shape)} "
                    "of {node.format_node()}; the fused op takes (Q_S, KV_S), (1, Q_S, KV_S) or (B|1, 1, Q_S, KV_S)")
            inv = b(aten.logical_not.default, (mask,))
            target = [shape[0], 1, L, S]
            if list(mv.shape) != target:
                inv = b(aten.expand.default, (inv, target))
                inv = b(aten.clone.default, (inv,), {"memory_format": torch.contiguous_format})
            atten_mask = inv
        res = b(fia, (q, k, v), {
            "atten_mask": atten_mask,
            "num_heads": hq,
            "scale": float(scale),
            "input_layout": "BNSD",
            "num_key_value_heads": hkv if gqa else 0,
            "sparse_mode": 0,
        })
        out = b(operator.getitem, (res, 0))
        return out


def _repeat_kv(b: _Builder, t: torch.fx.Node, tv: torch.Tensor, groups: int) -> torch.fx.Node:
    """``t.repeat_interleave(groups, dim=-3)`` as unsqueeze/expand/reshape
    (``aten.repeat_interleave.self_int`` is a stub in torchair)."""
    shape = list(tv.shape)
    d = len(shape) - 3
    x = b(aten.unsqueeze.default, (t, d + 1))
    exp = shape[: d + 1] + [groups] + shape[d + 1:]
    x = b(aten.expand.default, (x, exp))
    new = shape[:d] + [shape[d] * groups] + shape[d + 1:]
    return b(aten.reshape.default, (x, new))


def _contiguous(b: _Builder, t: torch.fx.Node) -> torch.fx.Node:
    tv = _val(t)
    if isinstance(tv, torch.Tensor):
        try:
            if tv.is_contiguous():
                return t
        except Exception:
            pass
    return b(aten.clone.default, (t,), {"memory_format": torch.contiguous_format})


def _npu_fia_op():
    """``torch.ops.npu.npu_fused_infer_attention_score.default``, registered by torch_npu."""
    try:
        import torch_npu  # noqa: F401  (registers torch.ops.npu.*; needs Ascend CANN)
    except Exception:
        pass
    try:
        return torch.ops.npu.npu_fused_infer_attention_score.default
    except (AttributeError, RuntimeError) as e:
        raise RuntimeError(
            "decompose_sdpa(impl='npu_fused_infer_attention_score') needs torch_npu (the op "
            "torch.ops.npu.npu_fused_infer_attention_score is not registered; install torch-npu matching "
            "this torch, with Ascend CANN); use impl='matmul' elsewhere") from e


def decompose_sdpa(
    gm: torch.fx.GraphModule,
    *,
    impl: str = "matmul",
    softmax_fp32: bool = True,
) -> SDPAPassResult:
    """Rewrite every SDPA call of ``gm`` in place (see the module docstring).

    Args:
        gm: a GraphModule with ``meta['val']`` on the attention inputs (torch.export,
            make_fx and AOTAutograd graphs have it).
        impl: ``"matmul"`` (aten ops on torchair's implemented list) or
            ``"npu_fused_infer_attention_score"`` (torch_npu's fused op, BNSD layout;
            raises RuntimeError when torch_npu is not importable).
        softmax_fp32: compute the softmax of fp16/bf16 attention in fp32 (``matmul`` impl).

    Returns:
        :class:`SDPAPassResult` ``(graph_module, modified)`` with ``.rewritten``, a Counter
        of replaced calls by overload name.  Dead code is eliminated and ``gm`` recompiled.

    Raises:
        ValueError: ``dropout_p != 0``, both ``attn_mask`` and ``is_causal``, missing
            shape metadata, or arguments the chosen impl cannot express.
    """
    return DecomposeSDPA(impl, softmax_fp32=softmax_fp32).call(gm)
