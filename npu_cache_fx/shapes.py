"""Dynamic input shapes: one capture for every resolution the model allows (issue #19).

``optimize(..., backend_options={"shapes": "dynamic"})`` (the default where it applies, see
:func:`shape_mode`) exports the model with every input dimension ``torch.export.Dim.AUTO``: export keeps
symbolic the dimensions the model lets vary (the token / frame / height / width dimensions of a DiT) and
specialises the others (channels, a batch of 1). The captured graph, the variants built from it and
their cache-slot shapes are then symbolic in those dimensions.

A call is served by a dynamic capture when its inputs have the capture's structure, dtypes and devices
and their sizes *bind* the capture's symbols (:func:`bind`): every specialised dimension equal, every
symbolic one consistent (a symbol seen twice has one value, a derived size ``2*s0`` solves) and within
export's range constraints, and every guard the capture's shape environment recorded (export's own and
those a compiler added while compiling a graph of this capture) true for the bound values. A call that
does not bind is captured again.

Cache buffers stay per concrete shape (allocated at the bound sizes, static addresses per shape); the
graphs take them as inputs whatever their size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch

__all__ = ["CanonicalInputs", "DynamicShapes", "bind", "canonical_inputs", "concrete", "dynamic_dims",
           "dynamic_shapes_spec", "fake_inputs", "is_symbolic", "size_hint"]


def is_symbolic(x: Any) -> bool:
    """A SymInt whose value is not a constant."""
    return isinstance(x, torch.SymInt) and not isinstance(_expr(x), sympy.Integer)


def _expr(x: torch.SymInt):
    return x.node.expr


def size_hint(x: Any) -> int:
    """``x`` as an int: a SymInt's value at the captured example (its hint)."""
    if isinstance(x, torch.SymInt):
        node = x.node
        hint = node.hint if node.hint is not None else node.shape_env.size_hint(node.expr)
        return int(hint)
    return int(x)


def concrete(x: Any, bindings: Optional[Dict[Any, int]]) -> int:
    """``x`` (an int or SymInt) evaluated at ``bindings`` (symbol -> int); the hint without bindings."""
    if not isinstance(x, torch.SymInt):
        return int(x)
    if bindings is None:
        return size_hint(x)
    expr = _expr(x)
    value = sympy.sympify(expr.xreplace(bindings))
    if not value.is_Integer:  # the same symbol made again (other assumptions): bind by name
        by_name = {str(k): v for k, v in bindings.items()}
        value = sympy.sympify(expr.xreplace({s: by_name[str(s)] for s in expr.free_symbols if str(s) in by_name}))
    if not value.is_Integer:
        raise ValueError(f"size {_expr(x)} is not determined by the bound symbols {bindings}")
    return int(value)


def dynamic_dims(val: Any) -> List[int]:
    """The dimensions of a (fake) tensor that are symbolic."""
    if not isinstance(val, torch.Tensor):
        return []
    return [d for d, s in enumerate(val.shape) if is_symbolic(s)]


def dynamic_shapes_spec(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """``torch.export``'s ``dynamic_shapes`` for ``kwargs``: every dimension of every tensor ``Dim.AUTO``
    (export keeps symbolic what the model lets vary and specialises the rest, without raising)."""
    from torch.export import Dim
    from torch.utils import _pytree as pytree

    return pytree.tree_map(lambda v: {d: Dim.AUTO for d in range(v.dim())} if isinstance(v, torch.Tensor) else None,
                           kwargs)


@dataclass
class DynamicShapes:
    """The symbolic input shapes of one capture: per flat input, its sizes (int or sympy expression)."""

    sizes: List[Optional[Tuple[Any, ...]]]  # per flat leaf: sizes for a tensor, None otherwise
    ranges: Dict[Any, Tuple[int, Optional[int]]]  # symbol -> (min, max or None)
    shape_env: Any = None
    symbols: Tuple[Any, ...] = field(default=())

    @classmethod
    def from_placeholders(cls, vals: Sequence[Any], range_constraints: Dict[Any, Any]) -> Optional["DynamicShapes"]:
        """None when no input dimension stayed symbolic."""
        sizes: List[Optional[Tuple[Any, ...]]] = []
        env = None
        symbols = set()
        for val in vals:
            if isinstance(val, torch.Tensor):
                row = []
                for s in val.shape:
                    if is_symbolic(s):
                        env = env or s.node.shape_env
                        row.append(_expr(s))
                        symbols |= _expr(s).free_symbols
                    else:
                        row.append(int(s))
                sizes.append(tuple(row))
            else:
                sizes.append(None)
        if not symbols:
            return None
        ranges = {}
        for sym, vr in range_constraints.items():
            if getattr(sym, "is_Symbol", False):
                lo = int(vr.lower) if getattr(vr.lower, "is_Integer", False) else 0
                hi = int(vr.upper) if getattr(vr.upper, "is_Integer", False) else None
                ranges[sym] = (lo, hi)
        return cls(sizes, ranges, env, tuple(sorted(symbols, key=str)))

    def describe(self) -> str:
        """The symbolic sizes in words: ``"hidden_states=1xs0x4, img_ids=s1x3"`` style (flat input order)."""
        return ", ".join("x".join(map(str, row)) for row in self.sizes if row is not None)


def bind(shapes: DynamicShapes, leaves: Sequence[Any]) -> Optional[Dict[Any, int]]:
    """Symbol -> size for a call with these flat inputs, or None when the capture cannot serve them."""
    if len(leaves) != len(shapes.sizes):
        return None
    bindings: Dict[Any, int] = {}
    pending: List[Tuple[Any, int]] = []
    for row, leaf in zip(shapes.sizes, leaves):
        if row is None:
            continue
        if not isinstance(leaf, torch.Tensor) or leaf.dim() != len(row):
            return None
        for expr, size in zip(row, leaf.shape):
            if isinstance(expr, int):
                if expr != size:
                    return None
            elif expr.is_Symbol:
                if bindings.setdefault(expr, int(size)) != size:
                    return None
            else:
                pending.append((expr, int(size)))
    for expr, size in pending:  # derived sizes (2*s0, s0 + s1): solve the one unbound symbol, then check
        free = [s for s in expr.free_symbols if s not in bindings]
        if len(free) == 1:
            roots = [r for r in sympy.solve(sympy.Eq(expr.xreplace(bindings), size), free[0]) if r.is_Integer]
            if len(roots) != 1:
                return None
            bindings[free[0]] = int(roots[0])
        elif free:
            return None
    for expr, size in pending:
        if sympy.sympify(expr.xreplace(bindings)) != size:
            return None
    if set(bindings) != set(shapes.symbols):
        return None
    for sym, (lo, hi) in shapes.ranges.items():
        if sym in bindings and (bindings[sym] < lo or (hi is not None and bindings[sym] > hi)):
            return None
    if shapes.shape_env is not None:
        for guard in list(shapes.shape_env.guards):  # export's guards and any a compiler added since
            expr = guard.expr
            if not expr.free_symbols <= set(bindings):
                continue  # a guard on a symbol of another graph's shape environment state
            if sympy.sympify(expr.xreplace(bindings)) is not sympy.true:
                return None
    return bindings


def fake_inputs(vals: Sequence[Any], real: Sequence[Any]) -> List[Any]:
    """The inputs a graph of a dynamic capture is compiled for: per input, a fresh fake tensor with the
    symbolic sizes of its value in the graph (``vals``; None: a parameter, fake with static sizes), strides
    contiguous where the real first input is (cache buffers), and SymInts as they are.

    Fresh: inputs sharing one fake value in the graph (two cache slots sized like one node) must not be
    compiled as one duplicated input.
    """
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    out: List[Any] = []
    for val, x in zip(vals, real):
        if mode is None or not isinstance(x, torch.Tensor):
            out.append(val if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)) else x)
        elif val is None or not isinstance(val, torch.Tensor):
            out.append(mode.from_tensor(x, static_shapes=True))
        else:
            with mode:
                if x.is_contiguous():
                    fresh = torch.empty(val.shape, dtype=val.dtype, device=val.device)
                else:
                    fresh = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
            fresh.requires_grad_(x.requires_grad)
            out.append(fresh)
    return out


@dataclass
class CanonicalInputs:
    """A graph's inputs with one fresh symbol per distinct symbolic size (:func:`canonical_inputs`)."""

    example: List[Any]  # fake tensors / SymInts in a shape environment of their own, parameters static
    shape_env: Any
    exprs: Dict[str, Any]  # fresh symbol name -> the size expression it stands for (in the capture's symbols)
    hints: Dict[str, int]  # fresh symbol name -> its size at the call the example was made for
    capture_env: Any  # the capture's shape environment, where the translated guards go

    def guards(self, fresh_guards: Sequence[Any]) -> List[Any]:
        """``fresh_guards`` (sympy booleans over fresh symbols of *some* canonical example with these names)
        in the capture's symbols, plus each fresh symbol's assumed range (>= 2): what must hold for sizes
        the code compiled for the fresh symbols may serve. Guards true for every size are dropped. A guard on a
        symbol the inputs do not have (one the compiler made) pins every size to this call's."""
        out = []
        for g in fresh_guards:
            subs = {sym: self.exprs[str(sym)] for sym in g.free_symbols if str(sym) in self.exprs}
            if len(subs) != len(g.free_symbols):
                return [sympy.Eq(expr, self.hints[name]) for name, expr in self.exprs.items()]
            out.append(sympy.sympify(g.xreplace(subs)))
        out += [sympy.sympify(sympy.Ge(expr, 2)) for expr in self.exprs.values()]
        return [g for g in out if g is not sympy.true]


def canonical_inputs(vals: Sequence[Any], real: Sequence[Any]) -> Optional[CanonicalInputs]:
    """The inputs a segment of a dynamic capture is compiled for, with a fresh symbol per distinct symbolic size.

    In the capture, a block's token count is an expression of the latent's sizes (Wan: ``s1*(s2//2)*(s3//2)``)
    and its strides carry ``Max``/``Min`` terms; code compiled for those sizes recomputes them in every index
    and cannot prove the inputs contiguous (tiny-wan's blocks ran 9 % slower than static ones). Here each
    distinct size expression of the inputs (``vals``: their fake values in the capture) becomes one fresh
    symbol, with the current call's size (``real``) as its hint, in a shape environment of its own that does
    not unify equal sizes (``duck_shape=False``); contiguous inputs are contiguous, a non-contiguous one has a
    fresh symbol per symbolic stride. The symbols are named from their order of appearance, so blocks of one
    class give the same example (and share compiled code). What the compile then assumes of the fresh symbols
    (its guards, and a size >= 2) holds for other sizes only where :meth:`CanonicalInputs.guards`, translated
    back, holds.

    None when a symbolic size or stride is 0 or 1 at this call (a fresh symbol would be specialised on it), and
    when no size or stride of the inputs has a floor division, modulo, ``Max`` or ``Min`` (sums and products of
    symbols index as cheaply as one; tracing with fresh symbols costs more, the capture's shape environment
    having answered the same questions during export: inductor's cold compile of tiny-flux's blocks, whose
    rotary tables have ``text + image`` rows, took 14 % longer for no faster step): the segment is compiled
    for the capture's symbols (:func:`fake_inputs`).
    """
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    if not any(_costly(val) for val in vals):
        return None  # the capture's sizes index as cheaply, and its shape environment's caches are warm
    env = ShapeEnv(duck_shape=False)
    mode = FakeTensorMode(shape_env=env)
    mode.npu_cache_fx_canonical = True  # its symbols are named by position, not per capture (regions.structural_key)
    fresh: Dict[Any, Any] = {}  # capture expression -> fresh SymInt
    exprs: Dict[str, Any] = {}
    hints: Dict[str, int] = {}
    capture_env = None

    def size(s: Any, hint: int) -> Any:
        nonlocal capture_env
        if not is_symbolic(s):
            return int(s)
        capture_env = s.node.shape_env
        expr = _expr(s)
        if expr not in fresh:
            if hint < 2:
                raise _Unsuitable
            sym = env.create_symbol(hint, ConstantSource(f"u{len(fresh)}"), dynamic_dim=DimDynamic.DYNAMIC)
            fresh[expr] = env.create_symintnode(sym, hint=hint)
            exprs[str(sym)], hints[str(sym)] = expr, hint
        return fresh[expr]

    out: List[Any] = []
    try:
        for val, x in zip(vals, real):
            if isinstance(val, torch.SymInt) and not isinstance(x, torch.Tensor):
                out.append(size(val, int(x)))
            elif not isinstance(x, torch.Tensor):
                out.append(x)
            elif not isinstance(val, torch.Tensor):  # a parameter or buffer: static
                out.append(mode.from_tensor(x, static_shapes=True))
            else:
                shape = [size(s, int(h)) for s, h in zip(val.shape, x.shape)]
                with mode:
                    if x.is_contiguous():
                        t = torch.empty(shape, dtype=x.dtype, device=x.device)
                    else:
                        stride = [size(s, int(h)) for s, h in zip(val.stride(), x.stride())]
                        t = torch.empty_strided(shape, stride, dtype=x.dtype, device=x.device)
                t.requires_grad_(x.requires_grad)
                out.append(t)
    except _Unsuitable:
        return None
    if not exprs:  # no symbolic size after all: nothing to make fresh
        return None
    return CanonicalInputs(out, env, exprs, hints, capture_env)


class _Unsuitable(Exception):
    pass


def _costly(val: Any) -> bool:
    """Whether a fake value's sizes or strides use a floor division, modulo, Max or Min of symbols."""
    if isinstance(val, torch.SymInt):
        sizes = [val]
    elif isinstance(val, torch.Tensor):
        sizes = [*val.shape, *val.stride()]
    else:
        return False
    for s in sizes:  # torch's FloorDiv / Mod are sympy Functions; Max / Min are not
        if is_symbolic(s) and (_expr(s).atoms(sympy.Function) or _expr(s).has(sympy.Max, sympy.Min)):
            return True
    return False
