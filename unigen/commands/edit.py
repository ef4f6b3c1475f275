"""``unigen edit SRC.png... "make it blue" --model PATH``: edited images, one PNG per source image."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from unigen.commands._common import (
    StagedOutputs,
    add_model_arguments,
    check_writable_dir,
    load_pipeline,
    sigterm_as_interrupt,
)
from unigen.generation.sampling_options import add_image_sampling_arguments, options_from_args, positive_int, seed_int

HELP = "Edit images by an instruction (writes one PNG per source image into --output-dir)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="source image files (PNG, JPEG, ...)")
    p.add_argument("instruction", help="what to change, e.g. 'make it blue'")
    add_model_arguments(p)
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="where PNGs go (default outputs/)")
    p.add_argument("--num-images", type=positive_int, default=1, help="edited versions of each image (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="source images per forward batch (default 8)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace existing PNGs of the same names")
    p.add_argument("--cfg-drop", choices=["instruction", "image", "both"], default=None,
                   help="what the unconditional (guidance) row drops (default: editing.DEFAULT_CFG_DROP)")
    add_image_sampling_arguments(p, schedule=False)


def output_names(sources: list[Path], num_images: int) -> list[list[str]]:
    """``NNN-stem.png`` (``NNN-stem-K.png`` for several versions): distinct even for equal file names."""
    return [[f"{i:03d}-{src.stem}.png" if num_images == 1 else f"{i:03d}-{src.stem}-{k}.png"
             for k in range(num_images)] for i, src in enumerate(sources)]


def existing_outputs(out_dir: Path, names: list[list[str]], overwrite: bool) -> list[str]:
    """The output names already in ``out_dir``, refused unless ``overwrite``."""
    from unigen.errors import OutputExistsError

    existing = [n for row in names for n in row if (out_dir / n).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"--output-dir {out_dir} already holds {existing[0]}"
                                f"{' ...' if len(existing) > 1 else ''}; pass --overwrite or another --output-dir")
    return existing


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from unigen.commands.caption import read_chunk
    from unigen.generation.editing import check_instruction
    from unigen.output_lock import hold_output_dir
    from unigen.runs import atomic_write

    check_instruction(args.instruction)
    options = options_from_args(args)
    check_writable_dir(args.output_dir, "--output-dir")
    names = output_names(args.images, args.num_images)
    existing_outputs(args.output_dir, names, args.overwrite)
    pipe, bad, done = None, [], []
    generator = torch.Generator().manual_seed(args.seed)
    indexed = list(enumerate(args.images))
    with sigterm_as_interrupt(), contextlib.ExitStack() as held:  # SIGTERM cleans up as Ctrl-C does
        for start in tqdm(range(0, len(indexed), args.batch_size), desc="editing", unit="batch"):
            readable = []
            for i, path in indexed[start : start + args.batch_size]:
                image, unreadable = read_chunk([path])
                bad += unreadable
                readable += [(i, path, img) for _, img in image]
            if not readable:
                continue
            if pipe is None:  # the model and the folder's lock once there is something to edit
                pipe = load_pipeline(args)
                held.enter_context(hold_output_dir(args.output_dir, "--output-dir"))
                staged = StagedOutputs(args.output_dir, bool(existing_outputs(args.output_dir, names, args.overwrite)))
                held.callback(staged.discard)
            out = pipe.edit([img for _, _, img in readable], args.instruction, num_images_per_prompt=args.num_images,
                            generator=generator, cfg_drop=args.cfg_drop, options=options)
            for j, (i, path, _) in enumerate(readable):
                for k in range(args.num_images):
                    target = staged.path(names[i][k])
                    atomic_write(target, lambda p, img=out.images[j * args.num_images + k]: img.save(p, format="PNG"))
                    done.append((path, args.output_dir / names[i][k]))
                    if not staged.replacing:
                        print(f"{path}\t{target}", flush=True)
        if pipe is not None:
            staged.commit()  # --overwrite: the earlier files of these names are replaced all at once
            if staged.replacing:
                print("\n".join(f"{path}\t{target}" for path, target in done), flush=True)
    if bad:
        print(f"error: {len(bad)} image(s) could not be read: {', '.join(map(str, bad))}", file=sys.stderr)
        return 1
    return 0
