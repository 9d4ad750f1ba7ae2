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
