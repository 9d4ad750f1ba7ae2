"""Stable Diffusion 3 with a DiT-cache starting point (no MindIE-SD config was given to us for SD3: tune
it with the quality tools before production): blocks [2, 20) of 24, refresh from step 14 every 2 steps,
28 steps. The pipeline runs CFG batched (cond + uncond in one call), one cache context.

    python examples/sd3.py                                    # tiny random pipeline (default, CPU)
    python examples/sd3.py --model-id stabilityai/stable-diffusion-3-medium-diffusers [--out sd3.png]

Do not combine with ``skip_guidance_layers``: that pipeline option calls the transformer a second time
per step without a cache context, so each such step counts twice.
"""

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_pipeline

RECIPE = RECIPES['SD3']  # npu_cache_fx/recipes.py


def main() -> None:
    args = parse_args(RECIPE, __doc__)
    if args.tiny:
        from tiny_pipelines import sd3_pipeline
        run_tiny_pipeline(RECIPE, sd3_pipeline(), dict(prompt="a cat", negative_prompt="blurry", height=32, width=32,
                                                       guidance_scale=5.0, max_sequence_length=8,
                                                       output_type="latent"), backend_arg(args.backend))
    else:
        from diffusers import StableDiffusion3Pipeline
        run_real(RECIPE, StableDiffusion3Pipeline, args, dict(prompt=args.prompt),
                 lambda out, path: (out.images[0].save(path + ".png"), print(f"saved {path}.png")))


if __name__ == "__main__":
    main()
