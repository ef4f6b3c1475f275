"""What the three training commands (``train``, ``train-vq``, ``train-siglip``) share: one spelling of the
output folder and of resuming (``--output-dir``, ``--resume``; the tokenizer trainers' older ``out_dir=`` and
``resume=`` keys still work with a one-line deprecation warning), and one writer per output folder."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from unigen.errors import ArgumentError
from unigen.output_lock import LOCK_NAME, hold_output_dir

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
    """The main process holds ``folder``'s lock for the whole run (``unigen.output_lock``); the other processes
    of a launched run train under it without taking it. A run that fails leaves no lock file or folder it made
    itself (and an earlier run's lock file as it was), so a refused input writes nothing."""
    if not is_main_process():
        yield
        return
    folder = Path(folder)
    lock = folder / LOCK_NAME
    made_folder = not folder.exists()
    earlier = lock.read_bytes() if lock.is_file() else None
    with hold_output_dir(folder, flag):
        try:
            yield
        except BaseException:
            if earlier is None:
                lock.unlink(missing_ok=True)
            else:
                lock.write_bytes(earlier)
            if made_folder:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if the run wrote nothing else there
            raise
