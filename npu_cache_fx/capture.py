"""Model -> fx GraphModule, plus the node span of every block and the regions passes rewrite.

Capture uses ``torch.export.export(..., strict=False)`` (``symbolic_trace``
fails on diffusers DiTs). Every ``call_function`` node carries
``nn_module_stack``; a block's span is the nodes whose stack contains the
block's fqn. Nothing here rewrites a graph: passes consume :class:`Region`.

Example::

    >>> cap = capture(model, {"hidden_states": x, ...}, ["transformer_blocks"])  # doctest: +SKIP
    >>> region = block_region(cap, "transformer_blocks", 1, 3)                   # doctest: +SKIP
    >>> [(s.role, s.input, s.output) for s in region.streams]                    # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from .config import ConfigError

__all__ = [
    "AttentionSite", "BlockList", "Capture", "Region", "Stream", "TRACING", "TraceLock", "attention_children",
    "attention_sites", "block_region", "capture", "choose_attention", "exporting", "find_block_lists",
    "module_nodes", "region_from_nodes", "residual_sources", "resolve_block_list", "walk_back",
]

log = logging.getLogger(__name__)
aten = torch.ops.aten


class TraceLock:
    """The order, process-wide, between tracing and running what was traced.

    ``torch.export`` and AOTAutograd's tracing (a compile) install process-wide dispatch modes, patches and
    flags: two at once fail (``ProxyTorchDispatchMode slot already occupied``, ``Trying to pop empty mode
    stack``), and while one runs, any ``torch._dynamo.disable``-d function in another thread raises ("Detected
    that you are using FX to symbolically trace a dynamo-optimized function"). So:

    * :meth:`exclusive` (a capture, a compile): alone in the process;
    * :meth:`shared` (a call of an optimized module): any number at once, never during an exclusive section.

    A thread inside :meth:`shared` that enters :meth:`exclusive` (a call that captures or compiles) steps out
    of its shared hold while it waits and takes it again after; the module lock it holds keeps its own state
    consistent. Writers waiting go before new readers. Both nest within a thread.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer: Optional[int] = None
        self._waiting = 0
        self._local = threading.local()

    def _state(self):
        loc = self._local
        if not hasattr(loc, "depth"):
            loc.depth, loc.reader, loc.exclusive = 0, False, 0
        return loc

    def shared(self) -> "_Shared":
        return _Shared(self)

    def _enter_shared(self, loc) -> None:
        with self._cond:
            while self._writer is not None or self._waiting:
                self._cond.wait()
            self._readers += 1
            loc.reader = True

    @contextlib.contextmanager
    def exclusive(self):
        loc = self._state()
        if loc.exclusive:
            loc.exclusive += 1
            try:
                yield
            finally:
                loc.exclusive -= 1
            return
        stepped_out = loc.reader
        with self._cond:
            if stepped_out:
                self._readers -= 1
                loc.reader = False
            self._waiting += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._writer = threading.get_ident()
        loc.exclusive = 1
        try:
            yield
        finally:
            loc.exclusive = 0
            with self._cond:
                self._writer = None
                self._cond.notify_all()
            if stepped_out:
                self._enter_shared(loc)


class _Shared:
    """:meth:`TraceLock.shared` (a class, not a generator: it is entered on every call of a module)."""

    __slots__ = ("lock", "loc")

    def __init__(self, lock: TraceLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        loc = self.loc = self.lock._state()
        loc.depth += 1
        if loc.depth == 1 and not loc.exclusive:
            try:
                self.lock._enter_shared(loc)
            except BaseException:
                loc.depth -= 1
                raise

    def __exit__(self, *exc: Any) -> None:
        loc, lock = self.loc, self.lock
        loc.depth -= 1
        if loc.depth == 0 and loc.reader:
            with lock._cond:
                lock._readers -= 1
                loc.reader = False
                if not lock._readers:
                    lock._cond.notify_all()


TRACING = TraceLock()


@contextlib.contextmanager
def exporting():
    """Around a ``torch.export.export`` call: alone in the process (:data:`TRACING`), without stack traces.

    Stack traces (``node.meta["stack_trace"]``: the ``# File:`` comments in graph code and in a compiler's error
    messages) are about a sixth of an export's time and nothing here reads them: they are recorded only when
    this module logs at DEBUG (and by a torch without ``torch.fx.config.do_not_emit_stack_traces``)."""
    import torch.fx.config as fx_config
    with TRACING.exclusive():
        if log.isEnabledFor(logging.DEBUG) or not hasattr(fx_config, "do_not_emit_stack_traces"):
            yield
            return
        before = fx_config.do_not_emit_stack_traces
        fx_config.do_not_emit_stack_traces = True
        try:
            yield
        finally:
            fx_config.do_not_emit_stack_traces = before


# ----------------------------------------------------------------------------- block lists
@dataclass(frozen=True)
class BlockList:
    fqn: str
    count: int
    params: int
    block_class: str


def find_block_lists(model: torch.nn.Module) -> List[BlockList]:
    """ModuleLists of same-class composite blocks, largest (by parameters) first.

    Lists nested inside another candidate (e.g. a block's ``to_out``) are left out.
    """
    found: List[BlockList] = []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)) or len(mod) == 0:
            continue
        children = list(mod)
        classes = {type(c) for c in children}
        if len(classes) != 1 or not any(True for _ in children[0].children()):
            continue
        params = sum(p.numel() for p in mod.parameters())
        if params == 0:
            continue
        if any(name.startswith(b.fqn + ".") for b in found):
            continue
        found.append(BlockList(name, len(children), params, type(children[0]).__name__))
    return sorted(found, key=lambda b: -b.params)


def resolve_block_list(model: torch.nn.Module, blocks: Optional[str]) -> BlockList:
    """The block list named by ``blocks``, or the one that dominates the parameters."""
    candidates = find_block_lists(model)
    if blocks is not None:
        try:
            mod = model.get_submodule(blocks)
        except AttributeError:
            mod = None
        if not isinstance(mod, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise ConfigError(
                f"CacheConfig.blocks={blocks!r} is not a ModuleList of {type(model).__name__}; "
                f"candidates: {[b.fqn for b in candidates] or 'none found'}")
        params = sum(p.numel() for p in mod.parameters())
        return BlockList(blocks, len(mod), params, type(mod[0]).__name__ if len(mod) else "?")
    if not candidates:
        lists = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)]
        raise ConfigError(
            f"no block list found in {type(model).__name__} (ModuleLists: {lists or 'none'}); "
            "pass CacheConfig(blocks='<module path of the ModuleList of transformer blocks>')")
    if len(candidates) > 1:
        log.info("auto-selected block list %r (%d x %s, %d params); others: %s", candidates[0].fqn,
                 candidates[0].count, candidates[0].block_class, candidates[0].params,
                 [(b.fqn, b.params) for b in candidates[1:]])
    return candidates[0]


# ----------------------------------------------------------------------------- capture
@dataclass
class Capture:
    """A captured forward: flat-input GraphModule, pytree specs and block spans.

    ``gm`` takes the flattened leaves of the normalised kwargs (in ``in_spec``
    order) and returns the flat output leaves (``out_spec``).
    """

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    spans: Dict[str, List[List[str]]]  # list fqn -> per block, node names in graph order
    signatures: Dict[str, Dict[str, str]]  # block fqn -> {input node name: parameter name}
    seconds: float = 0.0
    method: str = "export"
    meta: Dict[str, Any] = field(default_factory=dict)

    def nodes(self) -> Dict[str, fx.Node]:
        return {n.name: n for n in self.gm.graph.nodes}


def _flat_graph_module(root: fx.GraphModule) -> fx.GraphModule:
    """Copy ``root``'s graph with the plain codegen (flat inputs/outputs), dropping export's guard call."""
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    for node in root.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if node.op == "output":
            (flat,) = node.args
            graph.output(tuple(env[a] if isinstance(a, fx.Node) else a for a in flat))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    gm = fx.GraphModule(root, graph, class_name="CapturedForward")
    return gm


def _block_signatures(ep, block_fqns: Sequence[str], model: torch.nn.Module) -> Dict[str, Dict[str, str]]:
    out: Dict[str, Dict[str, str]] = {}
    for entry in ep.module_call_graph:
        if entry.fqn not in block_fqns or entry.signature is None:
            continue
        sig = entry.signature
        try:
            args, kwargs = pytree.tree_unflatten(list(range(len(sig.inputs))), sig.in_spec)
            params = list(inspect.signature(model.get_submodule(entry.fqn).forward).parameters)
        except Exception:  # signature naming is a convenience; dataflow decides
            continue
        names: Dict[str, str] = {}
        for i, leaf in enumerate(args):
            if isinstance(leaf, int) and i < len(params):
                names[getattr(sig.inputs[leaf], "name", "")] = params[i]
        for key, leaf in kwargs.items():
            if isinstance(leaf, int):
                names[getattr(sig.inputs[leaf], "name", "")] = key
        out[entry.fqn] = {k: v for k, v in names.items() if k}
    return out


def _block_outputs(ep, block_fqns: Sequence[str]) -> Dict[str, List[Optional[str]]]:
    """Block fqn -> the node name of each flat return value in return order (None: not a tensor)."""
    out: Dict[str, List[Optional[str]]] = {}
    for entry in ep.module_call_graph:
        if entry.fqn in block_fqns and entry.signature is not None:
            out[entry.fqn] = [a.name if type(a).__name__ == "TensorArgument" else None
                              for a in entry.signature.outputs]
    return out


def _spans(gm: fx.GraphModule, model: torch.nn.Module, lists: Sequence[str]) -> Dict[str, List[List[str]]]:
    spans: Dict[str, List[List[str]]] = {}
    for fqn in lists:
        count = len(model.get_submodule(fqn))
        per_block: List[List[str]] = [[] for _ in range(count)]
        prefix = fqn + "."
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if not stack or node.op != "call_function":
                continue
            for path, _cls in stack.values():
                if path.startswith(prefix):
                    head = path[len(prefix):].split(".", 1)[0]
                    if head.isdigit() and int(head) < count:
                        per_block[int(head)].append(node.name)
                    break
        spans[fqn] = per_block
    return spans


def capture(model: torch.nn.Module, kwargs: Mapping[str, Any], block_lists: Sequence[str],
            dynamic: bool = False) -> Capture:
    """Export ``model(**kwargs)`` to a flat GraphModule and find each block's node span.

    ``dynamic``: every input dimension ``Dim.AUTO`` (:mod:`npu_cache_fx.shapes`); ``cap.meta["dynamic"]`` is
    then the :class:`~npu_cache_fx.shapes.DynamicShapes` of the inputs, or None when export specialised
    every dimension. Raises what export raises.
    """
    start = time.perf_counter()
    block_fqns = tuple(f"{fqn}.{i}" for fqn in block_lists for i in range(len(model.get_submodule(fqn))))
    kwargs = dict(kwargs)
    extra: Dict[str, Any] = {}
    if dynamic:
        from .shapes import dynamic_shapes_spec
        extra["dynamic_shapes"] = dynamic_shapes_spec(kwargs)
    # Dim.AUTO on a size-1 dimension (a batch of 1) is specialised with a warning per input: expected here
    quiet = logging.getLogger("torch._export.non_strict_utils")
    level = quiet.level
    if dynamic:
        quiet.setLevel(logging.ERROR)
    try:
        with exporting():
            ep = _export(model, kwargs, block_fqns, extra)
    finally:
        quiet.setLevel(level)
    root = ep.module()
    info = root.graph._codegen.pytree_info
    gm = _flat_graph_module(root)
    spans = _spans(gm, model, block_lists)
    # Blocks a call skips (SD3's skip_layers, a list used only for some inputs) have empty spans; a
    # range of them is left uncached in this capture (see block_region / runtime._target).
    sigs = _block_signatures(ep, block_fqns, model)
    cap = Capture(gm, info.in_spec, info.out_spec, spans, sigs, time.perf_counter() - start)
    cap.meta["block_outputs"] = _block_outputs(ep, block_fqns)  # return order, for forward-pattern reports
    if dynamic:
        from .shapes import DynamicShapes
        vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
        cap.meta["dynamic"] = DynamicShapes.from_placeholders(vals, ep.range_constraints)
    log.info("captured %s in %.2fs (%d nodes)", type(model).__name__, cap.seconds, len(gm.graph.nodes))
    return cap


def _export(model: torch.nn.Module, kwargs: Dict[str, Any], block_fqns: Sequence[str], extra: Dict[str, Any]):
    try:
        return torch.export.export(model, (), kwargs, strict=False, preserve_module_call_signature=block_fqns,
                                   **extra)
    except Exception as err:  # preserving signatures is only for naming; retry plain
        log.debug("export with preserved block signatures failed (%s); retrying without", err)
        return torch.export.export(model, (), kwargs, strict=False, **extra)


# ----------------------------------------------------------------------------- regions
@dataclass(frozen=True)
class Stream:
    """A stream carried through a region: ``output`` continues ``input``."""

    role: str
    input: str
    output: str


@dataclass(frozen=True)
class Region:
    """A set of nodes with the streams it carries and the side inputs it reads."""

    label: str
    nodes: frozenset
    streams: Tuple[Stream, ...]
    side_inputs: Tuple[str, ...]


# No-op casts and copies: a region input seen through one of these is still that input.
_ALIASING = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.alias.default,
    aten.detach.default, aten.contiguous.default, aten.clone.default, aten.type_as.default,
}
# What a residual stream may pass through and still continue its input: the casts, and the clamps
# fp16 Flux / Qwen-Image blocks apply to their outputs (``clip(-65504, 65504)``).
_PASS_THROUGH = _ALIASING | {aten.clamp.default, aten.clamp.Tensor, aten.clip.default, aten.clip.Tensor}
_MAX = 2 ** 62
_STREAM_ROLES = ("hidden_states", "encoder_hidden_states")  # a block's stream parameters (diffusers' names)


def _size(s: Any) -> Any:
    """A size as an int, or its sympy expression when symbolic (a dynamic capture): comparable, addable."""
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_Integer else expr
    return s


def _shape(node: fx.Node):
    val = node.meta.get("val")
    return tuple(_size(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _index(arg: Any) -> Any:
    """A slice bound: an int, the expression of a ``sym_size`` node's value, or None (not a size)."""
    if isinstance(arg, fx.Node):
        val = arg.meta.get("val")
        return _size(val) if isinstance(val, (int, torch.SymInt)) else None
    return arg if isinstance(arg, int) else None


def _negative(x: Any) -> bool:
    return isinstance(x, int) and x < 0


def _clip(x: Any, size: Any) -> Any:
    """``min(size, x)`` for a slice end: the huge ints export writes for an open end mean ``size``."""
    if isinstance(x, int) and (x >= _MAX or (isinstance(size, int) and x > size)):
        return size
    return x


def walk_back(node: Any, window, region: frozenset, inputs: frozenset) -> Optional[fx.Node]:
    """The region input that ``node`` continues along a residual path, or None.

    Follows residual adds, dtype casts and clamps, and resolves ``slice`` of
    ``cat`` by offsets (a concatenated joint stream split back apart).
    ``window`` is a pending ``(dim, start, end)`` slice of ``node``.
    An add whose two terms continue two different inputs continues neither.
    """
    return next(iter(_walk(node, window, region, inputs, every=False)), None)


def residual_sources(node: Any, region: frozenset, inputs: frozenset) -> frozenset:
    """Every region input that ``node`` continues along some residual path: an add continues both of its terms
    (ControlNet's ``hidden + residual`` between the blocks of a range reaches the residual input as well as the
    stream)."""
    return _walk(node, None, region, inputs, every=True)


def _walk(node: Any, window, region: frozenset, inputs: frozenset, every: bool) -> frozenset:
    if not isinstance(node, fx.Node):
        return frozenset()
    if node.name not in region:
        return frozenset([node]) if node.name in inputs and window is None else frozenset()
    target = node.target
    if target in _PASS_THROUGH:
        return _walk(node.args[0], window, region, inputs, every)
    if target in (aten.add.Tensor, aten.add_.Tensor):
        hits = frozenset().union(*(_walk(a, window, region, inputs, every) for a in node.args[:2]))
        return hits if every or len(hits) == 1 else frozenset()
    if target is aten.slice.Tensor:
        src = node.args[0]
        shape = _shape(src)
        if shape is None:
            return frozenset()
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim % len(shape)
        lo = _index(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
        hi = _index(node.args[3]) if len(node.args) > 3 and node.args[3] is not None else _MAX
        step = node.args[4] if len(node.args) > 4 else 1
        if step != 1 or lo is None or hi is None:
            return frozenset()
        size = shape[dim]
        lo = lo + size if _negative(lo) else lo
        lo = max(0, lo) if isinstance(lo, int) else lo
        hi = _clip(hi + size if _negative(hi) else hi, size)
        if window is not None:
            if window[0] != dim:
                return frozenset() if (lo, hi) != (0, size) else _walk(src, window, region, inputs, every)
            lo, hi = lo + window[1], lo + window[2]
        if (lo, hi) == (0, size):
            return _walk(src, None, region, inputs, every)
        return _walk(src, (dim, lo, hi), region, inputs, every)
    if target is aten.cat.default and window is not None:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else 0
        rank = len(_shape(node) or ())
        if rank == 0 or window[0] != dim % rank:
            return frozenset()
        offset = 0
        for part in parts:
            size = (_shape(part) or (None,) * rank)[window[0]]
            if size is None:
                return frozenset()
            if (offset, offset + size) == (window[1], window[2]):
                return _walk(part, None, region, inputs, every)
            offset += size
    return frozenset()


def _convex_closure(gm: fx.GraphModule, names: set) -> set:
    """Add the nodes sandwiched between region nodes (code between blocks of the range)."""
    order = list(gm.graph.nodes)
    idx = {n.name: i for i, n in enumerate(order)}
    lo, hi = min(idx[n] for n in names), max(idx[n] for n in names)
    window = order[lo:hi + 1]
    after = set(names)
    for node in window:
        if node.name not in after and any(a.name in after for a in node.all_input_nodes):
            after.add(node.name)
    before = set(names)
    for node in reversed(window):
        if node.name not in before and any(u.name in before for u in node.users):
            before.add(node.name)
    return set(names) | (after & before)


def _peel_aliases(gm: fx.GraphModule, names: set) -> Tuple[set, Dict[str, str]]:
    """Move no-op casts of region inputs out of the region; map each to the input it aliases.

    Export rebinds a tensor to the node of a no-op ``x.float()``/``x.to(dtype)`` that returns
    ``x`` itself, so code after a block reads a node inside the block's span (Wan's and
    HunyuanDiT's ``temb``, HunyuanDiT's long-skip tensors). Left in the region, such a node is
    an output that "continues" its input with a zero delta (a wasted stream) or a second
    output of one input (an error). Outside, it is a side input that is always computed.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    peeled: Dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.name not in names or node.target not in _ALIASING or not node.args:
            continue
        src = node.args[0]
        val, src_val = node.meta.get("val"), getattr(src, "meta", {}).get("val")
        if not (isinstance(val, torch.Tensor) and isinstance(src_val, torch.Tensor)
                and (val.dtype, _shape(node), val.device) == (src_val.dtype, _shape(src), src_val.device)):
            continue
        if all(a.name not in names or a.name in peeled for a in node.all_input_nodes):
            peeled[node.name] = peeled.get(src.name, src.name)
    # Only the chains that reach a user outside the region; the others stay inside.
    keep: set = set()
    for name in reversed(list(peeled)):
        if any(u.name not in names or u.name in keep for u in by_name[name].users):
            keep.add(name)
    return names - keep, {k: peeled[k] for k in keep}


def _peel_sizes(gm: fx.GraphModule, names: set) -> set:
    """Move size arithmetic on values from outside the region out of it (a dynamic capture).

    Export records the symbolic sizes a block computes from its inputs (``sym_size`` of the joint stream's
    parts, their sum) inside the block's span; the sum is read after the block too. Outside the region it is
    computed whatever a step does (a few scalar ops), not an output of the range.
    """
    names = set(names)
    for node in gm.graph.nodes:
        if (node.name in names and node.op == "call_function"
                and isinstance(node.meta.get("val"), (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))
                and all(a.name not in names for a in node.all_input_nodes)):
            names.discard(node.name)
    return names


_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default, aten.tensor_split.sections,
           aten.tensor_split.indices, aten.unbind.int}


def _peel_shards(gm: fx.GraphModule, names: set, roles: Optional[Mapping[str, str]]) -> Tuple[set, Dict[str, str]]:
    """Move splits of region inputs (and their ``getitem``s) out of the region; a piece keeps its input's role.

    diffusers' context parallelism shards the sequence in a pre-forward hook of the first block
    (``x.chunk(world, dim)[rank]``), which export records inside that block's span: left there, the
    range's output continues the rank's shard, not a range input, and cannot be paired. Outside,
    the shard is the stream's input (any other split of an input just becomes a side input).
    """
    names, roles = set(names), dict(roles or {})
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        if node.name in names and node.target in _SPLITS and isinstance(src, fx.Node) and src.name not in names:
            names.discard(node.name)
            for user in node.users:
                if user.target is operator.getitem:
                    names.discard(user.name)
                    if src.name in roles:
                        roles.setdefault(user.name, roles[src.name])
    return names, roles


def region_from_nodes(gm: fx.GraphModule, names: set, label: str,
                      roles: Optional[Mapping[str, str]] = None) -> Region:
    """Build a :class:`Region` from node names: pair its outputs with its inputs by dataflow."""
    names, roles = _peel_shards(gm, _convex_closure(gm, set(names)), roles)
    names = _peel_sizes(gm, names)
    names, aliases = _peel_aliases(gm, names)
    roles = {**{k: (roles or {}).get(v) for k, v in aliases.items() if (roles or {}).get(v)}, **(roles or {})}
    region = frozenset(names)
    by_name = {n.name: n for n in gm.graph.nodes}
    inputs: List[str] = []
    outputs: List[fx.Node] = []
    for name in sorted(region, key=list(by_name).index):
        node = by_name[name]
        for a in node.all_input_nodes:
            if a.name not in region and a.name not in inputs and a.op != "get_attr":
                inputs.append(a.name)
        if any(u.name not in region for u in node.users):
            outputs.append(node)
    input_set = frozenset(inputs)
    roots = {i: aliases.get(i, i) for i in inputs}
    sources = {}
    for out in outputs:
        src = walk_back(out, None, region, input_set)
        if src is None or roles.get(roots[src.name]) not in _STREAM_ROLES:
            # an add of a side input (ControlNet's residual between two blocks of the range): the stream is the
            # one input the block signature names a stream that the output reaches (before, Flux's single-stream
            # range with ControlNet residuals paired its hidden output with the residual input)
            streams = {roots[n.name]: n for n in residual_sources(out, region, input_set)
                       if roles.get(roots[n.name]) in _STREAM_ROLES}
            if len(streams) == 1:
                src = next(iter(streams.values()))
        sources[out.name] = src
    unpaired = [name for name, src in sources.items() if src is None]
    hidden = sorted((by_name[i] for i in inputs if roles.get(roots[i]) == "hidden_states"),
                    key=lambda n: n.name != roots[n.name])  # the aliased input itself first
    if (len(unpaired) == 1 and len({roots[n.name] for n in hidden}) == 1
            and not any(src is not None and roots.get(src.name) == roots[hidden[0].name] for src in sources.values())
            and _shape(hidden[0]) == _shape(by_name[unpaired[0]])):
        # A block that re-projects its stream instead of adding to it (HunyuanDiT's long-skip blocks:
        # hidden = skip_linear(cat(hidden, skip))): the one output no residual path explains continues
        # the range's ``hidden_states`` input (by the block signature), as CacheAgent pairs them.
        sources[unpaired[0]] = hidden[0]
    streams: List[Stream] = []
    for out in outputs:
        src = sources[out.name]
        if src is None:
            raise ConfigError(
                f"{label}: output {out.name} ({out.target}) of the block range does not continue any "
                f"of its inputs {inputs} along a residual path; this range cannot be cached as a delta")
        if _shape(src) != _shape(out):
            raise ConfigError(f"{label}: stream {src.name} -> {out.name} changes shape "
                              f"{_shape(src)} -> {_shape(out)}")
        same = [s.output for s in streams if roots.get(s.input, s.input) == roots.get(src.name, src.name)]
        if same:
            raise ConfigError(f"{label}: outputs {same} and {out.name} both continue input {src.name}")
        role = (roles or {}).get(src.name) or f"stream{len(streams)}"
        streams.append(Stream(role, src.name, out.name))
    side = tuple(i for i in inputs if i not in {s.input for s in streams})
    return Region(label, region, tuple(streams), side)


def block_region(cap: Capture, list_fqn: str, start: int, end: int, label: Optional[str] = None) -> Region:
    """The region of blocks ``[start, end)`` of ``list_fqn`` in a capture."""
    spans = cap.spans[list_fqn]
    if not 0 <= start < end <= len(spans):
        raise ConfigError(f"block range [{start}, {end}) is outside {list_fqn} (0..{len(spans)})")
    called = [i for i in range(start, end) if spans[i]]
    if not called:
        raise ConfigError(f"blocks {list_fqn}[{start}:{end}] left no nodes in the captured graph: "
                          "they are not called for these inputs")
    names = {n for i in called for n in spans[i]}
    roles = cap.signatures.get(f"{list_fqn}.{called[0]}", {})  # the region starts at its first called block
    return region_from_nodes(cap.gm, names, label or f"{list_fqn}[{start}:{end}]", roles)


# ----------------------------------------------------------------------------- attention sites
@dataclass(frozen=True)
class AttentionSite:
    """One attention module call: its nodes and the tensors it hands to the rest of the graph."""

    block: int
    fqn: str
    nodes: frozenset
    outputs: Tuple[str, ...]


def attention_children(block: torch.nn.Module) -> List[str]:
    """Names of a block's direct attention submodules, in module order."""
    return [name for name, child in block.named_children()
            if "attention" in type(child).__name__.lower() and "norm" not in type(child).__name__.lower()]


def choose_attention(model: torch.nn.Module, block_fqn: str, attention: Optional[str]) -> List[str]:
    block = model.get_submodule(block_fqn)
    available = attention_children(block)
    if attention is None:
        if not available:
            raise ConfigError(f"{block_fqn} ({type(block).__name__}) has no attention submodule; "
                              f"pass CacheConfig(attention=<one of {[n for n, _ in block.named_children()]}>)")
        return available[:1]
    if attention == "all":
        return available
    names = [n.strip() for n in attention.split(",") if n.strip()]
    children = dict(block.named_children())
    for name in names:
        if name not in children:
            raise ConfigError(f"CacheConfig.attention={attention!r}: {block_fqn} has no submodule {name!r}; "
                              f"attention submodules: {available}")
    return names


def module_nodes(gm: fx.GraphModule, fqn: str) -> List[str]:
    """Names of the call_function nodes executed inside module ``fqn`` (graph order)."""
    prefix = fqn + "."
    out = []
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op == "call_function" and stack and any(p == fqn or p.startswith(prefix) for p, _ in stack.values()):
            out.append(node.name)
    return out


def attention_sites(cap: Capture, model: torch.nn.Module, list_fqn: str, start: int, end: int,
                    attention: Optional[str] = None) -> List[AttentionSite]:
    """The attention calls of blocks ``[start, end)`` of ``list_fqn``, by module identity."""
    by_name = {n.name: n for n in cap.gm.graph.nodes}
    sites = []
    for i in range(start, end):
        block_fqn = f"{list_fqn}.{i}"
        for child in choose_attention(model, block_fqn, attention):
            fqn = f"{block_fqn}.{child}"
            names = module_nodes(cap.gm, fqn)
            if not names:
                if cap.spans.get(list_fqn) and not cap.spans[list_fqn][i]:
                    continue  # the whole block is skipped by this call
                raise ConfigError(f"attention module {fqn} left no nodes in the captured graph (not called?)")
            span = frozenset(names)
            outputs = tuple(n for n in names if any(u.name not in span for u in by_name[n].users))
            for n in outputs:
                if not isinstance(by_name[n].meta.get("val"), torch.Tensor):
                    raise ConfigError(f"attention module {fqn} returns a non-tensor value ({n}); cannot cache it")
            sites.append(AttentionSite(i, fqn, span, outputs))
    return sites
