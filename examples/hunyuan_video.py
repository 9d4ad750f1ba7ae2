"""HunyuanVideo with MindIE-SD's shipped DiT-cache config: single-stream blocks [5, 35), dual-stream
blocks [3, 18), refresh from step 10 every 3 steps (50 steps, the pipeline default).

    python examples/hunyuan_video.py                          # tiny random transformer (default, CPU)
    python examples/hunyuan_video.py --model-id hunyuanvideo-community/HunyuanVideo [--out video]
"""

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_loop

RECIPE = RECIPES['HunyuanVideo']  # npu_cache_fx/recipes.py


def save(out, path):
    from diffusers.utils import export_to_video
    export_to_video(out.frames[0], path + ".mp4", fps=15)
    print(f"saved {path}.mp4")


def main() -> None:
    args = parse_args(RECIPE, __doc__)
    if args.tiny:
        run_tiny_loop(RECIPE, "hunyuan_video", backend_arg(args.backend))
    else:
        from diffusers import HunyuanVideoPipeline
        run_real(RECIPE, HunyuanVideoPipeline, args, dict(prompt=args.prompt), save)


if __name__ == "__main__":
    main()
