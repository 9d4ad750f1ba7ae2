"""Qwen-Image-Edit with MindIE-SD's shipped DiT-cache config: blocks [10, 50) of 60, refresh from
step 10 every 3 steps, no reuse after step 35, 40 steps.

    python examples/qwen_image.py                              # tiny random transformer (default, CPU)
    python examples/qwen_image.py --model-id Qwen/Qwen-Image-Edit --image input.png [--out edited]
"""

import sys

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_loop

RECIPE = RECIPES['Qwen-Image']  # npu_cache_fx/recipes.py


def main() -> None:
    image = None
    if "--image" in sys.argv:  # our own option, not parse_args'
        i = sys.argv.index("--image")
        image = sys.argv[i + 1]
        del sys.argv[i:i + 2]
    args = parse_args(RECIPE, __doc__)
    if args.tiny:
        run_tiny_loop(RECIPE, "qwen_image", backend_arg(args.backend))
    else:
        from diffusers import QwenImageEditPipeline
        from PIL import Image
        if image is None:
            raise SystemExit("--image PATH is required with --model-id (the image to edit)")
        run_real(RECIPE, QwenImageEditPipeline, args, dict(prompt=args.prompt, image=Image.open(image).convert("RGB")),
                 lambda out, path: (out.images[0].save(path + ".png"), print(f"saved {path}.png")))


if __name__ == "__main__":
    main()
