"""Regional compilation of variant graphs: compile each distinct block graph once, share it across variants.

A lowered variant (:meth:`npu_cache_fx.runtime._Entry.build`) is one flat aten graph. Compiled whole,
every variant pays for compiling every block it keeps, although the blocks a variant keeps are the same
computation in all of them. :func:`partition` cuts a variant at block boundaries (the capture's block
spans) into *segments*: one per block that is still in the graph, and *glue* between them (embeddings,
the cache ops a rewrite inserted, the output head). Each segment becomes a small GraphModule whose
parameters are inputs (lifted ``get_attr``), with canonical node names, so blocks of one class are the
same graph; :func:`structural_key` hashes the graph code with its inputs' shapes and dtypes.

:class:`RegionalProgram` runs a variant as its segments in order. A :class:`SegmentCache` (one per
optimized module, shared by its variants and input shapes) compiles each distinct key once with the
variant's backend (:func:`npu_cache_fx.backends.compile_segment`) and hands the same compiled
callable to every block and variant with that key, called with each block's own parameters: the
double-stream block of a Flux model is compiled once, not once per block per variant.

A block of a dynamic capture (symbolic sizes) whose input sizes use a floor division, ``Max`` or ``Min`` is
compiled for *canonical* inputs (:func:`npu_cache_fx.shapes.canonical_inputs`): one fresh symbol per distinct
size expression of its inputs, named by position, contiguous where the inputs are. Its code then indexes
plain symbols (not Wan's ``F*(H//2)*(W//2)`` tokens), blocks of one class still share a key, and blocks of two
captures of the same model can share compiled code. What a compile assumes of the fresh symbols (its guards)
is translated back to the capture's symbols and added to the capture's guards, so sizes that fail it are
never served by it. Glue, and blocks whose sizes are sums and products of symbols, are compiled for the
capture's own symbols.

What makes graph mode work is kept: the plan stays on the host (one program per variant, no step value
in any graph), cache buffers are graph inputs updated in place (static addresses), no recompiles (each
compiled segment sees one input signature; the counting backend in the tests checks it).

A refresh's writes (a block range's ``delta = out - in`` and its copy into the cache buffer, an attention
output's copy) are a segment of their own, run uncompiled after the glue they came with: the glue of a
refresh step is then the glue of a compute step, compiled once for both, and a refresh compiles nothing that
compute steps did not (:func:`_writes_last`).

Cache-op nodes a rewrite inserts inside a block's node span (an attention cache's ``copy_``, the
delta of a block range's stream that leaves before the block ends) are moved after the block when no
node of the block needs them, or belong to the block when one does (a forecast read feeding the block),
so a block is one segment.

Example::

    >>> program = RegionalProgram(variant_gm, capture.spans, SegmentCache(compile_fn))  # doctest: +SKIP
    >>> flat_out = program(*leaves, *cache_buffers)                                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .backends import PerShape
from .passes.common import CACHE_WRITES
from .shapes import CanonicalInputs, canonical_inputs, fake_inputs

__all__ = ["GLUE", "WRITES", "RegionalProgram", "Segment", "SegmentCache", "partition", "structural_key"]

GLUE = ("glue",)
WRITES = ("cache writes",)  # a refresh's writes into the cache buffers, run uncompiled (see _writes_last)


@dataclass
class Segment:
    """One block (``label`` = (list fqn, index)), a run of glue (``label`` = :data:`GLUE`) or a refresh's cache
    writes (``label`` = :data:`WRITES`, run uncompiled)."""

    label: Tuple
    gm: fx.GraphModule
    inputs: List[int]  # environment slots read, in placeholder order
    outputs: List[int]  # environment slots written, in output order
    key: str = ""
    fn: Optional[Callable] = None
    # per input, its fake value in the variant graph (symbolic sizes of a dynamic capture); None: a parameter
    vals: List[Any] = field(default_factory=list)


def _in_place(node: fx.Node) -> bool:
    """Whether ``node`` is an op that writes one of its inputs (its schema is mutable)."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def _labels(gm: fx.GraphModule, spans: Dict[str, List[List[str]]]) -> Dict[fx.Node, Tuple]:
    owner = {name: (fqn, i) for fqn, per in spans.items() for i, names in enumerate(per) for name in names}
    labels: Dict[fx.Node, Tuple] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0] in labels:
            labels[node] = labels[node.args[0]]  # a multi-output node and its items stay together
        else:
            labels[node] = owner.get(node.name, GLUE)
    return labels


def _order(gm: fx.GraphModule, labels: Dict[fx.Node, Tuple]) -> List[fx.Node]:
    """The call_function nodes in an order where each block's nodes are contiguous.

    Glue inside a block's run is moved after the block unless a later node of the block needs it or
    mutates a tensor in place (then it joins the block, where it was). Falls back to graph order if
    that would break a dependency."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n in labels]
    last: Dict[Tuple, int] = {}
    inside: Dict[fx.Node, Tuple] = {}  # glue node -> the block whose run it interrupts
    current: Optional[Tuple] = None
    for k, n in enumerate(nodes):
        if labels[n] != GLUE:
            last[labels[n]] = k
    for k, n in enumerate(nodes):
        if labels[n] != GLUE:
            current = labels[n]
        elif current is not None and last[current] > k:
            inside[n] = current
    # the last in-place op of each block: glue before it is not moved past it (it might read what it mutates)
    last_mutation: Dict[Tuple, int] = {}
    for k, n in enumerate(nodes):
        if labels[n] != GLUE and _in_place(n):
            last_mutation[labels[n]] = k
    for k in range(len(nodes) - 1, -1, -1):  # users first: a chain of glue feeding the block joins it whole
        n = nodes[k]
        block = inside.get(n)
        if block is not None and (any(labels.get(u) == block for u in n.users)
                                  or last_mutation.get(block, -1) > k):
            labels[n] = block
    out: List[fx.Node] = []
    deferred: Dict[Tuple, List[fx.Node]] = {}
    for k, n in enumerate(nodes):
        lab = labels[n]
        if lab == GLUE and n in inside:
            deferred.setdefault(inside[n], []).append(n)  # emitted right after the block
            continue
        out.append(n)
        if lab != GLUE and last[lab] == k:
            out.extend(deferred.pop(lab, []))
    for rest in deferred.values():
        out.extend(rest)
    seen = set()
    for n in out:
        if any(a.op == "call_function" and a in labels and a not in seen for a in n.all_input_nodes):
            return nodes
        seen.add(n)
    return out


def _writes_last(order: List[fx.Node], labels: Dict[fx.Node, Tuple]) -> List[fx.Node]:
    """Move each run of glue's cache writes (nodes tagged :data:`~npu_cache_fx.passes.common.CACHE_WRITES` by the
    rewrite passes: a block range's ``delta = out - in`` and its copy into the cache buffer, an attention output's
    copy) to the end of the run, labelled :data:`WRITES`, so the glue around a refresh is the same graph as the
    glue of a compute step and is compiled once for both. The writes are sinks (nothing but other writes reads
    them), so running them last changes no value; a run where that does not hold (a write read by glue, glue
    mutating in place) is left whole.

    A :data:`WRITES` segment is not compiled: a few memory-bound ops into the cache buffers, run as they are."""
    out: List[fx.Node] = []
    run: List[fx.Node] = []

    def flush() -> None:
        writes = [n for n in run if CACHE_WRITES in n.meta]
        rest = [n for n in run if CACHE_WRITES not in n.meta]
        sinks = all(CACHE_WRITES in u.meta for w in writes for u in w.users)
        pure = not any(_in_place(n) for n in rest)
        if writes and sinks and pure:
            run[:] = rest + writes
            for n in writes:
                labels[n] = WRITES
        out.extend(run)
        run.clear()

    for n in order:
        if labels[n] == GLUE:
            run.append(n)
        else:
            flush()
            out.append(n)
    flush()
    return out


def _size_arithmetic(node: fx.Node) -> bool:
    """Python arithmetic on sizes (a dynamic capture's ``sym_size`` sums, products...): recomputed in each
    segment that needs it rather than handed over as an output, so blocks of one class stay one graph (Flux's
    first double block computes ``text + image`` tokens that the next blocks read)."""
    val = node.meta.get("val")
    return (node.op == "call_function" and node.target is not operator.getitem
            and getattr(node.target, "__module__", None) in ("_operator", "operator")
            and isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool))


def _is_view(node: fx.Node) -> bool:
    """An aten op whose output aliases its first input without writing it (``slice``, ``view``, ``select``...)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None or schema.is_mutable or len(schema.returns) != 1:
        return False
    alias = schema.returns[0].alias_info
    return alias is not None and not alias.is_write


def _mutated(node: fx.Node) -> bool:
    """Whether some user of ``node`` writes it in place."""
    return any(_in_place(u) and u.args and u.args[0] is node for u in node.users)


_CASTS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device}


def _no_op_cast(node: fx.Node) -> bool:
    """``x.to(dtype)`` to the dtype and device ``x`` has: ``x`` itself."""
    if node.target not in _CASTS or node.kwargs.get("copy") or node.kwargs.get("memory_format") not in (
            None, torch.preserve_format) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    out, src = node.meta.get("val"), node.args[0].meta.get("val")
    return (isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and out.dtype == src.dtype
            and out.device == src.device)


def _free_views(gm: fx.GraphModule, labels: Dict[fx.Node, Tuple]) -> Tuple[set, set]:
    """Views in blocks that the segments reading them recompute, so blocks of one class stay one graph (a view
    costs nothing to recompute). Returns ``(views, casts)``:

    * ``views``: views a block computes only for what comes after it. Flux's and HunyuanVideo's single-stream
      blocks end by splitting their joint stream (``x[:, :text]``, ``x[:, text:]``): the block hands over the
      tensor they view, and the last block, whose unused text view export removed, is the same graph as the
      others;
    * ``casts``: no-op casts (``temb.float()`` of an fp32 ``temb`` is ``temb``), read as their input. Export
      traces the next block's use of ``temb`` as this block's cast, so every block but the last handed it on
      (Wan).

    Never a view the graph returns, nor one of a tensor written in place."""
    views, casts = set(), set()
    for node in reversed(list(gm.graph.nodes)):
        label = labels.get(node)
        if label is None or label == GLUE or not _is_view(node) or _mutated(node):
            continue
        base = node.args[0] if node.args else None
        if not isinstance(base, fx.Node) or _mutated(base) or any(u.op == "output" for u in node.users):
            continue
        if _no_op_cast(node):
            casts.add(node)
        elif labels.get(base) == label and all(u.op == "call_function" and (u in views or (
                u in labels and labels[u] != label)) for u in node.users):
            views.add(node)
    return views, casts


def _symbol(size: Any) -> Any:
    return size.node.expr if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol else None


def _input_symbols(gm: fx.GraphModule) -> Dict[Any, fx.Node]:
    """A dynamic capture's input symbols, each with a graph input that has it as a size."""
    out: Dict[Any, fx.Node] = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            for size in val.shape:
                sym = _symbol(size)
                if sym is not None:
                    out.setdefault(sym, node)
    return out


def _unbound_symbols(vals: Sequence[Any], by_symbol: Dict[Any, fx.Node]) -> List[Any]:
    """Symbols in the sizes of a segment's inputs that no input provides as a size of its own (inductor binds
    a symbol from an input's size or a SymInt input: ``s1 + s2`` rows alone do not give ``s1``, ``s2``). The
    graph input that has each one becomes an input of the segment too."""
    if not by_symbol:
        return []
    used, bound = set(), set()
    for val in vals:
        if isinstance(val, torch.Tensor):
            for size in list(val.shape) + list(val.stride()):
                if isinstance(size, torch.SymInt):
                    used |= size.node.expr.free_symbols
            bound |= {sym for sym in map(_symbol, val.shape) if sym is not None}
        elif isinstance(val, torch.SymInt):
            used |= val.node.expr.free_symbols
            if _symbol(val) is not None:
                bound.add(_symbol(val))
    return sorted((s for s in used - bound if s in by_symbol), key=str)


def partition(gm: fx.GraphModule, spans: Dict[str, List[List[str]]]) -> Tuple[List[Segment], List[Any], List[Any], int]:
    """Cut ``gm`` into segments. Returns ``(segments, constants, outputs, n_inputs)``:

    the environment is ``[*placeholder values, *constants, *segment outputs]``; ``constants`` are the
    ``get_attr`` targets (the model's parameters and buffers);
    ``outputs`` is, per graph output, an environment slot (int) or ``("const", value)``.
    """
    labels = _labels(gm, spans)
    by_symbol = _input_symbols(gm)
    views, casts = _free_views(gm, labels)
    free = {n for n in labels if _size_arithmetic(n)} | views | casts
    for n in free:  # recomputed by every segment that reads it (see _size_arithmetic, _free_views)
        del labels[n]
    order = _writes_last(_order(gm, labels), labels)
    slot: Dict[fx.Node, int] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n in placeholders:
        slot[n] = len(slot)
    constants: List[str] = []
    submodules: Dict[fx.Node, torch.nn.Module] = {}  # get_attr of a module (export's autocast / grad-mode HOPs)
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj: Any = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.nn.Module):
                submodules[n] = obj
                continue
            slot[n] = len(placeholders) + len(constants)
            constants.append(n.target)
    runs: List[Tuple[Tuple, List[fx.Node]]] = []
    for n in order:
        if not runs or runs[-1][0] != labels[n]:
            runs.append((labels[n], []))
        runs[-1][1].append(n)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    # which nodes are read after each run (by later runs or the output)
    run_of = {n: r for r, (_, members) in enumerate(runs) for n in members}

    def readers(node: fx.Node, memo: Dict[fx.Node, set] = {}) -> set:  # noqa: B006 - per call of partition
        """The runs that recompute a free node (they read its inputs)."""
        if node not in memo:
            memo[node] = set()
            for u in node.users:
                memo[node] |= readers(u) if u in free else ({run_of[u]} if u in run_of else {-1})
        return memo[node]
    segments: List[Segment] = []
    next_slot = len(placeholders) + len(constants)
    for r, (label, members) in enumerate(runs):
        member_set = set(members)
        graph = fx.Graph()
        root = torch.nn.Module()
        env: Dict[fx.Node, fx.Node] = {}
        inputs: List[int] = []
        vals: List[Any] = []

        def arg(a: fx.Node) -> fx.Node:
            if a in env:
                return env[a]
            if a in casts:  # x itself
                env[a] = arg(a.args[0])
                return env[a]
            if a in free:
                args = fx.map_arg(a.args, arg)
                kwargs = fx.map_arg(a.kwargs, arg)
                env[a] = graph.create_node("call_function", a.target, args, kwargs,
                                           name=f"s{sum(1 for x in env if x in free)}")
                return env[a]
            if a in submodules:  # a module stays an attribute of the segment (part of its structural key)
                name = f"sub{sum(1 for _ in root.children())}"
                root.add_module(name, submodules[a])
                env[a] = graph.get_attr(name)
                return env[a]
            ph = graph.placeholder(f"i{len(inputs)}")
            inputs.append(slot[a])
            vals.append(None if a.op == "get_attr" else a.meta.get("val"))
            env[a] = ph
            return ph

        for k, n in enumerate(members):
            args = fx.map_arg(n.args, lambda a: env[a] if a in member_set else arg(a))
            kwargs = fx.map_arg(n.kwargs, lambda a: env[a] if a in member_set else arg(a))
            env[n] = graph.create_node("call_function", n.target, args, kwargs, name=f"n{k}")
        for sym in _unbound_symbols(vals, by_symbol):  # a dynamic capture: sizes the segment cannot derive
            arg(by_symbol[sym])
        live = [n for n in members if any(u is output_node or (u in run_of and run_of[u] != r)
                                          or (u in free and readers(u) - {r}) for u in n.users)]
        graph.output(tuple(env[n] for n in live))
        outputs = []
        for n in live:
            slot[n] = next_slot
            outputs.append(next_slot)
            next_slot += 1
        seg_gm = fx.GraphModule(root, graph, class_name="Segment")
        segments.append(Segment(label, seg_gm, inputs, outputs, vals=vals))
    (flat,) = output_node.args
    outs = [slot[a] if isinstance(a, fx.Node) else ("const", a) for a in flat]
    return segments, constants, outs, len(placeholders)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}{tuple(value.stride())}{value.dtype}{value.device}{value.requires_grad}"
    return f"V{type(value).__name__}:{value!r}"


def symbolic_example(segment: Segment, env: Sequence[Any]) -> Tuple[List[Any], Optional[CanonicalInputs]]:
    """The inputs a dynamic capture's segment is compiled for: for a block, one fresh symbol per distinct symbolic
    size (:func:`npu_cache_fx.shapes.canonical_inputs`, returned too); for glue, or where that does not apply, the
    symbolic values of the variant graph (:func:`npu_cache_fx.shapes.fake_inputs`, and None). Parameters have
    static shapes.

    Glue keeps the capture's symbols: its inputs are mostly the model's own (plain symbols already), it is
    compiled once per variant, and tracing with fresh symbols costs more (the capture's shape environment has
    answered the same questions during export): every segment canonical made inductor's cold compile of
    tiny-flux's variants 13 % longer for no faster step."""
    real = [env[i] for i in segment.inputs]
    canonical = canonical_inputs(segment.vals, real) if segment.label != GLUE else None
    if canonical is not None:
        return canonical.example, canonical
    return fake_inputs(segment.vals, real), None


def structural_key(segment: Segment, example: Sequence[Any]) -> str:
    """Hash of a segment's graph code (canonical names, parameters as inputs), its inputs' metadata (shape,
    stride, dtype, device, requires_grad, which inputs are the same tensor) and the grad mode: everything a
    compiled segment is specialised on."""
    h = hashlib.sha256(segment.gm.code.encode())
    for name, sub in segment.gm.named_children():  # export's HOP bodies (autocast regions)
        h.update(f"{name}:{getattr(sub, 'code', repr(sub))}".encode())
        if not isinstance(sub, fx.GraphModule) or any(True for _ in sub.parameters()) or any(
                True for _ in sub.buffers()):
            h.update(f"id{id(sub)}".encode())  # weights inside: never shared with another module's
    first: Dict[int, int] = {}
    for k, value in enumerate(example):
        h.update(_describe(value).encode())
        if isinstance(value, torch.Tensor):
            h.update(f"@{first.setdefault(id(value), k)}".encode())
        if isinstance(value, FakeTensor) and not getattr(value.fake_mode, "npu_cache_fx_canonical", False):
            h.update(f"env{id(value.fake_mode)}".encode())  # symbols named per capture: its environment is in the key
    h.update(f"grad={torch.is_grad_enabled()}".encode())
    return h.hexdigest()[:16]


def _holds(assumptions: Sequence[Any], hints: Dict[str, int]) -> bool:
    for expr in assumptions:
        if any(str(sym) not in hints for sym in expr.free_symbols):
            return False
        if sympy.sympify(expr.xreplace({sym: hints[str(sym)] for sym in expr.free_symbols})) is not sympy.true:
            return False
    return True


@dataclass
class SegmentCache:
    """Compiled segments by structural key, shared by every variant (and input shape) of one module.

    A segment compiled for canonical inputs (fresh symbols) serves another segment with the same key only
    where what its compile assumed of the symbols (a guard, a specialised size) holds at that segment's sizes;
    elsewhere the segment is compiled again under the key with a version suffix (``<key>.1``...).
    """

    compile_fn: Callable[[fx.GraphModule, List[Any]], Callable]  # (segment graph, example inputs)
    compiled: Dict[str, Callable] = field(default_factory=dict)
    hits: int = 0
    # key of a segment compiled for canonical inputs -> what the compile assumed of their fresh symbols
    assumptions: Dict[str, List[Any]] = field(default_factory=dict)

    def get(self, segment: Segment, example: Sequence[Any],
            canonical: Optional[CanonicalInputs] = None) -> Tuple[Callable, bool]:
        """The compiled callable for ``segment`` and whether it was new (``example``: real inputs, or the
        fake inputs with symbolic sizes of a dynamic capture's segment; ``canonical``: those inputs when they
        are canonical, :func:`npu_cache_fx.shapes.canonical_inputs`)."""
        base = structural_key(segment, example)
        key, version = base, 0
        while key in self.compiled:
            if canonical is None or _holds(self.assumptions.get(key, ()), canonical.hints):
                segment.key = key
                self.hits += 1
                return self.compiled[key], False
            version += 1
            key = f"{base}.{version}"
        segment.key = key
        symbolic = any(isinstance(v, (FakeTensor, torch.SymInt)) for v in example)
        fn = self.compiled[key] = self.compile_fn(segment.gm, list(example), **({"symbolic": True} if symbolic else {}))
        if canonical is not None and not isinstance(fn, PerShape):  # its guards, the sizes it unified or specialised
            env = canonical.shape_env
            self.assumptions[key] = [g.expr for g in env.guards] + [
                sympy.Eq(sym, value) for sym, value in env.replacements.items() if sym != value]
        return fn, True


class RegionalProgram:
    """A variant run as its segments, each a compiled callable shared with every equal segment.

    Segments are bound to compiled callables on the first call (their structural key includes the
    inputs' shapes), so the first call compiles what no earlier variant compiled.
    """

    def __init__(self, gm: fx.GraphModule, spans: Dict[str, List[List[str]]], cache: SegmentCache,
                 symbolic: bool = False):
        self.gm = gm
        # a dynamic capture's variant: segments compiled for its symbolic sizes (keyed by them), run at any size
        self.symbolic = symbolic
        self.segments, self.constants, self.outputs, self.n_inputs = partition(gm, spans)
        self.template: List[Any] = [None] * (self.n_inputs + len(self.constants) + sum(
            len(s.outputs) for s in self.segments))
        self.refresh_constants()
        self.cache = cache
        self.bound = False
        self.compiled_new = 0  # segments this program compiled (first to need them)
        self.shared = 0  # segments it found compiled already
        self.first_call_seconds: Optional[float] = None

    def refresh_constants(self) -> None:
        """Read the parameters and buffers again (``.to()`` replaces buffers)."""
        for k, target in enumerate(self.constants):
            obj: Any = self.gm
            for part in target.split("."):
                obj = getattr(obj, part)
            self.template[self.n_inputs + k] = obj

    @property
    def blocks(self) -> int:
        return sum(1 for s in self.segments if s.label not in (GLUE, WRITES))

    def _bind(self, env: List[Any]) -> None:
        for seg in self.segments:
            example = [env[i] for i in seg.inputs]
            if seg.label == WRITES:  # not compiled (see _writes_last)
                seg.fn = seg.gm
            else:
                compile_for, canonical = symbolic_example(seg, env) if self.symbolic else (example, None)
                seg.fn, new = self.cache.get(seg, compile_for, canonical)
                if canonical is not None:
                    self._assume(seg, canonical)
                self.compiled_new += new
                self.shared += not new
            outs = seg.fn(*example)
            for j, v in zip(seg.outputs, outs):
                env[j] = v
        self.bound = True

    def _assume(self, seg: Segment, canonical: CanonicalInputs) -> None:
        """Add what the code compiled for ``seg``'s canonical inputs assumes (in the capture's symbols) to the
        capture's guards: the runtime checks them for this call's sizes (``_still_binds``) and for every later
        size the capture would serve (:func:`npu_cache_fx.shapes.bind`)."""
        from torch._guards import ShapeGuard, SLoc
        shape_env = canonical.capture_env
        known = {g.expr for g in shape_env.guards}
        for expr in canonical.guards(self.cache.assumptions.get(seg.key, [])):
            if expr not in known:
                known.add(expr)
                shape_env.guards.append(ShapeGuard(expr, SLoc(f"npu_cache_fx segment {seg.key}", None), False))

    # Opaque to Dynamo: under ``torch.compile(optimize(model, plan, backend=B))`` these segments are compiled
    # already, and tracing the binding code (compiling on the first call) recompiled per segment up to Dynamo's
    # limit
    @torch._dynamo.disable
    def __call__(self, *args):
        env = list(self.template)
        env[:self.n_inputs] = args
        if not self.bound:
            start = time.perf_counter()
            self._bind(env)
            self.first_call_seconds = time.perf_counter() - start
        else:
            for seg in self.segments:
                outs = seg.fn(*[env[i] for i in seg.inputs])
                for j, v in zip(seg.outputs, outs):
                    env[j] = v
        return tuple(env[o] if isinstance(o, int) else o[1] for o in self.outputs)
