"""capture.region_from_nodes on DiT residual patterns found by the coverage matrix (tests/test_coverage.py)."""

import pytest
import torch
from torch import nn

from npu_cache_fx import CacheConfig, ConfigError, optimize
from npu_cache_fx.capture import block_region, capture


class SkipBlock(nn.Module):
    """HunyuanDiT-like: blocks of the second half re-project ``cat(hidden, skip)`` -- no residual from input."""

    def __init__(self, skip: bool):
        super().__init__()
        self.skip_linear = nn.Linear(8, 4) if skip else None
        self.ff = nn.Linear(4, 4)

    def forward(self, hidden_states, temb, skip=None):
        if self.skip_linear is not None:
            hidden_states = self.skip_linear(torch.cat([hidden_states, skip], dim=-1))
        return hidden_states + self.ff(hidden_states) * temb


class LongSkipDiT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([SkipBlock(False), SkipBlock(False), SkipBlock(False), SkipBlock(True)])

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None]
        skips = []
        for i, block in enumerate(self.blocks):
            hidden_states = block(hidden_states, temb, skip=skips.pop() if i == 3 else None)
            if i == 0:
                skips.append(hidden_states)
        return (hidden_states,)


def inputs(t=1.0, seed=0):
    return dict(hidden_states=torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(seed)),
                timestep=torch.tensor([t]))


@pytest.fixture(scope="session")
def skip_capture():
    torch.manual_seed(0)
    model = LongSkipDiT().eval()
    return model, capture(model, inputs(), ["blocks"])


def test_reprojected_stream_pairs_with_hidden_states_input(skip_capture):
    _, cap = skip_capture
    region = block_region(cap, "blocks", 2, 4)
    assert [s.role for s in region.streams] == ["hidden_states"]
    (stream,) = region.streams
    assert cap.signatures["blocks.2"][stream.input] == "hidden_states"
    assert len(region.side_inputs) == 2  # temb and the long skip from block 0


def test_two_outputs_of_one_input_still_rejected(skip_capture):
    _, cap = skip_capture
    with pytest.raises(ConfigError, match="both continue input"):
        block_region(cap, "blocks", 0, 2)  # block 0's output also feeds block 3's skip


def test_reprojected_range_caches_out_minus_in(skip_capture):
    model, _ = skip_capture
    opt = optimize(model, CacheConfig(steps_count=3, step_start=0, step_interval=3, block_start=2, block_end=4))
    with torch.no_grad():
        x0, x1 = inputs(1.0, 0), inputs(0.5, 1)
        opt(**x0)

        def upto(x, n):  # blocks [0, n) by hand: hidden at block n's input
            h, temb = x["hidden_states"], x["timestep"][:, None, None]
            for i in range(n):
                h = model.blocks[i](h, temb)
            return h
        delta = model(**x0)[0] - upto(x0, 2)
        got = opt(**x1)[0]  # reuse step
    torch.testing.assert_close(got, upto(x1, 2) + delta)


class CastBlock(nn.Module):
    """Wan-like: ``temb.float()`` is a no-op that export records inside the block -- and the
    caller's ``temb`` is rebound to that node, so the next block reads a node of this block's span."""

    def __init__(self):
        super().__init__()
        self.ff = nn.Linear(4, 4)

    def forward(self, hidden_states, temb):
        temb = temb.float()
        return hidden_states + self.ff(hidden_states) * temb


class CastDiT(nn.Module):
    def __init__(self, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(CastBlock() for _ in range(n))

    def forward(self, hidden_states, timestep):
        temb = timestep[:, None, None] * 1.0
        for block in self.blocks:
            hidden_states = block(hidden_states, temb)
        return (hidden_states * temb,)


def test_noop_cast_read_after_the_range_is_no_stream():
    torch.manual_seed(0)
    model = CastDiT().eval()
    cap = capture(model, inputs(), ["blocks"])
    region = block_region(cap, "blocks", 1, 3)
    assert [s.role for s in region.streams] == ["hidden_states"]  # not also a zero-delta "temb" stream
    opt = optimize(model, CacheConfig(steps_count=3, step_start=0, step_interval=3, block_start=1, block_end=3))
    with torch.no_grad():
        x0, x1 = inputs(1.0, 0), inputs(0.5, 1)
        opt(**x0)
        got = opt(**x1)[0]
    (_, shape, *_), = list(opt.variant_graphs.values())[-1].meta["cache_slots"]
    assert shape == [1, 3, 4]

    def run(x, blocks):
        h, temb = x["hidden_states"], x["timestep"][:, None, None] * 1.0
        for i in blocks:
            h = model.blocks[i](h, temb)
        return h
    delta = run(x0, [0, 1, 2]) - run(x0, [0])
    want = model.blocks[3](run(x1, [0]) + delta, x1["timestep"][:, None, None] * 1.0) * x1["timestep"][:, None, None]
    torch.testing.assert_close(got, want)


def test_hunyuan_dit_ranges_starting_at_a_skip_source_consumer():
    pytest.importorskip("diffusers")
    from coverage_models import MODELS
    m = MODELS["hunyuan_dit"]
    model = m.build()
    cap = capture(model, m.inputs(1.0), ["blocks"])
    # block 1 normalises (.float(), a no-op) the long-skip tensor block 3 reads; [1, 2) used to fail
    for lo, hi in [(1, 2), (1, 3), (2, 4), (0, 4)]:
        assert [s.role for s in block_region(cap, "blocks", lo, hi).streams] == ["hidden_states"]


def test_capture_records_stack_traces_only_when_debugging(caplog):
    """Recording each node's Python stack is about a sixth of an export; nothing reads it. A capture leaves it
    off (and puts torch's process-wide flag back) unless npu_cache_fx.capture logs at DEBUG. Two threads
    capturing at once take turns: export is not thread-safe (before, both failed: "ProxyTorchDispatchMode slot
    already occupied", "Trying to pop empty mode stack")."""
    import threading

    import torch.fx.config as fx_config
    if not hasattr(fx_config, "do_not_emit_stack_traces"):
        pytest.skip("this torch always records stack traces")
    model = LongSkipDiT()

    def traced(cap):
        return sum(1 for n in cap.gm.graph.nodes if n.op == "call_function" and n.meta.get("stack_trace"))

    assert traced(capture(model, inputs(), ["blocks"])) == 0
    assert fx_config.do_not_emit_stack_traces is False
    with caplog.at_level("DEBUG", logger="npu_cache_fx.capture"):
        assert traced(capture(model, inputs(), ["blocks"])) > 0
    errors = []

    def run():
        try:
            for _ in range(3):
                capture(model, inputs(), ["blocks"])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)
    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and fx_config.do_not_emit_stack_traces is False
