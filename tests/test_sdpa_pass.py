"""decompose_sdpa: SDPA -> matmul/softmax (or torch_npu's fused op) for torchair GE mode."""

import operator

import pytest
import torch
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult
from torch.testing import FileCheck

from npu_cache_fx import opcheck
from npu_cache_fx.passes.sdpa import DecomposeSDPA, decompose_sdpa

torch.set_num_threads(1)
aten = torch.ops.aten


class Attn(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw) * 2


def _qkv(hkv=4, dtype=torch.float32, L=8, S=12):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, L, 16, generator=g).to(dtype)
    k = torch.randn(2, hkv, S, 16, generator=g).to(dtype)
    v = torch.randn(2, hkv, S, 16, generator=g).to(dtype)
    return q, k, v


def _export(module, args):
    return torch.export.export(module, args, strict=False).module()


CASES = {
    # name: (sdpa kwargs, mask factory, kv heads, softmax op expected)
    "plain": ({}, None, 4, "aten._softmax.default"),
    "scale": ({"scale": 0.3}, None, 4, "aten._softmax.default"),
    "causal": ({"is_causal": True}, None, 4, "aten._safe_softmax.default"),
    "bool_mask": ({}, lambda: torch.rand(2, 1, 8, 12, generator=torch.Generator().manual_seed(1)) > 0.3, 4,
                  "aten._safe_softmax.default"),
    "float_mask": ({}, lambda: torch.randn(8, 12, generator=torch.Generator().manual_seed(2)), 4,
                   "aten._safe_softmax.default"),
    "gqa": ({"enable_gqa": True}, None, 2, "aten._softmax.default"),
    "gqa_causal": ({"enable_gqa": True, "is_causal": True}, None, 2, "aten._safe_softmax.default"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matmul_rewrite(case):
    kw, mask_fn, hkv, softmax = CASES[case]
    q, k, v = _qkv(hkv)
    args = (q, k, v) if mask_fn is None else (q, k, v, mask_fn())
    module = Attn(**kw)
    gm = _export(module, args)
    FileCheck().check_count("torch.ops.aten.scaled_dot_product_attention.default", 1, exactly=True).run(gm.code)

    res = decompose_sdpa(gm)
    assert isinstance(res, PassResult) and res.modified and res.graph_module is gm
    assert dict(res.rewritten) == {"aten.scaled_dot_product_attention.default": 1}
    code = gm.code
    FileCheck().check_not("scaled_dot_product").run(code)
    FileCheck().check_count("torch.ops.aten.matmul.default", 2, exactly=True).run(code)
    FileCheck().check_count("torch.ops.aten.transpose.int", 1, exactly=True).run(code)
    FileCheck().check_count("torch.ops." + softmax, 1, exactly=True).run(code)
    if kw.get("is_causal"):
        FileCheck().check("torch.ops.aten.new_ones.default").check("torch.ops.aten.triu.default") \
            .check("torch.ops.aten.masked_fill.Scalar").run(code)
    if case == "bool_mask":
        FileCheck().check("torch.ops.aten.logical_not.default").check("torch.ops.aten.masked_fill.Scalar").run(code)
    if case == "float_mask":
        FileCheck().check("torch.ops.aten.matmul.default").check("torch.ops.aten.add.Tensor") \
            .check("torch.ops.aten._safe_softmax.default").run(code)
    if case.startswith("gqa"):
        FileCheck().check_count("torch.ops.aten.expand.default", 2, exactly=True).check_not("repeat_interleave") \
            .run(code)

    torch.testing.assert_close(gm(*args), module(*args), atol=1e-5, rtol=1e-5)
    assert opcheck.unsupported_torchair_ops(gm, args) == {}


def test_rewrites_aot_traced_graph():
    q, k, v = _qkv(2)
    mask = torch.rand(8, 12, generator=torch.Generator().manual_seed(3)) > 0.2
    module = Attn(enable_gqa=True)
    traced = opcheck.trace_like_torchair(module, (q, k, v, mask))
    ops = opcheck.aten_ops(traced)
    assert ops["aten._scaled_dot_product_flash_attention_for_cpu.default"] == 1
    res = decompose_sdpa(traced)
    assert dict(res.rewritten) == {"aten._scaled_dot_product_flash_attention_for_cpu.default": 1}
    FileCheck().check_not("scaled_dot_product").check_not("operator.getitem").run(traced.code)
    assert set(opcheck.aten_ops(traced)) <= opcheck.torchair_supported_ops()
    (out,) = traced(q, k, v, mask)
    torch.testing.assert_close(out, module(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_low_precision_softmax_in_fp32():
    q, k, v = _qkv(4, torch.bfloat16)
    module = Attn()
    gm = _export(module, (q, k, v))
    decompose_sdpa(gm)
    FileCheck().check("torch.ops.aten.matmul.default").check("torch.ops.aten._to_copy.default") \
        .check("torch.float32").check("torch.ops.aten._softmax.default").check("torch.ops.aten._to_copy.default") \
        .check("torch.bfloat16").check("torch.ops.aten.matmul.default").run(gm.code)
    out = gm(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), module(q, k, v).float(), atol=3e-2, rtol=3e-2)

    gm2 = _export(module, (q, k, v))
    decompose_sdpa(gm2, softmax_fp32=False)
    FileCheck().check_not("_to_copy").run(gm2.code)


def test_new_nodes_carry_meta():
    q, k, v = _qkv()
    gm = _export(Attn(), (q, k, v))
    decompose_sdpa(gm)
    mm = [n for n in gm.graph.nodes if n.target is aten.matmul.default]
    assert mm[-1].meta["val"].shape == (2, 4, 8, 16)
    assert "nn_module_stack" in mm[-1].meta or "stack_trace" in mm[-1].meta


def test_no_attention_is_a_noop_and_passbase_form():
    gm = _export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    code = gm.code
    p = DecomposeSDPA()
    res = p(gm)
    assert isinstance(res, PassResult) and not res.modified and sum(p.rewritten.values()) == 0
    assert gm.code == code


def test_dropout_is_rejected():
    q, k, v = _qkv()
    gm = _export(Attn(dropout_p=0.1), (q, k, v))
    with pytest.raises(ValueError, match="dropout_p"):
        decompose_sdpa(gm)


def test_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        DecomposeSDPA("flash")


# --------------------------------------------------------------------------- npu fused op
# Real schema of torch_npu 2.14.0 (csrc/aten/npu_native_functions_by_codegen.yaml).
FIA_SCHEMA = (
    "npu_fused_infer_attention_score(Tensor query, Tensor key, Tensor value, *, Tensor? pse_shift=None, "
    "Tensor? atten_mask=None, SymInt[]? actual_seq_lengths=None, SymInt[]? actual_seq_lengths_kv=None, "
    "Tensor? dequant_scale1=None, Tensor? quant_scale1=None, Tensor? dequant_scale2=None, "
    "Tensor? quant_scale2=None, Tensor? quant_offset2=None, Tensor? antiquant_scale=None, "
    "Tensor? antiquant_offset=None, Tensor? key_antiquant_scale=None, Tensor? key_antiquant_offset=None, "
    "Tensor? value_antiquant_scale=None, Tensor? value_antiquant_offset=None, Tensor? block_table=None, "
    "Tensor? query_padding_size=None, Tensor? kv_padding_size=None, Tensor? key_shared_prefix=None, "
    "Tensor? value_shared_prefix=None, SymInt[]? actual_shared_prefix_len=None, Tensor? query_rope=None, "
    "Tensor? key_rope=None, Tensor? key_rope_antiquant_scale=None, int num_heads=1, float scale=1.0, "
    "int pre_tokens=2147483647, int next_tokens=2147483647, str input_layout=\"BSH\", "
    "int num_key_value_heads=0, int sparse_mode=0, int inner_precise=0, int block_size=0, "
    "int antiquant_mode=0, int key_antiquant_mode=0, int value_antiquant_mode=0, "
    "bool softmax_lse_flag=False) -> (Tensor, Tensor)")


def _fake_fia(query, key, value, **kw):
    """CPU reference of the BNSD, sparse_mode=0 subset: atten_mask True = masked out."""
    assert kw.get("input_layout") == "BNSD"
    n, nkv = kw["num_heads"], kw.get("num_key_value_heads", 0) or query.shape[1]
    assert query.shape[1] == n and key.shape[1] == nkv
    if nkv != n:
        key = key.repeat_interleave(n // nkv, dim=1)
        value = value.repeat_interleave(n // nkv, dim=1)
    s = (query.float() @ key.float().transpose(-2, -1)) * kw["scale"]
    if kw.get("atten_mask") is not None:
        s = s.masked_fill(kw["atten_mask"].bool(), float("-inf"))
    out = (s.softmax(-1) @ value.float()).to(query.dtype)
    return out, query.new_empty((0,), dtype=torch.float32)


@pytest.fixture
def fake_fia():
    """A stand-in for torch_npu's op, registered for this test only."""
    lib = torch.library.Library("npu", "FRAGMENT")
    lib.define(FIA_SCHEMA)
    lib.impl("npu_fused_infer_attention_score", _fake_fia, "CompositeExplicitAutograd")
    yield torch.ops.npu.npu_fused_infer_attention_score.default
    lib._destroy()


NPU_CASES = {
    "plain": ({}, None, 4),
    "causal": ({"is_causal": True}, None, 4),
    "bool_mask": ({}, lambda: torch.rand(8, 12, generator=torch.Generator().manual_seed(1)) > 0.3, 4),
    "gqa": ({"enable_gqa": True, "scale": 0.2}, None, 2),
}


@pytest.mark.parametrize("case", list(NPU_CASES))
def test_npu_fused_rewrite(fake_fia, case):
    kw, mask_fn, hkv = NPU_CASES[case]
    q, k, v = _qkv(hkv, torch.bfloat16)
    args = (q, k, v) if mask_fn is None else (q, k, v, mask_fn())
    module = Attn(**kw)
    gm = _export(module, args)
    res = decompose_sdpa(gm, impl="npu_fused_infer_attention_score")
    assert sum(res.rewritten.values()) == 1
    code = gm.code
    scale = kw.get("scale", 16 ** -0.5)
    FileCheck().check_not("scaled_dot_product").check_not("aten.matmul") \
        .check("torch.ops.npu.npu_fused_infer_attention_score.default").check("num_heads = 4") \
        .check(f"scale = {scale}").check("input_layout = 'BNSD'") \
        .check(f"num_key_value_heads = {2 if case == 'gqa' else 0}").run(code)
    FileCheck().check_count("torch.ops.npu.npu_fused_infer_attention_score.default", 1, exactly=True).run(code)
    if case == "causal":
        FileCheck().check("torch.ops.aten.triu.default").check("atten_mask = triu").run(code)
    if case == "bool_mask":
        FileCheck().check("torch.ops.aten.logical_not.default").check("torch.ops.aten.expand.default").run(code)
    if case == "plain":
        FileCheck().check("atten_mask = None").run(code)
    fia_nodes = [n for n in gm.graph.nodes if n.target is fake_fia]
    assert [u.target for u in fia_nodes[0].users] == [operator.getitem]
    # torchair implements the fused op's converter (ge_converter/custom/fused_infer_attention_score.py)
    assert opcheck.unsupported_torchair_ops(gm, args) == {}
    torch.testing.assert_close(gm(*args).float(), module(*args).float(), atol=3e-2, rtol=3e-2)


def test_npu_fused_rejects_fp32_and_float_masks(fake_fia):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="float16/bfloat16"):
        decompose_sdpa(_export(Attn(), (q, k, v)), impl="npu_fused_infer_attention_score")
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    gm = _export(Attn(), (qb, kb, vb, torch.randn(8, 12, dtype=torch.bfloat16)))
    with pytest.raises(NotImplementedError, match="additive"):
        decompose_sdpa(gm, impl="npu_fused_infer_attention_score")


def test_npu_fused_needs_torch_npu():
    try:
        torch.ops.npu.npu_fused_infer_attention_score
    except AttributeError:
        pass
    else:
        pytest.skip("torch_npu (or a stand-in) registers the op here")
    q, k, v = _qkv(4, torch.bfloat16)
    gm = _export(Attn(), (q, k, v))
    with pytest.raises(RuntimeError, match="needs torch_npu"):
        decompose_sdpa(gm, impl="npu_fused_infer_attention_score")
