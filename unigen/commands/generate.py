"""``unigen generate "PROMPT" --model PATH``: images from a prompt, one PNG each plus a grid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from unigen.commands._common import add_model_arguments, load_pipeline

HELP = "Generate images from a text prompt (writes one PNG per image and a grid)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw, e.g. 'a large red circle at the top left'")
    add_model_arguments(p)
    p.add_argument("--num-images", type=int, default=4, help="images to draw (default 4)")
    p.add_argument("--seed", type=int, default=0, help="random seed; image i uses seed + i (default 0)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs go (default outputs/)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the checkpoint's config.guidance_scale, 5 for Janus)")
    p.add_argument("--cfg-schedule", default="constant",
                   help="constant, linear, or cutoff:K (guidance only for the first K tokens)")
    p.add_argument("--negative-prompt", default=None, help="prompt for the unconditional branch (default: none)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 = greedy (default: the checkpoint's config.temperature, 1 for Janus)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely codes (default: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (pays off on GPU)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")


def grid(images):
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        sheet.paste(img, ((i % cols) * w, (i // cols) * h))
    return sheet


def check_arguments(args: argparse.Namespace) -> None:
    """Flag errors before the (slow) model load, as ``error: ...`` lines instead of tracebacks."""
    from unigen.sampling import as_schedule, check_sampling_args

    if args.num_images < 1:
        raise SystemExit(f"error: --num-images must be at least 1, got {args.num_images}")
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise SystemExit(f"error: --guidance-scale must be >= 0 (1 = no guidance), got {args.guidance_scale}")
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        as_schedule(args.cfg_schedule).scales(1.0, 1)  # validates the schedule; the scale is not checked here
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    check_arguments(args)
    pipe = load_pipeline(args)
    generators = [torch.Generator(pipe.device).manual_seed(args.seed + i) for i in range(args.num_images)]
    try:
        out = pipe(args.prompt, num_images_per_prompt=args.num_images, guidance_scale=args.guidance_scale,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generators,
                   cfg_schedule=args.cfg_schedule, negative_prompt=args.negative_prompt, progress=True,
                   compile=args.compile)
    except ValueError as err:  # e.g. a prompt too long for the image tokens left in the context
        raise SystemExit(f"error: {err}") from None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(out.images):
        path = args.output_dir / f"image_{i:03d}.png"
        img.save(path)
        print(path)
    if not args.no_grid:
        grid(out.images).save(args.output_dir / "grid.png")
        print(args.output_dir / "grid.png")
    return 0
