"""The paths for models ``torch.export`` cannot capture: Dynamo, then eager.

``optimize()`` falls back here when export fails (e.g. data-dependent
``.tolist()`` in a model's forward). The runtime still owns the step counter,
contexts and the plan; each step it drives one
:class:`~npu_cache_fx.agent.CacheAgent` per config (``begin_step``) and wraps
the blocks' (or attention modules') ``forward`` for the duration of the call.

With a compile backend (``optimize(..., backend=...)``) this is the **Dynamo
path**: every block of every block list is compiled on its own by
``torch.compile(backend)`` (regional compilation: blocks of one class share
one graph, and the model's top level, where the data-dependent construct sits,
stays eager). The cache decisions are host code around the compiled blocks, so
the compiled graphs never see them: no guard on the step or the action, no
recompile across steps or generations. A cached attention call is a
``torch.compiler.disable``-d wrapper inside its compiled block (a graph break
before and after it) around the separately compiled attention module.

If Dynamo or the backend fails on a module where the plain module works, that
module runs eagerly from then on (the **eager path**), with one warning.
Without a backend the eager path is used directly: there is nothing to compile.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
import re
import traceback
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .agent import CacheAgent
from .backends import Backend, block_backend
from .capture import choose_attention, exporting, find_block_lists, walk_back
from .config import CacheConfig
from .schedule import Decision

__all__ = ["EagerPath", "export_failure"]

log = logging.getLogger(__name__)


def _order_by_dataflow(block: torch.nn.Module, kwargs: Dict[str, Any]) -> Optional[str]:
    """Export just this block (the model as a whole could not be) and pair its outputs by dataflow."""
    try:
        with torch.no_grad(), exporting():
            gm = torch.export.export(block, (), dict(kwargs), strict=False).module()
    except Exception:
        return None
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    region = frozenset(n.name for n in nodes)
    inputs = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder")
    (flat,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    if len(flat) != 2:
        return None
    first = walk_back(flat[0], None, region, inputs)
    return {"hidden_states": "hidden_first", "encoder_hidden_states": "encoder_first"}.get(
        first.name if first is not None else "")


def _pair_outputs(agent: CacheAgent, block: torch.nn.Module, kwargs: Dict[str, Any], out) -> None:
    """Set the agent's output order from the first two-output result of a block.

    By dataflow on an export of the single block when that works; otherwise by
    shape, and where shapes are equal by the smaller residual ``out - in``.
    """
    hidden, encoder = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(encoder, torch.Tensor)):
        return
    a, b = out
    order = _order_by_dataflow(block, kwargs)
    if order is None and a.shape != b.shape:
        order = "hidden_first" if a.shape == hidden.shape else "encoder_first"
    if order is None:
        straight = (a - hidden).abs().mean() + (b - encoder).abs().mean()
        swapped = (a - encoder).abs().mean() + (b - hidden).abs().mean()
        order = "hidden_first" if straight <= swapped else "encoder_first"
        log.warning("%s: pairing its (hidden, encoder) outputs by residual size (no dataflow available): %s",
                    type(block).__name__, order)
    agent.output_order = order


def _describe(err: BaseException) -> str:
    """``Type: first line`` of an error and of its root cause (a backend's own error inside Dynamo's)."""
    def one(e: BaseException) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__
    root, seen = err, {id(err)}
    while True:  # Dynamo keeps a backend's error as inner_exception, without chaining it as the cause
        inner = root.__cause__ or getattr(root, "inner_exception", None)
        if not isinstance(inner, BaseException) or id(inner) in seen:
            break
        root = inner
        seen.add(id(root))
    return one(err) if root is err else f"{one(err)} {one(root)}"


def _positional(sig: inspect.Signature) -> List[str]:
    return [n for n, p in sig.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]


def _substitute(positional: List[str], args: tuple, kwargs: Dict[str, Any],
                values: Dict[str, Any]) -> Tuple[tuple, Dict[str, Any]]:
    """``(args, kwargs)`` of a call with ``values`` put where the call passed those parameters
    (``positional``: the names of the callee's positional parameters, in order)."""
    args, kwargs = list(args), dict(kwargs)
    for name, value in values.items():
        if name in kwargs:
            kwargs[name] = value
        else:
            args[positional.index(name)] = value
    return tuple(args), kwargs


class EagerPath:
    """CacheAgents around a model's blocks, driven by the optimized module's plan.

    ``backend`` set: the blocks (and cached attention modules) run compiled by
    ``torch.compile`` (:attr:`path` ``"dynamo"``); ``None``: plain eager
    (:attr:`path` ``"eager"``).
    """

    def __init__(self, model: torch.nn.Module, configs: Sequence[CacheConfig], reason: str,
                 backend: Backend = None, backend_options: Optional[Dict[str, Any]] = None):
        self.model = model
        self.configs = list(configs)
        self.reason = reason
        self.compiler = block_backend(backend, backend_options)
        self.path = "eager" if self.compiler is None else "dynamo"
        self.dynamo_failure: Optional[str] = None
        # one agent per (config, attention child): each counts blocks_count calls per step
        self.agents: List[List[CacheAgent]] = []
        self.children: List[List[Optional[str]]] = []
        self._paired: Dict[int, bool] = {}
        for cfg in self.configs:
            if cfg.method == "attention_cache":
                names = choose_attention(model, f"{cfg.blocks}.{cfg.block_start}", cfg.attention) \
                    if cfg.block_end > cfg.block_start else []
            else:
                names = [None]
            self.children.append(list(names))
            self.agents.append([CacheAgent(cfg, hold_range_output=True) for _ in names])  # as the graph rewrite
        self._patches = self._build_patches()

    # ------------------------------------------------------------------ module wrappers
    def _build_patches(self) -> List[Tuple[torch.nn.Module, Callable]]:
        """(module, forward to install during a call), built once: Dynamo guards see the same objects every step."""
        patches: Dict[int, Tuple[torch.nn.Module, Callable]] = {}
        for i, (agents, children) in enumerate(zip(self.agents, self.children)):
            blocks = self.model.get_submodule(self.configs[i].blocks)
            for agent, child in zip(agents, children):
                for blk in blocks:
                    mod = blk if child is None else getattr(blk, child)
                    run = self._runner(mod)
                    forward = self._block_forward(i, agent, mod, run) if child is None else \
                        self._attention_forward(agent, run)
                    patches[id(mod)] = (mod, forward)
        if self.compiler is not None:  # regional compilation: every block, cached or not
            lists = [self.model.get_submodule(b.fqn) for b in find_block_lists(self.model)]
            for blk in (blk for blocks in lists for blk in blocks):
                patches.setdefault(id(blk), (blk, self._runner(blk)))
        return list(patches.values())

    def _runner(self, mod: torch.nn.Module) -> Callable:
        """``mod``'s own forward: compiled on the Dynamo path, with a per-call eager retry on failure.

        A forward installed on the instance (accelerate's or diffusers' offload hooks) is kept: it is
        what brings the block's weights in.
        """
        orig = mod.__dict__.get("forward") or type(mod).forward.__get__(mod)
        if self.compiler is None:
            return orig
        compiled = torch.compile(orig, backend=self.compiler, dynamic=False)

        def run(*args, **kwargs):
            if self.path != "dynamo":
                return orig(*args, **kwargs)
            try:
                return compiled(*args, **kwargs)
            except Exception as err:
                out = orig(*args, **kwargs)  # raises too if the error is the input's, not the compiler's
                self._give_up(mod, err)
                return out
        return run

    def _give_up(self, mod: torch.nn.Module, err: Exception) -> None:
        self.path = "eager"
        self.dynamo_failure = _describe(err)
        log.warning("%s: torch.compile of %s failed (%s); npu_cache_fx runs the eager path: the same cache "
                    "semantics applied around the blocks' forward, without compilation",
                    type(self.model).__name__, type(mod).__name__, self.dynamo_failure)

    def _block_forward(self, i: int, agent: CacheAgent, mod: torch.nn.Module, run: Callable) -> Callable:
        sig = inspect.signature(type(mod).forward.__get__(mod))
        positional = _positional(sig)

        def forward(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            streams = {"hidden_states": bound["hidden_states"]}
            if "encoder_hidden_states" in bound:
                streams["encoder_hidden_states"] = bound["encoder_hidden_states"]

            def call(hidden, *encoder):
                """The block called exactly as the model called it, with the agent's stream values."""
                a, k = _substitute(positional, args, kwargs, dict(zip(streams, (hidden, *encoder))))
                return run(*a, **k)

            if i not in self._paired and "encoder_hidden_states" in streams:
                def first(*a):
                    out = call(*a)
                    self._paired[i] = True
                    patched = mod.__dict__.pop("forward")  # export the plain block, not this wrapper
                    try:
                        _pair_outputs(agent, mod, dict(bound), out)
                    finally:
                        mod.forward = patched
                    return out
                return agent.apply(first, **streams)
            return agent.apply(call, **streams)
        return forward

    @staticmethod
    def _attention_forward(agent: CacheAgent, run: Callable) -> Callable:
        @torch.compiler.disable  # host-side decision inside a compiled block: a graph break, not a guard
        def forward(*args, **kwargs):
            return agent.apply(run, *args, **kwargs)
        return forward

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        saved = [(mod, mod.__dict__.get("forward")) for mod, _ in self._patches]
        try:
            for mod, forward in self._patches:
                mod.forward = forward
            yield
        finally:
            for mod, before in saved:
                if before is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = before

    # ------------------------------------------------------------------ driving
    def use_configs(self, configs: Sequence[CacheConfig]) -> None:
        """Drive the agents with ``configs``: the same plan re-stated for a generation's step count."""
        for cfg, agents in zip(configs, self.agents):
            for agent in agents:
                agent.use_config(cfg)

    def run(self, kwargs: Dict[str, Any], decision: Decision, context: str, step: int,
            timestep: Optional[float]) -> Any:
        with contextlib.ExitStack() as stack:
            for i, agents in enumerate(self.agents):
                for agent in agents:
                    stack.enter_context(agent.cache_context(context))
                    agent.begin_step(step, decision[i], timestep)
            stack.enter_context(self._installed())
            return self.model(**kwargs)

    def reset(self) -> None:
        for agents in self.agents:
            for agent in agents:
                agent.reset()


# ----------------------------------------------------------------------------- why export failed
def export_failure(err: Exception) -> str:
    """``ErrorType at file:line in fn: <source line>`` from a torch.export error, or its first line.

    The place is export's "Caused by" note when there is one, else the innermost traceback frame
    outside torch (the model's own line that raised, e.g. ``set(lengths)`` hashing a SymInt).
    """
    text = str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    found = re.search(r"Caused by: \((.+?):(\d+) in (\w+)\)", text)
    if found:
        path, line, fn = _source_path(err, found.group(1), int(found.group(2))), int(found.group(2)), found.group(3)
    else:
        frames = [f for f, _ in traceback.walk_tb(err.__traceback__) if not _library_file(f.f_code.co_filename)]
        if not frames:
            return f"{type(err).__name__}: {first[:300]}"
        frame = frames[-1]
        path, line, fn = frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name
    source = linecache.getline(path, line).strip()
    detail = f"{source} ({first[:200]})" if source and not found else (source or first[:200])
    return f"{type(err).__name__} at {path}:{line} in {fn}: {detail}"


def _source_path(err: BaseException, path: str, line: int) -> str:
    """The absolute file behind export's shortened ``path`` (``tests/toy.py``, or ``mp/x/tests/toy.py``
    for ``/tmp/x/tests/toy.py``: export cuts a prefix of its own length), from the error's traceback.

    Resolved against the working directory such paths only work when it happens to be their root (not,
    e.g., with the virtualenv outside the checkout).
    """
    if os.path.isabs(path) and os.path.exists(path):
        return path
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for frame, lineno in traceback.walk_tb(err.__traceback__):
            name = frame.f_code.co_filename
            if lineno == line and name.endswith(path.lstrip("./" + os.sep)):  # a suffix, maybe cut mid-name
                return name
        err = err.__cause__ or err.__context__
    return path


def _library_file(filename: str) -> bool:
    """A file of torch or of npu_cache_fx: not the model's own code."""
    here = os.path.dirname(os.path.abspath(__file__))
    return filename.startswith((os.path.dirname(torch.__file__), here))
