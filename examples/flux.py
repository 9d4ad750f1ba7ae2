"""FLUX.1 with MindIE-SD's shipped DiT-cache config: double blocks [5, 13), single blocks [1, 23),
refresh from step 18 every 2 steps, 28 steps.

    python examples/flux.py                                   # tiny random pipeline (default, CPU)
    python examples/flux.py --model-id black-forest-labs/FLUX.1-dev [--backend torchair] [--out flux.png]
"""

from _common import RECIPES, backend_arg, parse_args, run_real, run_tiny_pipeline

RECIPE = RECIPES['FLUX.1']  # npu_cache_fx/recipes.py


def main() -> None:
    args = parse_args(RECIPE, __doc__)
    from diffusers import FluxPipeline
    if args.tiny:
        from tiny_pipelines import flux_pipeline
        run_tiny_pipeline(RECIPE, flux_pipeline(), dict(prompt="a photo of an astronaut riding a horse", height=32,
                                                        width=32, max_sequence_length=16, output_type="pt"),
                          backend_arg(args.backend))
    else:
        run_real(RECIPE, FluxPipeline, args, dict(prompt=args.prompt),
                 lambda out, path: (out.images[0].save(path + ".png"), print(f"saved {path}.png")))


if __name__ == "__main__":
    main()
