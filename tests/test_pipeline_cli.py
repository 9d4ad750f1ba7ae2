"""The one-liner and the CLI on the user's own pipeline, offline: tiny Flux, SD3, Wan 2.1, Wan 2.2 (two
experts) and Qwen-Image pipelines saved with ``save_pretrained`` into a temporary folder and loaded back
with ``DiffusionPipeline.from_pretrained``.

* ``enable_cache`` on the loaded pipeline equals ``optimize()`` applied by hand; ``disable_cache``
  restores the bit-identical uncached output.
* ``npu-cache-fx generate | bench | search --pipeline DIR`` run on each and write their files (on Wan 2.2
  the search tunes one plan over both experts).
* A missing folder, an empty prompt file and a pipeline without a DiT each get a one-line error.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.slow  # real pipelines, saved and loaded: not in the quick tier

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from npu_cache_fx import disable_cache, enable_cache, load_plan, optimize, save_plan  # noqa: E402
from npu_cache_fx.cli import main  # noqa: E402
from npu_cache_fx.recipes import conservative_plan  # noqa: E402
from npu_cache_fx.runtime import OptimizedModule  # noqa: E402
from tiny_pipelines import flux_pipeline, qwen_image_pipeline, sd3_pipeline, wan_pipeline  # noqa: E402

STEPS = 6
PIPELINES = {  # name: (builder, pipeline call arguments for a tiny run)
    "flux": (flux_pipeline, dict(height=32, width=32, max_sequence_length=8)),
    "sd3": (sd3_pipeline, dict(height=32, width=32, max_sequence_length=8, negative_prompt="blurry")),
    "wan": (wan_pipeline, dict(height=16, width=16, num_frames=5, max_sequence_length=8, negative_prompt="blurry")),
    # Wan 2.2: transformer runs steps 0-2 (timesteps 1000, 923, 819), transformer_2 steps 3-5 (668, 432, 9)
    "wan22": (lambda: wan_pipeline(boundary_ratio=0.75), dict(height=16, width=16, num_frames=5,
                                                              max_sequence_length=8, negative_prompt="blurry")),
    "qwen": (qwen_image_pipeline, dict(height=32, width=32, max_sequence_length=16, negative_prompt="blurry",
                                       true_cfg_scale=2.0)),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each tiny pipeline saved to a folder, with a plan for it (every block list, refresh every 2nd step)."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {}
    for name, (build, _) in PIPELINES.items():
        pipe = build()
        pipe.save_pretrained(root / name)
        save_plan(conservative_plan(pipe.transformer, steps=STEPS), root / f"{name}-plan")
        out[name] = root / name
    (root / "prompts.txt").write_text("a cat\n\n# held out below\na red car on the sky\n")
    (root / "empty.txt").write_text("\n# nothing\n")
    return root, out


def _load(path):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call_args(name):
    return [a for k, v in PIPELINES[name][1].items() for a in ("--call", f"{k}={json.dumps(v)}")]


def _generate(pipe, name):
    kw = dict(PIPELINES[name][1], prompt="a cat", num_inference_steps=STEPS, output_type="latent")
    with torch.no_grad():
        out = pipe(generator=torch.Generator().manual_seed(0), **kw)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name", list(PIPELINES))
def test_enable_cache_on_a_saved_pipeline_equals_optimize_by_hand(saved, name):
    root, paths = saved
    pipe = _load(paths[name])
    originals = {n: getattr(pipe, n) for n in ("transformer", "transformer_2") if getattr(pipe, n, None) is not None}
    assert len(originals) == (2 if name == "wan22" else 1)
    plain = _generate(pipe, name)
    plan = root / f"{name}-plan"
    enable_cache(pipe, plan)
    assert all(isinstance(getattr(pipe, n), OptimizedModule) for n in originals)
    cached = _generate(pipe, name)
    reused = {n: getattr(pipe, n).stats.steps_reused for n in originals}
    disable_cache(pipe)
    assert all(getattr(pipe, n) is m for n, m in originals.items())
    assert torch.equal(_generate(pipe, name), plain)  # bit-identical uncached output
    for n, m in originals.items():  # by hand
        setattr(pipe, n, optimize(m, load_plan(plan)))
    assert torch.equal(_generate(pipe, name), cached) and not torch.equal(cached, plain)
    assert all(r > 0 for r in reused.values()), reused  # both Wan 2.2 experts reuse on their own steps


@pytest.mark.parametrize("name", list(PIPELINES))
def test_generate_and_bench_cli(saved, name, tmp_path):
    root, paths = saved
    common = ["--pipeline", str(paths[name]), "--plan", str(root / f"{name}-plan"), *_call_args(name)]
    assert main(["--threads", "1", "generate", *common, "--prompt", "a cat", "--out", str(tmp_path / "g")]) == 0
    result = json.loads((tmp_path / "g" / "generate.json").read_text())
    assert len(result["images"]) == 2 and all((tmp_path / "g" / p.split("/")[-1]).exists() for p in result["images"])
    assert result["steps"] == STEPS and result["seconds_per_image"]["cached"] > 0 and result["psnr"] > 0
    assert set(result["summary"]) == ({"transformer", "transformer_2"} if name == "wan22" else {"transformer"})
    assert all(row["steps_reused"] > 0 for row in result["summary"].values())
    rc = main(["--threads", "1", "bench", *common, "--prompts", str(root / "prompts.txt"), "--repeats", "1",
               "--out", str(tmp_path / "b")])
    assert rc == 0
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert bench["prompts"] == 2 and bench["steps"] == STEPS and bench["speedup"] > 0
    assert 0 < bench["cached"]["psnr"] < float("inf") and 1 <= bench["fewer_steps"]["steps"] <= STEPS
    assert "| fewer steps (" in (tmp_path / "b" / "report.md").read_text()


# The search's recorder sees three call patterns: no CFG (Flux), batched CFG (SD3), a cond and an uncond call
# per step over two experts (Wan 2.2; Wan 2.1 is it with one expert, Qwen-Image's true CFG the same pattern
# with one denoiser); generate / bench (above) run every family's pipeline
@pytest.mark.parametrize("name", ["flux", "sd3", "wan22"])
def test_search_cli_on_the_users_prompts(saved, name, tmp_path):
    root, paths = saved
    rc = main(["--threads", "1", "search", "--pipeline", str(paths[name]), "--prompts", str(root / "prompts.txt"),
               "--steps", str(STEPS), "--target", "1.3", "--max-full-runs", "3", "--repeats", "1", *_call_args(name),
               "--out", str(tmp_path)])
    report = json.loads((tmp_path / "search.json").read_text())
    assert rc == (0 if report["best"] else 1)
    assert (tmp_path / "search.md").exists() and (tmp_path / "pareto.png").exists()
    assert report["best"] is not None and report["best"]["config"][0]["steps_count"] == STEPS
    assert 1 <= report["full_runs"] <= 3
    if name == "wan22":  # one plan over both experts; transformer_2 takes over at step 3
        assert report["notes"]["denoisers"] == {"names": ["transformer", "transformer_2"], "segments": [3]}
    # the plan it wrote drives generate
    assert main(["--threads", "1", "generate", "--pipeline", str(paths[name]), "--plan", str(tmp_path / "search.json"),
                 "--prompt", "a dog", *_call_args(name), "--out", str(tmp_path / "g")]) == 0


def test_cli_errors_say_what_to_pass(saved, tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    root, paths = saved
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4,), layers_per_block=1,
                       norm_num_groups=1, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "unet")
    prompts = ["--prompts", str(root / "prompts.txt")]
    cases = [
        (["bench", "--pipeline", str(tmp_path / "missing"), *prompts], "no such folder; pass a folder written by"),
        (["search", "--pipeline", str(paths["flux"]), "--prompts", str(root / "empty.txt")], "no prompts in the file"),
        (["search", "--pipeline", str(paths["flux"]), "--prompts", str(tmp_path / "none.txt")], "no such file"),
        (["search", "--pipeline", str(paths["flux"])], "--prompts FILE is required"),
        (["bench", "--pipeline", str(tmp_path / "unet"), *prompts], "has no DiT denoiser (pipe.transformer)"),
        (["generate", "--pipeline", str(paths["flux"])], "--prompt TEXT is required"),
        (["generate", "--pipeline", str(paths["flux"]), "--prompt", "x", "--seeds", "a"], "--seeds 'a'"),
        (["generate", "--pipeline", str(paths["flux"]), "--prompt", "x", "--call", "steps"], "pass KEY=VALUE"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        out = capsys.readouterr().out.strip().splitlines()
        assert out[-1].startswith("npu-cache-fx: error: --") and message in out[-1], (argv, out)
    with pytest.raises(SystemExit):  # argparse: the two exclude each other
        main(["search", "--model", "tiny-flux", "--pipeline", str(paths["flux"])])
