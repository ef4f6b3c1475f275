"""Generate images from prompts with any checkpoint unigen loads; the Python twin of `unigen generate`.

    python sample/generate.py --model demo_out/model/stage3/final "a large red circle at the top left"

Sampling options left out take the checkpoint's own defaults (config.guidance_scale, config.temperature).
"""

import argparse
from pathlib import Path

import torch

from unigen import UniGenPipeline
from unigen.generation.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int
from unigen.runs import resolve_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+")
    p.add_argument("--model", required=True)
    p.add_argument("--num-images", type=positive_int, default=4)
    add_image_sampling_arguments(p)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("outputs"))
    return p


def main() -> None:
    args = build_parser().parse_args()
    options = options_from_args(args)

    pipe = UniGenPipeline.from_pretrained(args.model).to(resolve_device("auto"))
    out = pipe(args.prompts, num_images_per_prompt=args.num_images, options=options,
               generator=torch.Generator(pipe.device).manual_seed(args.seed), progress=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(out.images):
        prompt = args.prompts[i // args.num_images]
        path = args.output_dir / f"{i // args.num_images:02d}_{i % args.num_images:02d}.png"
        image.save(path)
        print(f"{path}\t{prompt}")


if __name__ == "__main__":
    main()
