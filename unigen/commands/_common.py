"""Flags shared by the commands that load a model (--model, --device, --dtype) and checks of their outputs."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from unigen.errors import ArgumentError
from unigen.recipes import resolve

DTYPES = ("float32", "bfloat16", "float16")


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag: it still works and says, in one line, which flag replaces it
    (``add_argument("--out-dir", action=DeprecatedFlag, new="--output-dir", dest="output_dir")``)."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, help=f"deprecated spelling of {new}", **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; pass {self.new} instead", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=resolve,
                   help="checkpoint directory (any layout unigen loads) or hub id")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to run: auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")
    add_quantize_arguments(p)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """--quantize and the KV cache's dtype (docs/QUANTIZATION.md)."""
    from unigen.models.quantize import DEFAULT_LAYERS, INT4_GROUP_SIZES, KV_CACHE_DTYPES, LAYER_GROUPS, METHODS

    p.add_argument("--quantize", choices=METHODS, default=None,
                   help="quantize the decoder blocks and heads through torchao (default: none)")
    p.add_argument("--quantize-group-size", type=int, choices=INT4_GROUP_SIZES, default=128,
                   help="int4-weight-only: input columns per scale (default 128)")
    p.add_argument("--quantize-layers", default=",".join(DEFAULT_LAYERS),
                   help=f"comma-separated groups to quantize, of {','.join(LAYER_GROUPS)} "
                        f"(default {','.join(DEFAULT_LAYERS)})")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="the KV cache's dtype (default: the weights'); bfloat16 halves an fp32 cache's bytes")


def load_pipeline(args: argparse.Namespace):
    import torch

    from unigen.generation.pipeline import UniGenPipeline, resolve_device
    from unigen.models.quantize import Quantization

    device = resolve_device(args.device)  # before loading: a missing CUDA/MPS is named at once
    quantization = None if args.quantize is None else Quantization(
        args.quantize, args.quantize_group_size, tuple(filter(None, args.quantize_layers.split(","))))
    return UniGenPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device,
                                          quantization=quantization, kv_cache_dtype=args.kv_cache_dtype)


def check_writable_dir(path: Path, flag: str) -> None:
    """``path`` is (or can be made) a folder this process may write into; checked before any slow work,
    and without creating anything yet."""
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{flag} {path} is a file, not a folder; pass a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ArgumentError(f"{flag} {path}: {existing} is a file, so the folder cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path}: no permission to write into {existing}; pass another folder")


def check_writable_file(path: Path, flag: str) -> None:
    """``path`` names a file this process may write (its folder may not exist yet)."""
    if path.is_dir():
        raise ArgumentError(f"{flag} {path} is a folder; pass a file name, e.g. {path / 'scores.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ArgumentError(f"{flag} {path}: no permission to write it")
    check_writable_dir(path.parent, flag)


# ---- replacing an earlier set of outputs --------------------------------------------------------------

STAGING_NAME = ".unigen-new"  # inside the output folder: same file system (renames), under its lock


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block take effect when it ends, as they would have: a swap of files
    is not cut in two. (A handler, not a blocked signal mask: the kernel would hand a process's signal to any
    thread that does not block it, such as a torch worker.) A SIGKILL is never deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        for sig in pending:
            signal.raise_signal(sig)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a service manager, a job scheduler) stops the command as Ctrl-C does, so that it
    cleans up the same way (temp folders, locks; ``error: interrupted``, exit 130); the default action would
    end the process on the spot and leave them behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class StagedOutputs:
    """Where a run writes its files when it replaces an earlier set (``--overwrite``): a hidden folder beside
    them, swapped in by :meth:`commit` once every file is complete. A run stopped before (an error, SIGTERM,
    SIGKILL) leaves the earlier set as it was; the next run removes what a killed one left in the staging
    folder. The caller holds the output folder's lock (``unigen.output_lock``) throughout."""

    def __init__(self, out_dir: Path, replacing: bool):
        self.out_dir = out_dir
        self.folder = out_dir / STAGING_NAME
        self.replacing = replacing
        shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's partial set
        if replacing:
            self.folder.mkdir()

    def path(self, name: str) -> Path:
        """Where to write the output file ``name`` now."""
        return (self.folder if self.replacing else self.out_dir) / name

    def commit(self, remove: list[Path] = ()) -> None:
        """Move every staged file into the output folder and delete ``remove`` (earlier files the new set does
        not replace), with SIGINT and SIGTERM deferred until the swap is complete."""
        if not self.replacing:
            for path in remove:
                path.unlink(missing_ok=True)
            return
        with signals_deferred():
            for path in remove:
                path.unlink(missing_ok=True)
            for staged in sorted(self.folder.iterdir()):
                os.replace(staged, self.out_dir / staged.name)
            self.folder.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
