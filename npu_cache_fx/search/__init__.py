"""Cache-plan search on the captured graph: measured costs, a trajectory proxy, few full runs.

>>> from npu_cache_fx.search import search, config_from_json
>>> result = search(pipe.transformer, run_fn, method="dit_block_cache", target_speedup=2.0)  # doctest: +SKIP
>>> pipe.transformer = optimize(pipe.transformer, result.config)                            # doctest: +SKIP

``run_fn(transformer)`` runs one full, seeded generation with the given transformer and
returns its output. The model is captured once; every candidate plan is built on that
capture (``optimize(model, cfgs, captures=...)``). ``strategy="mindie"`` runs MindIE-SD's
search (SPEC section 4) on the same capture for comparison. See :mod:`.engine`.
"""

from .costs import CostModel, live_nodes
from .engine import SearchResult, score_plan, search, search_mindie, search_ours
from .mindie import mindie_interval, mindie_lmin, stage1_windows, stage2_candidates
from .report import config_from_json, config_to_json, write_report
from .session import SearchSession
from .space import BlockSeq, Candidate, Part, Schedule

__all__ = [
    "BlockSeq", "Candidate", "CostModel", "Part", "Schedule", "SearchResult", "SearchSession", "config_from_json",
    "config_to_json", "live_nodes", "mindie_interval", "mindie_lmin", "score_plan", "search", "search_mindie",
    "search_ours",
    "stage1_windows", "stage2_candidates", "write_report",
]
