"""torchair op list, torchair-like tracing and the GE-mode op check."""

import importlib.util
import json
import os
import zipfile

import pytest
import torch
import torch.nn.functional as F

from npu_cache_fx import opcheck
from npu_cache_fx.passes.sdpa import decompose_sdpa

torch.set_num_threads(1)
aten = torch.ops.aten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDPA_OVERLOADS = {
    "aten.scaled_dot_product_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
}


# --------------------------------------------------------------------------- the list
def test_json_loads_and_lists():
    data = opcheck.torchair_ops_data()
    assert data["torch_npu_version"] == "2.14.0"
    supported = opcheck.torchair_supported_ops()
    assert isinstance(supported, frozenset)
    assert opcheck.torchair_supported_ops() is supported  # cached
    for op in ("aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.copy_.default",
               "aten.addmm.default", "aten._softmax.default", "aten._safe_softmax.default",
               "aten.masked_fill.Scalar", "aten.gelu.default", "aten.reshape.default"):
        assert op in supported, op
    for op in ("aten.index_put.default", "aten.index_put_.default", "aten._unsafe_index_put.default",
               "aten.repeat_interleave.self_int", *SDPA_OVERLOADS):
        assert op not in supported, op
    assert "aten.index_put.default" in data["unimplemented"]
    assert data["implemented"] == sorted(data["implemented"])
    assert not set(data["implemented"]) & set(data["unimplemented"])
    c = data["counts"]
    assert (c["registered_aten"], c["implemented_aten"]) == (1699, 318)
    assert "approximate" in data["notes"]["aten.gelu.default"]


def _load_tool():
    spec = importlib.util.spec_from_file_location("torchair_ops", os.path.join(ROOT, "tools", "torchair_ops.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FAKE_CONVERTER = '''
from torchair._ge_concrete_graph.ge_converter.converter_utils import *


@declare_supported([Support(F32(2, 2), F32(2, 2))])
@register_fx_node_ge_converter(torch.ops.aten.mm.default)
def conveter_aten_mm_default(self, mat2, meta_outputs=None):
    """NB: aten::mm(Tensor self, Tensor mat2) -> Tensor"""
    if self.dtype == DataType.DT_INT8:
        raise RuntimeError("int8 not supported")
    return ge.MatMul(self, mat2, None)


@register_fx_node_ge_converter(torch.ops.aten.mm.out)
def conveter_aten_mm_out(self, mat2, *, out=None, meta_outputs=None):
    """NB: aten::mm.out(...)"""
    raise NotImplementedError("torch.ops.aten.mm.out ge_converter is not implemented!")


@register_fx_node_ge_converter(torch.ops.aten.index_put.default)
def conveter_aten_index_put_default(self, indices, values, accumulate=False, meta_outputs=None):
    if accumulate:
        raise RuntimeError("torch.ops.aten.index_put.default ge_converter is not supported!")
    else:
        raise NotImplementedError("not implemented")


try:
    op = torch.ops.aten._safe_softmax.default
except AttributeError:
    op = None
if op is not None:

    @register_fx_node_ge_converter(torch.ops.aten._safe_softmax.default)
    def conveter_safe_softmax(self, dim, dtype=None, meta_outputs=None):
        return ge.SoftmaxV2(self, axes=[dim])


@register_fx_node_ge_converter(getattr(torch.ops.aten.mean, "names_dim", None))
def conveter_mean_names(self, dim, keepdim=False, meta_outputs=None):
    raise RuntimeError("torch.ops.aten.mean.names_dim ge_converter is not supported!")


def _impl(self, dim, meta_outputs=None):
    return ge.Shape(self)


reg = register_fx_node_ge_converter(torch.ops.aten.sym_size.int)(_impl)
'''


def test_tool_parses_a_wheel(tmp_path):
    tool = _load_tool()
    wheel = tmp_path / "torch_npu-9.9.9-cp311-cp311-manylinux_2_28_x86_64.whl"
    base = tool.CONVERTER_DIR
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("torch_npu-9.9.9.dist-info/METADATA", "Metadata-Version: 2.1\nName: torch_npu\nVersion: 9.9.9\n")
        zf.writestr(base + "__init__.py", "")
        zf.writestr(base + "aten/__init__.py", "")
        zf.writestr(base + "aten/fake.py", FAKE_CONVERTER)
    out = tmp_path / "ops.json"
    assert tool.main(["--wheel", str(wheel), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["torch_npu_version"] == "9.9.9"
    assert data["implemented"] == ["aten._safe_softmax.default", "aten.mm.default", "aten.sym_size.int"]
    assert data["unimplemented"] == ["aten.index_put.default", "aten.mm.out"]
    assert data["notes"]["conditional_registrations"]["unimplemented_count"] == 1


# --------------------------------------------------------------------------- helpers
def test_op_name_and_aten_ops():
    assert opcheck.op_name(aten.add.Tensor) == "aten.add.Tensor"
    assert opcheck.op_name(aten.mm.default) == "aten.mm.default"
    assert opcheck.op_name(torch.add) is None

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x @ x.T) + 1

    gm = torch.export.export(M(), (torch.randn(3, 3),), strict=False).module()
    counts = opcheck.aten_ops(gm)
    assert counts["aten.matmul.default"] == 1 and counts["aten.relu.default"] == 1


def test_copy_into_placeholder_stays_in_trace():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    buf = g.placeholder("buf")
    y = g.call_function(aten.mul.Tensor, (x, 2.0))
    g.call_function(aten.copy_.default, (buf, y))
    z = g.call_function(aten.add.Tensor, (y, buf))
    g.output((z,))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    X, B = torch.randn(3), torch.zeros(3)
    traced = opcheck.trace_like_torchair(gm, [X, B])
    assert opcheck.aten_ops(traced)["aten.copy_.default"] == 1
    assert opcheck.unsupported_torchair_ops(gm, [X, B]) == {}
    # the recorded graph runs and performs the mutation
    buf2 = torch.zeros(3)
    (out,) = traced(X, buf2)
    torch.testing.assert_close(buf2, X * 2)
    torch.testing.assert_close(out, X * 4)


def test_view_becomes_reshape():
    traced = opcheck.trace_like_torchair(lambda x: x.view(6) * 2, [torch.randn(2, 3)])
    ops = opcheck.aten_ops(traced)
    assert "aten.view.default" not in ops and ops["aten.reshape.default"] == 1


def test_custom_ops_are_unsupported():
    ops = pytest.importorskip("npu_cache_fx.ops")

    class M(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            torch.ops.npu_cache_fx.cache_write(y, "s0")
            return y + torch.ops.npu_cache_fx.cache_read("s0", [3], torch.float32, torch.device("cpu"))

    assert ops.CACHE_WRITE is torch.ops.npu_cache_fx.cache_write.default
    assert opcheck.unsupported_torchair_ops(M(), [torch.randn(3)]) == {
        "npu_cache_fx.cache_read.default": 1, "npu_cache_fx.cache_write.default": 1}


def test_gelu_erf_nodes():
    class M(torch.nn.Module):
        def forward(self, x):
            return F.gelu(x) + F.gelu(x, approximate="tanh") + F.gelu(x, approximate="none")

    gm = torch.export.export(M(), (torch.randn(4),), strict=False).module()
    assert len(opcheck.gelu_erf_nodes(gm)) == 2
    assert len(opcheck.gelu_erf_nodes(opcheck.trace_like_torchair(M(), [torch.randn(4)]))) == 2


# --------------------------------------------------------------------------- diffusers
def _flux():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    s_img, s_txt = 16, 8
    kwargs = dict(hidden_states=torch.randn(1, s_img, 4), encoder_hidden_states=torch.randn(1, s_txt, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([1.0]),
                  img_ids=torch.zeros(s_img, 3), txt_ids=torch.zeros(s_txt, 3), return_dict=False)
    return model, kwargs


def _wan():
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=32).eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32), return_dict=False)
    return model, kwargs


@pytest.fixture(scope="session", params=["flux", "wan"])
def exported(request):
    torch.manual_seed(0)
    model, kwargs = {"flux": _flux, "wan": _wan}[request.param]()
    gm = torch.export.export(model, (), kwargs, strict=False).module()
    with torch.no_grad():
        ref = model(**kwargs)[0]
    return request.param, model, kwargs, gm, ref


def test_diffusers_only_attention_is_unsupported(exported):
    name, model, kwargs, gm, ref = exported
    assert opcheck.aten_ops(gm)["aten.scaled_dot_product_attention.default"] == 2
    # torch.export puts aten._assert_tensor_metadata before .to(dtype): no GE converter either.
    before = opcheck.unsupported_torchair_ops(gm, kwargs)
    assert set(before) == {"aten._assert_tensor_metadata.default",
                           "aten._scaled_dot_product_flash_attention_for_cpu.default"}
    assert opcheck.strip_runtime_asserts(gm) == before["aten._assert_tensor_metadata.default"]
    assert opcheck.unsupported_torchair_ops(gm, kwargs) == {
        "aten._scaled_dot_product_flash_attention_for_cpu.default": 2}
    # The model itself (what dynamo would hand torchair) has no asserts.
    assert opcheck.unsupported_torchair_ops(model, kwargs) == {
        "aten._scaled_dot_product_flash_attention_for_cpu.default": 2}

    res = decompose_sdpa(gm)
    assert res.modified and sum(res.rewritten.values()) == 2
    assert opcheck.unsupported_torchair_ops(gm, kwargs) == {}
    with torch.no_grad():
        out = gm(**kwargs)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    # both models use tanh GELU, which torchair converts faithfully
    assert opcheck.gelu_erf_nodes(gm) == []
