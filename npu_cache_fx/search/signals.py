"""One uncached reference run, recorded: per-step values at every block boundary and attention output.

:class:`Recorder` stands in for the transformer during the reference generation.
Each call runs the *captured* graph (the one every candidate is built from)
through an ``fx.Interpreter`` and keeps, per call, the values of the watched
nodes: the carried streams at each block boundary (paired by the same dataflow
analysis the DiT cache uses, so ``out - in`` is exactly the delta a refresh
step records) and each attention call's outputs. Large tensors are kept as a
fixed random subset of their elements (a linear sketch: differences and norms
of differences stay estimable), so the memory is bounded for real models.

Example::

    >>> rec = Recorder(model, captures, watch=lambda cap: {...})  # doctest: +SKIP
    >>> out = run_fn(rec)                                         # doctest: +SKIP
    >>> rec.values["add_42"].shape                                # (calls, k)
"""

from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..capture import Capture
from ..contexts import CacheContexts
from ..runtime import CaptureCache, normalize_inputs, reject_bad_inputs, signature_key, timestep_value

__all__ = ["Recorder", "Sketch"]


class Sketch:
    """Keep at most ``k`` elements of a tensor, at fixed random positions per element count."""

    def __init__(self, k: int = 16384, seed: int = 0):
        self.k = k
        self.seed = seed
        self._index: Dict[int, torch.Tensor] = {}

    def scale(self, numel: int) -> float:
        """Multiply a sketched squared norm by this to estimate the full one."""
        return numel / min(numel, self.k)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)
        n = flat.numel()
        if n > self.k:
            idx = self._index.get(n)
            if idx is None:
                g = torch.Generator().manual_seed(self.seed + n)
                idx = self._index[n] = torch.randperm(n, generator=g)[: self.k].sort().values
            flat = flat[idx.to(flat.device)]
        return flat.to("cpu", torch.float32, copy=True)


class _Watch(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names, sink: Dict[str, torch.Tensor], sketch: Sketch):
        super().__init__(gm)
        self.names = names
        self.sink = sink
        self.sketch = sketch

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node.name in self.names and isinstance(out, torch.Tensor):
            self.sink[node.name] = self.sketch(out)
        return out


class Recorder(CacheContexts, torch.nn.Module):
    """A drop-in for ``model`` during the reference run (see module doc).

    ``watch(capture) -> iterable of node names`` picks the nodes to record; it is
    called once per capture. After the run: ``calls`` (one dict per forward:
    ``context``, ``step``, ``seconds``), ``values[name]`` (calls x k),
    ``numel[name]``, ``inputs`` (flat inputs of every call, when
    ``keep_inputs``), ``outputs`` (sketched first output per call).

    Several denoisers that split a generation's steps (Wan 2.2's experts) each get a recorder named
    after them, all but the first with ``shared=`` the first: they append to one call log in call order
    and count steps per context together, so ``step`` is the generation's step and each call says which
    ``denoiser`` ran it.
    """

    def __init__(self, model: torch.nn.Module, captures: CaptureCache,
                 watch: Callable[[Capture], Sequence[str]], sketch: Optional[Sketch] = None,
                 keep_inputs: bool = True, clock: Callable[[], float] = time.perf_counter,
                 name: str = "model", shared: Optional["Recorder"] = None):
        torch.nn.Module.__init__(self)
        self._clock = clock
        self.model = model
        self._captures = captures
        self._watch_fn = watch
        self._watched: Dict[Any, frozenset] = {}
        self.sketch = sketch or Sketch()
        self.keep_inputs = keep_inputs
        self._signature = inspect.signature(model.forward)
        self.name = name
        self.calls: List[Dict[str, Any]] = [] if shared is None else shared.calls
        self.rows: List[Dict[str, torch.Tensor]] = [] if shared is None else shared.rows
        self.numel: Dict[str, int] = {} if shared is None else shared.numel
        self.inputs: List[List[Any]] = [] if shared is None else shared.inputs
        self.outputs: List[torch.Tensor] = [] if shared is None else shared.outputs
        self.capture: Optional[Capture] = None
        self.key: Any = None
        self._steps: Dict[str, int] = {} if shared is None else shared._steps
        self.seconds_inside = 0.0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def _capture_for(self, kwargs, leaves, spec) -> Capture:
        key = signature_key(leaves, spec)  # the runtime's key: the capture candidates reuse
        failure = None
        try:
            cap = self._captures.capture(kwargs, key=key)
        except Exception as err:
            failure = err
        if failure is not None:
            reject_bad_inputs(self.model, kwargs)  # a bad call raises the model's own error, not export's
            from ..fallback import export_failure
            raise RuntimeError(
                f"SearchSession: {type(self.model).__name__} cannot be captured by torch.export "
                f"({export_failure(failure)}); the search scores plans on the captured graph, so it needs a model "
                "export can capture. optimize(model, plan) still runs this model (the Dynamo or eager path, the "
                "same cache semantics): choose the plan by hand (docs/search.md), or make the forward exportable "
                "(no .tolist() or Python branch on tensor values)") from failure
        if self.capture is None:
            self.capture, self.key = cap, key
        if key not in self._watched:
            self._watched[key] = frozenset(self._watch_fn(cap))
        return cap

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        t0 = self._clock()
        kwargs = normalize_inputs(self._signature, args, kwargs, type(self.model).__name__)
        leaves, spec = pytree.tree_flatten(((), kwargs))
        cap = self._capture_for(kwargs, leaves, spec)
        key = signature_key(leaves, spec)  # the runtime's key: the capture candidates reuse
        sink: Dict[str, torch.Tensor] = {}
        flat_out = _Watch(cap.gm, self._watched[key], sink, self.sketch).run(*leaves)
        step = self._steps.get(self._active, 0)
        self._steps[self._active] = step + 1
        if key == self.key:
            for name, value in sink.items():
                self.numel.setdefault(name, _numel(cap, name))
            self.rows.append(sink)
            if self.keep_inputs:
                self.inputs.append([x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves])
            first = next((x for x in flat_out if isinstance(x, torch.Tensor)), None)
            self.outputs.append(self.sketch(first) if first is not None else torch.zeros(0))
        self.calls.append({"context": self._active, "step": step, "primary": key == self.key, "denoiser": self.name,
                           "timestep": timestep_value(kwargs), "seconds": self._clock() - t0})
        self.seconds_inside += self._clock() - t0
        return pytree.tree_unflatten(list(flat_out), cap.out_spec)

    # ------------------------------------------------------------------ views
    def contexts(self) -> List[str]:
        return list(dict.fromkeys(c["context"] for c in self.calls if c["primary"]))

    def series(self, name: str, context: Optional[str] = None) -> torch.Tensor:
        """(steps, k) values of node ``name`` in ``context`` (default: the first one)."""
        context = context or self.contexts()[0]
        primary = [c for c in self.calls if c["primary"]]
        rows = [r[name] for c, r in zip(primary, self.rows) if c["context"] == context]
        return torch.stack(rows)

    def output_series(self, context: Optional[str] = None) -> torch.Tensor:
        context = context or self.contexts()[0]
        primary = [c for c in self.calls if c["primary"]]
        return torch.stack([o for c, o in zip(primary, self.outputs) if c["context"] == context])


def _numel(cap: Capture, name: str) -> int:
    node = next(n for n in cap.gm.graph.nodes if n.name == name)
    val = node.meta.get("val")
    return int(val.numel()) if isinstance(val, torch.Tensor) else 1


def norm_scale(numel: int, sketch: Sketch) -> float:
    return math.sqrt(sketch.scale(numel))
