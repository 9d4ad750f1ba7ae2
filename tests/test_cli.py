"""The CLI: --help for every subcommand, and the demo end to end in a small mode."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # real pipelines, trained models or searches: not in the quick tier

from npu_cache_fx.cli import build_parser, main


@pytest.mark.parametrize("cmd", [[], ["demo"], ["search"], ["generate"], ["bench"]])
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(cmd + ["--help"])
    assert exit_.value.code == 0
    assert "usage: npu-cache-fx" in capsys.readouterr().out


def test_help_lists_the_shipped_models(capsys):
    from npu_cache_fx import cli, models
    assert cli.SHIPPED.split(" | ") == models.list_models()
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "tiny-flux-deep" in capsys.readouterr().out


def test_console_script_installed():
    out = subprocess.run([sys.executable, "-m", "npu_cache_fx.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "search" in out.stdout


def test_demo_small_writes_its_files(tmp_path):
    """The demo's default is tiny-flux-deep (issue #21: it fits 2 minutes, `bash scripts/demo.sh`); the small
    mode runs the digit model (8 steps of the 57-block model take 30 s here)."""
    pytest.importorskip("diffusers")
    from npu_cache_fx.cli import build_parser
    assert build_parser().parse_args(["demo"]).model == "tiny-flux-deep"
    rc = main(["--threads", "1", "demo", "--model", "tiny-flux", "--samples", "4", "--steps", "8", "--repeats", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    for name in ("grid.png", "report.md", "demo.json"):
        assert (tmp_path / name).stat().st_size > 0
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["speedup"] > 1.0 and result["cached"]["psnr"] > 20  # an ~2x plan measures faster than 1x
    assert result["stats"]["steps_reused"] > 0
    assert "| fewer steps" in (tmp_path / "report.md").read_text() and "| AdaStep" in (tmp_path / "report.md").read_text()
    assert result["adastep"]["speedup"] > 0 and result["adastep"]["steps_skipped"] > 0  # AdaStep skipped steps


def test_bench_with_a_plan_file(tmp_path):
    pytest.importorskip("diffusers")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"best": {"config": [
        {"steps_count": 8, "step_start": 2, "step_interval": 2, "blocks": "single_transformer_blocks"}]}}))
    assert build_parser().parse_args(["bench", "--config", str(plan)]).config == str(plan)
    rc = main(["--threads", "1", "bench", "--config", str(plan), "--samples", "2", "--steps", "8", "--repeats", "1",
               "--out", str(tmp_path / "b")])
    assert rc == 0 and (tmp_path / "b" / "report.md").exists()


def test_verdict_compares_only_at_equal_speed_or_on_dominance():
    """The demo printed "the cache plan beats fewer steps at equal speed" for rows 48 % apart in speed."""
    from npu_cache_fx.bench import verdict
    assert verdict(2.89, 50.6, 4.28, 40.5).startswith("no verdict: the measured speeds differ by 48%")
    assert verdict(2.0, 45.0, 2.1, 40.0).startswith("the cache plan beats fewer steps at equal speed")
    assert verdict(2.1, 39.0, 2.0, 40.0).startswith("fewer steps beats this cache plan at equal speed")
    assert verdict(2.4, 41.0, 2.0, 40.0).startswith("the cache plan beats fewer steps: as fast or faster")
    assert verdict(2.0, 39.0, 3.0, 40.0).startswith("fewer steps beats this cache plan: as fast or faster")
    assert verdict(3.0, 39.0, 2.0, 40.0).startswith("no verdict")  # faster but worse, 50 % apart


def test_fewer_steps_refit_to_the_measured_speed():
    """The deep demo measured 12 steps at 2.59x against a 2.34x cache plan (11 % apart: no verdict); 13 steps,
    scaled from that measurement, land at 2.39x, within the verdict's 10 %."""
    from npu_cache_fx.bench import EQUAL_SPEED, closest_steps
    assert closest_steps(2.59, 12, 2.34, 28) == 13
    assert abs(2.59 * 12 / 13 / 2.34 - 1) <= EQUAL_SPEED
    assert closest_steps(2.0, 14, 2.0, 28) == 14
    assert closest_steps(10.0, 3, 1.0, 28) == 28  # capped at the sampler's own steps
    assert closest_steps(1.0, 28, 100.0, 28) == 1
