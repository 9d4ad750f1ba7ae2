"""Wan2.1 text-to-video with a DiT-cache starting point (no MindIE-SD config was given to us for Wan:
tune it with the quality tools before production): blocks [5, 35) of 40, refresh from step 12 every
3 steps, no reuse after step 45, 50 steps.

    python examples/wan.py                                    # tiny random pipeline (default, CPU)
    python examples/wan.py --model-id Wan-AI/Wan2.1-T2V-1.3B-Diffusers [--out video]
"""

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_pipeline

RECIPE = RECIPES['Wan2.1']  # npu_cache_fx/recipes.py


def save(out, path):
    from diffusers.utils import export_to_video
    export_to_video(out.frames[0], path + ".mp4", fps=16)
    print(f"saved {path}.mp4")


def main() -> None:
    args = parse_args(RECIPE, __doc__)
    if args.tiny:
        from tiny_pipelines import wan_pipeline
        run_tiny_pipeline(RECIPE, wan_pipeline(), dict(prompt="a cat", negative_prompt="blurry", height=16, width=16,
                                                       num_frames=5, guidance_scale=5.0, max_sequence_length=8,
                                                       output_type="pt"), backend_arg(args.backend))
    else:
        from diffusers import WanPipeline
        run_real(RECIPE, WanPipeline, args, dict(prompt=args.prompt), save)


if __name__ == "__main__":
    main()
