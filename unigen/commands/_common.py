"""Flags shared by the commands that load a model (--model, --device, --dtype) and checks of their outputs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from unigen.errors import ArgumentError
from unigen.recipes import resolve

DTYPES = ("float32", "bfloat16", "float16")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=resolve,
                   help="checkpoint directory (any layout unigen loads) or hub id")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"],
                   help="where to run: auto picks cuda, then mps, then cpu (default auto)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="weights dtype (default float32)")


def load_pipeline(args: argparse.Namespace):
    import torch

    from unigen.generation.pipeline import UniGenPipeline, resolve_device

    device = resolve_device(args.device)  # before loading: a missing CUDA/MPS is named at once
    return UniGenPipeline.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).to(device)


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
