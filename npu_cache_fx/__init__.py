"""npu_cache_fx: step caching for diffusion transformers as torch.fx graph rewrites.

>>> from npu_cache_fx import CacheConfig, optimize
>>> cfg = CacheConfig(method="dit_block_cache", steps_count=28, step_start=18, step_interval=2,
...                   block_start=1, block_end=23, blocks="single_transformer_blocks")
>>> # pipe.transformer = optimize(pipe.transformer, cfg)
"""

from .agent import CacheAgent
from .config import CacheConfig, ConfigError, load_plan, save_plan
from .pipeline import disable_cache, enable_cache, summary
from .runtime import OptimizedModule, optimize
from .schedule import Action, Plan, make_plan

__all__ = ["Action", "CacheAgent", "CacheConfig", "ConfigError", "OptimizedModule", "Plan", "disable_cache",
           "enable_cache", "load_plan", "make_plan", "optimize", "save_plan", "summary"]
__version__ = "0.1.0"
