"""A dynamo backend that records every graph it compiles (wrapping aot_eager)."""

import torch
import torch._dynamo
from torch._dynamo.utils import counters


class CountingBackend:
    """aot_eager that records every graph it is handed."""

    def __init__(self, inner: str = "aot_eager"):
        self.graphs = []
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


def fresh_dynamo() -> CountingBackend:
    """Reset dynamo's caches and counters; return a new counting backend."""
    torch._dynamo.reset()
    counters.clear()
    return CountingBackend()


class MutationBackend:
    """aot_eager that records, per graph, the inputs it mutates and the inputs it treats as static.

    The same facts inductor's CUDA graph trees check (``check_for_mutation_ignore_cuda_graph_managed_tensor``):
    a graph that mutates a non-static input is run without CUDA graphs.
    """

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.graphs = []  # (mutated input indices, static input indices, placeholder names)

        def fw_compiler(gm, example_inputs):
            meta = torch._guards.TracingContext.try_get().fw_metadata
            names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
            self.graphs.append((set(meta.mutated_inp_runtime_indices), set(meta.static_input_indices), names))
            return make_boxed_func(gm.forward)

        self.inner = aot_autograd(fw_compiler=fw_compiler)

    def __call__(self, gm, example_inputs):
        return self.inner(gm, example_inputs)


def scalar_inductor():
    """inductor with scalar C++ kernels (``cpp.vec_isa_ok=False``): a cold compile of a tiny Flux takes ~20 %
    less CPU (g++ on at::vec templates dominates). The tests that use it check what npu_cache_fx hands
    inductor (graphs, recompiles, outputs to 1e-4), not inductor's vectoriser; the benchmarks compile with
    inductor's defaults."""
    import torch._inductor.config
    return torch._inductor.config.patch({"cpp.vec_isa_ok": False})
