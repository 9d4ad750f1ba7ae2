"""Coverage matrix: every DiT family of tests/coverage_models.py x feature x backend.

Per model: capture + block-list detection; a DiT block cache on each block
list; an attention cache on each block list; a combined plan (DiT cache on one
list + attention cache on another list, or on a disjoint range of the same
list) in eager mode and compiled with ``aot_eager``; the combined plan again with the model and its
float inputs in bf16 and in fp16 (eager; CacheAgent by hand in the same dtype). Compute steps are
bit-identical to the original model (``aot_eager``: allclose 1e-5); reuse
steps equal (allclose 1e-5) the eager :class:`~npu_cache_fx.CacheAgent`
applied by hand. What cannot work is an ``xfail(strict=True)`` with its reason
(``Model.xfail`` in coverage_models.py). ``scripts/coverage.py`` renders this
matrix as docs/coverage.md.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Dict, List, Optional, Tuple

import pytest
import torch

pytest.importorskip("diffusers")

from npu_cache_fx import CacheAgent, CacheConfig, optimize  # noqa: E402
from npu_cache_fx.capture import attention_children, block_region, find_block_lists  # noqa: E402
from npu_cache_fx.runtime import CaptureCache, normalize_inputs  # noqa: E402
from npu_cache_fx.schedule import Action  # noqa: E402
from coverage_models import MODELS, Model  # noqa: E402
from hooks import agent_on_attention, agent_on_blocks  # noqa: E402

STEPS = 6
SCHEDULE = dict(steps_count=STEPS, step_start=1, step_interval=2)  # compute, write, read, write, read, compute
# Compiled plans: every variant costs a compile (seconds), so only write + read (the write steps are the
# compute steps checked against the model): write, read, write, read.
COMPILED_SCHEDULE = dict(steps_count=4, step_start=0, step_interval=2)
# Half-precision columns: the combined plan with the model and its float inputs cast (fp32 is every other cell).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def features(m: Model) -> List[Tuple[str, Optional[str]]]:
    """(feature, backend) cells of one model's row."""
    out: List[Tuple[str, Optional[str]]] = [("capture", None)]
    for fqn, spec in m.lists.items():
        if spec.cached:
            out += [(f"dit:{fqn}", None), (f"attention:{fqn}", None)]
    out += [(f"dit:{fqn}[{lo}:{hi}]", None) for fqn, (lo, hi) in m.extra_ranges]
    out += [("combined", None), ("combined", "aot_eager")]
    out += [(f"combined@{d}", None) for d in DTYPES]
    return out


def cell_id(name: str, feature: str, backend: Optional[str]) -> str:
    return f"{name}-{feature}-{backend or 'eager'}"


def expected_failure(m: Model, feature: str, backend: Optional[str]):
    """(reason, exception type) when the cell is a known failure, else None."""
    if feature == "capture" and m.export_error:
        return m.export_error, m.export_exception
    return m.xfail.get(f"{feature}@{backend or 'eager'}", m.xfail.get(feature))


def cases():
    for name, m in MODELS.items():
        for feature, backend in features(m):
            known = expected_failure(m, feature, backend)
            marks = [pytest.mark.xfail(strict=True, reason=known[0], raises=known[1])] if known else []
            marks.append(pytest.mark.slow)  # ~100 captures of 17 families: the full suite, not the quick tier
            yield pytest.param(name, feature, backend, marks=marks, id=cell_id(name, feature, backend))


# ----------------------------------------------------------------------------- shared state
_STATE: Dict[Tuple[str, str], Tuple[torch.nn.Module, CaptureCache]] = {}


def model_state(name: str, dtype: str = "fp32") -> Tuple[torch.nn.Module, CaptureCache]:
    """One model instance and one capture per model and dtype for the whole module (captures cost seconds)."""
    if (name, dtype) not in _STATE:
        model = MODELS[name].build()
        if dtype in DTYPES:
            model = model.to(DTYPES[dtype])
        _STATE[name, dtype] = (model, CaptureCache(model))
    return _STATE[name, dtype]


def cast_inputs(inputs: dict, dtype: str) -> dict:
    """Floating-point tensor inputs in ``dtype`` (as a half-precision pipeline passes them)."""
    if dtype not in DTYPES:
        return inputs
    return {k: v.to(DTYPES[dtype]) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()}


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def attention_name(model: torch.nn.Module, fqn: str, spec) -> str:
    return spec.attention or attention_children(model.get_submodule(fqn)[0])[0]


# ----------------------------------------------------------------------------- plans and their references
def plan_for(m: Model, feature: str, schedule: dict = SCHEDULE) -> List[CacheConfig]:
    """The configs a feature cell runs (unresolved)."""
    if feature.startswith("dit:"):
        fqn = feature[4:]
        if "[" in fqn:
            fqn, rng = fqn[:-1].split("[")
            lo, hi = (int(x) for x in rng.split(":"))
        else:
            lo, hi = m.dit_range(fqn)
        return [CacheConfig(blocks=fqn, block_start=lo, block_end=hi, **schedule)]
    if feature.startswith("attention:"):
        fqn = feature[len("attention:"):]
        return [CacheConfig(method="attention_cache", blocks=fqn, attention=m.lists[fqn].attention, **schedule)]
    assert feature.split("@")[0] == "combined"
    dit_list, attn_list = m.combined
    lo, hi = m.dit_range(dit_list)
    if attn_list == dit_list:  # the other part of the same list
        n = m.lists[dit_list].count
        a_lo, a_hi = (0, lo) if lo > 0 else (hi, n)
    else:
        a_lo, a_hi = 0, m.lists[attn_list].count
    return [CacheConfig(blocks=dit_list, block_start=lo, block_end=hi, **schedule),
            CacheConfig(method="attention_cache", blocks=attn_list, block_start=a_lo, block_end=a_hi,
                        attention=m.lists[attn_list].attention, **schedule)]


def reference_hooks(m: Model, model, configs):
    """CacheAgents equivalent to the resolved ``configs`` and a factory of the hooks applying them."""
    hooks = []
    for cfg in configs:
        blocks = model.get_submodule(cfg.blocks)
        spec = m.lists[cfg.blocks]
        if cfg.method == "dit_block_cache":
            agent = CacheAgent(cfg, output_order=spec.order)
            hooks.append(lambda b=blocks, a=agent: agent_on_blocks(b, a))
        else:
            # Hook only the range's blocks: a DiT cache on another range of the same list skips whole
            # blocks on reuse steps, which would desynchronise an agent counting every block's call.
            n = cfg.block_end - cfg.block_start
            agent = CacheAgent(cfg.replace(blocks_count=n, block_start=0, block_end=n))
            sub = [blocks[i] for i in range(cfg.block_start, cfg.block_end)]
            hooks.append(lambda b=sub, a=agent, nm=attention_name(model, cfg.blocks, spec): agent_on_attention(b, a, nm))

    @contextlib.contextmanager
    def applied():
        with contextlib.ExitStack() as stack:
            for h in hooks:
                stack.enter_context(h())
            yield
    return applied


def run_matrix_cell(name: str, feature: str, backend: Optional[str]) -> dict:
    """Run one cell; raise on failure. Returns facts for the report (variants, reuse steps)."""
    m = MODELS[name]
    model, captures = model_state(name)
    if feature == "capture":
        found = {b.fqn: (b.count, b.block_class) for b in find_block_lists(model)}
        want = {fqn: (s.count, s.block_class) for fqn, s in m.lists.items()}
        assert found == want, f"find_block_lists: {found} != expected {want}"
        # the capture every fp32 cell of this model then takes from the cache (optimize's own path and key)
        kwargs = normalize_inputs(inspect.signature(model.forward), (), m.inputs(1.0, seed=0), name)
        cap = captures.capture(kwargs, list(found))
        assert all(all(span) for spans in cap.spans.values() for span in spans)
        for fqn, spec in m.lists.items():  # the return order the table gives CacheAgent, from the graph
            if spec.cached:
                streams = {s.output: s.role for s in block_region(cap, fqn, 0, 1).streams}
                returned = [streams[o] for o in cap.meta["block_outputs"][f"{fqn}.0"] if o in streams]
                order = "encoder_first" if returned[:1] == ["encoder_hidden_states"] else "hidden_first"
                assert order == spec.order, f"{fqn}.0 returns {returned}: {order}, the table says {spec.order}"
        return {"nodes": len(cap.gm.graph.nodes), "capture_s": round(cap.seconds, 2)}
    feature, _, dtype = feature.partition("@")
    if dtype:
        model, captures = model_state(name, dtype)
    schedule = SCHEDULE if backend is None else COMPILED_SCHEDULE
    opt = optimize(model, plan_for(m, feature, schedule), backend=backend, captures=captures)
    steps = opt.plan.steps_count
    assert not opt.plan.bypass
    applied = reference_hooks(m, model, opt.configs)
    reuse = 0
    with torch.no_grad():
        for s in range(steps):
            inputs = cast_inputs(m.inputs(1.0 - s / steps, seed=s), dtype)
            got = first(opt(**inputs))
            plain = first(model(**inputs))
            with applied():
                by_hand = first(model(**inputs))
            if Action.READ in opt.plan.decision(s):
                reuse += 1
                tol = {} if dtype else dict(rtol=1e-5, atol=1e-5)  # half types: torch's defaults for the dtype
                torch.testing.assert_close(got, by_hand, **tol,
                                           msg=lambda msg: f"step {s} (reuse) != CacheAgent by hand: {msg}")
                assert not torch.equal(got, plain), f"step {s}: a reuse step returned the uncached output"
            else:
                assert torch.equal(by_hand, plain), f"step {s}: the by-hand reference differs on a compute step"
                if backend is None:
                    assert torch.equal(got, plain), f"step {s}: compute step differs from the original model"
                else:
                    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    assert reuse == len(opt.plan.reuse_steps()) > 0
    assert opt.stats.steps_reused == reuse and opt.stats.stale_reads_avoided == 0
    # a model export cannot capture runs the Dynamo path when compiled, the eager path otherwise
    fallback = "eager" if backend is None else "dynamo"
    assert opt.stats.path == (fallback if m.export_error else "export"), opt.stats
    return {"variants": len(opt.plan.variants()), "reuse_steps": reuse, "path": opt.stats.path}


@pytest.mark.parametrize("name, feature, backend", list(cases()))
def test_coverage(name, feature, backend):
    run_matrix_cell(name, feature, backend)
