"""``unigen caption IMG... --model PATH``: one line per image; unreadable images are reported."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from unigen.commands._common import add_model_arguments, load_pipeline

HELP = "Caption images, or answer a question about them (one line per image)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="image files (PNG, JPEG, ...)")
    add_model_arguments(p)
    p.add_argument("--question", default=None, help="question to ask (default: 'Describe the image.')")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), > 0 samples")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward batch (default 8)")


def run(args: argparse.Namespace) -> int:
    from unigen.processor import ImageDecodeError, load_image
    from unigen.sampling import check_sampling_args

    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise SystemExit(f"error: --max-new-tokens and --batch-size must be at least 1, got "
                         f"{args.max_new_tokens} and {args.batch_size}")
    try:
        check_sampling_args(args.temperature, None, None)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    images, bad = [], []
    for path in args.images:
        try:
            images.append((path, load_image(path)))
        except (FileNotFoundError, ImageDecodeError) as err:
            bad.append(path)
            print(f"error: {err}", file=sys.stderr)
    if images:
        pipe = load_pipeline(args)
        for start in range(0, len(images), args.batch_size):
            chunk = images[start : start + args.batch_size]
            texts = pipe.caption([img for _, img in chunk], question=args.question,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            for (path, _), text in zip(chunk, texts, strict=True):
                print(f"{path}\t{text}")
    if bad:
        print(f"error: {len(bad)} image(s) could not be read: {', '.join(map(str, bad))}", file=sys.stderr)
        return 1
    return 0
