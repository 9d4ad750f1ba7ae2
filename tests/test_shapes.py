"""Dynamic input shapes (npu_cache_fx.shapes, issue #19 goal 2): a second resolution reuses the capture, the
variants and their compiled code.

Quick tier: the option, binding sizes to a capture's symbols (a guard excludes inconsistent sizes), eager
outputs at two resolutions bit-equal to the per-shape path with one capture and per-shape buffers, the
static fallback with its reason. Slow tier: a counting backend (regional and full graphs, tiny Flux and tiny
Wan) over two resolutions x two generations x 50 steps in two contexts: every graph compiled at the first
resolution only, outputs equal to the static per-shape path; inductor at two resolutions.
"""

import pytest
import torch
from torch.utils import _pytree as pytree

pytest.importorskip("diffusers")

from npu_cache_fx import CacheConfig, optimize  # noqa: E402
from npu_cache_fx.backends import shape_mode  # noqa: E402
from npu_cache_fx.capture import capture  # noqa: E402
from npu_cache_fx.config import ConfigError  # noqa: E402
from npu_cache_fx.regions import RegionalProgram  # noqa: E402
from npu_cache_fx.runtime import CaptureCache  # noqa: E402
from npu_cache_fx.shapes import bind  # noqa: E402
from counting import CountingBackend, fresh_dynamo, scalar_inductor  # noqa: E402
from dit_models import flux_inputs, generate_cfg, tiny_flux, tiny_wan, wan_inputs  # noqa: E402
from toy import ToyDiT  # noqa: E402

STEPS = 50
FLUX_CFGS = [CacheConfig(steps_count=STEPS, step_start=3, step_interval=3, blocks="transformer_blocks"),
             CacheConfig(steps_count=STEPS, step_start=4, step_interval=2, step_end=10,
                         blocks="single_transformer_blocks", block_start=1, forecast="linear")]
WAN_CFGS = [CacheConfig(method="attention_cache", steps_count=STEPS, step_start=2, step_interval=3)]


def wan_sized(t, seed=0, side=8):
    g = torch.Generator().manual_seed(seed)
    kw = wan_inputs(t, seed)
    kw["hidden_states"] = torch.randn(1, 4, 2, side, side, generator=g)
    return kw


FLUX_SIZES = (16, 36)  # latent tokens of the two resolutions
WAN_SIZES = (8, 12)  # latent height = width


@pytest.fixture(scope="module")
def flux():
    return tiny_flux(layers=2, single=4)


def _make(name, size):
    if name == "flux":
        return lambda t, seed=0: flux_inputs(t, seed=seed, tokens=size)
    return lambda t, seed=0: wan_sized(t, seed=seed, side=size)


def _generate(opt, make_inputs, steps=STEPS, generations=2):
    return generate_cfg(opt, make_inputs, steps, generations)


def test_shape_mode_option():
    assert shape_mode("inductor") == "dynamic" and shape_mode(lambda gm, inputs: gm) == "dynamic"
    # nothing compiled to reuse: a static capture is about half the export's time, the step time is the same
    assert shape_mode(None) == "static" and shape_mode("eager") == "static"
    assert shape_mode(None, {"shapes": "dynamic"}) == "dynamic"
    assert shape_mode("aot_eager", {"graphs": "full"}) == "dynamic"
    assert shape_mode("torchair") == "static"  # graph replay: one recorded graph per shape
    assert shape_mode("inductor", {"mode": "reduce-overhead"}) == "static"
    assert shape_mode("inductor", {"shapes": "static"}) == "static"
    model = tiny_wan(layers=1)
    with pytest.raises(ConfigError, match=r"backend_options\['shapes'\]='symbolic'.*\['dynamic', 'static'\]"):
        optimize(model, WAN_CFGS, backend_options={"shapes": "symbolic"})
    with pytest.raises(ConfigError, match=r"graph replay"):
        optimize(model, WAN_CFGS, backend="inductor", backend_options={"mode": "reduce-overhead", "shapes": "dynamic"})
    opt = optimize(model, WAN_CFGS, backend="inductor", backend_options={"mode": "reduce-overhead"})
    assert opt.stats.shape_capture.startswith("static") and "graph replay" in opt.stats.shape_capture
    assert optimize(model, WAN_CFGS, backend="aot_eager").stats.shape_capture.startswith("dynamic")
    assert optimize(model, WAN_CFGS).stats.shape_capture.startswith("static")


def test_bind_checks_sizes_and_guards(flux):
    """Sizes bind the capture's symbols only when every size and guard holds: image ids of another token
    count than the latents (export's guard s_hidden + s_text == s_img_ids + s_txt_ids) do not bind."""
    cap = capture(flux, flux_inputs(0.5), ["transformer_blocks", "single_transformer_blocks"], dynamic=True)
    shapes = cap.meta["dynamic"]
    assert shapes is not None and len(shapes.symbols) >= 2

    def leaves(**kw):
        return pytree.tree_flatten(((), kw))[0]

    assert bind(shapes, leaves(**flux_inputs(0.5))) is not None
    assert sorted(bind(shapes, leaves(**flux_inputs(0.5, tokens=36))).values()) == [4, 4, 36, 36]
    bad = flux_inputs(0.5, tokens=36)
    bad["img_ids"] = torch.zeros(30, 3)
    assert bind(shapes, leaves(**bad)) is None
    other_channels = flux_inputs(0.5)
    other_channels["hidden_states"] = torch.randn(1, 16, 8)  # a specialised dimension
    assert bind(shapes, leaves(**other_channels)) is None


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_dynamic_eager_two_resolutions(flux, name):
    """Eager: one capture serves both resolutions, outputs bit-equal to the per-shape path, cache buffers
    allocated per shape (and per context)."""
    model, cfgs, sizes = (flux, FLUX_CFGS, FLUX_SIZES) if name == "flux" else (tiny_wan(layers=2), WAN_CFGS,
                                                                               WAN_SIZES)
    dyn = optimize(model, cfgs, backend_options={"shapes": "dynamic"})
    static = optimize(model, cfgs)
    for size in sizes:
        got = _generate(dyn, _make(name, size), steps=12, generations=1)
        want = _generate(static, _make(name, size), steps=12, generations=1)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert dyn.stats.captures == 1 and dyn.stats.shapes_reused == 1
    assert static.stats.captures == 2
    assert dyn.stats.steps_reused == static.stats.steps_reused > 0
    for ctx in dyn._contexts.values():
        assert len(ctx.buffers) == 2  # one set per shape
        sizes_seen = [sorted(tuple(b.shape) for b in bufs.values()) for bufs in ctx.buffers.values()]
        assert sizes_seen[0] != sizes_seen[1]
    assert dyn.stats.cache_bytes == static.stats.cache_bytes
    assert dyn.stats.shape_capture.startswith("dynamic")
    labels = list(dyn.stats.timings)
    assert len(labels) == 2 and dyn.stats.timings[labels[1]]["dynamic_capture_of"] == labels[0]


def test_static_fallback_says_why():
    """A model that fixes every input size (export specialises them all) is captured per shape, and
    stats.shape_capture says why; a size export specialises is captured again."""

    class Fixed(ToyDiT):  # branches on its input's size: export specialises it
        def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict=False):
            if hidden_states.shape[1] in (4, 6):
                hidden_states = hidden_states * 1
            return super().forward(hidden_states, encoder_hidden_states, timestep, return_dict)

    cfg = CacheConfig(steps_count=6, step_start=2, step_interval=2, blocks="blocks")

    def run(text):
        fixed = Fixed(single=3)
        opt = optimize(fixed, cfg, backend_options={"shapes": "dynamic"})
        static = optimize(fixed, cfg)
        with torch.no_grad():
            for n in (4, 6):
                for s in range(6):
                    kw = dict(hidden_states=torch.full((1, n, 1), 2.0), encoder_hidden_states=torch.ones(1, text, 1),
                              timestep=torch.tensor([6.0 - s]))
                    assert torch.equal(opt(**kw)[0], static(**kw)[0])
        assert opt.stats.steps_reused == static.stats.steps_reused > 0
        return opt

    opt = run(text=1)  # every size 0/1 or specialised
    assert opt.stats.captures == 2
    assert opt.stats.shape_capture.startswith("static") and "specialised every input" in opt.stats.shape_capture
    opt = run(text=3)  # the text length stays symbolic, the token count does not: one dynamic capture per count
    assert opt.stats.captures == 2 and opt.stats.shapes_reused == 0
    assert opt.stats.shape_capture.startswith("dynamic")


@pytest.mark.slow
# 2 x 50 steps on the main flow; 2 x 20 show every variant of the others (the plans repeat from step 10 on)
@pytest.mark.parametrize("name,graphs,steps", [("flux", "regional", STEPS), ("flux", "full", 20),
                                               ("wan", "regional", 20)])
def test_dynamic_compiled_once_for_two_resolutions(flux, name, graphs, steps):
    """A counting backend: every graph is compiled at the first resolution, none at the second, over 2 x 50
    steps (2 x 20) in two contexts per resolution; outputs equal to the static per-shape path (uncompiled: aot_eager
    runs the same aten graphs). The per-shape compiled path compiles again:
    test_static_shapes_capture_and_compile_per_resolution."""
    model, cfgs, sizes = (flux, FLUX_CFGS, FLUX_SIZES) if name == "flux" else (tiny_wan(layers=3), WAN_CFGS,
                                                                               WAN_SIZES)
    if graphs == "full":  # each variant traced whole for symbolic sizes (~5 s apiece): a shallower Flux
        model = tiny_flux(layers=1, single=2)
    static = optimize(model, cfgs)
    want = {size: _generate(static, _make(name, size), steps) for size in sizes}
    backend = fresh_dynamo()
    opt = optimize(model, cfgs, backend=backend, backend_options={"graphs": graphs})
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = {sizes[0]: _generate(opt, _make(name, sizes[0]), steps)}
        compiled_first = len(backend.graphs)
        got[sizes[1]] = _generate(opt, _make(name, sizes[1]), steps)
    assert compiled_first > 0 and len(backend.graphs) == compiled_first  # 0 compiles at the second resolution
    for size in sizes:
        for a, b in zip(got[size], want[size]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    stats = opt.stats
    assert stats.captures == 1 and stats.shapes_reused == 1 and stats.graphs_compiled == compiled_first
    assert stats.graph_mode == graphs and stats.shape_capture.startswith("dynamic")
    first, second = stats.timings.values()
    assert all(v["graphs_compiled"] == 0 for v in second["variants"].values())
    assert second["capture_seconds"] == 0.0
    if graphs == "regional":
        programs = [v.fn for e in opt._entries.values() for v in e.variants.values()]
        assert all(isinstance(p, RegionalProgram) and p.symbolic for p in programs)


@pytest.mark.slow
def test_dynamic_inductor_two_resolutions():
    """inductor, regional: the second resolution compiles nothing; outputs match the uncompiled per-shape
    variants (inductor's own rounding: 1e-4). A Flux of one block per list (fewer distinct segments: a cold
    inductor compiles C++ per graph; scalar kernels compile faster); the per-shape compiled path compiles again:
    test_static_shapes_capture_and_compile_per_resolution."""
    flux = tiny_flux(layers=1, single=2)
    cfgs = FLUX_CFGS[:1]
    dyn = optimize(flux, cfgs, backend="inductor")
    static = optimize(flux, cfgs)
    torch._dynamo.reset()
    for size in FLUX_SIZES:
        compiled = dyn.stats.graphs_compiled
        with scalar_inductor():
            a = _generate(dyn, _make("flux", size), steps=10, generations=1)
        b = _generate(static, _make("flux", size), steps=10, generations=1)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
        if size != FLUX_SIZES[0]:
            assert dyn.stats.graphs_compiled == compiled
    assert dyn.stats.captures == 1 and static.stats.captures == 2


def test_static_shapes_capture_and_compile_per_resolution(flux):
    """``shapes="static"`` with a compiling backend (graph replay's default): a second resolution is captured and
    compiled again, as many graphs as the first, outputs equal to the uncompiled per-shape path (a counting
    backend that runs what it is handed: what is counted, not how it is compiled)."""
    backend, captures = CountingBackend("eager"), CaptureCache(flux)
    opt = optimize(flux, FLUX_CFGS[:1], backend=backend, backend_options={"shapes": "static"}, captures=captures)
    plain = optimize(flux, FLUX_CFGS[:1], captures=captures)  # the same static captures, taken by opt
    counts = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in FLUX_SIZES:
            got = _generate(opt, _make("flux", size), steps=6, generations=1)
            want = _generate(plain, _make("flux", size), steps=6, generations=1)
            for a, b in zip(got, want):
                assert torch.equal(a, b)
            counts.append(len(backend.graphs))
    assert counts[0] > 0 and counts[1] == 2 * counts[0]
    assert opt.stats.captures == 2 and opt.stats.shapes_reused == 0 and opt.stats.graphs_compiled == counts[1]
    assert opt.stats.shape_capture.startswith("static")


def test_backend_that_refuses_symbolic_sizes_compiles_per_shape(flux):
    """A backend that cannot compile a graph for symbolic sizes gets it per input shape (backends.PerShape): the
    capture is still reused, the second resolution compiles again and stats.graphs_compiled counts it."""
    from torch._subclasses.fake_tensor import FakeTensor

    compiled = []

    def static_only(gm, example_inputs):
        if any(isinstance(x, (FakeTensor, torch.SymInt)) for x in example_inputs):
            raise NotImplementedError("static shapes only")
        compiled.append(gm)
        return gm

    cfgs = FLUX_CFGS[:1]
    opt = optimize(flux, cfgs, backend=static_only, backend_options={"graphs": "full"})
    static = optimize(flux, cfgs)
    counts = []
    for size in FLUX_SIZES:
        got = _generate(opt, _make("flux", size), steps=8, generations=1)
        want = _generate(static, _make("flux", size), steps=8, generations=1)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        counts.append(len(compiled))
    n_variants = len(opt._entries[next(iter(opt._entries))].variants)
    assert counts == [n_variants, 2 * n_variants]  # every variant compiled again at the second shape
    assert opt.stats.captures == 1 and opt.stats.graphs_compiled == 2 * n_variants


def test_a_guard_added_by_a_compile_at_the_second_shape_never_serves_it_wrong(flux):
    """A variant first compiled at the second resolution may add a guard those sizes fail (a kernel specialised
    on a divisibility): the call that compiled it runs the uncompiled variant instead, and the next calls capture
    those sizes with static shapes. The backend here returns zeros where its guard does not hold; the call used
    to return them."""
    from torch._subclasses.fake_tensor import FakeTensor
    compiles = []

    def specialising(gm, example_inputs):
        compiles.append(gm)
        tokens = next((x.shape[1] for x in example_inputs if isinstance(x, FakeTensor) and x.dim() == 3
                       and isinstance(x.shape[1], torch.SymInt)), None)
        specialised = tokens is not None and len(compiles) == 2  # the second graph assumes 16k tokens
        if specialised:
            assert bool(tokens % 16 == 0)  # the hint (16 tokens) holds: export's shape env records the guard

        def run(*args):
            out = gm(*args)
            n = next(a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() == 3)
            if not specialised or n % 16 == 0:
                return out
            return [torch.zeros_like(o) if isinstance(o, torch.Tensor) else o for o in out]
        return run

    cfgs = [CacheConfig(steps_count=8, step_start=3, step_interval=3, blocks="transformer_blocks")]
    opt = optimize(flux, cfgs, backend=specialising, backend_options={"graphs": "full"})
    static = optimize(flux, cfgs)
    outs = {}
    for name, m in (("dynamic", opt), ("static", static)):
        _generate(m, _make("flux", FLUX_SIZES[0]), steps=3, generations=1)  # compute steps only: one variant
        m.reset()
        outs[name] = _generate(m, _make("flux", FLUX_SIZES[1]), steps=8, generations=1)  # the write at 3 compiles
    assert opt.stats.captures == 2  # the second shape captured again, static
    assert all(torch.equal(a, b) for a, b in zip(outs["dynamic"][:4], outs["static"][:4]))
    assert all(torch.isfinite(o).all() and o.abs().sum() > 0 for o in outs["dynamic"])


def test_regional_segments_compile_for_one_symbol_per_size():
    """A dynamic capture's blocks are compiled for fresh symbols, one per distinct size (shapes.canonical_inputs):
    in the capture Wan's block reads its token count as ``F*(H//2)*(W//2)`` and its rotary tables with ``Max``/``Min``
    strides, which compiled code recomputes in every index (tiny-wan's blocks ran 9 % slower than static ones).
    Every size a backend is handed for a block is a plain symbol or a constant, the hidden states and rotary
    tables share the token symbol, inputs are contiguous, blocks of one class still share one compile, glue keeps
    the capture's symbols, and the outputs at a second resolution equal the uncompiled per-shape variants."""
    from torch._subclasses.fake_tensor import FakeTensor
    seen = []

    def recording(gm, example_inputs):
        seen.append(list(example_inputs))
        return gm

    model = tiny_wan(layers=3)
    opt = optimize(model, WAN_CFGS, backend=recording)
    static = optimize(model, WAN_CFGS)
    for size in WAN_SIZES:
        got = _generate(opt, _make("wan", size), steps=6, generations=1)
        want = _generate(static, _make("wan", size), steps=6, generations=1)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert opt.stats.captures == 1 and opt.stats.graphs_compiled == len(seen)

    def canonical(ex):
        return any(isinstance(x, FakeTensor) and getattr(x.fake_mode, "npu_cache_fx_canonical", False) for x in ex)
    blocks = [ex for ex in seen if canonical(ex)]
    assert blocks and len(blocks) < len(seen)  # glue is compiled for the capture's own symbols
    for ex in blocks:
        tensors = [x for x in ex if isinstance(x, torch.Tensor)]
        assert all(x.is_contiguous() for x in tensors)
        assert all(s.node.expr.is_Symbol for x in tensors for s in x.shape if isinstance(s, torch.SymInt))
        rotary = {str(x.shape[1]) for x in tensors if x.dim() == 4}  # none where the attention output is read
        streams = {str(x.shape[1]) for x in tensors if x.dim() == 3}
        assert len(rotary) <= 1 and rotary <= streams, (rotary, streams)  # one token symbol for both
    assert any(x.dim() == 4 for ex in blocks for x in ex if isinstance(x, torch.Tensor))
    n_blocks = sum(1 for e in opt._entries.values() for v in e.variants.values() for s in v.fn.segments
                   if s.label[0] == "blocks")
    assert len(blocks) < n_blocks  # blocks of one class share a compile


def test_a_guard_on_a_fresh_symbol_reaches_the_capture():
    """A guard a compile adds on a block's fresh symbol (a kernel specialised on a divisibility of Wan's tokens)
    is translated to the capture's sizes and added to its guards: the second resolution, which fails it, is
    captured again and its blocks compiled again (a new version of the same key), never served by that code.
    The backend returns zeros where its guard does not hold."""
    from torch._subclasses.fake_tensor import FakeTensor
    tokens = [2 * (side // 2) ** 2 for side in WAN_SIZES]  # 2 frames, 2 x 2 patches
    assert tokens[0] % 16 == 0 and tokens[1] % 16

    def specialising(gm, example_inputs):
        index = next((k for k, x in enumerate(example_inputs) if isinstance(x, FakeTensor) and x.dim() == 3
                      and getattr(x.fake_mode, "npu_cache_fx_canonical", False)
                      and isinstance(x.shape[1], torch.SymInt) and x.shape[1].node.hint == tokens[0]), None)
        if index is not None:
            assert bool(example_inputs[index].shape[1] % 16 == 0)  # true at the hint: a guard on the fresh symbol

        def run(*args):
            out = gm(*args)
            if index is None or args[index].shape[1] % 16 == 0:
                return out
            return [torch.zeros_like(o) if isinstance(o, torch.Tensor) else o for o in out]
        return run

    model = tiny_wan(layers=2)
    cfgs = [CacheConfig(steps_count=8, step_start=3, step_interval=3)]
    opt = optimize(model, cfgs, backend=specialising)
    static = optimize(model, cfgs)
    for size in WAN_SIZES:
        got = _generate(opt, _make("wan", size), steps=8, generations=1)
        want = _generate(static, _make("wan", size), steps=8, generations=1)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), size
    assert opt.stats.captures == 2  # the second resolution fails the guard: captured again
    guards = [str(g.expr) for e in opt._entries.values() if e.dynamic is not None for g in e.dynamic.shape_env.guards]
    assert any("Mod" in g and "16" in g for g in guards)
    assert any("." in key for key in opt._segments.compiled)  # the blocks compiled again for the second capture
