"""``unigen caption IMG... --model PATH``: one line per image; unreadable images are named, the rest captioned."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigen.commands._common import add_model_arguments, load_pipeline
from unigen.generation.sampling_options import SamplingOptions, finite_float, positive_int

HELP = "Caption images, or answer a question about them (one line per image)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    add_model_arguments(p)
    p.add_argument("--question", default=None, help="question to ask (default: 'Describe the image.')")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer in tokens (default 64)")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="images decoded and captioned at a time; memory grows with it, not with the number of "
                        "images (default 8)")


def read_chunk(paths: list[Path]) -> tuple[list, list[Path]]:
    """(path, RGB image) for each readable path, and the unreadable ones (each named on stderr)."""
    from unigen.processor import load_image

    images, bad = [], []
    for path in paths:
        try:
            images.append((path, load_image(path)))
        except (OSError, ValueError) as err:  # missing, a folder, corrupt, too large: named, the rest go on
            bad.append(path)
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
    return images, bad


def run(args: argparse.Namespace) -> int:
    from unigen.processor import check_text

    options = SamplingOptions(temperature=args.temperature)
    if args.question is not None:
        check_text(args.question, "question")
    pipe, bad = None, []
    for start in range(0, len(args.images), args.batch_size):  # images are read one batch at a time
        chunk, unreadable = read_chunk(args.images[start : start + args.batch_size])
        bad += unreadable
        if not chunk:
            continue
        pipe = pipe or load_pipeline(args)
        texts = pipe.caption([img for _, img in chunk], question=args.question,
                             max_new_tokens=args.max_new_tokens, options=options)
        for (path, _), text in zip(chunk, texts, strict=True):
            print(f"{path}\t{text}", flush=True)
    if bad:
        print(f"error: {len(bad)} image(s) could not be read: {', '.join(map(str, bad))}", file=sys.stderr)
        return 1
    return 0
