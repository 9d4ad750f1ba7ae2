"""Graph rewrites, one concern per file. Each takes a GraphModule and returns a PassResult."""

from .attention_cache import attention_cache_pass
from .block_cache import block_cache_pass
from .common import eliminate_dead_code
from .lower import lower_cache_ops
from .sdpa import DecomposeSDPA, decompose_sdpa

__all__ = ["DecomposeSDPA", "attention_cache_pass", "block_cache_pass", "decompose_sdpa", "eliminate_dead_code", "lower_cache_ops"]
