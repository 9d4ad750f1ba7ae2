"""Measured cost of node spans of a captured graph (median of repeats).

The search's cost model and the attention-cache memory budget both rank
blocks and attention calls by what they actually cost here, not by MindIE's
equal-cost assumption.

Example::

    >>> costs = span_costs(cap.gm, flat_inputs, {"blk0": names0, "blk1": names1})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence

import torch
import torch.fx as fx

__all__ = ["no_gc", "node_costs", "span_costs", "synchronize"]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Collect once, then keep the cyclic GC out of a timed region."""
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so host timings measure them (CUDA, NPU; no-op on CPU)."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(device)
    elif kind != "cpu":
        module = getattr(torch, kind, None)
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize()


def node_costs(gm: fx.GraphModule, flat_inputs: Sequence, names: Iterable[str], *, repeats: int = 3,
               warmup: int = 1) -> Dict[str, float]:
    """Median seconds of each node named in ``names`` over ``repeats`` interpreted runs."""
    wanted = frozenset(names)
    samples: Dict[str, List[float]] = {n: [] for n in wanted}
    device = next((x.device for x in flat_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))

    class _Timer(fx.Interpreter):
        record = False

        def run_node(self, node: fx.Node):
            if node.name not in wanted:
                return super().run_node(node)
            synchronize(device)
            start = time.perf_counter()
            out = super().run_node(node)
            synchronize(device)
            if self.record:
                samples[node.name].append(time.perf_counter() - start)
            return out

    timer = _Timer(gm)
    with torch.no_grad():
        for i in range(warmup + repeats):
            timer.record = i >= warmup
            timer.run(*flat_inputs)
    return {n: statistics.median(v) if v else 0.0 for n, v in samples.items()}


def span_costs(gm: fx.GraphModule, flat_inputs: Sequence, spans: Mapping[str, Iterable[str]], *,
               repeats: int = 3) -> Dict[str, float]:
    """Seconds per named span (sum of its nodes' medians)."""
    spans = {k: list(v) for k, v in spans.items()}
    costs = node_costs(gm, flat_inputs, {n for names in spans.values() for n in names}, repeats=repeats)
    return {k: sum(costs[n] for n in names) for k, names in spans.items()}
