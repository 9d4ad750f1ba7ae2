"""Pass-level tests: toy graph in, FileCheck on gm.code, numerics against eager."""

import pytest
import torch
from torch.testing import FileCheck

from npu_cache_fx.capture import block_region, capture
from npu_cache_fx.ops import SlotStore
from npu_cache_fx.passes import block_cache_pass, eliminate_dead_code, lower_cache_ops
from toy import ToyDiT, toy_inputs

GAINS = [2.0 ** i for i in range(8)]


def fresh(cap):
    import torch.fx as fx
    graph = fx.Graph()
    graph.output(graph.graph_copy(cap.gm.graph, {}))
    return fx.GraphModule(cap.gm, graph)


@pytest.fixture(scope="session")
def single():
    model = ToyDiT(single=6)
    inputs = toy_inputs(900.0)
    return model, inputs, capture(model, inputs, ["blocks"])


@pytest.fixture(scope="session")
def flux_like():
    model = ToyDiT(dual=3, joint=3)
    inputs = toy_inputs(900.0)
    return model, inputs, capture(model, inputs, ["transformer_blocks", "single_transformer_blocks"])


def flat(inputs):
    return [inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["timestep"]]


def test_write_variant_records_delta(single):
    model, inputs, cap = single
    region = block_region(cap, "blocks", 1, 4)
    assert [s.role for s in region.streams] == ["hidden_states"]
    assert len(region.side_inputs) == 2  # encoder (context) and temb pass through
    gm = block_cache_pass(fresh(cap), region, "write", "dit").graph_module
    FileCheck().check_count("npu_cache_fx.cache_write", 1, exactly=True) \
        .check_not("npu_cache_fx.cache_read").run(gm.code)
    for i in range(6):
        FileCheck().check(f"blocks_{i}_gain").run(gm.code)
    with SlotStore().active() as store:
        (out,) = gm(*flat(inputs))
    assert torch.equal(out, model(**inputs)[0])
    assert torch.equal(store.tensors["dit.hidden_states"], torch.full((1, 4, 2), 900.0 * sum(GAINS[1:4])))


def test_read_variant_removes_range(single):
    model, inputs, cap = single
    region = block_region(cap, "blocks", 1, 4)
    gm = block_cache_pass(fresh(cap), region, "read", "dit").graph_module
    FileCheck().check_count("npu_cache_fx.cache_read", 1, exactly=True) \
        .check_not("npu_cache_fx.cache_write").run(gm.code)
    for i in (1, 2, 3):
        FileCheck().check_not(f"blocks_{i}_gain").run(gm.code)
    for i in (0, 4, 5):
        FileCheck().check(f"blocks_{i}_gain").run(gm.code)
    assert not any(n.name in region.nodes for n in gm.graph.nodes)  # nothing of the range is left
    store = SlotStore()
    store.tensors["dit.hidden_states"] = torch.full((1, 4, 2), 3.0)
    later = toy_inputs(500.0)
    with store.active():
        (out,) = gm(*flat(later))
    want = later["hidden_states"] + 500.0 * (GAINS[0] + GAINS[4] + GAINS[5]) + 3.0
    assert torch.equal(out, want)


def test_one_block_region(single):
    _, inputs, cap = single
    region = block_region(cap, "blocks", 5, 6)
    gm = block_cache_pass(fresh(cap), region, "write", "d").graph_module
    with SlotStore().active() as store:
        gm(*flat(inputs))
    assert torch.equal(store.tensors["d.hidden_states"], torch.full((1, 4, 2), 900.0 * GAINS[5]))


def test_dual_stream_pairing_by_dataflow_not_return_order(flux_like):
    # DualBlock returns (encoder, hidden) with equal shapes; pairing must follow dataflow.
    model, inputs, cap = flux_like
    region = block_region(cap, "transformer_blocks", 0, 3)
    assert sorted(s.role for s in region.streams) == ["encoder_hidden_states", "hidden_states"]
    gm = block_cache_pass(fresh(cap), region, "write", "x").graph_module
    FileCheck().check_count("npu_cache_fx.cache_write", 2, exactly=True).run(gm.code)
    with SlotStore().active() as store:
        gm(*flat(inputs))
    h = sum(2.0 ** i for i in range(3)) * 900.0
    assert torch.equal(store.tensors["x.hidden_states"], torch.full((1, 4, 2), h))
    assert torch.equal(store.tensors["x.encoder_hidden_states"], torch.full((1, 4, 2), 256 * h))


def test_joint_blocks_cat_slice_pairing(flux_like):
    model, inputs, cap = flux_like
    region = block_region(cap, "single_transformer_blocks", 0, 2)
    by_role = {s.role: s for s in region.streams}
    assert set(by_role) == {"hidden_states", "encoder_hidden_states"}
    # the pairing agrees with call-signature chaining: block 2 receives block 1's outputs by name
    sig = cap.signatures["single_transformer_blocks.2"]
    for role, stream in by_role.items():
        assert sig[stream.output] == role
    gm = block_cache_pass(fresh(cap), region, "read", "j").graph_module
    FileCheck().check_count("npu_cache_fx.cache_read", 2, exactly=True).run(gm.code)
    FileCheck().check_count("aten.cat", 1, exactly=True).run(gm.code)  # only joint block 2 is left


def test_multi_region_rewrite_downstream_first(flux_like):
    model, inputs, cap = flux_like
    gm = fresh(cap)
    block_cache_pass(gm, block_region(cap, "single_transformer_blocks", 0, 3), "read", "s")
    block_cache_pass(gm, block_region(cap, "transformer_blocks", 0, 3), "read", "d")
    # Only hidden leaves the joint blocks; skipping them leaves the dual blocks' encoder stream dead.
    FileCheck().check_count("npu_cache_fx.cache_read", 2, exactly=True).check_not("aten.cat").run(gm.code)
    store = SlotStore()
    store.tensors.update({k: torch.full((1, 4, 2), v) for k, v in
                          [("d.hidden_states", 1.0), ("d.encoder_hidden_states", 2.0), ("s.hidden_states", 4.0)]})
    with store.active():
        (out,) = gm(*flat(inputs))
    assert torch.equal(out, inputs["hidden_states"] + 5.0)


def test_lowering_turns_cache_ops_into_inputs_and_copy(single):
    _, inputs, cap = single
    region = block_region(cap, "blocks", 1, 4)
    gm = lower_cache_ops(block_cache_pass(fresh(cap), region, "write", "dit").graph_module).graph_module
    FileCheck().check_not("npu_cache_fx").check_count("torch.ops.aten.copy_.default(cache_dit_hidden_states",
                                                      1, exactly=True).run(gm.code)
    assert gm.meta["cache_slots"] == [("dit.hidden_states", [1, 4, 2], torch.float32, torch.device("cpu"))]
    buf = torch.zeros(1, 4, 2)
    ptr = buf.data_ptr()
    gm(*flat(inputs), buf)
    assert buf.data_ptr() == ptr and torch.equal(buf, torch.full((1, 4, 2), 900.0 * sum(GAINS[1:4])))
    read = lower_cache_ops(block_cache_pass(fresh(cap), region, "read", "dit").graph_module).graph_module
    FileCheck().check_not("npu_cache_fx").check_not("copy_").run(read.code)
    later = toy_inputs(500.0)
    (out,) = read(*flat(later), buf)
    assert torch.equal(out, later["hidden_states"] + 500.0 * (GAINS[0] + GAINS[4] + GAINS[5])
                       + 900.0 * sum(GAINS[1:4]))


def test_dce_drops_export_asserts_but_keeps_cache_writes():
    # export inserts aten._assert_tensor_metadata where a diffusers model casts (``.to(dtype)``)
    from dit_models import tiny_wan, wan_inputs
    model = tiny_wan(2)
    cap = capture(model, wan_inputs(0.5), ["blocks"])
    gm = fresh(cap)
    is_assert = lambda n: n.op == "call_function" and "assert" in str(n.target)  # noqa: E731
    asserts = [n for n in gm.graph.nodes if is_assert(n)]
    assert asserts
    block_cache_pass(gm, block_region(cap, "blocks", 0, 2), "write", "w", dce=False)
    n_before = len(gm.graph.nodes)
    eliminate_dead_code(gm)
    assert not [n for n in gm.graph.nodes if is_assert(n)]
    assert len(gm.graph.nodes) <= n_before - len(asserts)
    FileCheck().check_count("npu_cache_fx.cache_write", 1, exactly=True).run(gm.code)


def test_read_variant_drops_in_place_ops_of_the_range():
    # diffusers Wan applies rotary embeddings with an in-place copy_ into a slice; a reuse variant
    # must still drop the whole range (fx treats mutable ops as impure).
    from dit_models import tiny_wan, wan_inputs
    from npu_cache_fx import CacheConfig, optimize
    from npu_cache_fx.schedule import Action
    opt = optimize(tiny_wan(4), CacheConfig(steps_count=6, step_start=1, step_interval=2))
    full = opt.build_variant((Action.COMPUTE,), **wan_inputs(0.5))
    assert any(n.target is torch.ops.aten.copy_.default for n in full.graph.nodes)
    read = opt.build_variant((Action.READ,), **wan_inputs(0.5))
    FileCheck().check_not("aten.copy_").check_not("scaled_dot_product").run(read.code)
    assert len(read.graph.nodes) < len(full.graph.nodes) // 5
