"""Run the coverage matrix (tests/test_coverage.py) and the pipeline tests, write docs/coverage.md.

    python scripts/coverage.py [--out docs/coverage.md] [--no-pipelines] [MODEL ...]

Every cell of the matrix is run in this process with the same function the
pytest module runs (``test_coverage.run_matrix_cell``); a cell listed as a
known failure (``Model.xfail`` / ``Model.export_error`` in
tests/coverage_models.py) is reported ``xfail`` with its reason when it fails
and ``XPASS`` when it unexpectedly passes. The pipeline tests run under pytest
(``--junitxml``); the dynamic-shape section measures capture seconds per shape
on the tiny Flux pipeline.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PASS, FAIL, XFAIL, XPASS = "pass", "FAIL", "xfail", "XPASS"
MARK = {PASS: "✅", FAIL: "❌", XFAIL: "⚠️ xfail", XPASS: "❗ XPASS"}


def run_matrix(models: Optional[List[str]]) -> List[Dict[str, object]]:
    import test_coverage as tc
    from coverage_models import MODELS
    rows = []
    for name in models or list(MODELS):
        m = MODELS[name]
        for feature, backend in tc.features(m):
            known = tc.expected_failure(m, feature, backend)
            t0 = time.perf_counter()
            detail, error = {}, None
            try:
                detail = tc.run_matrix_cell(name, feature, backend) or {}
            except Exception as err:  # noqa: BLE001 -- a cell's failure is a result
                error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
            secs = time.perf_counter() - t0
            if known:
                status = XFAIL if error and isinstance_name(error, known[1]) else (FAIL if error else XPASS)
            else:
                status = FAIL if error else PASS
            rows.append(dict(model=name, cls=m.cls, feature=feature, backend=backend or "eager", status=status,
                             seconds=secs, reason=known[0] if known else "", error=error or "", **detail))
            print(f"{tc.cell_id(name, feature, backend)}: {status} ({secs:.1f}s){'  ' + error if error else ''}",
                  file=sys.stderr)
    return rows


def isinstance_name(error: str, exc_type: type) -> bool:
    """Whether ``error`` ("Name: message") names ``exc_type`` or a subclass of it."""
    name = error.split(":", 1)[0]
    return exc_type is Exception or any(c.__name__ == name for c in _subclasses(exc_type))


def _subclasses(cls: type):
    yield cls
    for sub in cls.__subclasses__():
        yield from _subclasses(sub)


def run_pipelines() -> List[Tuple[str, str, str, float]]:
    """(test, status, message, seconds) of tests/test_pipelines.py under pytest."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "pipelines.xml")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rxX",
                        f"--junitxml={xml}", "tests/test_pipelines.py"], cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not os.path.exists(xml):
            return [("tests/test_pipelines.py", FAIL, "pytest produced no report", 0.0)]
        out = []
        for case in ET.parse(xml).getroot().iter("testcase"):
            status, msg = PASS, ""
            for child in case:
                if child.tag == "skipped" and child.get("type") == "pytest.xfail":
                    status, msg = XFAIL, child.get("message", "")
                elif child.tag == "skipped":
                    status, msg = "skipped", child.get("message", "")
                elif child.tag in ("failure", "error"):
                    status, msg = FAIL, (child.get("message") or "")[:200]
            out.append((case.get("name"), status, msg.replace("\n", " "), float(case.get("time", 0))))
        return out


def capture_cost() -> Dict[int, float]:
    """Capture seconds per latent shape of the tiny Flux pipeline (one optimized module, 32 then 48)."""
    from npu_cache_fx import CacheConfig, optimize
    from tiny_pipelines import flux_pipeline
    pipe = flux_pipeline()
    opt = optimize(pipe.transformer, CacheConfig(steps_count=6, step_start=1, step_interval=2,
                                                 blocks="single_transformer_blocks"))
    pipe.transformer = opt
    out = {}
    with torch.no_grad():
        for size in (32, 48):
            before = opt.stats.capture_seconds
            pipe("a cat", num_inference_steps=6, height=size, width=size, max_sequence_length=8,
                 output_type="latent", generator=torch.Generator().manual_seed(0))
            out[size] = opt.stats.capture_seconds - before
    assert opt.stats.captures == 2
    return out


def cell(rows: List[Dict[str, object]]) -> str:
    if not rows:
        return "-"
    parts = []
    for r in rows:
        label = r["feature"].split("@")[0].split(":", 1)[1] if ":" in r["feature"] else ""
        path = ""
        if r.get("path") in ("eager", "dynamo"):
            path = f"({r['path']} path)"
        parts.append(" ".join(x for x in (MARK[r["status"]], label, path) if x))
    return "<br>".join(parts)


def markdown(rows, pipelines, cost, seconds) -> str:
    import diffusers
    from coverage_models import MODELS
    lines = [
        "# Coverage: DiT families x features x backends",
        "",
        "Generated by `python scripts/coverage.py` (diffusers {}, torch {}, one CPU thread); do not edit by hand."
        .format(diffusers.__version__, torch.__version__.split("+")[0]),
        "The matrix is `tests/test_coverage.py`; the models, their inputs and expected block lists are",
        "`tests/coverage_models.py` (tiny random-init configs, no hub). Forward patterns of every block list:",
        "[forward_patterns.md](forward_patterns.md).",
        "",
        "Per model: **capture** (export + `find_block_lists` == the expected lists); **dit** (DiT block cache on",
        "each denoising block list, a sub-range of it); **attention** (attention cache on each list, whole list);",
        "**combined** (DiT cache on one list + attention cache on another list, or on the rest of the same list).",
        "Eager plans run 6 steps (compute, write, read, write, read, compute); `aot_eager` runs 4 (write, read,",
        "write, read: each variant is a compile). Compute steps are bit-identical to the model (`torch.equal`;",
        "`aot_eager`: allclose 1e-5); reuse steps equal `CacheAgent` applied by hand (allclose 1e-5).",
        "Every cell runs in fp32; the **bf16** and **fp16** columns run the combined plan (eager) with the model",
        "and its float inputs cast (`.to(dtype)`), against `CacheAgent` by hand in the same dtype (torch's",
        "default tolerances for the dtype).",
        "",
        "| model | capture | dit cache | attention cache | combined (eager) | combined (aot_eager) | bf16 | fp16 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_model: Dict[str, List[Dict[str, object]]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for name, rs in by_model.items():
        pick = lambda pred: [r for r in rs if pred(r)]  # noqa: E731
        lines.append("| " + " | ".join([
            f"{name} (`{MODELS[name].cls}`)",
            cell(pick(lambda r: r["feature"] == "capture")),
            cell(pick(lambda r: r["feature"].startswith("dit:"))),
            cell(pick(lambda r: r["feature"].startswith("attention:"))),
            cell(pick(lambda r: r["feature"] == "combined" and r["backend"] == "eager")),
            cell(pick(lambda r: r["feature"] == "combined" and r["backend"] != "eager")),
            cell(pick(lambda r: r["feature"] == "combined@bf16")),
            cell(pick(lambda r: r["feature"] == "combined@fp16")),
        ]) + " |")
    counts = {s: sum(r["status"] == s for r in rows) for s in (PASS, XFAIL, FAIL, XPASS)}
    lines += ["", f"{len(rows)} cells: {counts[PASS]} pass, {counts[XFAIL]} xfail, {counts[FAIL]} fail, "
              f"{counts[XPASS]} XPASS; {seconds:.0f}s in all.", ""]
    known = [r for r in rows if r["reason"]]
    if known:
        lines += ["## Known failures (strict xfail)", "", "| model | cell | result | reason |", "|---|---|---|---|"]
        for r in known:
            lines.append(f"| {r['model']} | {r['feature']} ({r['backend']}) | {MARK[r['status']]} | {r['reason']} |")
        lines.append("")
    eager = sorted({r["model"] for r in rows if r.get("path") in ("eager", "dynamo")})
    if eager:
        lines += [f"Models export cannot capture, run through `optimize()`'s fallback: {', '.join(eager)}. With a "
                  "compile backend the **dynamo path** (each block compiled by `torch.compile`, the cache "
                  "semantics on the host around the blocks, the top level eager); without one the **eager "
                  "path** (same semantics, nothing compiled).", ""]
    failed = [r for r in rows if r["status"] in (FAIL, XPASS)]
    if failed:
        lines += ["## Failures", "", "| model | cell | error |", "|---|---|---|"]
        lines += [f"| {r['model']} | {r['feature']} ({r['backend']}) | {r['error'] or 'passed unexpectedly'} |"
                  for r in failed]
        lines.append("")
    lines += ["## Cells", "", "| model | feature | backend | result | variants | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['feature']} | {r['backend']} | {MARK[r['status']]} | "
                     f"{r.get('variants', '-')} | {r['seconds']:.1f} |")
    lines.append("")
    if pipelines is not None:
        lines += ["## Pipelines (`tests/test_pipelines.py`)", "",
                  "Tiny pipelines assembled offline (`tests/tiny_pipelines.py`): CLIP + T5 text encoders with",
                  "in-memory tokenizers, `AutoencoderKL` / `AutoencoderKLWan`, `FlowMatchEulerDiscreteScheduler`;",
                  "`pipe.transformer = optimize(pipe.transformer, cfg)` and the unmodified pipeline call.", "",
                  "| test | result | seconds | note |", "|---|---|---|---|"]
        for name, status, msg, secs in pipelines:
            lines.append(f"| `{name}` | {MARK.get(status, status)} | {secs:.1f} | {msg} |")
        lines += ["", "`num_inference_steps` other than `steps_count`: the plan is scaled to the request's step count",
                  "(`CacheConfig.scaled`; the count read from `pipe._num_timesteps`, from `cache_context(...,",
                  "num_inference_steps=n)` or `set_steps(n)`), one generation per pipeline call, equal to CacheAgent",
                  "by hand on the scaled configs (`test_flux_other_step_counts_scale_the_plan`,",
                  "`test_wan_pipeline_other_step_count_scales_the_plan`).", ""]
    if cost:
        lines += ["## Dynamic shapes", "",
                  "A new latent resolution is served by the dynamic capture of the first (`backend_options['shapes']`,",
                  "dynamic by default: one `torch.export` with symbolic sizes, the variants and their compiled code",
                  "reused); each shape has its own cache buffers, so a cache recorded at one shape is never read at",
                  "another (`test_flux_second_resolution_reuses_the_capture_and_never_mixes`: 32x32, 48x48, 32x32",
                  "again -> `opt.stats.captures == 1`, outputs equal to a fresh module run on each shape alone). A",
                  "shape the capture cannot serve (another batch, dtype, device, or `shapes='static'`) is captured",
                  "again. Capture seconds of the tiny Flux (2 + 4 blocks) here:", "",
                  "| latents | capture seconds |", "|---|---|"]
        lines += [f"| {s}x{s} ({(s // 2) ** 2} tokens) | {v:.2f} |" for s, v in cost.items()]
        lines += ["", "The second shape costs no capture. Export time follows the graph (number of blocks), not the",
                  "tensor sizes; a shape that is captured again costs about as much as the first.", ""]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "coverage.md"))
    parser.add_argument("--no-pipelines", action="store_true", help="skip the pipeline tests and shape timing")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    rows = run_matrix(args.models)
    seconds = time.perf_counter() - t0
    pipelines = cost = None
    if not args.no_pipelines:
        pipelines = run_pipelines()
        cost = capture_cost()
    text = markdown(rows, pipelines, cost, seconds)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {args.out}", file=sys.stderr)
    if any(r["status"] in (FAIL, XPASS) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
