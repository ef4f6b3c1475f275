"""What the three training commands (``train``, ``train-vq``, ``train-siglip``) share: one spelling of the
output folder and of resuming (``--output-dir``, ``--resume``; the tokenizer trainers' older ``out_dir=`` and
``resume=`` keys still work with a one-line deprecation warning), and one writer per output folder."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from unigen.errors import ArgumentError
from unigen.output_lock import hold_output_dir

RESUME_HELP = ("'latest' (continue the newest checkpoint in --output-dir, if any; 'auto' is the same) or a "
               "checkpoint folder. Without it a run refuses to replace an earlier run's checkpoints (overwrite=true "
               "allows it)")
OLD_KEYS = {"out_dir": ("--output-dir", "output folder"), "resume": ("--resume", "checkpoint to resume")}


def add_run_arguments(p: argparse.ArgumentParser, output_help: str, resume_help: str = RESUME_HELP) -> None:
    p.add_argument("--output-dir", default=None, help=output_help)
    p.add_argument("--resume", default=None, help=resume_help)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The tokenizer trainers' overrides with ``--output-dir`` / ``--resume`` as their config keys; an old
    ``out_dir=`` / ``resume=`` key is accepted with a warning, and refused beside its flag."""
    overrides = list(args.overrides)
    for key, (flag, what) in OLD_KEYS.items():
        old = [o for o in overrides if o.split("=", 1)[0] == key]
        if old and getattr(args, flag[2:].replace("-", "_")) is not None:
            raise ArgumentError(f"{old[0]} and {flag} both name the {what}; pass {flag} only")
        if old:
            print(f"warning: {key}= is deprecated; pass {flag} {old[-1].split('=', 1)[1]} instead", file=sys.stderr)
    if args.output_dir is not None:
        overrides.append(f"out_dir={args.output_dir}")
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    return overrides


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun / accelerate launch), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def hold_run_folder(folder: str | os.PathLike, flag: str = "--output-dir") -> Iterator[None]:
    """The main process holds ``folder``'s lock for the whole run (``unigen.output_lock``, which leaves no lock
    file and no folder it made empty behind); the other processes of a launched run train under it without
    taking it."""
    if not is_main_process():
        yield
        return
    with hold_output_dir(folder, flag):
        yield
