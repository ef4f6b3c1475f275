"""``unigen generate "PROMPT" --model PATH``: images from a prompt, one PNG each plus a grid."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from unigen.commands._common import (
    StagedOutputs,
    add_model_arguments,
    check_writable_dir,
    load_pipeline,
    sigterm_as_interrupt,
)
from unigen.generation.sampling_options import (
    SEED_MAX,
    add_image_sampling_arguments,
    options_from_args,
    positive_int,
    seed_int,
)

HELP = "Generate images from a text prompt (writes one PNG per image and a grid)."
IMAGE_NAME = re.compile(r"image_\d{3,}\.png")
GRID_NAME = "grid.png"
GRID_MAX = 64  # images shown in grid.png: the grid is a preview, and memory must not grow with --num-images


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="what to draw, e.g. 'a large red circle at the top left'")
    add_model_arguments(p)
    p.add_argument("--num-images", type=positive_int, default=4, help="images to draw (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images drawn per forward batch; memory grows with it, not with --num-images (default 8)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed; image i uses seed + i (default 0)")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs go (default outputs/)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the images of an earlier run in --output-dir (default: refuse)")
    add_image_sampling_arguments(p)
    p.add_argument("--negative-prompt", default=None, help="prompt for the unconditional branch (default: none)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the sequential decode step: a CUDA graph on CUDA, torch.compile on CPU (default: "
                        "on for CUDA, off for CPU, where compiling costs more than an image saves)")
    p.add_argument("--no-grid", action="store_true", help=f"do not write {GRID_NAME} (of the first {GRID_MAX} images)")


def grid(images):
    """Images in a near-square grid, row by row, empty cells black."""
    from PIL import Image

    width, height = images[0].size
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * width, rows * height))
    for i, image in enumerate(images):
        sheet.paste(image, (i % cols * width, i // cols * height))
    return sheet


def earlier_outputs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if IMAGE_NAME.fullmatch(p.name) or p.name == GRID_NAME)


def check_destination(out_dir: Path, overwrite: bool) -> list[Path]:
    """The images of an earlier run in ``out_dir``, refused unless ``overwrite``."""
    from unigen.errors import OutputExistsError

    found = earlier_outputs(out_dir)
    if found and not overwrite:
        shown = ", ".join(p.name for p in found[:3]) + (" ..." if len(found) > 3 else "")
        raise OutputExistsError(f"--output-dir {out_dir} already holds images of an earlier run ({shown}); "
                                "pass --overwrite to replace them, or another --output-dir")
    return found


def check_arguments(args: argparse.Namespace):
    """Every flag and the destination checked before the (slow) model load; returns the sampling options."""
    from unigen.errors import ArgumentError
    from unigen.processor import check_text

    check_text(args.prompt, "prompt")
    if args.negative_prompt is not None:
        check_text(args.negative_prompt, "negative prompt")
    if args.seed + args.num_images - 1 > SEED_MAX:
        raise ArgumentError(f"--seed {args.seed} + --num-images {args.num_images} passes the largest seed "
                            f"(2**63 - 1); lower --seed")
    options = options_from_args(args)
    check_writable_dir(args.output_dir, "--output-dir")
    check_destination(args.output_dir, args.overwrite)
    return options


def run(args: argparse.Namespace) -> int:
    from unigen.output_lock import hold_output_dir

    options = check_arguments(args)
    pipe = load_pipeline(args)
    # one writer; the folder checked again now that it is ours; SIGTERM cleans up as Ctrl-C does
    with sigterm_as_interrupt(), hold_output_dir(args.output_dir, "--output-dir"):
        earlier = check_destination(args.output_dir, args.overwrite)
        staged = StagedOutputs(args.output_dir, replacing=bool(earlier))
        try:
            written, passes = draw_all(args, pipe, options, staged)
            staged.commit([p for p in earlier if p.name not in written])
        finally:
            staged.discard()
    if staged.replacing:  # named once they are in place
        print("\n".join(str(args.output_dir / name) for name in written), flush=True)
    print(f"decoder passes: {passes} ({options.decoding} decoding)", file=sys.stderr)
    stale = [p for p in earlier if p.name not in written]
    if stale:  # --overwrite: images of the earlier run that this one did not replace
        print(f"removed {len(stale)} image(s) of the earlier run that this one did not replace", file=sys.stderr)
    return 0


def draw_all(args: argparse.Namespace, pipe, options, staged: StagedOutputs) -> tuple[list[str], int]:
    """Every image and the grid, written where ``staged`` says (each named as it is written unless the set is
    staged); returns their names and the decoder passes."""
    import torch

    from unigen.runs import atomic_write

    preview, written, passes = [], [], 0
    for start in range(0, args.num_images, args.batch_size):
        count = min(args.batch_size, args.num_images - start)
        generators = [torch.Generator(pipe.device).manual_seed(args.seed + i) for i in range(start, start + count)]
        out = pipe(args.prompt, num_images_per_prompt=count, options=options, generator=generators,
                   negative_prompt=args.negative_prompt, progress=True, compile=args.compile)
        passes += out.decoder_passes
        for i, img in enumerate(out.images, start):
            path = staged.path(f"image_{i:03d}.png")
            atomic_write(path, lambda tmp, img=img: img.save(tmp, format="PNG"))
            written.append(path.name)
            if not staged.replacing:
                print(path, flush=True)
        preview += out.images[: max(0, GRID_MAX - len(preview))]
    if not args.no_grid:
        path = staged.path(GRID_NAME)
        atomic_write(path, lambda tmp: grid(preview).save(tmp, format="PNG"))
        written.append(GRID_NAME)
        if not staged.replacing:
            print(path)
    return written, passes
