"""CogVideoX with a DiT-cache starting point (no MindIE-SD config was given to us for CogVideoX: tune it
with the quality tools before production): blocks [5, 37) of 42, refresh from step 12 every 3 steps,
no reuse after step 45, 50 steps.

    python examples/cogvideox.py                              # tiny random transformer (default, CPU)
    python examples/cogvideox.py --model-id THUDM/CogVideoX-5b [--out video]
"""

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_loop

RECIPE = RECIPES['CogVideoX']  # npu_cache_fx/recipes.py


def save(out, path):
    from diffusers.utils import export_to_video
    export_to_video(out.frames[0], path + ".mp4", fps=8)
    print(f"saved {path}.mp4")


def main() -> None:
    args = parse_args(RECIPE, __doc__)
    if args.tiny:
        run_tiny_loop(RECIPE, "cogvideox", backend_arg(args.backend))
    else:
        from diffusers import CogVideoXPipeline
        run_real(RECIPE, CogVideoXPipeline, args, dict(prompt=args.prompt), save)


if __name__ == "__main__":
    main()
